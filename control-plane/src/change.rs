//! The change path, apart from HTTP: creating, changing, revoking and deleting keys, minting and
//! revoking root keys, and queuing root keys for the edge at start-up. Each change is committed
//! to the database together with its outbox entry, then delivered (`delivery.rs`) by the call
//! that made it, which answers what each target acknowledged. Handlers parse, call
//! [`ChangeService`], and answer; `serve.rs` calls it at start-up.
//!
//! Every change carries its [`Actor`], who made it and from where, into the store function that
//! runs its transaction, so that an audit log can be written in the change's own transaction.
//! Until that log exists, the store logs each committed change with its actor.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use keyward_shared::policy::ApiRecord;
use keyward_shared::record::{KeyStatus, RECORD_SCHEMA};
use keyward_shared::{Key, KeyRecord, Meta, RootKeyRecord, Scope, Scopes};
use tokio::sync::watch;

use crate::delivery::RegionReport;
use crate::delivery::{Delivered, Deliverer};
use crate::failpoint;
use crate::keygen::{self, ROOT_KEY_PREFIX, new_id};
use crate::store::{Api, EntryKind, Identity, NewOutbox, NewRootKey, Reach, Store, StoreError};
use crate::time::now_ms;

/// Who made a change and from where.
#[derive(Debug, Clone)]
pub enum Actor {
    /// Keyward itself, not an admin request: the first workspace and root key of an empty
    /// database, at start-up.
    System,
    /// An operator on the control plane's machine, by a `keyward` command that opens the
    /// database itself (`admin recover`), named here.
    Console(&'static str),
    /// An admin request, authenticated by a root key.
    Request(RequestOrigin),
}

/// The admin request that made a change.
#[derive(Debug, Clone)]
pub struct RequestOrigin {
    pub root_key_id: String,
    pub root_key_name: String,
    /// The request's `x-request-id` header, or one generated for it.
    pub request_id: String,
    /// The peer's address; known when the server runs with connection info, as `keyward serve` does.
    pub remote_addr: Option<SocketAddr>,
    pub user_agent: Option<String>,
}

impl Actor {
    /// The admin request, when this actor is one.
    pub fn request(&self) -> Option<&RequestOrigin> {
        match self {
            Actor::Request(origin) => Some(origin),
            _ => None,
        }
    }

    /// Logs a change its transaction committed, with who made it: the record of who changed
    /// what until the audit log is written in that transaction.
    pub fn committed(&self, change: &str, id: &str, version: u64) {
        match self {
            Actor::System => tracing::info!(change, id, version, actor = "system", "change committed"),
            Actor::Console(command) => {
                tracing::info!(change, id, version, actor = "console", command, "change committed")
            }
            Actor::Request(origin) => tracing::info!(
                change,
                id,
                version,
                root_key = %origin.root_key_id,
                root_key_name = %origin.root_key_name,
                request_id = %origin.request_id,
                remote_addr = ?origin.remote_addr,
                user_agent = ?origin.user_agent,
                "change committed"
            ),
        }
    }
}

/// Why a change failed.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

type Result<T, E = ChangeError> = std::result::Result<T, E>;

/// A new key, its fields checked by the caller.
pub struct NewKey<'a> {
    pub api: &'a Api,
    /// The key's prefix, already checked with `validate_prefix`.
    pub prefix: &'a str,
    pub name: Option<String>,
    pub owner_id: Option<String>,
    pub meta: Meta,
    pub expires_at: Option<i64>,
    pub permissions: Vec<String>,
    /// The key's credits (its `set_version` is 1, the new key's version); `None`: unlimited.
    pub credits: Option<keyward_shared::credits::Credits>,
    /// The key's named rate limits, checked.
    pub ratelimits: Vec<keyward_shared::ratelimit::RateLimit>,
    /// The key's own allow and deny lists.
    pub policy: keyward_shared::policy::Policy,
    /// The identity the key spends too (checked: of the key's workspace).
    pub identity_id: Option<String>,
}

/// A created key: the key itself (its plaintext is shown once), its record, and its delivery.
pub struct Created {
    pub key: Key,
    pub record: KeyRecord,
    pub delivered: Delivered,
}

/// The status a key ends in: both are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalStatus {
    Revoked,
    Deleted,
}

/// A root key to mint.
pub struct MintRootKey<'a> {
    pub workspace: Workspace<'a>,
    pub name: &'a str,
    pub scopes: Scopes,
}

