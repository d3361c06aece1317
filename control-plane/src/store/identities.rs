//! Identities: rows, reads, pages, and changes written with their outbox entry and audit entry
//! in one transaction (compare-and-set on the version). An identity's meta stays here; its
//! record ([`IdentityRecord`]) is what the edge gets.

use anyhow::Context;
use keyward_shared::Meta;
use keyward_shared::identity::IdentityRecord;
use keyward_shared::record::RECORD_SCHEMA;
use sqlx::FromRow;

use super::audit::{self, Change};
use super::outbox::{Carried, NewOutbox, insert_outbox};
use super::{Store, StoreError, json_column};
use crate::change::Actor;

/// An identity as the control plane keeps it: its record and its meta.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub record: IdentityRecord,
    pub meta: Meta,
}

#[derive(FromRow)]
struct IdentityRow {
    id: String,
    workspace_id: String,
    external_id: String,
    meta: String,
    credits: Option<String>,
    ratelimits: Option<String>,
    max_staleness_ms: i64,
    version: i64,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<IdentityRow> for Identity {
    type Error = anyhow::Error;

    fn try_from(r: IdentityRow) -> anyhow::Result<Identity> {
        let record = IdentityRecord {
            schema: RECORD_SCHEMA,
            credits: json_column(r.credits.as_deref(), "credits")?,
            ratelimits: json_column(r.ratelimits.as_deref(), "rate limits")?.unwrap_or_default(),
            id: r.id,
            workspace_id: r.workspace_id,
            external_id: r.external_id,
            version: r.version as u64,
            max_staleness_ms: r.max_staleness_ms as u64,
            created_at: r.created_at,
            updated_at: r.updated_at,
        };
        let meta = serde_json::from_str(&r.meta).context("stored meta is not a JSON object")?;
        Ok(Identity { record, meta })
    }
}

/// The audit log's view of an identity: its record and its meta.
fn audit_json(identity: &Identity) -> anyhow::Result<serde_json::Value> {
    let mut value = serde_json::to_value(&identity.record).context("identity")?;
    value["meta"] = serde_json::to_value(&identity.meta).context("meta")?;
    Ok(value)
}

fn clash(identity: &Identity) -> StoreError {
    StoreError::Conflict(format!(
        "an identity with external_id `{}` already exists in this workspace",
        identity.record.external_id
    ))
}

impl Store {
    /// Inserts a new identity with its outbox entry and audit entry (`identity.create`) in one
    /// transaction; a clash of `external_id` in the workspace is a conflict. Answers the
    /// entry's id.
    pub async fn create_identity(
        &self,
        identity: &Identity,
        outbox: &NewOutbox,
        actor: &Actor,
    ) -> Result<i64, StoreError> {
        let _chain = self.audit_lock.lock().await;
        let mut tx = self.pool.begin().await?;
        let r = &identity.record;
        let inserted = sqlx::query(
            "INSERT INTO identities (id, workspace_id, external_id, meta, credits, ratelimits, max_staleness_ms, \
             version, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&r.id)
        .bind(&r.workspace_id)
        .bind(&r.external_id)
        .bind(serde_json::to_string(&identity.meta).context("meta")?)
        .bind(credits_column(r)?)
        .bind(ratelimits_column(r)?)
        .bind(r.max_staleness_ms as i64)
        .bind(r.version as i64)
        .bind(r.created_at)
        .bind(r.updated_at)
        .execute(&mut *tx)
        .await;
        match inserted {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => return Err(clash(identity)),
            other => other?,
        };
        let id = insert_outbox(&mut tx, Carried::Identity(r), outbox).await?;
        let change = Change {
            workspace_id: &r.workspace_id,
            action: "identity.create",
            target: &r.id,
            before: None,
            after: Some(audit_json(identity)?),
        };
        audit::append(&mut tx, &self.audit_key, actor, change, outbox.now).await?;
        tx.commit().await?;
        actor.committed("identity.create", &r.id, r.version);
        Ok(id)
    }

    /// The identity with this id in this workspace; another workspace's is `None`.
    pub async fn identity(&self, workspace_id: &str, id: &str) -> Result<Option<Identity>, StoreError> {
        let row: Option<IdentityRow> = sqlx::query_as("SELECT * FROM identities WHERE id = ? AND workspace_id = ?")
            .bind(id)
            .bind(workspace_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(Identity::try_from).transpose()?)
    }

    /// One page of the workspace's identities after `after` (an id), in id order; with
    /// `external_id`, only the identity that has it.
    pub async fn identities(
        &self,
        workspace_id: &str,
        external_id: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Identity>, StoreError> {
        let rows: Vec<IdentityRow> = sqlx::query_as(
            "SELECT * FROM identities WHERE workspace_id = ? AND (? IS NULL OR external_id = ?) \
             AND (? IS NULL OR id > ?) ORDER BY id LIMIT ?",
        )
        .bind(workspace_id)
        .bind(external_id)
        .bind(external_id)
        .bind(after)
        .bind(after)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Identity::try_from).collect::<anyhow::Result<_>>()?)
    }

