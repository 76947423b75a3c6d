//! The side that talks to Google: the per-worker HTTP client and what may
//! cross to Google and back ([`client`]), the outbound proxies keys leave
//! through ([`proxy`]), and what an answer says about the key that got it
//! ([`outcome`]). It knows no key pool, session or client: a call is made
//! with a [`client::Credential`], and what the answer means for the key is
//! the domain's to record ([`crate::domain::attempt`]).

pub mod client;
pub mod model;
pub mod outcome;
pub mod proxy;
