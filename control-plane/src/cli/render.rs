//! The CLI's answers for people: aligned tables and short sentences, made from the API's JSON.
//!
//! Pure functions of the answer and the time, so each view is tested without a server. A key's
//! plaintext appears only in the answer to `create`, with a warning that it is shown once.

use std::sync::atomic::{AtomicBool, Ordering};

use comfy_table::{CellAlignment, Table, presets};
use serde_json::Value;

/// Whether text is coloured: on a terminal, unless `NO_COLOR` is set (set by `cli::run`).
static COLOUR: AtomicBool = AtomicBool::new(false);

pub fn set_colour(on: bool) {
    COLOUR.store(on, Ordering::Relaxed);
}

/// The colours the CLI uses: good news, bad news, waiting, and emphasis.
#[derive(Debug, Clone, Copy)]
pub enum Paint {
    Green,
    Red,
    Yellow,
    Bold,
}

/// `text` in a colour, when colour is on; as it is otherwise.
pub fn paint(text: &str, paint: Paint) -> String {
    if !COLOUR.load(Ordering::Relaxed) {
        return text.to_owned();
    }
    let code = match paint {
        Paint::Green => "32",
        Paint::Red => "1;31",
        Paint::Yellow => "33",
        Paint::Bold => "1",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// Which answer is being printed, and so how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    WorkspaceCreated,
    RootKeyCreated,
    /// `admin recover`'s answer, made without the API.
    RootKeyRecovered,
    RootKeys,
    RootKeyRevoked,
    ApiCreated,
    Apis,
    KeyCreated,
    Key,
    Keys,
    KeyUpdated,
    KeyRevoked,
    KeyDeleted,
    Verified,
    OutboxStatus,
    Redriven,
    /// A key's current record queued again (`outbox redrive --key`).
    Repushed,
    Usage,
    Audit,
    Proof,
    /// A key's credits as its authority holds them.
    Credits,
    /// An API's allow and deny lists and limit override (and, after a change, its delivery).
    Policy,
    AuditCheckpoint,
    AuditVerified,
    /// One identity.
    Identity,
    Identities,
    /// An identity created or changed, and its delivery.
    IdentityChanged,
    IdentityDeleted,
}

/// The text for `answer`, ending in a newline; `now` (Unix ms) decides whether a key has expired.
pub fn render(view: View, answer: &Value, now: i64) -> String {
    match view {
        View::WorkspaceCreated => {
            let root = &answer["root_key"];
            format!(
                "Created workspace {} ({}) and its first root key {}, with scopes: {}.\n{}",
                text(&answer["id"]),
                text(&answer["name"]),
                text(&root["id"]),
                list(&root["scopes"]),
                shown_once("root key", &root["key"]),
            )
        }
        View::RootKeyCreated => format!(
            "Created root key {} with scopes: {}.\n{}",
            text(&answer["id"]),
            list(&answer["scopes"]),
            shown_once("root key", &answer["key"]),
        ),
        View::RootKeyRecovered => root_key_recovered(answer, now),
        View::RootKeys => root_keys(answer),
        View::RootKeyRevoked => format!(
            "Revoked root key {}: the control plane refuses it now, and every region within 1 s.\n{}",
            text(&answer["id"]),
            delivery(answer),
        ),
        View::ApiCreated => format!(
            "Created API {} ({}): its keys start with `{}_`, and edge copies older than {} ms are confirmed.\n",
            text(&answer["id"]),
            text(&answer["name"]),
            text(&answer["prefix"]),
            text(&answer["max_staleness_ms"]),
        ),
        View::Apis => apis(answer),
        View::Policy => policy(answer),
        View::KeyCreated => format!(
            "Created key {} (start {}) in API {}.\n{}",
            text(&answer["id"]),
            text(&answer["start"]),
            text(&answer["api_id"]),
            shown_once("key", &answer["key"]),
        ),
        View::Key => key_fields(answer, now),
        View::Identity => identity_fields(answer),
        View::Identities => identities(answer),
        View::IdentityChanged => identity_changed(answer),
        View::IdentityDeleted => format!("Deleted identity {}.\n", text(&answer["id"])),
        View::Keys => keys(answer, now),
        View::KeyUpdated => {
            let key = &answer["key"];
            format!(
                "Updated key {} (version {}, {}).\n{}",
                text(&key["id"]),
                text(&key["version"]),
                status(key, now),
                delivery(answer)
            )
        }
        View::KeyRevoked => {
            format!("Revoked key {} (version {}).\n{}", text(&answer["id"]), text(&answer["version"]), delivery(answer))
        }
        View::KeyDeleted => format!(
            "Deleted key {} (version {}): it now verifies as NOT_FOUND.\n{}",
            text(&answer["id"]),
            text(&answer["version"]),
            delivery(answer)
        ),
        View::Verified => verified(answer),
        View::Usage => usage(answer),
        View::Audit => audit(answer),
        View::Proof => proof(answer),
        View::Credits => credits_view(answer),
        View::AuditCheckpoint => audit_checkpoint(answer),
        View::AuditVerified => audit_verified(answer),
        View::OutboxStatus => outbox_status(answer, now),
        View::Redriven => redriven(answer),
        View::Repushed => repushed(&answer["queued"]),
    }
}

/// `outbox redrive`: what was made pending or due again.
fn redriven(answer: &Value) -> String {
    format!(
        "Redrove {}: {} dead-lettered deliveries made pending again, {} pending ones made due now.\n",
        answer["region"].as_str().map_or("every target".to_owned(), |r| format!("region {}", printable(r))),
        text(&answer["revived"]),
        text(&answer["made_due"]),
    )
}

/// `outbox redrive --key`: what was queued, and who delivers it.
fn repushed(queued: &Value) -> String {
    let kind = if queued["kind"] == "root_key" { "root key" } else { "key" };
    format!(
        "Queued {kind} {}'s current record (version {}) again as outbox entry {}{}, for: {}.\n\
         The running control plane's retrier delivers it; `keyward outbox status` shows what stays pending.\n",
        text(&queued["key_id"]),
        text(&queued["version"]),
        text(&queued["outbox_id"]),
        if queued["tightening"] == true { ", purging" } else { "" },
        list(&queued["targets"]),
    )
}

/// `root-keys list`: a table, scopes last.
fn root_keys(answer: &Value) -> String {
    let rows = items(&answer["root_keys"]).iter().map(|r| {
        let fields = [&r["id"], &r["name"], &r["start"], &r["status"]];
        let mut row: Vec<String> = fields.into_iter().map(text).collect();
        // Last, since a root key may hold many scopes.
        row.extend([date(&r["updated_at"]), list(&r["scopes"])]);
        row
    });
    table(&["ID", "NAME", "START", "STATUS", "UPDATED", "SCOPES"], rows.collect(), "No root keys.")
}

/// `apis list`: a table.
fn apis(answer: &Value) -> String {
    let rows = items(&answer["apis"]).iter().map(|a| {
        let fields = [&a["id"], &a["name"], &a["prefix"]];
        let mut row: Vec<String> = fields.into_iter().map(text).collect();
        row.extend([format!("{} ms", text(&a["max_staleness_ms"])), date(&a["created_at"])]);
        row
    });
    let empty = "No APIs yet: create one with `keyward apis create --name <name>`.";
    table(&["ID", "NAME", "PREFIX", "MAX STALENESS", "CREATED"], rows.collect(), empty)
}

/// `keys list`: a table, and how to page on.
fn keys(answer: &Value, now: i64) -> String {
    let rows = items(&answer["keys"]).iter().map(|k| {
        let fields = [&k["id"], &k["start"], &k["name"], &k["owner_id"]];
        let mut row: Vec<String> = fields.into_iter().map(text).collect();
        row.extend([status(k, now), expiry(&k["expires_at"])]);
        row
    });
    let mut out = table(&["ID", "START", "NAME", "OWNER", "STATUS", "EXPIRES"], rows.collect(), "No keys match.");
    if let Some(cursor) = answer["cursor"].as_str() {
        out.push_str(&format!("More keys follow: add --cursor {cursor}\n"));
    }
    out
}

/// `keys verify`: the outcome, and what the answer reveals of the key.
fn verified(answer: &Value) -> String {
    let valid = if answer["valid"] == Value::Bool(true) { "valid" } else { "not valid" };
    let mut out = format!("{}: {valid}", text(&answer["code"]));
    if let Some(source) = answer["source"].as_str().map(printable) {
        out.push_str(&format!(" (answered from {source})"));
    }
    out.push('\n');
    let fields = [
        ("key", text(&answer["key_id"])),
        ("api", text(&answer["api_id"])),
        ("name", text(&answer["name"])),
        ("owner", text(&answer["owner_id"])),
        ("expires", expiry(&answer["expires_at"])),
        // Those of the permissions asked about that the key holds.
        ("permissions held", list(&answer["permissions"])),
        ("meta", meta(&answer["meta"])),
    ];
    let shown: Vec<_> = fields.into_iter().filter(|(_, value)| value != "-").collect();
    // No key id: the answer reveals nothing about a key (MALFORMED, NOT_FOUND).
    if answer["key_id"].is_string() {
        out.push_str(&indent(&field_table(&shown)));
    }
    out
}

/// `outbox status`: every target's counts, then each stuck or dead-lettered delivery.
/// The violations a proof lists on a terminal; `--json` has every one.
const MAX_VIOLATIONS_SHOWN: usize = 20;

/// A revocation proof: the change, each region's acknowledgement, every VALID since, judged.
fn proof(answer: &Value) -> String {
    let change = &answer["change"];
    let by = answer["by"]["root_key_name"].as_str().map_or(String::new(), |n| format!(" by root key {}", printable(n)));
    let mut out = format!(
        "Key {} {} at {}{by} (version {}); answered at {}.\n",
        text(&answer["key_id"]),
        text(&change["kind"]),
        moment(&change["at_ms"]),
        text(&change["version"]),
        clock(&change["answered_at_ms"]),
    );
    let rows = items(&answer["regions"])
        .iter()
        .map(|r| {
            let took = &r["took"];
            let ack = match took["acknowledged"].as_bool() {
                Some(true) if took["applied_at_ms"].is_null() => {
                    format!("acknowledged {}", clock(&took["acknowledged_at_ms"]))
                }
                Some(true) => format!("acknowledged, applied {}", clock(&took["applied_at_ms"])),
                Some(false) => "NOT acknowledged".to_owned(),
                None => "-".to_owned(),
            };
            let listed = items(&r["valid_after"]).len();
            let valid = if r["truncated"] == true { format!("{listed}+") } else { listed.to_string() };
            let rejected: i64 =
                r["rejections_since"].as_object().map_or(0, |m| m.values().filter_map(Value::as_i64).sum());
            vec![text(&r["region"]), ack, valid, text(&r["violations"]), rejected.to_string()]
        })
        .collect();
    out += &table(&["region", "purge", "VALID since", "violations", "rejected since"], rows, "No region has answered.");
    let violations: Vec<Vec<String>> = items(&answer["regions"])
        .iter()
        .flat_map(|r| items(&r["valid_after"]).iter().filter(|v| v["verdict"] == "violation"))
        .map(|v| {
            let late =
                v["at_ms"].as_i64().zip(v["bound_ms"].as_i64()).map_or("-".into(), |(at, b)| format!("{} ms", at - b));
            vec![text(&v["region"]), clock(&v["at_ms"]), text(&v["version"]), late, text(&v["bound"])]
        })
        .collect();
    if !violations.is_empty() {
        out += &paint("VALID answers that broke the promise:\n", Paint::Red);
        let more = violations.len().saturating_sub(MAX_VIOLATIONS_SHOWN);
        let shown = violations.into_iter().take(MAX_VIOLATIONS_SHOWN).collect();
        out += &table(&["region", "decided at", "on version", "late by", "bound"], shown, "");
        if more > 0 {
            out += &format!("and {more} more listed (`--json` shows them all)\n");
        }
    }
    let sources: Vec<String> =
        items(&answer["sources_since"]).iter().map(|s| format!("{} ({})", text(&s[0]), text(&s[1]))).collect();
    if !sources.is_empty() {
        out += &format!("Still trying since the change: {}.\n", sources.join(", "));
    }
    let summary = format!(
        "{} violations; {} VALID within the promise (clock allowance {} ms).",
        text(&answer["violations"]),
        text(&answer["within_promise"]),
        text(&answer["skew_ms"]),
    );
    let colour = if answer["violations"].as_u64() == Some(0) { Paint::Green } else { Paint::Red };
    out += &format!("{}\n", paint(&summary, colour));
    out
}

fn root_key_recovered(answer: &Value, now: i64) -> String {
    let publishing = if answer["published"] == true {
        "The running control plane accepts it now, and writes it to the edge from its outbox."
    } else {
        "The running control plane accepts it now; the edge learns it when `keyward serve` next starts."
    };
    let created = render(View::RootKeyCreated, answer, now);
    format!("Workspace {}:\n{created}{publishing}\n", text(&answer["workspace_id"]))
}

fn audit_checkpoint(answer: &Value) -> String {
    format!(
        "Audit checkpoint: entry {}, chain value {}, signed at {}.\nSave it with `--json` to check later that no entry was deleted.\n",
        text(&answer["id"]),
        text(&answer["mac"]),
        date(&answer["at_ms"]),
    )
}

fn audit_verified(answer: &Value) -> String {
    let checkpoint =
        answer["checkpoint"].as_i64().map_or(String::new(), |id| format!(", and reaches the checkpoint at entry {id}"));
    format!(
        "The audit log verifies: {} entries, chained to entry {}{checkpoint}.\n",
        text(&answer["entries"]),
        text(&answer["head"]["id"]),
    )
}

/// Audit entries, newest first: when, who, what, on what.
fn audit(answer: &Value) -> String {
    let rows = items(&answer["entries"])
        .iter()
        .map(|e| {
            let who = e["root_key_name"]
                .as_str()
                .map_or_else(|| text(&e["actor"]), |name| format!("{} ({})", printable(name), text(&e["root_key_id"])));
            vec![text(&e["id"]), date(&e["at_ms"]), who, text(&e["action"]), text(&e["target"])]
        })
        .collect();
    table(&["#", "at", "by", "action", "target"], rows, "No audit entries.")
}

/// A usage report: totals by outcome, last use, top and new sources, and the losses beside them.
fn usage(answer: &Value) -> String {
    let totals = answer["totals"].as_object().map(|t| t.iter().map(|(code, n)| vec![code.clone(), text(n)]).collect());
    let mut out = format!(
        "Usage from {} to {}: {} verifications.\n",
        date(&answer["from_ms"]),
        date(&answer["to_ms"]),
        text(&answer["total"])
    );
    out += &table(&["outcome", "count"], totals.unwrap_or_default(), "No verifications in this range.");
    if answer.get("last_used_ms").is_some() {
        out +=
            &format!("Last used {}; last VALID {}.\n", date(&answer["last_used_ms"]), date(&answer["last_valid_ms"]));
    }
    out += "Top sources:\n";
    out += &table(&["source", "value", "count"], source_rows(&answer["top"], usize::MAX), "None.");
    out += "New to this key in the last 24 hours (not seen in the 30 days before):\n";
    out += &table(&["source", "value", "count"], source_rows(&answer["new_sources"], usize::MAX), "None.");
    let losses = &answer["losses"]["total"];
    out += &format!(
        "Losses (all workspaces): {} batches missing, {} events lost, {} dropped, at most {} possibly lost.\n",
        text(&losses["missing_batches"]),
        text(&losses["lost_events"]),
        text(&losses["dropped_events"]),
        text(&losses["possibly_lost_events"]),
    );
    out
}

fn outbox_status(answer: &Value, now: i64) -> String {
    let targets = items(&answer["targets"]).iter().map(|t| {
        let lag = t["lag_ms"].as_i64().map_or("-".into(), |ms| format!("{} s", ms / 1000));
        let counts = ["pending", "stuck", "dead_lettered"].map(|field| text(&t[field]));
        [vec![text(&t["target"])], counts.to_vec(), vec![lag, text(&t["last_error"])]].concat()
    });
    let header = ["TARGET", "PENDING", "STUCK", "DEAD-LETTERED", "OLDEST", "LAST ERROR"];
    let mut out = table(&header, targets.collect(), "Nothing pending: every delivery has landed.");
    let troubled = items(&answer["troubled"]).iter().map(|d| {
        let age = d["created_at"].as_i64().map_or("-".into(), |at| format!("{} min", (now - at) / 60_000));
        let fields = ["outbox_id", "workspace_id", "key_id", "target", "state", "attempts"].map(|f| text(&d[f]));
        [fields.to_vec(), vec![age, text(&d["last_error"])]].concat()
    });
    let header = ["OUTBOX", "WORKSPACE", "KEY", "TARGET", "STATE", "ATTEMPTS", "AGE", "LAST ERROR"];
    let stuck_after = text(&answer["stuck_after_s"]);
    out.push_str(&table(
        &header,
        troubled.collect(),
        &format!("None stuck (pending past {stuck_after} s) or dead-lettered."),
    ));
    out
}

/// `get`: one field per line.
/// An API's policy: each list, the override, and what a change's delivery reached.
fn policy(answer: &Value) -> String {
    let lists = &answer["policy"];
    let override_text = match answer["limit_override"]["percent"].as_u64() {
        Some(p) => format!("{p}% of every rate limit"),
        None => "none".into(),
    };
    let fields = [
        ("api", text(&answer["api_id"])),
        ("version", text(&answer["version"])),
        ("allow ips", list(&lists["allow_ips"])),
        ("deny ips", list(&lists["deny_ips"])),
        ("allow countries", list(&lists["allow_countries"])),
        ("deny countries", list(&lists["deny_countries"])),
        ("limit override", override_text),
    ];
    let mut out = field_table(&fields);
    if answer.get("regions").is_some() {
        out += &delivery(answer);
    }
    out
}

/// A key's own allow and deny lists, in one line (`none` when it has none).
fn key_policy(p: &Value) -> String {
    let parts: Vec<String> = ["allow_ips", "deny_ips", "allow_countries", "deny_countries"]
        .into_iter()
        .filter(|name| !items(&p[*name]).is_empty())
        .map(|name| format!("{name} {}", list(&p[name])))
        .collect();
    if parts.is_empty() { "none".into() } else { parts.join("; ") }
}

fn key_fields(k: &Value, now: i64) -> String {
    let fields = [
        ("id", text(&k["id"])),
        ("start", text(&k["start"])),
        ("name", text(&k["name"])),
        ("owner", text(&k["owner_id"])),
        ("status", status(k, now)),
        ("expires", expiry(&k["expires_at"])),
        ("api", text(&k["api_id"])),
        ("permissions", list(&k["permissions"])),
        ("meta", meta(&k["meta"])),
        ("version", text(&k["version"])),
        ("max staleness", format!("{} ms", text(&k["max_staleness_ms"]))),
        ("credits", credits(&k["credits"], &k["credits_remaining"])),
        ("rate limits", ratelimits(&k["ratelimits"])),
        ("lists", key_policy(&k["policy"])),
        ("identity", text(&k["identity_id"])),
        ("created", date(&k["created_at"])),
        ("updated", date(&k["updated_at"])),
    ];
    field_table(&fields)
}

/// An identity created or changed, and how its change reached the authority and the regions.
fn identity_changed(answer: &Value) -> String {
    let reached = if answer["regions"].is_null() { "Nothing changed.\n".into() } else { delivery(answer) };
    format!("{}{reached}", identity_fields(&answer["identity"]))
}

/// One identity: its external id, meta, shared credits and limits.
fn identity_fields(i: &Value) -> String {
    let fields = [
        ("id", text(&i["id"])),
        ("external id", text(&i["external_id"])),
        ("meta", meta(&i["meta"])),
        ("credits", credits(&i["credits"], &i["credits_remaining"])),
        ("rate limits", ratelimits(&i["ratelimits"])),
        ("version", text(&i["version"])),
        ("max staleness", format!("{} ms", text(&i["max_staleness_ms"]))),
        ("created", date(&i["created_at"])),
        ("updated", date(&i["updated_at"])),
    ];
    field_table(&fields)
}

/// `identities list`: a table, and how to page on.
fn identities(answer: &Value) -> String {
    let rows = items(&answer["identities"]).iter().map(|i| {
        vec![
            text(&i["id"]),
            text(&i["external_id"]),
            credits(&i["credits"], &Value::Null),
            ratelimits(&i["ratelimits"]),
            date(&i["updated_at"]),
        ]
    });
    let header = ["ID", "EXTERNAL ID", "CREDITS", "RATE LIMITS", "UPDATED"];
    let mut out = table(&header, rows.collect(), "No identities match.");
    if let Some(cursor) = answer["cursor"].as_str() {
        out.push_str(&format!("More identities follow: add --cursor {cursor}\n"));
    }
    out
}

/// A usage report's sources (`top` or `new_sources`: lists by kind) as rows of kind, value and
/// count, at most `limit` of each kind.
pub fn source_rows(of: &Value, limit: usize) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for (kind, list) in of.as_object().into_iter().flatten() {
        rows.extend(items(list).iter().take(limit).map(|s| vec![kind.clone(), text(&s["value"]), text(&s["count"])]));
    }
    rows
}

