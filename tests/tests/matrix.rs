//! The fault matrix: every fault the promise must survive, in both purge modes (a signed purge
//! carrying the record; a tag-only purge that reaches the Cache API alone, as production's
//! purge-by-tag does), against real processes.
//!
//! Each cell makes a fresh key hot in every region, injects its fault, revokes the key, then
//! polls every region every 20 ms until its bound plus a margin has passed since the answer,
//! and fails on any `VALID` after the bound (for the root-key cell: any 200 with the revoked
//! root key past the root-key trust window). Cells run one after another on one running world
//! per mode, so that three pollers have the 2 cores to themselves. Each prints one line.

use std::time::{Duration, Instant};

use keyward_shared::internal::{AUTHORITY_PATH, PURGE_PATH};
use keyward_tests::gate::GateMode;
use keyward_tests::now_ms;
use keyward_tests::world::{Options, PurgeMode, RegionPlan, World, signed_post};
use reqwest::Method;
use serde_json::{Value, json};

/// How long a copy is trusted without asking the authority, in every cell.
const MAX_STALENESS_MS: u64 = 1_000;
/// How late KV writes reach r2.
const KV_DELAY_MS: u64 = 20_000;
/// How long the edge trusts a confirmed root key.
const ROOT_TRUST_MS: u64 = 1_000;
/// What polling adds to a bound: a poll in flight at the bound, scheduling on 2 cores.
const MARGIN_MS: u64 = 300;
const POLL_EVERY: Duration = Duration::from_millis(20);
/// How long r1 stays stopped (SIGSTOP) in [`Fault::RegionFrozen`], from before the revoke: past
/// the control plane's 3 s wait for it, so that its pollers meet it frozen too.
const FREEZE: Duration = Duration::from_millis(4_500);

/// r0 is reached directly; the control plane reaches r1's purge route and KV through gates;
/// r2's KV writes arrive [`KV_DELAY_MS`] late.
const PLANS: [RegionPlan; 3] = [RegionPlan::Up, RegionPlan::Gated, RegionPlan::DelayedKv(KV_DELAY_MS)];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    AuthorityWritesFail,
    AuthorityRefusing,
    AuthorityHanging,
    RegionRefusing,
    RegionHanging,
    /// r1's process stopped (SIGSTOP) across the revoke, for the control plane and its pollers
    /// alike, then resumed: held to the bound from when it answers again.
    RegionFrozen,
    KvDelayed,
    KvFailing,
    PurgeReplayed,
    OutOfOrder,
    CrashAfterCommit,
    RootKeyRegionDown,
}

const CELLS: [Fault; 12] = [
    Fault::AuthorityWritesFail,
    Fault::AuthorityRefusing,
    Fault::AuthorityHanging,
    Fault::RegionRefusing,
    Fault::RegionHanging,
    Fault::RegionFrozen,
    Fault::KvDelayed,
    Fault::KvFailing,
    Fault::PurgeReplayed,
    Fault::OutOfOrder,
    Fault::CrashAfterCommit,
    Fault::RootKeyRegionDown,
];

/// What one region's poller saw.
#[derive(Debug, Default)]
struct Seen {
    polls: u64,
    /// Polls answered with an error status (never a `VALID`, so never past a bound; counted and
    /// shown, and a cell where they crowd out real answers fails on its poll count).
    errors: u64,
    /// The last accepted answer, relative to the start of the bound.
    last_valid_ms: Option<i64>,
    /// How long of the polling the region was stopped and could answer nothing.
    frozen_ms: u64,
}

/// What one poll got.
#[derive(PartialEq, Eq)]
enum Answer {
    Accepted,
    Rejected,
    /// An error status (the region or workerd failing): the key was not accepted.
    Error,
}

