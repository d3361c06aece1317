//! `cargo xtask bench limits`: what credits and rate limits cost a verification, and whether
//! they hold.
//!
//! 1. Throughput: `wrk` on one region's verify route (`--region`, 0 by default) for a key without
//!    credits (plain, warm) and, alternated with it in the same world, a key with a large balance
//!    (every holder leases about once a second of its rate, so it leases again often);
//!    requests/s, p50, p99, and the authority calls the home answered per 1,000 verifications
//!    for each. Each key is idle while the others run: its first 2 s of load are measured
//!    apart (`_after_idle_`: expired copies and shares, the holder's first leases), then the
//!    steady load. `--against <rev>` measures that revision's build the same way in a world of
//!    its own, alternated with this checkout's.
//!    `KEYWARD_GEOGRAPHY=world` places the processes apart (`keyward_tests::geography`).
//! 2. Overspend: verifications spread over 3 regions, 60 in flight, against a balance of
//!    1,000: how many were `VALID` (overspend is what passes the balance, and must be 0), what
//!    was stranded when the balance ran out, and, once the leases expired, what a second round
//!    spent of it.
//! 3. Rate limits: the throughput run above also loads a key with an exact limit and one with a
//!    local limit, both far above what the run spends (so the cost of asking, not refusals, is
//!    measured). Accuracy: a limit of 50 per 10 s, exact then local, hammered from 3 regions
//!    with 60 in flight for 12 s: the most admitted in any sliding 10 s window (by the answers'
//!    `decided_at_ms`) over the limit (exact must be at most 1; local is at most the holders).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::ensure;
use keyward_tests::world::{RegionPlan, World};
use serde_json::json;

use super::load::{self, Load};
use super::{Figures, order, report};
use crate::tools::step;

/// The balance of the throughput key: more than any run spends.
const LARGE: u64 = 1_000_000_000;
/// How long each key's load after its idle time runs before the measured load (counted apart).
const AFTER_IDLE: Duration = Duration::from_secs(2);
/// The balance of the overspend key.
const BALANCE: u64 = 1_000;

