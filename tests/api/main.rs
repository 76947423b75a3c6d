//! The gateway tested as its users meet it: real binaries, a real
//! `redis-server` per test on a free port, the project's fake upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin_listen;
mod core;
mod files;
mod hardening;
mod health;
mod helpers;
mod migrations;
mod ops;
mod proxies;
mod store;
mod tls;