/// A key's credits: what remains (where the authority was asked), the last set and what was
/// added since, and the refill.
fn credits(setting: &Value, remaining: &Value) -> String {
    if setting.is_null() {
        return "unlimited".into();
    }
    let now = match remaining.as_u64() {
        Some(n) => format!("{n} remaining, "),
        None => String::new(),
    };
    let added = setting["added"].as_i64().unwrap_or(0);
    let mut out = format!("{now}set to {} at version {}", text(&setting["set_to"]), text(&setting["set_version"]));
    if added != 0 {
        out += &format!(", {added:+} since");
    }
    let refill = &setting["refill"];
    if !refill.is_null() {
        let every = &refill["every"];
        let when = match every["kind"].as_str() {
            Some("monthly") => format!("monthly on day {}", text(&every["day"])),
            Some("interval") => format!("every {} ms", text(&every["ms"])),
            Some(kind) => kind.to_owned(),
            None => "-".into(),
        };
        out += &match refill["cap"].as_u64() {
            Some(cap) => format!("; refill {when}: +{} up to {cap}", text(&refill["amount"])),
            None => format!("; refill {when}: to {}", text(&refill["amount"])),
        };
    }
    out
}

/// A key's rate limits, `name limit/duration_ms (cost, mode, named)`, or `none`.
fn ratelimits(limits: &Value) -> String {
    let shown: Vec<String> = items(limits)
        .iter()
        .map(|l| {
            let mut out = format!("{} {} per {} ms", text(&l["name"]), text(&l["limit"]), text(&l["duration_ms"]));
            out += &format!(", cost {}, {}", text(&l["cost"]), text(&l["mode"]));
            if l["auto"] == Value::Bool(false) {
                out += ", when named";
            }
            out
        })
        .collect();
    if shown.is_empty() { "none".into() } else { shown.join("; ") }
}

