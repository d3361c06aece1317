//! An API's record at the edge (its allow and deny lists, its limit override): isolate memory,
//! then the Cache API, then Workers KV together with its authority (the KeyState object
//! `api:<hash>`), under the same freshness rules as a key's record (`crate::lookup`):
//!
//! - a copy is answered from while younger than its `max_staleness_ms` since its confirmation
//!   was asked (or its signed purge was made), and confirmed again in the background once it has
//!   used `REFRESH_AHEAD_PERCENT` of that; one confirmation per API is under way in an isolate;
//! - a stale copy, or none, reads KV and the authority together, the highest version winning;
//!   without the authority's answer the lookup fails closed (an API record is never final);
//! - an API with no record in KV nor at a reachable authority counts as an empty policy at
//!   version 0, kept as a copy confirmed when it was asked, so it is asked again within
//!   `max_staleness_ms` like any other copy;
//! - where purges reach only the Cache API (tag-only), memory answers a copy for its memory
//!   trust after the Cache API last showed one;
//! - memory never trades a copy for an older version, and a purge's version is remembered apart
//!   so a refill that read before the purge cannot bring the older record back.
//!
//! API copies take their own small budget in memory ([`API_MEMORY_BYTES`]): an isolate serves
//! few APIs.

use std::cell::RefCell;

use keyward_shared::KeyHash;
use keyward_shared::budget::{ByteLru, Weigh};
use keyward_shared::freshness::{self, Resolved};
use keyward_shared::policy::{ApiRecord, kv_key_for_api};
use serde::{Deserialize, Serialize};
use worker::{Cache, Context, Date, Env, Headers, Response, Result, console_warn};

use crate::fresh::{self, Confirmation};
use crate::lookup::{self, PurgeMode, read_kv};
use crate::mark::Mark;
use crate::memory::Copies;
use crate::misses::Kind;
use crate::{authority, deadline, origin};

/// Bytes API copies may take in one isolate.
pub(crate) const API_MEMORY_BYTES: usize = 256 * 1024;
/// How long the Cache API may keep a copy (it is confirmed after `max_staleness_ms` anyway).
const CACHE_MAX_AGE_S: u64 = 3_600;

/// An edge copy of an API's record and when its confirmation was asked.
#[derive(Clone, Serialize, Deserialize)]
struct Entry {
    record: ApiRecord,
    confirmed_at_ms: u64,
    /// Memory only: since when memory trusts the copy where purges reach only the Cache API.
    #[serde(skip)]
    checked_at_ms: u64,
}

impl Weigh for Entry {
    fn weight(&self) -> usize {
        std::mem::size_of::<Entry>() + self.record.heap_bytes()
    }
}

thread_local! {
    static MEMORY: Copies<Entry> = Copies::new(API_MEMORY_BYTES);
    /// The versions purges brought, by API hash (a few APIs: a small budget).
    static PURGED: RefCell<ByteLru<[u8; 32], u64>> = RefCell::new(ByteLru::new(64 * 1024));
}

/// What the lookup found.
pub(crate) enum Found {
    /// The API's record (version 0 when it has none anywhere).
    Record(ApiRecord),
    /// The authority could not confirm the best record there is.
    Unconfirmed,
}

fn cache_url(api_id: &str) -> String {
    origin::cache_url(&format!("api/{}", ApiRecord::hash_of(api_id).to_hex()))
}

fn fresh_now(entry: &Entry, now_ms: u64) -> bool {
    freshness::is_fresh(entry.confirmed_at_ms, entry.record.max_staleness_ms, now_ms)
}

fn trusted(entry: &Entry, now_ms: u64) -> bool {
    fresh::memory_trust_ms().is_none_or(|trust| freshness::is_fresh(entry.checked_at_ms, trust, now_ms))
}

