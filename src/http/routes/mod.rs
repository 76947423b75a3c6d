//! The HTTP surface. Operational routes are registered with actix; every API
//! route goes through [`dispatch`], which mirrors Google's URL layout (with an
//! optional `/session/{sid}` prefix) and hands each request to a thin handler.

use actix_web::http::header::HeaderMap;
use actix_web::http::{Method, StatusCode};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use crate::domain::clients::Auth;
use crate::domain::gateway::Gateway;
use crate::domain::identity::ClientToken;
use crate::domain::requests::Trail;
use crate::domain::session::{self, Session};
use crate::http::admission::admit;
use crate::http::error::{ApiError, Flavor};
use crate::http::pipeline::{self, Call};
use crate::upstream::client::{filtered_query, query_param, Upstream};

pub mod admin;
mod admin_access;
pub mod admin_limits;
pub mod admin_requests;
pub mod admin_usage;
pub mod files;
pub mod live;
pub mod openai;
pub mod ops;
pub mod resources;
pub mod store_upload;
pub mod upload;

pub const VERSIONS: [&str; 3] = ["v1", "v1beta", "v1alpha"];

/// Methods that generate content must be called with POST.
const POST_ACTIONS: [&str; 5] = [
    ":generateContent",
    ":streamGenerateContent",
    ":countTokens",
    ":embedContent",
    ":batchEmbedContents",
];

/// What the edge learned from a request before any handler runs.
pub struct Edge {
    /// `/session/{sid}` as the client sent it, or empty.
    pub prefix: String,
    /// The path after the prefix, as Google would see it.
    pub path: String,
    pub query: String,
    /// The query as the upstream gets it (see [`filtered_query`]).
    forward: String,
    pub session: Option<Session>,
}

impl Edge {
    fn parse(req: &HttpRequest) -> Result<Self, ApiError> {
        check_header_sizes(req.headers())?;
        let full = req.uri().path();
        if full.len() > MAX_PATH || req.query_string().len() > MAX_QUERY {
            return Err(ApiError::new(
                StatusCode::URI_TOO_LONG,
                format!("The path may be {MAX_PATH} and the query {MAX_QUERY} bytes at most."),
            ));
        }
        if full
            .bytes()
            .any(|b| b.is_ascii_control() || b == b'\\' || !b.is_ascii())
        {
            return Err(ApiError::bad_request(
                "The path holds characters a Gemini path never has.",
            ));
        }
        if full
            .split('/')
            .any(|seg| seg == ".." || seg == "." || seg.to_ascii_lowercase().contains("%2e%2e"))
        {
            return Err(ApiError::bad_request(
                "Path segments '.' and '..' are not allowed.",
            ));
        }
        let (prefix, path_sid, path) = match full.strip_prefix("/session/") {
            Some(rest) => {
                let (sid, tail) = rest.split_once('/').unwrap_or((rest, ""));
                let prefix_len = "/session/".len() + sid.len();
                (
                    full[..prefix_len].to_string(),
                    Some(sid.to_string()),
                    format!("/{tail}"),
                )
            }
            None => (String::new(), None, full.to_string()),
        };
        let query = req.query_string().to_string();
        let forward = filtered_query(&query).map_err(|e| {
            ApiError::bad_request(format!(
                "Invalid query string: {e}: names must decode to UTF-8 text without control characters."
            ))
            .kind("bad_query")
        })?;
        let header_sid = req
            .headers()
            .get("x-session-id")
            .and_then(|v| v.to_str().ok());
        let query_sid = query_param(&query, "session_id");
        let session = session::pick(path_sid.as_deref(), header_sid, query_sid.as_deref());
        Ok(Edge {
            prefix,
            path,
            query,
            forward,
            session,
        })
    }

    pub fn segments(&self) -> Vec<&str> {
        self.path.split('/').filter(|s| !s.is_empty()).collect()
    }

    pub fn query_key(&self) -> Option<String> {
        query_param(&self.query, "key")
    }

