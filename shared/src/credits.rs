//! Usage credits: what a key's record says about its balance, the authority's ledger of that
//! balance and the leases it grants, and the arithmetic both rest on (lease sizes, refill
//! periods). Pure: the KeyState object stores a [`Ledger`] and calls it; the edge holds leases.
//!
//! Guarantees, for a key whose record carries [`Credits`]:
//! - The ledger never grants more than its balance: the sum of outstanding leases and what was
//!   settled never exceeds what was set, added and refilled (overspend is impossible by
//!   construction, whatever holders do, provided a holder stops spending a lease by its own
//!   clock [`LEASE_TTL_MS`] after it asked for it).
//! - Only a holder's own report returns a lease's unspent part: the ledger never credits a
//!   lease back on its own (not on expiry, not when the key is revoked or disabled), so a lease
//!   that a purge could not reach is never returned while it may still be spent.
//! - A set (`set_to` at `set_version`) is applied once, when the ledger first sees a record
//!   carrying it; increments are the running sum `added` since that set, applied by difference,
//!   so a repeated or superseding delivery of the record applies nothing twice.
//! - A refill is applied at most once per period, lazily at the ledger's next use, from the
//!   authority's clock ([`period_index`]).

use serde::{Deserialize, Serialize};

/// How long a holder may spend a lease, counted by the holder's clock from before it asked (and
/// by the authority's from when it granted, which is later): the longest a lowered balance, a
/// holder that dies, or a revocation leaves a share spendable.
pub const LEASE_TTL_MS: u64 = 2_000;
/// A lease covers this much of the holder's recent rate.
pub const LEASE_COVER_MS: u64 = 1_000;
/// A lease is at most this fraction (1/n) of the balance left, so that several holders each get
/// a share and little is stranded near zero.
pub const SHARE_DIVISOR: u64 = 4;
/// How long an idempotent verification's settlement is remembered (10 minutes).
pub const IDEMPOTENCY_MS: i64 = 600_000;
/// How long an expired lease waits for its holder's report before its unspent part counts as
/// spent (stranded).
pub const REPORT_GRACE_MS: i64 = 60_000;
/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

const DAY_MS: i64 = 86_400_000;

/// A key's credits as its record carries them. A record without credits is unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credits {
    /// The balance the latest set gave: "this much may still be spent from then".
    pub set_to: u64,
    /// The record version that made that set; the ledger applies a set once.
    pub set_version: u64,
    /// Increments minus decrements since that set.
    #[serde(default)]
    pub added: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refill: Option<Refill>,
}

impl Credits {
    /// Whether going from `self` to `next` can refuse a spend that `self` allowed: a new set,
    /// a decrement, or a refill changed or removed (purged like a revocation).
    pub fn is_tightened_by(&self, next: &Credits) -> bool {
        next.set_version != self.set_version || next.added < self.added || next.refill != self.refill
    }
}

/// A refill: `amount` every period, setting the balance or adding to it up to a cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refill {
    pub every: Period,
    pub amount: u64,
    /// `None`: the balance is set to `amount`; `Some(cap)`: `amount` is added, up to `cap`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap: Option<u64>,
}

/// When refills fall due. Periods begin at 00:00 UTC, but intervals, which count from the
/// key's creation. On the wire: `{"kind":"daily"}`, `{"kind":"monthly","day":15}`,
/// `{"kind":"anniversary"}`, `{"kind":"interval","ms":10000}` (read through a flat struct: an
/// internally tagged enum would bring serde's buffering into the worker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PeriodWire", into = "PeriodWire")]
pub enum Period {
    Daily,
    /// On this day of each month (1-31); a day past the month's end means its last day.
    Monthly {
        day: u8,
    },
    /// On the day of the month the key was created (clamped like `Monthly`).
    Anniversary,
    /// Every `ms` milliseconds from the key's creation (at least 1,000).
    Interval {
        ms: u64,
    },
}

#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum PeriodKind {
    Daily,
    Monthly,
    Anniversary,
    Interval,
}

/// A [`Period`] as JSON carries it.
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeriodWire {
    kind: PeriodKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    day: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ms: Option<u64>,
}

impl TryFrom<PeriodWire> for Period {
    type Error = &'static str;

    fn try_from(wire: PeriodWire) -> Result<Period, &'static str> {
        match (wire.kind, wire.day, wire.ms) {
            (PeriodKind::Daily, None, None) => Ok(Period::Daily),
            (PeriodKind::Monthly, Some(day), None) => Ok(Period::Monthly { day }),
            (PeriodKind::Anniversary, None, None) => Ok(Period::Anniversary),
            (PeriodKind::Interval, None, Some(ms)) => Ok(Period::Interval { ms }),
            _ => Err("a period is daily, monthly with a day, anniversary, or interval with ms"),
        }
    }
}

