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
//!   trust after the Cache API last showed one, and a confirmation a purge overtook takes its
//!   copy back out of the Cache API (`crate::mark`);
//! - memory never trades a copy for an older version, and a purge's version is remembered apart
//!   so a refill that read before the purge cannot bring the older record back.
//!
//! Side copies take their own small budget in memory ([`SIDE_MEMORY_BYTES`], per kind): an
//! isolate serves few APIs, and its identities are bounded like its keys' holdings.

//!
//! One copy of the code serves both kinds ([`SideRecord`] and [`SideKind`] tell them apart, not
//! generics: each monomorphised copy of these async functions cost the worker's upload).

use std::cell::RefCell;

use keyward_shared::KeyHash;
use keyward_shared::budget::{ByteLru, Weigh};
use keyward_shared::freshness::{self, AfterJoin, AuthorityAnswer, Resolved, Versioned};
use keyward_shared::identity::{IdentityRecord, kv_key_for_identity};
use keyward_shared::policy::{ApiRecord, kv_key_for_api};
use keyward_shared::record::RecordError;
use worker::{Cache, Context, Date, Env, Headers, Response, Result, console_warn};

use crate::fresh::{self, Confirmation};
use crate::lookup::{self, PurgeMode, read_kv};
use crate::mark::Mark;
use crate::memory::Copies;
use crate::misses::Kind;
use crate::{authority, deadline, origin};

/// Bytes copies of one kind of side record may take in one isolate.
pub(crate) const SIDE_MEMORY_BYTES: usize = 256 * 1024;
/// How long the Cache API may keep a copy (it is confirmed after `max_staleness_ms` anyway).
const CACHE_MAX_AGE_S: u64 = 3_600;
/// The Cache API copy's header holding when its confirmation was asked (its body is the
/// record's JSON, read by the same parser as KV's and the authority's).
const CONFIRMED_AT_HEADER: &str = "x-keyward-confirmed-at";

/// Which kind of side record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SideKind {
    Api,
    Identity,
}

/// A side record of either kind.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SideRecord {
    Api(ApiRecord),
    Identity(IdentityRecord),
}

impl SideRecord {
    fn kind(&self) -> SideKind {
        match self {
            SideRecord::Api(_) => SideKind::Api,
            SideRecord::Identity(_) => SideKind::Identity,
        }
    }

    fn id(&self) -> &str {
        match self {
            SideRecord::Api(r) => &r.id,
            SideRecord::Identity(r) => &r.id,
        }
    }

    fn max_staleness_ms(&self) -> u64 {
        match self {
            SideRecord::Api(r) => r.max_staleness_ms,
            SideRecord::Identity(r) => r.max_staleness_ms,
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            SideRecord::Api(r) => r.heap_bytes(),
            SideRecord::Identity(r) => r.heap_bytes(),
        }
    }

    fn to_json(&self) -> Result<String> {
        Ok(match self {
            SideRecord::Api(r) => serde_json::to_string(r)?,
            SideRecord::Identity(r) => serde_json::to_string(r)?,
        })
    }
}

impl Versioned for SideRecord {
    fn version(&self) -> u64 {
        match self {
            SideRecord::Api(r) => r.version,
            SideRecord::Identity(r) => r.version,
        }
    }
    /// No later version of a side record is bound to admit less: none is final.
    fn is_final(&self) -> bool {
        false
    }
}

fn parse_api(text: &str) -> std::result::Result<SideRecord, RecordError> {
    ApiRecord::from_json(text).map(SideRecord::Api)
}

fn parse_identity(text: &str) -> std::result::Result<SideRecord, RecordError> {
    IdentityRecord::from_json(text).map(SideRecord::Identity)
}

impl SideKind {
    /// The hash naming the record `id` at the edge.
    fn hash_of(self, id: &str) -> KeyHash {
        match self {
            SideKind::Api => ApiRecord::hash_of(id),
            SideKind::Identity => IdentityRecord::hash_of(id),
        }
    }

    fn kv_key(self, id: &str) -> String {
        match self {
            SideKind::Api => kv_key_for_api(id),
            SideKind::Identity => kv_key_for_identity(id),
        }
    }

    fn parser(self) -> fn(&str) -> std::result::Result<SideRecord, RecordError> {
        match self {
            SideKind::Api => parse_api,
            SideKind::Identity => parse_identity,
        }
    }

    /// For single flight and counts.
    fn misses_kind(self) -> Kind {
        match self {
            SideKind::Api => Kind::Api,
            SideKind::Identity => Kind::Identity,
        }
    }

