//! Identities: `POST/GET /v1/identities`, `GET/PATCH/DELETE /v1/identities/{id}`. An identity
//! is a customer, by the API owner's `external_id` (unique in the workspace, 409 on a clash),
//! with meta, and rate limits and credits shared by every key attached to it (a key's own and
//! its identity's both apply at the edge). Its record reaches the edge through the outbox like
//! a key's: a change that tightens its limits or credits is purged at once.
//!
//! An identity spans the workspace's APIs, so its routes need the wildcard key scopes:
//! `api.*.create_key` to create, `api.*.read_key` to read, list and ask what remains of its
//! credits (`GET /v1/identities/{id}/credits`), `api.*.update_key` to
//! change, `api.*.delete_key` to delete. Another workspace's identity is `NOT_FOUND`. An
//! identity that a key which is not deleted names cannot be deleted (409): detach or delete
//! the keys first.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use keyward_shared::credits::Credits;
use keyward_shared::identity::IdentityRecord;
use keyward_shared::ratelimit::RateLimit;
use keyward_shared::record::{DEFAULT_MAX_STALENESS_MS, RECORD_SCHEMA};
use keyward_shared::scope::ApiSelector;
use keyward_shared::{KeyAction, Meta, Scope};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::apis::MAX_STALENESS_LIMIT_MS;
use super::auth::RootKey;
use super::extract::{Json, Path, Query, check_id};
use super::keys::{CreditsInput, Remaining, check_limits, check_meta, present, remaining, set_credits};
use super::{AppError, AppState, Reached, Result};
use crate::keygen::new_id;
use crate::store::Identity;
use crate::time::now_ms;

const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1_000;
const MAX_EXTERNAL_ID: usize = 200;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/identities", post(create).get(list))
        .route("/v1/identities/{id}", get(read).patch(update).delete(delete))
        .route("/v1/identities/{id}/credits", get(read_credits))
}

/// The scope an identity route needs: `action` on every API of the workspace.
fn scope(action: KeyAction) -> Scope {
    Scope::Key { api: ApiSelector::Any, action }
}

/// An identity as the admin API shows it.
#[derive(Serialize)]
struct IdentityView {
    id: String,
    workspace_id: String,
    external_id: String,
    meta: Meta,
    /// The credits setting (absent: unlimited); the balance is kept by its authority.
    #[serde(skip_serializing_if = "Option::is_none")]
    credits: Option<Credits>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ratelimits: Vec<RateLimit>,
    max_staleness_ms: u64,
    version: u64,
    created_at: i64,
    updated_at: i64,
}

