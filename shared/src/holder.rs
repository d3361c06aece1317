//! A holder's measure of its own demand: what an isolate that spends leased credits or limit
//! tokens asks its authority to cover, and how far ahead of running out it asks. Pure: the
//! edge keeps one [`Rate`] per holding and passes it the clock.
//!
//! The rate is what was wanted per second of the time the holder *could* spend: time spent with
//! nothing in hand, waiting for the authority, is left out, and so is what was wanted during it
//! (callers that wait for their answer send nothing more meanwhile, callers that do not send
//! more than could have been served; neither is the rate at which the holder spends when it has
//! something). Counted over the wait, a rate reads low because the holder was starved, the next
//! lease sized to it runs out again before the one asked after it arrives, and a far holder
//! climbs to its real rate one round trip at a time (measured at a region 180 ms from its
//! authority: nine waits of 370 ms in the first 4 s of a steady load).
//!
//! A window ends at its last want, so a burst followed by quiet is remembered at the burst's
//! rate and the first lease asked when demand returns covers it; a closed window counts over
//! at least [`MIN_CLOSED_SPAN_MS`], so a single request or a moment's burst does not read as a
//! large rate. What a rate can cost is bounded elsewhere: a lease is never more than a
//! [`SHARE_DIVISOR`](crate::credits::SHARE_DIVISOR)th of what is available, and an unspent lease
//! is reported back (or, unreported, counted as stranded).

/// The window over which a holder measures its rate.
pub const RATE_WINDOW_MS: u64 = 1_000;
/// The shortest span the current window's rate is computed over.
pub const MIN_SPAN_MS: u64 = 100;
/// The shortest span a closed window's rate is computed over (it is remembered across quiet).
pub const MIN_CLOSED_SPAN_MS: u64 = 250;
/// A holder asks ahead when what it holds covers less than this much of its rate, or than its
/// last request's round trip plus [`AHEAD_MARGIN_MS`] when that is longer.
pub const AHEAD_MS: u64 = 500;
pub const AHEAD_MARGIN_MS: u64 = 150;

/// A holder's recent demand (credits, a limit's tokens), measured over [`RATE_WINDOW_MS`]
/// windows, not counting the time it had nothing to spend; and its last round trip to the
/// authority.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rate {
    /// The current window's start, when it was last wanted, what was wanted in it while the
    /// holder had something in hand, how much of it the holder spent with nothing in hand
    /// (closed periods only), and how much of it had been so as of its last want.
    window_start: u64,
    window_last: u64,
    window_wanted: u64,
    window_starved: u64,
    starved_at_last: u64,
    /// Since when the holder has had nothing in hand, if it has nothing now.
    starved_since: Option<u64>,
    /// The last closed window's rate.
    rate_per_s: u64,
    /// How long the last answered request to the authority took, asked to answered.
    round_trip_ms: u64,
}

