//! `keyward serve`: open the database, make the first workspace and root key on an empty one,
//! write verify-capable root keys to KV, and answer HTTP until SIGTERM or Ctrl-C.

use std::sync::Arc;

use anyhow::Context;
use keyward_shared::{Key, Scope, Scopes};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::delivery::error_text;
use crate::edge_client::EdgeClient;
use crate::http::{AppState, app, new_id};
use crate::keygen::{self, ROOT_KEY_PREFIX};
use crate::store::{NewRootKey, Store};
use crate::time::now_ms;

pub async fn serve(config: Config) -> anyhow::Result<()> {
    let store = Store::open(&config.database).await?;
    let edge = Arc::new(EdgeClient::from_config(&config)?);
    bootstrap(&store, std::env::var("KEYWARD_ROOT_KEY").ok()).await?;
    sync_root_keys(&store, &edge).await?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}; set `listen` or KEYWARD_LISTEN", config.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, database = %config.database.display(), regions = config.regions.len(), "keyward serving");
    println!("keyward listening on http://{addr}");
    let state = AppState::new(store.clone(), edge);
    state.delivery.clone().spawn_retrier();
    axum::serve(listener, app(state)).with_graceful_shutdown(shutdown_signal()).await?;
    store.close().await;
    Ok(())
}

/// On an empty database, creates the first workspace and a root key with every scope: the one
/// in `KEYWARD_ROOT_KEY` if set, otherwise a new one printed once to the terminal.
pub async fn bootstrap(store: &Store, given: Option<String>) -> anyhow::Result<()> {
    if store.workspace_count().await? > 0 {
        return Ok(());
    }
    let (key, generated) = match given {
        Some(text) => (Key::parse(text.trim()).context("KEYWARD_ROOT_KEY is not a well-formed Keyward key")?, false),
        None => (keygen::generate(ROOT_KEY_PREFIX)?, true),
    };
    let workspace_id = new_id("ws");
    let scopes = Scopes(Scope::all(true));
    let root = NewRootKey {
        id: &new_id("root"),
        workspace_id: &workspace_id,
        name: "bootstrap",
        hash: &key.hash(),
        start: key.start(),
        scopes: &scopes,
        now: now_ms(),
    };
    // No outbox entry: the start-up sync writes every active root key to KV.
    store.create_workspace(&workspace_id, "default", root, None).await?;
    tracing::info!(workspace = %workspace_id, root_key = key.start(), "created the first workspace and root key");
    if generated {
        // Printed once, straight to the terminal, never through the log.
        println!("\nFirst root key (shown once, store it now): {}\n", key.expose());
    }
    Ok(())
}

/// Writes every active root key that may verify to the authority and to every region's KV, so
/// a region whose KV was wiped learns its callers again, and the edge can confirm each with the
/// authority at once (KV writes to a far region may lag). A failure is logged: the edge then
/// refuses the callers it cannot confirm, and the next start tries again.
async fn sync_root_keys(store: &Store, edge: &EdgeClient) -> anyhow::Result<()> {
    let active: Vec<_> = store
        .root_keys()
        .await?
        .into_iter()
        .filter(|r| r.status == keyward_shared::KeyStatus::Active && crate::http::publishes_root_key(&r.scopes))
        .collect();
    if let Err(e) = edge.update_authority(&[], &active).await {
        tracing::error!(error = %error_text(&e), "cannot write root keys to the authority at start-up");
    }
    for record in &active {
        for report in crate::http::publish_root_key(edge, record).await.map_err(|e| anyhow::anyhow!("{e}"))? {
            if let Some(error) = report.error {
                tracing::error!(region = %report.name, %error, "cannot write a root key to KV at start-up");
            }
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}
