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

const CLAIM: &str = include_str!("lua/claim.lua");

const REPLACE: &str = include_str!("lua/replace.lua");

const UNLOCK: &str = include_str!("lua/unlock.lua");

const INDEX_ADD: &str = include_str!("lua/index_add.lua");

const INDEX_PAGE: &str = include_str!("lua/index_page.lua");

const TRANSITION: &str = include_str!("lua/transition.lua");

const ADMIT: &str = include_str!("lua/admit.lua");

const ROTATE_WITHIN: &str = include_str!("lua/rotate_within.lua");

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

/// Numbers threads in the order they first touch Redis.
static THREADS_SEEN: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static THREAD_SLOT: usize = THREADS_SEEN.fetch_add(1, Ordering::Relaxed);
}

/// The circuit breaker's state. Its times are on the monotonic clock
/// ([`monotonic_ms`]): a wall clock stepped back would keep it open for the
/// size of the step.
#[derive(Default)]
struct Breaker {
    failures: AtomicU32,
    /// 0 while closed; while open, when the next probe may go through.
    next_probe_ms: AtomicU64,
}

impl Breaker {
    /// Whether a call may go to Redis now: always while closed; while open,
    /// one caller per [`PROBE_EVERY_MS`] (the probe), the rest fail fast.
    fn admit(&self) -> bool {
        let next = self.next_probe_ms.load(Ordering::Relaxed);
        if next == 0 {
            return true;
        }
        let now = monotonic_ms();
        now >= next
            && self
                .next_probe_ms
                .compare_exchange(
                    next,
                    now + PROBE_EVERY_MS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// A call worked: the circuit closes at once.
    fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if self.next_probe_ms.load(Ordering::Relaxed) != 0
            && self.next_probe_ms.swap(0, Ordering::Relaxed) != 0
        {
            tracing::info!("the state store answers again: circuit closed");
        }
    }

    /// A call failed; how many in a row have now. The circuit opens (or, after
    /// a failed probe, stays open) from the [`TRIP_AFTER`]th.
    fn failed(&self) -> u32 {
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures >= TRIP_AFTER {
            let was = self
                .next_probe_ms
                .swap(monotonic_ms() + PROBE_EVERY_MS, Ordering::Relaxed);
            if was == 0 {
                tracing::warn!(
                    failures,
                    "state store circuit open: calls fail fast until a probe succeeds"
                );
            }
        }
        failures
    }
}

/// Whether a command may be sent again when the connection it went out on
/// turns out to be dead.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Resend {
    /// Running it twice leaves Redis as running it once does (reads, `SET`,
    /// `DEL`, `ZADD`, the scripts, which check what they find), or costs
    /// nothing that matters (rotation's `INCR` skips one place in the ring).
    Safe,
    /// Counted increments (`HINCRBY`): a second run would count twice.
    Never,
}

