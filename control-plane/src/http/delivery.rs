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
use crate::store::proof::TargetDelivery;
use crate::store::{DeliveryState, Target};

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
    /// The status the change gave the key (`active`, `revoked`, `deleted`).
    status: Option<String>,
    /// When the change was committed, and when its caller was answered (the control plane's clock).
    committed_at_ms: i64,
    answered_at_ms: Option<i64>,
    /// Targets not yet acknowledged that still may be (not left to a newer change).
    pending: usize,
    targets: Vec<TargetView>,
}

#[derive(Serialize)]
struct TargetView {
    #[serde(flatten)]
    delivery: TargetDelivery,
    /// Whether the change is in force there. For a region's purge: the region took it *and*
    /// the authority holds the change (a region that confirms a copy with an authority lacking
    /// it could take the old record back); the revoke call's answer says the same. Otherwise:
    /// its delivery is done.
    acknowledged: bool,
}

/// Each delivery with whether it counts as acknowledged.
fn views(deliveries: Vec<TargetDelivery>) -> Vec<TargetView> {
    let authority_lacks = deliveries.iter().any(|d| d.target == Target::Authority && d.state != DeliveryState::Done);
    deliveries
        .into_iter()
        .map(|delivery| {
            let done = delivery.state == DeliveryState::Done;
            let acknowledged = done && !(matches!(delivery.target, Target::Purge(_)) && authority_lacks);
            TargetView { delivery, acknowledged }
        })
        .collect()
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
    let targets = views(state.store.deliveries_of(entry.id).await?);
    Ok(Json(ChangeDelivery {
        key_id: id,
        version,
        status: entry.status,
        committed_at_ms: entry.created_at,
        answered_at_ms: entry.answered_at,
        pending: targets
            .iter()
            .filter(|t| !t.acknowledged && matches!(t.delivery.state, DeliveryState::Pending | DeliveryState::Done))
            .count(),
        targets,
    }))
}
