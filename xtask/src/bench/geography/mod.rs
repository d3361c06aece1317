//! `cargo xtask bench geography`: Keyward with its processes placed apart by the geography
//! model (`keyward_tests::geography`, relays holding every chunk for a link's delay).
//!
//! In one run, at `metro` and then at `world` (3 regions; region 1's purges and KV writes pass
//! gates a test can shut), each world: the measured round trips through its relays; misses
//! (KV and the authority read together); and hot keys under steady load (each region at
//! `rate` requests a second over `keys` keys), some revoked during it, every answer checked.
//! At `world` only: revocation with signed purges (the regions' stamps), a lost purge, and a
//! third world in tag-only purge mode (every revocation checked against its own bound).

mod revoke;
mod steady;

use std::time::{Duration, Instant};

use keyward_tests::gate::LinkStats;
use keyward_tests::geography::Geography;
use keyward_tests::world::{Options, PurgeMode, RegionPlan, World};

use super::{Build, Figures, percentile, report};
use crate::tools::step;

/// What to measure.
pub struct Plan {
    pub duration: Duration,
    pub keys: usize,
    pub rate: u64,
    pub revocations: usize,
    pub misses: usize,
    pub memory_trust_ms: u64,
    pub tag_delay_ms: u64,
}

/// The API every steady key and miss belongs to.
const MAX_STALENESS_MS: u64 = 1_000;

pub fn run(plan: &Plan) -> anyhow::Result<()> {
    let build = super::builds(None)?.pop().expect("this checkout's build");
    let mut figures = Figures::default();
    for name in ["metro", "world"] {
        let geography = Geography::preset(name)?;
        step(&format!("{}: starting the home, 3 regions and the control plane", geography.describe(3)));
        let options = Options { geography: Some(geography.clone()), ..Options::default() };
        let mut world = build.world_in(&[RegionPlan::Up, RegionPlan::Gated, RegionPlan::Up], options)?;
        round_trips(&world, name, &mut figures)?;
        let api = world.create_api("near-and-far", MAX_STALENESS_MS);
        step(&format!("{name}: {} misses per region", plan.misses));
        let before = relay_stats(&world);
        let misses = revoke::misses(&world, &api, plan.misses)?;
        let per_call = bytes_per_call(&before, &relay_stats(&world));
        region_spread(&mut figures, &format!("{name}_miss"), misses);
        steady(plan, &world, &api, name, &per_call, &mut figures)?;
        if name == "world" {
            far_revocations(plan, &world, &geography, &mut figures)?;
        }
        world.assert_alive();
        world.assert_no_plaintext();
    }
    tag_only(plan, &build, &mut figures)?;
    goals(&figures);
    report(&figures, None);
    Ok(())
}

/// Each relay's round trip as measured: `GET /health` through the control plane's relays
/// against the same route direct (median of 5 each), and the mean hold each region's relay to
/// the home applied so far in each direction.
fn round_trips(world: &World, name: &str, figures: &mut Figures) -> anyhow::Result<()> {
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let median = |url: &str| -> anyhow::Result<f64> {
        let mut times = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            client.get(format!("{url}/health")).send()?.error_for_status()?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        Ok(percentile(&mut times, 0.5))
    };
    let gate = world.authority_gate.as_ref().expect("a geography relays the authority");
    let home = median(&gate.url())? - median(&world.home.url())?;
    println!("{name}: measured round trip control plane → home: {home:.1} ms");
    figures.add(&format!("{name}_rtt_control_home_ms"), home, 1);
    for (i, region) in world.regions.iter().enumerate() {
        let relayed = region.link.as_ref().or(region.gate.as_ref()).expect("a relay").url();
        let rtt = median(&relayed)? - median(&region.spec.url())?;
        let held = region.authority_relay.as_ref().expect("a relay").stats();
        println!(
            "{name}: region {i}: measured round trip control plane → region {rtt:.1} ms; region → home relay held {:.1} ms forward, {:.1} ms back (mean over {} chunks)",
            held.forward.held_ms_mean(),
            held.back.held_ms_mean(),
            held.forward.chunks + held.back.chunks
        );
        figures.add(&format!("{name}_rtt_control_r{i}_ms"), rtt, 1);
    }
    Ok(())
}

/// Every region's relay to the home.
fn relay_stats(world: &World) -> Vec<LinkStats> {
    world.regions.iter().map(|r| r.authority_relay.as_ref().map(|g| g.stats()).unwrap_or_default()).collect()
}

