//! `/{ver}/files…`: the Files API, routed to the key that owns each file and
//! visible only to the client token that uploaded it.

use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse};
use bytes::Bytes;
use serde_json::{json, Value};

use super::Edge;
use crate::domain::files;
use crate::domain::gateway::Gateway;
use crate::domain::resources::{self, Kind};
use crate::http::error::{ApiError, Flavor};
use crate::http::pipeline;
use crate::upstream::client::Upstream;

fn not_found(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("File {name} was not found. It may have expired, or it was not uploaded through this gateway with this token."),
    )
}

pub async fn handle(
    gw: &Gateway,
    up: &Upstream,
    req: &HttpRequest,
    edge: &Edge,
    ver: &str,
    rest: &[String],
) -> Result<HttpResponse, ApiError> {
    let token = super::authorized(gw, req, edge).await?;
    match rest {
        [] if req.method() == Method::GET => list(gw, up, req, edge, ver, &token.id).await,
        [id] => {
            // `files/{id}` or `files/{id}:download`
            let bare = id.split(':').next().unwrap_or("");
            if !files::valid_file_id(bare) {
                return Err(ApiError::bad_request(
                    "A file id is 1-40 characters of a-z, 0-9 and -.",
                ));
            }
            let name = format!("files/{bare}");
            let known = crate::domain::resources::owner(gw.store(), &name)
                .await
                .map_err(pipeline::store_down)?;
            let record = match known {
                Some(r) => Some(r),
                None => crate::domain::discovery::discover(gw, up, &name, &token.id)
                    .await
                    .map_err(super::resources::discovery_error)?,
            }
            .filter(|r| r.owner == token.id)
            .ok_or_else(|| not_found(&name))?;
            let key = gw
                .keys
                .by_id(&record.key)
                .ok_or_else(|| crate::http::error::gone_key(&[name.as_str()]))?;
            let c = super::call_of(req, edge, Flavor::Gemini, &token.id, Bytes::new());
            let hooks = pipeline::Hooks {
                resolve: pipeline::Resolve::Only(key),
                respond: pipeline::Respond::Stream,
            };
            let reply = pipeline::run(gw, up, c, hooks).await?;
            if req.method() == Method::DELETE && matches!(reply, pipeline::Reply::Streamed(_)) {
                if let Err(e) = files::forget(gw.store(), &name, &token.id).await {
                    tracing::warn!(file = %name, error = %e, "deleted upstream but the binding stays until it expires");
                }
            }
            reply.into_response()
        }
        _ => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} is not supported on {}.", req.method(), req.uri().path()),
        )),
    }
}

/// The calling token's files, newest first, paged with the gateway's own
/// page tokens (a place in the list: files uploaded meanwhile shift nothing); metadata fetched from each file's owner key concurrently.
async fn list(
    gw: &Gateway,
    up: &Upstream,
    req: &HttpRequest,
    edge: &Edge,
    ver: &str,
    token_id: &str,
) -> Result<HttpResponse, ApiError> {
    let (page_size, after) = super::resources::page_request(edge, Kind::File)?;
    let (page, next) =
        resources::page_of_token(gw.store(), Kind::File, token_id, after.as_ref(), page_size)
            .await
            .map_err(pipeline::store_down)?;
    let records = files::owners(gw.store(), &page)
        .await
        .map_err(pipeline::store_down)?;
    let owners = records
        .iter()
        .map(|r| r.as_ref().and_then(|r| gw.keys.by_id(&r.key)))
        .collect();
    let found =
        super::resources::read_page(gw, up, req, ver, token_id, &page, owners, 1 << 20).await;
    let mut out = json!({});
    if !found.is_empty() {
        out["files"] = Value::Array(found);
    }
    if let Some(next) = next {
        out["nextPageToken"] = Value::String(resources::page_token(&next));
    }
    Ok(HttpResponse::Ok()
        .content_type("application/json; charset=UTF-8")
        .body(out.to_string()))
}
