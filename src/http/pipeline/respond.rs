//! The respond step: a success streamed back chunk by chunk through a usage
//! meter, or read whole for a route that records what the answer created;
//! an error answer passed on as Google gave it.

use std::sync::Arc;
use std::time::Duration;

use actix_web::body::SizedStream;
use actix_web::http::header::HeaderMap;
use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use bytes::Bytes;
use futures_util::StreamExt;

use super::call::Call;
use crate::domain::gateway::Gateway;
use crate::domain::keys::ApiKey;
use crate::domain::usage::meter::Meter;
use crate::domain::usage::scan;
use crate::http::error::ApiError;
use crate::upstream::client::{read_small, response_forwardable};

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
        stream_back(
            self.response,
            gw.settings.upstream.idle_timeout,
            Some(meter),
        )
    }

    /// The answer read whole (at most `limit` bytes, within the upstream
    /// deadlines), counted with the tokens it reports; `None`, counted as a
    /// cut answer, when it could not be read.
    pub async fn read(mut self, gw: &Gateway, call: &Call, limit: usize) -> Answered {
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
        Answered {
            status: self.response.status(),
            headers: self.response.headers().clone(),
            key: self.key,
            body: read,
        }
    }
}

/// A success read whole: the key that gave it, and what it said (`body` is
/// `None` when the answer could not be read whole).
pub struct Answered {
    pub key: Arc<ApiKey>,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Option<Bytes>,
}

impl Answered {
    /// The body, or the client's 502 when it could not be read whole.
    pub fn body(&self) -> Result<&Bytes, ApiError> {
        self.body.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "The upstream's answer could not be read whole.",
            )
        })
    }

    /// The answer as the client gets it.
    pub fn back(&self) -> Result<HttpResponse, ApiError> {
        Ok(buffered_back(
            self.status,
            &self.headers,
            self.body()?.clone(),
        ))
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
///
/// A usage meter sees every chunk, learns how the answer ended, and may hold
/// back what the client did not ask for.
fn stream_back<S>(
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
