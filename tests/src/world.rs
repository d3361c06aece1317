//! A whole local Keyward for one test: edge regions, a control plane on its own SQLite file, a
//! bootstrap root key, all in one temporary directory that is scanned for plaintext keys at the end.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use reqwest::Method;
use serde_json::Value;

use crate::{Proc, RegionSpec, free_port, new_root_key, new_secret, start_control_plane};

/// How a region of the test world behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionPlan {
    /// Running, with the control plane's purge secret.
    Up,
    /// Configured but never started: nothing listens on its port.
    Down,
    /// Running, but with a purge secret other than the control plane's.
    WrongSecret,
}

/// Whether the slow whole-system tests should run (`cargo xtask test` sets `KEYWARD_E2E=1`).
pub fn e2e_enabled() -> bool {
    let on = std::env::var("KEYWARD_E2E").is_ok_and(|v| v == "1");
    if !on {
        eprintln!("skipping a whole-system test: set KEYWARD_E2E=1 (`cargo xtask test` does)");
    }
    on
}

pub struct Region {
    pub spec: RegionSpec,
    pub plan: RegionPlan,
    proc: Option<Proc>,
}

pub struct World {
    pub dir: tempfile::TempDir,
    pub root_key: String,
    pub secret: String,
    pub regions: Vec<Region>,
    pub cp_port: u16,
    config: PathBuf,
    control_plane: Option<Proc>,
    client: reqwest::blocking::Client,
    seen: RefCell<Vec<String>>,
}

impl World {
    pub fn start(plans: &[RegionPlan]) -> anyhow::Result<World> {
        World::start_with(plans, "warn")
    }

    /// Like [`World::start`], with wrangler's log level (`error` for benchmarks).
    pub fn start_with(plans: &[RegionPlan], log_level: &'static str) -> anyhow::Result<World> {
        let dir = tempfile::Builder::new().prefix("keyward-e2e-").tempdir()?;
        let secret = new_secret();
        let mut regions = Vec::new();
        for (i, plan) in plans.iter().enumerate() {
            let spec = RegionSpec {
                name: format!("r{i}"),
                port: free_port(),
                dir: dir.path().join(format!("region-r{i}")),
                purge_secret: if *plan == RegionPlan::WrongSecret { new_secret() } else { secret.clone() },
                log_level,
            };
            let proc = if *plan == RegionPlan::Down { None } else { Some(spec.start()?) };
            regions.push(Region { spec, plan: *plan, proc });
        }
        let cp_port = free_port();
        let config = dir.path().join("keyward.toml");
        let mut text = format!(
            "listen = \"127.0.0.1:{cp_port}\"\ndatabase = \"{}\"\npurge_secret = \"{secret}\"\n",
            dir.path().join("keyward.sqlite").display()
        );
        for region in &regions {
            text.push_str(&region.spec.config_toml());
        }
        std::fs::write(&config, text)?;
        let root_key = new_root_key();
        let control_plane = start_control_plane(&config, &root_key, cp_port, &dir.path().join("control-plane.log"))?;
        let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build()?;
        let world = World {
            dir,
            root_key: root_key.clone(),
            secret,
            regions,
            cp_port,
            config,
            control_plane: Some(control_plane),
            client,
            seen: RefCell::new(Vec::new()),
        };
        world.remember(&root_key);
        Ok(world)
    }

    pub fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.cp_port)
    }

    /// Keeps a plaintext key to look for in [`World::assert_no_plaintext`].
    pub fn remember(&self, key: &str) {
        self.seen.borrow_mut().push(key.to_owned());
    }

    /// One HTTP call; answers the status and the JSON body (`null` if none). Any `key` field
    /// in the answer is remembered for the plaintext scan.
    pub fn call(
        &self,
        base: &str,
        root_key: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.client.request(method, format!("{base}{path}"));
        if let Some(root_key) = root_key {
            request = request.bearer_auth(root_key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = response.status().as_u16();
        let text = response.text().unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        for key in [&value["key"], &value["root_key"]["key"]] {
            if let Some(key) = key.as_str() {
                self.remember(key);
            }
        }
        (status, value)
    }

    /// An admin call to the control plane with the bootstrap root key.
    pub fn admin(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call(&self.origin(), Some(&self.root_key.clone()), method, path, body)
    }

    /// `POST /v1/keys/verify` at region `i` with this root key.
    pub fn edge_verify(&self, i: usize, root_key: &str, body: Value) -> (u16, Value) {
        self.call(&self.regions[i].spec.url(), Some(root_key), Method::POST, "/v1/keys/verify", Some(body))
    }

    /// `POST /v1/keys/verify` at the origin with this root key.
    pub fn origin_verify(&self, root_key: &str, body: Value) -> (u16, Value) {
        self.call(&self.origin(), Some(root_key), Method::POST, "/v1/keys/verify", Some(body))
    }

    /// Creates an API and answers its id.
    pub fn create_api(&self, name: &str, max_staleness_ms: u64) -> String {
        let body = serde_json::json!({ "name": name, "prefix": "sk_test", "max_staleness_ms": max_staleness_ms });
        let (status, api) = self.admin(Method::POST, "/v1/apis", Some(body));
        assert_eq!(status, 201, "{api}");
        api["id"].as_str().expect("api id").to_owned()
    }

    /// Creates a key and answers (id, plaintext).
    pub fn create_key(&self, api_id: &str, extra: Value) -> (String, String) {
        let mut body = serde_json::json!({ "api_id": api_id, "name": "test key" });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        let (status, key) = self.admin(Method::POST, "/v1/keys", Some(body));
        assert_eq!(status, 201, "{key}");
        (key["id"].as_str().expect("id").to_owned(), key["key"].as_str().expect("key").to_owned())
    }

    /// Stops the control plane (TERM, as an operator would) and starts it again on the same
    /// database and config.
    pub fn restart_control_plane(&mut self) -> anyhow::Result<()> {
        if let Some(mut proc) = self.control_plane.take() {
            proc.stop();
        }
        let log = self.dir.path().join("control-plane.log");
        self.control_plane = Some(start_control_plane(&self.config, &self.root_key, self.cp_port, &log)?);
        Ok(())
    }

    /// Stops every process (so logs and databases are flushed), then reads every file of the
    /// run — SQLite with its `-wal` and `-shm`, wrangler's persist directories, every log — and
    /// fails if any plaintext key seen in this test appears in one.
    pub fn assert_no_plaintext(&mut self) {
        self.control_plane.take();
        for region in &mut self.regions {
            region.proc.take();
        }
        let seen = self.seen.borrow().clone();
        assert!(!seen.is_empty(), "the scan needs keys to look for");
        let mut files = Vec::new();
        walk(self.dir.path(), &mut files).expect("walk the test directory");
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        for must in ["keyward.sqlite", "control-plane.log", "wrangler.log"] {
            assert!(names.iter().any(|n| n.contains(must)), "expected a {must} file to scan among {names:?}");
        }
        for file in &files {
            let bytes = std::fs::read(file).unwrap_or_default();
            for key in &seen {
                assert!(!contains(&bytes, key.as_bytes()), "plaintext key {}… found in {}", &key[..12], file.display());
            }
        }
        eprintln!("scanned {} files for {} plaintext keys: none found", files.len(), seen.len());
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