/// Bytes sent towards the home per exchange on each region's relay between two readings: one
/// exchange per authority call while calls do not overlap, as in the sequential misses.
fn bytes_per_call(before: &[LinkStats], after: &[LinkStats]) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            (a.forward.bytes - b.forward.bytes) as f64 / (a.forward.exchanges - b.forward.exchanges).max(1) as f64
        })
        .collect()
}

/// p50, p99 and max per region of `latencies`, printed and added as `<name>_r<i>_<q>_ms`.
fn region_spread(figures: &mut Figures, name: &str, mut latencies: Vec<Vec<f64>>) {
    for (i, times) in latencies.iter_mut().enumerate() {
        let (p50, p99, max) = (percentile(times, 0.5), percentile(times, 0.99), percentile(times, 1.0));
        println!("{name}: region {i}: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms over {}", times.len());
        figures.add(&format!("{name}_r{i}_p50_ms"), p50, 2);
        figures.add(&format!("{name}_r{i}_p99_ms"), p99, 2);
        figures.add(&format!("{name}_r{i}_max_ms"), max, 2);
    }
}

/// The steady load on hot keys, a fifth of them revoked during it; prints and adds per region
/// latency, the share that waited for the authority, authority calls a second, and the check.
fn steady(
    plan: &Plan,
    world: &World,
    api: &str,
    name: &str,
    per_call: &[f64],
    figures: &mut Figures,
) -> anyhow::Result<()> {
    step(&format!("{name}: {} hot keys, {} req/s per region for {:?}", plan.keys, plan.rate, plan.duration));
    let keys = revoke::hot_keys(world, api, plan.keys)?;
    let before = relay_stats(world);
    let load = steady::Load { world, keys: &keys, rate: plan.rate, duration: plan.duration, revoke: plan.keys / 5 };
    let (answers, revoked) = load.run()?;
    let after = relay_stats(world);
    let seconds = plan.duration.as_secs_f64();
    let mut latencies = vec![Vec::new(); world.regions.len()];
    for (i, times) in latencies.iter_mut().enumerate() {
        let mine: Vec<&steady::Answer> = answers.iter().filter(|a| a.region == i).collect();
        times.extend(mine.iter().map(|a| a.latency_ms));
        let waited = mine.iter().filter(|a| a.waited).count() as f64 / mine.len().max(1) as f64;
        let errors = mine.iter().filter(|a| a.status != 200).count();
        let (b, a) = (&before[i].forward, &after[i].forward);
        let exchanges = (a.exchanges - b.exchanges) as f64 / seconds;
        let calls = (a.bytes - b.bytes) as f64 / per_call[i] / seconds;
        println!(
            "{name}: region {i}: {} answers, {errors} errors, {:.1}% waited for the authority; authority calls {calls:.1}/s (estimated from bytes; {exchanges:.1} exchanges/s seen)",
            mine.len(),
            waited * 100.0
        );
        figures.add(&format!("{name}_steady_r{i}_waited_pct"), waited * 100.0, 1);
        figures.add(&format!("{name}_steady_r{i}_authority_calls_per_s"), calls, 1);
        figures.add(&format!("{name}_steady_r{i}_errors"), errors as f64, 0);
    }
    region_spread(figures, &format!("{name}_steady"), latencies);
    let check = steady::check(&answers, &revoked, MAX_STALENESS_MS as f64);
    if check.with_fields < answers.len() {
        println!(
            "{name}: {} of {} answers lack `version`/`decided_at_ms`: those are checked at the time they arrived",
            answers.len() - check.with_fields,
            answers.len()
        );
    }
    println!(
        "{name}: {} revoked during the load; {} answers about them: {} VALID past the bound, {} VALID after the revoke answer within it",
        revoked.len(),
        check.checked,
        check.past_bound,
        check.after_answer
    );
    figures.add(&format!("{name}_steady_valid_past_bound"), check.past_bound as f64, 0);
    figures.add(&format!("{name}_steady_valid_after_answer"), check.after_answer as f64, 0);
    Ok(())
}

