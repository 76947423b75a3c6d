//! How the Redis store reaches Redis in each `GB_REDIS_MODE`:
//! - `standalone`: one server (`redis://` or `rediss://`), through a
//!   deadpool-redis pool.
//! - `cluster`: Redis Cluster, through the redis crate's cluster client,
//!   which follows `MOVED`/`ASK` and refreshes its slot map on failover and
//!   resharding.
//! - `sentinel`: the master named by the sentinels, through deadpool-redis's
//!   sentinel pool, which asks the sentinels and checks the master's role
//!   for every new connection.

use std::time::Duration;

use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::redis::cluster::ClusterClient;
use deadpool_redis::redis::cluster_async::ClusterConnection;
use deadpool_redis::redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use deadpool_redis::redis::{self, IntoConnectionInfo};
use deadpool_redis::{Pool, Runtime};
use secrecy::{ExposeSecret, SecretString};

use super::StoreError;

/// Redis Cluster's slot count.
const SLOTS: u64 = 16_384;

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

/// Where Redis is and how the store talks to it.
pub struct RedisConfig<'a> {
    pub mode: RedisMode,
    /// One URL (standalone), or a comma-separated list of seed nodes
    /// (cluster) or sentinels (sentinel).
    pub url: &'a SecretString,
    pub sentinel_master: &'a str,
    pub prefix: &'a str,
    /// Bound on every call.
    pub timeout: Duration,
    pub pool_size: usize,
    /// Worker threads that will call the store (one connection each).
    pub threads: usize,
}

/// Where connections come from.
pub(super) enum Source {
    Standalone(Pool),
    Sentinel(deadpool_redis::sentinel::Pool),
    /// The cluster client opens a connection per node and keeps them itself,
    /// so it needs no pool; built here so its retries stay within the
    /// store's timeout.
    Cluster(Box<ClusterClient>),
}

/// One connection, whatever the mode. Both kinds are multiplexed and cheap
/// to clone.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Source {
    pub(super) fn open(cfg: &RedisConfig<'_>) -> Result<Source, StoreError> {
        let urls: Vec<String> = cfg
            .url
            .expose_secret()
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect();
        let first = urls
            .first()
            .ok_or_else(|| bad_config("no Redis URL given"))?;
        let timeout = cfg.timeout;
        let source = match cfg.mode {
            RedisMode::Standalone => {
                let pool = deadpool_redis::Config::from_url(first.as_str())
                    .builder()
                    .map_err(bad_config)?
                    .max_size(cfg.pool_size)
                    .wait_timeout(Some(timeout))
                    .create_timeout(Some(timeout))
                    .recycle_timeout(Some(timeout))
                    .runtime(Runtime::Tokio1)
                    .build()
                    .map_err(bad_config)?;
                Source::Standalone(pool)
            }
            RedisMode::Sentinel => {
                use deadpool_redis::sentinel::{
                    Config, SentinelNodeConnectionInfo, SentinelServerType, TlsMode,
                };
                // The data nodes are reached with the URL's credentials and
                // database, over TLS when the URL is `rediss://`.
                let info = first.as_str().into_connection_info().map_err(bad_config)?;
                let settings = info.redis_settings();
                let node = SentinelNodeConnectionInfo {
                    tls_mode: first.starts_with("rediss://").then_some(TlsMode::Secure),
                    redis_connection_info: Some(deadpool_redis::RedisConnectionInfo {
                        db: settings.db(),
                        username: settings.username().map(str::to_string),
                        password: settings.password().map(str::to_string),
                        protocol: deadpool_redis::ProtocolVersion::RESP2,
                    }),
                };
                let pool = Config::from_urls(
                    urls.clone(),
                    cfg.sentinel_master.to_string(),
                    SentinelServerType::Master,
                )
                .with_node_connection_info(Some(node))
                .builder()
                .map_err(bad_config)?
                .max_size(cfg.pool_size)
                .wait_timeout(Some(timeout))
                .create_timeout(Some(timeout))
                .recycle_timeout(Some(timeout))
                .runtime(Runtime::Tokio1)
                .build()
                .map_err(bad_config)?;
                Source::Sentinel(pool)
            }
            RedisMode::Cluster => {
                // Redirects (MOVED/ASK) are followed at once; the retries
                // cover a node being replaced, and stay well inside the
                // store's own timeout, which bounds every call anyway.
                let client = redis::cluster::ClusterClientBuilder::new(urls.clone())
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(3)
                    .min_retry_wait(10)
                    .max_retry_wait((timeout.as_millis() as u64 / 4).max(10))
                    .build()
                    .map_err(bad_config)?;
                Source::Cluster(Box::new(client))
            }
        };
        Ok(source)
    }

    /// A new connection.
    pub(super) async fn connect(&self) -> Result<Conn, StoreError> {
        Ok(match self {
            Source::Standalone(pool) => {
                let obj = pool
                    .get()
                    .await
                    .map_err(|e| StoreError::Unavailable(pool_error(&e)))?;
                Conn::Single(deadpool_redis::Connection::take(obj))
            }
            Source::Sentinel(pool) => {
                let obj = pool.get().await.map_err(|e| {
                    StoreError::Unavailable(match e {
                        deadpool_redis::sentinel::PoolError::Backend(err) => cause(&err),
                        deadpool_redis::sentinel::PoolError::Timeout(_) => {
                            "timed out asking the sentinels for the master".into()
                        }
                        other => other.to_string(),
                    })
                })?;
                Conn::Single(deadpool_redis::sentinel::Connection::take(obj))
            }
            Source::Cluster(client) => {
                Conn::Cluster(client.get_async_connection().await.map_err(redis_error)?)
            }
        })
    }
}