/// `keys credits`: what remains, by the authority's account.
fn credits_view(answer: &Value) -> String {
    let line = credits(&answer["credits"], &answer["remaining"]);
    let mut out = format!("Key {} credits: {line}.\n", text(&answer["key_id"]));
    if !answer["credits"].is_null() {
        out += "remaining is an upper bound: the authority's balance plus the shares leased to regions and not yet reported.\n";
    }
    if let Some(error) = answer["error"].as_str() {
        out += &format!("{}\n", paint(error, Paint::Yellow));
    }
    out
}

/// One line for the key's authority and one per region, then what the acknowledgements mean.
fn delivery(answer: &Value) -> String {
    let authority = &answer["authority"];
    let regions = items(&answer["regions"]);
    if !authority.is_object() && regions.is_empty() {
        return "No key authority or edge region is configured: the control plane alone answers for it.\n".into();
    }
    let mut rows = Vec::new();
    let mut missed = Vec::new();
    if let a @ Value::Object(_) = authority {
        rows.push(vec![
            "authority".into(),
            acknowledged(&a["acknowledged"]),
            latency(&a["latency_ms"]),
            text_or_empty(&a["error"]),
        ]);
        if a["acknowledged"] == Value::Bool(false) {
            missed.push("The key's authority does not have the change yet: it is retried, and no region counts as acknowledged until it lands.".to_owned());
        }
    }
    let mut meanings = Vec::new();
    for r in regions {
        // A region without a purge (a loosening change, a root key) only has its KV write.
        let (state, kv) = match r["acknowledged"] {
            Value::Bool(_) => (acknowledged(&r["acknowledged"]), format!("kv {}", text(&r["kv"]))),
            _ => (format!("kv {}", text(&r["kv"])), String::new()),
        };
        let detail = [kv, text_or_empty(&r["error"])].into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>();
        rows.push(vec![text(&r["name"]), state, latency(&r["latency_ms"]), detail.join("  ")]);
        match (&r["acknowledged"], r["ack_means"].as_str()) {
            (Value::Bool(true), Some(means)) if !meanings.contains(&means) => meanings.push(means),
            (Value::Bool(false), _) if missed.iter().all(|m| !m.starts_with("A region")) => missed.push(
                "A region that did not acknowledge still rejects the key within its max_staleness_ms (older copies \
                 are confirmed with the key's authority), and its purge is retried until delivered (GET /v1/regions)."
                    .to_owned(),
            ),
            _ => {}
        }
    }
    let mut table = plain_table(rows);
    if let Some(column) = table.column_mut(2) {
        column.set_cell_alignment(CellAlignment::Right);
    }
    let mut out = indent(&format!("{}\n", table.trim_fmt()));
    for means in meanings {
        out.push_str(&format!("acknowledged: {means}.\n"));
    }
    for line in missed {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The plaintext of a key just created, set apart, with the warning that it is never shown again.
fn shown_once(what: &str, key: &Value) -> String {
    format!(
        "\n    {}\n\nThis is the only time this {what} is shown: Keyward keeps only its hash. Store it now.\n",
        text(key)
    )
}

fn acknowledged(value: &Value) -> String {
    match value {
        Value::Bool(true) => "acknowledged".into(),
        Value::Bool(false) => "NOT acknowledged".into(),
        _ => "-".into(),
    }
}

/// A table with a header row, or `empty` when there are no rows.
pub fn table(header: &[&str], rows: Vec<Vec<String>>, empty: &str) -> String {
    if rows.is_empty() {
        return format!("{empty}\n");
    }
    let mut table = plain_table(rows);
    table.set_header(header.to_vec());
    format!("{}\n", table.trim_fmt())
}

/// Two columns: a field's name and its value.
pub fn field_table(fields: &[(&str, String)]) -> String {
    let rows = fields.iter().map(|(name, value)| vec![(*name).to_owned(), value.clone()]).collect();
    format!("{}\n", plain_table(rows).trim_fmt())
}

/// Columns aligned by display width (so names in any script line up), two spaces apart, no borders.
fn plain_table(rows: Vec<Vec<String>>) -> Table {
    let mut table = Table::new();
    table.load_style(presets::NOTHING).add_rows(rows);
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    table
}

fn indent(text: &str) -> String {
    text.lines().map(|line| format!("  {line}\n")).collect()
}

/// A string as is, a number or other value as JSON, and nothing as `-`.
pub fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => printable(s),
        other => other.to_string(),
    }
}

