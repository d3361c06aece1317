//! The database: the source of truth for workspaces, root keys, APIs and keys.
//!
//! The only module that knows SQL. SQLite at a configurable path, in WAL mode, with migrations
//! from `control-plane/migrations`. Every key change bumps the record's version and is written
//! with a compare-and-set on the old version, so two concurrent changes cannot lose one another.

use std::path::Path;
use std::str::FromStr;

use anyhow::Context;
use keyward_shared::record::{KeyStatus, RECORD_SCHEMA};
use keyward_shared::{KeyHash, KeyRecord, RootKeyRecord, Scopes};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{FromRow, SqlitePool};

/// A handle to the database, cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

/// Why a store call failed in a way the caller should answer for.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Conflict(String),
    #[error("the record changed concurrently; retry")]
    VersionConflict,
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> StoreError {
        StoreError::Other(e.into())
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Api {
    pub id: String,
    pub workspace_id: String,
    pub name: String,
    pub prefix: String,
    pub max_staleness_ms: u64,
    pub created_at: i64,
}

#[derive(FromRow)]
struct ApiRow {
    id: String,
    workspace_id: String,
    name: String,
    prefix: String,
    max_staleness_ms: i64,
    created_at: i64,
}

impl From<ApiRow> for Api {
    fn from(r: ApiRow) -> Api {
        Api {
            id: r.id,
            workspace_id: r.workspace_id,
            name: r.name,
            prefix: r.prefix,
            max_staleness_ms: r.max_staleness_ms as u64,
            created_at: r.created_at,
        }
    }
}

#[derive(FromRow)]
struct KeyRow {
    id: String,
    api_id: String,
    workspace_id: String,
    hash: String,
    start: String,
    name: Option<String>,
    owner_id: Option<String>,
    meta: String,
    enabled: bool,
    status: String,
    expires_at: Option<i64>,
    permissions: String,
    version: i64,
    max_staleness_ms: i64,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<KeyRow> for KeyRecord {
    type Error = anyhow::Error;

    fn try_from(r: KeyRow) -> anyhow::Result<KeyRecord> {
        Ok(KeyRecord {
            schema: RECORD_SCHEMA,
            hash: KeyHash::from_hex(&r.hash).context("stored key hash is not hex")?,
            meta: serde_json::from_str(&r.meta).context("stored meta is not a JSON object")?,
            status: KeyStatus::parse(&r.status).context("stored key status is unknown")?,
            permissions: serde_json::from_str(&r.permissions).context("stored permissions are not a list")?,
            id: r.id,
            api_id: r.api_id,
            workspace_id: r.workspace_id,
            start: r.start,
            name: r.name,
            owner_id: r.owner_id,
            enabled: r.enabled,
            expires_at: r.expires_at,
            version: r.version as u64,
            max_staleness_ms: r.max_staleness_ms as u64,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

#[derive(FromRow)]
struct RootKeyRow {
    id: String,
    workspace_id: String,
    hash: String,
    scopes: String,
    status: String,
    version: i64,
    updated_at: i64,
}

/// The columns a [`RootKeyRow`] reads.
const ROOT_KEY_COLUMNS: &str = "id, workspace_id, hash, scopes, status, version, updated_at";

#[derive(FromRow)]
struct ListedRootKey {
    #[sqlx(flatten)]
    key: RootKeyRow,
    name: String,
    start: String,
}

impl TryFrom<RootKeyRow> for RootKeyRecord {
    type Error = anyhow::Error;

    fn try_from(r: RootKeyRow) -> anyhow::Result<RootKeyRecord> {
        Ok(RootKeyRecord {
            schema: RECORD_SCHEMA,
            hash: KeyHash::from_hex(&r.hash).context("stored root key hash is not hex")?,
            scopes: serde_json::from_str(&r.scopes).context("stored scopes are unreadable")?,
            status: KeyStatus::parse(&r.status).context("stored root key status is unknown")?,
            id: r.id,
            workspace_id: r.workspace_id,
            version: r.version as u64,
            updated_at: r.updated_at,
        })
    }
}

/// A new root key, as stored (hashed).
pub struct NewRootKey<'a> {
    pub id: &'a str,
    pub workspace_id: &'a str,
    pub name: &'a str,
    pub hash: &'a KeyHash,
    pub start: &'a str,
    pub scopes: &'a Scopes,
    pub now: i64,
}

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

/// Which keys to list: one page after `after` (a key id), by id.
pub struct KeyQuery<'a> {
    pub workspace_id: &'a str,
    pub api_id: Option<&'a str>,
    pub start: Option<&'a str>,
    pub after: Option<&'a str>,
    pub limit: u32,
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path` and runs migrations.
    pub async fn open(path: &Path) -> anyhow::Result<Store> {
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .with_context(|| format!("cannot open database {}", path.display()))?;
        sqlx::migrate!("./migrations").run(&pool).await.context("database migration failed")?;
        Ok(Store { pool })
    }

    pub async fn workspace_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM workspaces").fetch_one(&self.pool).await?)
    }

    /// Creates a workspace and its first root key in one transaction.
    pub async fn create_workspace(&self, id: &str, name: &str, root: NewRootKey<'_>) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO workspaces (id, name, created_at) VALUES (?, ?, ?)")
            .bind(id)
            .bind(name)
            .bind(root.now)
            .execute(&mut *tx)
            .await?;
        insert_root_key(&mut tx, &root).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn create_root_key(&self, root: NewRootKey<'_>) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        insert_root_key(&mut tx, &root).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The active root key with this hash, if any.
    pub async fn active_root_key(&self, hash: &KeyHash) -> Result<Option<RootKeyRecord>, StoreError> {
        let row: Option<RootKeyRow> =
            sqlx::query_as(&format!("SELECT {ROOT_KEY_COLUMNS} FROM root_keys WHERE hash = ? AND status = 'active'"))
                .bind(hash.to_hex())
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(RootKeyRecord::try_from).transpose()?)
    }

    /// Every root key, for writing those that may verify to KV.
    pub async fn root_keys(&self) -> Result<Vec<RootKeyRecord>, StoreError> {
        let rows: Vec<RootKeyRow> =
            sqlx::query_as(&format!("SELECT {ROOT_KEY_COLUMNS} FROM root_keys")).fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(RootKeyRecord::try_from).collect::<anyhow::Result<_>>()?)
    }

    /// The workspace's root keys: (record, name, display start), oldest first.
    pub async fn workspace_root_keys(
        &self,
        workspace_id: &str,
    ) -> Result<Vec<(RootKeyRecord, String, String)>, StoreError> {
        let rows: Vec<ListedRootKey> = sqlx::query_as(&format!(
            "SELECT {ROOT_KEY_COLUMNS}, name, start FROM root_keys WHERE workspace_id = ? ORDER BY id"
        ))
        .bind(workspace_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(|r| Ok((RootKeyRecord::try_from(r.key)?, r.name, r.start))).collect()
    }

    /// Revokes a root key of this workspace; answers its new record, `None` if there is none.
    pub async fn revoke_root_key(
        &self,
        workspace_id: &str,
        id: &str,
        now: i64,
    ) -> Result<Option<RootKeyRecord>, StoreError> {
        let row: Option<RootKeyRow> = sqlx::query_as(&format!(
            "UPDATE root_keys SET status = 'revoked', version = version + CASE status WHEN 'revoked' THEN 0 ELSE 1 END, \
             updated_at = ? WHERE id = ? AND workspace_id = ? RETURNING {ROOT_KEY_COLUMNS}",
        ))
        .bind(now)
        .bind(id)
        .bind(workspace_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(RootKeyRecord::try_from).transpose()?)
    }

    pub async fn create_api(&self, api: &Api) -> Result<(), StoreError> {
        let result = sqlx::query(
            "INSERT INTO apis (id, workspace_id, name, prefix, max_staleness_ms, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&api.id)
        .bind(&api.workspace_id)
        .bind(&api.name)
        .bind(&api.prefix)
        .bind(api.max_staleness_ms as i64)
        .bind(api.created_at)
        .execute(&self.pool)
        .await;
        match result {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::Conflict(format!("an API named `{}` already exists in this workspace", api.name)))
            }
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    pub async fn apis(&self, workspace_id: &str) -> Result<Vec<Api>, StoreError> {
        let rows: Vec<ApiRow> = sqlx::query_as(
            "SELECT id, workspace_id, name, prefix, max_staleness_ms, created_at FROM apis WHERE workspace_id = ? ORDER BY id",
        )
        .bind(workspace_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Api::from).collect())
    }

    /// The API with this id in this workspace; another workspace's API is `None`.
    pub async fn api(&self, workspace_id: &str, id: &str) -> Result<Option<Api>, StoreError> {
        let row: Option<ApiRow> = sqlx::query_as(
            "SELECT id, workspace_id, name, prefix, max_staleness_ms, created_at FROM apis WHERE id = ? AND workspace_id = ?",
        )
        .bind(id)
        .bind(workspace_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Api::from))
    }

    /// Inserts a new key and its outbox entry in one transaction; answers the entry's id.
    pub async fn create_key(&self, key: &KeyRecord, outbox: &NewOutbox<'_>) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO keys (id, api_id, workspace_id, hash, start, name, owner_id, meta, enabled, status, \
             expires_at, permissions, version, max_staleness_ms, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&key.id)
        .bind(&key.api_id)
        .bind(&key.workspace_id)
        .bind(key.hash.to_hex())
        .bind(&key.start)
        .bind(&key.name)
        .bind(&key.owner_id)
        .bind(serde_json::Value::Object(key.meta.clone()).to_string())
        .bind(key.enabled)
        .bind(key.status.as_str())
        .bind(key.expires_at)
        .bind(serde_json::to_string(&key.permissions).context("permissions")?)
        .bind(key.version as i64)
        .bind(key.max_staleness_ms as i64)
        .bind(key.created_at)
        .bind(key.updated_at)
        .execute(&mut *tx)
        .await?;
        let id = insert_outbox(&mut tx, key, outbox).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// The key with this id in this workspace, deleted ones included.
    pub async fn key(&self, workspace_id: &str, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let row: Option<KeyRow> = sqlx::query_as("SELECT * FROM keys WHERE id = ? AND workspace_id = ?")
            .bind(id)
            .bind(workspace_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(KeyRecord::try_from).transpose()?)
    }

    pub async fn key_by_hash(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
        let row: Option<KeyRow> =
            sqlx::query_as("SELECT * FROM keys WHERE hash = ?").bind(hash.to_hex()).fetch_optional(&self.pool).await?;
        Ok(row.map(KeyRecord::try_from).transpose()?)
    }

    /// One page of keys that are not deleted, in id order (keyset pagination).
    pub async fn keys(&self, q: &KeyQuery<'_>) -> Result<Vec<KeyRecord>, StoreError> {
        // `start` is matched as a prefix of the stored display start. Not with LIKE: `_`, which
        // every start contains, is a LIKE wildcard.
        let rows: Vec<KeyRow> = sqlx::query_as(
            "SELECT * FROM keys WHERE workspace_id = ? AND status != 'deleted' \
             AND (? IS NULL OR api_id = ?) AND (? IS NULL OR substr(start, 1, length(?)) = ?) AND (? IS NULL OR id > ?) \
             ORDER BY id LIMIT ?",
        )
        .bind(q.workspace_id)
        .bind(q.api_id)
        .bind(q.api_id)
        .bind(q.start)
        .bind(q.start)
        .bind(q.start)
        .bind(q.after)
        .bind(q.after)
        .bind(q.limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(KeyRecord::try_from).collect::<anyhow::Result<_>>()?)
    }

    /// Writes a changed key whose `version` is one more than the stored one, and its outbox
    /// entry, in one transaction; answers the entry's id.
    pub async fn update_key(&self, key: &KeyRecord, outbox: &NewOutbox<'_>) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE keys SET name = ?, owner_id = ?, meta = ?, enabled = ?, status = ?, expires_at = ?, \
             permissions = ?, version = ?, updated_at = ? WHERE id = ? AND version = ?",
        )
        .bind(&key.name)
        .bind(&key.owner_id)
        .bind(serde_json::Value::Object(key.meta.clone()).to_string())
        .bind(key.enabled)
        .bind(key.status.as_str())
        .bind(key.expires_at)
        .bind(serde_json::to_string(&key.permissions).context("permissions")?)
        .bind(key.version as i64)
        .bind(key.updated_at)
        .bind(&key.id)
        .bind(key.version as i64 - 1)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::VersionConflict);
        }
        let id = insert_outbox(&mut tx, key, outbox).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Adds an outbox entry for a key without changing it (revoking again re-sends purges).
    pub async fn resend(&self, key: &KeyRecord, outbox: &NewOutbox<'_>) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let id = insert_outbox(&mut tx, key, outbox).await?;
        tx.commit().await?;
        Ok(id)
    }

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

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Inserts an outbox entry with its deliveries, and supersedes the same targets' pending
/// deliveries of older entries for the key: the new entry carries the newer record.
async fn insert_outbox(
    tx: &mut sqlx::SqliteConnection,
    key: &KeyRecord,
    outbox: &NewOutbox<'_>,
) -> Result<i64, StoreError> {
    let record = serde_json::to_string(key).context("record")?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (key_id, kv_key, record, tightening, created_at) VALUES (?, ?, ?, ?, ?) RETURNING id",
    )
    .bind(&key.id)
    .bind(keyward_shared::kv_key_for_key(&key.hash))
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
        .bind(&key.id)
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

async fn insert_root_key(tx: &mut sqlx::SqliteConnection, root: &NewRootKey<'_>) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO root_keys (id, workspace_id, name, hash, start, scopes, status, version, created_at, updated_at) \
         VALUES (?, ?, ?, ?, ?, ?, 'active', 1, ?, ?)",
    )
    .bind(root.id)
    .bind(root.workspace_id)
    .bind(root.name)
    .bind(root.hash.to_hex())
    .bind(root.start)
    .bind(serde_json::to_string(root.scopes).context("scopes")?)
    .bind(root.now)
    .bind(root.now)
    .execute(tx)
    .await?;
    Ok(())
}
