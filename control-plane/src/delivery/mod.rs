//! Delivering outbox entries: the authority update, each region's KV write, each region's purge.
//!
//! The request that made a change delivers its entry at once and answers with the result; what
//! fails stays pending and a background retrier tries it again with backoff, also after a
//! restart (a crash between commit and answer is finished without anyone calling again). A region
//! that was down receives every purge it missed when it returns. One process never delivers the
//! same entry twice at once, and a delivery once started runs to its end even if its caller
//! stops waiting (a client that disconnects).
//!
//! A pass over an entry is a few named steps: `load` the entry, start its `update_authority`,
//! `deliver_region` (its KV write and purge) for every region at once, report, and `record`
//! the pass's attempts in one transaction. Errors stay a [`DeliveryError`] until they are recorded as
//! text; the attempts and reports are in `outcome.rs`. A change's caller waits at most
//! `answer_within_ms` (5 s by default, [`OutboxSettings`]), whatever the purge budget: what has not landed by then is reported
//! pending, and goes on. Purges by tag are batched with a fair share per workspace (`tags.rs`);
//! the retrier also prunes and dead-letters by age (`upkeep.rs`).

mod outcome;
mod tags;
mod upkeep;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared, join_all};
use keyward_shared::identity::IdentityRecord;
use keyward_shared::policy::ApiRecord;
use keyward_shared::{KeyRecord, RootKeyRecord};
use tokio::sync::Notify;

use self::outcome::{Attempt, Attempted, RegionPass, authority_lacks_message, authority_report, still_pending};
pub use self::outcome::{AuthorityReport, Delivered, DeliveryError, KvState, RegionReport, error_text};
pub use self::tags::{BatchError, FairQueue, TagBatcher, TagPurge};
pub use self::upkeep::{OutboxSettings, UPKEEP_EVERY, Upkept, health_json, upkeep};
use crate::edge_client::{AuthorityRecords, EdgeClient, EdgeRegion, Purged};
use crate::store::{AttemptOutcome, Delivery, EntryKind, NewOutbox, OutboxEntry, Store, Target};
use crate::time::now_ms;

/// The first retry waits this long; each further one twice as long, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the retrier looks for due deliveries.
const RETRY_TICK: Duration = Duration::from_millis(250);
/// The most deliveries under way at once (the retrier's and the requests'), beyond which the
/// retrier starts no more until some end.
const RETRY_IN_FLIGHT: usize = 64;
/// A new entry is left to the request that made it for this long before the retrier may take it.
pub const HANDOFF: Duration = Duration::from_secs(5);
/// A pass that ends within this long records all its outcomes in one transaction (one commit
/// instead of one per target); a longer one records each outcome as it comes from then on.
const RECORD_TOGETHER_FOR: Duration = Duration::from_secs(1);

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

impl Pass {
    /// Whether this pass attempts what puts a change in force: the authority and the purges.
    fn puts_in_force(self) -> bool {
        self != Pass::KvAfterAnswer
    }

    /// Whether this pass writes KV for an entry that purges (or not): a purged change's KV
    /// writes follow its answer.
    fn writes_kv(self, purges: bool) -> bool {
        self != Pass::InForce || !purges
    }
}

/// The record an entry carries, parsed: the authority and purges take it as a value.
enum Carried {
    Key(Box<KeyRecord>),
    RootKey(RootKeyRecord),
    Api(ApiRecord),
    Identity(IdentityRecord),
}

impl Carried {
    fn parse(entry: &OutboxEntry) -> anyhow::Result<Carried> {
        Ok(match entry.kind {
            EntryKind::Key => Carried::Key(Box::new(KeyRecord::from_json(&entry.record).context("outbox record")?)),
            EntryKind::RootKey => Carried::RootKey(RootKeyRecord::from_json(&entry.record).context("outbox root key")?),
            EntryKind::Api => Carried::Api(ApiRecord::from_json(&entry.record).context("outbox API record")?),
            EntryKind::Identity => {
                Carried::Identity(IdentityRecord::from_json(&entry.record).context("outbox identity record")?)
            }
        })
    }

