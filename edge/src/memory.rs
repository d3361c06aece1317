//! Isolate memory for key and root-key copies, which every tenant shares: bounded by bytes
//! (16 MiB together by default, or the worker's `COPY_MEMORY_BYTES`), fifteen sixteenths for
//! keys and one for root keys, least recently used first out. A record's meta stays JSON text
//! (`keyward_shared::Meta`), so a copy costs about its stored size.
//!
//! `POST /internal/stats` (signed, body `{}`) answers what this isolate holds and the size of
//! its wasm memory, so a test (or an operator) can see the bound hold, and how it confirmed
//! its copies (authority calls a request waited for, made ahead of expiry, or shared).

use std::cell::{Cell, RefCell};

use keyward_shared::KeyHash;
use keyward_shared::budget::{ByteLru, Weigh};
use keyward_shared::internal::{MemoryStats, STATS_PATH};
use worker::{Date, Env, Request, Response, RouteContext};

use crate::error::EdgeResult;
use crate::misses::{self, Kind};
use crate::{auth, authority, credits, fresh, lookup, signed};

/// Bytes key and root-key copies may take together in one isolate, unless configured.
pub(crate) const COPY_MEMORY_BYTES: usize = 16 << 20;
/// Most holdings an isolate keeps of credits (one per key) and of rate limits (one per limit of
/// a key), each a few hundred bytes, whatever one tenant verifies: a key whose credit reports
/// wait for a contact that never comes, or a `local` limit of a 30-day window, would otherwise
/// be kept for good.
pub(crate) const MAX_HOLDINGS: usize = 4_096;

thread_local! {
    static BUDGET: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Copies of one kind of record in isolate memory, by key hash, bounded by bytes (least
/// recently used out first). Kept in a `thread_local!`; nothing here awaits, so no borrow
/// outlives a call.
pub(crate) struct Copies<V: Weigh>(RefCell<ByteLru<[u8; 32], V>>);

impl<V: Weigh + Clone> Copies<V> {
    pub(crate) fn new(budget: usize) -> Copies<V> {
        Copies(RefCell::new(ByteLru::new(budget)))
    }

    pub(crate) fn set_budget(&self, bytes: usize) {
        self.0.borrow_mut().set_budget(bytes);
    }

    /// How many copies are held, and their bytes.
    pub(crate) fn held(&self) -> (usize, usize) {
        let copies = self.0.borrow();
        (copies.len(), copies.bytes())
    }

    /// The copy of `hash`, now the most recently used.
    pub(crate) fn get(&self, hash: &KeyHash) -> Option<V> {
        self.0.borrow_mut().get(hash.as_bytes()).cloned()
    }

    /// Runs `f` on the copies, to read, compare and replace under one borrow.
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut ByteLru<[u8; 32], V>) -> R) -> R {
        f(&mut self.0.borrow_mut())
    }
}

/// The bytes key copies may take, of `total` (or the default).
pub(crate) fn key_budget(total: Option<usize>) -> usize {
    total.unwrap_or(COPY_MEMORY_BYTES) / 16 * 15
}

/// The bytes root-key copies may take, of `total` (or the default).
pub(crate) fn root_budget(total: Option<usize>) -> usize {
    total.unwrap_or(COPY_MEMORY_BYTES) / 16
}

/// Applies `COPY_MEMORY_BYTES` and `CALLER_MISSES_PER_SECOND` once per isolate (the first
/// request).
pub(crate) fn configure(env: &Env) {
    if BUDGET.get().is_some() {
        return;
    }
    let configured = env.var("COPY_MEMORY_BYTES").ok().and_then(|v| v.to_string().parse::<usize>().ok());
    let total = configured.unwrap_or(COPY_MEMORY_BYTES);
    BUDGET.set(Some(total));
    lookup::set_budget(key_budget(Some(total)));
    auth::set_budget(root_budget(Some(total)));
    if let Some(rate) = env.var("CALLER_MISSES_PER_SECOND").ok().and_then(|v| v.to_string().parse().ok()) {
        misses::set_rate(rate);
    }
}

pub(crate) async fn stats(mut req: Request, ctx: RouteContext<worker::Context>) -> EdgeResult<Response> {
    signed::parse::<serde::de::IgnoredAny>(&mut req, &ctx.env, STATS_PATH, Date::now().as_millis()).await?;
    let ((key_copies, key_copy_bytes), (root_copies, root_copy_bytes)) = (lookup::held(), auth::held());
    let stats = MemoryStats {
        key_copies,
        key_copy_bytes,
        root_copies,
        root_copy_bytes,
        copy_budget_bytes: BUDGET.get().unwrap_or(COPY_MEMORY_BYTES),
        wasm_memory_bytes: core::arch::wasm32::memory_size::<0>() * 65_536,
        key_misses: misses::counts(Kind::Key),
        root_key_misses: misses::counts(Kind::RootKey),
        key_confirmations: fresh::counts(Kind::Key),
        root_key_confirmations: fresh::counts(Kind::RootKey),
        api_confirmations: fresh::counts(Kind::Api),
        identity_confirmations: fresh::counts(Kind::Identity),
        authority_reads_answered: authority::reads_answered(),
        authority_credit_calls_answered: authority::credit_calls_answered(),
        credits: credits::counts(),
    };
    Ok(Response::from_json(&stats)?)
}
