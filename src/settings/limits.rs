//! `limits`: how much each client may use of the shared pool
//! (`GB_LIMITS_FILE`, TOML, reloaded like the key and token files).
//!
//! ```toml
//! [clients.default]          # every token without an entry of its own
//! rpm = 60
//! [clients.alice]            # the label of a `label=token` entry, or a token id
//! rpm = 600
//! tpm = 2_000_000
//! tokens_per_day = 50_000_000
//! models = ["gemini-2.5-flash*", "text-embedding-*"]
//! concurrent = 20
//! live_sessions = 2
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;

use super::raw::Raw;
use super::{err, SecretFile, SettingsError};

/// The limits of one client; `None`: no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientLimits {
    /// Requests in any 60 s.
    pub rpm: Option<u64>,
    /// Tokens in any 60 s, as Google reported them (`totalTokenCount`).
    pub tpm: Option<u64>,
    /// Tokens in one calendar day, UTC.
    pub tokens_per_day: Option<u64>,
    /// The models the client may use: names, `*` matching any run of
    /// characters. `None`: every model.
    pub models: Option<Vec<String>>,
    /// Requests in flight at once (a stream counts until it ends).
    pub concurrent: Option<u64>,
    /// Live API sessions open at once.
    pub live_sessions: Option<u64>,
}

impl ClientLimits {
    /// Whether the client may use `model` (a model name without
    /// `models/`).
    pub fn allows(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|patterns| patterns.iter().any(|p| glob(p, model)))
    }

    /// Whether answers' tokens must be counted for this client.
    pub fn counts_tokens(&self) -> bool {
        self.tpm.is_some() || self.tokens_per_day.is_some()
    }

    fn check(&self) -> Result<(), String> {
        let numbers = [
            ("rpm", self.rpm),
            ("tpm", self.tpm),
            ("tokens_per_day", self.tokens_per_day),
            ("concurrent", self.concurrent),
            ("live_sessions", self.live_sessions),
        ];
        for (field, value) in numbers {
            if value == Some(0) {
                return Err(format!(
                    "{field} must be at least 1 (leave it out for no limit)"
                ));
            }
        }
        if let Some(models) = &self.models {
            if let Some(bad) = models.iter().find(|m| m.is_empty() || m.contains('/')) {
                return Err(format!(
                    "models: {bad:?} is not a model name (no `models/` prefix, not empty)"
                ));
            }
        }
        Ok(())
    }
}

/// `*` matches any run of characters; everything else itself, ignoring
/// case.
fn glob(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.to_ascii_lowercase(), name.to_ascii_lowercase());
    let parts: Vec<&str> = p.split('*').collect();
    let [first, middle @ .., last] = parts.as_slice() else {
        return p == n;
    };
    if parts.len() == 1 {
        return p == n;
    }
    let Some(mut rest) = n.strip_prefix(first) else {
        return false;
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Every client's limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitSet {
    /// By label or token id.
    pub clients: HashMap<String, Arc<ClientLimits>>,
    /// For every token without an entry.
    pub default: Option<Arc<ClientLimits>>,
}

impl LimitSet {
    /// The limits of a client token known by `id` and maybe `label`.
    pub fn of(&self, id: &str, label: Option<&str>) -> Option<Arc<ClientLimits>> {
        label
            .and_then(|l| self.clients.get(l))
            .or_else(|| self.clients.get(id))
            .or(self.default.as_ref())
            .cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty() && self.default.is_none()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileShape {
    #[serde(default)]
    clients: HashMap<String, ClientLimits>,
}

/// Parses a limits file: all of it or nothing. The error names the line
/// and the field.
pub fn parse(text: &str) -> Result<LimitSet, String> {
    let shape: FileShape = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let message = e.message().trim_end().replace('\n', " ");
        match line {
            Some(line) => format!("line {line}: {message}"),
            None => message,
        }
    })?;
    let mut set = LimitSet::default();
    for (name, limits) in shape.clients {
        limits.check().map_err(|p| {
            let line = line_of(text, &name);
            format!("line {line}: [clients.{name}] {p}")
        })?;
        let limits = Arc::new(limits);
        if name == "default" {
            set.default = Some(limits);
        } else {
            set.clients.insert(name, limits);
        }
    }
    Ok(set)
}

/// The line of a client's table, for errors found after parsing.
fn line_of(text: &str, name: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim();
            l.starts_with("[clients.")
                && l.trim_start_matches("[clients.")
                    .trim_end_matches(']')
                    .trim_matches('"')
                    == name
        })
        .map_or(1, |i| i + 1)
}

/// `GB_LIMITS_FILE`.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub set: LimitSet,
    /// Re-read while running.
    pub file: Option<SecretFile>,
}

impl Limits {
    pub const VARS: &'static [&'static str] = &["GB_LIMITS_FILE"];

    pub(super) fn load(raw: &Raw) -> Result<Self, SettingsError> {
        let Some(path) = raw.opt("GB_LIMITS_FILE") else {
            return Ok(Limits::default());
        };
        let (file, text) = SecretFile::read("GB_LIMITS_FILE", &path)?;
        let set = parse(&text).map_err(|p| err("GB_LIMITS_FILE", format!("{path}: {p}")))?;
        Ok(Limits {
            set,
            file: Some(file),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_names() {
        assert!(glob("gemini-2.5-flash*", "gemini-2.5-flash-lite"));
        assert!(glob("gemini-2.5-flash*", "gemini-2.5-flash"));
        assert!(!glob("gemini-2.5-flash*", "gemini-2.5-pro"));
        assert!(glob("*embedding*", "text-embedding-004"));
        assert!(glob("Gemini-2.0-FLASH", "gemini-2.0-flash"));
        assert!(!glob("a*a", "a"));
        assert!(glob("*", "anything"));
    }

    #[test]
    fn a_file_names_its_clients_and_default() {
        let set = parse(
            "[clients.default]\nrpm = 60\n\n[clients.alice]\nrpm = 600\ntpm = 2_000_000\n\
             models = [\"gemini-2.5-flash*\"]\n",
        )
        .unwrap();
        assert_eq!(set.default.as_ref().unwrap().rpm, Some(60));
        let alice = set.of("id-a", Some("alice")).unwrap();
        assert_eq!(alice.tpm, Some(2_000_000));
        assert!(alice.allows("gemini-2.5-flash-lite"));
        assert!(!alice.allows("gemini-2.5-pro"));
        assert_eq!(set.of("id-b", None).unwrap().rpm, Some(60));
    }

    #[test]
    fn errors_name_the_line_and_the_field() {
        let e = parse("[clients.alice]\nrpm = 5\nrmp = 6\n").unwrap_err();
        assert!(e.starts_with("line 3:"), "{e}");
        assert!(e.contains("rmp"), "{e}");
        let e = parse("[clients.default]\nrpm = 1\n[clients.bob]\nconcurrent = 0\n").unwrap_err();
        assert!(e.starts_with("line 3:"), "{e}");
        assert!(e.contains("concurrent"), "{e}");
        let e = parse("[clients.bob]\nrpm = \"many\"\n").unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
        let e = parse("[client.bob]\nrpm = 1\n").unwrap_err();
        assert!(e.contains("client"), "{e}");
    }
}
