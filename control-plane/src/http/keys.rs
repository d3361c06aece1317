//! Keys: create, read, list, update, revoke, delete, and the origin's own verification.
//!
//! Handlers check what they are sent, make each change through [`crate::change`], and answer
//! with what its delivery reached: the authority and each region, whose acknowledgement of a
//! tightening change's purge (see [`KeyRecord::is_tightened_by`]) the answer lists.

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use keyward_shared::credits::{Credits, Period, Refill, SettleRequest, Verdict};
use keyward_shared::internal::SettleAnswer;
use keyward_shared::key::validate_prefix;
use keyward_shared::policy::{self, ApiRecord, Client, Policy};
use keyward_shared::ratelimit::{self, Cap, LimitAsk, MAX_LIMITS, Mode, RateLimit, applicable};
use keyward_shared::record::KeyStatus;
use keyward_shared::usage::{Answered, UsageEvent};
use keyward_shared::verify::{Caller, Decision, MAX_VERIFY_BODY};
use keyward_shared::{
    Code, Key, KeyAction, KeyHash, KeyRecord, Meta, Scope, Source, VerifyRequest, VerifyResponse, decide,
};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use super::auth::{Readable, RootKey};
use super::extract::{Json, Path, Query, check_id};
use super::policy::PolicyInput;
use super::root_keys::check_name;
use super::{AppError, AppState, Reached, Result};
use crate::change::{FinalStatus, NewKey};
use crate::store::KeyQuery;
use crate::time::now_ms;

const MAX_META_BYTES: usize = 16 * 1024;
const MAX_PERMISSIONS: usize = 100;
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1_000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/keys", post(create).get(list))
        .route("/v1/keys/{id}", get(read).patch(update).delete(delete))
        .route("/v1/keys/{id}/revoke", post(revoke))
        .route("/v1/keys/{id}/credits", post(change_credits).get(read_credits))
        .route("/v1/keys/verify", post(verify).layer(DefaultBodyLimit::max(MAX_VERIFY_BODY)))
}

/// A key as the admin API shows it: everything but the hash.
#[derive(Serialize)]
struct KeyView {
    id: String,
    api_id: String,
    workspace_id: String,
    name: Option<String>,
    start: String,
    owner_id: Option<String>,
    meta: Meta,
    enabled: bool,
    status: KeyStatus,
    expires_at: Option<i64>,
    permissions: Vec<String>,
    version: u64,
    max_staleness_ms: u64,
    created_at: i64,
    updated_at: i64,
    /// The credits setting (`null`: unlimited): the last set and the net increments since. The
    /// balance itself is kept by the key's authority.
    #[serde(skip_serializing_if = "Option::is_none")]
    credits: Option<Credits>,
    /// The key's named rate limits (absent: none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ratelimits: Vec<RateLimit>,
    /// The key's own allow and deny lists (omitted when empty).
    #[serde(skip_serializing_if = "Policy::is_empty")]
    policy: Policy,
    /// The identity whose limits and credits the key spends too (omitted when none).
    #[serde(skip_serializing_if = "Option::is_none")]
    identity_id: Option<String>,
}

impl From<KeyRecord> for KeyView {
    fn from(r: KeyRecord) -> KeyView {
        KeyView {
            id: r.id,
            api_id: r.api_id,
            workspace_id: r.workspace_id,
            name: r.name,
            start: r.start,
            owner_id: r.owner_id,
            meta: r.meta,
            enabled: r.enabled,
            status: r.status,
            expires_at: r.expires_at,
            permissions: r.permissions,
            version: r.version,
            max_staleness_ms: r.max_staleness_ms,
            created_at: r.created_at,
            updated_at: r.updated_at,
            credits: r.credits,
            ratelimits: r.ratelimits,
            policy: r.policy,
            identity_id: r.identity_id,
        }
    }
}

/// The answer to creating a key: the only time its plaintext is shown.
#[derive(Serialize)]
struct CreatedKey {
    id: String,
    key: String,
    start: String,
    api_id: String,
    #[serde(flatten)]
    reached: Reached,
}

