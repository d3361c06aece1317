//! Pushing changes to the edge: KV writes through a [`KvWriter`], and signed purge events.
//!
//! [`CloudflareKv`] speaks Cloudflare's KV REST format (`PUT .../storage/kv/namespaces/<id>/values/<key>`);
//! locally it points at the same format served by `wrangler dev`. Purges go to each region's
//! signed `/internal/purge` route; a region acknowledges only by answering 200 to a signature it
//! accepted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::future::{BoxFuture, join_all};
use keyward_shared::KeyHash;
use keyward_shared::internal::{self, NONCE_HEADER, PURGE_PATH, PurgeRequest, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use serde::Serialize;

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
        let key: String = key
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        format!("{}/storage/kv/namespaces/{}/values/{key}", self.base, self.namespace_id)
    }
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

/// One region's view as the control plane reaches it.
pub struct Region {
    pub name: String,
    pub url: String,
    pub kv: Arc<dyn KvWriter>,
}

/// What happened in one region when a change was pushed.
#[derive(Debug, Clone, Serialize)]
pub struct RegionReport {
    pub name: String,
    pub kv_written: bool,
    /// Whether the region accepted the purge; `None` when no purge was sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acknowledged: Option<bool>,
    /// From the start of this region's push to its acknowledgement (or failure).
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Every configured region, and how to reach each.
pub struct Edge {
    regions: Vec<Region>,
    client: reqwest::Client,
    purge_secret: Secret,
}

impl Edge {
    pub fn from_config(config: &Config) -> anyhow::Result<Edge> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(3))
            .build()?;
        let regions = config
            .regions
            .iter()
            .map(|r| Region {
                name: r.name.clone(),
                url: r.url.trim_end_matches('/').to_owned(),
                kv: Arc::new(CloudflareKv::new(client.clone(), &r.kv_url, &r.kv_namespace_id, r.kv_token.clone())),
            })
            .collect();
        Ok(Edge { regions, client, purge_secret: config.purge_secret.clone().unwrap_or_default() })
    }

    pub fn new(regions: Vec<Region>, purge_secret: Secret) -> Edge {
        Edge { regions, client: reqwest::Client::new(), purge_secret }
    }

    /// Writes `value` under `kv_key` in every region and, when `purge` names hashes, purges them
    /// there once the write is done. Regions are pushed concurrently.
    pub async fn push(&self, kv_key: &str, value: &str, purge: &[KeyHash]) -> Vec<RegionReport> {
        join_all(self.regions.iter().map(|region| self.push_region(region, kv_key, value, purge))).await
    }

    async fn push_region(&self, region: &Region, kv_key: &str, value: &str, purge: &[KeyHash]) -> RegionReport {
        let started = Instant::now();
        let mut report = RegionReport {
            name: region.name.clone(),
            kv_written: false,
            acknowledged: None,
            latency_ms: 0.0,
            error: None,
        };
        match region.kv.put(kv_key, value.to_owned()).await {
            Ok(()) => report.kv_written = true,
            Err(e) => report.error = Some(format!("{e:#}")),
        }
        if !purge.is_empty() {
            match self.send_purge(region, purge).await {
                Ok(()) => report.acknowledged = Some(true),
                Err(e) => {
                    report.acknowledged = Some(false);
                    report.error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
        report.latency_ms = started.elapsed().as_secs_f64() * 1e3;
        if report.error.is_some() {
            tracing::warn!(region = %report.name, error = ?report.error, "edge push incomplete");
        }
        report
    }

    async fn send_purge(&self, region: &Region, hashes: &[KeyHash]) -> anyhow::Result<()> {
        let body = serde_json::to_vec(&PurgeRequest { hashes: hashes.to_vec() })?;
        let timestamp = now_ms();
        let nonce = uuid::Uuid::new_v4().to_string();
        let signature =
            internal::sign(self.purge_secret.expose().as_bytes(), "POST", PURGE_PATH, timestamp, &nonce, &body);
        let response = self
            .client
            .post(format!("{}{PURGE_PATH}", region.url))
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(NONCE_HEADER, nonce)
            .header(SIGNATURE_HEADER, signature)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .context("purge could not reach the region")?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            bail!("purge refused with {status}: {}", text.chars().take(200).collect::<String>());
        }
        Ok(())
    }
}
