//! Usage credits with real processes (3 regions, the home's KeyState objects, the control
//! plane): a balance is never overspent however verifications are spread and however many are
//! in flight, what leases strand comes back once they expire, a region killed with a share
//! strands at most that share, steady traffic with credits to spare rarely asks the authority,
//! interval refills add once per period, idempotent retries spend once in any region, and a
//! revoked or disabled key's shares are neither spent past the bound nor returned early.
//!
//! Every test counts authority calls: the home's lease and settle calls answered, and its
//! record reads, from the signed stats route.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keyward_tests::now_ms;
use keyward_tests::world::{Options, PurgeMode, RegionPlan, World};
use reqwest::Method;
use serde_json::{Value, json};

const THREE: [RegionPlan; 3] = [RegionPlan::Up, RegionPlan::Up, RegionPlan::Up];
/// Longer than a lease's time to live (`keyward_shared::credits::LEASE_TTL_MS`, 2 s).
const LEASES_EXPIRED: Duration = Duration::from_millis(2_300);

/// Authority calls the home answered so far: credit calls and record reads.
fn authority_calls(world: &World) -> (u64, u64) {
    let home = world.memory_stats(&world.home.url());
    (home.authority_credit_calls_answered, home.authority_reads_answered)
}

/// One verification at region `region`: its code (`ERROR` for no answer) and answer.
fn verify(world: &World, region: usize, body: &Value) -> (String, Value) {
    let (status, answer) = world.edge_verify(region, &world.root_key, body.clone());
    if status != 200 {
        return ("ERROR".into(), answer);
    }
    (answer["code"].as_str().unwrap_or("?").to_owned(), answer)
}

/// `count` verifications of `key` spread over `regions` by `threads` callers at once (each
/// keeps one in flight); answers every (code, answer).
fn burst(world: &World, key: &str, regions: &[usize], count: usize, threads: usize) -> Vec<(String, Value)> {
    let next = AtomicUsize::new(0);
    let body = json!({ "key": key });
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
                        seen.push(verify(world, regions[i % regions.len()], &body));
                    }
                })
            })
            .collect();
        callers.into_iter().flat_map(|c| c.join().expect("caller")).collect()
    })
}

fn tally(answers: &[(String, Value)]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for (code, _) in answers {
        *counts.entry(code.clone()).or_insert(0) += 1;
    }
    counts
}

/// How long after `answered` (Unix ms) the last `VALID` among `answers` was decided.
fn last_valid_after(answers: &[(String, Value)], answered: i64) -> Option<i64> {
    answers
        .iter()
        .filter(|(code, _)| code == "VALID")
        .filter_map(|(_, a)| a["decided_at_ms"].as_i64())
        .max()
        .map(|at| at - answered)
}

fn valid(answers: &[(String, Value)]) -> usize {
    answers.iter().filter(|(code, _)| code == "VALID").count()
}

fn key_with_credits(world: &World, remaining: u64, refill: Option<Value>) -> (String, String) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let api = world.create_api(&format!("credits-{}", N.fetch_add(1, Ordering::SeqCst)), 1_000);
    let mut credits = json!({ "remaining": remaining });
    if let Some(refill) = refill {
        credits["refill"] = refill;
    }
    world.create_key(&api, json!({ "credits": credits }))
}

