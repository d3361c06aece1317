//! Usage events at the control plane: ingestion of the edge's signed batches, and the origin's
//! own verifications, which go through the same numbered batches (holder `origin-<id>`) straight
//! to the store.
//!
//! A batch is checked before anything is stored: its signature, timestamp and nonce (a nonce is
//! remembered for longer than a timestamp stays acceptable, so a captured batch cannot be
//! replayed), then its size and fields. A batch whose holder and number were stored before is
//! acknowledged again without being stored again, which is what makes a retry safe.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use keyward_shared::internal::{self, MAX_SKEW_MS, SignatureError, SignedHeaders};
use keyward_shared::usage::{MAX_BATCH_EVENTS, MAX_ID as MAX_FIELD, UsageAck, UsageBatch, UsageBuffer, UsageEvent};

use crate::config::Secret;
use crate::keygen::new_id;
use crate::metrics;
use crate::store::{Store, StoreError};
use crate::time::now_ms;

/// How long a nonce is remembered: past this its timestamp is refused anyway.
const NONCE_MEMORY_MS: i64 = 2 * MAX_SKEW_MS + 1_000;
/// The most nonces remembered at once; past this, signed batches are refused (and retried by
/// their holders) until old ones expire. Each holder sends one batch per 2 s at most when idle.
const MAX_NONCES: usize = 200_000;
/// How often events past their retention are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3_600);
/// How often the origin's own events are looked at for shipping.
const ORIGIN_TICK: Duration = Duration::from_millis(500);

/// Why a batch was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("usage ingestion is off: this control plane has no purge_secret to check batches with")]
    NoSecret,
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("too many batches at once; retry")]
    Busy,
    #[error("invalid usage batch: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct UsageLog {
    store: Store,
    secret: Option<Secret>,
    nonces: Mutex<HashMap<String, i64>>,
    origin: Mutex<UsageBuffer>,
}

impl UsageLog {
    /// `secret` checks the edge's batches; without one (or one too short to sign with),
    /// ingestion answers that it is off, and the origin's own events are still stored.
    pub fn new(store: Store, secret: Option<Secret>) -> UsageLog {
        let secret = secret.filter(|s| s.expose().len() >= internal::MIN_SECRET_BYTES);
        let origin = UsageBuffer::new(format!("origin-{}", new_id("h")), "origin".into(), now_ms() as u64);
        UsageLog { store, secret, nonces: Mutex::default(), origin: Mutex::new(origin) }
    }

    /// Checks a signed batch (`body` as received) and stores it once.
    pub async fn ingest_signed(
        &self,
        path: &str,
        headers: SignedHeaders<'_>,
        body: &[u8],
    ) -> Result<UsageAck, IngestError> {
        let secret = self.secret.as_ref().ok_or(IngestError::NoSecret)?;
        let now = now_ms();
        internal::verify(secret.expose().as_bytes(), "POST", path, headers, body, now)?;
        self.first_use(headers.nonce, now)?;
        let batch: UsageBatch = serde_json::from_slice(body).map_err(|e| IngestError::Invalid(e.to_string()))?;
        self.ingest(&batch, now).await
    }

    /// Stores a batch once; a batch seen before is acknowledged as a duplicate.
    pub async fn ingest(&self, batch: &UsageBatch, now: i64) -> Result<UsageAck, IngestError> {
        check(batch).map_err(IngestError::Invalid)?;
        let duplicate = self.store.ingest_usage(batch, now).await?;
        if duplicate {
            metrics::DUPLICATE_BATCHES.inc();
            tracing::info!(holder = %batch.holder, seq = batch.seq, "usage batch received again: acknowledged, not stored twice");
        } else {
            for e in &batch.events {
                let code = crate::store::usage::code_name(e.code);
                metrics::VERIFICATIONS.with_label_values(&[code.as_str(), e.region.as_str()]).inc();
                let lag_ms = (now - e.at_ms as i64).max(0);
                metrics::INGESTION_LAG.with_label_values(&[batch.region.as_str()]).observe(lag_ms as f64 / 1e3);
            }
        }
        Ok(UsageAck { seq: batch.seq, duplicate })
    }

    /// Records one of the origin's own verifications, to be shipped with the next batch.
    pub fn record(&self, event: UsageEvent) {
        self.origin.lock().expect("not poisoned").push(event);
    }

