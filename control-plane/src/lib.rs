//! Keyward's control plane: the source of truth for keys, the admin API, and the `keyward` CLI.
//!
//! `control-plane` is the only crate that knows SQL. Every change goes through the HTTP API
//! (the CLI is a client of it), is committed to the database, then written to every region's
//! Workers KV; tightening changes are also purged from every region's edge copies.

pub mod cli;
pub mod cloudflare;
pub mod config;
pub mod delivery;
pub mod edge_client;
pub mod failpoint;
pub mod http;
pub mod keygen;
pub mod kv;
pub mod serve;
pub mod store;
pub mod time;