/// `s` with every control character (C0, DEL, C1: escapes, carriage returns, newlines) and
/// every bidirectional override written as `\u{..}`: names, owners and client addresses are
/// anyone's text, and must not rewrite the terminal they are printed on.
pub fn printable(s: &str) -> String {
    let unsafe_char = |c: char| c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
    if !s.chars().any(unsafe_char) {
        return s.to_owned();
    }
    s.chars().map(|c| if unsafe_char(c) { c.escape_unicode().to_string() } else { c.to_string() }).collect()
}

fn text_or_empty(value: &Value) -> String {
    if value.is_null() { String::new() } else { text(value) }
}

pub fn items(value: &Value) -> &[Value] {
    value.as_array().map_or(&[], Vec::as_slice)
}

/// A list of strings joined by commas; an empty list is `-`.
pub fn list(value: &Value) -> String {
    let items: Vec<String> = items(value).iter().map(text).collect();
    if items.is_empty() { "-".into() } else { items.join(", ") }
}

fn meta(value: &Value) -> String {
    match value.as_object() {
        Some(map) if !map.is_empty() => value.to_string(),
        _ => "-".into(),
    }
}

fn latency(value: &Value) -> String {
    value.as_f64().map_or_else(|| "-".into(), |ms| format!("{ms:.1} ms"))
}

