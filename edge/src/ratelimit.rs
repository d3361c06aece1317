//! Rate limits at the edge: this isolate as a holder of a key's limit tokens, and the KeyState
//! object's side of an `exact` limit (its schedules, next to the record and the credits ledger).
//!
//! - An `exact` limit's tokens are granted by the key's authority ([`grant`], GCRA over grants:
//!   `keyward_shared::ratelimit`) and spent here until their lease lifetime has passed by this
//!   isolate's clock, counted from *before* it asked: never more than the limit in any window of
//!   its duration, globally. A `local` limit's tokens are granted by this isolate to itself with
//!   the same arithmetic: never more than the limit per window here.
//! - Refused, the holder answers `RATE_LIMITED` from memory until the next token falls due.
//! - With no token in hand and the authority unreachable, an `exact` limit answers
//!   `UNAVAILABLE` (fail closed); a `local` limit never asks.
//! - A verification takes a token of every limit that applies before anything else is spent
//!   ([`check`]); when one refuses, or credits refuse afterwards, the tokens taken go back to
//!   their shares ([`put_back`]): a refused verification spends nothing.
//! - A share is spent by one isolate only, never returned to the authority (its unspent part is
//!   stranded; docs/design.md, "Rate limits").

use std::cell::RefCell;

use keyward_shared::credits::{Settlement, Verdict};
use keyward_shared::holder::Rate;
use keyward_shared::identity::Spender;
use keyward_shared::ratelimit::text::{self, TokenAnswer, TokenRequest};
use keyward_shared::ratelimit::{Cap, Grant, Mode, RateLimit, Reserved, Schedule, applicable};
use keyward_shared::verify::LimitLeft;
use keyward_shared::{Code, KeyHash, VerifyRequest};
use worker::{Context, Date, Delay, Env, Response, Storage};

use crate::credits::post;
use crate::{deadline, memory};

/// The KeyState object's path for a holder's request for tokens ([`TokenRequest`]).
pub(crate) const RATELIMIT_PATH: &str = "/ratelimit";
/// Where the KeyState object stores its limits' schedules.
const SCHEDULES: &str = "ratelimits";
/// Where it keeps the API's cap it was last told of ([`kept_cap`]).
const CAP: &str = "cap";
/// Where it remembers idempotent settlements of a key without credits.
const SETTLED: &str = "ratelimit-settled";
/// How often a request waiting for another's token request looks at it again.
const JOIN_POLL_MS: u64 = 5;
/// A share asked for covers this much of the holder's recent rate.
const COVER_MS: u64 = 1_000;

/// Tokens of one limit in hand, spendable until `until_ms` (this clock).
#[derive(Clone, Copy)]
struct Share {
    left: u64,
    until_ms: u64,
}

/// What this isolate holds of one limit of one key.
#[derive(Default)]
struct Holding {
    shares: Vec<Share>,
    /// What the granting schedule could still grant at the last contact, and when it is empty.
    remaining: u64,
    reset_at_ms: i64,
    /// Until when a refusal is answered from memory.
    refused_until: u64,
    /// The version of the record the refusal was given under: a newer record (its limit may
    /// have changed) asks the authority again.
    refused_version: u64,
    /// A token request under way, asked at this time.
    asking_since: Option<u64>,
    /// The newest API cap this holding was decided under (`None`: none yet, as [`Cap::NONE`]);
    /// it never goes back to an older API record's.
    cap: Option<Cap>,
    rate: Rate,
    /// A `local` limit's own schedule.
    local: Schedule,
}

impl Holding {
    /// The cap to decide under now: the newer of this holding's and `asked` ([`Cap::kept`], so
    /// a request that read an older API record is decided under the newer cap). When the cap
    /// moves, a lowered one drops the shares and the refusal (they must not be spent past it), a
    /// raised one only the refusal. A `local` schedule restarts by itself when its capped limit
    /// is lowered.
    fn under(&mut self, asked: Cap) -> Cap {
        let held = self.cap.unwrap_or(Cap::NONE);
        let cap = Cap::kept(Some(held), asked);
        if cap.percent < held.percent {
            self.shares.clear();
        }
        if cap.percent != held.percent {
            self.refused_until = 0;
        }
        self.cap = Some(cap);
        cap
    }

