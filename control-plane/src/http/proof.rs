//! `GET /v1/keys/{id}/proof`: the revocation proof of a key that stopped being valid (see
//! `crate::proof`), from the audit log (when and by whom), the outbox (each region's
//! acknowledgement) and the usage events (every answer since). Needs the API's `read_key`.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use keyward_shared::record::KeyStatus;
use keyward_shared::{KeyAction, KeyRecord, Scope};
use serde::Serialize;
use serde_json::Value;

use super::auth::RootKey;
use super::extract::{Json, Path, check_id};
use super::{AppError, AppState, Result};
use crate::metrics;
use crate::proof::{Change, Judged, RegionTook, SKEW_MS, bound, judge};
use crate::store::Target;
use crate::store::audit::AuditQuery;
use crate::store::proof::Answer;
use crate::store::usage::Losses;
use crate::time::now_ms;

/// The most `VALID` answers after the change a proof lists.
const MAX_LISTED: i64 = 1_000;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/keys/{id}/proof", get(proof))
}

#[derive(Serialize)]
struct Proof {
    key_id: String,
    change: Change,
    /// The root key that made the change (none for an expiry).
    by: Option<Value>,
    regions: Vec<RegionProof>,
    /// Caller or client addresses that kept trying the key since the change, with counts.
    sources_since: Vec<(String, i64)>,
    /// Every `VALID` on an older record past its region's bound, counted over all the evidence
    /// (not only the answers listed).
    violations: i64,
    within_promise: i64,
    skew_ms: i64,
    /// What the usage evidence lost since the change, per region (over every workspace: a lost
    /// batch's events cannot be told apart): an answer lost cannot be judged.
    losses_since: BTreeMap<String, Losses>,
}

#[derive(Serialize)]
struct RegionProof {
    region: String,
    took: Option<RegionTook>,
    last_valid_before: Option<Answer>,
    /// The first [`MAX_LISTED`] `VALID` answers since the change, judged.
    valid_after: Vec<Judged>,
    /// Whether more `VALID` answers came than are listed.
    truncated: bool,
    violations: i64,
    within_promise: i64,
    rejections_since: BTreeMap<String, i64>,
}

async fn proof(State(state): State<AppState>, caller: RootKey, Path(id): Path<String>) -> Result<Json<Proof>> {
    check_id(&id, "key")?;
    let record = state.store.key(caller.workspace_id(), &id).await?.ok_or_else(|| AppError::not_found("key"))?;
    caller.require(&Scope::key(&record.api_id, KeyAction::ReadKey))?;
    let (mut change, by) = change_of(&state, &record).await?;
    let store = &state.store;
    let entry = match change.version {
        Some(version) => store.change_entry(&id, version).await?,
        None => None,
    };
    change.answered_at_ms = entry.as_ref().and_then(|e| e.answered_at);
    let took = match &entry {
        Some(entry) => regions_took(&state, entry.id).await?,
        None => Vec::new(),
    };
    let regions = region_proofs(&state, &id, &change, took).await?;
    let (violations, within_promise) =
        regions.iter().fold((0, 0), |(v, w), r| (v + r.violations, w + r.within_promise));
    metrics::PROOF_VIOLATIONS.inc_by(violations as u64);
    let losses_since = store.usage_losses(change.at_ms, now_ms()).await?.into_iter().collect();
    Ok(Json(Proof {
        key_id: id.clone(),
        sources_since: store.sources_since(&id, change.at_ms).await?,
        change,
        by,
        regions,
        violations,
        within_promise,
        skew_ms: SKEW_MS,
        losses_since,
    }))
}

/// How each region took the change, from its purge's delivery.
async fn regions_took(state: &AppState, outbox_id: i64) -> Result<Vec<RegionTook>> {
    let deliveries = state.store.deliveries_of(outbox_id).await?;
    let edge = state.delivery.edge();
    Ok(deliveries
        .iter()
        .filter_map(|d| match &d.target {
            Target::Purge(name) => {
                let by_tag = edge.regions.iter().find(|r| r.name == *name).is_some_and(|r| !r.purge_carries_record());
                Some(RegionTook::of(name, d, by_tag))
            }
            _ => None,
        })
        .collect())
}

