//! Load from `wrk` against one region's verify route: one key over and over (a copy in memory,
//! or one confirmed on every request), or a fresh key each request (every request a miss).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use keyward_tests::world::World;
use serde_json::json;

/// What one wrk run measured.
#[derive(Clone)]
pub struct Load {
    pub requests: u64,
    /// How long the load ran: less than asked when its keys ran out.
    pub seconds: f64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// 2xx answers that were not `VALID` (`"valid":true` missing from the body): a route's
    /// refusals and fail-closed answers (`UNAVAILABLE`), counted in `rps` like any answer.
    pub not_valid: u64,
    /// How many wrk runs this is (more than one once merged).
    pub runs: u64,
}

impl Load {
    /// The rounds of one measurement as one: requests over the time they took, the mean of the
    /// percentiles.
    pub fn merge(loads: &[Load]) -> Load {
        let n = loads.len().max(1) as f64;
        let requests = loads.iter().map(|l| l.requests).sum();
        let seconds = loads.iter().map(|l| l.seconds).sum();
        Load {
            requests,
            seconds,
            rps: requests as f64 / seconds,
            p50_ms: loads.iter().map(|l| l.p50_ms).sum::<f64>() / n,
            p99_ms: loads.iter().map(|l| l.p99_ms).sum::<f64>() / n,
            errors: loads.iter().map(|l| l.errors).sum(),
            not_valid: loads.iter().map(|l| l.not_valid).sum(),
            runs: loads.iter().map(|l| l.runs).sum(),
        }
    }
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} non-2xx, {} not VALID ({} requests in {:.2} s)",
            self.rps, self.p50_ms, self.p99_ms, self.errors, self.not_valid, self.requests, self.seconds
        )
    }
}