    fn cache_url(self, id: &str) -> String {
        let dir = match self {
            SideKind::Api => "api",
            SideKind::Identity => "identity",
        };
        origin::cache_url(&format!("{dir}/{}", self.hash_of(id).to_hex()))
    }

    /// What a record found nowhere counts as, trusted for `trust_ms` at most: an API's is an
    /// empty policy at version 0; an identity's is unknown (`None`: the lookup fails closed).
    fn none(self, id: &str, trust_ms: u64) -> Option<SideRecord> {
        match self {
            SideKind::Api => {
                let none = ApiRecord::none(id);
                Some(SideRecord::Api(ApiRecord { max_staleness_ms: none.max_staleness_ms.min(trust_ms), ..none }))
            }
            SideKind::Identity => None,
        }
    }

    fn memory<T>(self, f: impl FnOnce(&Copies<Entry>) -> T) -> T {
        match self {
            SideKind::Api => API_MEMORY.with(f),
            SideKind::Identity => IDENTITY_MEMORY.with(f),
        }
    }

    fn purged<T>(self, f: impl FnOnce(&Purged) -> T) -> T {
        match self {
            SideKind::Api => API_PURGED.with(f),
            SideKind::Identity => IDENTITY_PURGED.with(f),
        }
    }

    /// What its authority answers.
    async fn read_authority(self, env: &Env, hash: &KeyHash) -> AuthorityAnswer<SideRecord> {
        match self {
            SideKind::Api => authority::read_side(env, &authority::api_object_name(hash), parse_api).await,
            SideKind::Identity => authority::read_side(env, &authority::object_name(hash, false), parse_identity).await,
        }
    }
}

/// An edge copy of a side record and when its confirmation was asked.
#[derive(Clone)]
pub(crate) struct Entry {
    record: SideRecord,
    confirmed_at_ms: u64,
    /// Since when memory trusts the copy where purges reach only the Cache API.
    checked_at_ms: u64,
}

impl Weigh for Entry {
    fn weight(&self) -> usize {
        std::mem::size_of::<Entry>() + self.record.heap_bytes()
    }
}

/// The versions purges brought, by record hash (a small budget per kind).
type Purged = RefCell<ByteLru<[u8; 32], u64>>;

thread_local! {
    static API_MEMORY: Copies<Entry> = Copies::new(SIDE_MEMORY_BYTES);
    static API_PURGED: Purged = RefCell::new(ByteLru::new(64 * 1024));
    static IDENTITY_MEMORY: Copies<Entry> = Copies::new(SIDE_MEMORY_BYTES);
    static IDENTITY_PURGED: Purged = RefCell::new(ByteLru::new(64 * 1024));
}

/// The API `api_id`'s record (version 0 when it has none anywhere; `None`: it could not be
/// confirmed). See [`find`].
pub(crate) async fn find_api(
    env: &Env,
    ctx: &Context,
    api_id: &str,
    trust_ms: u64,
    now_ms: u64,
) -> Result<Option<ApiRecord>> {
    Ok(match find(env, ctx, SideKind::Api, api_id, trust_ms, now_ms).await? {
        Found::Record(SideRecord::Api(api)) => Some(api),
        _ => None,
    })
}

/// The identity `identity_id`'s record (`None`: it could not be confirmed, or is found
/// nowhere). See [`find`].
pub(crate) async fn find_identity(
    env: &Env,
    ctx: &Context,
    identity_id: &str,
    now_ms: u64,
) -> Result<Option<IdentityRecord>> {
    Ok(match find(env, ctx, SideKind::Identity, identity_id, 0, now_ms).await? {
        Found::Record(SideRecord::Identity(identity)) => Some(identity),
        _ => None,
    })
}

/// What the lookup found.
enum Found {
    /// The record (an API's at version 0 when it has none anywhere).
    Record(SideRecord),
    /// The authority could not confirm the best record there is (or an identity has none).
    Unconfirmed,
}

fn fresh_now(entry: &Entry, now_ms: u64) -> bool {
    freshness::is_fresh(entry.confirmed_at_ms, entry.record.max_staleness_ms(), now_ms)
}

fn trusted(entry: &Entry, now_ms: u64) -> bool {
    fresh::memory_trust_ms().is_none_or(|trust| freshness::is_fresh(entry.checked_at_ms, trust, now_ms))
}

