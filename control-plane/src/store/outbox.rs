//! The outbox: each change's deliveries (authority, KV per region, purge per region; a root key's
//! change has no purges), their attempts, what is pending, stuck or dead-lettered (per
//! workspace), pruning by age, the operator's redrive, and the tightening key changes that make
//! the event stream.

use std::fmt;
use std::str::FromStr;

use anyhow::Context;
use keyward_shared::identity::{IdentityRecord, kv_key_for_identity};
use keyward_shared::policy::{ApiRecord, kv_key_for_api};
use keyward_shared::{KeyRecord, RootKeyRecord, kv_key_for_key, kv_key_for_root};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::sqlite::{SqliteArgumentValue, SqliteTypeInfo, SqliteValueRef};
use sqlx::{Decode, Encode, FromRow, Sqlite, Type};

use super::audit::{self, Change};
use super::{Store, StoreError};
use crate::change::Actor;

/// What an outbox entry carries: a key's record or a root key's (column `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Type)]
#[sqlx(rename_all = "snake_case")]
pub enum EntryKind {
    Key,
    RootKey,
    /// An API's record: its allow and deny lists and its limit override (`key_id` holds the
    /// API's id).
    Api,
    /// An identity's record: its shared credits and rate limits (`key_id` holds its id).
    Identity,
}

impl EntryKind {
    /// Whether a change of this kind purges every region's copies: a key's tightening change. A
    /// root key's never does, its revocation included: the edge confirms its callers' root keys
    /// with the authority and KV, which are its targets.
    pub fn purges(self, tightening: bool) -> bool {
        matches!(self, EntryKind::Key | EntryKind::Api | EntryKind::Identity) && tightening
    }
}

/// Where one delivery of an entry goes (column `target`: `authority`, `kv:<region>`,
/// `purge:<region>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// The keys' authority (their KeyState Durable Objects).
    Authority,
    /// A region's KV namespace, by the region's name.
    Kv(String),
    /// A region's purge, by the region's name.
    Purge(String),
}

impl Target {
    /// Whether the promise depends on this delivery: the authority update, a purge, or a KV
    /// write of a tightening change. Such a delivery is retried until it lands and never
    /// dead-lettered; it is shown as stuck past its age limit. [`PROMISED_SQL`] says the same.
    pub fn is_promised(&self, tightening: bool) -> bool {
        match self {
            Target::Authority | Target::Purge(_) => true,
            Target::Kv(_) => tightening,
        }
    }

    /// The region this target belongs to; the authority belongs to none.
    pub fn region(&self) -> Option<&str> {
        match self {
            Target::Authority => None,
            Target::Kv(region) | Target::Purge(region) => Some(region),
        }
    }
}

/// [`Target::is_promised`] in SQL, over `deliveries d JOIN outbox o`.
const PROMISED_SQL: &str = "(d.target NOT LIKE 'kv:%' OR o.tightening = 1)";

/// Where a delivery stands (column `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Type)]
#[sqlx(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Not acknowledged yet: retried until it is.
    Pending,
    Done,
    /// Left to a newer entry of the same key with the same target, which carries the newer record.
    Superseded,
    /// Given up by age: only a delivery no promise depends on ([`Target::is_promised`]), and
    /// only by an operator's redrive tried again.
    DeadLettered,
}

/// Where changes can be delivered: the authority (when configured) and each region, by name.
#[derive(Debug, Clone, Default)]
pub struct Reach {
    pub authority: bool,
    pub regions: Vec<String>,
}

impl Reach {
    /// An entry's targets: the authority, every region's KV, and every region's purge when the
    /// entry purges ([`EntryKind::purges`]).
    pub fn targets(&self, kind: EntryKind, tightening: bool) -> Vec<Target> {
        let authority = self.authority.then_some(Target::Authority);
        let regions = self.regions.iter().flat_map(|region| {
            let purge = kind.purges(tightening).then(|| Target::Purge(region.clone()));
            std::iter::once(Target::Kv(region.clone())).chain(purge)
        });
        authority.into_iter().chain(regions).collect()
    }
}

