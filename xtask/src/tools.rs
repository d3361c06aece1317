//! Installing what Keyward needs (the versions measured to work together: worker-build 0.8.7,
//! wasm-bindgen-cli matching Cargo.lock, wrangler and binaryen from package-lock.json) and building it.
//! Every step is skipped when its result is already there, and says so.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

const WORKER_BUILD_VERSION: &str = "0.8.7";

/// Prints a visible progress line.
pub fn step(what: &str) {
    eprintln!("\x1b[1m==> {what}\x1b[0m");
}

/// Runs a command, failing with its name if it fails.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{command:?}");
    let status = command.status().with_context(|| format!("cannot run {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

pub fn cargo(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.args(args).envs(env.iter().copied());
    run(&mut command)
}

/// A binary installed by `cargo install`.
pub fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    home.join("bin").join(name)
}

/// What `wasm-bindgen --version` prints, if it is installed.
pub fn installed_wasm_bindgen() -> Option<String> {
    version_of(&cargo_bin("wasm-bindgen"))
}

fn version_of(binary: &PathBuf) -> Option<String> {
    let out = Command::new(binary).arg("--version").output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The wasm-bindgen version the Cargo.lock pins; wasm-bindgen-cli must match it exactly.
fn locked_wasm_bindgen() -> anyhow::Result<String> {
    let lock = std::fs::read_to_string("Cargo.lock").context("read Cargo.lock")?;
    wasm_bindgen_in(&lock)
}

/// The wasm-bindgen version a Cargo.lock's text pins.
pub fn wasm_bindgen_in(lock: &str) -> anyhow::Result<String> {
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == "name = \"wasm-bindgen\""
            && let Some(version) = lines.next().and_then(|l| l.strip_prefix("version = \""))
        {
            return Ok(version.trim_end_matches('"').to_owned());
        }
    }
    bail!("Cargo.lock pins no wasm-bindgen")
}

/// Installs what is missing: the wasm32 target, worker-build, wasm-bindgen-cli, npm packages.
pub fn setup() -> anyhow::Result<()> {
    let installed = Command::new("rustup").args(["target", "list", "--installed"]).output().context("rustup")?;
    if String::from_utf8_lossy(&installed.stdout).contains("wasm32-unknown-unknown") {
        step("wasm32-unknown-unknown target: present");
    } else {
        step("installing the wasm32-unknown-unknown target");
        run(Command::new("rustup").args(["target", "add", "wasm32-unknown-unknown"]))?;
    }
    if version_of(&cargo_bin("worker-build")).is_some_and(|v| v.contains(WORKER_BUILD_VERSION)) {
        step(&format!("worker-build {WORKER_BUILD_VERSION}: present"));
    } else {
        step(&format!("installing worker-build {WORKER_BUILD_VERSION} (about 3 minutes)"));
        cargo(&["install", "worker-build", "--version", WORKER_BUILD_VERSION], &[])?;
    }
    let bindgen = locked_wasm_bindgen()?;
    if installed_wasm_bindgen().is_some_and(|v| v.trim().ends_with(&bindgen)) {
        step(&format!("wasm-bindgen-cli {bindgen}: present"));
    } else {
        step(&format!("installing wasm-bindgen-cli {bindgen} (about 2 minutes)"));
        // Not --locked: that fails on a yanked dependency of wasm-bindgen-cli.
        cargo(&["install", "wasm-bindgen-cli", "--version", &bindgen, "--force"], &[])?;
    }
    let npm_ready = PathBuf::from("node_modules/.bin/wrangler").exists()
        && PathBuf::from("node_modules/.bin/wasm-opt").exists()
        && modified("node_modules/.package-lock.json") >= modified("package-lock.json");
    if npm_ready {
        step("npm packages (wrangler, binaryen): present");
    } else {
        step("installing npm packages (wrangler, binaryen) with npm ci");
        run(Command::new("npm").args(["ci", "--no-audit", "--no-fund"]))?;
    }
    Ok(())
}

fn modified(path: &str) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Builds the edge worker (`edge/build`) and the `keyward` binary (debug, or release).
pub fn build(release: bool) -> anyhow::Result<()> {
    step("building the edge worker (worker-build, the `worker` profile)");
    let root = keyward_tests::repo_root();
    worker_build(&root.join("edge"), "build", None, &[])?;
    step("building the keyward binary");
    let mut args = vec!["build", "-p", "keyward-control-plane"];
    if release {
        args.push("--release");
    }
    cargo(&args, &[])
}

/// Builds the KV-only baseline edge (feature `kv-only-baseline`) into
/// [`keyward_tests::baseline::DIR`] (cargo's and worker-build's own checks make a repeat cheap)
/// and answers its entry module.
pub fn build_baseline() -> anyhow::Result<std::path::PathBuf> {
    use keyward_tests::baseline::DIR;
    step(&format!("building the KV-only baseline edge (feature kv-only-baseline) in {DIR}"));
    let root = keyward_tests::repo_root();
    let target_dir = root.join(DIR).join("cargo");
    worker_build(
        &root.join("edge"),
        &format!("../{DIR}/build"),
        Some(&target_dir),
        &["--features", "kv-only-baseline"],
    )?;
    keyward_tests::baseline::main_module()
}

/// `worker-build` of the edge crate in `crate_dir` into `out_dir` (relative to `crate_dir`, as
/// worker-build wants it), with `target_dir` as `CARGO_TARGET_DIR` if given and `cargo_args`
/// passed on to `cargo build`. Uses this checkout's wasm-bindgen-cli and wasm-opt. The profile
/// is the workspace's size-optimised `worker` profile, or `--release` for a revision that has
/// none (an older build for `--against`).
pub fn worker_build(
    crate_dir: &Path,
    out_dir: &str,
    target_dir: Option<&Path>,
    cargo_args: &[&str],
) -> anyhow::Result<()> {
    let root = keyward_tests::repo_root();
    let manifest = std::fs::read_to_string(crate_dir.join("../Cargo.toml")).unwrap_or_default();
    let profile: &[&str] =
        if manifest.contains("\n[profile.worker]\n") { &["--profile", "worker"] } else { &["--release"] };
    let mut command = Command::new(cargo_bin("worker-build"));
    command
        .args(profile)
        .args(["--out-dir", out_dir])
        .args(cargo_args)
        .current_dir(crate_dir)
        .env("WASM_BINDGEN_BIN", cargo_bin("wasm-bindgen"))
        .env("WASM_OPT_BIN", root.join("node_modules/.bin/wasm-opt"));
    if let Some(target_dir) = target_dir {
        command.env("CARGO_TARGET_DIR", target_dir);
    }
    run(&mut command)
}
