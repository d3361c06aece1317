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
//!
//! A key with credits also has its [`Ledger`] here, next to its record: a record update applies
//! the credits it carries in the same step, and lease and settle requests (`crate::credits`)
//! read the record and the ledger and write the ledger the same way, so a revoked or disabled
//! key's leases are void in the one place that grants them.
//!
//! An identity's object (named by the hex of `IdentityRecord::hash_of`, as a key's is by its
//! hash) holds the identity's record and serves its credits and exact limits with the same
//! code: what the object holds is a [`Spender`], a key's record or an identity's.

use keyward_shared::credits::{self, Credits, LeaseAnswer, Ledger, Settlement, Verdict, text};
use keyward_shared::freshness::AuthorityAnswer;
use keyward_shared::identity::{IdentityRecord, Spender};
use keyward_shared::internal::{AUTHORITY_PATH, AuthorityAck, AuthorityUpdate};
use keyward_shared::policy::ApiRecord;
use keyward_shared::ratelimit;
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
const LEDGER: &str = "ledger";
/// The object's path for a holder's lease request ([`LeaseRequest`]).
pub(crate) const LEASE_PATH: &str = "/lease";
/// The object's path for a verification settled here ([`SettleRequest`]).
pub(crate) const SETTLE_PATH: &str = "/settle";
/// The object's path for giving back an idempotent settlement's credits (`cost key`):
/// [`credits::Ledger::release`].
pub(crate) const RELEASE_PATH: &str = "/release";

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
    /// Lease, settle and rate-limit token requests the KeyState objects in this isolate answered.
    static CREDIT_CALLS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many lease and settle requests the KeyState objects this isolate hosts have answered.
