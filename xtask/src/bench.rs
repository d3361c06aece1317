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
    /// Time from a revoke call's start to the last of 3 regions rejecting, over many keys; a
    /// region whose purges are dropped; verify throughput warm and confirming with the authority.
    Revocation {
        /// How many revocations to time.
        #[arg(long, default_value_t = 200)]
        keys: usize,
        /// Seconds of load per throughput route.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Pause between one poller's verify requests (the pollers share 2 cores with everything).
        #[arg(long, default_value_t = 5)]
        poll_ms: u64,
    },
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
        Which::Revocation { keys, seconds, poll_ms } => {
            revocation(keys, Duration::from_secs(seconds), Duration::from_millis(poll_ms))
        }
        Which::Verify { seconds, connections } => verify(Duration::from_secs(seconds), connections),
    }
}

fn verify(duration: Duration, connections: usize) -> anyhow::Result<()> {
    tools::setup()?;
    ensure_wrk()?;
    release_build()?;
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
    let verify = throughput(&world, &edge, &root, &key, connections, duration)?;
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

fn revocation(count: usize, duration: Duration, poll: Duration) -> anyhow::Result<()> {
    tools::setup()?;
    ensure_wrk()?;
    release_build()?;
    step("starting the home, 3 regions (log level error) and the control plane");
    let mut world = World::start_with(&[RegionPlan::Up, RegionPlan::Up, RegionPlan::Up], "error")?;
    let root = world.root_key.clone();
    // Copies trusted for an hour: only the purges can explain a prompt rejection.
    let api = world.create_api("propagation", 3_600_000);
    step(&format!("creating {count} keys and making each hot in all 3 regions"));
    let keys: Vec<(String, String)> = (0..count).map(|_| world.create_key(&api, json!({}))).collect();
    for (_, key) in &keys {
        for region in 0..3 {
            world.edge_code(region, key);
            let (code, source) = world.edge_code(region, key);
            anyhow::ensure!(
                code == "VALID" && source == "memory",
                "key not hot in region {region}: {code} from {source}"
            );
        }
    }
    step(&format!("revoking {count} keys one by one, each region polled every {poll:?} until it rejects"));
    let origin = world.origin();
    let urls: Vec<String> = world.regions.iter().map(|r| format!("{}/v1/keys/verify", r.spec.url())).collect();
    let mut propagation = Vec::with_capacity(count);
    let mut call_ms = Vec::with_capacity(count);
    let (mut authority_ms, mut region_ms) = (Vec::new(), Vec::new());
    // Every poll is kept (when it was sent, by this machine's clock, and whether it was
    // accepted) to check the regions' stamps below: no poll sent after a region's stamp may be
    // accepted.
    let (mut polled_stamped, mut stamp_violations, mut polls) = (Vec::with_capacity(count), 0, 0);
    for (id, key) in &keys {
        let body = serde_json::to_vec(&json!({ "key": key }))?;
        let start = std::time::Instant::now();
        let start_ms = epoch_ms();
        let (rejected, answer): (Vec<Polled>, serde_json::Value) = std::thread::scope(|scope| {
            let pollers: Vec<_> = urls
                .iter()
                .map(|url| {
                    let (root, body) = (&root, &body);
                    scope.spawn(move || {
                        let client = reqwest::blocking::Client::new();
                        let mut sent = Vec::new();
                        loop {
                            let sent_ms = epoch_ms();
                            let answer: serde_json::Value = client
                                .post(url)
                                .bearer_auth(root)
                                .body(body.clone())
                                .send()
                                .and_then(|r| r.json())
                                .unwrap_or_default();
                            sent.push((sent_ms, answer["valid"] == true));
                            if answer["code"] == "REVOKED" {
                                return (start.elapsed(), sent);
                            }
                            assert!(start.elapsed() < Duration::from_secs(30), "never rejected: {answer}");
                            // A pause between polls keeps three pollers from starving the 2 cores.
                            std::thread::sleep(poll);
                        }
                    })
                })
                .collect();
            let (status, answer) =
                world.call(&origin, Some(&root), reqwest::Method::POST, &format!("/v1/keys/{id}/revoke"), None);
            assert_eq!(status, 200, "{answer}");
            call_ms.push(start.elapsed().as_secs_f64() * 1e3);
            authority_ms.push(answer["authority"]["latency_ms"].as_f64().unwrap_or(f64::NAN));
            for region in answer["regions"].as_array().into_iter().flatten() {
                assert_eq!(region["acknowledged"], true, "{answer}");
                region_ms.push(region["latency_ms"].as_f64().unwrap_or(f64::NAN));
            }
            (pollers.into_iter().map(|p| p.join().expect("poller")).collect(), answer)
        });
        let stamps = applied_stamps(&answer)?;
        polled_stamped.push(stamps.iter().copied().fold(0, u64::max) as f64 - start_ms);
        for ((_, sent), stamp) in rejected.iter().zip(&stamps) {
            polls += sent.len();
            // The stamp is in whole milliseconds: a poll counts against it from the next one.
            stamp_violations += sent.iter().filter(|(at, valid)| *valid && *at >= *stamp as f64 + 1.0).count();
        }
        propagation.push(rejected.iter().map(|(at, _)| *at).max().unwrap_or_default().as_secs_f64() * 1e3);
    }
    let (ps50, ps99) = (percentile(&mut polled_stamped, 0.50), percentile(&mut polled_stamped, 0.99));
    let (p50, p99, max) =
        (percentile(&mut propagation, 0.50), percentile(&mut propagation, 0.99), percentile(&mut propagation, 1.0));

    // The same without pollers competing for the 2 cores. Each region stamps its purge
    // acknowledgement with the moment it began answering from the revoked record (its clock,
    // which is this machine's clock), so the time to the last region rejecting is read without
    // measurement load, and checked right after with a verification in every region. The call
    // itself waits for the authority too, and for every acknowledgement: an upper bound.
    step(&format!("revoking {count} more hot keys without pollers; each region stamps when it began rejecting"));
    let quiet_keys: Vec<(String, String)> = (0..count).map(|_| world.create_key(&api, json!({}))).collect();
    for (_, key) in &quiet_keys {
        for region in 0..3 {
            world.edge_code(region, key);
            anyhow::ensure!(world.edge_code(region, key).1 == "memory", "key not hot in region {region}");
        }
    }
    let (mut stamped, mut quiet) = (Vec::with_capacity(count), Vec::with_capacity(count));
    for (id, key) in &quiet_keys {
        let start_ms = epoch_ms();
        let start = std::time::Instant::now();
        let (status, answer) = world.admin(reqwest::Method::POST, &format!("/v1/keys/{id}/revoke"), None);
        quiet.push(start.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(status == 200, "{answer}");
        let stamps = applied_stamps(&answer)?;
        for region in 0..stamps.len() {
            anyhow::ensure!(world.edge_code(region, key).0 == "REVOKED", "region {region} acknowledged but accepts");
        }
        stamped.push(stamps.iter().copied().fold(0, u64::max) as f64 - start_ms);
    }
    let (s50, s99, smax) =
        (percentile(&mut stamped, 0.50), percentile(&mut stamped, 0.99), percentile(&mut stamped, 1.0));
    let (q50, q99, qmax) = (percentile(&mut quiet, 0.50), percentile(&mut quiet, 0.99), percentile(&mut quiet, 1.0));
    let call_p50 = percentile(&mut call_ms, 0.50);
    let (authority_p50, region_p50) = (percentile(&mut authority_ms, 0.50), percentile(&mut region_ms, 0.50));
    world.assert_alive();
    println!(
        "polled: to the last of 3 regions answering REVOKED over {count} revocations: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms (revoke call p50 {call_p50:.2} ms)"
    );
    println!(
        "polled: the regions' stamps in that run: p50 {ps50:.2} ms, p99 {ps99:.2} ms; {stamp_violations} of {polls} polls accepted the key after its region's stamp"
    );
    println!(
        "quiet: to the last region's stamp over {count} revocations: p50 {s50:.2} ms, p99 {s99:.2} ms, max {smax:.2} ms; whole call p50 {q50:.2} ms, p99 {q99:.2} ms, max {qmax:.2} ms"
    );

    step("throughput of one region: warm copy in memory, every copy stale (max_staleness 1 ms), every request a miss");
    let region = world.regions[0].spec.url();
    let warm_key = world.create_key(&api, json!({})).1;
    let confirming_api = world.create_api("confirming", 1);
    let stale_key = world.create_key(&confirming_api, json!({})).1;
    // Keys never verified anywhere yet, each asked for once: every request is a miss.
    let cold_keys: Vec<String> = (0..COLD_KEYS).map(|_| world.create_key(&api, json!({})).1).collect();
    let warm = throughput(&world, &region, &root, &warm_key, 2, duration)?;
    let confirmed = throughput(&world, &region, &root, &stale_key, 2, duration)?;
    let cold = misses(&world, &region, &root, &cold_keys, duration)?;
    step("the same keys at the first slice's KV-only edge, in this run");
    let mut first_keys: Vec<&str> = vec![&warm_key, &stale_key];
    first_keys.extend(cold_keys.iter().map(String::as_str));
    let (first_slice, first_url, first_root) = start_first_slice(&world, &first_keys)?;
    let kv_warm = throughput(&world, &first_url, &first_root, &warm_key, 2, duration)?;
    let kv_stale = throughput(&world, &first_url, &first_root, &stale_key, 2, duration)?;
    let kv_cold = misses(&world, &first_url, &first_root, &cold_keys, duration)?;
    drop(first_slice);
    println!("verify, warm copy in memory:                  {warm}");
    println!("verify, every copy stale, asks the authority: {confirmed}");
    println!("verify, every request a miss (KV + authority): {cold}");
    println!("first slice, warm copy in memory:             {kv_warm}");
    println!("first slice, every copy stale, re-reads KV:   {kv_stale}");
    println!("first slice, every request a miss (KV):       {kv_cold}");
    drop(world);

    step("a region whose purges are dropped: time until it rejects anyway (max_staleness 1000 ms)");
    let mut world = World::start_with(&[RegionPlan::Up, RegionPlan::Gated], "error")?;
    let api = world.create_api("lossy", 1_000);
    let mut lost = Vec::new();
    for _ in 0..5 {
        let (id, key) = world.create_key(&api, json!({}));
        world.edge_code(1, &key);
        anyhow::ensure!(world.edge_code(1, &key).1 == "memory", "not hot");
        world.regions[1].gate.as_ref().expect("gated").set_open(false);
        let start = std::time::Instant::now();
        let (status, answer) = world.admin(reqwest::Method::POST, &format!("/v1/keys/{id}/revoke"), None);
        anyhow::ensure!(status == 200 && answer["regions"][1]["acknowledged"] == false, "purge was not lost: {answer}");
        loop {
            if world.edge_code(1, &key).0 == "REVOKED" {
                break;
            }
            anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "never rejected");
        }
        lost.push(start.elapsed().as_secs_f64() * 1e3);
        world.regions[1].gate.as_ref().expect("gated").set_open(true);
    }
    let lost_max = percentile(&mut lost, 1.0);
    println!("lost purge: rejected after {lost:.0?} ms (max {lost_max:.0} ms; max_staleness 1000 ms)");
    world.assert_no_plaintext();
    println!(
        "revocation_p50_ms={s50:.2} revocation_p99_ms={s99:.2} revocation_max_ms={smax:.2} revoke_call_p50_ms={q50:.2} revoke_call_p99_ms={q99:.2} revoke_call_max_ms={qmax:.2} polled_revocation_p50_ms={p50:.2} polled_revocation_p99_ms={p99:.2} polled_revocation_max_ms={max:.2} polled_call_p50_ms={call_p50:.2} polled_authority_ack_p50_ms={authority_p50:.2} polled_region_ack_p50_ms={region_p50:.2} polled_stamp_p50_ms={ps50:.2} polled_stamp_p99_ms={ps99:.2} stamp_violations={stamp_violations} lost_purge_reject_ms={lost_max:.0} verify_warm_rps={:.0} verify_warm_p99_ms={:.2} verify_confirm_rps={:.0} verify_confirm_p99_ms={:.2} first_slice_warm_rps={:.0} verify_miss_rps={:.0} verify_miss_p99_ms={:.2} first_slice_kv_reread_rps={:.0} first_slice_kv_reread_p99_ms={:.2} first_slice_miss_rps={:.0} first_slice_miss_p99_ms={:.2}",
        warm.rps,
        warm.p99_ms,
        confirmed.rps,
        confirmed.p99_ms,
        kv_warm.rps,
        cold.rps,
        cold.p99_ms,
        kv_stale.rps,
        kv_stale.p99_ms,
        kv_cold.rps,
        kv_cold.p99_ms
    );
    Ok(())
}

/// wrk against the verify route at `base` for `key`, as the caller with root key `root`; checks
/// the key is valid before and after.
fn throughput(
    world: &World,
    base: &str,
    root: &str,
    key: &str,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Load> {
    let valid = || {
        let (status, answer) =
            world.call(base, Some(root), reqwest::Method::POST, "/v1/keys/verify", Some(json!({ "key": key })));
        status == 200 && answer["valid"] == true
    };
    anyhow::ensure!(valid(), "key not valid at {base}");
    let script = world.dir.path().join("verify.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{}'\nwrk.headers[\"authorization\"] = \"Bearer {root}\"\nwrk.headers[\"content-type\"] = \"application/json\"\n",
            serde_json::to_string(&json!({ "key": key }))?
        ),
    )?;
    let load = wrk(&format!("{base}/v1/keys/verify"), Some(&script), connections, duration);
    std::fs::remove_file(&script)?;
    anyhow::ensure!(valid(), "key not valid at {base} after the load");
    load
}

/// Keys for the every-request-a-miss load: more than one region answers in the load's seconds.
const COLD_KEYS: usize = 1_500;

/// wrk against the verify route at `base`, each request for the next of `keys`, none asked for
/// there before: every request is a miss. Fails if the load ran out of keys (it would then
/// measure copies in memory).
fn misses(world: &World, base: &str, root: &str, keys: &[String], duration: Duration) -> anyhow::Result<Load> {
    let script = world.dir.path().join("misses.lua");
    let list = keys.iter().map(|k| format!("\"{k}\"")).collect::<Vec<_>>().join(",");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.headers[\"authorization\"] = \"Bearer {root}\"\nwrk.headers[\"content-type\"] = \"application/json\"\n\
             keys = {{{list}}}\ni = 0\nrequest = function()\n  i = i + 1\n  \
             return wrk.format(nil, nil, nil, '{{\"key\":\"' .. keys[((i - 1) % #keys) + 1] .. '\"}}')\nend\n"
        ),
    )?;
    let load = wrk(&format!("{base}/v1/keys/verify"), Some(&script), 2, duration);
    std::fs::remove_file(&script)?;
    let load = load?;
    anyhow::ensure!(
        load.requests <= keys.len() as u64,
        "{} requests for {} keys: raise COLD_KEYS so every request is a miss",
        load.requests,
        keys.len()
    );
    anyhow::ensure!(load.errors == 0, "misses at {base} answered {} non-2xx", load.errors);
    Ok(load)
}

