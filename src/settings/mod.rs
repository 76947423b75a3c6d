//! Typed settings, one struct per section, a file each. The only place that
//! reads the environment.
//!
//! Layers, later wins: `config/default.toml` (compiled in), the file named by
//! `GB_CONFIG`, then `GB_*` environment variables. Every error names the
//! variable an operator has to fix, and never echoes a secret value.
//!
//! Each section declares the variables it reads (`VARS`) beside the code
//! that reads and checks them; [`VARIABLES`] gathers them. The loader takes
//! only those names from the environment, and [`unknown_in_environment`]
//! names every other `GB_*` variable, so a misspelt one is reported instead
//! of silently leaving a default in force.
//!
//! A leaf: it reads the environment and files, and every other layer is
//! handed the typed values.

mod admin;
mod clients;
mod keys;
mod limits;
mod listen;
mod live;
mod logging;
mod proxies;
mod raw;
mod redis;
mod secret_file;
mod sessions;
mod tls;
mod upstream;
mod usage;

pub use admin::Admin;
pub use clients::Clients;
pub use keys::Keys;
pub use limits::{parse as parse_limits, ClientLimits, KeyLimit, KeyLimits, LimitSet, Limits};
pub use listen::Listen;
pub use live::Live;
pub use logging::{LogFormat, Logging, Otlp};
pub use proxies::{parse as parse_proxy, Kind as ProxyKind, Proxies, ProxySpec};
pub use redis::{Redis, RedisMode};
pub use secret_file::SecretFile;
pub use sessions::{Sessions, UploadAffinity};
pub use tls::Tls;
pub use upstream::Upstream;
pub use usage::Usage;

use raw::Raw;

const DEFAULTS: &str = include_str!("../../config/default.toml");

/// Names the file layered over the built-in defaults.
const CONFIG_VAR: &str = "GB_CONFIG";

#[derive(Debug, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct SettingsError {
    pub var: String,
    pub problem: String,
}

fn err(var: &str, problem: impl Into<String>) -> SettingsError {
    SettingsError {
        var: var.to_string(),
        problem: problem.into(),
    }
}

/// Everything the gateway needs, validated. `Debug` is safe to log: secrets
/// print as `[REDACTED]`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: Listen,
    /// The optional TLS listener; `None` serves plain HTTP.
    pub tls: Option<Tls>,
    pub upstream: Upstream,
    pub keys: Keys,
    pub clients: Clients,
    pub admin: Admin,
    pub redis: Redis,
    pub sessions: Sessions,
    pub proxies: Proxies,
    pub live: Live,
    pub usage: Usage,
    pub limits: Limits,
    pub logging: Logging,
}

/// One group of [`VARIABLES`].
#[derive(Debug)]
pub struct Group {
    /// The section of [`Settings`] (or `config`, `tools`).
    pub name: &'static str,
    pub vars: &'static [&'static str],
    /// False for variables only the scripts, tests and compose files read:
    /// they are known so that a shell exporting them for a script gets no
    /// warning from a gateway it starts, but the gateway ignores them.
    pub read_by_gateway: bool,
}

/// Every `GB_*` name the project knows: the single list the loader reads
/// from and the unknown-variable warnings check against.
pub const VARIABLES: &[Group] = &[
    group("config", &[CONFIG_VAR]),
    group("listen", Listen::VARS),
    group("tls", Tls::VARS),
    group("upstream", Upstream::VARS),
    group("keys", Keys::VARS),
    group("clients", Clients::VARS),
    group("admin", Admin::VARS),
    group("redis", Redis::VARS),
    group("sessions", Sessions::VARS),
    group("proxies", Proxies::VARS),
    group("live", Live::VARS),
    group("usage", Usage::VARS),
    group("limits", Limits::VARS),
    group("logging", Logging::VARS),
    Group {
        name: "tools",
        vars: TOOL_VARS,
        read_by_gateway: false,
    },
];

/// Read by `scripts/`, `bench/`, the e2e and container tests, and
/// docker-compose (which passes `.env` to the gateway's container).
const TOOL_VARS: &[&str] = &[
    "GB_BIN_DIR",
    "GB_TEST_VENV",
    "GB_DOCKER_CACHE",
    "GB_BUILD_NETWORK",
    "GB_HTTP_ADDR",
    "GB_HTTP_PORT",
];

const fn group(name: &'static str, vars: &'static [&'static str]) -> Group {
    Group {
        name,
        vars,
        read_by_gateway: true,
    }
}

/// Every known name, in the order of [`VARIABLES`].
pub fn known_variables() -> impl Iterator<Item = &'static str> {
    VARIABLES.iter().flat_map(|g| g.vars.iter().copied())
}

/// The group naming `name`, compared without regard to case: the
/// configuration source reads `GB_Session_TTL` as `GB_SESSION_TTL`.
fn find(name: &str) -> Option<&'static Group> {
    let upper = name.to_ascii_uppercase();
    VARIABLES.iter().find(|g| g.vars.contains(&upper.as_str()))
}

/// Reads settings from the layered sources described in the module docs.
pub fn load() -> Result<Settings, SettingsError> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    load_from(env)
}

