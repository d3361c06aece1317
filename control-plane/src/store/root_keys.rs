//! Root keys: stored hashed, with their scopes; created (with a new workspace, for a workspace's
//! first), listed and revoked within a workspace. A change that the edge must learn of is written
//! with its outbox entry (the authority and every region's KV), as keys' are.

use anyhow::Context;
use keyward_shared::record::{KeyStatus, RECORD_SCHEMA};
use keyward_shared::{KeyHash, RootKeyRecord, Scopes};
use sqlx::FromRow;

use super::audit::{self, Change, root_key_json};
use super::outbox::{Carried, NewOutbox, Reach, Target, insert_outbox};
use super::{Store, StoreError};
use crate::change::Actor;

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

/// A root key with its name and display start, which the edge's record leaves out.
#[derive(FromRow)]
struct NamedRootKey {
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

impl Store {
    /// Stores a new root key, after creating its workspace, named `new_workspace`, when given,
    /// and with an outbox entry writing it to the edge when `outbox` is given (a root key that may
    /// verify: the edge reads it), in one transaction; answers the entry's id. `actor` made the
    /// change: the audit log will be written in this transaction.
    pub async fn create_root_key(
        &self,
        root: NewRootKey<'_>,
        new_workspace: Option<&str>,
        outbox: Option<&NewOutbox>,
        actor: &Actor,
    ) -> Result<Option<i64>, StoreError> {
        let _chain = self.audit_lock.lock().await;
        let mut tx = self.pool.begin().await?;
        if let Some(name) = new_workspace {
            sqlx::query("INSERT INTO workspaces (id, name, created_at) VALUES (?, ?, ?)")
                .bind(root.workspace_id)
                .bind(name)
                .bind(root.now)
                .execute(&mut *tx)
                .await?;
        }
        let outbox_id = insert_root_key(&mut tx, &root, outbox).await?;
        let after = serde_json::json!({
            "id": root.id, "workspace_id": root.workspace_id, "name": root.name, "start": root.start,
            "scopes": root.scopes, "workspace_name": new_workspace,
        });
        let (action, target) = match new_workspace {
            Some(_) => ("workspace.create", root.workspace_id),
            None => ("root_key.create", root.id),
        };
        let change = Change { workspace_id: root.workspace_id, action, target, before: None, after: Some(after) };
        audit::append(&mut tx, &self.audit_key, actor, change, root.now).await?;
        tx.commit().await?;
        actor.committed("root_key.create", root.id, 1);
        Ok(outbox_id)
    }

    /// The active root key with this hash, if any, and its name.
    pub async fn active_root_key(&self, hash: &KeyHash) -> Result<Option<(RootKeyRecord, String)>, StoreError> {
        let row: Option<NamedRootKey> = sqlx::query_as(&format!(
            "SELECT {ROOT_KEY_COLUMNS}, name, start FROM root_keys WHERE hash = ? AND status = 'active'"
        ))
        .bind(hash.to_hex())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((RootKeyRecord::try_from(r.key)?, r.name))).transpose()
    }

