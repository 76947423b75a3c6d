//! `live`: the Live API (WebSocket sessions).

use super::raw::Raw;
use super::SettingsError;

/// The Live API (WebSocket sessions).
#[derive(Debug, Clone)]
pub struct Live {
    /// Open Live sessions per key before new sessions prefer other keys
    /// (`GB_LIVE_SESSIONS_PER_KEY`).
    pub sessions_per_key: usize,
}

impl Live {
    pub const VARS: &'static [&'static str] = &["GB_LIVE_SESSIONS_PER_KEY"];

    pub(super) fn load(raw: &Raw) -> Result<Self, SettingsError> {
        Ok(Live {
            sessions_per_key: raw.positive("GB_LIVE_SESSIONS_PER_KEY")?,
        })
    }
}
