//! Typed settings, one struct per section. The only place that reads the
//! environment.
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

use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use secrecy::SecretString;

use crate::background::reload::{dedup as dedup_secrets, split_labels};
use crate::state::RedisMode;

const DEFAULTS: &str = include_str!("../config/default.toml");

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

    fn load(raw: &Raw) -> Result<Self, SettingsError> {
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
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// PEM certificate chain and key: the listener serves HTTPS and WSS.
#[derive(Debug, Clone)]
pub struct Tls {
    /// `GB_TLS_CERT`.
    pub cert: String,
    /// `GB_TLS_KEY`.
    pub key: String,
}

impl Tls {
    pub const VARS: &'static [&'static str] = &["GB_TLS_CERT", "GB_TLS_KEY"];

    /// Both files or neither.
    fn load(raw: &Raw) -> Result<Option<Self>, SettingsError> {
        let (cert, key) = (raw.opt("GB_TLS_CERT"), raw.opt("GB_TLS_KEY"));
        match (&cert, &key) {
            (Some(_), None) => return Err(err("GB_TLS_KEY", "is required with GB_TLS_CERT")),
            (None, Some(_)) => return Err(err("GB_TLS_CERT", "is required with GB_TLS_KEY")),
            _ => {}
        }
        for (var, path) in [("GB_TLS_CERT", &cert), ("GB_TLS_KEY", &key)] {
            if path.as_deref().is_some_and(|p| !is_file(p)) {
                return Err(err(var, "the file it names does not exist"));
            }
        }
        Ok(cert.zip(key).map(|(cert, key)| Tls { cert, key }))
    }
}

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

    fn load(raw: &Raw) -> Result<Self, SettingsError> {
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

    fn load(raw: &Raw) -> Result<Self, SettingsError> {
        let (file, mut list) = match raw.file_of("GB_API_KEYS", "GB_API_KEYS_FILE")? {
            Some(path) => {
                let (file, text) = SecretFile::read("GB_API_KEYS_FILE", &path)?;
                let keys = crate::background::reload::parse_keys(&text)
                    .map_err(|p| err("GB_API_KEYS_FILE", p))?;
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

/// The tokens clients present to the gateway.
#[derive(Debug, Clone)]
pub struct Clients {
    /// `GB_AUTH_TOKENS` or the lines of `GB_AUTH_TOKENS_FILE`, labels
    /// removed, deduplicated.
    pub tokens: Vec<SecretString>,
    /// `GB_AUTH_TOKENS_FILE`, re-read while running.
    pub file: Option<SecretFile>,
    /// Client token id → the label written before it (`label=token`): what
    /// the status page shows for the token.
    pub labels: Vec<(String, String)>,
}

impl Clients {
    pub const VARS: &'static [&'static str] = &["GB_AUTH_TOKENS", "GB_AUTH_TOKENS_FILE"];

    fn load(raw: &Raw) -> Result<Self, SettingsError> {
        let (file, (mut tokens, labels)) =
            match raw.file_of("GB_AUTH_TOKENS", "GB_AUTH_TOKENS_FILE")? {
                Some(path) => {
                    let (file, text) = SecretFile::read("GB_AUTH_TOKENS_FILE", &path)?;
                    let parsed = crate::background::reload::parse_tokens(&text)
                        .map_err(|p| err("GB_AUTH_TOKENS_FILE", p))?;
                    (Some(file), parsed)
                }
                None => {
                    let mut tokens = raw.list("GB_AUTH_TOKENS");
                    let labels = split_labels(&mut tokens);
                    (None, (tokens, labels))
                }
            };
        dedup_secrets(&mut tokens);
        if tokens.is_empty() {
            return Err(err(
                "GB_AUTH_TOKENS",
                "at least one client token is required (or GB_AUTH_TOKENS_FILE)",
            ));
        }
        Ok(Clients {
            tokens,
            file,
            labels,
        })
    }
}

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
    fn load(raw: &Raw, clients: &Clients, public: &Listen) -> Result<Self, SettingsError> {
        let (token_file, token) = match raw.file_of("GB_ADMIN_TOKEN", "GB_ADMIN_TOKEN_FILE")? {
            Some(path) => {
                let (file, text) = SecretFile::read("GB_ADMIN_TOKEN_FILE", &path)?;
                let token = crate::background::reload::parse_admin(&text)
                    .map_err(|p| err("GB_ADMIN_TOKEN_FILE", p))?;
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

/// The shared state store; without a URL the embedded one (one replica).
#[derive(Debug, Clone)]
pub struct Redis {
    /// `GB_REDIS_URL`: one server, cluster seeds or sentinels, by `mode`.
    pub url: Option<SecretString>,
    /// How `url` is read (`GB_REDIS_MODE`).
    pub mode: RedisMode,
    /// The master's name in sentinel mode (`GB_REDIS_SENTINEL_MASTER`).
    pub sentinel_master: String,
    /// Prefix of every key (`GB_REDIS_PREFIX`).
    pub prefix: String,
    /// Bound on every call (`GB_REDIS_TIMEOUT_MS`).
    pub timeout: Duration,
    /// Pooled connections per replica (`GB_REDIS_POOL_SIZE`).
    pub pool_size: usize,
}

impl Redis {
    pub const VARS: &'static [&'static str] = &[
        "GB_REDIS_URL",
        "GB_REDIS_MODE",
        "GB_REDIS_SENTINEL_MASTER",
        "GB_REDIS_PREFIX",
        "GB_REDIS_TIMEOUT_MS",
        "GB_REDIS_POOL_SIZE",
    ];

    fn load(raw: &Raw) -> Result<Self, SettingsError> {
        let url = raw.opt("GB_REDIS_URL");
        let mode = raw.choice(
            "GB_REDIS_MODE",
            &[
                ("standalone", RedisMode::Standalone),
                ("cluster", RedisMode::Cluster),
                ("sentinel", RedisMode::Sentinel),
            ],
        )?;
        let sentinel_master = raw.req("GB_REDIS_SENTINEL_MASTER")?;
        check_redis_urls(url.as_deref(), mode)?;
        let prefix = raw.req("GB_REDIS_PREFIX")?;
        if !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(err(
                "GB_REDIS_PREFIX",
                "may hold only letters, digits, - _ .",
            ));
        }
        Ok(Redis {
            url: url.map(SecretString::from),
            mode,
            sentinel_master,
            prefix,
            timeout: Duration::from_millis(raw.positive("GB_REDIS_TIMEOUT_MS")?),
            pool_size: raw.positive("GB_REDIS_POOL_SIZE")?,
        })
    }
}

/// Checks `GB_REDIS_URL` against `GB_REDIS_MODE`. Messages never echo a URL:
/// it may carry a password.
fn check_redis_urls(url: Option<&str>, mode: RedisMode) -> Result<(), SettingsError> {
    use deadpool_redis::redis::IntoConnectionInfo;
    const VAR: &str = "GB_REDIS_URL";
    let Some(url) = url else {
        return match mode {
            RedisMode::Standalone => Ok(()),
            _ => Err(err(
                VAR,
                format!(
                    "is required with GB_REDIS_MODE={}: {}",
                    mode.as_str(),
                    match mode {
                        RedisMode::Cluster => "list the cluster's seed nodes",
                        _ => "list the sentinels",
                    }
                ),
            )),
        };
    };
    let urls: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err(err(VAR, "names no server"));
    }
    if mode == RedisMode::Standalone && urls.len() > 1 {
        return Err(err(
            VAR,
            "lists several servers; set GB_REDIS_MODE=cluster (seed nodes) or \
             GB_REDIS_MODE=sentinel (sentinels), or give one URL",
        ));
    }
    let mut schemes = std::collections::HashSet::new();
    for (i, u) in urls.iter().enumerate() {
        let which = if urls.len() > 1 {
            format!("entry {}", i + 1)
        } else {
            "the URL".to_string()
        };
        let tcp = u.starts_with("redis://") || u.starts_with("rediss://");
        let unix = u.starts_with("unix://") || u.starts_with("redis+unix://");
        if !(tcp || (unix && mode == RedisMode::Standalone)) {
            return Err(err(
                VAR,
                match mode {
                    RedisMode::Standalone => {
                        format!("{which} must start with redis:// or rediss://")
                    }
                    _ => format!(
                        "{which} must start with redis:// or rediss:// in {} mode",
                        mode.as_str()
                    ),
                },
            ));
        }
        let info = u
            .into_connection_info()
            .map_err(|_| err(VAR, format!("{which} is not a valid Redis URL")))?;
        if mode == RedisMode::Cluster && info.redis_settings().db() != 0 {
            return Err(err(
                VAR,
                format!(
                    "{which} names database {}; Redis Cluster has only database 0",
                    info.redis_settings().db()
                ),
            ));
        }
        schemes.insert(u.starts_with("rediss://"));
    }
    if schemes.len() > 1 {
        return Err(err(
            VAR,
            "mixes redis:// and rediss://; use one scheme for every server",
        ));
    }
    Ok(())
}

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

    fn load(raw: &Raw) -> Result<Self, SettingsError> {
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

/// Outbound proxies the keys leave through.
#[derive(Debug, Clone)]
pub struct Proxies {
    /// `GB_PROXIES`, parsed; empty with `GB_PROXY_MODE=none`.
    pub list: Vec<crate::upstream::proxy::ProxySpec>,
    /// How long a failed proxy stays out of use (`GB_PROXY_COOLDOWN`).
    pub cooldown: Duration,
}

impl Proxies {
    pub const VARS: &'static [&'static str] = &["GB_PROXIES", "GB_PROXY_MODE", "GB_PROXY_COOLDOWN"];

    fn load(raw: &Raw) -> Result<Self, SettingsError> {
        let hash = raw.choice("GB_PROXY_MODE", &[("hash", true), ("none", false)])?;
        let given = raw.opt("GB_PROXIES").unwrap_or_default();
        let list = if hash {
            given
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .enumerate()
                .map(|(i, url)| {
                    crate::upstream::proxy::parse(url)
                        .map_err(|problem| err("GB_PROXIES", format!("entry {} {problem}", i + 1)))
                })
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        Ok(Proxies {
            list,
            cooldown: raw.secs("GB_PROXY_COOLDOWN")?,
        })
    }
}

/// The Live API (WebSocket sessions).
#[derive(Debug, Clone)]
pub struct Live {
    /// Open Live sessions per key before new sessions prefer other keys
    /// (`GB_LIVE_SESSIONS_PER_KEY`).
    pub sessions_per_key: usize,
}

impl Live {
    pub const VARS: &'static [&'static str] = &["GB_LIVE_SESSIONS_PER_KEY"];

    fn load(raw: &Raw) -> Result<Self, SettingsError> {
        Ok(Live {
            sessions_per_key: raw.positive("GB_LIVE_SESSIONS_PER_KEY")?,
        })
    }
}

/// Hourly usage records.
#[derive(Debug, Clone)]
pub struct Usage {
    /// Days of hourly usage kept (`GB_USAGE_RETENTION_DAYS`, 1–90).
    pub retention_days: u64,
    /// Distinct usage series (token × key × model) one replica records per
    /// hour before folding new models into `other` (`GB_USAGE_MAX_SERIES`).
    pub max_series: usize,
}

impl Usage {
    pub const VARS: &'static [&'static str] = &["GB_USAGE_RETENTION_DAYS", "GB_USAGE_MAX_SERIES"];

    fn load(raw: &Raw) -> Result<Self, SettingsError> {
        let retention_days @ 1..=90 = raw.num::<u64>("GB_USAGE_RETENTION_DAYS")? else {
            return Err(err("GB_USAGE_RETENTION_DAYS", "must be between 1 and 90"));
        };
        Ok(Usage {
            retention_days,
            max_series: raw.positive("GB_USAGE_MAX_SERIES")?,
        })
    }
}

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

    fn load(raw: &Raw) -> Result<Self, SettingsError> {
        Ok(Logging {
            format: raw.choice(
                "GB_LOG_FORMAT",
                &[("text", LogFormat::Text), ("json", LogFormat::Json)],
            )?,
        })
    }
}

/// A secrets file and a digest of the content the settings were read from,
/// so a reload sees any change made after that.
#[derive(Debug, Clone)]
pub struct SecretFile {
    pub path: String,
    pub digest: [u8; 32],
}

impl SecretFile {
    fn read(var: &str, path: &str) -> Result<(Self, String), SettingsError> {
        use sha2::{Digest, Sha256};
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(var, format!("cannot read the file: {}", e.kind())))?;
        let file = SecretFile {
            path: path.to_string(),
            digest: Sha256::digest(text.as_bytes()).into(),
        };
        Ok((file, text))
    }
}