    /// Every root key, for writing those that may verify to KV.
    pub async fn root_keys(&self) -> Result<Vec<RootKeyRecord>, StoreError> {
        let rows: Vec<RootKeyRow> =
            sqlx::query_as(&format!("SELECT {ROOT_KEY_COLUMNS} FROM root_keys")).fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(RootKeyRecord::try_from).collect::<anyhow::Result<_>>()?)
    }

    /// Where the control plane last delivered a change: the targets of the newest outbox entry
    /// that has deliveries (none when it never delivered anything). `keyward admin recover`
    /// writes its root key's entry there: it opens the database without the configuration.
    pub async fn last_reach(&self) -> Result<Reach, StoreError> {
        let targets: Vec<Target> = sqlx::query_scalar(
            "SELECT target FROM deliveries WHERE outbox_id = (SELECT MAX(outbox_id) FROM deliveries) ORDER BY target",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut reach = Reach::default();
        for target in targets {
            match target {
                Target::Authority => reach.authority = true,
                Target::Kv(region) => reach.regions.push(region),
                Target::Purge(_) => {}
            }
        }
        Ok(reach)
    }

    /// The workspace's root keys: (record, name, display start), oldest first.
    pub async fn workspace_root_keys(
        &self,
        workspace_id: &str,
    ) -> Result<Vec<(RootKeyRecord, String, String)>, StoreError> {
        let rows: Vec<NamedRootKey> = sqlx::query_as(&format!(
            "SELECT {ROOT_KEY_COLUMNS}, name, start FROM root_keys WHERE workspace_id = ? ORDER BY id"
        ))
        .bind(workspace_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(|r| Ok((RootKeyRecord::try_from(r.key)?, r.name, r.start))).collect()
    }

    /// Revokes a root key of this workspace, with an outbox entry writing the revoked record to
    /// the edge, in one transaction; answers the record and the entry's id, `None` if there is no
    /// such root key. `actor` made the change: the audit log will be written in this transaction.
    pub async fn revoke_root_key(
        &self,
        workspace_id: &str,
        id: &str,
        outbox: &NewOutbox,
        actor: &Actor,
    ) -> Result<Option<(RootKeyRecord, i64)>, StoreError> {
        let _chain = self.audit_lock.lock().await;
        let mut tx = self.pool.begin().await?;
        let row: Option<RootKeyRow> = sqlx::query_as(&format!(
            "UPDATE root_keys SET status = 'revoked', version = version + CASE status WHEN 'revoked' THEN 0 ELSE 1 END, \
             updated_at = ? WHERE id = ? AND workspace_id = ? RETURNING {ROOT_KEY_COLUMNS}",
        ))
        .bind(outbox.now)
        .bind(id)
        .bind(workspace_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(record) = row.map(RootKeyRecord::try_from).transpose()? else { return Ok(None) };
        let outbox_id = insert_outbox(&mut tx, Carried::RootKey(&record), outbox).await?;
        let change = Change {
            workspace_id,
            action: "root_key.revoke",
            target: &record.id,
            before: None,
            after: Some(root_key_json(&record)),
        };
        audit::append(&mut tx, &self.audit_key, actor, change, outbox.now).await?;
        tx.commit().await?;
        actor.committed("root_key.revoke", &record.id, record.version);
        Ok(Some((record, outbox_id)))
    }
}

/// The root key with this id, whatever its workspace and status, read in `connection` (an
/// operator's command, which answers to no workspace).
pub(super) async fn root_key_by_id(
    connection: &mut sqlx::SqliteConnection,
    id: &str,
) -> Result<Option<RootKeyRecord>, StoreError> {
    let row: Option<RootKeyRow> = sqlx::query_as(&format!("SELECT {ROOT_KEY_COLUMNS} FROM root_keys WHERE id = ?"))
        .bind(id)
        .fetch_optional(connection)
        .await?;
    Ok(row.map(RootKeyRecord::try_from).transpose()?)
}

/// Inserts a root key and, when `outbox` is given, the outbox entry writing it to KV.
async fn insert_root_key(
    tx: &mut sqlx::SqliteConnection,
    root: &NewRootKey<'_>,
    outbox: Option<&NewOutbox>,
) -> Result<Option<i64>, StoreError> {
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
    .execute(&mut *tx)
    .await?;
    let Some(outbox) = outbox else { return Ok(None) };
    // The record as just inserted: active, version 1.
    let record = RootKeyRecord {
        schema: RECORD_SCHEMA,
        id: root.id.to_owned(),
        hash: *root.hash,
        workspace_id: root.workspace_id.to_owned(),
        scopes: root.scopes.clone(),
        status: KeyStatus::Active,
        version: 1,
        updated_at: root.now,
    };
    Ok(Some(insert_outbox(tx, Carried::RootKey(&record), outbox).await?))
}
