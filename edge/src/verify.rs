//! `POST /v1/keys/verify`: authenticate the caller, parse the key, find its record, decide,
//! take its rate limits' tokens (`ratelimit.rs`) and spend its credits (`credits.rs`) when it is
//! valid in every other way, all or nothing, and keep
//! the answer's usage event for shipping (`usage.rs`), off the response path.

use keyward_shared::credits::{SettleRequest, Verdict};
use keyward_shared::identity::IdentityRecord;
use keyward_shared::policy::Client;
use keyward_shared::ratelimit::{Cap, Grant, RateLimit};
use keyward_shared::usage::UsageEvent;
use keyward_shared::verify::{Caller, Decision, LimitLeft, MAX_VERIFY_BODY, RequestError};
use keyward_shared::{
    Code, ErrorCode, Key, KeyHash, KeyRecord, RootKeyRecord, Source, VerifyRequest, VerifyResponse, decide,
    decide_unconfirmed,
};
use worker::{Date, Request, Response, RouteContext};

use crate::error::{EdgeError, EdgeResult};
use crate::misses::{self, Kind};
use crate::{auth, credits, lookup, ratelimit, side, usage};

pub(crate) async fn handle(mut req: Request, ctx: RouteContext<worker::Context>) -> EdgeResult<Response> {
    let now_ms = Date::now().as_millis();
    let (caller, request) = read(&mut req, &ctx, now_ms).await?;
    let shipping = usage::destination(&ctx.env);
    let answer = |response: VerifyResponse| -> EdgeResult<Response> {
        if let Some(url) = shipping.clone() {
            let region = usage::region(&ctx.env, &req);
            let answered = usage::answered(&req, &caller.workspace_id, &region, now_ms);
            let event = UsageEvent::of(answered, &request, &response);
            usage::record(&ctx.env, &ctx.data, url, event);
        }
        Ok(Response::from_json(&response)?)
    };
    let Ok(key) = Key::parse(&request.key) else {
        return answer(VerifyResponse::malformed().decided_at(now_ms));
    };
    let hash = key.hash();
    let caller_id = caller.id.clone();
    let who = Caller { workspace_id: &caller.workspace_id, scopes: &caller.scopes };
    if let Some(remembered) = remembered_not_found(&hash, who, &caller_id, &request, now_ms) {
        return answer(remembered?);
    }
    let fetched = std::cell::Cell::new(false);
    let admit = || {
        fetched.set(true);
        misses::admit(Kind::Key, &caller_id, now_ms)
    };
    let found = lookup::find(&ctx.env, &ctx.data, &hash, now_ms, admit).await?;
    // Decided, and stamped, once the record is found.
    let decided_at_ms = Date::now().as_millis();
    let now = decided_at_ms as i64;
    let (decision, record, source) = match found {
        lookup::Found::Record(record, source) => (decide(record.as_ref(), &hash, who, &request, now), record, source),
        lookup::Found::Unconfirmed(stale, source) => {
            (decide_unconfirmed(&stale, &hash, who, &request, now), None, source)
        }
        lookup::Found::CallerLimited => return Err(limited()),
    };
    if decision.code == Code::NotFound && !fetched.get() && !misses::charge(Kind::Key, &caller_id, now_ms) {
        return Err(limited());
    }
    // Only a NOT_FOUND that is answered is remembered: one refused by the caller's miss budget
    // is not, or a second root key of the workspace would find another workspace's key
    // remembered where a missing one is not.
    if decision.code == Code::NotFound {
        remember_not_found(record.as_ref(), &hash, &caller.workspace_id, decided_at_ms);
    }
    // The key's and its API's allow and deny lists, before permissions' answer and any spending;
    // the API's record also caps the key's rate limits.
    let (decision, cap) = match record.as_ref().filter(|_| decision.code.passed_status_checks()) {
        Some(record) => lists(&ctx, &req, &request, record, decision, decided_at_ms).await?,
        None => (decision, Cap::NONE),
    };
    if let Some(r) = record.as_ref().filter(|_| decision.code == Code::Valid) {
        let costs = keyward_shared::ratelimit::check_costs(&r.ratelimits, &request.ratelimits);
        costs.map_err(|m| EdgeError::new(ErrorCode::BadRequest, m))?;
    }
    let (decision, identity) = match record.as_ref() {
        Some(r) => identity_of(&ctx, r, &request, decision, decided_at_ms).await?,
        None => (decision, None),
    };
    let charged =
        charge(&ctx, &hash, record.as_ref(), identity.as_ref(), (decision, cap), &request, decided_at_ms).await;
    let (charged, record) = overtaken(&ctx, &req, charged, record, (&hash, who, &request), decided_at_ms).await;
    let answered_ms = Date::now().as_millis();
    if answered_ms.saturating_sub(now_ms) > RECHECK_AFTER_MS {
        auth::after_wait(&ctx.env, &ctx.data, &caller.hash, answered_ms);
    }
    let response = VerifyResponse::new(charged.decision, record.as_ref(), Some(source))
        .decided_at(charged.decided_at_ms)
        .with_limits(charged.limits);
    match charged.credits {
        Some(remaining) => answer(response.with_credits(remaining)),
        None => answer(response),
    }
}

