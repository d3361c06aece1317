//! The edge's freshness rules as pure functions of plain values: when a copy may be answered
//! from without asking, what a stale copy or a miss resolves to given what KV and the key's
//! authority said, and when a purge's record counts as confirmed.
//!
//! The invariants they keep, each a row of the tables below:
//! - A copy is answered unconfirmed only while younger than `max_staleness_ms` since the moment
//!   its confirmation was *asked* (or its signed purge was *made*); a confirmation time in the
//!   future is stale, not fresh.
//! - Revoked and deleted are final: a copy in a final state never needs confirming.
//! - KV never resurrects a key: whatever is read, the highest version wins, so a KV copy older
//!   than a revocation loses to the authority (or to the copy held here).
//! - Without an answer from the authority, only a final state is answered; anything else fails
//!   closed.
//! - A copy that has used [`REFRESH_AHEAD_PERCENT`] of its trust is confirmed again while it is
//!   still answered from (refresh ahead), so a hot key's requests never wait for the authority;
//!   the confirmation counts from when it is asked, so the bound above does not move.
//! - Where purges cannot reach isolate memory (tag-only), memory answers a copy only for its own
//!   short trust since the Cache API (which such purges clear) last showed a copy.

use crate::record::{KeyRecord, KeyStatus, RootKeyRecord};

/// A record the edge keeps copies of: a key's or a root key's.
pub trait Versioned {
    /// Grows by one on every change.
    fn version(&self) -> u64;
    /// Whether no later version can make it accepted again (revoked, deleted).
    fn is_final(&self) -> bool;
}

impl Versioned for KeyRecord {
    fn version(&self) -> u64 {
        self.version
    }
    fn is_final(&self) -> bool {
        self.status.is_final()
    }
}

impl Versioned for RootKeyRecord {
    fn version(&self) -> u64 {
        self.version
    }
    fn is_final(&self) -> bool {
        self.status.is_final()
    }
}

/// Whether a copy confirmed at `confirmed_at_ms` may be answered from at `now_ms` without
/// asking the authority. A confirmation time after `now_ms` (a clock that moved back, a purge
/// stamped by a clock ahead of this one) is not trusted.
pub fn is_fresh(confirmed_at_ms: u64, max_staleness_ms: u64, now_ms: u64) -> bool {
    confirmed_at_ms <= now_ms && now_ms - confirmed_at_ms < max_staleness_ms
}

/// What a request does with a copy it finds stale after waiting for another request's
/// confirmation of it (the edge's single flight), asked at `flight_asked_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterJoin {
    /// The confirmation landed (the copy was confirmed as of its ask, or later) and the copy
    /// went stale while the request waited: its `max_staleness_ms` is shorter than a round
    /// trip to the authority. The request confirms the copy itself.
    ConfirmAgain,
    /// The confirmation did not land in time (the authority or KV did not answer): the request
    /// fails closed at once rather than wait as long again.
    FailClosed,
}

/// [`AfterJoin`] for a copy confirmed as of `copy_confirmed_at_ms` (`None`: memory holds none).
pub fn after_join(copy_confirmed_at_ms: Option<u64>, flight_asked_ms: u64) -> AfterJoin {
    match copy_confirmed_at_ms {
        Some(confirmed) if confirmed >= flight_asked_ms => AfterJoin::ConfirmAgain,
        _ => AfterJoin::FailClosed,
    }
}

impl KeyStatus {
    /// Revoked and deleted keys never become valid again.
    pub fn is_final(self) -> bool {
        matches!(self, KeyStatus::Revoked | KeyStatus::Deleted)
    }
}