    fn close_expired(&mut self, now_ms: u64) {
        self.shares.retain(|s| s.until_ms > now_ms && s.left > 0);
    }

    fn left(&self) -> u64 {
        self.shares.iter().map(|s| s.left).sum()
    }

    /// Takes `cost` tokens from the first share that covers them; answers its end.
    fn take(&mut self, cost: u64, now_ms: u64) -> Option<u64> {
        let share = self.shares.iter_mut().find(|s| s.left >= cost && s.until_ms > now_ms)?;
        share.left -= cost;
        Some(share.until_ms)
    }

    /// Takes a grant answered to a request asked at `asked_ms`.
    fn answered(&mut self, grant: &Grant, ttl_ms: u64, asked_ms: u64, now_ms: u64) {
        self.remaining = grant.remaining;
        self.reset_at_ms = grant.reset_at_ms;
        if grant.granted > 0 {
            self.shares.push(Share { left: grant.granted, until_ms: asked_ms + ttl_ms });
        } else {
            self.refused_until = now_ms + grant.retry_after_ms;
        }
    }

    /// Whether another share should be asked for ahead of need.
    fn running_low(&self, now_ms: u64, ttl_ms: u64) -> bool {
        let latest = self.shares.iter().map(|s| s.until_ms).max().unwrap_or(0);
        self.refused_until <= now_ms
            && self.shares.len() < 2
            && (self.rate.short(self.left(), now_ms, ttl_ms / 2) || latest < now_ms + ttl_ms / 2)
    }

    fn left_for(&self, name: &str, now_ms: u64) -> LimitLeft {
        let left = self.left();
        LimitLeft {
            name: name.to_owned(),
            remaining: left + self.remaining,
            reset_at: self.reset_at_ms,
            retry_after_ms: if left > 0 { 0 } else { self.refused_until.saturating_sub(now_ms) },
        }
    }
}

type Id = ([u8; 32], String);

thread_local! {
    /// Holdings by key hash and limit name; one with no share and nothing under way is given up
    /// when another needs a place (a `local` one's schedule with it: the isolate forgets what
    /// it counted, as an evicted isolate does).
    static HOLDINGS: RefCell<Vec<(Id, Holding)>> = const { RefCell::new(Vec::new()) };
}

/// Where this key's limit is held, made if it is not (not generic: one copy in the worker).
fn slot(holdings: &mut Vec<(Id, Holding)>, hash: &KeyHash, name: &str) -> usize {
    if let Some(at) = holdings.iter().position(|((held, n), _)| held == hash.as_bytes() && n == name) {
        return at;
    }
    let now = Date::now().as_millis();
    holdings.retain(|(_, h)| {
        h.shares.iter().any(|s| s.until_ms > now) || h.asking_since.is_some() || h.local.tat_us > now as i64 * 1_000
    });
    if holdings.len() >= memory::MAX_HOLDINGS {
        // The oldest goes: an exact limit's tokens in it are stranded (never over-admitted), a
        // local limit's count is forgotten, as by a new isolate (within `holders × limit`).
        holdings.remove(0);
    }
    holdings.push(((*hash.as_bytes(), name.to_owned()), Holding::default()));
    holdings.len() - 1
}

fn with<R>(hash: &KeyHash, name: &str, f: impl FnOnce(&mut Holding) -> R) -> R {
    HOLDINGS.with(|h| {
        let mut holdings = h.borrow_mut();
        let at = slot(&mut holdings, hash, name);
        f(&mut holdings[at].1)
    })
}

