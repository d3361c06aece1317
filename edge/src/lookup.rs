//! Finds a key's record: isolate memory, then the Cache API, then Workers KV together with the
//! key's authority (its KeyState Durable Object).
//!
//! Every edge copy carries its confirmation time: when the authority was asked for it (the
//! edge's clock before the request was sent), or, for a record a signed purge carried, the
//! earlier of the purge's signature time and its arrival. The rules themselves are pure and
//! table-tested in `keyward_shared::freshness`: a copy younger than `max_staleness_ms` is
//! answered from directly, and so is a copy in a final state (revoked, deleted); any other copy
//! is confirmed first, by reading KV and the authority together, the highest version winning,
//! so neither a lagging KV nor an authority that missed an update can bring an older record
//! back. Every read here has a deadline: an authority that cannot answer within
//! [`crate::deadline::AUTHORITY_MS`] counts as unreachable, and the caller gets `UNAVAILABLE`
//! (fail closed) unless the best record is final.
//!
//! A copy answered from that has used its share of `max_staleness_ms` is confirmed again in the
//! background, and one confirmation per key is under way at a time (`crate::fresh`). Where
//! purges reach only the Cache API (tag-only), memory answers a copy only for its own short
//! trust after the Cache API last showed one, then reads the Cache API again: the copy the
//! Cache API holds keeps its own confirmation time, so the `max_staleness_ms` bound holds too.
//!
//! Memory never trades a copy for an older version: a refill (or a confirmation ahead of
//! expiry) that read KV and the authority before a purge arrived, and finishes after it, keeps
//! (and answers) the purge's newer record, and puts that in the Cache API too.

use std::cell::RefCell;

use keyward_shared::budget::{ByteLru, Weigh};
use keyward_shared::freshness::{self, AfterJoin, AuthorityAnswer, Resolved, Tier};
use keyward_shared::record::RecordError;
use keyward_shared::{KeyHash, KeyRecord, Source, kv_key_for_key};
use serde::{Deserialize, Serialize};
use worker::{Cache, CacheDeletionOutcome, Context, Env, Headers, Response, Result, console_warn};

use crate::authority;
use crate::fresh::{self, Confirmation};
use crate::mark::Mark;
use crate::memory::{self, Copies};
use crate::misses::{self, Kind};
use crate::{KV_BINDING, deadline, origin};

/// How long the Cache API may keep a copy (it is confirmed with the authority after
/// `max_staleness_ms` anyway; this only bounds the storage it takes).
const CACHE_MAX_AGE_S: u64 = 3_600;

/// An edge copy of a record and when its confirmation was asked.
#[derive(Clone, Serialize, Deserialize)]
struct Entry {
    record: KeyRecord,
    confirmed_at_ms: u64,
    /// Memory only: since when memory trusts the copy, where purges reach only the Cache API
    /// (the Cache API showed it then, or its confirmation was asked then).
    #[serde(skip)]
    checked_at_ms: u64,
}

/// What the lookup found.
pub(crate) enum Found {
    /// The record (if any) and where it came from.
    Record(Option<KeyRecord>, Source),
    /// The authority could not confirm the best record there is, and it is not final.
    Unconfirmed(KeyRecord, Source),
    /// There was no copy, and the caller may not make the edge fetch more now.
    CallerLimited,
}

impl Weigh for Entry {
    fn weight(&self) -> usize {
        std::mem::size_of::<Entry>() + self.record.heap_bytes()
    }
}

thread_local! {
    /// Key copies, bounded by bytes (see `crate::memory`).
    static MEMORY: Copies<Entry> = Copies::new(memory::key_budget(None));
}

/// Sets the bytes key copies may take in this isolate.
pub(crate) fn set_budget(bytes: usize) {
    MEMORY.with(|m| m.set_budget(bytes));
}

/// How many key copies memory holds, and their bytes.
pub(crate) fn held() -> (usize, usize) {
    MEMORY.with(Copies::held)
}

/// The URL under which a key's copy is stored in the Cache API.
fn cache_url(hash: &KeyHash) -> String {
    origin::cache_url(&format!("key/{}", hash.to_hex()))
}

