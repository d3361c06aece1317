//! The revocation proof and `keyward incident`, with real processes: clients keep trying a key
//! from several regions while it is revoked; `keyward incident` runs in a pseudo-terminal; one
//! region's purges are lost; and one region answers from an old record past the promise's
//! bound. That last one is a fault the real edge is built never to commit, so it is the KV-only
//! baseline edge (which never asks the authority) beside the world, outside the control plane's
//! config: its KV keeps the record from before the revocation and no purge reaches it.
//! Waits poll for the condition, never sleep for it, except the fixed windows in which the
//! clients keep trying.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use keyward_tests::baseline::{self, Baseline};
use keyward_tests::gate::GateMode;
use keyward_tests::world::{RegionPlan, World};
use keyward_tests::{keyward_bin, now_ms};
use reqwest::Method;
use serde_json::{Value, json};

/// Clients that verify one key in a loop, each at one edge, until stopped; each counts the
/// codes it was answered.
struct Clients {
    stop: Arc<AtomicBool>,
    threads: Vec<(String, JoinHandle<BTreeMap<String, u64>>)>,
}

impl Clients {
    /// One client per `(name, url)`, each with a client IP of its own.
    fn start(edges: &[(String, String)], root_key: &str, key: &str) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = edges
            .iter()
            .enumerate()
            .map(|(i, (name, url))| {
                let (stop, url, root_key) = (stop.clone(), format!("{url}/v1/keys/verify"), root_key.to_owned());
                let body = json!({ "key": key, "client": { "ip": format!("203.0.113.{}", i + 1) } });
                let thread = std::thread::spawn(move || {
                    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
                    let mut codes = BTreeMap::new();
                    while !stop.load(Ordering::Relaxed) {
                        let answer = http.post(&url).bearer_auth(&root_key).json(&body).send();
                        let code = match answer.and_then(|a| a.json::<Value>()) {
                            Ok(v) => v["code"].as_str().or(v["error"]["code"].as_str()).unwrap_or("?").to_owned(),
                            Err(_) => "unreachable".to_owned(),
                        };
                        *codes.entry(code).or_insert(0) += 1;
                        std::thread::sleep(Duration::from_millis(40));
                    }
                    codes
                });
                (name.clone(), thread)
            })
            .collect();
        Clients { stop, threads }
    }

    /// Stops every client; answers each edge's counts by code.
    fn stop(self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads.into_iter().map(|(name, t)| (name, t.join().expect("client thread"))).collect()
    }
}

fn region_edges(world: &World) -> Vec<(String, String)> {
    world.regions.iter().map(|r| (r.spec.name.clone(), r.spec.url())).collect()
}

fn proof_of(world: &World, id: &str) -> Value {
    let (status, proof) = world.admin(Method::GET, &format!("/v1/keys/{id}/proof"), None);
    assert_eq!(status, 200, "{proof}");
    proof
}

fn region_proof<'a>(proof: &'a Value, name: &str) -> &'a Value {
    proof["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["region"] == name)
        .unwrap_or_else(|| panic!("{name}: {proof}"))
}

fn rejected(region: &Value, code: &str) -> u64 {
    region["rejections_since"][code].as_u64().unwrap_or(0)
}

