//! Typed settings. The only place that reads the environment.
//!
//! Layers, later wins: `config/default.toml` (compiled in), the file named by
//! `GB_CONFIG`, then `GB_*` environment variables. Every error names the
//! variable an operator has to fix, and never echoes a secret value.

use std::net::SocketAddr;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use secrecy::SecretString;

const DEFAULTS: &str = include_str!("../config/default.toml");

#[derive(Debug, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct SettingsError {
    pub var: String,
    pub problem: String,
}

fn err(key: &str, problem: impl Into<String>) -> SettingsError {
    SettingsError {
        var: format!("GB_{}", key.to_uppercase()),
        problem: problem.into(),
    }
}

/// How uploads without a session id are bound (`GB_UPLOAD_AFFINITY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadAffinity {
    /// The uploads of one client token share a key.
    Token,
    /// Rotation.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Everything the gateway needs, validated. `Debug` is safe to log: secrets
/// print as `[REDACTED]`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub api_keys: Vec<SecretString>,
    pub auth_tokens: Vec<SecretString>,
    /// Secrets files re-read while running (`GB_*_FILE`).
    pub api_keys_file: Option<SecretFile>,
    pub auth_tokens_file: Option<SecretFile>,
    pub admin_token_file: Option<SecretFile>,
    /// How often those files are checked (`GB_RELOAD_INTERVAL`).
    pub reload_interval: Duration,
    pub admin_token: Option<SecretString>,
    pub upstream_url: String,
    pub upstream_ca_file: Option<String>,
    pub redis_url: Option<SecretString>,
    /// How `redis_url` is read: one server, cluster seeds, or sentinels.
    pub redis_mode: crate::state::RedisMode,
    /// The master's name in sentinel mode (GB_REDIS_SENTINEL_MASTER).
    pub redis_sentinel_master: String,
    pub redis_prefix: String,
    pub redis_timeout: Duration,
    pub redis_pool_size: usize,
    /// HTTP worker threads (GB_WORKERS, or one per CPU the process may use).
    pub workers: usize,
    pub public_url: Option<String>,
    pub trust_forwarded: bool,
    pub session_ttl: Duration,
    pub file_ttl: Duration,
    pub upload_ttl: Duration,
    pub max_retries: u32,
    pub upstream_timeout: Duration,
    /// Longest gap between two chunks of an upstream body.
    pub upstream_idle_timeout: Duration,
    pub log_format: LogFormat,
    pub max_body_bytes: usize,
    pub shutdown_grace: Duration,
    pub recheck_interval: Duration,
    /// How long a pinned request waits for its key's cooldown (GB_PIN_WAIT).
    pub pin_wait: Duration,
    /// Upstream lookups of unknown owners one request may cause.
    pub discovery_budget: usize,
    pub upload_affinity: UploadAffinity,
    /// Lifetime of an admin page session.
    pub admin_session_ttl: Duration,
    /// Outbound proxies (`GB_PROXIES`), parsed; empty with `GB_PROXY_MODE=none`.
    pub proxies: Vec<crate::upstream::proxy::ProxySpec>,
    pub proxy_cooldown: Duration,
    /// Open Live sessions per key before new sessions prefer other keys.
    pub live_sessions_per_key: usize,
    /// PEM certificate chain and key of the optional TLS listener.
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    /// Client token id → the label written before it (`label=token` in
    /// `GB_AUTH_TOKENS`): what the status page shows for the token.
    pub token_labels: Vec<(String, String)>,
    /// Days of hourly usage kept (`GB_USAGE_RETENTION_DAYS`).
    pub usage_retention_days: u64,
    /// Distinct usage series (token × key × model) one replica records per
    /// hour before folding new models into `other` (`GB_USAGE_MAX_SERIES`).
    pub usage_max_series: usize,
    /// Internal listener for `/metrics` and `/admin` (`GB_ADMIN_LISTEN`);
    /// when set, the public listener answers 404 there.
    pub admin_listen: Option<SocketAddr>,
}

