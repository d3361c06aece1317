//! The whole system placed in the `world` geography: regions 20, 90 and 180 ms one way from the
//! home of the KeyState objects, the control plane 20-100 ms from them. One short smoke test;
//! the rest of the suite runs on plain loopback (or whatever `KEYWARD_GEOGRAPHY` names).

use std::time::{Duration, Instant};

use keyward_tests::geography::{Geography, Link};
use keyward_tests::now_ms;
use keyward_tests::world::{Options, PurgeMode, RegionPlan, World};
use reqwest::Method;
use serde_json::json;

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn world_geography_delays_every_link_and_revocation_still_reaches_every_region() {
    let geography = Geography::preset("world").unwrap();
    let options = Options { geography: Some(geography.clone()), ..Options::default() };
    let mut world = World::start_opts(&[RegionPlan::Up; 3], options).unwrap();
    let api = world.create_api("far-apart", 1_000);
    let (id, key) = world.create_key(&api, json!({}));
    for i in 0..3 {
        // A miss reads KV and the authority: at least one modelled round trip to the home.
        let started = Instant::now();
        assert_eq!(world.edge_code(i, &key).0, "VALID", "region {i}");
        let took = started.elapsed();
        let round_trip = Duration::from_secs_f64(2.0 * geography.region_to_home(i).min_ms / 1e3);
        assert!(took >= round_trip, "region {i}'s miss took {took:?}, under the modelled {round_trip:?}");
        world.make_hot(i, &key);
    }
    let started = Instant::now();
    let (status, answer) = world.admin(Method::POST, &format!("/v1/keys/{id}/revoke"), None);
    let took = started.elapsed();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["authority"]["acknowledged"], true, "{answer}");
    // The answer waits for the authority (50 ms each way) and the farthest region (100 ms).
    assert!(took >= Duration::from_millis(200), "the revoke call took {took:?}: the links were not delayed");
    for i in 0..3 {
        let region = answer["regions"].as_array().unwrap().iter().find(|r| r["name"] == format!("r{i}")).unwrap();
        assert_eq!(region["acknowledged"], true, "{answer}");
        assert_eq!(world.edge_code(i, &key).0, "REVOKED", "region {i}");
    }
    for (i, region) in world.regions.iter().enumerate() {
        let held = region.authority_relay.as_ref().unwrap().stats();
        let link = geography.region_to_home(i);
        assert!(
            held.forward.chunks > 0 && held.back.chunks > 0,
            "region {i}'s Durable Object calls bypassed the relay"
        );
        let per_chunk = link.min_ms / keyward_tests::geography::BINDING_ROUND_TRIPS;
        assert!(held.forward.held_ms_mean() >= per_chunk, "region {i}: {held:?}");
        eprintln!("region {i} → home: {held:?}");
    }
    world.assert_no_plaintext();
}

