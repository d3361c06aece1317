//! The outbox: each change's deliveries (authority, KV per region, purge per region; a root key's
//! change has KV writes only), their attempts, what is pending, and the tightening key changes
//! that make the event stream.

use anyhow::Context;
use keyward_shared::{KeyRecord, RootKeyRecord, kv_key_for_key, kv_key_for_root};
use sqlx::FromRow;

use super::{Store, StoreError};

/// A change to deliver to the edge: its targets (`authority`, `kv:<region>`, `purge:<region>`).
pub struct NewOutbox<'a> {
    pub targets: &'a [String],
    pub tightening: bool,
    pub now: i64,
    /// When the retrier may first try it (the request that made it tries at once).
    pub first_retry_at: i64,
}

/// A stored outbox entry.
#[derive(Debug, Clone, FromRow)]
pub struct OutboxEntry {
    pub id: i64,
    pub key_id: String,
    pub kv_key: String,
    /// The record as JSON: the value for KV and the authority.
    pub record: String,
    pub tightening: bool,
    pub created_at: i64,
}

/// One target of an outbox entry.
#[derive(Debug, Clone, FromRow)]
pub struct Delivery {
    pub outbox_id: i64,
    pub target: String,
    /// `pending`, `done` or `superseded`.
    pub state: String,
    pub attempts: i64,
    pub last_error: Option<String>,
}

/// One delivery attempt's outcome, to record.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub outbox_id: i64,
    pub target: String,
    /// `None` when it was acknowledged.
    pub error: Option<String>,
    /// When to try again if it failed.
    pub retry_at: i64,
}

/// Pending deliveries to one target.
#[derive(Debug, Clone, FromRow)]
pub struct PendingTarget {
    pub target: String,
    pub pending: i64,
    pub oldest: i64,
    pub last_error: Option<String>,
}

impl Store {
    /// An outbox entry and its deliveries that are still pending.
    pub async fn outbox_entry(&self, id: i64) -> Result<Option<(OutboxEntry, Vec<Delivery>)>, StoreError> {
        let entry: Option<OutboxEntry> =
            sqlx::query_as("SELECT id, key_id, kv_key, record, tightening, created_at FROM outbox WHERE id = ?")
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
    pub async fn deliveries_attempted(&self, attempts: &[Attempt], now: i64) -> Result<(), StoreError> {
        if attempts.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for attempt in attempts {
            let query = match &attempt.error {
                None => sqlx::query(
                    "UPDATE deliveries SET state = 'done', attempts = attempts + 1, done_at = ?, last_error = NULL \
                     WHERE outbox_id = ? AND target = ? AND state = 'pending'",
                )
                .bind(now),
                Some(error) => sqlx::query(
                    "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? \
                     WHERE outbox_id = ? AND target = ? AND state = 'pending'",
                )
                .bind(attempt.retry_at)
                .bind(error),
            };
            query.bind(attempt.outbox_id).bind(&attempt.target).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Outbox entries with a delivery due by `now`, oldest first.
    pub async fn due_outbox_ids(&self, now: i64, limit: u32) -> Result<Vec<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT outbox_id FROM deliveries WHERE state = 'pending' AND next_attempt_at <= ? \
             ORDER BY outbox_id LIMIT ?",
        )
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Makes every pending delivery due now (at start-up, to finish what a crash left).
    pub async fn retry_all_now(&self, now: i64) -> Result<u64, StoreError> {
        let done = sqlx::query("UPDATE deliveries SET next_attempt_at = ? WHERE state = 'pending'")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Per target: pending deliveries, the creation time of the oldest, and its last error.
    pub async fn pending_by_target(&self) -> Result<Vec<PendingTarget>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT d.target AS target, COUNT(*) AS pending, MIN(o.created_at) AS oldest, \
             (SELECT last_error FROM deliveries d2 WHERE d2.target = d.target AND d2.state = 'pending' \
              AND d2.last_error IS NOT NULL ORDER BY d2.outbox_id DESC LIMIT 1) AS last_error \
             FROM deliveries d JOIN outbox o ON o.id = d.outbox_id WHERE d.state = 'pending' GROUP BY d.target",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Tightening changes after `after` (an outbox id), in order: the event stream.
    pub async fn tightening_after(
        &self,
        workspace_id: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT o.id, o.key_id, o.kv_key, o.record, o.tightening, o.created_at FROM outbox o \
             JOIN keys k ON k.id = o.key_id WHERE o.tightening = 1 AND o.id > ? AND k.workspace_id = ? \
             ORDER BY o.id LIMIT ?",
        )
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
}

/// Inserts an outbox entry with its deliveries, and supersedes the same targets' pending
/// deliveries of older entries for the key: the new entry carries the newer record.
pub(super) async fn insert_outbox(
    tx: &mut sqlx::SqliteConnection,
    carried: Carried<'_>,
    outbox: &NewOutbox<'_>,
) -> Result<i64, StoreError> {
    let (key_id, kv_key, record) = match carried {
        Carried::Key(key) => (&key.id, kv_key_for_key(&key.hash), serde_json::to_string(key)),
        Carried::RootKey(root) => (&root.id, kv_key_for_root(&root.hash), serde_json::to_string(root)),
    };
    let record = record.context("record")?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (key_id, kv_key, record, tightening, created_at) VALUES (?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(key_id)
    .bind(kv_key)
    .bind(record)
    .bind(outbox.tightening)
    .bind(outbox.now)
    .fetch_one(&mut *tx)
    .await?;
    for target in outbox.targets {
        sqlx::query(
            "UPDATE deliveries SET state = 'superseded' WHERE state = 'pending' AND target = ? \
             AND outbox_id IN (SELECT id FROM outbox WHERE key_id = ? AND id < ?)",
        )
        .bind(target)
        .bind(key_id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO deliveries (outbox_id, target, state, next_attempt_at) VALUES (?, ?, 'pending', ?)")
            .bind(id)
            .bind(target)
            .bind(outbox.first_retry_at)
            .execute(&mut *tx)
            .await?;
    }
    Ok(id)
}
