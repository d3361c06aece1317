//! Delivering outbox entries: the authority update, each region's KV write, each region's purge.
//!
//! The request that made a change delivers its entry at once and answers with the result; what
//! fails stays pending and a background retrier tries it again with backoff, also after a
//! restart (a crash between commit and answer is finished without anyone calling again). A region
//! that was down receives every purge it missed when it returns. One process never delivers the
//! same entry twice at once, and a delivery once started runs to its end even if its caller
//! stops waiting (a client that disconnects).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared, join_all};
use keyward_shared::{KeyRecord, RootKeyRecord};
use serde::Serialize;
use tokio::sync::Notify;

use crate::edge_client::{EdgeClient, EdgeError, EdgeRegion};
use crate::kv::KvError;
use crate::store::{AttemptOutcome, Delivery, DeliveryState, EntryKind, NewOutbox, OutboxEntry, Store, Target};
use crate::time::now_ms;

/// The first retry waits this long; each further one twice as long, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the retrier looks for due deliveries.
const RETRY_TICK: Duration = Duration::from_millis(250);
/// A new entry is left to the request that made it for this long before the retrier may take it.
pub const HANDOFF: Duration = Duration::from_secs(5);

/// Where a change's KV write in one region stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvState {
    Written,
    /// Not attempted yet: a tightening change's KV writes follow its answer.
    Pending,
    /// Attempted and failed; retried with backoff.
    Failed,
    /// Left to a newer change of the same key, which carries the newer record.
    Superseded,
}

/// What happened in one region when a change was pushed.
#[derive(Debug, Clone, Serialize)]
pub struct RegionReport {
    pub name: String,
    pub kv: KvState,
    /// Whether the region accepted the purge; `None` when no purge was sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acknowledged: Option<bool>,
    /// From the start of this delivery to this region's purge acknowledgement (or failure);
    /// without a purge, to its KV write.
    pub latency_ms: f64,
    /// When the region began answering from the new record, by its clock (Unix ms); only
    /// regions purged through their signed route report it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied_at_ms: Option<u64>,
    /// What `acknowledged` means for this region.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_means: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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

/// Why one delivery failed; recorded as text (with its causes, [`error_text`]) in its row.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("authority update")]
    Authority(#[source] EdgeError),
    #[error("purge")]
    Purge(#[source] EdgeError),
    #[error("KV write")]
    Kv(#[source] KvError),
}

/// An error and its causes, one after another, as recorded in the outbox and answered in reports.
pub fn error_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        text = format!("{text}: {error}");
        cause = error.source();
    }
    text
}

fn is_pending(delivery: Option<&Delivery>) -> bool {
    delivery.is_some_and(Delivery::is_pending)
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

/// An attempt's result, and its time from the start of the pass in milliseconds.
type Attempted<T> = (Result<T, String>, f64);

/// A delivery and the result of this pass's attempt at it (`None`: not attempted), to record.
type Outcome<'a> = (Option<&'a Delivery>, Option<Result<(), String>>);

/// What one pass over an entry works from, shared by its regions.
struct PassPlan<'a> {
    entry: &'a OutboxEntry,
    deliveries: &'a [Delivery],
    /// The key's record; `None` for a root key's entry.
    record: Option<&'a KeyRecord>,
    /// Whether this pass writes KV.
    kv_now: bool,
    /// Whether this pass attempts what puts the change in force: the authority and the purges.
    in_force_now: bool,
    started: Instant,
    authority_delivery: Option<&'a Delivery>,
    /// This pass's authority update; `None` when it makes none.
    authority: Shared<BoxFuture<'a, Option<Attempted<()>>>>,
}

impl<'a> PassPlan<'a> {
    fn elapsed_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1e3
    }

    fn find(&self, target: &Target) -> Option<&'a Delivery> {
        self.deliveries.iter().find(|d| d.target == *target)
    }

    /// Why the key's authority lacks this entry's change once this pass's update is over, if it
    /// does: the update failed now, or is pending from before and was not attempted now.
    async fn authority_lacks(&self) -> Option<String> {
        let delivery = self.authority_delivery?;
        match self.authority.clone().await {
            Some((result, _)) => result.err(),
            None if delivery.is_pending() => {
                Some(delivery.last_error.clone().unwrap_or_else(|| "its update has not been delivered yet".to_owned()))
            }
            None => None,
        }
    }
}

/// Why a region's acknowledgement counts for nothing yet.
fn authority_lacks_message(error: &str) -> String {
    format!("the key's authority does not hold this change yet: {error}")
}

pub struct Deliverer {
    store: Store,
    edge: Arc<EdgeClient>,
    in_flight: Mutex<HashSet<i64>>,
    /// Notified when a claim is released, for deliveries waiting to claim the same entry.
    released: Notify,
}

/// Releases an entry's claim when dropped. Only [`Deliverer::try_claim`] makes one, and only
/// for an id it inserted: dropping a claim removes its id, whoever holds it.
struct Claim<'a> {
    deliverer: &'a Deliverer,
    id: i64,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        // The guard is this statement's temporary: the lock is released before anyone wakes.
        self.deliverer.in_flight.lock().expect("not poisoned").remove(&self.id);
        self.deliverer.released.notify_waiters();
    }
}