/// Drops this isolate's shares of a key's limits (a purge carried a tightening change).
pub(crate) fn drop_shares(hash: &KeyHash) {
    HOLDINGS.with(|h| {
        for ((held, _), holding) in h.borrow_mut().iter_mut() {
            if held == hash.as_bytes() {
                holding.shares.clear();
                holding.refused_until = 0;
            }
        }
    });
}

/// Tokens one verification took of one limit.
pub(crate) struct Token {
    name: String,
    cost: u64,
    until_ms: u64,
    /// The cap it was taken under.
    cap: Cap,
}

/// What the limits said about one verification.
pub(crate) enum Checked {
    /// Every limit admitted it: the tokens taken (to put back if credits refuse) and each
    /// limit's state.
    Admitted(Vec<Token>, Vec<LimitLeft>),
    /// A limit refused it (nothing taken): each limit's state.
    Limited(Vec<LimitLeft>),
    /// An exact limit's authority could not be asked: `UNAVAILABLE`.
    Unavailable,
}

impl Checked {
    /// The code this gives a `VALID` decision.
    pub(crate) fn code(&self) -> Code {
        match self {
            Checked::Admitted(..) => Code::Valid,
            Checked::Limited(_) => Code::RateLimited,
            Checked::Unavailable => Code::Unavailable,
        }
    }
}

/// What taking one limit's tokens came to.
enum Take {
    Yes(u64),
    Refused,
    Unavailable,
    /// The authority holds no such exact limit (its record differs from this copy).
    Unlimited,
}

/// The limits a verification takes tokens of: a key's own (its record's version), or its
/// identity's (the identity's record's version), held under `hash` (the key's or the identity's).
#[derive(Clone, Copy)]
pub(crate) struct Limits<'a> {
    pub(crate) hash: &'a KeyHash,
    pub(crate) ratelimits: &'a [RateLimit],
    pub(crate) version: u64,
}

/// Takes the tokens of every limit that applies to `request` (none: `None`), all or nothing,
/// each limit under `cap` (the API's limit override, for a key's own limits; [`Cap::NONE`] for
/// an identity's); with `local_only`, of its local limits (its exact ones are settled at the
/// authority).
pub(crate) async fn check(
    env: &Env,
    ctx: &Context,
    limits: Limits<'_>,
    request: &VerifyRequest,
    local_only: bool,
    cap: Cap,
) -> Option<Checked> {
    let Limits { hash, ratelimits, version } = limits;
    let mut asks = applicable(ratelimits, &request.ratelimits);
    asks.retain(|&(i, _)| !local_only || ratelimits[i].mode == Mode::Local);
    if asks.is_empty() {
        return None;
    }
    let mut taken = Vec::with_capacity(asks.len());
    for &(i, cost) in &asks {
        let cap = with(hash, &ratelimits[i].name, |h| h.under(cap));
        let limit = &cap.apply(&ratelimits[i]);
        let take = match limit.mode {
            Mode::Exact => take_exact(env, ctx, hash, limit, (version, cap), cost).await,
            Mode::Local => take_local(hash, limit, cost),
        };
        match take {
            Take::Yes(until_ms) => taken.push(Token { name: limit.name.clone(), cost, until_ms, cap }),
            Take::Unlimited => {}
            Take::Refused | Take::Unavailable => {
                put_back(hash, &taken);
                return Some(match take {
                    Take::Refused => Checked::Limited(states(hash, ratelimits, &asks)),
                    _ => Checked::Unavailable,
                });
            }
        }
    }
    Some(Checked::Admitted(taken, states(hash, ratelimits, &asks)))
}

fn states(hash: &KeyHash, ratelimits: &[RateLimit], asks: &[(usize, u64)]) -> Vec<LimitLeft> {
    let now = Date::now().as_millis();
    asks.iter()
        .map(|&(i, _)| {
            let name = &ratelimits[i].name;
            with(hash, name, |h| h.left_for(name, now))
        })
        .collect()
}

