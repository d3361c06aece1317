//! One tenant cannot hurt another through what the edge keeps: isolate memory for copies is
//! bounded by bytes, measured as the isolate's own wasm memory, with the largest records a key
//! may have; random keys cost a bounded number of fetches per caller; and a remembered
//! `NOT_FOUND` reads the same for a key that does not exist and another workspace's key.

use keyward_shared::internal::MemoryStats;
use keyward_tests::world::{Options, RegionPlan, World};
use serde_json::json;

const BUDGET: usize = 4 << 20;

fn stats(world: &World) -> MemoryStats {
    world.memory_stats(&world.regions[0].spec.url())
}

/// The largest key the control plane accepts: 16 KiB of meta, 100 permissions.
fn largest_key(n: usize) -> serde_json::Value {
    let filler = "m".repeat(16 * 1024 - 64);
    let permissions: Vec<String> = (0..100).map(|p| format!("tenant.resource.permission-{n:04}-{p:03}")).collect();
    json!({ "meta": { "blob": filler, "n": n }, "permissions": permissions, "owner_id": format!("owner-{n}") })
}

#[test]
#[ignore = "whole-system: starts keyward and a workerd region; run with `cargo xtask test`"]
fn isolate_memory_for_copies_is_bounded_by_bytes_with_the_largest_records() {
    let vars = vec![("COPY_MEMORY_BYTES".to_owned(), BUDGET.to_string())];
    let world = World::start_opts(&[RegionPlan::Up], Options { vars, ..Options::default() }).expect("world");
    let api = world.create_api("big-records", 3_600_000);
    let (_, first) = world.create_key(&api, largest_key(0));
    world.make_hot(0, &first);
    let before = stats(&world);
    assert_eq!(before.copy_budget_bytes, BUDGET, "{before:?}");
    let count = 400;
    for n in 1..=count {
        let (_, key) = world.create_key(&api, largest_key(n));
        let (status, code) = world.verify_status(0, &world.root_key, &key);
        if status != 200 {
            let log = std::fs::read_to_string(world.regions[0].spec.dir.join("wrangler.log")).unwrap_or_default();
            panic!(
                "key {n}: region answered {status} {code}; its log ends:\n{}",
                &log[log.len().saturating_sub(3000)..]
            );
        }
        assert_eq!(code, "VALID");
    }
    let after = stats(&world);
    let grown = after.wasm_memory_bytes.saturating_sub(before.wasm_memory_bytes);
    println!(
        "{count} records of about 20 KB each: {} copies kept in {} bytes (budget {}), wasm memory {} -> {} bytes (+{grown})",
        after.key_copies, after.key_copy_bytes, BUDGET, before.wasm_memory_bytes, after.wasm_memory_bytes
    );
    assert!(after.key_copy_bytes <= BUDGET / 16 * 15, "{after:?}");
    assert!(after.key_copies < count, "nothing was evicted: {after:?}");
    assert!(after.key_copies > count / 4, "the budget holds far fewer copies than it should: {after:?}");
    // 400 records of about 20 KB pass through: held as parsed maps they took 80-110 MB; the copies
    // kept may take the budget, and the allocator some slack on top.
    assert!(grown <= 2 * BUDGET, "wasm memory grew by {grown} bytes for a {BUDGET}-byte budget");
    // The region still answers from memory for the newest keys and correctly for evicted ones.
    assert_eq!(world.edge_code(0, &first).0, "VALID");
}

/// A well-formed key (valid checksum) that was never issued.
fn random_key(prefix: &str) -> String {
    let mut random = [0u8; 32];
    getrandom::fill(&mut random).expect("random bytes");
    keyward_shared::Key::generate(prefix, random).expect("a key").expose().to_owned()
}

/// Sends `verify(item)` for every item from 8 threads; answers the (HTTP status, code) of each.
fn flood(items: &[String], verify: impl Fn(&str) -> (u16, String) + Sync) -> Vec<(u16, String)> {
    let verify = &verify;
    std::thread::scope(|scope| {
        let threads: Vec<_> = items
            .chunks(items.len().div_ceil(8))
            .map(|chunk| scope.spawn(move || chunk.iter().map(|item| verify(item)).collect::<Vec<_>>()))
            .collect();
        threads.into_iter().flat_map(|t| t.join().expect("a poller")).collect()
    })
}

fn count(answers: &[(u16, String)], status: u16, code: &str) -> usize {
    answers.iter().filter(|(s, c)| *s == status && c == code).count()
}