    /// What a purge carries: a key's record, an API's or an identity's; a root key is never
    /// purged.
    fn purged(&self) -> Option<Purged<'_>> {
        let none = Purged { keys: &[], apis: &[], identities: &[] };
        match self {
            Carried::Key(record) => Some(Purged { keys: std::slice::from_ref(record), ..none }),
            Carried::Api(record) => Some(Purged { apis: std::slice::from_ref(record), ..none }),
            Carried::Identity(record) => Some(Purged { identities: std::slice::from_ref(record), ..none }),
            Carried::RootKey(_) => None,
        }
    }

    /// The authority's update: keys' records, root keys' records, APIs' and identities'.
    fn authority_update(&self) -> AuthorityRecords<'_> {
        let none = AuthorityRecords { keys: &[], root_keys: &[], apis: &[], identities: &[] };
        match self {
            Carried::Key(record) => AuthorityRecords { keys: std::slice::from_ref(record), ..none },
            Carried::RootKey(record) => AuthorityRecords { root_keys: std::slice::from_ref(record), ..none },
            Carried::Api(record) => AuthorityRecords { apis: std::slice::from_ref(record), ..none },
            Carried::Identity(record) => AuthorityRecords { identities: std::slice::from_ref(record), ..none },
        }
    }
}

/// An outbox entry as a pass finds it: the entry, its deliveries, and its record when the
/// authority or a purge needs it (KV takes the stored text).
struct Loaded {
    entry: OutboxEntry,
    deliveries: Vec<Delivery>,
    record: Option<Carried>,
    /// This entry's authority update was superseded by a newer entry's, which has not been
    /// delivered yet: the authority lacks this change as much as if its own were pending.
    authority_behind: bool,
}

impl Loaded {
    fn find(&self, target: &Target) -> Option<&Delivery> {
        self.deliveries.iter().find(|d| d.target == *target)
    }
}

/// What one pass over an entry works from, shared by its regions.
struct PassPlan<'a> {
    loaded: &'a Loaded,
    /// Whether this pass writes KV.
    kv_now: bool,
    /// Whether this pass attempts what puts the change in force: the authority and the purges.
    in_force_now: bool,
    started: Instant,
    /// This pass's authority update; `None` when it makes none.
    authority: Shared<BoxFuture<'a, Option<Attempt>>>,
}

impl PassPlan<'_> {
    fn attempt<T>(&self, result: Result<T, DeliveryError>) -> Attempt<T> {
        Attempt::ended(result, self.started)
    }

    /// Why the key's authority lacks this entry's change once this pass's update is over, if it
    /// does: the update failed now, or is pending from before and was not attempted now.
    async fn authority_lacks(&self) -> Option<String> {
        let delivery = self.loaded.find(&Target::Authority)?;
        match self.authority.clone().await {
            Some(attempt) => attempt.result.err().map(|e| error_text(&*e)),
            None if delivery.is_pending() => {
                Some(delivery.last_error.clone().unwrap_or_else(|| "its update has not been delivered yet".to_owned()))
            }
            None if self.loaded.authority_behind => {
                Some("a newer change's authority update, which carries this one, has not been delivered yet".to_owned())
            }
            None => None,
        }
    }
}

/// The outcomes of one pass, held to be recorded together, until the pass has run for
/// [`RECORD_TOGETHER_FOR`]; from then on each is recorded as it comes. Every target of a pass is
/// polled by the one task that runs the pass, so nothing is added while the held outcomes are
/// being recorded.
#[derive(Default)]
struct Recorder<'a> {
    held: Mutex<Vec<Attempted<'a>>>,
    as_they_come: std::sync::atomic::AtomicBool,
}

