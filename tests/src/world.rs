//! A whole local Keyward for one test: a home process for the KeyState Durable Objects, edge
//! regions, a control plane on its own SQLite file, a bootstrap root key, all in one temporary
//! directory that is scanned for plaintext keys at the end. Optionally placed in a
//! [`Geography`]: every link that crosses a network in production passes a delayed relay.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::Method;
use serde_json::Value;

use crate::gate::Gate;
use crate::geography::{self, Geography};
use crate::{Objects, Proc, RegionSpec, free_port, new_root_key, new_secret, start_control_plane_with};

/// How a region of the test world behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionPlan {
    /// Running, with the control plane's purge secret.
    Up,
    /// Configured but never started: nothing listens on its port.
    Down,
    /// Running, but with a purge secret other than the control plane's.
    WrongSecret,
    /// Running, with a purge secret one byte shorter than a worker accepts
    /// (`keyward_shared::internal::MIN_SECRET_BYTES`).
    ShortSecret,
    /// Running; the control plane reaches its purge route through a [`Gate`] the test can shut.
    Gated,
    /// Running; KV writes reach it this many milliseconds late.
    DelayedKv(u64),
}

/// How every region of a test world purges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeMode {
    /// A signed purge puts its record in memory and drops the Cache API copy.
    Record,
    /// Only the Cache API copy is dropped, this many milliseconds after the acknowledgement,
    /// as Cloudflare's purge-by-tag does in production (isolate memory is not reached).
    TagOnly(u64),
}

/// What a test world is made of besides its regions.
#[derive(Debug, Clone)]
pub struct Options {
    /// wrangler's log level (`warn` for tests, `error` for benchmarks).
    pub log_level: &'static str,
    pub purge_mode: PurgeMode,
    /// The control plane reaches the authority through a [`Gate`] (`World::authority_gate`);
    /// regions still reach it directly.
    pub gated_authority: bool,
    /// Regions ship usage events to the control plane through a [`Gate`] (`World::usage_gate`).
    pub gated_usage: bool,
    /// More `[vars]` for every worker (`COPY_MEMORY_BYTES`, ...).
    pub vars: Vec<(String, String)>,
    /// The delays of the links between processes; `None`: plain loopback. By default the one
    /// named by `KEYWARD_GEOGRAPHY` (a preset's name, or `none`).
    pub geography: Option<Geography>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            log_level: "warn",
            purge_mode: PurgeMode::Record,
            gated_authority: false,
            gated_usage: false,
            vars: Vec::new(),
            geography: Geography::from_env().unwrap_or_else(|e| panic!("KEYWARD_GEOGRAPHY: {e:#}")),
        }
    }
}

pub struct Region {
    pub spec: RegionSpec,
    pub plan: RegionPlan,
    /// Between the control plane and the region's purge route, for [`RegionPlan::Gated`].
    pub gate: Option<Gate>,
    /// Between the control plane and the region's KV, for [`RegionPlan::Gated`].
    pub kv_gate: Option<Gate>,
    /// Between the control plane and the region (purges and KV writes), delayed by the
    /// geography's link, for a running region that is not gated (gates then carry the delay).
    pub link: Option<Gate>,
    /// Between the region and the home's Durable Objects, delayed by the geography's link.
    pub authority_relay: Option<Gate>,
    proc: Option<Proc>,
}

impl Region {
    /// Region `i` with its gates and, under a geography, its delayed relays; started unless
    /// its plan is [`RegionPlan::Down`].
    fn start(
        mut spec: RegionSpec,
        plan: RegionPlan,
        i: usize,
        home: &RegionSpec,
        geography: Option<&Geography>,
        dir: &Path,
    ) -> anyhow::Result<Region> {
        let to_region = geography.map(|g| g.control_to_region(i));
        let authority_relay = match geography {
            Some(g) => {
                let registry = dir.join(format!("registry-{}", spec.name));
                Some(geography::route_to_home(home, &mut spec, registry, g.region_to_home(i))?)
            }
            None => None,
        };
        let proc = if plan == RegionPlan::Down { None } else { Some(spec.start()?) };
        let gated = plan == RegionPlan::Gated;
        let gate = if gated { Some(Gate::start_with(spec.port, to_region)?) } else { None };
        let kv_gate = if gated { Some(Gate::start_with(spec.port, to_region)?) } else { None };
        let link = match to_region {
            Some(link) if !gated && plan != RegionPlan::Down => Some(Gate::start_with(spec.port, Some(link))?),
            _ => None,
        };
        Ok(Region { spec, plan, gate, kv_gate, link, authority_relay, proc })
    }
}

