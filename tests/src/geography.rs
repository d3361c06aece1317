//! The geography model of a local Keyward: how far apart its processes would be in production.
//!
//! Locally every process shares one loopback, where a call costs what the CPU costs. In
//! production a key's KeyState object lives in one place (the "home"), the control plane in
//! another, and each region pays a network's delay for every call to either. The model puts a
//! one-way delay, with jitter, on each link that crosses a network in production:
//!
//! - control plane → each region (signed purges and KV writes),
//! - control plane → the home (authority updates),
//! - each region → the home (authority reads: the Durable Object binding).
//!
//! The delays come from relays ([`crate::gate::Gate`]) in front of the real processes, never
//! from changed code in the worker. A region reaches its Durable Objects through wrangler's dev
//! registry, whose file for the home names the address of the home's workerd debug port (the
//! Cap'n Proto connection a binding call travels on): [`route_to_home`] gives each region a
//! registry of its own whose entry for the home names a relay in front of that port instead.
//!
//! One binding call through the debug port is [`BINDING_ROUND_TRIPS`] sequential round trips
//! (measured with the relay's trace: the request and the response's head, then the caller's
//! answer to the response body's stream and its end, then a one-way release), where a binding
//! call in production crosses the network once each way. The region → home relay therefore
//! holds each chunk for the link's delay divided by that count, so that a call costs the
//! link's round trip, as in production.
//!
//! Not modelled: KV reads, which live inside each region's workerd process with no link to
//! delay (production's KV is read in the region, from its own cache); and the caller's link to
//! its region (the same in every geography).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};

use crate::RegionSpec;
use crate::gate::Gate;

/// One link's one-way delay: every chunk relayed across it is held a time drawn uniformly
/// from `min_ms..=max_ms`, never overtaking an earlier chunk of the same connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    pub min_ms: f64,
    pub max_ms: f64,
}

impl Link {
    /// A link held `min_ms` to `max_ms` one way.
    pub const fn between(min_ms: f64, max_ms: f64) -> Link {
        Link { min_ms, max_ms }
    }

    /// One draw of the link's delay.
    pub fn sample(&self) -> Duration {
        let unit = getrandom::u64().map_or(0.5, |r| (r >> 11) as f64 / (1u64 << 53) as f64);
        Duration::from_secs_f64((self.min_ms + (self.max_ms - self.min_ms) * unit).max(0.0) / 1e3)
    }

    /// This link with every delay multiplied by `factor`.
    pub fn scaled(&self, factor: f64) -> Link {
        Link { min_ms: self.min_ms * factor, max_ms: self.max_ms * factor }
    }

    fn describe(&self) -> String {
        format!("{}-{} ms", self.min_ms, self.max_ms)
    }
}

/// Sequential round trips of one Durable Object binding call on the home's debug port.
pub const BINDING_ROUND_TRIPS: f64 = 2.0;

/// A named set of link delays for a local Keyward. Regions past the preset's list reuse it
/// from the start (region 3 is placed like region 0).
#[derive(Debug, Clone, PartialEq)]
pub struct Geography {
    pub name: &'static str,
    /// Control plane → the home of the KeyState objects.
    pub control_to_home: Link,
    /// Control plane → region `i`, by `i` modulo the list's length.
    control_to_region: &'static [Link],
    /// Region `i` → the home, by `i` modulo the list's length.
    region_to_home: &'static [Link],
}

/// Every link 1-2 ms: one metropolitan area.
const METRO: [Link; 1] = [Link::between(1.0, 2.0)];
const CONTINENT_CONTROL: [Link; 3] = [Link::between(12.0, 15.0), Link::between(22.0, 25.0), Link::between(32.0, 36.0)];
const CONTINENT_HOME: [Link; 3] = [Link::between(10.0, 12.0), Link::between(24.0, 27.0), Link::between(36.0, 40.0)];
/// Three regions far apart: 20, 90 and 180 ms one way from the home.
const WORLD_HOME: [Link; 3] = [Link::between(20.0, 22.0), Link::between(90.0, 94.0), Link::between(180.0, 186.0)];
/// The control plane 20, 60 and 100 ms from the three regions.
const WORLD_CONTROL: [Link; 3] = [Link::between(20.0, 22.0), Link::between(60.0, 64.0), Link::between(100.0, 105.0)];

