//! How this isolate keeps its copies of keys and root keys confirmed, one mechanism for both:
//! refresh ahead, the single flight, and memory trust.
//!
//! - Refresh ahead: a copy that has used `REFRESH_AHEAD_PERCENT` of its trust (default
//!   [`freshness::REFRESH_AHEAD_PERCENT`]; 100 turns it off) is confirmed again after the
//!   answer (`wait_until`) while requests go on being answered from it. Only a stale copy, or a
//!   miss, waits for a confirmation.
//! - Single flight: one confirmation per key is under way at a time in an isolate. A request
//!   that would start another, in the background or for a stale copy or a miss, waits for the
//!   one under way (at most as long as a confirmation may take), then looks again: a copy that
//!   confirmation left stale was either not confirmed in time (the request fails closed at
//!   once) or confirmed but staler than its `max_staleness_ms` by the wait (the request
//!   confirms it itself): `freshness::after_join`.
//! - Memory trust: where purges reach only the Cache API (`PURGE_MODE` `tag-only`, as
//!   Cloudflare's purge-by-tag), memory answers a key's copy for `MEMORY_TRUST_MS` (default
//!   [`MEMORY_TRUST_MS`]) after the Cache API last showed it, then reads the Cache API again.
//!
//! A confirmation's result never replaces a newer copy (see `crate::lookup`), and counts as
//! confirmed from when it was asked, so none of this moves the `max_staleness_ms` bound.

use std::cell::{Cell, RefCell};

use keyward_shared::freshness;
use keyward_shared::internal::ConfirmCounts;
use worker::{Context, Date, Delay, Env};

use crate::deadline;
use crate::misses::Kind;

/// How long isolate memory trusts a key's copy after the Cache API last showed it, where
/// purges reach only the Cache API, unless the worker's `MEMORY_TRUST_MS` says otherwise.
pub(crate) const MEMORY_TRUST_MS: u64 = 100;
/// How often a request waiting for another's confirmation looks at it again.
const JOIN_POLL_MS: u64 = 5;
/// Added to the confirmations' recent round trip to make refresh ahead's lead: a request
/// finding its copy at the lead's start may be a little late.
const LEAD_MARGIN_MS: u64 = 50;

/// This isolate's settings, read from the worker's variables at its first request.
#[derive(Clone, Copy)]
struct Settings {
    refresh_ahead_percent: u64,
    /// `None` where purges reach memory (`PURGE_MODE` other than `tag-only`).
    memory_trust_ms: Option<u64>,
    /// The longest a confirmation may take: the longer of the authority's deadline and KV's
    /// (they are read together), and the Cache API's write; with tag-only purges, also its
    /// mark's read (or write) before and read after, and a drop, for each of its two rounds.
    flight_ms: u64,
}

thread_local! {
    static SETTINGS: Cell<Option<Settings>> = const { Cell::new(None) };
    /// Confirmations under way, by kind and hash, and when each was asked: a few at a time, so
    /// a list (smaller in the worker than another map type).
    static IN_FLIGHT: RefCell<Vec<(Id, u64)>> = const { RefCell::new(Vec::new()) };
    /// How long this isolate's confirmations have taken lately: raised at once by a slower one,
    /// lowered by an eighth of the difference by a faster one.
    static ROUND_TRIP_MS: Cell<u64> = const { Cell::new(0) };
    static COUNTS: Cell<[ConfirmCounts; 4]> =
        const { Cell::new([ConfirmCounts { waited: 0, ahead: 0, shared: 0, overtaken: 0, unmarked: 0 }; 4]) };
}

/// Reads `REFRESH_AHEAD_PERCENT`, `PURGE_MODE` and `MEMORY_TRUST_MS` once per isolate.
pub(crate) fn configure(env: &Env) {
    if SETTINGS.get().is_some() {
        return;
    }
    let number = |name: &str| env.var(name).ok().and_then(|v| v.to_string().parse::<u64>().ok());
    let tag_only = env.var("PURGE_MODE").is_ok_and(|v| v.to_string() == "tag-only");
    SETTINGS.set(Some(Settings {
        refresh_ahead_percent: number("REFRESH_AHEAD_PERCENT").unwrap_or(freshness::REFRESH_AHEAD_PERCENT),
        memory_trust_ms: tag_only.then(|| number("MEMORY_TRUST_MS").unwrap_or(MEMORY_TRUST_MS)),
        flight_ms: flight_ms(deadline::authority_ms(env), tag_only),
    }));
}

/// A confirmation's longest time (see [`Settings::flight_ms`]).
fn flight_ms(authority_ms: u64, tag_only: bool) -> u64 {
    let round = authority_ms.max(deadline::KV_MS) + deadline::CACHE_MS;
    match tag_only {
        true => 2 * (round + 4 * deadline::CACHE_MS),
        false => round,
    }
}

fn settings() -> Settings {
    SETTINGS.get().unwrap_or(Settings {
        refresh_ahead_percent: freshness::REFRESH_AHEAD_PERCENT,
        memory_trust_ms: None,
        flight_ms: deadline::MAX_AUTHORITY_MS.max(deadline::KV_MS) + deadline::CACHE_MS,
    })
}

/// When this isolate confirms a copy ahead of its expiry: at `REFRESH_AHEAD_PERCENT` of its
/// trust, or once no more of it is left than its confirmations' recent round trip and a margin.
pub(crate) fn ahead_rule() -> freshness::Ahead {
    let lead_ms = ROUND_TRIP_MS.get() + LEAD_MARGIN_MS;
    freshness::Ahead { percent: refresh_ahead_percent(), lead_ms }
}