/// At `world`: revocation with signed purges, and a lost purge.
fn far_revocations(plan: &Plan, world: &World, geography: &Geography, figures: &mut Figures) -> anyhow::Result<()> {
    step(&format!("world: {} revocations with signed purges", plan.revocations));
    let purges_only = world.create_api("purges-only", 3_600_000);
    let mut times = revoke::signed(world, &purges_only, plan.revocations)?;
    let (p50, p99) = (percentile(&mut times, 0.5), percentile(&mut times, 0.99));
    let slowest = (0..world.regions.len()).map(|i| geography.control_to_region(i).max_ms).fold(0.0, f64::max);
    println!(
        "world: signed purges: call start → last region's stamp p50 {p50:.2} ms, p99 {p99:.2} ms (goal: p99 under {:.0} ms, the slowest control plane → region link {slowest} ms plus 21)",
        slowest + 21.0
    );
    figures.add("world_signed_revocation_p50_ms", p50, 2);
    figures.add("world_signed_revocation_p99_ms", p99, 2);
    figures.add("world_signed_revocation_goal_ms", slowest + 21.0, 0);
    step("world: region 1's purges dropped, 3 revocations");
    let api = world.create_api("lossy", MAX_STALENESS_MS);
    let mut lost = revoke::lost(world, &api, 3)?;
    let worst = percentile(&mut lost, 1.0);
    println!(
        "world: lost purge: region 1 rejected {lost:.0?} ms after the answer (max_staleness {MAX_STALENESS_MS} ms)"
    );
    figures.add("world_lost_purge_max_ms", worst, 0);
    Ok(())
}

/// A world in tag-only purge mode: every revocation polled in every region and checked against
/// its own bound.
fn tag_only(plan: &Plan, build: &Build, figures: &mut Figures) -> anyhow::Result<()> {
    step(&format!(
        "world, tag-only purges (tag delay {} ms, memory trust {} ms): {} revocations",
        plan.tag_delay_ms, plan.memory_trust_ms, plan.revocations
    ));
    let options = Options {
        geography: Some(Geography::preset("world")?),
        purge_mode: PurgeMode::TagOnly(plan.tag_delay_ms),
        ..Options::default()
    };
    let mut world = build.world_in(&[RegionPlan::Up; 3], options)?;
    let api = world.create_api("tag-only", MAX_STALENESS_MS);
    let seen = revoke::tag_only(&world, &api, plan.revocations, plan.tag_delay_ms, plan.memory_trust_ms)?;
    let over = seen.iter().filter(|s| s.worst_overshoot_ms > 0.0).count();
    let mut last: Vec<f64> = seen.iter().map(|s| s.last_reject_ms).collect();
    let mut overshoot: Vec<f64> = seen.iter().map(|s| s.worst_overshoot_ms).collect();
    let (p50, p99) = (percentile(&mut last, 0.5), percentile(&mut last, 0.99));
    let worst = percentile(&mut overshoot, 1.0);
    println!(
        "world, tag-only: call start → last region rejecting p50 {p50:.2} ms, p99 {p99:.2} ms; {over} of {} revocations had a region accept past its bound (purge arrival + {} + {} + 25 ms; worst by {worst:.0} ms)",
        seen.len(),
        plan.tag_delay_ms,
        plan.memory_trust_ms
    );
    figures.add("world_tag_only_last_reject_p50_ms", p50, 2);
    figures.add("world_tag_only_last_reject_p99_ms", p99, 2);
    figures.add("world_tag_only_past_bound", over as f64, 0);
    figures.add("world_tag_only_worst_overshoot_ms", worst, 0);
    world.assert_alive();
    world.assert_no_plaintext();
    Ok(())
}

/// Prints each goal beside what was measured.
fn goals(figures: &Figures) {
    for i in 0..3 {
        let (Some(metro), Some(world)) =
            (figures.get(&format!("metro_steady_r{i}_p99_ms")), figures.get(&format!("world_steady_r{i}_p99_ms")))
        else {
            continue;
        };
        let verdict = if world - metro <= 2.0 { "met" } else { "not met" };
        println!("goal, region {i}: world p99 within 2 ms of metro p99: {world:.2} against {metro:.2} ms: {verdict}");
    }
    if let (Some(p99), Some(goal)) =
        (figures.get("world_signed_revocation_p99_ms"), figures.get("world_signed_revocation_goal_ms"))
    {
        println!(
            "goal: signed-purge revocation p99 {p99:.2} ms under {goal:.0} ms: {}",
            if p99 <= goal { "met" } else { "not met" }
        );
    }
    if let Some(lost) = figures.get("world_lost_purge_max_ms") {
        let verdict = if lost <= MAX_STALENESS_MS as f64 { "met" } else { "not met" };
        println!("goal: lost purge rejected within {MAX_STALENESS_MS} ms of the answer: {lost:.0} ms: {verdict}");
    }
}
