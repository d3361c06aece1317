//! `GET /v1/audit` (the workspace's audit entries, newest first, by key, root key, action and
//! time) and `GET /v1/audit/checkpoint` (the chain's head, signed): both need `audit.read`.
//! Nothing edits or deletes entries.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use keyward_shared::Scope;
use serde::{Deserialize, Serialize};

use super::auth::RootKey;
use super::extract::{Json, Query};
use super::{AppError, AppState, Result};
use crate::store::audit::{AuditEntry, AuditQuery, Checkpoint};
use crate::time::now_ms;

const DEFAULT_PAGE: i64 = 100;
const MAX_PAGE: i64 = 1_000;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/audit", get(list)).route("/v1/audit/checkpoint", get(checkpoint))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// The id of what changed: a key, a root key, an API, a workspace.
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    root_key_id: Option<String>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    from_ms: Option<i64>,
    #[serde(default)]
    to_ms: Option<i64>,
    /// The last id of the page before.
    #[serde(default)]
    cursor: Option<i64>,
    #[serde(default)]
    limit: Option<i64>,
}

#[derive(Serialize)]
struct Page {
    entries: Vec<AuditEntry>,
}

async fn list(State(state): State<AppState>, caller: RootKey, Query(q): Query<ListQuery>) -> Result<Json<Page>> {
    caller.require(&Scope::AuditRead)?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(AppError::BadRequest(format!("limit must be 1 to {MAX_PAGE}")));
    }
    let query = AuditQuery {
        workspace_id: Some(caller.workspace_id()),
        target: q.target.as_deref(),
        root_key_id: q.root_key_id.as_deref(),
        action: q.action.as_deref(),
        from_ms: q.from_ms,
        to_ms: q.to_ms,
        before_id: q.cursor,
        limit,
    };
    Ok(Json(Page { entries: state.store.audit_entries(&query).await? }))
}

async fn checkpoint(State(state): State<AppState>, caller: RootKey) -> Result<Json<Option<Checkpoint>>> {
    caller.require(&Scope::AuditRead)?;
    Ok(Json(state.store.audit_checkpoint(now_ms()).await?))
}