/// A secrets file and a digest of the content the settings were read from,
/// so a reload sees any change made after that.
#[derive(Debug, Clone)]
pub struct SecretFile {
    pub path: String,
    pub digest: [u8; 32],
}

impl SecretFile {
    fn read(key: &str, path: &str) -> Result<(Self, String), SettingsError> {
        use sha2::{Digest, Sha256};
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(key, format!("cannot read the file: {}", e.kind())))?;
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
    let config_file = env
        .iter()
        .find(|(k, _)| k == "GB_CONFIG")
        .map(|(_, v)| v.clone());
    let mut builder =
        Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml).required(true));
    if let Some(path) = config_file.filter(|p| !p.is_empty()) {
        if !std::path::Path::new(&path).is_file() {
            return Err(err("config", "the file it names does not exist"));
        }
        builder = builder.add_source(File::with_name(&path).required(true));
    }
    let env_map = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("GB_") && k != "GB_CONFIG")
        .collect();
    builder = builder.add_source(
        Environment::with_prefix("GB")
            .prefix_separator("_")
            .source(Some(env_map)),
    );
    let cfg = builder
        .build()
        .map_err(|e| err("config", format!("cannot be read: {e}")))?;
    Raw(cfg).settings()
}

/// Worker threads when GB_WORKERS is unset: one per CPU the process may use
/// (cgroup CPU limits included), as actix does.
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

struct Raw(Config);

