//! Root keys: `POST /v1/root-keys`, `GET /v1/root-keys`, `POST /v1/root-keys/{id}/revoke`. Minting
//! and revoking are changes ([`crate::change`]); a root key that may verify is written to the
//! edge through the outbox, so the edge can check its callers.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use keyward_shared::record::KeyStatus;
use keyward_shared::scope::ApiSelector;
use keyward_shared::{Key, RootKeyRecord, Scope, Scopes};
use serde::{Deserialize, Serialize};

use super::auth::RootKey;
use super::extract::{Json, Path, check_id};
use super::{AppError, AppState, Reached, Result};
use crate::change::{MintRootKey, Workspace};
use crate::delivery::RegionReport;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/root-keys", post(create).get(list)).route("/v1/root-keys/{id}/revoke", post(revoke))
}

/// A root key as the admin API lists it: never its hash.
#[derive(Serialize)]
struct RootKeyView {
    id: String,
    name: String,
    start: String,
    scopes: Scopes,
    status: KeyStatus,
    updated_at: i64,
}

#[derive(Serialize)]
struct RootKeyList {
    root_keys: Vec<RootKeyView>,
}

/// A new root key: the only time its plaintext is shown.
#[derive(Serialize)]
pub(crate) struct MintedView {
    id: String,
    key: String,
    start: String,
    scopes: Scopes,
}

impl MintedView {
    pub(crate) fn new(id: String, key: &Key, scopes: Scopes) -> MintedView {
        MintedView { id, key: key.expose().to_owned(), start: key.start().to_owned(), scopes }
    }
}

/// The answer to minting a root key: it, and each region's KV write.
#[derive(Serialize)]
struct CreatedRootKey {
    #[serde(flatten)]
    root_key: MintedView,
    regions: Vec<RegionReport>,
}

#[derive(Serialize)]
struct RevokedRootKey {
    id: String,
    status: KeyStatus,
    #[serde(flatten)]
    reached: Reached,
}

async fn list(State(state): State<AppState>, caller: RootKey) -> Result<Json<RootKeyList>> {
    caller.require(&Scope::RootKeyManage)?;
    let root_keys = state
        .store
        .workspace_root_keys(caller.workspace_id())
        .await?
        .into_iter()
        .map(|(r, name, start): (RootKeyRecord, _, _)| RootKeyView {
            id: r.id,
            name,
            start,
            scopes: r.scopes,
            status: r.status,
            updated_at: r.updated_at,
        })
        .collect();
    Ok(Json(RootKeyList { root_keys }))
}

/// Revokes a root key: the control plane refuses it at once, the edge within its 1 s trust
/// window; the answer says whether the authority has it.
async fn revoke(
    State(state): State<AppState>,
    caller: RootKey,
    Path(id): Path<String>,
) -> Result<Json<RevokedRootKey>> {
    caller.require(&Scope::RootKeyManage)?;
    check_id(&id, "root")?;
    let (record, delivered) = state
        .change
        .revoke_root_key(caller.actor(), caller.workspace_id(), &id)
        .await?
        .ok_or_else(|| AppError::not_found("root key"))?;
    Ok(Json(RevokedRootKey { id: record.id, status: record.status, reached: delivered.into() }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRootKey {
    name: String,
    scopes: Vec<String>,
}

async fn create(
    State(state): State<AppState>,
    caller: RootKey,
    Json(body): Json<CreateRootKey>,
) -> Result<(StatusCode, Json<CreatedRootKey>)> {
    caller.require(&Scope::RootKeyCreate)?;
    let name = check_name(&body.name)?;
    if body.scopes.is_empty() || body.scopes.len() > 100 {
        return Err(AppError::BadRequest("give between 1 and 100 scopes".into()));
    }
    let mut scopes = Vec::new();
    for text in &body.scopes {
        let scope: Scope = text.parse().map_err(|e: keyward_shared::ScopeError| AppError::BadRequest(e.to_string()))?;
        if !caller.scopes().grants(&scope) {
            return Err(AppError::Forbidden(format!("cannot grant `{scope}`: this root key does not hold it")));
        }
        if let Scope::Key { api: ApiSelector::Id(api_id), .. } = &scope
            && state.store.api(caller.workspace_id(), api_id).await?.is_none()
        {
            return Err(AppError::BadRequest(format!("scope `{scope}` names an API that is not in this workspace")));
        }
        scopes.push(scope);
    }
    let mint = MintRootKey { workspace: Workspace::Existing(caller.workspace_id()), name, scopes: Scopes(scopes) };
    let minted = state.change.mint_root_key(caller.actor(), mint).await?;
    let answer =
        CreatedRootKey { root_key: MintedView::new(minted.id, &minted.key, minted.scopes), regions: minted.regions };
    Ok((StatusCode::CREATED, Json(answer)))
}

/// A display name: 1 to 200 characters.
pub(crate) fn check_name(name: &str) -> Result<&str> {
    let trimmed = name.trim();
    if trimmed.is_empty() || trimmed.chars().count() > 200 {
        return Err(AppError::BadRequest("name must be 1 to 200 characters".into()));
    }
    Ok(trimmed)
}
