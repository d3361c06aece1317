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
use keyward_shared::Key;
use keyward_shared::key::START_BODY_CHARS;

use super::render::{self, Paint, View, clock, field_table, items, list, moment, paint, table, text};
use super::request::encode;
use crate::keygen;
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
    if yes && !keygen::is_id(start, "key") && !is_whole_start(start) {
        bail!(
            "--yes revokes without asking: give the key's id or its whole start (the prefix and {START_BODY_CHARS} more characters), not `{start}`"
        );
    }
    let mut record = Record { key: find(client, &screen, start).await?, ..Record::default() };
    let id = text(&record.key["id"]);
    let from_ms = now_ms() - 3_600_000;
    record.usage = client.get(&format!("/v1/keys/{}/usage?from_ms={from_ms}", encode(&id))).await?;
    screen.say(&describe(&record.key, &record.usage));
    let call = match record.key["status"].as_str() {
        Some(status @ ("revoked" | "deleted")) => {
            screen.say(&format!("{id} is already {status}: following that change.\n"));
            None
        }
        _ => {
            if !yes && !confirm(&screen, &record.key).await? {
                bail!("not revoked: the key still works. Run again and answer `y`, or pass --yes");
            }
            screen.say(&format!("Revoking {id}...\n"));
            let (client, path) = (client.clone(), format!("/v1/keys/{}/revoke", encode(&id)));
            Some(tokio::spawn(async move { client.post(&path).await }))
        }
    };
    let version = record.key["version"].as_u64().context("the key has no version")? + u64::from(call.is_some());
    let followed = follow(client, &screen, &id, version, call).await?;
    (record.revoke, record.delivery) = (followed.revoke, followed.delivery);
    let answered = record.delivery["answered_at_ms"].as_i64().or(followed.answered_ms);
    record.waited_ms = wait_for_bound(&screen, &record.key, answered).await;
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

/// Whether `start` is a key's whole visible start (or more of the key): its prefix, `_`, and at
/// least [`START_BODY_CHARS`] characters.
fn is_whole_start(start: &str) -> bool {
    start.rsplit_once('_').is_some_and(|(prefix, body)| !prefix.is_empty() && body.len() >= START_BODY_CHARS)
}

