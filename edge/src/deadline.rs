//! Deadlines for every call the edge makes across a process boundary: a Durable Object that
//! accepts a request and never answers (its home stopped, a stuck network path) must cost a
//! bounded wait and an `UNAVAILABLE`, never a hung verification.

use std::time::Duration;

use futures::future::{Either, select};
use worker::{Delay, Env};

/// How long a read of a key's authority may take, unless the worker's `AUTHORITY_TIMEOUT_MS`
/// variable says otherwise; past it the authority counts as unreachable.
pub(crate) const AUTHORITY_MS: u64 = 500;
/// The most `AUTHORITY_TIMEOUT_MS` may set: a verification that needs the authority fails
/// closed within this, whatever the configuration says.
pub(crate) const MAX_AUTHORITY_MS: u64 = 2_000;
/// How long a KV read may take; past it the read counts as failed.
pub(crate) const KV_MS: u64 = 1_000;
/// How long a Cache API read or write may take; past it a read counts as a miss and a write as
/// not made.
pub(crate) const CACHE_MS: u64 = 250;

/// The authority's deadline for this worker: `AUTHORITY_TIMEOUT_MS` (at least 1, at most
/// [`MAX_AUTHORITY_MS`]), or [`AUTHORITY_MS`].
pub(crate) fn authority_ms(env: &Env) -> u64 {
    let configured = env.var("AUTHORITY_TIMEOUT_MS").ok().and_then(|v| v.to_string().parse().ok());
    configured.unwrap_or(AUTHORITY_MS).clamp(1, MAX_AUTHORITY_MS)
}

/// Runs `future` for at most `ms` milliseconds; `None` if it had not finished by then.
pub(crate) async fn within<F: Future>(ms: u64, future: F) -> Option<F::Output> {
    let future = std::pin::pin!(future);
    match select(future, Delay::from(Duration::from_millis(ms))).await {
        Either::Left((output, _)) => Some(output),
        Either::Right(((), _)) => None,
    }
}
