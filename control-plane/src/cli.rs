//! The `keyward` command line. `serve` runs the control plane; every other subcommand is an
//! HTTP client of the admin API, so a change made here takes the same path as one made with curl.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::{Map, Value, json};

use crate::config::Config;

#[derive(Parser)]
#[command(name = "keyward", version, about = "Keyward: API keys that stop working everywhere, at once, when revoked.")]
pub struct Cli {
    /// The control plane's base URL.
    #[arg(long, global = true, env = "KEYWARD_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// A root key (prefer the environment variable: arguments show in `ps`).
    #[arg(long, global = true, env = "KEYWARD_ROOT_KEY", hide_env_values = true)]
    root_key: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane.
    Serve {
        /// Config file (default `keyward.toml` if present; also `KEYWARD_CONFIG`).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Workspaces (tenants).
    #[command(subcommand)]
    Workspaces(WorkspaceCommand),
    /// Root keys, which call the admin API and the edge's verify route.
    #[command(subcommand, name = "root-keys")]
    RootKeys(RootKeyCommand),
    /// APIs (keyspaces).
    #[command(subcommand)]
    Apis(ApiCommand),
    /// API keys.
    #[command(subcommand)]
    Keys(KeyCommand),
}

#[derive(Subcommand)]
enum WorkspaceCommand {
    Create {
        #[arg(long)]
        name: String,
    },
}

#[derive(Subcommand)]
enum RootKeyCommand {
    Create {
        #[arg(long)]
        name: String,
        /// A scope such as `api.*.verify_key`; repeat for several.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
    },
    List,
    /// Revoke a root key: refused by the control plane at once, by the edge within a second.
    Revoke {
        id: String,
    },
}

#[derive(Subcommand)]
enum ApiCommand {
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        prefix: Option<String>,
        #[arg(long)]
        max_staleness_ms: Option<u64>,
    },
    List,
}

#[derive(Args)]
struct KeyFields {
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    owner_id: Option<String>,
    /// A JSON object.
    #[arg(long)]
    meta: Option<String>,
    /// Unix milliseconds; for `update`, `now` expires the key at once and `never` clears it.
    #[arg(long)]
    expires_at: Option<String>,
    /// Comma-separated permission names.
    #[arg(long, value_delimiter = ',')]
    permissions: Option<Vec<String>>,
}

#[derive(Subcommand)]
enum KeyCommand {
    Create {
        #[arg(long)]
        api_id: String,
        #[arg(long)]
        prefix: Option<String>,
        #[command(flatten)]
        fields: KeyFields,
    },
    Get {
        id: String,
    },
    /// Find keys by API or by the visible start of a leaked key.
    List {
        #[arg(long)]
        api_id: Option<String>,
        #[arg(long)]
        start: Option<String>,
        #[arg(long)]
        cursor: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
    },
    Update {
        id: String,
        #[arg(long)]
        enabled: Option<bool>,
        #[command(flatten)]
        fields: KeyFields,
    },
    /// Revoke a key everywhere; prints each region's acknowledgement.
    Revoke {
        id: String,
    },
    Delete {
        id: String,
    },
    /// Ask the origin whether a key is valid. Give `-` to read the key from stdin.
    Verify {
        key: String,
        #[arg(long)]
        api_id: Option<String>,
        #[arg(long = "permission")]
        permissions: Vec<String>,
    },
}

pub async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Serve { config } = &cli.command {
        init_tracing();
        let config = Config::load(config.as_deref())?;
        return crate::serve::serve(config).await;
    }
    let client =
        Client { http: reqwest::Client::new(), url: cli.url.trim_end_matches('/').to_owned(), root_key: cli.root_key };
    let (method, path, body) = request_for(cli.command)?;
    let answer = client.call(method, &path, body).await?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("KEYWARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).init();
}