pub(crate) fn credit_calls_answered() -> u64 {
    CREDIT_CALLS.get()
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
    /// if its version is higher than the one held (applying its credits to the ledger);
    /// answers the record held afterwards. `POST` to [`LEASE_PATH`] or [`SETTLE_PATH`]: the
    /// credits' lease or settlement; to [`crate::ratelimit::RATELIMIT_PATH`], an exact rate
    /// limit's tokens (404 without a record).
    async fn fetch(&self, mut req: Request) -> Result<Response> {
        if req.method() == Method::Post {
            let path = req.path();
            let body = req.text().await?;
            CREDIT_CALLS.set(CREDIT_CALLS.get() + 1);
            if path == crate::ratelimit::RATELIMIT_PATH {
                let storage = self.state.storage();
                let held: Option<String> = storage.get(RECORD).await?;
                let record = held.as_deref().and_then(|t| Spender::from_json(t).ok());
                return crate::ratelimit::grant(&storage, record, &body).await;
            }
            return self.credits(&path, &body).await;
        }
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
                self.apply_credits(&text).await?;
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

impl KeyState {
    /// Applies a newly held record's credits to the ledger (a key's or an identity's; root keys
    /// and APIs have none).
    async fn apply_credits(&self, text: &str) -> Result<()> {
        let Ok(record) = Spender::from_json(text) else {
            return Ok(());
        };
        let Some(credits) = record.credits() else {
            return Ok(());
        };
        let storage = self.state.storage();
        let mut ledger = load_ledger(storage.get(LEDGER).await?)?;
        let now = Date::now().as_millis() as i64;
        ledger.apply(ledger_key(&record, credits, now), now);
        storage.put(LEDGER, text::ledger(&ledger)).await
    }

    /// A lease or a settlement, by path: reads the record and the ledger, answers, and stores
    /// the ledger, with no other await between.
    async fn credits(&self, path: &str, body: &str) -> Result<Response> {
        let storage = self.state.storage();
        let held: Option<String> = storage.get(RECORD).await?;
        let Some(record) = held.as_deref().and_then(|t| Spender::from_json(t).ok()) else {
            return Response::error("no record", 404);
        };
        let now = Date::now().as_millis() as i64;
        if path == RELEASE_PATH {
            return self.release(&record, body, now).await;
        }
        if path != LEASE_PATH {
            return self.settle(&record, body, now).await;
        }
        let Some(credits) = record.credits() else {
            let unlimited = LeaseAnswer { lease: 0, granted: 0, ttl_ms: 0, remaining: 0, verdict: Verdict::Unlimited };
            return Response::ok(text::lease_answer(&unlimited));
        };
        let mut ledger = load_ledger(storage.get(LEDGER).await?)?;
        let key = ledger_key(&record, credits, now);
        let request = text::read_lease_request(body).ok_or_else(|| not_a_request(body))?;
        let answer = text::lease_answer(&ledger.lease(key, &request, now));
        storage.put(LEDGER, text::ledger(&ledger)).await?;
        Response::ok(answer)
    }

    /// Gives back an idempotent settlement's credits (the body: its idempotency key): `1` if
    /// given back now, `0` if not (unknown, not granted, given back before, or under another set
    /// or refill period). What is given back is the settlement's own remembered cost.
    async fn release(&self, record: &Spender, body: &str, now: i64) -> Result<Response> {
        let storage = self.state.storage();
        if !credits::is_idempotency_key(body) {
            return Err(not_a_request(body));
        }
        let Some(credits) = record.credits() else { return Response::ok("0") };
        let mut ledger = load_ledger(storage.get(LEDGER).await?)?;
        ledger.apply(ledger_key(record, credits, now), now);
        let released = ledger.release(body);
        storage.put(LEDGER, text::ledger(&ledger)).await?;
        Response::ok(if released { "1" } else { "0" })
    }

    /// A verification settled here: its exact rate limits reserved, then its credits settled,
    /// then the limits committed only if the credits granted it (all or nothing, in one step of
    /// the object). A remembered idempotent settlement is answered again, spending nothing.
    async fn settle(&self, record: &Spender, body: &str, now: i64) -> Result<Response> {
        let storage = self.state.storage();
        let (first, cap, asks) = ratelimit::text::read_settle_request(body).ok_or_else(|| not_a_request(body))?;
        let request = text::read_settle_request(first).ok_or_else(|| not_a_request(body))?;
        if request.version > record.version() {
            // The asker decided on a change this object has not received (a lowered balance or
            // limit, a revocation): settling on the older record could spend past it.
            let void = Settlement { verdict: Verdict::Void, remaining: 0, decided_at_ms: now.max(0) as u64 };
            return Response::ok(ratelimit::text::settled(&text::settlement(&void), &[]));
        }
        let cap = match asks.is_empty() {
            true => ratelimit::Cap::NONE,
            false => crate::ratelimit::kept_cap(&storage, cap).await?,
        };
        let mut ledger = match record.credits() {
            Some(_) => Some(load_ledger(storage.get(LEDGER).await?)?),
            None => None,
        };
        let known = ledger.as_ref().zip(request.idempotency_key.as_deref()).and_then(|(l, k)| l.remembered(k));
        if let Some(settlement) = known {
            return Response::ok(text::settlement(&settlement));
        }
        // A key without credits remembers its idempotent settlements beside its limits.
        let idempotent_limits_only = request.idempotency_key.as_deref().filter(|_| ledger.is_none());
        let mut memory = Vec::new();
        if let Some(key) = idempotent_limits_only {
            memory = crate::ratelimit::remembered(&storage).await?;
            if let Some((_, settlement)) = memory.iter().find(|(k, _)| k == key) {
                return Response::ok(text::settlement(settlement));
            }
        }
        let usable = record.is_usable(now);
        let limits = cap.apply_all(record.ratelimits());
        let reserved = crate::ratelimit::reserve(&storage, &limits, if usable { &asks } else { &[] }, now).await?;
        let decided_at_ms = now.max(0) as u64;
        let settlement = match (&mut ledger, record.credits()) {
            _ if reserved.unknown => Settlement { verdict: Verdict::Void, remaining: 0, decided_at_ms },
            _ if !reserved.admitted => Settlement { verdict: Verdict::Limited, remaining: 0, decided_at_ms },
            (Some(ledger), Some(credits)) => {
                let settlement = ledger.settle(ledger_key(record, credits, now), &request, now);
                storage.put(LEDGER, text::ledger(ledger)).await?;
                settlement
            }
            _ => {
                let verdict = if usable { Verdict::Unlimited } else { Verdict::Void };
                Settlement { verdict, remaining: 0, decided_at_ms }
            }
        };
        if matches!(settlement.verdict, Verdict::Granted | Verdict::Unlimited) && !reserved.grants.is_empty() {
            crate::ratelimit::commit(&storage, &reserved.schedules).await?;
        }
        // A refusal by the limits is remembered by the ledger too: a retry is answered alike
        // (and only a remembered refusal may release what an identity reserved for it).
        if let (Some(ledger), Some(key), Verdict::Limited) =
            (&mut ledger, request.idempotency_key.as_deref(), settlement.verdict)
        {
            ledger.remember(key, settlement);
            storage.put(LEDGER, text::ledger(ledger)).await?;
        }
        if let Some(key) =
            idempotent_limits_only.filter(|_| matches!(settlement.verdict, Verdict::Unlimited | Verdict::Limited))
        {
            crate::ratelimit::remember(&storage, memory, key, settlement, now).await?;
        }
        Response::ok(ratelimit::text::settled(&text::settlement(&settlement), &reserved.grants))
    }
}

fn not_a_request(body: &str) -> worker::Error {
    worker::Error::RustError(format!("not a credits request: {body}"))
}

/// The ledger held (stored as [`text::ledger`], so 64-bit numbers survive the JS boundary), or
/// a new one.
fn load_ledger(stored: Option<String>) -> Result<Ledger> {
    match stored {
        None => Ok(Ledger::default()),
        Some(t) => text::read_ledger(&t).ok_or_else(|| worker::Error::RustError("unreadable ledger".into())),
    }
}

/// What the ledger needs to know of the key or identity.
fn ledger_key<'a>(record: &Spender, credits: &'a Credits, now_ms: i64) -> credits::Key<'a> {
    credits::Key { credits, created_at_ms: record.created_at(), usable: record.is_usable(now_ms) }
}