impl Geography {
    /// The presets' names, for help texts.
    pub const NAMES: [&'static str; 3] = ["metro", "continent", "world"];

    /// The preset called `name`: `metro` (every link 1-2 ms), `continent` (10-40 ms) or
    /// `world` (regions 20, 90 and 180 ms from the home; the control plane 20, 60 and 100 ms
    /// from them and 50 ms from the home).
    pub fn preset(name: &str) -> anyhow::Result<Geography> {
        Ok(match name {
            "metro" => Geography {
                name: "metro",
                control_to_home: METRO[0],
                control_to_region: &METRO,
                region_to_home: &METRO,
            },
            "continent" => Geography {
                name: "continent",
                control_to_home: Link::between(18.0, 21.0),
                control_to_region: &CONTINENT_CONTROL,
                region_to_home: &CONTINENT_HOME,
            },
            "world" => Geography {
                name: "world",
                control_to_home: Link::between(50.0, 53.0),
                control_to_region: &WORLD_CONTROL,
                region_to_home: &WORLD_HOME,
            },
            other => bail!("no geography `{other}`; the presets are {}", Geography::NAMES.join(", ")),
        })
    }

    /// A geography of a test's own links: the control plane → the home, → each region, and each
    /// region → the home (by region modulo the lists' lengths, as in the presets).
    pub fn custom(
        name: &'static str,
        control_to_home: Link,
        control_to_region: &'static [Link],
        region_to_home: &'static [Link],
    ) -> Geography {
        Geography { name, control_to_home, control_to_region, region_to_home }
    }

    /// The geography named by `KEYWARD_GEOGRAPHY`, if set and not `none`.
    pub fn from_env() -> anyhow::Result<Option<Geography>> {
        match std::env::var("KEYWARD_GEOGRAPHY") {
            Ok(name) if !name.is_empty() && name != "none" => Geography::preset(&name).map(Some),
            _ => Ok(None),
        }
    }

    /// Control plane → region `i`.
    pub fn control_to_region(&self, i: usize) -> Link {
        self.control_to_region[i % self.control_to_region.len()]
    }

    /// Region `i` → the home.
    pub fn region_to_home(&self, i: usize) -> Link {
        self.region_to_home[i % self.region_to_home.len()]
    }

    /// One line per link for `regions` regions.
    pub fn describe(&self, regions: usize) -> String {
        let mut text = format!("geography {}: control plane → home {}", self.name, self.control_to_home.describe());
        for i in 0..regions {
            text.push_str(&format!(
                "\n  region {i}: control plane → region {}, region → home {}",
                self.control_to_region(i).describe(),
                self.region_to_home(i).describe()
            ));
        }
        text
    }
}

/// The dev registry entry the home wrote for itself: the address of its workerd debug port.
fn home_debug_port(home: &RegionSpec, timeout: Duration) -> anyhow::Result<(u16, serde_json::Value)> {
    let path = home.registry.join(home.worker_name());
    let deadline = Instant::now() + timeout;
    loop {
        let entry =
            std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        let port = entry
            .as_ref()
            .and_then(|e| e["debugPortAddress"].as_str())
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, port)| port.parse().ok());
        if let (Some(port), Some(entry)) = (port, entry) {
            return Ok((port, entry));
        }
        if Instant::now() > deadline {
            bail!("the home wrote no dev registry entry with a debug port at {}", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends region `region`'s Durable Object calls through a relay delayed so that one call costs
/// `link`'s round trip (each chunk held `link` / [`BINDING_ROUND_TRIPS`]): starts the relay in
/// front of the home's debug port (read from the home's registry entry, so the home
/// must be running), gives the region a registry directory of its own at `registry` and writes
/// there the home's entry naming the relay. Call before starting the region, and again after
/// the home restarted (its debug port changes): the entry then names a new relay, and the
/// region, which watches its registry, drops its connection to the old one.
pub fn route_to_home(
    home: &RegionSpec,
    region: &mut RegionSpec,
    registry: PathBuf,
    link: Link,
) -> anyhow::Result<Gate> {
    let (port, entry) = home_debug_port(home, Duration::from_secs(10))?;
    let relay = Gate::start_with(port, Some(link.scaled(1.0 / BINDING_ROUND_TRIPS)))?;
    region.registry = registry;
    write_home_entry(home, entry, &region.registry, relay.port)?;
    Ok(relay)
}

/// Writes `registry`'s entry for the home: the home's own, with the relay's address. Its
/// modification time is set a year ahead: wrangler drops an entry not touched for 5 minutes,
/// and nothing else touches this one.
fn write_home_entry(
    home: &RegionSpec,
    mut entry: serde_json::Value,
    registry: &Path,
    relay_port: u16,
) -> anyhow::Result<()> {
    entry["debugPortAddress"] = serde_json::Value::String(format!("127.0.0.1:{relay_port}"));
    std::fs::create_dir_all(registry)?;
    let path = registry.join(home.worker_name());
    std::fs::write(&path, serde_json::to_string_pretty(&entry)?)
        .with_context(|| format!("write {}", path.display()))?;
    let file = std::fs::File::options().write(true).open(&path)?;
    file.set_modified(SystemTime::now() + Duration::from_secs(365 * 24 * 3600))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_keep_their_stated_distances() {
        let world = Geography::preset("world").expect("a preset");
        let homes: Vec<f64> = (0..3).map(|i| world.region_to_home(i).min_ms).collect();
        assert_eq!(homes, [20.0, 90.0, 180.0]);
        assert_eq!(world.control_to_home.min_ms, 50.0);
        for i in 0..3 {
            let link = world.control_to_region(i);
            assert!(link.min_ms >= 20.0 && link.max_ms <= 105.0, "{link:?}");
        }
        let metro = Geography::preset("metro").expect("a preset");
        for link in [metro.control_to_home, metro.control_to_region(5), metro.region_to_home(7)] {
            assert_eq!((link.min_ms, link.max_ms), (1.0, 2.0));
        }
        let continent = Geography::preset("continent").expect("a preset");
        for i in 0..3 {
            for link in [continent.control_to_region(i), continent.region_to_home(i), continent.control_to_home] {
                assert!(link.min_ms >= 10.0 && link.max_ms <= 40.0, "{link:?}");
            }
        }
        assert!(Geography::preset("moon").is_err());
    }

    #[test]
    fn samples_stay_within_the_link() {
        let link = Link::between(20.0, 22.0);
        let samples: Vec<f64> = (0..1000).map(|_| link.sample().as_secs_f64() * 1e3).collect();
        assert!(samples.iter().all(|ms| (20.0..=22.0).contains(ms)), "{samples:?}");
        let spread =
            samples.iter().cloned().fold(f64::MIN, f64::max) - samples.iter().cloned().fold(f64::MAX, f64::min);
        assert!(spread > 1.5, "jitter spans the link: {spread}");
    }
}
