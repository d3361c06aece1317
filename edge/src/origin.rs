//! The URLs Cache API copies (and nonces) are stored under. They live under the worker's own
//! hostname, the `WORKER_URL` variable, not a synthetic one: Cloudflare advises it, and a zone's
//! purge by tag is then sure to reach them. Never the host a request names: whoever sent an
//! isolate's first request would choose where its copies go. Without `WORKER_URL` (local
//! regions) a fixed synthetic origin is used, and said once in the log.

use std::cell::RefCell;

use keyward_shared::origin::origin_of;
use worker::{Env, console_log};

thread_local! {
    static ORIGIN: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The origin where `WORKER_URL` is not set.
const FALLBACK: &str = "https://keyward-edge.invalid";

/// Sets the origin once per isolate, from `WORKER_URL`.
pub(crate) fn configure(env: &Env) {
    if ORIGIN.with(|o| o.borrow().is_some()) {
        return;
    }
    let configured = env.var("WORKER_URL").ok().and_then(|v| origin_of(&v.to_string()));
    let origin = configured.unwrap_or_else(|| {
        console_log!("WORKER_URL is not set to an http(s) URL: Cache API copies are stored under {FALLBACK}");
        FALLBACK.to_owned()
    });
    ORIGIN.with(|o| *o.borrow_mut() = Some(origin));
}

/// The Cache API URL for `path` (e.g. `key/<hash>`), under the worker's own origin.
pub(crate) fn cache_url(path: &str) -> String {
    let origin = ORIGIN.with(|o| o.borrow().clone()).unwrap_or_else(|| FALLBACK.to_owned());
    format!("{origin}/__keyward/cache/{path}")
}