#[test]
#[ignore = "whole-system: starts keyward and a workerd region; run with `cargo xtask test`"]
fn random_keys_cost_a_bounded_number_of_fetches_per_caller() {
    // 10 a second: the bound must be reachable by a flood from this machine's 2 cores.
    let vars = vec![("CALLER_MISSES_PER_SECOND".to_owned(), "10".to_owned())];
    let world = World::start_opts(&[RegionPlan::Up], Options { vars, ..Options::default() }).expect("world");
    let api = world.create_api("misses", 1_000);
    let (status, other) = world.admin(
        reqwest::Method::POST,
        "/v1/root-keys",
        Some(json!({ "name": "other service", "scopes": ["api.*.verify_key"] })),
    );
    assert_eq!(status, 201, "{other}");
    let other = other["key"].as_str().expect("root key").to_owned();
    let root = world.root_key.clone();
    let not_found = (200, "NOT_FOUND".to_owned());

    // A miss is remembered: asking again costs no fetch.
    let missing = random_key("sk_test");
    assert_eq!(world.verify_status(0, &root, &missing), not_found);
    let before = stats(&world);
    for _ in 0..5 {
        assert_eq!(world.verify_status(0, &root, &missing), not_found);
    }
    let after = stats(&world);
    assert_eq!(after.key_misses.remembered - before.key_misses.remembered, 5, "{after:?}");
    assert_eq!(after.key_misses.fetched, before.key_misses.fetched, "{after:?}");

    // One caller's flood of random keys is bounded, and answered with the caller's own code.
    let keys: Vec<String> = (0..240).map(|_| random_key("sk_test")).collect();
    let started = std::time::Instant::now();
    let answers = flood(&keys, |key| world.verify_status(0, &root, key));
    let elapsed = started.elapsed().as_secs_f64();
    let flooded = stats(&world);
    let fetched = flooded.key_misses.fetched - after.key_misses.fetched;
    let refused = count(&answers, 429, "CALLER_RATE_LIMITED");
    println!("240 random keys in {elapsed:.2} s from one caller: {fetched} fetched, {refused} refused");
    assert_eq!(refused + count(&answers, 200, "NOT_FOUND"), keys.len(), "{answers:?}");
    assert!(refused > 0, "no caller limit: every random key cost a fetch");
    assert!(fetched as f64 <= 10.0 + 10.0 * elapsed + 2.0, "{fetched} fetches in {elapsed:.2} s");
    assert_eq!(flooded.key_misses.refused - after.key_misses.refused, refused as u64);

    // Another caller is not limited by the first, and a new key is valid at once.
    assert_eq!(world.verify_status(0, &other, &random_key("sk_test")), not_found);
    let (_, fresh) = world.create_key(&api, json!({}));
    assert_eq!(world.verify_status(0, &other, &fresh), (200, "VALID".to_owned()));

    // Unknown root keys: remembered, and bounded per client.
    let unknown_root = random_key("kw_root");
    for _ in 0..3 {
        assert_eq!(world.verify_status(0, &unknown_root, &fresh), (401, "UNAUTHORIZED".to_owned()));
    }
    assert!(stats(&world).root_key_misses.remembered >= 2);
    let fake_roots: Vec<String> = (0..240).map(|_| random_key("kw_root")).collect();
    let answers = flood(&fake_roots, |fake| world.verify_status(0, fake, &fresh));
    let limited = count(&answers, 429, "CALLER_RATE_LIMITED");
    println!("240 unknown root keys: {limited} refused with CALLER_RATE_LIMITED");
    assert!(limited > 0, "unknown root keys are not bounded");
    assert_eq!(limited + count(&answers, 401, "UNAUTHORIZED"), fake_roots.len(), "{answers:?}");
    // The known callers still verify.
    assert_eq!(world.verify_status(0, &root, &fresh), (200, "VALID".to_owned()));
}

/// Region 0's answer to `root_key` verifying `key`: (code, source or `-` when it has none).
fn code_and_source(world: &World, root_key: &str, key: &str) -> (String, String) {
    let (status, answer) = world.edge_verify(0, root_key, json!({ "key": key }));
    assert_eq!(status, 200, "{answer}");
    (answer["code"].as_str().unwrap_or("?").to_owned(), answer["source"].as_str().unwrap_or("-").to_owned())
}

