//! The work a replica does beside the requests it serves, started and
//! stopped here and nowhere else:
//!
//! - the layout check ([`crate::state::migrations::keep_checking`]), when
//!   Redis could not be checked at start;
//! - the re-check of disabled keys ([`recheck`]);
//! - the refresh of outbound proxy health, when proxies are configured;
//! - the reload of mounted key, token and limits files ([`reload`]);
//! - the writes of client limits: tokens settled, leases released and
//!   renewed ([`limits`]);
//! - the writes of the request log's records ([`request_log`]);
//! - the heartbeat, which also flushes statistics and usage ([`heartbeat`]);
//! - the probe of Redis while the store's circuit breaker is open.
//!
//! Every detached task of the library starts through this module (clippy's
//! `disallowed-methods` refuses a spawn anywhere else), so a reader finds
//! here everything that runs without a request.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::domain::gateway::Gateway;
use crate::state::{LayoutGate, RedisStore};
use crate::upstream::client::Upstream;

pub mod heartbeat;
pub mod recheck;
pub mod reload;

/// How often a replica with an open circuit to Redis probes it.
const STORE_PROBE: Duration = Duration::from_millis(100);

/// How often a replica reads the shared health of the outbound proxies.
const PROXY_REFRESH: Duration = Duration::from_secs(1);

/// How long settled tokens and released leases gather before they are
/// written together.
const LIMITS_BATCH: Duration = Duration::from_millis(5);

/// Writes what the client limits owe the store: tokens answers reported and
/// leases whose requests ended, a moment after they happen (batched), and
/// every held lease renewed before it could lapse.
async fn limits(gw: Arc<Gateway>) {
    let renew_every = crate::domain::limits::LEASE_LIFE / 4;
    let mut renewed = tokio::time::Instant::now();
    loop {
        let _ = tokio::time::timeout(renew_every, gw.limits.wake.notified()).await;
        tokio::time::sleep(LIMITS_BATCH).await;
        let now = crate::state::now_ms();
        if let Err(e) = gw.limits.flush(gw.store(), now).await {
            tracing::debug!(error = %e, "client limit writes deferred");
        }
        if renewed.elapsed() >= renew_every {
            renewed = tokio::time::Instant::now();
            if let Err(e) = gw.limits.renew(gw.store(), now).await {
                tracing::warn!(error = %e, "client limit leases could not be renewed");
            }
        }
    }
}

/// How often the request log's records are written when no batch fills.
const REQUEST_LOG_EVERY: Duration = Duration::from_secs(1);

/// Writes the request log's records: every second, or at once when a batch
/// is full.
async fn request_log(gw: Arc<Gateway>) {
    loop {
        let _ = tokio::time::timeout(REQUEST_LOG_EVERY, gw.requests.ready.notified()).await;
        if let Err(e) = gw.requests.flush(gw.store(), crate::state::now_ms()).await {
            tracing::debug!(error = %e, "request log write deferred");
        }
    }
}

/// The running background tasks of one replica.
#[derive(Default)]
pub struct Background {
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    /// The heartbeat, stopped by a signal between beats rather than
    /// aborted (see [`heartbeat::run`]).
    heartbeat: Option<(Arc<tokio::sync::Notify>, JoinHandle<()>)>,
}

/// Longest a stopping replica waits for a heartbeat flush in progress.
const HEARTBEAT_STOP: Duration = Duration::from_secs(10);

impl Background {
    pub fn new() -> Self {
        Self::default()
    }

    /// Retries the key layout check until it is done, when Redis could not
    /// be checked at start; until then the gate refuses bindings.
    pub fn check_layout(&mut self, store: Arc<RedisStore>, gate: Arc<LayoutGate>) {
        self.spawn(
            "layout check",
            crate::state::migrations::keep_checking(store, gate),
        );
    }

    /// Probes Redis while the store's circuit breaker is open, so that it
    /// closes as soon as Redis answers again, before any request needs it.
    pub fn probe_store(&mut self, store: Arc<RedisStore>) {
        self.spawn("store probe", async move {
            loop {
                tokio::time::sleep(STORE_PROBE).await;
                store.probe().await;
            }
        });
    }

    /// Starts the periodic tasks of a serving replica. `upstream` is the
    /// re-check's own client (awc clients belong to one thread); `addr` is
    /// what the heartbeat tells operators.
    pub fn start(&mut self, gw: &Arc<Gateway>, upstream: Upstream, addr: SocketAddr) {
        let replica = gw.replica.clone();
        self.spawn("re-check", recheck::run(gw.clone(), upstream, replica));
        if let Some(router) = gw.proxies.clone() {
            let gw = gw.clone();
            self.spawn("proxy refresh", async move {
                loop {
                    router.refresh(gw.store()).await;
                    tokio::time::sleep(PROXY_REFRESH).await;
                }
            });
        }
        self.spawn("reload", reload::run(gw.clone()));
        self.spawn("client limits", limits(gw.clone()));
        self.spawn("request log", request_log(gw.clone()));
        let stop = Arc::new(tokio::sync::Notify::new());
        let task = spawn_local(heartbeat::run(gw.clone(), addr, stop.clone()));
        self.heartbeat = Some((stop, task));
    }

    /// Stops every task, once the server has stopped serving: then the
    /// replica flushes what it counted and takes down its heartbeat, so
    /// operators stop seeing it at once.
    pub async fn stop(self, gw: &Gateway) {
        for (name, task) in self.tasks {
            task.abort();
            tracing::debug!(task = name, "background task stopped");
        }
        if let Some((stop, task)) = self.heartbeat {
            // A permit is kept when the heartbeat is mid-flush: it stops
            // right after the flush.
            stop.notify_one();
            let abort = task.abort_handle();
            if tokio::time::timeout(HEARTBEAT_STOP, task).await.is_err() {
                abort.abort();
                tracing::warn!("the heartbeat's last flush did not finish in time");
            }
        }
        heartbeat::sign_off(gw).await;
    }

    fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + 'static) {
        self.tasks.push((name, spawn_local(task)));
    }
}

/// Runs the task of one upgraded connection (a Live relay) until its
/// connection ends. Such a task outlives the handler that upgraded the
/// connection; the server's graceful shutdown does not wait for it.
pub fn for_connection(task: impl Future<Output = ()> + 'static) {
    drop(spawn_local(task));
}

/// The one place the library detaches a task: on the current actix (single
/// thread) runtime, where awc clients and the request's state live.
#[allow(
    clippy::disallowed_methods,
    reason = "the one sanctioned spawn of the library"
)]
fn spawn_local(task: impl Future<Output = ()> + 'static) -> JoinHandle<()> {
    actix_rt::spawn(task)
}
