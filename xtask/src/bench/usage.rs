//! `cargo xtask bench usage`: what recording usage costs and what it holds.
//!
//! 1. Edge verify from memory with usage shipping on and off (`USAGE_SHIPPING=off`), the same
//!    build, one region each, alternated; afterwards the events stored for the "on" side must
//!    equal the requests wrk completed.
//! 2. Ingestion: signed batches of 500 events sent to the control plane's real ingestion route by
//!    two senders, the events stamped over the past 30 days (the sender chooses `at_ms`; nothing
//!    is inserted behind the route's back), events stored per second; then the time of a
//!    30-day per-minute series query for that key.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use keyward_shared::usage::{ClientInfo, USAGE_PATH, UsageBatch, UsageEvent};
use keyward_shared::{Code, Source};
use keyward_tests::world::{RegionPlan, World};
use serde_json::{Value, json};

use super::load::{self, Load};
use super::{Figures, epoch_ms, order, percentile, report};
use crate::tools::step;

const DAY_MS: i64 = 86_400_000;
const BATCH: usize = 500;
const SENDERS: usize = 2;
const CONNECTIONS: usize = 2;

pub fn run(duration: Duration, rounds: usize, events: usize) -> anyhow::Result<()> {
    let build = super::builds(None)?.pop().context("the current build")?;
    step("starting two one-region worlds: usage shipping on, and off (USAGE_SHIPPING=off)");
    let on = build.world_with(&[RegionPlan::Up], &[])?;
    let off = build.world_with(&[RegionPlan::Up], &[("USAGE_SHIPPING", "off")])?;
    let sides = [("on", &on), ("off", &off)];
    let keys: Vec<(String, String)> = sides
        .iter()
        .map(|(_, world)| {
            let api = world.create_api("bench", 3_600_000);
            world.create_key(&api, json!({}))
        })
        .collect();
    let mut loads: [Vec<Load>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for i in order(round, 2) {
            let (name, world) = sides[i];
            let seconds = duration.as_secs();
            step(&format!("round {}/{rounds}, shipping {name}: wrk -t1 -c{CONNECTIONS} -d{seconds}s", round + 1));
            let edge = world.regions[0].spec.url();
            loads[i].push(load::throughput(world, &edge, &world.root_key, &keys[i].1, CONNECTIONS, duration)?);
        }
    }
    let (with, without) = (Load::merge(&loads[0]), Load::merge(&loads[1]));
    println!("shipping on:  {with}");
    println!("shipping off: {without}");
    let stored = stored_events(&on, &keys[0].0, &with, CONNECTIONS as u64)?;
    let mut figures = Figures::default();
    figures.add("verify_shipping_on_rps", with.rps, 0);
    figures.add("verify_shipping_off_rps", without.rps, 0);
    figures.add("verify_on_over_off_rps", with.rps / without.rps, 3);
    figures.add("verify_shipping_on_p99_ms", with.p99_ms, 2);
    figures.add("verify_shipping_off_p99_ms", without.p99_ms, 2);
    figures.add("usage_events_stored", stored as f64, 0);
    ingestion(&on, &keys[0].0, events, &mut figures)?;
    report(&figures, None);
    Ok(())
}

