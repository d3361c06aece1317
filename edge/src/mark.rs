//! A confirmation's mark in the Cache API, where purges reach only the Cache API (tag-only).
//!
//! A confirmation reads the authority, then writes the copy it confirmed into the Cache API. A
//! change that reaches the authority between that read and that write is purged (by tag, once
//! the authority holds it) possibly *before* the write, which would then put the old copy back:
//! answered until its own `max_staleness_ms` instead of the purge's latency plus memory trust.
//! So a confirmation first finds the record's mark in the Cache API, under the record's tag
//! (putting one, with a random token, where there is none); a purge-by-tag drops the mark with
//! the copy. After writing its copy, the confirmation reads the mark again: when it is gone or
//! holds another token, a purge may have run during its flight, and the confirmation takes its
//! copy back out of the Cache API and confirms again. The copy is written before the mark is
//! read, so a purge after that read drops the copy itself.
//!
//! Confirmations of one record share its mark (one is put only where there is none), so those
//! of several isolates at one location do not void each other; two that both find none at once
//! may (the later token wins), which costs a confirmation, never a stale copy.

use worker::{Cache, Headers, Response};

use crate::deadline;

/// How long the Cache API keeps a mark (a confirmation in flight when it expires counts as
/// overtaken; the next one puts another).
const MARK_MAX_AGE_S: u64 = 3_600;

/// The mark a confirmation found before asking.
pub(crate) struct Mark {
    url: String,
    token: String,
}

/// The mark's place beside the copy at `copy_url` (a purge-by-tag emulated locally drops both).
pub(crate) fn url_of(copy_url: &str) -> String {
    format!("{copy_url}/flight")
}

/// The token of the mark at `url`; `None` when there is none or it could not be read in time.
async fn token_at(cache: &Cache, url: &str) -> Option<String> {
    let mut held = deadline::within(deadline::CACHE_MS, cache.get(url, false)).await?.ok()??;
    held.text().await.ok()
}

impl Mark {
    /// The mark of the copy at `copy_url` before its confirmation asks the authority: the one
    /// there, or one put now, tagged `tag`; `None` if none could be read or put in time.
    pub(crate) async fn find(cache: &Cache, copy_url: &str, tag: &str) -> Option<Mark> {
        let url = url_of(copy_url);
        if let Some(token) = token_at(cache, &url).await {
            return Some(Mark { url, token });
        }
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).ok()?;
        let mark = Mark { url, token: u64::from_le_bytes(random).to_string() };
        let headers = Headers::new();
        headers.set("cache-control", &format!("max-age={MARK_MAX_AGE_S}")).ok()?;
        headers.set("cache-tag", tag).ok()?;
        let response = Response::ok(mark.token.clone()).ok()?.with_headers(headers);
        deadline::within(deadline::CACHE_MS, cache.put(&mark.url, response)).await?.ok()?;
        Some(mark)
    }

    /// Whether the mark is still there with the token found (no purge dropped it since). A
    /// read that fails or is late counts as gone.
    pub(crate) async fn intact(&self, cache: &Cache) -> bool {
        token_at(cache, &self.url).await.is_some_and(|token| token == self.token)
    }
}