/// The workspace a new root key belongs to.
#[derive(Debug, Clone, Copy)]
pub enum Workspace<'a> {
    /// An existing workspace, by id.
    Existing(&'a str),
    /// A new workspace with this name, created with the root key in one transaction.
    New(&'a str),
}

/// A minted root key: the key itself (its plaintext is shown once), and each region's KV write
/// (none for a root key that cannot verify, which the edge never reads).
pub struct MintedRootKey {
    pub key: Key,
    pub id: String,
    pub workspace_id: String,
    pub scopes: Scopes,
    pub regions: Vec<RegionReport>,
}

/// Whether a change tightens what its key allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    /// Revoked, deleted, disabled, expiring sooner, a permission removed: purged everywhere.
    Tightens,
    /// Anything else, creation included: written, not purged.
    Loosens,
}

/// The change path: what handlers and start-up call to change keys and root keys.
pub struct ChangeService {
    store: Store,
    delivery: Arc<Deliverer>,
    /// The id of the newest outbox entry, for event streams to wake on.
    committed: watch::Sender<i64>,
}

impl ChangeService {
    pub fn new(store: Store, delivery: Arc<Deliverer>, committed: watch::Sender<i64>) -> ChangeService {
        ChangeService { store, delivery, committed }
    }

    /// A change's outbox entry, to be stored with it. The store gives it its targets (the
    /// authority when configured, every region's KV, and for a key's tightening change every
    /// region's purge: `store::Reach`), from what the entry carries and its effect.
    fn outbox(&self, effect: Effect, now: i64) -> NewOutbox {
        self.delivery.new_outbox(effect == Effect::Tightens, now)
    }

    /// Creates a key with its outbox entry, then delivers it: the authority and every region's KV.
    pub async fn create_key(&self, actor: &Actor, new: NewKey<'_>, now: i64) -> Result<Created> {
        let key = keygen::generate(new.prefix).context("a checked prefix")?;
        let record = KeyRecord {
            schema: RECORD_SCHEMA,
            id: new_id("key"),
            hash: key.hash(),
            api_id: new.api.id.clone(),
            workspace_id: new.api.workspace_id.clone(),
            name: new.name,
            start: key.start().to_owned(),
            owner_id: new.owner_id,
            meta: new.meta,
            enabled: true,
            status: KeyStatus::Active,
            expires_at: new.expires_at,
            permissions: new.permissions,
            version: 1,
            max_staleness_ms: new.api.max_staleness_ms,
            created_at: now,
            updated_at: now,
            credits: new.credits,
            ratelimits: new.ratelimits,
            policy: new.policy,
            identity_id: new.identity_id,
        };
        let outbox = self.outbox(Effect::Loosens, now);
        let outbox_id = self.store.create_key(&record, &outbox, actor).await?;
        let delivered = self.delivery.deliver(outbox_id).await?;
        Ok(Created { key, record, delivered })
    }

    /// Stores `new` as the next version of `old` with its outbox entry, in one transaction, then
    /// delivers it: the authority, every region's KV, and, when the change tightens the key, every
    /// region's purge. A change that changes nothing (revoking a revoked key) makes no new entry:
    /// it delivers again only what the key's newest entry has not landed, so a repeated revoke
    /// spends no purge on a region that acknowledged (`keyward outbox redrive` makes what is
    /// pending or dead-lettered due at once; `keyward outbox redrive --key` queues the key's
    /// record again for every target, acknowledged or not).
    /// The answer comes within `[outbox] answer_within_ms` (5 s by default), naming what is still pending.
    pub async fn commit(
        &self,
        actor: &Actor,
        old: KeyRecord,
        mut new: KeyRecord,
        now: i64,
    ) -> Result<(KeyRecord, Delivered)> {
        let tightening = old.is_tightened_by(&new) || (old.status != KeyStatus::Active && old.status == new.status);
        let outbox = self.outbox(if tightening { Effect::Tightens } else { Effect::Loosens }, now);
        let outbox_id = if new != old {
            new.version = old.version + 1;
            new.updated_at = now;
            Some(self.store.update_key(&old, &new, &outbox, actor).await?)
        } else {
            None
        };
        let outbox_id = match outbox_id {
            Some(id) => id,
            None => match self.store.newest_entry(EntryKind::Key, &new.id).await? {
                Some(id) => {
                    tracing::info!(key = %new.id, outbox = id, "unchanged: delivering what has not landed");
                    id
                }
                // Pruned: every target had it a week ago. Sent again, to every target.
                None => self.store.resend(&new, &outbox, actor).await?,
            },
        };
        failpoint::hit("abort_after_commit");
        self.committed.send_replace(outbox_id);
        // The delivery notes when it answers (the promise's bound runs from then; a proof reads it).
        let delivered = self.delivery.deliver(outbox_id).await?;
        Ok((new, delivered))
    }

