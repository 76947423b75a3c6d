//! One call to Google with one key. Every upstream call goes through
//! [`attempt`], which owns what each call must do the same way: route it
//! through the key's outbound proxy (and count it there), send it, time it,
//! read and classify an error answer, and record what the answer says about
//! the key (key health, statistics, egress-throttle detection). Call sites
//! keep only what differs: which key, which body, and what to do with the
//! answer.

use std::time::{Duration, Instant};

use actix_web::body::SizedStream;
use actix_web::http::header::HeaderMap;
use actix_web::http::{Method, StatusCode};
use actix_web::web;
use bytes::Bytes;

use crate::domain::gateway::Gateway;
use crate::domain::keys::ApiKey;
use crate::state::{now_ms, Transition};
use crate::upstream::client::{read_small, KeyStyle, Upstream};
use crate::upstream::outcome::{classify, Outcome};

/// Largest upstream error body read to classify an answer.
const ERROR_BODY_LIMIT: usize = 1 << 20;

/// Where the call goes.
pub enum Target<'a> {
    /// A path and query under the upstream base URL.
    Path(&'a str),
    /// An absolute URL Google handed out (an upload session).
    Url(&'a str),
}

/// What the call carries.
pub enum Body {
    Empty,
    Bytes(Bytes),
    /// The client's body, streamed as it arrives (its length when known).
    Stream(web::Payload, Option<u64>),
}

pub struct Request<'a> {
    pub method: Method,
    pub target: Target<'a>,
    /// The client's headers (only the forwardable ones go upstream).
    pub headers: &'a HeaderMap,
    pub style: KeyStyle,
    /// The latency histogram's label.
    pub api: &'static str,
    /// A bound on the whole call, for calls the gateway makes on its own.
    pub timeout: Option<Duration>,
}

/// What became of one attempt.
pub enum Sent {
    /// A success; the body is the caller's to stream or read.
    Answer(awc::ClientResponse),
    /// An error answer, read whole, classified and recorded.
    Refused {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        outcome: Outcome,
    },
    /// No usable answer: recorded as a transport failure.
    Unreachable(Unreachable),
}

/// Why an attempt got no usable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// The upstream did not answer in time.
    Timeout,
    /// The connection could not be made, or broke before an answer.
    Failed,
    /// An error answer stopped arriving half-way.
    Stalled,
}

impl Unreachable {
    fn of(e: &awc::error::SendRequestError) -> Self {
        match e {
            awc::error::SendRequestError::Timeout => Unreachable::Timeout,
            _ => Unreachable::Failed,
        }
    }
}

/// See the module docs.
pub async fn attempt(
    gw: &Gateway,
    up: &Upstream,
    key: &ApiKey,
    req: Request<'_>,
    body: Body,
) -> Sent {
    let via = up.proxy_of(&key.id);
    count_proxy(gw, up, key);
    let credential = Some(key.credential());
    let builder = match req.target {
        Target::Path(p) => up.request(req.method, p, req.headers, credential, req.style),
        Target::Url(u) => up.request_to(req.method, u, req.headers, credential, req.style),
    };
    let builder = match req.timeout {
        Some(t) => builder.timeout(t),
        None => builder,
    };
    let started = Instant::now();
    let sent = match body {
        Body::Empty => builder.send().await,
        Body::Bytes(b) => builder.send_body(b).await,
        Body::Stream(payload, Some(len)) => builder.send_body(SizedStream::new(len, payload)).await,
        Body::Stream(payload, None) => builder.send_stream(payload).await,
    };
    let mut resp = match sent {
        Ok(resp) => resp,
        Err(e) => {
            tracing::warn!(key_id = %key.id, error = %e, "upstream unreachable");
            note_transport_failure(gw, up, key, &e).await;
            gw.observe(&key.id, "transport");
            return Sent::Unreachable(Unreachable::of(&e));
        }
    };
    gw.metrics.upstream(req.api, started.elapsed());
    let status = resp.status();
    if status.is_success() {
        gw.observe(&key.id, "success");
        tracing::debug!(key_id = %key.id, status = status.as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "upstream answered");
        return Sent::Answer(resp);
    }
    let Some(body) = read_small(
        &mut resp,
        ERROR_BODY_LIMIT,
        gw.settings.upstream.idle_timeout,
    )
    .await
    else {
        // A stalled error body says nothing about the key: a transport
        // failure, retried like one.
        tracing::warn!(key_id = %key.id, status = status.as_u16(), "upstream error body unreadable");
        gw.observe(&key.id, "transport");
        return Sent::Unreachable(Unreachable::Stalled);
    };
    let outcome = classify(status, &body, now_ms());
    record(gw, key, &outcome).await;
    if let (Outcome::RateLimited { model, .. }, Some(via)) = (&outcome, via) {
        egress_throttle_check(gw, key, model.as_deref(), via).await;
    }
    tracing::info!(key_id = %key.id, status = status.as_u16(), outcome = ?outcome, "upstream error");
    Sent::Refused {
        status,
        headers: resp.headers().clone(),
        body,
        outcome,
    }
}