impl<'a> Recorder<'a> {
    async fn add(&self, deliverer: &Deliverer, attempted: Vec<Attempted<'a>>) {
        if self.as_they_come.load(std::sync::atomic::Ordering::Relaxed) {
            deliverer.record_answered(&attempted, None).await;
        } else {
            self.held.lock().expect("not poisoned").extend(attempted);
        }
    }

    async fn record_as_they_come(&self, deliverer: &Deliverer) {
        self.as_they_come.store(true, std::sync::atomic::Ordering::Relaxed);
        self.record_held(deliverer, None).await;
    }

    /// Records what is held; with `answered`, also notes that entry's call as answered now, in
    /// the same transaction (the pass whose result is the answer ends here).
    async fn record_held(&self, deliverer: &Deliverer, answered: Option<i64>) {
        let held = std::mem::take(&mut *self.held.lock().expect("not poisoned"));
        deliverer.record_answered(&held, answered).await;
    }
}

pub struct Deliverer {
    store: Store,
    edge: Arc<EdgeClient>,
    settings: OutboxSettings,
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
    pub fn new(store: Store, edge: Arc<EdgeClient>, settings: OutboxSettings) -> Deliverer {
        Deliverer { store, edge, settings, in_flight: Mutex::new(HashSet::new()), released: Notify::new() }
    }

    pub fn edge(&self) -> &EdgeClient {
        &self.edge
    }

