//! The control plane's client of the edge: each region's KV writer and purge, the keys'
//! authority, and the signed requests to the workers' internal routes.
//!
//! The authority and signed purges are the worker's signed internal routes; a region
//! acknowledges only by answering 200 to a signature it accepted. Every call has a deadline,
//! whether the other side refuses connections or accepts and never answers.

use std::sync::Arc;
use std::time::Duration;

use keyward_shared::credits::SettleRequest;
use keyward_shared::identity::IdentityRecord;
use keyward_shared::internal::{
    self, AUTHORITY_PATH, AuthorityAck, AuthorityUpdate, NONCE_HEADER, PURGE_PATH, PurgeAck, PurgeRequest, SETTLE_PATH,
    SIGNATURE_HEADER, SettleAnswer, SettleOrder, TIMESTAMP_HEADER,
};
use keyward_shared::policy::ApiRecord;
use keyward_shared::ratelimit::{Cap, LimitAsk};
use keyward_shared::{KeyHash, KeyRecord, RootKeyRecord};

/// What one purge replaces at a region: keys' records, APIs' and identities'.
#[derive(Clone, Copy)]
pub struct Purged<'a> {
    pub keys: &'a [KeyRecord],
    pub apis: &'a [ApiRecord],
    pub identities: &'a [IdentityRecord],
}

/// What one authority update sets: keys' records, root keys', APIs' and identities'.
#[derive(Clone, Copy)]
pub struct AuthorityRecords<'a> {
    pub keys: &'a [KeyRecord],
    pub root_keys: &'a [RootKeyRecord],
    pub apis: &'a [ApiRecord],
    pub identities: &'a [IdentityRecord],
}
use reqwest::StatusCode;

use crate::cloudflare::{CloudflareApi, CloudflareError};
use crate::config::{Config, RegionConfig, Secret};
use crate::delivery::{BatchError, TagBatcher};
use crate::kv::{BulkKv, CloudflareKv, DelayedKv, KvWriter};
use crate::store::Reach;
use crate::time::now_ms;

/// How a region's copies are purged.
pub enum PurgeVia {
    /// The region's own signed `/internal/purge` route at its URL (local regions), carrying the
    /// new record: the acknowledgement means the region answers from it.
    Signed,
    /// Cloudflare's purge-by-tag of Cache API entries (production), batched across keys with a
    /// fair share for each workspace: the acknowledgement means Cloudflare accepted the purge;
    /// isolate memory, which no purge reaches, re-reads the Cache API after the worker's
    /// memory trust (`MEMORY_TRUST_MS`, with `PURGE_MODE` `tag-only`), and `max_staleness_ms`
    /// bounds it whatever happens.
    Tags(Arc<TagBatcher>),
}

/// One region as the control plane reaches it (its settings are a [`RegionConfig`]).
pub struct EdgeRegion {
    pub name: String,
    pub url: String,
    pub kv: Arc<dyn KvWriter>,
    pub purge: PurgeVia,
}

impl EdgeRegion {
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
                "Cloudflare accepted the purge-by-tag of Cache API copies; copies in isolate memory re-read the Cache API within the worker's MEMORY_TRUST_MS (PURGE_MODE tag-only), and end within max_staleness_ms whatever happens"
            }
        }
    }

    fn from_config(config: &RegionConfig, client: &reqwest::Client) -> EdgeRegion {
        let kv: Arc<dyn KvWriter> = Arc::new(CloudflareKv::new(
            client.clone(),
            &config.kv_url,
            &config.kv_namespace_id,
            config.kv_token.clone(),
        ));
        let kv = if config.kv_delay_ms > 0 {
            Arc::new(DelayedKv::new(kv, Duration::from_millis(config.kv_delay_ms)))
        } else {
            kv
        };
        EdgeRegion {
            name: config.name.clone(),
            url: config.url.trim_end_matches('/').to_owned(),
            kv,
            purge: PurgeVia::Signed,
        }
    }
}

/// Why a call to a worker failed.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("could not reach {url}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("refused with {status}: {body}")]
    Refused { status: StatusCode, body: String },
    #[error("{0} answered no acknowledgement")]
    NoAcknowledgement(&'static str, #[source] reqwest::Error),
    #[error("cannot encode the request")]
    Encode(#[from] serde_json::Error),
    #[error("Cloudflare's purge by tag")]
    Tags(#[source] BatchError),
}

/// The client for every call to the edge and Cloudflare: none may wait without bound, whether
/// the other side refuses connections or accepts and never answers.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

fn bounded_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT).timeout(CALL_TIMEOUT).build()
}

/// Every configured region, the authority, and how to reach them.
pub struct EdgeClient {
    pub regions: Vec<EdgeRegion>,
    authority_url: Option<String>,
    client: reqwest::Client,
    purge_secret: Secret,
    /// Cloudflare's API, when configured: its zone is checked at start.
    cloudflare: Option<Arc<CloudflareApi>>,
}

impl EdgeClient {
    pub fn from_config(config: &Config) -> anyhow::Result<EdgeClient> {
        let client = bounded_client()?;
        let mut regions: Vec<EdgeRegion> = config.regions.iter().map(|r| EdgeRegion::from_config(r, &client)).collect();
        let mut cloudflare = None;
        if let Some(settings) = &config.cloudflare {
            let api = Arc::new(CloudflareApi::new(client.clone(), settings.clone()));
            regions.push(EdgeRegion {
                name: "cloudflare".into(),
                url: settings.worker_url.trim_end_matches('/').to_owned(),
                kv: Arc::new(BulkKv::new(api.clone())),
                purge: PurgeVia::Tags(Arc::new(TagBatcher::new(api.clone()))),
            });
            cloudflare = Some(api);
        }
        let authority_url = config.authority_url.as_ref().map(|u| u.trim_end_matches('/').to_owned());
        let purge_secret = config.purge_secret.clone().unwrap_or_default();
        Ok(EdgeClient { regions, authority_url, client, purge_secret, cloudflare })
    }