impl Rate {
    /// Notes `cost` wanted at `now_ms` (0 counts as 1: a check is demand too). Not counted
    /// while the holder has nothing in hand.
    pub fn want(&mut self, cost: u64, now_ms: u64) {
        if now_ms.saturating_sub(self.window_start) >= RATE_WINDOW_MS {
            let span = self.window_last.saturating_sub(self.window_start);
            let unstarved = span.saturating_sub(self.starved_at_last).max(MIN_CLOSED_SPAN_MS);
            self.rate_per_s = self.window_wanted.saturating_mul(1_000) / unstarved;
            self.window_start = now_ms;
            self.window_wanted = 0;
            self.window_starved = 0;
            if self.starved_since.is_some() {
                self.starved_since = Some(now_ms);
            }
        }
        if self.starved_since.is_none() {
            self.window_wanted = self.window_wanted.saturating_add(cost.max(1));
        }
        self.window_last = now_ms;
        self.starved_at_last = self.starved_in_window(now_ms);
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
            self.window_starved = self.window_starved.saturating_add(now_ms.saturating_sub(since));
        }
    }

    /// The rate to ask with at `now_ms`: the last closed window's, or the current one's so far,
    /// whichever is higher.
    pub fn per_s(&self, now_ms: u64) -> u64 {
        let elapsed = now_ms.saturating_sub(self.window_start);
        let unstarved = elapsed.saturating_sub(self.starved_in_window(now_ms)).max(MIN_SPAN_MS);
        self.rate_per_s.max(self.window_wanted.saturating_mul(1_000) / unstarved)
    }

    /// Notes how long an answered request to the authority took, asked at `asked_ms`, answered
    /// at `now_ms` (a request that got no answer says nothing of the round trip).
    pub fn answered(&mut self, asked_ms: u64, now_ms: u64) {
        self.round_trip_ms = now_ms.saturating_sub(asked_ms);
    }

    /// How far ahead of running out a holder asks again: [`AHEAD_MS`], or its last request's
    /// round trip plus [`AHEAD_MARGIN_MS`] when that is longer (a holder far from the authority
    /// asks earlier).
    pub fn lead_ms(&self) -> u64 {
        AHEAD_MS.max(self.round_trip_ms.saturating_add(AHEAD_MARGIN_MS))
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
        self.window_starved.saturating_add(open)
    }
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
        let mut fresh = Rate::default();
        assert_eq!(fresh.per_s(0), 0, "nothing wanted yet");
        fresh.want(1, 0);
        assert_eq!(fresh.per_s(0), 10, "one request counts over the shortest span, 100 ms");

        let mut even = Rate::default();
        let now = steady(&mut even, 0, 1_000, 2);
        assert_eq!(even.per_s(now), 500 * 1_000 / 998, "the first window's, 500 to its last want at 998 ms");
        let now = steady(&mut even, now, 10, 2);
        assert_eq!(even.per_s(now), 500 * 1_000 / 998, "the second window's, as even, once it rolled");

        // A holder spends 10 in 20 ms, then waits 370 ms for its next lease, then 40 more in
        // 80 ms: its rate is 500 a second, not 52 in 470 ms.
        let mut starved = Rate::default();
        let now = steady(&mut starved, 0, 10, 2);
        starved.want(1, now);
        starved.starved(now);
        starved.want(1, now + 1);
        starved.want(5, now + 200);
        assert_eq!(starved.per_s(now + 370), 11 * 1_000 / MIN_SPAN_MS, "what was wanted in the wait is not counted");
        starved.fed(now + 370);
        let after = steady(&mut starved, now + 370, 40, 2);
        assert_eq!(starved.per_s(after), 51 * 1_000 / 100, "51 wanted over the 100 ms unstarved");
        let mut counted_in = Rate::default();
        let now = steady(&mut counted_in, 0, 11, 2);
        steady(&mut counted_in, now + 370, 40, 2);
        assert_eq!(counted_in.per_s(after), 51 * 1_000 / 470, "the same requests over the wait read 108");
    }

    #[test]
    fn a_window_closed_after_a_wait() {
        // 500 wanted over 0-998 ms; the last want then waits until 1,368; the next comes at 5 s:
        // the closed window reads 500 over its 998 ms, not over 998 less a wait after its end.
        let mut rate = Rate::default();
        let now = steady(&mut rate, 0, 500, 2);
        rate.starved(now - 2);
        rate.fed(1_368);
        rate.want(1, 5_000);
        assert_eq!(rate.per_s(5_000), 500 * 1_000 / 998);

        // A wait inside the window is left out when it closes: 300 wanted in 0-300 ms, a wait
        // from 300 to 700 ms, 300 more in 700-1,000 ms: 600 over 600 ms unstarved.
        let mut inside = Rate::default();
        let now = steady(&mut inside, 0, 300, 1);
        inside.starved(now);
        inside.fed(700);
        steady(&mut inside, 700, 300, 1);
        inside.want(1, 1_000);
        assert_eq!(inside.per_s(1_000), 600 * 1_000 / 599, "599 ms: the window ends at its last want, 999");
    }

    #[test]
    fn a_burst_then_quiet() {
        // 200 in 400 ms, then nothing for 15 s: the first want after reads the burst's rate.
        let mut rate = Rate::default();
        steady(&mut rate, 0, 200, 2);
        rate.want(1, 15_400);
        assert_eq!(rate.per_s(15_400), 200 * 1_000 / 398, "200 over 0-398 ms, not over 15.4 s");
        // Once that window closes with one want, it reads over the shortest closed span (4 a
        // second), under the new window's one want over the shortest span (10).
        rate.want(1, 16_400);
        assert_eq!(rate.per_s(16_400), 1_000 / MIN_SPAN_MS);
        // A moment's burst reads no more than the shortest closed span allows.
        let mut moment = Rate::default();
        steady(&mut moment, 0, 50, 0);
        moment.want(1, 2_000);
        assert_eq!(moment.per_s(2_000), 50 * 1_000 / MIN_CLOSED_SPAN_MS, "50 at once: 200 a second, not 50,000");
    }

    #[test]
    fn huge_costs_saturate() {
        let mut rate = Rate::default();
        rate.want(u64::MAX, 0);
        rate.want(u64::MAX, 1);
        assert_eq!(rate.per_s(1), u64::MAX / MIN_SPAN_MS);
        rate.answered(0, u64::MAX);
        assert_eq!(rate.lead_ms(), u64::MAX);
        assert!(!rate.short(u64::MAX, 1, 1_000));
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
