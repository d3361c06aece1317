//! `POST /v1/apis` and `GET /v1/apis`: keyspaces inside a workspace.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use keyward_shared::Scope;
use keyward_shared::key::validate_prefix;
use keyward_shared::record::DEFAULT_MAX_STALENESS_MS;
use serde::{Deserialize, Serialize};

use super::auth::RootKey;
use super::extract::Json;
use super::{AppError, AppState, Result};
use crate::keygen::new_id;
use crate::store::Api;
use crate::time::now_ms;

/// The longest `max_staleness_ms` an API may choose: one hour.
pub(super) const MAX_STALENESS_LIMIT_MS: u64 = 3_600_000;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/apis", post(create).get(list))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateApi {
    name: String,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    max_staleness_ms: Option<u64>,
}

async fn create(
    State(state): State<AppState>,
    caller: RootKey,
    Json(body): Json<CreateApi>,
) -> Result<(StatusCode, Json<Api>)> {
    caller.require(&Scope::ApiCreate)?;
    let name_ok = (1..=64).contains(&body.name.len())
        && body.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !name_ok {
        return Err(AppError::BadRequest(
            "API name must be 1 to 64 characters of a-z, 0-9, `-` and `_` (like `payments-live`)".into(),
        ));
    }
    let prefix = body.prefix.unwrap_or_else(|| "sk".to_owned());
    validate_prefix(&prefix).map_err(|e| AppError::BadRequest(format!("prefix `{prefix}`: {e}")))?;
    let max_staleness_ms = body.max_staleness_ms.unwrap_or(DEFAULT_MAX_STALENESS_MS);
    if !(1..=MAX_STALENESS_LIMIT_MS).contains(&max_staleness_ms) {
        return Err(AppError::BadRequest(format!("max_staleness_ms must be between 1 and {MAX_STALENESS_LIMIT_MS}")));
    }
    let api = Api {
        id: new_id("api"),
        workspace_id: caller.workspace_id().to_owned(),
        name: body.name,
        prefix,
        max_staleness_ms,
        created_at: now_ms(),
    };
    state.store.create_api(&api, caller.actor()).await?;
    Ok((StatusCode::CREATED, Json(api)))
}

#[derive(Serialize)]
struct ApiList {
    apis: Vec<Api>,
}

async fn list(State(state): State<AppState>, caller: RootKey) -> Result<Json<ApiList>> {
    caller.require(&Scope::ApiRead)?;
    Ok(Json(ApiList { apis: state.store.apis(caller.workspace_id()).await? }))
}
