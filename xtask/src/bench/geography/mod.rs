//! `cargo xtask bench geography`: Keyward with its processes placed apart by the geography
//! model (`keyward_tests::geography`, relays holding every chunk for a link's delay).
//!
//! In one run, a world at `metro` and one at `world` (3 regions each; region 1's purges and KV
//! writes pass gates a test can shut), each: the measured round trips through its relays;
//! misses (KV and the authority read together); and hot keys under steady load (each region at
//! `rate` requests a second over `keys` keys), some revoked during it, every answer checked.
//! The steady load runs in two rounds per world, alternating which goes first, so that the
//! machine's noise falls on both.
//! At `world` only: revocation with signed purges (the regions' stamps), a lost purge, and a
//! third world in tag-only purge mode (every revocation checked against its own bound).

mod revoke;
mod steady;

use std::time::{Duration, Instant};

use keyward_tests::gate::LinkStats;
use keyward_tests::geography::Geography;
use keyward_tests::world::{Options, PurgeMode, RegionPlan, World};

use super::{Build, Figures, order, percentile, report};
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
    let mut places = Vec::new();
    for name in ["metro", "world"] {
        let geography = Geography::preset(name)?;
        step(&format!("{}: starting the home, 3 regions and the control plane", geography.describe(3)));
        let options = Options { geography: Some(geography.clone()), ..Options::default() };
        let world = build.world_in(&[RegionPlan::Up, RegionPlan::Gated, RegionPlan::Up], options)?;
        round_trips(&world, name, &mut figures)?;
        let api = world.create_api("near-and-far", MAX_STALENESS_MS);
        step(&format!("{name}: {} misses per region", plan.misses));
        let (misses, unavailable) = revoke::misses(&world, &api, plan.misses)?;
        region_spread(&mut figures, &format!("{name}_miss"), misses);
        for (i, count) in unavailable.iter().enumerate() {
            println!("{name}_miss: region {i}: {count} answered UNAVAILABLE (not timed)");
            figures.add(&format!("{name}_miss_r{i}_unavailable"), *count as f64, 0);
        }
        held(&world, name);
        places.push(Place { name, geography, world, api, segments: Vec::new() });
    }
    for round in 0..ROUNDS {
        for i in order(round, places.len()) {
            let place = &mut places[i];
            step(&format!(
                "round {}/{ROUNDS}, {}: {} hot keys, {} req/s per region for {:?}",
                round + 1,
                place.name,
                plan.keys,
                plan.rate,
                plan.duration / ROUNDS as u32
            ));
            let segment = segment(plan, &place.world, &place.api)?;
            place.segments.push(segment);
        }
    }
    for place in &mut places {
        steady_figures(place, &mut figures);
        if place.name == "world" {
            far_revocations(plan, &place.world, &place.geography, &mut figures)?;
        }
        place.world.assert_alive();
        place.world.assert_no_plaintext();
    }
    drop(places);
    tag_only(plan, &build, &mut figures)?;
    goals(&figures);
    report(&figures, None);
    Ok(())
}

/// Rounds of steady load, alternating which geography goes first; each gets a share of the time.
const ROUNDS: usize = 2;

/// One geography's world and what its steady load measured.
struct Place {
    name: &'static str,
    geography: Geography,
    world: World,
    api: String,
    segments: Vec<Segment>,
}

/// One round of steady load: its answers, its revocations, and what each region's relay to the
/// home carried towards the home during it (chunks, bytes).
struct Segment {
    answers: Vec<steady::Answer>,
    revoked: Vec<steady::Revoked>,
    towards_home: Vec<(u64, u64)>,
    seconds: f64,
}

/// The round trip through each of the control plane's relays as measured: `GET /health`
/// through the relay against the same route direct (median of 5 each).
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
        println!("{name}: region {i}: measured round trip control plane → region {rtt:.1} ms");
        figures.add(&format!("{name}_rtt_control_r{i}_ms"), rtt, 1);
    }
    Ok(())
}

/// Prints the mean hold each region's relay to the home applied so far, each way: one binding
/// call crosses it `BINDING_ROUND_TRIPS` times each way.
fn held(world: &World, name: &str) {
    for (i, stats) in relay_stats(world).iter().enumerate() {
        println!(
            "{name}: region {i} → home relay held each chunk {:.1} ms forward, {:.1} ms back (mean over {} chunks)",
            stats.forward.held_ms_mean(),
            stats.back.held_ms_mean(),
            stats.forward.chunks + stats.back.chunks
        );
    }
}

/// Every region's relay to the home.
fn relay_stats(world: &World) -> Vec<LinkStats> {
    world.regions.iter().map(|r| r.authority_relay.as_ref().map(|g| g.stats()).unwrap_or_default()).collect()
}

/// Chunks a region sends towards the home per Durable Object call, seen in the relay's trace:
/// the request, the answer to the response body's stream, the release. Chunks written together
/// under load arrive as one, so calls counted as chunks / 3 are a lower bound.
const CHUNKS_PER_CALL: f64 = 3.0;

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

/// One round of steady load on fresh hot keys, a fifth of them revoked during it.
fn segment(plan: &Plan, world: &World, api: &str) -> anyhow::Result<Segment> {
    let keys = revoke::hot_keys(world, api, plan.keys)?;
    let duration = plan.duration / ROUNDS as u32;
    let before = relay_stats(world);
    let load = steady::Load { world, keys: &keys, rate: plan.rate, duration, revoke: plan.keys / 5 };
    let (answers, revoked) = load.run()?;
    let after = relay_stats(world);
    let towards_home = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a.forward.chunks - b.forward.chunks, a.forward.bytes - b.forward.bytes))
        .collect();
    Ok(Segment { answers, revoked, towards_home, seconds: duration.as_secs_f64() })
}

