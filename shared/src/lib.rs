//! Keyward's pure core, shared by the edge worker (wasm32) and the control plane (native).
//!
//! Nothing here does IO, nothing is async, and nothing depends on `worker`, `tokio` or `sqlx`.
//! This crate is the one place that defines the key format, the key hash, the records stored in
//! Workers KV, the wire types of verification, root-key scopes, the signature of internal
//! requests, and the verification decision itself.

pub mod budget;
pub mod credits;
pub mod error;
pub mod freshness;
pub mod hash;
pub mod holder;
pub mod identity;
pub mod internal;
pub mod key;
pub mod limit;
pub mod origin;
pub mod policy;
pub mod ratelimit;
pub mod record;
pub mod scope;
pub mod usage;
pub mod verify;

pub use error::ErrorCode;
pub use hash::KeyHash;
pub use key::{Key, KeyError};
pub use record::{KeyRecord, KeyStatus, Meta, RootKeyRecord};
pub use scope::{KeyAction, Scope, ScopeError, Scopes};
pub use verify::{
    Caller, Code, Decision, RequestError, Source, VerifyRequest, VerifyResponse, decide, decide_unconfirmed,
};

/// The KV key under which an API key's record is stored.
pub fn kv_key_for_key(hash: &KeyHash) -> String {
    format!("key:{}", hash.to_hex())
}

/// The KV key under which a root key's record is stored (only root keys that may verify).
pub fn kv_key_for_root(hash: &KeyHash) -> String {
    format!("root:{}", hash.to_hex())
}