/// The key `start` names: by id, or the one key whose visible start it is (asking which when
/// there are several, on a terminal).
async fn find(client: &Client, screen: &Screen, start: &str) -> anyhow::Result<Value> {
    if keygen::is_id(start, "key") {
        return client.get(&format!("/v1/keys/{}", encode(start))).await;
    }
    // A whole key is never sent: only its visible start, as any start would be.
    let whole = Key::parse(start).ok();
    if whole.is_some() {
        screen.say("That is a whole key: only its start is sent. It is now in your shell's history too.\n");
    }
    let start = whole.as_ref().map_or(start, Key::start);
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
    let rows = render::source_rows(&usage["top"], 5);
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

/// What following a change found.
struct Followed {
    /// The revoke call's answer (`null` when the key was already revoked).
    revoke: Value,
    /// The change's delivery as last read (`null` when it is no longer kept).
    delivery: Value,
    /// When the revoke call answered, by this machine's clock, if the delivery does not say.
    answered_ms: Option<i64>,
}

/// Follows the change to `version` (while `call`, the revoke, runs), showing each target's
/// acknowledgement as it lands, until every target has acknowledged or [`FOLLOW_FOR`] has
/// passed, then names what is still pending.
async fn follow(
    client: &Client,
    screen: &Screen,
    id: &str,
    mut version: u64,
    mut call: Option<tokio::task::JoinHandle<anyhow::Result<Value>>>,
) -> anyhow::Result<Followed> {
    let started = Instant::now();
    let mut shown = BTreeMap::new();
    let mut followed = Followed { revoke: Value::Null, delivery: Value::Null, answered_ms: None };
    let mut complained = None::<String>;
    loop {
        if let Some(handle) = call.take_if(|c| c.is_finished()) {
            followed.revoke = revoked(client, id, handle.await.context("the revoke call stopped")?).await?;
            followed.answered_ms = Some(now_ms());
            if let Some(answered) = followed.revoke["version"].as_u64().filter(|v| *v != version) {
                (version, shown) = (answered, BTreeMap::new());
            }
        }
        match client.get(&format!("/v1/keys/{}/delivery?version={version}", encode(id))).await {
            // Before the revocation commits, `version` may be another change, or none yet.
            Ok(read) if call.is_some() && read["status"] != "revoked" => {}
            Ok(read) => {
                screen.say(&delivery_lines(&read, &mut shown));
                followed.delivery = read;
            }
            Err(_) if call.is_some() => {}
            Err(e) if call.is_none() && followed.delivery.is_null() && followed.revoke.is_null() => {
                screen.say(&format!(
                    "The change's delivery is no longer kept ({e}); the proof below stands on the evidence.\n"
                ));
                return Ok(followed);
            }
            Err(e) => {
                let e = e.to_string();
                if complained.as_ref() != Some(&e) {
                    screen.say(&paint(&format!("  cannot read the delivery: {e}\n"), Paint::Yellow));
                    complained = Some(e);
                }
            }
        }
        if call.is_none() && followed.delivery["pending"].as_u64() == Some(0) {
            break;
        }
        if started.elapsed() >= FOLLOW_FOR && call.is_none() {
            screen.say(&still_pending(&followed.delivery));
            break;
        }
        screen.progress(&format!("waiting for acknowledgements: {:.1} s", started.elapsed().as_secs_f64()));
        tokio::time::sleep(POLL_EVERY).await;
    }
    screen.end_progress();
    Ok(followed)
}

/// The revoke call's answer; when the call failed but the key is revoked all the same (the
/// answer was lost after the commit), the key as it is now, so the incident goes on.
async fn revoked(client: &Client, id: &str, answer: anyhow::Result<Value>) -> anyhow::Result<Value> {
    match answer {
        Ok(answer) => Ok(answer),
        Err(e) => {
            let key = client.get(&format!("/v1/keys/{}", encode(id))).await.map_err(|_| e)?;
            if key["status"] != "revoked" {
                bail!("the revoke failed and the key is still {}: run again", text(&key["status"]));
            }
            Ok(key)
        }
    }
}

/// A line for each target whose state (or last error) changed since it was last shown.
fn delivery_lines(delivery: &Value, shown: &mut BTreeMap<String, String>) -> String {
    let committed = delivery["committed_at_ms"].as_i64();
    let targets = items(&delivery["targets"]);
    let width = targets.iter().map(|t| text(&t["target"]).chars().count()).max().unwrap_or(0);
    let mut out = String::new();
    for target in targets {
        let name = text(&target["target"]);
        let state = text(&target["state"]);
        let acknowledged = target["acknowledged"] == true;
        let seen = format!("{state}/{acknowledged}/{}", text(&target["last_error"]));
        if shown.get(&name) == Some(&seen) {
            continue;
        }
        let line = match state.as_str() {
            "done" if acknowledged => {
                let after =
                    target["done_at"].as_i64().zip(committed).map_or("-".into(), |(d, c)| format!("{} ms", d - c));
                let applied = if target["applied_at"].is_null() {
                    String::new()
                } else {
                    format!(", answering from it since {}", clock(&target["applied_at"]))
                };
                paint(&format!("  ✓ {name:<width$}  acknowledged {after} after the commit{applied}"), Paint::Green)
            }
            "done" => paint(
                &format!("  … {name:<width$}  took the purge; not counted until the authority has the change"),
                Paint::Yellow,
            ),
            "pending" if target["last_error"].is_null() => continue,
            "pending" => paint(
                &format!(
                    "  … {name:<width$}  not yet (attempt {}): {}",
                    text(&target["attempts"]),
                    text(&target["last_error"])
                ),
                Paint::Yellow,
            ),
            other => format!("  - {name:<width$}  {other}"),
        };
        out += &format!("{line}\n");
        shown.insert(name, seen);
    }
    out
}

fn still_pending(delivery: &Value) -> String {
    let pending: Vec<String> = items(&delivery["targets"])
        .iter()
        .filter(|t| t["acknowledged"] != true && matches!(t["state"].as_str(), Some("pending" | "done")))
        .map(|t| text(&t["target"]))
        .collect();
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
async fn wait_for_bound(screen: &Screen, key: &Value, answered_ms: Option<i64>) -> i64 {
    let start = now_ms();
    let staleness = key["max_staleness_ms"].as_i64().unwrap_or(0);
    let plan = plan_wait(start, answered_ms, staleness);
    screen.say(&format!("{}\n", plan.message));
    loop {
        let now = now_ms();
        if now >= plan.until_ms {
            break;
        }
        screen
            .progress(&format!("waiting for the promise's bound: {:.1} s left", (plan.until_ms - now) as f64 / 1000.0));
        tokio::time::sleep(Duration::from_millis((plan.until_ms - now).clamp(1, 100) as u64)).await;
    }
    screen.end_progress();
    now_ms() - start
}

/// How long to wait before reading the proof, and what to say about it.
#[derive(Debug, PartialEq)]
struct WaitPlan {
    until_ms: i64,
    message: String,
}

/// The wait from `now_ms` for a change answered at `answered_ms` (unknown: now) of a key
/// trusted for `staleness_ms`: to the bound plus [`EVIDENCE_LAG_MS`], at most [`MAX_WAIT_MS`].
fn plan_wait(now_ms: i64, answered_ms: Option<i64>, staleness_ms: i64) -> WaitPlan {
    let bound = answered_ms.unwrap_or(now_ms) + staleness_ms;
    let wanted = bound + EVIDENCE_LAG_MS;
    let at = moment(&json!(bound));
    if wanted <= now_ms {
        return WaitPlan { until_ms: now_ms, message: format!("The promise's bound passed at {at}.") };
    }
    if wanted > now_ms + MAX_WAIT_MS {
        let message = format!(
            "The promise's bound is {at} (max_staleness_ms is {} s): waiting {} s only, so the proof below is partial; \
             run `keyward keys proof` after that time for the whole of it.",
            staleness_ms / 1000,
            MAX_WAIT_MS / 1000
        );
        return WaitPlan { until_ms: now_ms + MAX_WAIT_MS, message };
    }
    let message = format!(
        "Waiting until the promise's bound ({at}, the answer plus max_staleness_ms) and {} s more for the evidence to arrive.",
        EVIDENCE_LAG_MS / 1000
    );
    WaitPlan { until_ms: wanted, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_000_000_000;

    #[test]
    fn the_wait_reaches_the_bound_and_the_evidence_at_most_a_minute() {
        let plan = |answered: Option<i64>, staleness: i64| plan_wait(NOW, answered, staleness);
        // Answered just now, trusted 1 s: the bound, then 3 s for the evidence.
        let soon = plan(Some(NOW - 200), 1_000);
        assert_eq!(soon.until_ms, NOW + 800 + EVIDENCE_LAG_MS);
        assert!(
            soon.message.starts_with("Waiting until the promise's bound (2026-11-18 11:06:40.800 UTC"),
            "{}",
            soon.message
        );
        // Long past: no wait, and the date is named.
        let past = plan(Some(NOW - 86_400_000), 1_000);
        assert_eq!(past.until_ms, NOW);
        assert!(past.message.contains("passed at 2026-11-17"), "{}", past.message);
        // Longer than a minute away (the evidence lag included): a minute, and said to be partial.
        for staleness in [58_000, 300_000] {
            let long = plan(Some(NOW), staleness);
            assert_eq!(long.until_ms, NOW + MAX_WAIT_MS, "{staleness}");
            assert!(long.message.contains("partial"), "{}", long.message);
        }
        // Unknown answer time: counted from now.
        assert_eq!(plan(None, 1_000).until_ms, NOW + 1_000 + EVIDENCE_LAG_MS);
    }

    #[test]
    fn each_target_is_shown_once_per_change_and_a_purge_counts_only_with_the_authority() {
        let delivery = |authority: &str, acknowledged: bool| {
            json!({ "committed_at_ms": NOW, "targets": [
                { "target": "authority", "state": authority, "acknowledged": authority == "done", "done_at": NOW + 40, "attempts": 1, "last_error": if authority == "done" { Value::Null } else { json!("refused") } },
                { "target": "purge:eu-west-1", "state": "done", "acknowledged": acknowledged, "done_at": NOW + 12, "applied_at": NOW + 11, "attempts": 1, "last_error": null },
            ] })
        };
        let mut shown = BTreeMap::new();
        let first = delivery_lines(&delivery("pending", false), &mut shown);
        assert!(first.contains("authority        not yet (attempt 1): refused"), "{first}");
        assert!(first.contains("purge:eu-west-1  took the purge; not counted until the authority"), "{first}");
        assert_eq!(delivery_lines(&delivery("pending", false), &mut shown), "", "nothing changed, nothing shown");
        let then = delivery_lines(&delivery("done", true), &mut shown);
        assert!(then.contains("✓ authority        acknowledged 40 ms after the commit"), "{then}");
        assert!(
            then.contains(
                "✓ purge:eu-west-1  acknowledged 12 ms after the commit, answering from it since 11:06:40.011"
            ),
            "{then}"
        );
        assert_eq!(still_pending(&delivery("done", true)), "");
        assert!(still_pending(&delivery("pending", false)).contains("authority, purge:eu-west-1"));
    }

    #[test]
    fn yes_needs_an_id_or_a_whole_start() {
        assert!(is_whole_start("sk_live_3xQ9ab"));
        assert!(is_whole_start("sk_live_3xQ9abcdefgh"));
        assert!(!is_whole_start("sk_live_3x"));
        assert!(!is_whole_start("sk_"));
        assert!(!is_whole_start("_3xQ9ab"));
    }
}
