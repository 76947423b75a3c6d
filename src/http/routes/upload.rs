//! `/upload/{ver}/files`: resumable uploads (start, chunks, finalize, status
//! query) and single-shot `raw`/`multipart` uploads.
//!
//! The start is sent upstream with the session's key (or the next key); the
//! client gets back the gateway's own upload URL, whose unguessable id is
//! the credential for the chunks, which may arrive on any replica with no
//! key at all. Chunk bodies are streamed upstream, never held in memory and
//! never parsed, whatever their `Content-Type`.

use actix_web::http::header::{HeaderMap, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;

use super::{read_body, Edge};
use crate::domain::files::{self, FileRecord};
use crate::domain::gateway::Gateway;
use crate::domain::upload::{self, Commands, UploadRecord};
use crate::http::error::{ApiError, Flavor};
use crate::http::pipeline::{self, buffered_back, Call};
use crate::upstream::client::{query_param, Upstream};

const FLAVOR: Flavor = Flavor::Upload;
const FINAL_BODY_LIMIT: usize = 1 << 20;

fn upload_error(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError::new(status, message)
}

pub async fn handle(
    gw: &Gateway,
    up: &Upstream,
    req: &HttpRequest,
    payload: web::Payload,
    edge: &Edge,
    ver: &str,
) -> Result<HttpResponse, ApiError> {
    if let Some(id) = query_param(&edge.query, "upload_id") {
        return chunk(gw, up, req, payload, &id).await;
    }
    if req.method() != Method::POST {
        return Err(upload_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "Uploads start with POST; chunks go to the upload URL the start returned.",
        ));
    }
    let token = super::authorized(gw, req, edge).await?;
    let owner = token.id.clone();
    let protocol = header(req.headers(), "x-goog-upload-protocol")
        .or_else(|| query_param(&edge.query, "uploadType"))
        .unwrap_or_default()
        .to_ascii_lowercase();
    if protocol == "resumable" {
        let commands = commands(req.headers())?;
        if !commands.start {
            return Err(upload_error(
                StatusCode::BAD_REQUEST,
                "A resumable upload starts with X-Goog-Upload-Command: start.",
            ));
        }
        start(gw, up, req, payload, edge, ver, owner).await
    } else {
        single_shot(gw, up, req, payload, edge, ver, owner).await
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
}

fn commands(headers: &HeaderMap) -> Result<Commands, ApiError> {
    let raw = header(headers, "x-goog-upload-command").unwrap_or_default();
    Commands::parse(&raw).map_err(|m| upload_error(StatusCode::BAD_REQUEST, m))
}

/// Resumable start: open the upstream session, keep its URL in the store,
/// and hand the client the gateway's own URL for it.
async fn start(
    gw: &Gateway,
    up: &Upstream,
    req: &HttpRequest,
    payload: web::Payload,
    edge: &Edge,
    ver: &str,
    owner: String,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, req.headers(), gw.settings.listen.max_body_bytes).await?;
    // The answer is read (and so counted: Google started an upload session)
    // before anything else can fail.
    let answered = match first_answer(gw, up, upload_call(req, edge, ver, &owner, body)).await? {
        Ok(answered) => answered,
        Err(refused) => return Ok(refused),
    };
    // Nothing is recorded of a start whose answer could not be read whole.
    answered.body()?;
    let Some(upstream_url) = header(&answered.headers, "x-goog-upload-url") else {
        return answered.back();
    };
    let id = upload::new_upload_id().map_err(|_| {
        upload_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "No randomness available for an upload id.",
        )
    })?;
    let record = UploadRecord {
        key: answered.key.id.clone(),
        url: upload::strip_key_param(&upstream_url),
        session: edge.session.as_ref().map(|s| s.id.to_string()),
        owner,
    };
    upload::save(gw.store(), &id, &record, gw.settings.sessions.upload_ttl)
        .await
        .map_err(pipeline::store_down)?;
    let ours = format!(
        "{}{}/upload/{ver}/files?upload_id={id}&upload_protocol=resumable",
        public_base(gw, req),
        edge.prefix
    );
    tracing::info!(key_id = %answered.key.id, session = record.session.as_deref().unwrap_or(""), "resumable upload started");
    gw.metrics.uploads_started.inc();
    // Fail closed: Google's upload URL never reaches the client, even when
    // ours cannot be written as a header.
    let ours = HeaderValue::from_str(&ours).map_err(|_| {
        upload_error(
            StatusCode::BAD_GATEWAY,
            "The gateway could not build its upload URL for this request.",
        )
    })?;
    let mut response = answered.back()?;
    response.headers_mut().insert(
        actix_web::http::header::HeaderName::from_static("x-goog-upload-url"),
        ours,
    );
    Ok(response)
}

