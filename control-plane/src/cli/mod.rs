//! The `keyward` command line. `serve` runs the control plane; `outbox` reads and redrives its
//! deliveries, and `admin` mints a root key for a workspace locked out of its own, both on the
//! database itself (the operator's commands, `outbox.rs` and `admin.rs`); every other subcommand is an
//! HTTP client of the admin API, so a change made here takes the same path as one made with curl.
//!
//! On a terminal the answers are tables and sentences (`render.rs`); with `--json`, or when
//! stdout is a pipe, they are the API's JSON, for scripts.

mod admin;
mod audit;
mod client;
mod incident;
mod outbox;
mod render;
mod request;

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::Config;
use client::Client;
use render::{View, render};

#[derive(Parser)]
#[command(
    name = "keyward",
    version,
    about = "Keyward: API keys that stop working everywhere, at once, when revoked.",
    after_help = "Example:\n  export KEYWARD_ROOT_KEY=kw_root_...\n  keyward keys list --start sk_live_3xQ9ab\n  keyward keys revoke key_01..."
)]
pub struct Cli {
    /// The control plane's base URL.
    #[arg(long, global = true, env = "KEYWARD_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// A root key (prefer the environment variable: arguments show in `ps`).
    #[arg(long, global = true, env = "KEYWARD_ROOT_KEY", hide_env_values = true)]
    root_key: Option<String>,
    /// Print the API's JSON answer (the default when stdout is not a terminal).
    #[arg(long, global = true, conflicts_with = "format")]
    json: bool,
    /// How to print answers [default: `table` on a terminal, `json` otherwise].
    #[arg(long, global = true, value_enum)]
    format: Option<Format>,
    #[command(subcommand)]
    command: Command,
}

/// A change to a key's credits.
#[derive(Clone, Copy, ValueEnum)]
pub enum CreditsOp {
    Set,
    Increment,
    Decrement,
}