/// Milliseconds on the monotonic clock since this process first asked
/// (never 0, so a zeroed breaker is closed).
fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

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
        self.breaker.next_probe_ms.load(Ordering::Relaxed) != 0
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

    /// Runs one Redis exchange on this thread's connection, bounded by the
    /// timeout; sent again once on a fresh connection when the kept one turns
    /// out to be dead (see [`Self::exchange`]).
    async fn run<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.exchange(Resend::Safe, f).await
    }

    /// [`Self::run`] for a command that must never be sent twice.
    async fn run_once<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.exchange(Resend::Never, f).await
    }

    /// One exchange. A connection kept from earlier calls can be dead without
    /// anyone having noticed: Redis restarted, or something between closed
    /// it while it was idle. Such a connection fails its next command as
    /// dropped before sending it, so that command is sent again once on a
    /// fresh connection (when `resend` allows), on every worker, before any
    /// caller sees an error. A fresh connection that fails is an outage.
    async fn exchange<T, F, Fut>(&self, resend: Resend, f: F) -> Result<T, StoreError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let slot = THREAD_SLOT.with(|s| *s) % self.slots.len();
        if !self.breaker.admit() {
            return Err(StoreError::Unavailable(CIRCUIT_OPEN.into()));
        }
        let work = async {
            let (conn, kept) = self.connection(slot).await?;
            // A cluster connection reconnects to its nodes by itself.
            let single = matches!(conn, Conn::Single(_));
            match f(conn).await {
                Err(e) if kept && single && resend == Resend::Safe && e.is_connection_dropped() => {
                    self.forget(slot);
                    let (conn, _) = self.connection(slot).await?;
                    f(conn).await.map_err(redis_error)
                }
                other => other.map_err(redis_error),
            }
        };
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| StoreError::Timeout)
            .and_then(|r| r);
        if let Some(observe) = &self.observer {
            observe(started.elapsed(), result.is_ok());
        }
        match &result {
            Ok(_) => self.breaker.succeeded(),
            Err(StoreError::Timeout | StoreError::Unavailable(_)) => {
                self.breaker.failed();
                if self.mode == RedisMode::Cluster {
                    // Rebuilt in the background (see `probe`): opening a
                    // cluster connection can take longer than a request
                    // may wait.
                    self.cluster_suspect.store(true, Ordering::Relaxed);
                } else {
                    // The connection may be dead, or (sentinel) point at a
                    // demoted master: the next call on this slot takes a
                    // fresh one.
                    self.forget(slot);
                }
            }
            Err(_) => {}
        }
        result
    }

    /// Drops the connection kept for one slot; the next call opens another.
    fn forget(&self, slot: usize) {
        if let Some(s) = self.slots.get(slot) {
            if let Ok(mut s) = s.write() {
                *s = None;
            }
        }
    }

    /// A multiplexed connection for one slot, taken from the pool once and
    /// then shared by every call on that slot (it pipelines concurrent
    /// requests), and whether it was kept from an earlier call. Checking a
    /// connection out of the pool per call would cost its recycle check, an
    /// extra round trip per call.
    ///
    /// Each thread has its own slot: a connection's driver task runs on the
    /// thread that opened it, so a call from that thread is written, read and
    /// answered without waking another thread (a shared connection costs two
    /// cross-thread wake-ups per call).
    async fn connection(&self, slot: usize) -> Result<(Conn, bool), StoreError> {
        let Some(cell) = self.slots.get(slot) else {
            return Ok((self.source.connect().await?, false));
        };
        if let Some(conn) = cell.read().ok().and_then(|s| s.clone()) {
            return Ok((conn, true));
        }
        let conn = self.source.connect().await?;
        if let Ok(mut s) = cell.write() {
            *s = Some(conn.clone());
        }
        Ok((conn, false))
    }

    /// Runs one of the store's scripts on the key it touches. `EVALSHA`
    /// first; a server that does not know the script yet (a new or newly
    /// promoted node) gets its body with `EVAL`, on that key's node only.
    async fn script<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        body: &'static str,
        key: String,
        args: Vec<String>,
    ) -> Result<T, StoreError> {
        self.script_on(script, body, vec![key], args).await
    }

    /// [`Self::script`] over several keys of one slot.
    async fn script_on<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        body: &'static str,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<T, StoreError> {
        let (keys, args) = (&keys, &args);
        self.run(|mut c| async move {
            let mut by_hash = redis::cmd("EVALSHA");
            by_hash
                .arg(script.get_hash())
                .arg(keys.len())
                .arg(keys)
                .arg(args);
            match by_hash.query_async(&mut c).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    let mut by_body = redis::cmd("EVAL");
                    by_body.arg(body).arg(keys.len()).arg(keys).arg(args);
                    by_body.query_async(&mut c).await
                }
                other => other,
            }
        })
        .await
    }

    /// Several single-key commands over keys that may live in different
    /// slots: one pipeline on one server, concurrent commands on a cluster
    /// (each goes to its key's master, all in flight at once).
    async fn fan_out<T: redis::FromRedisValue + Send>(
        &self,
        cmds: Vec<redis::Cmd>,
    ) -> Result<Vec<T>, StoreError> {
        self.fan_out_as(Resend::Safe, cmds).await
    }

    /// [`Self::fan_out`], sent again on a fresh connection only if `resend`
    /// allows it.
    async fn fan_out_as<T: redis::FromRedisValue + Send>(
        &self,
        resend: Resend,
        cmds: Vec<redis::Cmd>,
    ) -> Result<Vec<T>, StoreError> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        // One pipeline for a single server, built once: a command sent again
        // on a fresh connection is the same command.
        let pipe = (self.mode != RedisMode::Cluster).then(|| {
            let mut pipe = redis::pipe();
            for cmd in &cmds {
                pipe.add_command(cmd.clone());
            }
            pipe
        });
        let (pipe, cmds) = (&pipe, &cmds);
        self.exchange(resend, |c| async move {
            match (c, pipe) {
                (Conn::Single(mut c), Some(pipe)) => pipe.query_async(&mut c).await,
                (Conn::Single(mut c), None) => {
                    let mut pipe = redis::pipe();
                    for cmd in cmds {
                        pipe.add_command(cmd.clone());
                    }
                    pipe.query_async(&mut c).await
                }
                (Conn::Cluster(c), _) => {
                    futures_util::future::try_join_all(cmds.iter().map(|cmd| {
                        let mut c = c.clone();
                        async move { cmd.query_async::<T>(&mut c).await }
                    }))
                    .await
                }
            }
        })
        .await
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

