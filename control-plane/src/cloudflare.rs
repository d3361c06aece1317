//! Cloudflare's REST API: its settings, the account's and the purges' rate limits, bulk KV
//! writes, purge by tag, the start-up check of the zone, and the one check of its
//! `{success, errors}` answers.
//!
//! In production one KV namespace serves every location, written in bulk (`kv::BulkKv`
//! coalesces writes to one key). Cloudflare allows 1,200 API calls per 5 minutes per user,
//! counted across the dashboard, wrangler and every token, and blocks every call for 5 minutes
//! past that: calls here keep to a sliding window below it (1,000 per 300 s by default), and
//! a 429 blocks them all for its `Retry-After`. Cache API copies are purged by tag (the edge
//! tags each copy with its key hash), at most `max_tags_per_purge` tags per call, within the
//! purge limit of the zone's plan. An acknowledgement here means Cloudflare accepted the
//! purge; isolate memory at each location re-reads the Cache API after the worker's memory
//! trust (`MEMORY_TRUST_MS`) and is bounded by `max_staleness_ms` whatever happens. Local
//! regions' KV (wrangler dev) answers in the same format.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use keyward_shared::KeyHash;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::json;

use crate::config::Secret;

/// KV accepts one write per second to the same key.
pub const SAME_KEY_INTERVAL: Duration = Duration::from_secs(1);
/// Most pairs in one bulk write (Cloudflare: 10,000).
pub const MAX_BULK: usize = 10_000;
/// Largest bulk write body (Cloudflare: 100 MB).
pub const MAX_BULK_BYTES: usize = 100_000_000;
/// Most tags in one purge_cache call (Cloudflare: 100 on every plan).
pub const DEFAULT_MAX_TAGS: usize = 100;
/// How long Cloudflare blocks calls after a 429 that names no `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(300);
/// A bulk write may take this long, plus a second per megabyte it sends.
const BULK_TIMEOUT_BASE: Duration = Duration::from_secs(3);
const BULK_BYTES_PER_SECOND: f64 = 1e6;

/// The `[cloudflare]` section of `keyward.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default = "default_api_base")]
    pub api_base: String,
    pub account_id: String,
    pub zone_id: String,
    pub kv_namespace_id: String,
    /// The deployed worker's URL, on a custom domain or route of the zone `zone_id`.
    pub worker_url: String,
    /// An API token with Workers KV Storage write (account), Cache Purge and Zone Read (zone)
    /// (`KEYWARD_CF_API_TOKEN` overrides it).
    #[serde(default)]
    pub api_token: Option<Secret>,
    #[serde(default = "default_max_tags")]
    pub max_tags_per_purge: usize,
    /// At most this many API calls in any `api_limit_window_secs` (Cloudflare's limit is 1,200
    /// per 300 s per user, shared with the dashboard, wrangler and other tokens).
    #[serde(default = "default_api_limit")]
    pub api_limit: u32,
    #[serde(default = "default_api_limit_window_secs")]
    pub api_limit_window_secs: u64,
    /// The zone's plan, which sets its purge rate limit.
    #[serde(default)]
    pub plan: Plan,
    /// The longest a call waits for a rate limit or a 429's `Retry-After` before it fails
    /// (to be retried by the outbox).
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
    /// Largest bulk write body; Cloudflare's limit, lower only behind a proxy that needs it.
    #[serde(default = "default_max_bulk_bytes")]
    pub max_bulk_bytes: usize,
}

fn default_api_base() -> String {
    "https://api.cloudflare.com/client/v4".to_owned()
}

fn default_max_tags() -> usize {
    DEFAULT_MAX_TAGS
}

fn default_api_limit() -> u32 {
    1_000
}

fn default_api_limit_window_secs() -> u64 {
    300
}

fn default_max_wait_ms() -> u64 {
    5_000
}

fn default_max_bulk_bytes() -> usize {
    MAX_BULK_BYTES
}

/// A zone's plan: Cloudflare's purge limits (by tag, hostname or prefix) depend on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Plan {
    #[default]
    Free,
    Pro,
    Business,
    Enterprise,
}

impl Plan {
    /// Purge calls per second, and the bucket's size (the burst), as Cloudflare documents them.
    pub fn purge_limit(self) -> (f64, u32) {
        match self {
            Plan::Free => (5.0 / 60.0, 25),
            Plan::Pro => (5.0, 25),
            Plan::Business => (10.0, 50),
            Plan::Enterprise => (50.0, 500),
        }
    }
}

/// A limit on calls: takes a place for a call now, or answers when one may start.
trait Limit: Sync {
    fn take(&self, now: Instant) -> Result<(), Instant>;
}

/// At most `limit` calls in any `window`: the times of the calls within the last window.
struct SlidingWindow {
    sent: Mutex<VecDeque<Instant>>,
    limit: usize,
    window: Duration,
}