/// What an answer said about its key, recorded the same way for every kind
/// of call (an HTTP attempt, a Live handshake): statistics, metrics, the
/// key's health in the shared store.
pub async fn record(gw: &Gateway, key: &ApiKey, outcome: &Outcome) {
    gw.observe(&key.id, outcome.name());
    gw.keys.record(gw.store(), key, outcome).await;
}

/// Counts a request leaving through a key's proxy, if it uses one.
pub fn count_proxy(gw: &Gateway, up: &Upstream, key: &ApiKey) {
    if let (Some(router), Some(i)) = (&gw.proxies, up.proxy_of(&key.id)) {
        if let Some(spec) = router.specs.get(i) {
            gw.metrics.proxy_request(&spec.id);
        }
    }
}

/// A connection that could not be opened through a key's proxy marks that
/// proxy down (for every replica), so its keys move to the next proxy.
pub async fn note_transport_failure(
    gw: &Gateway,
    up: &Upstream,
    key: &ApiKey,
    e: &awc::error::SendRequestError,
) {
    if let (awc::error::SendRequestError::Connect(_), Some(router), Some(i)) =
        (e, &gw.proxies, up.proxy_of(&key.id))
    {
        router.mark_down(gw.store(), i).await;
    }
}

/// With proxies in use, 429s from every key behind one proxy within a short
/// window mean that proxy's egress IP is throttled: the proxy is marked down
/// (its keys move to other proxies) and those keys' cooldowns are lifted.
async fn egress_throttle_check(gw: &Gateway, key: &ApiKey, model: Option<&str>, idx: usize) {
    let Some(router) = &gw.proxies else {
        return;
    };
    let Some(spec) = router.specs.get(idx) else {
        return;
    };
    // Another replica may have found the throttle first (a 429 is the rare
    // path, so one more store read here is cheap).
    router.refresh(gw.store()).await;
    if router.is_down(idx, now_ms()) {
        // The proxy it went through is already known to be throttled (or
        // failing): the 429 says nothing about the key.
        lift(gw.store(), &key.id, model).await;
        return;
    }
    // Shared through the store: each replica sees only part of the 429s.
    let index = crate::state::keyspace::index::proxy_429s(&spec.id);
    let store = gw.store();
    let now = now_ms();
    let recent = match store
        .index_add(
            &index,
            &key.id,
            crate::upstream::proxy::THROTTLE_WINDOW,
            now,
        )
        .await
    {
        Ok(()) => store.index_members(&index, now).await.unwrap_or_default(),
        Err(_) => return,
    };
    let behind = router.keys_behind(idx, gw.keys.keys().iter().map(|k| k.id.as_str()));
    if !behind.is_empty() && behind.iter().all(|k| recent.contains(k)) {
        tracing::warn!(proxy_id = %spec.id, keys = behind.len(), "every key behind one proxy answered 429: its egress IP is throttled; moving its keys");
        router.mark_down(store, idx).await;
        for id in &behind {
            lift(store, id, model).await;
            let _ = store.index_remove(&index, id).await;
        }
    }
}

/// Lifts the cooldowns a throttled egress IP caused (key-wide and for the
/// model at hand); a disabled key stays disabled.
async fn lift(store: &dyn crate::state::StateStore, key_id: &str, model: Option<&str>) {
    let now = now_ms();
    let _ = store
        .transition(
            crate::domain::keys::RING,
            key_id,
            None,
            &Transition::Lift,
            now,
        )
        .await;
    if model.is_some() {
        let _ = store
            .transition(
                crate::domain::keys::RING,
                key_id,
                model,
                &Transition::Lift,
                now,
            )
            .await;
    }
}