impl Raw {
    fn opt(&self, key: &str) -> Option<String> {
        match self.0.get_string(key) {
            Ok(v) if !v.trim().is_empty() => Some(v.trim().to_string()),
            _ => match self.0.get_array(key) {
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

    fn req(&self, key: &str) -> Result<String, SettingsError> {
        self.opt(key).ok_or_else(|| err(key, "is required"))
    }

    fn num<T: std::str::FromStr>(&self, key: &str) -> Result<T, SettingsError> {
        let v = self.req(key)?;
        v.parse()
            .map_err(|_| err(key, format!("expected a whole number, got {v:?}")))
    }

    fn secs(&self, key: &str) -> Result<Duration, SettingsError> {
        let n: u64 = self.num(key)?;
        if n == 0 {
            return Err(err(key, "must be at least 1 second"));
        }
        Ok(Duration::from_secs(n))
    }

    fn boolean(&self, key: &str) -> Result<bool, SettingsError> {
        match self.req(key)?.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            other => Err(err(key, format!("expected true or false, got {other:?}"))),
        }
    }

    fn list(&self, key: &str) -> Vec<SecretString> {
        self.opt(key)
            .map(|v| split_list(&v, ','))
            .unwrap_or_default()
    }

    fn proxies(&self) -> Result<Vec<crate::upstream::proxy::ProxySpec>, SettingsError> {
        let mode = self.req("proxy_mode")?.to_ascii_lowercase();
        let list = self.opt("proxies").unwrap_or_default();
        match mode.as_str() {
            "none" => Ok(Vec::new()),
            "hash" => list
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .enumerate()
                .map(|(i, url)| {
                    crate::upstream::proxy::parse(url)
                        .map_err(|problem| err("proxies", format!("entry {} {problem}", i + 1)))
                })
                .collect(),
            other => Err(err(
                "proxy_mode",
                format!("expected hash or none, got {other:?}"),
            )),
        }
    }

    /// The path in `GB_{KEY}_FILE`; giving both it and `GB_{KEY}` is an error.
    fn file_of(&self, key: &str) -> Result<Option<String>, SettingsError> {
        let file = self.opt(&format!("{key}_file"));
        if file.is_some() && self.opt(key).is_some() {
            let var = format!("GB_{}", key.to_uppercase());
            return Err(SettingsError {
                var: format!("{var} and {var}_FILE"),
                problem: "give one of them, not both".into(),
            });
        }
        Ok(file)
    }

    fn redis_mode(&self) -> Result<crate::state::RedisMode, SettingsError> {
        use crate::state::RedisMode;
        match self.req("redis_mode")?.to_ascii_lowercase().as_str() {
            "standalone" => Ok(RedisMode::Standalone),
            "cluster" => Ok(RedisMode::Cluster),
            "sentinel" => Ok(RedisMode::Sentinel),
            other => Err(err(
                "redis_mode",
                format!("expected standalone, cluster or sentinel, got {other:?}"),
            )),
        }
    }

    fn settings(&self) -> Result<Settings, SettingsError> {
        let listen_raw = self.req("listen")?;
        let listen = listen_raw.parse().map_err(|_| {
            err(
                "listen",
                format!("expected host:port such as 0.0.0.0:8000, got {listen_raw:?}"),
            )
        })?;

        let (api_keys_file, mut api_keys) = match self.file_of("api_keys")? {
            Some(path) => {
                let (file, text) = SecretFile::read("api_keys_file", &path)?;
                let keys = crate::background::reload::parse_keys(&text)
                    .map_err(|p| err("api_keys_file", p))?;
                (Some(file), keys)
            }
            None => (None, self.list("api_keys")),
        };
        dedup_secrets(&mut api_keys);
        if api_keys.is_empty() {
            return Err(err(
                "api_keys",
                "at least one Gemini API key is required (or GB_API_KEYS_FILE)",
            ));
        }

        let (auth_tokens_file, (mut auth_tokens, token_labels)) =
            match self.file_of("auth_tokens")? {
                Some(path) => {
                    let (file, text) = SecretFile::read("auth_tokens_file", &path)?;
                    let parsed = crate::background::reload::parse_tokens(&text)
                        .map_err(|p| err("auth_tokens_file", p))?;
                    (Some(file), parsed)
                }
                None => {
                    let mut tokens = self.list("auth_tokens");
                    let labels = split_labels(&mut tokens);
                    (None, (tokens, labels))
                }
            };
        dedup_secrets(&mut auth_tokens);
        if auth_tokens.is_empty() {
            return Err(err(
                "auth_tokens",
                "at least one client token is required (or GB_AUTH_TOKENS_FILE)",
            ));
        }
        let (admin_token_file, admin_token) = match self.file_of("admin_token")? {
            Some(path) => {
                let (file, text) = SecretFile::read("admin_token_file", &path)?;
                let token = crate::background::reload::parse_admin(&text)
                    .map_err(|p| err("admin_token_file", p))?;
                (Some(file), Some(token))
            }
            None => (None, self.opt("admin_token").map(SecretString::from)),
        };
        if let Some(admin) = &admin_token {
            use secrecy::ExposeSecret;
            if auth_tokens
                .iter()
                .any(|t| t.expose_secret() == admin.expose_secret())
            {
                return Err(err("admin_token", "must differ from every client token"));
            }
        }

        let upstream_url = self.req("upstream_url")?.trim_end_matches('/').to_string();
        if !(upstream_url.starts_with("http://") || upstream_url.starts_with("https://")) {
            return Err(err("upstream_url", "must start with http:// or https://"));
        }
        let upstream_ca_file = self.opt("upstream_ca_file");
        if let Some(path) = &upstream_ca_file {
            if !std::path::Path::new(path).is_file() {
                return Err(err("upstream_ca_file", "the file it names does not exist"));
            }
        }

        let redis_url = self.opt("redis_url");
        let redis_mode = self.redis_mode()?;
        let redis_sentinel_master = self.req("redis_sentinel_master")?;
        check_redis_urls(redis_url.as_deref(), redis_mode)?;
        let redis_prefix = self.req("redis_prefix")?;
        if !redis_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(err("redis_prefix", "may hold only letters, digits, - _ ."));
        }

        let public_url = self
            .opt("public_url")
            .map(|u| u.trim_end_matches('/').to_string());
        if let Some(u) = &public_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(err("public_url", "must start with http:// or https://"));
            }
        }

