//! `upstream`: the Gemini API the gateway forwards to.

use std::time::Duration;

use super::raw::{is_file, is_http, Raw};
use super::{err, SettingsError};

/// The Gemini API the gateway forwards to.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Base URL without a trailing `/` (`GB_UPSTREAM_URL`).
    pub url: String,
    /// Extra PEM roots trusted for the upstream (`GB_UPSTREAM_CA_FILE`).
    pub ca_file: Option<String>,
    /// Time to the first response byte (`GB_UPSTREAM_TIMEOUT`).
    pub timeout: Duration,
    /// Longest gap between two chunks of an upstream body
    /// (`GB_UPSTREAM_IDLE_TIMEOUT`).
    pub idle_timeout: Duration,
}

impl Upstream {
    pub const VARS: &'static [&'static str] = &[
        "GB_UPSTREAM_URL",
        "GB_UPSTREAM_CA_FILE",
        "GB_UPSTREAM_TIMEOUT",
        "GB_UPSTREAM_IDLE_TIMEOUT",
    ];

    pub(super) fn load(raw: &Raw) -> Result<Self, SettingsError> {
        let url = raw
            .req("GB_UPSTREAM_URL")?
            .trim_end_matches('/')
            .to_string();
        if !is_http(&url) {
            return Err(err(
                "GB_UPSTREAM_URL",
                "must start with http:// or https://",
            ));
        }
        let ca_file = raw.opt("GB_UPSTREAM_CA_FILE");
        if ca_file.as_deref().is_some_and(|p| !is_file(p)) {
            return Err(err(
                "GB_UPSTREAM_CA_FILE",
                "the file it names does not exist",
            ));
        }
        Ok(Upstream {
            url,
            ca_file,
            timeout: raw.secs("GB_UPSTREAM_TIMEOUT")?,
            idle_timeout: raw.secs("GB_UPSTREAM_IDLE_TIMEOUT")?,
        })
    }
}
