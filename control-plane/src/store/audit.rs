//! The audit log: every admin change, appended in the change's own transaction, chained with
//! an HMAC keyed by a secret kept outside the database.
//!
//! Entry `n`'s `mac` is HMAC-SHA256(secret, entry `n-1`'s `mac` ‖ entry `n`'s `body`), where
//! `body` is the entry as canonical JSON (its columns are copies, for queries, and are checked
//! against it). Someone with the database but not the secret can neither edit an entry in place
//! nor recompute the chain after an edit; entries deleted from the end are found against a
//! checkpoint (the chain's head, signed) saved before. Appends are serialised (one at a time,
//! each reading the head inside its transaction), so the chain has no forks. Nothing updates or
//! deletes entries.

use std::sync::Arc;

use hmac::{Hmac, Mac};
use keyward_shared::{KeyRecord, RootKeyRecord};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;
use sqlx::{QueryBuilder, Sqlite, SqliteConnection};

use super::{Store, StoreError};
use crate::change::Actor;

type HmacSha256 = Hmac<Sha256>;

/// The chain's key: the audit secret (or, without one, the purge secret). Empty only in
/// in-process tests that configure none.
#[derive(Clone, Default)]
pub struct AuditKey(Arc<Vec<u8>>);

impl AuditKey {
    pub fn new(secret: &[u8]) -> AuditKey {
        AuditKey(Arc::new(secret.to_vec()))
    }

    fn mac(&self, previous: &str, body: &str) -> String {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(previous.as_bytes());
        mac.update(b"\n");
        mac.update(body.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// The checkpoint's signature over its fields.
    fn sign_checkpoint(&self, id: i64, mac: &str, at_ms: i64) -> String {
        self.mac("checkpoint", &format!("{id}\n{mac}\n{at_ms}"))
    }
}

/// What one entry says (its `body`, as canonical JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditBody {
    pub at_ms: i64,
    pub workspace_id: String,
    /// `request`, `console` or `system`.
    pub actor: String,
    pub root_key_id: Option<String>,
    pub root_key_name: Option<String>,
    /// The `keyward` command, for a console actor.
    pub command: Option<String>,
    pub request_id: Option<String>,
    pub remote_addr: Option<String>,
    pub user_agent: Option<String>,
    /// `key.create`, `key.revoke`, `root_key.create`, `outbox.redrive`, ...
    pub action: String,
    /// The id of what changed.
    pub target: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
}

/// A stored entry: its number, body and chain value.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    #[serde(flatten)]
    pub body: AuditBody,
    pub mac: String,
}

/// The chain's head, signed: saved by an operator, it later shows entries deleted from the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub id: i64,
    pub mac: String,
    pub at_ms: i64,
    pub signature: String,
}

/// Which entries a query reads, newest first.
#[derive(Debug, Default)]
pub struct AuditQuery<'a> {
    pub workspace_id: Option<&'a str>,
    pub target: Option<&'a str>,
    pub root_key_id: Option<&'a str>,
    pub action: Option<&'a str>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub before_id: Option<i64>,
    pub limit: i64,
}

/// Where the chain breaks, if it does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verified {
    pub entries: i64,
    pub head: Option<Checkpoint>,
    /// The first entry that does not verify, and why.
    pub broken: Option<(i64, String)>,
}

/// A key's record as the audit log keeps it: without its hash (which the key view never shows).
pub fn key_json(record: &KeyRecord) -> Value {
    let mut value = serde_json::to_value(record).unwrap_or(Value::Null);
    if let Some(map) = value.as_object_mut() {
        map.remove("hash");
    }
    value
}

/// A root key's record as the audit log keeps it: without its hash.
pub fn root_key_json(record: &RootKeyRecord) -> Value {
    let mut value = serde_json::to_value(record).unwrap_or(Value::Null);
    if let Some(map) = value.as_object_mut() {
        map.remove("hash");
    }
    value
}

/// What an admin change appends: its action, target and the record before and after.
pub struct Change<'a> {
    pub workspace_id: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    pub before: Option<Value>,
    pub after: Option<Value>,
}

impl AuditBody {
    fn new(actor: &Actor, change: Change<'_>, at_ms: i64) -> AuditBody {
        let request = actor.request();
        let (kind, command) = match actor {
            Actor::System => ("system", None),
            Actor::Console(command) => ("console", Some((*command).to_owned())),
            Actor::Request(_) => ("request", None),
        };
        AuditBody {
            at_ms,
            workspace_id: change.workspace_id.to_owned(),
            actor: kind.to_owned(),
            root_key_id: request.map(|r| r.root_key_id.clone()),
            root_key_name: request.map(|r| r.root_key_name.clone()),
            command,
            request_id: request.map(|r| r.request_id.clone()),
            remote_addr: request.and_then(|r| r.remote_addr).map(|a| a.to_string()),
            user_agent: request.and_then(|r| r.user_agent.clone()),
            action: change.action.to_owned(),
            target: change.target.to_owned(),
            before: change.before,
            after: change.after,
        }
    }
}

