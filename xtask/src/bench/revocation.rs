//! `cargo xtask bench revocation`: how soon the last of 3 regions rejects a revoked key that
//! every region held in memory (under an API trusting copies for an hour, so only the purges can
//! explain a prompt rejection), polled and unpolled; how soon a region whose purges are dropped
//! rejects anyway; and one region's verify throughput warm, confirming every copy, and on misses,
//! beside the KV-only baseline edge.
//!
//! How the time to the last region rejecting is read: each region stamps its purge
//! acknowledgement with `applied_at_ms`, the moment it began answering from the revoked record,
//! by its clock, which on one machine is the bench's. Each stamp is checked twice: every region
//! answers `REVOKED` right after the call, and in the polled run a poll sent after its region's
//! stamp that still got `VALID` counts as a violation.

use std::time::{Duration, Instant};

use anyhow::Context;
use keyward_tests::world::{RegionPlan, World};
use serde_json::json;

use super::load::{self, Load};
use super::{Build, Figures, epoch_ms, order, percentile, report};
use crate::tools::step;
use keyward_tests::baseline::Baseline;

/// What to measure, per build.
pub struct Plan {
    /// Revocations to time, polled and quiet each, split over the rounds.
    pub keys: usize,
    /// Load per throughput route and round.
    pub duration: Duration,
    /// Pause between one poller's requests.
    pub poll: Duration,
    pub rounds: usize,
}

/// One build's world of 3 regions, an API whose copies are trusted for an hour, and what its
/// revocations measured.
struct Side {
    label: String,
    world: World,
    api: String,
    stats: Revocations,
}

#[derive(Default)]
struct Revocations {
    /// Polled run: revoke call start to the last poller seeing `REVOKED`, and to the last stamp.
    polled: Vec<f64>,
    polled_stamps: Vec<f64>,
    polled_call: Vec<f64>,
    authority_ack: Vec<f64>,
    region_ack: Vec<f64>,
    polls: usize,
    /// Polls sent after their region's stamp that were accepted.
    violations: usize,
    /// Quiet run: revoke call start to the last stamp, and the whole call.
    quiet_stamps: Vec<f64>,
    quiet_call: Vec<f64>,
}

/// A region whose verify throughput is measured: a side's region 0, or the KV-only baseline
/// beside the current side (whose keys it gets copies of).
struct Target {
    label: String,
    side: usize,
    url: String,
    kv_only: bool,
    warm_key: String,
    /// A key of an API with `max_staleness_ms` 1: every request confirms the copy.
    stale_key: String,
    warm: Vec<Load>,
    confirm: Vec<Load>,
    miss: Vec<Load>,
}

pub fn run(plan: &Plan, against: Option<&str>) -> anyhow::Result<()> {
    let builds = super::builds(against)?;
    let baseline_main = crate::tools::build_baseline()?;
    let mut sides = Vec::new();
    for build in &builds {
        step(&format!("{}: starting the home, 3 regions (log level error) and the control plane", build.label));
        let world = build.world(&[RegionPlan::Up, RegionPlan::Up, RegionPlan::Up])?;
        let api = world.create_api("propagation", 3_600_000);
        sides.push(Side { label: build.label.clone(), world, api, stats: Revocations::default() });
    }
    let current = sides.len() - 1;
    step("starting the KV-only baseline edge beside the current build's regions");
    let misses = vec![("CALLER_MISSES_PER_SECOND".to_owned(), "1000000".to_owned())];
    let baseline = Baseline::start(&sides[current].world, baseline_main, "kv-only", misses)?;
    let mut targets = targets(&sides, &baseline)?;
    let per_round = plan.keys.div_ceil(plan.rounds).max(1);
    for round in 0..plan.rounds {
        for i in order(round, sides.len()) {
            step(&format!(
                "round {}/{}, {}: {per_round} revocations polled, then quiet",
                round + 1,
                plan.rounds,
                sides[i].label
            ));
            polled(&mut sides[i], per_round, plan.poll)?;
            quiet(&mut sides[i], per_round)?;
        }
        for i in order(round, targets.len()) {
            step(&format!(
                "round {}/{}, {}: throughput warm, confirming, misses",
                round + 1,
                plan.rounds,
                targets[i].label
            ));
            throughputs(&mut targets[i], &sides, &baseline, plan.duration)?;
        }
    }
    drop(baseline);
    let mut figures = Vec::new();
    // The plaintext scan runs on the lossy worlds below: these hold thousands of keys.
    for side in &mut sides {
        side.world.assert_alive();
        figures.push(revocation_figures(side));
    }
    drop(sides);
    let lost = lost_purges(&builds)?;
    for (i, figures) in figures.iter_mut().enumerate() {
        figures.add("lost_purge_reject_ms", lost[i], 0);
        throughput_figures(figures, targets.iter().filter(|t| t.side == i));
    }
    match &figures[..] {
        [old, current] => report(current, Some((&builds[0], old))),
        [current] => report(current, None),
        _ => unreachable!("one or two builds"),
    }
    Ok(())
}

