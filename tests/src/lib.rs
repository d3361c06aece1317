//! Starting Keyward's real processes: edge regions under wrangler's dev server and the `keyward`
//! control plane, each in its own process group, stopped (the whole group) when dropped.
//!
//! Used by the whole-system tests in `tests/tests` and by `cargo xtask dev` and `bench`, so
//! there is one way to bring Keyward up.

pub mod baseline;
pub mod gate;
pub mod geography;
pub mod windows;
pub mod world;

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

static KEYWARD_BIN: RwLock<Option<PathBuf>> = RwLock::new(None);
static WORKER_MAIN: RwLock<Option<PathBuf>> = RwLock::new(None);

/// Makes this process's fixtures start this `keyward` binary from now on (benchmarks use the
/// release build, or another revision's).
pub fn use_keyward_bin(path: PathBuf) {
    *KEYWARD_BIN.write().unwrap_or_else(|e| e.into_inner()) = Some(path);
}

/// Makes this process's fixtures start workers from this entry module from now on, where a
/// [`RegionSpec`] names none (benchmarks run another revision's worker); `None`: this checkout's.
pub fn use_worker_main(main: Option<PathBuf>) {
    *WORKER_MAIN.write().unwrap_or_else(|e| e.into_inner()) = main;
}

/// The `keyward` binary: the one set by [`use_keyward_bin`], else `KEYWARD_BIN`, else the debug
/// build in the repository's target dir.
pub fn keyward_bin() -> PathBuf {
    KEYWARD_BIN.read().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_else(|| {
        std::env::var_os("KEYWARD_BIN").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target/debug/keyward"))
    })
}

/// A port that was free a moment ago on 127.0.0.1, never handed out twice by this process.
///
/// Chosen below the system's ephemeral range (32768 and up on Linux), from which every
/// outgoing connection takes its local port: a port the system picked for `bind(:0)` was seen
/// taken by one of the many connections a world makes before its process could listen on it
/// ("Address already in use"). Each process starts at its own place in 10000-32767.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 32_768 - LOW;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7_919) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in {LOW}-32767")
}

/// This machine's clock, in Unix milliseconds (as the workers and the control plane count).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_millis() as i64
}

/// A fresh root key (prefix `kw_root`) from the OS's random source.
pub fn new_root_key() -> String {
    new_key("kw_root")
}

/// A fresh, well-formed key with this prefix.
pub fn new_key(prefix: &str) -> String {
    let mut random = [0u8; 32];
    getrandom::fill(&mut random).expect("OS randomness");
    keyward_shared::Key::generate(prefix, random).expect("valid prefix").expose().to_owned()
}

/// A fresh 64-hex-digit secret.
pub fn new_secret() -> String {
    let mut random = [0u8; 32];
    getrandom::fill(&mut random).expect("OS randomness");
    random.iter().map(|b| format!("{b:02x}")).collect()
}