/// One build's world and what its keys measured.
struct Side {
    build: super::Build,
    world: World,
    api: String,
    keys: [(&'static str, String); 4],
    base: String,
    loads: [Vec<Load>; 4],
    idle: [Vec<Load>; 4],
    calls: [u64; 4],
    leases: [(u64, u64); 4],
}

pub fn run(
    duration: Duration,
    connections: usize,
    rounds: usize,
    region: usize,
    against: Option<&str>,
) -> anyhow::Result<()> {
    let mut sides = Vec::new();
    for build in super::builds(against)? {
        sides.push(Side::start(build, region)?);
    }
    for round in 0..rounds {
        for s in order(round, sides.len()) {
            sides[s].round(round, rounds, connections, duration, region)?;
        }
    }
    let mut figures: Vec<Figures> = sides.iter().map(Side::figures).collect();
    let current = sides.last().expect("the current build");
    let last = figures.last_mut().expect("the current build");
    overspend(&current.world, &current.api, last)?;
    for mode in ["exact", "local"] {
        accuracy(&current.world, &current.api, mode, last)?;
    }
    match &figures[..] {
        [old, current] => report(current, Some((&sides[0].build, old))),
        [current] => report(current, None),
        _ => unreachable!("one or two builds"),
    }
    Ok(())
}

impl Side {
    fn start(build: super::Build, region: usize) -> anyhow::Result<Side> {
        step(&format!("{}: starting the home, 3 regions (log level error) and the control plane", build.label));
        let world = build.world(&[RegionPlan::Up, RegionPlan::Up, RegionPlan::Up])?;
        match &world.geography {
            Some(geography) => step(&format!("placed apart (KEYWARD_GEOGRAPHY): {}", geography.describe(3))),
            None => step("on loopback (KEYWARD_GEOGRAPHY unset)"),
        }
        let api = world.create_api("bench-limits", 1_000);
        let limit = |mode: &str| json!([{ "name": "api", "limit": LARGE, "duration_ms": 60_000, "mode": mode }]);
        let keys = [
            ("plain", world.create_key(&api, json!({})).1),
            ("credits", world.create_key(&api, json!({ "credits": { "remaining": LARGE } })).1),
            ("exact", world.create_key(&api, json!({ "ratelimits": limit("exact") })).1),
            ("local", world.create_key(&api, json!({ "ratelimits": limit("local") })).1),
        ];
        let base = world.regions[region].spec.url();
        Ok(Side {
            build,
            world,
            api,
            keys,
            base,
            loads: Default::default(),
            idle: Default::default(),
            calls: [0; 4],
            leases: [(0, 0); 4],
        })
    }

    /// Loads each key in turn (the order alternating by round): its first seconds after idle,
    /// then the measured load.
    fn round(
        &mut self,
        round: usize,
        rounds: usize,
        connections: usize,
        duration: Duration,
        region: usize,
    ) -> anyhow::Result<()> {
        let (world, base) = (&self.world, &self.base);
        for i in order(round, self.keys.len()) {
            let (name, key) = &self.keys[i];
            step(&format!(
                "{}, round {}/{rounds}, {name}: wrk -t1 -c{connections} -d{}s on region {region}",
                self.build.label,
                round + 1,
                duration.as_secs()
            ));
            // The key was idle while the others ran (its copies and shares expired): its first
            // seconds are counted apart, as what a burst after quiet costs.
            self.idle[i].push(load::throughput(world, base, &world.root_key, key, connections, AFTER_IDLE)?);
            let (before, held) = (home_calls(world), world.memory_stats(base).credits);
            self.loads[i].push(load::throughput(world, base, &world.root_key, key, connections, duration)?);
            self.calls[i] += home_calls(world) - before;
            let after = world.memory_stats(base).credits;
            self.leases[i].0 += after.leases_waited - held.leases_waited;
            self.leases[i].1 += after.leases_ahead - held.leases_ahead;
        }
        Ok(())
    }

    /// Prints this side's throughput figures and answers them.
    fn figures(&self) -> Figures {
        let mut figures = Figures::default();
        for (i, (name, _)) in self.keys.iter().enumerate() {
            let merged = Load::merge(&self.loads[i]);
            let per = |n: u64| n as f64 * 1_000.0 / merged.requests.max(1) as f64;
            let (per_1000, waited, ahead) = (per(self.calls[i]), per(self.leases[i].0), per(self.leases[i].1));
            println!(
                "{}, {name}: {merged}; authority calls per 1,000 verifications {per_1000:.1}; lease requests \
                 a verification waited for {waited:.1}, asked ahead {ahead:.1} (per 1,000, at the loaded region)",
                self.build.label
            );
            figures.add(&format!("{name}_leases_waited_per_1000"), waited, 1);
            figures.add(&format!("{name}_leases_ahead_per_1000"), ahead, 1);
            figures.add(&format!("{name}_rps"), merged.rps, 0);
            figures.add(&format!("{name}_p50_ms"), merged.p50_ms, 2);
            figures.add(&format!("{name}_p99_ms"), merged.p99_ms, 2);
            figures.add(&format!("{name}_authority_calls_per_1000"), per_1000, 1);
            let idle = Load::merge(&self.idle[i]);
            println!("{}, {name}, its first {} s after being idle: {idle}", self.build.label, AFTER_IDLE.as_secs());
            figures.add(&format!("{name}_after_idle_rps"), idle.rps, 0);
            figures.add(&format!("{name}_after_idle_p99_ms"), idle.p99_ms, 2);
        }
        let plain = Load::merge(&self.loads[0]);
        for (i, name) in [(1, "credits"), (2, "exact"), (3, "local")] {
            figures.add(&format!("{name}_over_plain_rps"), Load::merge(&self.loads[i]).rps / plain.rps, 3);
        }
        figures
    }
}

/// Authority calls the home answered so far: credit calls and record reads.
fn home_calls(world: &World) -> u64 {
    let stats = world.memory_stats(&world.home.url());
    stats.authority_credit_calls_answered + stats.authority_reads_answered
}

/// `count` verifications of `key` over the 3 regions, `in_flight` at a time: how many were VALID.
fn burst(world: &World, key: &str, count: usize, in_flight: usize) -> usize {
    let next = AtomicUsize::new(0);
    let body = json!({ "key": key });
    std::thread::scope(|scope| {
        let callers: Vec<_> = (0..in_flight)
            .map(|_| {
                scope.spawn(|| {
                    let mut valid = 0;
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= count {
                            return valid;
                        }
                        let (status, answer) = world.edge_verify(i % 3, &world.root_key, body.clone());
                        valid += usize::from(status == 200 && answer["code"] == "VALID");
                    }
                })
            })
            .collect();
        callers.into_iter().map(|c| c.join().unwrap_or(0)).sum()
    })
}

/// Spends a balance of [`BALANCE`] from 3 regions at once, and again after the leases expired.
fn overspend(world: &World, api: &str, figures: &mut Figures) -> anyhow::Result<()> {
    let (_, key) = world.create_key(api, json!({ "credits": { "remaining": BALANCE } }));
    let count = BALANCE as usize * 5;
    step(&format!("overspend: {count} verifications over 3 regions, 60 in flight, against a balance of {BALANCE}"));
    let started = Instant::now();
    let first = burst(world, &key, count, 60);
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(2_300));
    let second = burst(world, &key, BALANCE as usize, 30);
    let total = first + second;
    println!(
        "overspend: {first} VALID in {took:.2?} against {BALANCE}; stranded when it ran out {}; \
         after the leases expired {second} more, {total} in all",
        BALANCE as usize - first.min(BALANCE as usize)
    );
    figures.add("overspend", total.saturating_sub(BALANCE as usize) as f64, 0);
    figures.add("stranded_at_run_out", BALANCE.saturating_sub(first as u64) as f64, 0);
    figures.add("stranded_after_expiry", BALANCE.saturating_sub(total as u64) as f64, 0);
    ensure!(total <= BALANCE as usize, "overspent: {total} VALID against a balance of {BALANCE}");
    Ok(())
}

