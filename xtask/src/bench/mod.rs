//! `cargo xtask bench ...`: programs that print numbers, ending with one `name=value` line.
//! The machines are shared and noisy, so each bench measures what it compares with in the same
//! run, in alternating rounds (A B, then B A), and the ratio is what to compare. `--against
//! <rev>` adds another revision's build as a second side. Load comes from `wrk` (installed with
//! apt-get if missing).

mod against;
mod fresh;
mod geography;
mod limits;
mod load;
mod revocation;
mod usage;
mod verify;
mod worker;

use std::path::PathBuf;
use std::process::Command;

use clap::Subcommand;
use keyward_tests::world::{Options, RegionPlan, World};

use crate::tools::{self, step};

#[derive(Subcommand)]
pub enum Which {
    /// Time from a revoke call's start to the last of 3 regions rejecting, over many keys; a
    /// region whose purges are dropped; verify throughput warm, confirming with the authority,
    /// and on misses, beside the KV-only baseline edge.
    Revocation {
        /// How many revocations to time per build, polled and quiet each, split over the rounds.
        #[arg(long, default_value_t = 200)]
        keys: usize,
        /// Seconds of load per throughput route and round.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Pause between one poller's verify requests (the pollers share 2 cores with everything).
        #[arg(long, default_value_t = 5)]
        poll_ms: u64,
        /// Rounds of measurement; each measures every side, alternating which goes first.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Also measure this revision's worker and release `keyward` (built once per commit in
        /// target/against/), alternated with this checkout's, and print the ratios.
        #[arg(long, value_name = "REV")]
        against: Option<String>,
    },
    /// Edge verify with usage shipping on and off (same build, alternated, stored events checked
    /// against requests made); ingestion of signed batches and a 30-day per-minute series query.
    Usage {
        /// Seconds of load per side and round.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Events sent through the ingestion route, spread over the past 30 days.
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
    },
    /// The system placed apart (`keyward_tests::geography`): hot keys under steady load at
    /// `metro` and at `world` in one run, checked against revocations made during it;
    /// revocation at `world` with signed purges, tag-only purges and a lost purge; misses.
    Geography {
        /// Seconds of steady load per geography.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Hot keys under the steady load.
        #[arg(long, default_value_t = 20)]
        keys: usize,
        /// Requests per second per region, spread evenly over the keys.
        #[arg(long, default_value_t = 50)]
        rate: u64,
        /// Revocations timed at `world`, in each purge mode.
        #[arg(long, default_value_t = 20)]
        revocations: usize,
        /// Misses timed per region and geography.
        #[arg(long, default_value_t = 20)]
        misses: usize,
        /// The edge's memory trust in tag-only purge mode (its default), for the bound checked.
        #[arg(long, default_value_t = 100)]
        memory_trust_ms: u64,
        /// How long a tag-only purge takes to drop Cache API copies after it arrives (Cloudflare's
        /// purge-by-tag propagation, modelled with `PURGE_TAG_DELAY_MS`).
        #[arg(long, default_value_t = 150)]
        tag_delay_ms: u64,
    },
    /// Edge verify (served from memory) beside the health route; shared's decision beside SHA-256.
    Verify {
        /// Seconds of load per route and round.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Concurrent connections (wrk -c), from one wrk thread.
        #[arg(long, default_value_t = 2)]
        connections: usize,
        /// Rounds of measurement; each measures every side, alternating which goes first.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Also measure this revision's worker and release `keyward`, alternated with this
        /// checkout's, and print the ratios.
        #[arg(long, value_name = "REV")]
        against: Option<String>,
    },
    /// Authority calls per 1,000 verifications of a hot key and its verify latency, with refresh
    /// ahead off, at 50% (the default) and at 75%, side by side in one world.
    Fresh {
        /// Seconds of load per region and round.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Concurrent connections (wrk -c), from one wrk thread.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Rounds of measurement; each loads every region, alternating which goes first.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Also run this revision's worker as one more region (only its worker is built).
        #[arg(long, value_name = "REV")]
        before: Option<String>,
    },
    /// Edge verify of a plain key (warm) beside a key with credits, one with an exact rate limit
    /// and one with a local one, alternated in one world: req/s, p50, p99 and authority calls
    /// per 1,000 verifications; then overspend (must be 0) and what is stranded when a balance
    /// of 1,000 runs out over 3 regions; then the accuracy of a limit of 50 per 10 s, exact
    /// (must be at most 1) and local, hammered from 3 regions.
    Limits {
        /// Seconds of load per key and round.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Concurrent connections (wrk -c), from one wrk thread.
        #[arg(long, default_value_t = 2)]
        connections: usize,
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// The region (0-2) wrk loads; under a geography, 2 is the farthest from the home.
        #[arg(long, default_value_t = 0)]
        region: usize,
        /// Also measure this revision's build (worker and `keyward`), its throughput alternated
        /// with this checkout's, each in a world of its own (overspend and accuracy: this
        /// checkout's only).
        #[arg(long)]
        against: Option<String>,
    },
    /// The worker's upload size (`wrangler deploy --dry-run`, plain and gzipped) and its cold
    /// start (a fresh worker process to its first answer).
    Worker {
        /// How many fresh starts to time per build.
        #[arg(long, default_value_t = 5)]
        starts: usize,
        /// Also measure this revision's worker, alternated with this checkout's, and print the ratios.
        #[arg(long, value_name = "REV")]
        against: Option<String>,
    },
}