/// A change to deliver to the edge: where it can go, whether it tightens, and when.
pub struct NewOutbox {
    /// The entry's targets are chosen from these by what it carries and whether it tightens.
    pub reach: Reach,
    pub tightening: bool,
    pub now: i64,
    /// When the retrier may first try it (the request that made it tries at once).
    pub first_retry_at: i64,
}

/// A stored outbox entry.
#[derive(Debug, Clone, FromRow)]
pub struct OutboxEntry {
    pub id: i64,
    pub kind: EntryKind,
    /// The id of the key, or of the root key, whose record it carries.
    pub key_id: String,
    pub kv_key: String,
    /// The record as JSON: the value for KV and the authority.
    pub record: String,
    /// Whether the change tightens the key: the one record of it, for delivery and events.
    pub tightening: bool,
    pub created_at: i64,
}

impl OutboxEntry {
    /// Whether this entry purges every region's copies.
    pub fn purges(&self) -> bool {
        self.kind.purges(self.tightening)
    }
}

/// One target of an outbox entry.
#[derive(Debug, Clone, FromRow)]
pub struct Delivery {
    pub outbox_id: i64,
    pub target: Target,
    pub state: DeliveryState,
    pub attempts: i64,
    pub last_error: Option<String>,
}

impl Delivery {
    pub fn is_pending(&self) -> bool {
        self.state == DeliveryState::Pending
    }
}

/// One delivery attempt's outcome, to record.
#[derive(Debug, Clone)]
pub struct AttemptOutcome {
    pub outbox_id: i64,
    pub target: Target,
    /// `None` when it was acknowledged; the error as text otherwise.
    pub error: Option<String>,
    /// When to try again if it failed.
    pub retry_at: i64,
    /// A signed purge's acknowledgement: when the region began answering from its record.
    pub applied_at: Option<i64>,
}

/// How one target's deliveries stand: those not acknowledged yet, the promised ones among them
/// that are stuck (older than the stuck age), and those dead-lettered.
#[derive(Debug, Clone, FromRow)]
pub struct TargetHealth {
    pub target: Target,
    pub pending: i64,
    /// When the oldest pending delivery's change was committed; `None` with nothing pending.
    pub oldest: Option<i64>,
    pub stuck: i64,
    pub dead_lettered: i64,
    /// The newest error among the pending and dead-lettered deliveries.
    pub last_error: Option<String>,
}

/// A stuck or dead-lettered delivery, for the operator.
#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct TroubledDelivery {
    pub outbox_id: i64,
    pub workspace_id: Option<String>,
    /// The key or root key whose record it carries.
    pub key_id: String,
    #[serde(serialize_with = "as_text")]
    pub target: Target,
    #[serde(serialize_with = "as_text")]
    pub state: DeliveryState,
    pub attempts: i64,
    pub created_at: i64,
    pub last_error: Option<String>,
}

/// Serialises a typed column as the text it is stored as.
pub(crate) fn as_text<T: fmt::Display, S: serde::Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

/// Which deliveries an operator's redrive makes due again.
#[derive(Debug, Clone, Copy)]
pub struct Redrive<'a> {
    /// Only this region's deliveries (KV and purge); every target when `None`.
    pub region: Option<&'a str>,
    pub now: i64,
}

/// What a redrive did: dead-lettered deliveries made pending again, and pending ones made due now.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Redriven {
    pub revived: u64,
    pub made_due: u64,
}

/// Why a stored target could not be read.
#[derive(Debug, thiserror::Error)]
#[error("unknown outbox target `{0}`")]
pub struct UnknownTarget(String);

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Authority => f.write_str("authority"),
            Target::Kv(region) => write!(f, "kv:{region}"),
            Target::Purge(region) => write!(f, "purge:{region}"),
        }
    }
}

impl fmt::Display for DeliveryState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Done => "done",
            DeliveryState::Superseded => "superseded",
            DeliveryState::DeadLettered => "dead_lettered",
        })
    }
}

impl FromStr for Target {
    type Err = UnknownTarget;