pub struct World {
    pub dir: tempfile::TempDir,
    pub root_key: String,
    pub secret: String,
    pub home: RegionSpec,
    pub regions: Vec<Region>,
    pub cp_port: u16,
    /// Between the control plane and the authority, when [`Options::gated_authority`] or a
    /// geography (then delayed by its link).
    pub authority_gate: Option<Gate>,
    /// Between the regions and the control plane's usage ingestion, when [`Options::gated_usage`].
    pub usage_gate: Option<Gate>,
    pub geography: Option<Geography>,
    config: PathBuf,
    home_proc: Option<Proc>,
    control_plane: Option<Proc>,
    client: reqwest::blocking::Client,
    seen: std::sync::Mutex<Vec<String>>,
}

impl World {
    pub fn start(plans: &[RegionPlan]) -> anyhow::Result<World> {
        World::start_opts(plans, Options::default())
    }

    /// Like [`World::start`], with wrangler's log level (`error` for benchmarks).
    pub fn start_with(plans: &[RegionPlan], log_level: &'static str) -> anyhow::Result<World> {
        World::start_opts(plans, Options { log_level, ..Options::default() })
    }

    /// A world with these regions and options.
    pub fn start_opts(plans: &[RegionPlan], options: Options) -> anyhow::Result<World> {
        let log_level = options.log_level;
        let geography = options.geography.clone();
        let mut vars = match options.purge_mode {
            PurgeMode::Record => Vec::new(),
            PurgeMode::TagOnly(delay_ms) => vec![
                ("PURGE_MODE".to_owned(), "tag-only".to_owned()),
                ("PURGE_TAG_DELAY_MS".to_owned(), delay_ms.to_string()),
            ],
        };
        // Every region ships its usage events to the control plane (`USAGE_SHIPPING=off` in
        // `options.vars` turns that off).
        let cp_port = free_port();
        let usage_gate = if options.gated_usage { Some(Gate::start(cp_port)?) } else { None };
        let usage_url = usage_gate.as_ref().map_or_else(|| format!("http://127.0.0.1:{cp_port}"), Gate::url);
        vars.push(("USAGE_URL".to_owned(), usage_url));
        vars.extend(options.vars);
        let dir = tempfile::Builder::new().prefix("keyward-e2e-").tempdir()?;
        let secret = new_secret();
        let registry = dir.path().join("registry");
        let spec = |name: String, secret: String, objects: Objects| RegionSpec {
            port: free_port(),
            dir: dir.path().join(format!("worker-{name}")),
            name,
            purge_secret: secret,
            log_level,
            objects,
            registry: registry.clone(),
            main: None,
            vars: vars.clone(),
        };
        let home = spec("home".into(), secret.clone(), Objects::Host);
        let home_proc = Some(home.start()?);
        let mut regions = Vec::new();
        for (i, plan) in plans.iter().enumerate() {
            let region_secret = match plan {
                RegionPlan::WrongSecret => new_secret(),
                RegionPlan::ShortSecret => secret[..keyward_shared::internal::MIN_SECRET_BYTES - 1].to_owned(),
                _ => secret.clone(),
            };
            let spec = spec(format!("r{i}"), region_secret, Objects::In(home.worker_name()));
            regions.push(Region::start(spec, *plan, i, &home, geography.as_ref(), dir.path())?);
        }
        let authority_gate = match &geography {
            Some(geography) => Some(Gate::start_with(home.port, Some(geography.control_to_home))?),
            None if options.gated_authority => Some(Gate::start(home.port)?),
            None => None,
        };
        let authority_url = authority_gate.as_ref().map_or_else(|| home.url(), Gate::url);
        let config = dir.path().join("keyward.toml");
        std::fs::write(&config, Self::control_plane_toml(dir.path(), cp_port, &secret, &authority_url, &regions))?;
        let root_key = new_root_key();
        let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build()?;
        let mut world = World {
            dir,
            root_key: root_key.clone(),
            secret,
            home,
            regions,
            cp_port,
            authority_gate,
            usage_gate,
            geography,
            config,
            home_proc,
            control_plane: None,
            client,
            seen: std::sync::Mutex::new(Vec::new()),
        };
        world.start_control_plane(&[])?;
        world.remember(&root_key);
        Ok(world)
    }

