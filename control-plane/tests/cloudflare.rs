//! The production Cloudflare client against a recording stand-in for Cloudflare's API: request
//! formats (bulk KV, purge by tag), coalescing of writes to one key, the rate limit, and purges
//! by tag batched across keys with a fair share per workspace. The
//! stand-in can also answer as Cloudflare does when things go wrong: a bulk write that leaves
//! some keys unwritten (`result.unsuccessful_keys`), 429 with `Retry-After`, another zone.
//! (wrangler dev serves no bulk or purge_cache endpoint; its single-value KV endpoint, which
//! `kv::CloudflareKv` speaks, is exercised by the whole-system tests.)

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use keyward_control_plane::cloudflare::{Plan, Settings};
use keyward_control_plane::delivery::TagBatcher;
use keyward_control_plane::kv::{BulkKv, CloudflareKv, KvWriter};
use keyward_shared::KeyHash;
use serde_json::{Value, json};
use support::{api, settings};

mod support;

/// One request the stand-in saw.
#[derive(Debug, Clone)]
struct Call {
    method: Method,
    path: String,
    auth: Option<String>,
    content_type: Option<String>,
    /// The body's length, and the body as JSON (`Null` when it is not JSON).
    bytes: usize,
    body: Value,
    at: Instant,
}

/// How the stand-in answers, set by each test.
#[derive(Default)]
struct Script {
    /// Keys a bulk write answers as not written (`result.unsuccessful_keys`), once each.
    unsuccessful: Vec<String>,
    /// How many of the next calls answer 429, and the `Retry-After` (seconds) they carry.
    too_many: usize,
    retry_after: Option<u64>,
    /// The name of the zone `GET /zones/<id>` answers (`example.com` unless set).
    zone_name: Option<String>,
}

#[derive(Clone, Default)]
struct StandIn {
    calls: Arc<Mutex<Vec<Call>>>,
    script: Arc<Mutex<Script>>,
}

impl StandIn {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.script.lock().unwrap()
    }
}

async fn answer(
    State(stand_in): State<StandIn>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (auth, content_type) = (header("authorization"), header("content-type"));
    let (bytes, body) = (body.len(), serde_json::from_str(&body).unwrap_or(Value::Null));
    let path = uri.path().to_owned();
    let call = Call { method, path: path.clone(), auth, content_type, bytes, body: body.clone(), at: Instant::now() };
    stand_in.calls.lock().unwrap().push(call);
    let mut script = stand_in.script();
    if script.too_many > 0 {
        script.too_many -= 1;
        let errors = json!([{ "code": 10000, "message": "Rate limited. Please wait and consider throttling your request speed" }]);
        let mut response =
            (StatusCode::TOO_MANY_REQUESTS, axum::Json(json!({ "success": false, "errors": errors }))).into_response();
        if let Some(seconds) = script.retry_after {
            response.headers_mut().insert("retry-after", seconds.into());
        }
        return response;
    }
    let result = if path.ends_with("/bulk") {
        let keys: Vec<&str> = body.as_array().unwrap().iter().filter_map(|p| p["key"].as_str()).collect();
        let lost: Vec<String> =
            keys.iter().filter(|k| script.unsuccessful.iter().any(|u| u == *k)).map(|k| (*k).to_owned()).collect();
        script.unsuccessful.retain(|u| !lost.contains(u));
        json!({ "successful_key_count": keys.len() - lost.len(), "unsuccessful_keys": lost })
    } else if path.ends_with("/zones/zone") {
        let name = script.zone_name.clone().unwrap_or_else(|| "example.com".to_owned());
        json!({ "id": "zone", "name": name, "status": "active", "plan": { "legacy_id": "free" } })
    } else {
        Value::Null
    };
    axum::Json(json!({ "success": true, "errors": [], "messages": [], "result": result })).into_response()
}

async fn fake_cloudflare() -> (String, StandIn) {
    let stand_in = StandIn::default();
    let app = Router::new().fallback(answer).with_state(stand_in.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/client/v4", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, stand_in)
}

/// The values written to `key`, in order, with when the stand-in saw each.
fn writes_of(calls: &[Call], key: &str, started: Instant) -> Vec<(Value, Duration)> {
    calls
        .iter()
        .filter(|call| call.path.ends_with("/bulk"))
        .flat_map(|call| {
            call.body
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["key"] == key)
                .map(move |p| (p["value"].clone(), call.at.duration_since(started)))
        })
        .collect()
}