/// A verification that waits for its rate limit's tokens (a round trip to a home 180 ms away)
/// while the key is revoked: the authority grants the tokens before the revocation reaches it,
/// and the region takes the signed purge before the grant comes back. The answer must not be a
/// `VALID` decided after the region applied the revocation; it is the newer record's `REVOKED`.
/// The revocation starts at several offsets into the wait, so that some land in that window.
#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn a_verification_overtaken_by_a_revocation_while_it_waits_is_not_valid() {
    let geography = Geography::preset("world").unwrap();
    let options = Options { geography: Some(geography), ..Options::default() };
    let world = World::start_opts(&[RegionPlan::Up; 3], options).unwrap();
    // A long max_staleness_ms: the copy is answered from memory without confirmation.
    let api = world.create_api("overtaken", 60_000);
    let limits = json!({ "ratelimits": [{ "name": "api", "limit": 1_000, "duration_ms": 10_000 }] });
    let (_, plain) = world.create_key(&api, json!({}));
    let mut outcomes = Vec::new();
    for offset_ms in [100u64, 130, 160, 190, 220, 250] {
        let (id, key) = world.create_key(&api, limits.clone());
        let body = json!({ "key": key });
        assert_eq!(world.edge_verify(2, &world.root_key, body.clone()).1["code"], "VALID");
        // The share (1 s lease lifetime for a 10 s window) expires: the next verify must ask.
        std::thread::sleep(Duration::from_millis(1_300));
        // The caller's root key is confirmed again now (its trust is 1 s), so that the wait below
        // is the tokens' and not the root key's.
        assert_eq!(world.edge_verify(2, &world.root_key, json!({ "key": plain })).1["code"], "VALID");
        let answer = std::thread::scope(|scope| {
            let waiting = scope.spawn(|| world.edge_verify(2, &world.root_key, body.clone()).1);
            std::thread::sleep(Duration::from_millis(offset_ms));
            let (status, revoked) = world.admin(Method::POST, &format!("/v1/keys/{id}/revoke"), None);
            assert_eq!(status, 200, "{revoked}");
            waiting.join().unwrap()
        });
        let (_, delivery) = world.admin(Method::GET, &format!("/v1/keys/{id}/delivery"), None);
        let targets = delivery["targets"].as_array().cloned().unwrap_or_default();
        let applied = targets.iter().find(|t| t["target"] == "purge:r2").and_then(|t| t["applied_at"].as_i64());
        let applied = applied.unwrap_or_else(|| panic!("r2 applied the revocation: {delivery}"));
        let code = answer["code"].as_str().unwrap_or("?").to_owned();
        let decided = answer["decided_at_ms"].as_i64().unwrap_or(0);
        eprintln!("revoked {offset_ms} ms into the wait: {code}, decided {} ms after r2 applied it", decided - applied);
        outcomes.push((offset_ms, code, decided, applied));
    }
    for (offset_ms, code, decided, applied) in &outcomes {
        assert!(
            !(code == "VALID" && decided > applied),
            "revoked {offset_ms} ms into the wait: VALID decided {} ms after r2 applied the revocation",
            decided - applied
        );
    }
    let caught = outcomes.iter().filter(|(_, code, _, _)| code == "REVOKED").count();
    assert!(caught > 0, "no revocation landed during a wait, the race was not made: {outcomes:?}");
}

/// Every link but one fast; the region's link to the home of the KeyState objects 150 ms one way,
/// so each confirmation of a copy is in flight for 300 ms and more.
const FAST: [Link; 1] = [Link::between(1.0, 2.0)];
const FAR_HOME: [Link; 1] = [Link::between(150.0, 153.0)];

/// With purges that reach only the Cache API (production's purge-by-tag), a confirmation of a hot
/// key's copy that read the authority just before a revocation reached it, and wrote the Cache API
/// just after the purge dropped the copy there, must not bring the old copy back: the region must
/// reject the key within the purge's delay plus memory trust, not `max_staleness_ms`. The
/// revocations land at offsets spread over a whole cycle of confirmations ahead of expiry (one
/// asked 750 ms into each copy's 1 s), so that for some the authority's write falls between a
/// confirmation's read and its Cache API write.
#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn with_tag_only_purges_a_confirmation_in_flight_across_a_revocation_brings_back_no_copy() {
    let geography = Geography::custom("far-home", Link::between(1.0, 2.0), &FAST, &FAR_HOME);
    let options = Options { geography: Some(geography), purge_mode: PurgeMode::TagOnly(20), ..Options::default() };
    let world = World::start_opts(&[RegionPlan::Up], options).unwrap();
    let api = world.create_api("in-flight", 1_000);
    let (_, warm) = world.create_key(&api, json!({}));
    // The caller's root key is confirmed at the region first: the key's miss is then the only wait.
    assert_eq!(world.edge_code(0, &warm).0, "VALID");
    let mut late = Vec::new();
    for offset_ms in (0..8).map(|i| i * 100) {
        let (id, key) = world.create_key(&api, json!({}));
        let body = json!({ "key": key });
        assert_eq!(world.edge_code(0, &key).0, "VALID");
        let started = now_ms();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (answers, answered) = std::thread::scope(|scope| {
            let (world, body, stop) = (&world, &body, &stop);
            let load = scope.spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let (status, answer) = world.edge_verify(0, &world.root_key, body.clone());
                    assert_eq!(status, 200, "{answer}");
                    seen.push((answer["code"].as_str().unwrap_or("?").to_owned(), answer["decided_at_ms"].as_i64()));
                    std::thread::sleep(Duration::from_millis(15));
                }
                seen
            });
            let at = started + 300 + offset_ms;
            std::thread::sleep(Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0)));
            let (status, revoked) = world.admin(Method::POST, &format!("/v1/keys/{id}/revoke"), None);
            assert_eq!(status, 200, "{revoked}");
            let answered = now_ms();
            std::thread::sleep(Duration::from_millis(2_000));
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            (load.join().unwrap(), answered)
        });
        let valid: Vec<i64> = answers.iter().filter(|(code, _)| code == "VALID").filter_map(|(_, at)| *at).collect();
        let last = valid.iter().max().copied().unwrap_or(0);
        let codes: Vec<&str> = answers.iter().map(|(code, _)| code.as_str()).collect();
        assert!(valid.len() >= 2, "the key was answered before the revocation: {codes:?}");
        assert_eq!(answers.last().map(|(code, _)| code.as_str()), Some("REVOKED"));
        println!("offset {offset_ms} ms: last VALID {} ms after the revoke call answered", last - answered);
        late.push(last - answered);
    }
    // The purge drops the copy 20 ms after it arrives (before the answer); memory trusts what
    // the Cache API showed for 100 ms; 80 ms for the request in hand and the machine.
    assert!(late.iter().all(|ms| *ms <= 200), "last VALID after the answer, per revocation: {late:?} ms");
    // The race was run into: some confirmation found its mark gone and took its copy back.
    let stats = world.memory_stats(&world.regions[0].spec.url());
    println!("key confirmations at the region: {:?}", stats.key_confirmations);
    assert!(stats.key_confirmations.overtaken > 0, "no confirmation was overtaken: {:?}", stats.key_confirmations);
}

