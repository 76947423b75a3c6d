//! gemini-balancer: a Gemini API gateway that rotates many real keys behind
//! one client token, steers around rate-limited and dead keys, and routes
//! every request that uses an uploaded file to the key that owns it.
//!
//! The folders are layers; dependencies point down this list, never up
//! (see `ARCHITECTURE.md`; `tests/api/layers.rs` fails on an upward import):
//! - [`http`]: the edge: routes, the checks every request passes, the
//!   request pipeline, and every word a client reads.
//! - [`background`]: the periodic tasks of a replica, started and stopped in
//!   one place.
//! - [`domain`]: what the gateway knows and decides: the state every worker
//!   shares ([`domain::gateway`]), keys and their health, client tokens,
//!   sessions, resource owners, uploads, usage, and the one attempt
//!   function every upstream call goes through.
//! - [`upstream`]: calling Google: the client, outbound proxies, and what
//!   an answer says about a key.
//! - [`state`]: the shared store (Redis or in memory), its key names and
//!   its layout versions.
//! - [`ops`]: metrics, logs and the container health check.
//! - [`settings`]: the only reader of the environment.
//!
//! Beside them: [`startup`] (the wiring) and the binary's `main`.

// Detached tasks start only in `background` (see clippy.toml).
#![deny(clippy::disallowed_methods)]

/// A map for the per-request lookups by long string keys that clients send
/// (usage series, session bindings, request records): foldhash, seeded per
/// process, several times cheaper than the standard `SipHash` on such keys.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::quality::RandomState>;

/// The set twin of [`FastMap`].
pub type FastSet<T> = std::collections::HashSet<T, foldhash::quality::RandomState>;

pub mod background;
pub mod domain;
pub mod http;
pub mod ops;
pub mod secrets;
pub mod settings;
pub mod startup;
pub mod state;
pub mod upstream;
