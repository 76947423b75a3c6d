//! `POST /upload/{ver}/fileSearchStores/{id}:uploadToFileSearchStore`: a
//! resumable upload into a file search store, started on the store's key.
//!
//! Only the start differs from a file upload: it goes to the store's owner
//! (and only for the token that created the store). The client gets the
//! gateway's own upload URL, so its chunks travel like any upload's, on any
//! replica; the operation the upload ends with lives under the store and is
//! polled on its key.

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};

use super::{read_body, Edge};
use crate::domain::gateway::Gateway;
use crate::domain::resources;
use crate::domain::upload::{self, UploadRecord};
use crate::http::error::{ApiError, Flavor};
use crate::http::pipeline;
use crate::upstream::client::Upstream;

const FLAVOR: Flavor = Flavor::Upload;
const ANSWER_LIMIT: usize = 1 << 20;

/// The store a `/upload/{ver}/fileSearchStores/{id}:uploadToFileSearchStore`
/// path uploads into, if it is one.
pub fn store_of(segs: &[&str]) -> Option<String> {
    match segs {
        ["upload", ver, "fileSearchStores", id] if super::VERSIONS.contains(ver) => {
            let bare = id.strip_suffix(":uploadToFileSearchStore")?;
            resources::valid_id(bare).then(|| format!("fileSearchStores/{bare}"))
        }
        _ => None,
    }
}

fn upload_error(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError::new(status, message)
}

pub async fn start(
    gw: &Gateway,
    up: &Upstream,
    req: &HttpRequest,
    payload: web::Payload,
    edge: &Edge,
    ver: &str,
    store: &str,
) -> Result<HttpResponse, ApiError> {
    if req.method() != Method::POST {
        return Err(upload_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "Uploads start with POST; chunks go to the upload URL the start returned.",
        ));
    }
    let token = super::authorized(gw, req, edge).await?;
    let owner = super::resources::owner_for(gw, up, store, &token.id).await?;
    let key = gw
        .keys
        .by_id(&owner.key)
        .ok_or_else(|| upload_error(StatusCode::NOT_FOUND, format!("{store} was not found.")))?;
    let body = read_body(payload, req.headers(), gw.settings.listen.max_body_bytes).await?;
    let mut call = super::call_of(req, edge, FLAVOR, &token.id, body);
    call.method = Method::POST;
    let hooks = pipeline::Hooks {
        resolve: pipeline::Resolve::Owner(key.clone()),
        respond: pipeline::Respond::Read(ANSWER_LIMIT),
    };
    let answered = match pipeline::run(gw, up, call, hooks).await? {
        pipeline::Reply::Read(answered) => answered,
        other => return Ok(super::upload::ensure_final(other.into_response()?)),
    };
    let mut response = answered.back()?;
    let Some(upstream_url) = answered
        .headers
        .get("x-goog-upload-url")
        .and_then(|v| v.to_str().ok())
    else {
        return Ok(response);
    };
    let id = upload::new_upload_id().map_err(|_| {
        upload_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "No randomness available for an upload id.",
        )
    })?;
    let record = UploadRecord {
        key: key.id.clone(),
        url: upload::strip_key_param(upstream_url),
        session: edge.session.as_ref().map(|s| s.id.to_string()),
        owner: token.id.clone(),
    };
    upload::save(gw.store(), &id, &record, gw.settings.sessions.upload_ttl)
        .await
        .map_err(pipeline::store_down)?;
    let ours = format!(
        "{}{}/upload/{ver}/files?upload_id={id}&upload_protocol=resumable",
        super::upload::public_base(gw, req),
        edge.prefix
    );
    tracing::info!(key_id = %key.id, store, "upload into a file search store started");
    // Fail closed: Google's upload URL never reaches the client, even when
    // ours cannot be written as a header.
    let ours = HeaderValue::from_str(&ours).map_err(|_| {
        upload_error(
            StatusCode::BAD_GATEWAY,
            "The gateway could not build its upload URL for this request.",
        )
    })?;
    response
        .headers_mut()
        .insert(HeaderName::from_static("x-goog-upload-url"), ours);
    Ok(response)
}
