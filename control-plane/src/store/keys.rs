//! Keys: rows, reads, keyset pages, and changes written with their outbox entry.

use anyhow::Context;
use keyward_shared::record::{KeyStatus, RECORD_SCHEMA};
use keyward_shared::{KeyHash, KeyRecord};
use sqlx::{FromRow, SqliteConnection};

use super::audit::{self, Change, key_json};
use super::outbox::{Carried, NewOutbox, insert_outbox};
use super::{Store, StoreError, json_column};
use crate::change::Actor;

/// Which keys to list: one page after `after` (a key id), by id.
pub struct KeyQuery<'a> {
    pub workspace_id: &'a str,
    /// Keys of these APIs only; `None` for every API of the workspace.
    pub api_ids: Option<&'a [String]>,
    pub start: Option<&'a str>,
    pub after: Option<&'a str>,
    pub limit: u32,
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
    credits: Option<String>,
    ratelimits: Option<String>,
    policy: Option<String>,
    identity_id: Option<String>,
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
            credits: json_column(r.credits.as_deref(), "credits")?,
            ratelimits: json_column(r.ratelimits.as_deref(), "rate limits")?.unwrap_or_default(),
            policy: json_column(r.policy.as_deref(), "policy")?.unwrap_or_default(),
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
            identity_id: r.identity_id,
        })
    }
}

impl Store {
    /// Inserts a new key and its outbox entry in one transaction; answers the entry's id.
    /// `actor` made the change: the audit log will be written in this transaction.
    pub async fn create_key(&self, key: &KeyRecord, outbox: &NewOutbox, actor: &Actor) -> Result<i64, StoreError> {
        let _chain = self.audit_lock.lock().await;
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "INSERT INTO keys (id, api_id, workspace_id, hash, start, max_staleness_ms, created_at, {}) \
             VALUES (?, ?, ?, ?, ?, ?, ?, {})",
            CHANGEABLE.join(", "),
            vec!["?"; CHANGEABLE.len()].join(", ")
        );
        let query = sqlx::query(&sql)
            .bind(&key.id)
            .bind(&key.api_id)
            .bind(&key.workspace_id)
            .bind(key.hash.to_hex())
            .bind(&key.start)
            .bind(key.max_staleness_ms as i64)
            .bind(key.created_at);
        bind_changeable(query, key)?.execute(&mut *tx).await?;
        let id = insert_outbox(&mut tx, Carried::Key(key), outbox).await?;
        let change = Change {
            workspace_id: &key.workspace_id,
            action: "key.create",
            target: &key.id,
            before: None,
            after: Some(key_json(key)),
        };
        audit::append(&mut tx, &self.audit_key, actor, change, outbox.now).await?;
        tx.commit().await?;
        actor.committed("key.create", &key.id, key.version);
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

    /// One page of keys that are not deleted, in id order (keyset pagination). Every key of the
    /// page matches the query, so its last id is a cursor that names nothing else.
    pub async fn keys(&self, q: &KeyQuery<'_>) -> Result<Vec<KeyRecord>, StoreError> {
        let api_ids = q.api_ids.map(serde_json::to_string).transpose().context("api ids")?;
        // `start` is matched as a prefix of the stored display start. Not with LIKE: `_`, which
        // every start contains, is a LIKE wildcard.
        let rows: Vec<KeyRow> = sqlx::query_as(
            "SELECT * FROM keys WHERE workspace_id = ? AND status != 'deleted' \
             AND (? IS NULL OR api_id IN (SELECT value FROM json_each(?))) \
             AND (? IS NULL OR substr(start, 1, length(?)) = ?) AND (? IS NULL OR id > ?) \
             ORDER BY id LIMIT ?",
        )
        .bind(q.workspace_id)
        .bind(&api_ids)
        .bind(&api_ids)
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

    /// Writes a changed key whose `version` is one more than the stored one (`before`, as the
    /// caller read it: the compare-and-set on its version makes it the stored record), and its
    /// outbox entry, in one transaction; answers the entry's id. `actor` made the change: the audit log
    /// will be written in this transaction.
    pub async fn update_key(
        &self,
        before: &KeyRecord,
        key: &KeyRecord,
        outbox: &NewOutbox,
        actor: &Actor,
    ) -> Result<i64, StoreError> {
        let _chain = self.audit_lock.lock().await;
        // The first statement writes: a transaction that read first could not then write while
        // another connection had written since (SQLite refuses the upgrade).
        let mut tx = self.pool.begin().await?;
        let sql = format!("UPDATE keys SET {} = ? WHERE id = ? AND version = ?", CHANGEABLE.join(" = ?, "));
        let done = bind_changeable(sqlx::query(&sql), key)?
            .bind(&key.id)
            .bind(key.version as i64 - 1)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::VersionConflict);
        }
        let id = insert_outbox(&mut tx, Carried::Key(key), outbox).await?;
        let change = Change {
            workspace_id: &key.workspace_id,
            action: update_action(before, key),
            target: &key.id,
            before: Some(key_json(before)),
            after: Some(key_json(key)),
        };
        audit::append(&mut tx, &self.audit_key, actor, change, outbox.now).await?;
        tx.commit().await?;
        actor.committed("key.update", &key.id, key.version);
        Ok(id)
    }

    /// Adds an outbox entry for a key without changing it (revoking again re-sends purges).
    /// `actor` made the change: the audit log will be written in this transaction.
    pub async fn resend(&self, key: &KeyRecord, outbox: &NewOutbox, actor: &Actor) -> Result<i64, StoreError> {
        let _chain = self.audit_lock.lock().await;
        let mut tx = self.pool.begin().await?;
        let id = insert_outbox(&mut tx, Carried::Key(key), outbox).await?;
        let action = match key.status {
            KeyStatus::Revoked => "key.revoke",
            KeyStatus::Deleted => "key.delete",
            _ => "key.resend",
        };
        let change = Change {
            workspace_id: &key.workspace_id,
            action,
            target: &key.id,
            before: None,
            after: Some(key_json(key)),
        };
        audit::append(&mut tx, &self.audit_key, actor, change, outbox.now).await?;
        tx.commit().await?;
        actor.committed("key.resend", &key.id, key.version);
        Ok(id)
    }
}

