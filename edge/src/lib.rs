//! Keyward's edge verifier: the `#[event(fetch)]` entry and the route table, nothing else.
//!
//! The worker answers `POST /v1/keys/verify` from isolate memory, the Cache API or Workers KV
//! (in that order, confirming old copies with the key's KeyState Durable Object), replaces its
//! copies when the control plane sends a signed purge, and hosts the KeyState objects.
//! Only compiled for wasm32; the pure parts it relies on live in `keyward-shared`.

#![cfg(target_arch = "wasm32")]

mod auth;
mod authority;
mod credits;
mod deadline;
mod error;
mod fresh;
mod lookup;
mod mark;
mod memory;
mod misses;
mod origin;
mod purge;
mod ratelimit;
mod side;
mod signed;
mod usage;
mod verify;

use keyward_shared::ErrorCode;
use keyward_shared::internal::{AUTHORITY_PATH, PURGE_PATH, SETTLE_PATH, STATS_PATH};
use worker::{Context, Env, Request, Response, Result, Router, event};

use crate::error::EdgeError;

/// The KV namespace holding key and root-key records.
pub(crate) const KV_BINDING: &str = "KEYS";
/// The wrangler secret shared with the control plane for signed internal routes.
pub(crate) const PURGE_SECRET: &str = "PURGE_SECRET";
/// This region's name, for acknowledgements.
pub(crate) const REGION_VAR: &str = "REGION";

#[event(start)]
fn start() {
    console_error_panic_hook::set_once();
}

/// Handlers get the request's `Context` as router data, so work may continue after the answer
/// (`wait_until`).
#[event(fetch)]
async fn fetch(req: Request, env: Env, ctx: Context) -> Result<Response> {
    memory::configure(&env);
    fresh::configure(&env);
    origin::configure(&env);
    Router::with_data(ctx)
        .get("/health", |_, ctx| {
            let region = ctx.var(REGION_VAR).map(|v| v.to_string()).unwrap_or_default();
            Response::from_json(&serde_json::json!({ "status": "ok", "region": region }))
        })
        .post_async("/v1/keys/verify", |req, ctx| async { error::answer(verify::handle(req, ctx).await) })
        .post_async(PURGE_PATH, |req, ctx| async { error::answer(purge::handle(req, ctx).await) })
        .post_async(AUTHORITY_PATH, |req, ctx| async { error::answer(authority::handle(req, ctx).await) })
        .post_async(SETTLE_PATH, |req, ctx| async { error::answer(credits::handle_settle(req, ctx).await) })
        .post_async(STATS_PATH, |req, ctx| async { error::answer(memory::stats(req, ctx).await) })
        .or_else_any_method("/*rest", |_, _| {
            error::answer(Err(EdgeError::new(ErrorCode::NotFoundRoute, "no such route")))
        })
        .run(req, env)
        .await
}
