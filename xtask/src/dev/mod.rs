//! `cargo xtask dev [--regions N]`: Keyward on this machine. The control plane on SQLite
//! (127.0.0.1:8080), N edge regions (127.0.0.1:8787 and up), each its own wrangler dev server
//! (`edge/dev-server.mjs`) with its own persist directory, and a home process (127.0.0.1:8786)
//! hosting the KeyState Durable Objects every region binds to. Local state is in `.keyward/` (ignored by
//! git): the database, persist directories, the dev root key (kept, so a second run finds the
//! same workspace) and a fresh purge secret each run.
//!
//! `--geography NAME` places the processes as a preset of `keyward_tests::geography` does:
//! the control plane reaches the home and each region, and each region its Durable Objects,
//! through relays that hold every chunk for the link's one-way delay.
//!
//! Before anything starts it checks that no other `cargo xtask dev` runs (`.keyward/dev.pid`)
//! and that every port it needs is free, naming the program that holds one; a stop at any
//! moment, start-up included, ends every process it started (see `stop`).

mod ports;
mod stop;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use keyward_tests::gate::Gate;
use keyward_tests::geography::{self, Geography};
use keyward_tests::{Objects, Proc, RegionSpec, new_root_key, new_secret, start_control_plane};

use crate::tools::{self, step};
use stop::{Lock, Stop};

const STATE_DIR: &str = ".keyward";
const EDGE_PORT: u16 = 8787;
const HOME_PORT: u16 = 8786;
const CONTROL_PLANE_PORT: u16 = 8080;

pub fn run(regions: u16, geography: Option<&str>) -> anyhow::Result<()> {
    anyhow::ensure!((1..=8).contains(&regions), "--regions must be between 1 and 8");
    let geography = geography.map(Geography::preset).transpose()?;
    let stop = Stop::install().context("cannot install the signal handler")?;
    let state = keyward_tests::repo_root().join(STATE_DIR);
    std::fs::create_dir_all(&state)?;
    let _lock = Lock::take(&state)?;
    let result = start_and_serve(&stop, regions, geography.as_ref(), &state);
    stop.finish();
    match result {
        Err(_) if stop.asked() => {
            step("stopped during start-up; every process it started has ended");
            Ok(())
        }
        result => result,
    }
}

/// Every port `cargo xtask dev --regions <regions>` listens on.
fn ports(regions: u16) -> Vec<u16> {
    [CONTROL_PLANE_PORT, HOME_PORT].into_iter().chain((0..regions).map(|i| EDGE_PORT + i)).collect()
}

/// Builds, starts everything and runs until a stop or a process exits; what it started is
/// stopped when this returns, however it returns.
fn start_and_serve(stop: &Stop, regions: u16, geography: Option<&Geography>, state: &Path) -> anyhow::Result<()> {
    ports::check_free(&ports(regions))?;
    tools::setup()?;
    stop.check()?;
    tools::build(false)?;
    stop.check()?;
    // Checked again: the build takes a while.
    ports::check_free(&ports(regions))?;
    let root_key = dev_root_key(&state.join("root_key"))?;
    let secret = new_secret();
    // For running `npx wrangler dev` by hand with the top-level wrangler.toml.
    write_private(&keyward_tests::repo_root().join(".dev.vars"), &format!("PURGE_SECRET={secret}\n"))?;
    let (home, mut specs) = specs(state, regions, &secret);

    let mut procs = Vec::new();
    step(&format!("starting the home of the KeyState Durable Objects on 127.0.0.1:{HOME_PORT}"));
    procs.push(home.start()?);
    if let Some(geography) = geography {
        step(&geography.describe(specs.len()));
    }
    let mut relays = Vec::new();
    for (i, region) in specs.iter_mut().enumerate() {
        stop.check()?;
        if let Some(geography) = geography {
            let registry = state.join(format!("registry-{}", region.name));
            relays.push(geography::route_to_home(&home, region, registry, geography.region_to_home(i))?);
        }
        step(&format!("starting edge region `{}` (wrangler's dev server) on {}", region.name, region.url()));
        procs.push(region.start()?);
    }
    stop.check()?;
    let links = Links::start(geography, &home, &specs)?;
    let config = state.join("keyward.toml");
    write_config(&config, state, &links, &specs, &secret)?;
    step(&format!(
        "starting the control plane on 127.0.0.1:{CONTROL_PLANE_PORT} (SQLite at {STATE_DIR}/keyward.sqlite)"
    ));
    procs.push(start_control_plane(&config, &root_key, CONTROL_PLANE_PORT, &state.join("control-plane.log"))?);
    stop.check()?;
    stop.running();
    for region in &specs {
        println!("  region {}: {}", region.name, region.url());
    }
    print_walkthrough(&root_key);
    serve(stop, procs);
    drop((relays, links));
    Ok(())
}

/// Where the control plane sends authority updates and each region's purges and KV writes:
/// straight to the process, or through a relay delayed by the geography's link.
struct Links {
    authority: String,
    regions: Vec<String>,
    _relays: Vec<Gate>,
}

