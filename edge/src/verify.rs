//! `POST /v1/keys/verify`: authenticate the caller, parse the key, find its record, decide,
//! take its rate limits' tokens (`ratelimit.rs`) and spend its credits (`credits.rs`) when it is
//! valid in every other way, all or nothing, and keep
//! the answer's usage event for shipping (`usage.rs`), off the response path.

use keyward_shared::credits::{SettleRequest, Verdict};
use keyward_shared::policy::Client;
use keyward_shared::ratelimit::{Cap, Grant};
use keyward_shared::usage::UsageEvent;
use keyward_shared::verify::{Caller, Decision, LimitLeft, MAX_VERIFY_BODY, RequestError};
use keyward_shared::{
    Code, ErrorCode, Key, KeyHash, KeyRecord, VerifyRequest, VerifyResponse, decide, decide_unconfirmed,
};
use worker::{Date, Request, Response, RouteContext};

use crate::error::{EdgeError, EdgeResult};
use crate::misses::{self, Kind};
use crate::{auth, credits, lookup, policy, ratelimit, usage};

pub(crate) async fn handle(mut req: Request, ctx: RouteContext<worker::Context>) -> EdgeResult<Response> {
    let now_ms = Date::now().as_millis();
    let caller = auth::caller(&req, &ctx.env, &ctx.data, now_ms).await?;
    caller.scopes.require_verify().map_err(|e| EdgeError::new(ErrorCode::Forbidden, e.to_string()))?;
    let declared = req.headers().get("content-length").ok().flatten().and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_VERIFY_BODY) {
        return Err(refused(RequestError::TooLarge));
    }
    let request = VerifyRequest::from_json(&req.bytes().await?).map_err(refused)?;
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
    let charged = charge(&ctx, &hash, record.as_ref(), (decision, cap), &request, decided_at_ms).await;
    let (charged, record) = overtaken(&ctx, &req, charged, record, &hash, who, &request).await?;
    let response = VerifyResponse::new(charged.decision, record.as_ref(), Some(source))
        .decided_at(charged.decided_at_ms)
        .with_limits(charged.limits);
    match charged.credits {
        Some(remaining) => answer(response.with_credits(remaining)),
        None => answer(response),
    }
}

/// A `VALID` decided before a wait (the API's record, tokens, a credit lease, a settlement: up
/// to 2 s) is not answered on the older record when a newer copy of the key reached this
/// isolate's memory meanwhile (a signed purge, a confirmation) and refuses the request, by its
/// status or by its own or its API's lists: the answer is then the newer record's. What the
/// request took of limits and credits stays spent.
async fn overtaken(
    ctx: &RouteContext<worker::Context>,
    req: &Request,
    charged: Charged,
    record: Option<KeyRecord>,
    hash: &KeyHash,
    who: Caller<'_>,
    request: &VerifyRequest,
) -> EdgeResult<(Charged, Option<KeyRecord>)> {
    let newer = match record.as_ref().filter(|_| charged.decision.code == Code::Valid) {
        Some(found) => lookup::newer_copy(hash, found.version),
        None => None,
    };
    let Some(newer) = newer else { return Ok((charged, record)) };
    let decided_at_ms = Date::now().as_millis();
    let decision = decide(Some(&newer), hash, who, request, decided_at_ms as i64);
    let decision = match decision.code.passed_status_checks() {
        true => lists(ctx, req, request, &newer, decision, decided_at_ms).await?.0,
        false => decision,
    };
    if decision.code == Code::Valid {
        return Ok((charged, record));
    }
    Ok((Charged { decision, decided_at_ms, credits: None, limits: Vec::new() }, Some(newer)))
}

/// What a key's rate limits and credits made of a decision.
struct Charged {
    decision: Decision,
    /// When the tokens or the credit were taken, or the authority settled it (else as decided).
    decided_at_ms: u64,
    /// What remains of the credits, where the answer may say it.
    credits: Option<u64>,
    limits: Vec<LimitLeft>,
}

