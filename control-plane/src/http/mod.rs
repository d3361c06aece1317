//! The HTTP surface: `app(state)` builds the router, one module per resource.

mod apis;
mod auth;
pub mod error;
mod events;
mod extract;
mod keys;
mod regions;
mod root_keys;
mod workspaces;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::delivery::Deliverer;
use crate::edge_client::EdgeClient;
use crate::store::Store;
pub use error::{AppError, Result};
pub use extract::new_id;
pub use root_keys::{publish_record as publish_root_key, publishes as publishes_root_key};

/// Largest admin request body.
pub const MAX_ADMIN_BODY: usize = 64 * 1024;
/// Largest verify request body.
pub const MAX_VERIFY_BODY: usize = 4 * 1024;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub edge: Arc<EdgeClient>,
    pub delivery: Arc<Deliverer>,
    /// The id of the newest outbox entry, for event streams to wake on.
    pub changes: tokio::sync::watch::Sender<i64>,
}

impl AppState {
    pub fn new(store: Store, edge: Arc<EdgeClient>) -> AppState {
        let delivery = Arc::new(Deliverer::new(store.clone(), edge.clone()));
        AppState { store, edge, delivery, changes: tokio::sync::watch::channel(0).0 }
    }
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(serde_json::json!({ "status": "ok" })) }))
        .merge(workspaces::router())
        .merge(root_keys::router())
        .merge(apis::router())
        .merge(keys::router())
        .merge(regions::router())
        .merge(events::router())
        .fallback(|| async { AppError::NotFound("no such route; see README.md for the API".into()) })
        .method_not_allowed_fallback(|| async {
            AppError::MethodNotAllowed("this route does not take that method".into())
        })
        .layer(DefaultBodyLimit::max(MAX_ADMIN_BODY))
        .layer(CatchPanicLayer::custom(|_| AppError::Internal(anyhow::anyhow!("a handler panicked")).into_response()))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