/// The gateway's externally visible base URL: `GB_PUBLIC_URL`, else the
/// request's scheme and `Host` (or, behind a trusted proxy,
/// `X-Forwarded-Proto`/`-Host`/`-Prefix`).
pub(super) fn public_base(gw: &Gateway, req: &HttpRequest) -> String {
    if let Some(url) = &gw.settings.listen.public_url {
        return url.clone();
    }
    let headers = req.headers();
    let safe = |v: String| {
        (!v.is_empty()
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b)))
        .then_some(v)
    };
    let forwarded = |name: &str| {
        gw.settings
            .listen
            .trust_forwarded
            .then(|| header(headers, name))
            .flatten()
            .map(|v| v.split(',').next().unwrap_or("").trim().to_string())
    };
    let scheme = forwarded("x-forwarded-proto")
        .filter(|p| p == "http" || p == "https")
        .unwrap_or_else(|| {
            if req.app_config().secure() {
                "https".into()
            } else {
                "http".into()
            }
        });
    let host = forwarded("x-forwarded-host")
        .and_then(safe)
        .or_else(|| header(headers, "host").and_then(safe))
        .or_else(|| {
            req.uri()
                .authority()
                .map(ToString::to_string)
                .and_then(safe)
        })
        .unwrap_or_else(|| req.app_config().host().to_string());
    let prefix = forwarded("x-forwarded-prefix")
        .filter(|p| {
            p.starts_with('/')
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b))
        })
        .map(|p| p.trim_end_matches('/').to_string())
        .unwrap_or_default();
    format!("{scheme}://{host}{prefix}")
}

/// Chunks, finalize and status queries, routed by the upload id alone.
async fn chunk(
    gw: &Gateway,
    up: &Upstream,
    req: &HttpRequest,
    payload: web::Payload,
    id: &str,
) -> Result<HttpResponse, ApiError> {
    let unknown = || {
        upload_error(
            StatusCode::NOT_FOUND,
            "Unknown or expired upload id. Start the upload again.",
        )
    };
    if !upload::valid_upload_id(id) {
        return Err(unknown());
    }
    let commands = commands(req.headers())?;
    if let Some(offset) = header(req.headers(), "x-goog-upload-offset") {
        if offset.is_empty() || offset.len() > 20 || !offset.bytes().all(|b| b.is_ascii_digit()) {
            return Err(upload_error(
                StatusCode::BAD_REQUEST,
                "X-Goog-Upload-Offset must be a whole number of bytes.",
            ));
        }
    }
    let record = upload::load(gw.store(), id)
        .await
        .map_err(pipeline::store_down)?
        .ok_or_else(unknown)?;
    let Some(key) = gw.keys.by_id(&record.key) else {
        return Err(upload_error(
            StatusCode::CONFLICT,
            "The API key this upload was started with is no longer configured on the \
             gateway. Start the upload again.",
        ));
    };
    let trail = super::trail_of(req);
    let mut call = Call::new(
        FLAVOR,
        req.method().clone(),
        req.path().to_string(),
        &record.owner,
    );
    call.url = Some(record.url.clone());
    call.headers = req.headers().clone();
    call.stream = Some((payload, content_length(req.headers())));
    call.trail = trail.clone();
    // The upload is (or may be) finished: the client gets its file only once
    // the gateway knows who owns it.
    let hooks = pipeline::Hooks {
        resolve: pipeline::Resolve::Only(key.clone()),
        respond: if commands.finalize {
            pipeline::Respond::Read(FINAL_BODY_LIMIT)
        } else {
            pipeline::Respond::ReadIf(is_final, FINAL_BODY_LIMIT)
        },
    };
    let answered = match pipeline::run(gw, up, call, hooks).await {
        Ok(pipeline::Reply::Read(answered)) => answered,
        Ok(pipeline::Reply::Streamed(response)) => return Ok(response),
        // A refused or unanswered finalize may still have made the file (a
        // repeated finalize is refused; an answer can be lost): ask the
        // upload itself.
        Ok(pipeline::Reply::Refused(response)) => {
            if commands.finalize {
                if let Some((status, headers, body)) =
                    query_final(gw, up, &record, &key, trail).await
                {
                    return finish(gw, &record, status, &headers, body).await;
                }
            }
            return Ok(ensure_final(response));
        }
        Err(err) => {
            tracing::warn!(key_id = %record.key, "upload chunk could not be forwarded");
            if commands.finalize {
                if let Some((status, headers, body)) =
                    query_final(gw, up, &record, &key, trail).await
                {
                    return finish(gw, &record, status, &headers, body).await;
                }
            }
            return Err(err);
        }
    };
    let finished = is_final(&answered.headers);
    let (status, headers, body) = match (finished, answered.body) {
        (true, Some(body)) => (answered.status, answered.headers, body),
        // The final answer was lost: ask the upload itself whether it made
        // a file.
        (_, read) => match query_final(gw, up, &record, &key, trail).await {
            Some(found) => found,
            None if finished => {
                return Err(upload_error(
                    StatusCode::BAD_GATEWAY,
                    "The upstream's final answer could not be read. Repeat the request to \
                     finish the upload.",
                ))
            }
            None => {
                return Ok(ensure_final(buffered_back(
                    answered.status,
                    &answered.headers,
                    read.unwrap_or_default(),
                )))
            }
        },
    };
    finish(gw, &record, status, &headers, body).await
}

