//! `POST /v1/keys/verify`: authenticate the caller, parse the key, find its record, decide,
//! take its rate limits' tokens (`ratelimit.rs`) and spend its credits (`credits.rs`) when it is
//! valid in every other way, all or nothing, and keep
//! the answer's usage event for shipping (`usage.rs`), off the response path.

use keyward_shared::credits::SettleRequest;
use keyward_shared::usage::UsageEvent;
use keyward_shared::verify::{Caller, MAX_VERIFY_BODY, RequestError};
use keyward_shared::{Code, ErrorCode, Key, KeyHash, VerifyRequest, VerifyResponse, decide, decide_unconfirmed};
use worker::{Date, Request, Response, RouteContext};

use crate::error::{EdgeError, EdgeResult};
use crate::misses::{self, Kind};
use crate::{auth, credits, lookup, ratelimit, usage};

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
    // Rate limits, then credits: only a key valid in every other way spends, and a request
    // refused by any of them spends nothing on the others.
    let checked = match record.as_ref().filter(|r| decision.code == Code::Valid && !r.ratelimits.is_empty()) {
        Some(r) => ratelimit::check(&ctx.env, &ctx.data, &hash, r, &request).await,
        None => None,
    };
    let decision = match &checked {
        Some(c) => decision.refused_by_limits(c.code()),
        None => decision,
    };
    // Admitted by its limits: decided when the tokens were taken.
    let decided_at_ms = if matches!(checked, Some(ratelimit::Checked::Admitted(..))) {
        Date::now().as_millis()
    } else {
        decided_at_ms
    };
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
    let limits = match checked {
        Some(ratelimit::Checked::Admitted(tokens, limits)) => {
            if decision.code != Code::Valid {
                ratelimit::put_back(&hash, &tokens);
            }
            limits
        }
        Some(ratelimit::Checked::Limited(limits)) => limits,
        _ => Vec::new(),
    };
    let response =
        VerifyResponse::new(decision, record.as_ref(), Some(source)).decided_at(decided_at_ms).with_limits(limits);
    match spent.and_then(|s| s.remaining()) {
        Some(remaining) if response.code != Code::Unavailable => answer(response.with_credits(remaining)),
        _ => answer(response),
    }
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
