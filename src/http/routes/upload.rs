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
use crate::domain::attempt;
use crate::domain::files::{self, FileRecord};
use crate::domain::gateway::Gateway;
use crate::domain::upload::{self, Commands, UploadRecord};
use crate::http::error::{ApiError, Flavor};
use crate::http::pipeline::{self, buffered_back, stream_back, Call};
use crate::upstream::client::{query_param, KeyStyle, Upstream};

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
    let call = Call {
        flavor: FLAVOR,
        method: Method::POST,
        path: format!("/upload/{ver}/files"),
        query: edge.forward_query(),
        headers: req.headers().clone(),
        body,
        session: edge.session.clone(),
        token_id: owner.clone(),
        key_style: KeyStyle::GoogHeader,
        model: None,
        trail: super::trail_of(req),
    };
    let session = pipeline::upload_session(gw, call.session.as_ref(), &call.token_id);
    let pinned = pipeline::pin(gw, up, &[], session.as_ref(), &call.token_id).await?;
    // The answer is read (and so counted: Google started an upload session)
    // before anything else can fail.
    let answered = match pipeline::fetch_pinned(gw, up, &call, pinned, FINAL_BODY_LIMIT).await? {
        Ok(answered) => answered,
        Err(response) => return Ok(ensure_final(response)),
    };
    let Some(upstream_url) = header(&answered.headers, "x-goog-upload-url") else {
        return Ok(answered.back());
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
    let mut response = answered.back();
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
    let target = attempt::Target::Url(&record.url);
    let bill = pipeline::Bill::to(&record.owner, "upload").traced(super::trail_of(req));
    let sent = stream_up(
        gw,
        up,
        &key,
        req.method().clone(),
        target,
        req,
        payload,
        &bill,
    )
    .await;
    let mut resp = match sent {
        attempt::Sent::Answer(resp) => resp,
        // A refused or unanswered finalize may still have made the file (a
        // repeated finalize is refused; an answer can be lost): ask the
        // upload itself.
        attempt::Sent::Refused {
            status,
            headers,
            body,
            ..
        } => {
            if commands.finalize {
                if let Some((status, headers, body)) = query_final(gw, up, &record, &key).await {
                    return finish(gw, &record, status, &headers, body).await;
                }
            }
            return Ok(ensure_final(buffered_back(status, &headers, body)));
        }
        attempt::Sent::Unreachable(err) => {
            tracing::warn!(key_id = %record.key, "upload chunk could not be forwarded");
            if commands.finalize {
                if let Some((status, headers, body)) = query_final(gw, up, &record, &key).await {
                    return finish(gw, &record, status, &headers, body).await;
                }
            }
            return Err(ApiError::from(err));
        }
    };
    let finished = header(resp.headers(), "x-goog-upload-status").as_deref() == Some("final");
    if !finished && !commands.finalize {
        return Ok(stream_back(resp, gw.settings.upstream.idle_timeout));
    }
    // The upload is (or may already be) finished: the client gets its file
    // only once the gateway knows who owns it.
    let status = resp.status();
    let headers = resp.headers().clone();
    let read = pipeline::read_small(
        &mut resp,
        FINAL_BODY_LIMIT,
        gw.settings.upstream.idle_timeout,
    )
    .await;
    let (status, headers, body) = match (finished, read) {
        (true, Some(body)) => (status, headers, body),
        // The final answer was lost: ask the upload itself whether it made
        // a file.
        (_, read) => match query_final(gw, up, &record, &key).await {
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
                    status,
                    &headers,
                    read.unwrap_or_default(),
                )))
            }
        },
    };
    finish(gw, &record, status, &headers, body).await
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
    key: &crate::domain::keys::ApiKey,
) -> Option<(StatusCode, HeaderMap, Bytes)> {
    let mut headers = HeaderMap::new();
    headers.insert(
        actix_web::http::header::HeaderName::from_static("x-goog-upload-command"),
        HeaderValue::from_static("query"),
    );
    let request = attempt::Request {
        method: Method::POST,
        target: attempt::Target::Url(&record.url),
        headers: &headers,
        style: KeyStyle::GoogHeader,
        api: "upload",
        timeout: None,
    };
    let bill = pipeline::Bill::to(&record.owner, "upload");
    let attempt::Sent::Answer(mut resp) =
        pipeline::attempt_billed(gw, up, key, request, attempt::Body::Empty, &bill, true).await
    else {
        return None;
    };
    let is_final = header(resp.headers(), "x-goog-upload-status").as_deref() == Some("final");
    if !is_final {
        return None;
    }
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = pipeline::read_small(
        &mut resp,
        FINAL_BODY_LIMIT,
        gw.settings.upstream.idle_timeout,
    )
    .await?;
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
    let session = pipeline::upload_session(gw, edge.session.as_ref(), &owner);
    let key = match pipeline::pin(gw, up, &[], session.as_ref(), &owner).await? {
        Some(pinned) => pinned.key,
        None => gw
            .keys
            .next(gw.store(), &[], None)
            .await
            .map_err(ApiError::from)?,
    };
    let query = edge.forward_query();
    let target = if query.is_empty() {
        format!("/upload/{ver}/files")
    } else {
        format!("/upload/{ver}/files?{query}")
    };
    let target = attempt::Target::Path(&target);
    let bill = pipeline::Bill::to(&owner, "upload").traced(super::trail_of(req));
    let mut resp = match stream_up(gw, up, &key, Method::POST, target, req, payload, &bill).await {
        attempt::Sent::Answer(resp) => resp,
        attempt::Sent::Refused {
            status,
            headers,
            body,
            ..
        } => return Ok(ensure_final(buffered_back(status, &headers, body))),
        attempt::Sent::Unreachable(err) => return Err(ApiError::from(err)),
    };
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = pipeline::read_small(
        &mut resp,
        FINAL_BODY_LIMIT,
        gw.settings.upstream.idle_timeout,
    )
    .await
    .unwrap_or_default();
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

/// Streams an upload's bytes upstream with its key, as they arrive.
#[allow(
    clippy::too_many_arguments,
    reason = "the parts of one upstream call, each used once"
)]
async fn stream_up(
    gw: &Gateway,
    up: &Upstream,
    key: &crate::domain::keys::ApiKey,
    method: Method,
    target: attempt::Target<'_>,
    req: &HttpRequest,
    payload: web::Payload,
    bill: &pipeline::Bill,
) -> attempt::Sent {
    let length = header(req.headers(), "content-length").and_then(|v| v.parse::<u64>().ok());
    let request = attempt::Request {
        method,
        target,
        headers: req.headers(),
        style: KeyStyle::GoogHeader,
        api: "upload",
        timeout: None,
    };
    let body = attempt::Body::Stream(payload, length);
    pipeline::attempt_billed(gw, up, key, request, body, bill, true).await
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
