//! `cargo xtask bench verify`: edge verification of a key served from isolate memory, beside the
//! worker's static health route (the workerd floor), one region; and the native `shared`
//! decision beside raw SHA-256.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use keyward_tests::world::{RegionPlan, World};
use serde_json::json;

use super::load::{self, Load};
use super::{Build, Figures, order, report};
use crate::tools::step;

/// One build's region, a key hot in its memory, and what the rounds measured.
struct Side {
    build: Build,
    world: World,
    key: String,
    health: Vec<Load>,
    verify: Vec<Load>,
}

pub fn run(duration: Duration, connections: usize, rounds: usize, against: Option<&str>) -> anyhow::Result<()> {
    let builds = super::builds(against)?;
    let native = native()?;
    let mut sides = Vec::new();
    for build in builds {
        step(&format!("{}: starting one region (log level error) and the control plane", build.label));
        let world = build.world(&[RegionPlan::Up])?;
        let api = world.create_api("bench", 3_600_000);
        let (_, key) = world.create_key(&api, json!({}));
        world.edge_verify(0, &world.root_key, json!({ "key": key }));
        check_memory(&world, &key)?;
        sides.push(Side { build, world, key, health: Vec::new(), verify: Vec::new() });
    }
    for round in 0..rounds {
        for i in order(round, sides.len()) {
            let side = &mut sides[i];
            step(&format!(
                "round {}/{rounds}, {}: wrk -t1 -c{connections} -d{}s, health then verify",
                round + 1,
                side.build.label,
                duration.as_secs()
            ));
            let edge = side.world.regions[0].spec.url();
            side.health.push(load::wrk(&format!("{edge}/health"), None, connections, duration)?);
            let root = side.world.root_key.clone();
            side.verify.push(load::throughput(&side.world, &edge, &root, &side.key, connections, duration)?);
            check_memory(&side.world, &side.key)?;
        }
    }
    for side in &mut sides {
        side.world.assert_no_plaintext();
    }
    let mut figures: Vec<Figures> = sides.iter().map(side_figures).collect();
    figures.last_mut().expect("the current build").add_line(&native);
    match &figures[..] {
        [old, current] => report(current, Some((&sides[0].build, old))),
        [current] => report(current, None),
        _ => unreachable!("one or two builds"),
    }
    Ok(())
}

/// Prints one side's rounds and answers its figures.
fn side_figures(side: &Side) -> Figures {
    let (health, verify) = (Load::merge(&side.health), Load::merge(&side.verify));
    println!("{}: edge health (workerd floor): {health}", side.build.label);
    println!("{}: edge verify from memory:     {verify}", side.build.label);
    println!("{}: verify/health throughput: {:.2}", side.build.label, verify.rps / health.rps);
    let mut figures = Figures::default();
    figures.add("edge_verify_rps", verify.rps, 0);
    figures.add("edge_verify_p50_ms", verify.p50_ms, 2);
    figures.add("edge_verify_p99_ms", verify.p99_ms, 2);
    figures.add("edge_health_rps", health.rps, 0);
    figures.add("edge_health_p50_ms", health.p50_ms, 2);
    figures.add("edge_health_p99_ms", health.p99_ms, 2);
    figures.add("edge_verify_errors", verify.errors as f64, 0);
    figures
}

/// Fails unless region 0 answers `key` valid from memory.
fn check_memory(world: &World, key: &str) -> anyhow::Result<()> {
    let (_, answer) = world.edge_verify(0, &world.root_key, json!({ "key": key }));
    anyhow::ensure!(answer["valid"] == true && answer["source"] == "memory", "not served from memory: {answer}");
    Ok(())
}

/// shared's decision beside raw SHA-256 (this checkout's, release build): its output, whose
/// last line is `name=value` figures.
fn native() -> anyhow::Result<String> {
    step("native: shared's decision beside raw SHA-256 (release build)");
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["run", "--quiet", "--release", "-p", "keyward-shared", "--example", "bench_decide"])
        .output()
        .context("run the bench_decide example")?;
    if !out.status.success() {
        bail!("bench_decide failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{text}");
    Ok(text.lines().last().unwrap_or_default().to_owned())
}
