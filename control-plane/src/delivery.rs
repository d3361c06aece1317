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

use crate::edge::{Edge, KvState, RegionReport};
use crate::store::{Attempt, Delivery, NewOutbox, Store};
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

/// The targets of a root key's change: every region's KV (the edge reads root keys there).
pub fn kv_targets(edge: &Edge) -> Vec<String> {
    edge.regions.iter().map(|region| format!("kv:{}", region.name)).collect()
}

/// An outbox entry for `targets`, left to the request that makes it for [`HANDOFF`].
pub fn new_outbox(targets: &[String], tightening: bool, now: i64) -> NewOutbox<'_> {
    NewOutbox { targets, tightening, now, first_retry_at: now + HANDOFF.as_millis() as i64 }
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

fn is_pending(delivery: Option<&Delivery>) -> bool {
    delivery.is_some_and(|d| d.state == "pending")
}

/// Which pending targets a delivery attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// What puts the change in force: the authority, the purges, and the KV writes of a change
    /// that needs no purge.
    InForce,
    /// The KV writes a tightening change's answer did not wait for.
    KvAfterAnswer,
    /// Everything pending (the retrier).
    All,
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

    /// Delivers an entry's pending targets now, waiting for a delivery of it already under way,
    /// and answers once the change is in force: the authority has it and every region has
    /// acknowledged its purge (or failed to). The KV writes of a tightening change follow at
    /// once, after the answer: nothing reads KV without the authority beside it, so they cannot
    /// make the key valid again, and on 2 cores they would slow the purges down.
    pub async fn deliver(self: &Arc<Self>, id: i64) -> anyhow::Result<Delivered> {
        let claim = self.claim(id).await;
        let delivered = self.deliver_claimed(id, Pass::InForce).await;
        drop(claim);
        if delivered.as_ref().is_ok_and(|d| d.regions.iter().any(|r| r.kv == KvState::Pending)) {
            let this = self.clone();
            tokio::spawn(async move {
                let _claim = this.claim(id).await;
                if let Err(e) = this.deliver_claimed(id, Pass::KvAfterAnswer).await {
                    tracing::error!(outbox = id, error = %e, "delivery failed");
                }
            });
        }
        delivered
    }

    async fn claim(&self, id: i64) -> Claim<'_> {
        loop {
            if let Some(claim) = self.try_claim(id) {
                return claim;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The authority update and every signed region's purge run at once: a signed purge carries
    /// the record, so the region rejects the key without a refill. A purge-by-tag only drops
    /// Cache API copies, so it waits for the authority to have the record (KV lags by up to
    /// 60 s): the refill that follows is then sure to find it. KV writes run alongside, except
    /// those of a tightening change in the pass that puts it in force: they get a pass of their
    /// own right after.
    /// Outcomes are recorded together in one transaction.
    async fn deliver_claimed(&self, id: i64, pass: Pass) -> anyhow::Result<Delivered> {
        let (entry, deliveries) = self.store.outbox_entry(id).await?.context("no such outbox entry")?;
        let find = |target: &str| deliveries.iter().find(|d| d.target == target);
        // The authority and purges need the key's record; a root key's entry has KV writes only.
        let record = if deliveries.iter().any(|d| d.target == "authority" || d.target.starts_with("purge:")) {
            Some(KeyRecord::from_json(&entry.record).context("outbox record")?)
        } else {
            None
        };
        let tightening = deliveries.iter().any(|d| d.target.starts_with("purge:"));
        let kv_now = pass != Pass::InForce || !tightening;
        let in_force_now = pass != Pass::KvAfterAnswer;
        let started = Instant::now();
        let elapsed_ms = || started.elapsed().as_secs_f64() * 1e3;

        let authority_delivery = find("authority");
        let authority = async {
            let record = record.as_ref().filter(|_| in_force_now && is_pending(authority_delivery))?;
            let result = self.edge.update_authority(std::slice::from_ref(record)).await;
            Some((result.map_err(|e| format!("{e:#}")), elapsed_ms()))
        }
        .shared();
        let (entry, record) = (&entry, &record);
        let regions = join_all(self.edge.regions.iter().map(|region| {
            let authority = authority.clone();
            let (kv, purge) = (find(&format!("kv:{}", region.name)), find(&format!("purge:{}", region.name)));
            async move {
                let kv_write = async {
                    if !kv_now || !is_pending(kv) {
                        return None;
                    }
                    let result = region.kv.put(&entry.kv_key, entry.record.clone()).await;
                    Some((result.map_err(|e| format!("{e:#}")), elapsed_ms()))
                };
                let purge_send = async {
                    let record = record.as_ref().filter(|_| in_force_now && is_pending(purge))?;
                    if !region.purge_carries_record() {
                        authority.await;
                    }
                    let result = self.edge.purge(region, std::slice::from_ref(record)).await;
                    Some((result.map_err(|e| format!("{e:#}")), elapsed_ms()))
                };
                let (kv_result, purge_result) = futures::join!(kv_write, purge_send);
                // The purge's acknowledgement is what the caller waits for; without one, the KV write.
                let latency_ms = purge_result.as_ref().map(|(_, ms)| *ms).or(kv_result.as_ref().map(|(_, ms)| *ms));
                let latency_ms = latency_ms.unwrap_or(0.0);
                let applied_at_ms = purge_result.as_ref().and_then(|(r, _)| r.as_ref().ok().copied().flatten());
                let kv_result = kv_result.map(|(r, _)| r);
                let purge_result = purge_result.map(|(r, _)| r.map(|_| ()));
                let report = RegionReport {
                    name: region.name.clone(),
                    kv: match (&kv_result, kv) {
                        (Some(Ok(())), _) => KvState::Written,
                        (Some(Err(_)), _) => KvState::Failed,
                        (None, kv) if is_pending(kv) => KvState::Pending,
                        (None, Some(d)) if d.state == "superseded" => KvState::Superseded,
                        (None, _) => KvState::Written,
                    },
                    acknowledged: purge_result.as_ref().map(Result::is_ok).or_else(|| purge.map(|d| d.state == "done")),
                    latency_ms,
                    applied_at_ms,
                    ack_means: purge.map(|_| region.ack_means()),
                    error: [&kv_result, &purge_result].into_iter().flatten().find_map(|r| r.clone().err()),
                };
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
                    if let Err(e) = self.deliver_claimed(claim.id, Pass::All).await {
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
