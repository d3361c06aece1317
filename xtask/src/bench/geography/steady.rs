//! Steady load on hot keys: every region asked about each key at a fixed interval, on a fixed
//! schedule (a request's latency counts from its scheduled time, so a slow answer cannot hide
//! the requests queued behind it), while some keys are revoked. Every answer is checked against
//! those revocations, from its `version` and `decided_at_ms` when the edge answers them, else
//! from the time the answer arrived.

use std::time::{Duration, Instant};

use keyward_tests::world::World;
use serde_json::Value;

use super::super::epoch_ms;
use super::super::revocation::revoke;

/// Requests in flight per region at most: a slot's request is sent by the worker whose turn it
/// is, so with requests of up to `WORKERS` × the interval none waits for a free worker.
const WORKERS: usize = 32;

/// One verify answer under the steady load.
pub struct Answer {
    pub region: usize,
    pub key: usize,
    /// From the scheduled send to the answer's arrival.
    pub latency_ms: f64,
    pub arrived_ms: f64,
    /// HTTP status; 0 when no answer came.
    pub status: u16,
    /// The outcome's code, or the error's (`TIMEOUT` when no answer came).
    pub code: String,
    pub valid: bool,
    /// The edge waited for the authority (and KV): `source` `authority` or `kv`.
    pub waited: bool,
    pub version: Option<u64>,
    pub decided_at_ms: Option<u64>,
    /// The key's first ask in this region in this load: its copy was made hot before the load,
    /// while the other keys were, and its trust may have run out since (a round trip per key at
    /// a far region), so it is counted apart from the steady figures.
    pub first: bool,
}

/// A key revoked during the load.
pub struct Revoked {
    pub key: usize,
    pub version: u64,
    /// When the revoke call answered (Unix ms).
    pub answered_ms: f64,
}

/// What the load asks: `keys` hot keys, each region at `rate` requests a second in all.
pub struct Load<'a> {
    pub world: &'a World,
    pub keys: &'a [(String, String)],
    pub rate: u64,
    pub duration: Duration,
    /// Keys revoked during the load, at evenly spread moments in its middle half.
    pub revoke: usize,
}

impl Load<'_> {
    /// Runs the load; answers every answer and the revocations made.
    pub fn run(&self) -> anyhow::Result<(Vec<Answer>, Vec<Revoked>)> {
        self.touch();
        let interval = Duration::from_secs_f64(1.0 / self.rate as f64);
        let slots = (self.duration.as_secs_f64() * self.rate as f64) as usize;
        let start = Instant::now() + Duration::from_millis(200);
        let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build()?;
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..self.world.regions.len())
                .flat_map(|region| (0..WORKERS).map(move |w| (region, w)))
                .map(|(region, w)| {
                    let client = client.clone();
                    scope.spawn(move || self.worker(&client, region, w, slots, start, interval))
                })
                .collect();
            let revoked = self.revocations(start);
            let answers = workers.into_iter().flat_map(|w| w.join().expect("a load worker")).collect();
            Ok((answers, revoked?))
        })
    }

    /// Asks every region about every key once, all at once, right before the load: the keys
    /// were made hot one after another, which at a far region takes several seconds, so without
    /// this the load would begin on copies (the keys', the root key's, the API's) whose trust
    /// ran out meanwhile, and measure that instead of hot keys.
    fn touch(&self) {
        std::thread::scope(|scope| {
            for region in 0..self.world.regions.len() {
                for (_, key) in self.keys {
                    scope.spawn(move || {
                        self.world.edge_verify(region, &self.world.root_key, serde_json::json!({ "key": key }))
                    });
                }
            }
        });
    }

    /// Worker `w` of `region`: slots `w`, `w + WORKERS`, ..., each sent at its time.
    fn worker(
        &self,
        client: &reqwest::blocking::Client,
        region: usize,
        w: usize,
        slots: usize,
        start: Instant,
        interval: Duration,
    ) -> Vec<Answer> {
        let url = format!("{}/v1/keys/verify", self.world.regions[region].spec.url());
        let mut answers = Vec::new();
        for slot in (w..slots).step_by(WORKERS) {
            let at = start + interval * slot as u32;
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            // Slots go round the regions' keys, so each key is asked about every `keys` slots.
            let key = slot % self.keys.len();
            let body = serde_json::json!({ "key": self.keys[key].1 });
            let sent = client.post(&url).bearer_auth(&self.world.root_key).json(&body).send();
            let (status, answer) = match sent {
                Ok(r) => (r.status().as_u16(), r.json::<Value>().unwrap_or_default()),
                Err(_) => (0, Value::Null),
            };
            let source = answer["source"].as_str().unwrap_or("");
            let code = answer["code"].as_str().or(answer["error"]["code"].as_str()).unwrap_or("TIMEOUT");
            answers.push(Answer {
                region,
                key,
                latency_ms: at.elapsed().as_secs_f64() * 1e3,
                arrived_ms: epoch_ms(),
                status,
                code: code.to_owned(),
                valid: answer["valid"] == true,
                waited: source == "authority" || source == "kv",
                version: answer["version"].as_u64(),
                decided_at_ms: answer["decided_at_ms"].as_u64(),
                first: slot < self.keys.len(),
            });
        }
        answers
    }

    /// Revokes the first `revoke` keys one by one during the middle half of the load.
    fn revocations(&self, start: Instant) -> anyhow::Result<Vec<Revoked>> {
        let mut revoked = Vec::new();
        for key in 0..self.revoke.min(self.keys.len()) {
            let at = start + self.duration.mul_f64(0.25 + 0.5 * key as f64 / self.revoke.max(1) as f64);
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            let answer = revoke(self.world, &self.keys[key].0)?;
            let version = answer["version"].as_u64().ok_or_else(|| anyhow::anyhow!("no version in {answer}"))?;
            revoked.push(Revoked { key, version, answered_ms: epoch_ms() });
        }
        Ok(revoked)
    }
}

/// How the answers stand against the revocations.
#[derive(Default)]
pub struct Check {
    /// Answers for revoked keys.
    pub checked: usize,
    /// `VALID` answers decided past the revoke answer plus `max_staleness_ms`, or from a record
    /// at or past the revoked version: breaks of the promise.
    pub past_bound: usize,
    /// `VALID` answers decided after the revoke answer but within the bound.
    pub after_answer: usize,
    /// Answers that carried both `version` and `decided_at_ms`.
    pub with_fields: usize,
}

/// Checks every answer about a revoked key: the time of its decision is `decided_at_ms` when
/// the edge answers it, else the answer's arrival (later than the decision: stricter).
pub fn check(answers: &[Answer], revoked: &[Revoked], max_staleness_ms: f64) -> Check {
    let mut check = Check::default();
    for answer in answers {
        check.with_fields += usize::from(answer.version.is_some() && answer.decided_at_ms.is_some());
        let Some(revocation) = revoked.iter().find(|r| r.key == answer.key) else { continue };
        check.checked += 1;
        if !answer.valid {
            continue;
        }
        let decided = answer.decided_at_ms.map_or(answer.arrived_ms, |ms| ms as f64);
        let from_revoked = answer.version.is_some_and(|v| v >= revocation.version);
        if from_revoked || decided > revocation.answered_ms + max_staleness_ms {
            check.past_bound += 1;
        } else if decided > revocation.answered_ms {
            check.after_answer += 1;
        }
    }
    check
}
