//! What a lookup that found nothing costs, bounded: "no such key" is remembered for
//! [`MISS_MEMORY_MS`], so asking again costs no KV read and no Durable Object request (safe: a
//! new key's hash is random and was never looked up before), and each caller may make the edge
//! fetch for keys it has no copy of at most [`MISSES_PER_SECOND`] times a second (burst as
//! much), per isolate, before it is answered 429 `CALLER_RATE_LIMITED`. Key misses are counted
//! per root key; root-key misses (a caller presenting unknown root keys) per client address.
//!
//! Besides, a `NOT_FOUND` given to a workspace for a key that does not exist or is another
//! workspace's is remembered for that workspace and that key ([`answered`]), for
//! [`MISS_MEMORY_MS`] from the answer, and answered again from memory (`source: "remembered"`).
//! Both kinds are remembered alike, so the answers cannot tell them apart; neither can become
//! a key of that workspace (a key's workspace never changes; a new key's hash was never looked
//! up), and other workspaces' callers never read it.
//!
//! Every remembered answer, fetch and refusal is counted; `POST /internal/stats` shows them.

use std::cell::{Cell, RefCell};

use keyward_shared::KeyHash;
use keyward_shared::budget::ByteLru;
use keyward_shared::internal::MissCounts as Counts;
use keyward_shared::limit::Buckets;

/// How long "no such key" is remembered.
pub(crate) const MISS_MEMORY_MS: u64 = 5_000;
/// How many lookups without a copy one caller may make a second, per isolate (and its burst),
/// unless the worker's `CALLER_MISSES_PER_SECOND` says otherwise.
pub(crate) const MISSES_PER_SECOND: u32 = 50;
/// Bytes each kind of remembered miss may take (about 3,900 misses each), and the
/// workspaces' remembered answers as much.
const MISS_MEMORY_BYTES: usize = 512 * 1024;

/// Which lookups: keys being verified, or root keys presented by callers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Key,
    RootKey,
    /// APIs' records, looked up for keys already found (never remembered as misses: an API
    /// without a record is an empty policy, confirmed like a copy; see `crate::policy`).
    Api,
    /// Identities' records, looked up for keys already found (never remembered as misses: an
    /// identity found nowhere fails closed; see `crate::side`).
    Identity,
}

struct Misses {
    /// Until when each miss is remembered (Unix ms).
    remembered: RefCell<ByteLru<[u8; 32], u64>>,
    /// Until when each `NOT_FOUND` given to a workspace is remembered (Unix ms), by
    /// [`answer_slot`] (keys only).
    answers: RefCell<ByteLru<[u8; 32], u64>>,
    callers: RefCell<Buckets>,
    counts: Cell<Counts>,
}

thread_local! {
    static RATE: Cell<u32> = const { Cell::new(MISSES_PER_SECOND) };
}

/// Sets how many lookups without a copy one caller may make a second (at the isolate's start).
pub(crate) fn set_rate(per_second: u32) {
    let per_second = per_second.max(1);
    RATE.set(per_second);
    for kind in [Kind::Key, Kind::RootKey] {
        with(kind, |m| *m.callers.borrow_mut() = Buckets::new(per_second, per_second));
    }
}

/// How many lookups without a copy one caller may make a second.
pub(crate) fn rate() -> u32 {
    RATE.get()
}

impl Misses {
    fn new() -> Misses {
        Misses {
            remembered: RefCell::new(ByteLru::new(MISS_MEMORY_BYTES)),
            answers: RefCell::new(ByteLru::new(MISS_MEMORY_BYTES)),
            callers: RefCell::new(Buckets::new(MISSES_PER_SECOND, MISSES_PER_SECOND)),
            counts: Cell::new(Counts::default()),
        }
    }

    fn count(&self, change: impl FnOnce(&mut Counts)) {
        let mut counts = self.counts.get();
        change(&mut counts);
        self.counts.set(counts);
    }
}