/// The record of the API `api_id`, from the nearest tier that may answer (see the module). An
/// API with no record anywhere is trusted as such for `trust_ms` at most (its keys'
/// `max_staleness_ms`, which is the API's).
pub(crate) async fn find(env: &Env, ctx: &Context, api_id: &str, trust_ms: u64, now_ms: u64) -> Result<Found> {
    let hash = ApiRecord::hash_of(api_id);
    let cache = Cache::default();
    let stale = match nearest(env, ctx, &cache, api_id, &hash, now_ms).await? {
        Nearest::Found(found) => return Ok(found),
        Nearest::Stale(record) => Some(record),
        Nearest::None => None,
    };
    if let Some(now) = fresh::join(Kind::Api, hash.as_bytes(), now_ms).await {
        match nearest(env, ctx, &cache, api_id, &hash, now).await? {
            Nearest::Found(found) => return Ok(found),
            Nearest::Stale(_) => return Ok(Found::Unconfirmed),
            Nearest::None => {}
        }
    }
    let _flight = fresh::begin(Kind::Api, hash.as_bytes(), now_ms);
    fresh::count(Kind::Api, Confirmation::Waited);
    confirm(env, &cache, api_id, stale, trust_ms, now_ms).await
}

enum Nearest {
    Found(Found),
    Stale(ApiRecord),
    None,
}

/// Memory's copy, or the Cache API's where memory has none it may answer from alone.
async fn nearest(
    env: &Env,
    ctx: &Context,
    cache: &Cache,
    api_id: &str,
    hash: &KeyHash,
    now_ms: u64,
) -> Result<Nearest> {
    let held = MEMORY.with(|m| m.get(hash));
    let untrusted = match held {
        Some(entry) if trusted(&entry, now_ms) && fresh_now(&entry, now_ms) => {
            return Ok(Nearest::Found(answer(env, ctx, api_id, entry, now_ms)));
        }
        Some(entry) if trusted(&entry, now_ms) => return Ok(Nearest::Stale(entry.record)),
        other => other,
    };
    let mut cached = None;
    if let Some(read) = deadline::within(deadline::CACHE_MS, cache.get(cache_url(api_id), false)).await
        && let Some(mut response) = read?
    {
        cached = response.json::<Entry>().await.ok();
    }
    let best = match (cached, untrusted) {
        (None, Some(memory)) => return Ok(Nearest::Stale(memory.record)),
        (None, None) => return Ok(Nearest::None),
        (Some(cached), Some(memory)) if memory.record.version > cached.record.version => memory,
        (Some(cached), _) => cached,
    };
    let entry = remember(Entry { checked_at_ms: now_ms, ..best });
    Ok(if fresh_now(&entry, now_ms) {
        Nearest::Found(answer(env, ctx, api_id, entry, now_ms))
    } else {
        Nearest::Stale(entry.record)
    })
}

