//! The attempt step: send on the chosen key, classify the answer, record
//! what it says about the key, and move an unpinned request to another key
//! on 429, 5xx or a transport error, up to `GB_MAX_RETRIES` times. Every
//! upstream call a client causes is counted against its [`Bill`] here.

use actix_web::http::header::{HeaderValue, RETRY_AFTER};
use actix_web::HttpResponse;
use tracing::Instrument;

use super::call::{Bill, Call};
use super::resolve::{next_key, ready, Pinned};
use super::respond::{buffered_back, Served};
use crate::domain::attempt;
use crate::domain::gateway::Gateway;
use crate::domain::keys::{ApiKey, NoKey};
use crate::domain::requests::Chosen;
use crate::http::error::ApiError;
use crate::state::now_ms;
use crate::upstream::client::Upstream;
use crate::upstream::outcome::Outcome;

/// One upstream call of a client's request ([`attempt::attempt`]), counted
/// in the usage view against `bill`: an error answer or no answer at once;
/// an answer as a request without tokens when `count_answer` (answers whose
/// tokens are read as they stream past are counted by their meter instead).
async fn attempt_billed(
    gw: &Gateway,
    up: &Upstream,
    key: &ApiKey,
    request: attempt::Request<'_>,
    body: attempt::Body,
    bill: &Bill,
    count_answer: bool,
) -> attempt::Sent {
    let span = attempt_span(bill.trail.as_ref(), &key.id);
    let started = std::time::Instant::now();
    let sent = attempt::attempt(gw, up, key, request, body)
        .instrument(span.clone())
        .await;
    if let Some(trail) = &bill.trail {
        trail.tried(&key.id, started.elapsed());
    }
    match &sent {
        attempt::Sent::Answer(resp) => {
            span.record("status", i64::from(resp.status().as_u16()));
            span.record("outcome", "answer");
        }
        attempt::Sent::Refused {
            status, outcome, ..
        } => {
            span.record("status", i64::from(status.as_u16()));
            span.record("outcome", outcome.name());
        }
        attempt::Sent::Unreachable(_) => {
            span.record("outcome", "transport");
        }
    }
    match &sent {
        attempt::Sent::Answer(_) if count_answer => bill.served(gw, &key.id, None),
        attempt::Sent::Answer(_) => {}
        attempt::Sent::Refused {
            status,
            body,
            outcome,
            ..
        } => bill.refused(gw, &key.id, status.as_u16(), body, outcome.name()),
        attempt::Sent::Unreachable(err) => {
            let status = ApiError::from(*err).status.as_u16();
            bill.refused(gw, &key.id, status, b"", "transport");
        }
    }
    sent
}

/// The span of one upstream call of a request: its number in the request,
/// the key, and (recorded when it ends) the status and outcome. At debug
/// level, so that logging at `info` pays nothing for it. Numbers are
/// recorded as `i64`, the integer type OTLP attributes have.
pub fn attempt_span(trail: Option<&crate::domain::requests::Trail>, key_id: &str) -> tracing::Span {
    tracing::debug_span!(
        "attempt",
        otel.kind = "client",
        attempt = i64::from(trail.map_or(1, |t| t.attempts() + 1)),
        key_id,
        status = tracing::field::Empty,
        outcome = tracing::field::Empty,
    )
}

/// The attempt step of [`super::run`]. `Ok(Err(response))` is an upstream
/// error answer, passed on as Google gave it; `Err` is the gateway's own
/// (the upstream could not be reached, every key was tried, the store is
/// down), rendered in the route's dialect at dispatch.
pub(super) async fn send(
    gw: &Gateway,
    up: &Upstream,
    call: &mut Call,
    pinned: Option<Pinned>,
) -> Result<Result<Served, HttpResponse>, ApiError> {
    // A streamed body can be sent once: a request carrying one is not
    // retried on another key.
    let movable = pinned.is_none() && call.stream.is_none();
    let attempts = if movable {
        gw.settings.keys.max_retries + 1
    } else {
        1
    };
    if let Some(trail) = &call.trail {
        trail.client(&call.token_id, call.model.as_deref());
        trail.chosen(pinned.as_ref().map_or(Chosen::Rotation, |p| p.how));
    }
    // Every wait of this request (a pinned key's cooldown and window, the
    // pool's windows) ends by one deadline.
    let deadline = now_ms() + gw.settings.sessions.pin_wait.as_millis() as u64;
    let bill = call.bill();
    let windowed = bill.spends_quota();
    let pinned = match pinned {
        Some(p) => Some(ready(gw, p, call.model.as_deref(), windowed, deadline).await?),
        None => None,
    };
    let target = call.path_and_query();
    let mut tried: Vec<String> = Vec::new();
    // The last failure: Google's error answer, or the gateway's own error
    // (rendered in the route's dialect at the edge).
    let mut last: Option<Result<HttpResponse, ApiError>> = None;
    for attempt in 0..attempts {
        let key = match &pinned {
            Some(key) => key.clone(),
            None => {
                match next_key(gw, &tried, call.model.as_deref(), windowed, deadline).await {
                    Ok(key) => key,
                    Err(NoKey::Exhausted) if last.is_some() => break,
                    Err(no) => {
                        if matches!(no, NoKey::AllCooling { .. }) && !tried.is_empty() {
                            tracing::warn!(tried = tried.len(), "every key is rate-limited: likely an IP-level throttle; answering 429");
                        }
                        return Err(ApiError::from(no));
                    }
                }
            }
        };
        let request = attempt::Request {
            method: call.method.clone(),
            target: match &call.url {
                Some(url) => attempt::Target::Url(url),
                None => attempt::Target::Path(&target),
            },
            headers: &call.headers,
            style: call.key_style,
            api: call.api(),
            timeout: None,
        };
        let body = match call.stream.take() {
            Some((payload, length)) => attempt::Body::Stream(payload, length),
            None => attempt::Body::Bytes(call.body.clone()),
        };
        let (status, headers, body, outcome) =
            match attempt_billed(gw, up, &key, request, body, &bill, false).await {
                attempt::Sent::Answer(response) => return Ok(Ok(Served { key, response })),
                attempt::Sent::Unreachable(err) => {
                    let err = ApiError::from(err);
                    if !movable {
                        return Err(err);
                    }
                    tracing::info!(key_id = %key.id, attempt, "moving to another key");
                    gw.metrics.retry("transport");
                    tried.push(key.id.clone());
                    last = Some(Err(err));
                    continue;
                }
                attempt::Sent::Refused {
                    status,
                    headers,
                    body,
                    outcome,
                } => (status, headers, body, outcome),
            };
        let mut response = buffered_back(status, &headers, body);
        if let Outcome::RateLimited { until_ms, .. } = outcome {
            if !response.headers().contains_key(RETRY_AFTER) {
                let secs = until_ms.saturating_sub(now_ms()).div_ceil(1000).max(1);
                if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                    response.headers_mut().insert(RETRY_AFTER, v);
                }
            }
        }
        if movable && outcome.retryable(status) {
            gw.metrics.retry(outcome.name());
            tried.push(key.id.clone());
            last = Some(Ok(response));
            continue;
        }
        return Ok(Err(response));
    }
    match last {
        Some(Ok(response)) => Ok(Err(response)),
        Some(Err(err)) => Err(err),
        None => Err(ApiError::from(NoKey::Exhausted)),
    }
}
