//! Usage evidence, with real processes: every edge verification becomes a usage event shipped
//! to the control plane, counted exactly per region and outcome across an ingestion outage
//! (retries stored once), and what is lost (a batch dropped in transit, a region killed with
//! events buffered) is counted, never silent.

use std::time::{Duration, Instant};

use keyward_tests::gate::GateMode;
use keyward_tests::new_key;
use keyward_tests::world::{Options, RegionPlan, World};
use reqwest::Method;
use serde_json::{Value, json};

fn usage_of(world: &World, what: &str) -> Value {
    let (status, usage) = world.admin(Method::GET, &format!("{what}/usage"), None);
    assert_eq!(status, 200, "{usage}");
    usage
}

/// Polls `what`'s usage until `done` holds (or 30 s), answering the last report.
fn usage_when(world: &World, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let usage = usage_of(world, what);
        if done(&usage) || started.elapsed() > Duration::from_secs(30) {
            return usage;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn verify(world: &World, region: usize, body: Value) -> String {
    let (status, answer) = world.edge_verify(region, &world.root_key, body);
    assert_eq!(status, 200, "{answer}");
    answer["code"].as_str().unwrap().to_owned()
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn usage_counts_are_exact_per_region_and_outcome_across_an_ingestion_outage() {
    let world = World::start(&[RegionPlan::Up, RegionPlan::Up, RegionPlan::Up]).expect("world");
    let api = world.create_api("usage", 1000);
    let (key_id, key) = world.create_key(&api, json!({ "permissions": ["read"] }));
    let unknown = new_key("sk");
    let mut made: Vec<[u64; 3]> = vec![[0; 3]; 3]; // per region: VALID, INSUFFICIENT_PERMISSIONS, REVOKED
    for (region, counts) in made.iter_mut().enumerate() {
        for _ in 0..=region {
            assert_eq!(verify(&world, region, json!({ "key": key, "api_id": api })), "VALID");
            counts[0] += 1;
        }
        let wrong = json!({ "key": key, "permissions": ["write"], "client": { "ip": "192.0.2.9", "country": "NL" } });
        assert_eq!(verify(&world, region, wrong), "INSUFFICIENT_PERMISSIONS");
        counts[1] += 1;
        assert_eq!(verify(&world, region, json!({ "key": "sk_broken", "api_id": api })), "MALFORMED");
        assert_eq!(verify(&world, region, json!({ "key": unknown, "api_id": api })), "NOT_FOUND");
    }
    // The control plane stops answering for 8 s while region 0 verifies: the region's first
    // send times out (5 s) and is sent again; both copies are taken when it resumes.
    world.freeze_control_plane(true);
    for _ in 0..2 {
        assert_eq!(verify(&world, 0, json!({ "key": key })), "VALID");
        made[0][0] += 1;
    }
    std::thread::sleep(Duration::from_secs(8));
    world.freeze_control_plane(false);
    let (status, revoked) = world.admin(Method::POST, &format!("/v1/keys/{key_id}/revoke"), None);
    assert_eq!(status, 200, "{revoked}");
    for (region, counts) in made.iter_mut().enumerate() {
        assert_eq!(verify(&world, region, json!({ "key": key })), "REVOKED");
        counts[2] += 1;
    }

    let expected: Value = (0..3)
        .map(|r| {
            let [valid, insufficient, revoked] = made[r];
            (format!("r{r}"), json!({ "VALID": valid, "INSUFFICIENT_PERMISSIONS": insufficient, "REVOKED": revoked }))
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    let what = format!("/v1/keys/{key_id}");
    let usage = usage_when(&world, &what, |u| u["regions"] == expected);
    assert_eq!(usage["regions"], expected, "per region and outcome: {usage}");
    // Nothing more arrives later (no retry counted twice), and nothing was lost.
    std::thread::sleep(Duration::from_secs(3));
    let usage = usage_of(&world, &what);
    assert_eq!(usage["regions"], expected, "{usage}");
    let total: u64 = made.iter().flatten().sum();
    assert_eq!(usage["total"], total, "{usage}");
    assert_eq!(
        usage["losses"]["total"],
        json!({ "missing_batches": 0, "lost_events": 0, "dropped_events": 0, "possibly_lost_events": 0 })
    );
    assert_eq!(usage["top"]["country"], json!([{ "value": "NL", "count": 3 }]), "{usage}");
    assert!(usage["last_valid_ms"].as_i64() < usage["last_used_ms"].as_i64(), "{usage}");
    // The API's report also counts the keys it could not name: 3 malformed and 3 unknown.
    let api_usage = usage_of(&world, &format!("/v1/apis/{api}"));
    assert_eq!(api_usage["totals"]["MALFORMED"], 3, "{api_usage}");
    assert_eq!(api_usage["totals"]["NOT_FOUND"], 3, "{api_usage}");
    let log = std::fs::read_to_string(world.dir.path().join("control-plane.log")).unwrap_or_default();
    assert!(
        log.contains("usage batch received again"),
        "the outage caused no retry that reached the control plane twice"
    );
}

#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn a_batch_lost_in_transit_is_a_gap_and_a_killed_region_a_possible_loss() {
    let vars = vec![("USAGE_GIVE_UP_MS".to_owned(), "4000".to_owned())];
    let options = Options { gated_usage: true, vars, ..Options::default() };
    let mut world = World::start_opts(&[RegionPlan::Up], options).expect("world");
    let gate = world.usage_gate.as_ref().expect("gated usage");
    let api = world.create_api("usage", 1000);
    let (key_id, key) = world.create_key(&api, json!({}));
    let what = format!("/v1/keys/{key_id}");
    let valid = |world: &World| assert_eq!(verify(world, 0, json!({ "key": key })), "VALID");
    for _ in 0..3 {
        valid(&world);
    }
    assert_eq!(usage_when(&world, &what, |u| u["total"] == 3)["total"], 3);

    // Every delivery fails in transit (503 from the path) until the region gives the batch up.
    gate.set_mode(GateMode::Error);
    for _ in 0..4 {
        valid(&world);
    }
    // Sends at 0, 0.25, 0.75, 1.75, 3.75 and 7.75 s fail: the last is past the 4 s give-up.
    std::thread::sleep(Duration::from_secs(12));
    gate.set_mode(GateMode::Open);
    for _ in 0..2 {
        valid(&world);
    }
    let usage = usage_when(&world, &what, |u| u["total"] == 5);
    assert_eq!(usage["total"], 5, "{usage}");
    let losses = &usage["losses"]["by_region"]["r0"];
    assert_eq!((losses["missing_batches"].as_i64(), losses["lost_events"].as_i64()), (Some(1), Some(4)), "{usage}");

    // Events pile up behind a failing path; when it opens, one batch lands saying how many are
    // still held, and the region dies before the next (due 2 s after) can go.
    gate.set_mode(GateMode::Error);
    let made = 200;
    for _ in 0..made / 2 {
        valid(&world);
    }
    // A batch is formed (due 2 s after the last acknowledgement) and retried; more events come.
    std::thread::sleep(Duration::from_millis(2_500));
    for _ in 0..made / 2 {
        valid(&world);
    }
    gate.set_mode(GateMode::Open);
    let landed = usage_when(&world, &what, |u| u["total"].as_i64() > Some(5));
    gate.set_mode(GateMode::Error);
    world.stop_region(0);
    let stored = landed["total"].as_i64().unwrap() - 5;
    assert!(stored < made, "everything landed before the region died: {landed}");
    std::thread::sleep(Duration::from_secs(11));
    let usage = usage_of(&world, &what);
    assert_eq!(usage["total"].as_i64().unwrap() - 5, stored, "{usage}");
    let possibly = usage["losses"]["by_region"]["r0"]["possibly_lost_events"].as_i64().unwrap();
    assert_eq!(possibly, made - stored, "what the region still held is shown as a possible loss: {usage}");
}