/// The record `id` of `kind`, from the nearest tier that may answer (see the module). An API
/// with no record anywhere is trusted as such for `trust_ms` at most (its keys'
/// `max_staleness_ms`, which is the API's).
async fn find(env: &Env, ctx: &Context, kind: SideKind, id: &str, trust_ms: u64, now_ms: u64) -> Result<Found> {
    let hash = kind.hash_of(id);
    let cache = Cache::default();
    let mut stale = match nearest(env, ctx, &cache, kind, id, now_ms).await? {
        Nearest::Found(found) => return Ok(found),
        Nearest::Stale(record) => Some(record),
        Nearest::None => None,
    };
    // As a key's lookup does (`crate::lookup::find`).
    let mut asked_ms = now_ms;
    if let Some(joined) = fresh::join(kind.misses_kind(), hash.as_bytes(), now_ms).await {
        let now = joined.now_ms;
        match nearest(env, ctx, &cache, kind, id, now).await? {
            Nearest::Found(found) => return Ok(found),
            Nearest::Stale(record) => {
                let confirmed_at =
                    kind.memory(|m| m.update(|m| m.peek(hash.as_bytes()).map(|held| held.confirmed_at_ms)));
                match freshness::after_join(confirmed_at, joined.asked_ms) {
                    AfterJoin::ConfirmAgain => (stale, asked_ms) = (Some(record), now),
                    AfterJoin::FailClosed => return Ok(Found::Unconfirmed),
                }
            }
            Nearest::None => {}
        }
    }
    let _flight = fresh::begin(kind.misses_kind(), hash.as_bytes(), asked_ms);
    fresh::count(kind.misses_kind(), Confirmation::Waited);
    confirm(env, &cache, kind, id, stale, trust_ms, asked_ms).await
}

enum Nearest {
    Found(Found),
    Stale(SideRecord),
    None,
}

/// The Cache API's copy: the record's JSON, confirmed as of its header.
async fn cached(cache: &Cache, kind: SideKind, id: &str, now_ms: u64) -> Result<Option<Entry>> {
    let Some(read) = deadline::within(deadline::CACHE_MS, cache.get(kind.cache_url(id), false)).await else {
        return Ok(None);
    };
    let Some(mut response) = read? else { return Ok(None) };
    let confirmed = response.headers().get(CONFIRMED_AT_HEADER)?.and_then(|v| v.parse::<u64>().ok());
    let Some(confirmed_at_ms) = confirmed else { return Ok(None) };
    let record = (kind.parser())(&response.text().await?).ok();
    Ok(record.map(|record| Entry { record, confirmed_at_ms, checked_at_ms: now_ms }))
}

/// Memory's copy, or the Cache API's where memory has none it may answer from alone.
async fn nearest(env: &Env, ctx: &Context, cache: &Cache, kind: SideKind, id: &str, now_ms: u64) -> Result<Nearest> {
    let held = kind.memory(|m| m.get(&kind.hash_of(id)));
    let untrusted = match held {
        Some(entry) if trusted(&entry, now_ms) && fresh_now(&entry, now_ms) => {
            return Ok(Nearest::Found(answer(env, ctx, entry, now_ms)));
        }
        Some(entry) if trusted(&entry, now_ms) => return Ok(Nearest::Stale(entry.record)),
        other => other,
    };
    let best = match (cached(cache, kind, id, now_ms).await?, untrusted) {
        (None, Some(memory)) => return Ok(Nearest::Stale(memory.record)),
        (None, None) => return Ok(Nearest::None),
        (Some(cached), Some(memory)) if memory.record.version() > cached.record.version() => memory,
        (Some(cached), _) => cached,
    };
    let entry = remember(Entry { checked_at_ms: now_ms, ..best });
    Ok(if fresh_now(&entry, now_ms) {
        Nearest::Found(answer(env, ctx, entry, now_ms))
    } else {
        Nearest::Stale(entry.record)
    })
}

/// Answers from `entry`, first starting its confirmation in the background if it is due.
fn answer(env: &Env, ctx: &Context, entry: Entry, now_ms: u64) -> Found {
    if freshness::refresh_ahead(entry.confirmed_at_ms, entry.record.max_staleness_ms(), now_ms, fresh::ahead_rule()) {
        let kind = entry.record.kind();
        let hash = *kind.hash_of(entry.record.id()).as_bytes();
        fresh::ahead(ctx, kind.misses_kind(), &hash, now_ms, || {
            let (env, record) = (env.clone(), entry.record.clone());
            let (id, trust_ms) = (record.id().to_owned(), record.max_staleness_ms());
            async move {
                if let Err(e) = confirm(&env, &Cache::default(), kind, &id, Some(record), trust_ms, now_ms).await {
                    console_warn!("side record confirmation ahead of expiry failed: {e}");
                }
            }
        });
    }
    Found::Record(entry.record)
}