/// The record for `hash`, from the nearest tier that may answer. A lookup with no copy at all
/// first checks the remembered misses, then asks `admit` whether its caller may make the edge
/// fetch (see `crate::misses`). A copy answered from that is due is confirmed again after the
/// answer (see `crate::fresh`); a stale copy or a miss waits for a confirmation, another
/// request's if one is under way.
pub(crate) async fn find(
    env: &Env,
    ctx: &Context,
    hash: &KeyHash,
    now_ms: u64,
    admit: impl FnOnce() -> bool,
) -> Result<Found> {
    let cache = Cache::default();
    let mut stale = match nearest(env, ctx, &cache, hash, now_ms).await? {
        Nearest::Found(found) => return Ok(found),
        Nearest::Stale(record, source) => Some((record, source)),
        Nearest::None => None,
    };
    if stale.is_none() {
        if misses::remembered(Kind::Key, hash.as_bytes(), now_ms) {
            return Ok(Found::Record(None, Source::Memory));
        }
        if !admit() {
            return Ok(Found::CallerLimited);
        }
    }
    // Another request's confirmation of this key is under way: its answer serves this one too.
    // A copy it left stale is one the authority did not confirm in time (this request fails
    // closed too, rather than wait as long again), or one whose `max_staleness_ms` is shorter
    // than the wait (this request confirms it itself).
    let mut asked_ms = now_ms;
    if let Some(joined) = fresh::join(Kind::Key, hash.as_bytes(), now_ms).await {
        let now = joined.now_ms;
        match nearest(env, ctx, &cache, hash, now).await? {
            Nearest::Found(found) => return Ok(found),
            Nearest::Stale(record, source) => match freshness::after_join(confirmed_at(hash), joined.asked_ms) {
                AfterJoin::ConfirmAgain => (stale, asked_ms) = (Some((record, source)), now),
                AfterJoin::FailClosed => return Ok(Found::Unconfirmed(record, source)),
            },
            Nearest::None if misses::remembered(Kind::Key, hash.as_bytes(), now) => {
                return Ok(Found::Record(None, Source::Memory));
            }
            Nearest::None => {}
        }
    }
    let _flight = fresh::begin(Kind::Key, hash.as_bytes(), asked_ms);
    fresh::count(Kind::Key, Confirmation::Waited);
    refresh(env, &cache, hash, stale, asked_ms).await
}

/// When memory's copy of the key was confirmed as of, if it holds one.
fn confirmed_at(hash: &KeyHash) -> Option<u64> {
    MEMORY.with(|m| m.update(|m| m.peek(hash.as_bytes()).map(|held| held.confirmed_at_ms)))
}

/// What memory and the Cache API hold for a key.
enum Nearest {
    /// Answered from a copy.
    Found(Found),
    /// The nearest copy, which must be confirmed first.
    Stale(KeyRecord, Source),
    None,
}

/// Memory's copy, or the Cache API's where memory has none it may answer from alone.
async fn nearest(env: &Env, ctx: &Context, cache: &Cache, hash: &KeyHash, now_ms: u64) -> Result<Nearest> {
    let untrusted = match from_memory(hash, now_ms) {
        Held::Answer(entry) => return Ok(Nearest::Found(answer(env, ctx, hash, entry, Source::Memory, now_ms))),
        Held::Stale(record) => return Ok(Nearest::Stale(record, Source::Memory)),
        Held::Untrusted(entry) => Some(entry),
        Held::None => None,
    };
    Ok(match from_cache(cache, hash, untrusted, now_ms).await? {
        Held::Answer(entry) => Nearest::Found(answer(env, ctx, hash, entry, Source::Cache, now_ms)),
        Held::Stale(record) => Nearest::Stale(record, Source::Cache),
        Held::Untrusted(entry) => Nearest::Stale(entry.record, Source::Memory),
        Held::None => Nearest::None,
    })
}

