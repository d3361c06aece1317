//! Writing Workers KV: the [`KvWriter`] trait and its writers.
//!
//! [`CloudflareKv`] writes one value at a time in Cloudflare's KV REST format
//! (`PUT .../storage/kv/namespaces/<id>/values/<key>`); locally it points at the same format
//! served by `wrangler dev`. [`BulkKv`] is production's: Cloudflare's bulk endpoint, with writes
//! to one key coalesced to one per second. [`DelayedKv`] models KV's eventual consistency for
//! tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use tokio::sync::{Notify, oneshot};

use crate::cloudflare::{self, CloudflareApi, CloudflareError, SAME_KEY_INTERVAL};
use crate::config::Secret;

/// Writes values into one Workers KV namespace.
pub trait KvWriter: Send + Sync {
    fn put<'a>(&'a self, key: &'a str, value: String) -> BoxFuture<'a, Result<(), KvError>>;
}

/// Why a KV write failed.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error(transparent)]
    Cloudflare(#[from] CloudflareError),
    /// The bulk write that carried this value failed (one failure, told to every writer in it).
    #[error("the bulk write failed")]
    Bulk(#[source] Arc<CloudflareError>),
    #[error("the KV writer stopped")]
    Stopped,
}

/// A KV namespace reached through Cloudflare's REST API (or wrangler dev's copy of it).
pub struct CloudflareKv {
    client: reqwest::Client,
    base: String,
    namespace_id: String,
    token: Option<Secret>,
}

/// What Cloudflare wants percent-encoded in a KV key name: everything but unreserved characters.
const KEY_NAME: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

impl CloudflareKv {
    pub fn new(client: reqwest::Client, base: &str, namespace_id: &str, token: Option<Secret>) -> CloudflareKv {
        CloudflareKv {
            client,
            base: base.trim_end_matches('/').to_owned(),
            namespace_id: namespace_id.to_owned(),
            token,
        }
    }

    fn value_url(&self, key: &str) -> String {
        let key = utf8_percent_encode(key, KEY_NAME);
        format!("{}/storage/kv/namespaces/{}/values/{key}", self.base, self.namespace_id)
    }
}

impl KvWriter for CloudflareKv {
    fn put<'a>(&'a self, key: &'a str, value: String) -> BoxFuture<'a, Result<(), KvError>> {
        Box::pin(async move {
            let request = self.client.put(self.value_url(key)).body(value);
            Ok(cloudflare::send(request, self.token.as_ref()).await?)
        })
    }
}

/// Accepts a write at once and applies it to the inner namespace `delay` later: the local model
/// of a KV location that has not yet seen a write. A failure after the delay is logged.
pub struct DelayedKv {
    inner: Arc<dyn KvWriter>,
    delay: Duration,
}

impl DelayedKv {
    pub fn new(inner: Arc<dyn KvWriter>, delay: Duration) -> DelayedKv {
        DelayedKv { inner, delay }
    }
}

impl KvWriter for DelayedKv {
    fn put<'a>(&'a self, key: &'a str, value: String) -> BoxFuture<'a, Result<(), KvError>> {
        let (inner, delay, key) = (self.inner.clone(), self.delay, key.to_owned());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Err(e) = inner.put(&key, value).await {
                tracing::error!(error = %e, "delayed KV write failed");
            }
        });
        Box::pin(async { Ok(()) })
    }
}

/// Writes to Cloudflare's KV in bulk, coalescing writes to one key to one per second. A put
/// resolves when its value, or a newer one for the same key, has been written.
pub struct BulkKv {
    inner: Arc<BulkState>,
}

struct BulkState {
    api: Arc<CloudflareApi>,
    queue: Mutex<Queue>,
    wake: Notify,
}

/// Those waiting for a key's value to be written.
type Waiters = Vec<oneshot::Sender<Result<(), Arc<CloudflareError>>>>;

#[derive(Default)]
struct Queue {
    /// The newest value waiting for each key, and everyone waiting on it.
    pending: HashMap<String, (String, Waiters)>,
    /// When each key was last written.
    last_write: HashMap<String, Instant>,
}

impl BulkKv {
    pub fn new(api: Arc<CloudflareApi>) -> BulkKv {
        let inner = Arc::new(BulkState { api, queue: Mutex::new(Queue::default()), wake: Notify::new() });
        tokio::spawn(flush_loop(inner.clone()));
        BulkKv { inner }
    }
}

impl KvWriter for BulkKv {
    fn put<'a>(&'a self, key: &'a str, value: String) -> BoxFuture<'a, Result<(), KvError>> {
        let (done, wait) = oneshot::channel();
        {
            let mut queue = self.inner.queue.lock().expect("not poisoned");
            let entry = queue.pending.entry(key.to_owned()).or_insert_with(|| (String::new(), Vec::new()));
            entry.0 = value;
            entry.1.push(done);
        }
        self.inner.wake.notify_one();
        Box::pin(async move {
            match wait.await {
                Ok(result) => result.map_err(KvError::Bulk),
                Err(_) => Err(KvError::Stopped),
            }
        })
    }
}

impl Queue {
    /// Takes the values due now (their key not written within the last second), marking them
    /// written; answers them and how long until the next queued value is due, if any is.
    fn take_due(&mut self, now: Instant) -> (Vec<(String, String, Waiters)>, Option<Duration>) {
        let Queue { pending, last_write } = self;
        let due: Vec<String> = pending
            .keys()
            .filter(|k| last_write.get(*k).is_none_or(|at| now.duration_since(*at) >= SAME_KEY_INTERVAL))
            .cloned()
            .collect();
        let batch: Vec<(String, String, Waiters)> =
            due.into_iter().filter_map(|k| pending.remove(&k).map(|(v, waiters)| (k, v, waiters))).collect();
        for (key, ..) in &batch {
            last_write.insert(key.clone(), now);
        }
        last_write.retain(|_, at| now.duration_since(*at) < SAME_KEY_INTERVAL);
        let next_due = pending
            .keys()
            .filter_map(|k| last_write.get(k).map(|at| SAME_KEY_INTERVAL.saturating_sub(now.duration_since(*at))))
            .min();
        (batch, next_due)
    }
}

async fn flush_loop(state: Arc<BulkState>) {
    loop {
        let (batch, next_due) = state.queue.lock().expect("not poisoned").take_due(Instant::now());
        if !batch.is_empty() {
            let pairs: Vec<(String, String)> = batch.iter().map(|(k, v, _)| (k.clone(), v.clone())).collect();
            let result = state.api.write_bulk(&pairs).await.map_err(Arc::new);
            for (_, _, waiters) in batch {
                for waiter in waiters {
                    let _ = waiter.send(result.clone());
                }
            }
            continue;
        }
        match next_due {
            Some(wait) => {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = state.wake.notified() => {}
                }
            }
            None => state.wake.notified().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_are_percent_encoded_but_for_unreserved_characters() {
        let kv = CloudflareKv::new(reqwest::Client::new(), "http://127.0.0.1:8787/api/", "ns", None);
        assert_eq!(
            kv.value_url("key:Az09-_.~/ é%"),
            "http://127.0.0.1:8787/api/storage/kv/namespaces/ns/values/key%3AAz09-_.~%2F%20%C3%A9%25"
        );
    }
}
