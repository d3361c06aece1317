//! The KeyState Durable Object, one per key and one per root key: the authoritative record,
//! which cannot go stale.
//!
//! It holds the latest record in storage (never only in fields: an idle object loses its
//! memory) and replaces it only with a higher version. The edge asks it on every cache miss and
//! whenever a copy is older than `max_staleness_ms`; the control plane writes it through the
//! signed `/internal/authority` route before it answers a change.
//!
//! The read-compare-write of an update is atomic: the request body is read first, and between
//! the storage read and the storage write there is no other await, so the object's input gate
//! keeps every other request out (a retried v5 and a new v6 cannot both see v4).

use keyward_shared::freshness::AuthorityAnswer;
use keyward_shared::internal::{AUTHORITY_PATH, AuthorityAck, AuthorityUpdate};
use keyward_shared::record::RecordError;
use keyward_shared::{ErrorCode, KeyHash, KeyRecord, RootKeyRecord};
use serde::Deserialize;
use worker::{
    Date, DurableObject, Env, Method, Request, RequestInit, Response, Result, RouteContext, State, console_error,
    console_warn, durable_object,
};

use crate::error::{EdgeError, EdgeResult};
use crate::{deadline, signed};

/// The Durable Object namespace binding.
pub(crate) const KEY_STATE_BINDING: &str = "KEY_STATE";
const RECORD: &str = "record";

/// The one field the object reads of the record it holds.
#[derive(Deserialize)]
struct Versioned {
    version: u64,
}

fn version_of(text: &str) -> Result<u64> {
    serde_json::from_str::<Versioned>(text).map(|v| v.version).map_err(|e| worker::Error::RustError(e.to_string()))
}

thread_local! {
    /// Reads the KeyState objects in this isolate answered (shown by `/internal/stats`).
    static READS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many reads the KeyState objects this isolate hosts have answered.
pub(crate) fn reads_answered() -> u64 {
    READS.get()
}

#[durable_object]
pub struct KeyState {
    state: State,
}

impl DurableObject for KeyState {
    fn new(state: State, _env: Env) -> Self {
        KeyState { state }
    }

    /// `GET`: the record held (200 with its JSON) or none (404). `PUT` with a record: keeps it
    /// if its version is higher than the one held; answers the record held afterwards.
    async fn fetch(&self, mut req: Request) -> Result<Response> {
        let incoming = if req.method() == Method::Put { Some(req.text().await?) } else { None };
        if incoming.is_none() {
            READS.set(READS.get() + 1);
        }
        let storage = self.state.storage();
        // Stored as JSON text so that 64-bit versions survive the JS boundary exactly.
        let held: Option<String> = storage.get(RECORD).await?;
        let held = match incoming {
            Some(text) if held.as_deref().map(version_of).transpose()? < Some(version_of(&text)?) => {
                storage.put(RECORD, &text).await?;
                Some(text)
            }
            _ => held,
        };
        match held {
            Some(text) => Response::ok(text),
            None => Response::error("no record", 404),
        }
    }
}

/// The authority could not be asked (the home of the objects is down, hangs, or failed).
pub(crate) struct Unreachable(pub String);

/// The object's name: a key's hash, or `root:` and a root key's hash.
fn object_name(hash: &KeyHash, root: bool) -> String {
    if root { format!("root:{}", hash.to_hex()) } else { hash.to_hex() }
}

async fn call(env: &Env, name: &str, request: Request) -> std::result::Result<Option<String>, Unreachable> {
    let stub = env
        .durable_object(KEY_STATE_BINDING)
        .and_then(|ns| ns.get_by_name(name))
        .map_err(|e| Unreachable(e.to_string()))?;
    let mut response = stub.fetch_with_request(request).await.map_err(|e| Unreachable(e.to_string()))?;
    match response.status_code() {
        200 => response.text().await.map(Some).map_err(|e| Unreachable(e.to_string())),
        404 => Ok(None),
        status => {
            let text = response.text().await.unwrap_or_default();
            Err(Unreachable(format!("authority answered {status}: {text}")))
        }
    }
}

async fn read_text(env: &Env, name: &str) -> std::result::Result<Option<String>, Unreachable> {
    let ms = deadline::authority_ms(env);
    let request =
        Request::new("https://key-state.internal/record", Method::Get).map_err(|e| Unreachable(e.to_string()))?;
    deadline::within(ms, call(env, name, request))
        .await
        .unwrap_or_else(|| Err(Unreachable(format!("no answer within {ms} ms"))))
}

/// What the authority answered: the record it holds, none, or no answer within its deadline
/// (logged, with the reason).
fn answer<R>(
    held: std::result::Result<Option<String>, Unreachable>,
    parse: fn(&str) -> std::result::Result<R, RecordError>,
) -> AuthorityAnswer<R> {
    let parsed = held.and_then(|text| text.map(|t| parse(&t).map_err(|e| Unreachable(e.to_string()))).transpose());
    match parsed {
        Ok(Some(record)) => AuthorityAnswer::Holds(record),
        Ok(None) => AuthorityAnswer::Unknown,
        Err(Unreachable(e)) => {
            console_warn!("authority unreachable: {e}");
            AuthorityAnswer::Unreachable
        }
    }
}

/// The authority's answer for a key.
pub(crate) async fn read(env: &Env, hash: &KeyHash) -> AuthorityAnswer<KeyRecord> {
    answer(read_text(env, &object_name(hash, false)).await, KeyRecord::from_json)
}

/// The authority's answer for a root key.
pub(crate) async fn read_root(env: &Env, hash: &KeyHash) -> AuthorityAnswer<RootKeyRecord> {
    answer(read_text(env, &object_name(hash, true)).await, RootKeyRecord::from_json)
}

async fn write(env: &Env, name: &str, text: String) -> std::result::Result<u64, Unreachable> {
    let mut init = RequestInit::new();
    init.with_method(Method::Put).with_body(Some(text.into()));
    let request =
        Request::new_with_init("https://key-state.internal/record", &init).map_err(|e| Unreachable(e.to_string()))?;
    let held = call(env, name, request).await?;
    held.map_or(Ok(0), |t| version_of(&t).map_err(|e| Unreachable(e.to_string())))
}

/// `POST /internal/authority`: the control plane's signed update of keys' and root keys'
/// authoritative records. The nonce is checked before anything is written.
pub(crate) async fn handle(mut req: Request, ctx: RouteContext<worker::Context>) -> EdgeResult<Response> {
    let now_ms = Date::now().as_millis();
    let update = signed::parse::<AuthorityUpdate>(&mut req, &ctx.env, AUTHORITY_PATH, now_ms).await?.body;
    let mut writes = Vec::with_capacity(update.records.len() + update.root_keys.len());
    for record in &update.records {
        writes.push((object_name(&record.hash, false), serde_json::to_string(record)?));
    }
    for root in &update.root_keys {
        writes.push((object_name(&root.hash, true), serde_json::to_string(root)?));
    }
    let written = futures::future::join_all(writes.into_iter().map(|(name, text)| {
        let env = &ctx.env;
        async move { write(env, &name, text).await }
    }))
    .await;
    let mut versions = Vec::with_capacity(written.len());
    for held in written {
        match held {
            Ok(version) => versions.push(version),
            Err(Unreachable(e)) => {
                console_error!("authority write failed: {e}");
                let message = "the key's authority could not be written; retry";
                return Err(EdgeError::new(ErrorCode::AuthorityUnavailable, message));
            }
        }
    }
    Ok(Response::from_json(&AuthorityAck { versions })?)
}
