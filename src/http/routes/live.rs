//! `/ws/google.ai.generativelanguage.{ver}.GenerativeService.BidiGenerateContent`:
//! the Live API, relayed frame by frame between the client and a pool key.
//!
//! The client authenticates with its gateway token (`x-goog-api-key` or
//! `?key=`). The gateway reads the client's first message (`setup`), opens
//! the upstream session on the session's key or the next key with room,
//! and sends `setup` there. A close before `setupComplete` that blames the
//! key (invalid key, exhausted quota) is recorded in key health and the
//! setup is replayed on another key; after `setupComplete` every frame is
//! passed on as it arrives, both ways, never buffered.
//!
//! `…BidiGenerateContentConstrained` takes an ephemeral token minted through
//! the gateway (`POST /v1alpha/auth_tokens`) instead of a gateway token; the
//! session goes to the key that minted it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header::HeaderMap;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{CloseCode, CloseReason, Message};

use crate::domain::limits::{Kind, Refusal, Ticket};
use crate::domain::requests::Chosen;
use awc::ws::{Frame, Message as UpMessage};
use futures_util::{SinkExt, StreamExt};
use tracing::Instrument;

use super::{authorize, Edge};
use crate::domain::gateway::Gateway;
use crate::domain::keys::ApiKey;
use crate::domain::live;
use crate::domain::resources;
use crate::http::error::ApiError;
use crate::http::pipeline;
use crate::upstream::client::{query_param, Upstream};

/// Largest frame relayed (audio and video chunks are large).
const MAX_FRAME: usize = 16 << 20;
/// How long the client has to send `setup`, and the upstream to answer it.
const SETUP_WAIT: Duration = Duration::from_secs(60);

/// Whether a path is a Live API endpoint.
pub fn is_live(segs: &[&str]) -> bool {
    matches!(segs, ["ws", method] if method.starts_with("google.ai.generativelanguage.")
        && (method.ends_with(".GenerativeService.BidiGenerateContent")
            || method.ends_with(".GenerativeService.BidiGenerateContentConstrained")))
}

pub async fn handle(
    gw: web::Data<Gateway>,
    up: web::Data<Upstream>,
    req: &HttpRequest,
    payload: web::Payload,
    edge: &Edge,
) -> Result<HttpResponse, ApiError> {
    if gw.draining() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "This replica is shutting down; connect again.",
        ));
    }
    let (pinned, ephemeral, token_id) = match ephemeral_token(req.headers(), edge) {
        // An ephemeral token minted through the gateway is the client's
        // credential, and goes to the key that minted it.
        Some(t) => {
            let record = resources::owner(gw.store(), &resources::live_token_name(&t))
                .await
                .map_err(pipeline::store_down)?
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "Unknown or expired ephemeral token. Mint one with POST \
                         /v1alpha/auth_tokens through this gateway.",
                    )
                })?;
            (Some(record.key), Some(t), record.owner)
        }
        None => {
            let token = authorize(&gw.auth, req.headers(), edge)?;
            let pinned = pipeline::pin(&gw, &up, b"", edge.session.as_ref(), &token.id)
                .await?
                .map(|p| p.key.id.clone());
            (pinned, None, token.id.clone())
        }
    };
    // The model is named by `setup`, after the upgrade: the session is
    // admitted now, and its model checked when `setup` arrives.
    let ticket =
        crate::http::admission::admit_as(&gw, &token_id, || None, Kind::Live, "live").await?;
    let limits = gw
        .limits
        .client(&token_id, || gw.auth.label_of(&token_id))
        .map(|c| c.limits);
    let (response, session, stream) = actix_ws::handle(req, payload).map_err(|e| {
        ApiError::bad_request(format!("The Live API needs a WebSocket upgrade: {e}"))
    })?;
    let target = if edge.forward_query().is_empty() {
        edge.path.clone()
    } else {
        format!("{}?{}", edge.path, edge.forward_query())
    };
    let relay = Relay {
        gw: gw.into_inner(),
        up: up.into_inner(),
        target,
        headers: req.headers().clone(),
        pinned,
        ephemeral,
        id: uuid::Uuid::new_v4().simple().to_string(),
        bill: pipeline::Bill::to(&token_id, "live").traced(super::trail_of(req)),
        limits,
        _ticket: ticket,
        span: crate::ops::telemetry::record_span!("live_session",),
    };
    let span = relay.span.clone();
    crate::background::for_connection(
        relay
            .run(session, stream.max_frame_size(MAX_FRAME))
            .instrument(span),
    );
    Ok(response)
}

