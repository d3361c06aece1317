//! Side records at the edge, found by the same rules as a key's record (`crate::lookup`): an
//! API's record (its allow and deny lists, its limit override; authority object `api:<hash>`)
//! and an identity's (its shared credits and rate limits; authority object named by its hash).
//! Isolate memory, then the Cache API, then Workers KV together with the authority:
//!
//! - a copy is answered from while younger than its `max_staleness_ms` since its confirmation
//!   was asked (or its signed purge was made), and confirmed again in the background once it has
//!   used `REFRESH_AHEAD_PERCENT` of that; one confirmation per record is under way in an isolate;
//! - a stale copy, or none, reads KV and the authority together, the highest version winning;
//!   without the authority's answer the lookup fails closed (a side record is never final);
//! - an API with no record in KV nor at a reachable authority counts as an empty policy at
//!   version 0, kept as a copy confirmed when it was asked, so it is asked again within
//!   `max_staleness_ms` like any other copy; an identity with no record anywhere fails closed
//!   (its limits and credits are unknown);
//! - where purges reach only the Cache API (tag-only), memory answers a copy for its memory
//!   trust after the Cache API last showed one;
//! - memory never trades a copy for an older version, and a purge's version is remembered apart
//!   so a refill that read before the purge cannot bring the older record back.
//!
//! Side copies take their own small budget in memory ([`SIDE_MEMORY_BYTES`], per kind): an
//! isolate serves few APIs, and its identities are bounded like its keys' holdings.

use std::cell::RefCell;
use std::thread::LocalKey;

use keyward_shared::KeyHash;
use keyward_shared::budget::{ByteLru, Weigh};
use keyward_shared::freshness::{self, AuthorityAnswer, Resolved, Versioned};
use keyward_shared::identity::{IdentityRecord, kv_key_for_identity};
use keyward_shared::policy::{ApiRecord, kv_key_for_api};
use keyward_shared::record::RecordError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use worker::{Cache, Context, Env, Headers, Response, Result, console_warn};

use crate::fresh::{self, Confirmation};
use crate::lookup::{PurgeMode, read_kv};
use crate::memory::Copies;
use crate::misses::Kind;
use crate::{authority, deadline, origin};

/// Bytes copies of one kind of side record may take in one isolate.
pub(crate) const SIDE_MEMORY_BYTES: usize = 256 * 1024;
/// How long the Cache API may keep a copy (it is confirmed after `max_staleness_ms` anyway).
const CACHE_MAX_AGE_S: u64 = 3_600;

/// An edge copy of a side record and when its confirmation was asked.
#[derive(Clone, Serialize, Deserialize)]
#[serde(bound = "R: Serialize + DeserializeOwned")]
pub(crate) struct Entry<R> {
    record: R,
    confirmed_at_ms: u64,
    /// Memory only: since when memory trusts the copy where purges reach only the Cache API.
    #[serde(skip)]
    checked_at_ms: u64,
}

impl<R: Side> Weigh for Entry<R> {
    fn weight(&self) -> usize {
        std::mem::size_of::<Entry<R>>() + self.record.heap_bytes()
    }
}

/// The versions purges brought, by record hash (a small budget per kind).
type Purged = RefCell<ByteLru<[u8; 32], u64>>;

thread_local! {
    static API_MEMORY: Copies<Entry<ApiRecord>> = Copies::new(SIDE_MEMORY_BYTES);
    static API_PURGED: Purged = RefCell::new(ByteLru::new(64 * 1024));
    static IDENTITY_MEMORY: Copies<Entry<IdentityRecord>> = Copies::new(SIDE_MEMORY_BYTES);
    static IDENTITY_PURGED: Purged = RefCell::new(ByteLru::new(64 * 1024));
}

