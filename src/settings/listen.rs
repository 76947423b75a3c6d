//! `listen`: the HTTP server, where it listens and how it treats requests.

use std::net::SocketAddr;
use std::time::Duration;

use super::raw::{is_http, Raw};
use super::{err, SettingsError};

/// The HTTP server: where it listens and how it treats requests.
#[derive(Debug, Clone)]
pub struct Listen {
    /// `GB_LISTEN`.
    pub addr: SocketAddr,
    /// HTTP worker threads (`GB_WORKERS`, or one per CPU the process may use).
    pub workers: usize,
    /// Largest non-upload request body (`GB_MAX_BODY_BYTES`).
    pub max_body_bytes: usize,
    /// Time in-flight requests get after SIGTERM (`GB_SHUTDOWN_GRACE`).
    pub shutdown_grace: Duration,
    /// External base URL of the upload URLs handed out (`GB_PUBLIC_URL`).
    pub public_url: Option<String>,
    /// Whether `X-Forwarded-*` headers are believed (`GB_TRUST_FORWARDED`).
    pub trust_forwarded: bool,
}

impl Listen {
    pub const VARS: &'static [&'static str] = &[
        "GB_LISTEN",
        "GB_WORKERS",
        "GB_MAX_BODY_BYTES",
        "GB_SHUTDOWN_GRACE",
        "GB_PUBLIC_URL",
        "GB_TRUST_FORWARDED",
    ];

    pub(super) fn load(raw: &Raw) -> Result<Self, SettingsError> {
        let addr = raw.addr("GB_LISTEN", "0.0.0.0:8000")?;
        let public_url = raw
            .opt("GB_PUBLIC_URL")
            .map(|u| u.trim_end_matches('/').to_string());
        if let Some(u) = &public_url {
            if !is_http(u) {
                return Err(err("GB_PUBLIC_URL", "must start with http:// or https://"));
            }
        }
        let max_body_bytes: usize = raw.num("GB_MAX_BODY_BYTES")?;
        if max_body_bytes < 1024 {
            return Err(err("GB_MAX_BODY_BYTES", "must be at least 1024"));
        }
        let workers = match raw.opt("GB_WORKERS") {
            None => default_workers(),
            Some(_) => raw.positive("GB_WORKERS")?,
        };
        Ok(Listen {
            addr,
            workers,
            max_body_bytes,
            shutdown_grace: raw.secs("GB_SHUTDOWN_GRACE")?,
            public_url,
            trust_forwarded: raw.boolean("GB_TRUST_FORWARDED")?,
        })
    }
}

/// Worker threads when `GB_WORKERS` is unset: one per CPU the process may use
/// (cgroup CPU limits included), as actix does.
pub(super) fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

#[cfg(test)]
mod tests {
    use crate::settings::load_from;
    use crate::settings::testing::env;

    #[test]
    fn workers_are_a_positive_count() {
        let base = [("GB_API_KEYS", "k1"), ("GB_AUTH_TOKENS", "t")];
        let s = load_from(env(&[base[0], base[1], ("GB_WORKERS", "3")])).unwrap();
        assert_eq!(s.listen.workers, 3);
        for bad in ["0", "-1", "many"] {
            let e = load_from(env(&[base[0], base[1], ("GB_WORKERS", bad)])).unwrap_err();
            assert_eq!(e.var, "GB_WORKERS", "{bad}");
        }
    }
}