fn record(version: u64) -> String {
    format!("{{\"version\":{version}}}")
}

#[tokio::test]
async fn bulk_writes_and_tag_purges_use_cloudflares_format() {
    let (base, cf) = fake_cloudflare().await;
    let api = api(settings(&base));
    api.write_bulk(&[("key:aa".into(), "{\"v\":1}".into()), ("root:bb".into(), "{}".into())]).await.unwrap();
    let hashes: Vec<KeyHash> = (0..45).map(|i| KeyHash::of(&i.to_string())).collect();
    api.purge_tags(&hashes).await.unwrap();
    let calls = cf.calls();
    assert_eq!(calls.len(), 3, "one bulk write, two purge batches (30 + 15)");
    let bulk = &calls[0];
    assert_eq!(
        (&bulk.method, bulk.path.as_str()),
        (&Method::PUT, "/client/v4/accounts/acct/storage/kv/namespaces/ns/bulk")
    );
    assert_eq!(bulk.auth.as_deref(), Some("Bearer cf-token"));
    assert_eq!(bulk.content_type.as_deref(), Some("application/json"));
    assert_eq!(bulk.body, json!([{ "key": "key:aa", "value": "{\"v\":1}" }, { "key": "root:bb", "value": "{}" }]));
    for (i, expected) in [(1, 30), (2, 15)] {
        let purge = &calls[i];
        assert_eq!((&purge.method, purge.path.as_str()), (&Method::POST, "/client/v4/zones/zone/purge_cache"));
        let tags = purge.body["tags"].as_array().unwrap();
        assert_eq!(tags.len(), expected);
        assert_eq!(tags[0].as_str().unwrap().len(), 64, "a tag is a key hash in hex");
    }
}

#[tokio::test]
async fn writes_to_one_key_are_coalesced_to_one_per_second() {
    let (base, cf) = fake_cloudflare().await;
    let kv = Arc::new(BulkKv::new(api(settings(&base))));
    let started = Instant::now();
    // Five versions of one key and one other key, all at once.
    let writes = (1..=5).map(|v| {
        let kv = kv.clone();
        tokio::spawn(async move { kv.put("key:same", record(v)).await })
    });
    let other = kv.put("key:other", record(1));
    let (results, other) = tokio::join!(futures::future::join_all(writes), other);
    other.unwrap();
    for r in results {
        r.unwrap().unwrap();
    }
    let writes_of_same = writes_of(&cf.calls(), "key:same", started);
    assert!(writes_of_same.len() <= 2, "coalesced: {writes_of_same:?}");
    assert_eq!(writes_of_same.last().unwrap().0, record(5), "the newest value wins");
    if let [(_, first), (_, second)] = writes_of_same[..] {
        assert!(second - first >= Duration::from_millis(990), "one write per second per key: {writes_of_same:?}");
    }
}

/// Cloudflare answers `success: true` for a bulk write and lists in `result.unsuccessful_keys`
/// the keys it did not write: their writers must hear that, not "done".
#[tokio::test]
async fn keys_a_bulk_write_left_unwritten_fail_their_writers() {
    let (base, cf) = fake_cloudflare().await;
    cf.script().unsuccessful = vec!["key:lost".into()];
    let kv = BulkKv::new(api(settings(&base)));
    let (lost, kept) = tokio::join!(kv.put("key:lost", record(1)), kv.put("key:kept", record(1)));
    kept.unwrap();
    let error = lost.expect_err("Cloudflare said key:lost was not written");
    assert!(error.to_string().contains("not written"), "{error}");
    assert_eq!(kv.unwritten(), 1, "a key left unwritten is counted");
    // Written again, a second later: this time Cloudflare takes it.
    kv.put("key:lost", record(1)).await.unwrap();
    let writes = writes_of(&cf.calls(), "key:lost", Instant::now());
    assert_eq!(writes.len(), 2, "{writes:?}");
}