impl From<Period> for PeriodWire {
    fn from(period: Period) -> PeriodWire {
        let (kind, day, ms) = match period {
            Period::Daily => (PeriodKind::Daily, None, None),
            Period::Monthly { day } => (PeriodKind::Monthly, Some(day), None),
            Period::Anniversary => (PeriodKind::Anniversary, None, None),
            Period::Interval { ms } => (PeriodKind::Interval, None, Some(ms)),
        };
        PeriodWire { kind, day, ms }
    }
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = month as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date (year, month 1-12, day 1-31) of a day since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`; also the CLI's dates).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    let next = if month == 12 { days_from_civil(year + 1, 1, 1) } else { days_from_civil(year, month + 1, 1) };
    (next - days_from_civil(year, month, 1)) as u32
}

/// The index of the monthly period holding `now_ms`, refilled on `day` (clamped to the month).
fn monthly_index(day: u32, now_ms: i64) -> i64 {
    let (year, month, _) = civil_from_days(now_ms.div_euclid(DAY_MS));
    let index = year * 12 + i64::from(month) - 1;
    let start = days_from_civil(year, month, day.clamp(1, days_in_month(year, month))) * DAY_MS;
    if now_ms >= start { index } else { index - 1 }
}

/// The index of the refill period holding `now_ms`: it grows by one at each refill time.
/// `created_at_ms` anchors intervals and anniversaries.
pub fn period_index(period: Period, created_at_ms: i64, now_ms: i64) -> i64 {
    match period {
        Period::Daily => now_ms.div_euclid(DAY_MS),
        Period::Monthly { day } => monthly_index(u32::from(day), now_ms),
        Period::Anniversary => monthly_index(civil_from_days(created_at_ms.div_euclid(DAY_MS)).2, now_ms),
        Period::Interval { ms } => (now_ms - created_at_ms).div_euclid(ms.max(1) as i64),
    }
}

/// The balance after `periods` refills (at least one), with `outstanding` leased out: a set
/// refill makes `amount` spendable from now, leases counted against it; an add refill adds
/// `amount` per period up to its cap and never lowers the balance.
pub fn refilled(refill: &Refill, balance: i64, outstanding: u64, periods: u64) -> i64 {
    match refill.cap {
        None => refill.amount as i64 - outstanding as i64,
        Some(cap) => {
            let added = balance.saturating_add((refill.amount.saturating_mul(periods)) as i64);
            balance.max(added.min(cap as i64))
        }
    }
}

/// How much to lease to a holder that needs `need` now and spent `rate_per_s` a second
/// lately, from `available`: enough for [`LEASE_COVER_MS`] of its rate, at least `need` (and
/// 1), at most a [`SHARE_DIVISOR`]th of what is available (but `need`), never more than
/// available. 0 when `need` cannot be met.
pub fn lease_size(need: u64, rate_per_s: u64, available: u64) -> u64 {
    let need = need.max(1);
    if available < need {
        return 0;
    }
    let want = (rate_per_s.saturating_mul(LEASE_COVER_MS) / 1_000).max(need);
    let share = available.div_ceil(SHARE_DIVISOR).max(need);
    want.min(share).min(available)
}

/// A holder's request for a lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// The id the holder chose for the lease it asks for (random, not 0): a holder whose request
    /// timed out reports this id as unspent at its next contact, so a grant whose answer never
    /// arrived is returned rather than stranded.
    pub lease: u64,
    /// What the request waiting for this lease spends (0 when asked ahead).
    pub need: u64,
    /// What the holder spent a second lately.
    pub rate_per_s: u64,
    /// Leases the holder will spend no more from, with what it spent of each.
    #[serde(default)]
    pub reports: Vec<Report>,
}

/// A holder's last word on a lease: it spent `spent` and will spend no more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub lease: u64,
    pub spent: u64,
}

/// The authority's answer to a lease request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAnswer {
    /// The lease's id (0: none granted).
    pub lease: u64,
    pub granted: u64,
    pub ttl_ms: u64,
    /// An upper bound of what remains globally after this lease: the balance left to lease and
    /// every lease not yet reported, this one included ([`Ledger::upper_bound`]).
    pub remaining: u64,
    pub verdict: Verdict,
}

/// What a ledger says about a spend or a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Granted (a lease) or spent (a settlement).
    Granted,
    /// Not enough credits: `USAGE_EXCEEDED`.
    Exceeded,
    /// The key is revoked, deleted, disabled or expired: nothing is granted.
    Void,
    /// The key has no credits (they were removed): spends are not counted.
    Unlimited,
    /// A rate limit settled with it refused the verification: nothing was spent
    /// (`crate::ratelimit::reserve`).
    Limited,
}

/// A verification settled at the authority: an idempotent one, or the origin's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettleRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub cost: u64,
    /// The version of the key's record the asker decided on (0: not said). An authority holding
    /// an older record settles nothing (`Void`): a change it has not received yet (a lowered
    /// balance or limit) must not be settled past.
    #[serde(default)]
    pub version: u64,
}

/// The settlement of a verification; a retry with the same idempotency key gets it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    pub verdict: Verdict,
    pub remaining: u64,
    /// The authority's clock when it was first settled.
    pub decided_at_ms: u64,
}

/// A lease out, by the authority's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Lease {
    id: u64,
    granted: u64,
    expires_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Remembered {
    key: String,
    settlement: Settlement,
    /// The set and the refill period it was settled under, and its cost (0: not known): only
    /// under the same set and period is it released, and only its own cost is given back.
    set_version: u64,
    period: i64,
    cost: u64,
}

/// The authority's ledger of one key's credits: the balance not leased out, the leases out, the
/// set and increments applied, the refill period applied, and remembered settlements.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    balance: i64,
    set_version: u64,
    added: i64,
    period: i64,
    /// Not 0 once the ledger has applied its first set.
    next_lease: u64,
    leases: Vec<Lease>,
    settled: Vec<Remembered>,
    /// Unspent parts of leases whose holders never reported (an upper bound of what was
    /// stranded, since the last set).
    stranded: u64,
}

/// What a ledger knows of its key when it is used: the record's credits, its creation time
/// (refill anchor), and whether it may be spent at all (active, enabled, unexpired).
#[derive(Debug, Clone, Copy)]
pub struct Key<'a> {
    pub credits: &'a Credits,
    pub created_at_ms: i64,
    pub usable: bool,
}

impl Ledger {
    /// The balance left to lease (never negative).
    pub fn available(&self) -> u64 {
        self.balance.max(0) as u64
    }

    /// What is leased out and unexpired at `now_ms`.
    pub fn outstanding(&self, now_ms: i64) -> u64 {
        self.leases.iter().filter(|l| l.expires_at_ms > now_ms).map(|l| l.granted).sum()
    }

    /// Leased and expired without its holder's report (it may have been spent, or stranded).
    pub fn unreported(&self, now_ms: i64) -> u64 {
        self.leases.iter().filter(|l| l.expires_at_ms <= now_ms).map(|l| l.granted).sum()
    }

    /// An upper bound of what may still be spent: the balance and every lease not yet reported
    /// (some of which holders may have spent).
    pub fn upper_bound(&self) -> u64 {
        self.available() + self.leases.iter().map(|l| l.granted).sum::<u64>()
    }

    /// Given up on: the unspent parts of leases never reported within [`REPORT_GRACE_MS`].
    pub fn stranded(&self) -> u64 {
        self.stranded
    }

    /// Brings the ledger up to the record's credits and the clock: a set not yet applied
    /// (leases out counted against it; expired ones forgotten, since they can no longer be
    /// spent), increments not yet applied, refills due, and forgets what is past remembering.
    pub fn apply(&mut self, key: Key<'_>, now_ms: i64) {
        let credits = key.credits;
        if credits.set_version > self.set_version || self.next_lease == 0 {
            self.leases.retain(|l| l.expires_at_ms > now_ms);
            self.balance = credits.set_to as i64 + credits.added - self.outstanding(now_ms) as i64;
            self.set_version = credits.set_version;
            self.added = credits.added;
            self.next_lease = self.next_lease.max(1);
            self.stranded = 0;
            self.period = credits.refill.map_or(0, |r| period_index(r.every, key.created_at_ms, now_ms));
        } else if credits.added != self.added {
            self.balance += credits.added - self.added;
            self.added = credits.added;
        }
        if let Some(refill) = credits.refill {
            let period = period_index(refill.every, key.created_at_ms, now_ms);
            if period > self.period {
                if refill.cap.is_none() {
                    // A set refill replaces the balance: a late report of an expired lease must
                    // not add to it (as for a set).
                    self.leases.retain(|l| l.expires_at_ms > now_ms);
                }
                let due = (period - self.period) as u64;
                self.balance = refilled(&refill, self.balance, self.outstanding(now_ms), due);
                self.period = period;
            }
        }
        self.forget(now_ms);
    }

    fn forget(&mut self, now_ms: i64) {
        let given_up: u64 =
            self.leases.iter().filter(|l| l.expires_at_ms + REPORT_GRACE_MS <= now_ms).map(|l| l.granted).sum();
        self.stranded += given_up;
        self.leases.retain(|l| l.expires_at_ms + REPORT_GRACE_MS > now_ms);
        self.settled.retain(|s| s.settlement.decided_at_ms as i64 + IDEMPOTENCY_MS > now_ms);
    }

    /// Takes a holder's reports: each lease still out returns its unspent part.
    fn take_reports(&mut self, reports: &[Report]) {
        for report in reports {
            if let Some(at) = self.leases.iter().position(|l| l.id == report.lease) {
                let lease = self.leases.swap_remove(at);
                self.balance += lease.granted.saturating_sub(report.spent) as i64;
            }
        }
    }

    /// Answers a holder's lease request (after [`Ledger::apply`]): reports taken, then a lease
    /// sized by [`lease_size`] unless the key may not be spent.
    pub fn lease(&mut self, key: Key<'_>, request: &LeaseRequest, now_ms: i64) -> LeaseAnswer {
        self.apply(key, now_ms);
        self.take_reports(&request.reports);
        let none = |verdict| LeaseAnswer { lease: 0, granted: 0, ttl_ms: 0, remaining: self.upper_bound(), verdict };
        if !key.usable {
            return none(Verdict::Void);
        }
        let granted = lease_size(request.need, request.rate_per_s, self.available());
        let id = request.lease;
        if id == 0 || self.leases.iter().any(|l| l.id == id) {
            // Not a lease id a holder chooses, or one already granted: nothing more on it.
            return none(Verdict::Granted);
        }
        if granted == 0 {
            return none(if request.need == 0 { Verdict::Granted } else { Verdict::Exceeded });
        }
        self.balance -= granted as i64;
        self.leases.push(Lease { id, granted, expires_at_ms: now_ms + LEASE_TTL_MS as i64 });
        LeaseAnswer {
            lease: id,
            granted,
            ttl_ms: LEASE_TTL_MS,
            remaining: self.upper_bound(),
            verdict: Verdict::Granted,
        }
    }

    /// The settlement remembered for this idempotency key, if any (within [`IDEMPOTENCY_MS`]
    /// of it, once the ledger was applied).
    pub fn remembered(&self, key: &str) -> Option<Settlement> {
        self.settled.iter().find(|s| s.key == key).map(|s| s.settlement)
    }

    /// Settles one verification of `cost` here and now (after [`Ledger::apply`]); with an
    /// idempotency key seen within [`IDEMPOTENCY_MS`], answers what it answered then and spends
    /// nothing. Cost 0 checks that a credit is left without spending it.
    pub fn settle(&mut self, key: Key<'_>, request: &SettleRequest, now_ms: i64) -> Settlement {
        self.apply(key, now_ms);
        let known = request.idempotency_key.as_ref().and_then(|k| self.settled.iter().find(|s| s.key == *k));
        if let Some(remembered) = known {
            return remembered.settlement;
        }
        let verdict = if !key.usable {
            Verdict::Void
        } else if self.available() >= request.cost.max(1) {
            self.balance -= request.cost as i64;
            Verdict::Granted
        } else {
            Verdict::Exceeded
        };
        let settlement = Settlement { verdict, remaining: self.upper_bound(), decided_at_ms: now_ms.max(0) as u64 };
        if let (Some(k), true) = (&request.idempotency_key, key.usable) {
            let (set_version, period, cost) = (self.set_version, self.period, request.cost);
            self.settled.push(Remembered { key: k.clone(), settlement, set_version, period, cost });
        }
        settlement
    }

    /// Gives back what an idempotent settlement spent (its own cost, as remembered), and
    /// forgets it: its verification was refused by another authority after this one granted it
    /// (a key's identity's credits, when the key's own refused). A retry with the same
    /// idempotency key is then settled afresh, so the balance is charged once per verification
    /// answered `VALID`, never for one refused. Only a `Granted` settlement still remembered,
    /// under the set and the refill period it was settled under (a set or a refill since
    /// replaced the balance it came from); answers whether it gave back now.
    pub fn release(&mut self, key: &str) -> bool {
        let (set_version, period) = (self.set_version, self.period);
        let Some(at) = self.settled.iter().position(|s| {
            s.key == key
                && s.settlement.verdict == Verdict::Granted
                && s.set_version == set_version
                && s.period == period
        }) else {
            return false;
        };
        let held = self.settled.remove(at);
        self.balance += held.cost as i64;
        true
    }

    /// Remembers a settlement this ledger did not make (a verification its key's exact limits
    /// refused, decided in the same step), so that a retry with the same idempotency key is
    /// answered alike.
    pub fn remember(&mut self, key: &str, settlement: Settlement) {
        let (set_version, period) = (self.set_version, self.period);
        self.settled.push(Remembered { key: key.to_owned(), settlement, set_version, period, cost: 0 });
    }
}

/// The text the KeyState object and its holders exchange, and the ledger's stored form: numbers
/// and tokens separated by spaces, one record per line. Not JSON: every type serde_json reads in
/// the worker costs its upload a deserializer of its own (measured: BENCHMARKS.md). An
/// idempotency key is one token (visible ASCII, no spaces: [`is_idempotency_key`]).
pub mod text {
    use super::*;

    fn verdict_char(verdict: Verdict) -> char {
        match verdict {
            Verdict::Granted => 'g',
            Verdict::Exceeded => 'e',
            Verdict::Void => 'v',
            Verdict::Unlimited => 'u',
            Verdict::Limited => 'l',
        }
    }

    fn verdict_of(token: &str) -> Option<Verdict> {
        Some(match token {
            "g" => Verdict::Granted,
            "e" => Verdict::Exceeded,
            "v" => Verdict::Void,
            "u" => Verdict::Unlimited,
            "l" => Verdict::Limited,
            _ => return None,
        })
    }

    fn numbers<const N: usize>(line: &str) -> Option<[i64; N]> {
        let mut out = [0i64; N];
        let mut tokens = line.split(' ');
        for slot in &mut out {
            *slot = tokens.next()?.parse().ok()?;
        }
        tokens.next().is_none().then_some(out)
    }

    fn pair(token: &str) -> Option<(u64, u64)> {
        let (a, b) = token.split_once(':')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    }

    /// `lease need rate [lease:spent ...]`
    pub fn lease_request(r: &LeaseRequest) -> String {
        let mut out = format!("{} {} {}", r.lease, r.need, r.rate_per_s);
        for report in &r.reports {
            out.push_str(&format!(" {}:{}", report.lease, report.spent));
        }
        out
    }

    pub fn read_lease_request(text: &str) -> Option<LeaseRequest> {
        let mut tokens = text.split(' ');
        let lease = tokens.next()?.parse().ok()?;
        let need = tokens.next()?.parse().ok()?;
        let rate_per_s = tokens.next()?.parse().ok()?;
        let reports = tokens.map(|t| pair(t).map(|(lease, spent)| Report { lease, spent })).collect::<Option<_>>()?;
        Some(LeaseRequest { lease, need, rate_per_s, reports })
    }

    /// `lease granted ttl remaining verdict`
    pub fn lease_answer(a: &LeaseAnswer) -> String {
        format!("{} {} {} {} {}", a.lease, a.granted, a.ttl_ms, a.remaining, verdict_char(a.verdict))
    }

    pub fn read_lease_answer(text: &str) -> Option<LeaseAnswer> {
        let mut tokens = text.split(' ');
        let mut number = || tokens.next()?.parse::<u64>().ok();
        let (lease, granted, ttl_ms, remaining) = (number()?, number()?, number()?, number()?);
        let verdict = verdict_of(tokens.next()?)?;
        tokens.next().is_none().then_some(LeaseAnswer { lease, granted, ttl_ms, remaining, verdict })
    }

    /// `cost [idempotency key]`
    /// `cost/version [idempotency key]`
    pub fn settle_request(r: &SettleRequest) -> String {
        match &r.idempotency_key {
            Some(key) => format!("{}/{} {key}", r.cost, r.version),
            None => format!("{}/{}", r.cost, r.version),
        }
    }

    pub fn read_settle_request(text: &str) -> Option<SettleRequest> {
        let (numbers, key) = match text.split_once(' ') {
            Some((numbers, key)) => (numbers, Some(key.to_owned()).filter(|k| is_idempotency_key(k))?.into()),
            None => (text, None),
        };
        let (cost, version) = numbers.split_once('/')?;
        Some(SettleRequest { idempotency_key: key, cost: cost.parse().ok()?, version: version.parse().ok()? })
    }

    /// `verdict remaining decided_at_ms`
    pub fn settlement(s: &Settlement) -> String {
        format!("{} {} {}", verdict_char(s.verdict), s.remaining, s.decided_at_ms)
    }

    pub fn read_settlement(text: &str) -> Option<Settlement> {
        let (verdict, rest) = text.split_once(' ')?;
        let [remaining, decided_at_ms] = numbers::<2>(rest)?.map(|n| n as u64);
        Some(Settlement { verdict: verdict_of(verdict)?, remaining, decided_at_ms })
    }

    /// Three lines: `balance set_version added period next_lease stranded`; the leases as
    /// `id:granted:expires_at_ms`; the remembered settlements as `key verdict remaining at` each
    /// after a `|`.
    pub fn ledger(l: &Ledger) -> String {
        let mut out =
            format!("{} {} {} {} {} {}\n", l.balance, l.set_version, l.added, l.period, l.next_lease, l.stranded);
        let leases: Vec<String> =
            l.leases.iter().map(|x| format!("{}:{}:{}", x.id, x.granted, x.expires_at_ms)).collect();
        out.push_str(&leases.join(" "));
        out.push('\n');
        for r in &l.settled {
            let (set, period, cost) = (r.set_version, r.period, r.cost);
            out.push_str(&format!("|{} {} s{set}:{period}:{cost}", r.key, settlement(&r.settlement)));
        }
        out
    }

    pub fn read_ledger(text: &str) -> Option<Ledger> {
        let mut lines = text.splitn(3, '\n');
        let [balance, set_version, added, period, next_lease, stranded] = numbers::<6>(lines.next()?)?;
        let leases = lines
            .next()?
            .split(' ')
            .filter(|t| !t.is_empty())
            .map(|t| {
                let mut parts = t.split(':');
                let (id, granted, expires) = (parts.next()?, parts.next()?, parts.next()?);
                Some(Lease {
                    id: id.parse().ok()?,
                    granted: granted.parse().ok()?,
                    expires_at_ms: expires.parse().ok()?,
                })
            })
            .collect::<Option<_>>()?;
        let settled = lines
            .next()
            .unwrap_or("")
            .split('|')
            .filter(|t| !t.is_empty())
            .map(|t| {
                let (key, rest) = t.split_once(' ')?;
                // `s<set_version>:<period>:<cost>` after the settlement (absent in ledgers stored
                // before it: never released).
                let (rest, [set_version, period, cost]) = match rest.rsplit_once(' ') {
                    Some((head, tail)) if tail.starts_with('s') => {
                        let mut n = tail[1..].split(':').map(|t| t.parse::<i64>().ok());
                        (head, [n.next()??, n.next()??, n.next()??])
                    }
                    _ => (rest, [0, 0, 0]),
                };
                let (set_version, cost) = (set_version as u64, cost as u64);
                Some(Remembered { key: key.to_owned(), settlement: read_settlement(rest)?, set_version, period, cost })
            })
            .collect::<Option<_>>()?;
        Some(Ledger {
            balance,
            set_version: set_version as u64,
            added,
            period,
            next_lease: next_lease as u64,
            leases,
            settled,
            stranded: stranded as u64,
        })
    }
}

/// A record's credits as one string (`set_to set_version added[ refill]`, the refill as
/// `kind[:day|:ms] amount[ cap]`), for `#[serde(with)]` on [`crate::KeyRecord::credits`]: the
/// worker reads records from several sources, and each nested struct would cost it a
/// deserializer per source (measured: BENCHMARKS.md). The admin API shows [`Credits`] as JSON.
pub mod as_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::{Credits, Period, Refill};

