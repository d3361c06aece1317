//! `cargo xtask bench ...`: programs that print numbers, ending with one `name=value` line.
//! The machines are shared and noisy, so each bench measures its baseline in the same run and
//! the ratio is what to compare.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Subcommand;
use keyward_shared::record::{KeyStatus, RECORD_SCHEMA};
use keyward_shared::verify::Caller;
use keyward_shared::{Key, KeyHash, KeyRecord, Scope, Scopes, VerifyRequest, decide};
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
        /// Concurrent client connections.
        #[arg(long, default_value_t = 4)]
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
    tools::build(false)?;
    let (decide_per_s, sha_per_s) = native_decision();
    println!(
        "native: shared decision (parse + hash + decide) {decide_per_s:.0}/s; raw SHA-256 of the same key {sha_per_s:.0}/s"
    );

    step("starting one region and the control plane");
    let world = World::start(&[RegionPlan::Up])?;
    let api = world.create_api("bench", 3_600_000);
    let (_, key) = world.create_key(&api, json!({}));
    let root = world.root_key.clone();
    let warm = world.edge_verify(0, &root, json!({ "key": key }));
    let served = world.edge_verify(0, &root, json!({ "key": key }));
    anyhow::ensure!(warm.1["valid"] == true && served.1["source"] == "memory", "not served from memory: {}", served.1);

    let edge = world.regions[0].spec.url();
    let body = Arc::new(serde_json::to_vec(&json!({ "key": key }))?);
    step(&format!("load: {connections} connections, {duration:?} per route"));
    let health = load(connections, duration, {
        let url = format!("{edge}/health");
        move |client: &reqwest::blocking::Client| {
            client.get(&url).send().map(|r| r.status().is_success()).unwrap_or(false)
        }
    });
    let verify = load(connections, duration, {
        let url = format!("{edge}/v1/keys/verify");
        let root = root.clone();
        move |client: &reqwest::blocking::Client| {
            client
                .post(&url)
                .bearer_auth(&root)
                .body(body.as_ref().clone())
                .send()
                .and_then(|r| r.json::<serde_json::Value>())
                .map(|v| v["valid"] == true && v["source"] == "memory")
                .unwrap_or(false)
        }
    });
    println!("edge health: {health}");
    println!("edge verify (memory): {verify}");
    println!("verify/health throughput ratio: {:.2}", verify.rps / health.rps);
    println!(
        "edge_verify_rps={:.0} edge_verify_p50_ms={:.2} edge_verify_p99_ms={:.2} edge_health_rps={:.0} edge_health_p50_ms={:.2} edge_health_p99_ms={:.2} edge_verify_errors={} shared_decide_per_s={decide_per_s:.0} sha256_per_s={sha_per_s:.0}",
        verify.rps, verify.p50_ms, verify.p99_ms, health.rps, health.p50_ms, health.p99_ms, verify.errors
    );
    Ok(())
}

struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors", self.rps, self.p50_ms, self.p99_ms, self.errors)
    }
}

/// Runs `call` from `connections` threads (one keep-alive client each) for `duration`.
fn load<F>(connections: usize, duration: Duration, call: F) -> Load
where
    F: Fn(&reqwest::blocking::Client) -> bool + Send + Sync + 'static,
{
    let call = Arc::new(call);
    let started = Instant::now();
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            let call = call.clone();
            std::thread::spawn(move || {
                let client =
                    reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
                let mut latencies = Vec::new();
                let mut errors = 0;
                while started.elapsed() < duration {
                    let t = Instant::now();
                    let ok = call(&client);
                    latencies.push(t.elapsed().as_secs_f64() * 1e3);
                    errors += usize::from(!ok);
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for thread in threads {
        let (latencies, e) = thread.join().expect("load thread");
        all.extend(latencies);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let at =
        |q: f64| all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0.0);
    Load { rps: all.len() as f64 / elapsed, p50_ms: at(0.50), p99_ms: at(0.99), errors }
}

/// The whole pure verification path (parse, hash, decide) and raw SHA-256 of the same text,
/// each per second, measured alternately in one run.
fn native_decision() -> (f64, f64) {
    let key = Key::generate("sk_live", [7; 32]).expect("valid");
    let text = key.expose().to_owned();
    let scopes = Scopes(vec![Scope::all(false).pop().expect("a verify scope")]);
    let record = KeyRecord {
        schema: RECORD_SCHEMA,
        id: "key_1".into(),
        hash: key.hash(),
        api_id: "api_1".into(),
        workspace_id: "ws_1".into(),
        name: None,
        start: key.start().into(),
        owner_id: None,
        meta: Default::default(),
        enabled: true,
        status: KeyStatus::Active,
        expires_at: Some(i64::MAX),
        permissions: vec!["read".into()],
        version: 1,
        max_staleness_ms: 1_000,
        created_at: 0,
        updated_at: 0,
    };
    let request = VerifyRequest { key: text.clone(), api_id: None, permissions: vec!["read".into()] };
    let rounds = 5;
    let per_round = 200_000;
    let (mut decide_time, mut sha_time) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..per_round {
            let parsed = Key::parse(black_box(&text)).expect("valid");
            let hash = parsed.hash();
            let caller = Caller { workspace_id: "ws_1", scopes: &scopes };
            black_box(decide(Some(&record), &hash, caller, &request, 1));
        }
        decide_time += t.elapsed();
        let t = Instant::now();
        for _ in 0..per_round {
            black_box(KeyHash::of(black_box(&text)));
        }
        sha_time += t.elapsed();
    }
    let n = (rounds * per_round) as f64;
    (n / decide_time.as_secs_f64(), n / sha_time.as_secs_f64())
}
