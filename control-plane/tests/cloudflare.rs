//! The production Cloudflare client against a recording stand-in for Cloudflare's API: request
//! formats (bulk KV, purge by tag), coalescing of writes to one key, and the rate limit. The
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
use keyward_control_plane::cloudflare::{CloudflareApi, RateLimiter, Settings};
use keyward_control_plane::config::Secret;
use keyward_control_plane::kv::{BulkKv, KvWriter};
use keyward_shared::KeyHash;
use serde_json::{Value, json};

/// One request the stand-in saw: method, path, `Authorization`, JSON body, arrival.
type Call = (Method, String, Option<String>, Value, Instant);

/// How the stand-in answers, set by each test.
#[derive(Default)]
struct Script {
    /// Keys a bulk write answers as not written (`result.unsuccessful_keys`), once each.
    unsuccessful: Vec<String>,
    /// How many of the next calls answer 429, and the `Retry-After` (seconds) they carry.
    too_many: usize,
    retry_after: Option<u64>,
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
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = serde_json::from_str(&body).unwrap_or(Value::Null);
    let path = uri.path().to_owned();
    stand_in.calls.lock().unwrap().push((method, path.clone(), auth, body.clone(), Instant::now()));
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
        .filter(|(_, path, ..)| path.ends_with("/bulk"))
        .flat_map(|(_, _, _, body, at)| {
            body.as_array()
                .unwrap()
                .iter()
                .filter(|p| p["key"] == key)
                .map(move |p| (p["value"].clone(), at.duration_since(started)))
        })
        .collect()
}

fn api(base: &str, limiter: RateLimiter) -> Arc<CloudflareApi> {
    let settings = Settings {
        api_base: base.to_owned(),
        account_id: "acct".into(),
        zone_id: "zone".into(),
        kv_namespace_id: "ns".into(),
        worker_url: "https://keys.example.com".into(),
        api_token: Some(Secret::new("cf-token".into())),
        max_tags_per_purge: 30,
    };
    Arc::new(CloudflareApi::new(reqwest::Client::new(), settings, limiter))
}

fn record(version: u64) -> String {
    format!("{{\"version\":{version}}}")
}

#[tokio::test]
async fn bulk_writes_and_tag_purges_use_cloudflares_format() {
    let (base, cf) = fake_cloudflare().await;
    let api = api(&base, RateLimiter::new(1_200, Duration::from_secs(300)));
    api.write_bulk(&[("key:aa".into(), "{\"v\":1}".into()), ("root:bb".into(), "{}".into())]).await.unwrap();
    let hashes: Vec<KeyHash> = (0..45).map(|i| KeyHash::of(&i.to_string())).collect();
    api.purge_tags(&hashes).await.unwrap();
    let calls = cf.calls();
    assert_eq!(calls.len(), 3, "one bulk write, two purge batches (30 + 15)");
    let (method, path, auth, body, _) = &calls[0];
    assert_eq!((method, path.as_str()), (&Method::PUT, "/client/v4/accounts/acct/storage/kv/namespaces/ns/bulk"));
    assert_eq!(auth.as_deref(), Some("Bearer cf-token"));
    assert_eq!(body, &json!([{ "key": "key:aa", "value": "{\"v\":1}" }, { "key": "root:bb", "value": "{}" }]));
    for (i, expected) in [(1, 30), (2, 15)] {
        let (method, path, _, body, _) = &calls[i];
        assert_eq!((method, path.as_str()), (&Method::POST, "/client/v4/zones/zone/purge_cache"));
        let tags = body["tags"].as_array().unwrap();
        assert_eq!(tags.len(), expected);
        assert_eq!(tags[0].as_str().unwrap().len(), 64, "a tag is a key hash in hex");
    }
}

#[tokio::test]
async fn writes_to_one_key_are_coalesced_to_one_per_second() {
    let (base, cf) = fake_cloudflare().await;
    let kv = Arc::new(BulkKv::new(api(&base, RateLimiter::new(1_200, Duration::from_secs(300)))));
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
    let kv = BulkKv::new(api(&base, RateLimiter::new(1_200, Duration::from_secs(300))));
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
    let kv = BulkKv::new(api(&base, RateLimiter::new(1_200, Duration::from_secs(300))));
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

#[tokio::test]
async fn calls_wait_for_the_rate_limit() {
    let (base, cf) = fake_cloudflare().await;
    // 2 calls per second: the 5th of 5 calls cannot start before about 1.5 s.
    let api = api(&base, RateLimiter::new(2, Duration::from_secs(1)));
    let started = Instant::now();
    for i in 0..5 {
        api.purge_tags(&[KeyHash::of(&i.to_string())]).await.unwrap();
    }
    let elapsed = started.elapsed();
    assert_eq!(cf.calls().len(), 5);
    assert!(elapsed >= Duration::from_millis(1_400), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
}
