//! Delivering outbox entries: the authority update, each region's KV write, each region's purge.
//!
//! The request that made a change delivers its entry at once and answers with the result; what
//! fails stays pending and a background retrier tries it again with backoff, also after a
//! restart (a crash between commit and answer is finished without anyone calling again). A region
//! that was down receives every purge it missed when it returns. One process never delivers the
//! same entry twice at once.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::join_all;
use keyward_shared::KeyRecord;
use serde::Serialize;
use tokio::sync::Notify;

use crate::edge::{Edge, RegionReport};
use crate::store::{Delivery, Store};
use crate::time::now_ms;

/// The first retry waits this long; each further one twice as long, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the retrier looks for due deliveries when nothing wakes it.
const RETRY_TICK: Duration = Duration::from_millis(250);
/// A new entry is left to the request that made it for this long before the retrier may take it.
pub const HANDOFF: Duration = Duration::from_secs(5);

/// The targets of a change: the authority (when configured), every region's KV, and, for a
/// tightening change, every region's purge.
pub fn targets(edge: &Edge, tightening: bool) -> Vec<String> {
    let mut targets = Vec::new();
    if edge.has_authority() {
        targets.push("authority".to_owned());
    }
    for region in &edge.regions {
        targets.push(format!("kv:{}", region.name));
        if tightening {
            targets.push(format!("purge:{}", region.name));
        }
    }
    targets
}

/// How the authority update went.
#[derive(Debug, Clone, Serialize)]
pub struct AuthorityReport {
    pub acknowledged: bool,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The outcome of delivering one entry.
#[derive(Debug, Clone, Serialize)]
pub struct Delivered {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<AuthorityReport>,
    pub regions: Vec<RegionReport>,
}

pub struct Deliverer {
    store: Store,
    edge: Arc<Edge>,
    in_flight: Mutex<HashSet<i64>>,
    wake: Notify,
}

/// Releases an entry's claim when dropped.
struct Claim<'a> {
    deliverer: &'a Deliverer,
    id: i64,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.deliverer.in_flight.lock().expect("not poisoned").remove(&self.id);
    }
}

impl Deliverer {
    pub fn new(store: Store, edge: Arc<Edge>) -> Deliverer {
        Deliverer { store, edge, in_flight: Mutex::new(HashSet::new()), wake: Notify::new() }
    }

    pub fn edge(&self) -> &Edge {
        &self.edge
    }

    fn try_claim(&self, id: i64) -> Option<Claim<'_>> {
        self.in_flight.lock().expect("not poisoned").insert(id).then_some(Claim { deliverer: self, id })
    }

    /// Delivers an entry's pending targets now, waiting for a delivery of it already under way.
    pub async fn deliver(&self, id: i64) -> anyhow::Result<Delivered> {
        let claim = loop {
            if let Some(claim) = self.try_claim(id) {
                break claim;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let result = self.deliver_claimed(id).await;
        drop(claim);
        result
    }

    async fn deliver_claimed(&self, id: i64) -> anyhow::Result<Delivered> {
        let (entry, deliveries) = self.store.outbox_entry(id).await?.context("no such outbox entry")?;
        let record = KeyRecord::from_json(&entry.record).context("outbox record")?;
        let find = |target: &str| deliveries.iter().find(|d| d.target == target);
        let started = Instant::now();

        let authority = match find("authority") {
            None => None,
            Some(d) if d.state != "pending" => {
                Some(AuthorityReport { acknowledged: d.state == "done", latency_ms: 0.0, error: None })
            }
            Some(d) => {
                let result = self.edge.update_authority(std::slice::from_ref(&record)).await;
                self.attempted(d, &result).await?;
                Some(AuthorityReport {
                    acknowledged: result.is_ok(),
                    latency_ms: started.elapsed().as_secs_f64() * 1e3,
                    error: result.err().map(|e| format!("{e:#}")),
                })
            }
        };

        let regions = join_all(self.edge.regions.iter().map(|region| async {
            let mut report = RegionReport {
                name: region.name.clone(),
                kv_written: false,
                acknowledged: None,
                latency_ms: 0.0,
                error: None,
            };
            match find(&format!("kv:{}", region.name)) {
                Some(d) if d.state == "pending" => {
                    let result = region.kv.put(&entry.kv_key, entry.record.clone()).await;
                    self.attempted(d, &result).await?;
                    report.kv_written = result.is_ok();
                    report.error = result.err().map(|e| format!("{e:#}"));
                }
                Some(d) => report.kv_written = d.state == "done",
                None => {}
            }
            match find(&format!("purge:{}", region.name)) {
                Some(d) if d.state == "pending" => {
                    let result = self.edge.purge(region, &[record.hash]).await;
                    self.attempted(d, &result).await?;
                    report.acknowledged = Some(result.is_ok());
                    if let Err(e) = result {
                        report.error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
                Some(d) => report.acknowledged = Some(d.state == "done"),
                None => {}
            }
            report.latency_ms = started.elapsed().as_secs_f64() * 1e3;
            anyhow::Ok(report)
        }))
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Delivered { authority, regions })
    }

    async fn attempted(&self, delivery: &Delivery, result: &anyhow::Result<()>) -> anyhow::Result<()> {
        let now = now_ms();
        let backoff = FIRST_BACKOFF.saturating_mul(1 << delivery.attempts.clamp(0, 16)).min(MAX_BACKOFF);
        let error = result.as_ref().err().map(|e| format!("{e:#}"));
        if let Some(error) = &error {
            tracing::warn!(outbox = delivery.outbox_id, target = %delivery.target, attempts = delivery.attempts + 1, %error, "delivery failed; will retry");
        }
        self.store
            .delivery_attempted(
                delivery.outbox_id,
                &delivery.target,
                error.as_deref().map_or(Ok(()), Err),
                now,
                now + backoff.as_millis() as i64,
            )
            .await?;
        Ok(())
    }

    /// Makes the retrier look now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Retries due deliveries until the process ends. At start, everything pending is due.
    pub fn spawn_retrier(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            match self.store.retry_all_now(now_ms()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(pending = n, "finishing deliveries left pending by the last run"),
                Err(e) => tracing::error!(error = %e, "cannot read the outbox"),
            }
            loop {
                let ids = match self.store.due_outbox_ids(now_ms(), 32).await {
                    Ok(ids) => ids,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the outbox");
                        Vec::new()
                    }
                };
                let claimed: Vec<_> = ids.into_iter().filter_map(|id| self.try_claim(id)).collect();
                join_all(claimed.iter().map(|claim| async {
                    if let Err(e) = self.deliver_claimed(claim.id).await {
                        tracing::error!(outbox = claim.id, error = %e, "delivery failed");
                    }
                }))
                .await;
                drop(claimed);
                tokio::select! {
                    () = tokio::time::sleep(RETRY_TICK) => {}
                    () = self.wake.notified() => {}
                }
            }
        })
    }
}
