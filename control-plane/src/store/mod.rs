//! The database: the source of truth for workspaces, root keys, APIs and keys.
//!
//! The only module that knows SQL. SQLite at a configurable path, in WAL mode, with migrations
//! from `control-plane/migrations`. Every key change bumps the record's version and is written
//! with a compare-and-set on the old version, so two concurrent changes cannot lose one another,
//! and is written together with its outbox entry (`outbox.rs`).

mod api_policy;
pub mod audit;
mod identities;
mod keys;
mod outbox;
pub mod proof;
mod repush;
mod root_keys;
pub mod usage;

use std::path::Path;
use std::str::FromStr;

use anyhow::Context;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{FromRow, SqlitePool};

pub use identities::Identity;
pub use keys::KeyQuery;
pub use outbox::{
    AttemptOutcome, Delivery, DeliveryState, EntryKind, NewOutbox, OutboxEntry, Reach, Redrive, Redriven, Target,
    TargetHealth, TroubledDelivery, UnknownTarget,
};
pub use repush::{Repush, RepushError, Repushed};
pub use root_keys::NewRootKey;

/// A handle to the database, cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    /// The audit chain's key ([`Store::with_audit_key`]).
    audit_key: audit::AuditKey,
    /// Held while an audited change's transaction appends to the chain, so that appends in this
    /// process go one at a time (another process's append fails its transaction and is retried).
    audit_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
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
        Ok(Store { pool, audit_key: audit::AuditKey::default(), audit_lock: Default::default() })
    }

    /// The same store, chaining its audit log with `key`.
    pub fn with_audit_key(mut self, key: audit::AuditKey) -> Store {
        self.audit_key = key;
        self
    }

    pub async fn workspace_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM workspaces").fetch_one(&self.pool).await?)
    }

    /// Every workspace: (id, name), oldest first.
    pub async fn workspaces(&self) -> Result<Vec<(String, String)>, StoreError> {
        Ok(sqlx::query_as("SELECT id, name FROM workspaces ORDER BY created_at, id").fetch_all(&self.pool).await?)
    }

    pub async fn create_api(&self, api: &Api, actor: &crate::change::Actor) -> Result<(), StoreError> {
        let _chain = self.audit_lock.lock().await;
        let mut tx = self.pool.begin().await?;
        let result = sqlx::query(
            "INSERT INTO apis (id, workspace_id, name, prefix, max_staleness_ms, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&api.id)
        .bind(&api.workspace_id)
        .bind(&api.name)
        .bind(&api.prefix)
        .bind(api.max_staleness_ms as i64)
        .bind(api.created_at)
        .execute(&mut *tx)
        .await;
        match result {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(StoreError::Conflict(format!(
                    "an API named `{}` already exists in this workspace",
                    api.name
                )));
            }
            other => other?,
        };
        let after = serde_json::to_value(api).map_err(anyhow::Error::from)?;
        let change = audit::Change {
            workspace_id: &api.workspace_id,
            action: "api.create",
            target: &api.id,
            before: None,
            after: Some(after),
        };
        audit::append(&mut tx, &self.audit_key, actor, change, api.created_at).await?;
        tx.commit().await?;
        Ok(())
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

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A nullable JSON column read into its type (`None` for NULL), or an error naming `what`.
fn json_column<T: serde::de::DeserializeOwned>(text: Option<&str>, what: &str) -> anyhow::Result<Option<T>> {
    text.map(serde_json::from_str).transpose().with_context(|| format!("stored {what}"))
}
