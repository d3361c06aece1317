//! One tenant cannot hurt another through what the edge keeps: isolate memory for copies is
//! bounded by bytes, measured as the isolate's own wasm memory, with the largest records a key
//! may have.

use keyward_shared::internal::{MemoryStats, STATS_PATH};
use keyward_tests::now_ms;
use keyward_tests::world::{Options, RegionPlan, World};
use serde_json::json;

const BUDGET: usize = 4 << 20;

fn stats(world: &World, n: u32) -> MemoryStats {
    let nonce = format!("memory-stats-nonce-{n:04}");
    let (status, text) = world.signed_post(&world.regions[0].spec.url(), STATS_PATH, &json!({}), now_ms(), &nonce);
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).expect("memory stats")
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
    let before = stats(&world, 0);
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
    let after = stats(&world, 1);
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