/// Hammers a limit of 50 per 10 s (`mode`) from 3 regions, 60 in flight, for 12 s: the most
/// admitted in any sliding 10 s window, over the limit.
fn accuracy(world: &World, api: &str, mode: &str, figures: &mut Figures) -> anyhow::Result<()> {
    let limits = json!([{ "name": "api", "limit": 50, "duration_ms": 10_000, "mode": mode }]);
    let (_, key) = world.create_key(api, json!({ "ratelimits": limits }));
    step(&format!("accuracy: a {mode} limit of 50 per 10 s, 3 regions, 60 in flight for 12 s"));
    let until = Instant::now() + Duration::from_secs(12);
    let body = json!({ "key": key });
    let mut times: Vec<i64> = std::thread::scope(|scope| {
        let callers: Vec<_> = (0..60)
            .map(|t| {
                let body = &body;
                scope.spawn(move || {
                    let mut valid = Vec::new();
                    let mut i = t;
                    while Instant::now() < until {
                        let (status, answer) = world.edge_verify(i % 3, &world.root_key, body.clone());
                        if status == 200 && answer["code"] == "VALID" {
                            valid.extend(answer["decided_at_ms"].as_i64());
                        }
                        i += 1;
                    }
                    valid
                })
            })
            .collect();
        callers.into_iter().flat_map(|c| c.join().unwrap_or_default()).collect()
    });
    times.sort_unstable();
    let most = times
        .iter()
        .map(|from| times.partition_point(|t| *t <= from + 10_000) - times.partition_point(|t| t < from))
        .max()
        .unwrap_or(0);
    let ratio = most as f64 / 50.0;
    println!("{mode}: {} VALID in 12 s; most in any 10 s window {most}: admitted/limit {ratio:.2}", times.len());
    figures.add(&format!("{mode}_admitted_over_limit"), ratio, 2);
    ensure!(mode != "exact" || most <= 50, "an exact limit of 50 admitted {most} in one 10 s window");
    Ok(())
}