/// A stale copy, or none: reads KV and the authority together and keeps what wins. Where
/// purges reach only the Cache API, a confirmation a purge overtook (`crate::mark`) is asked
/// again once; overtaken twice, it fails closed.
async fn confirm(
    env: &Env,
    cache: &Cache,
    kind: SideKind,
    id: &str,
    stale: Option<SideRecord>,
    trust_ms: u64,
    now_ms: u64,
) -> Result<Found> {
    let marked = fresh::memory_trust_ms().is_some();
    let (mut stale, mut asked_ms, mut again) = (stale, now_ms, true);
    loop {
        let mark = match marked {
            true => Some(Mark::find(cache, &kind.cache_url(id), &kind.hash_of(id).to_hex()).await),
            false => None,
        };
        let Some(record) = resolve(env, kind, id, stale, trust_ms).await else {
            return Ok(Found::Unconfirmed);
        };
        let entry = Entry { record, confirmed_at_ms: asked_ms, checked_at_ms: asked_ms };
        let Some(mark) = mark else {
            return Ok(Found::Record(keep(cache, entry).await?));
        };
        match keep_marked(cache, entry, mark).await? {
            Ok(record) => return Ok(Found::Record(record)),
            Err(record) if again => stale = Some(record),
            Err(_) => return Ok(Found::Unconfirmed),
        }
        (asked_ms, again) = (Date::now().as_millis(), false);
    }
}

/// The record once KV and the authority were read together (`None`: the authority could not
/// confirm it, or an identity is found nowhere).
async fn resolve(env: &Env, kind: SideKind, id: &str, stale: Option<SideRecord>, trust_ms: u64) -> Option<SideRecord> {
    let hash = kind.hash_of(id);
    let (kv, mut authority) = futures::join!(read_kv(env, kind.kv_key(id), kind.parser()), async {
        // The KV-only baseline edge (`cargo xtask bench`'s point of comparison) never asks.
        if cfg!(feature = "kv-only-baseline") {
            AuthorityAnswer::Unknown
        } else {
            kind.read_authority(env, &hash).await
        }
    });
    let kv = kv.unwrap_or_else(|e| {
        console_warn!("KV read of a side record failed: {e}");
        if !matches!(authority, AuthorityAnswer::Holds(_)) {
            authority = AuthorityAnswer::Unreachable;
        }
        None
    });
    // Found nowhere counts as "none" (an API's empty lists) only when the authority said so: with
    // the authority unreachable and KV without a copy (lagging, or failed) the API may have lists
    // no one here has seen, so it fails closed.
    let known_missing = !matches!(authority, AuthorityAnswer::Unreachable);
    match freshness::resolve(stale, kv, authority) {
        Resolved::FailClosed(_) => None,
        Resolved::Record(None, _) if known_missing => kind.none(id, trust_ms),
        Resolved::Record(None, _) => None,
        Resolved::Record(Some(record), _) => Some(record),
    }
}

fn purged_newer(kind: SideKind, hash: &[u8; 32], version: u64) -> bool {
    kind.purged(|p| p.borrow().peek(hash).is_some_and(|seen| *seen > version))
}

/// Puts a copy in memory unless memory holds a newer version or a purge brought one; answers
/// the copy memory holds afterwards (of one version, the later confirmation and check times).
fn remember(mut entry: Entry) -> Entry {
    let kind = entry.record.kind();
    let hash = *kind.hash_of(entry.record.id()).as_bytes();
    kind.memory(|m| {
        m.update(|memory| {
            match memory.get(&hash) {
                Some(held) if held.record.version() > entry.record.version() => return held.clone(),
                Some(held) if held.record.version() == entry.record.version() => {
                    entry.confirmed_at_ms = entry.confirmed_at_ms.max(held.confirmed_at_ms);
                    entry.checked_at_ms = entry.checked_at_ms.max(held.checked_at_ms);
                }
                _ => {}
            }
            if !purged_newer(kind, &hash, entry.record.version()) {
                memory.put(hash, entry.clone());
            }
            entry
        })
    })
}

/// Keeps a confirmed copy in memory and the Cache API (tagged with the record's hash, for
/// purge-by-tag); a newer version that reached memory meanwhile is written after it.
async fn keep(cache: &Cache, entry: Entry) -> Result<SideRecord> {
    let kind = entry.record.kind();
    let hash = kind.hash_of(entry.record.id());
    let mut kept = remember(entry);
    if purged_newer(kind, hash.as_bytes(), kept.record.version()) {
        return Ok(kept.record);
    }
    loop {
        put_copy(cache, &kept).await?;
        if held_version(kind, &hash).is_some_and(|v| v > kept.record.version()) {
            kept = remember(kept);
            continue;
        }
        return Ok(kept.record);
    }
}