/// A running process group, stopped when dropped.
pub struct Proc {
    child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `command` in its own process group with stdout and stderr to `log`.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> anyhow::Result<Proc> {
        let out =
            File::options().create(true).append(true).open(log).with_context(|| format!("open {}", log.display()))?;
        command.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).process_group(0);
        let child = command.spawn().with_context(|| format!("cannot start {name}"))?;
        Ok(Proc { child, name: name.to_owned(), log: log.to_path_buf() })
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Sends `signal` (like `TERM` or `KILL`) to the whole process group.
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([format!("-{signal}"), "--".into(), format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
    }

    /// Sends `signal` to the whole process group `after` from now, from a process of its own (so
    /// that the caller may block meanwhile, on a call to the group itself); wait for the answered
    /// child to know it was sent.
    pub fn signal_after(&self, signal: &str, after: Duration) -> anyhow::Result<Child> {
        // `env kill`: the external kill, as `signal` runs (a shell's own may not take `--`).
        let script = format!("sleep {}; env kill -{signal} -- -{}", after.as_secs_f64(), self.child.id());
        Ok(Command::new("sh").args(["-c", &script]).stderr(Stdio::null()).spawn()?)
    }

    /// Stops the group: TERM, then KILL after two seconds.
    pub fn stop(&mut self) {
        if self.exited() {
            self.signal("KILL");
            return;
        }
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if self.exited() {
                self.signal("KILL");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal("KILL");
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `url` until it answers 200, the process exits, or `timeout` passes.
pub fn wait_healthy(proc: &mut Proc, url: &str, timeout: Duration) -> anyhow::Result<()> {
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(2)).build()?;
    let deadline = Instant::now() + timeout;
    loop {
        if client.get(url).send().is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        if proc.exited() {
            let log = std::fs::read_to_string(&proc.log).unwrap_or_default();
            bail!("{} exited before {url} answered; its log:\n{log}", proc.name);
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(&proc.log).unwrap_or_default();
            bail!("{} did not answer {url} within {timeout:?}; its log:\n{log}", proc.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How a worker process reaches the KeyState Durable Objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Objects {
    /// It hosts them (the "home" process; or a single deployed worker).
    Host,
    /// It binds to those of the worker with this name, through the shared dev registry.
    In(String),
    /// It has none (an older build, for comparison).
    None,
}

/// The name of the home worker, which hosts the KeyState Durable Objects locally.
pub const HOME_WORKER: &str = "keyward-home";

/// One worker process to run (an edge region or the home): its own name, port, directory
/// (config, persist, log) and secret.
#[derive(Debug, Clone)]
pub struct RegionSpec {
    pub name: String,
    pub port: u16,
    pub dir: PathBuf,
    pub purge_secret: String,
    /// wrangler's log level (`warn` normally, `error` for benchmarks).
    pub log_level: &'static str,
    pub objects: Objects,
    /// The dev registry every process of one local Keyward shares.
    pub registry: PathBuf,
    /// The worker's entry module, when not the one set by [`use_worker_main`] or this
    /// checkout's `edge/build/worker/shim.mjs`.
    pub main: Option<PathBuf>,
    /// Extra `[vars]` of the worker (`PURGE_MODE`, `AUTHORITY_TIMEOUT_MS`, ...).
    pub vars: Vec<(String, String)>,
}

/// The KV namespace id every local region uses.
pub const LOCAL_NAMESPACE: &str = "keyward-local";

impl RegionSpec {
    /// The worker's name: unique per process, as the dev registry needs.
    pub fn worker_name(&self) -> String {
        if self.objects == Objects::Host { HOME_WORKER.to_owned() } else { format!("keyward-{}", self.name) }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn kv_url(&self) -> String {
        format!("{}/cdn-cgi/explorer/api", self.url())
    }

    /// This region as a `[[regions]]` entry of `keyward.toml`; purges go to `purge_url` and KV
    /// writes to `kv_base` (normally both [`RegionSpec::url`]), arriving `kv_delay_ms` late.
    pub fn config_toml(&self, purge_url: &str, kv_base: &str, kv_delay_ms: u64) -> String {
        format!(
            "[[regions]]\nname = \"{}\"\nurl = \"{purge_url}\"\nkv_url = \"{kv_base}/cdn-cgi/explorer/api\"\nkv_namespace_id = \"{LOCAL_NAMESPACE}\"\nkv_delay_ms = {kv_delay_ms}\n",
            self.name,
        )
    }

    /// Writes the region's wrangler config and `.dev.vars`, starts its dev server
    /// (`edge/dev-server.mjs`) and waits for its health route. The worker must already be built (`edge/build`).
    ///
    /// workerd occasionally fails to start when several start at once (seen about once in
    /// twenty starts on 2 cores, with no cause in its log), so a failed start is retried twice.
    pub fn start(&self) -> anyhow::Result<Proc> {
        let mut attempt = 1;
        loop {
            match self.start_once() {
                Ok(proc) => return Ok(proc),
                Err(e) if attempt < 3 => {
                    eprintln!("region {} failed to start (attempt {attempt}), retrying: {e:#}", self.name);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn start_once(&self) -> anyhow::Result<Proc> {
        let root = repo_root();
        let main = (self.main.clone())
            .or_else(|| WORKER_MAIN.read().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_else(|| root.join("edge/build/worker/shim.mjs"));
        if !main.exists() {
            bail!("the worker is not built ({} is missing): run `cargo xtask build`", main.display());
        }
        std::fs::create_dir_all(&self.dir)?;
        let config = self.dir.join("wrangler.toml");
        let objects = match &self.objects {
            Objects::Host => "[[durable_objects.bindings]]\nname = \"KEY_STATE\"\nclass_name = \"KeyState\"\n\n\
                              [[migrations]]\ntag = \"v1\"\nnew_sqlite_classes = [\"KeyState\"]\n"
                .to_owned(),
            Objects::In(script) => format!(
                "[[durable_objects.bindings]]\nname = \"KEY_STATE\"\nclass_name = \"KeyState\"\nscript_name = \"{script}\"\n"
            ),
            Objects::None => String::new(),
        };
        std::fs::write(
            &config,
            format!(
                "name = \"{worker}\"\nmain = \"{main}\"\ncompatibility_date = \"2026-04-01\"\n\n\
                 [vars]\nREGION = \"{name}\"\n{vars}\n[[kv_namespaces]]\nbinding = \"KEYS\"\nid = \"{LOCAL_NAMESPACE}\"\n\n{objects}",
                worker = self.worker_name(),
                name = self.name,
                main = main.display(),
                vars = self.vars.iter().map(|(k, v)| format!("{k} = \"{v}\"\n")).collect::<String>(),
            ),
        )?;
        std::fs::write(self.dir.join(".dev.vars"), format!("PURGE_SECRET={}\n", self.purge_secret))?;
        let mut command = Command::new("node");
        command
            .current_dir(&self.dir)
            .arg(root.join("edge/dev-server.mjs"))
            .arg("--config")
            .arg(&config)
            .args(["--port", &self.port.to_string(), "--log-level", self.log_level])
            .arg("--persist-to")
            .arg(self.dir.join("persist"))
            .arg("--registry")
            .arg(&self.registry)
            .env("WRANGLER_LOG_PATH", self.dir.join("logs"))
            .env("WRANGLER_SEND_METRICS", "false")
            .env("CLOUDFLARE_CF_FETCH_ENABLED", "false")
            .env("CI", "1")
            .env("WRANGLER_REGISTRY_PATH", &self.registry);
        let mut proc = Proc::spawn(&format!("region {}", self.name), command, &self.dir.join("wrangler.log"))?;
        wait_healthy(&mut proc, &format!("{}/health", self.url()), Duration::from_secs(60))?;
        Ok(proc)
    }
}

/// Starts `keyward serve` with this config file and bootstrap root key, and waits for health.
pub fn start_control_plane(config: &Path, root_key: &str, port: u16, log: &Path) -> anyhow::Result<Proc> {
    start_control_plane_with(config, root_key, port, log, &[])
}

/// [`start_control_plane`] with extra environment (a failpoint, say).
pub fn start_control_plane_with(
    config: &Path,
    root_key: &str,
    port: u16,
    log: &Path,
    env: &[(&str, &str)],
) -> anyhow::Result<Proc> {
    let mut command = Command::new(keyward_bin());
    command.arg("serve").arg("--config").arg(config).env("KEYWARD_ROOT_KEY", root_key).env_remove("KEYWARD_CONFIG");
    // Metrics on a free port, by environment (an older build measured beside this one ignores
    // it, where its config file would refuse an unknown key).
    command.env("KEYWARD_METRICS_LISTEN", "127.0.0.1:0");
    command.envs(env.iter().copied());
    let mut proc = Proc::spawn("control plane", command, log)?;
    wait_healthy(&mut proc, &format!("http://127.0.0.1:{port}/health"), Duration::from_secs(30))?;
    Ok(proc)
}
