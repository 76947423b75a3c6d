//! How one request travels, in order:
//!
//! 1. **pin** — a request that references files goes to the key owning them
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

use std::time::{Duration, Instant};

use actix_web::body::SizedStream;
use actix_web::http::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use actix_web::http::{Method, StatusCode};
use actix_web::HttpResponse;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::error::{ApiError, Flavor};
use crate::files;
use crate::gateway::Gateway;
use crate::health::{classify, Outcome};
use crate::keys::{ApiKey, NoKey};
use crate::session::{self, BindError, Session};
use crate::store::{effective_state, now_ms, MemberState, Transition};
use crate::upstream::{response_forwardable, KeyStyle, Upstream};

/// Largest upstream error body read to classify an answer.
const ERROR_BODY_LIMIT: usize = 1 << 20;

/// Longest an error body may take to arrive whole (error bodies are small).
const ERROR_BODY_DEADLINE: Duration = Duration::from_secs(10);

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
    /// The model the request is for (normalised), when it names one: keys
    /// cooling for that model are skipped.
    pub model: Option<String>,
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
    let refs = files::scan_refs(body);
    if !refs.is_empty() {
        let mut records = files::owners(gw.store(), &refs)
            .await
            .map_err(|e| store_down(e, flavor))?;
        for (name, record) in refs.iter().zip(records.iter_mut()) {
            if record.is_none() {
                *record = crate::discovery::discover(gw, up, name, token_id)
                    .await
                    .map_err(|e| store_down(e, flavor))?;
            }
        }
        let mut owners: Vec<(&str, &str)> = refs
            .iter()
            .zip(&records)
            .filter_map(|(name, rec)| rec.as_ref().map(|r| (name.as_str(), r.key.as_str())))
            .collect();
        owners.sort_by_key(|(_, key)| *key);
        let mut keys: Vec<&str> = owners.iter().map(|(_, k)| *k).collect();
        keys.dedup();
        match keys.as_slice() {
            [] => {}
            [one] => {
                if let Some(key) = gw.keys.by_id(one) {
                    return Ok(Some(key));
                }
            }
            _ => {
                let names: Vec<&str> = owners.iter().map(|(n, _)| *n).collect();
                gw.metrics.mixed_owner_conflicts.inc();
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "The files {} were uploaded under different API keys and cannot be used \
                         in one request. {}",
                        names.join(", "),
                        split_advice(gw.settings.upload_affinity)
                    ),
                )
                .flavor(flavor));
            }
        }
    }
    if let Some(s) = session {
        let (ttl, wait) = (gw.settings.session_ttl, gw.settings.pin_wait);
        return match session::resolve(gw.store(), &gw.keys, s, ttl, wait).await {
            Ok((key, bound_now)) => {
                if bound_now {
                    gw.metrics.sessions_bound.inc();
                    if s.source == session::Source::Token {
                        gw.metrics.uploads_bound_by_token.inc();
                    }
                }
                Ok(Some(key))
            }
            Err(BindError::Store(e)) => Err(store_down(e, flavor)),
            Err(BindError::NoKey(no)) => Err(no.into_error().flavor(flavor)),
        };
    }
    Ok(None)
}

/// Why files that belong together can still land on different keys, and how
/// to avoid it, for the affinity mode in force.
fn split_advice(affinity: crate::settings::UploadAffinity) -> &'static str {
    match affinity {
        crate::settings::UploadAffinity::Token => {
            "With GB_UPLOAD_AFFINITY=token the uploads of one client token share a key, \
             unless that key was rate-limited or disabled when a later file was uploaded: \
             then new uploads moved to another key. Upload the files again, or wait until \
             the key's cooldown ends; to keep each conversation's files together, send one \
             session id per conversation (X-Session-Id header or the /session/{id} base URL)."
        }
        crate::settings::UploadAffinity::None => {
            "With GB_UPLOAD_AFFINITY=none uploads are spread over the keys by rotation. \
             Upload files that are used together with one session id (X-Session-Id header \
             or the /session/{id} base URL)."
        }
    }
}