impl Limit for SlidingWindow {
    fn take(&self, now: Instant) -> Result<(), Instant> {
        let mut sent = self.sent.lock().expect("not poisoned");
        while sent.front().is_some_and(|at| now.duration_since(*at) >= self.window) {
            sent.pop_front();
        }
        match sent.front() {
            Some(first) if sent.len() >= self.limit => Err(*first + self.window),
            _ => {
                sent.push_back(now);
                Ok(())
            }
        }
    }
}

/// A token bucket of `capacity` calls refilled at `per_second`, starting full: Cloudflare's
/// own model of its purge limits.
struct TokenBucket {
    state: Mutex<(f64, Instant)>,
    capacity: f64,
    per_second: f64,
}

impl Limit for TokenBucket {
    fn take(&self, now: Instant) -> Result<(), Instant> {
        let mut state = self.state.lock().expect("not poisoned");
        let refill = now.saturating_duration_since(state.1).as_secs_f64() * self.per_second;
        *state = ((state.0 + refill).min(self.capacity), now);
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            return Ok(());
        }
        Err(now + Duration::from_secs_f64((1.0 - state.0) / self.per_second))
    }
}

/// Cloudflare's REST API for one account and zone.
pub struct CloudflareApi {
    client: reqwest::Client,
    settings: Settings,
    account: SlidingWindow,
    purges: TokenBucket,
    /// Until when Cloudflare blocks every call (a 429's `Retry-After`).
    blocked_until: Mutex<Option<Instant>>,
}

impl CloudflareApi {
    pub fn new(client: reqwest::Client, settings: Settings) -> CloudflareApi {
        let (per_second, burst) = settings.plan.purge_limit();
        let now = Instant::now();
        CloudflareApi {
            client,
            account: SlidingWindow {
                sent: Mutex::new(VecDeque::new()),
                limit: settings.api_limit.max(1) as usize,
                window: Duration::from_secs(settings.api_limit_window_secs),
            },
            purges: TokenBucket { state: Mutex::new((f64::from(burst), now)), capacity: f64::from(burst), per_second },
            blocked_until: Mutex::new(None),
            settings: Settings { api_base: settings.api_base.trim_end_matches('/').to_owned(), ..settings },
        }
    }

    /// Most tags one purge_cache call carries (`max_tags_per_purge`), for batching purges.
    pub fn max_tags_per_purge(&self) -> usize {
        self.settings.max_tags_per_purge.max(1)
    }

    /// The deadline of a call whose caller named none.
    fn default_deadline(&self) -> Instant {
        Instant::now() + Duration::from_millis(self.settings.max_wait_ms)
    }

    /// Waits until `limit` (and any block by Cloudflare) lets a call start, or fails at once if
    /// that is past `deadline`.
    async fn wait_for(&self, limit: &dyn Limit, name: &'static str, deadline: Instant) -> Result<(), CloudflareError> {
        loop {
            let now = Instant::now();
            let blocked = self.blocked_until.lock().expect("not poisoned").filter(|until| *until > now);
            let ready = match blocked {
                Some(until) => until,
                None => match limit.take(now) {
                    Ok(()) => return Ok(()),
                    Err(ready) => ready,
                },
            };
            if ready > deadline {
                let limit = if blocked.is_some() { "429's Retry-After" } else { name };
                return Err(CloudflareError::OverLimit { limit, wait: ready - now });
            }
            tokio::time::sleep_until(ready.into()).await;
        }
    }

    /// Sends a call within the account's limit (and the purge limit, for a purge); on 429,
    /// blocks every call for its `Retry-After` and tries again if that ends before `deadline`.
    async fn call(
        &self,
        request: reqwest::RequestBuilder,
        purge: bool,
        deadline: Instant,
    ) -> Result<serde_json::Value, CloudflareError> {
        loop {
            if purge {
                self.wait_for(&self.purges, "purge limit of the zone's plan (plan)", deadline).await?;
            }
            self.wait_for(&self.account, "account API limit (api_limit)", deadline).await?;
            let attempt = request.try_clone().expect("request bodies are in memory");
            match send(attempt, self.settings.api_token.as_ref()).await {
                Err(CloudflareError::TooManyRequests { retry_after }) => {
                    let until = Instant::now() + retry_after;
                    tracing::warn!(?retry_after, "Cloudflare answered 429: every API call waits for its Retry-After");
                    let mut blocked = self.blocked_until.lock().expect("not poisoned");
                    *blocked = Some(blocked.map_or(until, |b| b.max(until)));
                    if until > deadline {
                        return Err(CloudflareError::TooManyRequests { retry_after });
                    }
                }
                answered => return answered,
            }
        }
    }

