//! The Redis store: what lets any replica serve any request.
//!
//! The same commands in every `GB_REDIS_MODE` (see [`super::connect`]).
//! Every multi-key command, pipeline and script stays in one Redis Cluster
//! slot (see [`Keyspace`]); reads over unrelated keys are sent as concurrent
//! single-key commands on a cluster instead of one pipeline. The key layout,
//! with each key's slot tag, is written down once, in `ARCHITECTURE.md`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_redis::redis::{self, Script};
use secrecy::SecretString;

use super::connect::{check, redis_error, Conn, Source};
use super::keyspace::Keyspace;
use super::limits::{
    Ask, ClientUse, Held, KeySettle, KeyWindow, KeyWindowUse, LeaseSet, Limit, Settle, Verdict,
    WindowAsk, MINUTE_MS, WINDOW_MARGIN_MS,
};
use super::snapshot::{Snapshots, VERSION_STEP};
use super::{
    effective_state, state_field, Applied, IndexEntry, MemberState, Pick, RedisConfig, RedisMode,
    StateStore, StoreError, Transition,
};

mod breaker;
mod counts;
mod exchange;
mod records;
mod rings;
mod store;

use breaker::{monotonic_ms, Breaker};
use exchange::Resend;

const CLAIM: &str = include_str!("../lua/claim.lua");

const REPLACE: &str = include_str!("../lua/replace.lua");

const UNLOCK: &str = include_str!("../lua/unlock.lua");

const INDEX_ADD: &str = include_str!("../lua/index_add.lua");

const INDEX_PAGE: &str = include_str!("../lua/index_page.lua");

const TRANSITION: &str = include_str!("../lua/transition.lua");

const ADMIT: &str = include_str!("../lua/admit.lua");

const ROTATE_WITHIN: &str = include_str!("../lua/rotate_within.lua");

/// Called after every Redis exchange with its latency and whether it worked.
pub type Observer = Arc<dyn Fn(Duration, bool) + Send + Sync>;

/// Consecutive failures that open the circuit: while open, calls fail at
/// once instead of each waiting for a timeout on a Redis that is down.
const TRIP_AFTER: u32 = 3;
/// While the circuit is open, one call in this many milliseconds goes
/// through as a probe; the first probe that succeeds closes the circuit.
const PROBE_EVERY_MS: u64 = 200;
/// Least time between two rebuilds of the cluster connection.
const REBUILD_EVERY_MS: u64 = 250;
/// Connections beyond one per worker thread: for the main thread and
/// background tasks.
const SPARE_CONNECTIONS: usize = 2;
/// What a call refused by the open circuit fails with.
const CIRCUIT_OPEN: &str = "circuit open after repeated failures; probing again shortly";

pub struct RedisStore {
    source: Source,
    mode: RedisMode,
    slots: Vec<std::sync::RwLock<Option<Conn>>>,
    breaker: Breaker,
    /// Cluster mode: a call failed, so the cluster's slots may have moved
    /// to a promoted replica while the connections still point at a master
    /// that no longer answers (see [`RedisStore::probe`]).
    cluster_suspect: AtomicBool,
    /// When the cluster connection was last rebuilt (monotonic ms).
    rebuilt_ms: AtomicU64,
    observer: Option<Observer>,
    keys: Keyspace,
    timeout: Duration,
    claim: Script,
    replace: Script,
    unlock: Script,
    index_add: Script,
    index_page: Script,
    transition: Script,
    admit: Script,
    rotate_within: Script,
    snapshots: Snapshots,
}

impl RedisStore {
    /// A standalone store on one URL (see [`RedisStore::open`]).
    pub fn new(
        url: &SecretString,
        prefix: &str,
        timeout: Duration,
        pool_size: usize,
        threads: usize,
    ) -> Result<Self, StoreError> {
        Self::open(&RedisConfig {
            mode: RedisMode::Standalone,
            url,
            sentinel_master: "mymaster",
            prefix,
            timeout,
            pool_size,
            threads,
        })
    }

    /// Builds the store; connects lazily, so a Redis that is down at start
    /// does not keep the gateway from starting.
    pub fn open(cfg: &RedisConfig<'_>) -> Result<Self, StoreError> {
        let source = Source::open(cfg)?;
        Ok(Self {
            source,
            mode: cfg.mode,
            slots: (0..cfg
                .pool_size
                .clamp(1, cfg.threads.max(1) + SPARE_CONNECTIONS))
                .map(|_| std::sync::RwLock::new(None))
                .collect(),
            breaker: Breaker::default(),
            cluster_suspect: AtomicBool::new(false),
            rebuilt_ms: AtomicU64::new(0),
            observer: None,
            keys: Keyspace::new(cfg.prefix),
            timeout: cfg.timeout,
            claim: Script::new(CLAIM),
            replace: Script::new(REPLACE),
            unlock: Script::new(UNLOCK),
            index_add: Script::new(INDEX_ADD),
            index_page: Script::new(INDEX_PAGE),
            transition: Script::new(TRANSITION),
            admit: Script::new(ADMIT),
            rotate_within: Script::new(ROTATE_WITHIN),
            snapshots: Snapshots::default(),
        })
    }

