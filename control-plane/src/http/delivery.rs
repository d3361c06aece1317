//! `GET /v1/keys/{id}/delivery`: where a change of a key stands, target by target, while it is
//! delivered and after; for following a revocation region by region (`keyward incident`), since
//! the revoke call answers once. Needs the API's `read_key`.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use keyward_shared::{KeyAction, Scope};
use serde::{Deserialize, Serialize};

use super::auth::RootKey;
use super::extract::{Json, Path, Query, check_id};
use super::{AppError, AppState, Result};
use crate::store::proof::Delivery;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/keys/{id}/delivery", get(delivery))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeliveryQuery {
    /// The record version whose change to show (default: the key's current version).
    #[serde(default)]
    version: Option<u64>,
}

#[derive(Serialize)]
struct ChangeDelivery {
    key_id: String,
    version: u64,
    /// When the change was committed, and when its caller was answered (the control plane's clock).
    committed_at_ms: i64,
    answered_at_ms: Option<i64>,
    /// Targets not yet acknowledged.
    pending: usize,
    targets: Vec<Delivery>,
}

async fn delivery(
    State(state): State<AppState>,
    caller: RootKey,
    Path(id): Path<String>,
    Query(q): Query<DeliveryQuery>,
) -> Result<Json<ChangeDelivery>> {
    check_id(&id, "key")?;
    let record = state.store.key(caller.workspace_id(), &id).await?.ok_or_else(|| AppError::not_found("key"))?;
    caller.require(&Scope::key(&record.api_id, KeyAction::ReadKey))?;
    let version = q.version.unwrap_or(record.version);
    if version > record.version {
        return Err(AppError::NotFound(format!(
            "the key is at version {}: version {version} is not made yet",
            record.version
        )));
    }
    let entry = state
        .store
        .change_entry(&id, version)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no delivery of version {version} is kept")))?;
    let targets = state.store.deliveries_of(entry.id).await?;
    Ok(Json(ChangeDelivery {
        key_id: id,
        version,
        committed_at_ms: entry.created_at,
        answered_at_ms: entry.answered_at,
        pending: targets.iter().filter(|t| t.state == "pending").count(),
        targets,
    }))
}