    /// Ships the origin's events as they come due, and prunes events past their retention
    /// every [`PRUNE_EVERY`], until the process ends.
    pub fn spawn_upkeep(self: std::sync::Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ORIGIN_TICK);
            let mut pruned_at: Option<std::time::Instant> = None;
            loop {
                tick.tick().await;
                self.ship_origin().await;
                if pruned_at.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                    pruned_at = Some(std::time::Instant::now());
                    match self.store.prune_usage(now_ms()).await {
                        Ok(0) => {}
                        Ok(pruned) => tracing::info!(pruned, "usage events past retention deleted"),
                        Err(e) => tracing::warn!(error = %e, "cannot prune usage events; will try again"),
                    }
                }
            }
        })
    }

    /// Stores the origin's batch if one is due. A batch that fails stays and is tried again.
    pub async fn ship_origin(&self) {
        let _ = self.ship_origin_batch(false).await;
    }

    /// Stores every event the origin holds now (at shutdown, and for tests). Answers whether
    /// all were stored.
    pub async fn flush_origin(&self) -> bool {
        loop {
            match self.ship_origin_batch(true).await {
                Some(true) => continue,
                Some(false) => return false,
                None => return true,
            }
        }
    }

    /// Ships one batch of the origin's events (due or not, when `now_anyway`): `None` when
    /// there was none to ship, else whether it was stored.
    async fn ship_origin_batch(&self, now_anyway: bool) -> Option<bool> {
        let now = now_ms();
        let batch = {
            let mut buffer = self.origin.lock().expect("not poisoned");
            if !now_anyway && !buffer.due(now as u64) {
                return None;
            }
            buffer.batch(now as u64)?
        };
        match self.ingest(&batch, now).await {
            Ok(ack) => {
                self.origin.lock().expect("not poisoned").acknowledged(ack.seq, now_ms() as u64);
                Some(true)
            }
            Err(IngestError::Invalid(why)) => {
                // Sending it again cannot help: it is given up, and counted as missing.
                tracing::error!(seq = batch.seq, %why, "the origin's usage batch is invalid; given up");
                self.origin.lock().expect("not poisoned").abandon(batch.seq, now_ms() as u64);
                Some(true)
            }
            Err(e) => {
                tracing::warn!(error = %e, seq = batch.seq, "cannot store the origin's usage batch; will retry");
                Some(false)
            }
        }
    }

    /// Notes a nonce, refusing one already used. Expired nonces are forgotten first.
    fn first_use(&self, nonce: &str, now: i64) -> Result<(), IngestError> {
        let mut nonces = self.nonces.lock().expect("not poisoned");
        if nonces.len() >= MAX_NONCES / 2 {
            nonces.retain(|_, expires| *expires > now);
        }
        if nonces.len() >= MAX_NONCES {
            return Err(IngestError::Busy);
        }
        if nonces.insert(nonce.to_owned(), now + NONCE_MEMORY_MS).is_some() {
            return Err(SignatureError::Replayed.into());
        }
        Ok(())
    }
}

/// Refuses a batch larger than a holder sends, or with fields out of bounds.
fn check(batch: &UsageBatch) -> Result<(), String> {
    if batch.seq == 0 {
        return Err("seq starts at 1".into());
    }
    if batch.events.len() > MAX_BATCH_EVENTS {
        return Err(format!("a batch carries at most {MAX_BATCH_EVENTS} events"));
    }
    let short = |name: &str, text: &str| {
        if text.is_empty() || text.chars().count() > MAX_FIELD {
            Err(format!("{name} must be 1 to {MAX_FIELD} characters"))
        } else {
            Ok(())
        }
    };
    short("holder", &batch.holder)?;
    short("region", &batch.region)?;
    for e in &batch.events {
        short("request_id", &e.request_id)?;
        short("workspace_id", &e.workspace_id)?;
        short("region", &e.region)?;
        for (name, value) in [("api_id", &e.api_id), ("key_id", &e.key_id), ("caller_ip", &e.caller_ip)] {
            if let Some(value) = value {
                short(name, value)?;
            }
        }
        if e.user_agent.as_ref().is_some_and(|ua| ua.chars().count() > keyward_shared::usage::MAX_USER_AGENT) {
            return Err("user_agent is too long".into());
        }
        if let Some(client) = &e.client {
            client.check()?;
        }
    }
    Ok(())
}