/// Prints and adds a geography's steady figures over its rounds: per region latency, errors,
/// the share that waited for the authority, authority calls a second; and the answers' check.
fn steady_figures(place: &Place, figures: &mut Figures) {
    let name = place.name;
    let seconds: f64 = place.segments.iter().map(|s| s.seconds).sum();
    let answers: Vec<&steady::Answer> = place.segments.iter().flat_map(|s| &s.answers).collect();
    let mut latencies = vec![Vec::new(); place.world.regions.len()];
    for (i, times) in latencies.iter_mut().enumerate() {
        let (firsts, mine): (Vec<&&steady::Answer>, Vec<&&steady::Answer>) =
            answers.iter().filter(|a| a.region == i).partition(|a| a.first);
        let first_waited = firsts.iter().filter(|a| a.waited).count();
        let first_ms = firsts.iter().map(|a| a.latency_ms).fold(0.0, f64::max);
        println!(
            "{name}: region {i}: each key's first ask ({}, apart from what follows): {first_waited} waited for the authority, the slowest {first_ms:.1} ms",
            firsts.len()
        );
        times.extend(mine.iter().map(|a| a.latency_ms));
        let waited = mine.iter().filter(|a| a.waited).count() as f64 / mine.len().max(1) as f64;
        let all = firsts.iter().chain(&mine);
        let mut codes: Vec<&str> = all.filter(|a| a.status != 200).map(|a| a.code.as_str()).collect();
        let errors = codes.len();
        codes.sort_unstable();
        codes.dedup();
        let chunks: u64 = place.segments.iter().map(|s| s.towards_home[i].0).sum();
        let bytes: u64 = place.segments.iter().map(|s| s.towards_home[i].1).sum();
        let calls = chunks as f64 / CHUNKS_PER_CALL / seconds;
        let kib = bytes as f64 / 1024.0 / seconds;
        println!(
            "{name}: region {i}: {} answers after, {errors} errors {codes:?} in all, {:.1}% waited for the authority; authority calls at least {calls:.1}/s ({kib:.1} KiB/s towards the home)",
            mine.len(),
            waited * 100.0
        );
        figures.add(&format!("{name}_steady_r{i}_waited_pct"), waited * 100.0, 1);
        figures.add(&format!("{name}_steady_r{i}_authority_calls_per_s"), calls, 1);
        figures.add(&format!("{name}_steady_r{i}_errors"), errors as f64, 0);
    }
    region_spread(figures, &format!("{name}_steady"), latencies);
    check_figures(place, figures);
}

/// Prints and adds how every steady answer stands against the revocations of its round.
fn check_figures(place: &Place, figures: &mut Figures) {
    let name = place.name;
    let (mut past_bound, mut after_answer, mut checked, mut with_fields, mut total, mut revoked) = (0, 0, 0, 0, 0, 0);
    for segment in &place.segments {
        let check = steady::check(&segment.answers, &segment.revoked, MAX_STALENESS_MS as f64);
        (past_bound, after_answer) = (past_bound + check.past_bound, after_answer + check.after_answer);
        (checked, with_fields) = (checked + check.checked, with_fields + check.with_fields);
        (total, revoked) = (total + segment.answers.len(), revoked + segment.revoked.len());
    }
    if with_fields < total {
        println!(
            "{name}: {} of {total} answers lack `version`/`decided_at_ms`: those are checked at the time they arrived",
            total - with_fields
        );
    }
    println!(
        "{name}: {revoked} revoked during the load; {checked} answers about them: {past_bound} VALID past the bound, {after_answer} VALID after the revoke answer within it"
    );
    figures.add(&format!("{name}_steady_valid_past_bound"), past_bound as f64, 0);
    figures.add(&format!("{name}_steady_valid_after_answer"), after_answer as f64, 0);
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
    let lost = revoke::lost(world, &api, 3)?;
    let (mut last_valid, mut rejected): (Vec<f64>, Vec<f64>) = lost.into_iter().unzip();
    println!(
        "world: lost purge: region 1's last VALID {last_valid:.0?} ms and first REVOKED {rejected:.0?} ms after the answer (max_staleness {MAX_STALENESS_MS} ms)"
    );
    figures.add("world_lost_purge_last_valid_max_ms", percentile(&mut last_valid, 1.0), 0);
    figures.add("world_lost_purge_rejected_max_ms", percentile(&mut rejected, 1.0), 0);
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
        let errors: f64 =
            ["metro", "world"].iter().filter_map(|name| figures.get(&format!("{name}_steady_r{i}_errors"))).sum();
        let verdict = match (errors, world - metro <= 2.0) {
            (e, _) if e > 0.0 => format!("not judged: {e} error answers (the machine did not carry the load)"),
            (_, true) => "met".to_owned(),
            (_, false) => "not met".to_owned(),
        };
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
    if let Some(lost) = figures.get("world_lost_purge_last_valid_max_ms") {
        let verdict = if lost <= MAX_STALENESS_MS as f64 { "met" } else { "not met" };
        println!(
            "goal: lost purge: no VALID past {MAX_STALENESS_MS} ms after the answer: last at {lost:.0} ms: {verdict}"
        );
    }
}