impl From<Identity> for IdentityView {
    fn from(i: Identity) -> IdentityView {
        let r = i.record;
        IdentityView {
            id: r.id,
            workspace_id: r.workspace_id,
            external_id: r.external_id,
            meta: i.meta,
            credits: r.credits,
            ratelimits: r.ratelimits,
            max_staleness_ms: r.max_staleness_ms,
            version: r.version,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// The answer to a change: the identity as it now is, and what its delivery reached (absent
/// when nothing changed).
#[derive(Serialize)]
struct ChangedIdentity {
    identity: IdentityView,
    #[serde(flatten)]
    reached: Option<Reached>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateIdentity {
    external_id: String,
    #[serde(default)]
    meta: Option<Map<String, Value>>,
    #[serde(default)]
    credits: Option<CreditsInput>,
    #[serde(default)]
    ratelimits: Vec<RateLimit>,
    /// How long an edge copy of the identity is trusted (default 1000 ms).
    #[serde(default)]
    max_staleness_ms: Option<u64>,
}

fn check_external_id(text: String) -> Result<String> {
    if text.is_empty() || text.chars().count() > MAX_EXTERNAL_ID || text.chars().any(char::is_control) {
        return Err(AppError::BadRequest(format!(
            "external_id must be 1 to {MAX_EXTERNAL_ID} characters, none of them control characters"
        )));
    }
    Ok(text)
}

async fn create(
    State(state): State<AppState>,
    caller: RootKey,
    Json(body): Json<CreateIdentity>,
) -> Result<(StatusCode, Json<ChangedIdentity>)> {
    caller.require(&scope(KeyAction::CreateKey))?;
    let max_staleness_ms = body.max_staleness_ms.unwrap_or(DEFAULT_MAX_STALENESS_MS);
    if !(1..=MAX_STALENESS_LIMIT_MS).contains(&max_staleness_ms) {
        return Err(AppError::BadRequest(format!("max_staleness_ms must be between 1 and {MAX_STALENESS_LIMIT_MS}")));
    }
    let now = now_ms();
    let record = IdentityRecord {
        schema: RECORD_SCHEMA,
        id: new_id("idn"),
        workspace_id: caller.workspace_id().to_owned(),
        external_id: check_external_id(body.external_id)?,
        version: 1,
        max_staleness_ms,
        credits: body.credits.map(|c| set_credits(c, 1)).transpose()?,
        ratelimits: check_limits(body.ratelimits)?,
        created_at: now,
        updated_at: now,
    };
    let identity = Identity { record, meta: check_meta(body.meta.unwrap_or_default())? };
    let delivered = state.change.create_identity(caller.actor(), &identity, now).await?;
    let answer = ChangedIdentity { identity: identity.into(), reached: Some(delivered.into()) };
    Ok((StatusCode::CREATED, Json(answer)))
}

/// The identity with this id if the caller's workspace has it and the caller holds `action`.
async fn find(state: &AppState, caller: &RootKey, id: &str, action: KeyAction) -> Result<Identity> {
    caller.require(&scope(action))?;
    check_id(id, "idn")?;
    state.store.identity(caller.workspace_id(), id).await?.ok_or_else(|| AppError::not_found("identity"))
}

async fn read(State(state): State<AppState>, caller: RootKey, Path(id): Path<String>) -> Result<Json<IdentityView>> {
    Ok(Json(find(&state, &caller, &id, KeyAction::ReadKey).await?.into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    external_id: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
}

/// One page of identities, and the cursor of the next (`null` on the last).
#[derive(Serialize)]
struct IdentityPage {
    identities: Vec<IdentityView>,
    cursor: Option<String>,
}

async fn list(
    State(state): State<AppState>,
    caller: RootKey,
    Query(q): Query<ListQuery>,
) -> Result<Json<IdentityPage>> {
    caller.require(&scope(KeyAction::ReadKey))?;
    if let Some(cursor) = &q.cursor {
        check_id(cursor, "idn")?;
    }
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(AppError::BadRequest(format!("limit must be between 1 and {MAX_PAGE}")));
    }
    let store = &state.store;
    let mut page =
        store.identities(caller.workspace_id(), q.external_id.as_deref(), q.cursor.as_deref(), limit + 1).await?;
    let more = page.len() > limit as usize;
    page.truncate(limit as usize);
    let cursor = if more { page.last().map(|i| i.record.id.clone()) } else { None };
    Ok(Json(IdentityPage { identities: page.into_iter().map(IdentityView::from).collect(), cursor }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateIdentity {
    #[serde(default)]
    external_id: Option<String>,
    #[serde(default)]
    meta: Option<Map<String, Value>>,
    /// Sets the credits (`null`: unlimited).
    #[serde(default, deserialize_with = "present")]
    credits: Option<Option<CreditsInput>>,
    /// Replaces the rate limits (`[]`: none).
    #[serde(default)]
    ratelimits: Option<Vec<RateLimit>>,
    /// The version the change was made from: refused (409) if the identity moved on since.
    #[serde(default)]
    version: Option<u64>,
}

async fn update(
    State(state): State<AppState>,
    caller: RootKey,
    Path(id): Path<String>,
    Json(body): Json<UpdateIdentity>,
) -> Result<Json<ChangedIdentity>> {
    let old = find(&state, &caller, &id, KeyAction::UpdateKey).await?;
    if body.version.is_some_and(|v| v != old.record.version) {
        return Err(AppError::Conflict(format!("the identity is at version {}; read it again", old.record.version)));
    }
    let mut new = old.clone();
    if let Some(external_id) = body.external_id {
        new.record.external_id = check_external_id(external_id)?;
    }
    if let Some(meta) = body.meta {
        new.meta = check_meta(meta)?;
    }
    if let Some(credits) = body.credits {
        new.record.credits = credits.map(|c| set_credits(c, old.record.version + 1)).transpose()?;
    }
    if let Some(limits) = body.ratelimits {
        new.record.ratelimits = check_limits(limits)?;
    }
    let (identity, delivered) = state.change.commit_identity(caller.actor(), old, new, now_ms()).await?;
    Ok(Json(ChangedIdentity { identity: identity.into(), reached: delivered.map(Reached::from) }))
}

/// An identity's credits as its authority holds them now (what all its keys may still spend).
#[derive(Serialize)]
struct CreditsView {
    identity_id: String,
    /// The setting the record carries (`null`: unlimited).
    credits: Option<Credits>,
    #[serde(flatten)]
    now: Remaining,
}

/// `GET /v1/identities/{id}/credits`: asks the identity's authority what remains (nothing is
/// spent).
async fn read_credits(
    State(state): State<AppState>,
    caller: RootKey,
    Path(id): Path<String>,
) -> Result<Json<CreditsView>> {
    let r = find(&state, &caller, &id, KeyAction::ReadKey).await?.record;
    let now = match r.credits.is_some() {
        true => remaining(&state, IdentityRecord::hash_of(&r.id), r.version, true).await,
        false => Remaining::default(),
    };
    Ok(Json(CreditsView { identity_id: id, credits: r.credits.clone(), now }))
}

#[derive(Serialize)]
struct Deleted {
    id: String,
    deleted: bool,
}

async fn delete(State(state): State<AppState>, caller: RootKey, Path(id): Path<String>) -> Result<Json<Deleted>> {
    let identity = find(&state, &caller, &id, KeyAction::DeleteKey).await?;
    if !state.store.delete_identity(&identity, caller.actor(), now_ms()).await? {
        return Err(AppError::not_found("identity"));
    }
    Ok(Json(Deleted { id, deleted: true }))
}