    pub fn forward_query(&self) -> String {
        self.forward.clone()
    }
}

const MAX_PATH: usize = 2048;
const MAX_QUERY: usize = 8192;

/// Longest single header value and all headers together that the gateway
/// accepts; larger ones are refused with 431 before any work is done.
const MAX_HEADER_VALUE: usize = 8 * 1024;
const MAX_HEADERS_TOTAL: usize = 32 * 1024;

fn check_header_sizes(headers: &HeaderMap) -> Result<(), ApiError> {
    let mut total = 0;
    for (name, value) in headers {
        let len = name.as_str().len() + value.len();
        total += len;
        if value.len() > MAX_HEADER_VALUE || total > MAX_HEADERS_TOTAL {
            return Err(ApiError::new(
                StatusCode::from_u16(431).unwrap_or(StatusCode::BAD_REQUEST),
                format!(
                    "Request headers too large: at most {MAX_HEADER_VALUE} bytes a header and \
                     {MAX_HEADERS_TOTAL} bytes in all."
                ),
            ));
        }
    }
    Ok(())
}

/// Authenticates the client; the token's id is all the rest of the request sees.
pub fn authorize(
    auth: &Auth,
    headers: &HeaderMap,
    edge: &Edge,
) -> Result<std::sync::Arc<ClientToken>, ApiError> {
    let query_key = edge.query_key();
    auth.verify(crate::http::auth::presented(headers, query_key.as_deref()))
        .map_err(ApiError::from)
}

/// Reads a whole request body, refusing more than `limit` bytes.
pub async fn read_body(
    mut payload: web::Payload,
    headers: &HeaderMap,
    limit: usize,
) -> Result<bytes::Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("The request body is larger than the gateway's limit of {limit} bytes."),
        )
    };
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(0).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::bad_request(format!("The request body could not be read: {e}"))
        })?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The edge steps of a request that carries a JSON body, in order:
/// authenticate, read the body within `GB_MAX_BODY_BYTES`, check it is JSON
/// (always when `required`, else only when it says so), admit it against
/// its client's limits (the model from the path, else the body's `model`).
pub async fn authorized_json(
    gw: &Gateway,
    req: &HttpRequest,
    payload: web::Payload,
    edge: &Edge,
    required: bool,
) -> Result<(std::sync::Arc<ClientToken>, bytes::Bytes), ApiError> {
    let token = authorize(&gw.auth, req.headers(), edge)?;
    let body = read_body(payload, req.headers(), gw.settings.listen.max_body_bytes).await?;
    check_json(&body, req.headers(), required)?;
    admit(gw, req, &token, || {
        crate::domain::keys::model_from_path(&edge.path)
            .or_else(|| crate::domain::keys::model_from_openai_body(&body))
    })
    .await?;
    Ok((token, body))
}

/// The request's trail, which [`dispatch`] left in its extensions.
pub fn trail_of(req: &HttpRequest) -> Option<Trail> {
    req.extensions().get::<Trail>().cloned()
}

/// The edge steps of a request without a JSON body: authenticate, then
/// admit it against its client's limits.
pub async fn authorized(
    gw: &Gateway,
    req: &HttpRequest,
    edge: &Edge,
) -> Result<std::sync::Arc<ClientToken>, ApiError> {
    let token = authorize(&gw.auth, req.headers(), edge)?;
    admit(gw, req, &token, || {
        crate::domain::keys::model_from_path(&edge.path)
    })
    .await?;
    Ok(token)
}

const MAX_JSON_DEPTH: usize = 100;