/// Whether an upload's answer says it is finished.
fn is_final(headers: &HeaderMap) -> bool {
    header(headers, "x-goog-upload-status").as_deref() == Some("final")
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    header(headers, "content-length").and_then(|v| v.parse::<u64>().ok())
}

/// An upload's final answer reaches the client only once its file's owner
/// is recorded.
async fn finish(
    gw: &Gateway,
    record: &UploadRecord,
    status: StatusCode,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<HttpResponse, ApiError> {
    match record_file(gw, &body, &record.key, &record.owner).await {
        Recorded::Yes | Recorded::NoName => Ok(buffered_back(status, headers, body)),
        Recorded::StoreFailed => Err(upload_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "The file was created, but the gateway could not record which key owns it. \
             Repeat the request to finish the upload.",
        )
        .retry_after(1)),
    }
}

/// A `query` to an upload that may be finished: its final answer (with the
/// file) when it is.
async fn query_final(
    gw: &Gateway,
    up: &Upstream,
    record: &UploadRecord,
    key: &std::sync::Arc<crate::domain::keys::ApiKey>,
    trail: Option<crate::domain::requests::Trail>,
) -> Option<(StatusCode, HeaderMap, Bytes)> {
    let mut call = Call::new(FLAVOR, Method::POST, "/upload".to_string(), &record.owner);
    call.url = Some(record.url.clone());
    call.headers.insert(
        actix_web::http::header::HeaderName::from_static("x-goog-upload-command"),
        HeaderValue::from_static("query"),
    );
    call.trail = trail;
    let hooks = pipeline::Hooks {
        resolve: pipeline::Resolve::Only(key.clone()),
        respond: pipeline::Respond::Read(FINAL_BODY_LIMIT),
    };
    let Ok(pipeline::Reply::Read(answered)) = pipeline::run(gw, up, call, hooks).await else {
        return None;
    };
    if !is_final(&answered.headers) {
        return None;
    }
    let (status, headers, body) = (answered.status, answered.headers, answered.body?);
    tracing::info!(key_id = %record.key, "upload's final answer recovered by a status query");
    Some((status, headers, body))
}

enum Recorded {
    Yes,
    /// The answer names no file: nothing to record.
    NoName,
    /// The store failed, even after brief retries.
    StoreFailed,
}

