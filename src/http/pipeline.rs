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

use std::sync::Arc;
use std::time::Duration;

use actix_web::body::SizedStream;
use actix_web::http::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use actix_web::http::{Method, StatusCode};
use actix_web::HttpResponse;
use bytes::Bytes;
use futures_util::StreamExt;
use tracing::Instrument;

use crate::domain::attempt;
use crate::domain::gateway::Gateway;
use crate::domain::keys::{ApiKey, NoKey};
use crate::domain::requests::{Chosen, Trail};
use crate::domain::resources::RefError;
use crate::domain::session::{self, BindError, Session};
use crate::domain::usage::meter::Meter;
use crate::domain::usage::scan::{self, Format};
use crate::domain::usage::Series;
use crate::http::error::mixed_message;
use crate::http::error::{ApiError, Flavor};
use crate::state::{effective_state, now_ms, MemberState};
pub use crate::upstream::client::read_small;
use crate::upstream::client::{response_forwardable, KeyStyle, Upstream};
use crate::upstream::outcome::Outcome;

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
    /// What the request log learns of this request.
    pub trail: Option<Trail>,
}

impl Call {
    /// Who this call's upstream calls are counted against.
    pub fn bill(&self) -> Bill {
        Bill {
            token_id: self.token_id.clone(),
            model: self.model.clone(),
            // Named once, by the router, in the trail it gives every API
            // request.
            route: self.trail.as_ref().map_or("unknown", Trail::route),
            trail: self.trail.clone(),
        }
    }

    /// How the tokens of a successful answer are read, on the routes whose
    /// answers report token use: content generation and embeddings
    /// (Google's `usageMetadata`, OpenAI's `usage` on the OpenAI routes) and
    /// a cache's creation. Elsewhere none: `countTokens` is a request, not
    /// token use, and reading a cache again reports its size again.
    fn format(&self, route: &str) -> Option<Format> {
        let creates_cache = self.method == Method::POST && self.path.ends_with("/cachedContents");
        match (route, self.flavor) {
            ("generate" | "stream" | "embed", _) => Some(Format::Gemini),
            (_, Flavor::OpenAi) if route.starts_with("openai_") => Some(Format::OpenAi),
            _ if creates_cache => Some(Format::Gemini),
            _ => None,
        }
    }

    pub fn path_and_query(&self) -> String {
        if self.query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, self.query)
        }
    }
}

/// Who a request's upstream calls are counted against in the usage view:
/// every upstream call a client causes counts as one request of its token,
/// the key that served it and its model, with the tokens Google reported
/// (the gateway's own calls, discovery and the re-check, are not counted).
#[derive(Debug, Clone)]
pub struct Bill {
    pub token_id: String,
    pub model: Option<String>,
    /// The route class, for the recent-errors list.
    pub route: &'static str,
    /// The request's trail, for the request log.
    pub trail: Option<Trail>,
}

impl Bill {
    /// A request of `token_id` that names no model.
    pub fn to(token_id: &str, route: &'static str) -> Self {
        Self {
            token_id: token_id.to_string(),
            model: None,
            route,
            trail: None,
        }
    }

    /// The same, noting what it learns in the request's trail.
    #[must_use]
    pub fn traced(mut self, trail: Option<Trail>) -> Self {
        if let Some(t) = &trail {
            t.client(&self.token_id, self.model.as_deref());
        }
        self.trail = trail;
        self
    }

    /// Whether the call counts against a key's published per-model limits
    /// (`[keys]` of the limits file): content generation and embeddings,
    /// native or OpenAI. Model listings and token counts do not.
    pub fn spends_quota(&self) -> bool {
        matches!(
            self.route,
            "generate" | "stream" | "embed" | "openai_chat" | "openai_embeddings"
        )
    }

    pub fn series(&self, key_id: &str) -> Series {
        Series {
            token_id: self.token_id.clone(),
            key_id: key_id.to_string(),
            model: self.model.clone(),
        }
    }

    /// A successful answer, with the tokens Google reported in it.
    pub fn served(&self, gw: &Gateway, key_id: &str, tokens: Option<&scan::Tokens>) {
        gw.usage.success(&self.series(key_id), tokens, now_ms());
        if let (Some(trail), Some(t)) = (&self.trail, tokens) {
            trail.tokens(t);
        }
    }

    /// An upstream error answer (or no answer), as the usage view lists it.
    pub fn refused(
        &self,
        gw: &Gateway,
        key_id: &str,
        status: u16,
        body: &[u8],
        outcome: &'static str,
    ) {
        crate::domain::usage::record_error(
            &gw.usage,
            &self.series(key_id),
            self.route,
            status,
            body,
            outcome,
        );
    }
}

