//! Keyward's automation. `cargo xtask dev` runs Keyward locally; `cargo xtask test` runs every
//! check CI runs; `cargo xtask bench ...` prints numbers. Each installs what it needs first.

mod bench;
mod dev;
mod size;
mod tools;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install missing tools (wasm target, worker-build, wasm-bindgen-cli, npm packages).
    Setup,
    /// Set up, then build the edge worker and the `keyward` binary.
    Build {
        /// Also build the KV-only baseline edge (benchmarks and the proof tests use it).
        #[arg(long)]
        baseline: bool,
    },
    /// Set up, build, and run the control plane on SQLite plus the edge under wrangler's dev server.
    Dev {
        /// How many edge regions to run, each its own wrangler dev server process.
        #[arg(long, default_value_t = 1)]
        regions: u16,
        /// Place the processes apart: every link that crosses a network in production gets the
        /// preset's one-way delays (metro, continent, world). Default: plain loopback.
        #[arg(long, value_name = "NAME")]
        geography: Option<String>,
    },
    /// Set up, build, then fmt check, clippy, the worker's size budget, native tests, wasm tests
    /// and end-to-end tests.
    Test,
    /// Print benchmark numbers.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    std::env::set_current_dir(keyward_tests::repo_root())?;
    match cli.command {
        Command::Setup => tools::setup(),
        Command::Build { baseline } => {
            tools::setup()?;
            tools::build(false)?;
            if baseline {
                tools::build_baseline()?;
            }
            Ok(())
        }
        Command::Dev { regions, geography } => dev::run(regions, geography.as_deref()),
        Command::Test => test(),
        Command::Bench { which } => bench::run(which),
    }
}

fn test() -> anyhow::Result<()> {
    tools::setup()?;
    tools::step("cargo fmt --check");
    tools::cargo(&["fmt", "--all", "--", "--check"], &[])?;
    tools::step("clippy (native)");
    tools::cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"], &[])?;
    tools::step("clippy (wasm32: shared and edge)");
    tools::cargo(
        &[
            "clippy",
            "-p",
            "keyward-shared",
            "-p",
            "keyward-edge",
            "--target",
            "wasm32-unknown-unknown",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    tools::build(false)?;
    tools::build_baseline()?;
    tools::step("the worker's upload within its size budget");
    size::check()?;
    // The whole-system tests are `#[ignore]`d so that a plain `cargo test` reports them as not
    // run instead of passing them unrun; here they run.
    tools::step("native and whole-system tests");
    tools::cargo(&["test", "--workspace", "--", "--include-ignored"], &[])?;
    tools::step("wasm tests of shared (wasm-bindgen-test-runner under Node)");
    let runner = tools::cargo_bin("wasm-bindgen-test-runner");
    tools::cargo(
        &["test", "-p", "keyward-shared", "--target", "wasm32-unknown-unknown"],
        &[("CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER", runner.to_str().unwrap_or_default())],
    )?;
    tools::step("all checks passed");
    Ok(())
}