/// One page of keys, and the cursor of the next (`null` on the last).
#[derive(Serialize)]
struct KeyPage {
    keys: Vec<KeyView>,
    cursor: Option<String>,
}

/// The answer to a change: the key as it now is, and what the delivery reached.
#[derive(Serialize)]
struct UpdatedKey {
    key: KeyView,
    #[serde(flatten)]
    reached: Reached,
}

/// The answer to revoke and delete.
#[derive(Serialize)]
struct StatusChanged {
    id: String,
    status: KeyStatus,
    version: u64,
    #[serde(flatten)]
    reached: Reached,
    note: &'static str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    api_id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    expires_at: Option<i64>,
    #[serde(default)]
    meta: Option<Map<String, Value>>,
    #[serde(default)]
    permissions: Vec<String>,
    #[serde(default)]
    owner_id: Option<String>,
    #[serde(default)]
    credits: Option<CreditsInput>,
    #[serde(default)]
    ratelimits: Vec<RateLimit>,
    /// The key's own allow and deny lists.
    #[serde(default)]
    policy: Option<PolicyInput>,
    /// An identity of the workspace whose limits and credits the key spends too.
    #[serde(default)]
    identity_id: Option<String>,
}

/// A key's credits as an admin sets them: the balance that may still be spent from now, and
/// an optional refill.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreditsInput {
    remaining: u64,
    #[serde(default)]
    refill: Option<Refill>,
}

/// The credits a set makes at record version `version`.
pub(super) fn set_credits(input: CreditsInput, version: u64) -> Result<Credits> {
    if let Some(refill) = &input.refill {
        check_refill(refill)?;
    }
    Ok(Credits { set_to: input.remaining, set_version: version, added: 0, refill: input.refill })
}

/// A key's rate limits, each checked ([`RateLimit::check`]), at most [`MAX_LIMITS`], names
/// unique.
pub(super) fn check_limits(limits: Vec<RateLimit>) -> Result<Vec<RateLimit>> {
    if limits.len() > MAX_LIMITS {
        return Err(AppError::BadRequest(format!("a key has at most {MAX_LIMITS} rate limits")));
    }
    for (i, limit) in limits.iter().enumerate() {
        limit.check().map_err(AppError::BadRequest)?;
        if limits[..i].iter().any(|l| l.name == limit.name) {
            return Err(AppError::BadRequest(format!("two rate limits are named `{}`", limit.name)));
        }
    }
    Ok(limits)
}

fn check_refill(refill: &Refill) -> Result<()> {
    let bad = |m: &str| Err(AppError::BadRequest(m.into()));
    match refill.every {
        Period::Interval { ms } if ms < 1_000 => return bad("a refill interval is at least 1000 ms"),
        Period::Monthly { day } if !(1..=31).contains(&day) => return bad("a monthly refill's day is 1 to 31"),
        _ => {}
    }
    if refill.cap.is_some_and(|cap| cap < refill.amount) {
        return bad("a refill's cap is at least its amount");
    }
    Ok(())
}

async fn create(
    State(state): State<AppState>,
    caller: RootKey,
    Json(body): Json<CreateKey>,
) -> Result<(StatusCode, Json<CreatedKey>)> {
    check_id(&body.api_id, "api")?;
    let api = state.store.api(caller.workspace_id(), &body.api_id).await?.ok_or_else(|| AppError::not_found("API"))?;
    caller.require(&Scope::key(&api.id, KeyAction::CreateKey))?;
    let now = now_ms();
    if body.expires_at.is_some_and(|at| at <= now) {
        return Err(AppError::BadRequest("expires_at must be in the future (Unix milliseconds)".into()));
    }
    let prefix = body.prefix.as_deref().unwrap_or(&api.prefix);
    validate_prefix(prefix).map_err(|e| AppError::BadRequest(format!("prefix `{prefix}`: {e}")))?;
    let new = NewKey {
        api: &api,
        prefix,
        name: body.name.as_deref().map(check_name).transpose()?.map(str::to_owned),
        owner_id: body.owner_id.as_deref().map(check_owner).transpose()?,
        meta: check_meta(body.meta.unwrap_or_default())?,
        expires_at: body.expires_at,
        permissions: check_permissions(body.permissions)?,
        credits: body.credits.map(|c| set_credits(c, 1)).transpose()?,
        ratelimits: check_limits(body.ratelimits)?,
        policy: body.policy.map(PolicyInput::parse).transpose()?.unwrap_or_default(),
        identity_id: match body.identity_id {
            Some(id) => Some(check_identity(&state, &caller, id).await?),
            None => None,
        },
    };
    let created = state.change.create_key(caller.actor(), new, now).await?;
    let answer = CreatedKey {
        id: created.record.id,
        key: created.key.expose().to_owned(),
        start: created.record.start,
        api_id: created.record.api_id,
        reached: created.delivered.into(),
    };
    Ok((StatusCode::CREATED, Json(answer)))
}