    /// Writes a changed identity whose version is one more than the stored one (`before`), with
    /// its outbox entry and audit entry (`identity.update`), in one transaction; answers the
    /// entry's id.
    pub async fn update_identity(
        &self,
        before: &Identity,
        after: &Identity,
        outbox: &NewOutbox,
        actor: &Actor,
    ) -> Result<i64, StoreError> {
        let _chain = self.audit_lock.lock().await;
        let mut tx = self.pool.begin().await?;
        let r = &after.record;
        let done = sqlx::query(
            "UPDATE identities SET external_id = ?, meta = ?, credits = ?, ratelimits = ?, version = ?, \
             updated_at = ? WHERE id = ? AND version = ?",
        )
        .bind(&r.external_id)
        .bind(serde_json::to_string(&after.meta).context("meta")?)
        .bind(credits_column(r)?)
        .bind(ratelimits_column(r)?)
        .bind(r.version as i64)
        .bind(r.updated_at)
        .bind(&r.id)
        .bind(r.version as i64 - 1)
        .execute(&mut *tx)
        .await;
        let done = match done {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => return Err(clash(after)),
            other => other?,
        };
        if done.rows_affected() != 1 {
            return Err(StoreError::VersionConflict);
        }
        let id = insert_outbox(&mut tx, Carried::Identity(r), outbox).await?;
        let change = Change {
            workspace_id: &r.workspace_id,
            action: "identity.update",
            target: &r.id,
            before: Some(audit_json(before)?),
            after: Some(audit_json(after)?),
        };
        audit::append(&mut tx, &self.audit_key, actor, change, outbox.now).await?;
        tx.commit().await?;
        actor.committed("identity.update", &r.id, r.version);
        Ok(id)
    }

    /// Deletes an identity that no key but deleted ones names, with its audit entry
    /// (`identity.delete`); a key that is not deleted naming it is a conflict (a deletion never
    /// detaches keys silently). Answers whether it existed.
    pub async fn delete_identity(&self, identity: &Identity, actor: &Actor, now: i64) -> Result<bool, StoreError> {
        let _chain = self.audit_lock.lock().await;
        let mut tx = self.pool.begin().await?;
        let r = &identity.record;
        let done = sqlx::query(
            "DELETE FROM identities WHERE id = ? AND workspace_id = ? AND NOT EXISTS \
             (SELECT 1 FROM keys WHERE identity_id = ? AND status != 'deleted')",
        )
        .bind(&r.id)
        .bind(&r.workspace_id)
        .bind(&r.id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            let used: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM keys WHERE identity_id = ? AND status != 'deleted'")
                    .bind(&r.id)
                    .fetch_one(&mut *tx)
                    .await?;
            if used > 0 {
                return Err(StoreError::Conflict(format!(
                    "{used} key(s) use this identity: detach them (PATCH /v1/keys/{{id}} with `identity_id: null`) \
                     or delete them first"
                )));
            }
            return Ok(false);
        }
        let change = Change {
            workspace_id: &r.workspace_id,
            action: "identity.delete",
            target: &r.id,
            before: Some(audit_json(identity)?),
            after: None,
        };
        audit::append(&mut tx, &self.audit_key, actor, change, now).await?;
        tx.commit().await?;
        actor.committed("identity.delete", &r.id, r.version);
        Ok(true)
    }
}

fn credits_column(r: &IdentityRecord) -> anyhow::Result<Option<String>> {
    r.credits.as_ref().map(serde_json::to_string).transpose().context("credits")
}

fn ratelimits_column(r: &IdentityRecord) -> anyhow::Result<Option<String>> {
    (!r.ratelimits.is_empty()).then(|| serde_json::to_string(&r.ratelimits)).transpose().context("ratelimits")
}