/// The session an upload is bound through: the one the client named, else
/// (with `GB_UPLOAD_AFFINITY=token`) the implicit session of its token.
pub fn upload_session(gw: &Gateway, named: Option<&Session>, token_id: &str) -> Option<Session> {
    match (named, gw.settings.upload_affinity) {
        (Some(s), _) => Some(s.clone()),
        (None, crate::settings::UploadAffinity::Token) => Some(Session::for_token(token_id)),
        (None, crate::settings::UploadAffinity::None) => None,
    }
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
    if let Some(key) = pinned {
        wait_for_pinned(gw, key, call).await?;
    }
    let target = call.path_and_query();
    let mut tried: Vec<String> = Vec::new();
    let mut last: Option<HttpResponse> = None;
    for attempt in 0..attempts {
        let key = match pinned {
            Some(key) => key,
            None => {
                match gw
                    .keys
                    .next(gw.store(), &tried, call.model.as_deref())
                    .await
                {
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
                crate::usage::record_error(
                    &gw.usage,
                    call,
                    &key.id,
                    err.status.as_u16(),
                    b"",
                    "transport",
                );
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
        let body = match read_small(
            &mut resp,
            ERROR_BODY_LIMIT,
            gw.settings.upstream_idle_timeout,
        )
        .await
        {
            Some(body) => body,
            None => {
                // A stalled error body says nothing about the key: a
                // transport failure, retried like one.
                tracing::warn!(key_id = %key.id, status = status.as_u16(), attempt, "upstream error body unreadable");
                gw.observe(&key.id, "transport");
                crate::usage::record_error(
                    &gw.usage,
                    call,
                    &key.id,
                    status.as_u16(),
                    b"",
                    "transport",
                );
                let err = ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "The upstream stopped sending in the middle of its answer.",
                )
                .flavor(call.flavor);
                if pinned.is_some() {
                    return Err(err);
                }
                gw.metrics.retry("transport");
                tried.push(key.id.clone());
                last = Some(actix_web::ResponseError::error_response(&err));
                continue;
            }
        };
        let outcome = classify(status, &body, now_ms());
        gw.observe(&key.id, outcome.name());
        crate::usage::record_error(
            &gw.usage,
            call,
            &key.id,
            status.as_u16(),
            &body,
            outcome.name(),
        );
        gw.keys.record(gw.store(), key, &outcome).await;
        if let (Outcome::RateLimited { model, .. }, Some(via)) = (&outcome, via) {
            egress_throttle_check(gw, key, model.as_deref(), via).await;
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
    // An OpenAI stream always asks for usage upstream, so it can be counted;
    // the client gets it only if it asked.
    let (call, hide_usage) = match (call.flavor, &call.model) {
        (Flavor::OpenAi, Some(_)) => match crate::usage::scan::inject_include_usage(&call.body) {
            Some(body) => (Call { body, ..call }, true),
            None => (call, false),
        },
        _ => (call, false),
    };
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
        Ok(served) => {
            let meter = crate::usage::meter(&gw.usage, &call, &served.key.id, hide_usage);
            stream_back_metered(
                served.response,
                gw.settings.upstream_idle_timeout,
                Some(meter),
            )
        }
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
            lift(store, id, model).await;
            let _ = store.index_remove(&index, id).await;
        }
    }
}

/// Lifts the cooldowns a throttled egress IP caused (key-wide and for the
/// model at hand); a disabled key stays disabled.
async fn lift(store: &dyn crate::store::StateStore, key_id: &str, model: Option<&str>) {
    let now = now_ms();
    let _ = store
        .transition(crate::keys::RING, key_id, None, &Transition::Lift, now)
        .await;
    if model.is_some() {
        let _ = store
            .transition(crate::keys::RING, key_id, model, &Transition::Lift, now)
            .await;
    }
}

/// A request pinned to a key (session or file owner) never moves to another
/// key. While that key cools (key-wide, or for the request's model), the
/// request waits out a rest of at most `GB_PIN_WAIT`; a longer one is
/// answered at once with 429 and `RetryInfo`, without an upstream call. A
/// disabled key is not sent to: the answer would be sure to fail.
async fn wait_for_pinned(gw: &Gateway, key: &ApiKey, call: &Call) -> Result<(), ApiError> {
    let Ok(states) = gw.store().member_states(crate::keys::RING).await else {
        // No shared view of the key's health: send, as an unpinned request would.
        return Ok(());
    };
    let model = call.model.as_deref();
    match effective_state(&states, &key.id, model, now_ms()) {
        None => Ok(()),
        Some(MemberState::Disabled { reason, .. }) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "This request is pinned to API key {} (by its session or the files it uses), \
                 and that key is disabled ({reason}). Files uploaded with it cannot be used \
                 until it is enabled again.",
                key.id
            ),
        )
        .flavor(call.flavor)),
        Some(MemberState::Cooling { until_ms, .. }) => {
            let rest = until_ms.saturating_sub(now_ms());
            if rest <= gw.settings.pin_wait.as_millis() as u64 {
                tracing::info!(key_id = %key.id, wait_ms = rest, "pinned key is cooling; waiting for it");
                tokio::time::sleep(std::time::Duration::from_millis(rest)).await;
                return Ok(());
            }
            let what = model.map_or_else(String::new, |m| format!(" for model {m}"));
            Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "This request is pinned to API key {} (by its session or the files it \
                     uses), which is rate-limited{what}. Retry after the Retry-After delay.",
                    key.id
                ),
            )
            .retry_after(rest.div_ceil(1000))
            .flavor(call.flavor))
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
/// arrives (SSE included), never buffered. A body that stalls for longer
/// than `idle` (`GB_UPSTREAM_IDLE_TIMEOUT`) between chunks is cut: an SSE
/// stream ends with an error event, any other body ends with an error (the
/// client's connection closes short of the promised length), so no client
/// waits forever on a half-open upstream connection.
pub fn stream_back<S>(resp: awc::ClientResponse<S>, idle: Duration) -> HttpResponse
where
    S: futures_util::Stream<Item = Result<Bytes, awc::error::PayloadError>> + Unpin + 'static,
{
    stream_back_metered(resp, idle, None)
}

