//! Delivering outbox entries against stand-ins that are slow, hung or refusing, through the
//! production constructor `EdgeClient::from_config` and its clients: overlapping deliveries of one
//! entry, a caller that gives up, an authority that lacks the change, and a bound on every call.

use std::collections::HashMap;
use std::future::Future;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode, Uri};
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use keyward_control_plane::change::{Actor, mint_first_root_key};
use keyward_control_plane::cloudflare::CloudflareApi;
use keyward_control_plane::config::{Config, Secret};
use keyward_control_plane::delivery::{HANDOFF, OutboxSettings, TagBatcher, Upkept, upkeep};
use keyward_control_plane::edge_client::{EdgeClient, EdgeRegion, PurgeVia};
use keyward_control_plane::http::{AppState, app};
use keyward_control_plane::kv::{KvError, KvWriter};
use keyward_control_plane::serve::bootstrap;
use keyward_control_plane::store::audit::AuditQuery;
use keyward_control_plane::store::{DeliveryState, EntryKind, Reach, Redrive, Repush, RepushError, Store, Target};
use keyward_control_plane::time::now_ms;
use keyward_shared::internal::{AUTHORITY_PATH, PURGE_PATH};
use keyward_shared::{Key, KeyHash, KeyStatus};
use serde_json::{Value, json};
use support::cloudflare_api;
use tower::ServiceExt;

mod support;

const SECRET: &str = "0123456789abcdef0123456789abcdef";
/// Nothing listens on port 9 of loopback: connections there are refused at once.
const REFUSING: &str = "http://127.0.0.1:9";
/// The longest `EdgeClient::from_config`'s client lets one call take, connecting included.
const CALL_LIMIT: Duration = Duration::from_secs(3);
/// What a failed call may add to that limit before a test calls it a hang.
const SLACK: Duration = Duration::from_secs(2);

/// Runs `test` on a runtime of its own with two worker threads, as the control plane runs, and
/// fails if it has not finished within `limit`. The watch is kept on a thread with no runtime:
/// a deadlock blocks the workers themselves, and with them every timer a runtime could fire.
fn bounded(limit: Duration, test: impl Future<Output = ()> + Send + 'static) {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let task = runtime.spawn(test);
        let _ = done.send(runtime.block_on(task));
    });
    match finished.recv_timeout(limit) {
        Ok(Ok(())) => {}
        Ok(Err(failed)) => std::panic::resume_unwind(failed.into_panic()),
        Err(_) => panic!("the test did not finish within {limit:?}: the control plane hangs"),
    }
}

/// How a hung endpoint behaves once it has accepted a connection.
#[derive(Debug, Clone, Copy)]
enum Hang {
    /// Answers nothing at all.
    Silent,
    /// Answers a status line and headers that promise a body, then sends almost none of it.
    AfterHeaders,
}

/// An endpoint that accepts connections and never finishes an answer, on threads of its own
/// so that nothing the control plane does can free it. Answers its base URL.
fn hung(hang: Hang) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || hold(stream, hang));
        }
    });
    url
}

