//! `GET /v1/regions`: each region's health and how far behind its deliveries are.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use futures::future::join_all;
use keyward_shared::Scope;
use serde_json::{Value, json};

use super::auth::RootKey;
use super::{AppState, Result};
use crate::store::{PendingTarget, Target};
use crate::time::now_ms;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/regions", get(list))
}

async fn list(State(state): State<AppState>, caller: RootKey) -> Result<axum::Json<Value>> {
    caller.require(&Scope::ApiRead)?;
    let pending = state.store.pending_by_target().await?;
    let now = now_ms();
    let of = |target: Target| {
        let p = pending.iter().find(|p| p.target == target);
        let (count, lag) = p.map_or((0, 0), |p: &PendingTarget| (p.pending, now - p.oldest));
        json!({ "pending": count, "lag_ms": lag, "last_error": p.and_then(|p| p.last_error.clone()) })
    };
    let edge = state.delivery.edge();
    let health = join_all(edge.regions.iter().map(|r| edge.healthy(r))).await;
    let regions: Vec<Value> = edge
        .regions
        .iter()
        .zip(health)
        .map(|(region, healthy)| {
            json!({
                "name": region.name,
                "url": region.url,
                "healthy": healthy,
                "kv": of(Target::Kv(region.name.clone())),
                "purge": of(Target::Purge(region.name.clone())),
            })
        })
        .collect();
    let authority = edge.has_authority().then(|| of(Target::Authority));
    Ok(axum::Json(json!({ "authority": authority, "regions": regions })))
}