/// How answers are printed.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Tables and sentences for people.
    Table,
    /// The API's JSON, as it answered, for scripts.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane.
    #[command(after_help = "Example:\n  keyward serve --config keyward.toml")]
    Serve {
        /// Config file (default `keyward.toml` if present; also `KEYWARD_CONFIG`).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Create workspaces (tenants).
    #[command(subcommand, after_help = "Example:\n  keyward workspaces create --name acme")]
    Workspaces(WorkspaceCommand),
    /// Create, list and revoke root keys, which call the admin API and the edge's verify route.
    #[command(subcommand, name = "root-keys", after_help = "Example:\n  keyward root-keys list")]
    RootKeys(RootKeyCommand),
    /// Create and list APIs (keyspaces).
    #[command(subcommand, after_help = "Example:\n  keyward apis create --name payments-live --prefix sk_live")]
    Apis(ApiCommand),
    /// Create, find, change, revoke and verify API keys.
    #[command(subcommand, after_help = "Example:\n  keyward keys list --start sk_live_3xQ9ab")]
    Keys(KeyCommand),
    /// Create, find, change and delete identities: customers whose keys share rate limits and
    /// credits.
    #[command(subcommand, after_help = "Example:\n  keyward identities create --external-id acct_42 --credits 1000")]
    Identities(IdentityCommand),
    /// Respond to a leaked key: find it, see who used it, revoke it, follow each region's
    /// acknowledgement, wait out the promise's bound, and print the proof; exits 3 on a violation.
    #[command(
        after_help = "Example:\n  keyward incident sk_live_3xQ9ab\n  keyward incident key_01... --yes --json > incident.json"
    )]
    Incident {
        /// The key's id, or the visible start of the leaked key (as much of it as you have).
        key: String,
        /// Revoke without asking (needed when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// The operator's view of every workspace's deliveries, and their redrive (on the database).
    #[command(subcommand, after_help = "Example:\n  keyward outbox status --config keyward.toml")]
    Outbox(outbox::OutboxCommand),
    /// Read the audit log, save its signed checkpoint, and verify its chain (on the database).
    #[command(
        subcommand,
        after_help = "Example:\n  keyward audit list --target key_01...\n  keyward audit verify --config keyward.toml --checkpoint cp.json"
    )]
    Audit(AuditCommand),
    /// Operator commands that open the control plane's database directly, never over HTTP.
    #[command(subcommand, after_help = "Example:\n  keyward admin recover --database keyward.sqlite")]
    Admin(AdminCommand),
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Mint a root key with every scope for a workspace locked out of its own; shown once.
    #[command(after_help = "Example:\n  keyward admin recover --database keyward.sqlite --workspace ws_01...\n\n\
                      Run it on the control plane's machine, with access to its database file. The running \
                      control plane accepts the new root key at once and writes it to the edge.")]
    Recover {
        /// The control plane's SQLite database file (`database` in keyward.toml).
        #[arg(long, env = "KEYWARD_DATABASE")]
        database: PathBuf,
        /// The workspace's id [default: the only workspace, if there is one].
        #[arg(long)]
        workspace: Option<String>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// This workspace's audit entries, newest first (needs `audit.read`).
    #[command(
        after_help = "Example:\n  keyward audit list --target key_01...\n  keyward audit list --action key.revoke --limit 20"
    )]
    List {
        /// The id of what changed: a key, a root key, an API or a workspace.
        #[arg(long)]
        target: Option<String>,
        #[arg(long)]
        root_key_id: Option<String>,
        /// `key.create`, `key.update`, `key.revoke`, `key.delete`, `root_key.create`, ...
        #[arg(long)]
        action: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
    },
    /// The chain's head, signed: save it (`--json > cp.json`) to check deletions later.
    #[command(after_help = "Example:\n  keyward audit checkpoint --json > checkpoint.json")]
    Checkpoint,
    /// Walk the chain on the database with the config's secret; non-zero naming a broken entry.
    #[command(after_help = "Example:\n  keyward audit verify --config keyward.toml --checkpoint checkpoint.json")]
    Verify {
        #[command(flatten)]
        database: outbox::DatabaseArgs,
        /// A checkpoint saved before: entries deleted from the end since are found.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum WorkspaceCommand {
    /// Create a workspace and its first root key (shown once).
    #[command(after_help = "Example:\n  keyward workspaces create --name acme")]
    Create {
        #[arg(long)]
        name: String,
    },
}

#[derive(Subcommand)]
enum RootKeyCommand {
    /// Create a root key with scopes this root key holds; the key is shown once.
    #[command(after_help = "Example:\n  keyward root-keys create --name checkout-verifier --scope 'api.*.verify_key'")]
    Create {
        #[arg(long)]
        name: String,
        /// A scope such as `api.*.verify_key`; repeat for several.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
    },
    /// List this workspace's root keys (never their secrets).
    #[command(after_help = "Example:\n  keyward root-keys list")]
    List,
    /// Revoke a root key: refused by the control plane at once, by the edge within a second.
    #[command(after_help = "Example:\n  keyward root-keys revoke root_01...")]
    Revoke { id: String },
}

#[derive(Subcommand)]
enum ApiCommand {
    /// Create an API: a keyspace with its own key prefix.
    #[command(
        after_help = "Example:\n  keyward apis create --name payments-live --prefix sk_live --max-staleness-ms 1000"
    )]
    Create {
        /// 1 to 64 characters of a-z, 0-9, `-` and `_`.
        #[arg(long)]
        name: String,
        /// The beginning of every key of this API (default `sk`).
        #[arg(long)]
        prefix: Option<String>,
        /// How old an edge copy of a key may be before the edge confirms it (default 1000).
        #[arg(long)]
        max_staleness_ms: Option<u64>,
    },
    /// List this workspace's APIs.
    #[command(after_help = "Example:\n  keyward apis list")]
    List,
    /// Show an API's allow and deny lists and limit override, or change them: each list named
    /// replaces that list, the others stay as they are. A tightening change reaches every
    /// region like a revocation.
    #[command(
        after_help = "Example:\n  keyward apis policy api_01...\n  keyward apis policy api_01... --deny-ip 10.0.0.0/8 --deny-country RU\n  keyward apis policy api_01... --limit-percent 50\n  keyward apis policy api_01... --clear"
    )]
    Policy {
        api_id: String,
        #[command(flatten)]
        lists: PolicyFields,
        /// Set the API's limit override: every rate limit of its keys is decided as this percent
        /// (1 to 100) of its limit, in every region, until lifted.
        #[arg(long, conflicts_with_all = ["clear", "lift_override"])]
        limit_percent: Option<u8>,
        /// Lift the limit override (the lists stay).
        #[arg(long, conflicts_with = "clear")]
        lift_override: bool,
        /// Empty every list and lift the override.
        #[arg(long)]
        clear: bool,
    },
}

