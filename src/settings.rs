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
    pub admin_token: Option<SecretString>,
    pub upstream_url: String,
    pub upstream_ca_file: Option<String>,
    pub redis_url: Option<SecretString>,
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
    pub log_format: LogFormat,
    pub max_body_bytes: usize,
    pub shutdown_grace: Duration,
    pub recheck_interval: Duration,
    /// Outbound proxies (`GB_PROXIES`), parsed; empty with `GB_PROXY_MODE=none`.
    pub proxies: Vec<crate::proxy::ProxySpec>,
    pub proxy_cooldown: Duration,
    /// Internal listener for `/metrics` and `/admin` (`GB_ADMIN_LISTEN`);
    /// when set, the public listener answers 404 there.
    pub admin_listen: Option<SocketAddr>,
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

    fn proxies(&self) -> Result<Vec<crate::proxy::ProxySpec>, SettingsError> {
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
                    crate::proxy::parse(url)
                        .map_err(|problem| err("proxies", format!("entry {} {problem}", i + 1)))
                })
                .collect(),
            other => Err(err(
                "proxy_mode",
                format!("expected hash or none, got {other:?}"),
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

        let mut api_keys = self.list("api_keys");
        if let Some(path) = self.opt("api_keys_file") {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| err("api_keys_file", format!("cannot read the file: {e}")))?;
            api_keys.extend(split_list(&text, '\n'));
        }
        dedup_secrets(&mut api_keys);
        if api_keys.is_empty() {
            return Err(err(
                "api_keys",
                "at least one Gemini API key is required (or GB_API_KEYS_FILE)",
            ));
        }

        let mut auth_tokens = self.list("auth_tokens");
        dedup_secrets(&mut auth_tokens);
        if auth_tokens.is_empty() {
            return Err(err("auth_tokens", "at least one client token is required"));
        }
        let admin_token = self.opt("admin_token").map(SecretString::from);
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
        if let Some(url) = &redis_url {
            if !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("unix://")
                || url.starts_with("redis+unix://"))
            {
                return Err(err("redis_url", "must start with redis:// or rediss://"));
            }
        }
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

        Ok(Settings {
            listen,
            api_keys,
            auth_tokens,
            admin_token,
            upstream_url,
            upstream_ca_file,
            redis_url: redis_url.map(SecretString::from),
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
            log_format,
            max_body_bytes,
            shutdown_grace: self.secs("shutdown_grace")?,
            recheck_interval: self.secs("recheck_interval")?,
            proxies: self.proxies()?,
            proxy_cooldown: self.secs("proxy_cooldown")?,
            admin_listen,
        })
    }
}

fn split_list(text: &str, sep: char) -> Vec<SecretString> {
    text.split(sep)
        .map(str::trim)
        .filter(|s| !s.is_empty() && !s.starts_with('#'))
        .map(|s| SecretString::from(s.to_string()))
        .collect()
}

fn dedup_secrets(list: &mut Vec<SecretString>) {
    use secrecy::ExposeSecret;
    let mut seen = std::collections::HashSet::new();
    list.retain(|s| seen.insert(s.expose_secret().to_string()));
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