/// One upstream call of a client's request ([`attempt::attempt`]), counted
/// in the usage view against `bill`: an error answer or no answer at once;
/// an answer as a request without tokens when `count_answer` (answers whose
/// tokens are read as they stream past are counted by their meter instead).
pub async fn attempt_billed(
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
pub fn attempt_span(trail: Option<&Trail>, key_id: &str) -> tracing::Span {
    tracing::debug_span!(
        "attempt",
        otel.kind = "client",
        attempt = i64::from(trail.map_or(1, |t| t.attempts() + 1)),
        key_id,
        status = tracing::field::Empty,
        outcome = tracing::field::Empty,
    )
}

/// A key a request must use, with every key's health when pinning it
/// already read that (so the send step need not read it again).
pub struct Pinned {
    pub key: Arc<ApiKey>,
    states: Option<session::KeyStates>,
    /// Why this key, for the request log.
    pub how: Chosen,
}

impl Pinned {
    /// A key known from elsewhere (a resource's owner): its health is read
    /// when the request is sent.
    pub fn to(key: Arc<ApiKey>) -> Self {
        Self {
            key,
            states: None,
            how: Chosen::ResourceOwner,
        }
    }
}

/// Step 1: the key a request must use, if any.
pub async fn pin(
    gw: &Gateway,
    up: &Upstream,
    body: &[u8],
    session: Option<&Session>,
    token_id: &str,
) -> Result<Option<Pinned>, ApiError> {
    match crate::domain::resources::body_owner(gw, up, body, token_id).await {
        Ok(Some(key)) => return Ok(Some(Pinned::to(key))),
        Ok(None) => {}
        Err(RefError::Store(e)) => return Err(store_down(e)),
        Err(RefError::Refused(e)) => return Err(ApiError::from(e)),
        Err(RefError::GoneKey(names)) => return Err(crate::http::error::gone_key(&names)),
        Err(RefError::Mixed(names)) => {
            gw.metrics.mixed_owner_conflicts.inc();
            let advice = split_advice(gw.settings.sessions.upload_affinity);
            return Err(
                ApiError::new(StatusCode::CONFLICT, mixed_message(&names, advice))
                    .kind("mixed_owners"),
            );
        }
    }
    if let Some(s) = session {
        let (ttl, wait) = (gw.settings.sessions.ttl, gw.settings.sessions.pin_wait);
        return match session::resolve(gw.store(), &gw.keys, s, ttl, wait).await {
            Ok((key, bound_now, states)) => {
                if bound_now {
                    gw.metrics.sessions_bound.inc();
                    if s.source == session::Source::Token {
                        gw.metrics.uploads_bound_by_token.inc();
                    }
                }
                Ok(Some(Pinned {
                    key,
                    states: Some(states),
                    how: if s.source == session::Source::Token {
                        Chosen::UploadBinding
                    } else {
                        Chosen::Session
                    },
                }))
            }
            Err(BindError::Store(e)) => Err(store_down(e)),
            Err(BindError::NoKey(no)) => Err(ApiError::from(no)),
        };
    }
    Ok(None)
}

/// Why files that belong together can still land on different keys, and how
/// to avoid it, for the affinity mode in force.
pub fn split_advice(affinity: crate::settings::UploadAffinity) -> &'static str {
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
    match (named, gw.settings.sessions.upload_affinity) {
        (Some(s), _) => Some(s.clone()),
        (None, crate::settings::UploadAffinity::Token) => Some(Session::for_token(token_id)),
        (None, crate::settings::UploadAffinity::None) => None,
    }
}

pub fn store_down(e: crate::state::StoreError) -> ApiError {
    tracing::warn!(error = %e, "a request that needs a binding answered 503");
    ApiError::store_unavailable()
}

/// The upstream answer of a request that succeeded on some key. It is
/// counted in the usage view when it is answered: streamed back through a
/// meter ([`Served::respond`]) or read whole ([`Served::read`]).
pub struct Served {
    pub key: Arc<ApiKey>,
    pub response: awc::ClientResponse,
}

impl Served {
    /// The answer streamed back to the client, its tokens read by a meter
    /// as it passes; `hide_usage`: an OpenAI stream's usage chunk the
    /// gateway asked for and the client did not.
    pub fn respond(self, gw: &Gateway, call: &Call, hide_usage: bool) -> HttpResponse {
        let bill = call.bill();
        let meter = Meter::new(
            gw.usage.clone(),
            bill.series(&self.key.id),
            bill.route,
            call.format(bill.route),
            hide_usage,
        )
        .traced(bill.trail.clone());
        stream_back_metered(
            self.response,
            gw.settings.upstream.idle_timeout,
            Some(meter),
        )
    }

