//! `cargo xtask bench ...`: programs that print numbers, ending with one `name=value` line.
//! The machines are shared and noisy, so each bench measures its baseline in the same run and
//! the ratio is what to compare. Load comes from `wrk` (installed with apt-get if missing).

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use keyward_tests::world::{RegionPlan, World};
use serde_json::json;

use crate::tools::{self, step};

#[derive(Subcommand)]
pub enum Which {
    /// Edge verify (served from memory) beside the health route; shared's decision beside SHA-256.
    Verify {
        /// Seconds of load per route.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Concurrent connections (wrk -c), from one wrk thread.
        #[arg(long, default_value_t = 2)]
        connections: usize,
    },
}

pub fn run(which: Which) -> anyhow::Result<()> {
    match which {
        Which::Verify { seconds, connections } => verify(Duration::from_secs(seconds), connections),
    }
}

fn verify(duration: Duration, connections: usize) -> anyhow::Result<()> {
    tools::setup()?;
    ensure_wrk()?;
    tools::build(false)?;
    step("native: shared's decision beside raw SHA-256 (release build)");
    let native = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["run", "--quiet", "--release", "-p", "keyward-shared", "--example", "bench_decide"])
        .output()
        .context("run the bench_decide example")?;
    if !native.status.success() {
        bail!("bench_decide failed: {}", String::from_utf8_lossy(&native.stderr));
    }
    let native = String::from_utf8_lossy(&native.stdout).into_owned();
    print!("{native}");
    let native_figures = native.lines().last().unwrap_or_default().to_owned();

    step("starting one region (log level error) and the control plane");
    let mut world = World::start_with(&[RegionPlan::Up], "error")?;
    let api = world.create_api("bench", 3_600_000);
    let (_, key) = world.create_key(&api, json!({}));
    let root = world.root_key.clone();
    let body = json!({ "key": key });
    let check_memory = |world: &World| -> anyhow::Result<()> {
        let answer = world.edge_verify(0, &root, body.clone());
        anyhow::ensure!(
            answer.1["valid"] == true && answer.1["source"] == "memory",
            "not served from memory: {}",
            answer.1
        );
        Ok(())
    };
    world.edge_verify(0, &root, body.clone());
    check_memory(&world)?;

    let edge = world.regions[0].spec.url();
    step(&format!("load: wrk -t1 -c{connections} -d{}s per route, health first", duration.as_secs()));
    let health = wrk(&format!("{edge}/health"), None, connections, duration)?;
    let script = world.dir.path().join("verify.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{}'\nwrk.headers[\"authorization\"] = \"Bearer {root}\"\nwrk.headers[\"content-type\"] = \"application/json\"\n",
            serde_json::to_string(&body)?
        ),
    )?;
    let verify = wrk(&format!("{edge}/v1/keys/verify"), Some(&script), connections, duration)?;
    std::fs::remove_file(&script)?;
    check_memory(&world)?;
    world.assert_no_plaintext();

    println!("edge health (workerd floor): {health}");
    println!("edge verify from memory:     {verify}");
    println!("verify/health throughput: {:.2}", verify.rps / health.rps);
    println!(
        "edge_verify_rps={:.0} edge_verify_p50_ms={:.2} edge_verify_p99_ms={:.2} edge_health_rps={:.0} edge_health_p50_ms={:.2} edge_health_p99_ms={:.2} edge_verify_errors={} {native_figures}",
        verify.rps, verify.p50_ms, verify.p99_ms, health.rps, health.p50_ms, health.p99_ms, verify.errors
    );
    Ok(())
}

fn ensure_wrk() -> anyhow::Result<()> {
    if Command::new("wrk").arg("--version").output().is_ok() {
        return Ok(());
    }
    step("installing wrk (apt-get)");
    tools::run(Command::new("apt-get").arg("update").arg("-qq"))?;
    tools::run(Command::new("apt-get").args(["install", "-y", "-qq", "wrk"]))
}

struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} non-2xx",
            self.rps, self.p50_ms, self.p99_ms, self.errors
        )
    }
}

fn wrk(url: &str, script: Option<&std::path::Path>, connections: usize, duration: Duration) -> anyhow::Result<Load> {
    let mut command = Command::new("wrk");
    command.args(["-t1", &format!("-c{connections}"), &format!("-d{}s", duration.as_secs()), "--latency"]);
    if let Some(script) = script {
        command.arg("-s").arg(script);
    }
    let out = command.arg(url).output().context("run wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let field = |prefix: &str| -> Option<String> {
        text.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|rest| rest.trim().to_owned()))
    };
    let rps = field("Requests/sec:").and_then(|v| v.parse().ok()).context("wrk printed no Requests/sec")?;
    let p50_ms = field("50%").map(|v| to_ms(&v)).context("wrk printed no 50%")?;
    let p99_ms = field("99%").map(|v| to_ms(&v)).context("wrk printed no 99%")?;
    let errors = field("Non-2xx or 3xx responses:").and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(Load { rps, p50_ms, p99_ms, errors })
}

/// wrk's durations: `812.00us`, `2.71ms`, `1.02s`.
fn to_ms(text: &str) -> f64 {
    let split = text.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(text.len());
    let value: f64 = text[..split].parse().unwrap_or(f64::NAN);
    match &text[split..] {
        "us" => value / 1e3,
        "ms" => value,
        "s" => value * 1e3,
        "m" => value * 60e3,
        _ => f64::NAN,
    }
}