/// wrk against the verify route at `base` for `key`, as the caller with root key `root`; checks
/// the key is valid before and after. `UNAVAILABLE` (the authority missed its deadline on a
/// loaded machine: the edge fails closed) is asked again, up to 5 times over 2 s; any other
/// answer but `VALID` ends the bench.
pub fn throughput(
    world: &World,
    base: &str,
    root: &str,
    key: &str,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Load> {
    let valid = |when: &str| {
        for attempt in 1.. {
            let body = Some(json!({ "key": key }));
            let (status, answer) = world.call(base, Some(root), reqwest::Method::POST, "/v1/keys/verify", body);
            if status == 200 && answer["valid"] == true {
                return Ok(());
            }
            // A region that closed the connection (wrangler's dev server restarts a worker now
            // and then) is asked again too, and said so.
            anyhow::ensure!(
                attempt < 5 && (status == 0 || answer["code"] == "UNAVAILABLE"),
                "key not valid at {base} {when}: {status} {answer}"
            );
            if status == 0 {
                eprintln!("warning: {base} did not answer {when} ({answer}); asking again");
            }
            std::thread::sleep(Duration::from_millis(400));
        }
        unreachable!("the loop returns or fails")
    };
    valid("before the load")?;
    let script = world.dir.path().join("verify.lua");
    std::fs::write(
        &script,
        format!("{}wrk.body = '{}'\n", script_head(root), serde_json::to_string(&json!({ "key": key }))?),
    )?;
    let load = wrk(&format!("{base}/v1/keys/verify"), Some(&script), connections, duration);
    std::fs::remove_file(&script)?;
    valid("after the load")?;
    load
}

/// How many fresh keys a miss load of `duration` needs, from the rate of a cheaper path of the
/// same region (a confirmation reads what a miss reads, and a miss also writes the Cache API),
/// with room to spare. Should the load still run out, it stops early (see [`misses`]).
pub fn keys_for_misses(cheaper_rps: f64, duration: Duration) -> usize {
    let wanted = cheaper_rps * duration.as_secs_f64() * 1.3;
    (wanted.ceil() as usize).clamp(100, 20_000)
}

/// wrk against the verify route at `base`, each request for the next of `keys`, none asked for
/// there before: every request is a miss. When the keys run out before `duration`, the load
/// stops there, and the rate is of the requests sent over the time they took.
pub fn misses(world: &World, base: &str, root: &str, keys: &[String], duration: Duration) -> anyhow::Result<Load> {
    let script = world.dir.path().join("misses.lua");
    let list = keys.iter().map(|k| format!("\"{k}\"")).collect::<Vec<_>>().join(",");
    // Past the last key the thread stops: the request built then is never answered, since the
    // thread's event loop ends before reading it, so no answer is counted twice.
    std::fs::write(
        &script,
        format!(
            "{}keys = {{{list}}}\ni = 0\nrequest = function()\n  i = i + 1\n  \
             if i > #keys then wrk.thread:stop() end\n  \
             return wrk.format(nil, nil, nil, '{{\"key\":\"' .. keys[((i - 1) % #keys) + 1] .. '\"}}')\nend\n",
            script_head(root)
        ),
    )?;
    let load = wrk(&format!("{base}/v1/keys/verify"), Some(&script), 2, duration);
    std::fs::remove_file(&script)?;
    let load = load?;
    anyhow::ensure!(load.requests <= keys.len() as u64, "{} answers for {} keys", load.requests, keys.len());
    anyhow::ensure!(load.errors == 0, "misses at {base} answered {} non-2xx", load.errors);
    Ok(load)
}

fn script_head(root: &str) -> String {
    format!(
        "wrk.method = \"POST\"\nwrk.headers[\"authorization\"] = \"Bearer {root}\"\nwrk.headers[\"content-type\"] = \"application/json\"\n{COUNT_NOT_VALID}"
    )
}

/// Counts 2xx answers without `"valid":true` in each wrk thread (`response`), and prints their
/// sum when the run is done (`done` runs in wrk's main script state, which reads the threads').
const COUNT_NOT_VALID: &str = r#"threads = {}
setup = function(thread) table.insert(threads, thread) end
not_valid = 0
response = function(status, headers, body)
  if status >= 200 and status < 300 and not string.find(body, '"valid":true', 1, true) then
    not_valid = not_valid + 1
  end
end
done = function(summary, latency, requests)
  local n = 0
  for _, thread in ipairs(threads) do n = n + thread:get("not_valid") end
  io.write(string.format("Not VALID answers: %d\n", n))
end
"#;

/// `wrk -t1 -c<connections> -d<duration> --latency`, with a script if given.
pub fn wrk(url: &str, script: Option<&Path>, connections: usize, duration: Duration) -> anyhow::Result<Load> {
    let mut command = Command::new("wrk");
    command.args(["-t1", &format!("-c{connections}"), &format!("-d{}s", duration.as_secs()), "--latency"]);
    if let Some(script) = script {
        command.arg("-s").arg(script);
    }
    let out = command.arg(url).output().context("run wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&text)
}

fn parse_wrk(text: &str) -> anyhow::Result<Load> {
    let field = |prefix: &str| -> Option<String> {
        text.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|rest| rest.trim().to_owned()))
    };
    let p50_ms = field("50%").map(|v| to_ms(&v)).context("wrk printed no 50%")?;
    let p99_ms = field("99%").map(|v| to_ms(&v)).context("wrk printed no 99%")?;
    let errors = field("Non-2xx or 3xx responses:").and_then(|v| v.parse().ok()).unwrap_or(0);
    let not_valid = field("Not VALID answers:").and_then(|v| v.parse().ok()).unwrap_or(0);
    // `1234 requests in 5.00s, 300.00KB read`
    let (requests, seconds) = text
        .lines()
        .find_map(|l| {
            let (n, rest) = l.split_once(" requests in ")?;
            let elapsed = rest.split(',').next()?;
            Some((n.trim().parse::<u64>().ok()?, to_ms(elapsed.trim()) / 1e3))
        })
        .context("wrk printed no request count")?;
    Ok(Load { requests, seconds, rps: requests as f64 / seconds, p50_ms, p99_ms, errors, not_valid, runs: 1 })
}

/// wrk's durations: `812.00us`, `2.71ms`, `1.02s`, `1.00m`.
fn to_ms(text: &str) -> f64 {
    let split = text.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(text.len());
    let value: f64 = text[..split].parse().unwrap_or(f64::NAN);
    match &text[split..] {
        "us" => value / 1e3,
        "ms" => value,
        "s" => value * 1e3,
        "m" => value * 60e3,
        _ => f64::NAN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let text = "Running 3s test @ http://127.0.0.1:1/v1/keys/verify\n  Latency Distribution\n     50%    2.71ms\n     75%    3.00ms\n     90%    4.00ms\n     99%    1.02s\n  412 requests in 2.06s, 90.00KB read\nRequests/sec:    200.00\nNot VALID answers: 7\n";
        let load = parse_wrk(text).expect("parsed");
        assert_eq!((load.requests, load.not_valid, load.errors), (412, 7, 0));
        assert!((load.seconds - 2.06).abs() < 1e-9);
        assert!((load.rps - 200.0).abs() < 1e-9);
        assert!((load.p50_ms - 2.71).abs() < 1e-9 && (load.p99_ms - 1020.0).abs() < 1e-9);
    }

    #[test]
    fn miss_keys_grow_with_the_rate() {
        assert_eq!(keys_for_misses(0.0, Duration::from_secs(5)), 100);
        assert_eq!(keys_for_misses(100.0, Duration::from_secs(5)), 650);
        assert_eq!(keys_for_misses(1e9, Duration::from_secs(5)), 20_000);
    }
}