/// Reads settings from the layered sources described in the module docs.
pub fn load() -> Result<Settings, SettingsError> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    load_from(env)
}

/// Same as [`load`], with the environment given explicitly (tests).
pub fn load_from(env: Vec<(String, String)>) -> Result<Settings, SettingsError> {
    Raw::layered(env)?.settings()
}

/// The merged sources, read one variable at a time.
struct Raw {
    cfg: Config,
    /// Every variable read, so a test can hold the loader to [`VARIABLES`].
    read: RefCell<Vec<&'static str>>,
}

impl Raw {
    fn layered(env: Vec<(String, String)>) -> Result<Self, SettingsError> {
        let config_file = env
            .iter()
            .find(|(k, _)| k == CONFIG_VAR)
            .map(|(_, v)| v.clone());
        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml).required(true));
        if let Some(path) = config_file.filter(|p| !p.is_empty()) {
            if !is_file(&path) {
                return Err(err(CONFIG_VAR, "the file it names does not exist"));
            }
            builder = builder.add_source(File::with_name(&path).required(true));
        }
        // Only the names a section reads; the rest are reported by
        // `unknown_in_environment`.
        let env_map = env
            .into_iter()
            .filter(|(k, _)| {
                k.starts_with("GB_")
                    && k != CONFIG_VAR
                    && find(k).is_some_and(|g| g.read_by_gateway)
            })
            .collect();
        builder = builder.add_source(
            Environment::with_prefix("GB")
                .prefix_separator("_")
                .source(Some(env_map)),
        );
        let cfg = builder
            .build()
            .map_err(|e| err(CONFIG_VAR, format!("cannot be read: {e}")))?;
        Ok(Raw {
            cfg,
            read: RefCell::new(Vec::new()),
        })
    }

    /// Section by section; the first problem found stops the load.
    fn settings(&self) -> Result<Settings, SettingsError> {
        let listen = Listen::load(self)?;
        let keys = Keys::load(self)?;
        let clients = Clients::load(self)?;
        let admin = Admin::load(self, &clients, &listen)?;
        let upstream = Upstream::load(self)?;
        let redis = Redis::load(self)?;
        let logging = Logging::load(self)?;
        let live = Live::load(self)?;
        let tls = Tls::load(self)?;
        let sessions = Sessions::load(self)?;
        let proxies = Proxies::load(self)?;
        let usage = Usage::load(self)?;
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
            logging,
        })
    }

    fn opt(&self, var: &'static str) -> Option<String> {
        self.read.borrow_mut().push(var);
        let key = var.strip_prefix("GB_").unwrap_or(var).to_ascii_lowercase();
        match self.cfg.get_string(&key) {
            Ok(v) if !v.trim().is_empty() => Some(v.trim().to_string()),
            _ => match self.cfg.get_array(&key) {
                Ok(items) => {
                    let joined: Vec<String> = items
                        .into_iter()
                        .filter_map(|v| v.into_string().ok())
                        .collect();
                    (!joined.is_empty()).then(|| joined.join(","))
                }
                Err(_) => None,
            },
        }
    }

    fn req(&self, var: &'static str) -> Result<String, SettingsError> {
        self.opt(var).ok_or_else(|| err(var, "is required"))
    }

    fn num<T: std::str::FromStr>(&self, var: &'static str) -> Result<T, SettingsError> {
        let v = self.req(var)?;
        v.parse()
            .map_err(|_| err(var, format!("expected a whole number, got {v:?}")))
    }

    /// A whole number of at least 1.
    fn positive<T>(&self, var: &'static str) -> Result<T, SettingsError>
    where
        T: std::str::FromStr + Default + PartialEq,
    {
        let n: T = self.num(var)?;
        if n == T::default() {
            return Err(err(var, "must be at least 1"));
        }
        Ok(n)
    }

    fn secs(&self, var: &'static str) -> Result<Duration, SettingsError> {
        let n: u64 = self.num(var)?;
        if n == 0 {
            return Err(err(var, "must be at least 1 second"));
        }
        Ok(Duration::from_secs(n))
    }

    fn boolean(&self, var: &'static str) -> Result<bool, SettingsError> {
        match self.req(var)?.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            other => Err(err(var, format!("expected true or false, got {other:?}"))),
        }
    }

    /// One of `choices`, any case; the error lists them ("a, b or c").
    fn choice<T: Copy>(
        &self,
        var: &'static str,
        choices: &[(&str, T)],
    ) -> Result<T, SettingsError> {
        let given = self.req(var)?.to_ascii_lowercase();
        if let Some((_, value)) = choices.iter().find(|(name, _)| *name == given) {
            return Ok(*value);
        }
        let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
        let expected = match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => names.concat(),
        };
        Err(err(var, format!("expected {expected}, got {given:?}")))
    }

    /// `host:port`; `example` shows the form in the error.
    fn addr(&self, var: &'static str, example: &str) -> Result<SocketAddr, SettingsError> {
        let given = self.req(var)?;
        given.parse().map_err(|_| {
            err(
                var,
                format!("expected host:port such as {example}, got {given:?}"),
            )
        })
    }

    fn list(&self, var: &'static str) -> Vec<SecretString> {
        self.opt(var)
            .map(|v| split_list(&v, ','))
            .unwrap_or_default()
    }

    /// The path in `file_var` (`{var}_FILE`); giving both is an error.
    fn file_of(
        &self,
        var: &'static str,
        file_var: &'static str,
    ) -> Result<Option<String>, SettingsError> {
        let file = self.opt(file_var);
        if file.is_some() && self.opt(var).is_some() {
            return Err(SettingsError {
                var: format!("{var} and {file_var}"),
                problem: "give one of them, not both".into(),
            });
        }
        Ok(file)
    }
}