/// The commit whose edge is the first slice's: KV only, no authority.
const FIRST_SLICE: &str = "22dd494";

/// Builds the first slice's worker from a git worktree under `target/` (once) and answers its
/// entry module.
fn first_slice_worker() -> anyhow::Result<std::path::PathBuf> {
    let root = keyward_tests::repo_root();
    let dir = root.join("target/first-slice");
    let main = dir.join("edge/build/worker/shim.mjs");
    if main.exists() {
        return Ok(main);
    }
    step(&format!("building the first slice's edge ({FIRST_SLICE}) in target/first-slice"));
    let _ = std::fs::remove_dir_all(&dir);
    tools::run(Command::new("git").args(["worktree", "prune"]))?;
    tools::run(Command::new("git").args(["worktree", "add", "--detach"]).arg(&dir).arg(FIRST_SLICE))?;
    tools::run(
        Command::new(tools::cargo_bin("worker-build"))
            .arg("--release")
            .current_dir(dir.join("edge"))
            .env("CARGO_TARGET_DIR", root.join("target/first-slice-target"))
            .env("WASM_BINDGEN_BIN", tools::cargo_bin("wasm-bindgen"))
            .env("WASM_OPT_BIN", root.join("node_modules/.bin/wasm-opt")),
    )?;
    Ok(main)
}

