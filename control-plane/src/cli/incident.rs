//! `keyward incident`: the response to a leaked key, end to end. Find the key (asking which
//! when its visible start matches several), show whose it is and who used it in the last hour,
//! revoke it after a confirmation, show each target's acknowledgement as it arrives (from
//! `GET /v1/keys/{id}/delivery`, polled while the revoke call runs), wait until the promise's
//! bound has passed, and print the revocation proof.
//!
//! On a terminal it prints as it goes, aligned and coloured, with a progress line while it
//! waits; with `--json` (or a pipe) prompts and progress go to stderr and stdout gets one JSON
//! document at the end, for scripts.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::client::Client;
use super::render::{self, Paint, View, clock, field_table, items, list, paint, table, text};
use super::request::encode;
use crate::time::now_ms;

/// How long acknowledgements are followed after the revoke is committed.
const FOLLOW_FOR: Duration = Duration::from_secs(30);
/// How often the change's delivery is read while it is followed.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// The longest wait for the promise's bound; a longer `max_staleness_ms` is said, not waited for.
const MAX_WAIT_MS: i64 = 60_000;
/// Waited beyond the bound so the answers decided up to it have reached the control plane: an
/// edge isolate ships its usage events at least every 2 s.
const EVIDENCE_LAG_MS: i64 = 3_000;
/// Keys shown when a start matches several.
const MAX_CANDIDATES: u32 = 20;

/// What the incident found and did, printed whole with `--json`.
#[derive(Default)]
struct Record {
    key: Value,
    usage: Value,
    revoke: Value,
    delivery: Value,
    waited_ms: i64,
    proof: Value,
}

/// Where the incident's words go: stdout on a terminal run, stderr when stdout carries JSON.
struct Screen {
    json: bool,
    live: bool,
    /// Whether a progress line is on the screen, to be cleared before anything else is said.
    progress_shown: std::cell::Cell<bool>,
}

impl Screen {
    fn say(&self, text: &str) {
        if text.is_empty() {
            return;
        }
        self.end_progress();
        if self.json {
            eprint!("{text}");
        } else {
            print!("{text}");
            let _ = std::io::stdout().flush();
        }
    }

    /// A line redrawn in place while waiting, on a terminal only.
    fn progress(&self, text: &str) {
        if self.live {
            let mut out = std::io::stderr();
            let _ = write!(out, "\r\x1b[2K{text}");
            let _ = out.flush();
            self.progress_shown.set(true);
        }
    }

    fn end_progress(&self) {
        if self.progress_shown.replace(false) {
            eprint!("\r\x1b[2K");
        }
    }
}

/// Runs the incident for `start` (a key id or the visible start of a key); answers whether the
/// proof found violations.
pub async fn run(client: &Client, start: &str, yes: bool, json: bool) -> anyhow::Result<bool> {
    let screen = Screen { json, live: std::io::stderr().is_terminal(), progress_shown: Default::default() };
    let mut record = Record { key: find(client, &screen, start).await?, ..Record::default() };
    let id = text(&record.key["id"]);
    let from_ms = now_ms() - 3_600_000;
    record.usage = client.get(&format!("/v1/keys/{}/usage?from_ms={from_ms}", encode(&id))).await?;
    screen.say(&describe(&record.key, &record.usage));
    let version = match record.key["status"].as_str() {
        Some("revoked") => {
            screen.say(&format!("{id} is already revoked: following that change.\n"));
            record.key["version"].as_u64().context("the key has no version")?
        }
        _ => {
            if !yes && !confirm(&screen, &record.key).await? {
                bail!("not revoked: the key still works. Run again and answer `y`, or pass --yes");
            }
            let (revoke, delivery) = revoke_and_follow(client, &screen, &record.key).await?;
            record.revoke = revoke;
            record.delivery = delivery;
            record.revoke["version"].as_u64().context("the revoke answer has no version")?
        }
    };
    if record.delivery.is_null() {
        record.delivery = client.get(&format!("/v1/keys/{}/delivery?version={version}", encode(&id))).await?;
        screen.say(&delivery_lines(&record.delivery, &mut BTreeMap::new()));
    }
    record.waited_ms = wait_for_bound(&screen, &record.key, &record.delivery).await;
    record.proof = client.get(&format!("/v1/keys/{}/proof", encode(&id))).await?;
    if json {
        let answer = json!({
            "key": record.key, "usage": record.usage, "revoke": record.revoke,
            "delivery": record.delivery, "waited_ms": record.waited_ms, "proof": record.proof,
        });
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        screen.say(&format!("\n{}\n", paint("Revocation proof", Paint::Bold)));
        screen.say(&render::render(View::Proof, &record.proof, now_ms()));
    }
    Ok(record.proof["violations"].as_u64().is_some_and(|n| n > 0))
}

