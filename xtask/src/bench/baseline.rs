//! The KV-only baseline edge: this checkout's edge built with the `kv-only-baseline` feature,
//! whose key lookups never ask the key's authority (a miss or a stale copy reads KV alone).
//! It is what the authority's cost is measured against: run beside a test world's regions,
//! bound to the same home (root keys are confirmed there, as in the real edge), its KV filled
//! with copies of region 0's records.

use std::path::PathBuf;

use anyhow::Context;
use keyward_tests::world::World;
use keyward_tests::{LOCAL_NAMESPACE, Objects, Proc, RegionSpec};

use crate::tools::{self, step};

/// Where the baseline is built, apart from `edge/build` and the workspace's target dir, so
/// neither build undoes the other.
const DIR: &str = "target/kv-only-baseline";

/// Builds the baseline (cargo's and worker-build's own checks make a repeat cheap) and answers
/// its entry module.
pub fn build() -> anyhow::Result<PathBuf> {
    step(&format!("building the KV-only baseline edge (feature kv-only-baseline) in {DIR}"));
    let root = keyward_tests::repo_root();
    tools::worker_build(
        &root.join("edge"),
        &format!("../{DIR}/build"),
        Some(&root.join(DIR).join("cargo")),
        &["--features", "kv-only-baseline"],
    )?;
    Ok(root.join(DIR).join("build/worker/shim.mjs"))
}

/// A running baseline edge beside a world.
pub struct Baseline {
    pub spec: RegionSpec,
    _proc: Proc,
}

impl Baseline {
    /// Starts the baseline from `main` beside `world`, bound to its home, with copies of region
    /// 0's records of the world's root key.
    pub fn start(world: &World, main: PathBuf) -> anyhow::Result<Baseline> {
        let spec = RegionSpec {
            name: "kv-only".into(),
            port: keyward_tests::free_port(),
            dir: world.dir.path().join("worker-kv-only"),
            purge_secret: world.secret.clone(),
            log_level: "error",
            objects: Objects::In(world.home.worker_name()),
            registry: world.dir.path().join("registry"),
            main: Some(main),
            vars: vec![("CALLER_MISSES_PER_SECOND".to_owned(), "1000000".to_owned())],
        };
        let baseline = Baseline { _proc: spec.start()?, spec };
        let root_hash = keyward_shared::KeyHash::of(&world.root_key);
        baseline.copy(world, &[keyward_shared::kv_key_for_root(&root_hash)])?;
        Ok(baseline)
    }

    pub fn url(&self) -> String {
        self.spec.url()
    }

    /// Copies region 0's records of these keys into the baseline's KV.
    pub fn copy_keys(&self, world: &World, keys: &[String]) -> anyhow::Result<()> {
        let kv_keys: Vec<String> =
            keys.iter().map(|k| keyward_shared::kv_key_for_key(&keyward_shared::KeyHash::of(k))).collect();
        self.copy(world, &kv_keys)
    }

    fn copy(&self, world: &World, kv_keys: &[String]) -> anyhow::Result<()> {
        let client = reqwest::blocking::Client::new();
        for kv_key in kv_keys {
            let path = format!("/storage/kv/namespaces/{LOCAL_NAMESPACE}/values/{}", kv_key.replace(':', "%3A"));
            let value = client
                .get(format!("{}{path}", world.regions[0].spec.kv_url()))
                .send()?
                .error_for_status()
                .with_context(|| format!("region 0's KV has no {kv_key}"))?
                .text()?;
            client.put(format!("{}{path}", self.spec.kv_url())).body(value).send()?.error_for_status()?;
        }
        Ok(())
    }
}