    pub fn write(credits: &Credits) -> String {
        let mut out = format!("{} {} {}", credits.set_to, credits.set_version, credits.added);
        if let Some(refill) = &credits.refill {
            let every = match refill.every {
                Period::Daily => "daily".to_owned(),
                Period::Monthly { day } => format!("monthly:{day}"),
                Period::Anniversary => "anniversary".to_owned(),
                Period::Interval { ms } => format!("interval:{ms}"),
            };
            out.push_str(&format!(" {every} {}", refill.amount));
            if let Some(cap) = refill.cap {
                out.push_str(&format!(" {cap}"));
            }
        }
        out
    }

    pub fn read(text: &str) -> Option<Credits> {
        let mut tokens = text.split(' ');
        let set_to = tokens.next()?.parse().ok()?;
        let set_version = tokens.next()?.parse().ok()?;
        let added = tokens.next()?.parse().ok()?;
        let refill = match tokens.next() {
            None => None,
            Some(every) => {
                let every = match every.split_once(':') {
                    None if every == "daily" => Period::Daily,
                    None if every == "anniversary" => Period::Anniversary,
                    Some(("monthly", day)) => Period::Monthly { day: day.parse().ok()? },
                    Some(("interval", ms)) => Period::Interval { ms: ms.parse().ok()? },
                    _ => return None,
                };
                let amount = tokens.next()?.parse().ok()?;
                let cap = tokens.next().map(str::parse).transpose().ok()?;
                Some(Refill { every, amount, cap })
            }
        };
        tokens.next().is_none().then_some(Credits { set_to, set_version, added, refill })
    }

