//! Identities with real processes (the home's KeyState objects, the control plane, regions):
//! two keys of one identity hammered from three regions share its exact limit (never more than
//! the limit in any sliding window, by `decided_at_ms`) and its credit balance exactly (the
//! `VALID` answers of both keys together equal the balance); a revoked key of the identity
//! spends none of it; a key's own limit and its identity's both apply; and a verification
//! refused by any of the key's and the identity's limits and credits spends nothing on the
//! others, with an idempotency key too (settled at the identity's authority first, given back
//! when the key's refuses). Identities and attachments are made with the `keyward` CLI.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keyward_shared::internal::{MemoryStats, STATS_PATH};
use keyward_tests::now_ms;
use keyward_tests::windows::{valid_times, window_extremes};
use keyward_tests::world::{RegionPlan, World};
use reqwest::Method;
use serde_json::{Value, json};

const THREE: [RegionPlan; 3] = [RegionPlan::Up, RegionPlan::Up, RegionPlan::Up];
/// Longer than a credit lease's time to live (`keyward_shared::credits::LEASE_TTL_MS`, 2 s).
const LEASES_EXPIRED: Duration = Duration::from_millis(2_300);

/// What region `base`'s isolate counted (the signed stats route).
fn stats(world: &World, base: &str) -> MemoryStats {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nonce = format!("identity-stats-{}-{}", now_ms(), N.fetch_add(1, Ordering::SeqCst));
    let (status, text) = world.signed_post(base, STATS_PATH, &json!({}), now_ms(), &nonce);
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).expect("memory stats")
}

/// Held by every test of this file for its whole run: the limit's floor is measured with no
/// other world of this file loading the 2 cores.
static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ALONE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One verification at region `region`: its code (`ERROR` for no answer) and answer.
fn verify(world: &World, region: usize, body: &Value) -> (String, Value) {
    let (status, answer) = world.edge_verify(region, &world.root_key, body.clone());
    if status != 200 {
        return ("ERROR".into(), json!({ "status": status, "region": region, "answer": answer }));
    }
    (answer["code"].as_str().unwrap_or("?").to_owned(), answer)
}

fn code(world: &World, region: usize, key: &str) -> String {
    verify(world, region, &json!({ "key": key })).0
}

fn tally(answers: &[(String, Value)]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for (code, _) in answers {
        *counts.entry(code.clone()).or_insert(0) += 1;
    }
    counts
}

fn valid(answers: &[(String, Value)]) -> usize {
    answers.iter().filter(|(code, _)| code == "VALID").count()
}

/// An identity made with `keyward identities create` and these flags; answers its id.
fn identity(world: &World, flags: &[&str]) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let external = format!("acct-{}-{}", now_ms(), N.fetch_add(1, Ordering::SeqCst));
    let mut args = vec!["--json", "identities", "create", "--external-id", &external];
    args.extend_from_slice(flags);
    let answer: Value = serde_json::from_str(&world.cli(&args)).expect("the CLI's JSON");
    answer["identity"]["id"].as_str().expect("identity id").to_owned()
}

/// A key of a new API (1 s `max_staleness_ms`) attached to `identity` with `keyward keys
/// create --identity`, with these extra flags; answers (id, plaintext).
fn key_of(world: &World, identity: &str, flags: &[&str]) -> (String, String) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let api = world.create_api(&format!("identities-{}", N.fetch_add(1, Ordering::SeqCst)), 1_000);
    let mut args = vec!["--json", "keys", "create", "--api-id", &api, "--identity", identity];
    args.extend_from_slice(flags);
    let answer: Value = serde_json::from_str(&world.cli(&args)).expect("the CLI's JSON");
    let (id, key) = (answer["id"].as_str().expect("id"), answer["key"].as_str().expect("key"));
    world.remember(key);
    (id.to_owned(), key.to_owned())
}

