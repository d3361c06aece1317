//! Rate limits: what a key's record says about its named limits, and the schedule (GCRA over
//! grants) that the authority keeps for an `exact` limit and a holder keeps for a `local` one.
//! Pure: the KeyState object stores [`Schedule`]s and calls them; the edge holds the tokens.
//!
//! Guarantees (docs/design.md, "Rate limits"):
//! - A [`Schedule`] never grants more than `limit` tokens within any interval of
//!   [`RateLimit::window_ms`] (the duration plus the lease lifetime for `exact`, the duration
//!   alone for `local`), whatever the order and sizes of the requests: any `m` tokens granted
//!   in such an interval are scheduled at least [`RateLimit::spacing_us`] apart, the first not
//!   before its grant and the last at most [`RateLimit::burst`] spacings after its own, so
//!   `m ≤ limit`. Since a share granted at `g` is spent only in `[g, g + TTL)`, an `exact`
//!   limit admits at most `limit` in every window of its duration, globally (a `local` one, per
//!   holder).
//! - Under demand that asks for every token within `burst` spacings of its due time, the
//!   schedule does not drift: tokens fall due every spacing, so a window of the duration sees at
//!   least `⌊(duration − Δ) / spacing⌋` of them spent (Δ: due time to spending).

use serde::{Deserialize, Serialize};

/// Shortest window a limit may have.
pub const MIN_DURATION_MS: u64 = 1_000;
/// Longest window a limit may have (30 days).
pub const MAX_DURATION_MS: u64 = 30 * 86_400_000;
/// Most limits one key may carry.
pub const MAX_LIMITS: usize = 16;
/// Largest `limit` a limit may have, and largest cost a request may name (keeps the
/// schedule's microsecond arithmetic far from overflow).
pub const MAX_LIMIT: u64 = 1_000_000_000;
/// Longest limit name.
pub const MAX_NAME: usize = 32;
/// Shortest and longest lease lifetime of an `exact` limit's tokens.
pub const MIN_LEASE_TTL_MS: u64 = 250;
pub const MAX_LEASE_TTL_MS: u64 = 2_000;

/// Where a limit is counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Leased from the key's authority: at most `limit` per window, globally.
    #[default]
    Exact,
    /// Counted by each holder alone: at most `limit` per window per holder.
    Local,
}

fn one() -> u64 {
    1
}

fn yes() -> bool {
    true
}

/// A named limit on a key: `limit` per `duration_ms`, each verification spending `cost`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub name: String,
    pub limit: u64,
    pub duration_ms: u64,
    /// What one verification spends unless its request names another cost.
    #[serde(default = "one")]
    pub cost: u64,
    #[serde(default)]
    pub mode: Mode,
    /// Applied to every verification (`true`), or only to those that name it.
    #[serde(default = "yes")]
    pub auto: bool,
}

/// Whether `name` may name a limit: 1 to [`MAX_NAME`] ASCII letters, digits, `_`, `-`, `.`.
pub fn is_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

impl RateLimit {
    /// What is wrong with this limit, if anything.
    pub fn check(&self) -> Result<(), String> {
        if !is_name(&self.name) {
            return Err(format!("a limit's name is 1 to {MAX_NAME} of A-Z a-z 0-9 _ - ., not `{}`", self.name));
        }
        if !(1..=MAX_LIMIT).contains(&self.limit) {
            return Err(format!("limit `{}`: limit is 1 to {MAX_LIMIT}", self.name));
        }
        if !(MIN_DURATION_MS..=MAX_DURATION_MS).contains(&self.duration_ms) {
            return Err(format!("limit `{}`: duration_ms is {MIN_DURATION_MS} to {MAX_DURATION_MS}", self.name));
        }
        if self.cost == 0 || self.cost > self.limit {
            return Err(format!("limit `{}`: cost is 1 to the limit", self.name));
        }
        Ok(())
    }

    /// How long a holder may spend a share of the limit's tokens (from before it asked, for
    /// `exact`; from when it granted them to itself, for `local`): a tenth of the duration,
    /// within [`MIN_LEASE_TTL_MS`] and [`MAX_LEASE_TTL_MS`].
    pub fn lease_ttl_ms(&self) -> u64 {
        (self.duration_ms / 10).clamp(MIN_LEASE_TTL_MS, MAX_LEASE_TTL_MS)
    }

    /// The interval in which grants are kept at or under `limit`: the duration and the lease
    /// lifetime (spending from a grant at `g` happens in `[g, g + TTL)`).
    pub fn window_ms(&self) -> u64 {
        self.duration_ms + self.lease_ttl_ms()
    }

    /// Tokens the schedule may run ahead of the clock: a 64th of the limit, at least 1 and at
    /// least the limit's cost less one (so one verification can be granted at once), at most
    /// `limit − 1`. The largest spend one grant can make is `burst + 1`.
    pub fn burst(&self) -> u64 {
        (self.limit / 64).max(1).max(self.cost.saturating_sub(1)).min(self.limit - 1)
    }