/// Every side's region 0, and the baseline beside the current side, each with a warm key and a
/// key confirmed on every request.
fn targets(sides: &[Side], baseline: &Baseline) -> anyhow::Result<Vec<Target>> {
    let mut targets = Vec::new();
    for (i, side) in sides.iter().enumerate() {
        let world = &side.world;
        let warm_key = world.create_key(&side.api, json!({})).1;
        let confirming = world.create_api("confirming", 1);
        let stale_key = world.create_key(&confirming, json!({})).1;
        let target = |label: String, url: String, kv_only: bool| Target {
            label,
            side: i,
            url,
            kv_only,
            warm_key: warm_key.clone(),
            stale_key: stale_key.clone(),
            warm: Vec::new(),
            confirm: Vec::new(),
            miss: Vec::new(),
        };
        targets.push(target(side.label.clone(), world.regions[0].spec.url(), false));
        if i == sides.len() - 1 {
            settle(world)?;
            baseline.copy_keys(world, &[warm_key.clone(), stale_key.clone()])?;
            targets.push(target("KV-only baseline".into(), baseline.url(), true));
        }
    }
    Ok(targets)
}

/// Creates `count` keys and makes each hot (served from memory) in all 3 regions.
fn hot_keys(side: &Side, count: usize) -> anyhow::Result<Vec<(String, String)>> {
    let world = &side.world;
    let keys: Vec<(String, String)> = (0..count).map(|_| world.create_key(&side.api, json!({}))).collect();
    for (_, key) in &keys {
        for region in 0..world.regions.len() {
            world.edge_code(region, key);
            let (code, source) = world.edge_code(region, key);
            anyhow::ensure!(
                code == "VALID" && source == "memory",
                "{}: key not hot in region {region}: {code} from {source}",
                side.label
            );
        }
    }
    Ok(keys)
}