/// Allow and deny lists of client IP ranges and countries, each flag repeatable or
/// comma-separated.
#[derive(Args, Default)]
struct PolicyFields {
    /// Admit only clients in these ranges (CIDR, like 203.0.113.0/24 or 2001:db8::/32).
    #[arg(long, value_delimiter = ',')]
    allow_ip: Vec<String>,
    /// Refuse clients in these ranges (FORBIDDEN).
    #[arg(long, value_delimiter = ',')]
    deny_ip: Vec<String>,
    /// Admit only clients from these countries (ISO 3166-1 alpha-2, like DE).
    #[arg(long, value_delimiter = ',')]
    allow_country: Vec<String>,
    /// Refuse clients from these countries (FORBIDDEN).
    #[arg(long, value_delimiter = ',')]
    deny_country: Vec<String>,
}

impl PolicyFields {
    fn is_empty(&self) -> bool {
        self.allow_ip.is_empty()
            && self.deny_ip.is_empty()
            && self.allow_country.is_empty()
            && self.deny_country.is_empty()
    }

    /// Only the lists named, as the API takes them.
    fn named_json(self) -> serde_json::Value {
        let mut body = serde_json::json!({});
        for (name, list) in [
            ("allow_ips", self.allow_ip),
            ("deny_ips", self.deny_ip),
            ("allow_countries", self.allow_country),
            ("deny_countries", self.deny_country),
        ] {
            if !list.is_empty() {
                body[name] = list.into();
            }
        }
        body
    }

    /// The lists as the API takes them.
    fn into_json(self) -> serde_json::Value {
        serde_json::json!({
            "allow_ips": self.allow_ip,
            "deny_ips": self.deny_ip,
            "allow_countries": self.allow_country,
            "deny_countries": self.deny_country,
        })
    }
}

#[derive(Args)]
struct KeyFields {
    /// A display name.
    #[arg(long)]
    name: Option<String>,
    /// Who the key belongs to, in your own terms (an account or user id).
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
    /// The key's credits and rate limits.
    #[command(flatten)]
    spend: SpendFields,
    /// The identity (`idn_...`) whose shared limits and credits the key spends too; for
    /// `update`, `none` detaches it.
    #[arg(long)]
    identity: Option<String>,
    /// The key's own allow and deny lists (for `update`: they replace the key's lists).
    #[command(flatten)]
    policy: Box<PolicyFields>,
    /// For `update`: empty the key's own allow and deny lists.
    #[arg(long)]
    clear_policy: bool,
}

/// Credits and rate limits, as keys and identities take them.
#[derive(Args)]
struct SpendFields {
    /// Credits that may still be spent from now; `unlimited` (for `update`) removes them.
    #[arg(long)]
    credits: Option<String>,
    /// When credits refill: `daily`, `monthly:<day>`, `anniversary`, or an interval like `10s`,
    /// `5m`, `1h` (needs `--credits` and `--refill-amount`).
    #[arg(long, requires_all = ["credits", "refill_amount"])]
    refill_every: Option<String>,
    /// How many credits each refill gives: the balance is set to it, or with `--refill-cap`
    /// added up to the cap.
    #[arg(long, requires = "refill_every")]
    refill_amount: Option<u64>,
    #[arg(long, requires = "refill_every")]
    refill_cap: Option<u64>,
    /// A named rate limit, `name=limit/duration[:cost=N][:local][:named]` (repeat for more), like
    /// `api=50/10s` or `search=5/1s:cost=2:local:named` (`local`: counted per edge isolate;
    /// `named`: only when a verification names it); for `update`, replaces them all, and `none`
    /// removes them.
    #[arg(long = "ratelimit")]
    ratelimits: Vec<String>,
}