/// Every region that took the change or answered for the key around it: its last `VALID`
/// before, its `VALID`s since (the first [`MAX_LISTED`] judged one by one, all of them counted
/// against its bound), and its rejections.
async fn region_proofs(state: &AppState, id: &str, change: &Change, took: Vec<RegionTook>) -> Result<Vec<RegionProof>> {
    let store = &state.store;
    let mut regions: BTreeMap<String, RegionProof> = BTreeMap::new();
    let region = |regions: &mut BTreeMap<String, RegionProof>, name: &str| {
        regions.entry(name.to_owned()).or_insert_with(|| RegionProof {
            region: name.to_owned(),
            took: took.iter().find(|t| t.region == name).cloned(),
            last_valid_before: None,
            valid_after: Vec::new(),
            truncated: false,
            violations: 0,
            within_promise: 0,
            rejections_since: BTreeMap::new(),
        });
    };
    for t in &took {
        region(&mut regions, &t.region);
    }
    for before in store.last_valid_before(id, change.at_ms).await? {
        let name = before.region.clone();
        region(&mut regions, &name);
        regions.get_mut(&name).expect("just made").last_valid_before = Some(before);
    }
    for answer in store.valid_answers_since(id, change.at_ms, MAX_LISTED).await? {
        let name = answer.region.clone();
        region(&mut regions, &name);
        let r = regions.get_mut(&name).expect("just made");
        let judged = judge(change, r.took.as_ref(), answer);
        r.valid_after.push(judged);
    }
    for (name, count) in store.valid_counts_since(id, change.at_ms).await? {
        region(&mut regions, &name);
        let r = regions.get_mut(&name).expect("just made");
        r.truncated = count > r.valid_after.len() as i64;
        let bound_ms = bound(change, r.took.as_ref()).0;
        let (older, past) = store.older_valid_since(id, &name, change.at_ms, bound_ms, change.version).await?;
        (r.violations, r.within_promise) = (past, older - past);
    }
    for (name, code, count) in store.rejections_since(id, change.at_ms).await? {
        region(&mut regions, &name);
        regions.get_mut(&name).expect("just made").rejections_since.insert(code, count);
    }
    Ok(regions.into_values().collect())
}

/// The change that made the key invalid, and who made it: the audit log's first entry that
/// revoked or deleted it, else its last disable, else its expiry. A valid key has none (409).
async fn change_of(state: &AppState, record: &KeyRecord) -> Result<(Change, Option<Value>)> {
    let now = now_ms();
    let kind = match (record.status, record.enabled, record.expires_at) {
        (KeyStatus::Revoked, _, _) => "revoked",
        (KeyStatus::Deleted, _, _) => "deleted",
        (_, false, _) => "disabled",
        (_, true, Some(at)) if at <= now => "expired",
        _ => return Err(AppError::Conflict("the key is valid: there is no change to prove".into())),
    };
    let base = Change {
        kind: kind.into(),
        version: None,
        at_ms: record.expires_at.unwrap_or(record.updated_at),
        answered_at_ms: None,
        max_staleness_ms: record.max_staleness_ms,
    };
    if kind == "expired" {
        return Ok((base, None));
    }
    let query = AuditQuery { target: Some(&record.id), limit: 1_000, ..AuditQuery::default() };
    let entries = state.store.audit_entries(&query).await?;
    let invalidates = |e: &&crate::store::audit::AuditEntry| {
        let (before, after) = (&e.body.before, &e.body.after);
        let status = |v: &Option<Value>| v.as_ref().and_then(|v| v["status"].as_str().map(str::to_owned));
        let enabled = |v: &Option<Value>| v.as_ref().and_then(|v| v["enabled"].as_bool());
        match kind {
            "disabled" => enabled(before) == Some(true) && enabled(after) == Some(false),
            _ => {
                matches!(status(after).as_deref(), Some("revoked" | "deleted"))
                    && status(before).as_deref() != status(after).as_deref()
            }
        }
    };
    // Newest first: for a disable, the latest; for a revoke or delete, the first (the oldest).
    let found =
        if kind == "disabled" { entries.iter().find(invalidates) } else { entries.iter().rev().find(invalidates) };
    let Some(entry) = found else {
        return Ok((Change { version: Some(record.version), ..base }, None));
    };
    let version = entry.body.after.as_ref().and_then(|a| a["version"].as_u64());
    let by = serde_json::json!({
        "root_key_id": entry.body.root_key_id, "root_key_name": entry.body.root_key_name,
        "actor": entry.body.actor, "request_id": entry.body.request_id, "action": entry.body.action,
    });
    Ok((Change { kind: kind.into(), version, at_ms: entry.body.at_ms, ..base }, Some(by)))
}
