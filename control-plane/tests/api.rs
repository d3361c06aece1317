//! The admin API driven in-process (`tower::ServiceExt::oneshot`, no socket) on a real SQLite
//! file, with a recording KV writer: input validation, error shapes, and what reaches KV.

use std::time::Duration;

use axum::body::{Body, BodyDataStream};
use axum::http::{Request, StatusCode};
use keyward_control_plane::config::Config;
use keyward_control_plane::http::{EventSettings, app};
use keyward_control_plane::serve::bootstrap;
use keyward_control_plane::store::Store;
use keyward_shared::{Key, KeyRecord, KeyStatus};
use serde_json::Value;
use support::admin::{Harness, answer, harness};
use tower::ServiceExt;

mod support;

impl Harness {
    /// The ids of `count` new keys of `api`.
    async fn keys(&self, api: &str, count: usize) -> Vec<String> {
        let mut ids = Vec::new();
        for _ in 0..count {
            let (status, created) = self.call_text("POST", "/v1/keys", Some(&format!(r#"{{"api_id":"{api}"}}"#))).await;
            assert_eq!(status, StatusCode::CREATED, "{created}");
            ids.push(created["id"].as_str().unwrap().to_owned());
        }
        ids
    }

    /// Opens `GET /v1/events` with the root key `root`, resuming after `last` when given. The
    /// stream stays open while the response is held.
    async fn subscribe(&self, root: &str, last: Option<i64>) -> axum::response::Response {
        let mut request = Request::builder().uri("/v1/events").header("authorization", format!("Bearer {root}"));
        if let Some(last) = last {
            request = request.header("last-event-id", last.to_string());
        }
        app(self.state.clone()).oneshot(request.body(Body::empty()).unwrap()).await.unwrap()
    }

    /// The KV write of version `version` of `key`'s record, checked to be free of its
    /// plaintext. A tightening change's KV write follows its answer, so this waits for it.
    async fn written(&self, key: &Key, version: u64) -> KeyRecord {
        let kv_key = keyward_shared::kv_key_for_key(&key.hash());
        for _ in 0..1_000 {
            let found = self.kv.0.lock().unwrap().iter().rev().find(|(k, _)| *k == kv_key).cloned();
            if let Some((_, value)) = found {
                assert!(!value.contains(key.expose()), "KV must never hold the plaintext");
                let record = KeyRecord::from_json(&value).unwrap();
                if record.version >= version {
                    assert_eq!(record.version, version, "a later version was written first");
                    return record;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("version {version} of the key never reached KV");
    }
}

fn check(answer: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["error"]["code"], code, "{}", answer.1);
    assert!(answer.1["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", answer.1);
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx() {
    let h = harness(3).await;
    let api = h.api().await;
    let cases: Vec<(&str, String, Option<String>, StatusCode, &str)> = vec![
        ("POST", "/v1/apis".into(), Some("{not json".into()), StatusCode::BAD_REQUEST, "BAD_REQUEST"),
        ("POST", "/v1/apis".into(), Some(r#"{"name":"Bad Name"}"#.into()), StatusCode::BAD_REQUEST, "BAD_REQUEST"),
        ("POST", "/v1/apis".into(), Some(r#"{"name":"payments-live"}"#.into()), StatusCode::CONFLICT, "CONFLICT"),
        (
            "POST",
            "/v1/apis".into(),
            Some(r#"{"name":"x","max_staleness_ms":0}"#.into()),
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
        ),
        (
            "POST",
            "/v1/keys".into(),
            Some(format!(r#"{{"api_id":"{api}","meta":{{"x":"{}"}}}}"#, "a".repeat(70 * 1024))),
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
        ),
        (
            "POST",
            "/v1/keys".into(),
            Some(format!(r#"{{"api_id":"{api}","meta":{{"x":"{}"}}}}"#, "a".repeat(20 * 1024))),
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
        ),
        (
            "POST",
            "/v1/keys/verify".into(),
            Some(format!(r#"{{"key":"{}"}}"#, "a".repeat(5 * 1024))),
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
        ),
        (
            "POST",
            "/v1/keys/verify".into(),
            Some(r#"{"key":"k","extra":1}"#.into()),
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
        ),
        ("GET", "/v1/keys/nope".into(), None, StatusCode::BAD_REQUEST, "INVALID_ID"),
        ("GET", "/v1/keys/key_01ARZ3NDEKTSV4RRFFQ69G5FAV".into(), None, StatusCode::NOT_FOUND, "NOT_FOUND"),
        ("POST", "/v1/keys".into(), Some(r#"{"api_id":"api_x"}"#.into()), StatusCode::BAD_REQUEST, "INVALID_ID"),
        (
            "POST",
            "/v1/keys".into(),
            Some(format!(r#"{{"api_id":"{api}","expires_at":1}}"#)),
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
        ),
        (
            "POST",
            "/v1/keys".into(),
            Some(format!(r#"{{"api_id":"{api}","prefix":"Bad-Prefix"}}"#)),
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
        ),
        (
            "POST",
            "/v1/keys".into(),
            Some(format!(r#"{{"api_id":"{api}","permissions":["has space"]}}"#)),
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
        ),
        ("GET", "/v1/keys".into(), None, StatusCode::BAD_REQUEST, "BAD_REQUEST"),
        ("GET", "/v1/keys?api_id=x".into(), None, StatusCode::BAD_REQUEST, "INVALID_ID"),
        ("GET", format!("/v1/keys?api_id={api}&limit=0"), None, StatusCode::BAD_REQUEST, "BAD_REQUEST"),
        ("GET", format!("/v1/keys?api_id={api}&limit=abc"), None, StatusCode::BAD_REQUEST, "BAD_REQUEST"),
        ("GET", "/v1/keys?start=sk%25".into(), None, StatusCode::BAD_REQUEST, "BAD_REQUEST"),
        (
            "POST",
            "/v1/root-keys".into(),
            Some(r#"{"name":"x","scopes":["api.everything"]}"#.into()),
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
        ),
        ("GET", "/v2/nothing".into(), None, StatusCode::NOT_FOUND, "NOT_FOUND"),
        ("PUT", "/v1/apis".into(), None, StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED"),
    ];
    for (method, path, body, status, code) in &cases {
        let answer = h.call_text(method, path, body.as_deref()).await;
        assert_eq!(
            (answer.0, answer.1["error"]["code"].as_str()),
            (*status, Some(*code)),
            "{method} {path}: {}",
            answer.1
        );
        check(&answer, *status, code);
    }
    let unknown = h.call_text("POST", "/v1/apis", Some(r#"{"name":"x","colour":"red"}"#)).await;
    check(&unknown, StatusCode::BAD_REQUEST, "BAD_REQUEST");
    assert!(unknown.1["error"]["message"].as_str().unwrap().contains("colour"), "{}", unknown.1);
    let no_type = Request::builder()
        .method("POST")
        .uri("/v1/apis")
        .header("authorization", format!("Bearer {}", h.root))
        .body(Body::from(r#"{"name":"x"}"#))
        .unwrap();
    check(&h.send(no_type).await, StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE");
}

#[tokio::test]
async fn every_change_reaches_kv_and_tightening_ones_are_purged() {
    let h = harness(3).await;
    let api = h.api().await;
    let body = format!(r#"{{"api_id":"{api}","permissions":["a","b"]}}"#);
    let (status, created) = h.call_text("POST", "/v1/keys", Some(&body)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap();
    let key = Key::parse(created["key"].as_str().unwrap()).unwrap();
    assert_eq!(created["start"], key.start());
    assert!(created["regions"][0].get("acknowledged").is_none(), "creating is not tightening: {created}");
    h.written(&key, 1).await;

    // Adding a permission loosens: written, not purged.
    let (_, patched) = h.call_text("PATCH", &format!("/v1/keys/{id}"), Some(r#"{"permissions":["a","b","c"]}"#)).await;
    assert!(patched["regions"][0].get("acknowledged").is_none(), "{patched}");
    h.written(&key, 2).await;
    // Removing one tightens: purged (and this region is unreachable, so not acknowledged).
    let (_, patched) = h.call_text("PATCH", &format!("/v1/keys/{id}"), Some(r#"{"permissions":["a"]}"#)).await;
    assert_eq!(patched["regions"][0]["acknowledged"], false, "{patched}");
    assert_eq!(h.written(&key, 3).await.permissions, vec!["a".to_owned()]);
    // A past expiry means "expire now".
    let before = keyward_control_plane::time::now_ms();
    let (_, patched) = h.call_text("PATCH", &format!("/v1/keys/{id}"), Some(r#"{"expires_at":5}"#)).await;
    assert!(patched["key"]["expires_at"].as_i64().unwrap() >= before, "{patched}");
    let verify = format!(r#"{{"key":"{}"}}"#, key.expose());
    let (_, verified) = h.call_text("POST", "/v1/keys/verify", Some(&verify)).await;
    assert_eq!(verified["code"], "EXPIRED", "{verified}");
    assert_eq!(verified["source"], "origin");

    let (status, revoked) = h.call_text("POST", &format!("/v1/keys/{id}/revoke"), None).await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert_eq!(revoked["regions"][0]["acknowledged"], false);
    assert_eq!(revoked["regions"][0]["kv"], "pending", "a tightening change's KV write follows the answer");
    let tombstone = h.written(&key, 5).await;
    assert_eq!(tombstone.status, KeyStatus::Revoked);
    assert_eq!(tombstone.version, 5);
    // A revoked key cannot be changed back.
    let reenable = h.call_text("PATCH", &format!("/v1/keys/{id}"), Some(r#"{"enabled":true}"#)).await;
    check(&reenable, StatusCode::CONFLICT, "CONFLICT");
    // Revoking again changes nothing but purges again.
    let (_, again) = h.call_text("POST", &format!("/v1/keys/{id}/revoke"), None).await;
    assert_eq!(again["version"], 5);
    assert!(again["regions"][0].get("acknowledged").is_some(), "{again}");
    let (status, _) = h.call_text("DELETE", &format!("/v1/keys/{id}"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h.written(&key, 6).await.status, KeyStatus::Deleted);
    check(&h.call_text("GET", &format!("/v1/keys/{id}"), None).await, StatusCode::NOT_FOUND, "NOT_FOUND");
}

#[tokio::test]
async fn bootstrap_is_idempotent_and_stores_only_hashes() {
    let h = harness(3).await;
    let other = Key::generate("kw_root", [4; 32]).unwrap();
    bootstrap(&h.state.store, Some(other.expose().to_owned())).await.unwrap();
    assert_eq!(h.state.store.workspace_count().await.unwrap(), 1);
    let roots = h.state.store.root_keys().await.unwrap();
    assert_eq!(roots.len(), 1);
    assert_eq!(roots[0].hash, Key::parse(&h.root).unwrap().hash());
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("x.sqlite")).await.unwrap();
    let err = bootstrap(&store, Some("kw_root_oops".into())).await.unwrap_err();
    assert!(format!("{err:#}").contains("KEYWARD_ROOT_KEY"), "{err:#}");
}

/// One server-sent event: its name, its id if it has one, and its data.
#[derive(Debug)]
struct Frame {
    event: String,
    id: Option<i64>,
    data: Value,
}

/// Reads server-sent events from a response body until `count` events with an id have arrived,
/// the stream ends, or `within` has passed; answers the events and whether the stream ended.
async fn read_frames(body: &mut BodyDataStream, count: usize, within: Duration) -> (Vec<Frame>, bool) {
    use futures::StreamExt;
    let mut text = String::new();
    let mut frames: Vec<Frame> = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while frames.iter().filter(|f| f.id.is_some()).count() < count {
        let chunk = match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(chunk)) => chunk.unwrap(),
            Ok(None) => return (frames, true),
            Err(_) => return (frames, false),
        };
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = text.find("\n\n") {
            let frame: String = text.drain(..end + 2).collect();
            let field = |name: &str| frame.lines().find_map(|l| l.strip_prefix(name).map(str::to_owned));
            if let (Some(event), Some(data)) = (field("event: "), field("data: ")) {
                let id = field("id: ").map(|id| id.parse().unwrap());
                frames.push(Frame { event, id, data: serde_json::from_str(&data).unwrap() });
            }
        }
    }
    (frames, false)
}

/// Reads server-sent events from a response body until `count` have arrived (5 s at most).
async fn read_events(response: axum::response::Response, count: usize) -> Vec<(i64, Value)> {
    let mut body = response.into_body().into_data_stream();
    let (frames, _) = read_frames(&mut body, count, Duration::from_secs(5)).await;
    let events: Vec<(i64, Value)> = frames.into_iter().filter_map(|f| Some((f.id?, f.data))).collect();
    assert_eq!(events.len(), count, "events in time: {events:?}");
    events
}

#[tokio::test]
async fn the_event_stream_resumes_without_missing_anything() {
    let h = harness(3).await;
    let api = h.api().await;
    let ids = h.keys(&api, 3).await;
    h.call_text("POST", &format!("/v1/keys/{}/revoke", ids[0]), None).await;
    // Renaming loosens nothing: no event.
    h.call_text("PATCH", &format!("/v1/keys/{}", ids[2]), Some(r#"{"name":"renamed"}"#)).await;
    h.call_text("PATCH", &format!("/v1/keys/{}", ids[1]), Some(r#"{"enabled":false}"#)).await;

    let events = read_events(h.subscribe(&h.root, None).await, 2).await;
    assert_eq!(events[0].1["key_id"], ids[0].as_str());
    assert_eq!(events[0].1["status"], "revoked");
    assert_eq!(events[1].1["key_id"], ids[1].as_str());
    assert_eq!(events[1].1["enabled"], false);
    assert!(events[0].0 < events[1].0);
    // The key view never shows a key's hash, and neither do events.
    assert!(events.iter().all(|(_, e)| e.get("hash").is_none()), "{events:?}");

    // While nobody listens, a key is deleted; a subscriber resuming after the last event it saw
    // gets exactly that one, and then live events as they commit.
    h.call_text("DELETE", &format!("/v1/keys/{}", ids[2]), None).await;
    let resumed = h.subscribe(&h.root, Some(events[1].0)).await;
    let live = async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        h.call_text("DELETE", &format!("/v1/keys/{}", ids[0]), None).await;
    };
    let (events, _) = tokio::join!(read_events(resumed, 2), live);
    assert_eq!(events[0].1["key_id"], ids[2].as_str());
    assert_eq!(events[0].1["status"], "deleted");
    assert_eq!(events[1].1["key_id"], ids[0].as_str());
    assert_eq!(events[1].1["status"], "deleted");

    let bad = Request::builder()
        .uri("/v1/events")
        .header("authorization", format!("Bearer {}", h.root))
        .header("last-event-id", "yesterday")
        .body(Body::empty())
        .unwrap();
    check(&h.send(bad).await, StatusCode::BAD_REQUEST, "BAD_REQUEST");
}

#[tokio::test]
async fn an_event_stream_ends_when_its_root_key_is_revoked() {
    let h = harness(3).await;
    let api = h.api().await;
    let ids = h.keys(&api, 2).await;
    let (reader_id, reader) = h.root_key(&["api.*.read_key"]).await;
    let stream = h.subscribe(&reader, None).await;
    assert_eq!(stream.status(), StatusCode::OK);
    let mut stream = stream.into_body().into_data_stream();
    let h = &h;
    let disable = |id: &str| {
        let path = format!("/v1/keys/{id}");
        async move { h.call_text("PATCH", &path, Some(r#"{"enabled":false}"#)).await }
    };

    // The stream is live: it sees the first key disabled. Then its root key is revoked, and the
    // second key is disabled.
    disable(&ids[0]).await;
    let (frames, _) = read_frames(&mut stream, 1, Duration::from_secs(5)).await;
    assert_eq!(frames[0].data["key_id"], ids[0].as_str(), "{frames:?}");
    let (status, revoked) = h.call_text("POST", &format!("/v1/root-keys/{reader_id}/revoke"), None).await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    disable(&ids[1]).await;

    let (frames, ended) = read_frames(&mut stream, 1, Duration::from_secs(3)).await;
    assert!(frames.iter().all(|f| f.event != "tightened"), "a revoked root key still receives events: {frames:?}");
    assert!(ended, "the stream of a revoked root key stays open: {frames:?}");
    let closed = frames.last().expect("a last event says why the stream closed");
    assert_eq!((closed.event.as_str(), &closed.data["code"]), ("closed", &Value::from("UNAUTHORIZED")), "{closed:?}");
    // And it cannot open another.
    let again = answer(h.subscribe(&reader, None).await).await;
    check(&again, StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
}

#[tokio::test]
async fn event_streams_are_limited_per_root_key_and_per_workspace() {
    let defaults = EventSettings::default();
    let (per_root_key, per_workspace) = (defaults.max_streams_per_root_key, defaults.max_streams_per_workspace);
    assert_eq!((per_root_key, per_workspace), (4, 32), "the documented defaults");
    let h = harness(3).await;
    let mut open = Vec::new();
    for _ in 0..per_root_key {
        open.push(h.subscribe(&h.root, None).await);
        assert_eq!(open.last().unwrap().status(), StatusCode::OK);
    }
    let refused = h.subscribe(&h.root, None).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS, "a fifth stream of one root key is open");
    let refused = answer(refused).await;
    check(&refused, StatusCode::TOO_MANY_REQUESTS, "TOO_MANY_STREAMS");
    assert!(refused.1["error"]["message"].as_str().unwrap().contains("root key"), "{}", refused.1);
    // A stream that closes gives its place back.
    open.pop();
    open.push(h.subscribe(&h.root, None).await);
    assert_eq!(open.last().unwrap().status(), StatusCode::OK);

    // Other root keys of the workspace fill it up to its own limit.
    while open.len() < per_workspace {
        let (_, reader) = h.root_key(&["api.*.read_key"]).await;
        for _ in 0..per_root_key.min(per_workspace - open.len()) {
            open.push(h.subscribe(&reader, None).await);
            assert_eq!(open.last().unwrap().status(), StatusCode::OK);
        }
    }
    let (_, late) = h.root_key(&["api.*.read_key"]).await;
    let refused = h.subscribe(&late, None).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS, "a workspace's 33rd stream is open");
    let refused = answer(refused).await;
    check(&refused, StatusCode::TOO_MANY_REQUESTS, "TOO_MANY_STREAMS");
    assert!(refused.1["error"]["message"].as_str().unwrap().contains("workspace"), "{}", refused.1);
    drop(open);
    assert_eq!(h.subscribe(&late, None).await.status(), StatusCode::OK);
}

/// Issue 9, item 1: the stream limits are the `[events]` section's: with 1 per root key, a
/// root key's second stream is refused, and with 1 per workspace, another root key's is too.
#[tokio::test]
async fn event_stream_limits_follow_the_configuration() {
    let mut h = harness(3).await;
    let config =
        Config::parse("[events]\nmax_streams_per_root_key = 1\nmax_streams_per_workspace = 2\n", |_| None).unwrap();
    h.state = h.state.with_event_limits(config.events);
    let first = h.subscribe(&h.root, None).await;
    assert_eq!(first.status(), StatusCode::OK);
    let refused = answer(h.subscribe(&h.root, None).await).await;
    check(&refused, StatusCode::TOO_MANY_REQUESTS, "TOO_MANY_STREAMS");
    assert!(refused.1["error"]["message"].as_str().unwrap().contains("has 1 event streams open"), "{}", refused.1);
    let (_, reader) = h.root_key(&["api.*.read_key"]).await;
    let second = h.subscribe(&reader, None).await;
    assert_eq!(second.status(), StatusCode::OK, "another root key of the workspace has a place");
    let (_, late) = h.root_key(&["api.*.read_key"]).await;
    let refused = answer(h.subscribe(&late, None).await).await;
    check(&refused, StatusCode::TOO_MANY_REQUESTS, "TOO_MANY_STREAMS");
    assert!(refused.1["error"]["message"].as_str().unwrap().contains("workspace"), "{}", refused.1);
    drop(first);
    assert_eq!(h.subscribe(&h.root, None).await.status(), StatusCode::OK, "a closed stream gives its place back");

    for zero in ["max_streams_per_root_key = 0", "max_streams_per_workspace = 0"] {
        let err = Config::parse(&format!("[events]\n{zero}\n"), |_| None).unwrap_err();
        assert!(format!("{err:#}").contains("at least 1"), "{err:#}");
    }
}

#[tokio::test]
async fn listing_keys_needs_read_access_and_its_cursor_shows_nothing_else() {
    let h = harness(3).await;
    let hidden_api = h.api().await;
    let (_, api) = h.call_text("POST", "/v1/apis", Some(r#"{"name":"payments-eu","prefix":"sk_live"}"#)).await;
    let shown_api = api["id"].as_str().unwrap().to_owned();
    // Keys of both APIs, interleaved in id order, all starting `sk_live_`.
    let (mut hidden, mut shown) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        hidden.extend(h.keys(&hidden_api, 1).await);
        shown.extend(h.keys(&shown_api, 1).await);
    }

    // A root key that may read no API's keys cannot list or search them at all.
    let (_, verifier) = h.root_key(&[&format!("api.{shown_api}.verify_key")]).await;
    let searched = h.call_text_as(&verifier, "GET", "/v1/keys?start=sk_live&limit=1", None).await;
    check(&searched, StatusCode::FORBIDDEN, "FORBIDDEN");

    // One that may read one API pages through its keys alone, and no cursor names another's.
    let (_, reader) = h.root_key(&[&format!("api.{shown_api}.read_key")]).await;
    let (mut seen, mut cursors, mut cursor) = (Vec::new(), Vec::new(), None::<String>);
    loop {
        let after = cursor.as_ref().map(|c| format!("&cursor={c}")).unwrap_or_default();
        let (status, page) =
            h.call_text_as(&reader, "GET", &format!("/v1/keys?start=sk_live&limit=1{after}"), None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(page["keys"].as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap().to_owned()));
        cursor = page["cursor"].as_str().map(str::to_owned);
        cursors.extend(cursor.clone());
        if cursor.is_none() || seen.len() > 10 {
            break;
        }
    }
    // Ids made in the same millisecond are not in the order they were made.
    shown.sort();
    assert_eq!(seen, shown);
    assert!(cursors.iter().all(|c| shown.contains(c)), "a cursor names a key the reader may not see: {cursors:?}");
    let other = h.call_text_as(&reader, "GET", &format!("/v1/keys?api_id={hidden_api}&limit=1"), None).await;
    check(&other, StatusCode::FORBIDDEN, "FORBIDDEN");
}

#[tokio::test]
async fn a_verify_request_may_ask_for_a_bounded_number_of_permissions() {
    use keyward_shared::verify::MAX_REQUESTED_PERMISSIONS;
    let h = harness(3).await;
    let api = h.api().await;
    let (_, created) =
        h.call_text("POST", "/v1/keys", Some(&format!(r#"{{"api_id":"{api}","permissions":["p0"]}}"#))).await;
    let key = created["key"].as_str().unwrap();
    let asking = |n: usize| {
        let permissions: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
        serde_json::json!({ "key": key, "permissions": permissions }).to_string()
    };
    let (status, at_limit) = h.call_text("POST", "/v1/keys/verify", Some(&asking(MAX_REQUESTED_PERMISSIONS))).await;
    assert_eq!(status, StatusCode::OK, "{at_limit}");
    assert_eq!(at_limit["code"], "INSUFFICIENT_PERMISSIONS", "{at_limit}");
    let beyond = h.call_text("POST", "/v1/keys/verify", Some(&asking(MAX_REQUESTED_PERMISSIONS + 1))).await;
    check(&beyond, StatusCode::BAD_REQUEST, "BAD_REQUEST");
    let message = beyond.1["error"]["message"].as_str().unwrap();
    assert!(message.contains(&format!("at most {MAX_REQUESTED_PERMISSIONS} permissions")), "{message}");
}

/// A named cost a limit can never grant at once (above its burst + 1) is a bad request, not a
/// `RATE_LIMITED` that would say "retry soon" forever; so is a cost past the largest limit.
#[tokio::test]
async fn a_verify_request_may_not_name_a_cost_its_limit_cannot_grant_nor_more_credits_than_any_cost() {
    let h = harness(3).await;
    let api = h.api().await;
    let body =
        serde_json::json!({ "api_id": api, "ratelimits": [{ "name": "api", "limit": 50, "duration_ms": 10_000 }] });
    let (status, created) = h.call_text("POST", "/v1/keys", Some(&body.to_string())).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap();
    let asking =
        |cost: u64| serde_json::json!({ "key": key, "ratelimits": [{ "name": "api", "cost": cost }] }).to_string();
    let refused = h.call_text("POST", "/v1/keys/verify", Some(&asking(5))).await;
    check(&refused, StatusCode::BAD_REQUEST, "BAD_REQUEST");
    let message = refused.1["error"]["message"].as_str().unwrap();
    assert!(message.contains("grants at most 2 at once"), "{message}");
    let huge = h.call_text("POST", "/v1/keys/verify", Some(&asking(u64::MAX))).await;
    check(&huge, StatusCode::BAD_REQUEST, "BAD_REQUEST");
    let credits = serde_json::json!({ "key": key, "cost": 1_000_000_001u64 }).to_string();
    let refused = h.call_text("POST", "/v1/keys/verify", Some(&credits)).await;
    check(&refused, StatusCode::BAD_REQUEST, "BAD_REQUEST");
    let message = refused.1["error"]["message"].as_str().unwrap();
    assert!(message.contains("cost is 0 to 1000000000"), "{message}");
    let limit = serde_json::json!({ "api_id": api, "ratelimits": [{ "name": "x", "limit": 2_000_000_000u64, "duration_ms": 1_000 }] });
    let too_big = h.call_text("POST", "/v1/keys", Some(&limit.to_string())).await;
    check(&too_big, StatusCode::BAD_REQUEST, "BAD_REQUEST");
}

#[tokio::test]
async fn answers_to_changes_keep_their_shape() {
    let h = harness(3).await;
    let api = h.api().await;
    let fields = |value: &Value| value.as_object().unwrap().keys().cloned().collect::<Vec<_>>().join(",");
    let (_, created) = h.call_text("POST", "/v1/keys", Some(&format!(r#"{{"api_id":"{api}"}}"#))).await;
    // No authority is configured: `authority` is there, and null.
    assert_eq!(fields(&created), "api_id,authority,id,key,regions,start");
    assert!(created["authority"].is_null());
    let id = created["id"].as_str().unwrap();
    let (_, read) = h.call_text("GET", &format!("/v1/keys/{id}"), None).await;
    let view = "api_id,created_at,enabled,expires_at,id,max_staleness_ms,meta,name,owner_id,permissions,start,status,\
                updated_at,version,workspace_id";
    assert_eq!(fields(&read), view);
    assert!(read["name"].is_null() && read["owner_id"].is_null() && read.get("hash").is_none(), "{read}");
    let (_, listed) = h.call_text("GET", &format!("/v1/keys?api_id={api}"), None).await;
    assert_eq!(fields(&listed), "cursor,keys");
    assert_eq!(fields(&listed["keys"][0]), view);
    let (_, updated) = h.call_text("PATCH", &format!("/v1/keys/{id}"), Some(r#"{"name":"n"}"#)).await;
    assert_eq!(fields(&updated), "authority,key,regions");
    let (_, deleted) = h.call_text("DELETE", &format!("/v1/keys/{id}"), None).await;
    assert_eq!(fields(&deleted), "authority,id,note,regions,status,version");

    let (status, workspace) = h.call_text("POST", "/v1/workspaces", Some(r#"{"name":"tenant"}"#)).await;
    assert_eq!(status, StatusCode::CREATED, "{workspace}");
    assert_eq!(fields(&workspace), "id,name,regions,root_key");
    assert_eq!(fields(&workspace["root_key"]), "id,key,scopes,start");
    assert_eq!(workspace["regions"][0]["kv"], "written", "the first root key may verify: {workspace}");
    let body = r#"{"name":"reader","scopes":["api.read"]}"#;
    let (status, root) = h.call_text("POST", "/v1/root-keys", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{root}");
    assert_eq!(fields(&root), "id,key,regions,scopes,start");
    assert_eq!(root["regions"], serde_json::json!([]), "a root key that cannot verify is not written to KV");
    let (_, listed) = h.call_text("GET", "/v1/root-keys", None).await;
    assert_eq!(fields(&listed["root_keys"][1]), "id,name,scopes,start,status,updated_at");
    assert_eq!(listed["root_keys"][1]["name"], "reader");
    let root_id = root["id"].as_str().unwrap();
    let (_, revoked) = h.call_text("POST", &format!("/v1/root-keys/{root_id}/revoke"), None).await;
    assert_eq!(fields(&revoked), "authority,id,regions,status");
    assert_eq!(revoked["status"], "revoked");
    let (_, apis) = h.call_text("GET", "/v1/apis", None).await;
    assert_eq!(fields(&apis["apis"][0]), "created_at,id,max_staleness_ms,name,prefix,workspace_id");
    let (_, health) = h.call_text("GET", "/health", None).await;
    assert_eq!(health, serde_json::json!({ "status": "ok" }));
}
