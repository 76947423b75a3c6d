//! Where a request carries its gateway token, and how a refused one is
//! answered. The tokens in force and the check itself are the domain's
//! ([`crate::domain::clients`]).

use actix_web::http::header::{HeaderMap, AUTHORIZATION};

use crate::domain::clients::TokenError;
use crate::http::error::ApiError;

/// The token a request presents, in the forms the SDKs send: the
/// `x-goog-api-key` header, `Authorization: Bearer`, or `?key=`.
pub fn presented<'a>(headers: &'a HeaderMap, query_key: Option<&'a str>) -> Option<&'a str> {
    if let Some(v) = headers.get("x-goog-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.trim());
    }
    if let Some(v) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return Some(v[7..].trim());
        }
    }
    query_key
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Missing => ApiError::unauthenticated(),
            TokenError::Unknown => ApiError::forbidden_token(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;
    use actix_web::http::StatusCode;

    #[test]
    fn each_form_the_sdks_send_is_read() {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer tok-b"));
        assert_eq!(presented(&h, Some("q")), Some("tok-b"));
        h.insert(
            actix_web::http::header::HeaderName::from_static("x-goog-api-key"),
            HeaderValue::from_static(" tok-a "),
        );
        assert_eq!(presented(&h, Some("q")), Some("tok-a"));
        assert_eq!(presented(&HeaderMap::new(), Some("q")), Some("q"));
        assert_eq!(presented(&HeaderMap::new(), None), None);
    }

    #[test]
    fn missing_is_401_and_unknown_is_403() {
        assert_eq!(
            ApiError::from(TokenError::Missing).status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            ApiError::from(TokenError::Unknown).status,
            StatusCode::FORBIDDEN
        );
    }
}
