//! The Redis store: what lets any replica serve any request.
//!
//! Key layout (version 2, see `migrations/`), all under the configured prefix:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{p}:layout` | string | layout version |
//! | `{p}:{ring:NAME}:n` | string | rotation counter (INCR) |
//! | `{p}:{ring:NAME}:s` | hash | member id, or `member|model`, → `c:<until ms>[:<reason>]` / `d:<since ms>:<origin>` |
//! | `{p}:NS:ID` | string, TTL | one binding (session → key id, upload → record, file → owner record, other resource (`res`) → owner record) |
//! | `{p}:idx:NAME` | sorted set, TTL | member → expiry (ms) |
//! | `{p}:lock:NAME` | string, TTL | lock holder |
//! | `{p}:stats:BUCKET` | hash, TTL | counter name → count (per-minute admin statistics) |
//! | `{p}:replica:ID` | string, TTL | a replica's heartbeat |
//!
//! A ring's counter and states share a hash tag, so the rotation pipeline
//! touches one Redis Cluster slot; every other operation touches one key.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::redis::{self, Script};
use deadpool_redis::{Pool, Runtime};
use secrecy::{ExposeSecret, SecretString};

use super::{
    effective_state, state_field, Applied, MemberState, Pick, StateStore, StoreError, Transition,
};

const CLAIM: &str = include_str!("lua/claim.lua");

const REPLACE: &str = include_str!("lua/replace.lua");

const UNLOCK: &str = include_str!("lua/unlock.lua");

const INDEX_ADD: &str = include_str!("lua/index_add.lua");

const TRANSITION: &str = include_str!("lua/transition.lua");

/// Called after every Redis exchange with its latency and whether it worked.
pub type Observer = Arc<dyn Fn(Duration, bool) + Send + Sync>;

/// Consecutive failures that open the circuit, and how long it stays open:
/// while open, calls fail at once instead of each waiting for a timeout on a
/// Redis that is down. The first call after the pause probes Redis again.
const TRIP_AFTER: u32 = 3;
/// Connections beyond one per worker thread: for the main thread and
/// background tasks.
const SPARE_CONNECTIONS: usize = 2;
const OPEN_FOR_MS: u64 = 1_000;

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
    open_until_ms: AtomicU64,
}

/// Milliseconds on the monotonic clock since this process first asked
/// (never 0, so a zeroed breaker is closed).
fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

pub struct RedisStore {
    pool: Pool,
    slots: Vec<std::sync::RwLock<Option<MultiplexedConnection>>>,
    breaker: Breaker,
    observer: Option<Observer>,
    prefix: String,
    timeout: Duration,
    claim: Script,
    replace: Script,
    unlock: Script,
    index_add: Script,
    transition: Script,
}

impl RedisStore {
    /// Builds the pool; connects lazily, so a Redis that is down at start
    /// does not keep the gateway from starting. `threads`: the worker threads
    /// that will call it (each gets a connection of its own, pool permitting).
    pub fn new(
        url: &SecretString,
        prefix: &str,
        timeout: Duration,
        pool_size: usize,
        threads: usize,
    ) -> Result<Self, StoreError> {
        let cfg = deadpool_redis::Config::from_url(url.expose_secret());
        let pool = cfg
            .builder()
            .map_err(|e| StoreError::Unavailable(format!("bad Redis configuration: {e}")))?
            .max_size(pool_size)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot build the Redis pool: {e}")))?;
        Ok(Self {
            pool,
            slots: (0..pool_size.clamp(1, threads.max(1) + SPARE_CONNECTIONS))
                .map(|_| std::sync::RwLock::new(None))
                .collect(),
            breaker: Breaker::default(),
            observer: None,
            prefix: prefix.to_string(),
            timeout,
            claim: Script::new(CLAIM),
            replace: Script::new(REPLACE),
            unlock: Script::new(UNLOCK),
            index_add: Script::new(INDEX_ADD),
            transition: Script::new(TRANSITION),
        })
    }

