//! Checks the control plane's signed internal requests: signature, timestamp and a nonce used
//! once. A nonce is remembered in isolate memory and in this location's Cache API for longer than
//! a timestamp stays acceptable, so a captured request cannot be replayed.

use std::cell::RefCell;
use std::collections::HashMap;

use keyward_shared::internal::{
    self, MAX_SKEW_MS, NONCE_HEADER, SIGNATURE_HEADER, SignatureError, SignedHeaders, TIMESTAMP_HEADER,
};
use worker::{Cache, Env, Headers, Request, Response, Result, console_error};

use crate::{PURGE_SECRET, error};

const MAX_BODY: usize = 256 * 1024;
/// How long a nonce is remembered: past this its timestamp is refused anyway.
const NONCE_MEMORY_MS: u64 = 2 * MAX_SKEW_MS as u64 + 1_000;

thread_local! {
    static NONCES: RefCell<HashMap<String, u64>> = RefCell::new(HashMap::new());
}

/// A signed request whose signature, timestamp and nonce were checked: its work may be done.
pub(crate) struct Signed<T> {
    pub body: T,
    /// When the control plane signed it, by its clock (Unix ms).
    pub signed_at_ms: i64,
}

/// The JSON body of a signed request to `path`, or the refusal to answer with: 401 for missing
/// or malformed signature headers (before the body is read), a bad signature, a timestamp out
/// of range or a nonce already used; 413 for a body over the limit (by `content-length` before
/// reading, and by what was read); 400 for a body that is not a `T`. The nonce is recorded
/// before the caller does any work, so a replay changes nothing.
pub(crate) async fn parse<T: serde::de::DeserializeOwned>(
    req: &mut Request,
    env: &Env,
    path: &str,
    now_ms: u64,
) -> Result<std::result::Result<Signed<T>, Response>> {
    let secret = env.secret(PURGE_SECRET)?.to_string();
    if secret.len() < internal::MIN_SECRET_BYTES {
        console_error!(
            "PURGE_SECRET is {} bytes; internal routes need at least {}",
            secret.len(),
            internal::MIN_SECRET_BYTES
        );
        return Ok(Err(error::respond(503, "MISCONFIGURED", "this worker's PURGE_SECRET is too short; see its log")?));
    }
    let header = |name: &str| req.headers().get(name).ok().flatten().unwrap_or_default();
    let (timestamp, nonce, signature) = (header(TIMESTAMP_HEADER), header(NONCE_HEADER), header(SIGNATURE_HEADER));
    let Ok(signed_at_ms) = timestamp.parse::<i64>() else {
        return Ok(Err(refuse(SignatureError::Malformed)?));
    };
    if !internal::is_nonce(&nonce) || signature.len() != 64 {
        return Ok(Err(refuse(SignatureError::Malformed)?));
    }
    let declared = header("content-length").parse::<usize>().ok();
    if declared.is_some_and(|n| n > MAX_BODY) {
        return Ok(Err(too_large()?));
    }
    let body = req.bytes().await?;
    if body.len() > MAX_BODY {
        return Ok(Err(too_large()?));
    }
    let headers = SignedHeaders { timestamp: &timestamp, nonce: &nonce, signature: &signature };
    if let Err(e) = internal::verify(secret.as_bytes(), "POST", path, headers, &body, now_ms as i64) {
        return Ok(Err(refuse(e)?));
    }
    if !first_use(&nonce, now_ms).await? {
        return Ok(Err(replayed()?));
    }
    match serde_json::from_slice(&body) {
        Ok(body) => Ok(Ok(Signed { body, signed_at_ms })),
        Err(e) => Ok(Err(error::respond(400, "BAD_REQUEST", &format!("invalid body for {path}: {e}"))?)),
    }
}

fn too_large() -> Result<Response> {
    error::respond(413, "PAYLOAD_TOO_LARGE", "an internal request is at most 256 KiB")
}

/// The answer to a request whose nonce was used before.
fn replayed() -> Result<Response> {
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
async fn first_use(nonce: &str, now_ms: u64) -> Result<bool> {
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