/// Same as [`load`], with the environment given explicitly (tests).
pub fn load_from(env: Vec<(String, String)>) -> Result<Settings, SettingsError> {
    assemble(&Raw::layered(env)?)
}

/// Section by section; the first problem found stops the load.
fn assemble(raw: &Raw) -> Result<Settings, SettingsError> {
    let listen = Listen::load(raw)?;
    let keys = Keys::load(raw)?;
    let clients = Clients::load(raw)?;
    let admin = Admin::load(raw, &clients, &listen)?;
    let upstream = Upstream::load(raw)?;
    let redis = Redis::load(raw)?;
    let logging = Logging::load(raw)?;
    let live = Live::load(raw)?;
    let tls = Tls::load(raw)?;
    let sessions = Sessions::load(raw)?;
    let proxies = Proxies::load(raw)?;
    let usage = Usage::load(raw)?;
    let limits = Limits::load(raw)?;
    Ok(Settings {
        listen,
        tls,
        upstream,
        keys,
        clients,
        admin,
        redis,
        sessions,
        proxies,
        live,
        usage,
        limits,
        logging,
    })
}

/// A `GB_*` variable in the environment that is in no group of
/// [`VARIABLES`]: most likely a misspelt one, whose intended setting keeps
/// its default. Holds the name only; the value may be a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unknown {
    pub name: String,
    /// The closest known name, when one is close enough to be the intent.
    pub nearest: Option<&'static str>,
}

impl std::fmt::Display for Unknown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is not a variable the gateway knows; it is ignored",
            self.name
        )?;
        match self.nearest {
            Some(known) => write!(f, " (did you mean {known}?)"),
            None => Ok(()),
        }
    }
}

/// The unknown `GB_*` names of the process environment, sorted. Reads
/// names only, never values.
pub fn unknown_in_environment() -> Vec<Unknown> {
    unknown_variables(std::env::vars_os().filter_map(|(name, _)| name.into_string().ok()))
}

/// The `GB_*` names among `names` that are in no group of [`VARIABLES`],
/// sorted, each with its nearest known name.
pub fn unknown_variables<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Vec<Unknown> {
    let mut unknown: Vec<Unknown> = names
        .into_iter()
        .map(|n| n.as_ref().to_string())
        .filter(|n| n.starts_with("GB_") && find(n).is_none())
        .map(|name| Unknown {
            nearest: nearest(&name),
            name,
        })
        .collect();
    unknown.sort_by(|a, b| a.name.cmp(&b.name));
    unknown.dedup();
    unknown
}

/// The known name closest to `name` by edit distance (a swap of two
/// neighbouring letters counts as one edit), if it is within 3 edits and a
/// third of the name's length: a far guess would mislead more than none.
pub fn nearest(name: &str) -> Option<&'static str> {
    let typed = name.to_ascii_uppercase();
    let typed = typed.strip_prefix("GB_").unwrap_or(&typed);
    let limit = (typed.chars().count() / 3).clamp(1, 3);
    known_variables()
        .map(|known| (edit_distance(typed, &known[3..]), known))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, known)| known)
}

/// Optimal string alignment distance: insertions, deletions, substitutions
/// and swaps of adjacent characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // Three rows of the table: two back, one back, this one.
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut row: Vec<usize> = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        row[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            row[j] = (prev[j] + 1).min(row[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                row[j] = row[j].min(before[j - 2] + 1);
            }
        }
        std::mem::swap(&mut before, &mut prev);
        std::mem::swap(&mut prev, &mut row);
    }
    prev[b.len()]
}

#[cfg(test)]
pub(crate) mod testing {
    //! What the section tests share: an environment from pairs, and one
    //! with the two required secrets already given.
    use super::{load_from, Settings, SettingsError};