    pub fn serialize<S: Serializer>(credits: &Option<Credits>, s: S) -> Result<S::Ok, S::Error> {
        match credits {
            Some(c) => s.serialize_some(&write(c)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Credits>, D::Error> {
        let text = Option::<std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.map(|t| {
            read(&t).ok_or_else(|| serde::de::Error::custom("credits are not `set_to set_version added[ refill]`"))
        })
        .transpose()
    }
}

/// Whether `text` may be an idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY`] bytes of visible
/// ASCII, no spaces (and no `|`, which the ledger's stored form uses).
pub fn is_idempotency_key(text: &str) -> bool {
    (1..=MAX_IDEMPOTENCY_KEY).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_graphic() && b != b'|')
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    /// Unix ms of a UTC date and time.
    fn at(year: i64, month: u32, day: u32, hour: i64) -> i64 {
        days_from_civil(year, month, day) * DAY_MS + hour * 3_600_000
    }

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2026, 11, 28), 20_785);
        for days in [-800_000, -1, 0, 59, 11_016, 20_785, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(days_in_month(2024, 2), 29);
        assert_eq!(days_in_month(2026, 2), 28);
        assert_eq!(days_in_month(2026, 4), 30);
        assert_eq!(days_in_month(2026, 12), 31);
    }