/// Rejects a body that is not JSON where JSON is required (content routes),
/// or that claims to be JSON but is not, before it costs an upstream call.
fn check_json(body: &[u8], headers: &HeaderMap, required: bool) -> Result<(), ApiError> {
    let declared_json = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().contains("json"));
    if !(required || declared_json) || body.is_empty() {
        return Ok(());
    }
    if crate::domain::scan::depth::json_depth(body) > MAX_JSON_DEPTH {
        return Err(ApiError::bad_request(format!(
            "Invalid JSON payload received: nested deeper than {MAX_JSON_DEPTH} levels."
        )));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(body)
        .map(|_| ())
        .map_err(|e| {
            ApiError::bad_request(format!(
                "Invalid JSON payload received: {} at line {} column {}.",
                match e.classify() {
                    serde_json::error::Category::Eof => "unexpected end of input",
                    serde_json::error::Category::Io => "unreadable input",
                    _ => "malformed JSON",
                },
                e.line(),
                e.column()
            ))
        })
}

/// Where an API request goes: the one table [`dispatch`] follows, and the
/// label metrics and usage count it under ([`Target::label`]).
#[derive(Debug)]
pub enum Target {
    /// The Live API's WebSocket.
    Live,
    /// An upload into a file search store.
    StoreUpload { ver: String, store: String },
    /// A Files API upload: its start, or a chunk on the URL it handed out.
    Upload { ver: String },
    /// The OpenAI-compatible routes, with the upstream path.
    OpenAi { path: String },
    /// A file's bytes.
    Download { ver: String, id: String },
    /// Caches, batches, operations, file search stores, Live tokens.
    Resource {
        ver: String,
        route: resources::Route,
    },
    /// The Files API but uploads.
    Files { ver: String, rest: Vec<String> },
    /// Every other `/{ver}/…` path: models, generate, stream, count, embed.
    Native,
}

impl Target {
    /// The route of an API path (`path` without a session prefix); `None`
    /// for a path the gateway does not serve. `headers` tell an OpenAI
    /// client's `/v1/models` from Google's.
    pub fn of(method: &Method, path: &str, headers: &HeaderMap) -> Option<Target> {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        Some(match segs.as_slice() {
            live_path if live::is_live(live_path) => Target::Live,
            upload_path if store_upload::store_of(upload_path).is_some() => Target::StoreUpload {
                ver: upload_path
                    .get(1)
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                store: store_upload::store_of(upload_path).unwrap_or_default(),
            },
            ["upload", ver, "files"] if VERSIONS.contains(ver) => Target::Upload {
                ver: (*ver).to_string(),
            },
            [ver, "openai", ..] if VERSIONS.contains(ver) => Target::OpenAi {
                path: path.to_string(),
            },
            ["v1", "chat", "completions"] | ["v1", "embeddings"] => Target::OpenAi {
                path: format!("/v1beta/openai{}", &path["/v1".len()..]),
            },
            ["v1", "models", ..] if openai::is_openai_client(headers) => Target::OpenAi {
                path: format!("/v1beta/openai{}", &path["/v1".len()..]),
            },
            ["download", ver, "files", id] if VERSIONS.contains(ver) && method == Method::GET => {
                Target::Download {
                    ver: (*ver).to_string(),
                    id: (*id).to_string(),
                }
            }
            [ver, rest @ ..] if VERSIONS.contains(ver) => match resources::route(rest, method) {
                Some(route) => Target::Resource {
                    ver: (*ver).to_string(),
                    route,
                },
                None => match rest {
                    ["files", rest @ ..] if method != Method::POST => Target::Files {
                        ver: (*ver).to_string(),
                        rest: rest.iter().map(ToString::to_string).collect(),
                    },
                    _ => Target::Native,
                },
            },
            _ => return None,
        })
    }

    /// The error JSON the route's clients read: OpenAI's on the OpenAI
    /// routes, Google's with `x-goog-upload-status: final` on uploads (else
    /// the SDKs retry), Google's everywhere else. Applied once, to whatever
    /// error the route's handler returns.
    pub fn flavor(&self) -> Flavor {
        match self {
            Target::OpenAi { .. } => Flavor::OpenAi,
            Target::StoreUpload { .. } | Target::Upload { .. } => Flavor::Upload,
            _ => Flavor::Gemini,
        }
    }

