//! Reaching the edge: KV writes through a [`KvWriter`], the keys' authority, and signed purges.
//!
//! [`CloudflareKv`] speaks Cloudflare's KV REST format (`PUT .../storage/kv/namespaces/<id>/values/<key>`);
//! locally it points at the same format served by `wrangler dev`. [`DelayedKv`] models KV's
//! eventual consistency for tests. The authority and purges are the worker's signed internal
//! routes; a region acknowledges only by answering 200 to a signature it accepted.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::future::{BoxFuture, join_all};
use keyward_shared::internal::{
    self, AUTHORITY_PATH, AuthorityAck, AuthorityUpdate, NONCE_HEADER, PURGE_PATH, PurgeAck, PurgeRequest,
    SIGNATURE_HEADER, TIMESTAMP_HEADER,
};
use keyward_shared::{KeyHash, KeyRecord, RootKeyRecord};
use serde::Serialize;

use crate::cloudflare::{ACCOUNT_LIMIT, BulkKv, CloudflareApi, RateLimiter};
use crate::config::{Config, Secret};
use crate::time::now_ms;

/// Writes values into one Workers KV namespace.
pub trait KvWriter: Send + Sync {
    fn put<'a>(&'a self, key: &'a str, value: String) -> BoxFuture<'a, anyhow::Result<()>>;
}

/// A KV namespace reached through Cloudflare's REST API (or wrangler dev's copy of it).
pub struct CloudflareKv {
    client: reqwest::Client,
    base: String,
    namespace_id: String,
    token: Option<Secret>,
}

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
        format!("{}/storage/kv/namespaces/{}/values/{}", self.base, self.namespace_id, percent_encode(key))
    }
}

/// Percent-encodes everything but unreserved characters, as Cloudflare wants KV key names.
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl KvWriter for CloudflareKv {
    fn put<'a>(&'a self, key: &'a str, value: String) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let mut request = self.client.put(self.value_url(key)).body(value);
            if let Some(token) = &self.token {
                request = request.bearer_auth(token.expose());
            }
            let response = request.send().await.context("KV write failed to connect")?;
            let status = response.status();
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            if !status.is_success() || body["success"] != true {
                bail!("KV write answered {status}: {}", body["errors"]);
            }
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
    fn put<'a>(&'a self, key: &'a str, value: String) -> BoxFuture<'a, anyhow::Result<()>> {
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

/// How a region's copies are purged.
pub enum PurgeVia {
    /// The region's own signed `/internal/purge` route at its URL (local regions), carrying the
    /// new record: the acknowledgement means the region answers from it.
    Signed,
    /// Cloudflare's purge-by-tag of Cache API entries (production): the acknowledgement means
    /// Cloudflare accepted the purge; isolate memory is bounded by `max_staleness_ms` alone.
    Tags(Arc<CloudflareApi>),
}

/// One region as the control plane reaches it.
pub struct Region {
    pub name: String,
    pub url: String,
    pub kv: Arc<dyn KvWriter>,
    pub purge: PurgeVia,
}

impl Region {
    /// Whether this region's purge carries the record (so it need not wait for the authority).
    pub fn purge_carries_record(&self) -> bool {
        matches!(self.purge, PurgeVia::Signed)
    }

    /// What this region's acknowledgement means, for answers and docs.
    pub fn ack_means(&self) -> &'static str {
        match self.purge {
            PurgeVia::Signed => {
                "the region holds the new record in memory, dropped its Cache API copy, and now rejects the key"
            }
            PurgeVia::Tags(_) => {
                "Cloudflare accepted the purge-by-tag of Cache API copies; copies in isolate memory end within max_staleness_ms"
            }
        }
    }
}

/// Where a change's KV write in one region stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvState {
    Written,
    /// Not attempted yet: a tightening change's KV writes follow its answer.
    Pending,
    /// Attempted and failed; retried with backoff.
    Failed,
    /// Left to a newer change of the same key, which carries the newer record.
    Superseded,
}

/// What happened in one region when a change was pushed.
#[derive(Debug, Clone, Serialize)]
pub struct RegionReport {
    pub name: String,
    pub kv: KvState,
    /// Whether the region accepted the purge; `None` when no purge was sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acknowledged: Option<bool>,
    /// From the start of this delivery to this region's purge acknowledgement (or failure);
    /// without a purge, to its KV write.
    pub latency_ms: f64,
    /// When the region began answering from the new record, by its clock (Unix ms); only
    /// regions purged through their signed route report it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied_at_ms: Option<u64>,
    /// What `acknowledged` means for this region.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_means: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The client for every call to the edge and Cloudflare: none may wait without bound, whether
/// the other side refuses connections or accepts and never answers.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

fn bounded_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT).timeout(CALL_TIMEOUT).build()?)
}

/// Every configured region, the authority, and how to reach them.
pub struct Edge {
    pub regions: Vec<Region>,
    authority_url: Option<String>,
    client: reqwest::Client,
    purge_secret: Secret,
}

