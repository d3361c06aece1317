//! The production path: Cloudflare's API for what local regions do by hand.
//!
//! One KV namespace serves every location, written through the REST API in bulk. Writes to one
//! key are coalesced (KV takes one write per second per key: a newer value replaces a queued
//! one), and every call waits for the account's rate limit (1,200 requests per 5 minutes). Cache
//! API copies are purged by tag (the edge tags each copy with its key hash), in batches of at
//! most the plan's tags per call. An acknowledgement here means Cloudflare accepted the purge;
//! isolate memory at each location is bounded by `max_staleness_ms` alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::future::BoxFuture;
use keyward_shared::KeyHash;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{Notify, oneshot};

use crate::config::Secret;
use crate::edge::KvWriter;

/// Cloudflare's documented account-wide API limit: 1,200 requests per 5 minutes.
pub const ACCOUNT_LIMIT: (u32, Duration) = (1_200, Duration::from_secs(300));
/// KV accepts one write per second to the same key.
pub const SAME_KEY_INTERVAL: Duration = Duration::from_secs(1);
/// Most pairs in one bulk write (Cloudflare: 10,000).
pub const MAX_BULK: usize = 10_000;
/// Most tags in one purge_cache call (30 is the lowest of Cloudflare's plan limits).
pub const DEFAULT_MAX_TAGS: usize = 30;

/// The `[cloudflare]` section of `keyward.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default = "default_api_base")]
    pub api_base: String,
    pub account_id: String,
    pub zone_id: String,
    pub kv_namespace_id: String,
    /// The deployed worker's URL (on the zone's custom domain or route), for health checks.
    pub worker_url: String,
    /// An API token with KV write and cache purge (`KEYWARD_CF_API_TOKEN` overrides it).
    #[serde(default)]
    pub api_token: Option<Secret>,
    #[serde(default = "default_max_tags")]
    pub max_tags_per_purge: usize,
}

fn default_api_base() -> String {
    "https://api.cloudflare.com/client/v4".to_owned()
}

fn default_max_tags() -> usize {
    DEFAULT_MAX_TAGS
}

/// A token bucket: `capacity` calls, refilled evenly over `period`.
pub struct RateLimiter {
    state: Mutex<(f64, Instant)>,
    capacity: f64,
    per_second: f64,
}

impl RateLimiter {
    pub fn new(capacity: u32, period: Duration) -> RateLimiter {
        let capacity = f64::from(capacity);
        RateLimiter {
            state: Mutex::new((capacity, Instant::now())),
            capacity,
            per_second: capacity / period.as_secs_f64(),
        }
    }

    /// Waits until a call may be made, and takes its token.
    pub async fn acquire(&self) {
        loop {
            let wait = {
                let mut state = self.state.lock().expect("not poisoned");
                let now = Instant::now();
                state.0 = (state.0 + now.duration_since(state.1).as_secs_f64() * self.per_second).min(self.capacity);
                state.1 = now;
                if state.0 >= 1.0 {
                    state.0 -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - state.0) / self.per_second)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// Cloudflare's REST API for one account and zone.
pub struct CloudflareApi {
    client: reqwest::Client,
    settings: Settings,
    limiter: RateLimiter,
}

impl CloudflareApi {
    pub fn new(client: reqwest::Client, settings: Settings, limiter: RateLimiter) -> CloudflareApi {
        CloudflareApi {
            client,
            settings: Settings { api_base: settings.api_base.trim_end_matches('/').to_owned(), ..settings },
            limiter,
        }
    }

    pub fn worker_url(&self) -> &str {
        &self.settings.worker_url
    }

    async fn call(&self, request: reqwest::RequestBuilder) -> anyhow::Result<()> {
        self.limiter.acquire().await;
        let request = match &self.settings.api_token {
            Some(token) => request.bearer_auth(token.expose()),
            None => request,
        };
        let response = request.send().await.context("cannot reach Cloudflare's API")?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        if !status.is_success() || body["success"] != true {
            bail!("Cloudflare answered {status}: {}", body["errors"]);
        }
        Ok(())
    }

    /// `PUT /accounts/<id>/storage/kv/namespaces/<id>/bulk` with `[{key, value}]`.
    pub async fn write_bulk(&self, pairs: &[(String, String)]) -> anyhow::Result<()> {
        let s = &self.settings;
        let url = format!("{}/accounts/{}/storage/kv/namespaces/{}/bulk", s.api_base, s.account_id, s.kv_namespace_id);
        for chunk in pairs.chunks(MAX_BULK) {
            let body: Vec<_> = chunk.iter().map(|(key, value)| json!({ "key": key, "value": value })).collect();
            self.call(self.client.put(&url).json(&body)).await?;
        }
        Ok(())
    }

    /// `POST /zones/<id>/purge_cache` with `{"tags": [...]}`, a batch per call.
    pub async fn purge_tags(&self, hashes: &[KeyHash]) -> anyhow::Result<()> {
        let url = format!("{}/zones/{}/purge_cache", self.settings.api_base, self.settings.zone_id);
        for chunk in hashes.chunks(self.settings.max_tags_per_purge.max(1)) {
            let tags: Vec<String> = chunk.iter().map(KeyHash::to_hex).collect();
            self.call(self.client.post(&url).json(&json!({ "tags": tags }))).await?;
        }
        Ok(())
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
type Waiters = Vec<oneshot::Sender<Result<(), String>>>;

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
    fn put<'a>(&'a self, key: &'a str, value: String) -> BoxFuture<'a, anyhow::Result<()>> {
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
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => bail!("{e}"),
                Err(_) => bail!("the KV writer stopped"),
            }
        })
    }
}

async fn flush_loop(state: Arc<BulkState>) {
    loop {
        let (batch, next_due) = {
            let mut queue = state.queue.lock().expect("not poisoned");
            let now = Instant::now();
            let Queue { pending, last_write } = &mut *queue;
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
        };
        if !batch.is_empty() {
            let pairs: Vec<(String, String)> = batch.iter().map(|(k, v, _)| (k.clone(), v.clone())).collect();
            let result = state.api.write_bulk(&pairs).await.map_err(|e| format!("{e:#}"));
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