/// The key with this id if the caller's workspace has it (and it is not deleted) and the
/// caller holds `action` on its API.
async fn find(state: &AppState, caller: &RootKey, id: &str, action: KeyAction) -> Result<KeyRecord> {
    check_id(id, "key")?;
    let record = state
        .store
        .key(caller.workspace_id(), id)
        .await?
        .filter(|r| r.status != KeyStatus::Deleted)
        .ok_or_else(|| AppError::not_found("key"))?;
    caller.require(&Scope::key(&record.api_id, action))?;
    Ok(record)
}

async fn read(State(state): State<AppState>, caller: RootKey, Path(id): Path<String>) -> Result<Json<KeyView>> {
    Ok(Json(find(&state, &caller, &id, KeyAction::ReadKey).await?.into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    api_id: Option<String>,
    #[serde(default)]
    start: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
}

async fn list(State(state): State<AppState>, caller: RootKey, Query(q): Query<ListQuery>) -> Result<Json<KeyPage>> {
    let readable = match &q.api_id {
        Some(api_id) => {
            check_id(api_id, "api")?;
            state.store.api(caller.workspace_id(), api_id).await?.ok_or_else(|| AppError::not_found("API"))?;
            caller.require(&Scope::key(api_id, KeyAction::ReadKey))?;
            Readable::Only(vec![api_id.clone()])
        }
        None if q.start.is_none() => {
            return Err(AppError::BadRequest(
                "give `api_id`, `start` (the visible beginning of a key), or both".into(),
            ));
        }
        // A search by start across APIs sees only keys of APIs the caller may read.
        None => Readable::of(caller.scopes()),
    };
    if !readable.any() {
        return Err(AppError::Forbidden("this root key has no `api.<id|*>.read_key` scope".into()));
    }
    let start = q.start.as_deref().map(check_start).transpose()?;
    if let Some(cursor) = &q.cursor {
        check_id(cursor, "key")?;
    }
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(AppError::BadRequest(format!("limit must be between 1 and {MAX_PAGE}")));
    }
    let query = KeyQuery {
        workspace_id: caller.workspace_id(),
        api_ids: readable.api_ids(),
        start: start.as_deref(),
        after: q.cursor.as_deref(),
        limit: limit + 1,
    };
    let mut records = state.store.keys(&query).await?;
    let more = records.len() > limit as usize;
    records.truncate(limit as usize);
    // The page holds only keys the caller may read, so its last id gives nothing else away.
    let cursor = if more { records.last().map(|r| r.id.clone()) } else { None };
    Ok(Json(KeyPage { keys: records.into_iter().map(KeyView::from).collect(), cursor }))
}

/// Deserializes a present field (even `null`) as `Some`, so `null` can mean "clear it".
pub(super) fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateKey {
    #[serde(default, deserialize_with = "present")]
    name: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    owner_id: Option<Option<String>>,
    #[serde(default)]
    meta: Option<Map<String, Value>>,
    #[serde(default)]
    enabled: Option<bool>,
    /// Unix ms; now or a past time means "expire now"; `null` removes the expiry.
    #[serde(default, deserialize_with = "present")]
    expires_at: Option<Option<i64>>,
    #[serde(default)]
    permissions: Option<Vec<String>>,
    /// Sets the credits (`null`: unlimited).
    #[serde(default, deserialize_with = "present")]
    credits: Option<Option<CreditsInput>>,
    /// Replaces the rate limits (`[]`: none).
    #[serde(default)]
    ratelimits: Option<Vec<RateLimit>>,
    /// Replaces the key's allow and deny lists (`null`: none).
    #[serde(default, deserialize_with = "present")]
    policy: Option<Option<PolicyInput>>,
    /// Attaches the key to an identity of the workspace (`null`: detaches it).
    #[serde(default, deserialize_with = "present")]
    identity_id: Option<Option<String>>,
}

async fn update(
    State(state): State<AppState>,
    caller: RootKey,
    Path(id): Path<String>,
    Json(body): Json<UpdateKey>,
) -> Result<Json<UpdatedKey>> {
    let old = find(&state, &caller, &id, KeyAction::UpdateKey).await?;
    if old.status == KeyStatus::Revoked {
        return Err(AppError::Conflict("a revoked key cannot be changed; create a new key".into()));
    }
    let now = now_ms();
    let mut new = old.clone();
    if let Some(name) = body.name {
        new.name = name.as_deref().map(check_name).transpose()?.map(str::to_owned);
    }
    if let Some(owner_id) = body.owner_id {
        new.owner_id = owner_id.as_deref().map(check_owner).transpose()?;
    }
    if let Some(meta) = body.meta {
        new.meta = check_meta(meta)?;
    }
    if let Some(enabled) = body.enabled {
        new.enabled = enabled;
    }
    if let Some(expires_at) = body.expires_at {
        new.expires_at = expires_at.map(|at| at.max(now));
    }
    if let Some(permissions) = body.permissions {
        new.permissions = check_permissions(permissions)?;
    }
    if let Some(credits) = body.credits {
        new.credits = credits.map(|c| set_credits(c, old.version + 1)).transpose()?;
    }
    if let Some(limits) = body.ratelimits {
        new.ratelimits = check_limits(limits)?;
    }
    if let Some(policy) = body.policy {
        new.policy = policy.map(PolicyInput::parse).transpose()?.unwrap_or_default();
    }
    if let Some(identity_id) = body.identity_id {
        new.identity_id = match identity_id {
            Some(id) => Some(check_identity(&state, &caller, id).await?),
            None => None,
        };
    }
    let (record, delivered) = state.change.commit(caller.actor(), old, new, now).await?;
    Ok(Json(UpdatedKey { key: record.into(), reached: delivered.into() }))
}

/// `POST /v1/keys/{id}/credits`: `set` (this much may still be spent from now), `increment`
/// or `decrement` a key's balance. The change travels with the key's record to its authority,
/// which applies it once; a decrement or a set is tightening (purged like a revocation).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreditsChange {
    op: CreditsOp,
    amount: u64,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum CreditsOp {
    Set,
    Increment,
    Decrement,
}

async fn change_credits(
    State(state): State<AppState>,
    caller: RootKey,
    Path(id): Path<String>,
    Json(body): Json<CreditsChange>,
) -> Result<Json<UpdatedKey>> {
    let old = find(&state, &caller, &id, KeyAction::UpdateKey).await?;
    if old.status == KeyStatus::Revoked {
        return Err(AppError::Conflict("a revoked key cannot be changed; create a new key".into()));
    }
    let amount = i64::try_from(body.amount).map_err(|_| AppError::BadRequest("amount is too large".into()))?;
    let mut new = old.clone();
    let refill = old.credits.as_ref().and_then(|c| c.refill);
    new.credits = Some(match (body.op, old.credits.clone()) {
        (CreditsOp::Set, _) => Credits { set_to: body.amount, set_version: old.version + 1, added: 0, refill },
        (_, None) => return Err(AppError::Conflict("this key has no credits (unlimited): set them first".into())),
        (CreditsOp::Increment, Some(c)) => Credits { added: c.added.saturating_add(amount), ..c },
        (CreditsOp::Decrement, Some(c)) => Credits { added: c.added.saturating_sub(amount), ..c },
    });
    let (record, delivered) = state.change.commit(caller.actor(), old, new, now_ms()).await?;
    Ok(Json(UpdatedKey { key: record.into(), reached: delivered.into() }))
}

/// A key's credits as its authority holds them now.
#[derive(Serialize)]
struct CreditsView {
    key_id: String,
    /// The setting the record carries (`null`: unlimited).
    credits: Option<Credits>,
    #[serde(flatten)]
    now: Remaining,
}

/// What remains of a balance by its authority's account: its balance plus the shares leased
/// out and not yet reported (an upper bound on what may still be spent, globally). `remaining`
/// is `null` for an unlimited balance, or when the authority did not answer (`error` says why).
#[derive(Serialize, Default)]
pub(super) struct Remaining {
    remaining: Option<u64>,
    /// The authority's clock when it answered.
    as_of_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
}

/// Asks the authority of the key or identity with this `hash` what remains of its credits, by
/// a settlement of cost 0 on record `version` (nothing is spent). A `Void` answer for a record
/// that may be spent (`usable`) means the authority lacks its latest change.
pub(super) async fn remaining(state: &AppState, hash: KeyHash, version: u64, usable: bool) -> Remaining {
    let zero = SettleRequest { idempotency_key: None, cost: 0, version };
    match settle(state, hash, zero, Vec::new(), Cap::NONE).await {
        Some(settled) if settled.verdict == Verdict::Void && usable => Remaining {
            error: Some("the authority has not received the latest change yet: try again"),
            ..Remaining::default()
        },
        Some(settled) => {
            Remaining { remaining: Some(settled.remaining), as_of_ms: Some(settled.decided_at_ms), error: None }
        }
        None => Remaining { error: Some("the authority did not answer: try again"), ..Remaining::default() },
    }
}

/// `GET /v1/keys/{id}/credits`: asks the key's authority what remains (nothing is spent).
async fn read_credits(
    State(state): State<AppState>,
    caller: RootKey,
    Path(id): Path<String>,
) -> Result<Json<CreditsView>> {
    let record = find(&state, &caller, &id, KeyAction::ReadKey).await?;
    let now = match record.credits.is_some() {
        true => remaining(&state, record.hash, record.version, record.is_usable(now_ms())).await,
        false => Remaining::default(),
    };
    Ok(Json(CreditsView { key_id: id, credits: record.credits.clone(), now }))
}

async fn revoke(state: State<AppState>, caller: RootKey, id: Path<String>) -> Result<Json<StatusChanged>> {
    set_status(state, caller, id, FinalStatus::Revoked).await
}

async fn delete(state: State<AppState>, caller: RootKey, id: Path<String>) -> Result<Json<StatusChanged>> {
    set_status(state, caller, id, FinalStatus::Deleted).await
}

/// Revokes or deletes a key; each needs its own scope.
async fn set_status(
    State(state): State<AppState>,
    caller: RootKey,
    Path(id): Path<String>,
    status: FinalStatus,
) -> Result<Json<StatusChanged>> {
    let action = match status {
        FinalStatus::Revoked => KeyAction::RevokeKey,
        FinalStatus::Deleted => KeyAction::DeleteKey,
    };
    let old = find(&state, &caller, &id, action).await?;
    let (record, delivered) = state.change.set_status(caller.actor(), old, status).await?;
    Ok(Json(StatusChanged {
        id: record.id,
        status: record.status,
        version: record.version,
        reached: delivered.into(),
        note: ACK_NOTE,
    }))
}

async fn verify(
    State(state): State<AppState>,
    caller: RootKey,
    Json(request): Json<VerifyRequest>,
) -> Result<Json<VerifyResponse>> {
    caller.scopes().require_verify().map_err(|e| AppError::Forbidden(e.to_string()))?;
    request.check().map_err(|e| AppError::BadRequest(e.to_string()))?;
    let Ok(key) = Key::parse(&request.key) else {
        let now = now_ms();
        let response = VerifyResponse::malformed().decided_at(u64::try_from(now).unwrap_or(0));
        state.usage.record(UsageEvent::of(answered(&caller, now), &request, &response));
        return Ok(Json(response));
    };
    let hash = key.hash();
    let record = state.store.key_by_hash(&hash).await?;
    let who = Caller { workspace_id: caller.workspace_id(), scopes: caller.scopes() };
    let now = now_ms();
    let decision = decide(record.as_ref(), &hash, who, &request, now);
    let api = match record.as_ref() {
        Some(record) => state.store.api_record_by_id(&record.api_id).await?,
        None => None,
    };
    let decision = match record.as_ref() {
        Some(record) => decision.forbidden_unless(admits(record, api.as_ref(), &request, &caller)),
        None => decision,
    };
    let cap = api.as_ref().map_or(Cap::NONE, ApiRecord::cap);
    if let Some(r) = record.as_ref().filter(|_| decision.code == Code::Valid) {
        ratelimit::check_costs(&r.ratelimits, &request.ratelimits).map_err(AppError::BadRequest)?;
        if r.identity_id.is_some() {
            // The origin settles at the key's authority alone: its identity's would not be asked.
            return Err(AppError::BadRequest(
                "a key attached to an identity is verified at the edge only (POST /v1/keys/verify on a region)".into(),
            ));
        }
    }
    let (decision, settled) = charge(&state, record.as_ref(), hash, (decision, cap), &request).await;
    let decided_at = settled.as_ref().map_or(u64::try_from(now).unwrap_or(0), |s| s.decided_at_ms);
    let mut response = VerifyResponse::new(decision, record.as_ref(), Some(Source::Origin)).decided_at(decided_at);
    if let Some(s) = settled {
        if response.code != Code::Unavailable && !matches!(s.verdict, Verdict::Unlimited | Verdict::Limited) {
            response = response.with_credits(s.remaining);
        }
        response = response.with_limits(s.ratelimits);
    }
    state.usage.record(UsageEvent::of(answered(&caller, now), &request, &response));
    Ok(Json(response))
}

/// The key's exact rate limits and credits for a `VALID` decision, settled together at its
/// authority (all or nothing): the decision they make, and the settlement. The origin is no
/// holder: a `local` limit is counted by edge isolates only. The exact limits are decided under
/// the API's `cap` (its limit override).
async fn charge(
    state: &AppState,
    record: Option<&KeyRecord>,
    hash: KeyHash,
    (decision, cap): (Decision, Cap),
    request: &VerifyRequest,
) -> (Decision, Option<SettleAnswer>) {
    let Some(record) = record.filter(|_| decision.code == Code::Valid) else { return (decision, None) };
    let asks: Vec<LimitAsk> = applicable(&record.ratelimits, &request.ratelimits)
        .into_iter()
        .filter(|&(i, _)| record.ratelimits[i].mode == Mode::Exact)
        .map(|(i, cost)| LimitAsk { name: record.ratelimits[i].name.clone(), cost: Some(cost) })
        .collect();
    if record.credits.is_none() && asks.is_empty() {
        return (decision, None);
    }
    let cost = SettleRequest {
        idempotency_key: request.idempotency_key.clone(),
        cost: request.cost.unwrap_or(1),
        version: record.version,
    };
    let Some(settled) = settle(state, hash, cost, asks, cap).await else {
        return (decision.refused_by_credits(Code::Unavailable), None);
    };
    let decision = match settled.verdict {
        Verdict::Limited => decision.refused_by_limits(Code::RateLimited),
        Verdict::Exceeded => decision.refused_by_credits(Code::UsageExceeded),
        Verdict::Void => decision.refused_by_credits(Code::Unavailable),
        Verdict::Granted | Verdict::Unlimited => decision,
    };
    (decision, Some(settled))
}

/// Whether the key's and its API's allow and deny lists admit the request's client (the peer
/// address when the request names no IP; no country unless it names one), read from the
/// database, which is always current.
fn admits(record: &KeyRecord, api: Option<&ApiRecord>, request: &VerifyRequest, caller: &RootKey) -> bool {
    if record.policy.is_empty() && api.is_none_or(|a| a.policy.is_empty()) {
        return true;
    }
    let peer = caller.actor().request().and_then(|o| o.remote_addr).map(|a| a.ip().to_string());
    let client = Client::of(request.client.as_ref(), peer.as_deref(), None);
    policy::admits(record, api, &client)
}

/// Settles the request's cost of the key's credits at its authority, with its exact rate
/// limits, as the edge does with an idempotency key; `None` when it could not (the answer is
/// then `UNAVAILABLE`).
async fn settle(
    state: &AppState,
    hash: KeyHash,
    settle: SettleRequest,
    limits: Vec<LimitAsk>,
    cap: Cap,
) -> Option<SettleAnswer> {
    match state.delivery.edge().settle(hash, settle, limits, cap).await {
        Ok(Some(settlement)) => Some(settlement),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot settle credits at the key's authority");
            None
        }
    }
}