    /// Microseconds between scheduled tokens: `⌈window / (limit − burst)⌉`.
    pub fn spacing_us(&self) -> u64 {
        (self.window_ms() * 1_000).div_ceil(self.limit - self.burst())
    }

    /// Whether going from `self` to `next` (the same name) can refuse what `self` admitted:
    /// anything but a higher limit (or none) with the rest unchanged.
    fn is_tightened_by(&self, next: &RateLimit) -> bool {
        let loosened = next.limit >= self.limit
            && next.duration_ms == self.duration_ms
            && next.cost == self.cost
            && next.mode == self.mode
            && next.auto == self.auto;
        !loosened
    }
}

/// An API-wide cap on every rate limit of its keys (the API record's limit override), with the
/// version of the API record it was read from. A key's authority keeps the cap of the newest API
/// record it was told of ([`Cap::kept`]) and grants under it, whatever cap a request was made
/// under: holders whose copies of the API record differ in age cannot make its schedules
/// alternate between limits, and a holder whose copy is behind is granted under the newer one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    pub api_version: u64,
    /// 1 to 100; 100 is no cap.
    pub percent: u8,
}

impl Cap {
    /// No API record known: nothing capped.
    pub const NONE: Cap = Cap { api_version: 0, percent: 100 };

    /// `limit` under this cap: `percent` of its `limit`, rounded down, at least 1 (its
    /// duration, cost and mode unchanged).
    pub fn apply(&self, limit: &RateLimit) -> RateLimit {
        let capped = (limit.limit.saturating_mul(u64::from(self.percent.min(100))) / 100).max(1);
        RateLimit { limit: capped.min(limit.limit), ..limit.clone() }
    }

    /// Every limit of `limits` under this cap.
    pub fn apply_all(&self, limits: &[RateLimit]) -> Vec<RateLimit> {
        limits.iter().map(|l| self.apply(l)).collect()
    }

    /// The cap an authority that kept `held` keeps, and grants under, after a request made
    /// under `asked`: the one of the newer API record.
    pub fn kept(held: Option<Cap>, asked: Cap) -> Cap {
        match held {
            Some(held) if held.api_version > asked.api_version => held,
            _ => asked,
        }
    }

    /// `api_version percent`
    pub fn text(&self) -> String {
        format!("{} {}", self.api_version, self.percent)
    }

    pub fn read(text: &str) -> Option<Cap> {
        let (version, percent) = text.split_once(' ')?;
        let percent: u8 = percent.parse().ok()?;
        (1..=100).contains(&percent).then_some(Cap { api_version: version.parse().ok()?, percent })
    }
}

/// Whether going from `old` to `new` limits can refuse a verification `old` admitted: a limit
/// added or made tighter (removing one is loosening).
pub fn tightened(old: &[RateLimit], new: &[RateLimit]) -> bool {
    new.iter().any(|n| old.iter().find(|o| o.name == n.name).is_none_or(|o| o.is_tightened_by(n)))
}

/// What one verification asks of the limits: `(index in the record's limits, cost)` for every
/// automatic limit and every limit the request names (with its own cost, or the limit's).
pub fn applicable(limits: &[RateLimit], asked: &[LimitAsk]) -> Vec<(usize, u64)> {
    limits
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let named = asked.iter().find(|a| a.name == l.name);
            (l.auto || named.is_some()).then(|| (i, named.and_then(|a| a.cost).unwrap_or(l.cost)))
        })
        .collect()
}