    #[test]
    fn period_table() {
        let created = at(2026, 1, 31, 15);
        // (period, earlier time, later time, whether a refill falls between them)
        let cases: &[(Period, i64, i64, bool)] = &[
            (Period::Daily, at(2026, 11, 28, 0) - 1, at(2026, 11, 28, 0), true),
            (Period::Daily, at(2026, 11, 28, 0), at(2026, 11, 28, 23), false),
            (Period::Monthly { day: 1 }, at(2026, 11, 30, 23), at(2026, 12, 1, 0), true),
            (Period::Monthly { day: 15 }, at(2026, 11, 14, 23), at(2026, 11, 15, 0), true),
            (Period::Monthly { day: 15 }, at(2026, 11, 15, 0), at(2026, 12, 14, 23), false),
            // Day 31 in a 30-day month falls on the 30th; in February on the 28th.
            (Period::Monthly { day: 31 }, at(2026, 11, 29, 23), at(2026, 11, 30, 0), true),
            (Period::Monthly { day: 31 }, at(2026, 2, 27, 23), at(2026, 2, 28, 0), true),
            (Period::Monthly { day: 31 }, at(2026, 2, 28, 0), at(2026, 3, 30, 23), false),
            (Period::Monthly { day: 30 }, at(2024, 2, 28, 23), at(2024, 2, 29, 0), true),
            (Period::Anniversary, at(2026, 4, 29, 23), at(2026, 4, 30, 0), true),
            (Period::Anniversary, at(2026, 5, 30, 23), at(2026, 5, 31, 0), true),
            (Period::Anniversary, at(2026, 5, 1, 0), at(2026, 5, 30, 23), false),
            (Period::Interval { ms: 10_000 }, created + 9_999, created + 10_000, true),
            (Period::Interval { ms: 10_000 }, created + 10_000, created + 19_999, false),
            (Period::Interval { ms: 10_000 }, created, created + 9_999, false),
        ];
        for &(period, before, after, refills) in cases {
            let (a, b) = (period_index(period, created, before), period_index(period, created, after));
            assert_eq!(b - a == 1, refills, "{period:?} between {before} and {after}: {a} -> {b}");
            assert!(b >= a);
        }
        // A year of monthly periods is twelve, whatever the day.
        for day in [1, 28, 29, 30, 31] {
            let period = Period::Monthly { day };
            let year =
                period_index(period, created, at(2027, 6, 1, 0)) - period_index(period, created, at(2026, 6, 1, 0));
            assert_eq!(year, 12, "day {day}");
        }
    }