/// The caller, a root key allowed to verify, and the request's body, at most
/// `MAX_VERIFY_BODY` bytes of it.
async fn read(
    req: &mut Request,
    ctx: &RouteContext<worker::Context>,
    now_ms: u64,
) -> EdgeResult<(RootKeyRecord, VerifyRequest)> {
    let caller = auth::caller(req, &ctx.env, &ctx.data, now_ms).await?;
    caller.scopes.require_verify().map_err(|e| EdgeError::new(ErrorCode::Forbidden, e.to_string()))?;
    let declared = req.headers().get("content-length").ok().flatten().and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_VERIFY_BODY) {
        return Err(refused(RequestError::TooLarge));
    }
    let request = VerifyRequest::from_json(&req.bytes().await?).map_err(refused)?;
    Ok((caller, request))
}

/// The `NOT_FOUND` the caller's workspace was given for this key moments ago
/// (`crate::misses::answered`), answered again without a lookup (`source: "remembered"`), or
/// `None`. It takes one of the caller's lookups, as any `NOT_FOUND` that fetched nothing does.
fn remembered_not_found(
    hash: &KeyHash,
    who: Caller<'_>,
    caller_id: &str,
    request: &VerifyRequest,
    now_ms: u64,
) -> Option<EdgeResult<VerifyResponse>> {
    if !misses::answered(who.workspace_id, hash, now_ms) {
        return None;
    }
    if !misses::charge(Kind::Key, caller_id, now_ms) {
        return Some(Err(limited()));
    }
    let decision = decide(None, hash, who, request, now_ms as i64);
    Some(Ok(VerifyResponse::new(decision, None, Some(Source::Remembered)).decided_at(now_ms)))
}

/// Remembers the `NOT_FOUND` a lookup's `record` means for `workspace_id` where no caller of
/// that workspace could be answered otherwise: a miss KV and a reachable authority agreed on
/// (the one `crate::misses` remembers), or another workspace's key. A key of the workspace
/// itself (deleted, of an API the caller may not verify) is never remembered, nor a miss that
/// was not confirmed.
fn remember_not_found(record: Option<&KeyRecord>, hash: &KeyHash, workspace_id: &str, now_ms: u64) {
    let nobody_here = match record {
        None => misses::known_missing(Kind::Key, hash.as_bytes(), now_ms),
        Some(record) => record.workspace_id != workspace_id,
    };
    if nobody_here {
        misses::remember_answer(workspace_id, hash, now_ms);
    }
}

/// How long a `VALID` may wait after its decision (for the API's record, tokens, a credit lease, a
/// settlement) and still be answered on the copy it was decided on, unchecked: past it, the key
/// (and its API's lists) are looked up again, under the same trust rules, before the answer.
const RECHECK_AFTER_MS: u64 = 10;

