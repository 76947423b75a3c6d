//! `logging`: log output.

use super::raw::Raw;
use super::SettingsError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Log output; the level comes from `RUST_LOG`.
#[derive(Debug, Clone)]
pub struct Logging {
    /// `GB_LOG_FORMAT`.
    pub format: LogFormat,
}

impl Logging {
    pub const VARS: &'static [&'static str] = &["GB_LOG_FORMAT"];

    pub(super) fn load(raw: &Raw) -> Result<Self, SettingsError> {
        Ok(Logging {
            format: raw.choice(
                "GB_LOG_FORMAT",
                &[("text", LogFormat::Text), ("json", LogFormat::Json)],
            )?,
        })
    }
}
