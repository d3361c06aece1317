//! Authenticates callers of the verify route: a root key with a verify scope, looked up hashed
//! in KV (`root:<hash>`) and kept in isolate memory for at most [`ROOT_TRUST_MS`].

use std::cell::RefCell;

use keyward_shared::record::KeyStatus;
use keyward_shared::{Key, KeyHash, RootKeyRecord, kv_key_for_root};
use lru::LruCache;
use worker::{Env, Request};

use crate::KV_BINDING;

/// How long a root key read from KV is trusted before it is read again.
const ROOT_TRUST_MS: u64 = 1_000;
const ROOT_CACHE_ENTRIES: usize = 1_024;

thread_local! {
    static ROOTS: RefCell<LruCache<[u8; 32], (RootKeyRecord, u64)>> =
        RefCell::new(LruCache::new(ROOT_CACHE_ENTRIES.try_into().expect("non-zero")));
}

/// Why a caller was refused.
pub(crate) enum AuthError {
    Missing,
    Invalid,
    Internal(String),
}

/// The active root key in `Authorization: Bearer <root key>`, or why there is none.
pub(crate) async fn caller(req: &Request, env: &Env, now_ms: u64) -> Result<RootKeyRecord, AuthError> {
    let header = req.headers().get("authorization").ok().flatten().ok_or(AuthError::Missing)?;
    let text = header.strip_prefix("Bearer ").ok_or(AuthError::Missing)?.trim();
    let key = Key::parse(text).map_err(|_| AuthError::Invalid)?;
    let hash = key.hash();
    let record = match cached(&hash, now_ms) {
        Some(record) => record,
        None => {
            let kv = env.kv(KV_BINDING).map_err(|e| AuthError::Internal(e.to_string()))?;
            let text = kv
                .get(&kv_key_for_root(&hash))
                .text()
                .await
                .map_err(|e| AuthError::Internal(e.to_string()))?
                .ok_or(AuthError::Invalid)?;
            let record = RootKeyRecord::from_json(&text).map_err(|e| AuthError::Internal(e.to_string()))?;
            ROOTS.with(|roots| roots.borrow_mut().put(*hash.as_bytes(), (record.clone(), now_ms)));
            record
        }
    };
    if record.hash != hash || record.status != KeyStatus::Active {
        return Err(AuthError::Invalid);
    }
    Ok(record)
}

fn cached(hash: &KeyHash, now_ms: u64) -> Option<RootKeyRecord> {
    ROOTS.with(|roots| {
        let mut roots = roots.borrow_mut();
        match roots.get(hash.as_bytes()) {
            Some((record, at)) if now_ms.saturating_sub(*at) < ROOT_TRUST_MS => Some(record.clone()),
            _ => None,
        }
    })
}
