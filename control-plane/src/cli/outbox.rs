//! `keyward outbox status|redrive`: the operator's view of every workspace's deliveries, the
//! redrive of stuck and dead-lettered ones, and (`redrive --key`) the re-push of one key's
//! current record to targets that acknowledged it before.
//!
//! Both open the database directly, as `serve` does, never over HTTP: a root key belongs to one
//! workspace, and no workspace may see or push another's deliveries. So they run where the
//! database is, with the same config (its `database` and `[outbox]` ages); a running server's
//! retrier takes what a redrive made due within a quarter of a second.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::config::Config;
use crate::delivery::health_json;
use crate::store::{Redrive, Repush, Repushed, Store};
use crate::time::now_ms;

/// The most stuck or dead-lettered deliveries `status` lists one by one (all are counted).
const LISTED: u32 = 100;

#[derive(Subcommand)]
pub enum OutboxCommand {
    /// Show every workspace's pending, stuck and dead-lettered deliveries, with their last error.
    #[command(after_help = "Example:\n  keyward outbox status --config keyward.toml")]
    Status {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Try stuck and dead-lettered deliveries again now, of one region or of every target; with
    /// --key, push one key's current record again, acknowledged before or not.
    #[command(after_help = "Example:\n  keyward outbox redrive --region eu-west --config keyward.toml\n  \
                            keyward outbox redrive --key key_01J... --region eu-west --config keyward.toml")]
    Redrive {
        /// Only this region's KV writes and purges (with --key, and the authority's update).
        #[arg(long)]
        region: Option<String>,
        /// Queue a fresh delivery of this key's (or root key's) current record to every target
        /// (or --region's), whether or not earlier ones were acknowledged: after a region's KV
        /// was restored from a backup, or its cache wiped. The running control plane delivers it.
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

/// Where the database is: the config `serve` reads, or the file itself.
#[derive(Args)]
pub struct DatabaseArgs {
    /// Config file, as `serve` reads it (default `keyward.toml` if present; also `KEYWARD_CONFIG`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The database file, overriding the config's `database` (also `KEYWARD_DATABASE`).
    #[arg(long)]
    database: Option<PathBuf>,
}

/// Runs an outbox command against the database; answers its JSON and how to print it.
pub async fn run(command: OutboxCommand) -> anyhow::Result<(Value, super::render::View)> {
    use super::render::View;
    match command {
        OutboxCommand::Status { database } => {
            let (store, config) = open(database).await?;
            Ok((status(&store, &config).await?, View::OutboxStatus))
        }
        OutboxCommand::Redrive { region, key, database } => {
            let (store, config) = open(database).await?;
            if let Some(region) = &region
                && !config.regions.iter().any(|r| &r.name == region)
                && !(config.cloudflare.is_some() && region == "cloudflare")
            {
                bail!("no region named `{region}` in the config; `keyward outbox status` lists the targets");
            }
            if let Some(key) = key {
                let repushed = repush(&store, &config, &key, region.as_deref()).await;
                store.close().await;
                return Ok((json!({ "region": region, "queued": repushed? }), View::Repushed));
            }
            let actor = crate::change::Actor::Console("outbox redrive");
            let redriven = store.redrive(Redrive { region: region.as_deref(), now: now_ms() }, &actor).await?;
            store.close().await;
            Ok((
                json!({ "region": region, "revived": redriven.revived, "made_due": redriven.made_due }),
                View::Redriven,
            ))
        }
    }
}

/// Queues the current record of key (or root key) `id` again for every target the config
/// delivers to (or `region`'s), for the running control plane's retrier.
async fn repush(store: &Store, config: &Config, id: &str, region: Option<&str>) -> anyhow::Result<Repushed> {
    let reach = crate::edge_client::EdgeClient::from_config(config)?.reach();
    let actor = crate::change::Actor::Console("outbox redrive --key");
    let repush = Repush { id, region, reach, now: now_ms() };
    Ok(store.repush(repush, &actor).await?)
}

/// Every target's counts, across workspaces, and the stuck and dead-lettered deliveries.
pub async fn status(store: &Store, config: &Config) -> anyhow::Result<Value> {
    let now = now_ms();
    let stuck_before = config.outbox.stuck_before(now);
    let health = store.delivery_health(None, stuck_before).await?;
    let targets: Vec<Value> = health
        .iter()
        .map(|h| {
            let mut view = health_json(Some(h), now);
            view["target"] = h.target.to_string().into();
            view
        })
        .collect();
    let troubled = store.troubled_deliveries(stuck_before, LISTED).await?;
    Ok(json!({ "stuck_after_s": config.outbox.stuck_after_s, "targets": targets, "troubled": troubled }))
}

pub(super) async fn open(args: DatabaseArgs) -> anyhow::Result<(Store, Config)> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(database) = args.database {
        config.database = database;
    }
    if !config.database.exists() {
        bail!("no database at {}; pass --database or --config as `keyward serve` runs", config.database.display());
    }
    let store = Store::open(&config.database).await?;
    let store = match config.audit_key() {
        Some(key) => store.with_audit_key(key),
        None => bail!("no audit_secret or purge_secret in the config: the audit log's chain cannot be continued"),
    };
    Ok((store, config))
}
