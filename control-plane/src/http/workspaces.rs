//! `POST /v1/workspaces`: a new tenant, with a root key that holds every scope inside it.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use keyward_shared::{Scope, Scopes};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::RootKey;
use super::extract::Json;
use super::root_keys::{check_name, delivered_regions, publishes};
use super::{AppError, AppState, Result, new_id};
use crate::keygen::{self, ROOT_KEY_PREFIX};
use crate::store::NewRootKey;
use crate::time::now_ms;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/workspaces", post(create))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateWorkspace {
    name: String,
}

async fn create(
    State(state): State<AppState>,
    caller: RootKey,
    Json(body): Json<CreateWorkspace>,
) -> Result<(StatusCode, axum::Json<Value>)> {
    caller.require(&Scope::WorkspaceCreate)?;
    let name = check_name(&body.name)?;
    let id = new_id("ws");
    let key = keygen::generate(ROOT_KEY_PREFIX).map_err(|e| AppError::Internal(e.into()))?;
    let root_id = new_id("root");
    let scopes = Scopes(Scope::all(false));
    let now = now_ms();
    let outbox = publishes(&scopes).then(|| state.delivery.new_outbox(false, now));
    let root = NewRootKey {
        id: &root_id,
        workspace_id: &id,
        name: "first",
        hash: &key.hash(),
        start: key.start(),
        scopes: &scopes,
        now,
    };
    let outbox_id = state.store.create_workspace(&id, name, root, outbox.as_ref()).await?;
    let regions = delivered_regions(&state, outbox_id).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({
            "id": id,
            "name": name,
            "root_key": { "id": root_id, "key": key.expose(), "start": key.start(), "scopes": scopes },
            "regions": regions,
        })),
    ))
}