/// A kind of side record: what the shared lookup needs to know of it.
pub(crate) trait Side: Clone + Serialize + DeserializeOwned + Versioned + 'static {
    /// Its kind for single flight and counts.
    const KIND: Kind;
    /// The Cache API path segment of its copies.
    const CACHE_DIR: &'static str;
    fn hash_of(id: &str) -> KeyHash;
    fn kv_key(id: &str) -> String;
    fn id(&self) -> &str;
    fn max_staleness_ms(&self) -> u64;
    fn heap_bytes(&self) -> usize;
    fn memory() -> &'static LocalKey<Copies<Entry<Self>>>;
    fn purged() -> &'static LocalKey<Purged>;
    /// What its authority answers.
    fn read_authority(env: &Env, hash: &KeyHash) -> impl std::future::Future<Output = AuthorityAnswer<Self>>;
    fn parse(text: &str) -> std::result::Result<Self, RecordError>;
    /// What a record found nowhere counts as, trusted for `trust_ms` at most (`None`: unknown,
    /// the lookup fails closed).
    fn none(id: &str, trust_ms: u64) -> Option<Self>;
}

impl Side for ApiRecord {
    const KIND: Kind = Kind::Api;
    const CACHE_DIR: &'static str = "api";
    fn hash_of(id: &str) -> KeyHash {
        ApiRecord::hash_of(id)
    }
    fn kv_key(id: &str) -> String {
        kv_key_for_api(id)
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn max_staleness_ms(&self) -> u64 {
        self.max_staleness_ms
    }
    fn heap_bytes(&self) -> usize {
        ApiRecord::heap_bytes(self)
    }
    fn memory() -> &'static LocalKey<Copies<Entry<Self>>> {
        &API_MEMORY
    }
    fn purged() -> &'static LocalKey<Purged> {
        &API_PURGED
    }
    async fn read_authority(env: &Env, hash: &KeyHash) -> AuthorityAnswer<Self> {
        authority::read_api(env, hash).await
    }
    fn parse(text: &str) -> std::result::Result<Self, RecordError> {
        ApiRecord::from_json(text)
    }
    /// An API with no record anywhere: an empty policy at version 0.
    fn none(id: &str, trust_ms: u64) -> Option<Self> {
        let none = ApiRecord::none(id);
        Some(ApiRecord { max_staleness_ms: none.max_staleness_ms.min(trust_ms), ..none })
    }
}

impl Side for IdentityRecord {
    const KIND: Kind = Kind::Identity;
    const CACHE_DIR: &'static str = "identity";
    fn hash_of(id: &str) -> KeyHash {
        IdentityRecord::hash_of(id)
    }
    fn kv_key(id: &str) -> String {
        kv_key_for_identity(id)
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn max_staleness_ms(&self) -> u64 {
        self.max_staleness_ms
    }
    fn heap_bytes(&self) -> usize {
        IdentityRecord::heap_bytes(self)
    }
    fn memory() -> &'static LocalKey<Copies<Entry<Self>>> {
        &IDENTITY_MEMORY
    }
    fn purged() -> &'static LocalKey<Purged> {
        &IDENTITY_PURGED
    }
    async fn read_authority(env: &Env, hash: &KeyHash) -> AuthorityAnswer<Self> {
        authority::read_identity(env, hash).await
    }
    fn parse(text: &str) -> std::result::Result<Self, RecordError> {
        IdentityRecord::from_json(text)
    }
    /// An identity found nowhere: its limits and credits are unknown.
    fn none(_id: &str, _trust_ms: u64) -> Option<Self> {
        None
    }
}

/// What the lookup found.
pub(crate) enum Found<R> {
    /// The record (an API's at version 0 when it has none anywhere).
    Record(R),
    /// The authority could not confirm the best record there is (or an identity has none).
    Unconfirmed,
}

fn cache_url<R: Side>(id: &str) -> String {
    origin::cache_url(&format!("{}/{}", R::CACHE_DIR, R::hash_of(id).to_hex()))
}

fn fresh_now<R: Side>(entry: &Entry<R>, now_ms: u64) -> bool {
    freshness::is_fresh(entry.confirmed_at_ms, entry.record.max_staleness_ms(), now_ms)
}

fn trusted<R>(entry: &Entry<R>, now_ms: u64) -> bool {
    fresh::memory_trust_ms().is_none_or(|trust| freshness::is_fresh(entry.checked_at_ms, trust, now_ms))
}