    pub fn settings(&self) -> &OutboxSettings {
        &self.settings
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
    /// client disconnected) does not cancel it. The answer comes within `answer_within_ms`: by
    /// then, what has not landed (a purge waiting for its share of the budget, a hung target) is
    /// answered as pending, from the outbox, and its delivery goes on.
    pub async fn deliver(self: &Arc<Self>, id: i64) -> anyhow::Result<Delivered> {
        let task = tokio::spawn(self.clone().deliver_in_force(id));
        match tokio::time::timeout(self.settings.answer_within(), task).await {
            Ok(done) => done.context("the delivery task stopped")?,
            Err(_) => {
                // Answered before the pass ends: the answer's time is now, not the pass's end.
                if let Err(e) = self.store.note_answered(id, now_ms()).await {
                    tracing::warn!(outbox = id, error = %e, "cannot note when the change was answered");
                }
                self.stored_report(id).await
            }
        }
    }

    /// What an entry's deliveries have reached, as stored: a delivery still under way is pending.
    async fn stored_report(&self, id: i64) -> anyhow::Result<Delivered> {
        let loaded = self.load(id).await?;
        let authority = loaded.find(&Target::Authority);
        let window = self.settings.answer_within();
        let lacks = authority.filter(|d| d.is_pending()).map(|d| authority_lacks_message(&still_pending(d, window)));
        let regions = self.edge.regions.iter().map(|region| {
            let kv = loaded.find(&Target::Kv(region.name.clone()));
            let purge = loaded.find(&Target::Purge(region.name.clone()));
            let pass = RegionPass { kv, purge, kv_attempt: None, purge_attempt: None };
            let pending = purge.filter(|d| d.is_pending()).map(|d| still_pending(d, window));
            pass.report(region, pending.or(lacks.clone().filter(|_| purge.is_some())))
        });
        let authority = authority.map(|d| authority_report(d, None, window));
        Ok(Delivered { authority, regions: regions.collect() })
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
    /// A pass that ends within [`RECORD_TOGETHER_FOR`] records its outcomes in one transaction;
    /// one that runs longer records what is known by then, and each later outcome as it comes, so
    /// that an answer given while a target is still under way (`answer_within_ms`) shows the rest.
    async fn deliver_claimed(&self, id: i64, pass: Pass) -> anyhow::Result<Delivered> {
        let loaded = self.load(id).await?;
        let started = Instant::now();
        let recorder = Recorder::default();
        let authority_delivery = loaded.find(&Target::Authority);
        let authority = async {
            let attempt = self.update_authority(&loaded, pass, started).await;
            if let (Some(delivery), Some(attempt)) = (authority_delivery, &attempt) {
                let attempted =
                    Attempted { delivery, result: attempt.result.clone(), at_ms: attempt.at_ms, applied_at_ms: None };
                recorder.add(self, vec![attempted]).await;
            }
            attempt
        };
        let authority = authority.boxed().shared();
        let plan = PassPlan {
            loaded: &loaded,
            kv_now: pass.writes_kv(loaded.entry.purges()),
            in_force_now: pass.puts_in_force(),
            started,
            authority: authority.clone(),
        };
        let regions = join_all(self.edge.regions.iter().map(|region| async {
            let (report, attempts) = self.deliver_region(&plan, region).await;
            recorder.add(self, attempts.attempted().collect()).await;
            report
        }));
        let work = futures::future::join(authority, regions);
        tokio::pin!(work);
        let (authority_attempt, regions) = match tokio::time::timeout(RECORD_TOGETHER_FOR, &mut work).await {
            Ok(done) => done,
            Err(_) => {
                recorder.record_as_they_come(self).await;
                work.await
            }
        };
        recorder.record_held(self, (pass == Pass::InForce).then_some(id)).await;
        let window = self.settings.answer_within();
        let authority = authority_delivery.map(|d| authority_report(d, authority_attempt.as_ref(), window));
        Ok(Delivered { authority, regions })
    }

    /// Reads an entry and its deliveries, and parses its record if the authority or a purge
    /// needs it (a root key's entry has no purges).
    async fn load(&self, id: i64) -> anyhow::Result<Loaded> {
        let (entry, deliveries) = self.store.outbox_entry(id).await?.context("no such outbox entry")?;
        let needs_record = deliveries.iter().any(|d| matches!(d.target, Target::Authority | Target::Purge(_)));
        let record = needs_record.then(|| Carried::parse(&entry)).transpose()?;
        let superseded = deliveries
            .iter()
            .any(|d| d.target == Target::Authority && d.state == crate::store::DeliveryState::Superseded);
        let authority_behind = superseded && !self.store.newer_authority_update_delivered(&entry).await?;
        Ok(Loaded { entry, deliveries, record, authority_behind })
    }

    /// This pass's authority update: made in a pass that puts the change in force, while the
    /// entry's update is pending.
    async fn update_authority(&self, loaded: &Loaded, pass: Pass, started: Instant) -> Option<Attempt> {
        let pending = loaded.find(&Target::Authority).is_some_and(Delivery::is_pending);
        if !pass.puts_in_force() || !pending {
            return None;
        }
        let records = loaded.record.as_ref()?.authority_update();
        let result = self.edge.update_authority(records).await;
        Some(Attempt::ended(result.map_err(DeliveryError::Authority), started))
    }

    /// One region's part of a pass: its KV write and its purge, at once, and its report.
    async fn deliver_region<'a>(&self, plan: &PassPlan<'a>, region: &EdgeRegion) -> (RegionReport, RegionPass<'a>) {
        let kv = plan.loaded.find(&Target::Kv(region.name.clone()));
        let purge = plan.loaded.find(&Target::Purge(region.name.clone()));
        let (kv_attempt, purge_attempt) =
            futures::join!(self.write_kv(plan, region, kv), self.send_purge(plan, region, purge));
        let lacks = match purge {
            Some(_) => plan.authority_lacks().await.map(|reason| authority_lacks_message(&reason)),
            None => None,
        };
        let pass = RegionPass { kv, purge, kv_attempt, purge_attempt };
        (pass.report(region, lacks), pass)
    }

    /// A region's KV write, if this pass makes it and it is pending.
    async fn write_kv(&self, plan: &PassPlan<'_>, region: &EdgeRegion, kv: Option<&Delivery>) -> Option<Attempt> {
        if !plan.kv_now || !kv.is_some_and(Delivery::is_pending) {
            return None;
        }
        let result = region.kv.put(&plan.loaded.entry.kv_key, plan.loaded.entry.record.clone()).await;
        Some(plan.attempt(result.map_err(DeliveryError::Kv)))
    }

    /// A region's purge, if this pass makes it and it is pending. A purge-by-tag is not sent
    /// while the key's authority lacks the change; it fails, to be retried with the authority.
    async fn send_purge(
        &self,
        plan: &PassPlan<'_>,
        region: &EdgeRegion,
        purge: Option<&Delivery>,
    ) -> Option<Attempt<Option<u64>>> {
        let pending = plan.in_force_now && purge.is_some_and(Delivery::is_pending);
        let purged = plan.loaded.record.as_ref()?.purged().filter(|_| pending)?;
        if !region.purge_carries_record()
            && let Some(reason) = plan.authority_lacks().await
        {
            return Some(plan.attempt(Err(DeliveryError::AuthorityLacks(reason))));
        }
        let result = self.edge.purge(region, purged).await;
        Some(plan.attempt(result.map_err(DeliveryError::Purge)))
    }

    /// Records attempts in one transaction; a failure is retried with backoff. An outcome that
    /// cannot be recorded is logged: its delivery stays pending, and is made again.
    /// Records attempts' outcomes and, with `answered`, notes that entry's call answered now:
    /// one transaction, so the answer waits for one commit, not two.
    async fn record_answered(&self, attempted: &[Attempted<'_>], answered: Option<i64>) {
        for a in attempted {
            a.count();
        }
        let now = now_ms();
        let rows: Vec<AttemptOutcome> = attempted.iter().map(|a| a.outcome(now)).collect();
        if let Err(e) = self.store.deliveries_attempted(&rows, answered, now).await {
            tracing::error!(error = %e, "cannot record delivery outcomes; they will be delivered again");
            // The answer's time on its own, so that the proof keeps its bound.
            if let Some(id) = answered
                && let Err(e) = self.store.note_answered(id, now).await
            {
                tracing::warn!(outbox = id, error = %e, "cannot note when the change was answered");
            }
        }
    }

    /// Retries due deliveries until the process ends, and every [`UPKEEP_EVERY`] prunes and
    /// dead-letters by age (`upkeep.rs`). At start, everything pending is due.
    pub fn spawn_retrier(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            match self.store.retry_all_now(now_ms()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(pending = n, "finishing deliveries left pending by the last run"),
                Err(e) => tracing::error!(error = %e, "cannot read the outbox"),
            }
            let mut upkept: Option<Instant> = None;
            loop {
                if upkept.is_none_or(|at| at.elapsed() >= UPKEEP_EVERY) {
                    if let Err(e) = upkeep(&self.store, &self.settings, now_ms()).await {
                        tracing::error!(error = %e, "cannot prune the outbox");
                    }
                    upkept = Some(Instant::now());
                }
                self.retry_due().await;
                tokio::time::sleep(RETRY_TICK).await;
            }
        })
    }

    /// One round of the retrier: every due entry not being delivered already starts, in a task
    /// of its own, up to [`RETRY_IN_FLIGHT`] deliveries under way at once. The round does not
    /// wait for them: a purge waiting for its share of the budget, or a hung target, holds up
    /// only its own entry.
    async fn retry_due(self: &Arc<Self>) {
        let in_flight = self.in_flight.lock().expect("not poisoned").len();
        let room = RETRY_IN_FLIGHT.saturating_sub(in_flight);
        if room == 0 {
            return;
        }
        // Entries under way are still due until their outcome is recorded: look past them.
        let ids = match self.store.due_outbox_ids(now_ms(), (room + in_flight) as u32).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the outbox");
                Vec::new()
            }
        };
        for id in ids.into_iter().filter(|id| !self.in_flight.lock().expect("not poisoned").contains(id)).take(room) {
            let deliverer = self.clone();
            tokio::spawn(async move {
                let Some(_claim) = deliverer.try_claim(id) else { return };
                if let Err(e) = deliverer.deliver_claimed(id, Pass::All).await {
                    tracing::error!(outbox = id, error = %e, "delivery failed");
                }
            });
        }
    }
}