/// What a tier holds for a key.
enum Held {
    /// A copy that may be answered from now.
    Answer(Entry),
    /// A copy that must be confirmed first.
    Stale(KeyRecord),
    /// Memory's copy, past memory's own trust: the Cache API decides whether it still stands.
    Untrusted(Entry),
    None,
}

fn from_memory(hash: &KeyHash, now_ms: u64) -> Held {
    let Some(entry) = MEMORY.with(|m| m.get(hash)) else {
        return Held::None;
    };
    if !freshness::memory_trusted(&entry.record, entry.checked_at_ms, fresh::memory_trust_ms(), now_ms) {
        Held::Untrusted(entry)
    } else if answerable(&entry, now_ms) {
        Held::Answer(entry)
    } else {
        Held::Stale(entry.record)
    }
}

/// The Cache API's copy, read within its deadline (a read past it counts as a miss: KV and the
/// authority decide then, which is never less safe than a copy). Memory's `untrusted` copy
/// stands where the Cache API holds a copy of the key (a tag purge would have dropped it), and
/// wins if newer; where the Cache API holds none, memory's copy is stale whatever its age.
async fn from_cache(cache: &Cache, hash: &KeyHash, untrusted: Option<Entry>, now_ms: u64) -> Result<Held> {
    let mut cached = None;
    if let Some(read) = deadline::within(deadline::CACHE_MS, cache.get(cache_url(hash), false)).await
        && let Some(mut response) = read?
    {
        cached = response.json::<Entry>().await.ok();
    }
    let best = match (cached, untrusted) {
        (None, Some(memory)) => return Ok(Held::Untrusted(memory)),
        (None, None) => return Ok(Held::None),
        (Some(cached), Some(memory)) if memory.record.version > cached.record.version => memory,
        (Some(cached), _) => cached,
    };
    // The Cache API showed a copy when this read was asked: memory may trust it from then.
    let entry = remember(hash, Entry { checked_at_ms: now_ms, ..best });
    Ok(if answerable(&entry, now_ms) { Held::Answer(entry) } else { Held::Stale(entry.record) })
}

fn answerable(entry: &Entry, now_ms: u64) -> bool {
    !freshness::needs_confirmation(&entry.record, entry.confirmed_at_ms, now_ms)
}

/// Answers from `entry`, first starting its confirmation in the background if it is due.
fn answer(env: &Env, ctx: &Context, hash: &KeyHash, entry: Entry, source: Source, now_ms: u64) -> Found {
    if freshness::key_refresh_ahead(&entry.record, entry.confirmed_at_ms, now_ms, fresh::ahead_rule()) {
        // Cloned only when no confirmation of the key is under way.
        fresh::ahead(ctx, Kind::Key, hash.as_bytes(), now_ms, || {
            let (env, hash, record) = (env.clone(), *hash, entry.record.clone());
            async move {
                if let Err(e) = refresh(&env, &Cache::default(), &hash, Some((record, source)), now_ms).await {
                    console_warn!("confirmation ahead of expiry failed: {e}");
                }
            }
        });
    }
    Found::Record(Some(entry.record), source)
}

/// A stale copy, or none: reads KV and the authority together and keeps what wins. Where
/// purges reach only the Cache API, a confirmation a purge overtook (`crate::mark`) is asked
/// again once; overtaken twice, the request fails closed as with no answer (unless final).
async fn refresh(
    env: &Env,
    cache: &Cache,
    hash: &KeyHash,
    stale: Option<(KeyRecord, Source)>,
    now_ms: u64,
) -> Result<Found> {
    let marked = fresh::memory_trust_ms().is_some();
    let (mut stale, mut asked_ms, mut again) = (stale, now_ms, true);
    loop {
        match confirm_once(env, cache, hash, stale, asked_ms, marked).await? {
            Confirmed::Found(found) => return Ok(found),
            Confirmed::Overtaken(record, source) if again => stale = Some((record, source)),
            Confirmed::Overtaken(record, source) => return Ok(Found::Unconfirmed(record, source)),
        }
        (asked_ms, again) = (worker::Date::now().as_millis(), false);
    }
}