/// An identity's fields, for `create` and `update`.
#[derive(Args)]
struct IdentityFields {
    /// A JSON object.
    #[arg(long)]
    meta: Option<String>,
    #[command(flatten)]
    spend: SpendFields,
}

#[derive(Subcommand)]
enum IdentityCommand {
    /// Create an identity: a customer whose rate limits and credits its keys share.
    #[command(
        after_help = "Example:\n  keyward identities create --external-id acct_42 --credits 10000 --ratelimit api=100/1s"
    )]
    Create {
        /// Your own id of the customer, unique in the workspace.
        #[arg(long)]
        external_id: String,
        #[command(flatten)]
        fields: IdentityFields,
    },
    /// Show one identity.
    #[command(after_help = "Example:\n  keyward identities get idn_01...")]
    Get { id: String },
    /// List the workspace's identities, or find one by its external id.
    #[command(after_help = "Example:\n  keyward identities list --external-id acct_42")]
    List {
        #[arg(long)]
        external_id: Option<String>,
        /// The last id of the page before (printed under a full page).
        #[arg(long)]
        cursor: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Change an identity's external id, meta, credits or rate limits (lowered ones are
    /// purged at once, like a revocation).
    #[command(after_help = "Example:\n  keyward identities update idn_01... --ratelimit api=10/1s")]
    Update {
        id: String,
        #[arg(long)]
        external_id: Option<String>,
        #[command(flatten)]
        fields: IdentityFields,
    },
    /// Delete an identity that no key uses any more.
    #[command(after_help = "Example:\n  keyward identities delete idn_01...")]
    Delete { id: String },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create a key; its plaintext is shown once, in this answer only.
    #[command(
        after_help = "Example:\n  keyward keys create --api-id api_01... --name checkout --owner-id acct_42 --permissions charges:write"
    )]
    Create {
        #[arg(long)]
        api_id: String,
        /// Overrides the API's prefix for this key.
        #[arg(long)]
        prefix: Option<String>,
        #[command(flatten)]
        fields: KeyFields,
    },
    /// Show one key (never its secret).
    #[command(after_help = "Example:\n  keyward keys get key_01...")]
    Get { id: String },
    /// Find keys by API or by the visible start of a leaked key.
    #[command(
        after_help = "Example:\n  keyward keys list --start sk_live_3xQ9ab\n  keyward keys list --api-id api_01... --limit 20"
    )]
    List {
        #[arg(long)]
        api_id: Option<String>,
        /// The visible beginning of a key, like `sk_live_3xQ9ab`.
        #[arg(long)]
        start: Option<String>,
        /// The last id of the page before (printed under a full page).
        #[arg(long)]
        cursor: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Change a key's name, owner, meta, expiry, permissions or whether it is enabled.
    #[command(
        after_help = "Example:\n  keyward keys update key_01... --enabled false\n  keyward keys update key_01... --expires-at now"
    )]
    Update {
        id: String,
        #[arg(long)]
        enabled: Option<bool>,
        #[command(flatten)]
        fields: KeyFields,
    },
    /// Show a key's credits as its authority holds them, or set, increment or decrement them.
    #[command(
        after_help = "Example:\n  keyward keys credits key_01...\n  keyward keys credits key_01... set 1000\n  keyward keys credits key_01... increment 50"
    )]
    Credits {
        id: String,
        /// `set` (this much may still be spent from now), `increment` or `decrement`.
        #[arg(value_enum, requires = "amount")]
        op: Option<CreditsOp>,
        amount: Option<u64>,
    },
    /// Revoke a key everywhere; prints each region's acknowledgement.
    #[command(after_help = "Example:\n  keyward keys revoke key_01...")]
    Revoke { id: String },
    /// Delete a key for good: it then verifies as NOT_FOUND.
    #[command(after_help = "Example:\n  keyward keys delete key_01...")]
    Delete { id: String },
    /// Show that a revoked, disabled, expired or deleted key stopped working: each region's
    /// acknowledgement and every VALID answer since, judged; exits 3 on a violation.
    #[command(after_help = "Example:\n  keyward keys proof key_01...")]
    Proof { id: String },
    /// Who used a key, from where and how much: counts by outcome, top sources, sources new
    /// to the key, and what was lost.
    #[command(after_help = "Example:\n  keyward keys usage key_01...\n  keyward keys usage key_01... --hours 168")]
    Usage {
        id: String,
        /// How far back to look, in hours (default 24; counts are kept a year).
        #[arg(long, default_value_t = 24)]
        hours: u32,
    },
    /// Ask the origin whether a key is valid. Give `-` to read the key from stdin.
    #[command(after_help = "Example:\n  keyward keys verify - <<< \"$KEY\"")]
    Verify {
        /// The key, or `-` to read it from stdin (arguments show in `ps`).
        key: String,
        #[arg(long)]
        api_id: Option<String>,
        /// A permission the key must hold; repeat for several.
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
    let format = match (cli.json, cli.format) {
        (true, _) => Format::Json,
        (false, Some(format)) => format,
        (false, None) if std::io::stdout().is_terminal() => Format::Table,
        (false, None) => Format::Json,
    };
    render::set_colour(
        format == Format::Table
            && std::io::stdout().is_terminal()
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
    );
    if let Command::Incident { key, yes } = &cli.command {
        let client = Client::new(&cli.url, cli.root_key.clone())?;
        if incident::run(&client, key, *yes, format == Format::Json).await? {
            eprintln!("VALID answers broke the promise after the revocation: see the proof above");
            std::process::exit(3);
        }
        return Ok(());
    }
    if let Command::Admin(AdminCommand::Recover { database, workspace }) = &cli.command {
        let answer = admin::recover(database, workspace.as_deref()).await?;
        return print(format, View::RootKeyRecovered, &answer);
    }
    let (answer, view) = match cli.command {
        Command::Outbox(command) => outbox::run(command).await?,
        Command::Audit(AuditCommand::Verify { database, checkpoint }) => {
            (audit::verify(database, checkpoint).await?, View::AuditVerified)
        }
        command => {
            let client = Client::new(&cli.url, cli.root_key)?;
            let request = request::request_for(command)?;
            let mut answer = client.call(&request).await?;
            // A key or an identity with credits: what remains, from its authority (a second call).
            if matches!(request.view, View::Key | View::Identity) && !answer["credits"].is_null() {
                let credits = client.get(&format!("{}/credits", request.path)).await?;
                answer["credits_remaining"] = credits["remaining"].clone();
            }
            (answer, request.view)
        }
    };
    print(format, view, &answer)?;
    if view == View::Proof && answer["violations"].as_u64().is_some_and(|n| n > 0) {
        eprintln!("{} VALID answers broke the promise: see `violation` above", answer["violations"]);
        std::process::exit(3);
    }
    Ok(())
}