pub fn run(which: Which) -> anyhow::Result<()> {
    match which {
        Which::Revocation { keys, seconds, poll_ms, rounds, against } => {
            let plan = revocation::Plan {
                keys,
                duration: std::time::Duration::from_secs(seconds),
                poll: std::time::Duration::from_millis(poll_ms),
                rounds: rounds.max(1),
            };
            revocation::run(&plan, against.as_deref())
        }
        Which::Usage { seconds, rounds, events } => {
            usage::run(std::time::Duration::from_secs(seconds), rounds.max(1), events)
        }
        Which::Geography { seconds, keys, rate, revocations, misses, memory_trust_ms, tag_delay_ms } => {
            geography::run(&geography::Plan {
                duration: std::time::Duration::from_secs(seconds),
                keys: keys.max(1),
                rate: rate.max(1),
                revocations: revocations.max(1),
                misses: misses.max(1),
                memory_trust_ms,
                tag_delay_ms,
            })
        }
        Which::Verify { seconds, connections, rounds, against } => {
            verify::run(std::time::Duration::from_secs(seconds), connections, rounds.max(1), against.as_deref())
        }
        Which::Fresh { seconds, connections, rounds, before } => {
            fresh::run(std::time::Duration::from_secs(seconds), connections, rounds.max(1), before.as_deref())
        }
        Which::Limits { seconds, connections, rounds, region, against } => {
            let duration = std::time::Duration::from_secs(seconds);
            limits::run(duration, connections, rounds.max(1), region.min(2), against.as_deref())
        }
        Which::Worker { starts, against } => worker::run(starts.max(1), against.as_deref()),
    }
}

/// One build of Keyward a bench measures: a `keyward` binary and a worker entry module.
pub struct Build {
    /// `current`, or `old <commit>`.
    pub label: String,
    keyward: PathBuf,
    /// `None`: this checkout's `edge/build`.
    worker_main: Option<PathBuf>,
}

impl Build {
    /// Starts a test world of this build (wrangler at log level error). The bench is one
    /// caller asking for thousands of keys a second that no region holds: the per-caller bound
    /// on such lookups (`CALLER_MISSES_PER_SECOND`) is lifted, or it would measure the bound.
    pub fn world(&self, plans: &[RegionPlan]) -> anyhow::Result<World> {
        self.world_in(plans, Options::default())
    }

    /// [`Build::world`], with more worker variables.
    pub fn world_with(&self, plans: &[RegionPlan], extra: &[(&str, &str)]) -> anyhow::Result<World> {
        let vars = extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        self.world_in(plans, Options { vars, ..Options::default() })
    }

    /// [`Build::world`] with these options (log level and the lifted bound as there).
    pub fn world_in(&self, plans: &[RegionPlan], mut options: Options) -> anyhow::Result<World> {
        keyward_tests::use_keyward_bin(self.keyward.clone());
        keyward_tests::use_worker_main(self.worker_main.clone());
        options.vars.push(("CALLER_MISSES_PER_SECOND".to_owned(), "1000000".to_owned()));
        options.vars.extend(bench_vars()?);
        World::start_opts(plans, Options { log_level: "error", ..options })
    }
}

