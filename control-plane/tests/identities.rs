//! Identities through the admin API, in-process on a real SQLite file with a recording KV
//! writer: create, read, list, update and delete; scopes, another workspace, bad input and
//! external id clashes; what reaches KV and whether it is purged; keys attached and detached;
//! an identity in use cannot be deleted; the origin refuses to verify a key with an identity.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use keyward_control_plane::config::Secret;
use keyward_control_plane::edge_client::{EdgeClient, EdgeRegion, PurgeVia};
use keyward_control_plane::http::{AppState, app};
use keyward_control_plane::kv::{KvError, KvWriter};
use keyward_control_plane::serve::bootstrap;
use keyward_control_plane::store::Store;
use keyward_shared::identity::{IdentityRecord, kv_key_for_identity};
use keyward_shared::{Key, KeyRecord};
use serde_json::{Value, json};
use tower::ServiceExt;

/// A KV namespace that remembers every write.
#[derive(Default)]
struct RecordingKv(Mutex<Vec<(String, String)>>);

impl KvWriter for RecordingKv {
    fn put<'a>(&'a self, key: &'a str, value: String) -> BoxFuture<'a, Result<(), KvError>> {
        self.0.lock().unwrap().push((key.to_owned(), value));
        Box::pin(async { Ok(()) })
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    state: AppState,
    kv: Arc<RecordingKv>,
    root: String,
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("test.sqlite")).await.unwrap();
    let root = Key::generate("kw_root", [5; 32]).unwrap().expose().to_owned();
    bootstrap(&store, Some(root.clone())).await.unwrap();
    let kv = Arc::new(RecordingKv::default());
    // Nothing listens on port 9 of loopback: purges there are never acknowledged.
    let region = EdgeRegion {
        name: "nowhere".into(),
        url: "http://127.0.0.1:9".into(),
        kv: kv.clone(),
        purge: PurgeVia::Signed,
    };
    let edge = Arc::new(EdgeClient::new(vec![region], None, Secret::new("s".repeat(32))));
    Harness { _dir: dir, state: AppState::new(store, edge), kv, root }
}

impl Harness {
    async fn call_as(&self, root: &str, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {root}"))
            .header("content-type", "application/json")
            .body(Body::from(body.map(|b| b.to_string()).unwrap_or_default()))
            .unwrap();
        let response = app(self.state.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call_as(&self.root, method, path, body).await
    }

    async fn api(&self) -> String {
        let (status, api) =
            self.call("POST", "/v1/apis", Some(json!({ "name": "payments", "prefix": "sk_live" }))).await;
        assert_eq!(status, StatusCode::CREATED, "{api}");
        api["id"].as_str().unwrap().to_owned()
    }

    /// A new root key of the workspace with these scopes.
    async fn root_key(&self, scopes: &[&str]) -> String {
        let (status, root) =
            self.call("POST", "/v1/root-keys", Some(json!({ "name": "other", "scopes": scopes }))).await;
        assert_eq!(status, StatusCode::CREATED, "{root}");
        root["key"].as_str().unwrap().to_owned()
    }

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
    let h = harness().await;
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
    let h = harness().await;
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
    let h = harness().await;
    let id = h.identity(json!({ "external_id": "acct_7" })).await;
    let (status, clash) = h.call("POST", "/v1/identities", Some(json!({ "external_id": "acct_7" }))).await;
    assert_eq!((status, clash["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("CONFLICT")), "{clash}");
    let other = h.identity(json!({ "external_id": "acct_8" })).await;
    let (status, clash) =
        h.call("PATCH", &format!("/v1/identities/{other}"), Some(json!({ "external_id": "acct_7" }))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{clash}");

    let reader = h.root_key(&["api.*.read_key"]).await;
    assert_eq!(h.call_as(&reader, "GET", &format!("/v1/identities/{id}"), None).await.0, StatusCode::OK);
    assert_eq!(h.call_as(&reader, "GET", "/v1/identities", None).await.0, StatusCode::OK);
    let refused = h.call_as(&reader, "PATCH", &format!("/v1/identities/{id}"), Some(json!({ "meta": {} }))).await;
    assert_eq!(refused.0, StatusCode::FORBIDDEN, "{}", refused.1);
    let api = h.api().await;
    let one_api = h.root_key(&[&format!("api.{api}.create_key"), &format!("api.{api}.read_key")]).await;
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
