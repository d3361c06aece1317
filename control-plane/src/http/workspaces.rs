//! `POST /v1/workspaces`: a new tenant, with a root key that holds every scope inside it.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use keyward_shared::{Scope, Scopes};
use serde::{Deserialize, Serialize};

use super::auth::RootKey;
use super::extract::Json;
use super::root_keys::{MintedView, check_name};
use super::{AppState, Result};
use crate::change::{MintRootKey, Workspace};
use crate::delivery::RegionReport;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/workspaces", post(create))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateWorkspace {
    name: String,
}

/// The answer to creating a workspace: it, its first root key, and each region's KV write.
#[derive(Serialize)]
struct CreatedWorkspace {
    id: String,
    name: String,
    root_key: MintedView,
    regions: Vec<RegionReport>,
}

async fn create(
    State(state): State<AppState>,
    caller: RootKey,
    Json(body): Json<CreateWorkspace>,
) -> Result<(StatusCode, Json<CreatedWorkspace>)> {
    caller.require(&Scope::WorkspaceCreate)?;
    let name = check_name(&body.name)?;
    // Every scope inside the workspace; creating workspaces is not one of them.
    let mint = MintRootKey { workspace: Workspace::New(name), name: "first", scopes: Scopes(Scope::all(false)) };
    let minted = state.change.mint_root_key(caller.actor(), mint).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedWorkspace {
            id: minted.workspace_id,
            name: name.to_owned(),
            root_key: MintedView::new(minted.id, &minted.key, minted.scopes),
            regions: minted.regions,
        }),
    ))
}