/// Waits for the "on" side's events to arrive and checks them against the requests made: wrk's
/// completed requests, the checks `throughput` makes before and after each run (two each), and
/// at most one request per connection still under way when each run stopped (made, answered
/// and recorded, but not counted by wrk).
fn stored_events(world: &World, key_id: &str, load: &Load, connections: u64) -> anyhow::Result<u64> {
    let counted = load.requests + 2 * load.runs;
    let most = counted + connections * load.runs;
    let started = Instant::now();
    loop {
        let (status, usage) = world.admin(reqwest::Method::GET, &format!("/v1/keys/{key_id}/usage"), None);
        ensure!(status == 200, "usage answered {status}: {usage}");
        let total = usage["total"].as_u64().unwrap_or(0);
        if total >= counted || started.elapsed() > Duration::from_secs(30) {
            // Anything still on its way arrives within one shipping interval.
            std::thread::sleep(Duration::from_secs(3));
            let (_, usage) = world.admin(reqwest::Method::GET, &format!("/v1/keys/{key_id}/usage"), None);
            let total = usage["total"].as_u64().unwrap_or(0);
            println!(
                "usage events stored: {total}; requests made: {counted} counted, up to {most} with those in flight"
            );
            ensure!((counted..=most).contains(&total), "stored {total} usage events: {}", usage["losses"]);
            ensure!(usage["losses"]["total"]["lost_events"] == 0, "losses: {}", usage["losses"]);
            return Ok(total);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Sends `events` events over the past 30 days for `key_id` through the signed ingestion route,
/// then times the 30-day per-minute series.
fn ingestion(world: &World, key_id: &str, events: usize, figures: &mut Figures) -> anyhow::Result<()> {
    let (status, key) = world.admin(reqwest::Method::GET, &format!("/v1/keys/{key_id}"), None);
    ensure!(status == 200, "{key}");
    let workspace = key["workspace_id"].as_str().context("workspace")?.to_owned();
    let api = key["api_id"].as_str().context("api")?.to_owned();
    let now = epoch_ms() as i64;
    let from = now - 30 * DAY_MS + 60_000;
    let step_ms = ((now - from) as f64 / events.max(1) as f64).max(0.001);
    step(&format!("ingestion: {events} events in batches of {BATCH}, {SENDERS} senders, over the past 30 days"));
    let started = Instant::now();
    let batches = events.div_ceil(BATCH);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let handles: Vec<_> = (0..SENDERS)
            .map(|sender| {
                let (workspace, api) = (&workspace, &api);
                scope.spawn(move || -> anyhow::Result<()> {
                    let holder = format!("bench-{sender}-{now}");
                    for (seq, b) in (sender..batches).step_by(SENDERS).enumerate() {
                        let first = b * BATCH;
                        let made: Vec<UsageEvent> = (first..(first + BATCH).min(events))
                            .map(|n| event(workspace, api, key_id, from + (n as f64 * step_ms) as i64, n))
                            .collect();
                        let batch = UsageBatch {
                            holder: holder.clone(),
                            region: "bench".into(),
                            seq: seq as u64 + 1,
                            first_event: (seq * BATCH) as u64,
                            dropped: 0,
                            held_after: 0,
                            events: made,
                        };
                        send(world, &batch)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle.join().map_err(|_| anyhow::anyhow!("a sender panicked"))??;
        }
        Ok(())
    })?;
    let seconds = started.elapsed().as_secs_f64();
    println!("ingestion: {events} events in {seconds:.1} s: {:.0} events/s", events as f64 / seconds);
    figures.add("ingest_events_per_s", events as f64 / seconds, 0);
    series_query(world, key_id, from, now, events, figures)
}

fn event(workspace: &str, api: &str, key_id: &str, at_ms: i64, n: usize) -> UsageEvent {
    UsageEvent {
        at_ms: at_ms as u64,
        request_id: format!("bench-{n}"),
        workspace_id: workspace.to_owned(),
        api_id: Some(api.to_owned()),
        key_id: Some(key_id.to_owned()),
        region: ["wnam", "weur", "apac"][n % 3].to_owned(),
        code: if n.is_multiple_of(20) { Code::Revoked } else { Code::Valid },
        version: Some(1),
        source: Some(Source::Memory),
        caller_ip: Some(format!("198.51.100.{}", n % 50)),
        user_agent: Some("bench".into()),
        client: Some(ClientInfo { country: Some(["DE", "US", "JP", "BR"][n % 4].into()), ..ClientInfo::default() }),
    }
}

fn send(world: &World, batch: &UsageBatch) -> anyhow::Result<()> {
    let body = serde_json::to_value(batch)?;
    let nonce = format!("{:032x}", rand_u128());
    let (status, text) = world.signed_post(&world.origin(), USAGE_PATH, &body, epoch_ms() as i64, &nonce);
    ensure!(status == 200, "ingestion answered {status}: {text}");
    Ok(())
}

fn rand_u128() -> u128 {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("randomness");
    u128::from_le_bytes(bytes)
}

/// Times the 30-day per-minute series (`parts=counts`: totals, series and losses, from the
/// per-minute counts), checked against what was sent, then the whole report once (its top and
/// new sources read raw events).
fn series_query(
    world: &World,
    key_id: &str,
    from: i64,
    now: i64,
    events: usize,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let path = format!("/v1/keys/{key_id}/usage?from_ms={from}&to_ms={}&granularity=minute", now + 60_000);
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(600)).build()?;
    let get = |path: &str| -> anyhow::Result<(f64, Value)> {
        let started = Instant::now();
        let answer = client.get(format!("{}{path}", world.origin())).bearer_auth(&world.root_key).send()?;
        let took = started.elapsed().as_secs_f64() * 1e3;
        ensure!(answer.status().is_success(), "usage answered {}", answer.status());
        Ok((took, answer.json()?))
    };
    let mut times = Vec::new();
    let mut last = Value::Null;
    for _ in 0..5 {
        let (took, usage) = get(&format!("{path}&parts=counts"))?;
        times.push(took);
        last = usage;
    }
    let points = last["series"].as_array().map_or(0, Vec::len);
    let counted: u64 = last["series"].as_array().into_iter().flatten().filter_map(|p| p["count"].as_u64()).sum();
    let p50 = percentile(&mut times.clone(), 0.5);
    println!("30-day per-minute series: {points} points counting {counted} events; p50 {p50:.0} ms");
    ensure!(counted >= events as u64, "the series counts {counted} of the {events} events sent");
    let (whole, _) = get(&path)?;
    println!("the whole 30-day report (top and new sources from raw events too): {whole:.0} ms");
    figures.add("series_30d_minute_points", points as f64, 0);
    figures.add("series_30d_minute_p50_ms", p50, 0);
    figures.add("report_30d_whole_ms", whole, 0);
    Ok(())
}