    pub fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Loads with a key and a client token besides `pairs`.
    pub fn with_secrets(pairs: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let mut all = vec![("GB_API_KEYS", "k1"), ("GB_AUTH_TOKENS", "t")];
        all.extend_from_slice(pairs);
        load_from(env(&all))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use config::{Config, File, FileFormat};

    use super::listen::default_workers;
    use super::testing::{env, with_secrets};
    use super::*;

    #[test]
    fn defaults_apply_when_only_secrets_are_given() {
        let s = load_from(env(&[("GB_API_KEYS", "k1,k2"), ("GB_AUTH_TOKENS", "t")])).unwrap();
        assert_eq!(s.keys.list.len(), 2);
        assert_eq!(s.sessions.ttl, Duration::from_secs(3600));
        assert_eq!(s.sessions.file_ttl, Duration::from_secs(172_800));
        assert_eq!(s.keys.max_retries, 3);
        assert_eq!(s.listen.addr.port(), 8000);
        assert!(s.redis.url.is_none());
        assert_eq!(s.listen.workers, default_workers());
        assert!(s.tls.is_none());
    }

    #[test]
    fn bad_number_names_the_variable_and_value() {
        let e = load_from(env(&[
            ("GB_API_KEYS", "k1"),
            ("GB_AUTH_TOKENS", "t"),
            ("GB_SESSION_TTL", "soon"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "GB_SESSION_TTL");
        assert!(e.to_string().contains("soon"));
    }

    #[test]
    fn choices_list_every_accepted_value() {
        let cases = [
            (
                "GB_LOG_FORMAT",
                "xml",
                "GB_LOG_FORMAT: expected text or json, got \"xml\"",
            ),
            (
                "GB_UPLOAD_AFFINITY",
                "Key",
                "GB_UPLOAD_AFFINITY: expected token or none, got \"key\"",
            ),
            (
                "GB_PROXY_MODE",
                "round",
                "GB_PROXY_MODE: expected hash or none, got \"round\"",
            ),
            (
                "GB_REDIS_MODE",
                "shards",
                "GB_REDIS_MODE: expected standalone, cluster or sentinel, got \"shards\"",
            ),
        ];
        for (var, value, line) in cases {
            let e = with_secrets(&[(var, value)]).unwrap_err();
            assert_eq!(e.to_string(), line);
        }
    }

    /// The loader reads exactly the variables the sections declare, so
    /// [`VARIABLES`] cannot drift from the code.
    #[test]
    fn the_loader_reads_exactly_the_declared_variables() {
        let raw = Raw::layered(env(&[("GB_API_KEYS", "k1"), ("GB_AUTH_TOKENS", "t")])).unwrap();
        assemble(&raw).unwrap();
        let mut read = raw.read.take();
        read.push(CONFIG_VAR);
        read.sort_unstable();
        read.dedup();
        let mut declared: Vec<&str> = VARIABLES
            .iter()
            .filter(|g| g.read_by_gateway)
            .flat_map(|g| g.vars.iter().copied())
            .collect();
        declared.sort_unstable();
        assert_eq!(read, declared);
        let mut all: Vec<&str> = known_variables().collect();
        let count = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), count, "a name is in two groups");
        assert!(all.iter().all(|n| n.starts_with("GB_")
            && n[3..]
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')));
    }

    #[test]
    fn every_default_is_a_declared_setting() {
        let defaults = Config::builder()
            .add_source(File::from_str(DEFAULTS, FileFormat::Toml))
            .build()
            .unwrap();
        let keys: std::collections::HashMap<String, config::Value> =
            defaults.try_deserialize().unwrap();
        assert!(keys.len() >= 20);
        for key in keys.keys() {
            let var = format!("GB_{}", key.to_ascii_uppercase());
            assert!(
                find(&var).is_some_and(|g| g.read_by_gateway),
                "{key} in config/default.toml"
            );
        }
    }

    #[test]
    fn a_near_miss_is_named_with_its_suggestion() {
        assert_eq!(nearest("GB_REDIS_ULR"), Some("GB_REDIS_URL"));
        assert_eq!(nearest("GB_API_KEY"), Some("GB_API_KEYS"));
        assert_eq!(nearest("GB_SESION_TTL"), Some("GB_SESSION_TTL"));
        assert_eq!(nearest("GB_REDIS_TIMEOUT"), Some("GB_REDIS_TIMEOUT_MS"));
        assert_eq!(nearest("GB_upstream_url"), Some("GB_UPSTREAM_URL"));
        assert_eq!(nearest("GB_WORKER"), Some("GB_WORKERS"));
        assert_eq!(nearest("GB_BIN_DIRS"), Some("GB_BIN_DIR"));
    }

    #[test]
    fn a_far_name_gets_no_suggestion() {
        for far in [
            "GB_SOMETHING_ELSE",
            "GB_FOO",
            "GB_X",
            "GB_DATABASE_PASSWORD",
        ] {
            assert_eq!(nearest(far), None, "{far}");
        }
    }

    #[test]
    fn edit_distance_counts_a_swap_as_one() {
        assert_eq!(edit_distance("URL", "ULR"), 1);
        assert_eq!(edit_distance("", "ABC"), 3);
        assert_eq!(edit_distance("KITTEN", "SITTING"), 3);
        assert_eq!(edit_distance("SAME", "SAME"), 0);
    }

    #[test]
    fn only_unknown_gb_names_are_reported() {
        let unknown = unknown_variables([
            "GB_REDIS_ULR",
            "GB_LISTEN",
            "GB_redis_url",
            "GB_CONFIG",
            "GB_BIN_DIR",
            "PATH",
            "gb_redis_ulr",
            "GB_TOTALLY_DIFFERENT_THING",
        ]);
        assert_eq!(
            unknown,
            vec![
                Unknown {
                    name: "GB_REDIS_ULR".into(),
                    nearest: Some("GB_REDIS_URL"),
                },
                Unknown {
                    name: "GB_TOTALLY_DIFFERENT_THING".into(),
                    nearest: None,
                },
            ]
        );
        assert_eq!(
            unknown[0].to_string(),
            "GB_REDIS_ULR is not a variable the gateway knows; it is ignored \
             (did you mean GB_REDIS_URL?)"
        );
    }

    #[test]
    fn an_unknown_variable_is_not_read_as_a_setting() {
        let s = with_secrets(&[("GB_REDIS_ULR", "redis://127.0.0.1:1")]).unwrap();
        assert!(s.redis.url.is_none());
    }
}