/// The key with this id, whatever its workspace, deleted ones included, read in `connection`
/// (an operator's command, which answers to no workspace).
pub(super) async fn key_by_id(connection: &mut SqliteConnection, id: &str) -> Result<Option<KeyRecord>, StoreError> {
    let row: Option<KeyRow> =
        sqlx::query_as("SELECT * FROM keys WHERE id = ?").bind(id).fetch_optional(connection).await?;
    Ok(row.map(KeyRecord::try_from).transpose()?)
}

/// What an update did, as the audit log names it: a final status reached, or an update.
fn update_action(before: &KeyRecord, after: &KeyRecord) -> &'static str {
    match after.status {
        KeyStatus::Revoked if before.status != KeyStatus::Revoked => "key.revoke",
        KeyStatus::Deleted if before.status != KeyStatus::Deleted => "key.delete",
        _ if before.credits != after.credits => "key.credits",
        _ if before.ratelimits != after.ratelimits => "key.ratelimits",
        _ if before.policy != after.policy => "key.policy",
        _ if before.identity_id != after.identity_id => "key.identity",
        _ => "key.update",
    }
}

/// The columns a change may write, in the order [`bind_changeable`] binds them.
const CHANGEABLE: [&str; 13] = [
    "name",
    "owner_id",
    "meta",
    "enabled",
    "status",
    "expires_at",
    "permissions",
    "version",
    "updated_at",
    "credits",
    "ratelimits",
    "policy",
    "identity_id",
];

type Query<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

/// Binds the [`CHANGEABLE`] columns of `key`, in order: one list for both inserts and updates.
fn bind_changeable<'q>(query: Query<'q>, key: &'q KeyRecord) -> anyhow::Result<Query<'q>> {
    Ok(query
        .bind(&key.name)
        .bind(&key.owner_id)
        .bind(meta_column(key)?)
        .bind(key.enabled)
        .bind(key.status.as_str())
        .bind(key.expires_at)
        .bind(permissions_column(key)?)
        .bind(key.version as i64)
        .bind(key.updated_at)
        .bind(key.credits.as_ref().map(serde_json::to_string).transpose().context("credits")?)
        .bind(ratelimits_column(key)?)
        .bind(policy_column(&key.policy)?)
        .bind(&key.identity_id))
}

/// The `ratelimits` column: the key's limits as a JSON list (NULL: none).
fn ratelimits_column(key: &KeyRecord) -> anyhow::Result<Option<String>> {
    if key.ratelimits.is_empty() {
        return Ok(None);
    }
    serde_json::to_string(&key.ratelimits).map(Some).context("ratelimits")
}

/// The `policy` column (of keys and APIs): the lists as JSON, NULL when all are empty.
pub(super) fn policy_column(policy: &keyward_shared::policy::Policy) -> anyhow::Result<Option<String>> {
    (!policy.is_empty()).then(|| serde_json::to_string(policy)).transpose().context("policy")
}

/// The `meta` column: the key's meta as JSON text.
fn meta_column(key: &KeyRecord) -> anyhow::Result<String> {
    serde_json::to_string(&key.meta).context("meta")
}

/// The `permissions` column: the key's permissions as a JSON list.
fn permissions_column(key: &KeyRecord) -> anyhow::Result<String> {
    serde_json::to_string(&key.permissions).context("permissions")
}
