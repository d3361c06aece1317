//! What a revocation proof reads: the change's outbox entry and its deliveries, and a key's
//! usage events around the change.

use serde::Serialize;
use sqlx::FromRow;

use super::outbox::as_text;
use super::{DeliveryState, Store, StoreError, Target};

/// One target's delivery of a change, with its times: the authority, a region's KV or a
/// region's purge (shown as stored: `purge:<region>`, `done`).
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct TargetDelivery {
    #[serde(serialize_with = "as_text")]
    pub target: Target,
    #[serde(serialize_with = "as_text")]
    pub state: DeliveryState,
    pub attempts: i64,
    /// When the control plane recorded the acknowledgement (its clock).
    pub done_at: Option<i64>,
    /// When the region began answering from the purge's record (the region's clock).
    pub applied_at: Option<i64>,
    pub last_error: Option<String>,
}

/// The outbox entry that carried a key's change: when it was committed and answered.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct ChangeEntry {
    pub id: i64,
    pub created_at: i64,
    pub answered_at: Option<i64>,
    /// The status of the record the entry carried (`active`, `revoked`, `deleted`).
    pub status: Option<String>,
}

/// One usage event of the key, as the proof shows it.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct Answer {
    pub at_ms: i64,
    pub region: String,
    pub code: String,
    pub version: Option<i64>,
    pub source: Option<String>,
    pub caller_ip: Option<String>,
    pub client_ip: Option<String>,
}

impl Store {
    /// The first outbox entry that carried version `version` of key `key_id`.
    pub async fn change_entry(&self, key_id: &str, version: u64) -> Result<Option<ChangeEntry>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, created_at, answered_at, json_extract(record, '$.status') AS status FROM outbox \
             WHERE kind = 'key' AND key_id = ? \
             AND json_extract(record, '$.version') = ? ORDER BY id LIMIT 1",
        )
        .bind(key_id)
        .bind(version as i64)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// An entry's deliveries, one per target, by target.
    pub async fn deliveries_of(&self, outbox_id: i64) -> Result<Vec<TargetDelivery>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT target, state, attempts, done_at, applied_at, last_error FROM deliveries \
             WHERE outbox_id = ? ORDER BY target",
        )
        .bind(outbox_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The key's `VALID` answers decided at or after `since_ms`, oldest first (at most `limit`).
    pub async fn valid_answers_since(
        &self,
        key_id: &str,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<Answer>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT at_ms, region, code, version, source, caller_ip, client_ip FROM usage_events \
             WHERE key_id = ? AND code = 'VALID' AND at_ms >= ? ORDER BY at_ms LIMIT ?",
        )
        .bind(key_id)
        .bind(since_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Per region, how many `VALID` answers the key had at or after `since_ms`.
    pub async fn valid_counts_since(&self, key_id: &str, since_ms: i64) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT region, COUNT(*) FROM usage_events WHERE key_id = ? AND code = 'VALID' AND at_ms >= ? \
             GROUP BY region ORDER BY region",
        )
        .bind(key_id)
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The key's `VALID` answers in `region` decided at or after `since_ms` on a record older
    /// than `version` (any record, for `None`, or when the answer names none): how many, and how
    /// many of them after `bound_ms` (none without a bound).
    pub async fn older_valid_since(
        &self,
        key_id: &str,
        region: &str,
        since_ms: i64,
        bound_ms: Option<i64>,
        version: Option<u64>,
    ) -> Result<(i64, i64), StoreError> {
        Ok(sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(at_ms > ?), 0) FROM usage_events \
             WHERE key_id = ? AND code = 'VALID' AND region = ? AND at_ms >= ? \
             AND (? IS NULL OR version IS NULL OR version < ?)",
        )
        .bind(bound_ms.unwrap_or(i64::MAX))
        .bind(key_id)
        .bind(region)
        .bind(since_ms)
        .bind(version.map(|v| v as i64))
        .bind(version.map(|v| v as i64))
        .fetch_one(&self.pool)
        .await?)
    }

    /// Per region, the key's last `VALID` answer decided before `before_ms`.
    pub async fn last_valid_before(&self, key_id: &str, before_ms: i64) -> Result<Vec<Answer>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT MAX(at_ms) AS at_ms, region, code, version, source, caller_ip, client_ip FROM usage_events \
             WHERE key_id = ? AND code = 'VALID' AND at_ms < ? GROUP BY region ORDER BY region",
        )
        .bind(key_id)
        .bind(before_ms)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The key's rejections since `since_ms`: per region and code, how many.
    pub async fn rejections_since(
        &self,
        key_id: &str,
        since_ms: i64,
    ) -> Result<Vec<(String, String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT region, code, COUNT(*) FROM usage_events WHERE key_id = ? AND code != 'VALID' AND at_ms >= ? \
             GROUP BY region, code ORDER BY region, code",
        )
        .bind(key_id)
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The sources (caller and client addresses) that have kept trying the key since `since_ms`.
    pub async fn sources_since(&self, key_id: &str, since_ms: i64) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT COALESCE(client_ip, caller_ip, '?') AS source, COUNT(*) FROM usage_events \
             WHERE key_id = ? AND at_ms >= ? GROUP BY source ORDER BY COUNT(*) DESC LIMIT 20",
        )
        .bind(key_id)
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?)
    }
}