impl Deliverer {
    pub fn new(store: Store, edge: Arc<EdgeClient>) -> Deliverer {
        Deliverer { store, edge, in_flight: Mutex::new(HashSet::new()), released: Notify::new() }
    }

    pub fn edge(&self) -> &EdgeClient {
        &self.edge
    }

    /// An outbox entry for a change committed at `now`, to be stored with it: the store gives it
    /// the targets its record and `tightening` call for, among the authority and the regions
    /// configured. It is left to the request that makes it for [`HANDOFF`].
    pub fn new_outbox(&self, tightening: bool, now: i64) -> NewOutbox {
        NewOutbox { reach: self.edge.reach(), tightening, now, first_retry_at: now + HANDOFF.as_millis() as i64 }
    }

    /// Claims an entry unless a delivery of it is under way. The claim is built only once the
    /// lock is released and only when the id was inserted: a claim dropped while the lock is held
    /// would deadlock on it, and one built for an id already claimed would release that claim.
    fn try_claim(&self, id: i64) -> Option<Claim<'_>> {
        let inserted = self.in_flight.lock().expect("not poisoned").insert(id);
        inserted.then(|| Claim { deliverer: self, id })
    }

    /// Claims an entry, waiting for a delivery of it already under way to release it.
    async fn claim(&self, id: i64) -> Claim<'_> {
        loop {
            // Registered before looking, so a release between the look and the wait still wakes it.
            let mut released = std::pin::pin!(self.released.notified());
            released.as_mut().enable();
            if let Some(claim) = self.try_claim(id) {
                return claim;
            }
            released.await;
        }
    }

    /// Delivers an entry's pending targets now, waiting for a delivery of it already under way,
    /// and answers once the change is in force: the authority has it and every region has
    /// acknowledged its purge (or failed to). The KV writes of a tightening change follow at
    /// once, after the answer: nothing reads KV without the authority beside it, so they cannot
    /// make the key valid again, and on 2 cores they would slow the purges down.
    /// The delivery runs in a task of its own: a caller that stops waiting (a handler whose
    /// client disconnected) does not cancel it.
    pub async fn deliver(self: &Arc<Self>, id: i64) -> anyhow::Result<Delivered> {
        let task = tokio::spawn(self.clone().deliver_in_force(id));
        task.await.context("the delivery task stopped")?
    }

    async fn deliver_in_force(self: Arc<Self>, id: i64) -> anyhow::Result<Delivered> {
        let claim = self.claim(id).await;
        let delivered = self.deliver_claimed(id, Pass::InForce).await;
        drop(claim);
        if delivered.as_ref().is_ok_and(|d| d.regions.iter().any(|r| r.kv == KvState::Pending)) {
            tokio::spawn(async move {
                let _claim = self.claim(id).await;
                if let Err(e) = self.deliver_claimed(id, Pass::KvAfterAnswer).await {
                    tracing::error!(outbox = id, error = %e, "delivery failed");
                }
            });
        }
        delivered
    }

    /// The authority update and every signed region's purge run at once: a signed purge carries
    /// the record, so the region rejects the key without a refill. A purge-by-tag only drops
    /// Cache API copies, so it waits for the authority to have the record (KV lags by up to
    /// 60 s), and is not sent while the authority lacks it: the refill that follows is then sure
    /// to find it. KV writes run alongside, except those of a tightening change in the pass that
    /// puts it in force: they get a pass of their own right after.
    /// Outcomes are recorded together in one transaction.
    async fn deliver_claimed(&self, id: i64, pass: Pass) -> anyhow::Result<Delivered> {
        let (entry, deliveries) = self.store.outbox_entry(id).await?.context("no such outbox entry")?;
        // The authority and purges need the record; a root key's entry has no purges.
        let needs_record = deliveries.iter().any(|d| matches!(d.target, Target::Authority | Target::Purge(_)));
        let (record, root_key) = match (needs_record, entry.kind) {
            (false, _) => (None, None),
            (true, EntryKind::Key) => (Some(KeyRecord::from_json(&entry.record).context("outbox record")?), None),
            (true, EntryKind::RootKey) => {
                (None, Some(RootKeyRecord::from_json(&entry.record).context("outbox root key")?))
            }
        };
        let in_force_now = pass != Pass::KvAfterAnswer;
        let started = Instant::now();
        let authority_delivery = deliveries.iter().find(|d| d.target == Target::Authority);
        let update = in_force_now && is_pending(authority_delivery) && needs_record;
        let (records, root_keys) = (record.as_slice(), root_key.as_slice());
        let authority = async move {
            if !update {
                return None;
            }
            let result = self.edge.update_authority(records, root_keys).await;
            Some((result.map_err(|e| error_text(&DeliveryError::Authority(e))), started.elapsed().as_secs_f64() * 1e3))
        }
        .boxed()
        .shared();
        let plan = PassPlan {
            entry: &entry,
            deliveries: &deliveries,
            record: record.as_ref(),
            kv_now: pass != Pass::InForce || !entry.purges(),
            in_force_now,
            started,
            authority_delivery,
            authority: authority.clone(),
        };
        let regions = join_all(self.edge.regions.iter().map(|region| self.deliver_region(&plan, region)));
        let (authority_result, regions) = futures::join!(authority, regions);

        let mut outcomes = Vec::new();
        let authority = match (authority_delivery, authority_result) {
            (Some(d), Some((result, latency_ms))) => {
                outcomes.push((d, result.clone()));
                Some(AuthorityReport { acknowledged: result.is_ok(), latency_ms, error: result.err() })
            }
            (Some(d), None) => {
                Some(AuthorityReport { acknowledged: d.state == DeliveryState::Done, latency_ms: 0.0, error: None })
            }
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

    /// One region's part of a pass: its KV write and its purge, and its report. A region is not
    /// reported as acknowledged while the key's authority lacks the change, whatever it
    /// answered: a copy it refills from the authority would be the old record. A purge-by-tag
    /// is not even sent then; it fails, to be retried with the authority.
    async fn deliver_region<'a>(&self, plan: &PassPlan<'a>, region: &EdgeRegion) -> (RegionReport, [Outcome<'a>; 2]) {
        let kv = plan.find(&Target::Kv(region.name.clone()));
        let purge = plan.find(&Target::Purge(region.name.clone()));
        let kv_write = async {
            if !plan.kv_now || !is_pending(kv) {
                return None;
            }
            let result = region.kv.put(&plan.entry.kv_key, plan.entry.record.clone()).await;
            Some((result.map_err(|e| error_text(&DeliveryError::Kv(e))), plan.elapsed_ms()))
        };
        let purge_send = async {
            let record = plan.record.filter(|_| plan.in_force_now && is_pending(purge))?;
            if !region.purge_carries_record()
                && let Some(error) = plan.authority_lacks().await
            {
                return Some((Err(format!("not sent: {}", authority_lacks_message(&error))), plan.elapsed_ms()));
            }
            let result = self.edge.purge(region, std::slice::from_ref(record)).await;
            Some((result.map_err(|e| error_text(&DeliveryError::Purge(e))), plan.elapsed_ms()))
        };
        let (kv_result, purge_result): (Option<Attempted<()>>, Option<Attempted<Option<u64>>>) =
            futures::join!(kv_write, purge_send);
        let lacks = match purge {
            Some(_) => plan.authority_lacks().await.map(|e| authority_lacks_message(&e)),
            None => None,
        };
        // The purge's acknowledgement is what the caller waits for; without one, the KV write.
        let latency_ms = purge_result.as_ref().map(|(_, ms)| *ms).or(kv_result.as_ref().map(|(_, ms)| *ms));
        let applied_at_ms = purge_result.as_ref().and_then(|(r, _)| r.as_ref().ok().copied().flatten());
        let kv_result = kv_result.map(|(r, _)| r);
        let purge_result = purge_result.map(|(r, _)| r.map(|_| ()));
        let acknowledged =
            purge_result.as_ref().map(Result::is_ok).or_else(|| purge.map(|d| d.state == DeliveryState::Done));
        let error_of = |result: &Option<Result<(), String>>| result.as_ref().and_then(|r| r.clone().err());
        let report = RegionReport {
            name: region.name.clone(),
            kv: match (&kv_result, kv) {
                (Some(Ok(())), _) => KvState::Written,
                (Some(Err(_)), _) => KvState::Failed,
                (None, kv) if is_pending(kv) => KvState::Pending,
                (None, Some(d)) if d.state == DeliveryState::Superseded => KvState::Superseded,
                (None, _) => KvState::Written,
            },
            acknowledged: acknowledged.map(|ack| ack && lacks.is_none()),
            latency_ms: latency_ms.unwrap_or(0.0),
            applied_at_ms,
            ack_means: purge.map(|_| region.ack_means()),
            // The error that explains `acknowledged` comes first.
            error: error_of(&purge_result).or(lacks).or_else(|| error_of(&kv_result)),
        };
        (report, [(kv, kv_result), (purge, purge_result)])
    }

    /// Records attempts in one transaction; a failure is retried with backoff.
    async fn record(&self, outcomes: &[(&Delivery, Result<(), String>)]) -> anyhow::Result<()> {
        let now = now_ms();
        let rows: Vec<AttemptOutcome> = outcomes
            .iter()
            .map(|(d, result)| {
                if let Err(error) = result {
                    tracing::warn!(outbox = d.outbox_id, target = %d.target, attempts = d.attempts + 1, %error, "delivery failed; will retry");
                }
                let backoff = FIRST_BACKOFF.saturating_mul(1 << d.attempts.clamp(0, 16)).min(MAX_BACKOFF);
                AttemptOutcome {
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
                tokio::time::sleep(RETRY_TICK).await;
            }
        })
    }
}
