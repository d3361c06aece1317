//! A confirmation's mark in the Cache API, where purges reach only the Cache API (tag-only).
//!
//! A confirmation reads the authority, then writes the copy it confirmed into the Cache API. A
//! change that reaches the authority between that read and that write is purged (by tag, once
//! the authority holds it) possibly *before* the write, which would then put the old copy back:
//! answered until its own `max_staleness_ms` instead of the purge's latency plus memory trust.
//! So a confirmation first puts a mark under the record's tag; a purge-by-tag drops the mark
//! with the copy. After writing its copy, the confirmation reads its mark: when the mark is gone
//! (or another confirmation's), a purge may have run during its flight, and it takes its copy
//! back out of the Cache API and confirms again. The copy is written before the mark is read, so
//! a purge after that read drops the copy itself.

use worker::{Cache, Headers, Response};

use crate::deadline;

/// How long the Cache API keeps a mark (a confirmation is over within seconds).
const MARK_MAX_AGE_S: u64 = 60;

/// One confirmation's mark.
pub(crate) struct Mark {
    url: String,
    nonce: String,
}

/// The mark's place beside the copy at `copy_url` (a purge-by-tag emulated locally drops both).
pub(crate) fn url_of(copy_url: &str) -> String {
    format!("{copy_url}/flight")
}

impl Mark {
    /// Puts a mark for the copy at `copy_url`, tagged `tag`, before its confirmation asks the
    /// authority; `None` if it could not be put within the Cache API's deadline.
    pub(crate) async fn put(cache: &Cache, copy_url: &str, tag: &str) -> Option<Mark> {
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).ok()?;
        let mark = Mark { url: url_of(copy_url), nonce: u64::from_le_bytes(random).to_string() };
        let headers = Headers::new();
        headers.set("cache-control", &format!("max-age={MARK_MAX_AGE_S}")).ok()?;
        headers.set("cache-tag", tag).ok()?;
        let response = Response::ok(mark.nonce.clone()).ok()?.with_headers(headers);
        deadline::within(deadline::CACHE_MS, cache.put(&mark.url, response)).await?.ok()?;
        Some(mark)
    }

    /// Whether the mark is still there as this confirmation put it (no purge dropped it, no
    /// other confirmation replaced it). A read that fails or is late counts as gone.
    pub(crate) async fn intact(&self, cache: &Cache) -> bool {
        let Some(Ok(Some(mut held))) = deadline::within(deadline::CACHE_MS, cache.get(&self.url, false)).await else {
            return false;
        };
        held.text().await.is_ok_and(|text| text == self.nonce)
    }
}
