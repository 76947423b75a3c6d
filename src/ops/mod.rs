//! What operators watch a replica through: Prometheus metrics, logs with a
//! request id on every line, and the `healthcheck` subcommand containers
//! run.

pub mod healthcheck;
pub mod metrics;
pub mod telemetry;
