//! Checks the control plane's signed internal requests: signature, timestamp and a nonce used
//! once. A nonce is remembered in isolate memory and in this location's Cache API for longer than
//! a timestamp stays acceptable, so a captured request cannot be replayed.

use std::cell::RefCell;
use std::collections::HashMap;

use futures::StreamExt;
use keyward_shared::ErrorCode;
use keyward_shared::internal::{
    self, MAX_SIGNED_BODY, MAX_SKEW_MS, NONCE_HEADER, SIGNATURE_HEADER, SignatureError, SignedHeaders, TIMESTAMP_HEADER,
};
use worker::{Cache, Env, Headers, Request, Response, console_error};

use crate::error::{EdgeError, EdgeResult};
use crate::{PURGE_SECRET, deadline, origin};

/// How long a nonce is remembered: past this its timestamp is refused anyway.
const NONCE_MEMORY_MS: u64 = 2 * MAX_SKEW_MS as u64 + 1_000;
/// How long an internal request's body may take to arrive: a body dripped in slowly holds up
/// to the route's limit in memory that every tenant's copies share, so it is cut off.
const BODY_MS: u64 = 5_000;

thread_local! {
    static NONCES: RefCell<HashMap<String, u64>> = RefCell::new(HashMap::new());
}

/// A signed request whose signature, timestamp and nonce were checked: its work may be done.
pub(crate) struct Signed<T> {
    pub body: T,
    /// When the control plane signed it, by its clock (Unix ms).
    pub signed_at_ms: i64,
}

/// The JSON body of a signed request to `path`, or the refusal to answer with: 503 when this
/// worker's secret is too short to sign with; 401 for missing or malformed signature headers or
/// a timestamp out of range (all before the body is read), a bad signature or a nonce already
/// used; 413 for a body over [`MAX_SIGNED_BODY`] (by `content-length` before reading, else as
/// soon as more arrived: at most the limit and one chunk are ever held); 400 for a body that did
/// not arrive within [`BODY_MS`] or is not a `T`. The nonce is recorded before the caller does
/// any work, so a replay changes nothing.
pub(crate) async fn parse<T: serde::de::DeserializeOwned>(
    req: &mut Request,
    env: &Env,
    path: &str,
    now_ms: u64,
) -> EdgeResult<Signed<T>> {
    let secret = env.secret(PURGE_SECRET)?.to_string();
    if secret.len() < internal::MIN_SECRET_BYTES {
        console_error!(
            "PURGE_SECRET is {} bytes; internal routes need at least {}",
            secret.len(),
            internal::MIN_SECRET_BYTES
        );
        return Err(EdgeError::new(ErrorCode::Misconfigured, "this worker's PURGE_SECRET is too short; see its log"));
    }
    let header = |name: &str| req.headers().get(name).ok().flatten().unwrap_or_default();
    let (timestamp, nonce, signature) = (header(TIMESTAMP_HEADER), header(NONCE_HEADER), header(SIGNATURE_HEADER));
    let Ok(signed_at_ms) = timestamp.parse::<i64>() else {
        return Err(SignatureError::Malformed.into());
    };
    if !internal::is_nonce(&nonce) || signature.len() != 64 {
        return Err(SignatureError::Malformed.into());
    }
    // A stale timestamp is refused before the body is read, as malformed headers are.
    internal::check_timestamp(signed_at_ms, now_ms as i64)?;
    let declared = header("content-length").parse::<usize>().ok();
    if declared.is_some_and(|n| n > MAX_SIGNED_BODY) {
        return Err(too_large());
    }
    let reading = read_at_most(req, MAX_SIGNED_BODY, declared.unwrap_or(0));
    let Some(body) = deadline::within(BODY_MS, reading).await else {
        let message = format!("the request body did not arrive within {BODY_MS} ms");
        return Err(EdgeError::new(ErrorCode::BadRequest, message));
    };
    let body = body?;
    let headers = SignedHeaders { timestamp: &timestamp, nonce: &nonce, signature: &signature };
    internal::verify(secret.as_bytes(), "POST", path, headers, &body, now_ms as i64)?;
    if !first_use(&nonce, now_ms).await? {
        return Err(SignatureError::Replayed.into());
    }
    match serde_json::from_slice(&body) {
        Ok(body) => Ok(Signed { body, signed_at_ms }),
        Err(e) => Err(EdgeError::new(ErrorCode::BadRequest, format!("invalid body for {path}: {e}"))),
    }
}

/// The request's body as it arrives, refused (413) as soon as more than `limit` bytes came: what
/// is held, and what is allocated for it, never exceeds `limit` (the chunk that passed it is
/// dropped unread into the body). The rest is never read (dropping the stream cancels it).
/// `declared` (its content-length, 0 if none) sizes the first allocation.
async fn read_at_most(req: &mut Request, limit: usize, declared: usize) -> EdgeResult<Vec<u8>> {
    if req.inner().body().is_none() {
        return Ok(Vec::new());
    }
    let mut stream = req.stream()?;
    let mut body = Vec::with_capacity(declared.min(limit));
    while let Some(chunk) = stream.next().await {
        // A caller that drops its connection mid-body is refused, not logged as a failure.
        let chunk = chunk.map_err(|_| EdgeError::new(ErrorCode::BadRequest, "the request body could not be read"))?;
        let needed = body.len() + chunk.len();
        if needed > limit {
            return Err(too_large());
        }
        if needed > body.capacity() {
            // Doubling, as a Vec grows, but never past the limit.
            body.reserve_exact((needed * 2).min(limit) - body.len());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn too_large() -> EdgeError {
    let message = format!("an internal request is at most {} KiB", MAX_SIGNED_BODY / 1024);
    EdgeError::new(ErrorCode::PayloadTooLarge, message)
}

impl From<SignatureError> for EdgeError {
    fn from(e: SignatureError) -> EdgeError {
        EdgeError::new(ErrorCode::from(e.clone()), e.to_string())
    }
}

/// Records a nonce; false if it was seen before in this isolate or this location. A Cache API
/// that does not answer in time refuses the request (`UNAVAILABLE`; the control plane retries
/// with a new nonce) rather than skip the check across isolates.
async fn first_use(nonce: &str, now_ms: u64) -> EdgeResult<bool> {
    let fresh_here = NONCES.with(|nonces| {
        let mut nonces = nonces.borrow_mut();
        nonces.retain(|_, at| now_ms.saturating_sub(*at) < NONCE_MEMORY_MS);
        nonces.insert(nonce.to_owned(), now_ms).is_none()
    });
    if !fresh_here {
        return Ok(false);
    }
    let cache = Cache::default();
    let url = origin::cache_url(&format!("nonce/{nonce}"));
    let late = || EdgeError::new(ErrorCode::Unavailable, "the nonce store did not answer in time; retry");
    if deadline::within(deadline::CACHE_MS, cache.get(url.as_str(), false)).await.ok_or_else(late)??.is_some() {
        return Ok(false);
    }
    let headers = Headers::new();
    headers.set("cache-control", &format!("max-age={}", NONCE_MEMORY_MS / 1_000 + 1))?;
    let put = cache.put(url.as_str(), Response::ok("seen")?.with_headers(headers));
    deadline::within(deadline::CACHE_MS, put).await.ok_or_else(late)??;
    Ok(true)
}