/// Polls every region with `ask(region)` every 20 ms from now until `until` after `from`;
/// answers what each saw, the last acceptance counted from `from`.
fn poll_all(world: &World, from: Instant, until: Duration, ask: &(dyn Fn(usize) -> Answer + Sync)) -> Vec<Seen> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world.regions.len())
            .map(|i| {
                scope.spawn(move || {
                    let mut seen = Seen::default();
                    let mut next = Instant::now();
                    while from.elapsed() < until {
                        match ask(i) {
                            Answer::Accepted => seen.last_valid_ms = Some(from.elapsed().as_millis() as i64),
                            Answer::Rejected => {}
                            Answer::Error => seen.errors += 1,
                        }
                        seen.polls += 1;
                        next += POLL_EVERY;
                        if let Some(wait) = next.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                    seen
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Runs one cell; answers its line and whether it passed.
fn run_cell(world: &mut World, mode: PurgeMode, fault: Fault, api: &str) -> (String, bool) {
    if fault == Fault::RootKeyRegionDown {
        return root_key_cell(world, mode);
    }
    let (id, key) = world.create_key(api, json!({}));
    // Every target has the key before the cell starts: the previous cell's fault (the authority
    // hanging, a region refusing) can leave the create's delivery to the retrier, and a region
    // that meets the key before KV or the authority has it remembers the miss.
    world.wait_for("the key's creation to reach every target", Duration::from_secs(20), || {
        let (status, delivery) = world.admin(Method::GET, &format!("/v1/keys/{id}/delivery"), None);
        (status == 200 && delivery["pending"] == 0).then_some(())
    });
    let mut hot = vec![0, 1, 2];
    let mut late = None;
    if fault == Fault::KvDelayed {
        // A region that meets the key only by a miss after the revoke: r2, whose KV lags.
        hot.retain(|&i| i != 2);
        late = Some(2);
    }
    for &i in &hot {
        world.make_hot(i, &key);
    }
    let active = world.region_kv_record(0, &key).expect("r0's KV has the key");
    let captured = json!({ "region": "r0", "records": [active.clone()] });
    let captured_at = now_ms();
    let captured_nonce = format!("captured-{}", &id[4..]);
    if fault == Fault::PurgeReplayed {
        let (status, text) =
            world.signed_post(&world.regions[0].spec.url(), PURGE_PATH, &captured, captured_at, &captured_nonce);
        assert_eq!(status, 200, "the original purge: {text}");
    }
    inject(world, fault, true);
    let thaw =
        (fault == Fault::RegionFrozen).then(|| (world.freeze_region_for(1, FREEZE).unwrap(), Instant::now() + FREEZE));
    let revoke = |world: &World| world.admin(Method::POST, &format!("/v1/keys/{id}/revoke"), None);
    let (answer, from) = if fault == Fault::CrashAfterCommit {
        world.restart_control_plane_with(&[("KEYWARD_FAILPOINT", "abort_after_commit")]).unwrap();
        let (status, _) = revoke(world);
        assert_eq!(status, 0, "the control plane died before answering");
        assert!(world.wait_control_plane_exit(Duration::from_secs(5)));
        // The bound counts from the restarted control plane's start, not from when it is ready.
        let started = Instant::now();
        world.restart_control_plane().unwrap();
        (Value::Null, started)
    } else {
        let (status, answer) = revoke(world);
        assert_eq!(status, 200, "{answer}");
        (answer, Instant::now())
    };
    let mut notes = Vec::new();
    match fault {
        Fault::PurgeReplayed => {
            for i in 0..3 {
                let url = world.regions[i].spec.url();
                let (status, _) = signed_post(&world.secret, &url, PURGE_PATH, &captured, captured_at, &captured_nonce);
                // r0 saw the nonce (REPLAYED); the others are not the purge's region.
                let expected = if i == 0 { 401 } else { 403 };
                let verdict = if status == expected { "" } else { " FAIL: replay not refused" };
                notes.push(format!("replay to r{i}: {status}{verdict}"));
            }
        }
        Fault::OutOfOrder => {
            // The creation's deliveries arrive after the revocation's.
            let update = json!({ "records": [active.clone()] });
            let nonce = format!("late-authority-{}", &id[4..]);
            let (status, _) = world.signed_post(&world.home.url(), AUTHORITY_PATH, &update, now_ms(), &nonce);
            notes.push(format!("late authority update: {status}"));
            for i in 0..3 {
                let purge = json!({ "region": format!("r{i}"), "records": [active.clone()] });
                let nonce = format!("late-purge-{i}-{}", &id[4..]);
                let (status, _) = world.signed_post(&world.regions[i].spec.url(), PURGE_PATH, &purge, now_ms(), &nonce);
                notes.push(format!("late purge r{i}: {status}"));
            }
        }
        _ => {}
    }
    if let Some(i) = late {
        assert_eq!(world.edge_code(i, &key).0, "REVOKED", "r{i} meeting the key by a miss");
    }
    if matches!(fault, Fault::AuthorityWritesFail | Fault::AuthorityRefusing | Fault::AuthorityHanging) {
        notes.extend(acknowledged_without_the_authority(&answer));
    }
    // A frozen region is held to the bound from when it answers again.
    let frozen_ms = thaw.as_ref().map_or(0, |(_, at)| at.saturating_duration_since(from).as_millis() as u64);
    let frozen = |i: usize| if i == 1 { frozen_ms } else { 0 };
    let bounds: Vec<u64> = (0..3).map(|i| frozen(i) + bound_ms(mode, fault, i)).collect();
    let until = Duration::from_millis(bounds.iter().max().unwrap() + MARGIN_MS + 500);
    let root = world.root_key.clone();
    let mut seen = poll_all(world, from, until, &|i| match world.verify_status(i, &root, &key) {
        (200, code) if code == "VALID" => Answer::Accepted,
        (200, _) => Answer::Rejected,
        _ => Answer::Error,
    });
    for (i, s) in seen.iter_mut().enumerate() {
        s.frozen_ms = frozen(i);
    }
    if let Some((mut thawing, _)) = thaw {
        thawing.wait().unwrap();
    }
    inject(world, fault, false);
    let line = report(mode, fault, &seen, &bounds, until, &answer, &notes);
    let passed = !line.contains("FAIL");
    (line, passed)
}

/// The bound for region `i`: `max_staleness_ms`, except where the only copy of the revocation
/// that reaches the edge is KV's (tag-only purges with authority writes failing): KV's delay
/// plus `max_staleness_ms`.
fn bound_ms(mode: PurgeMode, fault: Fault, i: usize) -> u64 {
    let kv_only = matches!(mode, PurgeMode::TagOnly(_))
        && matches!(fault, Fault::AuthorityWritesFail | Fault::AuthorityRefusing | Fault::AuthorityHanging);
    match (kv_only, i) {
        (true, 2) => KV_DELAY_MS + MAX_STALENESS_MS,
        _ => MAX_STALENESS_MS,
    }
}

/// A revoke answered while the authority lacks the change acknowledges no region: its copies
/// are confirmed against that authority (tag-only purges are not even sent). Answers a failing
/// note for each region the answer calls acknowledged.
fn acknowledged_without_the_authority(answer: &Value) -> Vec<String> {
    let regions = answer["regions"].as_array().cloned().unwrap_or_default();
    let mut notes: Vec<String> = regions
        .iter()
        .filter(|r| r["acknowledged"] == true)
        .map(|r| format!("FAIL: {} acknowledged without the authority", r["name"].as_str().unwrap_or("?")))
        .collect();
    if regions.is_empty() || answer["authority"]["acknowledged"] == true {
        notes.push(format!("FAIL: the answer does not show the authority unacknowledged: {answer}"));
    }
    notes
}

/// Turns a cell's fault on or off.
fn inject(world: &World, fault: Fault, on: bool) {
    let authority = || world.authority_gate.as_ref().expect("a gated authority");
    let (purge_gate, kv_gate) = (world.regions[1].gate.as_ref().unwrap(), world.regions[1].kv_gate.as_ref().unwrap());
    let mode = |broken| if on { broken } else { GateMode::Open };
    match fault {
        Fault::AuthorityWritesFail => authority().set_mode(mode(GateMode::Error)),
        Fault::AuthorityRefusing => authority().set_mode(mode(GateMode::Refuse)),
        Fault::AuthorityHanging => authority().set_mode(mode(GateMode::Hang)),
        Fault::RegionRefusing => {
            purge_gate.set_mode(mode(GateMode::Refuse));
            kv_gate.set_mode(mode(GateMode::Refuse));
        }
        Fault::RegionHanging => {
            purge_gate.set_mode(mode(GateMode::Hang));
            kv_gate.set_mode(mode(GateMode::Hang));
        }
        Fault::KvFailing => kv_gate.set_mode(mode(GateMode::Error)),
        Fault::RootKeyRegionDown => {
            purge_gate.set_mode(mode(GateMode::Refuse));
            kv_gate.set_mode(mode(GateMode::Refuse));
        }
        Fault::RegionFrozen | Fault::KvDelayed | Fault::PurgeReplayed | Fault::OutOfOrder | Fault::CrashAfterCommit => {
        }
    }
}

fn report(
    mode: PurgeMode,
    fault: Fault,
    seen: &[Seen],
    bounds: &[u64],
    until: Duration,
    answer: &Value,
    notes: &[String],
) -> String {
    let expected = until.as_millis() as u64 / POLL_EVERY.as_millis() as u64;
    let mut failed = Vec::new();
    let mut parts = Vec::new();
    for (i, (s, bound)) in seen.iter().zip(bounds).enumerate() {
        let last = s.last_valid_ms.map_or("never".to_owned(), |ms| format!("{ms} ms"));
        let errors = if s.errors > 0 { format!(" ({} errors)", s.errors) } else { String::new() };
        let errors = match s.frozen_ms {
            0 => errors,
            ms => format!("{errors} (frozen {ms} ms of it)"),
        };
        parts.push(format!("r{i} {} polls{errors}, last VALID {last} (bound {bound} ms)", s.polls));
        if s.last_valid_ms.is_some_and(|ms| ms > *bound as i64) {
            failed.push(format!("r{i} VALID past its bound"));
        }
        let expected = expected.saturating_sub(s.frozen_ms / POLL_EVERY.as_millis() as u64);
        if (s.polls - s.errors) * 10 < expected * 8 {
            failed.push(format!("r{i} answered {} of {expected} polls", s.polls - s.errors));
        }
    }
    let acked: Vec<String> = answer["regions"]
        .as_array()
        .map(|rs| rs.iter().map(|r| format!("{}={}", r["name"].as_str().unwrap_or("?"), r["acknowledged"])).collect())
        .unwrap_or_default();
    let verdict = if failed.is_empty() { "pass".to_owned() } else { format!("FAIL: {}", failed.join("; ")) };
    format!(
        "{mode:?} {fault:?}: {}; authority acknowledged {}; regions {}{}; {verdict}",
        parts.join(", "),
        answer["authority"]["acknowledged"],
        acked.join(" "),
        if notes.is_empty() { String::new() } else { format!("; {}", notes.join(", ")) },
    )
}

/// A root key with a verify scope, used in every region (and held there, with the key it asks
/// about), revoked while r1 is unreachable to the control plane (purge and KV refused): no region
/// may accept it past the trust window.
fn root_key_cell(world: &mut World, mode: PurgeMode) -> (String, bool) {
    let api = world.create_api("root-cell", MAX_STALENESS_MS);
    let (_, key) = world.create_key(&api, json!({}));
    let body = json!({ "name": "svc", "scopes": ["api.*.verify_key"] });
    let (status, caller) = world.admin(Method::POST, "/v1/root-keys", Some(body));
    assert_eq!(status, 201, "{caller}");
    let (caller_id, caller_key) =
        (caller["id"].as_str().unwrap().to_owned(), caller["key"].as_str().unwrap().to_owned());
    for i in 0..3 {
        world.wait_for(&format!("r{i} to accept the new root key"), Duration::from_secs(15), || {
            (world.edge_verify(i, &caller_key, json!({ "key": key })).0 == 200).then_some(())
        });
    }
    // Held in every region: the key served from memory (`make_hot`), and the root key, which
    // this request does not fetch (memory trusts what the Cache API showed for 100 ms in
    // tag-only mode, so by now the key may come from the Cache API: a copy all the same).
    for i in 0..3 {
        world.make_hot(i, &key);
        let before = root_keys_fetched(world, i);
        let (status, answer) = world.edge_verify(i, &caller_key, json!({ "key": key }));
        let held = matches!(answer["source"].as_str(), Some("memory" | "cache"));
        assert!(status == 200 && held, "r{i}: {status} {answer}");
        assert_eq!(root_keys_fetched(world, i), before, "r{i} fetched the root key: it held no copy");
    }
    inject(world, Fault::RootKeyRegionDown, true);
    let (status, answer) = world.admin(Method::POST, &format!("/v1/root-keys/{caller_id}/revoke"), None);
    assert_eq!(status, 200, "{answer}");
    let from = Instant::now();
    let bounds = [ROOT_TRUST_MS; 3];
    let until = Duration::from_millis(ROOT_TRUST_MS + MARGIN_MS + 1_000);
    // Any refusal of the revoked root key (401, or 503 while it cannot be confirmed) rejects it.
    let seen = poll_all(world, from, until, &|i| match world.edge_verify(i, &caller_key, json!({ "key": key })).0 {
        200 => Answer::Accepted,
        _ => Answer::Rejected,
    });
    inject(world, Fault::RootKeyRegionDown, false);
    let line = report(mode, Fault::RootKeyRegionDown, &seen, &bounds, until, &answer, &[]);
    let passed = !line.contains("FAIL");
    (line, passed)
}

/// How many root keys region `i` fetched (found no copy of) so far.
fn root_keys_fetched(world: &World, i: usize) -> u64 {
    world.memory_stats(&world.regions[i].spec.url()).root_key_misses.fetched
}

fn run_matrix(mode: PurgeMode) {
    let options = Options { purge_mode: mode, gated_authority: true, ..Options::default() };
    let mut world = World::start_opts(&PLANS, options).unwrap();
    let api = world.create_api("matrix", MAX_STALENESS_MS);
    let started = Instant::now();
    let mut lines = Vec::new();
    let mut all_passed = true;
    for fault in CELLS {
        let (line, passed) = run_cell(&mut world, mode, fault, &api);
        eprintln!("{line}");
        all_passed &= passed;
        lines.push(line);
        world.assert_alive();
        let (status, _) = world.call(&world.origin(), None, Method::GET, "/health", None);
        assert_eq!(status, 200, "the control plane stopped answering after {fault:?}");
    }
    eprintln!("{mode:?}: {} cells in {:?}", lines.len(), started.elapsed());
    assert!(
        all_passed,
        "failed cells:\n{}",
        lines.iter().filter(|l| l.contains("FAIL")).cloned().collect::<Vec<_>>().join("\n")
    );
    world.assert_no_plaintext();
}

/// One test, so that the two modes run one after the other: the pollers need the 2 cores.
#[test]
#[ignore = "whole-system: starts real processes; `cargo xtask test` runs it"]
fn fault_matrix_in_both_purge_modes() {
    run_matrix(PurgeMode::Record);
    run_matrix(PurgeMode::TagOnly(0));
}