/// A `VALID` decided before a wait is not answered on the older record when the key changed
/// meanwhile. A wait of [`RECHECK_AFTER_MS`] or less: a newer copy that reached this isolate's
/// memory (a signed purge, a confirmation) is taken. A longer wait: the API's lists are decided
/// again, then the key is found as any request finds it (memory within its trust, the Cache API
/// that a purge-by-tag clears, the authority past `max_staleness_ms`), last, so that the answer
/// rests on the key's record as the region holds it when the answer is given; a copy that
/// cannot be confirmed, or a lookup that fails, fails closed. Refused then by its status or by
/// its own or its API's lists, the answer is the refusal: what the request took from this
/// isolate's shares (tokens, credits, the key's and its identity's) goes back; what a
/// settlement spent at an authority stays spent.
async fn overtaken(
    ctx: &RouteContext<worker::Context>,
    req: &Request,
    charged: Charged,
    record: Option<KeyRecord>,
    asked: (&KeyHash, Caller<'_>, &VerifyRequest),
    decided_at_ms: u64,
) -> (Charged, Option<KeyRecord>) {
    let Some(found) = record.as_ref().filter(|_| charged.decision.code == Code::Valid) else {
        return (charged, record);
    };
    let now_ms = Date::now().as_millis();
    let now = if now_ms.saturating_sub(decided_at_ms) <= RECHECK_AFTER_MS {
        lookup::newer_copy(asked.0, found.version).map_or(Now::Same, |r| Now::Changed(Some(r)))
    } else {
        let listed = lists(ctx, req, asked.2, found, charged.decision.clone(), now_ms).await;
        let listed = listed.map_or_else(|_| Decision::unavailable(), |(decision, _)| decision);
        if listed.code != Code::Valid {
            return refused_after_wait(charged, listed, None);
        }
        found_again(ctx, asked.0, found, now_ms).await
    };
    let at = Date::now().as_millis();
    let (hash, who, request) = asked;
    // The record decided on: its lists were decided again above (after a wait), its expiry is here.
    let same = matches!(now, Now::Same);
    let (decision, current) = match now {
        Now::Same if at.saturating_sub(decided_at_ms) <= RECHECK_AFTER_MS => return (charged, record),
        Now::Same => (decide(Some(found), hash, who, request, at as i64), Some(found.clone())),
        Now::Changed(r) => (decide(r.as_ref(), hash, who, request, at as i64), r),
        Now::Unconfirmed(stale) => (decide_unconfirmed(&stale, hash, who, request, at as i64), None),
    };
    let decision = match current.as_ref().filter(|_| !same && decision.code.passed_status_checks()) {
        Some(r) => lists(ctx, req, request, r, decision, at).await.map_or_else(|_| Decision::unavailable(), |(d, _)| d),
        None => decision,
    };
    if decision.code == Code::Valid {
        return (charged, record);
    }
    refused_after_wait(charged, decision, current)
}

/// The key as a request finds it now, against the record a `VALID` was decided on; a lookup
/// that fails, or one the caller's miss budget refuses, counts as unconfirmed (fail closed).
async fn found_again(ctx: &RouteContext<worker::Context>, hash: &KeyHash, found: &KeyRecord, now_ms: u64) -> Now {
    match lookup::find(&ctx.env, &ctx.data, hash, now_ms, || true).await {
        Ok(lookup::Found::Record(Some(r), _)) if r.version <= found.version => Now::Same,
        Ok(lookup::Found::Record(r, _)) => Now::Changed(r),
        Ok(lookup::Found::Unconfirmed(stale, _)) => Now::Unconfirmed(stale),
        Ok(lookup::Found::CallerLimited) => Now::Unconfirmed(found.clone()),
        Err(e) => {
            worker::console_warn!("the key's lookup after a wait failed: {e}");
            Now::Unconfirmed(found.clone())
        }
    }
}

/// A `VALID` refused after its wait: what it took from this isolate's shares goes back, and the
/// answer is the refusal, on the record it was decided on then (if any).
fn refused_after_wait(
    charged: Charged,
    decision: Decision,
    current: Option<KeyRecord>,
) -> (Charged, Option<KeyRecord>) {
    charged.taken.put_back();
    (Charged::as_decided(decision, Date::now().as_millis()), current)
}

/// What a key is at answer time, against the record a `VALID` was decided on.
enum Now {
    /// The record decided on (or an older one) still stands.
    Same,
    /// A newer record, or none any more.
    Changed(Option<KeyRecord>),
    /// The best copy there is could not be confirmed.
    Unconfirmed(KeyRecord),
}

/// What a key's rate limits and credits (and its identity's) made of a decision.
struct Charged {
    decision: Decision,
    /// When the tokens or the credit were taken, or the authority settled it (else as decided).
    decided_at_ms: u64,
    /// What remains of the credits, where the answer may say it (the least of the key's and
    /// its identity's).
    credits: Option<u64>,
    limits: Vec<LimitLeft>,
    /// What a `VALID` took from this isolate's shares.
    taken: Taken,
}

impl Charged {
    fn as_decided(decision: Decision, decided_at_ms: u64) -> Charged {
        Charged { decision, decided_at_ms, credits: None, limits: Vec::new(), taken: Taken::default() }
    }
}

/// What a verification took from this isolate's shares: the tokens of each limit holder (the
/// key's, its identity's) and `cost` of each holder's credits.
#[derive(Default)]
struct Taken {
    tokens: Vec<(KeyHash, Vec<ratelimit::Token>)>,
    credits: Vec<KeyHash>,
    cost: u64,
}

impl Taken {
    /// Puts everything back: the verification is not answered `VALID`.
    fn put_back(&self) {
        for (hash, taken) in &self.tokens {
            ratelimit::put_back(hash, taken);
        }
        for hash in &self.credits {
            credits::put_back(hash, self.cost);
        }
    }
}

/// Rate limits, then credits, for a `VALID` decision: only a key valid in every other way
/// spends, and one refused by any of them spends nothing on the others (what was taken here
/// goes back; with an idempotency key each authority settles its exact limits and credits, the
/// identity's first, given back if the key's refuses: [`charge_settled`]). The key's
/// own limits are decided under the API's `cap` (its limit override); an identity's are not.
async fn charge(
    ctx: &RouteContext<worker::Context>,
    hash: &KeyHash,
    record: Option<&KeyRecord>,
    identity: Option<&IdentityRecord>,
    (decision, cap): (Decision, Cap),
    request: &VerifyRequest,
    decided_at_ms: u64,
) -> Charged {
    let Some(record) = record.filter(|_| decision.code == Code::Valid) else {
        return Charged::as_decided(decision, decided_at_ms);
    };
    let key = Payer {
        hash: *hash,
        ratelimits: &record.ratelimits,
        version: record.version,
        credits: record.credits.is_some(),
        cap,
    };
    let shared = identity.map(|i| Payer {
        hash: IdentityRecord::hash_of(&i.id),
        ratelimits: &i.ratelimits,
        version: i.version,
        credits: i.credits.is_some(),
        cap: Cap::NONE,
    });
    let payers: Vec<Payer> = std::iter::once(key).chain(shared).collect();
    match request.idempotency_key.is_some() {
        true => charge_settled(ctx, &payers, decision, request, decided_at_ms).await,
        false => charge_leased(ctx, &payers, decision, request, decided_at_ms).await,
    }
}

/// An authority a verification spends from, in this isolate's shares: the key's, or its
/// identity's.
struct Payer<'a> {
    hash: KeyHash,
    ratelimits: &'a [RateLimit],
    version: u64,
    /// Whether its record has credits.
    credits: bool,
    /// The cap its limits are decided under.
    cap: Cap,
}

