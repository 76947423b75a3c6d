//! `admin`: the admin page, its token, and the internal listener.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;

use super::raw::Raw;
use super::{err, Clients, Listen, SecretFile, SettingsError};
use crate::secrets::parse_admin;

/// The admin page, its token, and the internal listener.
#[derive(Debug, Clone)]
pub struct Admin {
    /// `GB_ADMIN_TOKEN` or `GB_ADMIN_TOKEN_FILE`; `None` turns `/admin` off.
    pub token: Option<SecretString>,
    /// `GB_ADMIN_TOKEN_FILE`, re-read while running.
    pub token_file: Option<SecretFile>,
    /// Lifetime of an admin page session (`GB_ADMIN_SESSION_TTL`).
    pub session_ttl: Duration,
    /// Internal listener for `/metrics` and `/admin` (`GB_ADMIN_LISTEN`);
    /// when set, the public listener answers 404 there.
    pub listen: Option<SocketAddr>,
}

impl Admin {
    pub const VARS: &'static [&'static str] = &[
        "GB_ADMIN_TOKEN",
        "GB_ADMIN_TOKEN_FILE",
        "GB_ADMIN_SESSION_TTL",
        "GB_ADMIN_LISTEN",
    ];

    /// The token must differ from every client token, the listener from
    /// the public one.
    pub(super) fn load(
        raw: &Raw,
        clients: &Clients,
        public: &Listen,
    ) -> Result<Self, SettingsError> {
        let (token_file, token) = match raw.file_of("GB_ADMIN_TOKEN", "GB_ADMIN_TOKEN_FILE")? {
            Some(path) => {
                let (file, text) = SecretFile::read("GB_ADMIN_TOKEN_FILE", &path)?;
                let token = parse_admin(&text).map_err(|p| err("GB_ADMIN_TOKEN_FILE", p))?;
                (Some(file), Some(token))
            }
            None => (None, raw.opt("GB_ADMIN_TOKEN").map(SecretString::from)),
        };
        if let Some(admin) = &token {
            use secrecy::ExposeSecret;
            if clients
                .tokens
                .iter()
                .any(|t| t.expose_secret() == admin.expose_secret())
            {
                return Err(err("GB_ADMIN_TOKEN", "must differ from every client token"));
            }
        }
        let listen = match raw.opt("GB_ADMIN_LISTEN") {
            None => None,
            Some(_) => {
                let addr = raw.addr("GB_ADMIN_LISTEN", "0.0.0.0:9000")?;
                if addr == public.addr && addr.port() != 0 {
                    return Err(err("GB_ADMIN_LISTEN", "must differ from GB_LISTEN"));
                }
                Some(addr)
            }
        };
        Ok(Admin {
            token,
            token_file,
            session_ttl: raw.secs("GB_ADMIN_SESSION_TTL")?,
            listen,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::settings::load_from;
    use crate::settings::testing::env;

    #[test]
    fn admin_listen_is_off_by_default_and_must_be_an_address() {
        let base = [("GB_API_KEYS", "k1"), ("GB_AUTH_TOKENS", "t")];
        assert!(load_from(env(&base)).unwrap().admin.listen.is_none());
        let s = load_from(env(&[
            base[0],
            base[1],
            ("GB_ADMIN_LISTEN", "0.0.0.0:9000"),
        ]))
        .unwrap();
        assert_eq!(s.admin.listen.map(|a| a.port()), Some(9000));
        for bad in ["9000", "localhost", "0.0.0.0:8000"] {
            let e = load_from(env(&[base[0], base[1], ("GB_ADMIN_LISTEN", bad)])).unwrap_err();
            assert_eq!(e.var, "GB_ADMIN_LISTEN", "{bad}");
        }
    }

    #[test]
    fn admin_token_must_not_be_a_client_token() {
        let e = load_from(env(&[
            ("GB_API_KEYS", "k1"),
            ("GB_AUTH_TOKENS", "t1,t2"),
            ("GB_ADMIN_TOKEN", "t2"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "GB_ADMIN_TOKEN");
        assert!(!e.to_string().contains("t2"));
    }
}