/// Refuses a request naming a cost that one of `limits` can never grant at once (more than its
/// `burst + 1` tokens): such a request would be refused forever, each time told to retry soon.
pub fn check_costs(limits: &[RateLimit], asked: &[LimitAsk]) -> Result<(), String> {
    for ask in asked {
        let Some(limit) = limits.iter().find(|l| l.name == ask.name) else { continue };
        let most = limit.burst() + 1;
        match ask.cost {
            Some(cost) if cost > most => {
                return Err(format!(
                    "ratelimits: limit `{}` grants at most {most} at once; this request asks {cost}",
                    limit.name
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// A limit a verify request names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitAsk {
    pub name: String,
    /// What this verification spends of it (default: the limit's own cost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<u64>,
}

/// A limit's GCRA schedule: the theoretical arrival time of its next token (Unix µs), and the
/// limit it was kept under (`limit`, `duration_ms`, `cost`; 0: not known).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Schedule {
    pub tat_us: i64,
    pub limit: u64,
    pub duration_ms: u64,
    pub cost: u64,
}

/// What a schedule says to a request for tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub granted: u64,
    /// Tokens that could still be granted now, after this grant.
    pub remaining: u64,
    /// When the next `need` tokens (at least one) fall due, from now (0: now).
    pub retry_after_ms: u64,
    /// When the schedule is empty again (its whole burst available), Unix ms.
    pub reset_at_ms: i64,
}

impl Schedule {
    /// How many tokens could be granted at `now_us`.
    fn allowed(&self, limit: &RateLimit, now_us: i64) -> u64 {
        let (spacing, tolerance) = (limit.spacing_us() as i64, (limit.burst() * limit.spacing_us()) as i64);
        let tat = self.tat_us.max(now_us);
        if tat - tolerance > now_us { 0 } else { ((now_us + tolerance - tat) / spacing) as u64 + 1 }
    }

    /// Takes `limit` as the one this schedule is kept under. A schedule kept under another limit
    /// starts again empty, unless the change only raised `limit`: its arrival time came from the
    /// old spacing, and a window of the new duration could otherwise stay refused for as long as
    /// a window of the old one (the bound after a tightening change holds for windows starting
    /// one lease lifetime after it, so grants made before it may be forgotten). A raise keeps
    /// the arrival time, so a window across it holds no more than the higher limit; the raise
    /// shows within `(burst + 1)` of the old spacings.
    fn kept_under(&mut self, limit: &RateLimit) {
        let known = self.limit != 0;
        let same = self.duration_ms == limit.duration_ms && self.cost == limit.cost;
        if known && !(same && limit.limit >= self.limit) {
            self.tat_us = 0;
        }
        (self.limit, self.duration_ms, self.cost) = (limit.limit, limit.duration_ms, limit.cost);
    }

    /// Grants `want` tokens, or as many as the schedule allows now if at least `need` (and
    /// nothing otherwise; `need` 0 takes what there is). Never more than `limit` in any window.
    pub fn grant(&mut self, limit: &RateLimit, need: u64, want: u64, now_ms: i64) -> Grant {
        self.kept_under(limit);
        let now_us = now_ms.saturating_mul(1_000);
        let allowed = self.allowed(limit, now_us);
        let granted = if allowed >= need { want.max(need).min(allowed) } else { 0 };
        if granted > 0 {
            self.tat_us = self.tat_us.max(now_us) + (granted * limit.spacing_us()) as i64;
        }
        self.answer(limit, granted, need, now_us)
    }

    fn answer(&self, limit: &RateLimit, granted: u64, need: u64, now_us: i64) -> Grant {
        let (spacing, tolerance) = (limit.spacing_us() as i64, (limit.burst() * limit.spacing_us()) as i64);
        let tat = self.tat_us.max(now_us);
        // The next `need` tokens are allowed once their last one's schedule is within tolerance.
        let due_us = tat + (need.max(1) as i64 - 1) * spacing - tolerance;
        Grant {
            granted,
            remaining: self.allowed(limit, now_us),
            retry_after_ms: ((due_us - now_us).max(0) as u64).div_ceil(1_000),
            reset_at_ms: tat.div_euclid(1_000) + i64::from(tat.rem_euclid(1_000) > 0),
        }
    }
}

/// A verification's exact limits decided at the authority (with its credits, in one step of the
/// KeyState object): `schedules` is what to store if the verification is admitted by every
/// limit *and* its credits (commit), `grants` each asked limit's answer, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    pub schedules: Vec<(String, Schedule)>,
    pub grants: Vec<(String, Grant)>,
    pub admitted: bool,
    /// An asked name is not an exact limit of these limits: the asker decided on another
    /// version of the record (the authority's may be older), so the verification fails closed.
    pub unknown: bool,
}

/// Reserves `cost` of each asked exact limit of `limits` on a copy of `schedules`: admitted only
/// if every one grants (a name `limits` does not carry as an exact limit admits nothing and
/// sets [`Reserved::unknown`]).
/// Nothing is spent until the caller stores [`Reserved::schedules`]; not storing them releases
/// the reservation.
pub fn reserve(
    schedules: &[(String, Schedule)],
    limits: &[RateLimit],
    asks: &[(String, u64)],
    now_ms: i64,
) -> Reserved {
    let mut next: Vec<(String, Schedule)> =
        schedules.iter().filter(|(n, _)| limits.iter().any(|l| l.name == *n)).cloned().collect();
    let mut grants = Vec::with_capacity(asks.len());
    let (mut admitted, mut unknown) = (true, false);
    for (name, cost) in asks {
        let Some(limit) = limits.iter().find(|l| l.name == *name && l.mode == Mode::Exact) else {
            (admitted, unknown) = (false, true);
            continue;
        };
        let at = match next.iter().position(|(n, _)| n == name) {
            Some(at) => at,
            None => {
                next.push((name.clone(), Schedule::default()));
                next.len() - 1
            }
        };
        let grant = next[at].1.grant(limit, *cost, *cost, now_ms);
        admitted &= grant.granted > 0;
        grants.push((name.clone(), grant));
    }
    Reserved { schedules: next, grants, admitted, unknown }
}

/// The text the KeyState object and its holders exchange, the stored schedules, and a record's
/// limits as one string (not JSON: each type serde_json reads costs the worker's upload).
pub mod text {
    use super::*;
    use crate::credits::{Settlement, Verdict};

    /// A holder's request for tokens of one limit.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct TokenRequest {
        pub name: String,
        pub need: u64,
        pub want: u64,
        /// The version of the record the holder decided on: an authority holding an older one
        /// answers `Void` rather than "no such limit" (fail closed).
        pub version: u64,
        /// The API's cap the holder decided under (the authority grants under a newer one it
        /// keeps: [`Cap::kept`]).
        pub cap: Cap,
    }

    /// The authority's answer: a [`Grant`] with its lease lifetime and verdict (`Unlimited`:
    /// the key carries no such exact limit; `Void`: the key may not be spent).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct TokenAnswer {
        pub grant: Grant,
        pub ttl_ms: u64,
        pub verdict: Verdict,
        /// The cap the authority granted under (the newest it was told of: [`Cap::kept`]).
        pub cap: Cap,
    }

    /// `name need want version api_version percent`
    pub fn token_request(r: &TokenRequest) -> String {
        format!("{} {} {} {} {}", r.name, r.need, r.want, r.version, r.cap.text())
    }

    pub fn read_token_request(text: &str) -> Option<TokenRequest> {
        let mut tokens = text.split(' ');
        let name = tokens.next().filter(|n| is_name(n))?.to_owned();
        let need = tokens.next()?.parse().ok()?;
        let want = tokens.next()?.parse().ok()?;
        let version = tokens.next()?.parse().ok()?;
        let cap = Cap::read(&format!("{} {}", tokens.next()?, tokens.next()?))?;
        tokens.next().is_none().then_some(TokenRequest { name, need, want, version, cap })
    }

    fn verdict_char(v: Verdict) -> &'static str {
        match v {
            Verdict::Granted => "g",
            Verdict::Exceeded => "e",
            Verdict::Void => "v",
            Verdict::Unlimited => "u",
            Verdict::Limited => "l",
        }
    }

    /// `granted remaining retry_after_ms reset_at_ms ttl_ms verdict api_version percent`
    pub fn token_answer(a: &TokenAnswer) -> String {
        let g = &a.grant;
        let (verdict, cap) = (verdict_char(a.verdict), a.cap.text());
        format!("{} {} {} {} {} {verdict} {cap}", g.granted, g.remaining, g.retry_after_ms, g.reset_at_ms, a.ttl_ms)
    }

    pub fn read_token_answer(text: &str) -> Option<TokenAnswer> {
        let mut tokens = text.split(' ');
        let mut number = || tokens.next()?.parse::<i64>().ok();
        let (granted, remaining, retry_after_ms, reset_at_ms, ttl_ms) =
            (number()?, number()?, number()?, number()?, number()?);
        let verdict = match tokens.next()? {
            "g" => Verdict::Granted,
            "e" => Verdict::Exceeded,
            "v" => Verdict::Void,
            "u" => Verdict::Unlimited,
            _ => return None,
        };
        let grant = Grant {
            granted: granted as u64,
            remaining: remaining as u64,
            retry_after_ms: retry_after_ms as u64,
            reset_at_ms,
        };
        let cap = Cap::read(&format!("{} {}", tokens.next()?, tokens.next()?))?;
        tokens.next().is_none().then_some(TokenAnswer { grant, ttl_ms: ttl_ms as u64, verdict, cap })
    }

    /// A settle request with the exact limits to decide with it: the credits' settle request
    /// ([`crate::credits::text::settle_request`]), the API's cap ([`Cap::text`]) on the second
    /// line, then `name cost` per line.
    pub fn settle_request(credits: &str, cap: Cap, asks: &[(String, u64)]) -> String {
        let mut out = format!("{credits}\n{}", cap.text());
        for (name, cost) in asks {
            out.push_str(&format!("\n{name} {cost}"));
        }
        out
    }

    /// A settle request as read: the credits' part, the API's cap, and each limit asked with
    /// its cost.
    pub type SettleParts<'a> = (&'a str, Cap, Vec<(String, u64)>);

    /// The credits' settle request, the API's cap and the limits asked.
    pub fn read_settle_request(text: &str) -> Option<SettleParts<'_>> {
        let mut lines = text.split('\n');
        let first = lines.next()?;
        let cap = Cap::read(lines.next()?)?;
        let asks = lines
            .map(|l| {
                let (name, cost) = l.split_once(' ')?;
                is_name(name).then(|| Some((name.to_owned(), cost.parse().ok()?)))?
            })
            .collect::<Option<_>>()?;
        Some((first, cap, asks))
    }

    /// A settlement ([`crate::credits::text::settlement`]) with each limit's grant, one per line:
    /// `name granted remaining retry_after_ms reset_at_ms`.
    pub fn settled(settlement: &str, grants: &[(String, Grant)]) -> String {
        let mut out = settlement.to_owned();
        for (name, g) in grants {
            out.push_str(&format!("\n{name} {} {} {} {}", g.granted, g.remaining, g.retry_after_ms, g.reset_at_ms));
        }
        out
    }

    /// The settlement's text and each limit's grant.
    pub fn read_settled(text: &str) -> Option<(&str, Vec<(String, Grant)>)> {
        let mut lines = text.split('\n');
        let first = lines.next()?;
        let grants = lines
            .map(|l| {
                let mut t = l.split(' ');
                let name = t.next().filter(|n| is_name(n))?.to_owned();
                let mut n = || t.next()?.parse::<i64>().ok();
                let (granted, remaining, retry, reset) = (n()?, n()?, n()?, n()?);
                let grant = Grant {
                    granted: granted as u64,
                    remaining: remaining as u64,
                    retry_after_ms: retry as u64,
                    reset_at_ms: reset,
                };
                Some((name, grant))
            })
            .collect::<Option<_>>()?;
        Some((first, grants))
    }

    /// Settlements remembered for a key without credits (whose ledger would remember them), by
    /// idempotency key: `key verdict remaining decided_at_ms` per line; those older than
    /// [`crate::credits::IDEMPOTENCY_MS`] at `now_ms` are left out.
    pub fn remembered(entries: &[(String, Settlement)], now_ms: i64) -> String {
        let fresh = entries.iter().filter(|(_, s)| s.decided_at_ms as i64 + crate::credits::IDEMPOTENCY_MS > now_ms);
        fresh.map(|(k, s)| format!("{k} {}", crate::credits::text::settlement(s))).collect::<Vec<_>>().join("\n")
    }

    pub fn read_remembered(text: &str) -> Option<Vec<(String, Settlement)>> {
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (key, rest) = l.split_once(' ')?;
                Some((key.to_owned(), crate::credits::text::read_settlement(rest)?))
            })
            .collect()
    }

    /// Stored schedules: `name tat_us limit duration_ms cost` per line.
    pub fn schedules(s: &[(String, Schedule)]) -> String {
        let line = |(n, s): &(String, Schedule)| format!("{n} {} {} {} {}", s.tat_us, s.limit, s.duration_ms, s.cost);
        s.iter().map(line).collect::<Vec<_>>().join("\n")
    }

    pub fn read_schedules(text: &str) -> Option<Vec<(String, Schedule)>> {
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let mut fields = l.split(' ');
                let name = fields.next()?.to_owned();
                let tat_us = fields.next()?.parse().ok()?;
                let mut number = || fields.next().map_or(Some(0), |f| f.parse().ok());
                let (limit, duration_ms, cost) = (number()?, number()?, number()?);
                Some((name, Schedule { tat_us, limit, duration_ms, cost }))
            })
            .collect()
    }
}

