//! The production Cloudflare client against a recording stand-in for Cloudflare's API: request
//! formats (bulk KV, purge by tag), coalescing of writes to one key, the rate limit, and purges
//! by tag batched across keys with a fair share per workspace.
//! (wrangler dev serves no bulk or purge_cache endpoint; its single-value KV endpoint, which
//! `kv::CloudflareKv` speaks, is exercised by the whole-system tests.)

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use keyward_control_plane::cloudflare::RateLimiter;
use keyward_control_plane::delivery::TagBatcher;
use keyward_control_plane::kv::{BulkKv, KvWriter};
use keyward_shared::KeyHash;
use serde_json::{Value, json};
use support::cloudflare_api;

mod support;

/// One request the stand-in saw: method, path, `Authorization`, JSON body, arrival.
type Call = (Method, String, Option<String>, Value, Instant);

#[derive(Clone, Default)]
struct Recorded(Arc<Mutex<Vec<Call>>>);

async fn record(
    State(log): State<Recorded>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> axum::Json<Value> {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = serde_json::from_str(&body).unwrap_or(Value::Null);
    log.0.lock().unwrap().push((method, uri.path().to_owned(), auth, body, Instant::now()));
    axum::Json(json!({ "success": true, "errors": [], "messages": [], "result": null }))
}

async fn fake_cloudflare() -> (String, Recorded) {
    let log = Recorded::default();
    let app = Router::new().fallback(record).with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/client/v4", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, log)
}

#[tokio::test]
async fn bulk_writes_and_tag_purges_use_cloudflares_format() {
    let (base, log) = fake_cloudflare().await;
    let api = cloudflare_api(&base, RateLimiter::new(1_200, Duration::from_secs(300)));
    api.write_bulk(&[("key:aa".into(), "{\"v\":1}".into()), ("root:bb".into(), "{}".into())]).await.unwrap();
    let hashes: Vec<KeyHash> = (0..45).map(|i| KeyHash::of(&i.to_string())).collect();
    api.purge_tags(&hashes).await.unwrap();
    let calls = log.0.lock().unwrap().clone();
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
    let (base, log) = fake_cloudflare().await;
    let kv = Arc::new(BulkKv::new(cloudflare_api(&base, RateLimiter::new(1_200, Duration::from_secs(300)))));
    let started = Instant::now();
    // Five versions of one key and one other key, all at once.
    let writes = (1..=5).map(|v| {
        let kv = kv.clone();
        tokio::spawn(async move { kv.put("key:same", format!("{{\"version\":{v}}}")).await })
    });
    let other = kv.put("key:other", "{}".into());
    let (results, other) = tokio::join!(futures::future::join_all(writes), other);
    other.unwrap();
    for r in results {
        r.unwrap().unwrap();
    }
    let calls = log.0.lock().unwrap().clone();
    let writes_of_same: Vec<(&Value, Duration)> = calls
        .iter()
        .flat_map(|(_, _, _, body, at)| {
            body.as_array()
                .unwrap()
                .iter()
                .filter(|p| p["key"] == "key:same")
                .map(move |p| (&p["value"], at.duration_since(started)))
        })
        .collect();
    assert!(writes_of_same.len() <= 2, "coalesced: {writes_of_same:?}");
    assert_eq!(writes_of_same.last().unwrap().0, "{\"version\":5}", "the newest value wins");
    if let [(_, first), (_, second)] = writes_of_same[..] {
        assert!(second - first >= Duration::from_millis(990), "one write per second per key: {writes_of_same:?}");
    }
}

#[tokio::test]
async fn calls_wait_for_the_rate_limit() {
    let (base, log) = fake_cloudflare().await;
    // 2 calls per second: the 5th of 5 calls cannot start before about 1.5 s.
    let api = cloudflare_api(&base, RateLimiter::new(2, Duration::from_secs(1)));
    let started = Instant::now();
    for i in 0..5 {
        api.purge_tags(&[KeyHash::of(&i.to_string())]).await.unwrap();
    }
    let elapsed = started.elapsed();
    assert_eq!(log.0.lock().unwrap().len(), 5);
    assert!(elapsed >= Duration::from_millis(1_400), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
}

/// Issue 9, item 4: purges of many keys, from two workspaces at once, go out as few calls of at
/// most 30 tags, and the smaller workspace's tags all go in the first call.
#[tokio::test]
async fn purges_by_tag_are_batched_across_keys_with_a_fair_share_per_workspace() {
    let (base, log) = fake_cloudflare().await;
    let batcher = TagBatcher::new(cloudflare_api(&base, RateLimiter::new(1_200, Duration::from_secs(300))));
    let tags = |workspace: &str, n: usize| -> Vec<KeyHash> {
        (0..n).map(|i| KeyHash::of(&format!("{workspace}-{i}"))).collect()
    };
    let (busy, quiet) = (tags("busy", 40), tags("quiet", 5));
    let purges = busy.iter().map(|t| ("busy", t)).chain(quiet.iter().map(|t| ("quiet", t)));
    let results = futures::future::join_all(purges.map(|(w, t)| batcher.purge(w, std::slice::from_ref(t)))).await;
    assert!(results.iter().all(Result::is_ok));
    let calls = log.0.lock().unwrap().clone();
    let sent: Vec<Vec<String>> = calls
        .iter()
        .map(|(_, _, _, body, _)| {
            body["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_owned()).collect()
        })
        .collect();
    assert_eq!(sent.iter().map(Vec::len).collect::<Vec<_>>(), [30, 15], "45 purges in two calls");
    let quiet_hex: Vec<String> = quiet.iter().map(KeyHash::to_hex).collect();
    assert_eq!(sent[0].iter().filter(|t| quiet_hex.contains(t)).count(), 5, "the quiet workspace waits for no one");
}
