//! How many lookups one caller may make the edge fetch: a token bucket per caller, refilled
//! continuously. The edge keeps one per isolate for key misses (per root key) and one for
//! root-key misses (per client address), so random well-formed keys cost a bounded number of
//! KV reads and Durable Object requests whoever sends them.

use std::collections::HashMap;

/// Token buckets, one per caller, each holding at most `burst` tokens and gaining `per_second`
/// a second. Callers idle long enough to be full again are forgotten, so the map stays small.
#[derive(Debug)]
pub struct Buckets {
    per_second: u32,
    burst: u32,
    /// Tokens (in thousandths) and when they were counted, per caller.
    held: HashMap<String, (u64, u64)>,
    last_sweep_ms: u64,
}

/// How many callers are tracked before idle ones are swept.
const SWEEP_AT: usize = 4_096;

impl Buckets {
    pub fn new(per_second: u32, burst: u32) -> Buckets {
        Buckets { per_second, burst, held: HashMap::new(), last_sweep_ms: 0 }
    }

    /// Takes one token from `caller`'s bucket at `now_ms`; false when it is empty.
    pub fn take(&mut self, caller: &str, now_ms: u64) -> bool {
        if self.held.len() >= SWEEP_AT && now_ms > self.last_sweep_ms {
            self.sweep(now_ms);
        }
        let full = u64::from(self.burst) * 1_000;
        let (milli_tokens, at) = self.held.get(caller).copied().unwrap_or((full, now_ms));
        let refilled = (milli_tokens + now_ms.saturating_sub(at) * u64::from(self.per_second)).min(full);
        let (left, taken) = if refilled >= 1_000 { (refilled - 1_000, true) } else { (refilled, false) };
        self.held.insert(caller.to_owned(), (left, now_ms.max(at)));
        taken
    }

    /// Forgets callers whose buckets have refilled completely.
    fn sweep(&mut self, now_ms: u64) {
        let full = u64::from(self.burst) * 1_000;
        let per_second = u64::from(self.per_second);
        self.held.retain(|_, (tokens, at)| *tokens + now_ms.saturating_sub(*at) * per_second < full);
        self.last_sweep_ms = now_ms;
    }

    /// How many callers are tracked.
    pub fn tracked(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let mut buckets = Buckets::new(50, 50);
        let taken = (0..60).filter(|_| buckets.take("root_a", 1_000)).count();
        assert_eq!(taken, 50, "the burst");
        assert!(!buckets.take("root_a", 1_000));
        assert!(!buckets.take("root_a", 1_019), "19 ms refill less than one token at 50/s");
        assert!(buckets.take("root_a", 1_020), "20 ms refill one token");
        let over_a_second = (0..100).filter(|i| buckets.take("root_a", 1_020 + i * 10)).count();
        assert!((49..=51).contains(&over_a_second), "{over_a_second} in about a second at 50/s");
    }

    #[test]
    fn callers_do_not_share_a_bucket() {
        let mut buckets = Buckets::new(50, 50);
        for _ in 0..50 {
            assert!(buckets.take("noisy", 0));
        }
        assert!(!buckets.take("noisy", 0));
        assert!(buckets.take("quiet", 0), "another caller is not limited by the noisy one");
    }

    #[test]
    fn a_clock_that_steps_back_takes_no_extra_tokens() {
        let mut buckets = Buckets::new(10, 1);
        assert!(buckets.take("c", 5_000));
        assert!(!buckets.take("c", 1_000), "an earlier time refills nothing");
        assert!(!buckets.take("c", 5_050));
        assert!(buckets.take("c", 5_100));
    }

    #[test]
    fn full_buckets_are_forgotten() {
        let mut buckets = Buckets::new(50, 50);
        for i in 0..SWEEP_AT {
            buckets.take(&format!("caller-{i}"), 0);
        }
        assert_eq!(buckets.tracked(), SWEEP_AT);
        buckets.take("late", 10_000);
        assert_eq!(buckets.tracked(), 1, "every earlier caller refilled in 10 s");
    }
}