/// Remembers who owns the file an upload created, from Google's answer
/// (`{"file": {"name": "files/…"}}`), retrying briefly when the store fails:
/// a file whose owner is not recorded could later be claimed by another
/// token through discovery.
async fn record_file(gw: &Gateway, body: &Bytes, key_id: &str, owner: &str) -> Recorded {
    let name = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let file = v.get("file").cloned().unwrap_or(v);
            file.get("name")
                .and_then(|n| n.as_str())
                .map(str::to_string)
        });
    if name
        .as_deref()
        .is_some_and(|n| n.starts_with("fileSearchStores/"))
    {
        // An upload into a file search store ends with an operation of the
        // store, which follows the store's owner record.
        return Recorded::NoName;
    }
    let Some(name) = name.filter(|n| files::file_name_from_uri(n).as_deref() == Some(n.as_str()))
    else {
        tracing::warn!(
            key_id,
            "upload finished but its answer names no file; ownership not recorded"
        );
        return Recorded::NoName;
    };
    let record = FileRecord {
        key: key_id.to_string(),
        owner: owner.to_string(),
    };
    let mut failure = None;
    for pause_ms in [0, 100, 400] {
        tokio::time::sleep(std::time::Duration::from_millis(pause_ms)).await;
        match files::remember(gw.store(), &name, &record, gw.settings.sessions.file_ttl).await {
            Ok(()) => {
                gw.metrics.files_recorded.inc();
                tracing::info!(file = %name, key_id, "file uploaded; owner recorded");
                return Recorded::Yes;
            }
            Err(e) => failure = Some(e),
        }
    }
    if let Some(e) = failure {
        tracing::error!(file = %name, key_id, error = %e, "file uploaded but its owner could not be recorded");
    }
    Recorded::StoreFailed
}

/// Single-shot `raw` or `multipart` upload: streamed upstream with the
/// session's key (or the next key); not retried, since the body is gone.
async fn single_shot(
    gw: &Gateway,
    up: &Upstream,
    req: &HttpRequest,
    payload: web::Payload,
    edge: &Edge,
    ver: &str,
    owner: String,
) -> Result<HttpResponse, ApiError> {
    let mut call = upload_call(req, edge, ver, &owner, Bytes::new());
    call.stream = Some((payload, content_length(req.headers())));
    let answered = match first_answer(gw, up, call).await? {
        Ok(answered) => answered,
        Err(refused) => return Ok(refused),
    };
    let (key, status, headers) = (answered.key, answered.status, answered.headers);
    let body = answered.body.unwrap_or_default();
    if let Recorded::StoreFailed = record_file(gw, &body, &key.id, &owner).await {
        return Err(upload_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "The file was created, but the gateway could not record which key owns it. \
             Upload it again.",
        )
        .retry_after(1));
    }
    Ok(buffered_back(status, &headers, body))
}

/// The first request of an upload (a resumable start, or a single-shot
/// upload whole), for the upload's session or token binding.
fn upload_call(req: &HttpRequest, edge: &Edge, ver: &str, owner: &str, body: Bytes) -> Call {
    Call {
        method: Method::POST,
        path: format!("/upload/{ver}/files"),
        ..super::call_of(req, edge, FLAVOR, owner, body)
    }
}

/// An upload's first request sent on its key: the answer read whole, or
/// the client's answer now (Google's refusal, `final`).
async fn first_answer(
    gw: &Gateway,
    up: &Upstream,
    call: Call,
) -> Result<Result<pipeline::Answered, HttpResponse>, ApiError> {
    let hooks = pipeline::Hooks {
        resolve: pipeline::Resolve::Upload,
        respond: pipeline::Respond::Read(FINAL_BODY_LIMIT),
    };
    Ok(match pipeline::run(gw, up, call, hooks).await? {
        pipeline::Reply::Read(answered) => Ok(answered),
        other => Err(ensure_final(other.into_response()?)),
    })
}

/// Every error on the upload path says `x-goog-upload-status: final`, or the
/// SDKs keep retrying.
pub(super) fn ensure_final(mut response: HttpResponse) -> HttpResponse {
    if !response.status().is_success() {
        response.headers_mut().insert(
            actix_web::http::header::HeaderName::from_static("x-goog-upload-status"),
            HeaderValue::from_static("final"),
        );
    }
    response
}
