//! The HTTP edge: everything that knows about actix requests and responses.
//! A request enters at [`routes::dispatch`], passes the edge checks there
//! and in [`auth`], and travels through [`pipeline`]; [`error`] renders what
//! the gateway itself answers in the client's API dialect.

pub mod admin_session;
pub mod admission;
pub mod auth;
pub mod error;
pub mod pipeline;
pub mod routes;