impl Edge {
    pub fn from_config(config: &Config) -> anyhow::Result<Edge> {
        let client = bounded_client()?;
        let regions = config
            .regions
            .iter()
            .map(|r| {
                let kv: Arc<dyn KvWriter> =
                    Arc::new(CloudflareKv::new(client.clone(), &r.kv_url, &r.kv_namespace_id, r.kv_token.clone()));
                let kv = if r.kv_delay_ms > 0 {
                    Arc::new(DelayedKv::new(kv, Duration::from_millis(r.kv_delay_ms)))
                } else {
                    kv
                };
                Region {
                    name: r.name.clone(),
                    url: r.url.trim_end_matches('/').to_owned(),
                    kv,
                    purge: PurgeVia::Signed,
                }
            })
            .collect::<Vec<_>>();
        let mut regions = regions;
        if let Some(settings) = &config.cloudflare {
            let (limit, period) = ACCOUNT_LIMIT;
            let api = Arc::new(CloudflareApi::new(client.clone(), settings.clone(), RateLimiter::new(limit, period)));
            regions.push(Region {
                name: "cloudflare".into(),
                url: settings.worker_url.trim_end_matches('/').to_owned(),
                kv: Arc::new(BulkKv::new(api.clone())),
                purge: PurgeVia::Tags(api),
            });
        }
        let authority_url = config.authority_url.as_ref().map(|u| u.trim_end_matches('/').to_owned());
        Ok(Edge { regions, authority_url, client, purge_secret: config.purge_secret.clone().unwrap_or_default() })
    }

    pub fn new(regions: Vec<Region>, authority_url: Option<String>, purge_secret: Secret) -> Edge {
        let client = bounded_client().expect("a TLS backend");
        Edge { regions, authority_url, client, purge_secret }
    }

    pub fn has_authority(&self) -> bool {
        self.authority_url.is_some()
    }

    /// Writes `value` under `kv_key` in every region's KV (root keys: no authority, no purge).
    pub async fn write_everywhere(&self, kv_key: &str, value: &str) -> Vec<RegionReport> {
        join_all(self.regions.iter().map(|region| async move {
            let started = std::time::Instant::now();
            let result = region.kv.put(kv_key, value.to_owned()).await;
            RegionReport {
                name: region.name.clone(),
                kv: if result.is_ok() { KvState::Written } else { KvState::Failed },
                acknowledged: None,
                applied_at_ms: None,
                latency_ms: started.elapsed().as_secs_f64() * 1e3,
                ack_means: None,
                error: result.err().map(|e| format!("{e:#}")),
            }
        }))
        .await
    }

    /// Sets keys' and root keys' records at their authority. Without one configured, there is
    /// nothing to do.
    pub async fn update_authority(&self, records: &[KeyRecord], root_keys: &[RootKeyRecord]) -> anyhow::Result<()> {
        let Some(url) = &self.authority_url else { return Ok(()) };
        let body = serde_json::to_vec(&AuthorityUpdate { records: records.to_vec(), root_keys: root_keys.to_vec() })?;
        let response = self.signed_post(url, AUTHORITY_PATH, body).await.context("authority update")?;
        let _: AuthorityAck = response.json().await.context("authority answered no acknowledgement")?;
        Ok(())
    }

    /// Purges one region's copies of these keys: a signed region replaces them with the records
    /// at once; purge-by-tag drops Cache API copies, so the next read refills from KV and the
    /// authority.
    /// Answers when a signed region began answering from the records, by its clock.
    pub async fn purge(&self, region: &Region, records: &[KeyRecord]) -> anyhow::Result<Option<u64>> {
        match &region.purge {
            PurgeVia::Signed => {
                let purge = PurgeRequest { region: region.name.clone(), records: records.to_vec() };
                let body = serde_json::to_vec(&purge)?;
                let response = self.signed_post(&region.url, PURGE_PATH, body).await.context("purge")?;
                let ack: PurgeAck = response.json().await.context("the region answered no acknowledgement")?;
                Ok(Some(ack.applied_at_ms))
            }
            PurgeVia::Tags(api) => {
                let hashes: Vec<KeyHash> = records.iter().map(|r| r.hash).collect();
                api.purge_tags(&hashes).await.context("purge by tag")?;
                Ok(None)
            }
        }
    }

    async fn signed_post(&self, base: &str, path: &str, body: Vec<u8>) -> anyhow::Result<reqwest::Response> {
        let timestamp = now_ms();
        let nonce = uuid::Uuid::new_v4().to_string();
        let signature = internal::sign(self.purge_secret.expose().as_bytes(), "POST", path, timestamp, &nonce, &body);
        let response = self
            .client
            .post(format!("{base}{path}"))
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(NONCE_HEADER, nonce)
            .header(SIGNATURE_HEADER, signature)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .with_context(|| format!("could not reach {base}"))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            bail!("refused with {status}: {}", text.chars().take(200).collect::<String>());
        }
        Ok(response)
    }

    /// Whether a region's worker answers its health route within a second.
    pub async fn healthy(&self, region: &Region) -> bool {
        let probe = self.client.get(format!("{}/health", region.url)).timeout(Duration::from_secs(1)).send().await;
        probe.is_ok_and(|r| r.status().is_success())
    }
}