/// Every payer's limits' tokens, then every payer's credits, from this isolate's shares, in
/// order: the first refusal ends it, and every token and credit taken before it goes back.
async fn charge_leased(
    ctx: &RouteContext<worker::Context>,
    payers: &[Payer<'_>],
    mut decision: Decision,
    request: &VerifyRequest,
    mut decided_at_ms: u64,
) -> Charged {
    let mut taken = Taken { cost: request.cost.unwrap_or(1), ..Taken::default() };
    let mut limits = Vec::new();
    (decision, decided_at_ms) =
        take_limits(ctx, payers, request, false, (decision, decided_at_ms), &mut taken, &mut limits).await;
    let mut credits: Option<u64> = None;
    for payer in payers.iter().filter(|p| p.credits) {
        if decision.code != Code::Valid {
            break;
        }
        let spent = credits::spend(&ctx.env, &ctx.data, &payer.hash, taken.cost, decided_at_ms).await;
        // Stamped when the credit was taken (after any wait for a lease): a refill period's
        // spending is then counted in the period that paid for it.
        decided_at_ms = Date::now().as_millis();
        decision = decision.refused_by_credits(spent.code());
        if let Some(remaining) = spent.remaining() {
            credits = Some(credits.map_or(remaining, |c| c.min(remaining)));
        }
        if matches!(spent, credits::Spent::Yes(_)) {
            taken.credits.push(payer.hash);
        }
    }
    if decision.code != Code::Valid {
        taken.put_back();
        taken = Taken::default();
    }
    let credits = credits.filter(|_| decision.code != Code::Unavailable);
    Charged { decision, decided_at_ms, credits, limits, taken }
}

/// Every payer's limits' tokens from this isolate's shares (with `local_only`, of its local
/// limits: the exact ones are settled at the authority), in order: the first refusal ends it.
/// The tokens taken go to `taken` and each limit's state to `limits`; answers the decision and
/// when tokens were last taken.
async fn take_limits(
    ctx: &RouteContext<worker::Context>,
    payers: &[Payer<'_>],
    request: &VerifyRequest,
    local_only: bool,
    (mut decision, mut decided_at_ms): (Decision, u64),
    taken: &mut Taken,
    limits: &mut Vec<LimitLeft>,
) -> (Decision, u64) {
    for payer in payers.iter().filter(|p| !p.ratelimits.is_empty()) {
        let asked = ratelimit::Limits { hash: &payer.hash, ratelimits: payer.ratelimits, version: payer.version };
        match ratelimit::check(&ctx.env, &ctx.data, asked, request, local_only, payer.cap).await {
            None => {}
            Some(ratelimit::Checked::Admitted(tokens, left)) => {
                decided_at_ms = Date::now().as_millis();
                taken.tokens.push((payer.hash, tokens));
                limits.extend(left);
            }
            Some(refused) => {
                decision = decision.refused_by_limits(refused.code());
                if let ratelimit::Checked::Limited(left) = refused {
                    limits.extend(left);
                }
                break;
            }
        }
    }
    (decision, decided_at_ms)
}

/// A verification with an idempotency key: the local limits of the key and of its identity
/// from this isolate's shares, then each authority settles its exact limits and credits in one
/// step of its own, the identity's first, then the key's. The identity's settlement is the
/// reservation: when the key's authority refuses after the identity's granted, the identity's
/// credits are given back (`credits::release`; its exact limits' tokens stay spent, which only
/// ever admits less). Only a refusal the key's authority answered releases: one it could not
/// be asked about keeps the reservation (the key's settlement may have been made). A retry with
/// the same idempotency key is answered by both authorities as before, and a second release
/// gives nothing back twice.
async fn charge_settled(
    ctx: &RouteContext<worker::Context>,
    payers: &[Payer<'_>],
    mut decision: Decision,
    request: &VerifyRequest,
    mut decided_at_ms: u64,
) -> Charged {
    let (mut taken, mut limits) = (Taken::default(), Vec::new());
    (decision, decided_at_ms) =
        take_limits(ctx, payers, request, true, (decision, decided_at_ms), &mut taken, &mut limits).await;
    let mut credits: Option<u64> = None;
    let (mut reserved, mut refused_there): (Option<(KeyHash, String)>, bool) = (None, false);
    // The identity (last in `payers`) settles first: it holds the reservation.
    for payer in payers.iter().rev() {
        let asks = ratelimit::exact_asks(payer.ratelimits, request);
        if decision.code != Code::Valid || (!payer.credits && asks.is_empty()) {
            continue;
        }
        let is_key = payer.hash == payers[0].hash;
        // At the identity the idempotency key is the key's own: another key of the identity
        // sending the same text settles (and releases) apart.
        let order = match is_key {
            true => request.idempotency_key.clone(),
            false => request.idempotency_key.as_deref().map(|k| scoped(&payers[0].hash, k)),
        };
        let (spent, grants) =
            settle(ctx, &payer.hash, (order.clone(), request), &asks, (payer.version, payer.cap)).await;
        decided_at_ms = match &spent {
            credits::Spent::Settled(s) => s.decided_at_ms,
            _ => Date::now().as_millis(),
        };
        decision = match &spent {
            credits::Spent::Settled(s) if s.verdict == Verdict::Limited => {
                decision.refused_by_limits(Code::RateLimited)
            }
            s => decision.refused_by_credits(s.code()),
        };
        limits.extend(grants.iter().map(|(name, grant)| ratelimit::left_of(name, grant)));
        if let Some(remaining) = spent.remaining() {
            credits = Some(credits.map_or(remaining, |c| c.min(remaining)));
        }
        let verdict = match &spent {
            credits::Spent::Settled(s) => Some(s.verdict),
            _ => None,
        };
        match (is_key, verdict) {
            // A refusal the key's authority remembers under the idempotency key (a retry is
            // refused alike): not one it could not be asked about, nor a `Void` (its record was
            // behind), after which a retry could be `VALID` on a given-back reservation.
            (true, Some(Verdict::Exceeded | Verdict::Limited)) => refused_there = true,
            (false, Some(Verdict::Granted)) => reserved = order.map(|o| (payer.hash, o)),
            _ => {}
        }
    }
    if decision.code != Code::Valid {
        taken.put_back();
        taken = Taken::default();
    }
    if let (Some((identity, order)), true) = (reserved, refused_there) {
        credits::release(&ctx.env, &identity, &order).await;
    }
    let credits = credits.filter(|_| decision.code != Code::Unavailable);
    Charged { decision, decided_at_ms, credits, limits, taken }
}

/// The key's identity, for a `VALID` decision of a key attached to one: its record (found like
/// an API's, `crate::side`), or the decision `UNAVAILABLE` when it cannot be confirmed or is
/// found nowhere (its limits and credits are unknown: fail closed).
async fn identity_of(
    ctx: &RouteContext<worker::Context>,
    record: &KeyRecord,
    request: &VerifyRequest,
    decision: Decision,
    now_ms: u64,
) -> EdgeResult<(Decision, Option<IdentityRecord>)> {
    let Some(id) = record.identity_id.as_deref().filter(|_| decision.code == Code::Valid) else {
        return Ok((decision, None));
    };
    match side::find_identity(&ctx.env, &ctx.data, id, now_ms).await? {
        Some(identity) => {
            let costs = keyward_shared::ratelimit::check_costs(&identity.ratelimits, &request.ratelimits);
            costs.map_err(|m| EdgeError::new(ErrorCode::BadRequest, m))?;
            Ok((decision, Some(identity)))
        }
        None => Ok((Decision::unavailable(), None)),
    }
}

/// The decision once the key's and its API's lists were asked about the request's client (the
/// caller's own `CF-Connecting-IP` and `cf.country` when the request has no `client`): `FORBIDDEN`
/// when either refuses it, `UNAVAILABLE` when the API's record could not be confirmed; with the
/// cap the API's record puts on the key's rate limits.
async fn lists(
    ctx: &RouteContext<worker::Context>,
    req: &Request,
    request: &VerifyRequest,
    record: &KeyRecord,
    decision: Decision,
    now_ms: u64,
) -> EdgeResult<(Decision, Cap)> {
    // The client is read (the caller's headers and `cf` are asked) only where a list exists.
    let client = || {
        let caller_ip = req.headers().get("cf-connecting-ip").ok().flatten();
        let caller_country = req.cf().and_then(|cf| cf.country());
        Client::of(request.client.as_ref(), caller_ip.as_deref(), caller_country.as_deref())
    };
    let mut known = None;
    if !record.policy.is_empty() && !record.policy.admits(known.insert(client())) {
        return Ok((decision.forbidden_unless(false), Cap::NONE));
    }
    let api = match side::find_api(&ctx.env, &ctx.data, &record.api_id, record.max_staleness_ms, now_ms).await? {
        Some(api) if api.policy.is_empty() => return Ok((decision, api.cap())),
        Some(api) => api,
        // Fail closed: the API's lists and cap could not be confirmed.
        None => return Ok((Decision::unavailable(), Cap::NONE)),
    };
    let client = known.unwrap_or_else(client);
    Ok((decision.forbidden_unless(api.policy.admits(&client)), api.cap()))
}

/// Settles the request's cost of the key's credits at its authority, idempotently, with the
/// exact limits `asks`, on record `version` or a newer one, under the API's `cap`.
async fn settle(
    ctx: &RouteContext<worker::Context>,
    hash: &KeyHash,
    (idempotency_key, request): (Option<String>, &VerifyRequest),
    asks: &[(String, u64)],
    (version, cap): (u64, Cap),
) -> (credits::Spent, Vec<(String, Grant)>) {
    let cost = request.cost.unwrap_or(1);
    let settle = SettleRequest { idempotency_key, cost, version };
    credits::settle(&ctx.env, hash, &settle, cap, asks).await
}

/// The idempotency key an identity's authority remembers a key's verification under: the
/// request's, scoped by the key (SHA-256 of both, hex: within the length an idempotency key
/// may have).
fn scoped(key: &KeyHash, idempotency_key: &str) -> String {
    KeyHash::of(&format!("{}:{idempotency_key}", key.to_hex())).to_hex()
}

/// The answer to a caller over its share of lookups without a copy.
pub(crate) fn limited() -> EdgeError {
    let message = format!(
        "this caller asked for more than {} keys a second that this location holds no copy of; retry later",
        misses::rate()
    );
    EdgeError::new(ErrorCode::CallerRateLimited, message)
}

fn refused(e: RequestError) -> EdgeError {
    let code = match e {
        RequestError::TooLarge => ErrorCode::PayloadTooLarge,
        RequestError::Invalid(_) | RequestError::TooManyPermissions(_) | RequestError::Client(_) => {
            ErrorCode::BadRequest
        }
    };
    EdgeError::new(code, e.to_string())
}
