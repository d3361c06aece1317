//! Cloudflare's REST API: its settings, the account's rate limit, bulk KV writes, purge by tag,
//! and the one check of its `{success, errors}` answers.
//!
//! In production one KV namespace serves every location, written in bulk (`kv::BulkKv`
//! coalesces writes to one key), and every call waits for the account's rate limit (1,200
//! requests per 5 minutes). Cache API copies are purged by tag (the edge tags each copy with
//! its key hash), in batches of at most the plan's tags per call. An acknowledgement here means
//! Cloudflare accepted the purge; isolate memory at each location is bounded by
//! `max_staleness_ms` alone. Local regions' KV (wrangler dev) answers in the same format.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use keyward_shared::KeyHash;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::json;

use crate::config::Secret;

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

    /// Most tags one purge_cache call carries (`max_tags_per_purge`), for batching purges.
    pub fn max_tags_per_purge(&self) -> usize {
        self.settings.max_tags_per_purge.max(1)
    }

    async fn call(&self, request: reqwest::RequestBuilder) -> Result<(), CloudflareError> {
        self.limiter.acquire().await;
        send(request, self.settings.api_token.as_ref()).await
    }

    /// `PUT /accounts/<id>/storage/kv/namespaces/<id>/bulk` with `[{key, value}]`.
    pub async fn write_bulk(&self, pairs: &[(String, String)]) -> Result<(), CloudflareError> {
        let s = &self.settings;
        let url = format!("{}/accounts/{}/storage/kv/namespaces/{}/bulk", s.api_base, s.account_id, s.kv_namespace_id);
        for chunk in pairs.chunks(MAX_BULK) {
            let body: Vec<_> = chunk.iter().map(|(key, value)| json!({ "key": key, "value": value })).collect();
            self.call(self.client.put(&url).json(&body)).await?;
        }
        Ok(())
    }

    /// `POST /zones/<id>/purge_cache` with `{"tags": [...]}`, a batch per call.
    pub async fn purge_tags(&self, hashes: &[KeyHash]) -> Result<(), CloudflareError> {
        let url = format!("{}/zones/{}/purge_cache", self.settings.api_base, self.settings.zone_id);
        for chunk in hashes.chunks(self.settings.max_tags_per_purge.max(1)) {
            let tags: Vec<String> = chunk.iter().map(KeyHash::to_hex).collect();
            self.call(self.client.post(&url).json(&json!({ "tags": tags }))).await?;
        }
        Ok(())
    }
}

/// Why a call in Cloudflare's REST format failed.
#[derive(Debug, thiserror::Error)]
pub enum CloudflareError {
    #[error("cannot connect")]
    Unreachable(#[source] reqwest::Error),
    /// An HTTP error, or an answer whose envelope does not say `"success": true`.
    #[error("answered {status}: {errors}")]
    Refused { status: StatusCode, errors: serde_json::Value },
}

/// Sends a request in Cloudflare's REST format (with the token, if any) and checks its answer:
/// a success status and `"success": true` in the envelope, or the envelope's `errors`.
pub async fn send(request: reqwest::RequestBuilder, token: Option<&Secret>) -> Result<(), CloudflareError> {
    let request = match token {
        Some(token) => request.bearer_auth(token.expose()),
        None => request,
    };
    let response = request.send().await.map_err(CloudflareError::Unreachable)?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() || body["success"] != true {
        return Err(CloudflareError::Refused { status, errors: body["errors"].clone() });
    }
    Ok(())
}