    #[must_use]
    pub fn with_observer(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn redis_mode(&self) -> RedisMode {
        self.mode
    }

    /// Whether the circuit is open: calls fail fast until a probe succeeds.
    pub fn circuit_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// Run by a background task every 100 ms; does nothing while every call
    /// works.
    ///
    /// While the circuit is open, one probe of Redis (a `PING` admitted as
    /// the breaker's probe); a success closes the circuit, so requests find
    /// it closed as soon as Redis is back, with or without traffic before
    /// them.
    ///
    /// In cluster mode, after a failed call, a new cluster connection, put
    /// in place of every worker's. A master whose host is gone leaves the
    /// connections pointing at it (its requests time out; nothing refuses
    /// them), and the cluster client reads the slots again only when a node
    /// redirects it, which a dead node never does: a new connection reads
    /// them from a node that answers, so requests follow the promoted
    /// replica as soon as the cluster has promoted it. It is built here,
    /// not in a request, because connecting to every node waits out the
    /// connect timeout of the one that is gone, longer than a request may
    /// wait.
    pub async fn probe(&self) {
        if self.mode == RedisMode::Cluster && self.cluster_suspect.load(Ordering::Relaxed) {
            let now = monotonic_ms();
            if now >= self.rebuilt_ms.load(Ordering::Relaxed) + REBUILD_EVERY_MS {
                self.cluster_suspect.store(false, Ordering::Relaxed);
                self.rebuilt_ms.store(now, Ordering::Relaxed);
                let wait = (self.timeout * 4).max(Duration::from_secs(2));
                match tokio::time::timeout(wait, self.source.connect()).await {
                    Ok(Ok(conn)) => {
                        for cell in &self.slots {
                            if let Ok(mut s) = cell.write() {
                                *s = Some(conn.clone());
                            }
                        }
                        tracing::info!("cluster connection rebuilt after a failed call");
                    }
                    Ok(Err(e)) => {
                        self.cluster_suspect.store(true, Ordering::Relaxed);
                        tracing::warn!(error = %e, "could not rebuild the cluster connection");
                    }
                    Err(_) => {
                        self.cluster_suspect.store(true, Ordering::Relaxed);
                        tracing::warn!("rebuilding the cluster connection timed out");
                    }
                }
            }
        }
        if self.circuit_open() {
            let _: Result<String, StoreError> = self
                .run(|mut c| async move { redis::cmd("PING").query_async(&mut c).await })
                .await;
        }
    }

    /// The layout version recorded in Redis (0 for an empty Redis).
    pub async fn layout_version(&self) -> Result<u64, StoreError> {
        let key = &self.keys.layout();
        let v: Option<u64> = self
            .run(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await?;
        Ok(v.unwrap_or(0))
    }

    pub async fn set_layout_version(&self, version: u64) -> Result<(), StoreError> {
        let key = &self.keys.layout();
        self.run(|mut c| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(version)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// The full name of a key under this store's prefix (for migrations).
    pub fn key(&self, parts: &[&str]) -> String {
        self.keys.key(parts)
    }

    /// One raw command, bounded like every other (for migrations).
    pub async fn command<T: redis::FromRedisValue>(
        &self,
        cmd: redis::Cmd,
    ) -> Result<T, StoreError> {
        let cmd = &cmd;
        self.run(|mut c| async move { cmd.query_async(&mut c).await })
            .await
    }
}

fn decode_states(raw: HashMap<String, String>) -> HashMap<String, MemberState> {
    raw.into_iter()
        .filter_map(|(k, v)| MemberState::decode(&v).map(|s| (k, s)))
        .collect()
}

/// A sorted-set score the store wrote (whole milliseconds).
fn parse_score(raw: &str) -> Result<u64, StoreError> {
    raw.parse::<u64>()
        .ok()
        .or_else(|| {
            raw.parse::<f64>()
                .ok()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f as u64)
        })
        .ok_or_else(|| StoreError::Corrupt("an index score is not a number".into()))
}

fn secs(ttl: Duration) -> u64 {
    ttl.as_secs().max(1)
}
