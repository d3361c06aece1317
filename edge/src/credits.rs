//! This isolate as a holder of credit leases: it spends a key's credits in memory from leases
//! its authority granted, and asks for more when its share runs low.
//!
//! - A lease is spent only until its time-to-live has passed by this isolate's clock, counted
//!   from *before* it was asked; the authority counts the same time from when it granted it,
//!   which is later, so the holder always stops first (clocks need only run at the same rate).
//! - A lease the holder will spend no more from (expired, or dropped by a purge) is reported
//!   with what was spent of it at the next contact with the authority, which then returns the
//!   unspent part to the balance. The authority never returns a lease on its own.
//! - When a share covers less than half a second of the holder's rate (or the last lease
//!   request's round trip plus a margin, if longer), or half of its time is left, another lease
//!   is asked for after the answer (`wait_until`): a steady stream of requests does not wait for
//!   the authority, even one a few hundred milliseconds away. The rate leaves out the time the
//!   holder waited with nothing in hand, and what was wanted meanwhile
//!   (`keyward_shared::holder`), so a holder far from its authority reaches its real rate after
//!   one wait, not one round trip at a time.
//! - A lease's id is the holder's choice: when a request times out, the id is reported unspent
//!   at the next contact, so a grant whose answer was lost is returned, not stranded. One
//!   request per key is under way at a time in an isolate; others that need it wait for it.
//! - With no share left and the authority unreachable, the answer is `UNAVAILABLE` (fail closed).
//! - A verification with an idempotency key is settled at the authority, one round trip.

use std::cell::{Cell, RefCell};

use keyward_shared::credits::{
    LEASE_TTL_MS, LeaseAnswer, LeaseRequest, Report, SettleRequest, Settlement, Verdict, text,
};
use keyward_shared::holder::Rate;
use keyward_shared::internal::{CreditCounts, SETTLE_PATH as SETTLE_PATH_INTERNAL, SettleAnswer, SettleOrder};
use keyward_shared::ratelimit::text as ratelimit;
use keyward_shared::ratelimit::{Cap, Grant};
use keyward_shared::{Code, KeyHash};
use worker::{Context, Date, Delay, Env, Method, Request, RequestInit, console_warn};

use crate::authority::{self, LEASE_PATH, RELEASE_PATH, SETTLE_PATH, Unreachable};
use crate::{deadline, memory};

/// How long an isolate answers `USAGE_EXCEEDED` from memory after the authority said there was
/// not enough, before asking again.
const EXHAUSTED_MS: u64 = 250;
/// How often a request waiting for another's lease request looks at it again.
const JOIN_POLL_MS: u64 = 5;
/// One lease held: what is left of it, what was spent, and until when (this clock) it may be.
#[derive(Clone, Copy)]
struct Held {
    lease: u64,
    left: u64,
    spent: u64,
    until_ms: u64,
}

/// What this isolate holds of one key's credits.
#[derive(Default)]
struct Holding {
    leases: Vec<Held>,
    /// Leases spent no more from, to report at the next contact.
    reports: Vec<Report>,
    /// The authority's upper bound at the last contact, and what was spent here since.
    remaining: u64,
    spent_since: u64,
    /// A lease request under way, asked at this time.
    asking_since: Option<u64>,
    /// Until when the authority's "not enough" is answered from memory.
    exhausted_until: u64,
    rate: Rate,
}

impl Holding {
    /// Moves leases past their time to the reports.
    fn close_expired(&mut self, now_ms: u64) {
        let (done, live): (Vec<Held>, Vec<Held>) =
            self.leases.iter().partition(|h| h.until_ms <= now_ms || h.left == 0);
        self.reports.extend(done.iter().map(|h| Report { lease: h.lease, spent: h.spent }));
        self.leases = live;
    }