/// `count` verifications spread over `keys` and `regions` by `threads` callers at once (each
/// keeps one in flight); answers every (code, answer), the answer naming its key's index as
/// `"which"`.
fn burst(world: &World, keys: &[&str], regions: &[usize], count: usize, threads: usize) -> Vec<(String, Value)> {
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let callers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut seen = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= count {
                            return seen;
                        }
                        let which = i % keys.len();
                        let (code, mut answer) =
                            verify(world, regions[i % regions.len()], &json!({ "key": keys[which] }));
                        answer["which"] = json!(which);
                        seen.push((code, answer));
                    }
                })
            })
            .collect();
        callers.into_iter().flat_map(|c| c.join().expect("caller")).collect()
    })
}

/// Verifications of `keys` (alternating) by `threads` callers, regions cycling, until `until`.
fn hammer(world: &World, keys: &[&str], threads: usize, until: Instant) -> Vec<(String, Value)> {
    std::thread::scope(|scope| {
        let callers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut seen = Vec::new();
                    let mut i = t;
                    while Instant::now() < until {
                        let which = i % keys.len();
                        let (code, mut answer) = verify(world, i % 3, &json!({ "key": keys[which] }));
                        answer["which"] = json!(which);
                        seen.push((code, answer));
                        i += 1;
                    }
                    seen
                })
            })
            .collect();
        callers.into_iter().flat_map(|c| c.join().expect("caller")).collect()
    })
}

/// How many `VALID` answers each key (by `"which"`) got.
fn valid_by_key(answers: &[(String, Value)], keys: usize) -> Vec<usize> {
    (0..keys).map(|k| answers.iter().filter(|(code, a)| code == "VALID" && a["which"] == json!(k)).count()).collect()
}

/// What remains of an identity's credits, by its authority (`GET /v1/identities/{id}/credits`).
fn remaining(world: &World, identity: &str) -> u64 {
    let (status, view) = world.admin(Method::GET, &format!("/v1/identities/{identity}/credits"), None);
    assert_eq!(status, 200, "{view}");
    view["remaining"].as_u64().unwrap_or_else(|| panic!("no remaining: {view}"))
}

