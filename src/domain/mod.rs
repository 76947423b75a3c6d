//! What the gateway knows and decides, apart from HTTP: which key serves a
//! request and how healthy each key is, sessions and the keys they are bound
//! to, who owns each uploaded file or other resource, uploads in progress,
//! Live sessions, and the counts operators read; and the one function every
//! upstream call goes through ([`attempt`]), which records what each answer
//! says about its key.

pub mod attempt;
pub mod clients;
pub mod discovery;
pub mod files;
pub mod gateway;
pub mod identity;
pub mod keys;
pub mod limits;
pub mod live;
pub mod requests;
pub mod resources;
pub mod scan;
pub mod session;
pub mod stats;
pub mod upload;
pub mod usage;