/// Rate limits (under the API's cap), then credits, for a `VALID` decision: only a key valid in
/// every other way spends, and one refused by any of them spends nothing on the others (tokens
/// taken here go back; with an idempotency key the exact limits and the credits are settled
/// together at the authority).
async fn charge(
    ctx: &RouteContext<worker::Context>,
    hash: &KeyHash,
    record: Option<&KeyRecord>,
    (decision, cap): (Decision, Cap),
    request: &VerifyRequest,
    decided_at_ms: u64,
) -> Charged {
    let Some(record) = record.filter(|_| decision.code == Code::Valid) else {
        return Charged { decision, decided_at_ms, credits: None, limits: Vec::new() };
    };
    let idempotent = request.idempotency_key.is_some();
    let checked = match record.ratelimits.is_empty() {
        true => None,
        false => ratelimit::check(&ctx.env, &ctx.data, hash, record, request, idempotent, cap).await,
    };
    let decision = match &checked {
        Some(c) => decision.refused_by_limits(c.code()),
        None => decision,
    };
    let mut decided_at_ms = match checked {
        Some(ratelimit::Checked::Admitted(..)) => Date::now().as_millis(),
        _ => decided_at_ms,
    };
    let asks = if idempotent { ratelimit::exact_asks(record, request) } else { Vec::new() };
    let (spent, grants) = match decision.code == Code::Valid && (record.credits.is_some() || !asks.is_empty()) {
        true => {
            let (spent, grants) = spend(ctx, hash, request, &asks, (record.version, cap), decided_at_ms).await;
            (Some(spent), grants)
        }
        false => (None, Vec::new()),
    };
    // Stamped when the credit was taken (after any wait for a lease), or as the authority
    // settled it: a refill period's spending is then counted in the period that paid for it.
    match &spent {
        Some(credits::Spent::Settled(s)) => decided_at_ms = s.decided_at_ms,
        Some(_) => decided_at_ms = Date::now().as_millis(),
        None => {}
    }
    let decision = match &spent {
        Some(credits::Spent::Settled(s)) if s.verdict == Verdict::Limited => {
            decision.refused_by_limits(Code::RateLimited)
        }
        Some(s) => decision.refused_by_credits(s.code()),
        None => decision,
    };
    let mut limits = match checked {
        Some(ratelimit::Checked::Admitted(tokens, limits)) => {
            if decision.code != Code::Valid {
                ratelimit::put_back(hash, &tokens);
            }
            limits
        }
        Some(ratelimit::Checked::Limited(limits)) => limits,
        _ => Vec::new(),
    };
    limits.extend(grants.iter().map(|(name, grant)| ratelimit::left_of(name, grant)));
    let credits = spent.and_then(|s| s.remaining()).filter(|_| decision.code != Code::Unavailable);
    Charged { decision, decided_at_ms, credits, limits }
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
    let api = match policy::find(&ctx.env, &ctx.data, &record.api_id, record.max_staleness_ms, now_ms).await? {
        policy::Found::Record(api) if api.policy.is_empty() => return Ok((decision, api.cap())),
        policy::Found::Record(api) => api,
        // Fail closed: the API's lists and cap could not be confirmed.
        policy::Found::Unconfirmed => {
            return Ok((Decision { code: Code::Unavailable, permissions_matched: Vec::new() }, Cap::NONE));
        }
    };
    let client = known.unwrap_or_else(client);
    Ok((decision.forbidden_unless(api.policy.admits(&client)), api.cap()))
}

/// Spends the request's cost of the key's credits: settled at the authority with an
/// idempotency key (with the exact limits `asks`, on record `version` or a newer one, under the
/// API's `cap`), else from this isolate's share.
async fn spend(
    ctx: &RouteContext<worker::Context>,
    hash: &KeyHash,
    request: &VerifyRequest,
    asks: &[(String, u64)],
    (version, cap): (u64, Cap),
    now_ms: u64,
) -> (credits::Spent, Vec<(String, Grant)>) {
    let cost = request.cost.unwrap_or(1);
    match &request.idempotency_key {
        Some(key) => {
            let settle = SettleRequest { idempotency_key: Some(key.clone()), cost, version };
            credits::settle(&ctx.env, hash, &settle, cap, asks).await
        }
        None => (credits::spend(&ctx.env, &ctx.data, hash, cost, now_ms).await, Vec::new()),
    }
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
