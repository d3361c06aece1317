//! Finds a key's record: isolate memory, then the Cache API, then Workers KV together with the
//! key's authority (its KeyState Durable Object).
//!
//! Every edge copy carries the time the authority last confirmed it. A copy younger than the
//! record's `max_staleness_ms` is answered from directly; an older one is confirmed with the
//! authority first (same version: answered and its time refreshed; newer at the authority: the
//! authority's record replaces it). On a miss, KV and the authority are read together and the
//! higher version wins, so a KV copy older than a revocation is never served. When the
//! authority cannot be reached, a copy past `max_staleness_ms` is not answered from: the caller
//! gets `UNAVAILABLE` (fail closed). A purge drops the copies from memory and Cache API at once.

use std::cell::RefCell;

use keyward_shared::{KeyHash, KeyRecord, Source, kv_key_for_key};
use lru::LruCache;
use serde::{Deserialize, Serialize};
use worker::{Cache, CacheDeletionOutcome, Env, Headers, Response, Result, console_warn};

use crate::KV_BINDING;
use crate::authority::{self, Unreachable};

/// Most key records one isolate keeps in memory.
const MEMORY_ENTRIES: usize = 10_000;
/// How long the Cache API may keep a copy (it is confirmed with the authority after
/// `max_staleness_ms` anyway; this only bounds the storage it takes).
const CACHE_MAX_AGE_S: u64 = 3_600;

/// An edge copy of a record and when the authority (or, without one, KV) last confirmed it.
#[derive(Clone, Serialize, Deserialize)]
struct Copy {
    record: KeyRecord,
    confirmed_at_ms: u64,
}

impl Copy {
    fn is_fresh(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.confirmed_at_ms) < self.record.max_staleness_ms
    }
}

/// What the lookup found.
pub(crate) enum Found {
    /// The record (if any) and where it came from.
    Record(Option<KeyRecord>, Source),
    /// Only a copy past `max_staleness_ms` (given) exists and the authority could not confirm it.
    Unconfirmed(KeyRecord, Source),
}

thread_local! {
    static MEMORY: RefCell<LruCache<[u8; 32], Copy>> =
        RefCell::new(LruCache::new(MEMORY_ENTRIES.try_into().expect("non-zero")));
}

/// The synthetic URL under which a key's copy is stored in the Cache API.
fn cache_url(hash: &KeyHash) -> String {
    format!("https://keyward-cache.internal/key/{}", hash.to_hex())
}

pub(crate) async fn find(env: &Env, hash: &KeyHash, now_ms: u64) -> Result<Found> {
    let cache = Cache::default();
    let mut stale = None;
    if let Some(copy) = MEMORY.with(|m| m.borrow_mut().get(hash.as_bytes()).cloned()) {
        if copy.is_fresh(now_ms) {
            return Ok(Found::Record(Some(copy.record), Source::Memory));
        }
        stale = Some((copy, Source::Memory));
    }
    if stale.is_none()
        && let Some(mut response) = cache.get(cache_url(hash), false).await?
        && let Ok(copy) = response.json::<Copy>().await
    {
        if copy.is_fresh(now_ms) {
            let record = copy.record.clone();
            remember(hash, copy);
            return Ok(Found::Record(Some(record), Source::Cache));
        }
        stale = Some((copy, Source::Cache));
    }
    if let Some((copy, source)) = stale {
        return confirm(env, &cache, hash, copy, source, now_ms).await;
    }
    miss(env, &cache, hash, now_ms).await
}

/// A copy past `max_staleness_ms`: ask the authority before answering from it.
async fn confirm(env: &Env, cache: &Cache, hash: &KeyHash, copy: Copy, source: Source, now_ms: u64) -> Result<Found> {
    match authority::read(env, hash).await {
        Ok(Some(held)) if held.version <= copy.record.version => {
            let record = copy.record.clone();
            keep(cache, hash, Copy { record: copy.record, confirmed_at_ms: now_ms }).await?;
            Ok(Found::Record(Some(record), source))
        }
        Ok(Some(newer)) => {
            keep(cache, hash, Copy { record: newer.clone(), confirmed_at_ms: now_ms }).await?;
            Ok(Found::Record(Some(newer), Source::Authority))
        }
        // The authority has never heard of this key (made before it existed): KV decides.
        Ok(None) => miss(env, cache, hash, now_ms).await,
        Err(Unreachable(e)) => {
            console_warn!("authority unreachable for a stale copy: {e}");
            Ok(Found::Unconfirmed(copy.record, source))
        }
    }
}

/// No copy here: read KV and the authority together; the higher version wins.
async fn miss(env: &Env, cache: &Cache, hash: &KeyHash, now_ms: u64) -> Result<Found> {
    let kv = env.kv(KV_BINDING)?;
    let kv_key = kv_key_for_key(hash);
    let (from_kv, from_authority) = futures::join!(kv.get(&kv_key).text(), authority::read(env, hash));
    let from_kv = match from_kv? {
        Some(text) => Some(KeyRecord::from_json(&text).map_err(|e| worker::Error::RustError(e.to_string()))?),
        None => None,
    };
    let (record, source) = match (from_kv, from_authority) {
        (Some(kv), Ok(Some(held))) if kv.version >= held.version => (kv, Source::Kv),
        (_, Ok(Some(held))) => (held, Source::Authority),
        (Some(kv), Ok(None)) => (kv, Source::Kv),
        (None, Ok(None)) => return Ok(Found::Record(None, Source::Kv)),
        // Without the authority, a KV copy might be older than a revocation: fail closed.
        (Some(kv), Err(Unreachable(e))) => {
            console_warn!("authority unreachable on a miss: {e}");
            return Ok(Found::Unconfirmed(kv, Source::Kv));
        }
        (None, Err(_)) => return Ok(Found::Record(None, Source::Kv)),
    };
    keep(cache, hash, Copy { record: record.clone(), confirmed_at_ms: now_ms }).await?;
    Ok(Found::Record(Some(record), source))
}

/// Drops this location's copies of a key. Answers whether there was one.
pub(crate) async fn purge(hash: &KeyHash) -> Result<bool> {
    let in_memory = MEMORY.with(|m| m.borrow_mut().pop(hash.as_bytes()).is_some());
    let in_cache = Cache::default().delete(cache_url(hash), false).await?;
    Ok(in_memory || matches!(in_cache, CacheDeletionOutcome::Success))
}

fn remember(hash: &KeyHash, copy: Copy) {
    MEMORY.with(|m| m.borrow_mut().put(*hash.as_bytes(), copy));
}

/// Stores a confirmed copy in the Cache API (tagged with the key hash, for purge-by-tag in
/// production) and in memory.
async fn keep(cache: &Cache, hash: &KeyHash, copy: Copy) -> Result<()> {
    let headers = Headers::new();
    headers.set("cache-control", &format!("max-age={CACHE_MAX_AGE_S}"))?;
    headers.set("cache-tag", &hash.to_hex())?;
    let response = Response::from_json(&copy)?.with_headers(headers);
    cache.put(cache_url(hash), response).await?;
    remember(hash, copy);
    Ok(())
}