#[test]
#[ignore = "whole-system: starts keyward and a workerd region; run with `cargo xtask test`"]
fn a_remembered_not_found_says_so_alike_for_missing_keys_and_other_workspaces_keys() {
    let world = World::start(&[RegionPlan::Up]).expect("world");
    let (status, other) = world.admin(reqwest::Method::POST, "/v1/workspaces", Some(json!({ "name": "elsewhere" })));
    assert_eq!(status, 201, "{other}");
    let stranger = other["root_key"]["key"].as_str().expect("the other workspace's root key").to_owned();
    let origin = world.origin();
    let body = json!({ "name": "theirs", "prefix": "sk_test", "max_staleness_ms": 60_000 });
    let (status, api) = world.call(&origin, Some(&stranger), reqwest::Method::POST, "/v1/apis", Some(body));
    assert_eq!(status, 201, "{api}");
    let body = json!({ "api_id": api["id"], "name": "their key" });
    let (status, theirs) = world.call(&origin, Some(&stranger), reqwest::Method::POST, "/v1/keys", Some(body));
    assert_eq!(status, 201, "{theirs}");
    let theirs = theirs["key"].as_str().expect("their key").to_owned();
    // Their key is held in this isolate's memory.
    world.wait_for("their key to be served from memory", std::time::Duration::from_secs(10), || {
        let (code, source) = code_and_source(&world, &stranger, &theirs);
        assert_eq!(code, "VALID");
        (source == "memory").then_some(())
    });
    let root = world.root_key.clone();
    let missing = random_key("sk_test");
    let not_found = |source: &str| ("NOT_FOUND".to_owned(), source.to_owned());

    // Asked twice by this workspace: first no source, then remembered, for either kind.
    let before = stats(&world);
    assert_eq!(code_and_source(&world, &root, &missing), not_found("-"));
    assert_eq!(code_and_source(&world, &root, &theirs), not_found("-"));
    let remembered_at = std::time::Instant::now();
    let first = stats(&world);
    assert_eq!(code_and_source(&world, &root, &missing), not_found("remembered"));
    assert_eq!(code_and_source(&world, &root, &theirs), not_found("remembered"));
    let second = stats(&world);
    println!(
        "fetches: {} for the first answers, {} for the remembered ones",
        first.key_misses.fetched - before.key_misses.fetched,
        second.key_misses.fetched - first.key_misses.fetched
    );
    assert_eq!(second.key_misses.fetched, first.key_misses.fetched, "a remembered answer fetched: {second:?}");
    assert_eq!(second.key_misses.remembered - first.key_misses.remembered, 2, "{second:?}");
    // Their own caller still gets their key as it is.
    assert_eq!(code_and_source(&world, &stranger, &theirs), ("VALID".to_owned(), "memory".to_owned()));
    // A key created in this workspace is valid at once.
    let mine = world.create_api("mine", 1_000);
    let (fresh_id, fresh) = world.create_key(&mine, json!({}));
    assert_eq!(code_and_source(&world, &root, &fresh).0, "VALID");
    // A key of this workspace, revoked, is answered REVOKED every time: never a remembered miss.
    let (status, answer) = world.admin(reqwest::Method::POST, &format!("/v1/keys/{fresh_id}/revoke"), None);
    assert_eq!(status, 200, "{answer}");
    for _ in 0..2 {
        let (code, source) = code_and_source(&world, &root, &fresh);
        assert_eq!(code, "REVOKED");
        assert_ne!(source, "remembered");
    }

    // Past the memory's 5 s, both are looked up again: no source, then remembered again.
    std::thread::sleep(std::time::Duration::from_millis(5_300).saturating_sub(remembered_at.elapsed()));
    assert_eq!(code_and_source(&world, &root, &missing), not_found("-"));
    assert_eq!(code_and_source(&world, &root, &theirs), not_found("-"));
    assert_eq!(code_and_source(&world, &root, &missing), not_found("remembered"));
    assert_eq!(code_and_source(&world, &root, &theirs), not_found("remembered"));
    assert_eq!(code_and_source(&world, &stranger, &theirs).0, "VALID");

    // A NOT_FOUND refused by the caller's miss budget (429) is not remembered: else a second root
    // key of the workspace would find another workspace's key remembered where a missing one is
    // not. Keys of theirs held here; this root key's share kept spent by a flood of remembered
    // answers while each is asked, until one is refused (a key answered NOT_FOUND instead is
    // remembered, rightly, and the next one is tried).
    let held: Vec<String> = (0..5)
        .map(|n| {
            let body = json!({ "api_id": api["id"], "name": format!("their key {n}") });
            let (status, key) = world.call(&origin, Some(&stranger), reqwest::Method::POST, "/v1/keys", Some(body));
            assert_eq!(status, 201, "{key}");
            let key = key["key"].as_str().expect("their key").to_owned();
            world.wait_for("their key to be served from memory", std::time::Duration::from_secs(10), || {
                (code_and_source(&world, &stranger, &key).1 == "memory").then_some(())
            });
            key
        })
        .collect();
    let body = json!({ "name": "second service", "scopes": ["api.*.verify_key"] });
    let (status, second_root) = world.admin(reqwest::Method::POST, "/v1/root-keys", Some(body));
    assert_eq!(status, 201, "{second_root}");
    let second_root = second_root["key"].as_str().expect("the second root key").to_owned();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let refused = std::thread::scope(|scope| {
        for _ in 0..3 {
            scope.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    world.edge_verify(0, &root, json!({ "key": missing }));
                }
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        let refused = held.iter().find(|key| world.edge_verify(0, &root, json!({ "key": key })).0 == 429);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        refused.cloned()
    });
    let refused = refused.expect("none of their keys was refused by the spent budget");
    assert_eq!(code_and_source(&world, &second_root, &refused), not_found("-"), "a 429 was remembered");
}