impl Links {
    fn start(geography: Option<&Geography>, home: &RegionSpec, specs: &[RegionSpec]) -> anyhow::Result<Links> {
        let Some(geography) = geography else {
            return Ok(Links {
                authority: home.url(),
                regions: specs.iter().map(RegionSpec::url).collect(),
                _relays: Vec::new(),
            });
        };
        let mut relays = vec![Gate::start_with(home.port, Some(geography.control_to_home))?];
        for (i, region) in specs.iter().enumerate() {
            relays.push(Gate::start_with(region.port, Some(geography.control_to_region(i)))?);
        }
        let urls: Vec<String> = relays.iter().map(Gate::url).collect();
        Ok(Links { authority: urls[0].clone(), regions: urls[1..].to_vec(), _relays: relays })
    }
}

/// The home and the regions.
fn specs(state: &Path, regions: u16, secret: &str) -> (RegionSpec, Vec<RegionSpec>) {
    let registry = state.join("registry");
    let spec = |name: String, port: u16, objects: Objects| RegionSpec {
        dir: state.join(format!("worker-{name}")),
        name,
        port,
        purge_secret: secret.to_owned(),
        log_level: "warn",
        objects,
        registry: registry.clone(),
        main: None,
        vars: Vec::new(),
    };
    let home = spec("home".into(), HOME_PORT, Objects::Host);
    let specs = (0..regions)
        .map(|i| {
            let name = if i == 0 { "local".to_owned() } else { format!("local-{}", i + 1) };
            spec(name, EDGE_PORT + i, Objects::In(home.worker_name()))
        })
        .collect();
    (home, specs)
}

fn write_config(config: &Path, state: &Path, links: &Links, specs: &[RegionSpec], secret: &str) -> anyhow::Result<()> {
    let mut text = format!(
        "listen = \"127.0.0.1:{CONTROL_PLANE_PORT}\"\ndatabase = \"{}\"\npurge_secret = \"{secret}\"\nauthority_url = \"{}\"\n\n",
        state.join("keyward.sqlite").display(),
        links.authority
    );
    for (region, url) in specs.iter().zip(&links.regions) {
        text.push_str(&region.config_toml(url, url, 0));
    }
    write_private(config, &text)
}

/// Runs until a stop is asked for or a process exits, then stops the control plane first,
/// then the workers.
fn serve(stop: &Stop, mut procs: Vec<Proc>) {
    loop {
        if stop.asked() {
            step("stopping");
            break;
        }
        if let Some(proc) = procs.iter_mut().find_map(|p| p.exited().then_some(p)) {
            eprintln!("{} exited; its log is {}", proc.name, proc.log.display());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    while let Some(mut proc) = procs.pop() {
        proc.stop();
    }
    step("stopped; state kept in .keyward/ (delete it to start over)");
}

/// The dev root key: read from `path`, or made and saved there on the first run.
fn dev_root_key(path: &Path) -> anyhow::Result<String> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let text = text.trim().to_owned();
        keyward_shared::Key::parse(&text)
            .with_context(|| format!("{} is not a valid key; delete .keyward/ to start over", path.display()))?;
        return Ok(text);
    }
    let key = new_root_key();
    write_private(path, &format!("{key}\n"))?;
    Ok(key)
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

fn print_walkthrough(root_key: &str) {
    println!(
        r#"
Keyward is running.
  control plane (admin API): http://127.0.0.1:{CONTROL_PLANE_PORT}
  edge (verify):             http://127.0.0.1:{EDGE_PORT}
  dev root key (kept in {STATE_DIR}/root_key): {root_key}

Try it from another terminal:
  export KEYWARD_ROOT_KEY={root_key}
  # an API, then a key in it (the key is shown once)
  curl -s -X POST http://127.0.0.1:{CONTROL_PLANE_PORT}/v1/apis -H "authorization: Bearer $KEYWARD_ROOT_KEY" \
    -H 'content-type: application/json' -d '{{"name":"payments-live","prefix":"sk_live"}}'
  curl -s -X POST http://127.0.0.1:{CONTROL_PLANE_PORT}/v1/keys -H "authorization: Bearer $KEYWARD_ROOT_KEY" \
    -H 'content-type: application/json' -d '{{"api_id":"<api id>","name":"ci"}}'
  # verify it at the edge (source: kv, then memory)
  curl -s -X POST http://127.0.0.1:{EDGE_PORT}/v1/keys/verify -H "authorization: Bearer $KEYWARD_ROOT_KEY" \
    -d '{{"key":"<key>"}}'
  # revoke it: every region acknowledges, and the next edge request answers REVOKED
  curl -s -X POST http://127.0.0.1:{CONTROL_PLANE_PORT}/v1/keys/<key id>/revoke -H "authorization: Bearer $KEYWARD_ROOT_KEY"
  # or with the CLI: target/debug/keyward keys revoke <key id>

Ctrl-C stops everything.
"#
    );
}