/// What one confirmation came to.
enum Confirmed {
    Found(Found),
    /// A purge ran while it was in flight: its record (which may predate the purge's change) was
    /// taken back out of the Cache API and not kept in memory.
    Overtaken(KeyRecord, Source),
}

/// One confirmation, asked at `now_ms` (`marked`: first putting its mark, where purges reach only
/// the Cache API).
async fn confirm_once(
    env: &Env,
    cache: &Cache,
    hash: &KeyHash,
    stale: Option<(KeyRecord, Source)>,
    now_ms: u64,
    marked: bool,
) -> Result<Confirmed> {
    let mark = match marked {
        true => Some(Mark::find(cache, &cache_url(hash), &hash.to_hex()).await),
        false => None,
    };
    let (kv, mut authority) =
        futures::join!(read_kv(env, kv_key_for_key(hash), KeyRecord::from_json), ask_authority(env, hash));
    let kv = kv.unwrap_or_else(|e| {
        // Without KV's answer, only the authority's own record may confirm: anything else is
        // as good as no answer (a final copy is still answered, others fail closed).
        console_warn!("KV read failed: {e}");
        if !matches!(authority, AuthorityAnswer::Holds(_)) {
            authority = AuthorityAnswer::Unreachable;
        }
        None
    });
    let copy_source = stale.as_ref().map_or(Source::Kv, |(_, source)| *source);
    // Only a miss both KV and a reachable authority agree on is remembered.
    let known_missing = stale.is_none() && kv.is_none() && matches!(authority, AuthorityAnswer::Unknown);
    match freshness::resolve(stale.map(|(record, _)| record), kv, authority) {
        Resolved::Record(None, _) => {
            if known_missing {
                misses::remember(Kind::Key, hash.as_bytes(), now_ms);
            }
            Ok(Confirmed::Found(Found::Record(None, Source::Kv)))
        }
        Resolved::Record(Some(record), tier) => {
            let source = match tier {
                Tier::Copy => copy_source,
                Tier::Kv => Source::Kv,
                Tier::Authority => Source::Authority,
            };
            let entry = Entry { record, confirmed_at_ms: now_ms, checked_at_ms: now_ms };
            let kept = match mark {
                None => Ok(keep(cache, hash, entry).await?),
                Some(mark) => keep_marked(cache, hash, entry, mark).await?,
            };
            Ok(match kept {
                Ok(record) => Confirmed::Found(Found::Record(Some(record), source)),
                Err(record) => Confirmed::Overtaken(record, source),
            })
        }
        Resolved::FailClosed(record) => Ok(Confirmed::Found(Found::Unconfirmed(record, copy_source))),
    }
}

/// The key's authority's answer. The KV-only baseline edge (feature `kv-only-baseline`, built
/// by `cargo xtask bench` as the point of comparison) never asks: to it every key is unknown to
/// the authority, so misses and confirmations read KV alone.
async fn ask_authority(env: &Env, hash: &KeyHash) -> AuthorityAnswer<KeyRecord> {
    if cfg!(feature = "kv-only-baseline") {
        return AuthorityAnswer::Unknown;
    }
    authority::read(env, hash).await
}

/// The record under `kv_key` in this location's KV, within [`deadline::KV_MS`].
pub(crate) async fn read_kv<R>(
    env: &Env,
    kv_key: String,
    parse: fn(&str) -> std::result::Result<R, RecordError>,
) -> std::result::Result<Option<R>, String> {
    let kv = env.kv(KV_BINDING).map_err(|e| e.to_string())?;
    let text = deadline::within(deadline::KV_MS, kv.get(&kv_key).text())
        .await
        .ok_or_else(|| format!("no answer within {} ms", deadline::KV_MS))?
        .map_err(|e| e.to_string())?;
    text.map(|text| parse(&text).map_err(|e| e.to_string())).transpose()
}

/// How a purge treats this location's copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PurgeMode {
    /// Memory takes the purge's record; the Cache API copy is dropped.
    Record,
    /// Only the Cache API copy is dropped, as Cloudflare's purge-by-tag does in production
    /// (it cannot reach isolate memory, whose copies end within `max_staleness_ms`).
    TagOnly,
}