#[async_trait]
impl StateStore for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn mode(&self) -> &'static str {
        self.mode.as_str()
    }

    /// Not a bare PING: the store is up when the gateway's commands would
    /// work. A standalone or sentinel server must be a master and not a
    /// cluster node; a cluster must have every master answering and every
    /// slot served (the gateway's keys spread over all of them).
    async fn ping(&self) -> Result<Duration, StoreError> {
        let start = Instant::now();
        let mode = self.mode;
        // A server that answers but cannot serve (a replica, a cluster with a
        // master gone) is a failure for the breaker too: the exchange itself
        // worked and would otherwise close it.
        if let Err(e) = self.run(|c| check(mode, c)).await? {
            self.breaker.failed();
            if mode == RedisMode::Cluster {
                self.cluster_suspect.store(true, Ordering::Relaxed);
            }
            return Err(e);
        }
        Ok(start.elapsed())
    }

    async fn rotate(
        &self,
        ring: &str,
        members: &[String],
        exclude: &[String],
        model: Option<&str>,
        now_ms: u64,
    ) -> Result<Pick, StoreError> {
        if members.is_empty() {
            return Ok(Pick::AllDisabled);
        }
        // One command: the counter's next value, which carries the ring's
        // state version (see [`super::snapshot`]). The states are read again
        // only when this replica's copy is not at that version. The pick
        // itself is the rule the embedded store applies too.
        let counter = &self.keys.ring_counter(ring);
        let next: u64 = self
            .run(|mut c| async move { redis::cmd("INCR").arg(counter).query_async(&mut c).await })
            .await?;
        let snapshot = match self.snapshots.current(ring, next) {
            Some(kept) => kept,
            None => {
                let states = &self.keys.ring_states(ring);
                let raw: HashMap<String, String> = self
                    .run(|mut c| async move {
                        redis::cmd("HGETALL").arg(states).query_async(&mut c).await
                    })
                    .await?;
                self.snapshots.keep(ring, next, decode_states(raw))
            }
        };
        let states: Vec<Option<MemberState>> = members
            .iter()
            .map(|m| effective_state(&snapshot.states, m, model, now_ms))
            .collect();
        Ok(super::choose(members, &states, exclude, now_ms, || next))
    }

    async fn rotate_within(
        &self,
        ring: &str,
        members: &[String],
        exclude: &[String],
        windows: &[KeyWindow],
        ask: &WindowAsk<'_>,
        now_ms: u64,
    ) -> Result<Pick, StoreError> {
        if members.is_empty() {
            return Ok(Pick::AllDisabled);
        }
        let k = &self.keys;
        let mut keys = Vec::with_capacity(2 + members.len() * 3);
        keys.push(k.ring_counter(ring).into_owned());
        keys.push(k.ring_states(ring).into_owned());
        let mut args = Vec::with_capacity(4 + members.len() * 6);
        args.push(now_ms.to_string());
        args.push(ask.day_ends_ms.to_string());
        args.push(ask.request_id.to_string());
        args.push((MINUTE_MS + WINDOW_MARGIN_MS).to_string());
        for (i, member) in members.iter().enumerate() {
            let w = windows.get(i).copied().unwrap_or_default();
            keys.push(k.window_requests(ring, ask.model, member));
            keys.push(k.window_tokens(ring, ask.model, member));
            keys.push(k.window_day(ring, ask.model, member, ask.day));
            args.push(member.clone());
            args.push(state_field(member, Some(ask.model)));
            args.push(w.rpm.to_string());
            args.push(w.tpm.to_string());
            args.push(w.rpd.to_string());
            args.push(if exclude.contains(member) { "1" } else { "0" }.to_string());
        }
        let answer: Vec<u64> = self
            .script_on(&self.rotate_within, ROTATE_WITHIN, keys, args)
            .await?;
        let corrupt = || StoreError::Corrupt("the rotation script's answer".into());
        Ok(match answer.as_slice() {
            [0, i] => Pick::Member(usize::try_from(*i).map_err(|_| corrupt())?),
            [1, until_ms] => Pick::AllCooling {
                until_ms: *until_ms,
            },
            [2] => Pick::AllDisabled,
            [3] => Pick::Exhausted,
            [4, until_ms] => Pick::WindowsFull {
                until_ms: *until_ms,
            },
            _ => return Err(corrupt()),
        })
    }

    async fn settle_keys(
        &self,
        ring: &str,
        settles: &[KeySettle],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if settles.is_empty() {
            return Ok(());
        }
        let second = (now_ms / 1000).to_string();
        let mut pipe = redis::pipe();
        for s in settles {
            let key = self.keys.window_tokens(ring, &s.model, &s.member);
            pipe.cmd("HINCRBY")
                .arg(&key)
                .arg(&second)
                .arg(s.tokens)
                .ignore();
            pipe.cmd("PEXPIRE")
                .arg(&key)
                .arg(MINUTE_MS + WINDOW_MARGIN_MS)
                .ignore();
        }
        // Every key of one ring shares its slot: one pipeline, one master.
        let pipe = &pipe;
        self.run_once(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    async fn key_windows(
        &self,
        ring: &str,
        members: &[String],
        ask: &WindowAsk<'_>,
        now_ms: u64,
    ) -> Result<Vec<KeyWindowUse>, StoreError> {
        let after = format!("({}", now_ms.saturating_sub(MINUTE_MS + WINDOW_MARGIN_MS));
        let mut cmds = Vec::with_capacity(members.len() * 3);
        for m in members {
            let mut count = redis::cmd("ZCOUNT");
            count
                .arg(self.keys.window_requests(ring, ask.model, m))
                .arg(&after)
                .arg("+inf");
            let mut tokens = redis::cmd("HGETALL");
            tokens.arg(self.keys.window_tokens(ring, ask.model, m));
            let mut day = redis::cmd("GET");
            day.arg(self.keys.window_day(ring, ask.model, m, ask.day));
            cmds.extend([count, tokens, day]);
        }
        let answers: Vec<redis::Value> = self.fan_out(cmds).await?;
        let corrupt = || StoreError::Corrupt("a key window's counts".into());
        let first_second = (now_ms / 1000).saturating_sub(59);
        answers
            .chunks(3)
            .map(|c| {
                let [count, tokens, day] = c else {
                    return Err(corrupt());
                };
                let int = |v: &redis::Value| -> Result<u64, StoreError> {
                    Ok(redis::from_redis_value::<Option<u64>>(v.clone())
                        .map_err(|_| corrupt())?
                        .unwrap_or(0))
                };
                let tokens: HashMap<u64, u64> =
                    redis::from_redis_value(tokens.clone()).map_err(|_| corrupt())?;
                Ok(KeyWindowUse {
                    requests_last_minute: int(count)?,
                    tokens_last_minute: tokens
                        .iter()
                        .filter(|(s, _)| **s >= first_second)
                        .map(|(_, n)| n)
                        .sum(),
                    requests_today: int(day)?,
                })
            })
            .collect()
    }

    async fn member_states(&self, ring: &str) -> Result<HashMap<String, MemberState>, StoreError> {
        let states = &self.keys.ring_states(ring);
        let raw: HashMap<String, String> = self
            .run(|mut c| async move { redis::cmd("HGETALL").arg(states).query_async(&mut c).await })
            .await?;
        Ok(decode_states(raw))
    }

    async fn transition(
        &self,
        ring: &str,
        member: &str,
        model: Option<&str>,
        event: &Transition,
        now_ms: u64,
    ) -> Result<Applied, StoreError> {
        // The counter rides along: a change adds to it the step that tells
        // every replica's rotation its copy of the states is old. The
        // proxies' ring is never rotated: it has no counter to write.
        let mut keys = vec![self.keys.ring_states(ring).into_owned()];
        if ring != super::keyspace::ring::PROXIES {
            keys.push(self.keys.ring_counter(ring).into_owned());
        }
        let field = state_field(member, model);
        let (kind, num, reason) = event.wire();
        let (key_before, before, after): (String, String, String) = self
            .script_on(
                &self.transition,
                TRANSITION,
                keys,
                vec![
                    now_ms.to_string(),
                    member.to_string(),
                    field,
                    kind.to_string(),
                    num.to_string(),
                    reason.to_string(),
                    VERSION_STEP.to_string(),
                ],
            )
            .await?;
        Ok(Applied {
            key_before: MemberState::decode(&key_before),
            before: MemberState::decode(&before),
            after: MemberState::decode(&after),
        })
    }

    async fn touch(&self, ns: &str, id: &str, ttl: Duration) -> Result<Option<String>, StoreError> {
        let key = &self.keys.binding(ns, id);
        self.run(|mut c| async move {
            redis::cmd("GETEX")
                .arg(key)
                .arg("EX")
                .arg(secs(ttl))
                .query_async(&mut c)
                .await
        })
        .await
    }

    async fn claim(
        &self,
        ns: &str,
        id: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<(String, bool), StoreError> {
        let key = self.keys.binding(ns, id);
        let (bound, created): (String, i64) = self
            .script(
                &self.claim,
                CLAIM,
                key,
                vec![value.to_string(), secs(ttl).to_string()],
            )
            .await?;
        Ok((bound, created == 1))
    }

    async fn replace(
        &self,
        ns: &str,
        id: &str,
        expected: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<String, StoreError> {
        let key = self.keys.binding(ns, id);
        self.script(
            &self.replace,
            REPLACE,
            key,
            vec![
                expected.to_string(),
                value.to_string(),
                secs(ttl).to_string(),
            ],
        )
        .await
    }

    async fn put(&self, ns: &str, id: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        let key = &self.keys.binding(ns, id);
        let _: String = self
            .run(|mut c| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("EX")
                    .arg(secs(ttl))
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    async fn get_many(&self, ns: &str, ids: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // Single-key GETs rather than MGET: the keys are unrelated entities
        // and may live in different Cluster slots.
        let mut cmds = Vec::with_capacity(ids.len());
        for id in ids {
            let mut cmd = redis::cmd("GET");
            cmd.arg(self.keys.binding(ns, id));
            cmds.push(cmd);
        }
        self.fan_out(cmds).await
    }

    async fn delete(&self, ns: &str, id: &str) -> Result<(), StoreError> {
        let key = &self.keys.binding(ns, id);
        let _: i64 = self
            .run(|mut c| async move { redis::cmd("DEL").arg(key).query_async(&mut c).await })
            .await?;
        Ok(())
    }

    async fn index_add(
        &self,
        name: &str,
        member: &str,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let key = self.keys.index(name);
        let _: i64 = self
            .script(
                &self.index_add,
                INDEX_ADD,
                key,
                vec![
                    now_ms.to_string(),
                    (now_ms + ttl.as_millis() as u64).to_string(),
                    member.to_string(),
                ],
            )
            .await?;
        Ok(())
    }

    async fn index_add_many(
        &self,
        name: &str,
        members: &[(String, u64)],
        keep: usize,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if members.is_empty() {
            return Ok(());
        }
        let key = self.keys.index(name);
        let latest = members.iter().map(|(_, e)| *e).max().unwrap_or(now_ms);
        let mut add = redis::cmd("ZADD");
        add.arg(&key);
        for (member, expires_ms) in members {
            add.arg(*expires_ms).arg(member);
        }
        let mut pipe = redis::pipe();
        pipe.add_command(add).ignore();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(now_ms)
            .ignore();
        // Ranks count from the lowest score: all but the `keep` latest.
        pipe.cmd("ZREMRANGEBYRANK")
            .arg(&key)
            .arg(0)
            .arg(-(keep as i64) - 1)
            .ignore();
        // Every record lives as long; the newest batch's expiry is the
        // index's.
        pipe.cmd("PEXPIREAT").arg(&key).arg(latest).ignore();
        // One key, one slot; ZADD of the same members twice is one ZADD.
        let pipe = &pipe;
        self.run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    async fn index_members(&self, name: &str, now_ms: u64) -> Result<Vec<String>, StoreError> {
        let key = &self.keys.index(name);
        self.run(|mut c| async move {
            redis::cmd("ZRANGE")
                .arg(key)
                .arg("+inf")
                .arg(format!("({now_ms}"))
                .arg("BYSCORE")
                .arg("REV")
                .query_async(&mut c)
                .await
        })
        .await
    }

    async fn index_page(
        &self,
        name: &str,
        now_ms: u64,
        after: Option<&IndexEntry>,
        count: usize,
    ) -> Result<Vec<IndexEntry>, StoreError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let key = self.keys.index(name);
        let (same, below): (Vec<String>, Vec<String>) = self
            .script(
                &self.index_page,
                INDEX_PAGE,
                key,
                vec![
                    now_ms.to_string(),
                    count.to_string(),
                    after.map_or_else(String::new, |a| a.expires_ms.to_string()),
                ],
            )
            .await?;
        let mut page: Vec<IndexEntry> = match after {
            Some(a) if a.expires_ms > now_ms => same
                .into_iter()
                .filter(|m| m.as_bytes() < a.member.as_bytes())
                .map(|member| IndexEntry {
                    member,
                    expires_ms: a.expires_ms,
                })
                .collect(),
            _ => Vec::new(),
        };
        for pair in below.chunks_exact(2) {
            let expires_ms = parse_score(&pair[1])?;
            page.push(IndexEntry {
                member: pair[0].clone(),
                expires_ms,
            });
        }
        page.truncate(count);
        Ok(page)
    }

    async fn index_remove(&self, name: &str, member: &str) -> Result<(), StoreError> {
        let key = &self.keys.index(name);
        let _: i64 = self
            .run(|mut c| async move {
                redis::cmd("ZREM")
                    .arg(key)
                    .arg(member)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    async fn try_lock(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        // Held when this holder's value is there: a `SET NX` sent again after
        // its answer was lost finds its own value, not a rival's.
        let key = &self.keys.lock(name);
        self.run(|mut c| async move {
            let set: Option<String> = redis::cmd("SET")
                .arg(key)
                .arg(holder)
                .arg("NX")
                .arg("PX")
                .arg(ttl.as_millis().max(1) as u64)
                .query_async(&mut c)
                .await?;
            if set.is_some() {
                return Ok(true);
            }
            let now: Option<String> = redis::cmd("GET").arg(key).query_async(&mut c).await?;
            Ok(now.as_deref() == Some(holder))
        })
        .await
    }

    async fn unlock(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let key = self.keys.lock(name);
        let _: i64 = self
            .script(&self.unlock, UNLOCK, key, vec![holder.to_string()])
            .await?;
        Ok(())
    }

    async fn add_counts(
        &self,
        bucket: &str,
        counts: &[(String, u64)],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if counts.is_empty() {
            return Ok(());
        }
        let key = self.keys.stats(bucket);
        let mut pipe = redis::pipe();
        for (name, n) in counts {
            pipe.cmd("HINCRBY").arg(&key).arg(name).arg(*n).ignore();
        }
        pipe.cmd("EXPIRE").arg(&key).arg(secs(ttl)).ignore();
        let pipe = &pipe;
        self.run_once(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    async fn read_counts(&self, buckets: &[String]) -> Result<HashMap<String, u64>, StoreError> {
        if buckets.is_empty() {
            return Ok(HashMap::new());
        }
        // One bucket per minute, each in its own slot.
        let mut cmds = Vec::with_capacity(buckets.len());
        for b in buckets {
            let mut cmd = redis::cmd("HGETALL");
            cmd.arg(self.keys.stats(b));
            cmds.push(cmd);
        }
        let all: Vec<HashMap<String, u64>> = self.fan_out(cmds).await?;
        let mut sum = HashMap::new();
        for counts in all {
            for (name, n) in counts {
                *sum.entry(name).or_insert(0) += n;
            }
        }
        Ok(sum)
    }

    async fn admit(&self, client: &str, ask: &Ask<'_>) -> Result<Verdict, StoreError> {
        let k = &self.keys;
        let set = ask.lease.as_ref().map_or(LeaseSet::Concurrent, |l| l.set);
        let keys = vec![
            k.client_requests(client),
            k.client_tokens(client),
            k.client_day(client, ask.day),
            k.client_leases(client, set.name()),
        ];
        let lease = ask.lease.as_ref();
        let mut args = vec![
            ask.now_ms.to_string(),
            ask.rpm.unwrap_or(0).to_string(),
            ask.tpm.unwrap_or(0).to_string(),
            ask.per_day.unwrap_or(0).to_string(),
            ask.day_ends_ms.to_string(),
            lease.map_or(0, |l| l.limit).to_string(),
            lease.map_or("", |l| l.id).to_string(),
            lease.map_or(0, |l| l.until_ms).to_string(),
            ask.request_id.to_string(),
            set.limit().code().to_string(),
        ];
        if lease.is_some() {
            args.extend(ask.released.iter().cloned());
        }
        // Sent again on a fresh connection, it finds its own entries (same
        // ids), so it can refuse itself at the edge of a limit, never admit
        // twice.
        let answer: Vec<u64> = self.script_on(&self.admit, ADMIT, keys, args).await?;
        match answer.as_slice() {
            [0] => Ok(Verdict::Admitted),
            [code, retry_ms, used, allowed] => Ok(Verdict::Refused {
                limit: Limit::from_code(*code)
                    .ok_or_else(|| StoreError::Corrupt("the admission script's answer".into()))?,
                retry_ms: *retry_ms,
                used: *used,
                allowed: *allowed,
            }),
            _ => Err(StoreError::Corrupt("the admission script's answer".into())),
        }
    }

    async fn settle(&self, settles: &[Settle], now_ms: u64) -> Result<(), StoreError> {
        let second = (now_ms / 1000).to_string();
        let mut cmds = Vec::with_capacity(settles.len() * 4);
        for s in settles {
            let tokens = self.keys.client_tokens(&s.client);
            let day = self.keys.client_day(&s.client, &s.day);
            if s.per_minute {
                // Stale seconds are dropped by the admission script, which
                // reads this hash whenever the client has `tpm`.
                let mut add = redis::cmd("HINCRBY");
                add.arg(&tokens).arg(&second).arg(s.tokens);
                let mut keep = redis::cmd("PEXPIRE");
                keep.arg(&tokens).arg(MINUTE_MS + 1000);
                cmds.extend([add, keep]);
            }
            let mut add_day = redis::cmd("INCRBY");
            add_day.arg(&day).arg(s.tokens);
            let mut keep_day = redis::cmd("EXPIRE");
            keep_day.arg(&day).arg(2 * 86_400);
            cmds.extend([add_day, keep_day]);
        }
        let _: Vec<redis::Value> = self.fan_out_as(Resend::Never, cmds).await?;
        Ok(())
    }

    async fn leases(
        &self,
        release: &[Held],
        renew: &[Held],
        until_ms: u64,
    ) -> Result<(), StoreError> {
        let mut cmds = Vec::with_capacity(release.len() + renew.len());
        for h in release {
            let mut cmd = redis::cmd("ZREM");
            cmd.arg(self.keys.client_leases(&h.client, h.set.name()))
                .arg(&h.id);
            cmds.push(cmd);
        }
        for h in renew {
            let key = self.keys.client_leases(&h.client, h.set.name());
            // Not `XX`: a lease that lapsed while Redis could not be
            // reached is put back, its request still being in flight.
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(&key).arg(until_ms).arg(&h.id);
            cmds.push(cmd);
            let mut keep = redis::cmd("PEXPIREAT");
            keep.arg(&key).arg(until_ms);
            cmds.push(keep);
        }
        let _: Vec<redis::Value> = self.fan_out(cmds).await?;
        Ok(())
    }

    async fn client_use(
        &self,
        client: &str,
        day: &str,
        now_ms: u64,
    ) -> Result<ClientUse, StoreError> {
        let k = &self.keys;
        let requests = k.client_requests(client);
        let after = format!("({}", now_ms.saturating_sub(MINUTE_MS));
        let live_after = format!("({now_ms}");
        let mut count = redis::cmd("ZCOUNT");
        count.arg(&requests).arg(&after).arg("+inf");
        let mut oldest = redis::cmd("ZRANGEBYSCORE");
        oldest
            .arg(&requests)
            .arg(&after)
            .arg("+inf")
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(1);
        let mut tokens = redis::cmd("HGETALL");
        tokens.arg(k.client_tokens(client));
        let mut today = redis::cmd("GET");
        today.arg(k.client_day(client, day));
        let mut concurrent = redis::cmd("ZCOUNT");
        concurrent
            .arg(k.client_leases(client, LeaseSet::Concurrent.name()))
            .arg(&live_after)
            .arg("+inf");
        let mut live = redis::cmd("ZCOUNT");
        live.arg(k.client_leases(client, LeaseSet::Live.name()))
            .arg(&live_after)
            .arg("+inf");
        let answers: Vec<redis::Value> = self
            .fan_out(vec![count, oldest, tokens, today, concurrent, live])
            .await?;
        let corrupt = || StoreError::Corrupt("a client's limit counts".into());
        let [count, oldest, tokens, today, concurrent, live] =
            <[redis::Value; 6]>::try_from(answers).map_err(|_| corrupt())?;
        let int = |v: redis::Value| -> Result<u64, StoreError> {
            Ok(redis::from_redis_value::<Option<u64>>(v)
                .map_err(|_| corrupt())?
                .unwrap_or(0))
        };
        let oldest: Vec<(String, String)> =
            redis::from_redis_value(oldest).map_err(|_| corrupt())?;
        let tokens: HashMap<u64, u64> = redis::from_redis_value(tokens).map_err(|_| corrupt())?;
        let first_second = (now_ms / 1000).saturating_sub(59);
        Ok(ClientUse {
            requests_last_minute: int(count)?,
            requests_free_at_ms: match oldest.first() {
                Some((_, score)) => Some(parse_score(score)? + MINUTE_MS),
                None => None,
            },
            tokens_last_minute: tokens
                .iter()
                .filter(|(second, _)| **second >= first_second)
                .map(|(_, n)| n)
                .sum(),
            tokens_today: int(today)?,
            concurrent: int(concurrent)?,
            live_sessions: int(live)?,
        })
    }
}