/// The key `start` names: by id, or the one key whose visible start it is (asking which when
/// there are several, on a terminal).
async fn find(client: &Client, screen: &Screen, start: &str) -> anyhow::Result<Value> {
    if start.starts_with("key_") {
        return client.get(&format!("/v1/keys/{}", encode(start))).await;
    }
    let page = client.get(&format!("/v1/keys?start={}&limit={MAX_CANDIDATES}", encode(start))).await?;
    let keys = items(&page["keys"]);
    match keys {
        [] => bail!(
            "no key starts with `{start}`: check the text (a key's start is its prefix and a few characters), or give the key's id"
        ),
        [key] => Ok(key.clone()),
        several => {
            let now = now_ms();
            let rows = several
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    let owner = text(&k["owner_id"]);
                    vec![
                        (i + 1).to_string(),
                        text(&k["id"]),
                        text(&k["name"]),
                        text(&k["start"]),
                        owner,
                        render::status(k, now),
                    ]
                })
                .collect();
            let more = if page["cursor"].is_null() { "" } else { " (the first of more)" };
            screen.say(&format!("{} keys start with `{start}`{more}:\n", several.len()));
            screen.say(&table(&["#", "id", "name", "start", "owner", "status"], rows, ""));
            if !std::io::stdin().is_terminal() {
                bail!("`{start}` matches {} keys: give the id of the one to revoke", several.len());
            }
            let answer = ask(screen, &format!("Which key? [1-{}] ", several.len())).await?;
            let chosen = answer.trim().parse::<usize>().ok().filter(|n| (1..=several.len()).contains(n));
            let n =
                chosen.with_context(|| format!("`{}` is not a number from 1 to {}", answer.trim(), several.len()))?;
            Ok(several[n - 1].clone())
        }
    }
}

/// Whose the key is, what it may do, and who used it in the last hour.
fn describe(key: &Value, usage: &Value) -> String {
    let now = now_ms();
    let mut out = format!("{}\n", paint(&format!("Key {}", text(&key["id"])), Paint::Bold));
    out += &field_table(&[
        ("name", text(&key["name"])),
        ("start", text(&key["start"])),
        ("owner", text(&key["owner_id"])),
        ("api", text(&key["api_id"])),
        ("permissions", list(&key["permissions"])),
        ("status", render::status(key, now)),
        ("max staleness", format!("{} ms", text(&key["max_staleness_ms"]))),
    ]);
    let totals: Vec<String> =
        usage["totals"].as_object().into_iter().flatten().map(|(code, n)| format!("{code} {}", text(n))).collect();
    let totals = if totals.is_empty() { "none".to_owned() } else { totals.join(", ") };
    out += &format!("Last hour: {} verifications ({totals}).\n", text(&usage["total"]));
    let mut rows = Vec::new();
    for (kind, list) in usage["top"].as_object().into_iter().flatten() {
        rows.extend(items(list).iter().take(5).map(|s| vec![kind.clone(), text(&s["value"]), text(&s["count"])]));
    }
    out += &table(&["top source", "value", "count"], rows, "No sources in the last hour.");
    out
}

/// Asks for the revocation; `true` on `y` or `yes`. Refuses to ask without a terminal.
async fn confirm(screen: &Screen, key: &Value) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!("not revoked: confirmation needs a terminal; pass --yes to revoke without asking");
    }
    let question = format!("Revoke {} ({}) everywhere? [y/N] ", text(&key["id"]), text(&key["start"]));
    let answer = ask(screen, &paint(&question, Paint::Yellow)).await?;
    Ok(matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes"))
}

async fn ask(screen: &Screen, question: &str) -> anyhow::Result<String> {
    screen.say(question);
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    });
    Ok(line.await??)
}