    /// The route class metrics (`gb_requests_total{route}`) and usage count
    /// this request under.
    pub fn label(&self, method: &Method, path: &str) -> &'static str {
        match self {
            Target::Live => "live",
            Target::StoreUpload { .. } | Target::Upload { .. } => "upload",
            Target::OpenAi { path } if path.contains("/chat/completions") => "openai_chat",
            Target::OpenAi { path } if path.contains("/embeddings") => "openai_embeddings",
            Target::OpenAi { .. } => "openai_other",
            Target::Files { .. } if method == Method::DELETE => "files_delete",
            Target::Download { .. } | Target::Files { .. } => "files",
            Target::Resource { .. } => "resources",
            Target::Native => {
                let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
                match segs.as_slice() {
                    [_, "models"] | [_, "models", _] if !path.contains(':') => "models",
                    _ if path.ends_with(":generateContent") => "generate",
                    _ if path.ends_with(":streamGenerateContent") => "stream",
                    _ if path.ends_with(":countTokens") => "count_tokens",
                    _ if path.ends_with(":embedContent")
                        || path.ends_with(":batchEmbedContents") =>
                    {
                        "embed"
                    }
                    _ => "other",
                }
            }
        }
    }
}

/// The route class of an upstream path a handler built (the label of its
/// [`Target`]; `unknown` for none).
pub fn label_of(method: &Method, path: &str) -> &'static str {
    Target::of(method, path, &HeaderMap::new()).map_or("unknown", |t| t.label(method, path))
}

/// The route class a request was counted under, left in its extensions by
/// [`dispatch`] for the metrics step.
#[derive(Debug, Clone, Copy)]
pub struct RouteLabel(pub &'static str);

/// Every API route: the edge checks, then the handler [`Target::of`] names.
pub async fn dispatch(
    req: HttpRequest,
    payload: web::Payload,
    gw: web::Data<Gateway>,
    up: web::Data<Upstream>,
) -> Result<HttpResponse, ApiError> {
    let edge = Edge::parse(&req)?;
    let method = req.method().clone();
    let Some(target) = Target::of(&method, &edge.path, req.headers()) else {
        return Err(ApiError::not_found(format!(
            "No route for {} {}. The gateway serves Google's layout: /v1beta/models/..., \
             /upload/v1beta/files, /v1beta/openai/... (also under /session/{{id}}/).",
            method,
            req.uri().path()
        )));
    };
    let route = target.label(&method, &edge.path);
    req.extensions_mut().insert(RouteLabel(route));
    let request_id = req
        .extensions()
        .get::<crate::ops::telemetry::RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let trail = Trail::new(request_id, route);
    req.extensions_mut().insert(trail.clone());
    let live = matches!(target, Target::Live);
    let flavor = target.flavor();
    let answer = match target {
        Target::Live => live::handle(gw.clone(), up.clone(), &req, payload, &edge).await,
        Target::StoreUpload { ver, store } => {
            store_upload::start(&gw, &up, &req, payload, &edge, &ver, &store).await
        }
        Target::Upload { ver } => upload::handle(&gw, &up, &req, payload, &edge, &ver).await,
        Target::OpenAi { path } => openai::handle(&gw, &up, &req, payload, &edge, path).await,
        Target::Download { ver, id } => files::handle(&gw, &up, &req, &edge, &ver, &[id]).await,
        Target::Resource { ver, route } => {
            resources::handle(&gw, &up, &req, payload, &edge, &ver, route).await
        }
        Target::Files { ver, rest } => files::handle(&gw, &up, &req, &edge, &ver, &rest).await,
        Target::Native => native(&gw, &up, &req, payload, &edge).await,
    };
    let ticket = req
        .extensions_mut()
        .remove::<crate::domain::limits::Ticket>();
    let response = match answer {
        Ok(response) => response,
        Err(e) => actix_web::ResponseError::error_response(&e.flavor(flavor)),
    };
    // A Live session's record is written when it closes, by its relay.
    let finish = (!live).then(|| Finish {
        gw: gw.into_inner(),
        trail,
        span: crate::ops::telemetry::request_span(),
        status: response.status().as_u16(),
        kind: response
            .extensions()
            .get::<crate::http::error::ErrorKind>()
            .map(|k| k.0),
    });
    Ok(hold_until_sent(response, ticket, finish))
}

/// The answer's body, holding what must last until it is sent (or the
/// client goes away): the request's client-limit ticket, and its trail,
/// which becomes its record in the request log then.
fn hold_until_sent(
    response: HttpResponse,
    ticket: Option<crate::domain::limits::Ticket>,
    finish: Option<Finish>,
) -> HttpResponse {
    if ticket.is_none() && finish.is_none() {
        return response;
    }
    response.map_body(|_, body| {
        let declared = match actix_web::body::MessageBody::size(&body) {
            actix_web::body::BodySize::Sized(n) => Some(n),
            _ => None,
        };
        actix_web::body::BoxBody::new(Holding {
            body,
            ticket,
            declared,
            sent: 0,
            _finish: finish,
        })
    })
}

/// Writes a request's record when dropped: when its answer has been sent.
struct Finish {
    gw: std::sync::Arc<Gateway>,
    trail: Trail,
    /// The request's span, which the record's facts are written on too.
    span: tracing::Span,
    status: u16,
    kind: Option<&'static str>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        let auth = &self.gw.auth;
        let record = self
            .trail
            .finish(self.status, self.kind, |id| auth.label_of(id));
        record_on(&self.span, &record, &self.gw.replica);
        self.gw.requests.push(record);
    }
}