/// The same race for keys attached to one identity with credits: a verification overtaken by
/// its key's revocation while it waits for the key's tokens is answered `REVOKED`, and what it
/// took of the identity's credits goes back. Every `VALID` of the identity's keys together,
/// then, spends its balance exactly: those of the raced keys and, once the leases expired,
/// those of a key that is never revoked, spending until `USAGE_EXCEEDED`.
#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn an_overtaken_verification_gives_its_identitys_credit_back() {
    let geography = Geography::preset("world").unwrap();
    let options = Options { geography: Some(geography), ..Options::default() };
    let world = World::start_opts(&[RegionPlan::Up; 3], options).unwrap();
    // Long max_staleness_ms (the key's API's, the identity's): copies answered from memory.
    let api = world.create_api("overtaken-identity", 60_000);
    let body = json!({ "external_id": "acct-overtaken", "credits": { "remaining": 30 }, "max_staleness_ms": 60_000 });
    let (status, identity) = world.admin(Method::POST, "/v1/identities", Some(body));
    assert_eq!(status, 201, "{identity}");
    let identity = identity["identity"]["id"].as_str().unwrap().to_owned();
    let attached = |extra: serde_json::Value| {
        let mut body = json!({ "identity_id": identity });
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        world.create_key(&api, body)
    };
    let limits = json!({ "ratelimits": [{ "name": "api", "limit": 1_000, "duration_ms": 10_000 }] });
    let (_, plain) = world.create_key(&api, json!({}));
    let (_, spender) = attached(json!({}));
    let mut valid = 0;
    let mut caught = 0;
    for offset_ms in [100u64, 130, 160, 190, 220, 250] {
        let (id, key) = attached(limits.clone());
        let body = json!({ "key": key });
        assert_eq!(world.edge_verify(2, &world.root_key, body.clone()).1["code"], "VALID");
        valid += 1;
        std::thread::sleep(Duration::from_millis(1_300));
        assert_eq!(world.edge_verify(2, &world.root_key, json!({ "key": plain })).1["code"], "VALID");
        let answer = std::thread::scope(|scope| {
            let waiting = scope.spawn(|| world.edge_verify(2, &world.root_key, body.clone()).1);
            std::thread::sleep(Duration::from_millis(offset_ms));
            let (status, revoked) = world.admin(Method::POST, &format!("/v1/keys/{id}/revoke"), None);
            assert_eq!(status, 200, "{revoked}");
            waiting.join().unwrap()
        });
        let code = answer["code"].as_str().unwrap_or("?").to_owned();
        eprintln!("revoked {offset_ms} ms into the wait: {code}");
        match code.as_str() {
            "VALID" => valid += 1,
            "REVOKED" => caught += 1,
            _ => panic!("{answer}"),
        }
    }
    // Every lease expires and is reported at the next contact: what was put back is spendable.
    std::thread::sleep(Duration::from_millis(2_300));
    let mut rest = 0;
    for _ in 0..40 {
        match world.edge_verify(2, &world.root_key, json!({ "key": spender })).1["code"].as_str() {
            Some("VALID") => rest += 1,
            Some("USAGE_EXCEEDED") => break,
            other => panic!("the spender answered {other:?}"),
        }
    }
    eprintln!("{valid} VALID while racing ({caught} overtaken), then {rest}: {} of the identity's 30", valid + rest);
    assert!(caught > 0, "no revocation landed during a wait, the race was not made");
    assert_eq!(valid + rest, 30, "the overtaken verifications kept the identity's credits");
}