struct Relay {
    /// The session's span: its handshakes and store calls are its children,
    /// and its record's facts are written on it when it ends.
    span: tracing::Span,
    gw: Arc<Gateway>,
    up: Arc<Upstream>,
    target: String,
    headers: HeaderMap,
    pinned: Option<String>,
    /// The client's ephemeral token, sent upstream instead of a key.
    ephemeral: Option<String>,
    /// This session's member id in the per-key count.
    id: String,
    /// Who the session is counted against (its model is learnt from
    /// `setup`): one request when it opens, then the tokens of every
    /// `usageMetadata` message Google sends.
    bill: pipeline::Bill,
    /// The client's limits, for the model `setup` names.
    limits: Option<Arc<crate::settings::ClientLimits>>,
    /// The session's `live_sessions` slot, held while it is open.
    _ticket: Option<Ticket>,
}

type Upstreamed = actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>;

/// The ephemeral token of a `…Constrained` connection: `Authorization:
/// Token auth_tokens/…`, `?access_token=`, or the SDK's key header.
fn ephemeral_token(headers: &HeaderMap, edge: &Edge) -> Option<String> {
    if !edge.path.ends_with("BidiGenerateContentConstrained") {
        return None;
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    header("authorization")
        .and_then(|v| v.strip_prefix("Token "))
        .map(str::to_string)
        .or_else(|| query_param(&edge.query, "access_token"))
        .or_else(|| {
            header("x-goog-api-key")
                .filter(|v| v.starts_with("auth_tokens/"))
                .map(str::to_string)
        })
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

#[allow(
    clippy::unnecessary_wraps,
    reason = "builds the argument every close call takes"
)]
fn close_reason(code: CloseCode, text: &str) -> Option<CloseReason> {
    // A close frame's reason holds at most 123 bytes.
    let mut end = text.len().min(123);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Some(CloseReason {
        code,
        description: Some(text[..end].to_string()),
    })
}

/// How an attempt to open the upstream session ended.
enum Opened {
    /// `setupComplete` (or any answer but a close) arrived: relay on.
    Ready(Box<Upstreamed>, Frame),
    /// The key is to blame; another may do.
    KeyFailed(String),
    /// The session itself failed: tell the client and stop.
    Failed(Option<CloseReason>),
}

/// A Live session is one record in the request log, written when it ends
/// (its latency is the session's duration).
impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(trail) = &self.bill.trail {
            trail.chosen(match (&self.ephemeral, &self.pinned) {
                (Some(_), _) => Chosen::EphemeralToken,
                (None, Some(_)) => Chosen::Session,
                (None, None) => Chosen::Rotation,
            });
            if self.bill.model.is_some() {
                trail.client(&self.bill.token_id, self.bill.model.as_deref());
            }
            let auth = &self.gw.auth;
            let record = trail.finish(101, None, |id| auth.label_of(id));
            super::record_on(&self.span, &record, &self.gw.replica);
            self.gw.requests.push(record);
        }
    }
}

