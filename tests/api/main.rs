//! The gateway tested as its users meet it: real binaries, a real
//! `redis-server` per test on a free port, the project's fake upstream.
// A test fails by panicking (an unwrap, an expect, a panic with what was
// seen), and its helpers may print what a failure needs explained.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]
// Pedantic lints are for the gateway's code; a test states what it checks
// in the plainest terms (exact float metrics, literal ids, long scenarios).
#![allow(clippy::pedantic)]

mod admin_listen;
mod admin_sessions;
mod core;
mod docs;
mod failover;
mod faults;
mod files;
mod hardening;
mod health;
mod helpers;
mod hygiene;
mod key_health;
mod key_limits;
mod layers;
mod limits;
mod live;
mod migrations;
mod ops;
mod proxies;
mod redis_restart;
mod reload;
mod request_log;
mod resources;
mod settings_effects;
mod shutdown;
mod store;
mod tls;
mod usage;
mod usage_routes;