/// With purges that reach only the Cache API (production's purge-by-tag), a verification decided
/// `VALID` on a hot copy just before its key's revocation, which then waits for another authority
/// (its identity's settlement: a round trip to a home 150 ms away, where nothing of the key's
/// revocation is known), must not be answered `VALID` when that wait ends: the key is looked up
/// again at answer time under the same trust rules, so the region rejects it within the purge's
/// delay plus memory trust of the revoke's answer, however long the wait. Judged by when each
/// answer arrived, as a client sees it, not by when it was decided.
#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn with_tag_only_purges_a_verification_that_waited_for_another_authority_is_not_answered_on_its_old_copy() {
    let geography = Geography::custom("far-home", Link::between(1.0, 2.0), &FAST, &FAR_HOME);
    let options = Options { geography: Some(geography), purge_mode: PurgeMode::TagOnly(20), ..Options::default() };
    let world = World::start_opts(&[RegionPlan::Up], options).unwrap();
    // Long max_staleness_ms: the key's copy is answered from the Cache API and memory, unconfirmed.
    let api = world.create_api("waited", 60_000);
    let body =
        json!({ "external_id": "acct-waited", "credits": { "remaining": 1_000_000 }, "max_staleness_ms": 60_000 });
    let (status, identity) = world.admin(Method::POST, "/v1/identities", Some(body));
    assert_eq!(status, 201, "{identity}");
    let identity = identity["identity"]["id"].as_str().unwrap().to_owned();
    let (mut raced, mut late) = (0, Vec::new());
    for offset_ms in [0u64, 5, 10, 20, 30] {
        let (id, key) = world.create_key(&api, json!({ "identity_id": identity }));
        // Hot: the key's copy, its API's and its identity's, and the caller's root key.
        for _ in 0..2 {
            assert_eq!(world.edge_verify(0, &world.root_key, json!({ "key": key })).1["code"], "VALID");
        }
        let body = json!({ "key": key, "idempotency_key": format!("waited-{offset_ms}") });
        let (answer, received, answered) = std::thread::scope(|scope| {
            let waiting = scope.spawn(|| {
                let answer = world.edge_verify(0, &world.root_key, body.clone()).1;
                (answer, now_ms())
            });
            std::thread::sleep(Duration::from_millis(offset_ms));
            let (status, revoked) = world.admin(Method::POST, &format!("/v1/keys/{id}/revoke"), None);
            assert_eq!(status, 200, "{revoked}");
            let answered = now_ms();
            let (answer, received) = waiting.join().unwrap();
            (answer, received, answered)
        });
        let code = answer["code"].as_str().unwrap_or("?").to_owned();
        let after = received - answered;
        eprintln!("revoked {offset_ms} ms into the wait: {code}, received {after} ms after the revoke's answer");
        // The purge drops the copy 20 ms after it arrives; memory trusts the Cache API for 100 ms;
        // 80 ms for the request in hand and the machine.
        if after > 200 {
            raced += 1;
            if code == "VALID" {
                late.push((offset_ms, after));
            }
        }
    }
    assert!(late.is_empty(), "VALID received past the bound after the revoke's answer (offset, ms): {late:?}");
    assert!(raced > 0, "no answer came back past the bound: the race was not made");
}
