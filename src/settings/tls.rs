//! `tls`: the optional HTTPS listener's certificate and key.

use super::raw::{is_file, Raw};
use super::{err, SettingsError};

/// PEM certificate chain and key: the listener serves HTTPS and WSS.
#[derive(Debug, Clone)]
pub struct Tls {
    /// `GB_TLS_CERT`.
    pub cert: String,
    /// `GB_TLS_KEY`.
    pub key: String,
}

impl Tls {
    pub const VARS: &'static [&'static str] = &["GB_TLS_CERT", "GB_TLS_KEY"];

    /// Both files or neither.
    pub(super) fn load(raw: &Raw) -> Result<Option<Self>, SettingsError> {
        let (cert, key) = (raw.opt("GB_TLS_CERT"), raw.opt("GB_TLS_KEY"));
        match (&cert, &key) {
            (Some(_), None) => return Err(err("GB_TLS_KEY", "is required with GB_TLS_CERT")),
            (None, Some(_)) => return Err(err("GB_TLS_CERT", "is required with GB_TLS_KEY")),
            _ => {}
        }
        for (var, path) in [("GB_TLS_CERT", &cert), ("GB_TLS_KEY", &key)] {
            if path.as_deref().is_some_and(|p| !is_file(p)) {
                return Err(err(var, "the file it names does not exist"));
            }
        }
        Ok(cert.zip(key).map(|(cert, key)| Tls { cert, key }))
    }
}

#[cfg(test)]
mod tests {
    use crate::settings::testing::with_secrets;

    #[test]
    fn tls_needs_both_files() {
        let e = with_secrets(&[("GB_TLS_CERT", "/nonexistent/cert.pem")]).unwrap_err();
        assert_eq!(e.to_string(), "GB_TLS_KEY: is required with GB_TLS_CERT");
        let e = with_secrets(&[("GB_TLS_KEY", "/nonexistent/key.pem")]).unwrap_err();
        assert_eq!(e.to_string(), "GB_TLS_CERT: is required with GB_TLS_KEY");
        let e = with_secrets(&[
            ("GB_TLS_CERT", "/nonexistent/cert.pem"),
            ("GB_TLS_KEY", "/nonexistent/key.pem"),
        ])
        .unwrap_err();
        assert_eq!(e.var, "GB_TLS_CERT");
    }
}
