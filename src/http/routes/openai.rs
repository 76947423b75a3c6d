//! Google's OpenAI-compatible API (`/{ver}/openai/…`, and the `/v1/…`
//! aliases): same pool, rotation, sessions and file routing as the native
//! routes; the real key goes upstream as `Authorization: Bearer`.

use actix_web::http::header::{HeaderMap, AUTHORIZATION};
use actix_web::{web, HttpRequest, HttpResponse};

use super::{authorized_json, Edge};
use crate::domain::gateway::Gateway;
use crate::http::error::{ApiError, Flavor};
use crate::http::pipeline;
use crate::upstream::client::{KeyStyle, Upstream};

/// A request from an OpenAI client: Bearer auth and no Gemini key header.
pub fn is_openai_client(headers: &HeaderMap) -> bool {
    !headers.contains_key("x-goog-api-key")
        && headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer "))
}

pub async fn handle(
    gw: &Gateway,
    up: &Upstream,
    req: &HttpRequest,
    payload: web::Payload,
    edge: &Edge,
    upstream_path: String,
) -> Result<HttpResponse, ApiError> {
    let flavor = Flavor::OpenAi;
    let post = req.method() == actix_web::http::Method::POST;
    let (token, body) = authorized_json(gw, req, payload, edge, post).await?;
    let model = crate::domain::keys::model_from_openai_body(&body);
    let mut call = super::call_of(req, edge, flavor, &token.id, body);
    call.path = upstream_path;
    call.key_style = KeyStyle::Bearer;
    call.model = model;
    pipeline::run(gw, up, call, super::ROUTED_STREAM)
        .await?
        .into_response()
}