/// The authority could not be asked (the home of the objects is down, hangs, or failed).
pub(crate) struct Unreachable(pub String);

/// The object's name: a key's hash, or `root:` and a root key's hash.
pub(crate) fn object_name(hash: &KeyHash, root: bool) -> String {
    if root { format!("root:{}", hash.to_hex()) } else { hash.to_hex() }
}

pub(crate) async fn call(env: &Env, name: &str, request: Request) -> std::result::Result<Option<String>, Unreachable> {
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

/// The authority's answer for a side record (an API's, in object `api:<hash>`; an identity's,
/// in the object named by the hex of [`IdentityRecord::hash_of`], like a key's), read by `parse`.
pub(crate) async fn read_side<R>(
    env: &Env,
    name: &str,
    parse: fn(&str) -> std::result::Result<R, RecordError>,
) -> AuthorityAnswer<R> {
    answer(read_text(env, name).await, parse)
}

/// An API record's object name: `api:` and the hash of `api:<id>` ([`ApiRecord::hash_of`]).
pub(crate) fn api_object_name(hash: &KeyHash) -> String {
    format!("api:{}", hash.to_hex())
}

/// The authority's answer for a root key.
pub(crate) async fn read_root(env: &Env, hash: &KeyHash) -> AuthorityAnswer<RootKeyRecord> {
    answer(read_text(env, &object_name(hash, true)).await, RootKeyRecord::from_json)
}

/// Writes one record to its object, within [`deadline::MAX_AUTHORITY_MS`]: under the control
/// plane's own 3 s for the whole update, so that a stuck object is answered as unreachable (and
/// retried) by this route rather than left to the caller's timeout.
async fn write(env: &Env, name: &str, text: String) -> std::result::Result<u64, Unreachable> {
    let mut init = RequestInit::new();
    init.with_method(Method::Put).with_body(Some(text.into()));
    let request =
        Request::new_with_init("https://key-state.internal/record", &init).map_err(|e| Unreachable(e.to_string()))?;
    let ms = deadline::MAX_AUTHORITY_MS;
    let held = deadline::within(ms, call(env, name, request))
        .await
        .ok_or_else(|| Unreachable(format!("no answer within {ms} ms")))??;
    held.map_or(Ok(0), |t| version_of(&t).map_err(|e| Unreachable(e.to_string())))
}

/// `POST /internal/authority`: the control plane's signed update of keys' and root keys'
/// authoritative records. The nonce is checked before anything is written.
pub(crate) async fn handle(mut req: Request, ctx: RouteContext<worker::Context>) -> EdgeResult<Response> {
    let now_ms = Date::now().as_millis();
    let update = signed::parse::<AuthorityUpdate>(&mut req, &ctx.env, AUTHORITY_PATH, now_ms).await?.body;
    let mut writes = Vec::with_capacity(update.records.len() + update.root_keys.len() + update.apis.len() + 1);
    for record in &update.records {
        writes.push((object_name(&record.hash, false), serde_json::to_string(record)?));
    }
    for root in &update.root_keys {
        writes.push((object_name(&root.hash, true), serde_json::to_string(root)?));
    }
    for text in update.apis {
        let api = ApiRecord::from_json(&text).map_err(|e| EdgeError::new(ErrorCode::BadRequest, e.to_string()))?;
        writes.push((api_object_name(&ApiRecord::hash_of(&api.id)), text));
    }
    for text in update.identities {
        let identity =
            IdentityRecord::from_json(&text).map_err(|e| EdgeError::new(ErrorCode::BadRequest, e.to_string()))?;
        writes.push((object_name(&IdentityRecord::hash_of(&identity.id), false), text));
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