    /// Stores `new` as the next version of the API's record `old` (its allow and deny lists, its
    /// limit override) with its outbox entry, then delivers it like a key's change: the
    /// authority, every region's KV, and, when it tightens, every region's purge. A change that
    /// changes nothing makes no entry and delivers nothing. Answers the record as it now is.
    pub async fn commit_api(
        &self,
        actor: &Actor,
        old: ApiRecord,
        mut new: ApiRecord,
        now: i64,
    ) -> Result<(ApiRecord, Option<Delivered>)> {
        if new == old {
            return Ok((new, None));
        }
        let effect = if old.is_tightened_by(&new) { Effect::Tightens } else { Effect::Loosens };
        new.version = old.version + 1;
        new.updated_at = now;
        let outbox_id = self.store.update_api_record(&old, &new, &self.outbox(effect, now), actor).await?;
        self.committed.send_replace(outbox_id);
        let delivered = self.delivery.deliver(outbox_id).await?;
        if let Err(e) = self.store.note_answered(outbox_id, now_ms()).await {
            tracing::warn!(outbox = outbox_id, error = %e, "cannot note when the change was answered");
        }
        Ok((new, Some(delivered)))
    }

    /// Creates an identity with its outbox entry, then delivers it: the authority and every
    /// region's KV (its keys attach to it later, so nothing is purged).
    pub async fn create_identity(&self, actor: &Actor, identity: &Identity, now: i64) -> Result<Delivered> {
        let outbox_id = self.store.create_identity(identity, &self.outbox(Effect::Loosens, now), actor).await?;
        self.committed.send_replace(outbox_id);
        Ok(self.delivery.deliver(outbox_id).await?)
    }

    /// Stores `new` as the next version of the identity `old` with its outbox entry, then
    /// delivers it like a key's change: the authority, every region's KV, and, when its limits
    /// or credits tighten (`IdentityRecord::is_tightened_by`), every region's purge, which
    /// also drops the regions' shares of its credits and limits. A change that changes nothing
    /// makes no entry and delivers nothing.
    pub async fn commit_identity(
        &self,
        actor: &Actor,
        old: Identity,
        mut new: Identity,
        now: i64,
    ) -> Result<(Identity, Option<Delivered>)> {
        if new == old {
            return Ok((new, None));
        }
        let effect = if old.record.is_tightened_by(&new.record) { Effect::Tightens } else { Effect::Loosens };
        new.record.version = old.record.version + 1;
        new.record.updated_at = now;
        let outbox_id = self.store.update_identity(&old, &new, &self.outbox(effect, now), actor).await?;
        self.committed.send_replace(outbox_id);
        let delivered = self.delivery.deliver(outbox_id).await?;
        if let Err(e) = self.store.note_answered(outbox_id, now_ms()).await {
            tracing::warn!(outbox = outbox_id, error = %e, "cannot note when the change was answered");
        }
        Ok((new, Some(delivered)))
    }

    /// Revokes or deletes a key (again, if it already is: what has not landed is sent again).
    pub async fn set_status(
        &self,
        actor: &Actor,
        old: KeyRecord,
        status: FinalStatus,
    ) -> Result<(KeyRecord, Delivered)> {
        let mut new = old.clone();
        new.status = match status {
            FinalStatus::Revoked => KeyStatus::Revoked,
            FinalStatus::Deleted => KeyStatus::Deleted,
        };
        self.commit(actor, old, new, now_ms()).await
    }

    /// Mints a root key (and its new workspace, if it has one) and, when it may verify, writes it
    /// to the authority and every region's KV through the outbox, so the edge can check the
    /// callers it authenticates.
    pub async fn mint_root_key(&self, actor: &Actor, mint: MintRootKey<'_>) -> Result<MintedRootKey> {
        let key = keygen::generate(ROOT_KEY_PREFIX).context("the root key prefix")?;
        let now = now_ms();
        let outbox = publishes(&mint.scopes).then(|| self.outbox(Effect::Loosens, now));
        let (mut minted, outbox_id) = insert_root_key(&self.store, actor, mint, key, outbox.as_ref(), now).await?;
        if let Some(id) = outbox_id {
            minted.regions = self.delivery.deliver(id).await?.regions;
        }
        Ok(minted)
    }

    /// Revokes a root key of this workspace: the control plane refuses it at once, and the edge
    /// within its 1 s trust window, confirming root keys with the authority and KV (the higher
    /// version wins). Both go through the outbox, so a target that missed its write gets it when
    /// it returns. `None` when the workspace has no such root key.
    pub async fn revoke_root_key(
        &self,
        actor: &Actor,
        workspace_id: &str,
        id: &str,
    ) -> Result<Option<(RootKeyRecord, Delivered)>> {
        let outbox = self.outbox(Effect::Tightens, now_ms());
        let Some((record, outbox_id)) = self.store.revoke_root_key(workspace_id, id, &outbox, actor).await? else {
            return Ok(None);
        };
        let delivered = self.delivery.deliver(outbox_id).await?;
        Ok(Some((record, delivered)))
    }