/// Puts tokens a refused verification took back into their shares (unless expired, or taken
/// under a cap the holding has since lowered).
pub(crate) fn put_back(hash: &KeyHash, tokens: &[Token]) {
    let now = Date::now().as_millis();
    for token in tokens.iter().filter(|t| t.until_ms > now) {
        with(hash, &token.name, |h| {
            if h.cap.unwrap_or(Cap::NONE).percent < token.cap.percent {
                return;
            }
            match h.shares.iter_mut().find(|s| s.until_ms == token.until_ms) {
                Some(share) => share.left += token.cost,
                None => h.shares.push(Share { left: token.cost, until_ms: token.until_ms }),
            }
        });
    }
}

/// A `local` limit: from the share in hand, else granted by this isolate's own schedule.
fn take_local(hash: &KeyHash, limit: &RateLimit, cost: u64) -> Take {
    let now = Date::now().as_millis();
    with(hash, &limit.name, |h| {
        h.close_expired(now);
        if let Some(until) = h.take(cost, now) {
            return Take::Yes(until);
        }
        let grant = h.local.grant(limit, cost, cost, now as i64);
        h.answered(&grant, limit.lease_ttl_ms(), now, now);
        h.take(cost, now).map_or(Take::Refused, Take::Yes)
    })
}

/// An `exact` limit: from the share in hand, else after the token request under way (waiting
/// at most the authority's longest deadline), else from a share asked for now.
async fn take_exact(env: &Env, ctx: &Context, hash: &KeyHash, limit: &RateLimit, under: Under, cost: u64) -> Take {
    let version = under.0;
    let started = Date::now().as_millis();
    let mut now = started;
    with(hash, &limit.name, |h| h.rate.want(cost, now));
    loop {
        let (taken, under_way, refused) = with(hash, &limit.name, |h| {
            h.close_expired(now);
            let under_way = h.asking_since.is_some_and(|at| now.saturating_sub(at) < deadline::MAX_AUTHORITY_MS);
            (h.take(cost, now), under_way, h.refused_until > now && h.refused_version == version)
        });
        if let Some(until) = taken {
            if !under_way && with(hash, &limit.name, |h| h.running_low(now, limit.lease_ttl_ms())) {
                ahead(env, ctx, hash, limit, under);
            }
            return Take::Yes(until);
        }
        if refused {
            return Take::Refused;
        }
        with(hash, &limit.name, |h| {
            if h.shares.is_empty() {
                h.rate.starved(now);
            }
        });
        if !under_way {
            return asked(env, hash, limit, under, cost).await;
        }
        if now.saturating_sub(started) > deadline::MAX_AUTHORITY_MS {
            return Take::Unavailable;
        }
        Delay::from(std::time::Duration::from_millis(JOIN_POLL_MS)).await;
        now = Date::now().as_millis();
    }
}

/// The record version and the API's cap a holder decides under.
type Under = (u64, Cap);

/// Asks for a share for `cost` and takes it from the answer at once.
async fn asked(env: &Env, hash: &KeyHash, limit: &RateLimit, under: Under, cost: u64) -> Take {
    match ask(env, hash, limit, under, cost).await.map(|a| a.verdict) {
        None | Some(Verdict::Void | Verdict::Limited) => Take::Unavailable,
        Some(Verdict::Unlimited) => Take::Unlimited,
        Some(Verdict::Exceeded) => Take::Refused,
        // No await since the answer was taken: the share is this request's first (none: the
        // grant was under a looser cap than one this isolate learned meanwhile; fail closed).
        Some(Verdict::Granted) => {
            let now = Date::now().as_millis();
            with(hash, &limit.name, |h| h.take(cost, now)).map_or(Take::Unavailable, Take::Yes)
        }
    }
}