/// Revokes the key and shows each target's acknowledgement as it lands, until every target has
/// acknowledged or [`FOLLOW_FOR`] has passed; answers the revoke call's answer and the last
/// delivery read.
async fn revoke_and_follow(client: &Client, screen: &Screen, key: &Value) -> anyhow::Result<(Value, Value)> {
    let id = text(&key["id"]);
    let mut version = key["version"].as_u64().context("the key has no version")? + 1;
    let mut call = Some({
        let (client, path) = (client.clone(), format!("/v1/keys/{}/revoke", encode(&id)));
        tokio::spawn(async move { client.post(&path).await })
    });
    screen.say(&format!("Revoking {id}...\n"));
    let started = Instant::now();
    let (mut shown, mut revoke, mut delivery) = (BTreeMap::new(), None::<Value>, Value::Null);
    loop {
        if let Some(handle) = call.take_if(|c| c.is_finished()) {
            let answer = handle.await.context("the revoke call stopped")??;
            version = answer["version"].as_u64().unwrap_or(version);
            revoke = Some(answer);
        }
        // Before the change is committed the route has no delivery of `version` yet.
        if let Ok(read) = client.get(&format!("/v1/keys/{}/delivery?version={version}", encode(&id))).await {
            screen.say(&delivery_lines(&read, &mut shown));
            delivery = read;
        }
        let settled = delivery["pending"].as_u64() == Some(0);
        if revoke.is_some() && settled {
            break;
        }
        if started.elapsed() >= FOLLOW_FOR {
            if let Some(handle) = call.take() {
                revoke = Some(handle.await.context("the revoke call stopped")??);
            }
            screen.say(&still_pending(&delivery));
            break;
        }
        screen.progress(&format!("waiting for acknowledgements: {:.1} s", started.elapsed().as_secs_f64()));
        tokio::time::sleep(POLL_EVERY).await;
    }
    screen.end_progress();
    Ok((revoke.unwrap_or_default(), delivery))
}

/// A line for each target whose state (or last error) changed since it was last shown.
fn delivery_lines(delivery: &Value, shown: &mut BTreeMap<String, String>) -> String {
    let committed = delivery["committed_at_ms"].as_i64();
    let mut out = String::new();
    for target in items(&delivery["targets"]) {
        let name = text(&target["target"]);
        let state = text(&target["state"]);
        let seen = format!("{state}/{}", text(&target["last_error"]));
        if shown.get(&name) == Some(&seen) {
            continue;
        }
        let line = match state.as_str() {
            "done" => {
                let after =
                    target["done_at"].as_i64().zip(committed).map_or("-".into(), |(d, c)| format!("{} ms", d - c));
                let applied = if target["applied_at"].is_null() {
                    String::new()
                } else {
                    format!(", answering from it since {}", clock(&target["applied_at"]))
                };
                paint(&format!("  ✓ {name:<14} acknowledged {after} after the commit{applied}"), Paint::Green)
            }
            "pending" if target["last_error"].is_null() => continue,
            "pending" => paint(
                &format!(
                    "  … {name:<14} not yet (attempt {}): {}",
                    text(&target["attempts"]),
                    text(&target["last_error"])
                ),
                Paint::Yellow,
            ),
            other => format!("  - {name:<14} {other}"),
        };
        out += &format!("{line}\n");
        shown.insert(name, seen);
    }
    out
}

fn still_pending(delivery: &Value) -> String {
    let pending: Vec<String> =
        items(&delivery["targets"]).iter().filter(|t| t["state"] == "pending").map(|t| text(&t["target"])).collect();
    if pending.is_empty() {
        return String::new();
    }
    let line = format!(
        "  ✗ after {} s still not acknowledged: {}. The control plane keeps retrying them; the proof below shows what those regions answered.",
        FOLLOW_FOR.as_secs(),
        pending.join(", ")
    );
    format!("{}\n", paint(&line, Paint::Red))
}

/// Waits until the promise's bound (the revoke's answer plus `max_staleness_ms`) has passed,
/// and the evidence has had time to arrive; at most [`MAX_WAIT_MS`]. Answers the time waited.
async fn wait_for_bound(screen: &Screen, key: &Value, delivery: &Value) -> i64 {
    let staleness = key["max_staleness_ms"].as_i64().unwrap_or(0);
    let answered = delivery["answered_at_ms"].as_i64().unwrap_or_else(now_ms);
    let bound = answered + staleness;
    let start = now_ms();
    let until = (bound + EVIDENCE_LAG_MS).min(start + MAX_WAIT_MS);
    if staleness > MAX_WAIT_MS {
        screen.say(&format!(
            "max_staleness_ms is {} s: waiting {} s only; a region whose purge was lost may answer from its copy until {} UTC.\n",
            staleness / 1000,
            MAX_WAIT_MS / 1000,
            clock(&json!(bound)),
        ));
    } else {
        screen.say(&format!(
            "Waiting until the promise's bound ({} UTC, the answer plus max_staleness_ms) and {} s for the evidence to arrive.\n",
            clock(&json!(bound)),
            EVIDENCE_LAG_MS / 1000
        ));
    }
    loop {
        let now = now_ms();
        if now >= until {
            break;
        }
        screen.progress(&format!("waiting for the promise's bound: {:.1} s left", (until - now) as f64 / 1000.0));
        tokio::time::sleep(Duration::from_millis((until - now).clamp(1, 100) as u64)).await;
    }
    screen.end_progress();
    now_ms() - start
}
