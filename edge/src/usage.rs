//! Usage events at the edge: each verification's event is kept in this isolate's
//! [`UsageBuffer`] and shipped, off the response path, to the control plane's signed
//! `POST /internal/usage` (`USAGE_URL`).
//!
//! The first request that leaves events behind starts one shipping loop in its `wait_until`;
//! the loop ships whenever a batch is due (at least every 2 s while events are held, at once at
//! 500) and ends when the buffer is empty, or after [`LOOP_MS`] (the next request starts
//! another). A batch that is not acknowledged stays and is sent again, unchanged, so the
//! control plane stores it once; one the control plane refuses as invalid is given up, and
//! shows there as a missing batch. `USAGE_SHIPPING=off` turns recording and shipping off at run
//! time, for comparison; without `USAGE_URL` nothing is recorded.

use std::cell::{Cell, RefCell};
use std::time::Duration;

use keyward_shared::internal::{self, NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use keyward_shared::usage::{Answered, USAGE_PATH, UsageAck, UsageBatch, UsageBuffer, UsageEvent};
use worker::{Context, Date, Delay, Env, Fetch, Headers, Method, Request, RequestInit, console_error};

use crate::{PURGE_SECRET, REGION_VAR, deadline};

/// The longest one shipping loop runs inside a request's `wait_until`.
const LOOP_MS: u64 = 20_000;
/// A loop that started this long ago has ended, whether or not it said so.
const LOOP_STALE_MS: u64 = LOOP_MS + SEND_MS + MAX_BACKOFF_MS + 1_000;
/// How often the loop looks at the buffer.
const TICK_MS: u64 = 250;
/// How long a batch's delivery may take before it counts as failed (and is sent again).
const SEND_MS: u64 = 5_000;
/// A batch unacknowledged this long after it was first sent is given up (the control plane
/// then counts it as missing); `USAGE_GIVE_UP_MS` changes it.
const GIVE_UP_MS: u64 = 30_000;
/// Waits between failed sends: from this, doubling, up to [`MAX_BACKOFF_MS`].
const FIRST_BACKOFF_MS: u64 = 250;
const MAX_BACKOFF_MS: u64 = 4_000;

thread_local! {
    static BUFFER: RefCell<Option<UsageBuffer>> = const { RefCell::new(None) };
    /// When this isolate's shipping loop started, while one runs.
    static SHIPPING: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Where this isolate ships to, when it records at all.
pub(crate) fn destination(env: &Env) -> Option<String> {
    if env.var("USAGE_SHIPPING").is_ok_and(|v| v.to_string() == "off") {
        return None;
    }
    env.var("USAGE_URL").ok().map(|v| v.to_string()).filter(|url| !url.is_empty())
}

/// The region events name: `REGION` where it is set (each local region's name), else the
/// location that answered (`cf.colo`, in production, where one deployment runs everywhere).
pub(crate) fn region(env: &Env, req: &Request) -> String {
    let named = env.var(REGION_VAR).map(|v| v.to_string()).ok().filter(|r| !r.is_empty());
    named.or_else(|| req.cf().map(|cf| cf.colo()).filter(|c| !c.is_empty())).unwrap_or_else(|| "unknown".into())
}

/// The event of an answered verification, from the request's headers: its request id
/// (`x-request-id` when usable, else `cf-ray`, else a new one), the caller's address
/// (`cf-connecting-ip`) and user agent.
pub(crate) fn answered<'a>(req: &Request, workspace_id: &'a str, region: &'a str, now_ms: u64) -> Answered<'a> {
    let header = |name: &str| req.headers().get(name).ok().flatten().filter(|v| !v.is_empty());
    let request_id = header("x-request-id")
        .filter(|id| id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
        .or_else(|| header("cf-ray"))
        .unwrap_or_else(|| format!("req_{}", random_hex(12)));
    Answered {
        at_ms: now_ms,
        request_id,
        workspace_id,
        region,
        caller_ip: header("cf-connecting-ip"),
        user_agent: header("user-agent"),
    }
}

/// Keeps an event and makes sure a shipping loop runs.
pub(crate) fn record(env: &Env, ctx: &Context, url: String, event: UsageEvent) {
    let now = Date::now().as_millis();
    BUFFER.with(|b| {
        let mut buffer = b.borrow_mut();
        let region = event.region.clone();
        buffer.get_or_insert_with(|| UsageBuffer::new(holder_id(), region, now)).push(event);
    });
    // A loop the runtime cancelled (its `wait_until` outlived the request's allowance) never
    // clears its start: past [`LOOP_STALE_MS`] it counts as gone, and a new one starts.
    let running = SHIPPING.with(|s| s.get()).is_some_and(|at| now.saturating_sub(at) < LOOP_STALE_MS);
    if running {
        return;
    }
    SHIPPING.with(|s| s.set(Some(now)));
    let env = env.clone();
    ctx.wait_until(async move {
        ship_until_empty(&env, &url).await;
        SHIPPING.with(|s| s.set(None));
    });
}

async fn ship_until_empty(env: &Env, url: &str) {
    let started = Date::now().as_millis();
    let give_up_ms = env.var("USAGE_GIVE_UP_MS").ok().and_then(|v| v.to_string().parse().ok()).unwrap_or(GIVE_UP_MS);
    let mut backoff_ms = FIRST_BACKOFF_MS;
    loop {
        let now = Date::now().as_millis();
        if now.saturating_sub(started) >= LOOP_MS {
            return;
        }
        let (holding, batch) = BUFFER.with(|b| {
            let mut b = b.borrow_mut();
            let Some(buffer) = b.as_mut() else { return (0, None) };
            let batch = if buffer.due(now) { buffer.batch(now) } else { None };
            (buffer.holding(), batch)
        });
        let Some(batch) = batch else {
            if holding == 0 {
                return;
            }
            Delay::from(Duration::from_millis(TICK_MS)).await;
            continue;
        };
        // When the batch was first sent, by whichever loop: kept by the buffer across loops.
        let since = BUFFER.with(|b| b.borrow().as_ref().and_then(UsageBuffer::in_flight)).map_or(now, |(_, at)| at);
        match send(env, url, &batch).await {
            Sent::Acknowledged(seq) => {
                let now = Date::now().as_millis();
                BUFFER.with(|b| b.borrow_mut().as_mut().map(|buffer| buffer.acknowledged(seq, now)));
                backoff_ms = FIRST_BACKOFF_MS;
            }
            Sent::Refused(seq) => abandon(seq),
            Sent::Failed if Date::now().as_millis().saturating_sub(since) >= give_up_ms => {
                console_error!("usage batch {} given up after {give_up_ms} ms unacknowledged", batch.seq);
                abandon(batch.seq);
            }
            Sent::Failed => {
                Delay::from(Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(MAX_BACKOFF_MS);
            }
        }
    }
}

fn abandon(seq: u64) {
    let now = Date::now().as_millis();
    BUFFER.with(|b| b.borrow_mut().as_mut().map(|buffer| buffer.abandon(seq, now)));
}

enum Sent {
    Acknowledged(u64),
    /// The control plane refused the batch as invalid: sending it again cannot help.
    Refused(u64),
    Failed,
}

async fn send(env: &Env, url: &str, batch: &UsageBatch) -> Sent {
    match deadline::within(SEND_MS, post(env, url, batch)).await {
        Some(Ok(sent)) => sent,
        Some(Err(e)) => {
            console_error!("usage batch {} not delivered: {e}; will retry", batch.seq);
            Sent::Failed
        }
        None => {
            console_error!("usage batch {} not acknowledged within {SEND_MS} ms; will retry", batch.seq);
            Sent::Failed
        }
    }
}

async fn post(env: &Env, url: &str, batch: &UsageBatch) -> worker::Result<Sent> {
    let secret = env.secret(PURGE_SECRET)?.to_string();
    let body = serde_json::to_vec(batch)?;
    let timestamp = Date::now().as_millis() as i64;
    let nonce = random_hex(16);
    let signature = internal::sign(secret.as_bytes(), "POST", USAGE_PATH, timestamp, &nonce, &body);
    let headers = Headers::new();
    headers.set("content-type", "application/json")?;
    headers.set(TIMESTAMP_HEADER, &timestamp.to_string())?;
    headers.set(NONCE_HEADER, &nonce)?;
    headers.set(SIGNATURE_HEADER, &signature)?;
    let mut init = RequestInit::new();
    init.with_method(Method::Post).with_headers(headers).with_body(Some(body.into()));
    let request = Request::new_with_init(&format!("{}{USAGE_PATH}", url.trim_end_matches('/')), &init)?;
    let mut response = Fetch::Request(request).send().await?;
    match response.status_code() {
        200 => Ok(Sent::Acknowledged(response.json::<UsageAck>().await?.seq)),
        400 => {
            console_error!(
                "usage batch {} refused as invalid: {}",
                batch.seq,
                response.text().await.unwrap_or_default()
            );
            Ok(Sent::Refused(batch.seq))
        }
        status => Err(worker::Error::RustError(format!("the control plane answered {status}"))),
    }
}

/// A holder id for this isolate's lifetime.
fn holder_id() -> String {
    format!("iso-{}", random_hex(12))
}

fn random_hex(bytes: usize) -> String {
    let mut random = vec![0u8; bytes];
    if getrandom::fill(&mut random).is_err() {
        // Without randomness, time still tells isolates apart well enough to number batches.
        return format!("{:032x}", Date::now().as_millis());
    }
    random.iter().map(|b| format!("{b:02x}")).collect()
}
