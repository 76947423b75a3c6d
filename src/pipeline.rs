//! How one request travels, in order:
//!
//! 1. **pin** — a request that references files or other per-project
//!    resources (caches, file search stores) goes to the key owning them
//!    (409 when they have different owners); else a request with a session
//!    goes to the session's key; else it is unpinned.
//! 2. **choose key** — the pin, or the next healthy key by shared rotation.
//! 3. **build** — the client's forwardable headers and query, the real key.
//! 4. **send** — the buffered body (small JSON, so it can be re-sent).
//! 5. **classify** — a success streams straight back to the client; an error
//!    body is read (bounded) to learn what it says about the key.
//! 6. **record** — cooldowns and disabled keys go to the shared store; an
//!    unpinned request moves to another key on 429, 5xx or a transport error,
//!    up to `GB_MAX_RETRIES` times.

use std::time::Instant;

use actix_web::body::SizedStream;
use actix_web::http::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use actix_web::http::{Method, StatusCode};
use actix_web::HttpResponse;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::error::{ApiError, Flavor};
use crate::gateway::Gateway;
use crate::health::{classify, Outcome};
use crate::keys::{ApiKey, NoKey};
use crate::resources::{mixed_message, RefError};
use crate::session::{self, BindError, Session};
use crate::store::now_ms;
use crate::upstream::{response_forwardable, KeyStyle, Upstream};

/// Largest upstream error body read to classify an answer.
const ERROR_BODY_LIMIT: usize = 1 << 20;

/// One client request, parsed at the edge.
pub struct Call {
    pub flavor: Flavor,
    pub method: Method,
    /// Upstream path, without any `/session/{sid}` prefix.
    pub path: String,
    /// Query string without the client's token and session id.
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub session: Option<Session>,
    /// Id of the client token the request authenticated with.
    pub token_id: String,
    pub key_style: KeyStyle,
}

impl Call {
    pub fn path_and_query(&self) -> String {
        if self.query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, self.query)
        }
    }
}

/// Step 1: the key a request must use, if any.
pub async fn pin<'g>(
    gw: &'g Gateway,
    up: &Upstream,
    body: &[u8],
    session: Option<&Session>,
    token_id: &str,
    flavor: Flavor,
) -> Result<Option<&'g ApiKey>, ApiError> {
    match crate::resources::body_owner(gw, up, body, token_id).await {
        Ok(Some(key)) => return Ok(Some(key)),
        Ok(None) => {}
        Err(RefError::Store(e)) => return Err(store_down(e, flavor)),
        Err(RefError::Mixed(names)) => {
            return Err(ApiError::new(StatusCode::CONFLICT, mixed_message(&names)).flavor(flavor))
        }
    }
    if let Some(s) = session {
        return match session::resolve(gw.store(), &gw.keys, s, gw.settings.session_ttl).await {
            Ok((key, bound_now)) => {
                if bound_now {
                    gw.metrics.sessions_bound.inc();
                }
                Ok(Some(key))
            }
            Err(BindError::Store(e)) => Err(store_down(e, flavor)),
            Err(BindError::NoKey(no)) => Err(no.into_error().flavor(flavor)),
        };
    }
    Ok(None)
}

pub fn store_down(e: crate::store::StoreError, flavor: Flavor) -> ApiError {
    tracing::warn!(error = %e, "state store unavailable for a request that needs a binding");
    ApiError::store_unavailable().flavor(flavor)
}

/// The upstream answer of a request that succeeded on some key.
pub struct Served<'g> {
    pub key: &'g ApiKey,
    pub response: awc::ClientResponse,
}

/// Steps 2–6 for a request with a buffered body. `Ok(Err(response))` is an
/// upstream error answer, passed on as Google gave it.
pub async fn send<'g>(
    gw: &'g Gateway,
    up: &Upstream,
    call: &Call,
    pinned: Option<&'g ApiKey>,
) -> Result<Result<Served<'g>, HttpResponse>, ApiError> {
    let attempts = if pinned.is_some() {
        1
    } else {
        gw.settings.max_retries + 1
    };
    let target = call.path_and_query();
    let mut tried: Vec<String> = Vec::new();
    let mut last: Option<HttpResponse> = None;
    for attempt in 0..attempts {
        let key = match pinned {
            Some(key) => key,
            None => {
                match gw.keys.next(gw.store(), &tried).await {
                    Ok(key) => key,
                    Err(NoKey::Exhausted) if last.is_some() => break,
                    Err(no) => {
                        if matches!(no, NoKey::AllCooling { .. }) && !tried.is_empty() {
                            tracing::warn!(tried = tried.len(), "every key is rate-limited: likely an IP-level throttle; answering 429");
                        }
                        return Err(no.into_error().flavor(call.flavor));
                    }
                }
            }
        };
        let started = Instant::now();
        let via = up.proxy_of(key);
        count_proxy(gw, up, key);
        let sent = up
            .request(
                call.method.clone(),
                &target,
                &call.headers,
                Some(key),
                call.key_style,
            )
            .send_body(call.body.clone())
            .await;
        let mut resp = match sent {
            Ok(resp) => resp,
            Err(e) => {
                let err = transport_error(&e).flavor(call.flavor);
                tracing::warn!(key_id = %key.id, attempt, error = %e, "upstream unreachable");
                note_transport_failure(gw, up, key, &e).await;
                gw.observe(&key.id, "transport");
                if pinned.is_some() {
                    return Err(err);
                }
                gw.metrics.retry("transport");
                tried.push(key.id.clone());
                last = Some(actix_web::ResponseError::error_response(&err));
                continue;
            }
        };
        let status = resp.status();
        gw.metrics
            .upstream(api_label(call.flavor), started.elapsed());
        if status.is_success() {
            gw.observe(&key.id, "success");
            tracing::debug!(key_id = %key.id, status = status.as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "upstream answered");
            return Ok(Ok(Served {
                key,
                response: resp,
            }));
        }
        let body = resp
            .body()
            .limit(ERROR_BODY_LIMIT)
            .await
            .unwrap_or_default();
        let outcome = classify(status, &body, now_ms());
        gw.observe(&key.id, outcome.name());
        gw.keys.record(gw.store(), key, &outcome).await;
        if let (Outcome::RateLimited { .. }, Some(via)) = (&outcome, via) {
            egress_throttle_check(gw, key, via).await;
        }
        tracing::info!(key_id = %key.id, status = status.as_u16(), attempt, outcome = ?outcome, "upstream error");
        let mut response = buffered_back(status, resp.headers(), body);
        if let Outcome::RateLimited { until_ms, .. } = outcome {
            if !response.headers().contains_key(RETRY_AFTER) {
                let secs = until_ms.saturating_sub(now_ms()).div_ceil(1000).max(1);
                if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                    response.headers_mut().insert(RETRY_AFTER, v);
                }
            }
        }
        if pinned.is_none() && outcome.retryable(status) {
            gw.metrics.retry(outcome.name());
            tried.push(key.id.clone());
            last = Some(response);
            continue;
        }
        return Ok(Err(response));
    }
    Ok(Err(last.unwrap_or_else(|| {
        actix_web::ResponseError::error_response(&NoKey::Exhausted.into_error().flavor(call.flavor))
    })))
}