/// The record `id` of kind `R`, from the nearest tier that may answer (see the module). An
/// API with no record anywhere is trusted as such for `trust_ms` at most (its keys'
/// `max_staleness_ms`, which is the API's).
pub(crate) async fn find<R: Side>(env: &Env, ctx: &Context, id: &str, trust_ms: u64, now_ms: u64) -> Result<Found<R>> {
    let hash = R::hash_of(id);
    let cache = Cache::default();
    let stale = match nearest::<R>(env, ctx, &cache, id, &hash, now_ms).await? {
        Nearest::Found(found) => return Ok(found),
        Nearest::Stale(record) => Some(record),
        Nearest::None => None,
    };
    if let Some(now) = fresh::join(R::KIND, hash.as_bytes(), now_ms).await {
        match nearest::<R>(env, ctx, &cache, id, &hash, now).await? {
            Nearest::Found(found) => return Ok(found),
            Nearest::Stale(_) => return Ok(Found::Unconfirmed),
            Nearest::None => {}
        }
    }
    let _flight = fresh::begin(R::KIND, hash.as_bytes(), now_ms);
    fresh::count(R::KIND, Confirmation::Waited);
    confirm(env, &cache, id, stale, trust_ms, now_ms).await
}

enum Nearest<R> {
    Found(Found<R>),
    Stale(R),
    None,
}

/// Memory's copy, or the Cache API's where memory has none it may answer from alone.
async fn nearest<R: Side>(
    env: &Env,
    ctx: &Context,
    cache: &Cache,
    id: &str,
    hash: &KeyHash,
    now_ms: u64,
) -> Result<Nearest<R>> {
    let held = R::memory().with(|m| m.get(hash));
    let untrusted = match held {
        Some(entry) if trusted(&entry, now_ms) && fresh_now(&entry, now_ms) => {
            return Ok(Nearest::Found(answer(env, ctx, id, entry, now_ms)));
        }
        Some(entry) if trusted(&entry, now_ms) => return Ok(Nearest::Stale(entry.record)),
        other => other,
    };
    let mut cached = None;
    if let Some(read) = deadline::within(deadline::CACHE_MS, cache.get(cache_url::<R>(id), false)).await
        && let Some(mut response) = read?
    {
        cached = response.json::<Entry<R>>().await.ok();
    }
    let best = match (cached, untrusted) {
        (None, Some(memory)) => return Ok(Nearest::Stale(memory.record)),
        (None, None) => return Ok(Nearest::None),
        (Some(cached), Some(memory)) if memory.record.version() > cached.record.version() => memory,
        (Some(cached), _) => cached,
    };
    let entry = remember(Entry { checked_at_ms: now_ms, ..best });
    Ok(if fresh_now(&entry, now_ms) {
        Nearest::Found(answer(env, ctx, id, entry, now_ms))
    } else {
        Nearest::Stale(entry.record)
    })
}

/// Answers from `entry`, first starting its confirmation in the background if it is due.
fn answer<R: Side>(env: &Env, ctx: &Context, id: &str, entry: Entry<R>, now_ms: u64) -> Found<R> {
    let percent = fresh::refresh_ahead_percent();
    if freshness::refresh_ahead(entry.confirmed_at_ms, entry.record.max_staleness_ms(), now_ms, percent) {
        let hash = *R::hash_of(id).as_bytes();
        fresh::ahead(ctx, R::KIND, &hash, now_ms, || {
            let (env, id, record) = (env.clone(), id.to_owned(), entry.record.clone());
            let trust_ms = record.max_staleness_ms();
            async move {
                if let Err(e) = confirm(&env, &Cache::default(), &id, Some(record), trust_ms, now_ms).await {
                    console_warn!("side record confirmation ahead of expiry failed: {e}");
                }
            }
        });
    }
    Found::Record(entry.record)
}

/// A stale copy, or none: reads KV and the authority together and keeps what wins.
async fn confirm<R: Side>(
    env: &Env,
    cache: &Cache,
    id: &str,
    stale: Option<R>,
    trust_ms: u64,
    now_ms: u64,
) -> Result<Found<R>> {
    let hash = R::hash_of(id);
    let (kv, mut authority) = futures::join!(read_kv(env, R::kv_key(id), R::parse), async {
        // The KV-only baseline edge (`cargo xtask bench`'s point of comparison) never asks.
        if cfg!(feature = "kv-only-baseline") { AuthorityAnswer::Unknown } else { R::read_authority(env, &hash).await }
    });
    let kv = kv.unwrap_or_else(|e| {
        console_warn!("KV read of a side record failed: {e}");
        if !matches!(authority, AuthorityAnswer::Holds(_)) {
            authority = AuthorityAnswer::Unreachable;
        }
        None
    });
    let record = match freshness::resolve(stale, kv, authority) {
        Resolved::FailClosed(_) => return Ok(Found::Unconfirmed),
        Resolved::Record(None, _) => match R::none(id, trust_ms) {
            Some(none) => none,
            None => return Ok(Found::Unconfirmed),
        },
        Resolved::Record(Some(record), _) => record,
    };
    let entry = Entry { record, confirmed_at_ms: now_ms, checked_at_ms: now_ms };
    Ok(Found::Record(keep(cache, id, entry).await?))
}

