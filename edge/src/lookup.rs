//! Finds a key's record: isolate memory, then the Cache API, then Workers KV together with the
//! key's authority (its KeyState Durable Object).
//!
//! Every edge copy carries the time the authority last confirmed it. A copy younger than the
//! record's `max_staleness_ms` is answered from directly; an older one is confirmed with the
//! authority first (same version: answered and its time refreshed; newer at the authority: the
//! authority's record replaces it). On a miss, KV and the authority are read together and the
//! higher version wins, so a KV copy older than a revocation is never served. When the
//! authority cannot be reached, a copy past `max_staleness_ms` is not answered from: the caller
//! gets `UNAVAILABLE` (fail closed). A purge puts the record it carries in memory and drops the
//! Cache API copy at once, so the next request here answers from the new record without a refill.
//!
//! Memory never trades a copy for an older version: a refill that read KV and the authority
//! before a purge arrived, and finishes after it, keeps (and answers) the purge's newer record,
//! and puts that in the Cache API too.

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
            return Ok(Found::Record(Some(remember(hash, copy).record), Source::Cache));
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
            let record = keep(cache, hash, Copy { record: copy.record, confirmed_at_ms: now_ms }).await?;
            Ok(Found::Record(Some(record), source))
        }
        Ok(Some(newer)) => {
            let record = keep(cache, hash, Copy { record: newer, confirmed_at_ms: now_ms }).await?;
            Ok(Found::Record(Some(record), Source::Authority))
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
    let record = keep(cache, hash, Copy { record, confirmed_at_ms: now_ms }).await?;
    Ok(Found::Record(Some(record), source))
}

/// Replaces this location's copies of a key with `record`, from the control plane's purge: as
/// good as a confirmation by the authority, which has it or is about to. Memory takes the record
/// (unless it holds a newer version); the Cache API copy is dropped, so an isolate without the
/// record in memory refills from KV and the authority. Answers whether there was a copy here.
pub(crate) async fn purge(record: KeyRecord, now_ms: u64) -> Result<bool> {
    let hash = record.hash;
    let in_memory = MEMORY.with(|m| m.borrow().contains(hash.as_bytes()));
    remember(&hash, Copy { record, confirmed_at_ms: now_ms });
    let in_cache = Cache::default().delete(cache_url(&hash), false).await?;
    Ok(in_memory || matches!(in_cache, CacheDeletionOutcome::Success))
}

/// Puts a copy in memory unless memory holds a newer version of the key; answers the copy
/// memory holds afterwards.
fn remember(hash: &KeyHash, copy: Copy) -> Copy {
    MEMORY.with(|m| {
        let mut memory = m.borrow_mut();
        match memory.get(hash.as_bytes()) {
            Some(held) if held.record.version > copy.record.version => held.clone(),
            _ => {
                memory.put(*hash.as_bytes(), copy.clone());
                copy
            }
        }
    })
}

fn held_version(hash: &KeyHash) -> Option<u64> {
    MEMORY.with(|m| m.borrow().peek(hash.as_bytes()).map(|held| held.record.version))
}

/// Keeps a confirmed copy in memory and the Cache API (tagged with the key hash, for
/// purge-by-tag in production); answers the record kept, which is a newer one when memory
/// already held one. A newer version that reached memory while the Cache API write was under
/// way is written after it, so the Cache API never ends on the older record.
async fn keep(cache: &Cache, hash: &KeyHash, copy: Copy) -> Result<KeyRecord> {
    let mut kept = remember(hash, copy);
    loop {
        let headers = Headers::new();
        headers.set("cache-control", &format!("max-age={CACHE_MAX_AGE_S}"))?;
        headers.set("cache-tag", &hash.to_hex())?;
        cache.put(cache_url(hash), Response::from_json(&kept)?.with_headers(headers)).await?;
        if held_version(hash).is_some_and(|v| v > kept.record.version) {
            kept = remember(hash, kept);
            continue;
        }
        return Ok(kept.record);
    }
}
