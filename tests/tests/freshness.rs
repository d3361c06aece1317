//! How the edge keeps copies confirmed, against real processes: a hot key is confirmed ahead of
//! expiry in the background, so its requests never wait for the authority (beside a region with
//! refresh ahead off, whose requests do); concurrent requests for one key share one
//! confirmation; with tag-only purges, memory trust bounds a revoked hot key by the purge's
//! delay plus memory trust (beside a region whose memory trust is longer than the test, which
//! keeps answering it); and every answer says the version it was decided on and when.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use keyward_shared::internal::{ConfirmCounts, MemoryStats, STATS_PATH};
use keyward_tests::now_ms;
use keyward_tests::world::{Options, PurgeMode, RegionPlan, World};
use reqwest::Method;
use serde_json::{Value, json};

fn stats(world: &World, i: usize) -> MemoryStats {
    static N: AtomicU32 = AtomicU32::new(0);
    let nonce = format!("freshness-stats-{}-{}", now_ms(), N.fetch_add(1, Ordering::SeqCst));
    let (status, text) = world.signed_post(&world.regions[i].spec.url(), STATS_PATH, &json!({}), now_ms(), &nonce);
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).expect("memory stats")
}

fn delta(after: ConfirmCounts, before: ConfirmCounts) -> ConfirmCounts {
    ConfirmCounts {
        waited: after.waited - before.waited,
        ahead: after.ahead - before.ahead,
        shared: after.shared - before.shared,
        overtaken: after.overtaken - before.overtaken,
        unmarked: after.unmarked - before.unmarked,
    }
}

/// Restarts region `i` with `name = value` among its worker variables.
fn restart_with(world: &mut World, i: usize, name: &str, value: &str) {
    world.regions[i].spec.vars.push((name.to_owned(), value.to_owned()));
    world.stop_region(i);
    world.start_region(i).expect("region restarts");
}

/// One verification as the world's caller, as the edge answered it.
struct Answer {
    code: String,
    source: String,
    version: Option<u64>,
    decided_at_ms: Option<u64>,
    sent_ms: u64,
    took: Duration,
}

fn verify(world: &World, i: usize, key: &str) -> Answer {
    let sent_ms = now_ms() as u64;
    let started = Instant::now();
    let (status, answer) = world.edge_verify(i, &world.root_key.clone(), json!({ "key": key }));
    let took = started.elapsed();
    assert_eq!(status, 200, "region {i}: {answer}");
    let text = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    Answer {
        code: text(&answer["code"]),
        source: text(&answer["source"]),
        version: answer["version"].as_u64(),
        decided_at_ms: answer["decided_at_ms"].as_u64(),
        sent_ms,
        took,
    }
}

/// Verifies `key` at region `i` every `every` for `duration`.
fn poll(world: &World, i: usize, key: &str, duration: Duration, every: Duration) -> Vec<Answer> {
    let start = Instant::now();
    let mut answers = Vec::new();
    while start.elapsed() < duration {
        answers.push(verify(world, i, key));
        std::thread::sleep(every);
    }
    answers
}

fn percentile(answers: &[&Answer], q: f64) -> Duration {
    let mut took: Vec<Duration> = answers.iter().map(|a| a.took).collect();
    took.sort();
    took.get(((took.len() as f64 * q).ceil() as usize).clamp(1, took.len().max(1)) - 1).copied().unwrap_or_default()
}