/// Asks the authority for tokens of `limit` (capped) of the record at `version` under the API's
/// `cap` (`need` of them at least, 0 when asked ahead); takes the answer into the holding.
/// `None`: unreachable.
async fn ask(env: &Env, hash: &KeyHash, limit: &RateLimit, under: Under, need: u64) -> Option<TokenAnswer> {
    let (version, cap) = under;
    let asked_ms = Date::now().as_millis();
    let want = with(hash, &limit.name, |h| {
        h.asking_since = Some(asked_ms);
        (h.rate.per_s(asked_ms).saturating_mul(COVER_MS) / 1_000).max(need)
    });
    let request = TokenRequest { name: limit.name.clone(), need, want, version, cap };
    let ms = if need == 0 { deadline::MAX_AUTHORITY_MS } else { deadline::authority_ms(env) };
    let answer = post(env, hash, RATELIMIT_PATH, text::token_request(&request), ms).await;
    let answer = answer.ok().and_then(|t| text::read_token_answer(&t));
    let now = Date::now().as_millis();
    with(hash, &limit.name, |h| {
        h.asking_since = None;
        if answer.is_some() {
            h.rate.answered(asked_ms, now);
        }
        h.rate.fed(now);
        // The authority granted under its own cap, never older than the one asked under; the
        // holding takes it if newer. A grant under a looser cap than the holding's own (an
        // older API record's, where the holding already has a lowered one) is not kept.
        let granted_under = answer.as_ref().map(|a| a.cap).unwrap_or(cap);
        let holding_cap = h.under(granted_under);
        let kept = granted_under.percent <= holding_cap.percent;
        if let Some(a) = answer.as_ref().filter(|a| kept && matches!(a.verdict, Verdict::Granted | Verdict::Exceeded)) {
            h.answered(&a.grant, a.ttl_ms, asked_ms, now);
            h.refused_version = version;
        }
    });
    answer
}

/// Asks for another share after the answer, while the share in hand goes on being spent.
fn ahead(env: &Env, ctx: &Context, hash: &KeyHash, limit: &RateLimit, under: Under) {
    let (env, hash, limit) = (env.clone(), *hash, limit.clone());
    with(&hash, &limit.name, |h| h.asking_since = Some(Date::now().as_millis()));
    ctx.wait_until(async move {
        ask(&env, &hash, &limit, under, 0).await;
    });
}

/// The schedules the KeyState object holds.
async fn load(storage: &Storage) -> worker::Result<Vec<(String, Schedule)>> {
    let stored: Option<String> = storage.get(SCHEDULES).await?;
    Ok(stored.as_deref().and_then(text::read_schedules).unwrap_or_default())
}

/// Reserves a settled verification's exact limits on a copy of the stored schedules
/// (`keyward_shared::ratelimit::reserve`); [`commit`] stores them.
pub(crate) async fn reserve(
    storage: &Storage,
    limits: &[RateLimit],
    asks: &[(String, u64)],
    now_ms: i64,
) -> worker::Result<Reserved> {
    if asks.is_empty() {
        return Ok(Reserved { schedules: Vec::new(), grants: Vec::new(), admitted: true, unknown: false });
    }
    Ok(keyward_shared::ratelimit::reserve(&load(storage).await?, limits, asks, now_ms))
}

/// The API's cap this object grants under, given the one a request was made under: the newer
/// of the two, stored when it moved ([`Cap::kept`]). The cap is kept here, not taken from each
/// request, so that holders with API copies of different ages cannot make a schedule alternate
/// between limits (each change of a limit other than a raise starts its schedule again).
pub(crate) async fn kept_cap(storage: &Storage, asked: Cap) -> worker::Result<Cap> {
    let held: Option<String> = storage.get(CAP).await?;
    let held = held.as_deref().and_then(Cap::read);
    let kept = Cap::kept(held, asked);
    if Some(kept) != held {
        storage.put(CAP, kept.text()).await?;
    }
    Ok(kept)
}

/// The settlements remembered for a key without credits (idempotent verifications settled
/// for its limits alone).
pub(crate) async fn remembered(storage: &Storage) -> worker::Result<Vec<(String, Settlement)>> {
    let stored: Option<String> = storage.get(SETTLED).await?;
    Ok(stored.as_deref().and_then(text::read_remembered).unwrap_or_default())
}

