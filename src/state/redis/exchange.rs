//! How a command reaches Redis: on the calling thread's own multiplexed
//! connection (kept until a call on it fails), through the circuit breaker,
//! within the store's timeout, sent once more on a fresh connection when the
//! kept one had dropped and that is safe ([`Resend`]); scripts by `EVALSHA`,
//! their body sent to a node that does not know them yet; commands over
//! keys of different slots pipelined on one server, concurrent on a cluster.

use super::{
    redis, redis_error, AtomicUsize, Conn, Future, Instant, Ordering, RedisMode, RedisStore,
    Script, StoreError, CIRCUIT_OPEN,
};

/// Numbers threads in the order they first touch Redis.
static THREADS_SEEN: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static THREAD_SLOT: usize = THREADS_SEEN.fetch_add(1, Ordering::Relaxed);
}

/// Whether a command may be sent again when the connection it went out on
/// turns out to be dead.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Resend {
    /// Running it twice leaves Redis as running it once does (reads, `SET`,
    /// `DEL`, `ZADD`, the scripts, which check what they find), or costs
    /// nothing that matters (rotation's `INCR` skips one place in the ring).
    Safe,
    /// Counted increments (`HINCRBY`): a second run would count twice.
    Never,
}

impl RedisStore {
    /// Runs one Redis exchange on this thread's connection, bounded by the
    /// timeout; sent again once on a fresh connection when the kept one turns
    /// out to be dead (see [`Self::exchange`]).
    pub(super) async fn run<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.exchange(Resend::Safe, f).await
    }

    /// [`Self::run`] for a command that must never be sent twice.
    pub(super) async fn run_once<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
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
    pub(super) async fn exchange<T, F, Fut>(&self, resend: Resend, f: F) -> Result<T, StoreError>
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
    pub(super) fn forget(&self, slot: usize) {
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
    pub(super) async fn connection(&self, slot: usize) -> Result<(Conn, bool), StoreError> {
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
    pub(super) async fn script<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        body: &'static str,
        key: String,
        args: Vec<String>,
    ) -> Result<T, StoreError> {
        self.script_on(script, body, vec![key], args).await
    }

    /// [`Self::script`] over several keys of one slot.
    pub(super) async fn script_on<T: redis::FromRedisValue>(
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
    pub(super) async fn fan_out<T: redis::FromRedisValue + Send>(
        &self,
        cmds: Vec<redis::Cmd>,
    ) -> Result<Vec<T>, StoreError> {
        self.fan_out_as(Resend::Safe, cmds).await
    }

    /// [`Self::fan_out`], sent again on a fresh connection only if `resend`
    /// allows it.
    pub(super) async fn fan_out_as<T: redis::FromRedisValue + Send>(
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
}
