//! Root keys: `POST /v1/root-keys`, `GET /v1/root-keys`, `POST /v1/root-keys/{id}/revoke`, and
//! the work shared with `POST /v1/workspaces`: minting root keys, storing them hashed, and writing
//! those that may verify to KV, through the outbox, so the edge can check its callers.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use keyward_shared::scope::ApiSelector;
use keyward_shared::{RootKeyRecord, Scope, Scopes, kv_key_for_root};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::RootKey;
use super::extract::{Json, Path, check_id};
use super::{AppError, AppState, Result, new_id};
use crate::delivery::RegionReport;
use crate::edge_client::EdgeClient;
use crate::keygen::{self, ROOT_KEY_PREFIX};
use crate::store::NewRootKey;
use crate::time::now_ms;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/root-keys", post(create).get(list)).route("/v1/root-keys/{id}/revoke", post(revoke))
}

async fn list(State(state): State<AppState>, caller: RootKey) -> Result<axum::Json<Value>> {
    caller.require(&Scope::RootKeyManage)?;
    let keys: Vec<Value> = state
        .store
        .workspace_root_keys(caller.workspace_id())
        .await?
        .into_iter()
        .map(|(r, name, start)| {
            json!({ "id": r.id, "name": name, "start": start, "scopes": r.scopes, "status": r.status, "updated_at": r.updated_at })
        })
        .collect();
    Ok(axum::Json(json!({ "root_keys": keys })))
}

/// Revokes a root key: the control plane refuses it at once, and the edge within its 1 s trust
/// window, confirming root keys with the authority and KV (the higher version wins). Both go
/// through the outbox, so a target that missed its write gets it when it returns; the answer
/// says whether the authority has it.
async fn revoke(State(state): State<AppState>, caller: RootKey, Path(id): Path<String>) -> Result<axum::Json<Value>> {
    caller.require(&Scope::RootKeyManage)?;
    check_id(&id, "root")?;
    let outbox = state.delivery.new_outbox(true, now_ms());
    let (record, outbox_id) = state
        .store
        .revoke_root_key(caller.workspace_id(), &id, &outbox)
        .await?
        .ok_or_else(|| AppError::not_found("root key"))?;
    let delivered = state.delivery.deliver(outbox_id).await?;
    Ok(axum::Json(json!({
        "id": record.id,
        "status": record.status,
        "authority": delivered.authority,
        "regions": delivered.regions,
    })))
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
) -> Result<(StatusCode, axum::Json<Value>)> {
    caller.require(&Scope::RootKeyCreate)?;
    let name = check_name(&body.name)?;
    if body.scopes.is_empty() || body.scopes.len() > 100 {
        return Err(AppError::BadRequest("give between 1 and 100 scopes".into()));
    }
    let mut scopes = Vec::new();
    for text in &body.scopes {
        let scope: Scope = text.parse().map_err(|e: keyward_shared::ScopeError| AppError::BadRequest(e.to_string()))?;
        if !caller.0.scopes.grants(&scope) {
            return Err(AppError::Forbidden(format!("cannot grant `{scope}`: this root key does not hold it")));
        }
        if let Scope::Key { api: ApiSelector::Id(api_id), .. } = &scope
            && state.store.api(caller.workspace_id(), api_id).await?.is_none()
        {
            return Err(AppError::BadRequest(format!("scope `{scope}` names an API that is not in this workspace")));
        }
        scopes.push(scope);
    }
    let key = keygen::generate(ROOT_KEY_PREFIX).map_err(|e| AppError::Internal(e.into()))?;
    let id = new_id("root");
    let scopes = Scopes(scopes);
    let now = now_ms();
    let outbox = publishes(&scopes).then(|| state.delivery.new_outbox(false, now));
    let root = NewRootKey {
        id: &id,
        workspace_id: caller.workspace_id(),
        name,
        hash: &key.hash(),
        start: key.start(),
        scopes: &scopes,
        now,
    };
    let outbox_id = state.store.create_root_key(root, outbox.as_ref()).await?;
    let regions = delivered_regions(&state, outbox_id).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({
            "id": id,
            "key": key.expose(),
            "start": key.start(),
            "scopes": scopes,
            "regions": regions,
        })),
    ))
}

/// Whether a root key with these scopes is written to KV: only one that may verify somewhere,
/// since the edge reads root keys only to check the callers of its verify route.
pub fn publishes(scopes: &Scopes) -> bool {
    scopes.can_verify_somewhere()
}

/// Delivers a root key's outbox entry, if it has one; answers each region's KV write.
pub(crate) async fn delivered_regions(state: &AppState, outbox_id: Option<i64>) -> Result<Vec<RegionReport>> {
    match outbox_id {
        Some(id) => Ok(state.delivery.deliver(id).await?.regions),
        None => Ok(Vec::new()),
    }
}

/// Writes an active root key to every region's KV directly (at start-up, so a region whose KV
/// was wiped learns its callers again); answers the per-region result.
pub async fn publish_record(edge: &EdgeClient, record: &RootKeyRecord) -> Result<Vec<RegionReport>> {
    if !publishes(&record.scopes) {
        return Ok(Vec::new());
    }
    let value = serde_json::to_string(record).map_err(|e| AppError::Internal(e.into()))?;
    Ok(edge.write_everywhere(&kv_key_for_root(&record.hash), &value).await)
}

/// A display name: 1 to 200 characters.
pub(crate) fn check_name(name: &str) -> Result<&str> {
    let trimmed = name.trim();
    if trimmed.is_empty() || trimmed.chars().count() > 200 {
        return Err(AppError::BadRequest("name must be 1 to 200 characters".into()));
    }
    Ok(trimmed)
}
