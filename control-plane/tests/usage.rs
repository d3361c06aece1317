//! Usage events at the control plane, driven in-process on a real SQLite file: signed batches
//! stored once, losses counted exactly, the origin's own verifications recorded, and the usage
//! routes' answers and access checks.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use keyward_control_plane::config::Secret;
use keyward_control_plane::edge_client::EdgeClient;
use keyward_control_plane::http::{AppState, app};
use keyward_control_plane::serve::bootstrap;
use keyward_control_plane::store::Store;
use keyward_control_plane::time::now_ms;
use keyward_shared::internal::{NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign};
use keyward_shared::usage::{ClientInfo, USAGE_PATH, UsageBatch, UsageEvent};
use keyward_shared::{Code, Key, Source};
use serde_json::{Value, json};
use tower::ServiceExt;

const SECRET: &str = "usage-test-secret-usage-test-secret";

struct Harness {
    _dir: tempfile::TempDir,
    state: AppState,
    root: String,
    workspace: String,
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("test.sqlite")).await.unwrap();
    let root = Key::generate("kw_root", [5; 32]).unwrap().expose().to_owned();
    bootstrap(&store, Some(root.clone())).await.unwrap();
    let workspace = store.workspaces().await.unwrap()[0].0.clone();
    let edge = Arc::new(EdgeClient::new(vec![], None, Secret::new(SECRET.into())));
    Harness { _dir: dir, state: AppState::new(store, edge), root, workspace }
}

impl Harness {
    async fn send(&self, request: Request<Body>) -> (StatusCode, Value) {
        let response = app(self.state.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn call_as(&self, root: &str, method: &str, path: &str, body: Option<&str>) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {root}"))
            .header("content-type", "application/json")
            .body(Body::from(body.unwrap_or("").to_owned()))
            .unwrap();
        self.send(request).await
    }

    async fn call(&self, method: &str, path: &str, body: Option<&str>) -> (StatusCode, Value) {
        self.call_as(&self.root, method, path, body).await
    }

    /// A new API and one key of it: (api id, key id, key).
    async fn key(&self) -> (String, String, String) {
        let (status, api) = self.call("POST", "/v1/apis", Some(r#"{"name":"usage","prefix":"sk"}"#)).await;
        assert_eq!(status, StatusCode::CREATED, "{api}");
        let api = api["id"].as_str().unwrap().to_owned();
        let body = json!({ "api_id": api, "owner_id": "acme" }).to_string();
        let (status, key) = self.call("POST", "/v1/keys", Some(&body)).await;
        assert_eq!(status, StatusCode::CREATED, "{key}");
        (api, key["id"].as_str().unwrap().to_owned(), key["key"].as_str().unwrap().to_owned())
    }

    /// Posts a batch to the ingestion route, signed with `secret` and `nonce`.
    async fn post_batch(&self, batch: &UsageBatch, secret: &str, nonce: &str) -> (StatusCode, Value) {
        let body = serde_json::to_vec(batch).unwrap();
        let timestamp = now_ms();
        let signature = sign(secret.as_bytes(), "POST", USAGE_PATH, timestamp, nonce, &body);
        let request = Request::builder()
            .method("POST")
            .uri(USAGE_PATH)
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(NONCE_HEADER, nonce)
            .header(SIGNATURE_HEADER, signature)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        self.send(request).await
    }

    async fn usage(&self, key_id: &str) -> Value {
        let (status, usage) = self.call("GET", &format!("/v1/keys/{key_id}/usage"), None).await;
        assert_eq!(status, StatusCode::OK, "{usage}");
        usage
    }
}

fn nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn event(h: &Harness, api: &str, key: Option<&str>, region: &str, code: Code, at_ms: i64, ip: &str) -> UsageEvent {
    UsageEvent {
        at_ms: at_ms as u64,
        request_id: nonce(),
        workspace_id: h.workspace.clone(),
        api_id: Some(api.to_owned()),
        key_id: key.map(str::to_owned),
        region: region.to_owned(),
        code,
        version: Some(1),
        source: Some(Source::Memory),
        caller_ip: Some(ip.to_owned()),
        user_agent: Some("test".into()),
        client: Some(ClientInfo { country: Some("DE".into()), ..ClientInfo::default() }),
    }
}

fn batch(holder: &str, seq: u64, first_event: u64, held_after: u64, events: Vec<UsageEvent>) -> UsageBatch {
    UsageBatch { holder: holder.into(), region: "r1".into(), seq, first_event, dropped: 0, held_after, events }
}

#[tokio::test]
async fn a_batch_is_stored_once_and_what_never_arrived_is_counted_exactly() {
    let h = harness().await;
    let (api, key, _) = h.key().await;
    let now = now_ms();
    let ev = |code, region| event(&h, &api, Some(&key), region, code, now, "198.51.100.7");
    let first = batch("iso-1", 1, 0, 0, vec![ev(Code::Valid, "r1"), ev(Code::Valid, "r2"), ev(Code::Revoked, "r1")]);
    let (status, ack) = h.post_batch(&first, SECRET, &nonce()).await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    assert_eq!(ack, json!({ "seq": 1, "duplicate": false }));
    // The same batch again (a retry whose answer was lost): acknowledged, stored once.
    let (status, ack) = h.post_batch(&first, SECRET, &nonce()).await;
    assert_eq!((status, ack), (StatusCode::OK, json!({ "seq": 1, "duplicate": true })));
    // Batch 2 (4 events) never arrives; batch 3 says 5 events are still held.
    let third = batch("iso-1", 3, 7, 5, vec![ev(Code::Valid, "r1"), ev(Code::Disabled, "r2")]);
    assert_eq!(h.post_batch(&third, SECRET, &nonce()).await.0, StatusCode::OK);

    let usage = h.usage(&key).await;
    assert_eq!(usage["totals"], json!({ "DISABLED": 1, "REVOKED": 1, "VALID": 3 }), "{usage}");
    assert_eq!(usage["total"], 5);
    let losses = &usage["losses"]["total"];
    assert_eq!(losses["missing_batches"], 1, "{usage}");
    assert_eq!(losses["lost_events"], 4, "{usage}");
    assert_eq!(losses["possibly_lost_events"], 0, "the holder spoke just now: {usage}");
    assert_eq!(usage["top"]["region"], json!([{ "value": "r1", "count": 3 }, { "value": "r2", "count": 2 }]));
    assert_eq!(usage["top"]["country"], json!([{ "value": "DE", "count": 5 }]));
    assert_eq!(usage["last_used_ms"], now);
    assert_eq!(usage["last_valid_ms"], now);
    // Once the holder has been silent, what it said it still held shows as a possible loss.
    let later = h.state.store.usage_losses(0, now_ms() + 11_000).await.unwrap();
    assert_eq!(later[0].1.possibly_lost_events, 5, "{later:?}");
}

#[tokio::test]
async fn unsigned_tampered_replayed_or_oversized_batches_are_refused() {
    let h = harness().await;
    let (api, key, _) = h.key().await;
    let one = batch("iso-2", 1, 0, 0, vec![event(&h, &api, Some(&key), "r1", Code::Valid, now_ms(), "203.0.113.1")]);
    let unsigned = Request::builder().method("POST").uri(USAGE_PATH).body(Body::from("{}")).unwrap();
    let (status, refused) = h.send(unsigned).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("BAD_SIGNATURE_HEADERS")));
    let (status, refused) = h.post_batch(&one, &"x".repeat(40), &nonce()).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("BAD_SIGNATURE")));
    let used = nonce();
    assert_eq!(h.post_batch(&one, SECRET, &used).await.0, StatusCode::OK);
    let (status, refused) = h.post_batch(&one, SECRET, &used).await;
    assert_eq!(refused["error"]["code"].as_str(), Some("REPLAYED"), "{status} {refused}");
    // Declared too large: refused before the body is read.
    let huge = Request::builder()
        .method("POST")
        .uri(USAGE_PATH)
        .header(TIMESTAMP_HEADER, now_ms().to_string())
        .header(NONCE_HEADER, nonce())
        .header(SIGNATURE_HEADER, "0".repeat(64))
        .header("content-length", (64 * 1024 * 1024).to_string())
        .body(Body::from("{}"))
        .unwrap();
    assert_eq!(h.send(huge).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(h.usage(&key).await["total"], 1, "only the one signed batch counted");
}