    pub fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.cp_port)
    }

    /// The `keyward` CLI with these arguments, pointed at this world's control plane with its
    /// root key.
    pub fn cli_command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(crate::keyward_bin());
        command.args(args).env("KEYWARD_URL", self.origin()).env("KEYWARD_ROOT_KEY", &self.root_key);
        command
    }

    /// Runs the `keyward` CLI (as [`World::cli_command`]), which must succeed; answers what it
    /// printed.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = self.cli_command(args).output().expect("the keyward binary runs");
        assert!(output.status.success(), "keyward {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Keeps a plaintext key to look for in [`World::assert_no_plaintext`].
    pub fn remember(&self, key: &str) {
        self.seen.lock().expect("not poisoned").push(key.to_owned());
    }

    /// One HTTP call; answers the status and the JSON body (`null` if none). Any `key` field
    /// in the answer is remembered for the plaintext scan. A connection error is status 0.
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
        let response = match request.send() {
            Ok(response) => response,
            Err(e) => return (0, Value::String(e.to_string())),
        };
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

    /// Region `i`'s HTTP status for verifying `key` as `root_key`, and its code: the outcome's,
    /// or the error's when the caller was refused.
    pub fn verify_status(&self, i: usize, root_key: &str, key: &str) -> (u16, String) {
        let (status, answer) = self.edge_verify(i, root_key, serde_json::json!({ "key": key }));
        let code = answer["code"].as_str().or(answer["error"]["code"].as_str()).unwrap_or("?");
        (status, code.to_owned())
    }

    /// The code region `i` answers for `key` with the bootstrap root key.
    pub fn edge_code(&self, i: usize, key: &str) -> (String, String) {
        let (status, answer) = self.edge_verify(i, &self.root_key.clone(), serde_json::json!({ "key": key }));
        assert_eq!(status, 200, "region {i} answered {status}: {answer}");
        (answer["code"].as_str().unwrap_or("?").to_owned(), answer["source"].as_str().unwrap_or("?").to_owned())
    }

    /// Verifies `key` in region `i` until it is served from an edge copy (memory or cache).
    pub fn make_hot(&self, i: usize, key: &str) {
        self.wait_for(&format!("region {i} to serve the key from memory"), Duration::from_secs(10), || {
            let (code, source) = self.edge_code(i, key);
            assert_eq!(code, "VALID", "region {i} before revocation");
            (source == "memory").then_some(())
        });
    }

    /// The record region `i`'s KV holds for `key` right now, read through wrangler's local
    /// Cloudflare-format endpoint.
    pub fn region_kv_record(&self, i: usize, key: &str) -> Option<Value> {
        self.region_kv(i, &format!("key:{}", keyward_shared::KeyHash::of(key).to_hex()))
    }

    /// The value region `i`'s KV holds under `kv_key` right now.
    pub fn region_kv(&self, i: usize, kv_key: &str) -> Option<Value> {
        let kv_key = kv_key.replace(':', "%3A");
        let url = format!(
            "{}/storage/kv/namespaces/{}/values/{kv_key}",
            self.regions[i].spec.kv_url(),
            crate::LOCAL_NAMESPACE
        );
        let response = self.client.get(url).send().ok()?;
        if !response.status().is_success() {
            return None;
        }
        serde_json::from_str(&response.text().ok()?).ok()
    }

    /// A request to a worker's internal route at `base`, signed with the world's secret at
    /// `timestamp_ms` with `nonce`; answers the status and the body's text.
    /// The control plane's config: its port, database and secret, the authority, and each region
    /// as the control plane reaches it (through its gates and links, where it has them).
    fn control_plane_toml(
        dir: &std::path::Path,
        cp_port: u16,
        secret: &str,
        authority_url: &str,
        regions: &[Region],
    ) -> String {
        let mut text = format!(
            "listen = \"127.0.0.1:{cp_port}\"\ndatabase = \"{}\"\npurge_secret = \"{secret}\"\nauthority_url = \"{authority_url}\"\n",
            dir.join("keyward.sqlite").display(),
        );
        for region in regions {
            let direct = region.link.as_ref().map_or_else(|| region.spec.url(), Gate::url);
            let purge_url = region.gate.as_ref().map_or_else(|| direct.clone(), Gate::url);
            let kv_base = region.kv_gate.as_ref().map_or_else(|| direct.clone(), Gate::url);
            let delay = if let RegionPlan::DelayedKv(ms) = region.plan { ms } else { 0 };
            text.push_str(&region.spec.config_toml(&purge_url, &kv_base, delay));
        }
        text
    }

    pub fn signed_post(&self, base: &str, path: &str, body: &Value, timestamp_ms: i64, nonce: &str) -> (u16, String) {
        signed_post(&self.secret, base, path, body, timestamp_ms, nonce)
    }

    /// The memory and confirmation counts of the worker at `base` (a region's or the home's),
    /// from its signed stats route, each call with a nonce of its own.
    pub fn memory_stats(&self, base: &str) -> keyward_shared::internal::MemoryStats {
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let nonce = format!("memory-stats-{}-{n:06}", crate::now_ms());
        let body = serde_json::json!({});
        let (status, text) =
            self.signed_post(base, keyward_shared::internal::STATS_PATH, &body, crate::now_ms(), &nonce);
        assert_eq!(status, 200, "stats of {base}: {text}");
        serde_json::from_str(&text).expect("memory stats")
    }

    /// Writes `value` under `kv_key` straight into region `i`'s KV (what a late KV write does).
    pub fn put_region_kv(&self, i: usize, kv_key: &str, value: &Value) {
        let url = format!(
            "{}/storage/kv/namespaces/{}/values/{}",
            self.regions[i].spec.kv_url(),
            crate::LOCAL_NAMESPACE,
            kv_key.replace(':', "%3A")
        );
        let response = self.client.put(url).body(value.to_string()).send().expect("KV write");
        assert!(response.status().is_success(), "KV write answered {}", response.status());
    }

    /// `GET /v1/regions`.
    pub fn regions_status(&self) -> Value {
        let (status, answer) = self.admin(Method::GET, "/v1/regions", None);
        assert_eq!(status, 200, "{answer}");
        answer
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

    fn start_control_plane(&mut self, env: &[(&str, &str)]) -> anyhow::Result<()> {
        let log = self.dir.path().join("control-plane.log");
        self.control_plane = Some(start_control_plane_with(&self.config, &self.root_key, self.cp_port, &log, env)?);
        Ok(())
    }

    /// The running control plane's `/metrics` URL, as it printed it on starting (it listens on a
    /// port the system chose).
    pub fn metrics_url(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("control-plane.log")).unwrap_or_default();
        let line = log.lines().rev().find_map(|l| l.strip_prefix("keyward metrics on "));
        line.expect("the control plane printed its metrics address").to_owned()
    }

    /// Stops the control plane (TERM, as an operator would) and starts it again on the same
    /// database and config, with `env` added (a failpoint, say).
    pub fn restart_control_plane_with(&mut self, env: &[(&str, &str)]) -> anyhow::Result<()> {
        if let Some(mut proc) = self.control_plane.take() {
            proc.stop();
        }
        self.start_control_plane(env)
    }

    pub fn restart_control_plane(&mut self) -> anyhow::Result<()> {
        self.restart_control_plane_with(&[])
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) the control plane: it accepts connections and
    /// answers none while stopped.
    pub fn freeze_control_plane(&self, frozen: bool) {
        if let Some(proc) = &self.control_plane {
            proc.signal(if frozen { "STOP" } else { "CONT" });
        }
    }

    /// Waits until the control plane's process has exited (after a failpoint, say).
    pub fn wait_control_plane_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.control_plane.as_mut().is_none_or(Proc::exited) {
                self.control_plane.take();
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Fails, with the end of its log, if a process that should run has exited.
    pub fn assert_alive(&mut self) {
        let procs = self
            .home_proc
            .iter_mut()
            .chain(self.control_plane.iter_mut())
            .chain(self.regions.iter_mut().filter_map(|r| r.proc.as_mut()));
        for proc in procs {
            if proc.exited() {
                let log = std::fs::read_to_string(&proc.log).unwrap_or_default();
                let tail: String =
                    log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
                panic!("{} exited; the end of its log:\n{tail}", proc.name);
            }
        }
    }

    /// Stops region `i`'s process (the whole group).
    pub fn stop_region(&mut self, i: usize) {
        self.regions[i].proc.take();
    }

    /// Starts region `i` again on its persist directory: KV and Cache API kept, memory empty.
    pub fn start_region(&mut self, i: usize) -> anyhow::Result<()> {
        self.regions[i].proc = Some(self.regions[i].spec.start()?);
        Ok(())
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) the home of the authority: a process that holds its
    /// connections and never answers.
    pub fn freeze_home(&self, frozen: bool) {
        if let Some(proc) = &self.home_proc {
            proc.signal(if frozen { "STOP" } else { "CONT" });
        }
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) region `i`'s processes.
    pub fn freeze_region(&self, i: usize, frozen: bool) {
        if let Some(proc) = &self.regions[i].proc {
            proc.signal(if frozen { "STOP" } else { "CONT" });
        }
    }

    /// Freezes region `i` (SIGSTOP: it accepts connections and answers nothing) and thaws it
    /// `for_` from now, whatever the caller is blocked on meanwhile; answers the thawing process.
    pub fn freeze_region_for(&self, i: usize, for_: Duration) -> anyhow::Result<std::process::Child> {
        let proc = self.regions[i].proc.as_ref().ok_or_else(|| anyhow::anyhow!("r{i} has no process"))?;
        proc.signal("STOP");
        proc.signal_after("CONT", for_)
    }

    pub fn stop_home(&mut self) {
        self.home_proc.take();
    }

    /// Starts the home again; under a geography each region gets a relay to its new debug port.
    pub fn start_home(&mut self) -> anyhow::Result<()> {
        // The stopped home's dev registry entry names its old debug port.
        let _ = std::fs::remove_file(self.home.registry.join(self.home.worker_name()));
        self.home_proc = Some(self.home.start()?);
        let Some(geography) = &self.geography else { return Ok(()) };
        for (i, region) in self.regions.iter_mut().enumerate() {
            let registry = region.spec.registry.clone();
            let link = geography.region_to_home(i);
            region.authority_relay = Some(geography::route_to_home(&self.home, &mut region.spec, registry, link)?);
        }
        Ok(())
    }

    /// Polls `check` every 20 ms until it answers `Some`, or fails after `timeout`.
    pub fn wait_for<T>(&self, what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = check() {
                return value;
            }
            assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops every process (so logs and databases are flushed), then reads every file of the
    /// run — SQLite with its `-wal` and `-shm`, wrangler's persist directories, every log — and
    /// fails if any plaintext key seen in this test appears in one.
    pub fn assert_no_plaintext(&mut self) {
        self.control_plane.take();
        self.home_proc.take();
        for region in &mut self.regions {
            region.proc.take();
        }
        let seen = self.seen.lock().expect("not poisoned").clone();
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

/// A request to a worker's internal route at `base`, signed with `secret` at `timestamp_ms`
/// with `nonce`; answers the status and the body's text (status 0: no answer).
pub fn signed_post(
    secret: &str,
    base: &str,
    path: &str,
    body: &Value,
    timestamp_ms: i64,
    nonce: &str,
) -> (u16, String) {
    use keyward_shared::internal::{self, NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};
    let body = serde_json::to_vec(body).expect("JSON");
    let signature = internal::sign(secret.as_bytes(), "POST", path, timestamp_ms, nonce, &body);
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build().expect("a client");
    let response = client
        .post(format!("{base}{path}"))
        .header(TIMESTAMP_HEADER, timestamp_ms.to_string())
        .header(NONCE_HEADER, nonce)
        .header(SIGNATURE_HEADER, signature)
        .body(body)
        .send();
    match response {
        Ok(r) => (r.status().as_u16(), r.text().unwrap_or_default()),
        Err(e) => (0, e.to_string()),
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