        let log_format = match self.req("log_format")?.to_ascii_lowercase().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(err(
                    "log_format",
                    format!("expected text or json, got {other:?}"),
                ))
            }
        };
        let max_body_bytes: usize = self.num("max_body_bytes")?;
        if max_body_bytes < 1024 {
            return Err(err("max_body_bytes", "must be at least 1024"));
        }
        let redis_pool_size: usize = self.num("redis_pool_size")?;
        if redis_pool_size == 0 {
            return Err(err("redis_pool_size", "must be at least 1"));
        }
        let workers = match self.opt("workers") {
            None => default_workers(),
            Some(_) => {
                let n: usize = self.num("workers")?;
                if n == 0 {
                    return Err(err("workers", "must be at least 1"));
                }
                n
            }
        };
        let admin_listen = match self.opt("admin_listen") {
            None => None,
            Some(raw) => {
                let addr: SocketAddr = raw.parse().map_err(|_| {
                    err(
                        "admin_listen",
                        format!("expected host:port such as 0.0.0.0:9000, got {raw:?}"),
                    )
                })?;
                if addr == listen && addr.port() != 0 {
                    return Err(err("admin_listen", "must differ from GB_LISTEN"));
                }
                Some(addr)
            }
        };
        let redis_timeout_ms: u64 = self.num("redis_timeout_ms")?;
        if redis_timeout_ms == 0 {
            return Err(err("redis_timeout_ms", "must be at least 1"));
        }

        let live_sessions_per_key: usize = self.num("live_sessions_per_key")?;
        if live_sessions_per_key == 0 {
            return Err(err("live_sessions_per_key", "must be at least 1"));
        }
        let (tls_cert, tls_key) = (self.opt("tls_cert"), self.opt("tls_key"));
        match (&tls_cert, &tls_key) {
            (Some(_), None) => return Err(err("tls_key", "is required with GB_TLS_CERT")),
            (None, Some(_)) => return Err(err("tls_cert", "is required with GB_TLS_KEY")),
            _ => {}
        }
        for (name, path) in [("tls_cert", &tls_cert), ("tls_key", &tls_key)] {
            if path
                .as_ref()
                .is_some_and(|p| !std::path::Path::new(p).is_file())
            {
                return Err(err(name, "the file it names does not exist"));
            }
        }

        Ok(Settings {
            live_sessions_per_key,
            tls_cert,
            tls_key,
            listen,
            api_keys,
            auth_tokens,
            api_keys_file,
            auth_tokens_file,
            admin_token_file,
            reload_interval: self.secs("reload_interval")?,
            admin_token,
            upstream_url,
            upstream_ca_file,
            redis_url: redis_url.map(SecretString::from),
            redis_mode,
            redis_sentinel_master,
            redis_prefix,
            redis_timeout: Duration::from_millis(redis_timeout_ms),
            redis_pool_size,
            workers,
            public_url,
            trust_forwarded: self.boolean("trust_forwarded")?,
            session_ttl: self.secs("session_ttl")?,
            file_ttl: self.secs("file_ttl")?,
            upload_ttl: self.secs("upload_ttl")?,
            max_retries: self.num("max_retries")?,
            upstream_timeout: self.secs("upstream_timeout")?,
            upstream_idle_timeout: self.secs("upstream_idle_timeout")?,
            log_format,
            max_body_bytes,
            shutdown_grace: self.secs("shutdown_grace")?,
            recheck_interval: self.secs("recheck_interval")?,
            pin_wait: Duration::from_secs(self.num("pin_wait")?),
            discovery_budget: self.num("discovery_budget")?,
            admin_session_ttl: self.secs("admin_session_ttl")?,
            upload_affinity: match self.req("upload_affinity")?.to_ascii_lowercase().as_str() {
                "token" => UploadAffinity::Token,
                "none" => UploadAffinity::None,
                other => {
                    return Err(err(
                        "upload_affinity",
                        format!("expected token or none, got {other:?}"),
                    ))
                }
            },
            proxies: self.proxies()?,
            proxy_cooldown: self.secs("proxy_cooldown")?,
            token_labels,
            usage_retention_days: match self.num::<u64>("usage_retention_days")? {
                n @ 1..=90 => n,
                _ => return Err(err("usage_retention_days", "must be between 1 and 90")),
            },
            usage_max_series: match self.num::<usize>("usage_max_series")? {
                0 => return Err(err("usage_max_series", "must be at least 1")),
                n => n,
            },
            admin_listen,
        })
    }
}