    /// Spends `cost` (0: checks one is left) from the first lease that covers it.
    fn take(&mut self, cost: u64) -> Option<u64> {
        let held = self.leases.iter_mut().find(|h| h.left >= cost.max(1))?;
        held.left -= cost;
        held.spent += cost;
        self.spent_since += cost;
        Some(self.remaining.saturating_sub(self.spent_since))
    }

    /// Whether another lease should be asked for ahead of need: when what is held would run
    /// out, in credits or in time, before a lease asked now could arrive (with a margin).
    fn running_low(&self, now_ms: u64, ttl_ms: u64) -> bool {
        let left: u64 = self.leases.iter().map(|h| h.left).sum();
        let latest = self.leases.iter().map(|h| h.until_ms).max().unwrap_or(0);
        // Never the whole lease lifetime: a lease would count as running low on arrival.
        self.leases.len() < 2 && (self.rate.short(left, now_ms, ttl_ms / 2) || latest < now_ms + ttl_ms / 2)
    }

    /// Takes the authority's answer to a request asked at `asked_ms`.
    fn answered(&mut self, answer: &LeaseAnswer, asked_ms: u64, now_ms: u64) {
        self.rate.answered(asked_ms, now_ms);
        self.rate.fed(now_ms);
        self.remaining = answer.remaining;
        self.spent_since = 0;
        if answer.granted > 0 {
            let until_ms = asked_ms + answer.ttl_ms;
            self.leases.push(Held { lease: answer.lease, left: answer.granted, spent: 0, until_ms });
        }
        if answer.verdict == Verdict::Exceeded {
            self.exhausted_until = now_ms + EXHAUSTED_MS;
        }
    }
}

thread_local! {
    /// Holdings by key hash: a list (smaller in the worker than a map type); one whose leases
    /// and reports are all gone is given up when another key needs a place.
    static HOLDINGS: RefCell<Vec<([u8; 32], Holding)>> = const { RefCell::new(Vec::new()) };
    static COUNTS: Cell<CreditCounts> = const { Cell::new(CreditCounts { leases_waited: 0, leases_ahead: 0, settled: 0, unavailable: 0, put_back_lost: 0, released: 0, release_lost: 0 }) };
}

fn with<R>(hash: &KeyHash, f: impl FnOnce(&mut Holding) -> R) -> R {
    HOLDINGS.with(|h| {
        let mut holdings = h.borrow_mut();
        let at = match holdings.iter().position(|(held, _)| held == hash.as_bytes()) {
            Some(at) => at,
            None => {
                holdings.retain(|(_, h)| !h.leases.is_empty() || !h.reports.is_empty() || h.asking_since.is_some());
                if holdings.len() >= memory::MAX_HOLDINGS {
                    // The oldest goes, with what it would have reported: its unspent shares are
                    // stranded until the key's next set (never spent twice).
                    holdings.remove(0);
                }
                holdings.push((*hash.as_bytes(), Holding::default()));
                holdings.len() - 1
            }
        };
        f(&mut holdings[at].1)
    })
}

fn count(f: impl FnOnce(&mut CreditCounts)) {
    let mut counts = COUNTS.get();
    f(&mut counts);
    COUNTS.set(counts);
}

/// What this isolate did with credits.
pub(crate) fn counts() -> CreditCounts {
    COUNTS.get()
}

/// Drops this isolate's shares of a key (a purge carried a tightening change): what was spent
/// of them is reported at the next contact.
pub(crate) fn drop_shares(hash: &KeyHash) {
    HOLDINGS.with(|h| {
        if let Some((_, holding)) = h.borrow_mut().iter_mut().find(|(held, _)| held == hash.as_bytes()) {
            holding.close_expired(u64::MAX);
            holding.remaining = holding.remaining.saturating_sub(holding.spent_since);
            holding.spent_since = 0;
        }
    });
}