/// Replaces this location's copies of a key with `record`, from the control plane's signed
/// purge, confirmed as of `confirmed_at_ms` (see `freshness::purge_confirmed_at`). Memory takes
/// the record (unless it holds a newer version); the Cache API copy is dropped, so an isolate
/// without the record in memory refills from KV and the authority. In tag-only mode only the
/// Cache API copy is dropped. Answers whether there was a copy here; fails if the Cache API
/// does not drop the copy within its deadline.
pub(crate) async fn purge(record: KeyRecord, confirmed_at_ms: u64, mode: PurgeMode) -> Result<bool> {
    let hash = record.hash;
    let in_memory = MEMORY.with(|m| m.update(|m| m.contains(hash.as_bytes())));
    if mode == PurgeMode::Record {
        note_purged(&hash, record.version);
        remember(&hash, Entry { record, confirmed_at_ms, checked_at_ms: confirmed_at_ms });
    }
    // A drop that does not finish in time fails the purge, which the control plane then retries.
    let cache = Cache::default();
    if mode == PurgeMode::TagOnly {
        // Purge-by-tag drops every entry of the key's tag: a confirmation's mark, then the copy
        // (a copy written after the copy's drop is followed by a read that finds no mark).
        drop_copy(&cache, &crate::mark::url_of(&cache_url(&hash))).await?;
    }
    let in_cache = deadline::within(deadline::CACHE_MS, cache.delete(cache_url(&hash), false))
        .await
        .ok_or_else(|| worker::Error::RustError("the Cache API did not drop the copy in time".into()))??;
    Ok(in_memory || matches!(in_cache, CacheDeletionOutcome::Success))
}

/// Bytes for purged versions (about 7,700 keys).
const PURGED_VERSIONS_BYTES: usize = 1 << 20;

thread_local! {
    /// The versions purges brought, remembered apart from the copies: memory may evict a purged
    /// copy (it is bounded by bytes), and a refill that read KV and the authority before the
    /// purge must not then bring the older version back.
    static PURGED: RefCell<ByteLru<[u8; 32], u64>> = RefCell::new(ByteLru::new(PURGED_VERSIONS_BYTES));
}

fn note_purged(hash: &KeyHash, version: u64) {
    PURGED.with(|p| {
        let mut purged = p.borrow_mut();
        if purged.peek(hash.as_bytes()).is_none_or(|seen| *seen < version) {
            purged.put(*hash.as_bytes(), version);
        }
    });
}

/// Whether a purge brought a newer version of the key than `version`.
fn purged_newer(hash: &KeyHash, version: u64) -> bool {
    PURGED.with(|p| p.borrow().peek(hash.as_bytes()).is_some_and(|seen| *seen > version))
}

/// Puts a copy in memory unless memory holds a newer version of the key, or a purge brought
/// one (then nothing is kept: the copy only answers the request that read it); answers the copy
/// memory holds afterwards. Of two copies of one version, memory keeps the later confirmation
/// and check times (a confirmation finishing late never shortens what another established).
fn remember(hash: &KeyHash, mut entry: Entry) -> Entry {
    MEMORY.with(|m| {
        m.update(|memory| {
            match memory.get(hash.as_bytes()) {
                Some(held) if held.record.version > entry.record.version => return held.clone(),
                Some(held) if held.record.version == entry.record.version => {
                    entry.confirmed_at_ms = entry.confirmed_at_ms.max(held.confirmed_at_ms);
                    entry.checked_at_ms = entry.checked_at_ms.max(held.checked_at_ms);
                }
                _ => {}
            }
            if !purged_newer(hash, entry.record.version) {
                memory.put(*hash.as_bytes(), entry.clone());
            }
            entry
        })
    })
}

/// The copy of the key memory holds, when it is newer than `version` (a purge or a confirmation
/// brought it since `version` was read).
pub(crate) fn newer_copy(hash: &KeyHash, version: u64) -> Option<KeyRecord> {
    MEMORY.with(|m| {
        m.update(|m| m.peek(hash.as_bytes()).filter(|held| held.record.version > version).map(|h| h.record.clone()))
    })
}

