//! What more than one of this crate's test binaries builds the same way.

use std::sync::Arc;

use keyward_control_plane::cloudflare::{CloudflareApi, RateLimiter, Settings};
use keyward_control_plane::config::Secret;

/// The production Cloudflare client for a stand-in at `base`, with the rate limit the test
/// chooses and 30 tags per purge call.
pub fn cloudflare_api(base: &str, limiter: RateLimiter) -> Arc<CloudflareApi> {
    let settings = Settings {
        api_base: base.to_owned(),
        account_id: "acct".into(),
        zone_id: "zone".into(),
        kv_namespace_id: "ns".into(),
        worker_url: "https://keys.example.com".into(),
        api_token: Some(Secret::new("cf-token".into())),
        max_tags_per_purge: 30,
    };
    Arc::new(CloudflareApi::new(reqwest::Client::new(), settings, limiter))
}
