//! The admin API driven in-process (`tower::ServiceExt::oneshot`, no socket) on a real SQLite
//! file, every region's KV a recording writer and its purges sent where nothing listens.

use std::sync::{Arc, Mutex};

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
use keyward_shared::Key;
use serde_json::{Value, json};
use tower::ServiceExt;

/// A KV namespace that remembers every write.
#[derive(Default)]
pub struct RecordingKv(pub Mutex<Vec<(String, String)>>);

impl KvWriter for RecordingKv {
    fn put<'a>(&'a self, key: &'a str, value: String) -> BoxFuture<'a, Result<(), KvError>> {
        self.0.lock().unwrap().push((key.to_owned(), value));
        Box::pin(async { Ok(()) })
    }
}

pub struct Harness {
    pub _dir: tempfile::TempDir,
    pub state: AppState,
    pub kv: Arc<RecordingKv>,
    /// The workspace's first root key, with every scope.
    pub root: String,
}

/// A fresh store with its first root key (generated from `seed`) and one region, "nowhere".
pub async fn harness(seed: u8) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("test.sqlite")).await.unwrap();
    let root = Key::generate("kw_root", [seed; 32]).unwrap().expose().to_owned();
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

/// A whole answer: its status and its JSON body (`null` when it has none).
pub async fn answer(response: axum::response::Response) -> (StatusCode, Value) {
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

impl Harness {
    pub async fn send(&self, request: Request<Body>) -> (StatusCode, Value) {
        answer(app(self.state.clone()).oneshot(request).await.unwrap()).await
    }

    /// A call with the first root key and a body of text as it is (JSON or not).
    pub async fn call_text(&self, method: &str, path: &str, body: Option<&str>) -> (StatusCode, Value) {
        self.call_text_as(&self.root, method, path, body).await
    }

    /// A call made with the root key `root` and a body of text as it is.
    pub async fn call_text_as(&self, root: &str, method: &str, path: &str, body: Option<&str>) -> (StatusCode, Value) {
        let mut builder = Request::builder().method(method).uri(path).header("authorization", format!("Bearer {root}"));
        if body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        self.send(builder.body(Body::from(body.unwrap_or("").to_owned())).unwrap()).await
    }

    /// A call with the first root key and a JSON body.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call_as(&self.root, method, path, body).await
    }

    /// A call made with the root key `root` and a JSON body.
    pub async fn call_as(&self, root: &str, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call_text_as(root, method, path, body.map(|b| b.to_string()).as_deref()).await
    }

    /// A new API, "payments-live" with the prefix `sk_live`: its id.
    pub async fn api(&self) -> String {
        let (status, api) =
            self.call("POST", "/v1/apis", Some(json!({ "name": "payments-live", "prefix": "sk_live" }))).await;
        assert_eq!(status, StatusCode::CREATED, "{api}");
        api["id"].as_str().unwrap().to_owned()
    }

    /// A new root key of the workspace with these scopes: its id and the key.
    pub async fn root_key(&self, scopes: &[&str]) -> (String, String) {
        let (status, root) =
            self.call("POST", "/v1/root-keys", Some(json!({ "name": "other", "scopes": scopes }))).await;
        assert_eq!(status, StatusCode::CREATED, "{root}");
        (root["id"].as_str().unwrap().to_owned(), root["key"].as_str().unwrap().to_owned())
    }
}
