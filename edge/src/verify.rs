//! `POST /v1/keys/verify`: authenticate the caller, parse the key, find its record, decide,
//! spend its credits when it has them and is valid in every other way (`credits.rs`), and keep
//! the answer's usage event for shipping (`usage.rs`), off the response path.

use keyward_shared::credits::SettleRequest;
use keyward_shared::policy::Client;
use keyward_shared::usage::UsageEvent;
use keyward_shared::verify::{Caller, MAX_VERIFY_BODY, RequestError};
use keyward_shared::{
    Code, Decision, ErrorCode, Key, KeyHash, KeyRecord, VerifyRequest, VerifyResponse, decide, decide_unconfirmed,
};
use worker::{Date, Request, Response, RouteContext};

use crate::error::{EdgeError, EdgeResult};
use crate::misses::{self, Kind};
use crate::{auth, credits, lookup, policy, usage};

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
    // The key's and its API's allow and deny lists, before permissions' answer and credits.
    let decision = match record.as_ref().filter(|_| decision.code.passed_status_checks()) {
        Some(record) => lists(&ctx, &req, &request, record, decision, decided_at_ms).await?,
        None => decision,
    };
    // Credits come last: only a key that is valid in every other way spends.
    let spent = match record.as_ref().filter(|r| decision.code == Code::Valid && r.credits.is_some()) {
        Some(_) => Some(spend(&ctx, &hash, &request, decided_at_ms).await),
        None => None,
    };
    let decided_at_ms = match &spent {
        Some(credits::Spent::Settled(s)) => s.decided_at_ms,
        _ => decided_at_ms,
    };
    let decision = match &spent {
        Some(s) => decision.refused_by_credits(s.code()),
        None => decision,
    };
    let response = VerifyResponse::new(decision, record.as_ref(), Some(source)).decided_at(decided_at_ms);
    match spent.and_then(|s| s.remaining()) {
        Some(remaining) if response.code != Code::Unavailable => answer(response.with_credits(remaining)),
        _ => answer(response),
    }
}

/// The decision once the key's and its API's lists were asked about the request's client (the
/// caller's own `CF-Connecting-IP` and `cf.country` where the request names none): `FORBIDDEN`
/// when either refuses it, `UNAVAILABLE` when the API's record could not be confirmed.
async fn lists(
    ctx: &RouteContext<worker::Context>,
    req: &Request,
    request: &VerifyRequest,
    record: &KeyRecord,
    decision: Decision,
    now_ms: u64,
) -> EdgeResult<Decision> {
    // The client is read (the caller's headers and `cf` are asked) only where a list exists.
    let client = || {
        let named = request.client.as_ref();
        let caller_ip = req.headers().get("cf-connecting-ip").ok().flatten();
        let caller_country = req.cf().and_then(|cf| cf.country());
        Client::of(
            named.and_then(|c| c.ip.as_deref()),
            named.and_then(|c| c.country.as_deref()),
            caller_ip.as_deref(),
            caller_country.as_deref(),
        )
    };
    let mut known = None;
    if !record.policy.is_empty() && !record.policy.admits(known.insert(client())) {
        return Ok(decision.forbidden_unless(false));
    }
    let api = match policy::find(&ctx.env, &ctx.data, &record.api_id, record.max_staleness_ms, now_ms).await? {
        policy::Found::Record(api) if api.policy.is_empty() => return Ok(decision),
        policy::Found::Record(api) => api,
        // Fail closed: the API's lists could not be confirmed.
        policy::Found::Unconfirmed => return Ok(Decision { code: Code::Unavailable, permissions_matched: Vec::new() }),
    };
    let client = known.unwrap_or_else(client);
    Ok(decision.forbidden_unless(api.policy.admits(&client)))
}

/// Spends the request's cost of the key's credits: settled at the authority with an
/// idempotency key, else from this isolate's share.
async fn spend(
    ctx: &RouteContext<worker::Context>,
    hash: &KeyHash,
    request: &VerifyRequest,
    now_ms: u64,
) -> credits::Spent {
    let cost = request.cost.unwrap_or(1);
    match &request.idempotency_key {
        Some(key) => {
            let settle = SettleRequest { idempotency_key: Some(key.clone()), cost };
            credits::settle(&ctx.env, hash, &settle).await
        }
        None => credits::spend(&ctx.env, &ctx.data, hash, cost, now_ms).await,
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
