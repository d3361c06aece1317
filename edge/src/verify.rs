//! `POST /v1/keys/verify`: authenticate the caller, parse the key, find its record, decide.

use keyward_shared::verify::Caller;
use keyward_shared::{Code, Key, VerifyRequest, VerifyResponse, decide};
use worker::{Date, Request, Response, Result, RouteContext, console_error};

use crate::auth::{self, AuthError};
use crate::{error, lookup};

/// Largest verify request body accepted.
const MAX_BODY: usize = 4 * 1024;

pub(crate) async fn handle(mut req: Request, ctx: RouteContext<worker::Context>) -> Result<Response> {
    let now_ms = Date::now().as_millis();
    let caller = match auth::caller(&req, &ctx.env, &ctx.data, now_ms).await {
        Ok(caller) => caller,
        Err(AuthError::Missing) => {
            return error::respond(401, "UNAUTHORIZED", "send `Authorization: Bearer <root key with a verify scope>`");
        }
        Err(AuthError::Invalid) => {
            return error::respond(401, "UNAUTHORIZED", "the root key is not valid here");
        }
        Err(AuthError::Unavailable) => {
            return error::respond(503, "UNAVAILABLE", "the root key could not be confirmed in time; retry");
        }
        Err(AuthError::Internal(detail)) => {
            console_error!("root key lookup failed: {detail}");
            return error::respond(500, "INTERNAL", "internal error; try again");
        }
    };
    if !caller.scopes.can_verify_somewhere() {
        return error::respond(403, "FORBIDDEN", "this root key has no `api.<id|*>.verify_key` scope");
    }
    let declared = req.headers().get("content-length").ok().flatten().and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return too_large();
    }
    let body = req.bytes().await?;
    if body.len() > MAX_BODY {
        return too_large();
    }
    let request: VerifyRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return error::respond(400, "BAD_REQUEST", &format!("invalid verify request: {e}"));
        }
    };
    let Ok(key) = Key::parse(&request.key) else {
        return Response::from_json(&VerifyResponse::malformed());
    };
    let hash = key.hash();
    let caller = Caller { workspace_id: &caller.workspace_id, scopes: &caller.scopes };
    let (record, source) = match lookup::find(&ctx.env, &hash, now_ms).await? {
        lookup::Found::Record(record, source) => (record, source),
        lookup::Found::Unconfirmed(stale, source) => {
            // Only a caller who may see the key learns that it cannot be confirmed now; to anyone
            // else it does not exist (workspace, API and hash never change, so the stale copy
            // answers that correctly).
            let decision = decide(Some(&stale), &hash, caller, &request, now_ms as i64);
            if decision.code == Code::NotFound {
                return Response::from_json(&VerifyResponse::new(decision, None, Some(source)));
            }
            return Response::from_json(&VerifyResponse::unavailable(source));
        }
    };
    let decision = decide(record.as_ref(), &hash, caller, &request, now_ms as i64);
    Response::from_json(&VerifyResponse::new(decision, record.as_ref(), Some(source)))
}

fn too_large() -> Result<Response> {
    error::respond(413, "PAYLOAD_TOO_LARGE", &format!("a verify request is at most {MAX_BODY} bytes"))
}