/// Puts `cost` back that a verification took of these credits (a key's or its identity's)
/// when another of its authorities refused it: into a live lease that spent at least that
/// much (spendable here again), else into a report not yet sent (the authority returns it to
/// the balance). A report already sent cannot be changed: such credits stay spent and are
/// counted (`put_back_lost`), never silently.
pub(crate) fn put_back(hash: &KeyHash, cost: u64) {
    if cost == 0 {
        return;
    }
    let now = Date::now().as_millis();
    let returned = with(hash, |h| {
        let returned = match h.leases.iter_mut().find(|l| l.spent >= cost && l.until_ms > now) {
            Some(held) => {
                held.left += cost;
                held.spent -= cost;
                true
            }
            None => h.reports.iter_mut().find(|r| r.spent >= cost).map(|r| r.spent -= cost).is_some(),
        };
        if returned {
            h.spent_since = h.spent_since.saturating_sub(cost);
        }
        returned
    });
    if !returned {
        count(|c| c.put_back_lost += 1);
    }
}

/// What credits said about one verification.
pub(crate) enum Spent {
    /// Spent (or, at cost 0, one is left): the upper bound of what remains.
    Yes(u64),
    /// Not enough: `USAGE_EXCEEDED`, with the upper bound of what remains.
    Exceeded(u64),
    /// The authority could not be asked, or says the key may not be spent: `UNAVAILABLE`.
    Unavailable,
    /// The key has no credits at its authority.
    Unlimited,
    /// Settled at the authority (an idempotency key): its settlement.
    Settled(Settlement),
}

impl Spent {
    /// The code this gives a `VALID` decision (`VALID` when spent).
    pub(crate) fn code(&self) -> Code {
        match self {
            Spent::Yes(_) | Spent::Unlimited => Code::Valid,
            Spent::Exceeded(_) => Code::UsageExceeded,
            Spent::Unavailable => Code::Unavailable,
            Spent::Settled(s) => match s.verdict {
                Verdict::Granted | Verdict::Unlimited => Code::Valid,
                Verdict::Exceeded => Code::UsageExceeded,
                Verdict::Limited => Code::RateLimited,
                Verdict::Void => Code::Unavailable,
            },
        }
    }

    /// The upper bound of what remains, where known.
    pub(crate) fn remaining(&self) -> Option<u64> {
        match self {
            Spent::Yes(r) | Spent::Exceeded(r) => Some(*r),
            Spent::Settled(s) if !matches!(s.verdict, Verdict::Void | Verdict::Limited | Verdict::Unlimited) => {
                Some(s.remaining)
            }
            _ => None,
        }
    }
}

/// Posts to the key's authority within `ms` milliseconds.
pub(crate) async fn post(env: &Env, hash: &KeyHash, path: &str, body: String, ms: u64) -> Result<String, Unreachable> {
    let mut init = RequestInit::new();
    init.with_method(Method::Post).with_body(Some(body.into()));
    let url = format!("https://key-state.internal{path}");
    let request = Request::new_with_init(&url, &init).map_err(|e| Unreachable(e.to_string()))?;
    let name = authority::object_name(hash, false);
    let answered = deadline::within(ms, authority::call(env, &name, request)).await;
    match answered {
        Some(Ok(Some(text))) => Ok(text),
        Some(Ok(None)) => Err(Unreachable("the authority holds no record".into())),
        Some(Err(e)) => Err(e),
        None => Err(Unreachable(format!("no answer within {ms} ms"))),
    }
}

/// Settles one verification at the key's authority (idempotent with `idempotency_key`), with
/// the exact rate limits `asks` decided in the same step under the API's `cap`; answers each
/// limit's grant too.
pub(crate) async fn settle(
    env: &Env,
    hash: &KeyHash,
    request: &SettleRequest,
    cap: Cap,
    asks: &[(String, u64)],
) -> (Spent, Vec<(String, Grant)>) {
    count(|c| c.settled += 1);
    let body = ratelimit::settle_request(&text::settle_request(request), cap, asks);
    let answer = post(env, hash, SETTLE_PATH, body, deadline::authority_ms(env)).await;
    let read = answer.ok().and_then(|t| {
        let (first, grants) = ratelimit::read_settled(&t).map(|(f, g)| (f.to_owned(), g))?;
        Some((text::read_settlement(&first)?, grants))
    });
    match read {
        // Unlimited too: a key without credits settled for its limits answers the settlement's time.
        Some((settlement, grants)) => (Spent::Settled(settlement), grants),
        None => (unavailable(), Vec::new()),
    }
}

