//! Authenticates callers of the verify route: a root key with a verify scope, looked up hashed
//! in KV (`root:<hash>`) together with its authority (the KeyState object `root:<hash>`), the
//! higher version winning, and kept in isolate memory for at most [`ROOT_TRUST_MS`] from when
//! it was confirmed.
//!
//! KV has no conditional write, so a late retry of a root key's creation can land in KV after
//! its revocation; the authority keeps only the highest version, so the revocation wins. A copy
//! that has used its share of its trust is confirmed again in the background after the answer
//! (`crate::fresh`, the mechanism key copies use), so a busy caller's requests never wait for
//! the authority; only a copy past its trust (an idle caller) does, and one confirmation per
//! root key is under way at a time. A root key that cannot be confirmed (the authority does not
//! answer in time) refuses its caller with 503, unless what is known of it is final.

use keyward_shared::budget::Weigh;
use keyward_shared::freshness::{self, AuthorityAnswer, Resolved};
use keyward_shared::record::KeyStatus;
use keyward_shared::{ErrorCode, Key, KeyHash, RootKeyRecord, kv_key_for_root};
use worker::{Context, Env, Request};

use crate::error::EdgeError;
use crate::fresh::{self, Confirmation};
use crate::memory::{self, Copies};
use crate::misses::{self, Kind};
use crate::{authority, lookup};

/// How long a confirmed root key is trusted before it is confirmed again.
const ROOT_TRUST_MS: u64 = 1_000;

/// A root key's copy and when its confirmation was asked.
#[derive(Clone)]
struct RootCopy {
    record: RootKeyRecord,
    confirmed_at_ms: u64,
}

impl Weigh for RootCopy {
    fn weight(&self) -> usize {
        std::mem::size_of::<RootCopy>() + self.record.heap_bytes()
    }
}

thread_local! {
    /// Root-key copies, bounded by bytes (see `crate::memory`).
    static ROOTS: Copies<RootCopy> = Copies::new(memory::root_budget(None));
}

/// Sets the bytes root-key copies may take in this isolate.
pub(crate) fn set_budget(bytes: usize) {
    ROOTS.with(|roots| roots.set_budget(bytes));
}

/// How many root-key copies memory holds, and their bytes.
pub(crate) fn held() -> (usize, usize) {
    ROOTS.with(Copies::held)
}

/// Why a caller was refused.
pub(crate) enum AuthError {
    Missing,
    Invalid,
    /// The root key could not be confirmed in time.
    Unavailable,
    /// This client presented more unknown root keys than it may have looked up.
    Limited,
    Internal(String),
}

impl From<AuthError> for EdgeError {
    fn from(e: AuthError) -> EdgeError {
        match e {
            AuthError::Missing => {
                EdgeError::new(ErrorCode::Unauthorized, "send `Authorization: Bearer <root key with a verify scope>`")
            }
            AuthError::Invalid => EdgeError::new(ErrorCode::Unauthorized, "the root key is not valid here"),
            AuthError::Unavailable => {
                EdgeError::new(ErrorCode::Unavailable, "the root key could not be confirmed in time; retry")
            }
            AuthError::Limited => EdgeError::new(
                ErrorCode::CallerRateLimited,
                format!("this client presented more than {} unknown root keys a second; retry later", misses::rate()),
            ),
            AuthError::Internal(detail) => EdgeError::Internal(format!("root key lookup failed: {detail}")),
        }
    }
}

/// The active root key in `Authorization: Bearer <root key>`, or why there is none.
pub(crate) async fn caller(req: &Request, env: &Env, ctx: &Context, now_ms: u64) -> Result<RootKeyRecord, AuthError> {
    let header = req.headers().get("authorization").ok().flatten().ok_or(AuthError::Missing)?;
    let text = header.strip_prefix("Bearer ").ok_or(AuthError::Missing)?.trim();
    let key = Key::parse(text).map_err(|_| AuthError::Invalid)?;
    let hash = key.hash();
    let record = match copy_of(&hash, now_ms) {
        Held::Answer(copy) => {
            ahead_if_due(env, ctx, &hash, &copy, now_ms);
            copy.record
        }
        Held::Stale(record) => confirm_once(env, &hash, Some(record), now_ms).await?,
        Held::None => {
            if misses::remembered(Kind::RootKey, hash.as_bytes(), now_ms) {
                return Err(AuthError::Invalid);
            }
            if !misses::admit(Kind::RootKey, &client_address(req), now_ms) {
                return Err(AuthError::Limited);
            }
            confirm_once(env, &hash, None, now_ms).await?
        }
    };
    if record.hash != hash || record.status != KeyStatus::Active {
        return Err(AuthError::Invalid);
    }
    Ok(record)
}