/// Prints an answer as JSON or for people.
fn print(format: Format, view: View, answer: &serde_json::Value) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(answer)?),
        Format::Table => print!("{}", render(view, answer, crate::time::now_ms())),
    }
    Ok(())
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("KEYWARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).init();
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every command and subcommand says in one line what it does and shows an example.
    #[test]
    fn every_command_has_help_and_an_example() {
        fn check(command: &clap::Command, path: &str) {
            let about = command.get_about().map(|a| a.to_string()).unwrap_or_default();
            assert!(!about.is_empty() && !about.contains('\n'), "`{path}` needs a one-line about");
            let after = command.get_after_help().map(|a| a.to_string()).unwrap_or_default();
            assert!(
                after.starts_with("Example:\n") && after.contains("\n  keyward "),
                "`{path}` needs an example, has {after:?}"
            );
            for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
                check(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        Cli::command().debug_assert();
        check(&Cli::command(), "keyward");
    }

    /// The request `keyward <args>` makes: method, path and body.
    fn request_of(args: &[&str]) -> (String, String, Option<serde_json::Value>) {
        let cli = Cli::try_parse_from(std::iter::once("keyward").chain(args.iter().copied())).unwrap();
        let request = request::request_for(cli.command).unwrap();
        (request.method.to_string(), request.path, request.body)
    }

    #[test]
    fn policy_flags_make_the_policy_requests() {
        let (method, path, body) = request_of(&["apis", "policy", "api_1"]);
        assert_eq!((method.as_str(), path.as_str(), body), ("GET", "/v1/apis/api_1/policy", None));
        let args = ["apis", "policy", "api_1", "--deny-ip", "10.0.0.0/8,2001:db8::/32", "--deny-country", "RU"];
        let (method, _, body) = request_of(&[&args[..], &["--allow-country", "DE", "--limit-percent", "50"]].concat());
        assert_eq!(method, "PATCH", "only what is named changes");
        let expected = serde_json::json!({
            "deny_ips": ["10.0.0.0/8", "2001:db8::/32"], "allow_countries": ["DE"],
            "deny_countries": ["RU"], "limit_override": { "percent": 50 },
        });
        assert_eq!(body, Some(expected));
        let (method, _, body) = request_of(&["apis", "policy", "api_1", "--limit-percent", "50"]);
        assert_eq!(
            (method.as_str(), body),
            ("PATCH", Some(serde_json::json!({ "limit_override": { "percent": 50 } })))
        );
        let (_, _, body) = request_of(&["apis", "policy", "api_1", "--lift-override"]);
        assert_eq!(body, Some(serde_json::json!({ "limit_override": null })));
        let (method, _, body) = request_of(&["apis", "policy", "api_1", "--clear"]);
        assert_eq!(method, "PUT");
        assert_eq!(body, Some(serde_json::json!({})), "--clear empties every list and lifts the override");
        let both = Cli::try_parse_from(["keyward", "apis", "policy", "a", "--clear", "--limit-percent", "5"]);
        assert!(both.is_err());

        let (_, _, body) = request_of(&["keys", "create", "--api-id", "api_1", "--deny-ip", "203.0.113.0/24"]);
        assert_eq!(body.unwrap()["policy"]["deny_ips"], serde_json::json!(["203.0.113.0/24"]));
        let (_, _, body) = request_of(&["keys", "update", "key_1", "--clear-policy"]);
        assert_eq!(body.unwrap()["policy"], serde_json::Value::Null);
        let (_, _, body) = request_of(&["keys", "update", "key_1", "--name", "n"]);
        assert!(body.unwrap().get("policy").is_none(), "lists not named are left as they are");
        let cli = Cli::try_parse_from(["keyward", "keys", "create", "--api-id", "a", "--clear-policy"]).unwrap();
        assert!(request::request_for(cli.command).is_err(), "--clear-policy is for update");
    }

    #[test]
    fn json_and_format_are_global_and_exclusive() {
        let cli = Cli::try_parse_from(["keyward", "keys", "get", "key_01", "--json"]).unwrap();
        assert!(cli.json);
        let cli = Cli::try_parse_from(["keyward", "--format", "table", "keys", "list"]).unwrap();
        assert!(cli.format == Some(Format::Table));
        let both = Cli::try_parse_from(["keyward", "--json", "--format", "table", "apis", "list"]);
        assert_eq!(both.err().map(|e| e.kind()), Some(clap::error::ErrorKind::ArgumentConflict));
    }
}