    pub fn with_observer(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    fn k(&self, parts: &[&str]) -> String {
        let mut s = self.prefix.clone();
        for p in parts {
            s.push(':');
            s.push_str(p);
        }
        s
    }

    fn ring_keys(&self, ring: &str) -> (String, String) {
        let tag = format!("{{ring:{ring}}}");
        (self.k(&[&tag, "n"]), self.k(&[&tag, "s"]))
    }

    /// Runs one Redis exchange on a pooled connection, bounded by the timeout.
    async fn run<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let slot = THREAD_SLOT.with(|s| *s) % self.slots.len();
        let work = async {
            let conn = self.connection(slot).await?;
            f(conn).await.map_err(redis_error)
        };
        let now = monotonic_ms();
        if self.breaker.open_until_ms.load(Ordering::Relaxed) > now {
            return Err(StoreError::Unavailable(
                "circuit open after repeated failures; retrying shortly".into(),
            ));
        }
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| StoreError::Timeout)
            .and_then(|r| r);
        if let Some(observe) = &self.observer {
            observe(started.elapsed(), result.is_ok());
        }
        match &result {
            Ok(_) => self.breaker.failures.store(0, Ordering::Relaxed),
            Err(StoreError::Timeout | StoreError::Unavailable(_)) => {
                // The connection may be dead: the next call on this slot
                // takes a fresh one from the pool.
                if let Ok(mut s) = self.slots[slot].write() {
                    *s = None;
                }
                let failures = self.breaker.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if failures >= TRIP_AFTER {
                    self.breaker
                        .open_until_ms
                        .store(monotonic_ms() + OPEN_FOR_MS, Ordering::Relaxed);
                }
            }
            Err(_) => {}
        }
        result
    }

    /// A multiplexed connection for one slot, taken from the pool once and
    /// then shared by every call on that slot (it pipelines concurrent
    /// requests). Checking a connection out of the pool per call would cost
    /// its recycle check, an extra round trip per call.
    ///
    /// Each thread has its own slot: a connection's driver task runs on the
    /// thread that opened it, so a call from that thread is written, read and
    /// answered without waking another thread (a shared connection costs two
    /// cross-thread wake-ups per call).
    async fn connection(&self, slot: usize) -> Result<MultiplexedConnection, StoreError> {
        if let Some(conn) = self.slots[slot].read().ok().and_then(|s| s.clone()) {
            return Ok(conn);
        }
        let obj = self
            .pool
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(pool_error(&e)))?;
        let conn = deadpool_redis::Connection::take(obj);
        if let Ok(mut s) = self.slots[slot].write() {
            *s = Some(conn.clone());
        }
        Ok(conn)
    }

    /// The layout version recorded in Redis (0 for an empty Redis).
    pub async fn layout_version(&self) -> Result<u64, StoreError> {
        let key = self.k(&["layout"]);
        let v: Option<u64> = self
            .run(|mut c| async move { redis::cmd("GET").arg(&key).query_async(&mut c).await })
            .await?;
        Ok(v.unwrap_or(0))
    }

    pub async fn set_layout_version(&self, version: u64) -> Result<(), StoreError> {
        let key = self.k(&["layout"]);
        self.run(|mut c| async move {
            redis::cmd("SET")
                .arg(&key)
                .arg(version)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// The full name of a key under this store's prefix (for migrations).
    pub fn key(&self, parts: &[&str]) -> String {
        self.k(parts)
    }

    /// One raw command, bounded like every other (for migrations).
    pub async fn command<T: redis::FromRedisValue>(
        &self,
        cmd: redis::Cmd,
    ) -> Result<T, StoreError> {
        self.run(|mut c| async move { cmd.query_async(&mut c).await })
            .await
    }
}

fn pool_error(e: &deadpool_redis::PoolError) -> String {
    match e {
        deadpool_redis::PoolError::Timeout(_) => "timed out waiting for a connection".into(),
        deadpool_redis::PoolError::Backend(err) => redis_error(err.clone()).to_string(),
        other => other.to_string(),
    }
}

fn redis_error(e: redis::RedisError) -> StoreError {
    if e.is_timeout() {
        StoreError::Timeout
    } else {
        // The message of a RedisError names the failing command kind, never
        // its arguments, so it is safe to pass on.
        StoreError::Unavailable(format!("{:?}: {}", e.kind(), e.detail().unwrap_or("")))
    }
}

fn decode_states(raw: HashMap<String, String>) -> HashMap<String, MemberState> {
    raw.into_iter()
        .filter_map(|(k, v)| MemberState::decode(&v).map(|s| (k, s)))
        .collect()
}

fn secs(ttl: Duration) -> u64 {
    ttl.as_secs().max(1)
}

#[async_trait]
impl StateStore for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn ping(&self) -> Result<Duration, StoreError> {
        let start = Instant::now();
        let _: String = self
            .run(|mut c| async move { redis::cmd("PING").query_async(&mut c).await })
            .await?;
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
        // One round trip: the counter's next value and the ring's states
        // (only keys and (key, model) pairs that are cooling or disabled have
        // an entry), pipelined. Plain commands cost Redis less than a script
        // doing the same; the pick itself is the rule the embedded store
        // applies too.
        let (counter, states) = self.ring_keys(ring);
        let (next, raw): (u64, HashMap<String, String>) = self
            .run(|mut c| async move {
                redis::pipe()
                    .cmd("INCR")
                    .arg(&counter)
                    .cmd("HGETALL")
                    .arg(&states)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let decoded = decode_states(raw);
        let states: Vec<Option<MemberState>> = members
            .iter()
            .map(|m| effective_state(&decoded, m, model, now_ms))
            .collect();
        Ok(super::choose(members, &states, exclude, now_ms, || next))
    }

    async fn member_states(&self, ring: &str) -> Result<HashMap<String, MemberState>, StoreError> {
        let (_, states) = self.ring_keys(ring);
        let raw: HashMap<String, String> = self
            .run(
                |mut c| async move { redis::cmd("HGETALL").arg(&states).query_async(&mut c).await },
            )
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
        let (_, states) = self.ring_keys(ring);
        let field = state_field(member, model);
        let (kind, num, reason) = event.wire();
        let (key_before, before, after): (String, String, String) = self
            .run(|mut c| async move {
                self.transition
                    .key(&states)
                    .arg(now_ms)
                    .arg(member)
                    .arg(&field)
                    .arg(kind)
                    .arg(num)
                    .arg(reason)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(Applied {
            key_before: MemberState::decode(&key_before),
            before: MemberState::decode(&before),
            after: MemberState::decode(&after),
        })
    }

    async fn touch(&self, ns: &str, id: &str, ttl: Duration) -> Result<Option<String>, StoreError> {
        let key = self.k(&[ns, id]);
        self.run(|mut c| async move {
            redis::cmd("GETEX")
                .arg(&key)
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
        let key = self.k(&[ns, id]);
        let (bound, created): (String, i64) = self
            .run(|mut c| async move {
                self.claim
                    .key(&key)
                    .arg(value)
                    .arg(secs(ttl))
                    .invoke_async(&mut c)
                    .await
            })
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
        let key = self.k(&[ns, id]);
        self.run(|mut c| async move {
            self.replace
                .key(&key)
                .arg(expected)
                .arg(value)
                .arg(secs(ttl))
                .invoke_async(&mut c)
                .await
        })
        .await
    }

    async fn put(&self, ns: &str, id: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        let key = self.k(&[ns, id]);
        let _: String = self
            .run(|mut c| async move {
                redis::cmd("SET")
                    .arg(&key)
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
        // A pipeline of single-key GETs rather than MGET: the keys are unrelated
        // entities and may live in different Cluster slots.
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("GET").arg(self.k(&[ns, id]));
        }
        self.run(|mut c| async move { pipe.query_async(&mut c).await })
            .await
    }

    async fn delete(&self, ns: &str, id: &str) -> Result<(), StoreError> {
        let key = self.k(&[ns, id]);
        let _: i64 = self
            .run(|mut c| async move { redis::cmd("DEL").arg(&key).query_async(&mut c).await })
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
        let key = self.k(&["idx", name]);
        let _: i64 = self
            .run(|mut c| async move {
                self.index_add
                    .key(&key)
                    .arg(now_ms)
                    .arg(now_ms + ttl.as_millis() as u64)
                    .arg(member)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    async fn index_members(&self, name: &str, now_ms: u64) -> Result<Vec<String>, StoreError> {
        let key = self.k(&["idx", name]);
        self.run(|mut c| async move {
            redis::cmd("ZRANGE")
                .arg(&key)
                .arg("+inf")
                .arg(format!("({now_ms}"))
                .arg("BYSCORE")
                .arg("REV")
                .query_async(&mut c)
                .await
        })
        .await
    }

    async fn index_remove(&self, name: &str, member: &str) -> Result<(), StoreError> {
        let key = self.k(&["idx", name]);
        let _: i64 = self
            .run(|mut c| async move {
                redis::cmd("ZREM")
                    .arg(&key)
                    .arg(member)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    async fn try_lock(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let key = self.k(&["lock", name]);
        let got: Option<String> = self
            .run(|mut c| async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(holder)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl.as_millis().max(1) as u64)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(got.is_some())
    }

    async fn unlock(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let key = self.k(&["lock", name]);
        let _: i64 = self
            .run(
                |mut c| async move { self.unlock.key(&key).arg(holder).invoke_async(&mut c).await },
            )
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
        let key = self.k(&["stats", bucket]);
        let mut pipe = redis::pipe();
        for (name, n) in counts {
            pipe.cmd("HINCRBY").arg(&key).arg(name).arg(*n).ignore();
        }
        pipe.cmd("EXPIRE").arg(&key).arg(secs(ttl)).ignore();
        self.run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    async fn read_counts(&self, buckets: &[String]) -> Result<HashMap<String, u64>, StoreError> {
        if buckets.is_empty() {
            return Ok(HashMap::new());
        }
        let mut pipe = redis::pipe();
        for b in buckets {
            pipe.cmd("HGETALL").arg(self.k(&["stats", b]));
        }
        let all: Vec<HashMap<String, u64>> = self
            .run(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        let mut sum = HashMap::new();
        for counts in all {
            for (name, n) in counts {
                *sum.entry(name).or_insert(0) += n;
            }
        }
        Ok(sum)
    }
}
