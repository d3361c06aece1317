//! Checks the control plane's signed internal requests: signature, timestamp and a nonce used
//! once. A nonce is remembered in isolate memory and in this location's Cache API for longer than
//! a timestamp stays acceptable, so a captured request cannot be replayed.

use std::cell::RefCell;
use std::collections::HashMap;

use keyward_shared::internal::{
    self, MAX_SKEW_MS, NONCE_HEADER, SIGNATURE_HEADER, SignatureError, SignedHeaders, TIMESTAMP_HEADER,
};
use worker::{Cache, Env, Headers, Request, Response, Result};

use crate::{PURGE_SECRET, error};

const MAX_BODY: usize = 256 * 1024;
/// How long a nonce is remembered: past this its timestamp is refused anyway.
const NONCE_MEMORY_MS: u64 = 2 * MAX_SKEW_MS as u64 + 1_000;

thread_local! {
    static NONCES: RefCell<HashMap<String, u64>> = RefCell::new(HashMap::new());
}

/// A signed request whose signature and timestamp were checked; its nonce is still to be
/// checked with [`first_use`], which callers run alongside their (idempotent) work.
pub(crate) struct Signed<T> {
    pub body: T,
    pub nonce: String,
}

/// The JSON body of a signed request to `path`, or the refusal to answer with (401 for the
/// signature or timestamp, 413 for size, 400 for a body that is not a `T`).
pub(crate) async fn parse<T: serde::de::DeserializeOwned>(
    req: &mut Request,
    env: &Env,
    path: &str,
    now_ms: u64,
) -> Result<std::result::Result<Signed<T>, Response>> {
    let secret = env.secret(PURGE_SECRET)?.to_string();
    let header = |name: &str| req.headers().get(name).ok().flatten().unwrap_or_default();
    let (timestamp, nonce, signature) = (header(TIMESTAMP_HEADER), header(NONCE_HEADER), header(SIGNATURE_HEADER));
    let body = req.bytes().await?;
    if body.len() > MAX_BODY {
        return Ok(Err(error::respond(413, "PAYLOAD_TOO_LARGE", "an internal request is at most 256 KiB")?));
    }
    let headers = SignedHeaders { timestamp: &timestamp, nonce: &nonce, signature: &signature };
    if let Err(e) = internal::verify(secret.as_bytes(), "POST", path, headers, &body, now_ms as i64) {
        return Ok(Err(refuse(e)?));
    }
    match serde_json::from_slice(&body) {
        Ok(body) => Ok(Ok(Signed { body, nonce })),
        Err(e) => Ok(Err(error::respond(400, "BAD_REQUEST", &format!("invalid body for {path}: {e}"))?)),
    }
}

/// The answer to a request whose nonce was used before.
pub(crate) fn replayed() -> Result<Response> {
    refuse(SignatureError::Replayed)
}

fn refuse(e: SignatureError) -> Result<Response> {
    let code = match e {
        SignatureError::Malformed => "BAD_SIGNATURE_HEADERS",
        SignatureError::Stale => "STALE_TIMESTAMP",
        SignatureError::Mismatch => "BAD_SIGNATURE",
        SignatureError::Replayed => "REPLAYED",
    };
    error::respond(401, code, &e.to_string())
}

/// Records a nonce; false if it was seen before in this isolate or this location.
///
/// Internal requests are idempotent (a purge drops copies; an authority update keeps only a
/// newer version), so callers may do their work while this check runs and refuse afterwards:
/// a replay then changes nothing and is still answered `REPLAYED`.
pub(crate) async fn first_use(nonce: &str, now_ms: u64) -> Result<bool> {
    let fresh_here = NONCES.with(|nonces| {
        let mut nonces = nonces.borrow_mut();
        nonces.retain(|_, at| now_ms.saturating_sub(*at) < NONCE_MEMORY_MS);
        nonces.insert(nonce.to_owned(), now_ms).is_none()
    });
    if !fresh_here {
        return Ok(false);
    }
    let cache = Cache::default();
    let url = format!("https://keyward-cache.internal/nonce/{nonce}");
    if cache.get(url.as_str(), false).await?.is_some() {
        return Ok(false);
    }
    let headers = Headers::new();
    headers.set("cache-control", &format!("max-age={}", NONCE_MEMORY_MS / 1_000 + 1))?;
    cache.put(url.as_str(), Response::ok("seen")?.with_headers(headers)).await?;
    Ok(true)
}
