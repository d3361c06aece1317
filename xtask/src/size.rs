//! The worker's upload size and its budget. `wrangler deploy --dry-run` bundles the built worker
//! (`edge/build`) exactly as a deploy would upload it and prints its size, plain and gzipped;
//! Cloudflare's limits and the cold start go by that upload. `cargo xtask test` fails when the
//! gzipped upload grows past [`GZIP_BUDGET_KIB`], so a feature that needs more says so in review
//! (raise the budget in the same change, with what the space buys, in BENCHMARKS.md).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

use crate::tools::step;

/// Most KiB the worker's gzipped upload may take, as `wrangler deploy --dry-run` reports it.
pub const GZIP_BUDGET_KIB: f64 = 310.0;

/// What `wrangler deploy --dry-run` reported for the built worker.
pub struct Upload {
    pub kib: f64,
    pub gzip_kib: f64,
}

/// Bundles the worker whose entry module is `main` (this checkout's `edge/build` when `None`)
/// with `wrangler deploy --dry-run` (no account, no network), configured as `wrangler.toml`
/// deploys it, into a scratch directory under `target/`, and answers its reported size.
pub fn measure(main: Option<&Path>) -> anyhow::Result<Upload> {
    let root = keyward_tests::repo_root();
    let out_dir = root.join("target/worker-upload");
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir)?;
    let main = main.map_or_else(|| root.join("edge/build/worker/shim.mjs"), Path::to_path_buf);
    let deployed = std::fs::read_to_string(root.join("wrangler.toml")).context("read wrangler.toml")?;
    let config: String = deployed
        .lines()
        .map(|line| {
            if line.starts_with("main = ") {
                format!("main = {:?}", main.display().to_string())
            } else {
                line.to_owned()
            }
        })
        .map(|line| line + "\n")
        .collect();
    let config_path = out_dir.join("wrangler.toml");
    std::fs::write(&config_path, config)?;
    let out = Command::new(root.join("node_modules/.bin/wrangler"))
        .args(["deploy", "--dry-run", "--config"])
        .arg(&config_path)
        .arg("--outdir")
        .arg(out_dir.join("bundle"))
        .current_dir(&root)
        .env("WRANGLER_SEND_METRICS", "false")
        .env("CI", "1")
        .output()
        .context("run wrangler deploy --dry-run")?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("wrangler deploy --dry-run failed:\n{text}");
    }
    upload_in(&text).with_context(|| format!("wrangler printed no `Total Upload: <n> KiB / gzip: <n> KiB`:\n{text}"))
}

/// The sizes in wrangler's `Total Upload: 512.25 KiB / gzip: 180.10 KiB` line.
fn upload_in(text: &str) -> Option<Upload> {
    let line = text.lines().find_map(|l| l.trim().strip_prefix("Total Upload:"))?;
    let (plain, gzip) = line.split_once("/ gzip:")?;
    let kib = |s: &str| s.trim().strip_suffix("KiB")?.trim().parse::<f64>().ok();
    Some(Upload { kib: kib(plain)?, gzip_kib: kib(gzip)? })
}

/// Fails when the built worker's gzipped upload is over [`GZIP_BUDGET_KIB`].
pub fn check() -> anyhow::Result<()> {
    let upload = measure(None)?;
    if upload.gzip_kib > GZIP_BUDGET_KIB {
        bail!(
            "the worker's upload is {:.2} KiB gzipped ({:.2} KiB plain), over its budget of {GZIP_BUDGET_KIB} KiB \
             (GZIP_BUDGET_KIB in xtask/src/size.rs): find what grew with twiggy (BENCHMARKS.md, \"what takes the \
             space\") and cut it, or raise the budget saying what the space buys",
            upload.gzip_kib,
            upload.kib
        );
    }
    step(&format!(
        "worker upload: {:.2} KiB gzipped ({:.2} KiB plain), within the budget of {GZIP_BUDGET_KIB} KiB",
        upload.gzip_kib, upload.kib
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::upload_in;

    #[test]
    fn reads_wranglers_size_line() {
        let text = " ⛅️ wrangler 4.86.0\n───\nTotal Upload: 821.66 KiB / gzip: 321.54 KiB\nYour Worker has access to";
        let upload = upload_in(text).expect("a size line");
        assert_eq!((upload.kib, upload.gzip_kib), (821.66, 321.54));
        assert!(upload_in("Total Upload: 1 MiB / gzip: 300 KiB").is_none());
        assert!(upload_in("no size here").is_none());
    }
}
