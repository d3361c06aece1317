//! A holder's measure of its own demand: what an isolate that spends leased credits or limit
//! tokens asks its authority to cover, and how far ahead of running out it asks. Pure: the
//! edge keeps one [`Rate`] per holding and passes it the clock.
//!
//! The rate is demand per second of the time the holder *could* spend. Time spent with nothing
//! in hand, waiting for the authority, is left out: callers that wait send nothing more, so a
//! rate counted over that time would be low because the holder was starved, the next lease
//! sized to that low rate would run out again before the one asked after it arrived, and a far
//! holder would climb to its real rate one round trip at a time (measured at a region 180 ms
//! from its authority: nine waits of 370 ms in the first 4 s of a steady load).

/// The window over which a holder measures its rate.
pub const RATE_WINDOW_MS: u64 = 1_000;
/// The shortest span a rate is computed over, so that a few requests in a moment do not read
/// as a huge rate.
pub const MIN_SPAN_MS: u64 = 50;
/// A holder asks ahead when what it holds covers less than this much of its rate, or than its
/// last request's round trip plus [`AHEAD_MARGIN_MS`] when that is longer.
pub const AHEAD_MS: u64 = 500;
pub const AHEAD_MARGIN_MS: u64 = 150;

/// A holder's recent demand (credits, a limit's tokens), measured over [`RATE_WINDOW_MS`]
/// windows, not counting the time it had nothing to spend; and its last round trip to the
/// authority.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rate {
    /// The current window's start, when it was last wanted, what was wanted in it, and how much
    /// of it the holder spent with nothing in hand (closed periods only).
    window_start: u64,
    window_last: u64,
    window_wanted: u64,
    window_starved: u64,
    /// Since when the holder has had nothing in hand, if it has nothing now.
    starved_since: Option<u64>,
    /// The last full window's rate.
    rate_per_s: u64,
    /// How long the last answered request to the authority took, asked to answered.
    round_trip_ms: u64,
}

impl Rate {
    /// Notes `cost` wanted at `now_ms` (0 counts as 1: a check is demand too). A window ends at
    /// its last want: a burst followed by quiet is remembered at the burst's rate, so the first
    /// lease asked when demand returns covers it.
    pub fn want(&mut self, cost: u64, now_ms: u64) {
        if now_ms.saturating_sub(self.window_start) >= RATE_WINDOW_MS {
            let end = self.window_last.max(self.window_start);
            let starved = self.starved_in_window(end).min(end - self.window_start);
            self.rate_per_s = per_s(self.window_wanted, end - self.window_start, starved);
            self.window_start = now_ms;
            self.window_wanted = 0;
            self.window_starved = 0;
            if self.starved_since.is_some() {
                self.starved_since = Some(now_ms);
            }
        }
        self.window_wanted += cost.max(1);
        self.window_last = now_ms;
    }

    /// A request found nothing in hand at `now_ms` and waits for the authority.
    pub fn starved(&mut self, now_ms: u64) {
        if self.starved_since.is_none() {
            self.starved_since = Some(now_ms.max(self.window_start));
        }
    }

    /// The authority answered at `now_ms`: the holder has something in hand again, or will not
    /// spend until it asks again; either way the wait is over.
    pub fn fed(&mut self, now_ms: u64) {
        if let Some(since) = self.starved_since.take() {
            self.window_starved += now_ms.saturating_sub(since);
        }
    }

    /// The rate to ask with at `now_ms`: the last full window's, or the current one's so far,
    /// whichever is higher.
    pub fn per_s(&self, now_ms: u64) -> u64 {
        let elapsed = now_ms.saturating_sub(self.window_start);
        self.rate_per_s.max(per_s(self.window_wanted, elapsed, self.starved_in_window(now_ms)))
    }

    /// Notes how long a request to the authority took, asked at `asked_ms`, answered at `now_ms`.
    pub fn answered(&mut self, asked_ms: u64, now_ms: u64) {
        self.round_trip_ms = now_ms.saturating_sub(asked_ms);
    }

    /// How far ahead of running out a holder asks again: [`AHEAD_MS`], or its last request's
    /// round trip plus [`AHEAD_MARGIN_MS`] when that is longer (a holder far from the authority
    /// asks earlier).
    pub fn lead_ms(&self) -> u64 {
        AHEAD_MS.max(self.round_trip_ms + AHEAD_MARGIN_MS)
    }

    /// Whether `left` in hand covers less than the lead at this rate (never more lead than
    /// `most_ms`: half a lease's lifetime, or a lease would count as short on arrival).
    pub fn short(&self, left: u64, now_ms: u64, most_ms: u64) -> bool {
        let lead_ms = self.lead_ms().min(most_ms);
        left.saturating_mul(1_000) < self.per_s(now_ms).max(1).saturating_mul(lead_ms)
    }

