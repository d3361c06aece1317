//! `/metrics` in Prometheus' text format, on an operator address of its own (`metrics_listen`,
//! default `127.0.0.1:9090`), never on the public admin API. No metric has a per-workspace label.
//!
//! Counters and histograms are updated where things happen (ingestion, delivery); the outbox's
//! pending deliveries and the usage losses are read from the database at each scrape, so they
//! are never stale.

use std::net::SocketAddr;
use std::sync::LazyLock;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, TextEncoder, histogram_opts, opts,
    register_histogram_vec, register_int_counter, register_int_counter_vec, register_int_gauge_vec,
};
use tokio::net::TcpListener;

use crate::http::AppState;
use crate::store::usage::RAW_RETENTION_MS;
use crate::time::now_ms;

pub static VERIFICATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        opts!("keyward_verifications_total", "Verifications stored, by outcome code and region."),
        &["outcome", "region"]
    )
    .expect("registered once")
});

pub static INGESTION_LAG: LazyLock<HistogramVec> = LazyLock::new(|| {
    let buckets = vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0];
    register_histogram_vec!(
        histogram_opts!(
            "keyward_usage_ingestion_lag_seconds",
            "From a verification's decision to its storage, by region.",
            buckets
        ),
        &["region"]
    )
    .expect("registered once")
});

pub static DUPLICATE_BATCHES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "keyward_usage_duplicate_batches_total",
        "Usage batches received again (a retry whose first copy had been stored): acknowledged, not stored twice."
    )
    .expect("registered once")
});

pub static USAGE_LOSSES: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        opts!(
            "keyward_usage_losses",
            "Usage events lost over the raw retention, by region and kind: lost (exact, from missing batches), \
             dropped (full buffers), possibly_lost (held by holders gone silent, at most)."
        ),
        &["region", "kind"]
    )
    .expect("registered once")
});

pub static OUTBOX_PENDING: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        opts!("keyward_outbox_pending", "Deliveries pending, by target (authority, kv:<region>, purge:<region>)."),
        &["target"]
    )
    .expect("registered once")
});

pub static DELIVERY_LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    let buckets = vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
    register_histogram_vec!(
        histogram_opts!(
            "keyward_delivery_latency_seconds",
            "From the start of a delivery pass to a target's acknowledgement, by target.",
            buckets
        ),
        &["target"]
    )
    .expect("registered once")
});

pub static DELIVERY_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        opts!("keyward_delivery_failures_total", "Failed delivery attempts, by target."),
        &["target"]
    )
    .expect("registered once")
});

pub static PROOF_VIOLATIONS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "keyward_proof_violations_total",
        "VALID answers past the promise's bound found by revocation proofs (a proof computed twice counts twice)."
    )
    .expect("registered once")
});

pub static KV_WRITE_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!("keyward_kv_write_errors_total", "Failed Workers KV writes, every region together.")
        .expect("registered once")
});

/// Listens on `addr` and answers `GET /metrics` until the process ends.
pub async fn serve(addr: SocketAddr, state: AppState) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen for metrics on {addr}; set metrics_listen (or KEYWARD_METRICS_LISTEN) to a free address")
    })?;
    let bound = listener.local_addr()?;
    let app = Router::new().route("/metrics", get(metrics)).with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics listener stopped");
        }
    });
    Ok(bound)
}

async fn metrics(State(state): State<AppState>) -> axum::response::Response {
    if let Err(e) = refresh(&state).await {
        tracing::warn!(error = %e, "cannot read the outbox or usage losses for /metrics");
    }
    let mut body = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&prometheus::gather(), &mut body) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    ([(CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response()
}

/// Reads the gauges that come from the database.
async fn refresh(state: &AppState) -> anyhow::Result<()> {
    let now = now_ms();
    let stuck_before = state.delivery.settings().stuck_before(now);
    OUTBOX_PENDING.reset();
    for health in state.store.delivery_health(None, stuck_before).await? {
        OUTBOX_PENDING.with_label_values(&[health.target.to_string().as_str()]).set(health.pending);
    }
    USAGE_LOSSES.reset();
    for (region, losses) in state.store.usage_losses(now - RAW_RETENTION_MS, now).await? {
        let kinds = [
            ("lost", losses.lost_events),
            ("dropped", losses.dropped_events),
            ("possibly_lost", losses.possibly_lost_events),
        ];
        for (kind, count) in kinds {
            USAGE_LOSSES.with_label_values(&[region.as_str(), kind]).set(count);
        }
    }
    Ok(())
}