/// Whether a server or cluster can serve the gateway's commands. The outer
/// error is a failed exchange; the inner one, a server that answers but
/// cannot serve.
pub(super) async fn check(
    mode: RedisMode,
    mut c: Conn,
) -> redis::RedisResult<Result<(), StoreError>> {
    match mode {
        RedisMode::Standalone | RedisMode::Sentinel => {
            // The server must be a master (writes fail on a replica), and not
            // a Redis Cluster node (its keys would answer `MOVED`).
            let (replication, cluster): (String, String) = redis::pipe()
                .cmd("INFO")
                .arg("replication")
                .cmd("INFO")
                .arg("cluster")
                .query_async(&mut c)
                .await?;
            if info_field(&cluster, "cluster_enabled") == Some("1") {
                return Ok(Err(StoreError::Misconfigured(
                    "GB_REDIS_URL names a Redis Cluster node; set GB_REDIS_MODE=cluster".into(),
                )));
            }
            Ok(match info_field(&replication, "role") {
                Some("master") | None => Ok(()),
                Some(role) => Err(StoreError::Unavailable(format!(
                    "the server is a {role}, not a master: writes would fail"
                ))),
            })
        }
        RedisMode::Cluster => {
            // The slots as the cluster assigns them, then a PING to each
            // master serving some: a master that died is unreachable at
            // once, before the other nodes mark it failing. CLUSTER INFO
            // adds the cluster's own view of its slots.
            let slots: Vec<redis::Value> = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async(&mut c)
                .await?;
            let (covered, masters) = slot_owners(&slots);
            if covered < SLOTS {
                return Ok(Err(StoreError::Unavailable(format!(
                    "only {covered} of {SLOTS} slots are assigned to a master"
                ))));
            }
            if let Conn::Cluster(cluster) = &mut c {
                for (host, port) in masters {
                    let ping = redis::cmd("PING");
                    let at = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: host.clone(),
                        port,
                    });
                    if cluster.route_command(ping, at).await.is_err() {
                        return Ok(Err(StoreError::Unavailable(format!(
                            "the master at {host}:{port} does not answer"
                        ))));
                    }
                }
            }
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut c)
                .await?;
            let state = info_field(&info, "cluster_state").unwrap_or("unknown");
            let slots_ok: u64 = info_field(&info, "cluster_slots_ok")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            Ok(if state != "ok" || slots_ok < SLOTS {
                Err(StoreError::Unavailable(format!(
                    "cluster state {state}: {slots_ok} of {SLOTS} slots served"
                )))
            } else {
                Ok(())
            })
        }
    }
}

