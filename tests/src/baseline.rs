//! The KV-only baseline edge: this checkout's edge built with the `kv-only-baseline` feature
//! (`cargo xtask build --baseline`), whose key lookups never ask the key's authority (a miss or
//! a stale copy reads KV alone). Benchmarks measure the authority's cost against it; the proof
//! tests use it as a region that answers from an old record past the promise's bound, the fault
//! the real edge is built never to commit. It runs beside a test world's regions, bound to the
//! same home (root keys are confirmed there, as in the real edge), outside the control plane's
//! config: no change is written to its KV or purged in it, so it keeps whatever copies it is
//! given.

use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::world::World;
use crate::{LOCAL_NAMESPACE, Objects, Proc, RegionSpec};

/// Where the baseline is built (relative to the repository), apart from `edge/build` and the
/// workspace's target dir, so neither build undoes the other.
pub const DIR: &str = "target/kv-only-baseline";

/// The built baseline's entry module, or how to build it.
pub fn main_module() -> anyhow::Result<PathBuf> {
    let main = crate::repo_root().join(DIR).join("build/worker/shim.mjs");
    if !main.exists() {
        bail!(
            "the KV-only baseline edge is not built ({} is missing): run `cargo xtask build --baseline`",
            main.display()
        );
    }
    Ok(main)
}

/// A running baseline edge beside a world.
pub struct Baseline {
    pub spec: RegionSpec,
    _proc: Proc,
}

impl Baseline {
    /// Starts the baseline from `main` beside `world`, named `name` (its `REGION`), bound to the
    /// world's home, with `vars` (see `World::region_vars` for the regions' own) and copies of
    /// region 0's records of the world's root key.
    pub fn start(world: &World, main: PathBuf, name: &str, vars: Vec<(String, String)>) -> anyhow::Result<Baseline> {
        let spec = RegionSpec {
            name: name.into(),
            port: crate::free_port(),
            dir: world.dir.path().join(format!("worker-{name}")),
            purge_secret: world.secret.clone(),
            log_level: "error",
            objects: Objects::In(world.home.worker_name()),
            registry: world.dir.path().join("registry"),
            main: Some(main),
            vars,
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