/// Keeps one connection open without answering, until the client gives up and closes it.
fn hold(mut stream: TcpStream, hang: Hang) {
    let mut buffer = [0; 4096];
    if let Hang::AfterHeaders = hang {
        let _ = stream.read(&mut buffer);
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 64\r\n\r\n{");
    }
    while stream.read(&mut buffer).is_ok_and(|n| n > 0) {}
}

/// The paths a stand-in was sent, with their bodies, in order of arrival.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(String, String)>>>);

impl Seen {
    fn count(&self, path_end: &str) -> usize {
        self.bodies(path_end).len()
    }

    /// The bodies of the requests whose path ends in `path_end`.
    fn bodies(&self, path_end: &str) -> Vec<String> {
        self.0.lock().unwrap().iter().filter(|(p, _)| p.ends_with(path_end)).map(|(_, b)| b.clone()).collect()
    }
}

/// A stand-in for a region's worker, the authority, KV and Cloudflare's API at once: it waits
/// `delay`, then acknowledges whatever it was sent. Answers its base URL and what it saw.
async fn stand_in(delay: Duration) -> (String, Seen) {
    let seen = Seen::default();
    let log = seen.clone();
    let app = axum::Router::new().fallback(move |uri: Uri, body: String| {
        log.0.lock().unwrap().push((uri.path().to_owned(), body));
        async move {
            tokio::time::sleep(delay).await;
            axum::Json(match uri.path() {
                PURGE_PATH => json!({ "region": "stand-in", "purged": 0, "applied_at_ms": 1 }),
                AUTHORITY_PATH => json!({ "versions": [1] }),
                _ => json!({ "success": true, "errors": [], "messages": [], "result": null }),
            })
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

/// Where the edge is, for the client `EdgeClient::from_config` builds in production.
#[derive(Default)]
struct Endpoints<'a> {
    authority: Option<&'a str>,
    /// One region `r1`, purged through its signed route: its worker's URL and its KV's.
    signed: Option<(&'a str, &'a str)>,
    /// Cloudflare's API, for the region `cloudflare` (bulk KV, purge by tag).
    cloudflare: Option<&'a str>,
}

fn edge(endpoints: Endpoints) -> EdgeClient {
    let mut text = format!("purge_secret = \"{SECRET}\"\n");
    if let Some(url) = endpoints.authority {
        text += &format!("authority_url = \"{url}\"\n");
    }
    if let Some((url, kv)) = endpoints.signed {
        text += &format!("[[regions]]\nname = \"r1\"\nurl = \"{url}\"\nkv_url = \"{kv}\"\nkv_namespace_id = \"ns\"\n");
    }
    if let Some(api) = endpoints.cloudflare {
        text += &format!(
            "[cloudflare]\napi_base = \"{api}\"\naccount_id = \"acct\"\nzone_id = \"zone\"\nkv_namespace_id = \"ns\"\n\
             worker_url = \"{api}\"\napi_token = \"cf-token\"\n"
        );
    }
    EdgeClient::from_config(&Config::parse(&text, |_| None).unwrap()).unwrap()
}

/// An edge whose authority and one signed region (purges and KV) refuse every connection.
fn refusing_edge() -> EdgeClient {
    edge(Endpoints { authority: Some(REFUSING), signed: Some((REFUSING, REFUSING)), ..Endpoints::default() })
}

fn purge(region: &str) -> Target {
    Target::Purge(region.to_owned())
}

#[derive(Clone)]
struct Harness {
    _dir: Arc<tempfile::TempDir>,
    state: AppState,
    root: String,
}

async fn harness(edge: EdgeClient) -> Harness {
    harness_with(edge, OutboxSettings::default()).await
}

async fn harness_with(edge: EdgeClient, outbox: OutboxSettings) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("test.sqlite")).await.unwrap();
    let root = Key::generate("kw_root", [3; 32]).unwrap().expose().to_owned();
    bootstrap(&store, Some(root.clone())).await.unwrap();
    Harness { _dir: Arc::new(dir), state: AppState::with_outbox(store, Arc::new(edge), outbox), root }
}

impl Harness {
    /// Answers a request through the app, in a task of its own: it runs on the runtime's
    /// workers, as a served request does.
    async fn call(&self, method: &str, path: &str, body: Option<&str>) -> (StatusCode, Value) {
        let mut builder =
            Request::builder().method(method).uri(path).header("authorization", format!("Bearer {}", self.root));
        if body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder.body(Body::from(body.unwrap_or("").to_owned())).unwrap();
        let response = tokio::spawn(app(self.state.clone()).oneshot(request)).await.unwrap().unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// Creates an API, named anew each time; answers the creation's status and answer.
    async fn api(&self) -> (StatusCode, Value) {
        static APIS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = APIS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.call("POST", "/v1/apis", Some(&format!(r#"{{"name":"payments-{n}","prefix":"sk_live"}}"#))).await
    }

    /// Creates an API and a key of it; answers the creation's answer and the key.
    async fn key(&self) -> (Value, Key) {
        let (status, api) = self.api().await;
        assert_eq!(status, StatusCode::CREATED, "{api}");
        let body = format!(r#"{{"api_id":"{}"}}"#, api["id"].as_str().unwrap());
        let (status, created) = self.call("POST", "/v1/keys", Some(&body)).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let key = Key::parse(created["key"].as_str().unwrap()).unwrap();
        (created, key)
    }

    /// Commits `key`'s revocation straight to the store, delivering nothing yet; answers its
    /// outbox entry's id.
    async fn revoke_in_store(&self, key: &Key) -> i64 {
        let before = self.state.store.key_by_hash(&key.hash()).await.unwrap().unwrap();
        let mut record = before.clone();
        let now = now_ms();
        record.status = KeyStatus::Revoked;
        record.version += 1;
        record.updated_at = now;
        self.state
            .store
            .update_key(&before, &record, &self.state.delivery.new_outbox(true, now), &Actor::System)
            .await
            .unwrap()
    }

    /// Commits a rename of `key` straight to the store (a change that tightens nothing),
    /// delivering nothing yet; answers its outbox entry's id.
    async fn rename_in_store(&self, key: &Key) -> i64 {
        let before = self.state.store.key_by_hash(&key.hash()).await.unwrap().unwrap();
        let mut record = before.clone();
        let now = now_ms();
        record.name = Some("renamed".into());
        record.version += 1;
        record.updated_at = now;
        self.state
            .store
            .update_key(&before, &record, &self.state.delivery.new_outbox(false, now), &Actor::System)
            .await
            .unwrap()
    }

    /// The newest outbox entry of `key`.
    async fn newest_entry(&self, key: &Key) -> i64 {
        let record = self.state.store.key_by_hash(&key.hash()).await.unwrap().unwrap();
        self.state.store.newest_entry(EntryKind::Key, &record.id).await.unwrap().unwrap()
    }

    /// The state of each of an outbox entry's deliveries, by target.
    async fn deliveries(&self, id: i64) -> HashMap<Target, DeliveryState> {
        let (_, deliveries) = self.state.store.outbox_entry(id).await.unwrap().unwrap();
        deliveries.into_iter().map(|d| (d.target, d.state)).collect()
    }

    /// Fails unless `GET /health` answers within a second, on the runtime's workers.
    async fn answers_meanwhile(&self) {
        let started = Instant::now();
        let health = Request::builder().uri("/health").body(Body::empty()).unwrap();
        let asked = tokio::spawn(app(self.state.clone()).oneshot(health));
        let response = tokio::time::timeout(Duration::from_secs(1), asked).await;
        let response = response.expect("the control plane answers other requests meanwhile").unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    /// Runs `call` (stuck behind an endpoint that never answers), checks that other requests
    /// are answered meanwhile, and that it ends within the client's bound; answers its result.
    async fn stuck<T: Send + 'static>(&self, what: &str, call: impl Future<Output = T> + Send + 'static) -> T {
        let started = Instant::now();
        let task = tokio::spawn(call);
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.answers_meanwhile().await;
        let result = task.await.unwrap();
        assert!(started.elapsed() < CALL_LIMIT + SLACK, "{what}: took {:?}", started.elapsed());
        result
    }
}

/// Two deliveries of one entry overlap while its region hangs: the second waits for the first
/// and then delivers, and other requests are answered meanwhile.
#[test]
fn overlapping_deliveries_of_one_entry_finish_and_block_nobody() {
    bounded(Duration::from_secs(30), async {
        let (kv, _) = stand_in(Duration::ZERO).await;
        let region = hung(Hang::Silent);
        let h = harness(edge(Endpoints { authority: Some(&kv), signed: Some((&region, &kv)), ..Endpoints::default() }))
            .await;
        let (_, key) = h.key().await;
        let id = h.revoke_in_store(&key).await;
        let deliver = || {
            let deliverer = h.state.delivery.clone();
            tokio::spawn(async move { deliverer.deliver(id).await })
        };
        let first = deliver();
        // The second starts while the first waits for the hung region.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let second = deliver();
        tokio::time::sleep(Duration::from_millis(200)).await;
        h.answers_meanwhile().await;
        for delivered in [first, second] {
            let delivered = delivered.await.unwrap().unwrap();
            let region = &delivered.regions[0];
            assert_eq!(region.acknowledged, Some(false), "{region:?}");
            assert!(region.error.as_deref().is_some_and(|e| e.contains("purge")), "{region:?}");
        }
        assert_eq!(h.deliveries(id).await[&purge("r1")], DeliveryState::Pending, "a hung region's purge is retried");
        h.answers_meanwhile().await;
    });
}

/// The caller of a delivery gives up (as axum drops a handler whose client disconnected): the
/// delivery goes on, long before the retrier would take it.
#[test]
fn a_delivery_goes_on_when_its_caller_gives_up() {
    bounded(Duration::from_secs(20), async {
        let (url, seen) = stand_in(Duration::from_millis(500)).await;
        let h = harness(edge(Endpoints { authority: Some(&url), signed: Some((&url, &url)), ..Endpoints::default() }))
            .await;
        let (_, key) = h.key().await;
        let id = h.revoke_in_store(&key).await;
        let started = Instant::now();
        let gave_up = tokio::time::timeout(Duration::from_millis(100), h.state.delivery.deliver(id)).await;
        assert!(gave_up.is_err(), "the region answers after 500 ms, so the caller gave up first");
        while h.deliveries(id).await[&purge("r1")] != DeliveryState::Done {
            assert!(started.elapsed() < Duration::from_secs(2), "the purge was not delivered without its caller");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(started.elapsed() < HANDOFF);
        assert_eq!(seen.count(PURGE_PATH), 1, "delivered once");
    });
}

/// A signed region that took the purge is not reported as acknowledged while the key's
/// authority lacks the change: a refill there would read the old record.
#[test]
fn no_signed_region_is_acknowledged_while_the_authority_lacks_the_change() {
    bounded(Duration::from_secs(20), async {
        let (url, seen) = stand_in(Duration::ZERO).await;
        let h =
            harness(edge(Endpoints { authority: Some(REFUSING), signed: Some((&url, &url)), ..Endpoints::default() }))
                .await;
        let (created, _) = h.key().await;
        let id = created["id"].as_str().unwrap();
        let (status, revoked) = h.call("POST", &format!("/v1/keys/{id}/revoke"), None).await;
        assert_eq!(status, StatusCode::OK, "{revoked}");
        assert_eq!(revoked["authority"]["acknowledged"], false, "{revoked}");
        assert_eq!(seen.count(PURGE_PATH), 1, "a signed purge carries the record, so it is sent at once");
        let region = &revoked["regions"][0];
        assert_eq!(region["acknowledged"], false, "{revoked}");
        assert!(region["error"].as_str().is_some_and(|e| e.contains("authority")), "{revoked}");
        // Followed target by target, the region's purge is not acknowledged either.
        let (status, delivery) = h.call("GET", &format!("/v1/keys/{id}/delivery"), None).await;
        assert_eq!(status, StatusCode::OK, "{delivery}");
        let target = |name: &str| delivery["targets"].as_array().unwrap().iter().find(|t| t["target"] == name).cloned();
        let purge = target("purge:r1").unwrap_or_else(|| panic!("{delivery}"));
        assert_eq!(purge["acknowledged"], false, "{delivery}");
        let authority = target("authority").unwrap_or_else(|| panic!("{delivery}"));
        assert_eq!((&authority["state"], &authority["acknowledged"]), (&json!("pending"), &json!(false)), "{delivery}");
        assert!(authority["last_error"].is_string(), "{delivery}");
        assert!(delivery["pending"].as_u64() >= Some(2), "{delivery}");
    });
}

/// `GET /v1/keys/{id}/delivery` follows one change target by target: each acknowledgement with
/// its time, the region's `applied_at`, and the change's status; a root key without `read_key`
/// is refused, and another workspace's key is not found.
#[test]
fn a_change_is_followed_target_by_target() {
    bounded(Duration::from_secs(20), async {
        let (url, _) = stand_in(Duration::ZERO).await;
        let h = harness(edge(Endpoints { authority: Some(&url), signed: Some((&url, &url)), ..Endpoints::default() }))
            .await;
        let (created, _) = h.key().await;
        let id = created["id"].as_str().unwrap();
        let (status, revoked) = h.call("POST", &format!("/v1/keys/{id}/revoke"), None).await;
        let answered_ms = now_ms();
        assert_eq!(status, StatusCode::OK, "{revoked}");
        let path = format!("/v1/keys/{id}/delivery");
        let (status, delivery) = h.call("GET", &path, None).await;
        assert_eq!(status, StatusCode::OK, "{delivery}");
        assert_eq!((&delivery["version"], &delivery["status"]), (&json!(2), &json!("revoked")), "{delivery}");
        // Noted with the pass's outcomes, before the answer went out: read at once, it is there.
        let noted = delivery["answered_at_ms"].as_i64().expect("the answer is noted");
        assert!(noted >= delivery["committed_at_ms"].as_i64().unwrap() && noted <= answered_ms, "{delivery}");
        let targets = delivery["targets"].as_array().unwrap();
        let names: Vec<&str> = targets.iter().map(|t| t["target"].as_str().unwrap()).collect();
        assert_eq!(names, ["authority", "kv:r1", "purge:r1"], "{delivery}");
        for t in targets.iter().filter(|t| t["target"] != "kv:r1") {
            assert_eq!((&t["state"], &t["acknowledged"]), (&json!("done"), &json!(true)), "{delivery}");
            assert!(t["attempts"].as_i64() >= Some(1) && t["done_at"].is_i64(), "{delivery}");
        }
        assert_eq!(targets[2]["applied_at"], 1, "the region's own clock, as it answered: {delivery}");
        let (status, created_version) = h.call("GET", &format!("{path}?version=1"), None).await;
        assert_eq!((status, &created_version["status"]), (StatusCode::OK, &json!("active")), "{created_version}");

        let body = r#"{"name":"verifier","scopes":["api.*.verify_key"]}"#;
        let (status, verifier) = h.call("POST", "/v1/root-keys", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{verifier}");
        let verifier = Harness { root: verifier["key"].as_str().unwrap().to_owned(), ..h.clone() };
        assert_eq!(verifier.call("GET", &path, None).await.0, StatusCode::FORBIDDEN);
        let (status, other) = h.call("POST", "/v1/workspaces", Some(r#"{"name":"other"}"#)).await;
        assert_eq!(status, StatusCode::CREATED, "{other}");
        let other = Harness { root: other["root_key"]["key"].as_str().unwrap().to_owned(), ..h.clone() };
        assert_eq!(other.call("GET", &path, None).await.0, StatusCode::NOT_FOUND);
    });
}

/// A purge-by-tag only drops cached copies, so the refill would read the old record from an
/// authority that lacks the change: it is not sent, and stays pending for after the authority.
#[test]
fn a_tag_purge_waits_for_the_authority() {
    bounded(Duration::from_secs(20), async {
        let (api, seen) = stand_in(Duration::ZERO).await;
        let h = harness(edge(Endpoints { authority: Some(REFUSING), cloudflare: Some(&api), ..Endpoints::default() }))
            .await;
        let (created, _) = h.key().await;
        let id = created["id"].as_str().unwrap();
        let (status, revoked) = h.call("POST", &format!("/v1/keys/{id}/revoke"), None).await;
        assert_eq!(status, StatusCode::OK, "{revoked}");
        assert_eq!(seen.count("/purge_cache"), 0, "purged by tag before the authority had the change");
        let region = &revoked["regions"][0];
        assert_eq!(region["name"], "cloudflare", "{revoked}");
        assert_eq!(region["acknowledged"], false, "{revoked}");
        assert!(region["error"].as_str().is_some_and(|e| e.contains("authority")), "{revoked}");
        // The revocation's outbox entry is the newest: the app announces it to event streams.
        let outbox = *h.state.changes.borrow();
        assert_eq!(h.deliveries(outbox).await[&purge("cloudflare")], DeliveryState::Pending);
    });
}

/// A region that accepts connections and never answers (or stops after its headers) fails
/// its purge within the client's bound, and other requests are answered meanwhile.
#[test]
fn a_hung_region_fails_its_purge_within_seconds() {
    bounded(Duration::from_secs(40), async {
        let (kv, _) = stand_in(Duration::ZERO).await;
        for hang in [Hang::Silent, Hang::AfterHeaders] {
            let region = hung(hang);
            let h =
                harness(edge(Endpoints { authority: Some(&kv), signed: Some((&region, &kv)), ..Endpoints::default() }))
                    .await;
            let (created, _) = h.key().await;
            let path = format!("/v1/keys/{}/revoke", created["id"].as_str().unwrap());
            let revoke = {
                let h = h.clone();
                async move { h.call("POST", &path, None).await }
            };
            let (status, revoked) = h.stuck(&format!("{hang:?}"), revoke).await;
            assert_eq!(status, StatusCode::OK, "{hang:?}: {revoked}");
            assert_eq!(revoked["regions"][0]["acknowledged"], false, "{hang:?}: {revoked}");
            assert!(revoked["regions"][0]["error"].as_str().is_some(), "{hang:?}: {revoked}");
        }
    });
}

/// An authority that accepts connections and never answers fails its update within the
/// client's bound, and other requests are answered meanwhile.
#[test]
fn a_hung_authority_fails_its_update_within_seconds() {
    bounded(Duration::from_secs(20), async {
        let (url, _) = stand_in(Duration::ZERO).await;
        let authority = hung(Hang::Silent);
        let h = harness(edge(Endpoints {
            authority: Some(&authority),
            signed: Some((&url, &url)),
            ..Endpoints::default()
        }))
        .await;
        let create = {
            let h = h.clone();
            async move { h.key().await }
        };
        let (created, _) = h.stuck("create", create).await;
        assert_eq!(created["authority"]["acknowledged"], false, "{created}");
        assert!(created["authority"]["error"].as_str().is_some(), "{created}");
    });
}

/// KV endpoints that accept connections and never answer (a region's KV REST endpoint, and
/// Cloudflare's bulk endpoint) fail their writes within the client's bound, and other
/// requests are answered meanwhile.
#[test]
fn hung_kv_fails_its_writes_within_seconds() {
    bounded(Duration::from_secs(20), async {
        let (url, _) = stand_in(Duration::ZERO).await;
        let (kv, api) = (hung(Hang::Silent), hung(Hang::Silent));
        let h =
            harness(edge(Endpoints { authority: Some(&url), signed: Some((&url, &kv)), cloudflare: Some(&api) })).await;
        let create = {
            let h = h.clone();
            async move { h.key().await }
        };
        let (created, _) = h.stuck("create", create).await;
        for region in created["regions"].as_array().unwrap() {
            assert_eq!(region["kv"], "failed", "{created}");
            assert!(region["error"].as_str().is_some(), "{created}");
        }
        assert_eq!(created["regions"].as_array().unwrap().len(), 2, "{created}");
    });
}

/// A KV namespace that takes every write at once and keeps nothing.
struct NoKv;

impl KvWriter for NoKv {
    fn put<'a>(&'a self, _: &'a str, _: String) -> BoxFuture<'a, Result<(), KvError>> {
        Box::pin(async { Ok(()) })
    }
}

/// A KV namespace that refuses every write while `refusing` is set.
#[derive(Default)]
struct FlakyKv {
    refusing: std::sync::atomic::AtomicBool,
}

impl KvWriter for FlakyKv {
    fn put<'a>(&'a self, _: &'a str, _: String) -> BoxFuture<'a, Result<(), KvError>> {
        let refusing = self.refusing.load(std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move { if refusing { Err(KvError::Stopped) } else { Ok(()) } })
    }
}

/// Cloudflare's purge_cache as a stand-in that acknowledges every call and records its tags.
#[derive(Clone, Default)]
struct Purges(Arc<Mutex<Vec<Vec<String>>>>);

async fn purge_cache_stand_in() -> (String, Purges) {
    purge_cache_stand_in_after(Duration::ZERO).await
}

/// [`purge_cache_stand_in`], answering each call `delay` after it arrives.
async fn purge_cache_stand_in_after(delay: Duration) -> (String, Purges) {
    let purges = Purges::default();
    let log = purges.clone();
    let app = axum::Router::new().fallback(move |body: String| {
        let tags: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let tags = tags["tags"].as_array().into_iter().flatten().map(|t| t.as_str().unwrap().to_owned());
        log.0.lock().unwrap().push(tags.collect());
        async move {
            tokio::time::sleep(delay).await;
            axum::Json(json!({ "success": true, "errors": [], "messages": [], "result": null }))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, purges)
}

/// Cloudflare's API at a purge_cache stand-in, allowed one call per ten minutes and that one
/// spent now; answers it and what the stand-in records.
async fn spent_budget() -> (Arc<CloudflareApi>, Purges) {
    let (base, purges) = purge_cache_stand_in().await;
    let api = cloudflare_api(&base, 1, 600);
    api.purge_tags(&[KeyHash::of("spent")]).await.unwrap();
    (api, purges)
}

/// An edge with an authority at `authority` and one region, `cloudflare`, purged by tag through
/// `api` (whose rate limit the test chooses), with KV that takes every write at once.
fn tag_purged_edge(authority: &str, api: Arc<CloudflareApi>) -> EdgeClient {
    tag_purged_edge_with_kv(authority, api, Arc::new(NoKv))
}

fn tag_purged_edge_with_kv(authority: &str, api: Arc<CloudflareApi>, kv: Arc<dyn KvWriter>) -> EdgeClient {
    let region = EdgeRegion {
        name: "cloudflare".into(),
        url: "https://keys.example.com".into(),
        kv,
        purge: PurgeVia::Tags(Arc::new(TagBatcher::new(api))),
    };
    EdgeClient::new(vec![region], Some(authority.to_owned()), Secret::new(SECRET.into()))
}

impl Harness {
    /// A second workspace and its root key, made on the database as start-up makes the first.
    async fn other_workspace(&self) -> Harness {
        let key = Key::generate("kw_root", [4; 32]).unwrap();
        let root = key.expose().to_owned();
        mint_first_root_key(&self.state.store, key).await.unwrap();
        Harness { root, ..self.clone() }
    }

    /// Creates `n` keys in a new API; answers their ids.
    async fn keys(&self, n: usize) -> Vec<String> {
        let (status, api) = self.api().await;
        assert_eq!(status, StatusCode::CREATED, "{api}");
        let body = format!(r#"{{"api_id":"{}"}}"#, api["id"].as_str().unwrap());
        let mut ids = Vec::new();
        for _ in 0..n {
            let (status, created) = self.call("POST", "/v1/keys", Some(&body)).await;
            assert_eq!(status, StatusCode::CREATED, "{created}");
            ids.push(created["id"].as_str().unwrap().to_owned());
        }
        ids
    }

    async fn revoke(&self, id: &str) -> (StatusCode, Value) {
        self.call("POST", &format!("/v1/keys/{id}/revoke"), None).await
    }
}

/// Issue 9, item 6: a workspace's `GET /v1/regions` shows its own deliveries only, never another
/// tenant's counts or errors.
#[test]
fn regions_show_a_workspace_only_its_own_deliveries() {
    bounded(Duration::from_secs(30), async {
        let h = harness(refusing_edge()).await;
        let other = h.other_workspace().await;
        // The other workspace's key creation fails its KV write; its revocation, its purge.
        let (_, key) = other.key().await;
        let revoked = other.revoke_in_store(&key).await;
        other.state.delivery.deliver(revoked).await.unwrap();
        let (status, theirs) = other.call("GET", "/v1/regions", None).await;
        assert_eq!(status, StatusCode::OK, "{theirs}");
        let region = &theirs["regions"][0];
        assert!(region["kv"]["pending"].as_i64().unwrap() >= 1, "{theirs}");
        assert_eq!(region["purge"]["pending"], 1, "{theirs}");
        assert!(region["purge"]["last_error"].as_str().is_some(), "{theirs}");
        let (_, mine) = h.call("GET", "/v1/regions", None).await;
        let region = &mine["regions"][0];
        for target in ["kv", "purge"] {
            assert_eq!(region[target]["pending"], 0, "another workspace's deliveries shown: {mine}");
            assert_eq!(region[target]["last_error"], Value::Null, "another workspace's error shown: {mine}");
        }
    });
}

/// Issue 9, item 4: a repeated revoke sends nothing to a region that acknowledged, and tries
/// again only what has not landed.
#[test]
fn a_repeated_revoke_resends_only_to_targets_that_have_not_acknowledged() {
    bounded(Duration::from_secs(30), async {
        let (url, seen) = stand_in(Duration::ZERO).await;
        let h =
            harness(edge(Endpoints { authority: Some(&url), signed: Some((&url, &url)), cloudflare: Some(REFUSING) }))
                .await;
        let (created, _) = h.key().await;
        let id = created["id"].as_str().unwrap();
        let (_, first) = h.revoke(id).await;
        assert_eq!(first["regions"][0]["acknowledged"], true, "{first}");
        assert_eq!(first["regions"][1]["acknowledged"], false, "{first}");
        let (authority, purges) = (seen.count(AUTHORITY_PATH), seen.count(PURGE_PATH));
        assert_eq!(purges, 1);
        let (status, again) = h.revoke(id).await;
        assert_eq!(status, StatusCode::OK, "{again}");
        assert_eq!(seen.count(PURGE_PATH), purges, "r1 acknowledged, and was purged again");
        assert_eq!(seen.count(AUTHORITY_PATH), authority, "the authority acknowledged, and was sent it again");
        assert_eq!(again["authority"]["acknowledged"], true, "{again}");
        assert_eq!(again["regions"][0]["acknowledged"], true, "{again}");
        assert_eq!(again["regions"][1]["acknowledged"], false, "{again}");
        assert!(again["regions"][1]["error"].as_str().is_some_and(|e| e.contains("purge")), "{again}");
    });
}

/// Issue 9, item 4: with the purge budget spent, a revoke still answers within 5 s, naming
/// the region whose purge is pending; the purge goes on.
#[test]
fn a_revoke_answers_within_five_seconds_whatever_the_budget() {
    bounded(Duration::from_secs(30), async {
        let (authority, _) = stand_in(Duration::ZERO).await;
        let (api, purges) = spent_budget().await;
        let h = harness(tag_purged_edge(&authority, api)).await;
        let ids = h.keys(1).await;
        let started = Instant::now();
        let (status, revoked) = h.revoke(&ids[0]).await;
        let took = started.elapsed();
        assert_eq!(status, StatusCode::OK, "{revoked}");
        assert!(took < Duration::from_secs(6), "the revoke took {took:?}");
        assert_eq!(revoked["authority"]["acknowledged"], true, "{revoked}");
        let region = &revoked["regions"][0];
        assert_eq!(region["acknowledged"], false, "{revoked}");
        // Pending: either the call waited out the 5 s, or the client saw at once that the budget
        // cannot start it in time.
        let pending = |e: &str| e.contains("still pending") || e.contains("api_limit");
        assert!(region["error"].as_str().is_some_and(pending), "{revoked}");
        assert_eq!(purges.0.lock().unwrap().len(), 1, "only the call that spent the budget");
    });
}

/// A delivery that outlasts the answer: the answer, read from the outbox at 5 s, shows what
/// had landed by then (the authority's update), not only what the pass recorded at its end.
#[test]
fn an_answer_given_while_a_purge_is_under_way_shows_what_landed() {
    bounded(Duration::from_secs(30), async {
        let (authority, _) = stand_in(Duration::ZERO).await;
        // One call per 6 s, and each takes 2 s to answer: the call that spends the budget ends
        // 2 s into its window, so the revoke's purge waits about 4 s to start and lands about
        // 6 s after the revoke starts, past the answer.
        let (base, purges) = purge_cache_stand_in_after(Duration::from_secs(2)).await;
        let api = cloudflare_api(&base, 1, 6);
        api.purge_tags(&[KeyHash::of("spent")]).await.unwrap();
        let h = harness(tag_purged_edge(&authority, api)).await;
        let ids = h.keys(1).await;
        let (started, called_ms) = (Instant::now(), now_ms());
        let (status, revoked) = h.revoke(&ids[0]).await;
        let (took, answered_ms) = (started.elapsed(), now_ms());
        assert_eq!(status, StatusCode::OK, "{revoked}");
        assert!(took < Duration::from_secs(6), "the revoke took {took:?}");
        assert_eq!(revoked["authority"]["acknowledged"], true, "{revoked}");
        let region = &revoked["regions"][0];
        assert_eq!(region["acknowledged"], false, "{revoked}");
        assert!(region["error"].as_str().is_some_and(|e| e.contains("still pending")), "{revoked}");
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(purges.0.lock().unwrap().len(), 2, "the purge went on after the answer");
        let (_, regions) = h.call("GET", "/v1/regions", None).await;
        assert_eq!(regions["regions"][0]["purge"]["pending"], 0, "{regions}");
        // The promise's bound runs from the answer, not from the end of the pass that went on.
        let (_, delivery) = h.call("GET", &format!("/v1/keys/{}/delivery", ids[0]), None).await;
        let noted = delivery["answered_at_ms"].as_i64().expect("the answer is noted");
        assert!((called_ms..=answered_ms).contains(&noted), "{called_ms}..={answered_ms}: {delivery}");
    });
}

/// Issue 9, item 4: one workspace revoking many keys at once batches their tags into few
/// calls, and another workspace's revoke takes its share of the next call instead of waiting
/// behind them all.
#[test]
fn purges_by_tag_are_batched_and_another_workspace_does_not_wait_behind_them() {
    bounded(Duration::from_secs(60), async {
        let (authority, _) = stand_in(Duration::ZERO).await;
        let (base, purges) = purge_cache_stand_in().await;
        // Two calls a second: 61 calls, one per revoke, would take half a minute.
        let h = harness(tag_purged_edge(&authority, cloudflare_api(&base, 2, 1))).await;
        let busy = h.keys(60).await;
        let other = h.other_workspace().await;
        let (created, quiet) = other.key().await;
        let quiet_tag = quiet.hash().to_hex();
        let revokes: Vec<_> = busy
            .iter()
            .map(|id| {
                let (h, id) = (h.clone(), id.clone());
                tokio::spawn(async move { h.revoke(&id).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        let (status, revoked) = other.revoke(created["id"].as_str().unwrap()).await;
        let took = started.elapsed();
        assert_eq!(status, StatusCode::OK, "{revoked}");
        assert_eq!(revoked["regions"][0]["acknowledged"], true, "{revoked}");
        assert!(took < Duration::from_secs(3), "the other workspace's revoke waited {took:?}");
        for revoke in revokes {
            let (status, revoked) = revoke.await.unwrap();
            assert_eq!(status, StatusCode::OK, "{revoked}");
        }
        let calls = purges.0.lock().unwrap().clone();
        let tags: usize = calls.iter().map(Vec::len).sum();
        assert!(calls.len() <= 8, "{} calls for 61 revokes: {calls:?}", calls.len());
        assert!(calls.iter().all(|c| c.len() <= 30), "a call carried more than 30 tags");
        assert!(tags >= 61, "every tag purged: {tags}");
        assert!(calls.iter().any(|c| c.contains(&quiet_tag)));
    });
}

/// Issue 9, item 4: the start-up sync of root keys goes through the outbox: what cannot be
/// delivered stays pending, shown, and retried, instead of being logged and forgotten.
#[test]
fn the_start_up_root_key_sync_is_queued_in_the_outbox() {
    bounded(Duration::from_secs(30), async {
        let h = harness(refusing_edge()).await;
        h.state.change.publish_root_keys().await.unwrap();
        let (_, regions) = h.call("GET", "/v1/regions", None).await;
        assert_eq!(regions["authority"]["pending"], 1, "{regions}");
        assert_eq!(regions["regions"][0]["kv"]["pending"], 1, "{regions}");
    });
}

const DAY_MS: i64 = 24 * 3600 * 1000;

/// Issue 9, item 8: past their ages, what no promise depends on is dead-lettered (never for
/// its attempts), what it depends on is stuck and still retried, and both are counted with
/// their last error; a redrive makes them pending and due again.
#[test]
fn old_deliveries_are_stuck_or_dead_lettered_by_what_depends_on_them_and_redriven() {
    bounded(Duration::from_secs(30), async {
        // Everything promised and pending is stuck at once.
        let outbox = OutboxSettings { stuck_after_s: 0, ..OutboxSettings::default() };
        let h = harness_with(refusing_edge(), outbox).await;
        let (_, key) = h.key().await;
        let created_entry = h.newest_entry(&key).await;
        let revoked_entry = h.revoke_in_store(&key).await;
        h.state.delivery.deliver(revoked_entry).await.unwrap();
        assert_eq!(h.deliveries(created_entry).await[&Target::Kv("r1".into())], DeliveryState::Superseded);
        // Another key's creation: a loosening change, whose KV write no promise depends on.
        let (_, other) = h.key().await;
        let loosening = h.newest_entry(&other).await;
        let store = &h.state.store;
        let week_later = now_ms() + 8 * DAY_MS;
        let upkept = upkeep(store, &OutboxSettings::default(), week_later).await.unwrap();
        // The first creation, whose only delivery the revocation superseded, is pruned.
        assert_eq!(upkept, Upkept { dead_lettered: 1, pruned: 1 });
        assert!(store.outbox_entry(created_entry).await.unwrap().is_none());
        assert_eq!(h.deliveries(loosening).await[&Target::Kv("r1".into())], DeliveryState::DeadLettered);
        let revoked = h.deliveries(revoked_entry).await;
        assert_eq!(revoked[&purge("r1")], DeliveryState::Pending, "a purge is never dead-lettered");
        assert_eq!(revoked[&Target::Kv("r1".into())], DeliveryState::Pending, "nor a tightening KV write");

        let (_, regions) = h.call("GET", "/v1/regions", None).await;
        let region = &regions["regions"][0];
        assert_eq!(region["kv"]["dead_lettered"], 1, "{regions}");
        assert_eq!(region["kv"]["stuck"], 1, "the revocation's KV write: {regions}");
        assert_eq!(region["purge"]["stuck"], 1, "{regions}");
        assert!(region["purge"]["last_error"].as_str().is_some(), "{regions}");

        let actor = keyward_control_plane::change::Actor::Console("outbox redrive");
        let redriven = store.redrive(Redrive { region: Some("r1"), now: now_ms() }, &actor).await.unwrap();
        assert_eq!((redriven.revived, redriven.made_due), (1, 2), "{redriven:?}");
        assert_eq!(h.deliveries(loosening).await[&Target::Kv("r1".into())], DeliveryState::Pending);
        let due = store.due_outbox_ids(now_ms(), 10).await.unwrap();
        assert!(due.contains(&loosening) && due.contains(&revoked_entry), "{due:?}");
    });
}

/// Issue 9, item 8: an entry whose every delivery landed is pruned once old enough; one with a
/// delivery pending is kept whatever its age.
#[test]
fn delivered_entries_are_pruned_after_their_age() {
    bounded(Duration::from_secs(30), async {
        let (url, _) = stand_in(Duration::ZERO).await;
        let h = harness(edge(Endpoints { authority: Some(&url), signed: Some((&url, &url)), ..Endpoints::default() }))
            .await;
        let (_, key) = h.key().await;
        let delivered = h.newest_entry(&key).await;
        h.key().await;
        let pending = h.revoke_in_store(&key).await;
        let store = &h.state.store;
        assert_eq!(store.prune_delivered(now_ms() - DAY_MS).await.unwrap(), 0, "too young");
        let pruned = upkeep(store, &OutboxSettings::default(), now_ms() + 8 * DAY_MS).await.unwrap().pruned;
        assert_eq!(pruned, 2, "both creations; not the undelivered revocation");
        assert!(store.outbox_entry(delivered).await.unwrap().is_none());
        assert!(store.outbox_entry(pending).await.unwrap().is_some());
    });
}

/// Issue 9, item 8: `keyward outbox status` shows the operator every workspace's stuck
/// deliveries with their last error, and `keyward outbox redrive --region` makes them due.
#[test]
fn the_outbox_commands_show_and_redrive_stuck_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("keyward.sqlite");
    bounded(Duration::from_secs(30), {
        let database = database.clone();
        async move {
            let store = Store::open(&database).await.unwrap();
            let root = Key::generate("kw_root", [3; 32]).unwrap().expose().to_owned();
            bootstrap(&store, Some(root.clone())).await.unwrap();
            let edge = refusing_edge();
            let h = Harness {
                _dir: Arc::new(tempfile::tempdir().unwrap()),
                state: AppState::new(store, Arc::new(edge)),
                root,
            };
            let (_, key) = h.key().await;
            let id = h.revoke_in_store(&key).await;
            h.state.delivery.deliver(id).await.unwrap();
            h.state.store.close().await;
        }
    });
    let keyward = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args(args)
            .arg("--database")
            .arg(&database)
            .arg("--json")
            .env_clear()
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    // Everything promised and pending is stuck at once with these ages.
    let config = format!(
        "purge_secret = \"{SECRET}\"\nauthority_url = \"{REFUSING}\"\n[[regions]]\nname = \"r1\"\nurl = \"{REFUSING}\"\nkv_url = \"{REFUSING}\"\n\
         kv_namespace_id = \"ns\"\n[outbox]\nstuck_after_s = 0\n"
    );
    std::fs::write(dir.path().join("keyward.toml"), config).unwrap();
    let status = keyward(&["outbox", "status"]);
    let purge = status["targets"].as_array().unwrap().iter().find(|t| t["target"] == "purge:r1").unwrap();
    assert_eq!(purge["stuck"], 1, "{status}");
    let troubled = status["troubled"].as_array().unwrap();
    let stuck = troubled.iter().find(|d| d["target"] == "purge:r1").expect("the stuck purge is listed");
    assert_eq!(stuck["state"], "pending", "{status}");
    assert!(stuck["last_error"].as_str().is_some_and(|e| e.contains("purge")), "{status}");
    let redriven = keyward(&["outbox", "redrive", "--region", "r1"]);
    assert!(redriven["made_due"].as_u64().unwrap() >= 1, "{redriven}");
}

/// Issue 9, items 4 and 8: a purge the retrier took while the purge budget is spent holds up
/// only its own entry: another entry's failed KV write is retried meanwhile.
#[test]
fn a_purge_waiting_for_the_budget_holds_up_no_other_retry() {
    bounded(Duration::from_secs(30), async {
        let (authority, _) = stand_in(Duration::ZERO).await;
        let (api, _) = spent_budget().await;
        let kv = Arc::new(FlakyKv::default());
        let h = harness(tag_purged_edge_with_kv(&authority, api, kv.clone())).await;
        let (_, blocked) = h.key().await;
        let blocked = h.revoke_in_store(&blocked).await;
        kv.refusing.store(true, std::sync::atomic::Ordering::SeqCst);
        let (_, key) = h.key().await;
        let failed = h.newest_entry(&key).await;
        // The retrier takes both at once: the revocation's purge waits ten minutes for the budget.
        h.state.delivery.clone().spawn_retrier();
        tokio::time::sleep(Duration::from_millis(500)).await;
        kv.refusing.store(false, std::sync::atomic::Ordering::SeqCst);
        let started = Instant::now();
        while h.deliveries(failed).await[&Target::Kv("cloudflare".into())] != DeliveryState::Done {
            assert!(started.elapsed() < Duration::from_secs(5), "the KV write waited behind the purge");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(h.deliveries(blocked).await[&purge("cloudflare")], DeliveryState::Pending);
    });
}

/// A tightening change whose authority update a newer change superseded still holds back its
/// purge-by-tag until that newer update (which carries it) has reached the authority: the
/// superseded update is not pending, but the authority lacks the change all the same.
#[test]
fn a_superseded_authority_update_still_holds_back_the_tag_purge() {
    bounded(Duration::from_secs(30), async {
        let (base, purges) = purge_cache_stand_in().await;
        let h = harness(tag_purged_edge(REFUSING, cloudflare_api(&base, 1_000, 300))).await;
        let (_, key) = h.key().await;
        let revoked = h.revoke_in_store(&key).await;
        let renamed = h.rename_in_store(&key).await;
        assert_eq!(h.deliveries(revoked).await[&Target::Authority], DeliveryState::Superseded);
        h.state.delivery.deliver(revoked).await.unwrap();
        h.state.delivery.deliver(renamed).await.unwrap();
        assert!(purges.0.lock().unwrap().is_empty(), "purged by tag while the authority lacked the revocation");
        assert_eq!(h.deliveries(revoked).await[&purge("cloudflare")], DeliveryState::Pending);
    });
}

/// Runs `keyward` with `args` against the database and config in `dir`, no environment.
fn keyward_in(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(args)
        .arg("--config")
        .arg(dir.join("keyward.toml"))
        .arg("--database")
        .arg(dir.join("keyward.sqlite"))
        .env_clear()
        .current_dir(dir)
        .output()
        .unwrap()
}

/// Waits up to `within` for `done`, checking every 50 ms; fails with `what`.
async fn eventually(within: Duration, what: &str, mut done: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !done().await {
        assert!(started.elapsed() < within, "{what} (waited {within:?})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 9, items 4 and 8: a key revoked and acknowledged everywhere is pushed again by
/// `keyward outbox redrive --key`: the command queues its current record for every target (a
/// purge included, since the key is revoked) and says so, the retrier of the running control
/// plane delivers it, and the stand-in sees the record's authority update, KV write and purge
/// again. An unknown id is refused, exit non-zero, queuing nothing.
#[test]
fn redrive_key_pushes_the_current_record_again_to_targets_that_acknowledged_it() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (url, seen) = runtime.block_on(stand_in(Duration::ZERO));
    let config = format!(
        "purge_secret = \"{SECRET}\"\nauthority_url = \"{url}\"\n[[regions]]\nname = \"r1\"\nurl = \"{url}\"\n\
         kv_url = \"{url}\"\nkv_namespace_id = \"ns\"\n"
    );
    std::fs::write(dir.path().join("keyward.toml"), &config).unwrap();
    let database = dir.path().join("keyward.sqlite");
    let (h, id, hash) = runtime.block_on(async {
        let config = Config::parse(&config, |_| None).unwrap();
        let store = Store::open(&database).await.unwrap().with_audit_key(config.audit_key().unwrap());
        let root = Key::generate("kw_root", [3; 32]).unwrap().expose().to_owned();
        bootstrap(&store, Some(root.clone())).await.unwrap();
        let edge = EdgeClient::from_config(&config).unwrap();
        let state = AppState::new(store, Arc::new(edge));
        let h = Harness { _dir: Arc::new(tempfile::tempdir().unwrap()), state, root };
        let (created, key) = h.key().await;
        let id = created["id"].as_str().unwrap().to_owned();
        let (status, revoked) = h.revoke(&id).await;
        assert_eq!(status, StatusCode::OK, "{revoked}");
        assert_eq!(revoked["authority"]["acknowledged"], true, "{revoked}");
        assert_eq!(revoked["regions"][0]["acknowledged"], true, "{revoked}");
        let entry = h.newest_entry(&key).await;
        eventually(Duration::from_secs(5), "the revocation's KV write never landed", async || {
            h.deliveries(entry).await.values().all(|s| *s == DeliveryState::Done)
        })
        .await;
        (h, id, key.hash().to_hex())
    });
    let before = [seen.count(AUTHORITY_PATH), seen.count(PURGE_PATH), seen.count(&hash)];
    assert_eq!(before[1], 1, "one purge, by the revoke");

    let unknown = keyward_in(dir.path(), &["outbox", "redrive", "--key", "key_01ARZ3NDEKTSV4RRFFQ69G5FAV"]);
    assert!(!unknown.status.success(), "an unknown key id was accepted");
    let message = String::from_utf8_lossy(&unknown.stderr);
    assert!(message.contains("no key or root key with id `key_01ARZ3NDEKTSV4RRFFQ69G5FAV`"), "{message}");
    let elsewhere = keyward_in(dir.path(), &["outbox", "redrive", "--key", &id, "--region", "r9"]);
    assert!(!elsewhere.status.success(), "a region the configuration does not name was accepted");
    let message = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(message.contains("no region named `r9`"), "{message}");

    let queued = keyward_in(dir.path(), &["outbox", "redrive", "--key", &id, "--json"]);
    assert!(queued.status.success(), "{}", String::from_utf8_lossy(&queued.stderr));
    let queued: Value = serde_json::from_slice(&queued.stdout).unwrap();
    let entry = &queued["queued"];
    assert_eq!((entry["key_id"].as_str(), entry["version"].as_u64()), (Some(id.as_str()), Some(2)), "{queued}");
    assert_eq!(entry["targets"], json!(["authority", "kv:r1", "purge:r1"]), "{queued}");
    assert_eq!(entry["tightening"], true, "{queued}");
    runtime.block_on(async {
        // Nothing delivers until the running control plane's retrier takes the entry.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!([seen.count(AUTHORITY_PATH), seen.count(PURGE_PATH), seen.count(&hash)], before);
        let queued = h.deliveries(entry["outbox_id"].as_i64().unwrap()).await;
        assert_eq!(queued.len(), 3, "{queued:?}");
        assert!(queued.values().all(|s| *s == DeliveryState::Pending), "{queued:?}");
        h.state.delivery.clone().spawn_retrier();
        eventually(Duration::from_secs(10), "the re-push was never delivered", async || {
            h.deliveries(entry["outbox_id"].as_i64().unwrap()).await.values().all(|s| *s == DeliveryState::Done)
        })
        .await;
    });
    let after = [seen.count(AUTHORITY_PATH), seen.count(PURGE_PATH), seen.count(&hash)];
    assert_eq!(after, before.map(|n| n + 1), "the authority, r1's purge and r1's KV each saw the record once more");
    let purge = seen.bodies(PURGE_PATH).pop().unwrap();
    assert!(purge.contains(&id) && purge.contains(r#""status":"revoked""#), "{purge}");
    let written = seen.bodies(&hash).pop().unwrap();
    assert!(written.contains(r#""version":2"#) && written.contains(r#""status":"revoked""#), "{written}");

    // For people, a sentence; with --region, the region's targets and the authority.
    let table = keyward_in(dir.path(), &["outbox", "redrive", "--key", &id, "--region", "r1", "--format", "table"]);
    assert!(table.status.success(), "{}", String::from_utf8_lossy(&table.stderr));
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(table.starts_with(&format!("Queued key {id}'s current record (version 2) again")), "{table}");
    assert!(table.contains("for: authority, kv:r1, purge:r1."), "{table}");
    // Each queued re-push is audited as the operator's, in the key's workspace; the refused one is not.
    let query = AuditQuery { target: Some(&id), action: Some("outbox.redrive"), limit: 10, ..AuditQuery::default() };
    let audited = runtime.block_on(h.state.store.audit_entries(&query)).unwrap();
    assert_eq!(audited.len(), 2, "{audited:?}");
    assert!(audited.iter().all(|e| e.body.actor == "console" && e.body.command.is_some()), "{audited:?}");
    assert_eq!(audited[0].body.after.as_ref().unwrap()["region"], "r1", "{audited:?}");
    assert!(runtime.block_on(h.state.store.verify_audit(None)).unwrap().broken.is_none(), "the chain goes on");
    drop(runtime);
}

/// Issue 9, item 4: a re-push never sends a record older than one written after it. The re-push
/// carries the version current when it was queued; a change committed before the retrier takes
/// it supersedes its deliveries, so only the newer version is sent. A root key is re-pushed
/// too (the authority and KV, never purged), and a re-push made now carries the newest version.
#[test]
fn a_repush_never_sends_an_older_record_after_a_newer_one() {
    bounded(Duration::from_secs(30), async {
        let (url, seen) = stand_in(Duration::ZERO).await;
        let h = harness(edge(Endpoints { authority: Some(&url), signed: Some((&url, &url)), ..Endpoints::default() }))
            .await;
        let (created, key) = h.key().await;
        let id = created["id"].as_str().unwrap().to_owned();
        let store = &h.state.store;
        let reach = h.state.delivery.edge().reach();
        let actor = Actor::Console("outbox redrive --key");
        fn repush<'a>(id: &'a str, reach: &Reach) -> Repush<'a> {
            Repush { id, region: None, reach: reach.clone(), now: now_ms() }
        }
        let queued = store.repush(repush(&id, &reach), &actor).await.unwrap();
        assert_eq!((queued.version, queued.tightening), (1, false), "{queued:?}");
        assert_eq!(queued.targets, ["authority", "kv:r1"], "an active key's re-push purges nothing");
        let renamed = h.rename_in_store(&key).await;
        let superseded = h.deliveries(queued.outbox_id).await;
        assert!(superseded.values().all(|s| *s == DeliveryState::Superseded), "{superseded:?}");
        let (authority, kv) = (seen.count(AUTHORITY_PATH), seen.count(&key.hash().to_hex()));
        h.state.delivery.deliver(renamed).await.unwrap();
        h.state.delivery.deliver(queued.outbox_id).await.unwrap();
        let kv_bodies = seen.bodies(&key.hash().to_hex());
        assert_eq!(kv_bodies.len(), kv + 1, "only the rename was written");
        assert!(kv_bodies.last().unwrap().contains(r#""version":2"#), "{kv_bodies:?}");
        assert_eq!(seen.count(AUTHORITY_PATH), authority + 1, "only the rename reached the authority");
        let again = store.repush(repush(&id, &reach), &actor).await.unwrap();
        assert_eq!(again.version, 2, "a re-push carries the record as it is now");

        let root_id = store.root_keys().await.unwrap()[0].id.clone();
        let root = store.repush(repush(&root_id, &reach), &actor).await.unwrap();
        assert_eq!((root.kind, root.tightening), ("root_key", false), "{root:?}");
        assert_eq!(root.targets, ["authority", "kv:r1"], "{root:?}");
        let unknown = store.repush(repush("key_nope", &reach), &actor).await.unwrap_err();
        assert!(matches!(unknown, RepushError::Unknown(_)), "{unknown}");
    });
}

/// Issue 9, item 4: the answer window is `[outbox] answer_within_ms`: with 300 ms, a revoke
/// whose region hangs answers within about that, naming the purge still pending; below 100 ms
/// the configuration is refused.
#[test]
fn the_answer_window_follows_the_configuration() {
    bounded(Duration::from_secs(30), async {
        let (authority, _) = stand_in(Duration::ZERO).await;
        let region = hung(Hang::Silent);
        let outbox = OutboxSettings { answer_within_ms: 300, ..OutboxSettings::default() };
        let edge = edge(Endpoints {
            authority: Some(&authority),
            signed: Some((&region, &authority)),
            ..Endpoints::default()
        });
        let h = harness_with(edge, outbox).await;
        let (created, _) = h.key().await;
        let started = Instant::now();
        let (status, revoked) = h.revoke(created["id"].as_str().unwrap()).await;
        let took = started.elapsed();
        assert_eq!(status, StatusCode::OK, "{revoked}");
        assert!(took < Duration::from_millis(1_500), "the revoke took {took:?} with a 300 ms window");
        let region = &revoked["regions"][0];
        assert_eq!(region["acknowledged"], false, "{revoked}");
        assert!(region["error"].as_str().is_some_and(|e| e.contains("still pending after 300 ms")), "{revoked}");
        for (text, ok) in [("answer_within_ms = 99", false), ("answer_within_ms = 100", true)] {
            assert_eq!(Config::parse(&format!("[outbox]\n{text}\n"), |_| None).is_ok(), ok, "{text}");
        }
    });
}
