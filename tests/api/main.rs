//! The gateway tested as its users meet it: real binaries, a real
//! `redis-server` per test on a free port, the project's fake upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod core;
mod files;
mod hardening;
mod health;
mod helpers;
mod live;
mod migrations;
mod ops;
mod proxies;
mod resources;
mod store;
mod tls;