    #[test]
    fn refill_amounts() {
        let set = Refill { every: Period::Daily, amount: 100, cap: None };
        assert_eq!(refilled(&set, 3, 0, 1), 100);
        assert_eq!(refilled(&set, 3, 30, 5), 70);
        let add = Refill { every: Period::Daily, amount: 10, cap: Some(50) };
        assert_eq!(refilled(&add, 3, 0, 1), 13);
        assert_eq!(refilled(&add, 3, 0, 3), 33);
        assert_eq!(refilled(&add, 45, 0, 1), 50);
        assert_eq!(refilled(&add, 70, 0, 1), 70);
        assert_eq!(refilled(&add, -5, 0, 1), 5);
    }

    #[test]
    fn lease_size_table() {
        // (need, rate per second, available, lease)
        let cases = [
            (1, 0, 100, 1),
            (1, 40, 100, 25),
            (1, 10, 100, 10),
            (1, 1_000, 1_000_000, 1_000),
            (5, 0, 100, 5),
            (1, 100, 3, 1),
            (1, 100, 0, 0),
            (5, 100, 4, 0),
            (3, 100, 3, 3),
            (0, 100, 8, 2),
            (0, 0, 0, 0),
            (1, u64::MAX, u64::MAX, u64::MAX / 1_000),
        ];
        for (need, rate, available, expected) in cases {
            assert_eq!(lease_size(need, rate, available), expected, "need {need} rate {rate} available {available}");
        }
    }