impl Relay {
    async fn run(mut self, session: actix_ws::Session, mut stream: actix_ws::MessageStream) {
        let setup = match tokio::time::timeout(SETUP_WAIT, stream.recv()).await {
            Ok(Some(Ok(Message::Text(t)))) => UpMessage::Text(t),
            Ok(Some(Ok(Message::Binary(b)))) => UpMessage::Binary(b),
            _ => {
                let _ = session
                    .close(close_reason(
                        CloseCode::Policy,
                        "The first message of a Live session is its setup.",
                    ))
                    .await;
                return;
            }
        };
        self.bill.model = setup_model(&setup);
        if let Some(limits) = self.limits.as_ref().filter(|l| l.models.is_some()) {
            let model = self.bill.model.clone();
            if !model.as_deref().is_some_and(|m| limits.allows(m)) {
                let refusal = Refusal::Model {
                    model: model
                        .clone()
                        .unwrap_or_else(|| "(none that can be read)".into()),
                };
                let err = crate::http::admission::refused(
                    &self.gw,
                    &self.bill.token_id,
                    model,
                    "live",
                    refusal,
                );
                if let Some(trail) = &self.bill.trail {
                    trail.outcome("client_limited");
                }
                let _ = session
                    .close(close_reason(CloseCode::Policy, &err.message))
                    .await;
                return;
            }
        }
        let gw = self.gw.clone();
        let attempts = if self.pinned.is_some() {
            1
        } else {
            gw.settings.keys.max_retries + 1
        };
        let mut tried: Vec<String> = Vec::new();
        let mut last = String::from("No key could open the Live session.");
        for _ in 0..attempts {
            let key = match &self.pinned {
                Some(id) => gw.keys.by_id(id),
                None => live::choose(&gw, &tried).await.ok(),
            };
            let Some(key) = key else {
                break;
            };
            let span = pipeline::attempt_span(self.bill.trail.as_ref(), &key.id);
            let opened = self.open(&key, &setup).instrument(span.clone()).await;
            span.record(
                "outcome",
                match &opened {
                    Opened::Ready(..) => "answer",
                    Opened::KeyFailed(_) => "key_failed",
                    Opened::Failed(_) => "failed",
                },
            );
            match opened {
                Opened::Ready(upstream, first) => {
                    self.relay(&key, session, stream, *upstream, first).await;
                    return;
                }
                Opened::KeyFailed(reason) => {
                    gw.metrics.retry("live_setup");
                    tried.push(key.id.clone());
                    last = reason;
                }
                Opened::Failed(reason) => {
                    let _ = session.close(reason).await;
                    return;
                }
            }
        }
        if let Some(trail) = &self.bill.trail {
            trail.outcome("live_failed");
        }
        let _ = session.close(close_reason(CloseCode::Again, &last)).await;
    }

    /// Opens the upstream session on `key` and sends `setup`; waits for the
    /// first answer.
    async fn open(&self, key: &ApiKey, setup: &UpMessage) -> Opened {
        let gw = &self.gw;
        // Like every upstream call (`domain::attempt`): counted at its proxy,
        // timed, a failed connect marks the proxy down, and what the answer
        // says about the key is recorded the same way.
        crate::domain::attempt::count_proxy(gw, &self.up, key);
        let started = Instant::now();
        let connect = self
            .up
            .ws(
                &self.target,
                &self.headers,
                Some(key.credential()),
                self.ephemeral.as_deref(),
                MAX_FRAME,
            )
            .connect();
        let connected = connect.await;
        gw.metrics.upstream("live", started.elapsed());
        if let Some(trail) = &self.bill.trail {
            trail.tried(&key.id, started.elapsed());
        }
        let mut upstream = match connected {
            Ok((_, framed)) => framed,
            Err(awc::error::WsClientError::InvalidResponseStatus(status)) => {
                tracing::info!(key_id = %key.id, status = status.as_u16(), "Live handshake refused");
                self.bill
                    .refused(gw, &key.id, status.as_u16(), b"", "live_refused");
                match live::classify_close(1013, "quota").filter(|_| status.as_u16() == 429) {
                    Some(o) => crate::domain::attempt::record(gw, key, &o).await,
                    None => gw.observe(&key.id, "live_refused"),
                }
                return Opened::KeyFailed(format!(
                    "The upstream refused the Live session ({status})."
                ));
            }
            Err(e) => {
                tracing::warn!(key_id = %key.id, error = %e, "Live upstream unreachable");
                if let awc::error::WsClientError::SendRequest(e) = &e {
                    crate::domain::attempt::note_transport_failure(gw, &self.up, key, e).await;
                }
                gw.observe(&key.id, "transport");
                self.bill.refused(gw, &key.id, 502, b"", "transport");
                return Opened::KeyFailed("The upstream could not be reached.".into());
            }
        };
        let setup = match setup {
            UpMessage::Text(t) => UpMessage::Text(t.clone()),
            UpMessage::Binary(b) => UpMessage::Binary(b.clone()),
            _ => return Opened::Failed(None),
        };
        if upstream.send(setup).await.is_err() {
            return Opened::KeyFailed("The upstream closed the Live session.".into());
        }
        loop {
            let first = match tokio::time::timeout(SETUP_WAIT, upstream.next()).await {
                Ok(Some(Ok(frame))) => frame,
                Ok(_) => return Opened::KeyFailed("The upstream closed the Live session.".into()),
                Err(_) => {
                    return Opened::Failed(close_reason(
                        CloseCode::Again,
                        "The upstream did not answer the setup in time.",
                    ))
                }
            };
            match first {
                Frame::Close(reason) => {
                    let code = reason.as_ref().map_or(1005, |r| u16::from(r.code));
                    let text = reason
                        .as_ref()
                        .and_then(|r| r.description.clone())
                        .unwrap_or_default();
                    return match live::classify_close(code, &text) {
                        Some(outcome) => {
                            tracing::info!(key_id = %key.id, code, outcome = ?outcome, "Live session closed before setup completed; trying another key");
                            self.bill.refused(gw, &key.id, 503, b"", outcome.name());
                            crate::domain::attempt::record(gw, key, &outcome).await;
                            Opened::KeyFailed(text)
                        }
                        None => Opened::Failed(reason),
                    };
                }
                Frame::Ping(p) => {
                    let _ = upstream.send(UpMessage::Pong(p)).await;
                }
                Frame::Pong(_) => {}
                other => return Opened::Ready(Box::new(upstream), other),
            }
        }
    }