    fn from_str(text: &str) -> Result<Target, UnknownTarget> {
        match text.split_once(':') {
            None if text == "authority" => Ok(Target::Authority),
            Some(("kv", region)) => Ok(Target::Kv(region.to_owned())),
            Some(("purge", region)) => Ok(Target::Purge(region.to_owned())),
            _ => Err(UnknownTarget(text.to_owned())),
        }
    }
}

impl Type<Sqlite> for Target {
    fn type_info() -> SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }
}

impl<'q> Encode<'q, Sqlite> for Target {
    fn encode_by_ref(&self, args: &mut Vec<SqliteArgumentValue<'q>>) -> Result<IsNull, BoxDynError> {
        <String as Encode<'q, Sqlite>>::encode(self.to_string(), args)
    }
}

impl<'r> Decode<'r, Sqlite> for Target {
    fn decode(value: SqliteValueRef<'r>) -> Result<Target, BoxDynError> {
        Ok(<&str as Decode<'r, Sqlite>>::decode(value)?.parse()?)
    }
}

impl Store {
    /// Whether a newer entry of the same key (or root key) has delivered its authority update,
    /// which carries this entry's change too (the authority keeps the highest version).
    pub async fn newer_authority_update_delivered(&self, entry: &OutboxEntry) -> Result<bool, StoreError> {
        let delivered: i64 = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM deliveries d JOIN outbox o ON o.id = d.outbox_id \
                 WHERE o.kind = ? AND o.key_id = ? AND o.id > ? AND d.target = ? AND d.state = ?)",
        )
        .bind(entry.kind)
        .bind(&entry.key_id)
        .bind(entry.id)
        .bind(Target::Authority)
        .bind(DeliveryState::Done)
        .fetch_one(&self.pool)
        .await?;
        Ok(delivered != 0)
    }

    /// An outbox entry and its deliveries that are still pending.
    pub async fn outbox_entry(&self, id: i64) -> Result<Option<(OutboxEntry, Vec<Delivery>)>, StoreError> {
        let entry: Option<OutboxEntry> =
            sqlx::query_as("SELECT id, kind, key_id, kv_key, record, tightening, created_at FROM outbox WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        let Some(entry) = entry else { return Ok(None) };
        let deliveries: Vec<Delivery> = sqlx::query_as(
            "SELECT outbox_id, target, state, attempts, last_error FROM deliveries WHERE outbox_id = ? ORDER BY target",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some((entry, deliveries)))
    }

    /// Records delivery attempts in one transaction: done, or failed and due again at `retry_at`.
    pub async fn deliveries_attempted(
        &self,
        attempts: &[AttemptOutcome],
        answered: Option<i64>,
        now: i64,
    ) -> Result<(), StoreError> {
        if attempts.is_empty() && answered.is_none() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        if let Some(outbox_id) = answered {
            note_answered(&mut tx, outbox_id, now).await?;
        }
        for attempt in attempts {
            let query = match &attempt.error {
                None => sqlx::query(
                    "UPDATE deliveries SET state = ?, attempts = attempts + 1, done_at = ?, last_error = NULL, \
                     applied_at = ? WHERE outbox_id = ? AND target = ? AND state = ?",
                )
                .bind(DeliveryState::Done)
                .bind(now)
                .bind(attempt.applied_at),
                Some(error) => sqlx::query(
                    "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? \
                     WHERE outbox_id = ? AND target = ? AND state = ?",
                )
                .bind(attempt.retry_at)
                .bind(error),
            };
            let query = query.bind(attempt.outbox_id).bind(&attempt.target).bind(DeliveryState::Pending);
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Outbox entries with a delivery due by `now`, oldest first.
    pub async fn due_outbox_ids(&self, now: i64, limit: u32) -> Result<Vec<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT outbox_id FROM deliveries WHERE state = ? AND next_attempt_at <= ? \
             ORDER BY outbox_id LIMIT ?",
        )
        .bind(DeliveryState::Pending)
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Makes every pending delivery due now (at start-up, to finish what a crash left).
    pub async fn retry_all_now(&self, now: i64) -> Result<u64, StoreError> {
        let done = sqlx::query("UPDATE deliveries SET next_attempt_at = ? WHERE state = ?")
            .bind(now)
            .bind(DeliveryState::Pending)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Per target, how its deliveries stand: of one workspace's changes, or of every
    /// workspace's (the operator's view) when `workspace` is `None`. A promised delivery pending
    /// since before `stuck_before` is stuck.
    pub async fn delivery_health(
        &self,
        workspace: Option<&str>,
        stuck_before: i64,
    ) -> Result<Vec<TargetHealth>, StoreError> {
        let sql = format!(
            "SELECT d.target AS target, SUM(d.state = ?1) AS pending, \
             MIN(CASE WHEN d.state = ?1 THEN o.created_at END) AS oldest, \
             SUM(d.state = ?1 AND {PROMISED_SQL} AND o.created_at <= ?3) AS stuck, \
             SUM(d.state = ?2) AS dead_lettered, \
             (SELECT d2.last_error FROM deliveries d2 JOIN outbox o2 ON o2.id = d2.outbox_id \
              WHERE d2.target = d.target AND d2.state IN (?1, ?2) AND d2.last_error IS NOT NULL \
              AND (?4 IS NULL OR o2.workspace_id = ?4) ORDER BY d2.outbox_id DESC LIMIT 1) AS last_error \
             FROM deliveries d JOIN outbox o ON o.id = d.outbox_id \
             WHERE d.state IN (?1, ?2) AND (?4 IS NULL OR o.workspace_id = ?4) GROUP BY d.target"
        );
        Ok(sqlx::query_as(&sql)
            .bind(DeliveryState::Pending)
            .bind(DeliveryState::DeadLettered)
            .bind(stuck_before)
            .bind(workspace)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Every stuck delivery (promised, pending since before `stuck_before`) and every
    /// dead-lettered one, oldest first, at most `limit`.
    pub async fn troubled_deliveries(
        &self,
        stuck_before: i64,
        limit: u32,
    ) -> Result<Vec<TroubledDelivery>, StoreError> {
        let sql = format!(
            "SELECT d.outbox_id, o.workspace_id, o.key_id, d.target, d.state, d.attempts, o.created_at, d.last_error \
             FROM deliveries d JOIN outbox o ON o.id = d.outbox_id \
             WHERE d.state = ?1 OR (d.state = ?2 AND {PROMISED_SQL} AND o.created_at <= ?3) \
             ORDER BY d.outbox_id LIMIT ?4"
        );
        Ok(sqlx::query_as(&sql)
            .bind(DeliveryState::DeadLettered)
            .bind(DeliveryState::Pending)
            .bind(stuck_before)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Dead-letters the deliveries no promise depends on (KV writes of changes that do not
    /// tighten) still pending from changes committed before `before`. Answers how many.
    pub async fn dead_letter(&self, before: i64) -> Result<u64, StoreError> {
        let sql = format!(
            "UPDATE deliveries AS d SET state = ?1 FROM outbox AS o \
             WHERE o.id = d.outbox_id AND d.state = ?2 AND NOT {PROMISED_SQL} AND o.created_at <= ?3"
        );
        let done = sqlx::query(&sql)
            .bind(DeliveryState::DeadLettered)
            .bind(DeliveryState::Pending)
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Deletes the entries committed before `before` whose every delivery was acknowledged (or
    /// superseded) before it too, with their deliveries. Answers how many entries went.
    pub async fn prune_delivered(&self, before: i64) -> Result<u64, StoreError> {
        // An entry is kept while any delivery of it is pending, dead-lettered, or acknowledged
        // since `before`; once its deliveries are gone, nothing keeps it.
        const PRUNABLE: &str = "SELECT o.id FROM outbox o WHERE o.created_at < ?1 AND NOT EXISTS \
             (SELECT 1 FROM deliveries d WHERE d.outbox_id = o.id AND \
              (d.state IN (?2, ?3) OR (d.state = ?4 AND d.done_at >= ?1)))";
        let mut tx = self.pool.begin().await?;
        let mut pruned = 0;
        for delete in [
            format!("DELETE FROM deliveries WHERE outbox_id IN ({PRUNABLE})"),
            format!("DELETE FROM outbox WHERE id IN ({PRUNABLE})"),
        ] {
            let done = sqlx::query(&delete)
                .bind(before)
                .bind(DeliveryState::Pending)
                .bind(DeliveryState::DeadLettered)
                .bind(DeliveryState::Done)
                .execute(&mut *tx)
                .await?;
            pruned = done.rows_affected();
        }
        tx.commit().await?;
        Ok(pruned)
    }

    /// The operator's redrive: dead-lettered deliveries become pending again, and every pending
    /// one (stuck ones included) is due now, of one region or of every target.
    pub async fn redrive(&self, redrive: Redrive<'_>, actor: &Actor) -> Result<Redriven, StoreError> {
        let _chain = self.audit_lock.lock().await;
        let mut tx = self.pool.begin().await?;
        let mut counts = [0; 2];
        for (count, from) in counts.iter_mut().zip([DeliveryState::Pending, DeliveryState::DeadLettered]) {
            let done = sqlx::query(
                "UPDATE deliveries SET state = ?1, next_attempt_at = ?3 WHERE state = ?2 \
                 AND (?4 IS NULL OR target IN ('kv:' || ?4, 'purge:' || ?4))",
            )
            .bind(DeliveryState::Pending)
            .bind(from)
            .bind(redrive.now)
            .bind(redrive.region)
            .execute(&mut *tx)
            .await?;
            *count = done.rows_affected();
        }
        let after = serde_json::json!({ "region": redrive.region, "made_due": counts[0], "revived": counts[1] });
        let target = redrive.region.unwrap_or("*");
        let change = Change { workspace_id: "*", action: "outbox.redrive", target, before: None, after: Some(after) };
        audit::append(&mut tx, &self.audit_key, actor, change, redrive.now).await?;
        tx.commit().await?;
        // Pending ones first, so that the revived are not counted twice.
        Ok(Redriven { made_due: counts[0], revived: counts[1] })
    }

    /// Notes when a change's caller was answered (the first answer only).
    pub async fn note_answered(&self, outbox_id: i64, now: i64) -> Result<(), StoreError> {
        let mut connection = self.pool.acquire().await?;
        note_answered(&mut connection, outbox_id, now).await
    }

    /// The newest outbox entry of a key or root key, if one is kept.
    pub async fn newest_entry(&self, kind: EntryKind, key_id: &str) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar("SELECT MAX(id) FROM outbox WHERE kind = ? AND key_id = ?")
            .bind(kind)
            .bind(key_id)
            .fetch_one(&self.pool)
            .await?)
    }

    /// Queues root keys' records for the edge again, one entry each in one transaction (the
    /// start-up sync): the retrier delivers them, and shows what fails.
    pub async fn queue_root_keys(&self, records: &[RootKeyRecord], outbox: &NewOutbox) -> Result<Vec<i64>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut ids = Vec::with_capacity(records.len());
        for record in records {
            ids.push(insert_outbox(&mut tx, Carried::RootKey(record), outbox).await?);
        }
        tx.commit().await?;
        Ok(ids)
    }

    /// Tightening changes after `after` (an outbox id), in order: the event stream.
    pub async fn tightening_after(
        &self,
        workspace_id: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT o.id, o.kind, o.key_id, o.kv_key, o.record, o.tightening, o.created_at FROM outbox o \
             JOIN keys k ON k.id = o.key_id WHERE o.kind = ? AND o.tightening = 1 AND o.id > ? \
             AND k.workspace_id = ? ORDER BY o.id LIMIT ?",
        )
        .bind(EntryKind::Key)
        .bind(after)
        .bind(workspace_id)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?)
    }
}

/// What an outbox entry carries: a key's record, or a root key's (KV writes only).
pub(super) enum Carried<'a> {
    Key(&'a KeyRecord),
    RootKey(&'a RootKeyRecord),
    Api(&'a ApiRecord),
    Identity(&'a IdentityRecord),
}

/// Inserts an outbox entry with its deliveries, and supersedes the same targets' pending and
/// dead-lettered deliveries of older entries for the key: the new entry carries the newer
/// record, so a dead-lettered delivery is always its key's newest for its target, and a redrive
/// never sends an older record after a newer one.
pub(super) async fn insert_outbox(
    tx: &mut sqlx::SqliteConnection,
    carried: Carried<'_>,
    outbox: &NewOutbox,
) -> Result<i64, StoreError> {
    let (kind, key_id, workspace_id, kv_key, record) = match carried {
        Carried::Key(key) => {
            (EntryKind::Key, &key.id, &key.workspace_id, kv_key_for_key(&key.hash), serde_json::to_string(key))
        }
        Carried::RootKey(root) => {
            (EntryKind::RootKey, &root.id, &root.workspace_id, kv_key_for_root(&root.hash), serde_json::to_string(root))
        }
        Carried::Api(api) => {
            (EntryKind::Api, &api.id, &api.workspace_id, kv_key_for_api(&api.id), serde_json::to_string(api))
        }
        Carried::Identity(identity) => (
            EntryKind::Identity,
            &identity.id,
            &identity.workspace_id,
            kv_key_for_identity(&identity.id),
            serde_json::to_string(identity),
        ),
    };
    let record = record.context("record")?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (kind, key_id, workspace_id, kv_key, record, tightening, created_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(kind)
    .bind(key_id)
    .bind(workspace_id)
    .bind(kv_key)
    .bind(record)
    .bind(outbox.tightening)
    .bind(outbox.now)
    .fetch_one(&mut *tx)
    .await?;
    for target in outbox.reach.targets(kind, outbox.tightening) {
        sqlx::query(
            "UPDATE deliveries SET state = ? WHERE state IN (?, ?) AND target = ? \
             AND outbox_id IN (SELECT id FROM outbox WHERE kind = ? AND key_id = ? AND id < ?)",
        )
        .bind(DeliveryState::Superseded)
        .bind(DeliveryState::Pending)
        .bind(DeliveryState::DeadLettered)
        .bind(&target)
        .bind(kind)
        .bind(key_id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO deliveries (outbox_id, target, state, next_attempt_at) VALUES (?, ?, ?, ?)")
            .bind(id)
            .bind(&target)
            .bind(DeliveryState::Pending)
            .bind(outbox.first_retry_at)
            .execute(&mut *tx)
            .await?;
    }
    Ok(id)
}

/// Sets an entry's `answered_at` unless an earlier answer set it.
async fn note_answered(connection: &mut sqlx::SqliteConnection, outbox_id: i64, now: i64) -> Result<(), StoreError> {
    sqlx::query("UPDATE outbox SET answered_at = ? WHERE id = ? AND answered_at IS NULL")
        .bind(now)
        .bind(outbox_id)
        .execute(connection)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_read_back_as_written() {
        for target in [Target::Authority, Target::Kv("eu-west".into()), Target::Purge("a:b".into())] {
            assert_eq!(target.to_string().parse::<Target>().unwrap(), target);
        }
        for text in ["", "kv", "authority:x", "cache:r1"] {
            assert!(text.parse::<Target>().is_err(), "{text}");
        }
    }

    #[test]
    fn only_a_keys_tightening_change_purges() {
        let reach = Reach { authority: true, regions: vec!["r1".into(), "r2".into()] };
        let kv_only = [Target::Authority, Target::Kv("r1".into()), Target::Kv("r2".into())];
        assert_eq!(reach.targets(EntryKind::Key, false), kv_only);
        assert_eq!(reach.targets(EntryKind::RootKey, false), kv_only);
        assert_eq!(reach.targets(EntryKind::RootKey, true), kv_only, "a root key's revocation has no purges");
        let purged = reach.targets(EntryKind::Key, true);
        assert_eq!(purged.len(), 5);
        assert!(purged.contains(&Target::Purge("r2".into())));
        let no_authority = Reach { authority: false, ..reach };
        assert!(!no_authority.targets(EntryKind::Key, true).contains(&Target::Authority));
    }
}
