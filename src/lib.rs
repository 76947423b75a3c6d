//! gemini-balancer: a Gemini API gateway that rotates many real keys behind
//! one client token, steers around rate-limited and dead keys, and routes
//! every request that uses an uploaded file to the key that owns it.

pub mod admin_session;
pub mod attempt;
pub mod auth;
pub mod discovery;
pub mod error;
pub mod files;
pub mod gateway;
pub mod health;
pub mod identity;
pub mod keys;
pub mod live;
pub mod metrics;
pub mod migrations;
pub mod pipeline;
pub mod probe;
pub mod proxy;
pub mod recheck;
pub mod reload;
pub mod replicas;
pub mod resources;
pub mod routes;
pub mod session;
pub mod settings;
pub mod startup;
pub mod stats;
pub mod store;
pub mod telemetry;
pub mod upload;
pub mod upstream;
pub mod usage;
