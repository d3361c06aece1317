//! Keyward's control plane: the source of truth for keys, the admin API, and the `keyward` CLI.
//!
//! `control-plane` is the only crate that knows SQL. Every change to a key or a root key goes
//! through `change` (called by the HTTP API, of which the CLI is a client, and at start-up): it
//! is committed to the database with its outbox entry, then delivered to the key's authority,
//! every region's Workers KV and, for a tightening change, every region's purge.

pub mod change;
pub mod cli;
pub mod cloudflare;
pub mod config;
pub mod delivery;
pub mod edge_client;
pub mod failpoint;
pub mod http;
pub mod keygen;
pub mod kv;
pub mod metrics;
pub mod proof;
pub mod serve;
pub mod store;
pub mod time;
pub mod usage;
