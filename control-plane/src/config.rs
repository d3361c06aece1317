//! `keyward.toml` and its environment overrides.
//!
//! Every setting has a default good for a laptop; `KEYWARD_CONFIG` names the file (default
//! `keyward.toml` in the working directory, if present) and `KEYWARD_LISTEN`, `KEYWARD_DATABASE`,
//! `KEYWARD_PURGE_SECRET` and `KEYWARD_KV_TOKEN` override what it says.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

/// A secret string whose `Debug` never shows it.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: String) -> Secret {
        Secret(text)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// One `[[regions]]` entry: where a region's worker answers, and where its KV namespace is
/// written (the client built from it is `edge_client::EdgeRegion`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    pub name: String,
    /// The worker's base URL; purges go to `<url>/internal/purge`.
    pub url: String,
    /// Base of Cloudflare's KV REST API up to `/storage/kv/...`: for Cloudflare,
    /// `https://api.cloudflare.com/client/v4/accounts/<account id>`; locally,
    /// `http://127.0.0.1:8787/cdn-cgi/explorer/api`.
    pub kv_url: String,
    pub kv_namespace_id: String,
    /// API token for Cloudflare (none locally). `KEYWARD_KV_TOKEN` overrides it.
    #[serde(default)]
    pub kv_token: Option<Secret>,
    /// Local model of KV's eventual consistency: each write reaches this region's KV only after
    /// this many milliseconds (0 by default; Cloudflare documents up to 60 s).
    #[serde(default)]
    pub kv_delay_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_database")]
    pub database: PathBuf,
    /// Where `/metrics` answers, apart from the admin API: `host:port`, or `off`.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: String,
    /// Shared with every region's worker (as its `PURGE_SECRET`) to sign internal requests.
    #[serde(default)]
    pub purge_secret: Option<Secret>,
    /// Keys the audit log's chain (`KEYWARD_AUDIT_SECRET`); without it, `purge_secret` does.
    /// Kept outside the database, so that someone with the database alone cannot rewrite the log.
    #[serde(default)]
    pub audit_secret: Option<Secret>,
    /// Base URL of a worker that hosts the KeyState Durable Objects (the "home" process locally,
    /// the deployed worker in production); updates go to its signed `/internal/authority` route.
    #[serde(default)]
    pub authority_url: Option<String>,
    #[serde(default)]
    pub regions: Vec<RegionConfig>,
    /// The production path: one Cloudflare account's KV and zone (see `cloudflare.rs`).
    #[serde(default)]
    pub cloudflare: Option<crate::cloudflare::Settings>,
    /// The outbox's ages: pruning, stuck and dead-lettered deliveries (see `delivery/upkeep.rs`).
    #[serde(default)]
    pub outbox: crate::delivery::OutboxSettings,
    /// The limits on open event streams (see `http/events.rs`).
    #[serde(default)]
    pub events: crate::http::EventSettings,
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:8080".parse().expect("valid address")
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9090".into()
}

fn default_database() -> PathBuf {
    PathBuf::from("keyward.sqlite")
}