/// Confirms the copy of the root key `hash` in the background when it has used its share of its
/// trust at `now_ms` (and is not final).
fn ahead_if_due(env: &Env, ctx: &Context, hash: &KeyHash, copy: &RootCopy, now_ms: u64) {
    if copy.record.status.is_final()
        || !freshness::refresh_ahead(copy.confirmed_at_ms, ROOT_TRUST_MS, now_ms, fresh::ahead_rule())
    {
        return;
    }
    let hash = *hash;
    fresh::ahead(ctx, Kind::RootKey, hash.as_bytes(), now_ms, || {
        let (env, record) = (env.clone(), copy.record.clone());
        async move {
            let _ = confirm(&env, &hash, Some(record), now_ms).await;
        }
    });
}

/// After a request that waited (for a key's confirmation, a lease, a settlement): its caller's
/// root key is confirmed ahead if it became due meanwhile, as the request would have done had it
/// arrived now. Without this, callers whose every request waited a round trip (a few clients,
/// all blocked) let the root key's trust run out unconfirmed, and their next request waits again.
pub(crate) fn after_wait(env: &Env, ctx: &Context, hash: &KeyHash, now_ms: u64) {
    if let Held::Answer(copy) = copy_of(hash, now_ms) {
        ahead_if_due(env, ctx, hash, &copy, now_ms);
    }
}

/// Who sent the request, for the bound on root-key lookups: Cloudflare's `CF-Connecting-IP`,
/// or one shared bucket where there is none (local regions).
fn client_address(req: &Request) -> String {
    req.headers().get("cf-connecting-ip").ok().flatten().unwrap_or_else(|| "unknown".to_owned())
}

/// What memory holds for a root key.
enum Held {
    /// A copy within its trust, or final.
    Answer(RootCopy),
    /// A copy past its trust.
    Stale(RootKeyRecord),
    None,
}

fn copy_of(hash: &KeyHash, now_ms: u64) -> Held {
    match ROOTS.with(|roots| roots.get(hash)) {
        Some(copy) if copy.record.status.is_final() => Held::Answer(copy),
        Some(copy) if freshness::is_fresh(copy.confirmed_at_ms, ROOT_TRUST_MS, now_ms) => Held::Answer(copy),
        Some(copy) => Held::Stale(copy.record),
        None => Held::None,
    }
}

/// Confirms a stale copy or a miss, unless another request's confirmation of this root key is
/// under way: then its answer serves this request too (a copy it left stale, one the authority
/// did not confirm in time, refuses this caller too).
async fn confirm_once(
    env: &Env,
    hash: &KeyHash,
    copy: Option<RootKeyRecord>,
    now_ms: u64,
) -> Result<RootKeyRecord, AuthError> {
    if let Some(joined) = fresh::join(Kind::RootKey, hash.as_bytes(), now_ms).await {
        let now = joined.now_ms;
        match copy_of(hash, now) {
            Held::Answer(copy) => return Ok(copy.record),
            // The authority did not confirm it in time for that request: nor for this one.
            Held::Stale(_) => return Err(AuthError::Unavailable),
            Held::None if misses::remembered(Kind::RootKey, hash.as_bytes(), now) => return Err(AuthError::Invalid),
            Held::None => {}
        }
    }
    let _flight = fresh::begin(Kind::RootKey, hash.as_bytes(), now_ms);
    fresh::count(Kind::RootKey, Confirmation::Waited);
    confirm(env, hash, copy, now_ms).await
}

/// Reads KV and the authority together and keeps the higher version, confirmed as of `now_ms`
/// (when it was asked).
async fn confirm(
    env: &Env,
    hash: &KeyHash,
    copy: Option<RootKeyRecord>,
    now_ms: u64,
) -> Result<RootKeyRecord, AuthError> {
    let (kv, authority) = futures::join!(
        lookup::read_kv(env, kv_key_for_root(hash), RootKeyRecord::from_json),
        authority::read_root(env, hash)
    );
    let kv = match kv {
        Ok(kv) => kv,
        Err(e) if matches!(authority, AuthorityAnswer::Holds(_)) => {
            worker::console_warn!("KV read of a root key failed: {e}");
            None
        }
        Err(e) => return Err(AuthError::Internal(e)),
    };
    let known_missing = copy.is_none() && kv.is_none() && matches!(authority, AuthorityAnswer::Unknown);
    match freshness::resolve(copy, kv, authority) {
        Resolved::Record(Some(record), _) => {
            let kept = RootCopy { record, confirmed_at_ms: now_ms };
            ROOTS.with(|roots| {
                roots.update(|roots| {
                    // Never trade a copy for an older version or an older confirmation of the
                    // same one (a slow confirmation finishing late).
                    let older = |held: &RootCopy| {
                        (held.record.version, held.confirmed_at_ms) <= (kept.record.version, kept.confirmed_at_ms)
                    };
                    if roots.peek(hash.as_bytes()).is_none_or(older) {
                        roots.put(*hash.as_bytes(), kept.clone());
                    }
                })
            });
            Ok(kept.record)
        }
        Resolved::Record(None, _) => {
            if known_missing {
                misses::remember(Kind::RootKey, hash.as_bytes(), now_ms);
            }
            Err(AuthError::Invalid)
        }
        Resolved::FailClosed(_) => Err(AuthError::Unavailable),
    }
}
