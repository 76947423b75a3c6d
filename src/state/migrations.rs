//! Versioned Redis key layouts. Each layout version is described in
//! `migrations/NNNN_name.md`; its upgrade step is a [`Migration`] here.
//!
//! At start every replica takes the store lock `migrate`, reads the version
//! recorded in Redis, applies each newer migration in order (recording the
//! version after each), and releases the lock. A replica that finds a version
//! newer than it knows refuses to start. When the check cannot run at start
//! (Redis is down, or another replica holds the lock), the replica starts
//! anyway and [`keep_checking`] retries in the background; until it is done
//! the replica serves no request that needs a binding (see
//! [`crate::state::gate`]). Migrations must keep the previous layout readable
//! (expand, then contract in a later version), so replicas of the previous
//! version keep serving during a rolling upgrade.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::state::keyspace::lock;
use crate::state::{LayoutGate, LayoutStatus, RedisStore, StateStore, StoreError};

/// How long a check waits for another replica's migration lock.
const LOCK_PATIENCE: Duration = Duration::from_secs(30);

/// The first and the longest pause between two background checks.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(10);

pub type Step =
    for<'a> fn(&'a RedisStore) -> Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'a>>;

pub struct Migration {
    pub version: u64,
    pub name: &'static str,
    pub up: Step,
}

fn initial(_: &RedisStore) -> Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + '_>> {
    // Layout 1 is the first layout: nothing to transform, only recorded.
    Box::pin(async { Ok(()) })
}

fn resources(_: &RedisStore) -> Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + '_>> {
    // Layout 2 adds owner records of caches, batches, operations and file
    // search stores beside the file records: nothing to transform.
    Box::pin(async { Ok(()) })
}

/// Every migration this build knows, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_initial",
        up: initial,
    },
    Migration {
        version: 2,
        name: "0002_resources",
        up: resources,
    },
];

/// Brings Redis to this build's layout.
pub async fn apply(store: &RedisStore) -> Result<u64, StoreError> {
    apply_with(store, MIGRATIONS).await
}

/// Brings Redis to the newest of `migrations`, under the migration lock.
pub async fn apply_with(store: &RedisStore, migrations: &[Migration]) -> Result<u64, StoreError> {
    apply_within(store, migrations, LOCK_PATIENCE).await
}

/// [`apply_with`], waiting at most `patience` for the migration lock.
pub async fn apply_within(
    store: &RedisStore,
    migrations: &[Migration],
    patience: Duration,
) -> Result<u64, StoreError> {
    let known = migrations.last().map_or(0, |m| m.version);
    let holder = uuid::Uuid::new_v4().to_string();
    let started = tokio::time::Instant::now();
    while !store
        .try_lock(lock::MIGRATE, &holder, Duration::from_secs(60))
        .await?
    {
        if started.elapsed() >= patience {
            return Err(StoreError::Unavailable(format!(
                "the migration lock stayed taken for {} s",
                patience.as_secs_f64()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let result = migrate_locked(store, migrations, known).await;
    let _ = store.unlock(lock::MIGRATE, &holder).await;
    result
}

async fn migrate_locked(
    store: &RedisStore,
    migrations: &[Migration],
    known: u64,
) -> Result<u64, StoreError> {
    let current = store.layout_version().await?;
    if current > known {
        return Err(StoreError::Layout(format!(
            "Redis holds key layout version {current}, newer than this build knows ({known}); \
             run a newer gemini-balancer or point this one at another GB_REDIS_PREFIX"
        )));
    }
    for m in migrations.iter().filter(|m| m.version > current) {
        (m.up)(store).await?;
        store.set_layout_version(m.version).await?;
        tracing::info!(
            version = m.version,
            migration = m.name,
            "applied Redis layout migration"
        );
    }
    Ok(current.max(known))
}

/// Checks (and brings up to date) the layout until it is done, with a
/// growing pause between attempts, and opens `gate` for bindings once the
/// layout is known to be readable. A newer layout closes the gate for good:
/// this build must not write bindings a newer one may read differently.
pub async fn keep_checking(store: Arc<RedisStore>, gate: Arc<LayoutGate>) {
    let mut pause = RETRY_FIRST;
    loop {
        tokio::time::sleep(pause).await;
        match apply(&store).await {
            Ok(version) => {
                gate.set(LayoutStatus::Compatible { version });
                tracing::info!(
                    layout = version,
                    "Redis key layout checked; requests that need bindings are served again"
                );
                return;
            }
            Err(StoreError::Layout(reason)) => {
                tracing::error!(
                    reason = %reason,
                    "REFUSING every request that needs a binding (sessions, files, resources): \
                     Redis holds a newer key layout than this build knows"
                );
                gate.set(LayoutStatus::Newer { reason });
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "Redis key layout still unchecked; requests that need bindings get 503");
                pause = (pause * 2).min(RETRY_MAX);
            }
        }
    }
}