/// The origin's verification as its usage event sees it: region `origin`, the caller's request.
fn answered(caller: &RootKey, now: i64) -> Answered<'_> {
    let origin = caller.actor().request();
    Answered {
        at_ms: now as u64,
        request_id: origin.map_or_else(|| crate::keygen::new_id("req"), |o| o.request_id.clone()),
        workspace_id: caller.workspace_id(),
        region: "origin",
        caller_ip: origin.and_then(|o| o.remote_addr).map(|a| a.ip().to_string()),
        user_agent: origin.and_then(|o| o.user_agent.clone()),
    }
}

/// What an acknowledgement means, said in every revoke and delete answer.
const ACK_NOTE: &str = "acknowledged: the region took the purge (each region's ack_means says what that means there). \
A region that did not acknowledge still rejects the key within the key's max_staleness_ms, because every copy older \
than that is confirmed with the key's authority; its purge is retried until it is delivered. KV writes marked \
pending follow this answer and are retried the same way.";

/// An identity id the key may name: an identity of the caller's workspace (400 otherwise).
async fn check_identity(state: &AppState, caller: &RootKey, id: String) -> Result<String> {
    check_id(&id, "idn")?;
    match state.store.identity(caller.workspace_id(), &id).await? {
        Some(_) => Ok(id),
        None => Err(AppError::BadRequest(format!("identity_id: this workspace has no identity `{id}`"))),
    }
}