/// Appends one entry in `tx`, the change's own transaction. The caller holds the append lock
/// ([`Store::audit_lock`]).
pub async fn append(
    tx: &mut SqliteConnection,
    key: &AuditKey,
    actor: &Actor,
    change: Change<'_>,
    at_ms: i64,
) -> Result<(), StoreError> {
    let body = AuditBody::new(actor, change, at_ms);
    let text = serde_json::to_string(&body).map_err(anyhow::Error::from)?;
    let previous: Option<String> =
        sqlx::query_scalar("SELECT mac FROM audit_log ORDER BY id DESC LIMIT 1").fetch_optional(&mut *tx).await?;
    let mac = key.mac(previous.as_deref().unwrap_or(""), &text);
    sqlx::query(
        "INSERT INTO audit_log (at_ms, workspace_id, root_key_id, action, target, body, mac) \
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(body.at_ms)
    .bind(&body.workspace_id)
    .bind(&body.root_key_id)
    .bind(&body.action)
    .bind(&body.target)
    .bind(&text)
    .bind(&mac)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    at_ms: i64,
    workspace_id: String,
    root_key_id: Option<String>,
    action: String,
    target: String,
    body: String,
    mac: String,
}

impl Store {
    /// Entries matching `q`, newest first.
    pub async fn audit_entries(&self, q: &AuditQuery<'_>) -> Result<Vec<AuditEntry>, StoreError> {
        let mut b = QueryBuilder::<Sqlite>::new("SELECT * FROM audit_log WHERE 1 = 1");
        if let Some(v) = q.workspace_id {
            b.push(" AND workspace_id = ").push_bind(v.to_owned());
        }
        if let Some(v) = q.target {
            b.push(" AND target = ").push_bind(v.to_owned());
        }
        if let Some(v) = q.root_key_id {
            b.push(" AND root_key_id = ").push_bind(v.to_owned());
        }
        if let Some(v) = q.action {
            b.push(" AND action = ").push_bind(v.to_owned());
        }
        if let Some(v) = q.from_ms {
            b.push(" AND at_ms >= ").push_bind(v);
        }
        if let Some(v) = q.to_ms {
            b.push(" AND at_ms < ").push_bind(v);
        }
        if let Some(v) = q.before_id {
            b.push(" AND id < ").push_bind(v);
        }
        b.push(" ORDER BY id DESC LIMIT ").push_bind(q.limit);
        let rows: Vec<Row> = b.build_query_as().fetch_all(&self.pool).await?;
        rows.into_iter()
            .map(|r| {
                let body = serde_json::from_str(&r.body).map_err(anyhow::Error::from)?;
                Ok(AuditEntry { id: r.id, body, mac: r.mac })
            })
            .collect()
    }

    /// The chain's head, signed now; `None` while the log is empty.
    pub async fn audit_checkpoint(&self, now_ms: i64) -> Result<Option<Checkpoint>, StoreError> {
        let head: Option<(i64, String)> =
            sqlx::query_as("SELECT id, mac FROM audit_log ORDER BY id DESC LIMIT 1").fetch_optional(&self.pool).await?;
        Ok(head.map(|(id, mac)| {
            let signature = self.audit_key.sign_checkpoint(id, &mac, now_ms);
            Checkpoint { id, mac, at_ms: now_ms, signature }
        }))
    }

    /// Walks the whole chain: every entry's columns against its body, every `mac` against the
    /// one recomputed with the secret, and, given a checkpoint saved before (its signature
    /// checked first), that the chain still reaches it with the same value.
    pub async fn verify_audit(&self, checkpoint: Option<&Checkpoint>) -> Result<Verified, StoreError> {
        let rows: Vec<Row> = sqlx::query_as("SELECT * FROM audit_log ORDER BY id").fetch_all(&self.pool).await?;
        let mut previous = String::new();
        let mut broken = None;
        for r in &rows {
            if let Some(why) = self.check_row(r, &previous) {
                broken = Some((r.id, why));
                break;
            }
            previous = r.mac.clone();
        }
        if let (None, Some(cp)) = (&broken, checkpoint) {
            broken = self.check_checkpoint(&rows, cp);
        }
        let head = rows.last().map(|r| Checkpoint { id: r.id, mac: r.mac.clone(), at_ms: 0, signature: String::new() });
        Ok(Verified { entries: rows.len() as i64, head, broken })
    }

    fn check_row(&self, r: &Row, previous: &str) -> Option<String> {
        let Ok(body) = serde_json::from_str::<AuditBody>(&r.body) else {
            return Some("its body is not an audit entry".into());
        };
        let columns = (r.at_ms, &r.workspace_id, &r.root_key_id, &r.action, &r.target);
        if columns != (body.at_ms, &body.workspace_id, &body.root_key_id, &body.action, &body.target) {
            return Some("its columns differ from its body: edited in place".into());
        }
        let expected = self.audit_key.mac(previous, &r.body);
        let matches: bool = subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), r.mac.as_bytes()).into();
        if !matches {
            return Some("its chain value does not match: edited, or the chain recomputed without the secret".into());
        }
        None
    }

    fn check_checkpoint(&self, rows: &[Row], cp: &Checkpoint) -> Option<(i64, String)> {
        if self.audit_key.sign_checkpoint(cp.id, &cp.mac, cp.at_ms) != cp.signature {
            return Some((cp.id, "the checkpoint's signature does not match this secret".into()));
        }
        match rows.iter().find(|r| r.id == cp.id) {
            None => Some((cp.id, "the checkpoint's entry is gone: entries were deleted".into())),
            Some(r) if r.mac != cp.mac => Some((cp.id, "the entry at the checkpoint differs from it".into())),
            Some(_) => None,
        }
    }
}