/// Every answer names the version it was decided on, and was decided between its request's
/// sending and its answer's arrival (one machine, one clock).
fn check_stamps(answers: &[Answer], version: u64) {
    for a in answers {
        assert_eq!(a.version, Some(version), "code {} from {}", a.code, a.source);
        let decided = a.decided_at_ms.expect("decided_at_ms");
        let received = a.sent_ms + a.took.as_millis() as u64;
        assert!(
            a.sent_ms <= decided && decided <= received + 1,
            "decided at {decided}, sent {} took {:?}",
            a.sent_ms,
            a.took
        );
    }
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn a_hot_key_is_confirmed_ahead_of_expiry_and_its_requests_never_wait() {
    const MAX_STALENESS_MS: u64 = 1_000;
    const POLL_FOR: Duration = Duration::from_secs(4);
    let mut world = World::start(&[RegionPlan::Up, RegionPlan::Up]).expect("world");
    // r1: refresh ahead off, as the edge was before it: a stale copy waits for its confirmation.
    restart_with(&mut world, 1, "REFRESH_AHEAD_PERCENT", "100");
    let api = world.create_api("refresh-ahead", MAX_STALENESS_MS);
    let (id, key) = world.create_key(&api, json!({}));
    let (status, record) = world.admin(Method::GET, &format!("/v1/keys/{id}"), None);
    assert_eq!(status, 200, "{record}");
    let version = record["version"].as_u64().expect("the key's version");
    world.make_hot(0, &key);
    world.make_hot(1, &key);
    let before = [stats(&world, 0), stats(&world, 1)];
    let (on, off) = std::thread::scope(|scope| {
        let on = scope.spawn(|| poll(&world, 0, &key, POLL_FOR, Duration::from_millis(5)));
        let off = scope.spawn(|| poll(&world, 1, &key, POLL_FOR, Duration::from_millis(5)));
        (on.join().unwrap(), off.join().unwrap())
    });
    let after = [stats(&world, 0), stats(&world, 1)];
    let counts: Vec<ConfirmCounts> =
        (0..2).map(|i| delta(after[i].key_confirmations, before[i].key_confirmations)).collect();
    for (i, answers) in [(0, &on), (1, &off)] {
        let waited: Vec<&Answer> = answers.iter().filter(|a| a.source != "memory").collect();
        let from_memory: Vec<&Answer> = answers.iter().filter(|a| a.source == "memory").collect();
        let c = counts[i];
        println!(
            "r{i} ({}): {} verifications, {} answered after a confirmation (p50 {:?}, p99 {:?}), {} from memory \
             (p50 {:?}, p99 {:?}); authority calls {} waited + {} ahead = {:.1} per 1,000 verifications, {} shared",
            if i == 0 { "refresh ahead, the default" } else { "refresh ahead off" },
            answers.len(),
            waited.len(),
            percentile(&waited, 0.5),
            percentile(&waited, 0.99),
            from_memory.len(),
            percentile(&from_memory, 0.5),
            percentile(&from_memory, 0.99),
            c.waited,
            c.ahead,
            (c.waited + c.ahead) as f64 * 1_000.0 / answers.len() as f64,
            c.shared,
        );
        assert!(answers.iter().all(|a| a.code == "VALID"), "r{i}: every answer VALID");
        check_stamps(answers, version);
    }
    let seconds = POLL_FOR.as_secs();
    // Refresh ahead: no request waited; the copy was confirmed in the background, about once
    // per three quarters of max_staleness_ms, one confirmation at a time.
    assert!(on.iter().all(|a| a.source == "memory"), "r0: a request waited for a confirmation");
    assert_eq!(counts[0].waited, 0, "r0: {:?}", counts[0]);
    assert!((seconds..=2 * seconds + 2).contains(&counts[0].ahead), "r0: {:?}", counts[0]);
    // Refresh ahead off: about once per max_staleness_ms a request waits.
    assert_eq!(counts[1].ahead, 0, "r1: {:?}", counts[1]);
    assert!(counts[1].waited >= seconds - 1, "r1: {:?}", counts[1]);
    assert!(off.iter().filter(|a| a.source != "memory").count() as u64 >= seconds - 1, "r1: no request waited");
    world.assert_no_plaintext();
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn concurrent_requests_for_one_key_share_one_confirmation() {
    const CALLERS: usize = 12;
    let mut world = World::start(&[RegionPlan::Up]).expect("world");
    let api = world.create_api("single-flight", 1_000);
    let (_, warm) = world.create_key(&api, json!({}));
    // The caller's root key is in memory from here on.
    world.make_hot(0, &warm);
    // Rounds until one shows the requests overlapping (some shared a confirmation): requests
    // that arrive after the first confirmation landed are answered from memory and prove nothing.
    let mut overlapped = false;
    for round in 0..8 {
        let (_, key) = world.create_key(&api, json!({}));
        let before = stats(&world, 0);
        let barrier = std::sync::Barrier::new(CALLERS);
        let codes: Vec<String> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..CALLERS)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        verify(&world, 0, &key).code
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert!(codes.iter().all(|c| c == "VALID"), "{codes:?}");
        let c = delta(stats(&world, 0).key_confirmations, before.key_confirmations);
        println!("round {round}: {CALLERS} concurrent first verifications: {c:?}");
        // Without the single flight every request that found no copy asked the authority itself.
        assert_eq!(c.waited, 1, "round {round}: {c:?}");
        if c.shared > 0 {
            overlapped = true;
            break;
        }
    }
    assert!(overlapped, "no round had requests overlapping: the single flight was not exercised");
    world.assert_no_plaintext();
}

/// The tag-only purge's delay in this test (Cloudflare's median for purge-by-tag is 150 ms).
const TAG_DELAY_MS: u64 = 150;
/// The default `MEMORY_TRUST_MS`.
const MEMORY_TRUST_MS: u64 = 100;
/// What polling every 10 ms and scheduling on 2 shared cores add.
const SLACK_MS: u64 = 150;

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn with_tag_only_purges_memory_trust_bounds_a_revoked_hot_key() {
    // max_staleness_ms far longer than the test: only memory trust can end the copy in time.
    const MAX_STALENESS_MS: u64 = 20_000;
    let options = Options { purge_mode: PurgeMode::TagOnly(TAG_DELAY_MS), ..Options::default() };
    let mut world = World::start_opts(&[RegionPlan::Up, RegionPlan::Up], options).expect("world");
    // r1 trusts memory for longer than the test: the control, which keeps answering VALID.
    restart_with(&mut world, 1, "MEMORY_TRUST_MS", "60000");
    let api = world.create_api("memory-trust", MAX_STALENESS_MS);
    let bound = TAG_DELAY_MS + MEMORY_TRUST_MS + SLACK_MS;
    let mut lasts = Vec::new();
    for round in 0..3 {
        let (id, key) = world.create_key(&api, json!({}));
        world.make_hot(0, &key);
        world.make_hot(1, &key);
        // Steady: r0 re-reads the Cache API every MEMORY_TRUST_MS and keeps answering.
        let steady = poll(&world, 0, &key, Duration::from_millis(400), Duration::from_millis(10));
        assert!(steady.iter().all(|a| a.code == "VALID"));
        let created = steady[0].version.expect("version");
        let (status, answer) = world.admin(Method::POST, &format!("/v1/keys/{id}/revoke"), None);
        assert_eq!(status, 200, "{answer}");
        let answered_ms = now_ms() as u64;
        let (r0, r1) = std::thread::scope(|scope| {
            let r0 = scope.spawn(|| poll(&world, 0, &key, Duration::from_millis(1_500), Duration::from_millis(10)));
            let r1 = scope.spawn(|| poll(&world, 1, &key, Duration::from_millis(1_500), Duration::from_millis(10)));
            (r0.join().unwrap(), r1.join().unwrap())
        });
        // Each answer is checked by its own stamp against the moment the revoke answered.
        let last_valid = r0.iter().filter(|a| a.code == "VALID").filter_map(|a| a.decided_at_ms).max();
        let last_ms = last_valid.map(|at| at as i64 - answered_ms as i64);
        let first_revoked = r0.iter().position(|a| a.code == "REVOKED").expect("r0 never answered REVOKED");
        assert!(r0[first_revoked..].iter().all(|a| a.code == "REVOKED"), "r0 answered VALID after REVOKED");
        let revoked_version = r0[first_revoked].version.expect("version");
        assert!(revoked_version > created, "REVOKED decided on v{revoked_version}, created v{created}");
        assert!(r0.iter().all(|a| a.version == Some(if a.code == "VALID" { created } else { revoked_version })));
        let r1_valid = r1.iter().filter(|a| a.code == "VALID").count();
        println!(
            "round {round}: r0 (memory trust {MEMORY_TRUST_MS} ms, tag delay {TAG_DELAY_MS} ms): last VALID {} after \
             the answer (bound {bound} ms); r1 (memory trust 60 s): {r1_valid} of {} answers VALID over 1.5 s",
            last_ms.map_or("never".to_owned(), |ms| format!("{ms} ms")),
            r1.len()
        );
        lasts.push(last_ms.unwrap_or(i64::MIN));
        assert!(last_ms.is_none_or(|ms| ms <= bound as i64), "r0 answered VALID {last_ms:?} ms after the answer");
        // The control: without memory trust, memory answers the revoked key past the bound.
        assert!(
            r1.iter().any(|a| a.code == "VALID" && a.decided_at_ms.unwrap_or(0) > answered_ms + bound),
            "r1 stopped answering VALID within the bound without memory trust"
        );
    }
    println!("last VALID after the answer, per round (ms): {lasts:?}");
    world.assert_no_plaintext();
}

/// Concurrent verifications of a key whose API's `max_staleness_ms` (1 ms) is shorter than a
/// confirmation: each confirmation leaves the copy stale for the requests that waited on it.
/// Those confirm it themselves and are answered `VALID` (they were answered `UNAVAILABLE`
/// while the authority was fine: about half of such a load). With the authority stopped, they
/// still fail closed as soon as the one confirmation they waited on fails: within about one
/// authority deadline (500 ms), not one each.
#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn requests_that_waited_on_a_confirmation_of_an_always_stale_copy_confirm_it_again_unless_it_failed() {
    const CALLERS: usize = 8;
    let world = World::start(&[RegionPlan::Up]).expect("world");
    let api = world.create_api("always-confirmed", 1);
    let (_, key) = world.create_key(&api, json!({}));
    assert_eq!(world.edge_code(0, &key).0, "VALID", "the key's first verification");
    let burst = |root: &str| -> Vec<(u16, String, Duration)> {
        let barrier = std::sync::Barrier::new(CALLERS);
        std::thread::scope(|scope| {
            let threads: Vec<_> = (0..CALLERS)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        let started = Instant::now();
                        let (status, answer) = world.edge_verify(0, root, json!({ "key": key }));
                        let code = answer["code"].as_str().or(answer["error"]["code"].as_str()).unwrap_or("?");
                        (status, code.to_owned(), started.elapsed())
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        })
    };
    let mut shared = 0;
    for round in 0..5 {
        let before = stats(&world, 0).key_confirmations;
        let answers = burst(&world.root_key);
        let c = delta(stats(&world, 0).key_confirmations, before);
        println!("round {round}: {answers:?}; {c:?}");
        assert!(
            answers.iter().all(|(status, code, _)| *status == 200 && code == "VALID"),
            "round {round}: {answers:?}"
        );
        shared += c.shared;
    }
    assert!(shared > 0, "no request waited on another's confirmation: the case was not exercised");

    // A root key confirmed just now, so that its own trust (1 s) outlasts the outage below.
    let (status, root) =
        world.admin(Method::POST, "/v1/root-keys", Some(json!({ "name": "outage", "scopes": ["api.*.verify_key"] })));
    assert_eq!(status, 201, "{root}");
    let root = root["key"].as_str().expect("root key").to_owned();
    world.wait_for("the new root key at the edge", Duration::from_secs(10), || {
        (world.verify_status(0, &root, &key).0 == 200).then_some(())
    });
    world.freeze_home(true);
    let answers = burst(&root);
    world.freeze_home(false);
    println!("authority stopped: {answers:?}");
    assert!(answers.iter().all(|(_, code, _)| code == "UNAVAILABLE"), "{answers:?}");
    let slowest = answers.iter().map(|(_, _, took)| *took).max().unwrap_or_default();
    // One deadline (500 ms) and what 2 shared cores add; two deadlines would be 1,000 ms.
    assert!(slowest < Duration::from_millis(850), "a request waited {slowest:?}: more than one deadline");
}