fn purged_newer<R: Side>(hash: &[u8; 32], version: u64) -> bool {
    R::purged().with(|p| p.borrow().peek(hash).is_some_and(|seen| *seen > version))
}

/// Puts a copy in memory unless memory holds a newer version or a purge brought one; answers
/// the copy memory holds afterwards (of one version, the later confirmation and check times).
fn remember<R: Side>(mut entry: Entry<R>) -> Entry<R> {
    let hash = *R::hash_of(entry.record.id()).as_bytes();
    R::memory().with(|m| {
        m.update(|memory| {
            match memory.get(&hash) {
                Some(held) if held.record.version() > entry.record.version() => return held.clone(),
                Some(held) if held.record.version() == entry.record.version() => {
                    entry.confirmed_at_ms = entry.confirmed_at_ms.max(held.confirmed_at_ms);
                    entry.checked_at_ms = entry.checked_at_ms.max(held.checked_at_ms);
                }
                _ => {}
            }
            if !purged_newer::<R>(&hash, entry.record.version()) {
                memory.put(hash, entry.clone());
            }
            entry
        })
    })
}

/// Keeps a confirmed copy in memory and the Cache API (tagged with the record's hash, for
/// purge-by-tag); a newer version that reached memory meanwhile is written after it.
async fn keep<R: Side>(cache: &Cache, id: &str, entry: Entry<R>) -> Result<R> {
    let hash = R::hash_of(id);
    let mut kept = remember(entry);
    if purged_newer::<R>(hash.as_bytes(), kept.record.version()) {
        return Ok(kept.record);
    }
    loop {
        let headers = Headers::new();
        headers.set("cache-control", &format!("max-age={CACHE_MAX_AGE_S}"))?;
        headers.set("cache-tag", &hash.to_hex())?;
        let put = cache.put(cache_url::<R>(id), Response::from_json(&kept)?.with_headers(headers));
        match deadline::within(deadline::CACHE_MS, put).await {
            Some(done) => done?,
            None => console_warn!("Cache API write took over {} ms; memory keeps the copy", deadline::CACHE_MS),
        }
        let held = R::memory().with(|m| m.update(|m| m.peek(hash.as_bytes()).map(|h| h.record.version())));
        if held.is_some_and(|v| v > kept.record.version()) {
            kept = remember(kept);
            continue;
        }
        return Ok(kept.record);
    }
}

/// Replaces this location's copies of a side record with `record`, from a signed purge
/// confirmed as of `confirmed_at_ms`: memory takes it (unless it holds a newer version) in
/// record mode, and the Cache API copy is dropped in both modes. Answers whether there was a
/// copy here.
pub(crate) async fn purge<R: Side>(record: R, confirmed_at_ms: u64, mode: PurgeMode) -> Result<bool> {
    let hash = R::hash_of(record.id());
    let in_memory = R::memory().with(|m| m.update(|m| m.contains(hash.as_bytes())));
    let url = cache_url::<R>(record.id());
    if mode == PurgeMode::Record {
        let version = record.version();
        R::purged().with(|p| {
            let mut purged = p.borrow_mut();
            if purged.peek(hash.as_bytes()).is_none_or(|seen| *seen < version) {
                purged.put(*hash.as_bytes(), version);
            }
        });
        remember(Entry { record, confirmed_at_ms, checked_at_ms: confirmed_at_ms });
    }
    let dropped = deadline::within(deadline::CACHE_MS, Cache::default().delete(url, false))
        .await
        .ok_or_else(|| worker::Error::RustError("the Cache API did not drop the side copy in time".into()))??;
    Ok(in_memory || matches!(dropped, worker::CacheDeletionOutcome::Success))
}
