//! Another revision's build, for `--against <rev>`: its worker and release `keyward`, built in
//! a throwaway git worktree under `target/against/` and kept there per commit id. Only these
//! artifacts are taken; the benches run them under this checkout's fixtures, so a revision
//! whose control plane's API or configuration differs from this one's cannot be driven.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use super::Build;
use crate::tools::{self, step};

/// Builds `rev` (once per commit) and answers it as a bench side.
pub fn build(rev: &str) -> anyhow::Result<Build> {
    let commit = git(&["rev-parse", "--verify", &format!("{rev}^{{commit}}")])
        .with_context(|| format!("`{rev}` names no commit of this repository"))?;
    let short = git(&["rev-parse", "--short", &commit])?;
    let root = keyward_tests::repo_root();
    let dir = root.join("target/against").join(&commit);
    let (main, keyward) = (dir.join("build/worker/shim.mjs"), dir.join("keyward"));
    if main.exists() && keyward.exists() {
        step(&format!("{rev} ({short}): built before, in {}", dir.display()));
    } else {
        build_in_worktree(&commit, &dir)?;
    }
    Ok(Build { label: format!("old {short}"), keyward, worker_main: Some(main) })
}

/// Builds only `rev`'s worker (once per commit), into `target/against/<commit>-worker/`, with
/// this checkout's cargo target dir (the dependencies are this checkout's, so only the
/// changed crates compile), and answers its entry module.
pub fn worker_only(rev: &str) -> anyhow::Result<PathBuf> {
    let commit = git(&["rev-parse", "--verify", &format!("{rev}^{{commit}}")])
        .with_context(|| format!("`{rev}` names no commit of this repository"))?;
    let root = keyward_tests::repo_root();
    let dir = root.join("target/against").join(format!("{commit}-worker"));
    let main = dir.join("build/worker/shim.mjs");
    if main.exists() {
        step(&format!("{rev}: its worker was built before, in {}", dir.display()));
        return Ok(main);
    }
    check_wasm_bindgen(&commit)?;
    let src = dir.join("src");
    step(&format!("building {rev}'s worker in a git worktree ({})", src.display()));
    let _ = std::fs::remove_dir_all(&src);
    tools::run(Command::new("git").args(["worktree", "prune"]))?;
    tools::run(Command::new("git").args(["worktree", "add", "--detach"]).arg(&src).arg(&commit))?;
    let built = tools::worker_build(&src.join("edge"), "../../build", Some(&root.join("target")), &[]);
    tools::run(Command::new("git").args(["worktree", "remove", "--force"]).arg(&src))?;
    built.map(|()| main)
}

/// Checks out `commit` in `dir/src`, builds its worker into `dir/build` and its release
/// `keyward` into `dir/keyward`, then removes the checkout. Cargo's target dir,
/// `target/against/cargo`, is shared by every revision built this way.
fn build_in_worktree(commit: &str, dir: &Path) -> anyhow::Result<()> {
    check_wasm_bindgen(commit)?;
    let root = keyward_tests::repo_root();
    let src = dir.join("src");
    let cargo_target = root.join("target/against/cargo");
    step(&format!("building {commit} in a git worktree ({}); about 10 minutes the first time", src.display()));
    let _ = std::fs::remove_dir_all(&src);
    tools::run(Command::new("git").args(["worktree", "prune"]))?;
    tools::run(Command::new("git").args(["worktree", "add", "--detach"]).arg(&src).arg(commit))?;
    let built = (|| {
        tools::worker_build(&src.join("edge"), "../../build", Some(&cargo_target), &[])?;
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo
            .args(["build", "--release", "-p", "keyward-control-plane"])
            .current_dir(&src)
            .env("CARGO_TARGET_DIR", &cargo_target);
        tools::run(&mut cargo)?;
        std::fs::copy(cargo_target.join("release/keyward"), dir.join("keyward")).context("copy keyward")?;
        Ok(())
    })();
    tools::run(Command::new("git").args(["worktree", "remove", "--force"]).arg(&src))?;
    built
}

/// The commit's wasm-bindgen must be the one installed: wasm-bindgen-cli reads only the
/// schema of its own version.
fn check_wasm_bindgen(commit: &str) -> anyhow::Result<()> {
    let pinned = tools::wasm_bindgen_in(&git(&["show", &format!("{commit}:Cargo.lock")])?)?;
    let installed = tools::installed_wasm_bindgen().unwrap_or_default();
    if !installed.trim().ends_with(&pinned) {
        bail!(
            "{commit} pins wasm-bindgen {pinned} but wasm-bindgen-cli here is `{}`: install the matching one with \
             `cargo install wasm-bindgen-cli --version {pinned} --force`, and run `cargo xtask setup` afterwards",
            installed.trim()
        );
    }
    Ok(())
}

/// Runs git with these arguments and answers its output, trimmed.
fn git(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git").args(args).output().context("run git")?;
    if !out.status.success() {
        bail!("git {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