    /// Passes frames both ways until either side closes, renewing this
    /// session's count, and closes it when a drain outlasts the grace.
    async fn relay(
        &self,
        key: &ApiKey,
        mut session: actix_ws::Session,
        mut stream: actix_ws::MessageStream,
        mut upstream: Upstreamed,
        first: Frame,
    ) {
        let gw = &self.gw;
        let store = gw.store();
        if let Err(e) = live::hold(store, &key.id, &self.id).await {
            tracing::warn!(error = %e, "Live session not counted");
        }
        gw.metrics.live_sessions.inc();
        gw.observe(&key.id, "success");
        self.bill.served(gw, &key.id, None);
        let series = self.bill.series(&key.id);
        tracing::info!(key_id = %key.id, "Live session open");
        let mut closing: Option<Option<CloseReason>> = None;
        count_usage(gw, &series, self.bill.trail.as_ref(), &first);
        if !to_client(&mut session, first, &mut upstream, &mut closing).await {
            closing.get_or_insert(None);
        }
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut last_beat = Instant::now();
        let mut drain_started: Option<Instant> = None;
        let grace = gw.settings.listen.shutdown_grace;
        while closing.is_none() {
            tokio::select! {
                msg = stream.recv() => {
                    let up_msg = match msg {
                        Some(Ok(Message::Text(t))) => UpMessage::Text(t),
                        Some(Ok(Message::Binary(b))) => UpMessage::Binary(b),
                        Some(Ok(Message::Continuation(c))) => UpMessage::Continuation(c),
                        Some(Ok(Message::Ping(p))) => {
                            let _ = session.pong(&p).await;
                            continue;
                        }
                        Some(Ok(Message::Pong(_) | Message::Nop)) => continue,
                        Some(Ok(Message::Close(reason))) => {
                            let _ = upstream.send(UpMessage::Close(reason.clone())).await;
                            closing = Some(reason);
                            break;
                        }
                        Some(Err(_)) | None => {
                            // The client went away mid-session.
                            let _ = upstream.send(UpMessage::Close(None)).await;
                            closing = Some(None);
                            break;
                        }
                    };
                    if upstream.send(up_msg).await.is_err() {
                        closing = Some(close_reason(CloseCode::Error, "The upstream closed the Live session."));
                    }
                }
                frame = upstream.next() => {
                    match frame {
                        Some(Ok(frame)) => {
                            count_usage(gw, &series, self.bill.trail.as_ref(), &frame);
                            if !to_client(&mut session, frame, &mut upstream, &mut closing).await {
                                let _ = upstream.send(UpMessage::Close(None)).await;
                                closing.get_or_insert(None);
                            }
                        }
                        _ => {
                            closing = Some(close_reason(CloseCode::Error, "The upstream closed the Live session."));
                        }
                    }
                }
                _ = tick.tick() => {
                    if last_beat.elapsed() >= live::HEARTBEAT {
                        last_beat = Instant::now();
                        let _ = live::hold(store, &key.id, &self.id).await;
                    }
                    if gw.draining() {
                        let started = *drain_started.get_or_insert_with(Instant::now);
                        // Leave time for the close frames before the
                        // server stops at the end of the grace.
                        let margin = (grace / 2).min(Duration::from_secs(2));
                        if started.elapsed() + margin >= grace {
                            tracing::info!(key_id = %key.id, "closing a Live session: the replica is shutting down");
                            let _ = upstream.send(UpMessage::Close(None)).await;
                            closing = Some(close_reason(CloseCode::Away, "The gateway is shutting down; reconnect."));
                        }
                    }
                }
            }
        }
        gw.metrics.live_sessions.dec();
        live::release(store, &key.id, &self.id).await;
        tracing::info!(key_id = %key.id, "Live session closed");
        if let Some(reason) = closing {
            let _ = session.close(reason).await;
        }
    }
}