/// Starts the first slice's edge beside `world`, with these keys and a root key that may only
/// verify in its KV (the first slice cannot read scopes added since, like `root_key.manage`).
/// Answers the process, its URL and that root key.
fn start_first_slice(world: &World, keys: &[&str]) -> anyhow::Result<(keyward_tests::Proc, String, String)> {
    let spec = keyward_tests::RegionSpec {
        name: "first-slice".into(),
        port: keyward_tests::free_port(),
        dir: world.dir.path().join("worker-first-slice"),
        purge_secret: world.secret.clone(),
        log_level: "error",
        objects: keyward_tests::Objects::None,
        registry: world.dir.path().join("registry"),
        main: Some(first_slice_worker()?),
        vars: Vec::new(),
    };
    let proc = spec.start()?;
    let client = reqwest::blocking::Client::new();
    let (status, verifier) = world.admin(
        reqwest::Method::POST,
        "/v1/root-keys",
        Some(json!({ "name": "first-slice", "scopes": ["api.*.verify_key"] })),
    );
    anyhow::ensure!(status == 201, "{verifier}");
    let verifier = verifier["key"].as_str().context("no root key in the answer")?.to_owned();
    let root_hash = keyward_shared::KeyHash::of(&verifier);
    let mut kv_keys = vec![keyward_shared::kv_key_for_root(&root_hash)];
    kv_keys.extend(keys.iter().map(|k| keyward_shared::kv_key_for_key(&keyward_shared::KeyHash::of(k))));
    for kv_key in kv_keys {
        let path =
            format!("/storage/kv/namespaces/{}/values/{}", keyward_tests::LOCAL_NAMESPACE, kv_key.replace(':', "%3A"));
        let value =
            client.get(format!("{}{path}", world.regions[0].spec.kv_url())).send()?.error_for_status()?.text()?;
        client.put(format!("{}{path}", spec.kv_url())).body(value).send()?.error_for_status()?;
    }
    Ok((proc, spec.url(), verifier))
}