/// A record's limits as one string (`name limit duration_ms cost mode auto`, `mode` `e`|`l`,
/// `auto` `a`|`n`, limits separated by `,`), for `#[serde(with)]` on
/// [`crate::KeyRecord::ratelimits`]. The admin API shows [`RateLimit`]s as JSON.
pub mod as_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::{Mode, RateLimit, is_name};

    pub fn write(limits: &[RateLimit]) -> String {
        let one = |l: &RateLimit| {
            let mode = if l.mode == Mode::Exact { 'e' } else { 'l' };
            let auto = if l.auto { 'a' } else { 'n' };
            format!("{} {} {} {} {mode} {auto}", l.name, l.limit, l.duration_ms, l.cost)
        };
        limits.iter().map(one).collect::<Vec<_>>().join(",")
    }

    fn read_one(text: &str) -> Option<RateLimit> {
        let mut tokens = text.split(' ');
        let name = tokens.next().filter(|n| is_name(n))?.to_owned();
        let limit = tokens.next()?.parse().ok()?;
        let duration_ms = tokens.next()?.parse().ok()?;
        let cost = tokens.next()?.parse().ok()?;
        let mode = match tokens.next()? {
            "e" => Mode::Exact,
            "l" => Mode::Local,
            _ => return None,
        };
        let auto = match tokens.next()? {
            "a" => true,
            "n" => false,
            _ => return None,
        };
        let limit = RateLimit { name, limit, duration_ms, cost, mode, auto };
        (tokens.next().is_none() && limit.check().is_ok()).then_some(limit)
    }

    pub fn read(text: &str) -> Option<Vec<RateLimit>> {
        text.split(',').filter(|t| !t.is_empty()).map(read_one).collect()
    }

    pub fn serialize<S: Serializer>(limits: &[RateLimit], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&write(limits))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<RateLimit>, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
        read(&text).ok_or_else(|| serde::de::Error::custom("rate limits are not `name limit duration cost mode auto`"))
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    fn limit(limit: u64, duration_ms: u64, mode: Mode) -> RateLimit {
        RateLimit { name: "api".into(), limit, duration_ms, cost: 1, mode, auto: true }
    }

    #[test]
    fn parameters_table() {
        // (limit, duration, mode, lease ttl, burst, spacing µs)
        let cases = [
            (50, 10_000, Mode::Exact, 1_000, 1, 224_490),
            (1, 1_000, Mode::Exact, 250, 0, 1_250_000),
            (2, 1_000, Mode::Exact, 250, 1, 1_250_000),
            (1_000, 60_000, Mode::Exact, 2_000, 15, 62_945),
            (50, 10_000, Mode::Local, 1_000, 1, 224_490),
            (10, MAX_DURATION_MS, Mode::Exact, 2_000, 1, 288_000_222_223),
        ];
        for (n, d, mode, ttl, burst, spacing) in cases {
            let l = limit(n, d, mode);
            assert_eq!((l.lease_ttl_ms(), l.burst(), l.spacing_us()), (ttl, burst, spacing), "{l:?}");
        }
        let costly = RateLimit { cost: 5, ..limit(50, 10_000, Mode::Exact) };
        assert_eq!(costly.burst(), 4);
    }

    /// Grants over `ms` at `step_ms` to requests of `sizes` (cycled), then checks every
    /// interval of the limit's window holds at most `limit` granted tokens; answers the grants.
    fn run(l: &RateLimit, start: i64, ms: i64, step_ms: i64, sizes: &[(u64, u64)]) -> Vec<(i64, u64)> {
        let mut schedule = Schedule::default();
        let mut grants = Vec::new();
        let mut i = 0;
        let mut t = start;
        while t < start + ms {
            let (need, want) = sizes[i % sizes.len()];
            let g = schedule.grant(l, need, want, t);
            assert!(g.granted == 0 || g.granted >= need, "{g:?}");
            if g.granted > 0 {
                grants.push((t, g.granted));
            }
            i += 1;
            t += step_ms;
        }
        let window = l.window_ms() as i64;
        for &(from, _) in &grants {
            // Every interval (from − window, from]: the most any interval ending at a grant holds.
            let sum: u64 = grants.iter().filter(|(g, _)| *g > from - window && *g <= from).map(|(_, n)| n).sum();
            assert!(sum <= l.limit, "{sum} granted in ({}, {from}] for {l:?}", from - window);
        }
        grants
    }

    #[test]
    fn never_more_than_the_limit_in_any_window() {
        let shapes: &[&[(u64, u64)]] = &[&[(1, 1)], &[(1, 100)], &[(0, 7), (1, 1), (3, 3)], &[(2, 2)], &[(0, 1000)]];
        for l in [
            limit(50, 10_000, Mode::Exact),
            limit(1, 1_000, Mode::Exact),
            limit(3, 1_000, Mode::Local),
            limit(1_000, 60_000, Mode::Exact),
            limit(7, 2_000, Mode::Local),
        ] {
            for sizes in shapes {
                for step in [1, 7, 50, 333] {
                    run(&l, 1_700_000_000_000, 45_000, step, sizes);
                }
            }
        }
    }

    #[test]
    fn saturated_demand_has_a_floor_in_every_window() {
        // 50 per 10 s with a 1 s lease: tokens fall due every 224.49 ms, asked at once.
        let l = limit(50, 10_000, Mode::Exact);
        let start = 1_000_000;
        let grants = run(&l, start, 60_000, 1, &[(1, 1)]);
        // Every sliding window of the duration (spent when granted) past the first.
        for from in (start + 10_000..start + 50_000).step_by(37) {
            let n: u64 = grants.iter().filter(|(g, _)| *g >= from && *g <= from + 10_000).map(|(_, n)| n).sum();
            assert!((44..=50).contains(&n), "{n} in [{from}, +10 s]");
        }
        // Asked 100 ms late each time (within the burst's tolerance): no drift, same floor.
        let late = run(&l, start, 60_000, 100, &[(1, 1)]);
        let n = late.iter().filter(|(g, _)| *g >= start + 30_000 && *g <= start + 40_000).count();
        assert!(n >= 43, "{n}");
    }

    #[test]
    fn answers_say_when_to_retry() {
        let l = limit(2, 1_000, Mode::Exact);
        let mut s = Schedule::default();
        let now = 1_000_000;
        let g = s.grant(&l, 1, 5, now);
        // Burst 1: two tokens at once, then one every 1.25 s.
        assert_eq!((g.granted, g.remaining), (2, 0));
        let refused = s.grant(&l, 1, 1, now + 10);
        assert_eq!((refused.granted, refused.retry_after_ms), (0, 1_240));
        assert_eq!(refused.reset_at_ms, now + 2_500);
        assert_eq!(s.grant(&l, 1, 1, now + 1_249).granted, 0);
        assert_eq!(s.grant(&l, 1, 1, now + 1_250).granted, 1);
        // Asked ahead (need 0) with nothing due: nothing, not a refusal of a request.
        assert_eq!(s.grant(&l, 0, 4, now + 1_260).granted, 0);
    }

    #[test]
    fn tightening() {
        let base = limit(50, 10_000, Mode::Exact);
        let with = |edit: fn(&mut RateLimit)| {
            let mut next = base.clone();
            edit(&mut next);
            tightened(std::slice::from_ref(&base), &[next])
        };
        assert!(!with(|_| {}));
        assert!(!with(|l| l.limit = 60));
        assert!(with(|l| l.limit = 40));
        assert!(with(|l| l.duration_ms = 20_000));
        assert!(with(|l| l.cost = 2));
        assert!(with(|l| l.name = "other".into()));
        assert!(!tightened(std::slice::from_ref(&base), &[]));
        assert!(tightened(&[], std::slice::from_ref(&base)));
        let local = RateLimit { mode: Mode::Local, ..base.clone() };
        assert!(tightened(std::slice::from_ref(&local), std::slice::from_ref(&base)));
    }

    #[test]
    fn applicable_limits() {
        let limits = vec![
            limit(50, 10_000, Mode::Exact),
            RateLimit { name: "search".into(), auto: false, cost: 2, ..limit(5, 1_000, Mode::Local) },
        ];
        assert_eq!(applicable(&limits, &[]), vec![(0, 1)]);
        let asked = [LimitAsk { name: "search".into(), cost: None }, LimitAsk { name: "nope".into(), cost: Some(9) }];
        assert_eq!(applicable(&limits, &asked), vec![(0, 1), (1, 2)]);
        assert_eq!(applicable(&limits, &[LimitAsk { name: "api".into(), cost: Some(3) }]), vec![(0, 3)]);
    }

    #[test]
    fn reserve_is_all_or_nothing() {
        let limits = vec![
            limit(2, 10_000, Mode::Exact),
            // 640 per 10 s: a burst of 10, so 11 at once.
            RateLimit { name: "b".into(), ..limit(640, 10_000, Mode::Exact) },
            RateLimit { name: "c".into(), ..limit(5, 10_000, Mode::Local) },
        ];
        let asks = |a: u64, b: u64| vec![("b".to_owned(), b), ("api".to_owned(), a)];
        // A local or unknown limit is not the authority's: whoever asked decided on another record.
        for odd in ["c", "x"] {
            let mut asked = asks(1, 1);
            asked.push((odd.to_owned(), 1));
            let refused = reserve(&[], &limits, &asked, 0);
            assert!(!refused.admitted && refused.unknown, "{odd}");
        }
        let first = reserve(&[], &limits, &asks(1, 1), 0);
        assert!(first.admitted && !first.unknown);
        assert_eq!(first.grants.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["b", "api"]);
        let second = reserve(&first.schedules, &limits, &asks(1, 1), 1);
        assert!(second.admitted);
        // `api` allows 2 at once: a third is refused after `b` granted it, so its schedules
        // are not stored and `b` still has 9 of its 11.
        let third = reserve(&second.schedules, &limits, &asks(1, 1), 2);
        assert!(!third.admitted);
        assert_eq!((third.grants[0].1.granted, third.grants[1].1.granted), (1, 0));
        let b_only = reserve(&second.schedules, &limits, &[("b".to_owned(), 9)], 3);
        assert_eq!(b_only.grants[0].1.granted, 9, "{b_only:?}");
        assert!(!reserve(&b_only.schedules, &limits, &[("b".to_owned(), 1)], 3).admitted);
    }

    #[test]
    fn checks() {
        assert!(limit(50, 10_000, Mode::Exact).check().is_ok());
        assert!(limit(0, 10_000, Mode::Exact).check().is_err());
        assert!(limit(5, 999, Mode::Exact).check().is_err());
        assert!(limit(5, MAX_DURATION_MS + 1, Mode::Exact).check().is_err());
        assert!(RateLimit { cost: 6, ..limit(5, 1_000, Mode::Exact) }.check().is_err());
        assert!(RateLimit { name: "a b".into(), ..limit(5, 1_000, Mode::Exact) }.check().is_err());
    }

    #[test]
    fn text_round_trips() {
        let limits = vec![
            limit(50, 10_000, Mode::Exact),
            RateLimit { name: "s.x-1_".into(), auto: false, cost: 2, ..limit(5, 1_000, Mode::Local) },
        ];
        assert_eq!(as_text::read(&as_text::write(&limits)), Some(limits));
        assert_eq!(as_text::read(""), Some(vec![]));
        for bad in ["api 0 1000 1 e a", "api 5 1000 1 x a", "api 5 1000 1 e a 7", "a b"] {
            assert_eq!(as_text::read(bad), None, "{bad}");
        }
        use crate::credits::{Settlement, Verdict};
        let cap = Cap { api_version: 7, percent: 10 };
        let request = text::TokenRequest { name: "api".into(), need: 1, want: 30, version: u64::MAX, cap };
        assert_eq!(text::read_token_request(&text::token_request(&request)), Some(request));
        let grant = Grant { granted: 3, remaining: 0, retry_after_ms: 224, reset_at_ms: 1_764_000_000_123 };
        let answer = text::TokenAnswer { grant, ttl_ms: 1_000, verdict: Verdict::Granted, cap };
        assert_eq!(text::read_token_answer(&text::token_answer(&answer)), Some(answer));
        let asks = vec![("api".to_owned(), 1), ("b".to_owned(), 3)];
        let request = text::settle_request("3 order-1", cap, &asks);
        assert_eq!(text::read_settle_request(&request), Some(("3 order-1", cap, asks)));
        assert_eq!(text::read_settle_request("3\n0 100"), Some(("3", Cap::NONE, vec![])));
        assert_eq!(text::read_settle_request("3"), None, "the cap is not optional");
        assert_eq!(text::read_settle_request("3\n1 0"), None, "a percent of 0 is no cap");
        let settled = text::settled("g 7 1000", &[("api".to_owned(), grant)]);
        assert_eq!(text::read_settled(&settled), Some(("g 7 1000", vec![("api".to_owned(), grant)])));
        let stored = vec![("api".to_owned(), Schedule { tat_us: 1_764_000_000_123_456, ..Schedule::default() })];
        assert_eq!(text::read_schedules(&text::schedules(&stored)), Some(stored));
        assert_eq!(text::read_schedules(""), Some(vec![]));
        let settled = Settlement { verdict: Verdict::Limited, remaining: 0, decided_at_ms: 1_000 };
        let remembered = vec![("order-1".to_owned(), settled)];
        assert_eq!(text::read_remembered(&text::remembered(&remembered, 2_000)), Some(remembered.clone()));
        assert_eq!(text::remembered(&remembered, 1_000 + crate::credits::IDEMPOTENCY_MS), "");
    }

    #[test]
    fn a_cost_the_limit_cannot_grant_at_once_is_refused() {
        let limits = [limit(50, 10_000, Mode::Exact)];
        let ask = |cost| [LimitAsk { name: "api".into(), cost: Some(cost) }];
        assert_eq!(limits[0].burst(), 1);
        assert!(check_costs(&limits, &ask(2)).is_ok());
        let refused = check_costs(&limits, &ask(5)).unwrap_err();
        assert!(refused.contains("at most 2") && refused.contains("asks 5"), "{refused}");
        assert!(check_costs(&limits, &[LimitAsk { name: "other".into(), cost: Some(99) }]).is_ok(), "not the key's");
        assert!(RateLimit { limit: MAX_LIMIT + 1, ..limits[0].clone() }.check().is_err());
    }

    #[test]
    fn a_changed_limit_starts_its_schedule_again_and_a_raise_keeps_it() {
        let month = limit(10, MAX_DURATION_MS, Mode::Exact);
        let mut schedule = Schedule::default();
        let now = 1_764_000_000_000;
        assert_eq!(schedule.grant(&month, 2, 2, now).granted, 2);
        assert!(schedule.grant(&month, 1, 1, now).granted == 0, "the month's burst is spent");
        // A second-long window of 1000: not refused for the month's spacing.
        let second = limit(1_000, 1_000, Mode::Exact);
        let mut changed = schedule;
        assert!(changed.grant(&second, 1, 1, now + 10).granted == 1, "{changed:?}");
        // A raise of the limit alone keeps the schedule: the spent burst stays spent.
        let raised = RateLimit { limit: 20, ..month.clone() };
        let mut kept = schedule;
        assert_eq!(kept.grant(&raised, 1, 1, now + 10).granted, 0, "{kept:?}");
        // Stored and read back with its limit.
        let text = text::schedules(&[("api".into(), schedule)]);
        assert_eq!(text::read_schedules(&text), Some(vec![("api".to_owned(), schedule)]));
    }

    #[test]
    fn a_cap_lowers_every_limit_and_only_a_newer_api_record_moves_it() {
        let l = limit(1_000, 10_000, Mode::Exact);
        assert_eq!(Cap { api_version: 3, percent: 5 }.apply(&l).limit, 50);
        assert_eq!(Cap { api_version: 3, percent: 1 }.apply(&limit(50, 1_000, Mode::Local)).limit, 1, "at least 1");
        assert_eq!(Cap::NONE.apply(&l), l);
        let (old, new) = (Cap { api_version: 3, percent: 5 }, Cap { api_version: 4, percent: 100 });
        assert_eq!(Cap::kept(None, old), old);
        assert_eq!(Cap::kept(Some(old), new), new, "a lift from a newer record");
        assert_eq!(Cap::kept(Some(new), old), new, "an older record's cap is not taken");
        assert_eq!(Cap::kept(Some(old), Cap::NONE), old, "nor none");
        assert_eq!(Cap::kept(Some(new), new), new);
        // Under a cap the schedule starts again at the lower limit: at most 50 in the window.
        let mut schedule = Schedule::default();
        let now = 1_764_000_000_000;
        assert_eq!(schedule.grant(&l, 500, 500, now).granted, 0, "beyond the burst");
        let granted: u64 = (0..1_000).map(|i| schedule.grant(&l, 1, 1, now + i).granted).sum();
        assert!(granted > 50, "{granted}");
        let capped = old.apply(&l);
        let more: u64 = (0..10_000).map(|i| schedule.grant(&capped, 1, 1, now + 1_000 + i).granted).sum();
        assert!(more <= 50 && more > 0, "{more} in 10 s under a cap of 50 per 10 s");
    }
}