/// Writes to one key that meet while it waits for its next second keep the highest version,
/// whatever order they came in, and an older version than one already written is not written.
#[tokio::test]
async fn coalescing_keeps_the_highest_version_not_the_last_call() {
    let (base, cf) = fake_cloudflare().await;
    let kv = BulkKv::new(api(settings(&base)));
    kv.put("key:same", record(1)).await.unwrap();
    // Both wait for the key's next second together: version 5 first, then a late version 3.
    let (newer, older) = tokio::join!(kv.put("key:same", record(5)), kv.put("key:same", record(3)));
    newer.unwrap();
    older.unwrap();
    // Version 2 arrives after version 5 is in KV.
    kv.put("key:same", record(2)).await.unwrap();
    let written: Vec<Value> = writes_of(&cf.calls(), "key:same", Instant::now()).into_iter().map(|(v, _)| v).collect();
    assert_eq!(written, [record(1), record(5)], "the highest version wins, whatever the order of the calls");
}

/// The account's limit is a sliding window: no window of its length ever holds more calls than
/// the limit (a token bucket starting full let through twice its capacity in one window).
#[tokio::test]
async fn calls_keep_to_a_sliding_window() {
    let (base, cf) = fake_cloudflare().await;
    let api = api(Settings { api_limit: 3, api_limit_window_secs: 1, ..settings(&base) });
    let started = Instant::now();
    for i in 0..7 {
        api.purge_tags(&[KeyHash::of(&i.to_string())]).await.unwrap();
    }
    let arrivals: Vec<Instant> = cf.calls().iter().map(|c| c.at).collect();
    assert_eq!(arrivals.len(), 7);
    for (first, fourth) in arrivals.iter().zip(&arrivals[3..]) {
        assert!(fourth.duration_since(*first) >= Duration::from_millis(990), "4 calls within a second: {arrivals:?}");
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(4), "{elapsed:?}");
}

/// A call the window cannot start before its deadline fails at once, saying which limit.
#[tokio::test]
async fn a_call_the_limit_would_hold_past_its_deadline_fails_at_once() {
    let (base, cf) = fake_cloudflare().await;
    let api = api(Settings { api_limit: 1, api_limit_window_secs: 60, max_wait_ms: 500, ..settings(&base) });
    api.purge_tags(&[KeyHash::of("a")]).await.unwrap();
    let started = Instant::now();
    let error = api.purge_tags(&[KeyHash::of("b")]).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(100), "{:?}", started.elapsed());
    assert!(error.to_string().contains("account API limit (api_limit)"), "{error}");
    assert_eq!(cf.calls().len(), 1);
}

/// On 429 every call waits for `Retry-After` and the call is sent again within its deadline;
/// past the deadline it fails with the wait named, and later calls wait too, unsent.
#[tokio::test]
async fn a_429_is_waited_out_for_its_retry_after() {
    let (base, cf) = fake_cloudflare().await;
    let api = api(Settings { max_wait_ms: 3_000, ..settings(&base) });
    (cf.script().too_many, cf.script().retry_after) = (1, Some(1));
    let started = Instant::now();
    api.purge_tags(&[KeyHash::of("a")]).await.unwrap();
    let calls = cf.calls();
    assert_eq!(calls.len(), 2, "sent again after the 429");
    assert!(calls[1].at.duration_since(calls[0].at) >= Duration::from_millis(990), "{:?}", started.elapsed());

    (cf.script().too_many, cf.script().retry_after) = (1, Some(60));
    let error = api.write_bulk(&[("key:a".into(), record(1))]).await.unwrap_err();
    assert!(error.to_string().contains("429") && error.to_string().contains("60s"), "{error}");
    let blocked = api.purge_tags(&[KeyHash::of("b")]).await.unwrap_err();
    assert!(blocked.to_string().contains("Retry-After"), "{blocked}");
    assert_eq!(cf.calls().len(), 3, "nothing is sent while Cloudflare blocks calls");
}

/// Purges have their own bucket, sized to the zone's plan: on Free, a burst of 25, then one
/// per 12 s; KV writes are not held by it.
#[tokio::test]
async fn purges_keep_to_the_plans_purge_limit() {
    let (base, cf) = fake_cloudflare().await;
    let api = api(Settings { plan: Plan::Free, max_wait_ms: 1_000, ..settings(&base) });
    for i in 0..25 {
        api.purge_tags(&[KeyHash::of(&i.to_string())]).await.unwrap();
    }
    let error = api.purge_tags(&[KeyHash::of("26th")]).await.unwrap_err();
    assert!(error.to_string().contains("purge limit of the zone's plan"), "{error}");
    api.write_bulk(&[("key:a".into(), record(1))]).await.unwrap();
    assert_eq!(cf.calls().len(), 26);
}