/// Revokes `count` hot keys one by one, every region polled every `poll` until it rejects.
fn polled(side: &mut Side, count: usize, poll: Duration) -> anyhow::Result<()> {
    let keys = hot_keys(side, count)?;
    let world = &side.world;
    let urls: Vec<String> = world.regions.iter().map(|r| format!("{}/v1/keys/verify", r.spec.url())).collect();
    for (id, key) in &keys {
        let body = serde_json::to_vec(&json!({ "key": key }))?;
        let (start, start_ms) = (Instant::now(), epoch_ms());
        let (seen, answer) = std::thread::scope(|scope| {
            let pollers: Vec<_> = urls
                .iter()
                .map(|url| scope.spawn(|| poll_until_revoked(url, &world.root_key, &body, start, poll)))
                .collect();
            let answer = revoke(world, id);
            let seen: Vec<Polled> = pollers.into_iter().map(|p| p.join().expect("poller")).collect();
            (seen, answer)
        });
        let answer = answer?;
        anyhow::ensure!(seen.iter().all(|(at, _)| *at < Duration::from_secs(30)), "a region never rejected {id}");
        let stats = &mut side.stats;
        stats.polled_call.push(start.elapsed().as_secs_f64() * 1e3);
        stats.authority_ack.push(answer["authority"]["latency_ms"].as_f64().unwrap_or(f64::NAN));
        for region in answer["regions"].as_array().into_iter().flatten() {
            stats.region_ack.push(region["latency_ms"].as_f64().unwrap_or(f64::NAN));
        }
        let stamps = applied_stamps(&answer)?;
        stats.polled_stamps.push(stamps.iter().copied().fold(0, u64::max) as f64 - start_ms);
        for ((_, sent), stamp) in seen.iter().zip(&stamps) {
            stats.polls += sent.len();
            // The stamp is in whole milliseconds: a poll counts against it from the next one.
            stats.violations += sent.iter().filter(|(at, valid)| *valid && *at >= *stamp as f64 + 1.0).count();
        }
        stats.polled.push(seen.iter().map(|(at, _)| *at).max().unwrap_or_default().as_secs_f64() * 1e3);
    }
    Ok(())
}

/// One poller's view of a revocation: when it first saw `REVOKED` (from the call's start), and
/// every poll it sent (by this machine's clock) with whether it was accepted.
type Polled = (Duration, Vec<(f64, bool)>);

fn poll_until_revoked(url: &str, root: &str, body: &[u8], start: Instant, pause: Duration) -> Polled {
    let client = reqwest::blocking::Client::new();
    let mut sent = Vec::new();
    loop {
        let sent_ms = epoch_ms();
        let answer: serde_json::Value =
            client.post(url).bearer_auth(root).body(body.to_vec()).send().and_then(|r| r.json()).unwrap_or_default();
        sent.push((sent_ms, answer["valid"] == true));
        if answer["code"] == "REVOKED" || start.elapsed() > Duration::from_secs(30) {
            return (start.elapsed(), sent);
        }
        // A pause between polls keeps three pollers from starving the 2 cores.
        std::thread::sleep(pause);
    }
}

/// The revoke call for key `id`; every region must have acknowledged it.
pub(super) fn revoke(world: &World, id: &str) -> anyhow::Result<serde_json::Value> {
    let (status, answer) = world.admin(reqwest::Method::POST, &format!("/v1/keys/{id}/revoke"), None);
    anyhow::ensure!(status == 200, "revoke answered {status}: {answer}");
    Ok(answer)
}

/// Revokes `count` more hot keys with no pollers competing for the cores: the regions' stamps
/// give the time to the last region rejecting, checked right after with a verification in every
/// region. The call itself waits for the authority and every acknowledgement: an upper bound.
fn quiet(side: &mut Side, count: usize) -> anyhow::Result<()> {
    let keys = hot_keys(side, count)?;
    for (id, key) in &keys {
        let (start, start_ms) = (Instant::now(), epoch_ms());
        let answer = revoke(&side.world, id)?;
        side.stats.quiet_call.push(start.elapsed().as_secs_f64() * 1e3);
        let stamps = applied_stamps(&answer)?;
        for region in 0..stamps.len() {
            anyhow::ensure!(
                side.world.edge_code(region, key).0 == "REVOKED",
                "region {region} acknowledged but accepts"
            );
        }
        side.stats.quiet_stamps.push(stamps.iter().copied().fold(0, u64::max) as f64 - start_ms);
    }
    Ok(())
}

/// Each region's `applied_at_ms` from a revoke answer, in the answer's (configuration) order;
/// every region must have acknowledged.
pub(super) fn applied_stamps(answer: &serde_json::Value) -> anyhow::Result<Vec<u64>> {
    answer["regions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|region| {
            anyhow::ensure!(region["acknowledged"] == true, "a region did not acknowledge: {answer}");
            region["applied_at_ms"].as_u64().with_context(|| format!("no applied_at_ms in {answer}"))
        })
        .collect()
}