/// What a finished request's record says, on its span (the request span,
/// or a Live session's).
pub(crate) fn record_on(
    span: &tracing::Span,
    record: &crate::domain::requests::Record,
    replica: &str,
) {
    if !crate::ops::telemetry::exporting() || span.is_disabled() {
        return;
    }
    span.record("route", &*record.route);
    span.record("replica", replica);
    if !record.token_id.is_empty() {
        span.record("token_id", record.token_id.as_str());
    }
    if let Some(model) = &record.model {
        span.record("model", model.as_str());
    }
    if let Some(key) = &record.key_id {
        span.record("key_id", key.as_str());
    }
    span.record("attempts", i64::from(record.attempts));
    span.record("outcome", &*record.outcome);
    if let Some(how) = &record.chosen_by {
        span.record("chosen_by", &**how);
    }
    if let Some(t) = &record.tokens {
        span.record("tokens.prompt", i64::try_from(t.prompt).unwrap_or(i64::MAX));
        span.record("tokens.output", i64::try_from(t.output).unwrap_or(i64::MAX));
    }
}

struct Holding {
    body: actix_web::body::BoxBody,
    /// The request's slot under its client's limits: given back as soon as
    /// the body's last byte has been produced, before the server sends the
    /// end of the answer, so a client that sends its next request the
    /// moment an answer ends finds its slot free; else when dropped (the
    /// client went away).
    ticket: Option<crate::domain::limits::Ticket>,
    /// The body's length when known up front, and the bytes produced so far.
    declared: Option<u64>,
    sent: u64,
    _finish: Option<Finish>,
}

impl actix_web::body::MessageBody for Holding {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> actix_web::body::BodySize {
        self.body.size()
    }

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<bytes::Bytes, Self::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.body).poll_next(cx);
        match &polled {
            std::task::Poll::Ready(None) => this.ticket = None,
            std::task::Poll::Ready(Some(Ok(chunk))) => {
                this.sent += chunk.len() as u64;
                if this.declared.is_some_and(|n| this.sent >= n) {
                    this.ticket = None;
                }
            }
            _ => {}
        }
        polled
    }
}