#[tokio::test]
async fn the_origins_own_verifications_are_recorded() {
    let h = harness().await;
    let (api, key_id, key) = h.key().await;
    let h = &h;
    let verify = |body: Value| {
        let body = body.to_string();
        async move { h.call("POST", "/v1/keys/verify", Some(&body)).await }
    };
    let client = json!({ "ip": "192.0.2.44", "country": "FR" });
    assert_eq!(verify(json!({ "key": key, "client": client })).await.1["code"], "VALID");
    assert_eq!(verify(json!({ "key": key, "api_id": api })).await.1["code"], "VALID");
    assert_eq!(verify(json!({ "key": "sk_nonsense" })).await.1["code"], "MALFORMED");
    let (status, refused) = verify(json!({ "key": key, "client": { "country": "x".repeat(9) } })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert!(h.state.usage.flush_origin().await);
    let usage = h.usage(&key_id).await;
    assert_eq!(usage["totals"], json!({ "VALID": 2 }), "{usage}");
    assert_eq!(usage["top"]["region"], json!([{ "value": "origin", "count": 2 }]));
    assert_eq!(usage["top"]["client_ip"], json!([{ "value": "192.0.2.44", "count": 1 }]));
    // The malformed key has no key id: it counts for its workspace only (here, no API named).
    let owner = h.call("GET", "/v1/usage?owner_id=acme", None).await.1;
    assert_eq!(owner["total"], 2, "{owner}");
}

#[tokio::test]
async fn sources_new_to_a_key_are_marked_and_usage_needs_read_key() {
    let h = harness().await;
    let (api, key, _) = h.key().await;
    let now = now_ms();
    let day = 86_400_000;
    let events = vec![
        event(&h, &api, Some(&key), "r1", Code::Valid, now - 10 * day, "198.51.100.1"),
        event(&h, &api, Some(&key), "r1", Code::Valid, now - 3_600_000, "198.51.100.1"),
        event(&h, &api, Some(&key), "r2", Code::Valid, now - 60_000, "203.0.113.66"),
    ];
    assert_eq!(h.post_batch(&batch("iso-3", 1, 0, 0, events), SECRET, &nonce()).await.0, StatusCode::OK);
    let (status, usage) = h.call("GET", &format!("/v1/keys/{key}/usage?from_ms={}", now - 20 * day), None).await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    assert_eq!(usage["total"], 3, "{usage}");
    assert_eq!(usage["granularity"], "hour", "20 days: hourly by default");
    assert_eq!(usage["new_sources"]["caller_ip"], json!([{ "value": "203.0.113.66", "count": 1 }]), "{usage}");
    assert_eq!(usage["new_sources"]["region"], json!([{ "value": "r2", "count": 1 }]));
    let counts = h.call("GET", &format!("/v1/keys/{key}/usage?from_ms={}&parts=counts", now - 20 * day), None).await.1;
    assert_eq!((counts["total"].as_i64(), counts["top"].as_object().map(|t| t.len())), (Some(3), Some(0)), "{counts}");
    let api_usage = h.call("GET", &format!("/v1/apis/{api}/usage?granularity=hour"), None).await.1;
    assert_eq!(api_usage["total"], 2, "the last 24 hours: {api_usage}");
    assert!(api_usage["series"].as_array().unwrap().iter().all(|p| p["at_ms"].as_i64().unwrap() % 3_600_000 == 0));

    let body = json!({ "name": "verifier", "scopes": ["api.*.verify_key"] }).to_string();
    let verifier = h.call("POST", "/v1/root-keys", Some(&body)).await.1["key"].as_str().unwrap().to_owned();
    let (status, _) = h.call_as(&verifier, "GET", &format!("/v1/keys/{key}/usage"), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = h.call_as(&verifier, "GET", "/v1/usage?owner_id=acme", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = h.call("GET", "/v1/keys/key_01ARZ3NDEKTSV4RRFFQ69G5FAV/usage", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, refused) = h.call("GET", &format!("/v1/keys/{key}/usage?from_ms={now}&to_ms={now}"), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
}

/// The revocation proof, from evidence sent through the real ingestion route: a `VALID` before
/// the revoke, one after it within the promise (no region acknowledged, so the bound is the
/// answer plus `max_staleness_ms`), and one past it, reported as a violation.
#[tokio::test]
async fn the_proof_judges_every_valid_answer_after_a_revocation() {
    let h = harness().await;
    let (api, key, _) = h.key().await;
    let (status, refused) = h.call("GET", &format!("/v1/keys/{key}/proof"), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "a valid key has nothing to prove: {refused}");
    let before = event(&h, &api, Some(&key), "r1", Code::Valid, now_ms() - 5_000, "198.51.100.1");
    assert_eq!(h.post_batch(&batch("iso-p", 1, 0, 0, vec![before]), SECRET, &nonce()).await.0, StatusCode::OK);
    let (status, revoked) = h.call("POST", &format!("/v1/keys/{key}/revoke"), None).await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    let answered = now_ms();
    let mut within = event(&h, &api, Some(&key), "r1", Code::Valid, answered + 500, "198.51.100.1");
    let mut late = event(&h, &api, Some(&key), "r2", Code::Valid, answered + 3_000, "203.0.113.5");
    within.version = Some(1);
    late.version = Some(1);
    let rejected = event(&h, &api, Some(&key), "r1", Code::Revoked, answered + 600, "198.51.100.1");
    let after = vec![within, rejected, late];
    assert_eq!(h.post_batch(&batch("iso-p", 2, 1, 0, after), SECRET, &nonce()).await.0, StatusCode::OK);

    let (status, proof) = h.call("GET", &format!("/v1/keys/{key}/proof"), None).await;
    assert_eq!(status, StatusCode::OK, "{proof}");
    assert_eq!(proof["change"]["kind"], "revoked", "{proof}");
    assert_eq!(proof["change"]["version"], 2, "{proof}");
    assert!(proof["change"]["answered_at_ms"].as_i64().is_some(), "{proof}");
    assert_eq!(proof["by"]["action"], "key.revoke", "{proof}");
    assert_eq!((proof["violations"].as_u64(), proof["within_promise"].as_u64()), (Some(1), Some(1)), "{proof}");
    let regions = proof["regions"].as_array().unwrap();
    let r1 = regions.iter().find(|r| r["region"] == "r1").unwrap();
    let r2 = regions.iter().find(|r| r["region"] == "r2").unwrap();
    assert!(r1["last_valid_before"]["at_ms"].as_i64().is_some(), "{r1}");
    assert_eq!(r1["valid_after"][0]["verdict"], "within_promise", "{r1}");
    assert_eq!(r1["rejections_since"]["REVOKED"], 1, "{r1}");
    assert_eq!(r2["valid_after"][0]["verdict"], "violation", "{r2}");
    assert_eq!(r2["valid_after"][0]["bound"], "answer + max_staleness_ms + skew", "{r2}");
}