/// [`stream_back`], with a usage meter that sees every chunk, learns how the
/// answer ended, and may hold back what the client did not ask for.
pub fn stream_back_metered<S>(
    resp: awc::ClientResponse<S>,
    idle: Duration,
    mut meter: Option<crate::usage::meter::Meter>,
) -> HttpResponse
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
    let sse = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let status = resp.status().as_u16();
    if let (Some(m), Some(_)) = (meter.as_mut(), length) {
        m.keep_length();
    }
    let body = futures_util::stream::unfold(
        (resp, 0u64, false, meter),
        move |(mut upstream, sent, done, mut meter)| async move {
            if done {
                return None;
            }
            match tokio::time::timeout(idle, upstream.next()).await {
                Ok(Some(Ok(chunk))) => {
                    let sent = sent + chunk.len() as u64;
                    let chunk = match meter.as_mut() {
                        Some(m) => m.chunk(chunk),
                        None => chunk,
                    };
                    Some((Ok(chunk), (upstream, sent, false, meter)))
                }
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, sent, "upstream body ended with an error; the client's response is cut short");
                    if let Some(m) = meter.as_mut() {
                        m.cut("stream_cut", status);
                    }
                    Some((Err(e), (upstream, sent, true, meter)))
                }
                Ok(None) => {
                    if length.is_some_and(|want| sent < want) {
                        tracing::warn!(sent, expected = length, "upstream body ended with an error: closed early; the client's response is cut short");
                        if let Some(m) = meter.as_mut() {
                            m.cut("stream_cut", status);
                        }
                        return None;
                    }
                    let rest = meter.as_mut().and_then(|m| m.finish());
                    rest.map(|b| (Ok(b), (upstream, sent, true, meter)))
                }
                Err(_) => {
                    if let Some(m) = meter.as_mut() {
                        m.cut("stream_stalled", status);
                    }
                    tracing::warn!(
                        sent,
                        idle_s = idle.as_secs(),
                        sse,
                        "upstream body stalled; the client's response is cut short"
                    );
                    let cut = if sse && length.is_none() {
                        Ok(Bytes::from_static(STALLED_EVENT))
                    } else {
                        Err(awc::error::PayloadError::Io(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the upstream body stalled",
                        )))
                    };
                    Some((cut, (upstream, sent, true, meter)))
                }
            }
        },
    );
    match length {
        Some(len) => builder.body(SizedStream::new(len, body)),
        None => builder.streaming(body),
    }
}

/// The last event of an SSE stream whose upstream stalled: a Gemini error,
/// as Google sends errors inside a stream.
const STALLED_EVENT: &[u8] = b"data: {\"error\": {\"code\": 504, \"message\": \"The upstream stopped sending in the middle of the answer.\", \"status\": \"DEADLINE_EXCEEDED\"}}\r\n\r\n";

/// Reads a whole small upstream body (an error, a file's metadata, an
/// upload's final answer), bounded in size and in time: `None` when it is
/// too large, broken, or stalls past `ERROR_BODY_DEADLINE` (capped by the
/// idle timeout).
pub async fn read_small<S>(
    resp: &mut awc::ClientResponse<S>,
    limit: usize,
    idle: Duration,
) -> Option<Bytes>
where
    S: futures_util::Stream<Item = Result<Bytes, awc::error::PayloadError>> + Unpin,
{
    let promised = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    match tokio::time::timeout(idle.min(ERROR_BODY_DEADLINE), resp.body().limit(limit)).await {
        // A connection closed early ends the body as if it were complete.
        Ok(Ok(body)) if promised.is_some_and(|n| n != body.len()) => {
            tracing::warn!(got = body.len(), promised, "upstream body ended early");
            None
        }
        Ok(Ok(body)) => Some(body),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "upstream body could not be read");
            None
        }
        Err(_) => {
            tracing::warn!("upstream body stalled");
            None
        }
    }
}

/// An upstream answer that was read to classify it, passed on unchanged.
pub fn buffered_back(status: StatusCode, headers: &HeaderMap, body: Bytes) -> HttpResponse {
    let mut builder = HttpResponse::build(status);
    copy_headers(&mut builder, headers);
    builder.body(body)
}
