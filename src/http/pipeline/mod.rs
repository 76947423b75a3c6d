//! The request pipeline: one run ([`run`]) over a per-request context
//! ([`Call`]), in named steps, for every route that calls Google for a
//! client:
//!
//! 1. **edge** (the route, before [`run`]) — authenticate, admit under the
//!    client's limits, read and check the body, build the [`Call`].
//! 2. **resolve** ([`resolve`]) — the key the request must use: the owner
//!    of the resources it names (409 when they have different owners), its
//!    session's key, an upload's binding, or a key the route found; else
//!    the next healthy key by the shared rotation. A pinned key that cools
//!    is waited for and a disabled one refused, except the only key that
//!    reaches what the request names ([`Resolve::Only`]) and a request whose
//!    body is streamed: those are sent as they are.
//! 3. **attempt** ([`attempt`]) — send on the key, classify the answer,
//!    record what it says about the key, count the call; an unpinned
//!    request with a buffered body moves to another key on 429, 5xx or a
//!    transport error, up to `GB_MAX_RETRIES` times (a streamed body is
//!    sent once).
//! 4. **respond** ([`respond`]) — a success streamed back through a usage
//!    meter, or read whole (and counted) for the route to record what it
//!    created; an error answer passed on as Google gave it.
//!
//! A route declares which variant of steps 2 and 4 it uses ([`Hooks`]);
//! what it does with an answer read whole (record an owner, an upload) is
//! its own, after [`run`].

mod attempt;
mod call;
mod resolve;
mod respond;

use std::sync::Arc;

use actix_web::http::header::HeaderMap;
use actix_web::HttpResponse;

pub use attempt::attempt_span;
pub use call::{Bill, Call};
pub use resolve::{mixed_owners, pin, ref_error, store_down, Pinned};
pub use respond::{buffered_back, Answered};

use crate::domain::gateway::Gateway;
use crate::domain::keys::ApiKey;
use crate::http::error::{ApiError, Flavor};
use crate::upstream::client::Upstream;
use resolve::upload_session;

/// The variants of the pipeline's steps a route uses.
pub struct Hooks {
    pub resolve: Resolve,
    pub respond: Respond,
}

/// How the key is resolved.
pub enum Resolve {
    /// The owner of what the body names, else the session's key, else the
    /// rotation (retried on another key).
    Routed,
    /// An upload's session (the one named, or with `GB_UPLOAD_AFFINITY=token`
    /// its token's), else the rotation.
    Upload,
    /// A resource's owner the route looked up: only that key, its health
    /// checked (a cooling key waited for, a disabled one refused).
    Owner(Arc<ApiKey>),
    /// The only key that reaches what the request names (a file, an upload
    /// session Google opened for it): sent to whatever its state.
    Only(Arc<ApiKey>),
}

/// How a success is answered.
pub enum Respond {
    /// Streamed back chunk by chunk through a usage meter.
    Stream,
    /// Read whole (at most this many bytes), counted, and handed back.
    Read(usize),
    /// Read whole when the answer's headers say so, else streamed.
    ReadIf(fn(&HeaderMap) -> bool, usize),
}

/// What became of a request.
pub enum Reply {
    /// A success, streamed back: the client's answer.
    Streamed(HttpResponse),
    /// A success, read whole.
    Read(Answered),
    /// Google's error answer, passed on as Google gave it.
    Refused(HttpResponse),
}

impl Reply {
    /// The client's answer, for a route that has nothing to do with one
    /// read whole.
    pub fn into_response(self) -> Result<HttpResponse, ApiError> {
        match self {
            Reply::Streamed(r) | Reply::Refused(r) => Ok(r),
            Reply::Read(answered) => answered.back(),
        }
    }
}

/// Runs a request through the pipeline's steps (see the module docs). `Err`
/// is the gateway's own answer (no key, the store down, the upstream
/// unreachable), rendered in the route's dialect at dispatch.
pub async fn run(
    gw: &Gateway,
    up: &Upstream,
    mut call: Call,
    hooks: Hooks,
) -> Result<Reply, ApiError> {
    // An OpenAI request always asks for usage upstream, so it can be
    // counted; the client gets it only if it asked.
    let mut hide_usage = false;
    if call.flavor == Flavor::OpenAi && call.model.is_some() {
        if let Some(body) = crate::domain::usage::scan::inject_include_usage(&call.body) {
            call.body = body;
            hide_usage = true;
        }
    }
    let resolved = match hooks.resolve {
        Resolve::Routed => pin(gw, up, &call.body, call.session.as_ref(), &call.token_id).await?,
        Resolve::Upload => {
            let session = upload_session(gw, call.session.as_ref(), &call.token_id);
            pin(gw, up, &[], session.as_ref(), &call.token_id).await?
        }
        Resolve::Owner(key) => Some(Pinned::to(key)),
        Resolve::Only(key) => Some(Pinned::only(key)),
    };
    // A streamed body is not held back or refused for its key's health: the
    // client is still sending it, and Google's answer is what it gets.
    let pinned = match resolved {
        Some(p) if call.stream.is_some() => Some(p.unchecked()),
        other => other,
    };
    let served = match attempt::send(gw, up, &mut call, pinned).await? {
        Ok(served) => served,
        Err(refused) => return Ok(Reply::Refused(refused)),
    };
    let read = match hooks.respond {
        Respond::Stream => None,
        Respond::Read(limit) => Some(limit),
        Respond::ReadIf(wanted, limit) => wanted(served.response.headers()).then_some(limit),
    };
    Ok(match read {
        Some(limit) => Reply::Read(served.read(gw, &call, limit).await),
        None => Reply::Streamed(served.respond(gw, &call, hide_usage)),
    })
}