/// Builds the worker and a release `keyward`, and makes the fixtures use that binary.
fn release_build() -> anyhow::Result<()> {
    tools::build(true)?;
    keyward_tests::use_keyward_bin(keyward_tests::repo_root().join("target/release/keyward"));
    Ok(())
}

/// One poller's view of a revocation: when it first saw `REVOKED` (from the call's start), and
/// every poll it sent (by this machine's clock) with whether it was accepted.
type Polled = (Duration, Vec<(f64, bool)>);

/// Each region's `applied_at_ms` from a revoke answer, in the answer's (configuration) order;
/// every region must have acknowledged.
fn applied_stamps(answer: &serde_json::Value) -> anyhow::Result<Vec<u64>> {
    answer["regions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|region| {
            anyhow::ensure!(region["acknowledged"] == true, "{answer}");
            region["applied_at_ms"].as_u64().with_context(|| format!("no applied_at_ms in {answer}"))
        })
        .collect()
}

fn epoch_ms() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

fn percentile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let i = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len().max(1)) - 1;
    values.get(i).copied().unwrap_or(f64::NAN)
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
    requests: u64,
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
    let requests = text
        .lines()
        .find_map(|l| l.split_once(" requests in ").and_then(|(n, _)| n.trim().parse().ok()))
        .context("wrk printed no request count")?;
    Ok(Load { requests, rps, p50_ms, p99_ms, errors })
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
