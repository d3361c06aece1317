//! `keyward serve`: open the database, make the first workspace and root key on an empty one,
//! send verify-capable root keys to the authority and every region's KV through the outbox
//! (waiting at most 5 s; the retrier finishes what is left), and answer HTTP until SIGTERM or
//! Ctrl-C.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use keyward_shared::Key;
use tokio::net::TcpListener;

use crate::change;
use crate::config::Config;
use crate::edge_client::EdgeClient;
use crate::http::{AppState, app};
use crate::keygen::{self, ROOT_KEY_PREFIX};
use crate::store::Store;

pub async fn serve(config: Config) -> anyhow::Result<()> {
    let metrics_addr = config.metrics_addr()?;
    let store = Store::open(&config.database).await?;
    let store = match config.audit_key() {
        Some(key) => store.with_audit_key(key),
        None => {
            tracing::warn!(
                "no audit_secret or purge_secret: the audit log is chained without a secret, so anyone with the database can rewrite it"
            );
            store
        }
    };
    let edge = Arc::new(EdgeClient::from_config(&config)?);
    edge.check().await?;
    bootstrap(&store, std::env::var("KEYWARD_ROOT_KEY").ok()).await?;
    let state = AppState::with_outbox(store.clone(), edge, config.outbox).with_event_limits(config.events);
    let queued = state.change.publish_root_keys().await?;
    tracing::info!(root_keys = queued.len(), "root keys sent to the edge through the outbox");
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}; set `listen` or KEYWARD_LISTEN", config.listen))?;
    let addr = listener.local_addr()?;
    if let Some(metrics_addr) = metrics_addr {
        let bound = crate::metrics::serve(metrics_addr, state.clone()).await?;
        println!("keyward metrics on http://{bound}/metrics");
    }
    tracing::info!(%addr, database = %config.database.display(), regions = config.regions.len(), "keyward serving");
    println!("keyward listening on http://{addr}");
    state.delivery.clone().spawn_retrier();
    state.usage.clone().spawn_upkeep();
    spawn_checkpoints(store.clone());
    // With connection info, so that each change records the address it came from.
    let usage = state.usage.clone();
    let service = app(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, service).with_graceful_shutdown(shutdown_signal()).await?;
    if !usage.flush_origin().await {
        tracing::error!("the origin's last usage events could not be stored; they are lost");
    }
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
    let minted = change::mint_first_root_key(store, key).await?;
    tracing::info!(workspace = %minted.workspace_id, root_key = minted.key.start(), "created the first workspace and root key");
    if generated {
        // Printed once, straight to the terminal, never through the log.
        println!("\nFirst root key (shown once, store it now): {}\n", minted.key.expose());
    }
    Ok(())
}

/// Logs the audit chain's signed head every hour, so that a copy lives outside the database.
fn spawn_checkpoints(store: Store) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(3_600));
        loop {
            every.tick().await;
            match store.audit_checkpoint(crate::time::now_ms()).await {
                Ok(Some(cp)) => tracing::info!(
                    id = cp.id, mac = %cp.mac, at_ms = cp.at_ms, signature = %cp.signature, "audit checkpoint"
                ),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the audit log's head"),
            }
        }
    });
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