/// Gives back what the idempotent settlement under `idempotency_key` spent at the authority of
/// `hash` (an identity's, when its key's authority refused the verification); counted, and
/// counted as lost when the authority's answer does not arrive (the release may still have
/// been made: an upper bound).
pub(crate) async fn release(env: &Env, hash: &KeyHash, idempotency_key: &str) {
    let body = idempotency_key.to_owned();
    match post(env, hash, RELEASE_PATH, body, deadline::authority_ms(env)).await {
        Ok(given) if given == "1" => count(|c| c.released += 1),
        Ok(_) => {}
        Err(Unreachable(e)) => {
            console_warn!("an identity's settlement could not be given back: {e}");
            count(|c| c.release_lost += 1);
        }
    }
}

fn unavailable() -> Spent {
    count(|c| c.unavailable += 1);
    Spent::Unavailable
}

/// A lease id of this holder's choosing: random, never 0.
fn lease_id() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        bytes = (Date::now().as_millis() ^ 0x9e37_79b9_7f4a_7c15).to_le_bytes();
    }
    u64::from_le_bytes(bytes).max(1)
}

/// Asks the authority for a lease for `need`, reporting what this isolate will spend no more
/// from; takes the answer into the holding. `None`: unreachable. A request waits for it at most
/// the authority's deadline; one asked ahead (`need` 0), which no request waits for but one
/// that finds the share spent meanwhile, at most [`deadline::MAX_AUTHORITY_MS`].
async fn ask(env: &Env, hash: &KeyHash, need: u64) -> Option<LeaseAnswer> {
    let asked_ms = Date::now().as_millis();
    let lease = lease_id();
    let request = with(hash, |h| {
        h.asking_since = Some(asked_ms);
        LeaseRequest { lease, need, rate_per_s: h.rate.per_s(asked_ms), reports: std::mem::take(&mut h.reports) }
    });
    let ms = if need == 0 { deadline::MAX_AUTHORITY_MS } else { deadline::authority_ms(env) };
    let answer = post(env, hash, LEASE_PATH, text::lease_request(&request), ms).await;
    let answer = answer.ok().and_then(|t| text::read_lease_answer(&t));
    let now_ms = Date::now().as_millis();
    with(hash, |h| {
        h.asking_since = None;
        match &answer {
            Some(a) => h.answered(a, asked_ms, now_ms),
            // The reports may not have arrived: kept for the next contact (a report is taken
            // once); a lease granted without its answer arriving is reported unspent.
            None => {
                h.rate.fed(now_ms);
                h.reports.extend(request.reports);
                h.reports.push(Report { lease, spent: 0 });
            }
        }
    });
    answer
}

/// Spends `cost` of a key's credits for a verification decided `VALID` at `now_ms`: from the
/// share in hand, else after the lease request under way (waiting at most the authority's
/// longest deadline), else from a lease asked for now (whose first `cost` is this request's).
pub(crate) async fn spend(env: &Env, ctx: &Context, hash: &KeyHash, cost: u64, now_ms: u64) -> Spent {
    let mut now = now_ms;
    with(hash, |h| h.rate.want(cost, now));
    loop {
        let (taken, under_way, exhausted) = with(hash, |h| {
            h.close_expired(now);
            let under_way = h.asking_since.is_some_and(|at| now.saturating_sub(at) < deadline::MAX_AUTHORITY_MS);
            (h.take(cost), under_way, h.exhausted_until > now)
        });
        if let Some(remaining) = taken {
            if !under_way && with(hash, |h| h.running_low(now, LEASE_TTL_MS)) {
                ahead(env, ctx, hash);
            }
            return Spent::Yes(remaining);
        }
        if exhausted {
            return Spent::Exceeded(with(hash, |h| h.remaining.saturating_sub(h.spent_since)));
        }
        // Starved only with nothing in hand: a request whose cost no single lease covers,
        // while others go on spending, is not a wait of the holder's.
        with(hash, |h| {
            if h.leases.is_empty() {
                h.rate.starved(now);
            }
        });
        if !under_way {
            return asked(env, hash, cost).await;
        }
        if now.saturating_sub(now_ms) > deadline::MAX_AUTHORITY_MS {
            return unavailable();
        }
        Delay::from(std::time::Duration::from_millis(JOIN_POLL_MS)).await;
        now = Date::now().as_millis();
    }
}

