//! The side that talks to Google: the per-worker HTTP client and what may
//! cross to Google and back ([`client`]), the outbound proxies keys leave
//! through ([`proxy`]), the one function every upstream call goes through
//! ([`attempt`]), and what an answer says about the key that got it
//! ([`outcome`]).

pub mod attempt;
pub mod client;
pub mod outcome;
pub mod proxy;