thread_local! {
    static KEYS: Misses = Misses::new();
    static ROOT_KEYS: Misses = Misses::new();
}

fn with<T>(kind: Kind, f: impl FnOnce(&Misses) -> T) -> T {
    match kind {
        Kind::Key | Kind::Api | Kind::Identity => KEYS.with(f),
        Kind::RootKey => ROOT_KEYS.with(f),
    }
}

/// Whether a lookup of `hash` found nothing less than [`MISS_MEMORY_MS`] ago (counted).
pub(crate) fn remembered(kind: Kind, hash: &[u8; 32], now_ms: u64) -> bool {
    with(kind, |m| {
        let hit = m.remembered.borrow_mut().get(hash).is_some_and(|until| *until > now_ms);
        if hit {
            m.count(|c| c.remembered += 1);
        }
        hit
    })
}

/// Remembers that nothing (no KV record, and an authority that answered it knows none) was
/// found for `hash`.
pub(crate) fn remember(kind: Kind, hash: &[u8; 32], now_ms: u64) {
    with(kind, |m| m.remembered.borrow_mut().put(*hash, now_ms + MISS_MEMORY_MS));
}

/// Whether a miss of `hash` is remembered now (not counted: see [`remembered`]).
pub(crate) fn known_missing(kind: Kind, hash: &[u8; 32], now_ms: u64) -> bool {
    with(kind, |m| m.remembered.borrow().peek(hash).is_some_and(|until| *until > now_ms))
}

/// Where the answer to `workspace_id` for `hash` is remembered: one digest of both, so one
/// workspace's slot is never another's.
fn answer_slot(workspace_id: &str, hash: &KeyHash) -> [u8; 32] {
    *KeyHash::of(&format!("{workspace_id}/{}", hash.to_hex())).as_bytes()
}

/// Whether `NOT_FOUND` was answered to `workspace_id` for `hash` less than [`MISS_MEMORY_MS`]
/// ago, by [`remember_answer`] (counted as remembered).
pub(crate) fn answered(workspace_id: &str, hash: &KeyHash, now_ms: u64) -> bool {
    KEYS.with(|m| {
        let hit = m.answers.borrow_mut().get(&answer_slot(workspace_id, hash)).is_some_and(|until| *until > now_ms);
        if hit {
            m.count(|c| c.remembered += 1);
        }
        hit
    })
}

/// Remembers a `NOT_FOUND` answered to `workspace_id` for `hash`, which the caller has checked
/// no caller of that workspace could be answered otherwise: the key does not exist (a miss KV
/// and a reachable authority agreed on) or is another workspace's.
pub(crate) fn remember_answer(workspace_id: &str, hash: &KeyHash, now_ms: u64) {
    KEYS.with(|m| m.answers.borrow_mut().put(answer_slot(workspace_id, hash), now_ms + MISS_MEMORY_MS));
}

/// Whether `caller` may make the edge fetch once more now (counted either way).
pub(crate) fn admit(kind: Kind, caller: &str, now_ms: u64) -> bool {
    with(kind, |m| {
        let admitted = m.callers.borrow_mut().take(caller, now_ms);
        m.count(|c| if admitted { c.fetched += 1 } else { c.refused += 1 });
        admitted
    })
}

/// Takes one of `caller`'s lookups for an answer that needed no fetch but says the key is not
/// the caller's (`NOT_FOUND` from a copy or a remembered miss): a caller past its share gets
/// 429 whether or not this location holds a copy, so the limit cannot tell it which keys
/// exist. Counted as refused when the share is spent.
pub(crate) fn charge(kind: Kind, caller: &str, now_ms: u64) -> bool {
    with(kind, |m| {
        let taken = m.callers.borrow_mut().take(caller, now_ms);
        if !taken {
            m.count(|c| c.refused += 1);
        }
        taken
    })
}

pub(crate) fn counts(kind: Kind) -> Counts {
    with(kind, |m| m.counts.get())
}