    /// `PUT /accounts/<id>/storage/kv/namespaces/<id>/bulk` with `[{key, value}]`, cut into
    /// requests of at most 10,000 pairs and `max_bulk_bytes`. Answers the keys Cloudflare did
    /// not write (its `result.unsuccessful_keys`: to be retried), although it answered
    /// `success: true`.
    pub async fn write_bulk(&self, pairs: &[(String, String)]) -> Result<Vec<String>, CloudflareError> {
        let s = &self.settings;
        let url = format!("{}/accounts/{}/storage/kv/namespaces/{}/bulk", s.api_base, s.account_id, s.kv_namespace_id);
        let mut unwritten = Vec::new();
        for body in bulk_bodies(pairs, s.max_bulk_bytes)? {
            let request = self
                .client
                .put(&url)
                .header("content-type", "application/json")
                .timeout(bulk_timeout(body.len()))
                .body(body);
            let result = self.call(request, false, self.default_deadline()).await?;
            unwritten.extend(unsuccessful_keys(&result));
        }
        Ok(unwritten)
    }

    /// `POST /zones/<id>/purge_cache` with `{"tags": [...]}`, a batch per call, each waiting at
    /// most `max_wait_ms` for the rate limits.
    pub async fn purge_tags(&self, hashes: &[KeyHash]) -> Result<(), CloudflareError> {
        self.purge_tags_until(hashes, self.default_deadline()).await
    }

    /// [`CloudflareApi::purge_tags`] with the caller's deadline: a call that the rate limits
    /// (or a 429) would start after it fails at once with [`CloudflareError::OverLimit`] or
    /// [`CloudflareError::TooManyRequests`].
    pub async fn purge_tags_until(&self, hashes: &[KeyHash], deadline: Instant) -> Result<(), CloudflareError> {
        let url = format!("{}/zones/{}/purge_cache", self.settings.api_base, self.settings.zone_id);
        for chunk in hashes.chunks(self.settings.max_tags_per_purge.max(1)) {
            let tags: Vec<String> = chunk.iter().map(KeyHash::to_hex).collect();
            self.call(self.client.post(&url).json(&json!({ "tags": tags })), true, deadline).await?;
        }
        Ok(())
    }

    /// Checks that `zone_id` is the zone serving `worker_url` (`GET /zones/<id>`): a purge sent
    /// to another zone answers success and purges nothing.
    pub async fn check_zone(&self) -> Result<(), CloudflareError> {
        let s = &self.settings;
        let request = self.client.get(format!("{}/zones/{}", s.api_base, s.zone_id));
        let zone = self
            .call(request, false, self.default_deadline())
            .await
            .map_err(|e| CloudflareError::ZoneUnread { zone_id: s.zone_id.clone(), source: Box::new(e) })?;
        let name = zone["name"].as_str().unwrap_or_default().to_ascii_lowercase();
        let host = url::Url::parse(&s.worker_url).ok().and_then(|u| u.host_str().map(str::to_ascii_lowercase));
        let host = host.unwrap_or_default();
        if name.is_empty() || !(host == name || host.ends_with(&format!(".{name}"))) {
            return Err(CloudflareError::WrongZone { zone_id: s.zone_id.clone(), zone: name, host });
        }
        if let Some(plan) =
            zone["plan"]["legacy_id"].as_str().filter(|p| !p.eq_ignore_ascii_case(&format!("{:?}", s.plan)))
        {
            tracing::warn!(zone_plan = plan, configured = ?s.plan, "[cloudflare] plan differs from the zone's plan: purges keep to the configured plan's limit");
        }
        Ok(())
    }
}

/// The bodies of a bulk write: JSON arrays of at most [`MAX_BULK`] pairs and `max_bytes` bytes
/// each, in order. A pair too large for any body is refused.
fn bulk_bodies(pairs: &[(String, String)], max_bytes: usize) -> Result<Vec<Vec<u8>>, CloudflareError> {
    let mut bodies = Vec::new();
    let (mut body, mut count) = (b"[".to_vec(), 0);
    for (key, value) in pairs {
        let pair = serde_json::to_vec(&json!({ "key": key, "value": value })).expect("strings encode");
        if pair.len() + 2 > max_bytes {
            return Err(CloudflareError::TooLarge { key: key.clone(), bytes: pair.len(), max_bytes });
        }
        if count == MAX_BULK || body.len() + pair.len() + 2 > max_bytes {
            body.push(b']');
            bodies.push(std::mem::replace(&mut body, b"[".to_vec()));
            count = 0;
        }
        if count > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&pair);
        count += 1;
    }
    if count > 0 {
        body.push(b']');
        bodies.push(body);
    }
    Ok(bodies)
}

/// How long a bulk write of `bytes` may take: large batches get longer than small ones.
fn bulk_timeout(bytes: usize) -> Duration {
    BULK_TIMEOUT_BASE + Duration::from_secs_f64(bytes as f64 / BULK_BYTES_PER_SECOND)
}

