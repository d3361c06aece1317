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
use futures::FutureExt;
use futures::future::join_all;
use keyward_shared::KeyRecord;
use serde::Serialize;
use tokio::sync::Notify;

use crate::edge::{Edge, RegionReport};
use crate::store::{Attempt, Delivery, Store};
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

    /// The authority update and every region's KV write run at once. Each region's purge
    /// follows as soon as a refill there is sure to find the new record: right after its KV
    /// write where that KV is read-your-writes (a local region's own), otherwise once the
    /// authority has the record too (Cloudflare's KV lags by up to 60 s).
    /// Outcomes are recorded together in one transaction.
    async fn deliver_claimed(&self, id: i64) -> anyhow::Result<Delivered> {
        let (entry, deliveries) = self.store.outbox_entry(id).await?.context("no such outbox entry")?;
        let record = KeyRecord::from_json(&entry.record).context("outbox record")?;
        let find = |target: &str| deliveries.iter().find(|d| d.target == target);
        let started = Instant::now();
        let elapsed_ms = || started.elapsed().as_secs_f64() * 1e3;

        let authority_delivery = find("authority");
        let authority = async {
            match authority_delivery {
                Some(d) if d.state == "pending" => {
                    let result = self.edge.update_authority(std::slice::from_ref(&record)).await;
                    Some((result.map_err(|e| format!("{e:#}")), elapsed_ms()))
                }
                _ => None,
            }
        }
        .shared();
        let (entry, record) = (&entry, &record);
        let regions = join_all(self.edge.regions.iter().map(|region| {
            let authority = authority.clone();
            let (kv, purge) = (find(&format!("kv:{}", region.name)), find(&format!("purge:{}", region.name)));
            async move {
                let kv_result = match kv {
                    Some(d) if d.state == "pending" => {
                        Some(region.kv.put(&entry.kv_key, entry.record.clone()).await.map_err(|e| format!("{e:#}")))
                    }
                    _ => None,
                };
                let refill_sees_kv = region.kv.visible_at_once() && kv_result.as_ref().is_some_and(Result::is_ok);
                if !refill_sees_kv {
                    authority.await;
                }
                let purge_result = match purge {
                    Some(d) if d.state == "pending" => {
                        Some(self.edge.purge(region, &[record.hash]).await.map_err(|e| format!("{e:#}")))
                    }
                    _ => None,
                };
                let mut report = RegionReport {
                    name: region.name.clone(),
                    kv_written: kv_result.as_ref().map_or(kv.is_some_and(|d| d.state == "done"), Result::is_ok),
                    acknowledged: purge_result.as_ref().map(Result::is_ok).or_else(|| purge.map(|d| d.state == "done")),
                    latency_ms: elapsed_ms(),
                    ack_means: purge.map(|_| region.ack_means()),
                    error: None,
                };
                report.error = [&kv_result, &purge_result].into_iter().flatten().find_map(|r| r.clone().err());
                (report, [(kv, kv_result), (purge, purge_result)])
            }
        }));
        let (authority_result, regions) = futures::join!(authority, regions);

        let mut outcomes = Vec::new();
        let authority = match (authority_delivery, authority_result) {
            (Some(d), Some((result, latency_ms))) => {
                outcomes.push((d, result.clone()));
                Some(AuthorityReport { acknowledged: result.is_ok(), latency_ms, error: result.err() })
            }
            (Some(d), None) => Some(AuthorityReport { acknowledged: d.state == "done", latency_ms: 0.0, error: None }),
            (None, _) => None,
        };
        let mut reports = Vec::new();
        for (report, results) in regions {
            for (delivery, result) in results {
                if let (Some(d), Some(result)) = (delivery, result) {
                    outcomes.push((d, result));
                }
            }
            reports.push(report);
        }
        self.record(&outcomes).await?;
        Ok(Delivered { authority, regions: reports })
    }

    /// Records attempts in one transaction; a failure is retried with backoff.
    async fn record(&self, outcomes: &[(&Delivery, Result<(), String>)]) -> anyhow::Result<()> {
        let now = now_ms();
        let rows: Vec<Attempt> = outcomes
            .iter()
            .map(|(d, result)| {
                if let Err(error) = result {
                    tracing::warn!(outbox = d.outbox_id, target = %d.target, attempts = d.attempts + 1, %error, "delivery failed; will retry");
                }
                let backoff = FIRST_BACKOFF.saturating_mul(1 << d.attempts.clamp(0, 16)).min(MAX_BACKOFF);
                Attempt {
                    outbox_id: d.outbox_id,
                    target: d.target.clone(),
                    error: result.clone().err(),
                    retry_at: now + backoff.as_millis() as i64,
                }
            })
            .collect();
        self.store.deliveries_attempted(&rows, now).await?;
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