    /// The answer read whole (at most `limit` bytes, within the upstream
    /// deadlines), counted with the tokens it reports; `None`, counted as a
    /// cut answer, when it could not be read.
    pub async fn read(&mut self, gw: &Gateway, call: &Call, limit: usize) -> Option<Bytes> {
        let bill = call.bill();
        let read = read_small(&mut self.response, limit, gw.settings.upstream.idle_timeout).await;
        match &read {
            Some(answer) => {
                let tokens = call
                    .format(bill.route)
                    .and_then(|f| scan::tokens(f, answer));
                bill.served(gw, &self.key.id, tokens.as_ref());
            }
            None => bill.refused(gw, &self.key.id, 502, b"", "stream_cut"),
        }
        read
    }

    /// [`Self::read`], an answer that could not be read whole being the
    /// client's 502.
    pub async fn read_whole(
        &mut self,
        gw: &Gateway,
        call: &Call,
        limit: usize,
    ) -> Result<Bytes, ApiError> {
        self.read(gw, call, limit).await.ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "The upstream's answer could not be read whole.",
            )
        })
    }
}

/// Steps 2–6 for a request with a buffered body. `Ok(Err(response))` is an
/// upstream error answer, passed on as Google gave it; `Err` is the
/// gateway's own (the upstream could not be reached, every key was tried,
/// the store is down), rendered in the route's dialect at dispatch.
pub async fn send(
    gw: &Gateway,
    up: &Upstream,
    call: &Call,
    pinned: Option<Pinned>,
) -> Result<Result<Served, HttpResponse>, ApiError> {
    let attempts = if pinned.is_some() {
        1
    } else {
        gw.settings.keys.max_retries + 1
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
        Some(Pinned { key, states, .. }) => {
            wait_for_pinned(gw, &key, states, call.model.as_deref(), windowed, deadline).await?;
            Some(key)
        }
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
            target: attempt::Target::Path(&target),
            headers: &call.headers,
            style: call.key_style,
            api: api_label(call.flavor),
            timeout: None,
        };
        let (status, headers, body, outcome) = match attempt_billed(
            gw,
            up,
            &key,
            request,
            attempt::Body::Bytes(call.body.clone()),
            &bill,
            false,
        )
        .await
        {
            attempt::Sent::Answer(response) => return Ok(Ok(Served { key, response })),
            attempt::Sent::Unreachable(err) => {
                let err = ApiError::from(err);
                if pinned.is_some() {
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
        if pinned.is_none() && outcome.retryable(status) {
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

/// The next key by rotation. When every key's known window for the model
/// is full, the request waits for the earliest to free up, for at most
/// `GB_PIN_WAIT` in all; then it gets 429 with that time.
async fn next_key(
    gw: &Gateway,
    tried: &[String],
    model: Option<&str>,
    windowed: bool,
    deadline: u64,
) -> Result<Arc<ApiKey>, NoKey> {
    let mut counted = false;
    loop {
        match gw.keys.next_for(gw.store(), tried, model, windowed).await {
            Err(NoKey::WindowsFull { model, until_ms }) => {
                if !counted {
                    gw.metrics.window_full(&model);
                    counted = true;
                }
                if until_ms > deadline {
                    return Err(NoKey::WindowsFull { model, until_ms });
                }
                let rest = until_ms.saturating_sub(now_ms()).max(1);
                tokio::time::sleep(Duration::from_millis(rest)).await;
            }
            other => return other,
        }
    }
}

/// A whole proxied request: pin, send with retries, stream the answer back.
pub async fn forward(gw: &Gateway, up: &Upstream, call: Call) -> Result<HttpResponse, ApiError> {
    // An OpenAI stream always asks for usage upstream, so it can be counted;
    // the client gets it only if it asked.
    let (call, hide_usage) = match (call.flavor, &call.model) {
        (Flavor::OpenAi, Some(_)) => {
            match crate::domain::usage::scan::inject_include_usage(&call.body) {
                Some(body) => (Call { body, ..call }, true),
                None => (call, false),
            }
        }
        _ => (call, false),
    };
    let pinned = pin(gw, up, &call.body, call.session.as_ref(), &call.token_id).await?;
    Ok(match send(gw, up, &call, pinned).await? {
        Ok(served) => served.respond(gw, &call, hide_usage),
        Err(response) => response,
    })
}

/// An answer read whole: the key that gave it, and what it said.
pub struct Answered {
    pub key: Arc<ApiKey>,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answered {
    /// The answer as the client gets it.
    pub fn back(&self) -> HttpResponse {
        buffered_back(self.status, &self.headers, self.body.clone())
    }
}

/// A whole request whose answer the gateway reads before it answers (to
/// record what the answer created): pin, send with retries, then read the
/// answer whole (at most `limit` bytes) and count it. `Ok(Err(response))`
/// is an upstream error answer, passed on as Google gave it; `Err` is the
/// gateway's own, as in [`send`], or an answer that could not be read whole.
pub async fn fetch(
    gw: &Gateway,
    up: &Upstream,
    call: &Call,
    limit: usize,
) -> Result<Result<Answered, HttpResponse>, ApiError> {
    let pinned = pin(gw, up, &call.body, call.session.as_ref(), &call.token_id).await?;
    fetch_pinned(gw, up, call, pinned, limit).await
}

/// [`fetch`] with the pin already decided (a resource's owner, an upload's
/// session).
pub async fn fetch_pinned(
    gw: &Gateway,
    up: &Upstream,
    call: &Call,
    pinned: Option<Pinned>,
    limit: usize,
) -> Result<Result<Answered, HttpResponse>, ApiError> {
    let mut served = match send(gw, up, call, pinned).await? {
        Ok(served) => served,
        Err(response) => return Ok(Err(response)),
    };
    let status = served.response.status();
    let headers = served.response.headers().clone();
    let body = served.read_whole(gw, call, limit).await?;
    Ok(Ok(Answered {
        key: served.key,
        status,
        headers,
        body,
    }))
}

/// A request pinned to a key (session or file owner) never moves to another
/// key. While that key cools (key-wide, or for the request's model), the
/// request waits out a rest of at most `GB_PIN_WAIT`; a longer one is
/// answered at once with 429 and `RetryInfo`, without an upstream call. A
/// disabled key is not sent to: the answer would be sure to fail.
async fn wait_for_pinned(
    gw: &Gateway,
    key: &ApiKey,
    states: Option<session::KeyStates>,
    model: Option<&str>,
    windowed: bool,
    deadline: u64,
) -> Result<(), ApiError> {
    let states = match states {
        Some(states) => states,
        None => match gw.store().member_states(crate::domain::keys::RING).await {
            Ok(states) => states,
            // No shared view of the key's health: send, as an unpinned request would.
            Err(_) => return Ok(()),
        },
    };
    let windowed = model.filter(|_| windowed);
    match effective_state(&states, &key.id, model, now_ms()) {
        None => wait_for_window(gw, key, windowed, deadline).await,
        Some(MemberState::Disabled { reason, .. }) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "This request is pinned to API key {} (by its session or the files it uses), \
                 and that key is disabled ({reason}). Files uploaded with it cannot be used \
                 until it is enabled again.",
                key.id
            ),
        )
        .kind("pinned_key_disabled")),
        Some(MemberState::Cooling { until_ms, .. }) => {
            let rest = until_ms.saturating_sub(now_ms());
            if now_ms() + rest <= deadline {
                tracing::info!(key_id = %key.id, wait_ms = rest, "pinned key is cooling; waiting for it");
                tokio::time::sleep(std::time::Duration::from_millis(rest)).await;
                return wait_for_window(gw, key, windowed, deadline).await;
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
            .kind("pinned_key_cooling"))
        }
    }
}

/// A pinned request counts in its key's known window for its model; a
/// full window is waited out for at most `GB_PIN_WAIT`, else 429 with
/// `RetryInfo` and no upstream call.
async fn wait_for_window(
    gw: &Gateway,
    key: &ApiKey,
    model: Option<&str>,
    deadline: u64,
) -> Result<(), ApiError> {
    let Some(model) = model else {
        return Ok(());
    };
    let mut counted = false;
    loop {
        let Err(full) = gw.keys.spend_pinned(gw.store(), key, model).await else {
            return Ok(());
        };
        if !counted {
            gw.metrics.window_full(model);
            counted = true;
        }
        if full.until_ms > deadline {
            let rest = full.until_ms.saturating_sub(now_ms());
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "This request is pinned to API key {} (by its session or the files it \
                     uses), which has used its known limit for model {model} (the limits \
                     file's [keys]). Retry after the Retry-After delay.",
                    key.id
                ),
            )
            .retry_after(rest.div_ceil(1000))
            .kind("pinned_key_window_full"));
        }
        let rest = full.until_ms.saturating_sub(now_ms()).max(1);
        tokio::time::sleep(Duration::from_millis(rest)).await;
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
    mut meter: Option<Meter>,
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
                    let rest = meter.as_mut().and_then(Meter::finish);
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

/// An upstream answer that was read to classify it, passed on unchanged.
pub fn buffered_back(status: StatusCode, headers: &HeaderMap, body: Bytes) -> HttpResponse {
    let mut builder = HttpResponse::build(status);
    copy_headers(&mut builder, headers);
    builder.body(body)
}
