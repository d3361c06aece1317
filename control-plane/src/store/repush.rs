//! The operator's re-push of one key's (or root key's) current record: `keyward outbox redrive
//! --key`. It queues a fresh outbox entry carrying the record as it is now, to every target or
//! to one region's, whether or not earlier entries were acknowledged there: the way to give a
//! region back what it lost (a KV namespace restored from a backup, a wiped cache).
//!
//! The entry follows a change's rules ([`insert_outbox`]): its targets are the authority and
//! every region's KV, with every region's purge when it tightens; it supersedes the same targets'
//! pending and dead-lettered deliveries of older entries (which carry no newer record), and a
//! later change supersedes its own in turn, so it never sends a record older than one queued
//! after it. It cannot move a target backwards either: the authority keeps the highest version,
//! and the edge takes the highest of its copy, KV and the authority.

use keyward_shared::record::KeyStatus;
use keyward_shared::{KeyRecord, RootKeyRecord};
use serde::Serialize;

use super::audit::{self, Change};
use super::keys::key_by_id;
use super::outbox::{Carried, EntryKind, NewOutbox, Reach, insert_outbox};
use super::root_keys::root_key_by_id;
use super::{Store, StoreError};
use crate::change::Actor;

/// Which record to push again, and where.
#[derive(Debug, Clone)]
pub struct Repush<'a> {
    /// A key's id or a root key's.
    pub id: &'a str,
    /// Only this region's KV write and purge (and the authority's update); every target when
    /// `None`.
    pub region: Option<&'a str>,
    /// Where the control plane delivers (its configuration's authority and regions).
    pub reach: Reach,
    pub now: i64,
}

/// What a re-push queued: the entry, the record's version, and its targets.
#[derive(Debug, Clone, Serialize)]
pub struct Repushed {
    pub outbox_id: i64,
    /// `key` or `root_key`.
    pub kind: &'static str,
    pub key_id: String,
    pub workspace_id: String,
    pub version: u64,
    /// Whether it purges (and its KV writes are retried until they land).
    pub tightening: bool,
    pub targets: Vec<String>,
}

/// Why a re-push queued nothing.
#[derive(Debug, thiserror::Error)]
pub enum RepushError {
    #[error("no key or root key with id `{0}` in the database")]
    Unknown(String),
    #[error("root key `{0}` is active and may verify no key: the edge never reads it, so there is nothing to push")]
    NotPublished(String),
    #[error("nothing to deliver to: the configuration names no authority_url, [[regions]] or [cloudflare]")]
    NoTargets,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The record found, as the outbox carries it.
enum Found {
    Key(Box<KeyRecord>),
    RootKey(RootKeyRecord),
}

impl Found {
    fn kind(&self) -> EntryKind {
        match self {
            Found::Key(_) => EntryKind::Key,
            Found::RootKey(_) => EntryKind::RootKey,
        }
    }

    /// Whether the record as it is now may be pushed: a root key only if the edge reads it
    /// (it may verify, or it was revoked).
    fn check(&self) -> Result<(), RepushError> {
        match self {
            Found::RootKey(r) if r.status == KeyStatus::Active && !r.scopes.can_verify_somewhere() => {
                Err(RepushError::NotPublished(r.id.clone()))
            }
            _ => Ok(()),
        }
    }

    /// Whether its state tightens what a target may still hold: a key no longer usable
    /// (revoked, deleted, disabled, expired) or a revoked root key.
    fn restricts(&self, now: i64) -> bool {
        match self {
            Found::Key(k) => !k.is_usable(now),
            Found::RootKey(r) => r.status != KeyStatus::Active,
        }
    }

    fn carried(&self) -> Carried<'_> {
        match self {
            Found::Key(k) => Carried::Key(k),
            Found::RootKey(r) => Carried::RootKey(r),
        }
    }

    fn describe(&self) -> (&'static str, &str, &str, u64) {
        match self {
            Found::Key(k) => ("key", &k.id, &k.workspace_id, k.version),
            Found::RootKey(r) => ("root_key", &r.id, &r.workspace_id, r.version),
        }
    }
}

impl Store {
    /// Queues the current record of the key or root key `repush.id` again, in one transaction
    /// with its audit entry (`outbox.redrive`, by `actor`): its deliveries are due at once, for
    /// the retrier. The entry tightens (so it purges, and its KV writes are never dead-lettered)
    /// when the record's state does ([`Found::restricts`]) or when the key's newest kept entry
    /// did, so that it never turns a promised delivery it supersedes into one that may be given
    /// up. With a region, its targets are that region's and the authority's: a purge by tag is
    /// sent only once the authority holds the record, and the authority ignores a version it holds.
    pub async fn repush(&self, repush: Repush<'_>, actor: &Actor) -> Result<Repushed, RepushError> {
        let _chain = self.audit_lock.lock().await;
        // Immediate: the read and the insert see one state of the database, and the write cannot
        // be refused after the read because another process wrote meanwhile.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(StoreError::from)?;
        let found = match key_by_id(&mut tx, repush.id).await? {
            Some(key) => Found::Key(Box::new(key)),
            None => match root_key_by_id(&mut tx, repush.id).await? {
                Some(root) => Found::RootKey(root),
                None => return Err(RepushError::Unknown(repush.id.to_owned())),
            },
        };
        found.check()?;
        let newest_tightened: Option<bool> =
            sqlx::query_scalar("SELECT tightening FROM outbox WHERE kind = ? AND key_id = ? ORDER BY id DESC LIMIT 1")
                .bind(found.kind())
                .bind(repush.id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(StoreError::from)?;
        let tightening = found.restricts(repush.now) || newest_tightened == Some(true);
        let reach = match repush.region {
            Some(region) => Reach { authority: repush.reach.authority, regions: vec![region.to_owned()] },
            None => repush.reach,
        };
        let targets: Vec<String> = reach.targets(found.kind(), tightening).iter().map(ToString::to_string).collect();
        if targets.is_empty() {
            return Err(RepushError::NoTargets);
        }
        let outbox = NewOutbox { reach, tightening, now: repush.now, first_retry_at: repush.now };
        let outbox_id = insert_outbox(&mut tx, found.carried(), &outbox).await?;
        let (kind, key_id, workspace_id, version) = found.describe();
        let after = serde_json::json!({
            "kind": kind, "version": version, "region": repush.region, "outbox_id": outbox_id, "targets": targets,
        });
        let change =
            Change { workspace_id, action: "outbox.redrive", target: key_id, before: None, after: Some(after) };
        audit::append(&mut tx, &self.audit_key, actor, change, repush.now).await?;
        tx.commit().await.map_err(StoreError::from)?;
        actor.committed("outbox.redrive", key_id, version);
        Ok(Repushed {
            outbox_id,
            kind,
            key_id: key_id.to_owned(),
            workspace_id: workspace_id.to_owned(),
            version,
            tightening,
            targets,
        })
    }
}