/// Runs 1,000 verifications (60 in flight) against a balance of 100, then, once the leases
/// have expired, rounds of 300 until the balance is spent; answers (VALID in the first round,
/// VALID in all, how long the stranded part took to come back). With `kill_region_2`, region
/// 2 is killed after the first 45 verifications, holding whatever share it had then.
fn spend_a_hundred(world: &mut World, kill_region_2: bool) -> (usize, usize, Duration) {
    let (_, key) = key_with_credits(world, 100, None);
    let before = authority_calls(world);
    let mut answers = burst(world, &key, &[0, 1, 2], 45, 45);
    if kill_region_2 {
        let held = answers.iter().filter(|(code, _)| code == "VALID").count();
        world.stop_region(2);
        println!("region 2 killed after {held} VALID of 45");
        answers.extend(burst(world, &key, &[0, 1], 955, 60));
    } else {
        answers.extend(burst(world, &key, &[0, 1, 2], 955, 60));
    }
    let first = valid(&answers);
    let round_one_over = Instant::now();
    let after = authority_calls(world);
    println!(
        "round one: {:?}; credit calls {}, record reads {}; stranded {} of 100",
        tally(&answers),
        after.0 - before.0,
        after.1 - before.1,
        100 - first
    );
    assert!(first <= 100, "{first} VALID against a balance of 100");
    for (code, answer) in &answers {
        if code == "VALID" {
            assert!(answer["credits"]["remaining"].as_u64().is_some(), "{answer}");
        }
    }
    let regions: &[usize] = if kill_region_2 { &[0, 1] } else { &[0, 1, 2] };
    let mut total = first;
    for _ in 0..3 {
        std::thread::sleep(LEASES_EXPIRED);
        let more = burst(world, &key, regions, 300, 30);
        total += valid(&more);
        println!("after the leases expired: {:?}, {total} VALID in all", tally(&more));
        assert!(total <= 100, "{total} VALID against a balance of 100");
        if total == 100 {
            break;
        }
    }
    (first, total, round_one_over.elapsed())
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn a_balance_is_never_overspent_and_what_leases_strand_comes_back() {
    let mut world = World::start(&THREE).expect("world");
    let (first, total, took) = spend_a_hundred(&mut world, false);
    println!("stranded after round one: {} credits, back within {took:?}", 100 - first);
    assert_eq!(total, 100, "every credit is spent once the leases expired");
    world.assert_no_plaintext();
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn a_region_killed_with_a_share_strands_at_most_its_share() {
    let mut world = World::start(&THREE).expect("world");
    let (first, total, took) = spend_a_hundred(&mut world, true);
    println!(
        "region 2 killed mid-run: {first} VALID in round one, {total} in all; stranded for good: {} (over {took:?})",
        100 - total
    );
    // A killed holder strands what it held: at most two leases, each at most a quarter of
    // what was left when granted (25 + 19 of 100).
    assert!(100 - total <= 44, "{} stranded", 100 - total);
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn steady_traffic_with_credits_to_spare_rarely_asks_the_authority() {
    let world = World::start(&THREE).expect("world");
    let (_, key) = key_with_credits(&world, 1_000_000, None);
    // Warm: every region has a copy and a lease.
    burst(&world, &key, &[0, 1, 2], 30, 3);
    let before = authority_calls(&world);
    let started = Instant::now();
    let answers = burst(&world, &key, &[0, 1, 2], 1_000, 6);
    let after = authority_calls(&world);
    let (credit_calls, reads) = (after.0 - before.0, after.1 - before.1);
    println!(
        "1,000 verifications in {:?}: {:?}; credit calls {credit_calls}, record reads {reads}",
        started.elapsed(),
        tally(&answers)
    );
    assert_eq!(valid(&answers), 1_000);
    assert!(credit_calls + reads < 200, "{credit_calls} credit calls and {reads} reads per 1,000 verifications");
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn an_interval_refill_adds_once_per_period() {
    let world = World::start(&THREE).expect("world");
    let refill = json!({ "every": { "kind": "interval", "ms": 2_000 }, "amount": 5 });
    let (id, key) = key_with_credits(&world, 5, Some(refill));
    let (status, view) = world.admin(Method::GET, &format!("/v1/keys/{id}"), None);
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["credits"]["refill"]["amount"], 5, "{view}");
    let created = view["created_at"].as_i64().expect("created_at");
    let answers = {
        let deadline = Instant::now() + Duration::from_millis(7_500);
        let body = json!({ "key": key });
        std::thread::scope(|scope| {
            let callers: Vec<_> = (0..9)
                .map(|t| {
                    let body = body.clone();
                    let world = &world;
                    scope.spawn(move || {
                        let mut seen = Vec::new();
                        while Instant::now() < deadline {
                            seen.push(verify(world, t % 3, &body));
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        seen
                    })
                })
                .collect();
            callers.into_iter().flat_map(|c| c.join().expect("caller")).collect::<Vec<_>>()
        })
    };
    let mut per_period = std::collections::BTreeMap::new();
    for (code, answer) in &answers {
        if code == "VALID" {
            let at = answer["decided_at_ms"].as_i64().expect("decided_at_ms");
            *per_period.entry((at - created).div_euclid(2_000)).or_insert(0) += 1;
        }
    }
    println!("{:?}; VALID per 2 s period since creation: {per_period:?}", tally(&answers));
    assert!(per_period.values().all(|n| *n <= 5), "a period spent more than its refill: {per_period:?}");
    // Periods 1 and 2 lie wholly inside the run: each was refilled (once, by the bound above).
    for period in [1, 2] {
        assert!(per_period.get(&period).copied().unwrap_or(0) >= 3, "period {period} refilled: {per_period:?}");
    }
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn idempotent_retries_spend_once_in_any_region() {
    let world = World::start(&THREE).expect("world");
    let (_, key) = key_with_credits(&world, 10, None);
    let before = authority_calls(&world);
    let body = json!({ "key": key, "idempotency_key": "order-4711", "cost": 3 });
    let (code, first) = verify(&world, 0, &body);
    assert_eq!(code, "VALID", "{first}");
    assert_eq!(first["credits"]["remaining"], 7, "{first}");
    for region in [1, 2, 0] {
        let (code, again) = verify(&world, region, &body);
        assert_eq!(code, "VALID", "{again}");
        assert_eq!(again["credits"], first["credits"], "region {region}");
        assert_eq!(again["decided_at_ms"], first["decided_at_ms"], "region {region}");
    }
    let (status, origin) = world.origin_verify(&world.root_key, body.clone());
    assert_eq!((status, &origin["code"]), (200, &json!("VALID")), "{origin}");
    assert_eq!(origin["credits"], first["credits"], "{origin}");
    // Spent once: 7 left, so 8 more is refused and 7 is granted.
    let over = json!({ "key": key, "idempotency_key": "order-4712", "cost": 8 });
    assert_eq!(verify(&world, 1, &over).0, "USAGE_EXCEEDED");
    let rest = json!({ "key": key, "idempotency_key": "order-4713", "cost": 7 });
    let (code, last) = verify(&world, 2, &rest);
    assert_eq!((code.as_str(), &last["credits"]["remaining"]), ("VALID", &json!(0)), "{last}");
    let after = authority_calls(&world);
    println!("idempotent: credit calls {}, record reads {}", after.0 - before.0, after.1 - before.1);
    assert_eq!(after.0 - before.0, 7, "one settlement per idempotent verification");
}

/// Revokes a key with leases out in every region while verifications go on: no `VALID` is
/// decided past the revoke's answer plus `max_staleness_ms` (1 s).
fn no_valid_past_the_bound_with_leases_out(world: &World) {
    let (id, key) = key_with_credits(world, 1_000, None);
    burst(world, &key, &[0, 1, 2], 60, 6);
    let (answers, answered) = std::thread::scope(|scope| {
        let load = scope.spawn(|| burst(world, &key, &[0, 1, 2], 600, 6));
        std::thread::sleep(Duration::from_millis(300));
        let (status, revoked) = world.admin(Method::POST, &format!("/v1/keys/{id}/revoke"), None);
        assert_eq!(status, 200, "{revoked}");
        let answered = now_ms();
        (load.join().expect("load"), answered)
    });
    let late: Vec<_> = answers
        .iter()
        .filter(|(code, a)| code == "VALID" && a["decided_at_ms"].as_i64().unwrap_or(0) > answered + 1_000)
        .collect();
    let last_valid = last_valid_after(&answers, answered);
    println!("around the revocation: {:?}; last VALID {last_valid:?} ms after the answer", tally(&answers));
    assert!(late.is_empty(), "VALID past the bound: {late:?}");
    assert_eq!(verify(world, 0, &json!({ "key": key })).0, "REVOKED");
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn revoked_with_leases_out_in_tag_only_mode_no_valid_past_the_bound() {
    let options = Options { purge_mode: PurgeMode::TagOnly(150), ..Options::default() };
    let world = World::start_opts(&THREE, options).expect("world");
    no_valid_past_the_bound_with_leases_out(&world);
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn revoked_or_disabled_keys_shares_are_not_spent_past_the_bound_nor_returned_early() {
    let world = World::start(&THREE).expect("world");
    no_valid_past_the_bound_with_leases_out(&world);

    // Disabled with a share out in region 0, enabled again at once: the share is not back in
    // the balance until region 0 reports it.
    let (id, key) = key_with_credits(&world, 100, None);
    let spent = valid(&burst(&world, &key, &[0], 20, 4));
    assert_eq!(spent, 20);
    for enabled in [false, true] {
        let (status, changed) =
            world.admin(Method::PATCH, &format!("/v1/keys/{id}"), Some(json!({ "enabled": enabled })));
        assert_eq!(status, 200, "{changed}");
    }
    let rest = json!({ "key": key, "cost": 100 - spent });
    let (status, origin) = world.origin_verify(&world.root_key, rest.clone());
    assert_eq!((status, &origin["code"]), (200, &json!("USAGE_EXCEEDED")), "the share came back early: {origin}");
    // Region 0's next contact reports what it spent of the share, and takes a new lease (at
    // most a quarter of what is left): then all but that lease is there again.
    std::thread::sleep(LEASES_EXPIRED);
    assert_eq!(verify(&world, 0, &json!({ "key": key })).0, "VALID");
    let back = json!({ "key": key, "cost": 100 - spent - 1 - 25 });
    let (status, origin) = world.origin_verify(&world.root_key, back);
    assert_eq!((status, &origin["code"]), (200, &json!("VALID")), "the share never came back: {origin}");
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn set_increment_and_decrement_reach_the_authority_once() {
    let world = World::start(&[RegionPlan::Up]).expect("world");
    let (id, key) = key_with_credits(&world, 5, None);
    let spend = |cost: u64| {
        let (status, answer) = world.origin_verify(&world.root_key, json!({ "key": key, "cost": cost }));
        assert_eq!(status, 200, "{answer}");
        answer["code"].as_str().unwrap_or("?").to_owned()
    };
    let change = |op: &str, amount: u64| {
        let body = json!({ "op": op, "amount": amount });
        let (status, answer) = world.admin(Method::POST, &format!("/v1/keys/{id}/credits"), Some(body));
        assert_eq!(status, 200, "{answer}");
        answer
    };
    assert_eq!(spend(5), "VALID");
    assert_eq!(spend(1), "USAGE_EXCEEDED");
    change("increment", 3);
    let decremented = change("decrement", 1);
    assert_eq!(decremented["key"]["credits"]["added"], 2, "{decremented}");
    // The edge spends from the same balance: 2 left in all.
    assert_eq!(verify(&world, 0, &json!({ "key": key, "cost": 2 })).0, "VALID");
    std::thread::sleep(LEASES_EXPIRED);
    assert_eq!(spend(1), "USAGE_EXCEEDED");
    let set = change("set", 10);
    assert_eq!(
        (set["key"]["credits"]["set_to"].as_u64(), set["key"]["credits"]["added"].as_i64()),
        (Some(10), Some(0))
    );
    assert_eq!(spend(10), "VALID");
    assert_eq!(spend(1), "USAGE_EXCEEDED");
    let (status, view) = world.admin(Method::GET, &format!("/v1/keys/{id}"), None);
    assert_eq!((status, &view["credits"]["set_to"]), (200, &json!(10)), "{view}");
    // What remains, by the authority's account (nothing is spent asking), and through the CLI.
    let (status, credits) = world.admin(Method::GET, &format!("/v1/keys/{id}/credits"), None);
    assert_eq!((status, &credits["remaining"]), (200, &json!(0)), "{credits}");
    let keyward = |args: &[&str]| world.cli(args);
    keyward(&["keys", "credits", &id, "increment", "4", "--json"]);
    let shown: Value = serde_json::from_str(&keyward(&["keys", "credits", &id, "--json"])).unwrap();
    assert_eq!(shown["remaining"], 4, "{shown}");
    let table = keyward(&["keys", "get", &id, "--format", "table"]);
    assert!(table.contains("4 remaining, set to 10 at version"), "{table}");
    // Each change appended its audit entry.
    let (status, audit) = world.admin(Method::GET, &format!("/v1/audit?target={id}&action=key.credits"), None);
    assert_eq!(status, 200, "{audit}");
    assert_eq!(audit["entries"].as_array().map(Vec::len), Some(4), "{audit}");
    // A key without credits cannot be incremented; setting them makes it limited.
    let api = world.create_api("unlimited", 1_000);
    let (plain, _) = world.create_key(&api, json!({}));
    let body = json!({ "op": "increment", "amount": 1 });
    let (status, refused) = world.admin(Method::POST, &format!("/v1/keys/{plain}/credits"), Some(body));
    assert_eq!(status, 409, "{refused}");
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn a_lowered_balance_takes_full_effect_within_one_lease_lifetime() {
    // Tag-only purges never reach isolate memory: the shares out are spent until they expire.
    let options = Options { purge_mode: PurgeMode::TagOnly(150), ..Options::default() };
    let world = World::start_opts(&THREE, options).expect("world");
    let (id, key) = key_with_credits(&world, 1_000_000, None);
    burst(&world, &key, &[0, 1, 2], 60, 6);
    let (answers, answered) = std::thread::scope(|scope| {
        let load = scope.spawn(|| burst(&world, &key, &[0, 1, 2], 1_500, 6));
        std::thread::sleep(Duration::from_millis(300));
        let body = json!({ "op": "set", "amount": 0 });
        let (status, set) = world.admin(Method::POST, &format!("/v1/keys/{id}/credits"), Some(body));
        assert_eq!(status, 200, "{set}");
        let answered = now_ms();
        (load.join().expect("load"), answered)
    });
    let last_valid = last_valid_after(&answers, answered);
    let after: Vec<_> = answers
        .iter()
        .filter(|(_, a)| a["decided_at_ms"].as_i64().is_some_and(|at| at > answered + 2_000))
        .map(|(code, _)| code.clone())
        .collect();
    println!("set to 0: {:?}; last VALID {last_valid:?} ms after the answer", tally(&answers));
    assert!(last_valid.is_some_and(|ms| ms <= 2_000), "VALID more than one lease lifetime after the set");
    assert!(!after.is_empty() && after.iter().all(|c| c == "USAGE_EXCEEDED"), "{after:?}");
}
