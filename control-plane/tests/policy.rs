//! Allow and deny lists through the admin API, in-process on a real SQLite file with a recording
//! KV writer: the API policy routes (scopes, another workspace, bad input), what reaches KV and
//! whether it is purged, and the origin's own verify answering `FORBIDDEN`.

use std::time::Duration;

use axum::http::StatusCode;
use keyward_shared::policy::{ApiRecord, kv_key_for_api};
use serde_json::{Value, json};
use support::admin::{Harness, harness};

mod support;

impl Harness {
    /// The origin's verify answer's code for `key` asked for a client at `ip` in `country`.
    async fn verify(&self, key: &str, ip: &str, country: &str) -> String {
        let body = json!({ "key": key, "client": { "ip": ip, "country": country } });
        let (status, answer) = self.call("POST", "/v1/keys/verify", Some(body)).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        answer["code"].as_str().unwrap().to_owned()
    }

    /// The API record written to KV at `version`; a tightening change's KV write follows its
    /// answer, so this waits for it.
    async fn written(&self, api: &str, version: u64) -> ApiRecord {
        for _ in 0..100 {
            let found = self.kv.0.lock().unwrap().iter().rev().find_map(|(k, v)| {
                let record = ApiRecord::from_json(v).ok().filter(|_| *k == kv_key_for_api(api))?;
                (record.version == version).then_some(record)
            });
            if let Some(record) = found {
                return record;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("version {version} of {api}'s record never reached KV");
    }
}

#[tokio::test]
async fn an_api_policy_is_shown_changed_delivered_and_lifted() {
    let h = harness(5).await;
    let api = h.api().await;
    let path = format!("/v1/apis/{api}/policy");
    let (status, shown) = h.call("GET", &path, None).await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!((shown["version"].as_u64(), shown["limit_override"].is_null()), (Some(0), true), "{shown}");

    let body = json!({ "deny_ips": ["10.0.0.0/8", "2001:db8::/32"], "deny_countries": ["ru"], "limit_override": { "percent": 50 } });
    let (status, changed) = h.call("PUT", &path, Some(body.clone())).await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert_eq!(changed["version"], 1);
    assert_eq!(changed["policy"]["deny_countries"], json!(["RU"]));
    assert_eq!(
        changed["regions"][0]["acknowledged"], false,
        "tightening is purged (the region is unreachable): {changed}"
    );
    let record = h.written(&api, 1).await;
    assert_eq!(record.policy.deny_ips.len(), 2);
    assert_eq!(record.limit_override.map(|o| o.percent), Some(50));

    // The same policy again changes nothing and delivers nothing.
    let (_, again) = h.call("PUT", &path, Some(body)).await;
    assert_eq!((again["version"].as_u64(), again.get("regions")), (Some(1), None), "{again}");

    // Lifting everything loosens: written, not purged.
    let (status, lifted) = h.call("PUT", &path, Some(json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{lifted}");
    assert_eq!(lifted["version"], 2);
    assert!(lifted["regions"][0].get("acknowledged").is_none(), "loosening is not purged: {lifted}");
    let record = h.written(&api, 2).await;
    assert!(record.policy.is_empty() && record.limit_override.is_none());
    let (_, shown) = h.call("GET", &path, None).await;
    assert_eq!(shown["version"], 2);
}

/// Two responders at once: a `PATCH` changes only the lists it names, so each keeps the
/// other's; a change made from a version the policy has moved past is refused (409).
#[tokio::test]
async fn a_patch_keeps_what_it_does_not_name_and_a_stale_version_is_refused() {
    let h = harness(5).await;
    let api = h.api().await;
    let path = format!("/v1/apis/{api}/policy");
    let first = json!({ "deny_ips": ["10.0.0.0/8"], "limit_override": { "percent": 50 } });
    let (status, one) = h.call("PATCH", &path, Some(first)).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    let (status, two) = h.call("PATCH", &path, Some(json!({ "deny_countries": ["RU"] }))).await;
    assert_eq!(status, StatusCode::OK, "{two}");
    assert_eq!(two["version"], 2, "{two}");
    assert_eq!(two["policy"]["deny_ips"], json!(["10.0.0.0/8"]), "the other responder's list is kept: {two}");
    assert_eq!(two["policy"]["deny_countries"], json!(["RU"]), "{two}");
    assert_eq!(two["limit_override"]["percent"], 50, "the override is kept: {two}");

    let (status, stale) = h.call("PATCH", &path, Some(json!({ "deny_ips": [], "version": 1 }))).await;
    assert_eq!((status, stale["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("CONFLICT")), "{stale}");
    let (status, stale) = h.call("PUT", &path, Some(json!({ "version": 1 }))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{stale}");
    let (_, shown) = h.call("GET", &path, None).await;
    assert_eq!((shown["version"].as_u64(), &shown["policy"]["deny_ips"]), (Some(2), &json!(["10.0.0.0/8"])));

    let (status, lifted) = h.call("PATCH", &path, Some(json!({ "limit_override": null, "version": 2 }))).await;
    assert_eq!(status, StatusCode::OK, "{lifted}");
    assert!(lifted["limit_override"].is_null() && lifted["policy"]["deny_countries"] == json!(["RU"]), "{lifted}");
    let (status, bad) = h.call("PATCH", &path, Some(json!({ "deny_ips": ["10.0.0.0/33"] }))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
}

#[tokio::test]
async fn policy_routes_check_scopes_workspaces_and_input() {
    let h = harness(5).await;
    let api = h.api().await;
    let path = format!("/v1/apis/{api}/policy");
    let (_, reader) = h.root_key(&[&format!("api.{api}.read_key")]).await;
    assert_eq!(h.call_as(&reader, "GET", &path, None).await.0, StatusCode::OK);
    let (status, refused) = h.call_as(&reader, "PUT", &path, Some(json!({ "deny_countries": ["RU"] }))).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("FORBIDDEN")), "{refused}");
    let (_, verifier) = h.root_key(&["api.*.verify_key"]).await;
    assert_eq!(h.call_as(&verifier, "GET", &path, None).await.0, StatusCode::FORBIDDEN);

    let (status, tenant) = h.call("POST", "/v1/workspaces", Some(json!({ "name": "tenant" }))).await;
    assert_eq!(status, StatusCode::CREATED, "{tenant}");
    let other = tenant["root_key"]["key"].as_str().unwrap();
    for (method, body) in [("GET", None), ("PUT", Some(json!({ "deny_countries": ["RU"] })))] {
        let (status, answer) = h.call_as(other, method, &path, body).await;
        assert_eq!((status, answer["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("NOT_FOUND")), "{answer}");
    }
    let (status, _) = h.call("GET", "/v1/apis/api_01ARZ3NDEKTSV4RRFFQ69G5FAV/policy", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let bad: [(Value, &str); 7] = [
        (json!({ "deny_ips": ["10.1.0.0/8"] }), "deny_ips: `10.1.0.0/8` is not an IP range"),
        (json!({ "allow_ips": ["300.0.0.1"] }), "allow_ips: `300.0.0.1`"),
        (json!({ "deny_ips": ["::/129"] }), "deny_ips: `::/129`"),
        (json!({ "deny_countries": ["RUS"] }), "deny_countries: `RUS` is not a country code"),
        (json!({ "allow_countries": ["1A"] }), "allow_countries: `1A`"),
        (json!({ "limit_override": { "percent": 0 } }), "percent is 1 to 100"),
        (json!({ "deny_ip": ["10.0.0.0/8"] }), "unknown field"),
    ];
    for (body, says) in bad {
        let (status, answer) = h.call("PUT", &path, Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{body}: {message}");
    }
    let too_many: Vec<String> = (0..65).map(|i| format!("10.0.{i}.0/24")).collect();
    assert_eq!(h.call("PUT", &path, Some(json!({ "deny_ips": too_many }))).await.0, StatusCode::BAD_REQUEST);
    let (status, answer) =
        h.call("POST", "/v1/keys", Some(json!({ "api_id": api, "policy": { "deny_ips": ["nope"] } }))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let (_, shown) = h.call("GET", &path, None).await;
    assert_eq!(shown["version"], 0, "nothing bad was stored: {shown}");
}

#[tokio::test]
async fn the_origin_answers_forbidden_from_the_keys_and_the_apis_lists() {
    let h = harness(5).await;
    let api = h.api().await;
    let body = json!({ "api_id": api, "policy": { "deny_ips": ["203.0.113.0/24"] } });
    let (status, created) = h.call("POST", "/v1/keys", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (id, key) = (created["id"].as_str().unwrap(), created["key"].as_str().unwrap());
    let (_, shown) = h.call("GET", &format!("/v1/keys/{id}"), None).await;
    assert_eq!(shown["policy"]["deny_ips"], json!(["203.0.113.0/24"]), "{shown}");

    assert_eq!(h.verify(key, "203.0.113.9", "DE").await, "FORBIDDEN");
    assert_eq!(h.verify(key, "198.51.100.1", "DE").await, "VALID");
    let body = json!({ "key": key, "client": { "ip": "203.0.113.9" } });
    let (_, answer) = h.call("POST", "/v1/keys/verify", Some(body)).await;
    assert_eq!((answer["valid"].as_bool(), answer["key_id"].as_str()), (Some(false), Some(id)), "{answer}");

    // The API's lists apply to every key of the API.
    let path = format!("/v1/apis/{api}/policy");
    assert_eq!(h.call("PUT", &path, Some(json!({ "deny_countries": ["RU"] }))).await.0, StatusCode::OK);
    assert_eq!(h.verify(key, "198.51.100.1", "RU").await, "FORBIDDEN");
    assert_eq!(h.verify(key, "198.51.100.1", "DE").await, "VALID");
    assert_eq!(h.call("PUT", &path, Some(json!({ "allow_ips": ["198.51.100.0/24"] }))).await.0, StatusCode::OK);
    assert_eq!(h.verify(key, "198.51.100.1", "RU").await, "VALID", "the deny list was replaced");
    assert_eq!(h.verify(key, "192.0.2.1", "DE").await, "FORBIDDEN", "outside the allow list");
    // With no client named, the peer address decides (none in-process: fail closed).
    let (_, answer) = h.call("POST", "/v1/keys/verify", Some(json!({ "key": key }))).await;
    assert_eq!(answer["code"], "FORBIDDEN", "{answer}");

    // The key's own lists are replaced and cleared by an update.
    let patch = json!({ "policy": { "deny_countries": ["DE"] } });
    assert_eq!(h.call("PATCH", &format!("/v1/keys/{id}"), Some(patch)).await.0, StatusCode::OK);
    assert_eq!(h.verify(key, "198.51.100.1", "DE").await, "FORBIDDEN");
    assert_eq!(h.verify(key, "198.51.100.1", "FR").await, "VALID");
    let (_, cleared) = h.call("PATCH", &format!("/v1/keys/{id}"), Some(json!({ "policy": null }))).await;
    assert!(cleared["key"].get("policy").is_none(), "{cleared}");
    assert_eq!(h.verify(key, "198.51.100.1", "DE").await, "VALID");

    // A revoked key is REVOKED, never FORBIDDEN.
    assert_eq!(h.call("POST", &format!("/v1/keys/{id}/revoke"), None).await.0, StatusCode::OK);
    assert_eq!(h.verify(key, "192.0.2.1", "DE").await, "REVOKED");
}