fn check_owner(owner: &str) -> Result<String> {
    if owner.is_empty() || owner.chars().count() > 200 {
        return Err(AppError::BadRequest("owner_id must be 1 to 200 characters".into()));
    }
    Ok(owner.to_owned())
}

pub(super) fn check_meta(meta: Map<String, Value>) -> Result<Meta> {
    let meta = Meta::from_map(&meta);
    let size = meta.as_str().len();
    if size > MAX_META_BYTES {
        return Err(AppError::BadRequest(format!("meta is {size} bytes of JSON; the limit is {MAX_META_BYTES}")));
    }
    Ok(meta)
}

fn check_permissions(mut permissions: Vec<String>) -> Result<Vec<String>> {
    if permissions.len() > MAX_PERMISSIONS {
        return Err(AppError::BadRequest(format!("at most {MAX_PERMISSIONS} permissions per key")));
    }
    for p in &permissions {
        let ok = (1..=100).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.:*-".contains(&b));
        if !ok {
            return Err(AppError::BadRequest(format!(
                "permission `{}` must be 1 to 100 characters of letters, digits and `_ . : * -`",
                p.chars().take(100).collect::<String>()
            )));
        }
    }
    permissions.sort();
    permissions.dedup();
    Ok(permissions)
}

/// A display start to search by: key characters only (letters, digits, `_`), at most the
/// length of a stored start; a longer text is cut to that length.
fn check_start(start: &str) -> Result<String> {
    if start.is_empty() || !start.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(AppError::BadRequest("start must be the visible beginning of a key, like `sk_live_3xQ9`".into()));
    }
    // A start is `<prefix>_` plus a fixed number of body characters.
    let limit = start.rfind('_').map_or(start.len(), |i| i + 1 + keyward_shared::key::START_BODY_CHARS);
    Ok(start.chars().take(limit).collect())
}