/// What a key's status means now: revoked and deleted are final; then disabled; then expired.
pub fn status(key: &Value, now: i64) -> String {
    let status = text(&key["status"]);
    if status != "active" {
        status
    } else if key["enabled"] == Value::Bool(false) {
        "disabled".into()
    } else if key["expires_at"].as_i64().is_some_and(|at| at <= now) {
        "expired".into()
    } else {
        status
    }
}

fn expiry(value: &Value) -> String {
    if value.is_null() { "never".into() } else { date(value) }
}

/// Unix milliseconds as the time of day to the millisecond, `11:06:05.123` (UTC).
pub fn clock(value: &Value) -> String {
    let Some(ms) = value.as_i64() else {
        return "-".into();
    };
    let of_day = ms.rem_euclid(86_400_000);
    format!("{:02}:{:02}:{:02}.{:03}", of_day / 3_600_000, of_day / 60_000 % 60, of_day / 1000 % 60, of_day % 1000)
}

/// Unix milliseconds as `2026-11-18 11:06:05.123 UTC`.
pub fn moment(value: &Value) -> String {
    match date(value).strip_suffix(" UTC") {
        Some(day) if value.is_i64() => format!("{} {} UTC", &day[..10], clock(value)),
        _ => "-".into(),
    }
}

/// Unix milliseconds as `2026-11-18 11:06 UTC`.
pub fn date(value: &Value) -> String {
    let Some(ms) = value.as_i64() else {
        return "-".into();
    };
    let secs = ms.div_euclid(1000);
    let (days, of_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = keyward_shared::credits::civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02} UTC", of_day / 3600, of_day % 3600 / 60)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const NOW: i64 = 1_795_000_000_000;

    fn key(id: &str, name: &str, start: &str) -> Value {
        json!({ "id": id, "name": name, "start": start, "owner_id": "acct_42", "status": "active", "enabled": true,
                "expires_at": null, "api_id": "api_01", "permissions": ["charges:write"], "meta": {},
                "version": 1, "max_staleness_ms": 1000, "created_at": NOW, "updated_at": NOW })
    }

    #[test]
    fn a_proof_lists_each_violation_with_how_late_it_was() {
        let valid = |at: i64, verdict: &str| json!({ "region": "r2", "at_ms": at, "version": 1, "verdict": verdict, "bound_ms": NOW + 1_250, "bound": "answer + max_staleness_ms + skew" });
        let proof = json!({
            "key_id": "key_01", "change": { "kind": "revoked", "at_ms": NOW, "version": 2, "answered_at_ms": NOW + 5 },
            "by": { "root_key_name": "ops" }, "violations": 1, "within_promise": 1, "skew_ms": 250,
            "regions": [{ "region": "r2", "took": { "acknowledged": false }, "violations": 1, "valid_after": [valid(NOW + 600, "within_promise"), valid(NOW + 3_250, "violation")], "rejections_since": { "REVOKED": 4 } }],
        });
        let text = render(View::Proof, &proof, NOW);
        assert!(
            text.starts_with("Key key_01 revoked at 2026-11-18 11:06:40.000 UTC by root key ops (version 2)"),
            "{text}"
        );
        assert!(text.contains("VALID answers that broke the promise"), "{text}");
        let rows = text.lines().filter(|l| l.starts_with("r2 ")).collect::<Vec<_>>();
        assert_eq!(rows.len(), 2, "the region's row and its one violation: {text}");
        assert!(rows[1].contains("11:06:43.250") && rows[1].contains("2000 ms"), "{text}");
        assert!(text.contains("1 violations; 1 VALID within the promise"), "{text}");
    }

    #[test]
    fn text_from_anyone_cannot_rewrite_the_terminal() {
        let hostile = json!({ "id": "key_01", "name": "\u{1b}[2J\r\u{202E}evil", "start": "sk_x", "owner_id": "a\u{9b}b", "status": "active", "enabled": true, "expires_at": null });
        let text = render(View::Keys, &json!({ "keys": [hostile], "cursor": null }), NOW);
        assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text:?}");
        assert!(text.contains("\\u{1b}[2J\\u{d}\\u{202e}evil") && text.contains("a\\u{9b}b"), "{text}");
    }

    #[test]
    fn dates_are_utc_minutes() {
        assert_eq!(date(&json!(0)), "1970-01-01 00:00 UTC");
        assert_eq!(date(&json!(NOW)), "2026-11-18 11:06 UTC");
        assert_eq!(date(&json!(951_782_400_000i64)), "2000-02-29 00:00 UTC");
        assert_eq!(date(&Value::Null), "-");
    }

    #[test]
    fn key_list_is_a_table_aligned_by_display_width() {
        let mut expired = key("key_02", "支払い", "sk_live_Zz");
        expired["expires_at"] = json!(NOW - 1);
        let answer = json!({ "keys": [key("key_01", "checkout", "sk_live_3xQ9ab"), expired], "cursor": "key_02" });
        let out = render(View::Keys, &answer, NOW);
        let expected = "\
ID      START           NAME      OWNER    STATUS   EXPIRES
key_01  sk_live_3xQ9ab  checkout  acct_42  active   never
key_02  sk_live_Zz      支払い    acct_42  expired  2026-11-18 11:06 UTC
More keys follow: add --cursor key_02
";
        assert_eq!(out, expected);
        assert_eq!(render(View::Keys, &json!({ "keys": [], "cursor": null }), NOW), "No keys match.\n");
    }

    #[test]
    fn get_is_a_field_table() {
        let mut k = key("key_01", "checkout", "sk_live_3xQ9ab");
        k["enabled"] = json!(false);
        let out = render(View::Key, &k, NOW);
        assert!(out.starts_with("id             key_01\nstart          sk_live_3xQ9ab\n"), "{out}");
        assert!(out.contains("\nstatus         disabled\n"), "{out}");
        assert!(out.contains("\nmax staleness  1000 ms\n"), "{out}");
    }

    #[test]
    fn revoke_prints_a_line_for_the_authority_and_each_region() {
        let means = "the region holds the new record in memory, dropped its Cache API copy, and now rejects the key";
        let answer = json!({
            "id": "key_01", "status": "revoked", "version": 2,
            "authority": { "acknowledged": true, "latency_ms": 18.14 },
            "regions": [
                { "name": "local", "kv": "pending", "acknowledged": true, "latency_ms": 9.5, "ack_means": means },
                { "name": "eu-west", "kv": "pending", "acknowledged": false, "latency_ms": 501.0,
                  "ack_means": means, "error": "connection refused" },
            ],
            "note": "...",
        });
        let out = render(View::KeyRevoked, &answer, NOW);
        let expected = format!(
            "\
Revoked key key_01 (version 2).
  authority  acknowledged       18.1 ms
  local      acknowledged        9.5 ms  kv pending
  eu-west    NOT acknowledged  501.0 ms  kv pending  connection refused
acknowledged: {means}.
A region that did not acknowledge still rejects the key within its max_staleness_ms (older copies are confirmed \
with the key's authority), and its purge is retried until delivered (GET /v1/regions).
"
        );
        assert_eq!(out, expected);
    }

    #[test]
    fn revoke_without_regions_says_so() {
        let answer = json!({ "id": "key_01", "status": "revoked", "version": 2, "regions": [] });
        assert_eq!(
            render(View::KeyRevoked, &answer, NOW),
            "Revoked key key_01 (version 2).\nNo key authority or edge region is configured: the control plane alone answers for it.\n"
        );
    }

    #[test]
    fn a_root_key_revoke_shows_kv_writes() {
        let answer = json!({ "id": "root_01", "status": "revoked",
            "authority": { "acknowledged": false, "latency_ms": 3.0, "error": "refused" },
            "regions": [{ "name": "local", "kv": "written", "latency_ms": 4.0 }] });
        let out = render(View::RootKeyRevoked, &answer, NOW);
        assert!(
            out.contains("\n  authority  NOT acknowledged  3.0 ms  refused\n  local      kv written        4.0 ms\n"),
            "{out}"
        );
        assert!(out.contains("does not have the change yet"), "{out}");
    }

    #[test]
    fn create_shows_the_key_once_with_a_warning() {
        let answer = json!({ "id": "key_01", "key": "sk_live_SECRET", "start": "sk_live_SECR", "api_id": "api_01",
                             "regions": [] });
        let out = render(View::KeyCreated, &answer, NOW);
        assert_eq!(out.matches("sk_live_SECRET").count(), 1, "{out}");
        assert!(out.contains("\n    sk_live_SECRET\n"), "{out}");
        assert!(out.contains("only time this key is shown"), "{out}");
    }

    #[test]
    fn verify_names_the_code_and_the_key() {
        let answer = json!({ "valid": false, "code": "REVOKED", "key_id": "key_01", "api_id": "api_01",
                             "permissions": [], "source": "origin" });
        let out = render(View::Verified, &answer, NOW);
        assert_eq!(
            out,
            "REVOKED: not valid (answered from origin)\n  key      key_01\n  api      api_01\n  expires  never\n"
        );
        let malformed = json!({ "valid": false, "code": "MALFORMED", "permissions": [] });
        assert_eq!(render(View::Verified, &malformed, NOW), "MALFORMED: not valid\n");
    }

    #[test]
    fn outbox_status_counts_each_target_and_lists_what_is_stuck() {
        let answer = json!({
            "stuck_after_s": 3600,
            "targets": [{ "target": "purge:eu", "pending": 2, "stuck": 1, "dead_lettered": 0, "lag_ms": 7_200_000,
                          "last_error": "purge: refused with 503" }],
            "troubled": [{ "outbox_id": 7, "workspace_id": "ws_1", "key_id": "key_1", "target": "purge:eu",
                           "state": "pending", "attempts": 40, "created_at": NOW - 7_200_000,
                           "last_error": "purge: refused with 503" }],
        });
        let out = render(View::OutboxStatus, &answer, NOW);
        assert!(out.contains("purge:eu  2        1      0              7200 s  purge: refused with 503"), "{out}");
        assert!(
            out.contains("7       ws_1       key_1  purge:eu  pending  40        120 min  purge: refused with 503"),
            "{out}"
        );
        let empty = json!({ "stuck_after_s": 3600, "targets": [], "troubled": [] });
        let out = render(View::OutboxStatus, &empty, NOW);
        assert!(out.contains("Nothing pending") && out.contains("None stuck (pending past 3600 s)"), "{out}");
        let redriven = json!({ "region": "eu", "revived": 1, "made_due": 2 });
        assert_eq!(
            render(View::Redriven, &redriven, NOW),
            "Redrove region eu: 1 dead-lettered deliveries made pending again, 2 pending ones made due now.\n"
        );
        let queued = json!({ "region": null, "queued": {
            "outbox_id": 9, "kind": "key", "key_id": "key_1", "workspace_id": "ws_1", "version": 2,
            "tightening": true, "targets": ["authority", "kv:eu", "purge:eu"] } });
        let out = render(View::Repushed, &queued, NOW);
        assert!(
            out.starts_with(
                "Queued key key_1's current record (version 2) again as outbox entry 9, purging, for: authority, kv:eu, purge:eu.\n"
            ),
            "{out}"
        );
    }
}