fn held_version(kind: SideKind, hash: &KeyHash) -> Option<u64> {
    kind.memory(|m| m.update(|m| m.peek(hash.as_bytes()).map(|h| h.record.version())))
}

/// [`keep`] where purges reach only the Cache API, as a key's copy is kept there
/// (`lookup::keep_marked`): written, then the mark read, then kept in memory; a mark gone takes
/// the copy back out (`Err` with its record); nothing is written after the mark was read; no
/// mark, or a write not finished in time, leaves memory trusting the copy only from its ask.
async fn keep_marked(
    cache: &Cache,
    entry: Entry,
    mark: Option<Mark>,
) -> Result<std::result::Result<SideRecord, SideRecord>> {
    let kind = entry.record.kind();
    let untrusted = Entry { checked_at_ms: entry.confirmed_at_ms, ..entry.clone() };
    let Some(mark) = mark else {
        fresh::count(kind.misses_kind(), Confirmation::Unmarked);
        return Ok(Ok(remember(untrusted).record));
    };
    if held_version(kind, &kind.hash_of(entry.record.id())).is_some_and(|v| v > entry.record.version()) {
        return Ok(Ok(remember(entry).record));
    }
    let written = put_copy(cache, &entry).await?;
    if !mark.intact(cache).await {
        fresh::count(kind.misses_kind(), Confirmation::Overtaken);
        lookup::drop_copy(cache, &kind.cache_url(entry.record.id())).await?;
        return Ok(Err(entry.record));
    }
    Ok(Ok(remember(if written { entry } else { untrusted }).record))
}

/// Writes a copy to the Cache API: the record's JSON, tagged with its hash, confirmed as of its
/// header; a write past its deadline is logged (memory keeps the copy) and answered `false`.
async fn put_copy(cache: &Cache, entry: &Entry) -> Result<bool> {
    let kind = entry.record.kind();
    let headers = Headers::new();
    headers.set("cache-control", &format!("max-age={CACHE_MAX_AGE_S}"))?;
    headers.set("cache-tag", &kind.hash_of(entry.record.id()).to_hex())?;
    headers.set(CONFIRMED_AT_HEADER, &entry.confirmed_at_ms.to_string())?;
    let response = Response::ok(entry.record.to_json()?)?.with_headers(headers);
    let put = cache.put(kind.cache_url(entry.record.id()), response);
    match deadline::within(deadline::CACHE_MS, put).await {
        Some(done) => done.map(|()| true),
        None => {
            console_warn!("Cache API write took over {} ms; memory keeps the copy", deadline::CACHE_MS);
            Ok(false)
        }
    }
}

/// Replaces this location's copies of a side record with `record`, from a signed purge
/// confirmed as of `confirmed_at_ms`: memory takes it (unless it holds a newer version) in
/// record mode, and the Cache API copy is dropped in both modes. Answers whether there was a
/// copy here.
pub(crate) async fn purge(record: SideRecord, confirmed_at_ms: u64, mode: PurgeMode) -> Result<bool> {
    let kind = record.kind();
    let hash = kind.hash_of(record.id());
    let in_memory = kind.memory(|m| m.update(|m| m.contains(hash.as_bytes())));
    let url = kind.cache_url(record.id());
    if mode == PurgeMode::Record {
        let version = record.version();
        kind.purged(|p| {
            let mut purged = p.borrow_mut();
            if purged.peek(hash.as_bytes()).is_none_or(|seen| *seen < version) {
                purged.put(*hash.as_bytes(), version);
            }
        });
        remember(Entry { record, confirmed_at_ms, checked_at_ms: confirmed_at_ms });
    }
    let cache = Cache::default();
    if mode == PurgeMode::TagOnly {
        // Purge-by-tag drops every entry of the record's tag: a confirmation's mark, then the
        // copy (a copy written after the copy's drop is followed by a read that finds no mark).
        lookup::drop_copy(&cache, &crate::mark::url_of(&url)).await?;
    }
    let dropped = deadline::within(deadline::CACHE_MS, cache.delete(&url, false))
        .await
        .ok_or_else(|| worker::Error::RustError("the Cache API did not drop the side copy in time".into()))??;
    Ok(in_memory || matches!(dropped, worker::CacheDeletionOutcome::Success))
}
