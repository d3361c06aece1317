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
use http_body_util::BodyExt;
use keyward_control_plane::change::Actor;
use keyward_control_plane::config::Config;
use keyward_control_plane::delivery::HANDOFF;
use keyward_control_plane::edge_client::EdgeClient;
use keyward_control_plane::http::{AppState, app};
use keyward_control_plane::serve::bootstrap;
use keyward_control_plane::store::{DeliveryState, Store, Target};
use keyward_control_plane::time::now_ms;
use keyward_shared::internal::{AUTHORITY_PATH, PURGE_PATH};
use keyward_shared::{Key, KeyStatus};
use serde_json::{Value, json};
use tower::ServiceExt;

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

/// The paths a stand-in was sent, in order of arrival.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl Seen {
    fn count(&self, path_end: &str) -> usize {
        self.0.lock().unwrap().iter().filter(|p| p.ends_with(path_end)).count()
    }
}

/// A stand-in for a region's worker, the authority, KV and Cloudflare's API at once: it waits
/// `delay`, then acknowledges whatever it was sent. Answers its base URL and what it saw.
async fn stand_in(delay: Duration) -> (String, Seen) {
    let seen = Seen::default();
    let log = seen.clone();
    let app = axum::Router::new().fallback(move |uri: Uri| {
        log.0.lock().unwrap().push(uri.path().to_owned());
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
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("test.sqlite")).await.unwrap();
    let root = Key::generate("kw_root", [3; 32]).unwrap().expose().to_owned();
    bootstrap(&store, Some(root.clone())).await.unwrap();
    Harness { _dir: Arc::new(dir), state: AppState::new(store, Arc::new(edge)), root }
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

    /// Creates an API and a key of it; answers the creation's answer and the key.
    async fn key(&self) -> (Value, Key) {
        let (status, api) = self.call("POST", "/v1/apis", Some(r#"{"name":"payments-live","prefix":"sk_live"}"#)).await;
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
        let mut record = self.state.store.key_by_hash(&key.hash()).await.unwrap().unwrap();
        let now = now_ms();
        record.status = KeyStatus::Revoked;
        record.version += 1;
        record.updated_at = now;
        self.state.store.update_key(&record, &self.state.delivery.new_outbox(true, now), &Actor::System).await.unwrap()
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
