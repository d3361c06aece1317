//! The HTTP surface: `app(state)` builds the router, one module per resource.

mod apis;
mod audit;
mod auth;
mod delivery;
pub mod error;
mod events;
mod extract;
mod identities;
mod keys;
mod policy;
mod proof;
mod regions;
mod root_keys;
mod usage;
mod workspaces;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::change::{ChangeError, ChangeService};
use crate::delivery::RegionReport;
use crate::delivery::{AuthorityReport, Delivered, Deliverer, OutboxSettings};
use crate::edge_client::EdgeClient;
use crate::store::Store;
use crate::usage::UsageLog;
pub use error::{AppError, Result};
pub use events::EventSettings;

/// Largest admin request body.
pub const MAX_ADMIN_BODY: usize = 64 * 1024;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// Reads, and APIs' creation; every change to a key or a root key goes through
    /// [`AppState::change`].
    pub store: Store,
    pub delivery: Arc<Deliverer>,
    pub change: Arc<ChangeService>,
    /// The id of the newest outbox entry, for event streams to wake on.
    pub changes: tokio::sync::watch::Sender<i64>,
    /// The open event streams, counted against their limits.
    streams: Arc<events::Streams>,
    /// Usage events: the edge's batches, and the origin's own verifications.
    pub usage: Arc<UsageLog>,
}

impl AppState {
    /// With the outbox's default ages.
    pub fn new(store: Store, edge: Arc<EdgeClient>) -> AppState {
        AppState::with_outbox(store, edge, OutboxSettings::default())
    }

    pub fn with_outbox(store: Store, edge: Arc<EdgeClient>, outbox: OutboxSettings) -> AppState {
        let changes = tokio::sync::watch::channel(0).0;
        let usage = Arc::new(UsageLog::new(store.clone(), Some(edge.purge_secret().clone())));
        let delivery = Arc::new(Deliverer::new(store.clone(), edge, outbox));
        let change = Arc::new(ChangeService::new(store.clone(), delivery.clone(), changes.clone()));
        AppState { store, delivery, change, changes, streams: Arc::default(), usage }
    }

    /// With these limits on open event streams instead of the defaults.
    pub fn with_event_limits(mut self, limits: EventSettings) -> AppState {
        self.streams = Arc::new(events::Streams::new(limits));
        self
    }
}

/// What a change's delivery reached, in every answer to a change: the authority (`null` when
/// none is configured) and each region.
#[derive(Serialize)]
struct Reached {
    authority: Option<AuthorityReport>,
    regions: Vec<RegionReport>,
}

impl From<Delivered> for Reached {
    fn from(delivered: Delivered) -> Reached {
        Reached { authority: delivered.authority, regions: delivered.regions }
    }
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
}

impl From<ChangeError> for AppError {
    fn from(e: ChangeError) -> AppError {
        match e {
            ChangeError::Store(e) => e.into(),
            ChangeError::Internal(e) => AppError::Internal(e),
        }
    }
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(Health { status: "ok" }) }))
        .merge(workspaces::router())
        .merge(root_keys::router())
        .merge(apis::router())
        .merge(keys::router())
        .merge(identities::router())
        .merge(policy::router())
        .merge(regions::router())
        .merge(events::router())
        .merge(usage::router())
        .merge(audit::router())
        .merge(proof::router())
        .merge(delivery::router())
        .fallback(|| async { AppError::NotFound("no such route; see README.md for the API".into()) })
        .method_not_allowed_fallback(|| async {
            AppError::MethodNotAllowed("this route does not take that method".into())
        })
        .layer(DefaultBodyLimit::max(MAX_ADMIN_BODY))
        .layer(CatchPanicLayer::custom(|_| AppError::Internal(anyhow::anyhow!("a handler panicked")).into_response()))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
