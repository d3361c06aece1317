//! The KeyState Durable Object, one per key: the authoritative record, which cannot go stale.
//!
//! It holds the key's latest record in storage (never only in fields: an idle object loses its
//! memory) and replaces it only with a higher version. The edge asks it on every cache miss and
//! whenever a copy is older than `max_staleness_ms`; the control plane writes it through the
//! signed `/internal/authority` route before it answers a change.

use keyward_shared::internal::{AUTHORITY_PATH, AuthorityAck, AuthorityUpdate};
use keyward_shared::{KeyHash, KeyRecord};
use serde::{Deserialize, Serialize};
use worker::{
    Date, DurableObject, Env, Method, Request, RequestInit, Response, Result, RouteContext, State, console_error,
    durable_object,
};

use crate::{error, signed};

/// The Durable Object namespace binding.
pub(crate) const KEY_STATE_BINDING: &str = "KEY_STATE";
const RECORD: &str = "record";

/// What the object answers: the record it holds, if any.
#[derive(Serialize, Deserialize)]
struct Held {
    record: Option<KeyRecord>,
}

#[durable_object]
pub struct KeyState {
    state: State,
}

impl DurableObject for KeyState {
    fn new(state: State, _env: Env) -> Self {
        KeyState { state }
    }

    async fn fetch(&self, mut req: Request) -> Result<Response> {
        let storage = self.state.storage();
        // Stored as JSON text so that 64-bit versions survive the JS boundary exactly.
        let held: Option<KeyRecord> = match storage.get::<String>(RECORD).await? {
            Some(text) => Some(KeyRecord::from_json(&text).map_err(|e| worker::Error::RustError(e.to_string()))?),
            None => None,
        };
        if req.method() != Method::Put {
            return Response::from_json(&Held { record: held });
        }
        let incoming: KeyRecord = req.json().await?;
        if held.as_ref().is_some_and(|h| h.version >= incoming.version) {
            return Response::from_json(&Held { record: held });
        }
        let text = serde_json::to_string(&incoming)?;
        storage.put(RECORD, text).await?;
        Response::from_json(&Held { record: Some(incoming) })
    }
}

/// The authority could not be asked (the home of the objects is down, or it failed).
pub(crate) struct Unreachable(pub String);

fn stub(env: &Env, hash: &KeyHash) -> Result<worker::Stub> {
    env.durable_object(KEY_STATE_BINDING)?.get_by_name(&hash.to_hex())
}

async fn call(env: &Env, hash: &KeyHash, request: Request) -> std::result::Result<Option<KeyRecord>, Unreachable> {
    let unreachable = |e: String| Unreachable(e);
    let mut response = stub(env, hash)
        .map_err(|e| unreachable(e.to_string()))?
        .fetch_with_request(request)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    if response.status_code() != 200 {
        let text = response.text().await.unwrap_or_default();
        return Err(unreachable(format!("authority answered {}: {text}", response.status_code())));
    }
    let held: Held = response.json().await.map_err(|e| unreachable(e.to_string()))?;
    Ok(held.record)
}

/// The authoritative record of a key, if the authority has one.
pub(crate) async fn read(env: &Env, hash: &KeyHash) -> std::result::Result<Option<KeyRecord>, Unreachable> {
    let request =
        Request::new("https://key-state.internal/record", Method::Get).map_err(|e| Unreachable(e.to_string()))?;
    call(env, hash, request).await
}

async fn write(env: &Env, record: &KeyRecord) -> std::result::Result<Option<KeyRecord>, Unreachable> {
    let body = serde_json::to_string(record).map_err(|e| Unreachable(e.to_string()))?;
    let mut init = RequestInit::new();
    init.with_method(Method::Put).with_body(Some(body.into()));
    let request =
        Request::new_with_init("https://key-state.internal/record", &init).map_err(|e| Unreachable(e.to_string()))?;
    call(env, &record.hash, request).await
}

/// `POST /internal/authority`: the control plane's signed update of keys' authoritative records.
pub(crate) async fn handle(mut req: Request, ctx: RouteContext<()>) -> Result<Response> {
    let now_ms = Date::now().as_millis();
    let (update, nonce) = match signed::parse::<AuthorityUpdate>(&mut req, &ctx.env, AUTHORITY_PATH, now_ms).await? {
        Ok(signed) => (signed.body, signed.nonce),
        Err(refusal) => return Ok(refusal),
    };
    let writes = futures::future::join_all(update.records.iter().map(|record| write(&ctx.env, record)));
    let (first_use, written) = futures::join!(signed::first_use(&nonce, now_ms), writes);
    if !first_use? {
        return signed::replayed();
    }
    let mut versions = Vec::with_capacity(written.len());
    for held in written {
        match held {
            Ok(held) => versions.push(held.map_or(0, |h| h.version)),
            Err(Unreachable(e)) => {
                console_error!("authority write failed: {e}");
                return error::respond(503, "AUTHORITY_UNAVAILABLE", "the key's authority could not be written; retry");
            }
        }
    }
    Response::from_json(&AuthorityAck { versions })
}