/// Answers from `entry`, first starting its confirmation in the background if it is due.
fn answer(env: &Env, ctx: &Context, api_id: &str, entry: Entry, now_ms: u64) -> Found {
    let percent = fresh::refresh_ahead_percent();
    if freshness::refresh_ahead(entry.confirmed_at_ms, entry.record.max_staleness_ms, now_ms, percent) {
        let hash = *ApiRecord::hash_of(api_id).as_bytes();
        fresh::ahead(ctx, Kind::Api, &hash, now_ms, || {
            let (env, api_id, record) = (env.clone(), api_id.to_owned(), entry.record.clone());
            let trust_ms = record.max_staleness_ms;
            async move {
                if let Err(e) = confirm(&env, &Cache::default(), &api_id, Some(record), trust_ms, now_ms).await {
                    console_warn!("API record confirmation ahead of expiry failed: {e}");
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
    api_id: &str,
    stale: Option<ApiRecord>,
    trust_ms: u64,
    now_ms: u64,
) -> Result<Found> {
    let marked = fresh::memory_trust_ms().is_some();
    let tag = ApiRecord::hash_of(api_id).to_hex();
    let (mut stale, mut asked_ms, mut again) = (stale, now_ms, true);
    loop {
        let mark = match marked {
            true => Some(Mark::find(cache, &cache_url(api_id), &tag).await),
            false => None,
        };
        let Some(record) = resolve(env, api_id, stale, trust_ms).await else {
            return Ok(Found::Unconfirmed);
        };
        let entry = Entry { record, confirmed_at_ms: asked_ms, checked_at_ms: asked_ms };
        let Some(mark) = mark else {
            return Ok(Found::Record(keep(cache, api_id, entry).await?));
        };
        match keep_marked(cache, api_id, entry, mark).await? {
            Ok(record) => return Ok(Found::Record(record)),
            Err(record) if again => stale = Some(record),
            Err(_) => return Ok(Found::Unconfirmed),
        }
        (asked_ms, again) = (Date::now().as_millis(), false);
    }
}

/// The API's record once KV and the authority were read together (version 0 when it has none
/// anywhere, trusted for `trust_ms` at most); `None`: the authority could not confirm it.
async fn resolve(env: &Env, api_id: &str, stale: Option<ApiRecord>, trust_ms: u64) -> Option<ApiRecord> {
    let hash = ApiRecord::hash_of(api_id);
    let (kv, mut authority) = futures::join!(read_kv(env, kv_key_for_api(api_id), ApiRecord::from_json), async {
        // The KV-only baseline edge (`cargo xtask bench`'s point of comparison) never asks.
        if cfg!(feature = "kv-only-baseline") {
            freshness::AuthorityAnswer::Unknown
        } else {
            authority::read_api(env, &hash).await
        }
    });
    let kv = kv.unwrap_or_else(|e| {
        console_warn!("KV read of an API record failed: {e}");
        if !matches!(authority, freshness::AuthorityAnswer::Holds(_)) {
            authority = freshness::AuthorityAnswer::Unreachable;
        }
        None
    });
    match freshness::resolve(stale, kv, authority) {
        Resolved::FailClosed(_) => None,
        Resolved::Record(None, _) => {
            let none = ApiRecord::none(api_id);
            Some(ApiRecord { max_staleness_ms: none.max_staleness_ms.min(trust_ms), ..none })
        }
        Resolved::Record(Some(record), _) => Some(record),
    }
}

fn purged_newer(hash: &[u8; 32], version: u64) -> bool {
    PURGED.with(|p| p.borrow().peek(hash).is_some_and(|seen| *seen > version))
}

/// Puts a copy in memory unless memory holds a newer version or a purge brought one; answers
/// the copy memory holds afterwards (of one version, the later confirmation and check times).
fn remember(mut entry: Entry) -> Entry {
    let hash = *ApiRecord::hash_of(&entry.record.id).as_bytes();
    MEMORY.with(|m| {
        m.update(|memory| {
            match memory.get(&hash) {
                Some(held) if held.record.version > entry.record.version => return held.clone(),
                Some(held) if held.record.version == entry.record.version => {
                    entry.confirmed_at_ms = entry.confirmed_at_ms.max(held.confirmed_at_ms);
                    entry.checked_at_ms = entry.checked_at_ms.max(held.checked_at_ms);
                }
                _ => {}
            }
            if !purged_newer(&hash, entry.record.version) {
                memory.put(hash, entry.clone());
            }
            entry
        })
    })
}

/// Keeps a confirmed copy in memory and the Cache API (tagged with the API's hash, for
/// purge-by-tag); a newer version that reached memory meanwhile is written after it.
async fn keep(cache: &Cache, api_id: &str, entry: Entry) -> Result<ApiRecord> {
    let hash = ApiRecord::hash_of(api_id);
    let mut kept = remember(entry);
    if purged_newer(hash.as_bytes(), kept.record.version) {
        return Ok(kept.record);
    }
    loop {
        put_copy(cache, api_id, &kept).await?;
        if held_version(&hash).is_some_and(|v| v > kept.record.version) {
            kept = remember(kept);
            continue;
        }
        return Ok(kept.record);
    }
}

fn held_version(hash: &KeyHash) -> Option<u64> {
    MEMORY.with(|m| m.update(|m| m.peek(hash.as_bytes()).map(|h| h.record.version)))
}

/// [`keep`] where purges reach only the Cache API, as a key's copy is kept there
/// (`lookup::keep_marked`): written, then the mark read, then kept in memory; a mark gone takes
/// the copy back out (`Err` with its record); nothing is written after the mark was read; no
/// mark, or a write not finished in time, leaves memory trusting the copy only from its ask.
async fn keep_marked(
    cache: &Cache,
    api_id: &str,
    entry: Entry,
    mark: Option<Mark>,
) -> Result<std::result::Result<ApiRecord, ApiRecord>> {
    let untrusted = Entry { checked_at_ms: entry.confirmed_at_ms, ..entry.clone() };
    let Some(mark) = mark else {
        fresh::count(Kind::Api, Confirmation::Unmarked);
        return Ok(Ok(remember(untrusted).record));
    };
    if held_version(&ApiRecord::hash_of(api_id)).is_some_and(|v| v > entry.record.version) {
        return Ok(Ok(remember(entry).record));
    }
    let written = put_copy(cache, api_id, &entry).await?;
    if !mark.intact(cache).await {
        fresh::count(Kind::Api, Confirmation::Overtaken);
        lookup::drop_copy(cache, &cache_url(api_id)).await?;
        return Ok(Err(entry.record));
    }
    Ok(Ok(remember(if written { entry } else { untrusted }).record))
}

/// Writes an API copy to the Cache API, tagged with the API's hash.
async fn put_copy(cache: &Cache, api_id: &str, entry: &Entry) -> Result<bool> {
    let put = cache.put(cache_url(api_id), copy_response(api_id, entry)?);
    match deadline::within(deadline::CACHE_MS, put).await {
        Some(done) => done.map(|()| true),
        None => {
            console_warn!("Cache API write took over {} ms; memory keeps the copy", deadline::CACHE_MS);
            Ok(false)
        }
    }
}

/// The Cache API's response for an API copy (not inlined: see `lookup::copy_response`).
#[inline(never)]
fn copy_response(api_id: &str, entry: &Entry) -> Result<Response> {
    let headers = Headers::new();
    headers.set("cache-control", &format!("max-age={CACHE_MAX_AGE_S}"))?;
    headers.set("cache-tag", &ApiRecord::hash_of(api_id).to_hex())?;
    Ok(Response::from_json(entry)?.with_headers(headers))
}

/// Replaces this location's copies of an API's record with `record`, from a signed purge
/// confirmed as of `confirmed_at_ms`: memory takes it (unless it holds a newer version) in
/// record mode, and the Cache API copy is dropped in both modes. Answers whether there was a
/// copy here.
pub(crate) async fn purge(record: ApiRecord, confirmed_at_ms: u64, mode: PurgeMode) -> Result<bool> {
    let hash = ApiRecord::hash_of(&record.id);
    let in_memory = MEMORY.with(|m| m.update(|m| m.contains(hash.as_bytes())));
    let url = cache_url(&record.id);
    if mode == PurgeMode::Record {
        PURGED.with(|p| {
            let mut purged = p.borrow_mut();
            if purged.peek(hash.as_bytes()).is_none_or(|seen| *seen < record.version) {
                purged.put(*hash.as_bytes(), record.version);
            }
        });
        remember(Entry { record, confirmed_at_ms, checked_at_ms: confirmed_at_ms });
    }
    let cache = Cache::default();
    if mode == PurgeMode::TagOnly {
        // Purge-by-tag drops every entry of the API's tag: a confirmation's mark, then the copy.
        lookup::drop_copy(&cache, &crate::mark::url_of(&url)).await?;
    }
    let dropped = deadline::within(deadline::CACHE_MS, cache.delete(&url, false))
        .await
        .ok_or_else(|| worker::Error::RustError("the Cache API did not drop the API copy in time".into()))??;
    Ok(in_memory || matches!(dropped, worker::CacheDeletionOutcome::Success))
}