/// Worker variables for every world a bench starts, from `KEYWARD_BENCH_VARS`
/// (`NAME=value,NAME=value`): to measure both sides of a comparison with a feature off, for
/// example `USAGE_SHIPPING=off` (a build that does not know a variable ignores it).
fn bench_vars() -> anyhow::Result<Vec<(String, String)>> {
    let Ok(text) = std::env::var("KEYWARD_BENCH_VARS") else {
        return Ok(Vec::new());
    };
    text.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((name, value)) if !name.trim().is_empty() => Ok((name.trim().to_owned(), value.trim().to_owned())),
            _ => anyhow::bail!("KEYWARD_BENCH_VARS takes NAME=value pairs separated by commas; `{pair}` is not one"),
        })
        .collect()
}

/// Installs what is missing (wrk too), builds this checkout's worker and release `keyward`,
/// and `against`'s if given. Answers the builds in measuring order: the old one first.
fn builds(against: Option<&str>) -> anyhow::Result<Vec<Build>> {
    tools::setup()?;
    ensure_wrk()?;
    tools::build(true)?;
    let root = keyward_tests::repo_root();
    let current = Build { label: "current".into(), keyward: root.join("target/release/keyward"), worker_main: None };
    Ok(match against {
        Some(rev) => vec![against::build(rev)?, current],
        None => vec![current],
    })
}

/// The order in which round `round` measures `n` sides: forwards on even rounds, backwards on
/// odd ones (A B, B A, A B, ...), so that neither side always runs first.
pub fn order(round: usize, n: usize) -> Vec<usize> {
    if round.is_multiple_of(2) { (0..n).collect() } else { (0..n).rev().collect() }
}

/// A build's named figures, in printing order.
#[derive(Default)]
pub struct Figures(Vec<(String, f64, usize)>);

impl Figures {
    /// Adds `name=value`, printed with `decimals` decimals.
    pub fn add(&mut self, name: &str, value: f64, decimals: usize) {
        self.0.push((name.to_owned(), value, decimals));
    }

    /// Adds every `name=value` of a line another program printed.
    pub fn add_line(&mut self, line: &str) {
        for (name, value) in line.split_whitespace().filter_map(|field| field.split_once('=')) {
            let decimals = value.split_once('.').map_or(0, |(_, fraction)| fraction.len());
            self.add(name, value.parse().unwrap_or(f64::NAN), decimals);
        }
    }

    fn get(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|(n, _, _)| n == name).map(|(_, value, _)| *value)
    }

    fn fields(&self, prefix: &str) -> Vec<String> {
        self.0.iter().map(|(name, value, decimals)| format!("{prefix}{name}={value:.decimals$}")).collect()
    }
}

/// Prints the figures: with an old build beside them, a table of both and the new/old ratios.
/// Ends with the one `name=value` line: the current build's figures, then (with an old build)
/// `against`, the old build's figures as `old_<name>` and the ratios as `<name>_new_over_old`.
pub fn report(current: &Figures, old: Option<(&Build, &Figures)>) {
    let mut line = current.fields("");
    if let Some((build, old)) = old {
        println!("{:<36} {:>12} {:>12} {:>8}", "figure", "current", &build.label, "new/old");
        let mut ratios = Vec::new();
        for (name, value, decimals) in &current.0 {
            let Some(was) = old.get(name) else { continue };
            let ratio = value / was;
            println!("{name:<36} {value:>12.decimals$} {was:>12.decimals$} {ratio:>8.2}");
            if ratio.is_finite() {
                ratios.push(format!("{name}_new_over_old={ratio:.2}"));
            }
        }
        line.push(format!("against={}", build.label.trim_start_matches("old ")));
        line.extend(old.fields("old_"));
        line.extend(ratios);
    }
    println!("{}", line.join(" "));
}

pub fn epoch_ms() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

pub fn percentile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let i = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len().max(1)) - 1;
    values.get(i).copied().unwrap_or(f64::NAN)
}

fn ensure_wrk() -> anyhow::Result<()> {
    if Command::new("wrk").arg("--version").output().is_ok() {
        return Ok(());
    }
    step("installing wrk (apt-get)");
    tools::run(Command::new("apt-get").arg("update").arg("-qq"))?;
    tools::run(Command::new("apt-get").args(["install", "-y", "-qq", "wrk"]))
}
