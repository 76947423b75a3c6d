//! Versioned Redis key layouts. Each layout version is described in
//! `migrations/NNNN_name.md`; its upgrade step is a [`Migration`] here.
//!
//! At start every replica takes the store lock `migrate`, reads the version
//! recorded in Redis, applies each newer migration in order (recording the
//! version after each), and releases the lock. A replica that finds a version
//! newer than it knows refuses to start. Migrations must keep the previous
//! layout readable (expand, then contract in a later version), so replicas of
//! the previous version keep serving during a rolling upgrade.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::store::{RedisStore, StateStore, StoreError};

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
    let known = migrations.last().map_or(0, |m| m.version);
    let holder = uuid::Uuid::new_v4().to_string();
    let mut waited = 0;
    while !store
        .try_lock("migrate", &holder, Duration::from_secs(60))
        .await?
    {
        waited += 1;
        if waited > 300 {
            return Err(StoreError::Unavailable(
                "the migration lock stayed taken for 30 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let result = migrate_locked(store, migrations, known).await;
    let _ = store.unlock("migrate", &holder).await;
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
