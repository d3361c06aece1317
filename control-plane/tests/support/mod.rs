//! What more than one of this crate's test binaries builds the same way.

// Each test binary that includes this module calls a part of it.
#![allow(dead_code)]

pub mod admin;

use std::sync::Arc;

use keyward_control_plane::cloudflare::{CloudflareApi, Plan, Settings};
use keyward_control_plane::config::Secret;

/// Settings for the production Cloudflare client against a stand-in at `base`: 30 tags per
/// purge call, an Enterprise zone's purge limit, the account limit at its default.
pub fn settings(base: &str) -> Settings {
    Settings {
        api_base: base.to_owned(),
        account_id: "acct".into(),
        zone_id: "zone".into(),
        kv_namespace_id: "ns".into(),
        worker_url: "https://keys.example.com".into(),
        api_token: Some(Secret::new("cf-token".into())),
        max_tags_per_purge: 30,
        api_limit: 1_000,
        api_limit_window_secs: 300,
        plan: Plan::Enterprise,
        max_wait_ms: 5_000,
        max_bulk_bytes: 100_000_000,
    }
}

/// The production Cloudflare client with these settings.
pub fn api(settings: Settings) -> Arc<CloudflareApi> {
    Arc::new(CloudflareApi::new(reqwest::Client::new(), settings))
}

/// The production Cloudflare client for a stand-in at `base`, allowed `api_limit` calls per
/// `window_secs`.
pub fn cloudflare_api(base: &str, api_limit: u32, window_secs: u64) -> Arc<CloudflareApi> {
    api(Settings { api_limit, api_limit_window_secs: window_secs, ..settings(base) })
}
