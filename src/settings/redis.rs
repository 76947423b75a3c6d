//! `redis`: the shared state store; without a URL the embedded one.

use std::time::Duration;

use secrecy::SecretString;

use super::raw::Raw;
use super::{err, SettingsError};

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

    pub(super) fn load(raw: &Raw) -> Result<Self, SettingsError> {
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

/// How `GB_REDIS_URL` is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisMode {
    /// One server.
    Standalone,
    /// Seed nodes of a Redis Cluster.
    Cluster,
    /// The sentinels watching the master named by `GB_REDIS_SENTINEL_MASTER`.
    Sentinel,
}

impl RedisMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RedisMode::Standalone => "standalone",
            RedisMode::Cluster => "cluster",
            RedisMode::Sentinel => "sentinel",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::testing::with_secrets;

    #[test]
    fn redis_mode_defaults_to_standalone_with_mymaster() {
        let s = with_secrets(&[("GB_REDIS_URL", "redis://127.0.0.1:6379/2")]).unwrap();
        assert_eq!(s.redis.mode, RedisMode::Standalone);
        assert_eq!(s.redis.sentinel_master, "mymaster");
        let s = with_secrets(&[
            ("GB_REDIS_MODE", "cluster"),
            (
                "GB_REDIS_URL",
                "redis://:pw@10.0.0.1:7000, redis://:pw@10.0.0.2:7000",
            ),
        ])
        .unwrap();
        assert_eq!(s.redis.mode, RedisMode::Cluster);
        let s = with_secrets(&[
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
            let e = with_secrets(pairs).unwrap_err();
            assert_eq!(e.var, *var, "{pairs:?}");
            let line = e.to_string();
            assert!(line.contains(words), "{pairs:?}: {line}");
            assert!(!line.contains("s3cret"), "{line}");
            assert_eq!(line.lines().count(), 1);
        }
    }
}