/// The keys a bulk write's `result` names as not written.
fn unsuccessful_keys(result: &serde_json::Value) -> Vec<String> {
    let keys = result["unsuccessful_keys"].as_array().map(Vec::as_slice).unwrap_or_default();
    keys.iter().filter_map(|k| k.as_str().map(str::to_owned)).collect()
}

/// Why a call in Cloudflare's REST format failed.
#[derive(Debug, thiserror::Error)]
pub enum CloudflareError {
    #[error("cannot connect")]
    Unreachable(#[source] reqwest::Error),
    /// An HTTP error, or an answer whose envelope does not say `"success": true`.
    #[error("answered {status}: {errors}")]
    Refused { status: StatusCode, errors: serde_json::Value },
    /// Cloudflare answered 429; it blocks calls for `retry_after`, past the caller's deadline.
    #[error(
        "answered 429 Too Many Requests: Cloudflare blocks API calls for {retry_after:?} (Retry-After), past this call's deadline; the outbox retries it"
    )]
    TooManyRequests { retry_after: Duration },
    /// A rate limit would let the call start only after the caller's deadline.
    #[error(
        "the {limit} lets the next call start in {wait:.1?}, past this call's deadline (max_wait_ms); the outbox retries it"
    )]
    OverLimit { limit: &'static str, wait: Duration },
    #[error("KV pair `{key}` takes {bytes} bytes, more than one bulk write may carry ({max_bytes})")]
    TooLarge { key: String, bytes: usize, max_bytes: usize },
    #[error(
        "[cloudflare] zone_id `{zone_id}` is the zone `{zone}`, which does not serve worker_url's host `{host}`: a purge there would answer success and purge nothing; set zone_id to the id of the zone serving `{host}`"
    )]
    WrongZone { zone_id: String, zone: String, host: String },
    #[error("cannot read [cloudflare] zone `{zone_id}` to check it serves worker_url (the token needs Zone Read)")]
    ZoneUnread { zone_id: String, source: Box<CloudflareError> },
}

/// Sends a request in Cloudflare's REST format (with the token, if any) and checks its answer:
/// a success status and `"success": true` in the envelope, or the envelope's `errors`; 429
/// with its `Retry-After`. Answers the envelope's `result`.
pub async fn send(
    request: reqwest::RequestBuilder,
    token: Option<&Secret>,
) -> Result<serde_json::Value, CloudflareError> {
    let request = match token {
        Some(token) => request.bearer_auth(token.expose()),
        None => request,
    };
    let response = request.send().await.map_err(CloudflareError::Unreachable)?;
    let status = response.status();
    if status == StatusCode::TOO_MANY_REQUESTS {
        let seconds = response.headers().get("retry-after").and_then(|v| v.to_str().ok()?.trim().parse().ok());
        return Err(CloudflareError::TooManyRequests {
            // At most an hour: a larger (or hostile) value must not overflow the clock.
            retry_after: seconds.map_or(DEFAULT_RETRY_AFTER, |s: u64| Duration::from_secs(s.min(3_600))),
        });
    }
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() || body["success"] != true {
        return Err(CloudflareError::Refused { status, errors: body["errors"].clone() });
    }
    Ok(body["result"].clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_bodies_keep_to_count_and_bytes() {
        let pairs: Vec<(String, String)> = (0..5).map(|i| (format!("k{i}"), "v".repeat(20))).collect();
        // Each pair is {"key":"kN","value":"vvvv…"}: 42 bytes.
        let bodies = bulk_bodies(&pairs, 100).unwrap();
        assert_eq!(bodies.len(), 3, "two pairs per 100 bytes");
        let mut keys = Vec::new();
        for body in &bodies {
            assert!(body.len() <= 100, "{}", body.len());
            let parsed: Vec<serde_json::Value> = serde_json::from_slice(body).unwrap();
            keys.extend(parsed.iter().map(|p| p["key"].as_str().unwrap().to_owned()));
        }
        assert_eq!(keys, ["k0", "k1", "k2", "k3", "k4"]);
        assert!(matches!(bulk_bodies(&pairs, 40), Err(CloudflareError::TooLarge { .. })));
        let many: Vec<(String, String)> = (0..MAX_BULK + 1).map(|i| (i.to_string(), String::new())).collect();
        assert_eq!(bulk_bodies(&many, MAX_BULK_BYTES).unwrap().len(), 2, "10,000 pairs at most");
    }

    #[test]
    fn large_bulk_writes_get_longer() {
        assert_eq!(bulk_timeout(1_000), Duration::from_millis(3_001));
        assert_eq!(bulk_timeout(MAX_BULK_BYTES), Duration::from_secs(103));
    }
}
