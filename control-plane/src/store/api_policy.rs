//! An API's record at the edge (its allow and deny lists and its limit override): read, and
//! changed with its outbox entry, compare-and-set on its version, in one transaction with its
//! audit entry.

use anyhow::Context;
use keyward_shared::policy::ApiRecord;
use keyward_shared::record::RECORD_SCHEMA;
use sqlx::FromRow;

use super::audit::{self, Change};
use super::keys::policy_column;
use super::outbox::{Carried, NewOutbox, insert_outbox};
use super::{Store, StoreError, json_column};
use crate::change::Actor;

#[derive(FromRow)]
struct ApiRecordRow {
    id: String,
    workspace_id: String,
    max_staleness_ms: i64,
    policy: Option<String>,
    limit_override: Option<String>,
    version: i64,
    updated_at: i64,
}

impl TryFrom<ApiRecordRow> for ApiRecord {
    type Error = anyhow::Error;

    fn try_from(r: ApiRecordRow) -> anyhow::Result<ApiRecord> {
        Ok(ApiRecord {
            schema: RECORD_SCHEMA,
            policy: json_column(r.policy.as_deref(), "policy")?.unwrap_or_default(),
            limit_override: json_column(r.limit_override.as_deref(), "override")?,
            id: r.id,
            workspace_id: r.workspace_id,
            version: r.version as u64,
            max_staleness_ms: r.max_staleness_ms as u64,
            updated_at: r.updated_at,
        })
    }
}

const SELECT: &str = "SELECT id, workspace_id, max_staleness_ms, policy, limit_override, version, updated_at FROM apis";

impl Store {
    /// The record of the API with this id in this workspace (version 0: never changed).
    pub async fn api_record(&self, workspace_id: &str, id: &str) -> Result<Option<ApiRecord>, StoreError> {
        let row: Option<ApiRecordRow> = sqlx::query_as(&format!("{SELECT} WHERE id = ? AND workspace_id = ?"))
            .bind(id)
            .bind(workspace_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(ApiRecord::try_from).transpose()?)
    }

    /// The record of the API with this id, whatever its workspace (the origin's verify route,
    /// which has the key's record).
    pub async fn api_record_by_id(&self, id: &str) -> Result<Option<ApiRecord>, StoreError> {
        let row: Option<ApiRecordRow> =
            sqlx::query_as(&format!("{SELECT} WHERE id = ?")).bind(id).fetch_optional(&self.pool).await?;
        Ok(row.map(ApiRecord::try_from).transpose()?)
    }

    /// Writes `api`, whose `version` is one more than the stored one (`before`), with its outbox
    /// entry and its audit entry (`api.policy`), in one transaction; answers the entry's id.
    pub async fn update_api_record(
        &self,
        before: &ApiRecord,
        api: &ApiRecord,
        outbox: &NewOutbox,
        actor: &Actor,
    ) -> Result<i64, StoreError> {
        let _chain = self.audit_lock.lock().await;
        let mut tx = self.pool.begin().await?;
        let limit_override = api.limit_override.map(|o| serde_json::to_string(&o)).transpose().context("override")?;
        let done = sqlx::query(
            "UPDATE apis SET policy = ?, limit_override = ?, version = ?, updated_at = ? WHERE id = ? AND version = ?",
        )
        .bind(policy_column(&api.policy)?)
        .bind(limit_override)
        .bind(api.version as i64)
        .bind(api.updated_at)
        .bind(&api.id)
        .bind(api.version as i64 - 1)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::VersionConflict);
        }
        let id = insert_outbox(&mut tx, Carried::Api(api), outbox).await?;
        let change = Change {
            workspace_id: &api.workspace_id,
            action: "api.policy",
            target: &api.id,
            before: Some(serde_json::to_value(before).context("record")?),
            after: Some(serde_json::to_value(api).context("record")?),
        };
        audit::append(&mut tx, &self.audit_key, actor, change, outbox.now).await?;
        tx.commit().await?;
        actor.committed("api.policy", &api.id, api.version);
        Ok(id)
    }
}