/// A whole proxied request: pin, send with retries, stream the answer back.
pub async fn forward(gw: &Gateway, up: &Upstream, call: Call) -> Result<HttpResponse, ApiError> {
    let pinned = pin(
        gw,
        up,
        &call.body,
        call.session.as_ref(),
        &call.token_id,
        call.flavor,
    )
    .await?;
    Ok(match send(gw, up, &call, pinned).await? {
        Ok(served) => stream_back(served.response),
        Err(response) => response,
    })
}

/// Counts a request leaving through a key's proxy, if it uses one.
pub fn count_proxy(gw: &Gateway, up: &Upstream, key: &ApiKey) {
    if let (Some(router), Some(i)) = (&gw.proxies, up.proxy_of(key)) {
        if let Some(spec) = router.specs.get(i) {
            gw.metrics.proxy_request(&spec.id);
        }
    }
}

/// With proxies in use, 429s from every key behind one proxy within a short
/// window mean that proxy's egress IP is throttled: the proxy is marked down
/// (its keys move to other proxies) and those keys' cooldowns are lifted.
async fn egress_throttle_check(gw: &Gateway, key: &ApiKey, idx: usize) {
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
        let _ = gw
            .store()
            .set_member_state(crate::keys::RING, &key.id, None)
            .await;
        return;
    }
    // Shared through the store: each replica sees only part of the 429s.
    let index = format!("proxy-429:{}", spec.id);
    let store = gw.store();
    let now = now_ms();
    let recent = match store
        .index_add(&index, &key.id, crate::proxy::THROTTLE_WINDOW, now)
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
            let _ = store.set_member_state(crate::keys::RING, id, None).await;
            let _ = store.index_remove(&index, id).await;
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
        (e, &gw.proxies, up.proxy_of(key))
    {
        router.mark_down(gw.store(), i).await;
    }
}

pub fn api_label(flavor: Flavor) -> &'static str {
    match flavor {
        Flavor::Gemini => "gemini",
        Flavor::OpenAi => "openai",
        Flavor::Upload => "upload",
    }
}

pub fn transport_error(e: &awc::error::SendRequestError) -> ApiError {
    match e {
        awc::error::SendRequestError::Timeout => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "The upstream did not answer in time.",
        ),
        _ => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "The upstream could not be reached.",
        ),
    }
}

fn copy_headers(builder: &mut actix_web::HttpResponseBuilder, headers: &HeaderMap) {
    for (name, value) in headers {
        if response_forwardable(name) {
            builder.append_header((name.clone(), value.clone()));
        }
    }
}

/// A successful upstream answer, streamed to the client chunk by chunk as it
/// arrives (SSE included), never buffered.
pub fn stream_back<S>(resp: awc::ClientResponse<S>) -> HttpResponse
where
    S: futures_util::Stream<Item = Result<Bytes, awc::error::PayloadError>> + Unpin + 'static,
{
    let mut builder = HttpResponse::build(resp.status());
    copy_headers(&mut builder, resp.headers());
    let length = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body = futures_util::stream::unfold(
        (resp, 0u64, false),
        move |(mut upstream, sent, failed)| async move {
            if failed {
                return None;
            }
            match upstream.next().await {
                Some(Ok(chunk)) => {
                    let sent = sent + chunk.len() as u64;
                    Some((Ok(chunk), (upstream, sent, false)))
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, sent, "upstream body ended with an error; the client's response is cut short");
                    Some((Err(e), (upstream, sent, true)))
                }
                None => {
                    if length.is_some_and(|want| sent < want) {
                        tracing::warn!(sent, expected = length, "upstream body ended with an error: closed early; the client's response is cut short");
                    }
                    None
                }
            }
        },
    );
    match length {
        Some(len) => builder.body(SizedStream::new(len, body)),
        None => builder.streaming(body),
    }
}

/// An upstream answer that was read to classify it, passed on unchanged.
pub fn buffered_back(status: StatusCode, headers: &HeaderMap, body: Bytes) -> HttpResponse {
    let mut builder = HttpResponse::build(status);
    copy_headers(&mut builder, headers);
    builder.body(body)
}
