//! `GET /v1/regions`: each region's health and how far behind the caller's workspace's
//! deliveries are there: pending, stuck and dead-lettered, with the last error. A workspace sees
//! only its own changes' deliveries (another tenant's errors can name its keys and its load);
//! the operator's view of every workspace is `keyward outbox status`, on the database itself.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use futures::future::join_all;
use keyward_shared::Scope;
use serde::Serialize;
use serde_json::Value;

use super::auth::RootKey;
use super::{AppState, Result};
use crate::delivery::health_json;
use crate::store::Target;
use crate::time::now_ms;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/regions", get(list))
}

/// The answer: the authority's deliveries (when there is one) and each region's.
#[derive(Serialize)]
struct RegionsView {
    authority: Option<Value>,
    regions: Vec<RegionView>,
}

#[derive(Serialize)]
struct RegionView {
    name: String,
    url: String,
    healthy: bool,
    kv: Value,
    purge: Value,
}

async fn list(State(state): State<AppState>, caller: RootKey) -> Result<axum::Json<RegionsView>> {
    caller.require(&Scope::ApiRead)?;
    let now = now_ms();
    let stuck_before = state.delivery.settings().stuck_before(now);
    let health = state.store.delivery_health(Some(caller.workspace_id()), stuck_before).await?;
    let of = |target: Target| health_json(health.iter().find(|h| h.target == target), now);
    let edge = state.delivery.edge();
    let up = join_all(edge.regions.iter().map(|r| edge.healthy(r))).await;
    let regions = edge
        .regions
        .iter()
        .zip(up)
        .map(|(region, healthy)| RegionView {
            name: region.name.clone(),
            url: region.url.clone(),
            healthy,
            kv: of(Target::Kv(region.name.clone())),
            purge: of(Target::Purge(region.name.clone())),
        })
        .collect();
    let authority = edge.has_authority().then(|| of(Target::Authority));
    Ok(axum::Json(RegionsView { authority, regions }))
}