/// Checks `GB_REDIS_URL` against `GB_REDIS_MODE`. Messages never echo a URL:
/// it may carry a password.
fn check_redis_urls(url: Option<&str>, mode: crate::state::RedisMode) -> Result<(), SettingsError> {
    use crate::state::RedisMode;
    use deadpool_redis::redis::IntoConnectionInfo;
    let Some(url) = url else {
        return match mode {
            RedisMode::Standalone => Ok(()),
            _ => Err(err(
                "redis_url",
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
        return Err(err("redis_url", "names no server"));
    }
    if mode == RedisMode::Standalone && urls.len() > 1 {
        return Err(err(
            "redis_url",
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
                "redis_url",
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
            .map_err(|_| err("redis_url", format!("{which} is not a valid Redis URL")))?;
        if mode == RedisMode::Cluster && info.redis_settings().db() != 0 {
            return Err(err(
                "redis_url",
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
            "redis_url",
            "mixes redis:// and rediss://; use one scheme for every server",
        ));
    }
    Ok(())
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

use crate::background::reload::{dedup as dedup_secrets, split_labels};

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
        assert_eq!(s.api_keys.len(), 2);
        assert_eq!(s.session_ttl, Duration::from_secs(3600));
        assert_eq!(s.file_ttl, Duration::from_secs(172800));
        assert_eq!(s.max_retries, 3);
        assert_eq!(s.listen.port(), 8000);
        assert!(s.redis_url.is_none());
        assert_eq!(s.workers, default_workers());
    }

    #[test]
    fn workers_are_a_positive_count() {
        let base = [("GB_API_KEYS", "k1"), ("GB_AUTH_TOKENS", "t")];
        let s = load_from(env(&[base[0], base[1], ("GB_WORKERS", "3")])).unwrap();
        assert_eq!(s.workers, 3);
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
        let tokens: Vec<&str> = s.auth_tokens.iter().map(|t| t.expose_secret()).collect();
        assert_eq!(tokens, ["tok-a", "tok-b", "padded==", "bad label=tok-c"]);
        assert_eq!(
            s.token_labels,
            vec![(
                crate::domain::identity::short_id(&SecretString::from("tok-a")),
                "alice".to_string()
            )]
        );
        assert_eq!(s.usage_retention_days, 7);
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
        assert!(load_from(env(&base)).unwrap().admin_listen.is_none());
        let s = load_from(env(&[
            base[0],
            base[1],
            ("GB_ADMIN_LISTEN", "0.0.0.0:9000"),
        ]))
        .unwrap();
        assert_eq!(s.admin_listen.map(|a| a.port()), Some(9000));
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
        use crate::state::RedisMode;
        let s = with_redis(&[("GB_REDIS_URL", "redis://127.0.0.1:6379/2")]).unwrap();
        assert_eq!(s.redis_mode, RedisMode::Standalone);
        assert_eq!(s.redis_sentinel_master, "mymaster");
        let s = with_redis(&[
            ("GB_REDIS_MODE", "cluster"),
            (
                "GB_REDIS_URL",
                "redis://:pw@10.0.0.1:7000, redis://:pw@10.0.0.2:7000",
            ),
        ])
        .unwrap();
        assert_eq!(s.redis_mode, RedisMode::Cluster);
        let s = with_redis(&[
            ("GB_REDIS_MODE", "Sentinel"),
            ("GB_REDIS_SENTINEL_MASTER", "gb-main"),
            (
                "GB_REDIS_URL",
                "redis://10.0.0.1:26379,redis://10.0.0.2:26379",
            ),
        ])
        .unwrap();
        assert_eq!(s.redis_mode, RedisMode::Sentinel);
        assert_eq!(s.redis_sentinel_master, "gb-main");
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
        assert_eq!(s.api_keys.len(), 2);
    }
}
