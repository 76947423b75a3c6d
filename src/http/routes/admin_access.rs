//! Who may use `/admin`, shared by its pages and APIs: the admin token as
//! `Authorization: Bearer`, or a page session (cookie, checked in the shared
//! store) whose forms carry its CSRF token and come from the same origin.

use actix_web::http::header::{HeaderMap, AUTHORIZATION, COOKIE};
use actix_web::http::StatusCode;
use actix_web::HttpRequest;

use crate::domain::gateway::Gateway;
use crate::http::admin_session;
use crate::http::error::ApiError;

/// The digest of the admin token in force, which every live session holds.
pub(super) fn generation(gw: &Gateway) -> Option<String> {
    gw.auth.admin_generation()
}

/// A browser's POST from another site is refused: its `Origin`, when sent,
/// must name the host the request was sent to.
pub(super) fn same_origin(req: &HttpRequest) -> Result<(), ApiError> {
    let Some(origin) = req.headers().get("origin").and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    let host = req
        .headers()
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if origin_host.eq_ignore_ascii_case(host) {
        Ok(())
    } else {
        tracing::warn!("admin form post from another origin refused");
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Cross-origin admin requests are refused.",
        ))
    }
}

fn cookie_from(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("gb_admin=").map(str::to_string))
}

pub(super) fn not_enabled() -> ApiError {
    ApiError::not_found("No route for this path.")
}

/// Who is calling: the API with the admin token, or the page with a live
/// session.
pub(super) enum Caller {
    Bearer,
    Page { session: String },
}

impl Caller {
    /// A page's form POST must carry its session's CSRF token.
    pub(super) fn check_form(&self, req: &HttpRequest, csrf: Option<&str>) -> Result<(), ApiError> {
        match self {
            Caller::Bearer => Ok(()),
            Caller::Page { session } => {
                same_origin(req)?;
                if csrf.is_some_and(|t| admin_session::csrf_matches(session, t)) {
                    Ok(())
                } else {
                    Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "The form is stale or was not sent by the admin page.",
                    ))
                }
            }
        }
    }

    pub(super) fn csrf(&self) -> String {
        match self {
            Caller::Bearer => String::new(),
            Caller::Page { session } => admin_session::csrf_token(session),
        }
    }
}

/// 404 while admin is off; 401 without a token; 403 with a wrong one (a
/// client token included).
pub(super) async fn check(gw: &Gateway, req: &HttpRequest) -> Result<Caller, ApiError> {
    if !gw.auth.admin_enabled() {
        return Err(not_enabled());
    }
    if let (Some(id), Some(gen)) = (cookie_from(req.headers()), generation(gw)) {
        if admin_session::valid(gw.store(), &id, &gen).await {
            return Ok(Caller::Page { session: id });
        }
    }
    let bearer = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match bearer {
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Admin token required (Authorization: Bearer).",
        )),
        Some(t) if gw.auth.is_admin(Some(t)) => Ok(Caller::Bearer),
        Some(_) => Err(ApiError::new(StatusCode::FORBIDDEN, "Not the admin token.")),
    }
}

pub(super) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
