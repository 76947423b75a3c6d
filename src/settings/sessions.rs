//! `sessions`: what ties a request to one key.

use std::time::Duration;

use super::raw::Raw;
use super::SettingsError;

/// How uploads without a session id are bound (`GB_UPLOAD_AFFINITY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadAffinity {
    /// The uploads of one client token share a key.
    Token,
    /// Rotation.
    None,
}

/// What ties a request to one key: sessions, the owners of files and
/// uploads, and how far the gateway looks for an owner it forgot.
#[derive(Debug, Clone)]
pub struct Sessions {
    /// A session binding lives this long after its last use
    /// (`GB_SESSION_TTL`).
    pub ttl: Duration,
    /// How long a pinned request waits for its key's cooldown
    /// (`GB_PIN_WAIT`; zero is allowed).
    pub pin_wait: Duration,
    /// `GB_UPLOAD_AFFINITY`.
    pub upload_affinity: UploadAffinity,
    /// How long a file's owner is remembered (`GB_FILE_TTL`).
    pub file_ttl: Duration,
    /// How long an unfinished resumable upload stays resumable
    /// (`GB_UPLOAD_TTL`).
    pub upload_ttl: Duration,
    /// Upstream lookups of unknown owners one request may cause
    /// (`GB_DISCOVERY_BUDGET`).
    pub discovery_budget: usize,
}

impl Sessions {
    pub const VARS: &'static [&'static str] = &[
        "GB_SESSION_TTL",
        "GB_PIN_WAIT",
        "GB_UPLOAD_AFFINITY",
        "GB_FILE_TTL",
        "GB_UPLOAD_TTL",
        "GB_DISCOVERY_BUDGET",
    ];

    pub(super) fn load(raw: &Raw) -> Result<Self, SettingsError> {
        Ok(Sessions {
            ttl: raw.secs("GB_SESSION_TTL")?,
            file_ttl: raw.secs("GB_FILE_TTL")?,
            upload_ttl: raw.secs("GB_UPLOAD_TTL")?,
            pin_wait: Duration::from_secs(raw.num("GB_PIN_WAIT")?),
            discovery_budget: raw.num("GB_DISCOVERY_BUDGET")?,
            upload_affinity: raw.choice(
                "GB_UPLOAD_AFFINITY",
                &[
                    ("token", UploadAffinity::Token),
                    ("none", UploadAffinity::None),
                ],
            )?,
        })
    }
}