fn is_http(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

fn is_file(path: &str) -> bool {
    std::path::Path::new(path).is_file()
}

/// Entries separated by `sep`; `#` starts a comment (a whole line, or the
/// rest of one: keys and tokens never contain `#`).
fn split_list(text: &str, sep: char) -> Vec<SecretString> {
    text.split(sep)
        .map(|s| s.split('#').next().unwrap_or("").trim())
        .filter(|s| !s.is_empty())
        .map(|s| SecretString::from(s.to_string()))
        .collect()
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
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

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
    fn workers_are_a_positive_count() {
        let base = [("GB_API_KEYS", "k1"), ("GB_AUTH_TOKENS", "t")];
        let s = load_from(env(&[base[0], base[1], ("GB_WORKERS", "3")])).unwrap();
        assert_eq!(s.listen.workers, 3);
        for bad in ["0", "-1", "many"] {
            let e = load_from(env(&[base[0], base[1], ("GB_WORKERS", bad)])).unwrap_err();
            assert_eq!(e.var, "GB_WORKERS", "{bad}");
        }
    }

    #[test]
    fn token_labels_are_split_off_and_never_kept_with_the_token() {
        use secrecy::ExposeSecret;
        let s = load_from(env(&[
            ("GB_API_KEYS", "k1"),
            (
                "GB_AUTH_TOKENS",
                "alice=tok-a,tok-b,padded==,bad label=tok-c",
            ),
        ]))
        .unwrap();
        let tokens: Vec<&str> = s
            .clients
            .tokens
            .iter()
            .map(ExposeSecret::expose_secret)
            .collect();
        assert_eq!(tokens, ["tok-a", "tok-b", "padded==", "bad label=tok-c"]);
        assert_eq!(
            s.clients.labels,
            vec![(
                crate::domain::identity::short_id(&SecretString::from("tok-a")),
                "alice".to_string()
            )]
        );
        assert_eq!(s.usage.retention_days, 7);
        let e = load_from(env(&[
            ("GB_API_KEYS", "k1"),
            ("GB_AUTH_TOKENS", "t"),
            ("GB_USAGE_RETENTION_DAYS", "0"),
        ]))
        .unwrap_err();
        assert_eq!(e.var, "GB_USAGE_RETENTION_DAYS");
    }

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
    fn missing_tokens_name_the_variable() {
        let e = load_from(env(&[("GB_API_KEYS", "k1")])).unwrap_err();
        assert_eq!(e.var, "GB_AUTH_TOKENS");
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

    fn with_redis(pairs: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let mut all = vec![("GB_API_KEYS", "k1"), ("GB_AUTH_TOKENS", "t")];
        all.extend_from_slice(pairs);
        load_from(env(&all))
    }

    #[test]
    fn redis_mode_defaults_to_standalone_with_mymaster() {
        let s = with_redis(&[("GB_REDIS_URL", "redis://127.0.0.1:6379/2")]).unwrap();
        assert_eq!(s.redis.mode, RedisMode::Standalone);
        assert_eq!(s.redis.sentinel_master, "mymaster");
        let s = with_redis(&[
            ("GB_REDIS_MODE", "cluster"),
            (
                "GB_REDIS_URL",
                "redis://:pw@10.0.0.1:7000, redis://:pw@10.0.0.2:7000",
            ),
        ])
        .unwrap();
        assert_eq!(s.redis.mode, RedisMode::Cluster);
        let s = with_redis(&[
            ("GB_REDIS_MODE", "Sentinel"),
            ("GB_REDIS_SENTINEL_MASTER", "gb-main"),
            (
                "GB_REDIS_URL",
                "redis://10.0.0.1:26379,redis://10.0.0.2:26379",
            ),
        ])
        .unwrap();
        assert_eq!(s.redis.mode, RedisMode::Sentinel);
        assert_eq!(s.redis.sentinel_master, "gb-main");
    }

    #[test]
    fn bad_redis_combinations_name_the_variable_and_hide_the_url() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: &[Case] = &[
            (&[("GB_REDIS_MODE", "shards")], "GB_REDIS_MODE", "shards"),
            (
                &[("GB_REDIS_URL", "redis://:s3cret@a:1,redis://:s3cret@b:1")],
                "GB_REDIS_URL",
                "several",
            ),
            (
                &[
                    ("GB_REDIS_MODE", "cluster"),
                    ("GB_REDIS_URL", "redis://:s3cret@a:7000/3"),
                ],
                "GB_REDIS_URL",
                "database 3",
            ),
            (&[("GB_REDIS_MODE", "cluster")], "GB_REDIS_URL", "required"),
            (
                &[("GB_REDIS_MODE", "sentinel")],
                "GB_REDIS_URL",
                "sentinels",
            ),
            (
                &[
                    ("GB_REDIS_MODE", "cluster"),
                    ("GB_REDIS_URL", "redis://:s3cret@a:1,rediss://:s3cret@b:1"),
                ],
                "GB_REDIS_URL",
                "mixes",
            ),
            (
                &[
                    ("GB_REDIS_MODE", "sentinel"),
                    ("GB_REDIS_URL", "unix:///run/s3cret.sock"),
                ],
                "GB_REDIS_URL",
                "sentinel mode",
            ),
            (
                &[("GB_REDIS_URL", "http://s3cret@a:1")],
                "GB_REDIS_URL",
                "redis://",
            ),
        ];
        for (pairs, var, words) in cases {
            let e = with_redis(pairs).unwrap_err();
            assert_eq!(e.var, *var, "{pairs:?}");
            let line = e.to_string();
            assert!(line.contains(words), "{pairs:?}: {line}");
            assert!(!line.contains("s3cret"), "{line}");
            assert_eq!(line.lines().count(), 1);
        }
    }

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
            let e = with_redis(&[(var, value)]).unwrap_err();
            assert_eq!(e.to_string(), line);
        }
    }

    #[test]
    fn tls_needs_both_files() {
        let e = with_redis(&[("GB_TLS_CERT", "/nonexistent/cert.pem")]).unwrap_err();
        assert_eq!(e.to_string(), "GB_TLS_KEY: is required with GB_TLS_CERT");
        let e = with_redis(&[("GB_TLS_KEY", "/nonexistent/key.pem")]).unwrap_err();
        assert_eq!(e.to_string(), "GB_TLS_CERT: is required with GB_TLS_KEY");
        let e = with_redis(&[
            ("GB_TLS_CERT", "/nonexistent/cert.pem"),
            ("GB_TLS_KEY", "/nonexistent/key.pem"),
        ])
        .unwrap_err();
        assert_eq!(e.var, "GB_TLS_CERT");
    }

    /// The loader reads exactly the variables the sections declare, so
    /// [`VARIABLES`] cannot drift from the code.
    #[test]
    fn the_loader_reads_exactly_the_declared_variables() {
        let raw = Raw::layered(env(&[("GB_API_KEYS", "k1"), ("GB_AUTH_TOKENS", "t")])).unwrap();
        raw.settings().unwrap();
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
        let s = with_redis(&[("GB_REDIS_ULR", "redis://127.0.0.1:1")]).unwrap();
        assert!(s.redis.url.is_none());
    }
}