/// Takes one confirmation's duration into the recent round trip.
fn took(ms: u64) {
    let held = ROUND_TRIP_MS.get();
    ROUND_TRIP_MS.set(if ms >= held { ms } else { held - (held - ms) / 8 });
}

/// The share of its trust after which a copy is confirmed ahead of expiry, in percent.
fn refresh_ahead_percent() -> u64 {
    settings().refresh_ahead_percent
}

/// How long memory trusts a key's copy after the Cache API showed it; `None`: for as long as
/// the copy is fresh (purges reach memory).
pub(crate) fn memory_trust_ms() -> Option<u64> {
    settings().memory_trust_ms
}

/// What one confirmation was.
#[derive(Clone, Copy)]
pub(crate) enum Confirmation {
    Waited,
    Ahead,
    Shared,
    Overtaken,
    Unmarked,
}

fn slot(kind: Kind) -> usize {
    match kind {
        Kind::Key => 0,
        Kind::RootKey => 1,
        Kind::Api => 2,
        Kind::Identity => 3,
    }
}

/// Counts a confirmation of `kind`.
pub(crate) fn count(kind: Kind, what: Confirmation) {
    let mut counts = COUNTS.get();
    let c = &mut counts[slot(kind)];
    match what {
        Confirmation::Waited => c.waited += 1,
        Confirmation::Ahead => c.ahead += 1,
        Confirmation::Shared => c.shared += 1,
        Confirmation::Overtaken => c.overtaken += 1,
        Confirmation::Unmarked => c.unmarked += 1,
    }
    COUNTS.set(counts);
}

/// How this isolate confirmed copies of `kind`.
pub(crate) fn counts(kind: Kind) -> ConfirmCounts {
    COUNTS.get()[slot(kind)]
}

/// A confirmation under way; it is no longer under way once dropped (finished, failed or
/// cancelled).
pub(crate) struct Flight {
    id: Id,
    asked_ms: u64,
}

impl Drop for Flight {
    fn drop(&mut self) {
        took(Date::now().as_millis().saturating_sub(self.asked_ms));
        // Only this flight's mark: one that replaced it (this one ran past its time) stays.
        IN_FLIGHT.with(|f| f.borrow_mut().retain(|held| *held != (self.id, self.asked_ms)));
    }
}

/// A confirmation: of which kind of record, and the hash.
type Id = (usize, [u8; 32]);

fn id(kind: Kind, hash: &[u8; 32]) -> Id {
    (slot(kind), *hash)
}

fn asked_at(id: &Id) -> Option<u64> {
    IN_FLIGHT.with(|f| f.borrow().iter().find(|(held, _)| held == id).map(|(_, asked)| *asked))
}

/// Whether a confirmation of this key is under way (asked within the longest a confirmation
/// may take).
fn under_way(kind: Kind, hash: &[u8; 32], now_ms: u64) -> bool {
    asked_at(&id(kind, hash)).is_some_and(|asked| in_time(asked, now_ms))
}

/// Whether a confirmation asked at `asked_ms` may still be under way at `now_ms`.
fn in_time(asked_ms: u64, now_ms: u64) -> bool {
    now_ms.saturating_sub(asked_ms) < settings().flight_ms
}

/// Marks a confirmation of this key as under way, asked at `now_ms`, unless one already is.
pub(crate) fn begin(kind: Kind, hash: &[u8; 32], now_ms: u64) -> Option<Flight> {
    if under_way(kind, hash, now_ms) {
        return None;
    }
    let id = id(kind, hash);
    IN_FLIGHT.with(|f| {
        let mut flights = f.borrow_mut();
        // One past its time (a confirmation that never finished) gives way.
        flights.retain(|(held, _)| *held != id);
        flights.push((id, now_ms));
    });
    Some(Flight { id, asked_ms: now_ms })
}

/// Starts `confirm()` after the answer (`wait_until`) unless a confirmation of this key is
/// under way; counts it as a confirmation ahead of expiry.
pub(crate) fn ahead<F>(ctx: &Context, kind: Kind, hash: &[u8; 32], now_ms: u64, confirm: impl FnOnce() -> F)
where
    F: Future<Output = ()> + 'static,
{
    let Some(flight) = begin(kind, hash, now_ms) else {
        return;
    };
    count(kind, Confirmation::Ahead);
    let confirmation = confirm();
    ctx.wait_until(async move {
        confirmation.await;
        drop(flight);
    });
}

/// Another request's confirmation that a request waited for.
#[derive(Clone, Copy)]
pub(crate) struct Joined {
    /// The time after the wait.
    pub(crate) now_ms: u64,
    /// When that confirmation was asked (see [`freshness::after_join`]).
    pub(crate) asked_ms: u64,
}

/// Waits while another request's confirmation of this key is under way (at most the longest
/// a confirmation may take); answers whether there was one, when it was asked, and the time
/// after the wait.
pub(crate) async fn join(kind: Kind, hash: &[u8; 32], now_ms: u64) -> Option<Joined> {
    let id = id(kind, hash);
    let asked_ms = asked_at(&id).filter(|asked| in_time(*asked, now_ms))?;
    count(kind, Confirmation::Shared);
    let mut now = now_ms;
    // Only the confirmation joined, and no longer than it may take: one begun after it ended is
    // not waited for as well (an outage would cost one deadline more).
    while asked_at(&id) == Some(asked_ms) && in_time(asked_ms, now) {
        // Polled, not woken by the confirmation's end: under workerd a request's task woken from
        // another request's (the one that confirms) would run its I/O in that request's context,
        // which the runtime refuses (tried: those requests failed with 500).
        Delay::from(std::time::Duration::from_millis(JOIN_POLL_MS)).await;
        now = Date::now().as_millis();
    }
    Some(Joined { now_ms: now, asked_ms })
}
