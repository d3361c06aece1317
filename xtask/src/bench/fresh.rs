//! `cargo xtask bench fresh`: what keeping a hot key confirmed costs the authority, and what
//! its verifications wait. One world, one key with a 1 s `max_staleness_ms` hot in every
//! region, regions differing only in `REFRESH_AHEAD_PERCENT`: 100 (off: a stale copy waits for
//! its confirmation), 50 (the default) and 75; with `--before <rev>`, one more region running
//! that revision's worker. Each region in turn takes `wrk` load on the key; authority calls are
//! counted where they are answered (the home's KeyState objects, `/internal/stats`), so every
//! region is counted alike, and the region's own counts (waited, ahead, shared) are printed
//! beside them where it keeps them.

use std::time::Duration;

use keyward_tests::world::{RegionPlan, World};
use serde_json::json;

use super::load::{self, Load};
use super::{Figures, order, report};
use crate::tools::step;

/// A region of the bench world and what its rounds measured.
struct Side {
    name: String,
    region: usize,
    loads: Vec<Load>,
    /// Authority reads the home answered while this region was loaded.
    authority_reads: u64,
}

pub fn run(duration: Duration, connections: usize, rounds: usize, before: Option<&str>) -> anyhow::Result<()> {
    let builds = super::builds(None)?;
    let old_worker = before.map(super::against::worker_only).transpose()?;
    let percents = ["100", "50", "75"];
    let mut plans = vec![RegionPlan::Up; percents.len()];
    if old_worker.is_some() {
        plans.push(RegionPlan::Up);
    }
    step("starting the home, the regions (log level error) and the control plane");
    let mut world = builds[0].world(&plans)?;
    let mut sides = Vec::new();
    for (i, percent) in percents.iter().enumerate() {
        restart(&mut world, i, |spec| spec.vars.push(("REFRESH_AHEAD_PERCENT".into(), (*percent).into())))?;
        let name = if *percent == "100" { "ahead_off".to_owned() } else { format!("ahead{percent}") };
        sides.push(Side { name, region: i, loads: Vec::new(), authority_reads: 0 });
    }
    if let (Some(main), Some(rev)) = (old_worker, before) {
        let i = percents.len();
        restart(&mut world, i, |spec| spec.main = Some(main))?;
        sides.push(Side { name: format!("before_{rev}"), region: i, loads: Vec::new(), authority_reads: 0 });
    }
    let api = world.create_api("bench-fresh", 1_000);
    let (_, key) = world.create_key(&api, json!({}));
    for side in &sides {
        world.make_hot(side.region, &key);
    }
    let root = world.root_key.clone();
    let home = world.home.url();
    for round in 0..rounds {
        for i in order(round, sides.len()) {
            let side = &mut sides[i];
            let url = world.regions[side.region].spec.url();
            step(&format!(
                "round {}/{rounds}, {}: wrk -t1 -c{connections} -d{}s",
                round + 1,
                side.name,
                duration.as_secs()
            ));
            let (home_before, region_before) = (world.memory_stats(&home), world.memory_stats(&url));
            side.loads.push(load::throughput(&world, &url, &root, &key, connections, duration)?);
            // An older worker's stats lack the counts: they read as zero.
            let (home_after, region_after) = (world.memory_stats(&home), world.memory_stats(&url));
            side.authority_reads += home_after.authority_reads_answered - home_before.authority_reads_answered;
            let (a, b) = (region_after.key_confirmations, region_before.key_confirmations);
            println!(
                "  {}: {}; authority reads {}; the region's counts: waited {}, ahead {}, shared {}",
                side.name,
                side.loads.last().expect("a load"),
                home_after.authority_reads_answered - home_before.authority_reads_answered,
                a.waited - b.waited,
                a.ahead - b.ahead,
                a.shared - b.shared
            );
        }
    }
    world.assert_no_plaintext();
    let mut figures = Figures::default();
    for side in &sides {
        let load = Load::merge(&side.loads);
        // Each load's two verifications before and after (`load::throughput`) are counted too.
        let verifications = load.requests + 2 * side.loads.len() as u64;
        let per_1000 = side.authority_reads as f64 * 1_000.0 / verifications as f64;
        println!("{}: {load}; {per_1000:.2} authority calls per 1,000 verifications", side.name);
        figures.add(&format!("{}_authority_calls_per_1000", side.name), per_1000, 2);
        figures.add(&format!("{}_p50_ms", side.name), load.p50_ms, 2);
        figures.add(&format!("{}_p99_ms", side.name), load.p99_ms, 2);
        figures.add(&format!("{}_rps", side.name), load.rps, 0);
    }
    report(&figures, None);
    Ok(())
}

/// Stops region `i`, changes its spec, and starts it again.
fn restart(world: &mut World, i: usize, change: impl FnOnce(&mut keyward_tests::RegionSpec)) -> anyhow::Result<()> {
    world.stop_region(i);
    change(&mut world.regions[i].spec);
    world.start_region(i)
}