/// `keyward` as a client of the world's control plane, with its root key in the environment.
fn keyward(world: &World) -> Command {
    let mut command = Command::new(keyward_bin());
    command.env("KEYWARD_URL", world.origin()).env("KEYWARD_ROOT_KEY", &world.root_key).env_remove("NO_COLOR");
    command
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn incident_in_a_terminal_finds_revokes_follows_and_proves() {
    let mut world = World::start(&[RegionPlan::Up, RegionPlan::Up, RegionPlan::Up]).unwrap();
    let body = json!({ "name": "incident", "prefix": "inc", "max_staleness_ms": 1000 });
    let (status, api) = world.admin(Method::POST, "/v1/apis", Some(body));
    assert_eq!(status, 201, "{api}");
    let api = api["id"].as_str().unwrap().to_owned();
    let fields = json!({ "owner_id": "acct_42", "permissions": ["charges:write"] });
    let (id, key) = world.create_key(&api, fields.clone());
    let (decoy, _) = world.create_key(&api, fields);
    for i in 0..3 {
        world.make_hot(i, &key);
    }
    let clients = Clients::start(&region_edges(&world), &world.root_key, &key);
    let usage_path = format!("/v1/keys/{id}/usage?from_ms={}", now_ms() - 60_000);
    world.wait_for("usage from every region", Duration::from_secs(15), || {
        let (_, usage) = world.admin(Method::GET, &usage_path, None);
        (usage["regions"].as_object().map_or(0, |r| r.len()) == 3).then_some(())
    });

    // `inc_` is the start of both keys: the incident asks which, and the test reads the number.
    let mut command = keyward(&world);
    command.args(["incident", "inc_"]);
    let options = rexpect::reader::Options::new().timeout_ms(Some(60_000)).strip_ansi_escape_codes(true);
    let mut screen = rexpect::session::spawn_with_options(command, options).expect("keyward in a pty");
    let listed = screen.exp_string("Which key? [1-2]").expect("asks which key");
    assert!(listed.contains(&decoy), "both keys are listed: {listed}");
    let line = listed.lines().find(|l| l.contains(&id)).unwrap_or_else(|| panic!("{id} is listed: {listed}"));
    let number = line.split_whitespace().next().unwrap().to_owned();
    screen.send_line(&number).unwrap();
    let shown = screen.exp_string("everywhere? [y/N]").expect("asks to confirm");
    for expected in ["acct_42", "charges:write", "Last hour:", "203.0.113."] {
        assert!(shown.contains(expected), "the key's description shows {expected}: {shown}");
    }
    screen.send_line("y").unwrap();
    let confirmed = std::time::Instant::now();
    let followed = screen.exp_string("Waiting until the promise's bound").expect("follows the delivery");
    // (rexpect reads the screen byte by byte, so the line's leading mark is not compared.)
    for target in ["authority", "purge:r0", "purge:r1", "purge:r2"] {
        assert!(
            followed.lines().any(|l| l.contains(&format!(" {target} ")) && l.contains("acknowledged")),
            "{target} is shown acknowledged: {followed}"
        );
    }
    screen.exp_string("Revocation proof").expect("prints the proof");
    let proof_text = screen.exp_eof().expect("ends");
    // The proof is read only once the bound (1 s) and the evidence's lag (3 s) have passed.
    assert!(confirmed.elapsed() >= Duration::from_secs(4), "read after {:?}", confirmed.elapsed());
    assert!(proof_text.contains("0 violations"), "{proof_text}");
    for i in 0..3 {
        let row =
            proof_text.lines().find(|l| l.starts_with(&format!("r{i} "))).unwrap_or_else(|| panic!("{proof_text}"));
        let rejected: u64 = row.split_whitespace().last().unwrap().parse().unwrap();
        assert!(rejected > 0, "region r{i} shows its rejections: {proof_text}");
    }
    let status = screen.process_mut().wait().unwrap();
    assert!(matches!(status, rexpect::process::wait::WaitStatus::Exited(_, 0)), "{status:?}: {proof_text}");

    let counts = clients.stop();
    let proof = proof_of(&world, &id);
    assert_eq!(proof["change"]["kind"], "revoked", "{proof}");
    assert_eq!(proof["violations"], 0, "{proof}");
    assert!(proof["by"]["root_key_id"].is_string(), "the proof names who revoked: {proof}");
    for i in 0..3 {
        let name = format!("r{i}");
        let region = region_proof(&proof, &name);
        assert_eq!(region["took"]["acknowledged"], true, "{proof}");
        assert!(rejected(region, "REVOKED") > 0, "{name} rejections are shown: {proof}");
        assert!(counts[&name]["REVOKED"] > 0, "{counts:?}");
        for answer in region["valid_after"].as_array().unwrap() {
            assert_eq!(answer["verdict"], "within_promise", "{proof}");
        }
    }
    assert!(!proof["sources_since"].as_array().unwrap().is_empty(), "the sources still trying: {proof}");
    world.assert_no_plaintext();
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn a_lost_purge_stays_within_the_bound_and_a_stale_answer_past_it_is_a_violation() {
    // Long enough that r1's copy answers well after the revoke (refresh ahead confirms it at
    // three quarters of this), and the stale edge's well past the bound.
    const STALENESS_MS: i64 = 10_000;
    let main = baseline::main_module().unwrap();
    let mut world = World::start(&[RegionPlan::Up, RegionPlan::Gated]).unwrap();
    let stale = Baseline::start(&world, main, "stale", world.regions[0].spec.vars.clone()).unwrap();
    let api = world.create_api("proof", STALENESS_MS as u64);
    let (id, key) = world.create_key(&api, json!({}));
    stale.copy_keys(&world, std::slice::from_ref(&key)).unwrap();
    let mut edges = region_edges(&world);
    edges.push(("stale".to_owned(), stale.url()));
    let clients = Clients::start(&edges, &world.root_key, &key);
    // Hot just before the revoke, so r1's copy has its whole trust ahead of it.
    for i in 0..2 {
        world.make_hot(i, &key);
    }
    // Region r1 loses every purge and KV write from here on.
    for gate in [&world.regions[1].gate, &world.regions[1].kv_gate] {
        gate.as_ref().expect("gated region").set_mode(GateMode::Refuse);
    }
    let (status, answer) = world.admin(Method::POST, &format!("/v1/keys/{id}/revoke"), None);
    assert_eq!(status, 200, "{answer}");
    let answered = now_ms();
    // Past the bound by more than the clock allowance, so that the stale edge's answers show.
    std::thread::sleep(Duration::from_millis((STALENESS_MS + 2_000) as u64));
    let counts = clients.stop();
    let past = answered + STALENESS_MS + 500;
    let proof = world.wait_for("the stale edge's answers past the bound", Duration::from_secs(15), || {
        let proof = proof_of(&world, &id);
        let last = region_proof(&proof, "stale")["valid_after"].as_array()?.last()?["at_ms"].as_i64()?;
        (last > past).then_some(proof)
    });

    let lost = region_proof(&proof, "r1");
    assert_eq!(lost["took"]["acknowledged"], false, "{proof}");
    let lost_valid = lost["valid_after"].as_array().unwrap();
    assert!(!lost_valid.is_empty(), "r1 answered from its copy after the revoke: {counts:?} {proof}");
    assert!(lost_valid.iter().all(|v| v["verdict"] == "within_promise"), "{proof}");
    assert!(rejected(lost, "REVOKED") > 0, "r1 rejects once its copy is confirmed: {proof}");
    let fine = region_proof(&proof, "r0");
    assert!(fine["valid_after"].as_array().unwrap().iter().all(|v| v["verdict"] == "within_promise"), "{proof}");
    let broken: Vec<&Value> = region_proof(&proof, "stale")["valid_after"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["verdict"] == "violation")
        .collect();
    assert!(!broken.is_empty(), "{proof}");
    for v in &broken {
        assert!(v["at_ms"].as_i64() > v["bound_ms"].as_i64(), "{v}");
        assert_eq!(v["bound"], "answer + max_staleness_ms + skew", "{v}");
    }
    assert_eq!(region_proof(&proof, "stale")["violations"], broken.len(), "{proof}");
    assert_eq!(proof["violations"], broken.len(), "only the stale edge broke the promise: {proof}");

    // The CLI says so loudly and exits 3, in both forms.
    let json_run = keyward(&world).args(["keys", "proof", &id, "--json"]).output().unwrap();
    assert_eq!(json_run.status.code(), Some(3), "{}", String::from_utf8_lossy(&json_run.stderr));
    let printed: Value = serde_json::from_slice(&json_run.stdout).unwrap();
    assert!(printed["violations"].as_u64() >= Some(broken.len() as u64), "{printed}");
    let table_run = keyward(&world).args(["keys", "proof", &id, "--format", "table"]).output().unwrap();
    let table = String::from_utf8_lossy(&table_run.stdout);
    assert_eq!(table_run.status.code(), Some(3), "{table}");
    assert!(table.contains("VALID answers that broke the promise") && table.contains("stale"), "{table}");
    // One more proof counts its violations once more in /metrics.
    let counted = || -> u64 {
        let metrics = reqwest::blocking::get(world.metrics_url()).unwrap().text().unwrap();
        let line = metrics.lines().find(|l| l.starts_with("keyward_proof_violations_total")).unwrap_or_default();
        line.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{metrics}"))
    };
    let before = counted();
    let again = proof_of(&world, &id);
    assert_eq!(counted() - before, again["violations"].as_u64().unwrap(), "{again}");

    // r1 recovers (the retrier delivers its purge). The incident on a key already revoked
    // follows that change, waits for nothing (the bound has passed), and exits 3 with the proof
    // in its JSON.
    for gate in [&world.regions[1].gate, &world.regions[1].kv_gate] {
        gate.as_ref().expect("gated region").set_mode(GateMode::Open);
    }
    let incident = keyward(&world).args(["incident", &id, "--yes", "--json"]).output().unwrap();
    assert_eq!(incident.status.code(), Some(3), "{}", String::from_utf8_lossy(&incident.stderr));
    let printed: Value = serde_json::from_slice(&incident.stdout).unwrap();
    assert!(printed["proof"]["violations"].as_u64() >= Some(broken.len() as u64), "{printed}");
    assert_eq!(printed["delivery"]["status"], "revoked", "{printed}");
    assert!(printed["revoke"].is_null() && printed["waited_ms"].as_i64() < Some(1_000), "{printed}");
    drop(stale);
    world.assert_no_plaintext();
}