    fn key(credits: &Credits, usable: bool) -> Key<'_> {
        Key { credits, created_at_ms: 0, usable }
    }

    fn ask(need: u64, rate: u64, reports: Vec<Report>) -> LeaseRequest {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        LeaseRequest { lease: NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst), need, rate_per_s: rate, reports }
    }

    #[test]
    fn leases_never_exceed_the_balance() {
        let credits = Credits { set_to: 100, set_version: 1, added: 0, refill: None };
        let mut ledger = Ledger::default();
        let mut leased = 0;
        let mut first = 0;
        for i in 0..200 {
            let answer = ledger.lease(key(&credits, true), &ask(1, 1_000, vec![]), i);
            if i == 0 {
                (first, leased) = (answer.lease, answer.granted);
                assert_eq!(leased, 25);
                continue;
            }
            leased += answer.granted;
            assert!(leased <= 100);
        }
        assert_eq!(leased, 100);
        assert_eq!(ledger.lease(key(&credits, true), &ask(1, 1, vec![]), 300).verdict, Verdict::Exceeded);
        // Expiry alone returns nothing; the holder's report does.
        assert_eq!(ledger.lease(key(&credits, true), &ask(1, 1, vec![]), 10_000).verdict, Verdict::Exceeded);
        assert_eq!(ledger.unreported(10_000), 100);
        let back = ledger.lease(key(&credits, true), &ask(1, 1, vec![Report { lease: first, spent: 0 }]), 10_001);
        assert_eq!(back.verdict, Verdict::Granted);
        assert_eq!((ledger.available(), back.remaining), (24, 100));
        // A report of a lease already reported returns nothing again.
        let again = ledger.lease(key(&credits, true), &ask(0, 0, vec![Report { lease: first, spent: 0 }]), 10_002);
        assert_eq!(ledger.available(), 24 - again.granted);
    }

    #[test]
    fn a_grant_whose_answer_was_lost_comes_back_on_report() {
        let credits = Credits { set_to: 100, set_version: 1, added: 0, refill: None };
        let mut ledger = Ledger::default();
        let lost = ask(1, 1_000, vec![]);
        assert_eq!(ledger.lease(key(&credits, true), &lost, 0).granted, 25);
        // The holder timed out, so it reports the id it chose as unspent.
        ledger.lease(key(&credits, true), &ask(0, 0, vec![Report { lease: lost.lease, spent: 0 }]), 600);
        assert_eq!(ledger.available() + ledger.outstanding(600), 100);
        // An id already granted gets nothing more, nor does 0.
        let again = ledger.lease(key(&credits, true), &ask(1, 1, vec![]), 700);
        let repeat = LeaseRequest { lease: again.lease, need: 1, rate_per_s: 1, reports: vec![] };
        assert_eq!(ledger.lease(key(&credits, true), &repeat, 800).granted, 0);
        let zero = LeaseRequest { lease: 0, need: 1, rate_per_s: 1, reports: vec![] };
        assert_eq!(ledger.lease(key(&credits, true), &zero, 800).granted, 0);
    }

    #[test]
    fn void_keys_get_nothing_and_leases_stay_out() {
        let credits = Credits { set_to: 10, set_version: 1, added: 0, refill: None };
        let mut ledger = Ledger::default();
        let lease = ledger.lease(key(&credits, true), &ask(1, 100, vec![]), 0);
        assert_eq!(lease.granted, 3);
        let void = ledger.lease(key(&credits, false), &ask(1, 100, vec![]), 1);
        assert_eq!((void.verdict, void.granted, void.remaining, ledger.available()), (Verdict::Void, 0, 10, 7));
        // Re-enabled: the lease is still out, so 7 is all there is.
        assert_eq!(ledger.outstanding(2), 3);
        let s = ledger.settle(key(&credits, true), &SettleRequest { idempotency_key: None, cost: 7, version: 0 }, 3);
        assert_eq!((s.verdict, s.remaining), (Verdict::Granted, 3));
        let s = ledger.settle(key(&credits, true), &SettleRequest { idempotency_key: None, cost: 1, version: 0 }, 4);
        assert_eq!(s.verdict, Verdict::Exceeded);
    }

    #[test]
    fn a_set_counts_leases_out_and_applies_once() {
        let mut credits = Credits { set_to: 100, set_version: 1, added: 0, refill: None };
        let mut ledger = Ledger::default();
        let lease = ledger.lease(key(&credits, true), &ask(1, 100, vec![]), 0);
        assert_eq!(lease.granted, 25);
        credits = Credits { set_to: 10, set_version: 4, added: 0, refill: None };
        ledger.apply(key(&credits, true), 1);
        assert_eq!(ledger.available(), 0, "10 set, 25 out");
        ledger.lease(key(&credits, true), &ask(0, 0, vec![Report { lease: lease.lease, spent: 20 }]), 2);
        assert_eq!(ledger.available(), 0, "10 set, less the 20 the lease spent: -10");
        credits.added = 17;
        ledger.apply(key(&credits, true), 3);
        ledger.apply(key(&credits, true), 4);
        assert_eq!(ledger.available(), 7);
        credits.added = 12;
        ledger.apply(key(&credits, true), 5);
        assert_eq!(ledger.available(), 2);
    }

    #[test]
    fn interval_refills_once_per_period() {
        let refill = Refill { every: Period::Interval { ms: 1_000 }, amount: 5, cap: None };
        let credits = Credits { set_to: 5, set_version: 1, added: 0, refill: Some(refill) };
        let mut ledger = Ledger::default();
        let one = SettleRequest { idempotency_key: None, cost: 1, version: 0 };
        let mut spent_in = [0; 4];
        for t in (0..4_000).step_by(50) {
            if ledger.settle(key(&credits, true), &one, t).verdict == Verdict::Granted {
                spent_in[(t / 1_000) as usize] += 1;
            }
        }
        assert_eq!(spent_in, [5, 5, 5, 5]);
        // Idle for three periods: a set refill does not pile up.
        ledger.apply(key(&credits, true), 7_500);
        assert_eq!(ledger.available(), 5);
        // A lease that expired unreported before the next refill adds nothing when reported late.
        let lease = ledger.lease(key(&credits, true), &ask(1, 1_000, vec![]), 7_600);
        assert_eq!((lease.granted, ledger.available()), (2, 3));
        ledger.apply(key(&credits, true), 10_100);
        assert_eq!(ledger.available(), 5);
        ledger.lease(key(&credits, true), &ask(0, 0, vec![Report { lease: lease.lease, spent: 0 }]), 10_200);
        assert_eq!(ledger.upper_bound(), 5, "the refill's 5, not 7");
    }

    #[test]
    fn idempotent_settlements_answer_the_same_and_spend_once() {
        let credits = Credits { set_to: 2, set_version: 1, added: 0, refill: None };
        let mut ledger = Ledger::default();
        let with = |k: &str| SettleRequest { idempotency_key: Some(k.into()), cost: 1, version: 0 };
        let first = ledger.settle(key(&credits, true), &with("a"), 10);
        assert_eq!((first.verdict, first.remaining), (Verdict::Granted, 1));
        assert_eq!(ledger.upper_bound(), 1);
        assert_eq!(ledger.settle(key(&credits, true), &with("a"), 20), first);
        assert_eq!(ledger.available(), 1);
        assert_eq!(ledger.settle(key(&credits, true), &with("b"), 30).remaining, 0);
        let exceeded = ledger.settle(key(&credits, true), &with("c"), 40);
        assert_eq!(exceeded.verdict, Verdict::Exceeded);
        assert_eq!(ledger.settle(key(&credits, true), &with("c"), 50), exceeded);
        // Forgotten after ten minutes: spent again (here, refused again).
        let later = ledger.settle(key(&credits, true), &with("a"), 10 + IDEMPOTENCY_MS);
        assert_eq!(later.verdict, Verdict::Exceeded);
    }

    #[test]
    fn unreported_leases_strand_after_the_grace() {
        let credits = Credits { set_to: 8, set_version: 1, added: 0, refill: None };
        let mut ledger = Ledger::default();
        ledger.lease(key(&credits, true), &ask(1, 100, vec![]), 0);
        ledger.apply(key(&credits, true), LEASE_TTL_MS as i64 + REPORT_GRACE_MS);
        assert_eq!((ledger.stranded(), ledger.available()), (2, 6));
    }

    #[test]
    fn periods_on_the_wire() {
        for (period, text) in [
            (Period::Daily, r#"{"kind":"daily"}"#),
            (Period::Monthly { day: 31 }, r#"{"kind":"monthly","day":31}"#),
            (Period::Anniversary, r#"{"kind":"anniversary"}"#),
            (Period::Interval { ms: 10_000 }, r#"{"kind":"interval","ms":10000}"#),
        ] {
            assert_eq!(serde_json::to_string(&period).unwrap(), text);
            assert_eq!(serde_json::from_str::<Period>(text).unwrap(), period);
        }
        for bad in [r#"{"kind":"monthly"}"#, r#"{"kind":"daily","ms":5}"#, r#"{"kind":"weekly"}"#] {
            assert!(serde_json::from_str::<Period>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn text_round_trips() {
        let request =
            LeaseRequest { lease: u64::MAX, need: 3, rate_per_s: 40, reports: vec![Report { lease: 7, spent: 2 }] };
        assert_eq!(text::read_lease_request(&text::lease_request(&request)), Some(request));
        let bare = LeaseRequest { lease: 1, need: 0, rate_per_s: 0, reports: vec![] };
        assert_eq!(text::read_lease_request(&text::lease_request(&bare)), Some(bare));
        // Lease ids are random 64-bit numbers: every one must survive.
        for lease in [9, u64::MAX] {
            let answer = LeaseAnswer { lease, granted: 25, ttl_ms: 2_000, remaining: 100, verdict: Verdict::Granted };
            assert_eq!(text::read_lease_answer(&text::lease_answer(&answer)), Some(answer));
        }
        for key in [None, Some("order-4711:x".to_owned())] {
            let settle = SettleRequest { idempotency_key: key, cost: 3, version: 7 };
            assert_eq!(text::read_settle_request(&text::settle_request(&settle)), Some(settle));
        }
        assert_eq!(text::read_settle_request("1/1 two words"), None);
        assert_eq!(text::read_settle_request("1"), None, "the version is said");
        let credits = Credits { set_to: 10, set_version: 1, added: -2, refill: None };
        let mut ledger = Ledger::default();
        ledger.lease(key(&credits, true), &ask(1, 100, vec![]), 5);
        let huge = LeaseRequest { lease: u64::MAX, need: 1, rate_per_s: 1, reports: vec![] };
        ledger.lease(key(&credits, true), &huge, 5);
        ledger.settle(
            key(&credits, true),
            &SettleRequest { idempotency_key: Some("a".into()), cost: 1, version: 0 },
            6,
        );
        ledger.settle(
            key(&credits, true),
            &SettleRequest { idempotency_key: Some("b!".into()), cost: 1, version: 0 },
            7,
        );
        assert_eq!(text::read_ledger(&text::ledger(&ledger)), Some(ledger.clone()));
        assert_eq!(text::read_ledger(&text::ledger(&Ledger::default())), Some(Ledger::default()));
        for bad in ["", "1 2 3", "x y", "g 1", "1 2 3 4 5 6\n1:2\n"] {
            assert_eq!(text::read_lease_answer(bad), None, "{bad}");
            assert_eq!(text::read_ledger(bad), None, "{bad}");
        }
        assert!(!is_idempotency_key("") && !is_idempotency_key("a b") && !is_idempotency_key("a|b"));
    }

    #[test]
    fn credits_as_text() {
        let refills = [
            None,
            Some(Refill { every: Period::Daily, amount: 5, cap: None }),
            Some(Refill { every: Period::Monthly { day: 31 }, amount: 5, cap: Some(9) }),
            Some(Refill { every: Period::Anniversary, amount: 1, cap: None }),
            Some(Refill { every: Period::Interval { ms: 10_000 }, amount: 7, cap: Some(70) }),
        ];
        for refill in refills {
            let credits = Credits { set_to: 100, set_version: 3, added: -4, refill };
            assert_eq!(as_text::read(&as_text::write(&credits)), Some(credits));
        }
        for bad in ["", "1 2", "1 2 3 weekly 5", "1 2 3 daily", "1 2 3 daily 5 6 7", "-1 2 3"] {
            assert_eq!(as_text::read(bad), None, "{bad}");
        }
    }

    #[test]
    fn credits_tightening() {
        let base = Credits { set_to: 10, set_version: 2, added: 3, refill: None };
        let tighter = |edit: fn(&mut Credits)| {
            let mut next = base.clone();
            edit(&mut next);
            base.is_tightened_by(&next)
        };
        assert!(!tighter(|_| {}));
        assert!(!tighter(|c| c.added = 5));
        assert!(tighter(|c| c.added = 1));
        assert!(tighter(|c| c.set_version = 3));
        assert!(tighter(|c| c.refill = Some(Refill { every: Period::Daily, amount: 1, cap: None })));
    }

    #[test]
    fn a_release_gives_an_idempotent_settlement_back_once_under_its_set() {
        let mut credits = Credits { set_to: 3, set_version: 1, added: 0, refill: None };
        let mut ledger = Ledger::default();
        let with = |k: &str| SettleRequest { idempotency_key: Some(k.into()), cost: 1, version: 0 };
        assert_eq!(ledger.settle(key(&credits, true), &with("a"), 0).verdict, Verdict::Granted);
        assert_eq!(ledger.available(), 2);
        let stored = text::read_ledger(&text::ledger(&ledger)).unwrap();
        assert_eq!(stored, ledger, "stored with its set");
        assert!(ledger.release("a"), "given back");
        assert!(!ledger.release("a"), "once");
        assert!(!ledger.release("unknown"));
        assert_eq!(ledger.available(), 3);
        // Forgotten: a retry is settled afresh (charged once for the verification answered).
        assert_eq!(ledger.settle(key(&credits, true), &with("a"), 1).verdict, Verdict::Granted);
        assert_eq!(ledger.available(), 2);
        assert!(ledger.release("a"));
        // Only its own cost comes back, whatever a later request with the key asked.
        assert_eq!(ledger.settle(key(&credits, true), &with("a"), 2).verdict, Verdict::Granted);
        let big = SettleRequest { idempotency_key: Some("a".into()), cost: 1_000, version: 0 };
        assert_eq!(ledger.settle(key(&credits, true), &big, 2).verdict, Verdict::Granted, "remembered");
        assert!(ledger.release("a"));
        assert_eq!(ledger.available(), 3);
        // A set since the settlement replaced its balance: nothing is given back.
        assert_eq!(ledger.settle(key(&credits, true), &with("b"), 2).verdict, Verdict::Granted);
        credits = Credits { set_version: 2, ..credits };
        ledger.apply(key(&credits, true), 3);
        assert!(!ledger.release("b"));
        assert_eq!(ledger.available(), 3);
        // A ledger stored before releases existed reads, and releases nothing.
        let old = text::read_ledger("3 1 0 0 1 0\n\n|c g 2 5").unwrap();
        assert_eq!(old.remembered("c").map(|s| s.verdict), Some(Verdict::Granted));
    }

    #[test]
    fn a_release_across_a_refill_gives_nothing_back() {
        let refill = Refill { every: Period::Interval { ms: 1_000 }, amount: 5, cap: None };
        let credits = Credits { set_to: 5, set_version: 1, added: 0, refill: Some(refill) };
        let mut ledger = Ledger::default();
        let with = SettleRequest { idempotency_key: Some("a".into()), cost: 1, version: 0 };
        assert_eq!(ledger.settle(key(&credits, true), &with, 999).verdict, Verdict::Granted);
        ledger.apply(key(&credits, true), 1_000);
        assert!(!ledger.release("a"), "the refill replaced the balance it came from");
        assert_eq!(ledger.available(), 5);
    }
}
