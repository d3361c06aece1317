//! Identities through the admin API, in-process on a real SQLite file with a recording KV
//! writer: create, read, list, update and delete; scopes, another workspace, bad input and
//! external id clashes; what reaches KV and whether it is purged; keys attached and detached;
//! an identity in use cannot be deleted; the origin refuses to verify a key with an identity.

use std::time::Duration;

use axum::http::StatusCode;
use keyward_shared::KeyRecord;
use keyward_shared::identity::{IdentityRecord, kv_key_for_identity};
use serde_json::{Value, json};
use support::admin::{Harness, harness};

mod support;

impl Harness {
    /// The identity's record written to KV at `version` (a tightening change's KV write
    /// follows its answer, so this waits for it).
    async fn written(&self, id: &str, version: u64) -> IdentityRecord {
        for _ in 0..100 {
            let found = self.kv.0.lock().unwrap().iter().rev().find_map(|(k, v)| {
                let record = IdentityRecord::from_json(v).ok().filter(|_| *k == kv_key_for_identity(id))?;
                (record.version == version).then_some(record)
            });
            if let Some(record) = found {
                return record;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("version {version} of identity {id} never reached KV");
    }

    /// The newest record of key `id` written to KV.
    fn key_written(&self, id: &str) -> KeyRecord {
        let writes = self.kv.0.lock().unwrap();
        writes.iter().rev().find_map(|(_, v)| KeyRecord::from_json(v).ok().filter(|r| r.id == id)).unwrap()
    }

    async fn identity(&self, body: Value) -> String {
        let (status, created) = self.call("POST", "/v1/identities", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        created["identity"]["id"].as_str().unwrap().to_owned()
    }
}

#[tokio::test]
async fn an_identity_is_created_read_changed_delivered_and_deleted() {
    let h = harness(5).await;
    let body = json!({
        "external_id": "acct_42",
        "meta": { "plan": "pro" },
        "credits": { "remaining": 100 },
        "ratelimits": [{ "name": "api", "limit": 10, "duration_ms": 1000 }],
    });
    let (status, created) = h.call("POST", "/v1/identities", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let identity = &created["identity"];
    let id = identity["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("idn_"), "{created}");
    assert_eq!((identity["version"].as_u64(), identity["meta"]["plan"].as_str()), (Some(1), Some("pro")));
    assert!(created["regions"][0].get("acknowledged").is_none(), "a creation is not purged: {created}");
    let record = h.written(&id, 1).await;
    assert_eq!(record.credits.as_ref().map(|c| c.set_to), Some(100));
    assert_eq!(record.ratelimits[0].limit, 10);
    assert_eq!(record.external_id, "acct_42");

    // Without an authority configured, what remains cannot be asked: the setting, and why not.
    let (status, credits) = h.call("GET", &format!("/v1/identities/{id}/credits"), None).await;
    assert_eq!((status, credits["credits"]["set_to"].as_u64()), (StatusCode::OK, Some(100)), "{credits}");
    assert!(credits["remaining"].is_null() && credits["error"].is_string(), "{credits}");
    let (status, shown) = h.call("GET", &format!("/v1/identities/{id}"), None).await;
    assert_eq!((status, shown["external_id"].as_str()), (StatusCode::OK, Some("acct_42")), "{shown}");
    let (_, found) = h.call("GET", "/v1/identities?external_id=acct_42", None).await;
    assert_eq!(found["identities"].as_array().map(Vec::len), Some(1), "{found}");
    let (_, none) = h.call("GET", "/v1/identities?external_id=acct_43", None).await;
    assert_eq!(none["identities"].as_array().map(Vec::len), Some(0), "{none}");

    // A lowered limit tightens: purged (the region is unreachable, so not acknowledged).
    let path = format!("/v1/identities/{id}");
    let lower = json!({ "ratelimits": [{ "name": "api", "limit": 5, "duration_ms": 1000 }] });
    let (status, changed) = h.call("PATCH", &path, Some(lower.clone())).await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert_eq!(changed["identity"]["version"], 2);
    assert_eq!(changed["regions"][0]["acknowledged"], false, "tightening is purged: {changed}");
    assert_eq!(h.written(&id, 2).await.ratelimits[0].limit, 5);
    let (_, again) = h.call("PATCH", &path, Some(lower)).await;
    assert_eq!((again["identity"]["version"].as_u64(), again.get("regions")), (Some(2), None), "{again}");
    // Removing the credits loosens: written, not purged.
    let (_, loosened) = h.call("PATCH", &path, Some(json!({ "credits": null }))).await;
    assert!(loosened["regions"][0].get("acknowledged").is_none(), "{loosened}");
    assert!(h.written(&id, 3).await.credits.is_none());
    let (status, stale) = h.call("PATCH", &path, Some(json!({ "meta": {}, "version": 1 }))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{stale}");

    assert_eq!(h.call("DELETE", &path, None).await.0, StatusCode::OK);
    assert_eq!(h.call("GET", &path, None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(h.call("DELETE", &path, None).await.0, StatusCode::NOT_FOUND);
    let (status, audit) = h.call("GET", &format!("/v1/audit?target={id}"), None).await;
    assert_eq!(status, StatusCode::OK, "{audit}");
    let actions: Vec<&str> = audit["entries"].as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    for action in ["identity.create", "identity.update", "identity.delete"] {
        assert!(actions.contains(&action), "{action} in {actions:?}");
    }
}

#[tokio::test]
async fn keys_attach_to_an_identity_of_their_workspace_which_cannot_be_deleted_while_used() {
    let h = harness(5).await;
    let api = h.api().await;
    let identity = h.identity(json!({ "external_id": "acct_1", "credits": { "remaining": 5 } })).await;
    let (status, created) = h.call("POST", "/v1/keys", Some(json!({ "api_id": api, "identity_id": identity }))).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (key_id, key) = (created["id"].as_str().unwrap().to_owned(), created["key"].as_str().unwrap().to_owned());
    let (_, shown) = h.call("GET", &format!("/v1/keys/{key_id}"), None).await;
    assert_eq!(shown["identity_id"].as_str(), Some(identity.as_str()), "{shown}");
    assert_eq!(h.key_written(&key_id).identity_id.as_deref(), Some(identity.as_str()));

    // The origin settles at the key's authority alone: it refuses rather than skip the identity.
    let (status, refused) = h.call("POST", "/v1/keys/verify", Some(json!({ "key": key }))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");

    let path = format!("/v1/identities/{identity}");
    let (status, used) = h.call("DELETE", &path, None).await;
    assert_eq!((status, used["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("CONFLICT")), "{used}");
    // Detaching loosens (not purged); attaching again tightens (purged).
    let key_path = format!("/v1/keys/{key_id}");
    let (status, detached) = h.call("PATCH", &key_path, Some(json!({ "identity_id": null }))).await;
    assert_eq!(status, StatusCode::OK, "{detached}");
    assert!(detached["key"].get("identity_id").is_none(), "{detached}");
    assert!(detached["regions"][0].get("acknowledged").is_none(), "{detached}");
    let (_, attached) = h.call("PATCH", &key_path, Some(json!({ "identity_id": identity }))).await;
    assert_eq!(attached["regions"][0]["acknowledged"], false, "attaching is purged: {attached}");
    assert_eq!(h.call("POST", &format!("{key_path}/revoke"), None).await.0, StatusCode::OK);
    assert_eq!(h.call("DELETE", &path, None).await.0, StatusCode::CONFLICT, "a revoked key still names it");
    assert_eq!(h.call("DELETE", &key_path, None).await.0, StatusCode::OK);
    assert_eq!(h.call("DELETE", &path, None).await.0, StatusCode::OK, "only deleted keys name it");

    // Another workspace's identity, or none, cannot be attached.
    let (_, tenant) = h.call("POST", "/v1/workspaces", Some(json!({ "name": "tenant" }))).await;
    let other = tenant["root_key"]["key"].as_str().unwrap().to_owned();
    let body = json!({ "external_id": "acct_1" });
    let (status, theirs) = h.call_as(&other, "POST", "/v1/identities", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "the same external id in another workspace: {theirs}");
    let theirs = theirs["identity"]["id"].as_str().unwrap();
    for identity_id in [theirs, "idn_01ARZ3NDEKTSV4RRFFQ69G5FAV"] {
        let body = json!({ "api_id": api, "identity_id": identity_id });
        let (status, answer) = h.call("POST", "/v1/keys", Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    }
    let (status, answer) = h.call("POST", "/v1/keys", Some(json!({ "api_id": api, "identity_id": "nope" }))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    for method in ["GET", "DELETE"] {
        let (status, answer) = h.call_as(&other, method, &format!("/v1/identities/{identity}"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method}: {answer}");
    }
}

#[tokio::test]
async fn identity_routes_check_scopes_and_input() {
    let h = harness(5).await;
    let id = h.identity(json!({ "external_id": "acct_7" })).await;
    let (status, clash) = h.call("POST", "/v1/identities", Some(json!({ "external_id": "acct_7" }))).await;
    assert_eq!((status, clash["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("CONFLICT")), "{clash}");
    let other = h.identity(json!({ "external_id": "acct_8" })).await;
    let (status, clash) =
        h.call("PATCH", &format!("/v1/identities/{other}"), Some(json!({ "external_id": "acct_7" }))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{clash}");

    let (_, reader) = h.root_key(&["api.*.read_key"]).await;
    assert_eq!(h.call_as(&reader, "GET", &format!("/v1/identities/{id}"), None).await.0, StatusCode::OK);
    assert_eq!(h.call_as(&reader, "GET", "/v1/identities", None).await.0, StatusCode::OK);
    let refused = h.call_as(&reader, "PATCH", &format!("/v1/identities/{id}"), Some(json!({ "meta": {} }))).await;
    assert_eq!(refused.0, StatusCode::FORBIDDEN, "{}", refused.1);
    let api = h.api().await;
    let (_, one_api) = h.root_key(&[&format!("api.{api}.create_key"), &format!("api.{api}.read_key")]).await;
    let body = json!({ "external_id": "acct_9" });
    assert_eq!(h.call_as(&one_api, "POST", "/v1/identities", Some(body)).await.0, StatusCode::FORBIDDEN);
    assert_eq!(h.call_as(&one_api, "GET", "/v1/identities", None).await.0, StatusCode::FORBIDDEN);
    assert_eq!(h.call_as(&reader, "DELETE", &format!("/v1/identities/{id}"), None).await.0, StatusCode::FORBIDDEN);

    let big = "x".repeat(17 * 1024);
    let bad: [(Value, &str); 6] = [
        (json!({ "external_id": "" }), "external_id must be"),
        (json!({ "external_id": "a".repeat(201) }), "external_id must be"),
        (json!({ "external_id": "a", "meta": { "big": big } }), "the limit is"),
        (json!({ "external_id": "a", "ratelimits": [{ "name": "api", "limit": 0, "duration_ms": 1000 }] }), "limit"),
        (json!({ "external_id": "a", "max_staleness_ms": 0 }), "max_staleness_ms"),
        (json!({ "external_id": "a", "owner": "x" }), "unknown field"),
    ];
    for (body, says) in bad {
        let (status, answer) = h.call("POST", "/v1/identities", Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{body}: {message}");
    }
    assert_eq!(h.call("GET", "/v1/identities/key_01ARZ3NDEKTSV4RRFFQ69G5FAV", None).await.0.as_u16(), 400);
    assert_eq!(h.call("GET", "/v1/identities?limit=0", None).await.0, StatusCode::BAD_REQUEST);
}