/// Spends the balance of 100 through two keys from three regions: a burst of 600 (60 in
/// flight), then, once the leases expired, rounds of 200 until it is spent; answers every VALID
/// per key. Never more than 100 together at any point.
fn spend_the_balance(world: &World, keys: &[&str]) -> Vec<usize> {
    let answers = burst(world, keys, &[0, 1, 2], 600, 60);
    let mut per_key = valid_by_key(&answers, keys.len());
    println!("two keys, balance 100, 600 at once over 3 regions: {:?}, VALID per key {per_key:?}", tally(&answers));
    // Fail closed (`UNAVAILABLE`: the authority slower than its deadline) and no answer are
    // counted in the tally; nothing else may answer.
    for (code, answer) in &answers {
        assert!(matches!(code.as_str(), "VALID" | "USAGE_EXCEEDED" | "UNAVAILABLE" | "ERROR"), "{code}: {answer}");
    }
    for _ in 0..3 {
        assert!(per_key.iter().sum::<usize>() <= 100, "{per_key:?} VALID against a shared balance of 100");
        if per_key.iter().sum::<usize>() == 100 {
            break;
        }
        std::thread::sleep(LEASES_EXPIRED);
        let more = burst(world, keys, &[0, 1, 2], 200, 20);
        per_key = per_key.iter().zip(valid_by_key(&more, keys.len())).map(|(a, b)| a + b).collect();
        println!("after the leases expired: {:?}, VALID per key {per_key:?}", tally(&more));
    }
    per_key
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn two_keys_of_one_identity_share_its_limit_and_its_balance_exactly_from_three_regions() {
    let _alone = alone();
    let started = Instant::now();
    let mut world = World::start(&THREE).expect("world");

    // The balance: 100 credits of the identity, none of the keys'.
    let shared = identity(&world, &["--credits", "100"]);
    let (_, one) = key_of(&world, &shared, &[]);
    let (_, two) = key_of(&world, &shared, &[]);
    assert_eq!(remaining(&world, &shared), 100, "the identity's authority holds the balance");
    let per_key = spend_the_balance(&world, &[&one, &two]);
    assert_eq!(per_key.iter().sum::<usize>(), 100, "both keys together spend the balance exactly: {per_key:?}");
    assert!(per_key.iter().all(|n| *n > 0), "both keys spent of it: {per_key:?}");
    // Past the holders' 250 ms memory of "not enough", one more in each region asks the
    // authority, reporting every lease spent: nothing is left, by its account too.
    std::thread::sleep(Duration::from_millis(300));
    for region in 0..3 {
        assert_eq!(code(&world, region, &one), "USAGE_EXCEEDED", "region {region}");
    }
    assert_eq!(remaining(&world, &shared), 0, "the identity's authority says it is spent");

    // The limit: 20 per 4 s of the identity, none of the keys', hammered for 12 s.
    let limited = identity(&world, &["--ratelimit", "api=20/4s"]);
    let (_, three) = key_of(&world, &limited, &[]);
    let (_, four) = key_of(&world, &limited, &[]);
    let from = now_ms();
    let answers = hammer(&world, &[&three, &four], 24, Instant::now() + Duration::from_secs(12));
    let to = now_ms();
    let times = valid_times(&answers);
    let (most, _) = window_extremes(&times, from - 4_000, to, 4_000);
    let (_, fewest) = window_extremes(&times, from + 1_000, to - 4_000, 4_000);
    let per_key = valid_by_key(&answers, 2);
    println!(
        "two keys, limit 20 per 4 s, 24 in flight over 3 regions for 12 s: {:?}; VALID per key {per_key:?}; \
         most in any 4 s window {most}, fewest in a steady one {fewest}",
        tally(&answers)
    );
    assert!(most <= 20, "{most} VALID in one 4 s window against the identity's limit of 20");
    assert!(fewest >= 10, "only {fewest} VALID in a steady 4 s window: the shared limit barely admits");
    assert!(per_key.iter().all(|n| *n > 0), "both keys were admitted: {per_key:?}");
    let unanswered = answers.iter().filter(|(code, _)| !matches!(code.as_str(), "VALID" | "RATE_LIMITED")).count();
    assert!(unanswered * 100 <= answers.len(), "{unanswered} answers neither VALID nor RATE_LIMITED");

    // A revoked key of the identity spends nothing: 10 credits, one key revoked before it
    // spends, hammered from every region; the other key then spends all 10.
    let ten = identity(&world, &["--credits", "10"]);
    let (revoked_id, revoked) = key_of(&world, &ten, &[]);
    let (_, live) = key_of(&world, &ten, &[]);
    world.cli(&["--json", "keys", "revoke", &revoked_id]);
    let answers = burst(&world, &[&revoked], &[0, 1, 2], 150, 15);
    println!("revoked key of the identity, 150 at once: {:?}", tally(&answers));
    assert!(answers.iter().all(|(code, _)| matches!(code.as_str(), "REVOKED" | "ERROR")), "{:?}", tally(&answers));
    assert!(tally(&answers).get("REVOKED").is_some_and(|n| *n >= 145), "{:?}", tally(&answers));
    let answers: Vec<_> = (0..12).map(|i| verify(&world, i % 3, &json!({ "key": live }))).collect();
    let mut spent = valid(&answers);
    if spent < 10 {
        // Leases other regions hold come back once expired.
        std::thread::sleep(LEASES_EXPIRED);
        spent += valid(&burst(&world, &[&live], &[0, 1, 2], 30, 3));
    }
    println!("the live key then: {spent} VALID of 10");
    assert_eq!(spent, 10, "the revoked key spent {} of the identity's 10 credits", 10 - spent.min(10));
    world.assert_no_plaintext();
    println!("took {:?}", started.elapsed());
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn a_keys_own_limits_and_credits_and_its_identitys_all_apply_all_or_nothing() {
    let _alone = alone();
    let world = World::start(&[RegionPlan::Up]).expect("world");
    let verify0 = |key: &str| verify(&world, 0, &json!({ "key": key }));

    // The identity's limit refuses: no key credit is spent. 2 per second (two at once, then
    // one every 1.25 s), the key's 3 credits: the two at once, and one more once a token falls
    // due, only if the RATE_LIMITED verifications between them spent none.
    let two_a_second = identity(&world, &["--ratelimit", "api=2/1s"]);
    let (_, key) = key_of(&world, &two_a_second, &["--credits", "3"]);
    let answers: Vec<_> = (0..6).map(|_| verify0(&key)).collect();
    let codes: Vec<&str> = answers.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(codes, ["VALID", "VALID", "RATE_LIMITED", "RATE_LIMITED", "RATE_LIMITED", "RATE_LIMITED"]);
    let retry = answers[5].1["ratelimits"][0]["retry_after_ms"].as_u64().expect("retry_after_ms");
    std::thread::sleep(Duration::from_millis(retry + 20));
    let (code, third) = verify0(&key);
    assert_eq!(code, "VALID", "the identity's RATE_LIMITED spent the key's credits: {third}");
    std::thread::sleep(Duration::from_millis(1_300));
    assert_eq!(verify0(&key).0, "USAGE_EXCEEDED", "3 credits of the key, 3 VALID");

    // The key's own limit and its identity's both apply, and a verification the identity's
    // limit refuses puts the key's token back. The identity: 2 per 10 s (two at once); the
    // key: 2 per 60 s (two at once, 2 s shares). The other key takes one of the identity's;
    // the key takes its first and the identity's second; then the identity refuses, twice.
    let two = identity(&world, &["--ratelimit", "api=2/10s"]);
    let (_, own) = key_of(&world, &two, &["--ratelimit", "api=2/60s"]);
    let (_, other) = key_of(&world, &two, &[]);
    assert_eq!(verify0(&other).0, "VALID");
    let codes: Vec<String> = (0..3).map(|_| verify0(&own).0).collect();
    assert_eq!(codes, ["VALID", "RATE_LIMITED", "RATE_LIMITED"], "the identity's limit, shared");
    assert_eq!(verify0(&other).0, "RATE_LIMITED", "the identity's two are spent");
    // Raised over another duration (a tightening change by the rules, purged at once, and a
    // schedule that starts again empty): the key has its second token only if the refused
    // verifications put it back.
    world.cli(&["--json", "identities", "update", &two, "--ratelimit", "api=100/5s"]);
    let answers: Vec<_> = (0..2).map(|_| verify0(&own)).collect();
    let codes: Vec<&str> = answers.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(codes, ["VALID", "RATE_LIMITED"], "its second token was put back, then its limit refuses: {answers:?}");
    assert_eq!(verify0(&other).0, "VALID", "the raised identity limit admits the other key");

    // The key's credits refuse: no token of the identity is spent. The identity: 2 per 10 s
    // and 5 credits; a key with 1 credit refused three times, then another key gets the second
    // token and the identity's credit.
    let shared = identity(&world, &["--ratelimit", "api=2/10s", "--credits", "5"]);
    let (_, poor) = key_of(&world, &shared, &["--credits", "1"]);
    let (_, rich) = key_of(&world, &shared, &[]);
    let codes: Vec<String> = (0..4).map(|_| verify0(&poor).0).collect();
    assert_eq!(codes, ["VALID", "USAGE_EXCEEDED", "USAGE_EXCEEDED", "USAGE_EXCEEDED"]);
    let (code, answer) = verify0(&rich);
    assert_eq!(code, "VALID", "the key's refused verifications took the identity's tokens: {answer}");
    assert_eq!(verify0(&rich).0, "RATE_LIMITED");

    // The identity's credits refuse: the key's credit taken goes back. The identity has 1
    // credit, the key 5: one VALID, three refused; with the identity's credits set to 10 the
    // key spends its 4 left, only if the refused ones put theirs back.
    let one = identity(&world, &["--credits", "1"]);
    let (_, key) = key_of(&world, &one, &["--credits", "5"]);
    let codes: Vec<String> = (0..4).map(|_| verify0(&key).0).collect();
    assert_eq!(codes, ["VALID", "USAGE_EXCEEDED", "USAGE_EXCEEDED", "USAGE_EXCEEDED"]);
    world.cli(&["--json", "identities", "update", &one, "--credits", "10"]);
    // The identity's "not enough" is answered from memory for 250 ms.
    std::thread::sleep(Duration::from_millis(300));
    let codes: Vec<String> = (0..5).map(|_| verify0(&key).0).collect();
    assert_eq!(codes, ["VALID", "VALID", "VALID", "VALID", "USAGE_EXCEEDED"], "the key's 5 credits, 5 VALID in all");

    // Idempotent verifications are settled at the identity's authority (the reservation), then
    // at the key's; the key's refusal gives the identity's credit back. The identity: 5 credits;
    // a key with 2 of its own, then a key with none.
    let idem = identity(&world, &["--credits", "5"]);
    let (_, two_own) = key_of(&world, &idem, &["--credits", "2"]);
    let (_, none_own) = key_of(&world, &idem, &[]);
    let settled = |key: &str, order: &str| {
        let (status, answer) = world.edge_verify(0, &world.root_key, json!({ "key": key, "idempotency_key": order }));
        assert_eq!(status, 200, "{answer}");
        answer["code"].as_str().unwrap_or("?").to_owned()
    };
    let codes: Vec<String> = (1..=4).map(|n| settled(&two_own, &format!("a-{n}"))).collect();
    assert_eq!(codes, ["VALID", "VALID", "USAGE_EXCEEDED", "USAGE_EXCEEDED"], "the key's own 2");
    // Retries are answered as before and spend nothing more.
    assert_eq!((settled(&two_own, "a-1"), settled(&two_own, "a-3")), ("VALID".into(), "USAGE_EXCEEDED".into()));
    assert_eq!(remaining(&world, &idem), 3, "the identity paid for the 2 VALID only");
    let codes: Vec<String> = (1..=4).map(|n| settled(&none_own, &format!("b-{n}"))).collect();
    assert_eq!(codes, ["VALID", "VALID", "VALID", "USAGE_EXCEEDED"], "the identity's 3 left");
    assert_eq!(remaining(&world, &idem), 0);
    // Two keys of one identity sending the same idempotency key are two verifications: each
    // pays the identity (its authority remembers them apart).
    let pair = identity(&world, &["--credits", "2"]);
    let ((_, x), (_, y)) = (key_of(&world, &pair, &[]), key_of(&world, &pair, &[]));
    let codes = [settled(&x, "same"), settled(&y, "same"), settled(&y, "other")];
    assert_eq!(codes, ["VALID", "VALID", "USAGE_EXCEEDED"], "the identity's 2, one per key");
    assert_eq!(remaining(&world, &pair), 0);
    let stats = stats(&world, &world.regions[0].spec.url());
    println!("credits at the region: {:?}", stats.credits);
    // Released: a-3 and a-4, and a-3's retry (settled afresh at the identity, refused again).
    assert_eq!((stats.credits.released, stats.credits.release_lost), (3, 0), "{:?}", stats.credits);

    // The identity cannot be deleted while its keys use it.
    let (status, used) = world.admin(Method::DELETE, &format!("/v1/identities/{one}"), None);
    assert_eq!(status, 409, "{used}");
}
