//! gemini-balancer: a Gemini API gateway that rotates many real keys behind
//! one client token, steers around rate-limited and dead keys, and routes
//! every request that uses an uploaded file to the key that owns it.
//!
//! The folders are layers; dependencies point down this list (see
//! `ARCHITECTURE.md`):
//! - [`http`]: the edge: routes, the checks every request passes, and the
//!   request pipeline.
//! - [`domain`]: what the gateway knows: keys and their health, sessions,
//!   resource owners, uploads, usage.
//! - [`upstream`]: calling Google: the client, outbound proxies, the one
//!   attempt function and what an answer says about a key.
//! - [`state`]: the shared store (Redis or in memory), its key names and
//!   its layout versions.
//! - [`background`]: the periodic tasks of a replica, started and stopped in
//!   one place.
//! - [`ops`]: metrics, logs and the container health check.
//!
//! Beside them: [`settings`] (the only reader of the environment),
//! [`gateway`] (the state every worker shares) and [`startup`] (the wiring).

// Detached tasks start only in `background` (see clippy.toml).
#![deny(clippy::disallowed_methods)]

pub mod background;
pub mod domain;
pub mod gateway;
pub mod http;
pub mod ops;
pub mod secrets;
pub mod settings;
pub mod startup;
pub mod state;
pub mod upstream;
