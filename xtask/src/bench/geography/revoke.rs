//! Revocation with the regions far apart: signed purges (the regions' stamps), tag-only purges
//! with memory trust (every region polled until it rejects, each revocation checked against
//! its own modelled purge delay), a lost purge, and misses.

use std::time::{Duration, Instant};

use anyhow::Context;
use keyward_tests::world::World;
use serde_json::json;

use super::super::epoch_ms;
use super::super::revocation::{applied_stamps, revoke, settle};

/// Creates `count` keys of `api` and makes each hot (served from memory) in every region.
pub fn hot_keys(world: &World, api: &str, count: usize) -> anyhow::Result<Vec<(String, String)>> {
    let keys: Vec<(String, String)> = (0..count).map(|_| world.create_key(api, json!({}))).collect();
    settle(world)?;
    for (_, key) in &keys {
        for region in 0..world.regions.len() {
            make_hot(world, region, key)?;
        }
    }
    Ok(keys)
}

/// Verifies `key` in `region` until it is served from memory. A region far from the home may
/// answer `UNAVAILABLE` when its authority call misses the deadline on a busy machine: such an
/// answer is retried (for 20 s at most), as a caller would.
pub fn make_hot(world: &World, region: usize, key: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let (status, answer) = world.edge_verify(region, &world.root_key, json!({ "key": key }));
        if status == 200 && answer["source"] == "memory" {
            anyhow::ensure!(answer["code"] == "VALID", "region {region}: {answer}");
            return Ok(());
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "region {region} never held the key: {answer}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Makes `key` hot in every region at once, so that every copy is younger than a miss's round
/// trip when the caller revokes it right after.
fn hot_now(world: &World, key: &str) -> anyhow::Result<()> {
    std::thread::scope(|scope| {
        let regions: Vec<_> =
            (0..world.regions.len()).map(|region| scope.spawn(move || make_hot(world, region, key))).collect();
        regions.into_iter().try_for_each(|r| r.join().expect("a region's warm-up"))
    })
}

/// Signed purges: from each revoke call's start to the last region's stamp (ms), every region
/// checked to answer `REVOKED` right after the call.
pub fn signed(world: &World, api: &str, count: usize) -> anyhow::Result<Vec<f64>> {
    let mut times = Vec::new();
    for (id, key) in hot_keys(world, api, count)? {
        let start_ms = epoch_ms();
        let answer = revoke(world, &id)?;
        let stamps = applied_stamps(&answer)?;
        for region in 0..stamps.len() {
            anyhow::ensure!(world.edge_code(region, &key).0 == "REVOKED", "region {region} acknowledged but accepts");
        }
        times.push(stamps.iter().copied().fold(0, u64::max) as f64 - start_ms);
    }
    Ok(times)
}

/// One tag-only revocation as the regions saw it.
pub struct TagOnly {
    /// From the call's start to the last region's first `REVOKED`.
    pub last_reject_ms: f64,
    /// The largest overshoot of a region's last `VALID` past its bound (negative: within).
    pub worst_overshoot_ms: f64,
}

/// Tag-only purges: each region polled every 10 ms from the call's start until it answers
/// `REVOKED`. A region's bound is its purge's arrival (its acknowledgement's stamp) plus the
/// tag delay (together, the revocation's modelled purge delay) plus memory trust plus 25 ms; its
/// last `VALID` (decided at `decided_at_ms`, else the answer's arrival) must come before it.
pub fn tag_only(
    world: &World,
    api: &str,
    count: usize,
    tag_delay_ms: u64,
    trust_ms: u64,
) -> anyhow::Result<Vec<TagOnly>> {
    let mut seen = Vec::new();
    let keys: Vec<(String, String)> = (0..count).map(|_| world.create_key(api, json!({}))).collect();
    for (id, key) in keys {
        let key = key.as_str();
        hot_now(world, key)?;
        let (start, start_ms) = (Instant::now(), epoch_ms());
        let (polls, answer) = std::thread::scope(|scope| {
            let pollers: Vec<_> = (0..world.regions.len())
                .map(|r| scope.spawn(move || poll_until_revoked(world, r, key, start)))
                .collect();
            let answer = revoke(world, &id);
            (pollers.into_iter().map(|p| p.join().expect("a poller")).collect::<Vec<_>>(), answer)
        });
        let stamps = applied_stamps(&answer?)?;
        let mut revocation = TagOnly { last_reject_ms: 0.0, worst_overshoot_ms: f64::MIN };
        for ((rejected_ms, last_valid_ms), stamp) in polls.into_iter().zip(stamps) {
            anyhow::ensure!(rejected_ms.is_finite(), "a region never rejected {id}");
            revocation.last_reject_ms = revocation.last_reject_ms.max(rejected_ms - start_ms);
            let bound = stamp as f64 + (tag_delay_ms + trust_ms + 25) as f64;
            revocation.worst_overshoot_ms = revocation.worst_overshoot_ms.max(last_valid_ms - bound);
        }
        seen.push(revocation);
    }
    Ok(seen)
}

/// Polls region `region` every 10 ms until it answers `REVOKED` (at most 5 s): when that answer
/// arrived, and when the last `VALID` was decided (Unix ms; `-inf` if none).
fn poll_until_revoked(world: &World, region: usize, key: &str, start: Instant) -> (f64, f64) {
    let mut last_valid = f64::NEG_INFINITY;
    while start.elapsed() < Duration::from_secs(5) {
        let (status, answer) = world.edge_verify(region, &world.root_key, json!({ "key": key }));
        let arrived = epoch_ms();
        if status == 200 && answer["code"] == "REVOKED" {
            return (arrived, last_valid);
        }
        if answer["valid"] == true {
            last_valid = answer["decided_at_ms"].as_u64().map_or(arrived, |ms| ms as f64);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (f64::NAN, last_valid)
}

/// Region 1's purges dropped (its gate shut), for each revocation: from the revoke answer to
/// region 1's last `VALID` (decided at `decided_at_ms`, else the answer's arrival), which the
/// promise bounds by `max_staleness_ms`, and to its first `REVOKED` (ms).
pub fn lost(world: &World, api: &str, count: usize) -> anyhow::Result<Vec<(f64, f64)>> {
    let gate = world.regions[1].gate.as_ref().context("region 1 is gated")?;
    let mut times = Vec::new();
    let keys: Vec<(String, String)> = (0..count).map(|_| world.create_key(api, json!({}))).collect();
    for (id, key) in keys {
        make_hot(world, 1, &key)?;
        gate.set_open(false);
        let answer = revoke(world, &id);
        let answered_ms = epoch_ms();
        let rejected = answer.and_then(|answer| {
            anyhow::ensure!(answer["regions"][1]["acknowledged"] == false, "the purge was not lost: {answer}");
            let mut last_valid = f64::NEG_INFINITY;
            loop {
                let (status, answer) = world.edge_verify(1, &world.root_key, json!({ "key": key }));
                let arrived = epoch_ms();
                if status == 200 && answer["code"] == "REVOKED" {
                    return Ok((last_valid - answered_ms, arrived - answered_ms));
                }
                if answer["valid"] == true {
                    last_valid = answer["decided_at_ms"].as_u64().map_or(arrived, |ms| ms as f64);
                }
                anyhow::ensure!(arrived - answered_ms < 10_000.0, "never rejected");
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        // Opened only now: the retrier's purge must not be what made it reject.
        gate.set_open(true);
        times.push(rejected?);
    }
    Ok(times)
}

/// Misses: `count` keys no region has seen, each asked for once in every region (KV and the
/// authority read together), region by region after a warm-up that makes sure the caller's
/// root key is confirmed (a busy caller's is: it is confirmed again in the background), so only
/// the key is fetched; answers each region's latencies (ms) and its `UNAVAILABLE` answers (the
/// authority's deadline missed), which are not timed.
pub fn misses(world: &World, api: &str, count: usize) -> anyhow::Result<(Vec<Vec<f64>>, Vec<usize>)> {
    let keys: Vec<(String, String)> = (0..count).map(|_| world.create_key(api, json!({}))).collect();
    let warm = world.create_key(api, json!({})).1;
    settle(world)?;
    let mut latencies = vec![Vec::new(); world.regions.len()];
    let mut unavailable = vec![0; world.regions.len()];
    for (region, times) in latencies.iter_mut().enumerate() {
        make_hot(world, region, &warm)?;
        for (_, key) in &keys {
            let start = Instant::now();
            let (status, answer) = world.edge_verify(region, &world.root_key, json!({ "key": key }));
            let took = start.elapsed().as_secs_f64() * 1e3;
            // Either form: the caller's root key or the key could not be confirmed in time.
            if answer["error"]["code"] == "UNAVAILABLE" || answer["code"] == "UNAVAILABLE" {
                unavailable[region] += 1;
                continue;
            }
            let (code, source) = (&answer["code"], &answer["source"]);
            anyhow::ensure!(code == "VALID" && source != "memory", "region {region}: not a miss: {status} {answer}");
            times.push(took);
        }
    }
    Ok((latencies, unavailable))
}