/// The model a `setup` message names (`{"setup": {"model": "models/…"}}`).
fn setup_model(setup: &UpMessage) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Setup {
        setup: Model,
    }
    #[derive(serde::Deserialize)]
    struct Model {
        model: String,
    }
    let bytes: &[u8] = match setup {
        UpMessage::Text(t) => t.as_bytes(),
        UpMessage::Binary(b) => b,
        _ => return None,
    };
    let s: Setup = serde_json::from_slice(bytes).ok()?;
    crate::domain::keys::normalize_model(&s.setup.model)
}

/// Adds the tokens of a server message that reports usage (Google sends
/// `usageMetadata` with a turn's end) to the session's series.
fn count_usage(
    gw: &Gateway,
    series: &crate::domain::usage::Series,
    trail: Option<&crate::domain::requests::Trail>,
    frame: &Frame,
) {
    let (Frame::Text(b) | Frame::Binary(b)) = frame else {
        return;
    };
    if memchr::memmem::find(b, b"usageMetadata").is_none() {
        return;
    }
    let format = crate::domain::usage::scan::Format::Gemini;
    if let Some(tokens) = crate::domain::usage::scan::tokens(format, b) {
        gw.usage.add_tokens(series, &tokens, crate::state::now_ms());
        if let Some(trail) = trail {
            trail.tokens(&tokens);
        }
    }
}

/// Passes one upstream frame to the client; `false` when the client is gone.
/// A close from the upstream sets `closing`.
#[allow(
    clippy::option_option,
    reason = "closing: None while open; Some(reason) once closing, with or without a reason"
)]
async fn to_client(
    session: &mut actix_ws::Session,
    frame: Frame,
    upstream: &mut Upstreamed,
    closing: &mut Option<Option<CloseReason>>,
) -> bool {
    let sent = match frame {
        Frame::Text(b) => match String::from_utf8(b.to_vec()) {
            Ok(t) => session.text(t).await,
            Err(_) => session.binary(b).await,
        },
        Frame::Binary(b) => session.binary(b).await,
        Frame::Continuation(c) => session.continuation(c).await,
        Frame::Ping(p) => {
            let _ = upstream.send(UpMessage::Pong(p)).await;
            Ok(())
        }
        Frame::Pong(_) => Ok(()),
        Frame::Close(reason) => {
            *closing = Some(reason);
            Ok(())
        }
    };
    sent.is_ok()
}

#[cfg(test)]
mod tests {
    use super::is_live;

    #[test]
    fn live_paths_are_recognised() {
        assert!(is_live(&[
            "ws",
            "google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
        ]));
        assert!(is_live(&[
            "ws",
            "google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateContentConstrained"
        ]));
        assert!(!is_live(&["ws", "other"]));
    }
}