/// Bulk writes are cut by bytes as well as by count, in order, each a JSON body.
#[tokio::test]
async fn bulk_writes_are_cut_by_bytes() {
    let (base, cf) = fake_cloudflare().await;
    let api = api(Settings { max_bulk_bytes: 1_000, ..settings(&base) });
    let pairs: Vec<(String, String)> = (0..10).map(|i| (format!("key:{i}"), "x".repeat(300))).collect();
    api.write_bulk(&pairs).await.unwrap();
    let calls = cf.calls();
    assert_eq!(calls.len(), 4, "three pairs of 330 bytes per 1,000 bytes");
    assert!(calls.iter().all(|c| c.bytes <= 1_000), "{:?}", calls.iter().map(|c| c.bytes).collect::<Vec<_>>());
    let keys: Vec<Value> =
        calls.iter().flat_map(|c| c.body.as_array().unwrap().iter().map(|p| p["key"].clone())).collect();
    assert_eq!(keys, pairs.iter().map(|(k, _)| json!(k)).collect::<Vec<_>>());
}

/// A single write (local regions, Cloudflare's format) says its body is the value's bytes.
#[tokio::test]
async fn single_writes_carry_a_content_type() {
    let (base, cf) = fake_cloudflare().await;
    let kv = CloudflareKv::new(reqwest::Client::new(), &format!("{base}/accounts/acct"), "ns", None);
    kv.put("key:a", record(1)).await.unwrap();
    let call = &cf.calls()[0];
    assert_eq!(call.path, "/client/v4/accounts/acct/storage/kv/namespaces/ns/values/key%3Aa");
    assert_eq!(call.content_type.as_deref(), Some("application/octet-stream"));
    assert_eq!(call.body, json!({ "version": 1 }));
}

/// At start the zone must be the one serving worker_url: a purge to another zone answers
/// success and purges nothing.
#[tokio::test]
async fn a_zone_that_does_not_serve_the_worker_is_refused() {
    let (base, cf) = fake_cloudflare().await;
    let api = api(settings(&base));
    api.check_zone().await.unwrap();
    for other in ["example.org", "ample.com", "keys.example.com.evil.net"] {
        cf.script().zone_name = Some(other.to_owned());
        let error = api.check_zone().await.unwrap_err();
        assert!(error.to_string().contains("set zone_id to the id of the zone serving `keys.example.com`"), "{error}");
    }
    cf.script().zone_name = Some("keys.example.com".to_owned());
    api.check_zone().await.unwrap();
    assert!(cf.calls().iter().all(|c| c.method == Method::GET && c.path == "/client/v4/zones/zone"));
}

/// Purges of many keys, from two workspaces at once, go out as few calls of at most 30 tags, and
/// the smaller workspace's tags all go in the first call.
#[tokio::test]
async fn purges_by_tag_are_batched_across_keys_with_a_fair_share_per_workspace() {
    let (base, cf) = fake_cloudflare().await;
    let batcher = TagBatcher::new(api(settings(&base)));
    let tags = |workspace: &str, n: usize| -> Vec<KeyHash> {
        (0..n).map(|i| KeyHash::of(&format!("{workspace}-{i}"))).collect()
    };
    let (busy, quiet) = (tags("busy", 40), tags("quiet", 5));
    let purges = busy.iter().map(|t| ("busy", t)).chain(quiet.iter().map(|t| ("quiet", t)));
    let results = futures::future::join_all(purges.map(|(w, t)| batcher.purge(w, std::slice::from_ref(t)))).await;
    assert!(results.iter().all(Result::is_ok));
    let sent: Vec<Vec<String>> = cf
        .calls()
        .iter()
        .filter(|call| call.path.ends_with("/purge_cache"))
        .map(|call| call.body["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_owned()).collect())
        .collect();
    assert_eq!(sent.iter().map(Vec::len).collect::<Vec<_>>(), [30, 15], "45 purges in two calls");
    let quiet_hex: Vec<String> = quiet.iter().map(KeyHash::to_hex).collect();
    assert_eq!(sent[0].iter().filter(|t| quiet_hex.contains(t)).count(), 5, "the quiet workspace waits for no one");
}
