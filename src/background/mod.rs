//! The periodic work of a replica, beside the requests it serves.

pub mod heartbeat;
pub mod recheck;
pub mod reload;