    /// Queues every active root key that may verify for the authority and every region's KV
    /// (the start-up sync), so a region whose KV was wiped learns its callers again, and the
    /// edge can confirm each with the authority. One outbox entry each, delivered at once, a few
    /// at a time, for at most `[outbox] answer_within_ms`: what has not landed by then, or fails,
    /// is the retrier's, and `GET /v1/regions` shows it pending. Answers the entries' ids.
    pub async fn publish_root_keys(&self) -> Result<Vec<i64>> {
        let active: Vec<RootKeyRecord> = self
            .store
            .root_keys()
            .await?
            .into_iter()
            .filter(|r| r.status == KeyStatus::Active && publishes(&r.scopes))
            .collect();
        let now = now_ms();
        let outbox = NewOutbox { first_retry_at: now, ..self.outbox(Effect::Loosens, now) };
        let ids = self.store.queue_root_keys(&active, &outbox).await?;
        let deliveries =
            futures::stream::iter(ids.iter().copied()).for_each_concurrent(SYNC_AT_ONCE, |id| async move {
                if let Err(e) = self.delivery.deliver(id).await {
                    tracing::error!(outbox = id, error = %format!("{e:#}"), "cannot deliver a root key at start-up");
                }
            });
        if tokio::time::timeout(self.delivery.settings().answer_within(), deliveries).await.is_err() {
            tracing::warn!("root keys not yet delivered at start-up are left to the retrier");
        }
        Ok(ids)
    }
}

/// How many root keys the start-up sync delivers at once.
const SYNC_AT_ONCE: usize = 8;

/// On an empty database: the first workspace, named `default`, and its root key `key` with every
/// scope. It has no outbox entry: the start-up sync ([`ChangeService::publish_root_keys`]) writes
/// every active root key to the edge.
pub async fn mint_first_root_key(store: &Store, key: Key) -> Result<MintedRootKey> {
    let mint =
        MintRootKey { workspace: Workspace::New("default"), name: "bootstrap", scopes: Scopes(Scope::all(true)) };
    let (minted, _) = insert_root_key(store, &Actor::System, mint, key, None, now_ms()).await?;
    Ok(minted)
}

/// For `keyward admin recover`, on a workspace none of whose root keys can manage it any more:
/// mints a root key with every scope in it (and `workspace.create` if one of its root keys ever
/// held it) straight into the database. Its outbox entry goes to `reach`, the targets the
/// control plane last delivered to, with no hand-off delay: the running control plane's retrier
/// delivers it, since nothing here talks to the edge. Answers the root key and whether it has an
/// outbox entry (none when the control plane never delivered anything: it then writes every
/// active root key to the edge when it starts).
pub async fn recover_root_key(store: &Store, workspace_id: &str, reach: Reach) -> Result<(MintedRootKey, bool)> {
    let root_keys = store.workspace_root_keys(workspace_id).await?;
    let operator = root_keys.iter().any(|(record, _, _)| record.scopes.grants(&Scope::WorkspaceCreate));
    let scopes = Scopes(Scope::all(operator));
    let key = keygen::generate(ROOT_KEY_PREFIX).context("the root key prefix")?;
    let now = now_ms();
    let reaches = reach.authority || !reach.regions.is_empty();
    let outbox = reaches.then_some(NewOutbox { reach, tightening: false, now, first_retry_at: now });
    let mint = MintRootKey { workspace: Workspace::Existing(workspace_id), name: "recovered", scopes };
    let actor = Actor::Console("admin recover");
    let (minted, outbox_id) = insert_root_key(store, &actor, mint, key, outbox.as_ref(), now).await?;
    Ok((minted, outbox_id.is_some()))
}

/// Whether a root key with these scopes is written to the edge: only one that may verify
/// somewhere, since the edge reads root keys only to check the callers of its verify route.
fn publishes(scopes: &Scopes) -> bool {
    scopes.can_verify_somewhere()
}

/// Stores a new root key, with its new workspace if it has one and its outbox entry if given:
/// the one place root keys are minted. Answers the root key and the entry's id.
async fn insert_root_key(
    store: &Store,
    actor: &Actor,
    mint: MintRootKey<'_>,
    key: Key,
    outbox: Option<&NewOutbox>,
    now: i64,
) -> Result<(MintedRootKey, Option<i64>)> {
    let id = new_id("root");
    let (workspace_id, new_workspace) = match mint.workspace {
        Workspace::Existing(id) => (id.to_owned(), None),
        Workspace::New(name) => (new_id("ws"), Some(name)),
    };
    let root = NewRootKey {
        id: &id,
        workspace_id: &workspace_id,
        name: mint.name,
        hash: &key.hash(),
        start: key.start(),
        scopes: &mint.scopes,
        now,
    };
    let outbox_id = store.create_root_key(root, new_workspace, outbox, actor).await?;
    Ok((MintedRootKey { key, id, workspace_id, scopes: mint.scopes, regions: Vec::new() }, outbox_id))
}