    /// How much of the current window, up to `until_ms`, the holder had nothing in hand.
    fn starved_in_window(&self, until_ms: u64) -> u64 {
        let open = self.starved_since.map_or(0, |since| until_ms.saturating_sub(since));
        self.window_starved + open
    }
}

/// `wanted` per second over `elapsed` milliseconds less `starved` of them (at least
/// [`MIN_SPAN_MS`]).
fn per_s(wanted: u64, elapsed: u64, starved: u64) -> u64 {
    wanted.saturating_mul(1_000) / elapsed.saturating_sub(starved).max(MIN_SPAN_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wants `n` requests of cost 1, one every `every_ms` from `from_ms`; answers the clock after.
    fn steady(rate: &mut Rate, from_ms: u64, n: u64, every_ms: u64) -> u64 {
        for i in 0..n {
            rate.want(1, from_ms + i * every_ms);
        }
        from_ms + n * every_ms
    }

    #[test]
    fn rates() {
        // (what happens, the rate asked with after it)
        let mut fresh = Rate::default();
        assert_eq!(fresh.per_s(0), 0, "nothing wanted yet");
        fresh.want(1, 0);
        assert_eq!(fresh.per_s(0), 20, "one request counts over the shortest span, 50 ms");

        let mut even = Rate::default();
        let now = steady(&mut even, 0, 1_000, 2);
        assert_eq!(even.per_s(now), 500 * 1_000 / 998, "the first window's, 500 from 0 to its last at 998 ms");
        let now = steady(&mut even, now, 10, 2);
        assert_eq!(even.per_s(now), 500 * 1_000 / 998, "the second window's, as even, once it rolled");

        // A holder spends 10 in 20 ms, then waits 370 ms for its next lease: its demand is
        // 500 a second, not 10 in 390 ms.
        let mut starved = Rate::default();
        let now = steady(&mut starved, 0, 10, 2);
        starved.starved(now);
        starved.want(1, now);
        starved.want(1, now + 1);
        assert_eq!(starved.per_s(now + 370), 12 * 1_000 / MIN_SPAN_MS, "the shortest span, not 390 ms");
        starved.fed(now + 370);
        let after = steady(&mut starved, now + 370, 40, 2);
        assert_eq!(starved.per_s(after), 52 * 1_000 / 100, "52 wanted over 100 ms unstarved");
        let mut counted_in = Rate::default();
        let now = steady(&mut counted_in, 0, 10, 2);
        counted_in.want(1, now + 370);
        steady(&mut counted_in, now + 370, 40, 2);
        assert_eq!(counted_in.per_s(after), 51 * 1_000 / 470, "the same demand over the wait reads 108");

        // A wait across the window's end: the new window starts starved from its start.
        let mut across = Rate::default();
        let now = steady(&mut across, 0, 450, 2);
        across.starved(now);
        across.want(1, 1_100);
        assert_eq!(across.per_s(1_100), 450 * 1_000 / 898, "the closed window, to its last want before the wait");
        across.fed(1_300);
        let now = steady(&mut across, 1_300, 100, 2);
        assert_eq!(across.per_s(now), 101 * 1_000 / 200, "this window's 101 over its 200 ms unstarved");
    }

    #[test]
    fn a_burst_then_quiet() {
        // 200 in 400 ms, then nothing for 15 s: the first want after reads the burst's rate.
        let mut rate = Rate::default();
        steady(&mut rate, 0, 200, 2);
        rate.want(1, 15_400);
        assert_eq!(rate.per_s(15_400), 200 * 1_000 / 398, "200 over 0-398 ms, not over 15.4 s");
        // Once a quiet window rolls, its own rate counts: one want over the shortest span.
        rate.want(1, 16_400);
        assert_eq!(rate.per_s(16_400), 1_000 / MIN_SPAN_MS);
    }

    #[test]
    fn asking_ahead() {
        let mut rate = Rate::default();
        steady(&mut rate, 0, 500, 2);
        assert_eq!(rate.lead_ms(), AHEAD_MS, "near the authority");
        assert!(rate.short(249, 1_000, 1_000), "under half a second of 500 a second");
        assert!(!rate.short(250, 1_000, 1_000));
        rate.answered(0, 370);
        assert_eq!(rate.lead_ms(), 520, "a far holder asks a round trip and a margin ahead");
        assert!(rate.short(259, 1_000, 1_000));
        assert!(!rate.short(259, 1_000, 500), "never more lead than asked for");
        assert!(Rate::default().short(0, 0, 1_000), "nothing in hand is short even at no rate");
    }
}