/// The share of its trust, in percent, after which a copy that is still answered from is
/// confirmed again in the background, unless a region's `REFRESH_AHEAD_PERCENT` says otherwise.
///
/// At 75 a confirmation asked at three quarters of a 1 s `max_staleness_ms` has 250 ms to land
/// before the copy goes stale: more than the 80-200 ms of a cross-world round trip to the
/// authority, and a request that finds the copy stale while it is still under way waits only
/// for its remainder (the edge's single flight). A hot key costs 1.33 authority calls a second
/// per isolate. Measured beside 50 (which covers the authority's whole 500 ms deadline): 7.8
/// against 15.1 authority calls per 1,000 verifications, 13.8 before refresh ahead
/// (BENCHMARKS.md, `cargo xtask bench fresh`).
pub const REFRESH_AHEAD_PERCENT: u64 = 75;

/// When a copy that is still answered from is confirmed again in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ahead {
    /// Once it has used this share of its trust, in percent; 100 or more turns refresh ahead off.
    pub percent: u64,
    /// Or once no more than this is left of its trust, but never earlier than half of it: where
    /// the authority is far, a confirmation asked at `percent` would land after the copy went
    /// stale, and requests would wait for it. The edge sets it from the confirmations it saw.
    pub lead_ms: u64,
}

impl Ahead {
    /// At `percent` of the trust, with no lead.
    pub const fn at(percent: u64) -> Ahead {
        Ahead { percent, lead_ms: 0 }
    }
}

/// Whether a copy confirmed at `confirmed_at_ms`, trusted for `trust_ms`, is due to be
/// confirmed again in the background at `now_ms`: it is still fresh (it may be answered from)
/// and has used at least `ahead.percent` of its trust, or has no more than `ahead.lead_ms` of it
/// left (and has used half). Never for a stale copy (that one waits for its confirmation), and
/// never at 100 percent or more (refresh ahead off).
pub fn refresh_ahead(confirmed_at_ms: u64, trust_ms: u64, now_ms: u64, ahead: Ahead) -> bool {
    if !is_fresh(confirmed_at_ms, trust_ms, now_ms) || ahead.percent >= 100 {
        return false;
    }
    let used = now_ms - confirmed_at_ms;
    let by_share = u128::from(used) * 100 >= u128::from(trust_ms) * u128::from(ahead.percent);
    let by_lead = used >= trust_ms / 2 && trust_ms - used <= ahead.lead_ms;
    by_share || by_lead
}

/// Whether a key's copy that may be answered from should be confirmed again in the background
/// (see [`refresh_ahead`]); a final copy never needs it.
pub fn key_refresh_ahead(record: &KeyRecord, confirmed_at_ms: u64, now_ms: u64, ahead: Ahead) -> bool {
    !record.status.is_final() && refresh_ahead(confirmed_at_ms, record.max_staleness_ms, now_ms, ahead)
}

/// Whether isolate memory may answer a copy without reading the Cache API again, where purges
/// reach only the Cache API: the Cache API last showed a copy of the key (or memory took it
/// from a confirmation asked) at `checked_at_ms`, and memory trusts that for `memory_trust_ms`.
/// `None` (purges reach memory): always. A final copy is always answered (nothing makes it
/// accepted again).
pub fn memory_trusted(record: &KeyRecord, checked_at_ms: u64, memory_trust_ms: Option<u64>, now_ms: u64) -> bool {
    record.status.is_final() || memory_trust_ms.is_none_or(|trust| is_fresh(checked_at_ms, trust, now_ms))
}

/// Whether a copy must be confirmed with the authority before it is answered from.
pub fn needs_confirmation(record: &KeyRecord, confirmed_at_ms: u64, now_ms: u64) -> bool {
    !record.status.is_final() && !is_fresh(confirmed_at_ms, record.max_staleness_ms, now_ms)
}

/// The confirmation time of a record carried by a signed purge: the earlier of the time the
/// control plane signed it and the time it arrived. The record was current when signed, so a
/// purge that travelled slowly (or was held back and replayed) is trusted for less, never more.
pub fn purge_confirmed_at(signed_at_ms: i64, arrived_at_ms: u64) -> u64 {
    u64::try_from(signed_at_ms).unwrap_or(0).min(arrived_at_ms)
}