/// Remembers a settlement for a key without credits, forgetting those past remembering.
pub(crate) async fn remember(
    storage: &Storage,
    mut entries: Vec<(String, Settlement)>,
    key: &str,
    settlement: Settlement,
    now_ms: i64,
) -> worker::Result<()> {
    entries.push((key.to_owned(), settlement));
    storage.put(SETTLED, text::remembered(&entries, now_ms)).await
}

/// Stores reserved schedules: the reservation is spent.
pub(crate) async fn commit(storage: &Storage, schedules: &[(String, Schedule)]) -> worker::Result<()> {
    storage.put(SCHEDULES, text::schedules(schedules)).await
}

/// The exact limits of `record` that apply to `request`, with their costs: what a verification
/// settled at the authority decides there.
pub(crate) fn exact_asks(ratelimits: &[RateLimit], request: &VerifyRequest) -> Vec<(String, u64)> {
    applicable(ratelimits, &request.ratelimits)
        .into_iter()
        .filter(|&(i, _)| ratelimits[i].mode == Mode::Exact)
        .map(|(i, cost)| (ratelimits[i].name.clone(), cost))
        .collect()
}

/// A verify answer's view of a limit the authority decided.
pub(crate) fn left_of(name: &str, grant: &Grant) -> LimitLeft {
    LimitLeft {
        name: name.to_owned(),
        remaining: grant.remaining,
        reset_at: grant.reset_at_ms,
        retry_after_ms: if grant.granted > 0 { 0 } else { grant.retry_after_ms },
    }
}

/// The KeyState object's answer to a holder's token request: a grant from the named exact
/// limit's schedule, stored before the answer (`Unlimited`: the record carries no such exact
/// limit; `Void`: the key may not be spent, or the object holds an older record than the one
/// the holder decided on, whose limit it may not know). No await between the reads and the write but the
/// storage's own, which the object's input gate keeps other requests out of.
pub(crate) async fn grant(storage: &Storage, record: Option<Spender>, body: &str) -> worker::Result<Response> {
    let Some(record) = record else {
        return Response::error("no record", 404);
    };
    let request = text::read_token_request(body)
        .ok_or_else(|| worker::Error::RustError(format!("not a token request: {body}")))?;
    let now = Date::now().as_millis() as i64;
    let none = |verdict| TokenAnswer {
        grant: Grant { granted: 0, remaining: 0, retry_after_ms: 0, reset_at_ms: now },
        ttl_ms: 0,
        verdict,
        cap: request.cap,
    };
    if !record.is_usable(now) || record.version() < request.version {
        // Not spendable, or the holder decided on a newer record than this one: fail closed.
        return Response::ok(text::token_answer(&none(Verdict::Void)));
    }
    let Some(limit) = record.ratelimits().iter().find(|l| l.name == request.name && l.mode == Mode::Exact) else {
        return Response::ok(text::token_answer(&none(Verdict::Unlimited)));
    };
    let cap = kept_cap(storage, request.cap).await?;
    let limit = &cap.apply(limit);
    let mut schedules = load(storage).await?;
    schedules.retain(|(name, _)| record.ratelimits().iter().any(|l| l.name == *name));
    let at = match schedules.iter().position(|(name, _)| *name == limit.name) {
        Some(at) => at,
        None => {
            schedules.push((limit.name.clone(), Schedule::default()));
            schedules.len() - 1
        }
    };
    let grant = schedules[at].1.grant(limit, request.need, request.want, now);
    storage.put(SCHEDULES, text::schedules(&schedules)).await?;
    let verdict = if grant.granted == 0 && request.need > 0 { Verdict::Exceeded } else { Verdict::Granted };
    Response::ok(text::token_answer(&TokenAnswer { grant, ttl_ms: limit.lease_ttl_ms(), verdict, cap }))
}