/// From a `CLUSTER SLOTS` reply: how many slots are assigned to a master,
/// and each master's address.
fn slot_owners(reply: &[redis::Value]) -> (u64, Vec<(String, u16)>) {
    use redis::Value;
    let int = |v: &Value| match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let mut covered = 0;
    let mut masters: Vec<(String, u16)> = Vec::new();
    for range in reply {
        let Value::Array(fields) = range else {
            continue;
        };
        let (Some(start), Some(end)) = (fields.first().and_then(int), fields.get(1).and_then(int))
        else {
            continue;
        };
        let Some(Value::Array(node)) = fields.get(2) else {
            continue;
        };
        let host = node.first().and_then(text).unwrap_or_default();
        let port = node
            .get(1)
            .and_then(int)
            .and_then(|p| u16::try_from(p).ok());
        covered += end.saturating_sub(start) + 1;
        // A node whose address its peers do not know is reported as "" or
        // "?": it cannot be pinged by address.
        let known = !host.is_empty() && host != "?";
        if let Some(port) = port.filter(|_| known) {
            if !masters.iter().any(|(h, p)| *h == host && *p == port) {
                masters.push((host, port));
            }
        }
    }
    (covered, masters)
}

fn bad_config(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("bad Redis configuration: {e}"))
}

/// One `name:value` line of an `INFO` reply.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

fn pool_error(e: &deadpool_redis::PoolError) -> String {
    match e {
        deadpool_redis::PoolError::Timeout(_) => "timed out waiting for a connection".into(),
        deadpool_redis::PoolError::Backend(err) => cause(err),
        other => other.to_string(),
    }
}

/// What a failed exchange says about Redis, as a store error.
pub(super) fn redis_error(e: redis::RedisError) -> StoreError {
    if e.is_timeout() {
        StoreError::Timeout
    } else {
        StoreError::Unavailable(cause(&e))
    }
}

/// The cause of a failed exchange in a few words (`connection refused`,
/// `connection reset by peer`, …), for logs and `/readyz`; the store error
/// around it says that the store is unavailable. A server's error text names
/// the command kind, never its arguments, so it is passed on as it is.
pub(super) fn cause(e: &redis::RedisError) -> String {
    use std::io::ErrorKind as Io;
    // The redis crate keeps an I/O error behind an `Arc`.
    let io = std::error::Error::source(e).and_then(|s| {
        s.downcast_ref::<std::io::Error>().or_else(|| {
            s.downcast_ref::<std::sync::Arc<dyn std::error::Error + Send + Sync>>()
                .and_then(|inner| inner.downcast_ref::<std::io::Error>())
        })
    });
    let Some(io) = io else {
        return match e.to_string() {
            text if text.trim().is_empty() => format!("{:?}", e.kind()),
            text => text,
        };
    };
    match io.kind() {
        Io::ConnectionRefused => "connection refused".into(),
        Io::ConnectionReset => "connection reset by peer".into(),
        Io::ConnectionAborted => "connection aborted".into(),
        Io::BrokenPipe | Io::UnexpectedEof | Io::NotConnected => "connection closed".into(),
        Io::TimedOut | Io::WouldBlock => "timed out".into(),
        Io::HostUnreachable => "host unreachable".into(),
        Io::NetworkUnreachable => "network unreachable".into(),
        Io::AddrNotAvailable => "address not available".into(),
        Io::PermissionDenied => "permission denied".into(),
        // Name resolution and TLS failures carry their own words.
        _ => io.to_string(),
    }
}