/// One round of a target's throughput: warm, every copy confirmed, every request a miss (on
/// fresh keys, as many as the confirming rate says the load needs).
fn throughputs(target: &mut Target, sides: &[Side], baseline: &Baseline, duration: Duration) -> anyhow::Result<()> {
    let side = &sides[target.side];
    let (world, root, url) = (&side.world, &side.world.root_key, &target.url);
    target.warm.push(load::throughput(world, url, root, &target.warm_key, 2, duration)?);
    let confirm = load::throughput(world, url, root, &target.stale_key, 2, duration)?;
    let count = load::keys_for_misses(confirm.rps, duration);
    target.confirm.push(confirm);
    // Keys never asked for anywhere yet, each asked for once: every request is a miss.
    let cold: Vec<String> = (0..count).map(|_| world.create_key(&side.api, json!({})).1).collect();
    settle(world)?;
    if target.kv_only {
        baseline.copy_keys(world, &cold)?;
    }
    let miss = load::misses(world, url, root, &cold, duration)?;
    if miss.requests as usize >= cold.len() {
        println!("{}: the miss load used all {} keys in {:.2} s", target.label, cold.len(), miss.seconds);
    }
    target.miss.push(miss);
    Ok(())
}

/// Waits until the control plane has delivered every change to the authority and every
/// region's KV.
pub(super) fn settle(world: &World) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = world.regions_status();
        let pending = |v: &serde_json::Value| v["pending"].as_u64().unwrap_or(0);
        let regions = status["regions"].as_array().into_iter().flatten();
        let left =
            pending(&status["authority"]) + regions.map(|r| pending(&r["kv"]) + pending(&r["purge"])).sum::<u64>();
        if left == 0 {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{left} deliveries still pending after 120 s: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// For each build, a world whose region 1 has its purges dropped (a shut gate in front of its
/// purge route; `max_staleness_ms` 1000): the longest time until it rejects a revoked key
/// anyway, over 5 revocations, alternating between the builds.
fn lost_purges(builds: &[Build]) -> anyhow::Result<Vec<f64>> {
    step("a region whose purges are dropped: time until it rejects anyway (max_staleness 1000 ms)");
    let mut worlds = Vec::new();
    for build in builds {
        let world = build.world(&[RegionPlan::Up, RegionPlan::Gated])?;
        let api = world.create_api("lossy", 1_000);
        worlds.push((world, api, Vec::new()));
    }
    for round in 0..5 {
        for i in order(round, worlds.len()) {
            let (world, api, lost) = &mut worlds[i];
            lost.push(lost_purge(world, api)?);
        }
    }
    let mut max = Vec::new();
    for (build, (mut world, _, mut lost)) in builds.iter().zip(worlds) {
        let worst = percentile(&mut lost, 1.0);
        println!(
            "{}: lost purge: rejected after {lost:.0?} ms (max {worst:.0} ms; max_staleness 1000 ms)",
            build.label
        );
        world.assert_no_plaintext();
        max.push(worst);
    }
    Ok(max)
}

/// One revocation whose purge to region 1 is dropped: milliseconds from the call's start until
/// region 1 rejects the key.
fn lost_purge(world: &World, api: &str) -> anyhow::Result<f64> {
    let gate = world.regions[1].gate.as_ref().context("region 1 is gated")?;
    let (id, key) = world.create_key(api, json!({}));
    world.edge_code(1, &key);
    anyhow::ensure!(world.edge_code(1, &key).1 == "memory", "not hot");
    gate.set_open(false);
    let start = Instant::now();
    let (status, answer) = world.admin(reqwest::Method::POST, &format!("/v1/keys/{id}/revoke"), None);
    anyhow::ensure!(status == 200 && answer["regions"][1]["acknowledged"] == false, "purge was not lost: {answer}");
    while world.edge_code(1, &key).0 != "REVOKED" {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "never rejected");
    }
    let elapsed = start.elapsed().as_secs_f64() * 1e3;
    gate.set_open(true);
    Ok(elapsed)
}

