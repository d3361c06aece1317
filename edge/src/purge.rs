//! `POST /internal/purge`: the control plane's signed order to drop copies of keys.
//!
//! The signature covers method, path, timestamp, nonce and body. A nonce is accepted once: it is
//! remembered in isolate memory and in this location's Cache API for longer than a timestamp
//! stays acceptable, so a captured request cannot be replayed.

use std::cell::RefCell;
use std::collections::HashMap;

use keyward_shared::internal::{
    self, MAX_SKEW_MS, NONCE_HEADER, PURGE_PATH, PurgeAck, PurgeRequest, SIGNATURE_HEADER, SignatureError,
    SignedHeaders, TIMESTAMP_HEADER,
};
use worker::{Cache, Date, Headers, Request, Response, Result, RouteContext};

use crate::{PURGE_SECRET, REGION_VAR, error, lookup};

const MAX_BODY: usize = 64 * 1024;
/// How long a nonce is remembered: past this its timestamp is refused anyway.
const NONCE_MEMORY_MS: u64 = 2 * MAX_SKEW_MS as u64 + 1_000;

thread_local! {
    static NONCES: RefCell<HashMap<String, u64>> = RefCell::new(HashMap::new());
}

pub(crate) async fn handle(mut req: Request, ctx: RouteContext<()>) -> Result<Response> {
    let now_ms = Date::now().as_millis();
    let secret = ctx.env.secret(PURGE_SECRET)?.to_string();
    let header = |name: &str| req.headers().get(name).ok().flatten().unwrap_or_default();
    let (timestamp, nonce, signature) = (header(TIMESTAMP_HEADER), header(NONCE_HEADER), header(SIGNATURE_HEADER));
    let body = req.bytes().await?;
    if body.len() > MAX_BODY {
        return error::respond(413, "PAYLOAD_TOO_LARGE", "a purge is at most 64 KiB");
    }
    let headers = SignedHeaders { timestamp: &timestamp, nonce: &nonce, signature: &signature };
    if let Err(e) = internal::verify(secret.as_bytes(), "POST", PURGE_PATH, headers, &body, now_ms as i64) {
        return refuse(e);
    }
    if !first_use(&nonce, now_ms).await? {
        return refuse(SignatureError::Replayed);
    }
    let purge: PurgeRequest = match serde_json::from_slice(&body) {
        Ok(purge) => purge,
        Err(e) => return error::respond(400, "BAD_REQUEST", &format!("invalid purge: {e}")),
    };
    let mut purged = 0;
    for hash in &purge.hashes {
        purged += usize::from(lookup::purge(hash).await?);
    }
    let region = ctx.env.var(REGION_VAR).map(|v| v.to_string()).unwrap_or_default();
    Response::from_json(&PurgeAck { region, purged })
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
