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

/// A key's limits for one model, as Google publishes them for its tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLimit {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens per minute (input and output, as Google reported them).
    pub tpm: Option<u64>,
    /// Requests per day; the day ends at midnight Pacific time, as
    /// Google's does.
    pub rpd: Option<u64>,
}

impl KeyLimit {
    fn check(&self) -> Result<(), String> {
        for (field, value) in [("rpm", self.rpm), ("tpm", self.tpm), ("rpd", self.rpd)] {
            if value == Some(0) {
                return Err(format!(
                    "{field} must be at least 1 (leave it out for no limit)"
                ));
            }
        }
        Ok(())
    }
}

/// Limits by model name (`*` globs allowed): the first entry naming the
/// model exactly, else the first glob that matches, in name order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelLimits(Vec<(String, KeyLimit)>);

impl ModelLimits {
    fn new(map: HashMap<String, KeyLimit>) -> Self {
        // Model names as requests name them: lower case, no `models/`.
        let mut list: Vec<(String, KeyLimit)> = map
            .into_iter()
            .map(|(m, l)| (m.trim_start_matches("models/").to_ascii_lowercase(), l))
            .collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        Self(list)
    }

    pub fn of(&self, model: &str) -> Option<KeyLimit> {
        self.0
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(model))
            .or_else(|| {
                self.0
                    .iter()
                    .find(|(name, _)| name.contains('*') && glob(name, model))
            })
            .map(|(_, l)| *l)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(m, _)| m.as_str())
    }
}

/// The known limits of the pool's keys: one table for every key, and one
/// per group of keys (keys of another tier).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyLimits {
    pub all: ModelLimits,
    /// (group name, its key ids, its table).
    pub groups: Vec<(String, Vec<String>, ModelLimits)>,
}

impl KeyLimits {
    /// The limit of key `key_id` for `model`: its group's table, else the
    /// table for every key.
    pub fn of(&self, key_id: &str, model: &str) -> Option<KeyLimit> {
        match self
            .groups
            .iter()
            .find(|(_, keys, _)| keys.iter().any(|k| k == key_id))
        {
            Some((_, _, table)) => table.of(model),
            None => self.all.of(model),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty() && self.groups.iter().all(|(_, _, t)| t.is_empty())
    }

    /// Every model name (or glob) any table names.
    pub fn models(&self) -> Vec<String> {
        let mut models: Vec<String> = self
            .all
            .models()
            .chain(self.groups.iter().flat_map(|(_, _, t)| t.models()))
            .map(str::to_string)
            .collect();
        models.sort();
        models.dedup();
        models
    }
}

/// Every client's limits, and the keys' known limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitSet {
    /// By label or token id.
    pub clients: HashMap<String, Arc<ClientLimits>>,
    /// For every token without an entry.
    pub default: Option<Arc<ClientLimits>>,
    pub keys: KeyLimits,
}

impl LimitSet {
    /// The limits of a client token known by `id` and maybe `label`, with
    /// the name of the entry they come from (`default` for the default).
    pub fn of<'a>(
        &'a self,
        id: &'a str,
        label: Option<&'a str>,
    ) -> Option<(&'a str, Arc<ClientLimits>)> {
        let named = |name: &'a str| self.clients.get(name).map(|l| (name, l.clone()));
        label
            .and_then(named)
            .or_else(|| named(id))
            .or_else(|| self.default.clone().map(|l| ("default", l)))
    }

    /// Whether no client has limits.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty() && self.default.is_none()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileShape {
    #[serde(default)]
    clients: HashMap<String, ClientLimits>,
    #[serde(default)]
    keys: HashMap<String, KeyLimit>,
    #[serde(default)]
    key_groups: HashMap<String, GroupShape>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupShape {
    /// Key ids, as the status page and the admin API show them.
    keys: Vec<String>,
    #[serde(default)]
    models: HashMap<String, KeyLimit>,
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
    for (model, limit) in &shape.keys {
        limit
            .check()
            .map_err(|p| format!("[keys.\"{model}\"] {p}"))?;
    }
    set.keys.all = ModelLimits::new(shape.keys);
    let mut groups: Vec<(String, GroupShape)> = shape.key_groups.into_iter().collect();
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    let mut grouped: HashMap<String, String> = HashMap::new();
    for (name, group) in groups {
        for (model, limit) in &group.models {
            limit
                .check()
                .map_err(|p| format!("[key_groups.{name}.models.\"{model}\"] {p}"))?;
        }
        for key in &group.keys {
            if let Some(other) = grouped.insert(key.clone(), name.clone()) {
                return Err(format!(
                    "key {key} is in two key groups, {other} and {name}"
                ));
            }
        }
        set.keys
            .groups
            .push((name, group.keys, ModelLimits::new(group.models)));
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
        let (entry, alice) = set.of("id-a", Some("alice")).unwrap();
        assert_eq!(entry, "alice");
        assert_eq!(alice.tpm, Some(2_000_000));
        assert!(alice.allows("gemini-2.5-flash-lite"));
        assert!(!alice.allows("gemini-2.5-pro"));
        assert_eq!(set.of("id-b", None).unwrap().1.rpm, Some(60));
    }

    #[test]
    fn keys_have_a_table_for_all_and_one_per_group() {
        let set = parse(
            "[keys.\"gemini-2.5-pro\"]\nrpm = 5\nrpd = 100\n[keys.\"gemini-2.5-flash*\"]\nrpm = 10\n\
             [key_groups.paid]\nkeys = [\"k2\"]\n[key_groups.paid.models.\"gemini-2.5-pro\"]\nrpm = 150\n",
        )
        .unwrap();
        assert!(set.is_empty(), "no client limits");
        assert_eq!(set.keys.of("k1", "gemini-2.5-pro").unwrap().rpm, Some(5));
        assert_eq!(
            set.keys.of("k1", "gemini-2.5-flash-lite").unwrap().rpm,
            Some(10)
        );
        assert_eq!(set.keys.of("k2", "gemini-2.5-pro").unwrap().rpm, Some(150));
        assert_eq!(
            set.keys.of("k2", "gemini-2.5-flash"),
            None,
            "a group has its own table"
        );
        let e =
            parse("[key_groups.a]\nkeys = [\"k\"]\n[key_groups.b]\nkeys = [\"k\"]\n").unwrap_err();
        assert!(e.contains("two key groups"), "{e}");
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