/// Prints a side's revocation figures and answers them.
fn revocation_figures(side: &mut Side) -> Figures {
    let (label, s) = (&side.label, &mut side.stats);
    let mut f = Figures::default();
    let add3 = |f: &mut Figures, name: &str, values: &mut Vec<f64>| {
        for (suffix, q) in [("p50", 0.50), ("p99", 0.99), ("max", 1.0)] {
            f.add(&format!("{name}_{suffix}_ms"), percentile(values, q), 2);
        }
    };
    add3(&mut f, "revocation", &mut s.quiet_stamps);
    add3(&mut f, "revoke_call", &mut s.quiet_call);
    add3(&mut f, "polled_revocation", &mut s.polled);
    f.add("polled_call_p50_ms", percentile(&mut s.polled_call, 0.50), 2);
    f.add("polled_authority_ack_p50_ms", percentile(&mut s.authority_ack, 0.50), 2);
    f.add("polled_region_ack_p50_ms", percentile(&mut s.region_ack, 0.50), 2);
    f.add("polled_stamp_p50_ms", percentile(&mut s.polled_stamps, 0.50), 2);
    f.add("polled_stamp_p99_ms", percentile(&mut s.polled_stamps, 0.99), 2);
    f.add("stamp_violations", s.violations as f64, 0);
    println!(
        "{label}: quiet: to the last region's stamp over {} revocations: {}; whole call: {}",
        s.quiet_stamps.len(),
        spread(&f, "revocation"),
        spread(&f, "revoke_call")
    );
    println!(
        "{label}: polled: to the last of 3 regions answering REVOKED over {} revocations: {}; their stamps p50 {:.2} ms; {} of {} polls accepted the key after its region's stamp",
        s.polled.len(),
        spread(&f, "polled_revocation"),
        f.get("polled_stamp_p50_ms").unwrap_or(f64::NAN),
        s.violations,
        s.polls
    );
    f
}

fn spread(f: &Figures, name: &str) -> String {
    let at = |suffix: &str| f.get(&format!("{name}_{suffix}_ms")).unwrap_or(f64::NAN);
    format!("p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms", at("p50"), at("p99"), at("max"))
}

/// Prints the throughput of a side's targets (its region 0, and the baseline beside the current
/// side) and adds their figures.
fn throughput_figures<'a>(f: &mut Figures, targets: impl Iterator<Item = &'a Target>) {
    for target in targets {
        let (warm, confirm, miss) =
            (Load::merge(&target.warm), Load::merge(&target.confirm), Load::merge(&target.miss));
        let (prefix, confirm_name) = if target.kv_only { ("kv_only", "kv_reread") } else { ("verify", "confirm") };
        println!("{}: verify, warm copy in memory:          {warm}", target.label);
        println!("{}: verify, every copy stale, confirmed:  {confirm}", target.label);
        println!("{}: verify, every request a miss:         {miss}", target.label);
        for (name, load) in [("warm", &warm), (confirm_name, &confirm), ("miss", &miss)] {
            f.add(&format!("{prefix}_{name}_rps"), load.rps, 0);
            // Answers that were `VALID`: a fail-closed answer is quick, and counts in `rps`.
            f.add(
                &format!("{prefix}_{name}_valid_rps"),
                load.requests.saturating_sub(load.not_valid) as f64 / load.seconds,
                0,
            );
            f.add(&format!("{prefix}_{name}_p99_ms"), load.p99_ms, 2);
        }
    }
    if let (Some(miss), Some(kv_miss)) = (f.get("verify_miss_rps"), f.get("kv_only_miss_rps")) {
        f.add("miss_over_kv_only", miss / kv_miss, 2);
    }
    if let (Some(confirm), Some(reread)) = (f.get("verify_confirm_rps"), f.get("kv_only_kv_reread_rps")) {
        f.add("confirm_over_kv_only_reread", confirm / reread, 2);
    }
}