fn held_version(hash: &KeyHash) -> Option<u64> {
    MEMORY.with(|m| m.update(|m| m.peek(hash.as_bytes()).map(|held| held.record.version)))
}

/// Keeps a confirmed copy in memory and the Cache API (tagged with the key hash, for
/// purge-by-tag in production); answers the record kept, which is a newer one when memory
/// already held one. A newer version that reached memory while the Cache API write was under
/// way is written after it, so the Cache API never ends on the older record.
async fn keep(cache: &Cache, hash: &KeyHash, entry: Entry) -> Result<KeyRecord> {
    let mut kept = remember(hash, entry);
    if purged_newer(hash, kept.record.version) {
        return Ok(kept.record);
    }
    loop {
        put_copy(cache, hash, &kept).await?;
        if held_version(hash).is_some_and(|v| v > kept.record.version) {
            kept = remember(hash, kept);
            continue;
        }
        return Ok(kept.record);
    }
}

/// [`keep`] where purges reach only the Cache API (`crate::mark`): the copy is written, then
/// the mark read, and only then kept in memory. A mark gone means a purge may have overtaken
/// the confirmation: the copy is dropped from the Cache API again (`Err` with its record).
/// Nothing is written after the mark was read (a newer copy memory holds came from the Cache
/// API or from a confirmation that wrote it itself). Without a mark, or with a write that did
/// not finish in time, the copy is not counted as in the Cache API: memory trusts it only from
/// when it was asked, so the next request confirms again.
async fn keep_marked(
    cache: &Cache,
    hash: &KeyHash,
    entry: Entry,
    mark: Option<Mark>,
) -> Result<std::result::Result<KeyRecord, KeyRecord>> {
    let untrusted = Entry { checked_at_ms: entry.confirmed_at_ms, ..entry.clone() };
    let Some(mark) = mark else {
        fresh::count(Kind::Key, Confirmation::Unmarked);
        return Ok(Ok(remember(hash, untrusted).record));
    };
    if held_version(hash).is_some_and(|v| v > entry.record.version) {
        return Ok(Ok(remember(hash, entry).record));
    }
    let written = put_copy(cache, hash, &entry).await?;
    if !mark.intact(cache).await {
        fresh::count(Kind::Key, Confirmation::Overtaken);
        drop_copy(cache, &cache_url(hash)).await?;
        return Ok(Err(entry.record));
    }
    Ok(Ok(remember(hash, if written { entry } else { untrusted }).record))
}

/// Writes a copy to the Cache API, tagged with the key hash; a write past its deadline is
/// logged (memory keeps the copy) and answered `false`.
async fn put_copy(cache: &Cache, hash: &KeyHash, entry: &Entry) -> Result<bool> {
    let put = cache.put(cache_url(hash), copy_response(hash, entry)?);
    match deadline::within(deadline::CACHE_MS, put).await {
        Some(done) => done.map(|()| true),
        None => {
            console_warn!("Cache API write took over {} ms; memory keeps the copy", deadline::CACHE_MS);
            Ok(false)
        }
    }
}

/// The Cache API's response for a copy. Not inlined: the record's serializer is large, and
/// [`keep`]'s loop would carry it twice.
#[inline(never)]
fn copy_response(hash: &KeyHash, entry: &Entry) -> Result<Response> {
    let headers = Headers::new();
    headers.set("cache-control", &format!("max-age={CACHE_MAX_AGE_S}"))?;
    headers.set("cache-tag", &hash.to_hex())?;
    Ok(Response::from_json(entry)?.with_headers(headers))
}

/// Drops the Cache API's copy at `url` (a copy a purge may have overtaken): a drop that does
/// not finish in time is an error, as a purge's is.
pub(crate) async fn drop_copy(cache: &Cache, url: &str) -> Result<()> {
    deadline::within(deadline::CACHE_MS, cache.delete(url, false))
        .await
        .ok_or_else(|| worker::Error::RustError("the Cache API did not drop the copy in time".into()))??;
    Ok(())
}