/// What the key's authority answered when asked.
#[derive(Debug, Clone, PartialEq)]
pub enum AuthorityAnswer<R> {
    /// It holds this record.
    Holds(R),
    /// It has never heard of the key (made before it existed, or its first update is pending).
    Unknown,
    /// It could not be asked within the time allowed.
    Unreachable,
}

/// Where the record a lookup resolved to came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// The copy held at this location.
    Copy,
    Kv,
    Authority,
}

/// What a stale copy or a miss resolves to.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolved<R> {
    /// Answer from this record (none: the key is not found); it counts as confirmed when the
    /// authority answered or the record is final.
    Record(Option<R>, Tier),
    /// The authority could not be asked and the best record is not final: answer
    /// `UNAVAILABLE` to those who may see the key (the record says who may).
    FailClosed(R),
}

/// Resolves a stale copy (`copy`, or `None` on a miss) against what KV and the authority said:
/// the highest version wins, ties going to the authority, then the copy, then KV. Without the
/// authority's answer, only a final state may be answered.
pub fn resolve<R: Versioned>(copy: Option<R>, kv: Option<R>, authority: AuthorityAnswer<R>) -> Resolved<R> {
    let reachable = !matches!(authority, AuthorityAnswer::Unreachable);
    let mut best: Option<(R, Tier)> = None;
    let candidates = [
        match authority {
            AuthorityAnswer::Holds(record) => Some((record, Tier::Authority)),
            _ => None,
        },
        copy.map(|record| (record, Tier::Copy)),
        kv.map(|record| (record, Tier::Kv)),
    ];
    for (record, from) in candidates.into_iter().flatten() {
        if best.as_ref().is_none_or(|(held, _)| record.version() > held.version()) {
            best = Some((record, from));
        }
    }
    match best {
        None => Resolved::Record(None, Tier::Kv),
        Some((record, from)) if reachable || record.is_final() => Resolved::Record(Some(record), from),
        Some((record, _)) => Resolved::FailClosed(record),
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::KeyHash;
    use crate::record::tests::sample;

    fn at(version: u64, status: KeyStatus) -> KeyRecord {
        let mut record = sample(KeyHash::of("x"));
        record.version = version;
        record.status = status;
        record
    }

    #[test]
    fn fresh_table() {
        // (confirmed at, max staleness, now, fresh)
        for (confirmed, max, now, fresh) in [
            (1_000, 1_000, 1_000, true),
            (1_000, 1_000, 1_999, true),
            (1_000, 1_000, 2_000, false),
            (1_000, 1_000, 90_000, false),
            // A confirmation stamped in the future is stale, however close.
            (1_001, 1_000, 1_000, false),
            (u64::MAX, 1_000, 1_000, false),
            (0, 0, 0, false),
        ] {
            assert_eq!(is_fresh(confirmed, max, now), fresh, "confirmed {confirmed}, max {max}, now {now}");
        }
    }

    #[test]
    fn a_stale_copy_after_a_joined_confirmation_is_confirmed_again_only_if_that_one_landed() {
        // (the copy memory holds was confirmed as of, the joined confirmation was asked at, what to do)
        for (confirmed, asked, then) in [
            (Some(1_000), 1_000, AfterJoin::ConfirmAgain),
            (Some(1_250), 1_000, AfterJoin::ConfirmAgain),
            // The copy predates the confirmation: it did not land (the authority was not reached).
            (Some(999), 1_000, AfterJoin::FailClosed),
            (Some(0), 1_000, AfterJoin::FailClosed),
            (None, 1_000, AfterJoin::FailClosed),
        ] {
            assert_eq!(after_join(confirmed, asked), then, "copy confirmed as of {confirmed:?}, asked at {asked}");
        }
    }

    #[test]
    fn a_copy_past_max_staleness_is_never_answered_unconfirmed_unless_final() {
        let max = sample(KeyHash::of("x")).max_staleness_ms;
        // (status, age, needs confirmation)
        for (status, age, needed) in [
            (KeyStatus::Active, 0, false),
            (KeyStatus::Active, max - 1, false),
            (KeyStatus::Active, max, true),
            (KeyStatus::Active, 10 * max, true),
            (KeyStatus::Revoked, 10 * max, false),
            (KeyStatus::Deleted, 10 * max, false),
        ] {
            let now = 1_000_000;
            assert_eq!(needs_confirmation(&at(1, status), now - age, now), needed, "{status:?} aged {age}");
        }
        let mut disabled = at(1, KeyStatus::Active);
        disabled.enabled = false;
        assert!(needs_confirmation(&disabled, 0, 10 * max), "disabled can be enabled again: not final");
        assert!(needs_confirmation(&at(1, KeyStatus::Active), 2_000, 1_000), "stamped in the future");
    }

    #[test]
    fn refresh_ahead_table() {
        // (confirmed at, trust, now, percent, due)
        for (confirmed, trust, now, percent, due) in [
            (1_000, 1_000, 1_000, 50, false),
            (1_000, 1_000, 1_499, 50, false),
            (1_000, 1_000, 1_500, 50, true),
            (1_000, 1_000, 1_999, 50, true),
            // Stale: the request waits for its own confirmation instead.
            (1_000, 1_000, 2_000, 50, false),
            (1_000, 1_000, 1_749, 75, false),
            (1_000, 1_000, 1_750, 75, true),
            // 0: every answer from a fresh copy starts one (the single flight bounds them).
            (1_000, 1_000, 1_000, 0, true),
            // 100 and more: off.
            (1_000, 1_000, 1_999, 100, false),
            (1_000, 1_000, 1_999, 150, false),
            // Stamped in the future: stale, never due.
            (2_000, 1_000, 1_000, 50, false),
            // No overflow at the extremes.
            (0, u64::MAX, u64::MAX - 1, 50, true),
        ] {
            assert_eq!(
                refresh_ahead(confirmed, trust, now, Ahead::at(percent)),
                due,
                "confirmed {confirmed}, trust {trust}, now {now}, percent {percent}"
            );
        }
        // (confirmed at, trust, now, lead, due) at 75 percent
        for (confirmed, trust, now, lead_ms, due) in [
            // A far authority (a 360 ms round trip): due from 600 ms left, not 250.
            (1_000, 1_000, 1_399, 400, false),
            (1_000, 1_000, 1_600, 400, true),
            // Never before half the trust, however long the lead.
            (1_000, 1_000, 1_499, 5_000, false),
            (1_000, 1_000, 1_500, 5_000, true),
            // A short lead changes nothing: the share decides.
            (1_000, 1_000, 1_749, 10, false),
            (1_000, 1_000, 1_750, 10, true),
            // Stale, or stamped in the future: never due.
            (1_000, 1_000, 2_000, 400, false),
            (2_000, 1_000, 1_000, 400, false),
        ] {
            let ahead = Ahead { percent: 75, lead_ms };
            assert_eq!(refresh_ahead(confirmed, trust, now, ahead), due, "now {now}, lead {lead_ms}");
        }
        let off = Ahead { percent: 100, lead_ms: 5_000 };
        assert!(!refresh_ahead(1_000, 1_000, 1_900, off), "off is off, whatever the lead");
        let max = sample(KeyHash::of("x")).max_staleness_ms;
        assert!(key_refresh_ahead(&at(1, KeyStatus::Active), 0, max - 1, Ahead::at(50)));
        assert!(!key_refresh_ahead(&at(1, KeyStatus::Revoked), 0, max - 1, Ahead::at(50)), "final: never confirmed");
    }

    #[test]
    fn memory_trust_table() {
        let (active, revoked) = (at(1, KeyStatus::Active), at(2, KeyStatus::Revoked));
        // (record, checked at, memory trust, now, trusted)
        for (record, checked, trust, now, trusted) in [
            (&active, 1_000, None, 90_000, true),
            (&active, 1_000, Some(100), 1_000, true),
            (&active, 1_000, Some(100), 1_099, true),
            (&active, 1_000, Some(100), 1_100, false),
            (&active, 1_000, Some(0), 1_000, false),
            (&active, 2_000, Some(100), 1_000, false),
            (&revoked, 1_000, Some(100), 90_000, true),
        ] {
            assert_eq!(
                memory_trusted(record, checked, trust, now),
                trusted,
                "{:?} checked {checked}, trust {trust:?}, now {now}",
                record.status
            );
        }
    }

    #[test]
    fn purge_confirmation_time_is_the_earlier_of_signing_and_arrival() {
        assert_eq!(purge_confirmed_at(1_000, 1_500), 1_000);
        assert_eq!(purge_confirmed_at(2_000, 1_500), 1_500);
        assert_eq!(purge_confirmed_at(-5, 1_500), 0);
    }

    fn check(
        copy: Option<KeyRecord>,
        kv: Option<KeyRecord>,
        authority: AuthorityAnswer<KeyRecord>,
        expected: Resolved<KeyRecord>,
    ) {
        let shown = format!("copy {copy:?}, kv {kv:?}, authority {authority:?}");
        assert_eq!(resolve(copy, kv, authority), expected, "{shown}");
    }

    #[test]
    fn kv_never_resurrects_a_revoked_key() {
        use AuthorityAnswer::*;
        let (active, revoked) = (at(1, KeyStatus::Active), at(2, KeyStatus::Revoked));
        // A miss: KV still holds the active record; the authority the revocation.
        check(
            None,
            Some(active.clone()),
            Holds(revoked.clone()),
            Resolved::Record(Some(revoked.clone()), Tier::Authority),
        );
        // A stale copy of the revocation (put there by a purge) outranks an older KV and authority:
        // the authority's write failed, but the copy and KV never go back.
        check(
            Some(revoked.clone()),
            Some(active.clone()),
            Holds(active.clone()),
            Resolved::Record(Some(revoked.clone()), Tier::Copy),
        );
        // The authority's write failed and nothing here knew: KV's newer record wins over the
        // authority's older one when a copy is confirmed.
        check(
            Some(active.clone()),
            Some(revoked.clone()),
            Holds(active.clone()),
            Resolved::Record(Some(revoked.clone()), Tier::Kv),
        );
        // The authority has never heard of the key: KV and the copy decide, highest version.
        check(Some(active.clone()), Some(revoked.clone()), Unknown, Resolved::Record(Some(revoked.clone()), Tier::Kv));
        check(None, None, Unknown, Resolved::Record(None, Tier::Kv));
        // Ties go to the authority, then the copy.
        check(
            Some(active.clone()),
            Some(active.clone()),
            Holds(active.clone()),
            Resolved::Record(Some(active.clone()), Tier::Authority),
        );
        check(Some(active.clone()), Some(active.clone()), Unknown, Resolved::Record(Some(active.clone()), Tier::Copy));
    }

    #[test]
    fn without_the_authority_only_a_final_state_is_answered() {
        use AuthorityAnswer::Unreachable;
        let (active, revoked, deleted) =
            (at(1, KeyStatus::Active), at(2, KeyStatus::Revoked), at(3, KeyStatus::Deleted));
        check(Some(active.clone()), None, Unreachable, Resolved::FailClosed(active.clone()));
        check(None, Some(active.clone()), Unreachable, Resolved::FailClosed(active.clone()));
        check(
            Some(active.clone()),
            Some(revoked.clone()),
            Unreachable,
            Resolved::Record(Some(revoked.clone()), Tier::Kv),
        );
        check(None, Some(deleted.clone()), Unreachable, Resolved::Record(Some(deleted), Tier::Kv));
        // The highest version decides, and a newer copy that is not final fails closed.
        let mut newer_active = at(5, KeyStatus::Active);
        newer_active.enabled = false;
        check(
            Some(newer_active.clone()),
            Some(at(4, KeyStatus::Active)),
            Unreachable,
            Resolved::FailClosed(newer_active),
        );
        // Nothing anywhere: not found, which rejects.
        check(None, None, Unreachable, Resolved::Record(None, Tier::Kv));
    }
}