/// Native Gemini routes: models, generate, stream, count, embed, and every
/// other `/{ver}/…` path, forwarded with rotation and file routing.
async fn native(
    gw: &Gateway,
    up: &Upstream,
    req: &HttpRequest,
    payload: web::Payload,
    edge: &Edge,
) -> Result<HttpResponse, ApiError> {
    let flavor = Flavor::Gemini;
    let action = POST_ACTIONS.iter().find(|a| edge.path.ends_with(**a));
    if let Some(action) = action {
        if req.method() != Method::POST {
            return Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!(
                    "{} must be called with POST, not {}.",
                    &action[1..],
                    req.method()
                ),
            ));
        }
    }
    let (token, body) = authorized_json(gw, req, payload, edge, action.is_some()).await?;
    let call = Call {
        model: crate::domain::keys::model_from_path(&edge.path),
        ..call_of(req, edge, flavor, &token.id, body)
    };
    pipeline::run(gw, up, call, ROUTED_STREAM)
        .await?
        .into_response()
}

/// The hooks of a request routed like any other (what its body names, its
/// session, else the rotation) and streamed back.
const ROUTED_STREAM: pipeline::Hooks = pipeline::Hooks {
    resolve: pipeline::Resolve::Routed,
    respond: pipeline::Respond::Stream,
};

/// The pipeline's context for a request the edge read: its path, the query
/// it forwards, its headers, session and trail (the route adds its model).
fn call_of(req: &HttpRequest, edge: &Edge, flavor: Flavor, token_id: &str, body: Bytes) -> Call {
    Call {
        query: edge.forward_query(),
        headers: req.headers().clone(),
        body,
        session: edge.session.clone(),
        trail: trail_of(req),
        ..Call::new(flavor, req.method().clone(), edge.path.clone(), token_id)
    }
}

#[cfg(test)]
mod tests {
    use super::{label_of, Target};
    use actix_web::http::header::{HeaderMap, HeaderValue, AUTHORIZATION};
    use actix_web::http::Method;

    #[test]
    fn every_route_has_its_label() {
        let post = Method::POST;
        let cases = [
            (&post, "/v1beta/models/g:generateContent", "generate"),
            (&post, "/v1/models/g:streamGenerateContent", "stream"),
            (&post, "/v1beta/models/g:countTokens", "count_tokens"),
            (&post, "/v1beta/models/g:batchEmbedContents", "embed"),
            (&Method::GET, "/v1/models", "models"),
            (&Method::GET, "/v1beta/models/gemini-2.0-flash", "models"),
            (&post, "/v1beta/openai/chat/completions", "openai_chat"),
            (&post, "/v1/chat/completions", "openai_chat"),
            (&post, "/v1/embeddings", "openai_embeddings"),
            (&post, "/upload/v1beta/files", "upload"),
            (
                &post,
                "/upload/v1beta/fileSearchStores/s1:uploadToFileSearchStore",
                "upload",
            ),
            (&Method::DELETE, "/v1beta/files/abc", "files_delete"),
            (&Method::GET, "/v1beta/files", "files"),
            (&Method::GET, "/download/v1beta/files/abc:download", "files"),
            (&post, "/v1beta/cachedContents", "resources"),
            (&post, "/v1beta/models/g:batchGenerateContent", "resources"),
            (&Method::GET, "/v1beta/batches/b1", "resources"),
            (
                &Method::GET,
                "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent",
                "live",
            ),
            (&Method::GET, "/nope", "unknown"),
        ];
        for (method, path, label) in cases {
            assert_eq!(label_of(method, path), label, "{method} {path}");
        }
    }

    #[test]
    fn an_openai_client_listing_models_is_sent_to_the_openai_routes() {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        let t = Target::of(&Method::GET, "/v1/models", &headers);
        assert!(
            matches!(&t, Some(Target::OpenAi { path }) if path == "/v1beta/openai/models"),
            "{t:?}"
        );
        assert!(matches!(
            Target::of(&Method::GET, "/v1/models", &HeaderMap::new()),
            Some(Target::Native)
        ));
    }
}
