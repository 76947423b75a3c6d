//! Client authentication: which gateway token, if any, a request carries.

use actix_web::http::header::{HeaderMap, AUTHORIZATION};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::identity::ClientToken;

pub struct Auth {
    tokens: Vec<(ClientToken, [u8; 32])>,
    admin: Option<[u8; 32]>,
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

impl Auth {
    pub fn new(tokens: &[secrecy::SecretString], admin: Option<&secrecy::SecretString>) -> Self {
        Self {
            tokens: tokens
                .iter()
                .map(|t| {
                    let d = digest(t.expose_secret());
                    (ClientToken::new(t.clone()), d)
                })
                .collect(),
            admin: admin.map(|a| digest(a.expose_secret())),
        }
    }

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

    /// Checks a presented token in constant time against every client token
    /// (digests have one length, so not even the length leaks).
    pub fn verify(&self, presented: Option<&str>) -> Result<&ClientToken, ApiError> {
        let presented = presented
            .filter(|p| !p.is_empty())
            .ok_or_else(ApiError::unauthenticated)?;
        let d = digest(presented);
        let mut found = None;
        for (token, td) in &self.tokens {
            if bool::from(td.ct_eq(&d)) {
                found = Some(token);
            }
        }
        found.ok_or_else(ApiError::forbidden_token)
    }

    /// Whether the presented token is the admin token (never a client token).
    pub fn is_admin(&self, presented: Option<&str>) -> bool {
        match (&self.admin, presented) {
            (Some(admin), Some(p)) => bool::from(admin.ct_eq(&digest(p))),
            _ => false,
        }
    }

    pub fn admin_enabled(&self) -> bool {
        self.admin.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;
    use actix_web::http::StatusCode;
    use secrecy::SecretString;

    fn auth() -> Auth {
        Auth::new(
            &[SecretString::from("tok-a"), SecretString::from("tok-b")],
            Some(&SecretString::from("adm")),
        )
    }

    #[test]
    fn accepts_each_form() {
        let a = auth();
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer tok-b"));
        assert!(a.verify(Auth::presented(&h, None)).is_ok());
        let h = HeaderMap::new();
        assert!(a.verify(Auth::presented(&h, Some("tok-a"))).is_ok());
    }

    #[test]
    fn missing_is_401_and_wrong_is_403() {
        let a = auth();
        assert_eq!(a.verify(None).unwrap_err().status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            a.verify(Some("nope")).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            a.verify(Some("adm")).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        assert!(a.is_admin(Some("adm")));
        assert!(!a.is_admin(Some("tok-a")));
    }
}