impl Config {
    /// Reads the file (if any) and applies the environment.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let from_env = std::env::var_os("KEYWARD_CONFIG").map(PathBuf::from);
        let explicit = path.map(Path::to_path_buf).or(from_env);
        let path = explicit.clone().unwrap_or_else(|| PathBuf::from("keyward.toml"));
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => String::new(),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read config file {}", path.display()));
            }
        };
        let config = Config::parse(&text, |name| std::env::var(name).ok())
            .with_context(|| format!("in config file {}", path.display()))?;
        Ok(config)
    }

    /// Parses a config text, then applies overrides from `env`.
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Config> {
        let mut config: Config = toml::from_str(text)?;
        if let Some(listen) = env("KEYWARD_LISTEN") {
            config.listen = listen.parse().with_context(|| format!("KEYWARD_LISTEN={listen} is not host:port"))?;
        }
        if let Some(metrics) = env("KEYWARD_METRICS_LISTEN") {
            config.metrics_listen = metrics;
        }
        if let Some(database) = env("KEYWARD_DATABASE") {
            config.database = PathBuf::from(database);
        }
        if let Some(secret) = env("KEYWARD_AUDIT_SECRET") {
            config.audit_secret = Some(Secret(secret));
        }
        if let Some(secret) = env("KEYWARD_PURGE_SECRET") {
            config.purge_secret = Some(Secret(secret));
        }
        if let (Some(token), Some(cloudflare)) = (env("KEYWARD_CF_API_TOKEN"), config.cloudflare.as_mut()) {
            cloudflare.api_token = Some(Secret(token));
        }
        if let Some(token) = env("KEYWARD_KV_TOKEN") {
            for region in &mut config.regions {
                region.kv_token = Some(Secret(token.clone()));
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// The audit chain's key: `audit_secret`, else `purge_secret`; `None` with neither.
    pub fn audit_key(&self) -> Option<crate::store::audit::AuditKey> {
        let secret = self.audit_secret.as_ref().or(self.purge_secret.as_ref())?;
        Some(crate::store::audit::AuditKey::new(secret.0.as_bytes()))
    }

    /// The metrics address, `None` when `metrics_listen` is `off`.
    pub fn metrics_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        match self.metrics_listen.as_str() {
            "off" => Ok(None),
            text => {
                text.parse().map(Some).with_context(|| format!("metrics_listen `{text}` is not host:port or `off`"))
            }
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.metrics_addr()?;
        self.events.validate()?;
        self.outbox.validate()?;
        if (self.cloudflare.is_some() || !self.regions.is_empty()) && self.authority_url.is_none() {
            bail!(
                "[cloudflare] or [[regions]] is configured without authority_url: set authority_url to the URL of the \
                 worker that hosts the KeyState Durable Objects (the deployed worker in production, the home process \
                 locally); without it the edge trusts KV on every miss"
            );
        }
        if let Some(cf) = &self.cloudflare {
            if cf.api_token.is_none() {
                bail!("[cloudflare] needs api_token (or KEYWARD_CF_API_TOKEN)");
            }
            check_url("[cloudflare] api_base", &cf.api_base)?;
            check_url("[cloudflare] worker_url", &cf.worker_url)?;
        }
        if !self.regions.is_empty() && self.purge_secret.as_ref().is_none_or(|s| s.0.len() < 32) {
            bail!(
                "purge_secret (or KEYWARD_PURGE_SECRET) must be set, at least 32 characters, when regions are configured"
            );
        }
        if let Some(url) = &self.authority_url {
            check_url("authority_url", url)?;
        }
        if self.authority_url.is_some() && self.purge_secret.as_ref().is_none_or(|s| s.0.len() < 32) {
            bail!("purge_secret must be set, at least 32 characters, when authority_url is configured");
        }
        for (i, region) in self.regions.iter().enumerate() {
            if self.regions[..i].iter().any(|r| r.name == region.name) {
                bail!("region name `{}` appears twice", region.name);
            }
            for url in [&region.url, &region.kv_url] {
                check_url(&format!("region `{}`", region.name), url)?;
            }
        }
        Ok(())
    }
}

/// A URL the control plane sends signed requests or tokens to: `https://`, or plain `http://`
/// only to this machine (local regions), since a signed purge or a KV token on an open network
/// can be read and held back.
fn check_url(what: &str, url: &str) -> anyhow::Result<()> {
    // Parsed as the HTTP client will parse it, so that what is checked is where it connects.
    let parsed = url::Url::parse(url).map_err(|e| anyhow::anyhow!("{what}: `{url}` is not a URL: {e}"))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        bail!("{what}: `{url}` carries a user name or password; put credentials in the config's token fields");
    }
    let loopback = match parsed.host() {
        Some(url::Host::Domain(name)) => name == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => {
            bail!("{what}: `{url}` is plain http to another machine; use https:// (plain http is for 127.0.0.1 only)")
        }
        _ => bail!("{what}: `{url}` is not an http(s) URL"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn region_toml() -> String {
        format!(
            "purge_secret = \"{SECRET}\"\nauthority_url = \"http://127.0.0.1:8786\"\n[[regions]]\nname = \"local\"\nurl = \"http://127.0.0.1:8787\"\n\
             kv_url = \"http://127.0.0.1:8787/cdn-cgi/explorer/api\"\nkv_namespace_id = \"keyward-local\"\n"
        )
    }

    #[test]
    fn defaults_and_overrides() {
        let config = Config::parse("", |_| None).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.database, PathBuf::from("keyward.sqlite"));
        let env = |name: &str| match name {
            "KEYWARD_LISTEN" => Some("127.0.0.1:9999".to_owned()),
            "KEYWARD_DATABASE" => Some("/tmp/x.sqlite".to_owned()),
            "KEYWARD_KV_TOKEN" => Some("tok".to_owned()),
            _ => None,
        };
        let config = Config::parse(&region_toml(), env).unwrap();
        assert_eq!(config.listen.port(), 9999);
        assert_eq!(config.database, PathBuf::from("/tmp/x.sqlite"));
        assert_eq!(config.regions[0].kv_token.as_ref().unwrap().expose(), "tok");
    }

    #[test]
    fn rejects_what_cannot_work() {
        let no_secret = region_toml().replace(&format!("purge_secret = \"{SECRET}\"\n"), "");
        assert!(Config::parse(&no_secret, |_| None).is_err());
        assert!(Config::parse("listen = \"nope\"", |_| None).is_err());
        assert!(Config::parse("colour = 1", |_| None).is_err());
        let twice = format!("{}{}", region_toml(), region_toml().lines().skip(2).collect::<Vec<_>>().join("\n"));
        let err = Config::parse(&twice, |_| None).unwrap_err();
        assert!(format!("{err:#}").contains("appears twice"), "{err:#}");
    }

    /// Without an authority the edge would trust KV on every miss: a configuration that sends
    /// changes to the edge must name one.
    #[test]
    fn regions_or_cloudflare_need_an_authority() {
        let cloudflare = "[cloudflare]\naccount_id = \"a\"\nzone_id = \"z\"\nkv_namespace_id = \"n\"\n\
                          worker_url = \"https://keys.example.com\"\napi_token = \"t\"\n";
        let without = region_toml().replace("authority_url = \"http://127.0.0.1:8786\"\n", "");
        for text in [without, format!("purge_secret = \"{SECRET}\"\n{cloudflare}")] {
            let err = Config::parse(&text, |_| None).unwrap_err();
            assert!(format!("{err:#}").contains("set authority_url"), "{err:#}");
        }
        let with = format!("purge_secret = \"{SECRET}\"\nauthority_url = \"https://keys.example.com\"\n{cloudflare}");
        Config::parse(&with, |_| None).unwrap();
    }

    #[test]
    fn plain_http_only_to_this_machine() {
        for (url, ok) in [
            ("https://edge.example.com", true),
            ("http://127.0.0.1:8787", true),
            ("http://127.9.9.9", true),
            ("http://localhost:8787/x", true),
            ("http://[::1]:8787", true),
            ("http://edge.example.com", false),
            ("http://10.0.0.5:8787", false),
            ("http://127.0.0.1.evil.com", false),
            ("http://user@evil.com", false),
            ("http://evil.com\\@127.0.0.1:8787", false),
            ("http://127.0.0.1:8787@evil.com", false),
            ("https://user:pw@edge.example.com", false),
            ("ftp://127.0.0.1", false),
        ] {
            let text = format!("purge_secret = \"{SECRET}\"\nauthority_url = \"{url}\"\n");
            assert_eq!(Config::parse(&text, |_| None).is_ok(), ok, "{url}");
        }
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let env = |name: &str| (name == "KEYWARD_KV_TOKEN").then(|| "kvtoken-plaintext".to_owned());
        let config = Config::parse(&region_toml(), env).unwrap();
        assert!(config.regions[0].kv_token.is_some(), "the token was read");
        let shown = format!("{config:?}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(!shown.contains("kvtoken-plaintext"), "{shown}");
    }
}