    /// The secret internal requests are signed with, both ways.
    pub fn purge_secret(&self) -> &Secret {
        &self.purge_secret
    }

    pub fn new(regions: Vec<EdgeRegion>, authority_url: Option<String>, purge_secret: Secret) -> EdgeClient {
        let client = bounded_client().expect("a TLS backend");
        EdgeClient { regions, authority_url, client, purge_secret, cloudflare: None }
    }

    /// Checks at start what would otherwise fail silently: that Cloudflare's zone serves the
    /// worker (a purge to another zone answers success and purges nothing).
    pub async fn check(&self) -> Result<(), CloudflareError> {
        match &self.cloudflare {
            Some(api) => api.check_zone().await,
            None => Ok(()),
        }
    }

    pub fn has_authority(&self) -> bool {
        self.authority_url.is_some()
    }

    /// What a change can be delivered to: the authority, if configured, and every region.
    pub fn reach(&self) -> Reach {
        Reach { authority: self.has_authority(), regions: self.regions.iter().map(|r| r.name.clone()).collect() }
    }

    /// Sets keys' and root keys' records at their authority. Without one configured, there is
    /// nothing to do.
    pub async fn update_authority(&self, records: AuthorityRecords<'_>) -> Result<(), EdgeError> {
        let Some(url) = &self.authority_url else { return Ok(()) };
        let apis = records.apis.iter().map(serde_json::to_string).collect::<Result<_, _>>()?;
        let identities = records.identities.iter().map(serde_json::to_string).collect::<Result<_, _>>()?;
        let update =
            AuthorityUpdate { records: records.keys.to_vec(), root_keys: records.root_keys.to_vec(), apis, identities };
        let body = serde_json::to_vec(&update)?;
        let response = self.signed_post(url, AUTHORITY_PATH, body).await?;
        let _: AuthorityAck = response.json().await.map_err(|e| EdgeError::NoAcknowledgement("the authority", e))?;
        Ok(())
    }

    /// Settles one verification of the key with this hash at its authority, with the exact rate
    /// limits `ratelimits` decided in the same step (the origin's own verify route spends through
    /// the same ledger and schedules as the edge). `None` without an authority.
    pub async fn settle(
        &self,
        hash: KeyHash,
        settle: SettleRequest,
        ratelimits: Vec<LimitAsk>,
        cap: Cap,
    ) -> Result<Option<SettleAnswer>, EdgeError> {
        let Some(url) = &self.authority_url else { return Ok(None) };
        let order = SettleOrder {
            hash,
            cost: settle.cost,
            idempotency_key: settle.idempotency_key,
            ratelimits,
            version: settle.version,
            api_version: cap.api_version,
            limit_percent: cap.percent,
        };
        let body = serde_json::to_vec(&order)?;
        let response = self.signed_post(url, SETTLE_PATH, body).await?;
        let settlement = response.json().await.map_err(|e| EdgeError::NoAcknowledgement("the authority", e))?;
        Ok(Some(settlement))
    }

    /// Purges one region's copies of these keys: a signed region replaces them with the records
    /// at once; purge-by-tag drops Cache API copies, so the next read refills from KV and the
    /// authority.
    /// Answers when a signed region began answering from the records, by its clock.
    pub async fn purge(&self, region: &EdgeRegion, purged: Purged<'_>) -> Result<Option<u64>, EdgeError> {
        match &region.purge {
            PurgeVia::Signed => {
                let apis = purged.apis.iter().map(serde_json::to_string).collect::<Result<_, _>>()?;
                let identities = purged.identities.iter().map(serde_json::to_string).collect::<Result<_, _>>()?;
                let purge =
                    PurgeRequest { region: region.name.clone(), records: purged.keys.to_vec(), apis, identities };
                let body = serde_json::to_vec(&purge)?;
                let response = self.signed_post(&region.url, PURGE_PATH, body).await?;
                let ack: PurgeAck = response.json().await.map_err(|e| EdgeError::NoAcknowledgement("the region", e))?;
                Ok(Some(ack.applied_at_ms))
            }
            PurgeVia::Tags(batcher) => {
                for record in purged.keys {
                    batcher.purge(&record.workspace_id, &[record.hash]).await.map_err(EdgeError::Tags)?;
                }
                for api in purged.apis {
                    batcher.purge(&api.workspace_id, &[ApiRecord::hash_of(&api.id)]).await.map_err(EdgeError::Tags)?;
                }
                for identity in purged.identities {
                    let hash = IdentityRecord::hash_of(&identity.id);
                    batcher.purge(&identity.workspace_id, &[hash]).await.map_err(EdgeError::Tags)?;
                }
                Ok(None)
            }
        }
    }

    async fn signed_post(&self, base: &str, path: &str, body: Vec<u8>) -> Result<reqwest::Response, EdgeError> {
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
            .map_err(|source| EdgeError::Unreachable { url: base.to_owned(), source })?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(EdgeError::Refused { status, body: text.chars().take(200).collect() });
        }
        Ok(response)
    }

    /// Whether a region's worker answers its health route within a second.
    pub async fn healthy(&self, region: &EdgeRegion) -> bool {
        let probe = self.client.get(format!("{}/health", region.url)).timeout(Duration::from_secs(1)).send().await;
        probe.is_ok_and(|r| r.status().is_success())
    }
}
