//! Writing Workers KV: the [`KvWriter`] trait and its writers.
//!
//! [`CloudflareKv`] writes one value at a time in Cloudflare's KV REST format
//! (`PUT .../storage/kv/namespaces/<id>/values/<key>`); locally it points at the same format
//! served by `wrangler dev`. [`BulkKv`] is production's: Cloudflare's bulk endpoint, with writes
//! to one key coalesced to one per second, keeping the highest record version, and the keys
//! Cloudflare leaves unwritten failed to their writers. [`DelayedKv`] models KV's eventual
//! consistency for tests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use tokio::sync::{Notify, oneshot};

use crate::cloudflare::{self, CloudflareApi, CloudflareError, SAME_KEY_INTERVAL};
use crate::config::Secret;

/// Writes values into one Workers KV namespace. A value is a record's JSON (`shared`'s
/// `KeyRecord` or `RootKeyRecord`), whose `version` orders the writes to one key.
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
    /// Cloudflare answered the bulk write with this key among its `unsuccessful_keys`.
    #[error("Cloudflare's bulk write answered that `{0}` was not written (unsuccessful_keys); to be retried")]
    NotWritten(String),
    /// A bulk writer orders writes to a key by the record's `version`; this value has none.
    #[error("the value is not a versioned record")]
    Unversioned(#[source] serde_json::Error),
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
            let request =
                self.client.put(self.value_url(key)).header("content-type", "application/octet-stream").body(value);
            cloudflare::send(request, self.token.as_ref()).await?;
            Ok(())
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

/// Writes to Cloudflare's KV in bulk, coalescing writes to one key to one per second. Writes to
/// one key that meet keep the highest record version (the `version` of the JSON record written),
/// whatever order they came in. A put resolves when its value, or a higher version of the key,
/// has been written; it fails when the bulk write failed or Cloudflare answered that it left the
/// key unwritten (`unsuccessful_keys`). Such keys are counted ([`BulkKv::unwritten`]) and logged.
pub struct BulkKv {
    inner: Arc<BulkState>,
}

struct BulkState {
    api: Arc<CloudflareApi>,
    queue: Mutex<Queue>,
    wake: Notify,
    /// Keys Cloudflare answered as not written, since start.
    unwritten: AtomicU64,
}

/// Those waiting for a key's value (or a higher version) to be written.
type Waiters = Vec<oneshot::Sender<Result<(), KvError>>>;

/// The highest version waiting for one key, and everyone waiting on it.
struct Pending {
    version: u64,
    value: String,
    waiters: Waiters,
}

/// A value due to be written now.
struct Due {
    key: String,
    version: u64,
    value: String,
    waiters: Waiters,
}

/// How long a key's highest written version is remembered, so that a late write of an older
/// version (a retry that lost a race) is answered without being written.
const REMEMBER_WRITTEN: Duration = Duration::from_secs(300);

#[derive(Default)]
struct Queue {
    pending: HashMap<String, Pending>,
    /// When each key was last sent to Cloudflare.
    last_write: HashMap<String, Instant>,
    /// The highest version Cloudflare wrote for each key, and when.
    written: HashMap<String, (u64, Instant)>,
}

/// The one field of a record the coalescing reads.
#[derive(serde::Deserialize)]
struct Versioned {
    version: u64,
}

impl BulkKv {
    pub fn new(api: Arc<CloudflareApi>) -> BulkKv {
        let inner = Arc::new(BulkState {
            api,
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            unwritten: AtomicU64::new(0),
        });
        tokio::spawn(flush_loop(inner.clone()));
        BulkKv { inner }
    }

    /// How many keys Cloudflare answered as not written since start (their writers failed).
    pub fn unwritten(&self) -> u64 {
        self.inner.unwritten.load(Ordering::Relaxed)
    }
}

impl KvWriter for BulkKv {
    fn put<'a>(&'a self, key: &'a str, value: String) -> BoxFuture<'a, Result<(), KvError>> {
        let version = match serde_json::from_str::<Versioned>(&value) {
            Ok(record) => record.version,
            Err(e) => return Box::pin(async move { Err(KvError::Unversioned(e)) }),
        };
        let (done, wait) = oneshot::channel();
        self.inner.queue.lock().expect("not poisoned").add(key, version, value, done);
        self.inner.wake.notify_one();
        Box::pin(async move { wait.await.unwrap_or(Err(KvError::Stopped)) })
    }
}

impl Queue {
    /// Queues a value, keeping the highest version waiting for its key.
    fn add(&mut self, key: &str, version: u64, value: String, done: oneshot::Sender<Result<(), KvError>>) {
        match self.pending.get_mut(key) {
            Some(pending) => {
                if version > pending.version {
                    (pending.version, pending.value) = (version, value);
                }
                pending.waiters.push(done);
            }
            None => {
                self.pending.insert(key.to_owned(), Pending { version, value, waiters: vec![done] });
            }
        }
    }

    /// Takes the values due now (their key not written within the last second), marking them
    /// sent; answers at once those whose key already holds that version or a higher one. Answers
    /// the values to write and how long until the next queued value is due, if any is.
    fn take_due(&mut self, now: Instant) -> (Vec<Due>, Option<Duration>) {
        let Queue { pending, last_write, written } = self;
        last_write.retain(|_, at| now.duration_since(*at) < SAME_KEY_INTERVAL);
        written.retain(|_, (_, at)| now.duration_since(*at) < REMEMBER_WRITTEN);
        let due: Vec<String> = pending.keys().filter(|k| !last_write.contains_key(*k)).cloned().collect();
        let mut batch = Vec::new();
        for key in due {
            let Some(Pending { version, value, waiters }) = pending.remove(&key) else { continue };
            if written.get(&key).is_some_and(|(held, _)| *held >= version) {
                waiters.into_iter().for_each(|w| drop(w.send(Ok(()))));
                continue;
            }
            last_write.insert(key.clone(), now);
            batch.push(Due { key, version, value, waiters });
        }
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
            write_batch(&state, batch).await;
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

/// Writes one batch and answers its waiters: each key written, left unwritten (counted and
/// logged), or failed with the whole write.
async fn write_batch(state: &BulkState, batch: Vec<Due>) {
    let pairs: Vec<(String, String)> = batch.iter().map(|d| (d.key.clone(), d.value.clone())).collect();
    let result = state.api.write_bulk(&pairs).await.map_err(Arc::new);
    let now = Instant::now();
    let mut queue = state.queue.lock().expect("not poisoned");
    for Due { key, version, waiters, .. } in batch {
        let outcome = match &result {
            Err(e) => Err(e.clone()),
            Ok(unwritten) if unwritten.contains(&key) => {
                state.unwritten.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%key, version, "Cloudflare's bulk write left a key unwritten; its writers are told it failed");
                Ok(false)
            }
            Ok(_) => {
                let held = queue.written.entry(key.clone()).or_insert((version, now));
                *held = (held.0.max(version), now);
                Ok(true)
            }
        };
        for waiter in waiters {
            let _ = waiter.send(match &outcome {
                Ok(true) => Ok(()),
                Ok(false) => Err(KvError::NotWritten(key.clone())),
                Err(e) => Err(KvError::Bulk(e.clone())),
            });
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
