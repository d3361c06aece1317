//! Finds a key's record: isolate memory, then the Cache API, then Workers KV.
//!
//! Every edge copy carries the time it was read from KV, and is answered from only while it is
//! younger than the record's `max_staleness_ms`; past that it is read again. A purge drops the
//! copy from memory and from this location's Cache API at once.

use std::cell::RefCell;

use keyward_shared::{KeyHash, KeyRecord, Source, kv_key_for_key};
use lru::LruCache;
use serde::{Deserialize, Serialize};
use worker::{Cache, CacheDeletionOutcome, Env, Headers, Response, Result};

use crate::KV_BINDING;

/// Most key records one isolate keeps in memory.
const MEMORY_ENTRIES: usize = 10_000;

/// An edge copy of a record and when KV last confirmed it.
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

thread_local! {
    static MEMORY: RefCell<LruCache<[u8; 32], Copy>> =
        RefCell::new(LruCache::new(MEMORY_ENTRIES.try_into().expect("non-zero")));
}

/// The synthetic URL under which a key's copy is stored in the Cache API.
fn cache_url(hash: &KeyHash) -> String {
    format!("https://keyward-cache.internal/key/{}", hash.to_hex())
}

/// The record for `hash` (if KV has one) and where it came from.
pub(crate) async fn find(env: &Env, hash: &KeyHash, now_ms: u64) -> Result<(Option<KeyRecord>, Source)> {
    let in_memory = MEMORY.with(|m| m.borrow_mut().get(hash.as_bytes()).cloned());
    if let Some(copy) = in_memory.filter(|c| c.is_fresh(now_ms)) {
        return Ok((Some(copy.record), Source::Memory));
    }
    let cache = Cache::default();
    if let Some(mut response) = cache.get(cache_url(hash), false).await?
        && let Ok(copy) = response.json::<Copy>().await
        && copy.is_fresh(now_ms)
    {
        let record = copy.record.clone();
        remember(hash, copy);
        return Ok((Some(record), Source::Cache));
    }
    let kv = env.kv(KV_BINDING)?;
    let Some(text) = kv.get(&kv_key_for_key(hash)).text().await? else {
        return Ok((None, Source::Kv));
    };
    let record = KeyRecord::from_json(&text).map_err(|e| worker::Error::RustError(e.to_string()))?;
    let copy = Copy { record: record.clone(), confirmed_at_ms: now_ms };
    store_in_cache(&cache, hash, &copy).await?;
    remember(hash, copy);
    Ok((Some(record), Source::Kv))
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

async fn store_in_cache(cache: &Cache, hash: &KeyHash, copy: &Copy) -> Result<()> {
    let headers = Headers::new();
    // The copy is useless once it is past max_staleness, so the cache may drop it then too.
    let max_age = copy.record.max_staleness_ms.div_ceil(1_000).max(1);
    headers.set("cache-control", &format!("max-age={max_age}"))?;
    headers.set("cache-tag", &hash.to_hex())?;
    let response = Response::from_json(copy)?.with_headers(headers);
    cache.put(cache_url(hash), response).await
}
