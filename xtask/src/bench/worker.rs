//! `cargo xtask bench worker`: the worker's upload size (what `wrangler deploy --dry-run`
//! reports, plain and gzipped) and its cold start: the time from starting a fresh worker process
//! (wrangler's dev server, its own empty persist directory, hosting its Durable Objects as a
//! deployed worker does) to its first answer, `/health` polled every 50 ms. Starts alternate
//! between the builds.

use std::time::Instant;

use anyhow::Context;
use keyward_tests::{Objects, RegionSpec, free_port, new_secret};

use super::{Build, Figures, order, percentile, report};
use crate::size;
use crate::tools::step;

pub fn run(starts: usize, against: Option<&str>) -> anyhow::Result<()> {
    let builds = super::builds(against)?;
    let mut figures = Vec::new();
    for build in &builds {
        let upload = size::measure(build.worker_main.as_deref())?;
        println!("{}: upload {:.2} KiB, gzip {:.2} KiB", build.label, upload.kib, upload.gzip_kib);
        let mut f = Figures::default();
        f.add("worker_upload_kib", upload.kib, 2);
        f.add("worker_gzip_kib", upload.gzip_kib, 2);
        figures.push(f);
    }
    let scratch = tempfile::Builder::new().prefix("keyward-cold-").tempdir()?;
    let mut times = vec![Vec::new(); builds.len()];
    for round in 0..starts {
        for i in order(round, builds.len()) {
            let ms = cold_start(&builds[i], &scratch.path().join(format!("{round}-{i}")))?;
            step(&format!("start {}/{starts}, {}: first answer after {ms:.0} ms", round + 1, builds[i].label));
            times[i].push(ms);
        }
    }
    for ((build, f), times) in builds.iter().zip(&mut figures).zip(&mut times) {
        let (p50, max) = (percentile(times, 0.5), percentile(times, 1.0));
        println!("{}: cold start to the first answer: p50 {p50:.0} ms, max {max:.0} ms", build.label);
        f.add("cold_start_p50_ms", p50, 0);
        f.add("cold_start_max_ms", max, 0);
    }
    match (&builds[..], &figures[..]) {
        ([old, _], [old_figures, current]) => report(current, Some((old, old_figures))),
        (_, [current]) => report(current, None),
        _ => unreachable!("one or two builds"),
    }
    Ok(())
}

/// Milliseconds from starting a fresh worker process of `build` in `dir` to its first 200.
fn cold_start(build: &Build, dir: &std::path::Path) -> anyhow::Result<f64> {
    let spec = RegionSpec {
        name: "cold".into(),
        port: free_port(),
        dir: dir.to_path_buf(),
        purge_secret: new_secret(),
        log_level: "error",
        objects: Objects::Host,
        registry: dir.join("registry"),
        main: Some(
            build.worker_main.clone().unwrap_or_else(|| keyward_tests::repo_root().join("edge/build/worker/shim.mjs")),
        ),
        vars: Vec::new(),
    };
    let started = Instant::now();
    let mut proc = spec.start().with_context(|| format!("start {}", build.label))?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    proc.stop();
    Ok(ms)
}
