//! `keys`: the Gemini API keys and how the pool treats them.

use std::time::Duration;

use secrecy::SecretString;

use super::raw::Raw;
use super::{err, SecretFile, SettingsError};
use crate::secrets::{dedup as dedup_secrets, parse_keys};

/// The Gemini API keys and how the pool treats them.
#[derive(Debug, Clone)]
pub struct Keys {
    /// `GB_API_KEYS` or the lines of `GB_API_KEYS_FILE`, deduplicated.
    pub list: Vec<SecretString>,
    /// `GB_API_KEYS_FILE`, re-read while running.
    pub file: Option<SecretFile>,
    /// Retries of an unpinned request on other keys (`GB_MAX_RETRIES`).
    pub max_retries: u32,
    /// Time between re-checks of disabled keys (`GB_RECHECK_INTERVAL`).
    pub recheck_interval: Duration,
    /// How often every secrets file (keys, client tokens, admin token) is
    /// checked for changes (`GB_RELOAD_INTERVAL`).
    pub reload_interval: Duration,
}

impl Keys {
    pub const VARS: &'static [&'static str] = &[
        "GB_API_KEYS",
        "GB_API_KEYS_FILE",
        "GB_MAX_RETRIES",
        "GB_RECHECK_INTERVAL",
        "GB_RELOAD_INTERVAL",
    ];

    pub(super) fn load(raw: &Raw) -> Result<Self, SettingsError> {
        let (file, mut list) = match raw.file_of("GB_API_KEYS", "GB_API_KEYS_FILE")? {
            Some(path) => {
                let (file, text) = SecretFile::read("GB_API_KEYS_FILE", &path)?;
                let keys = parse_keys(&text).map_err(|p| err("GB_API_KEYS_FILE", p))?;
                (Some(file), keys)
            }
            None => (None, raw.list("GB_API_KEYS")),
        };
        dedup_secrets(&mut list);
        if list.is_empty() {
            return Err(err(
                "GB_API_KEYS",
                "at least one Gemini API key is required (or GB_API_KEYS_FILE)",
            ));
        }
        Ok(Keys {
            list,
            file,
            max_retries: raw.num("GB_MAX_RETRIES")?,
            recheck_interval: raw.secs("GB_RECHECK_INTERVAL")?,
            reload_interval: raw.secs("GB_RELOAD_INTERVAL")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::settings::load_from;
    use crate::settings::testing::env;

    #[test]
    fn keys_file_is_read_one_key_a_line() {
        let dir = std::env::temp_dir().join(format!("gb-keys-{}", std::process::id()));
        std::fs::write(&dir, "a\n\n# comment\nb\na\n").unwrap();
        let s = load_from(env(&[
            ("GB_API_KEYS_FILE", dir.to_str().unwrap()),
            ("GB_AUTH_TOKENS", "t"),
        ]))
        .unwrap();
        let _ = std::fs::remove_file(&dir);
        assert_eq!(s.keys.list.len(), 2);
        assert!(s.keys.file.is_some());
    }
}
