//! The URLs Cache API copies are stored under. They live under the worker's own hostname (the
//! `WORKER_URL` variable, else the host the isolate's first request came to), not a synthetic
//! one: Cloudflare advises it, and a zone's purge by tag is then sure to reach them.

use std::cell::RefCell;

use worker::{Env, Request, Url};

thread_local! {
    static ORIGIN: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Sets the origin once per isolate: `WORKER_URL`'s, else `req`'s.
pub(crate) fn configure(env: &Env, req: &Request) {
    if ORIGIN.with(|o| o.borrow().is_some()) {
        return;
    }
    let configured = env.var("WORKER_URL").ok().and_then(|v| Url::parse(&v.to_string()).ok());
    let url = configured.or_else(|| req.url().ok());
    let origin = url.map_or_else(|| "https://keyward-edge.invalid".to_owned(), |u| u.origin().ascii_serialization());
    ORIGIN.with(|o| *o.borrow_mut() = Some(origin));
}

/// The Cache API URL for `path` (e.g. `key/<hash>`), under the worker's own origin.
pub(crate) fn cache_url(path: &str) -> String {
    let origin = ORIGIN.with(|o| o.borrow().clone()).unwrap_or_else(|| "https://keyward-edge.invalid".to_owned());
    format!("{origin}/__keyward/cache/{path}")
}