/// Asks for a lease for `cost` and spends it from the answer at once.
async fn asked(env: &Env, hash: &KeyHash, cost: u64) -> Spent {
    count(|c| c.leases_waited += 1);
    match ask(env, hash, cost.max(1)).await.map(|a| a.verdict) {
        None | Some(Verdict::Void) => unavailable(),
        Some(Verdict::Unlimited) => Spent::Unlimited,
        Some(Verdict::Exceeded) => Spent::Exceeded(with(hash, |h| h.remaining)),
        Some(Verdict::Limited) => unavailable(),
        // No await since the answer was taken: the lease is this request's first.
        Some(Verdict::Granted) => with(hash, |h| h.take(cost)).map_or_else(unavailable, Spent::Yes),
    }
}

/// Asks for another lease after the answer, while the share in hand goes on being spent.
fn ahead(env: &Env, ctx: &Context, hash: &KeyHash) {
    count(|c| c.leases_ahead += 1);
    let (env, hash) = (env.clone(), *hash);
    with(&hash, |h| h.asking_since = Some(Date::now().as_millis()));
    ctx.wait_until(async move {
        ask(&env, &hash, 0).await;
    });
}

/// `POST /internal/settle`: the control plane's signed request to settle one verification at
/// the key's authority (its own verify route spends through the same ledger).
pub(crate) async fn handle_settle(
    mut req: worker::Request,
    ctx: worker::RouteContext<Context>,
) -> crate::error::EdgeResult<worker::Response> {
    let now_ms = Date::now().as_millis();
    let order = crate::signed::parse::<SettleOrder>(&mut req, &ctx.env, SETTLE_PATH_INTERNAL, now_ms).await?.body;
    let request = SettleRequest { idempotency_key: order.idempotency_key, cost: order.cost, version: order.version };
    let asks: Vec<(String, u64)> = order.ratelimits.into_iter().map(|a| (a.name, a.cost.unwrap_or(1))).collect();
    let cap = Cap { api_version: order.api_version, percent: order.limit_percent };
    if !(1..=100).contains(&cap.percent) {
        let message = format!("limit_percent is 1 to 100, not {}", cap.percent);
        return Err(crate::error::EdgeError::new(keyward_shared::ErrorCode::BadRequest, message));
    }
    let (spent, grants) = settle(&ctx.env, &order.hash, &request, cap, &asks).await;
    let settlement = match spent {
        Spent::Settled(s) => s,
        Spent::Unlimited => Settlement { verdict: Verdict::Unlimited, remaining: 0, decided_at_ms: now_ms },
        _ => {
            let message = "the key's authority could not settle the verification; retry";
            return Err(crate::error::EdgeError::new(keyward_shared::ErrorCode::AuthorityUnavailable, message));
        }
    };
    let answer = SettleAnswer {
        verdict: settlement.verdict,
        remaining: settlement.remaining,
        decided_at_ms: settlement.decided_at_ms,
        ratelimits: grants.iter().map(|(name, grant)| crate::ratelimit::left_of(name, grant)).collect(),
    };
    Ok(worker::Response::from_json(&answer)?)
}