/// The HTTP request a subcommand stands for.
fn request_for(command: Command) -> anyhow::Result<(reqwest::Method, String, Option<Value>)> {
    use reqwest::Method;
    Ok(match command {
        Command::Serve { .. } => unreachable!("handled before"),
        Command::Workspaces(WorkspaceCommand::Create { name }) => {
            (Method::POST, "/v1/workspaces".into(), Some(json!({ "name": name })))
        }
        Command::RootKeys(RootKeyCommand::Create { name, scopes }) => {
            (Method::POST, "/v1/root-keys".into(), Some(json!({ "name": name, "scopes": scopes })))
        }
        Command::Apis(ApiCommand::Create { name, prefix, max_staleness_ms }) => {
            let mut body = json!({ "name": name });
            insert_some(&mut body, "prefix", prefix.map(Value::from));
            insert_some(&mut body, "max_staleness_ms", max_staleness_ms.map(Value::from));
            (Method::POST, "/v1/apis".into(), Some(body))
        }
        Command::RootKeys(RootKeyCommand::List) => (Method::GET, "/v1/root-keys".into(), None),
        Command::RootKeys(RootKeyCommand::Revoke { id }) => {
            (Method::POST, format!("/v1/root-keys/{}/revoke", encode(&id)), None)
        }
        Command::Apis(ApiCommand::List) => (Method::GET, "/v1/apis".into(), None),
        Command::Keys(KeyCommand::Create { api_id, prefix, fields }) => {
            let mut body = fields.into_json(false)?;
            body["api_id"] = api_id.into();
            insert_some(&mut body, "prefix", prefix.map(Value::from));
            (Method::POST, "/v1/keys".into(), Some(body))
        }
        Command::Keys(KeyCommand::Get { id }) => (Method::GET, format!("/v1/keys/{}", encode(&id)), None),
        Command::Keys(KeyCommand::List { api_id, start, cursor, limit }) => {
            let pairs =
                [("api_id", api_id), ("start", start), ("cursor", cursor), ("limit", limit.map(|l| l.to_string()))];
            let query: Vec<String> =
                pairs.into_iter().filter_map(|(k, v)| v.map(|v| format!("{k}={}", encode(&v)))).collect();
            (Method::GET, format!("/v1/keys?{}", query.join("&")), None)
        }
        Command::Keys(KeyCommand::Update { id, enabled, fields }) => {
            let mut body = fields.into_json(true)?;
            insert_some(&mut body, "enabled", enabled.map(Value::from));
            (Method::PATCH, format!("/v1/keys/{}", encode(&id)), Some(body))
        }
        Command::Keys(KeyCommand::Revoke { id }) => (Method::POST, format!("/v1/keys/{}/revoke", encode(&id)), None),
        Command::Keys(KeyCommand::Delete { id }) => (Method::DELETE, format!("/v1/keys/{}", encode(&id)), None),
        Command::Keys(KeyCommand::Verify { key, api_id, permissions }) => {
            let key = if key == "-" {
                let mut text = String::new();
                std::io::stdin().read_to_string(&mut text).context("reading the key from stdin")?;
                text.trim().to_owned()
            } else {
                key
            };
            let mut body = json!({ "key": key, "permissions": permissions });
            insert_some(&mut body, "api_id", api_id.map(Value::from));
            (Method::POST, "/v1/keys/verify".into(), Some(body))
        }
    })
}

impl KeyFields {
    fn into_json(self, for_update: bool) -> anyhow::Result<Value> {
        let mut body = json!({});
        insert_some(&mut body, "name", self.name.map(Value::from));
        insert_some(&mut body, "owner_id", self.owner_id.map(Value::from));
        if let Some(meta) = self.meta {
            let meta: Map<String, Value> = serde_json::from_str(&meta).context("--meta must be a JSON object")?;
            body["meta"] = Value::Object(meta);
        }
        if let Some(at) = self.expires_at {
            body["expires_at"] = match at.as_str() {
                "now" if for_update => Value::from(0),
                "never" if for_update => Value::Null,
                ms => Value::from(ms.parse::<i64>().context("--expires-at must be Unix milliseconds")?),
            };
        }
        insert_some(&mut body, "permissions", self.permissions.map(Value::from));
        Ok(body)
    }
}

fn insert_some(body: &mut Value, field: &str, value: Option<Value>) {
    if let Some(value) = value {
        body[field] = value;
    }
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }
        })
        .collect()
}

struct Client {
    http: reqwest::Client,
    url: String,
    root_key: Option<String>,
}

impl Client {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let Some(root_key) = &self.root_key else {
            bail!("no root key: set KEYWARD_ROOT_KEY or pass --root-key");
        };
        let mut request = self.http.request(method, format!("{}{path}", self.url)).bearer_auth(root_key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response =
            request.send().await.with_context(|| format!("cannot reach the control plane at {}", self.url))?;
        let status = response.status();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let code = answer["error"]["code"].as_str().unwrap_or("?");
            let message = answer["error"]["message"].as_str().unwrap_or("no message");
            bail!("{status} {code}: {message}");
        }
        Ok(answer)
    }
}
