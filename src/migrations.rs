//! Versioned Redis key layouts (see `migrations/` for each version's layout).
//! Applied at start under a Redis lock; a replica refuses to start against a
//! layout newer than it knows.

use std::time::Duration;

use crate::store::{RedisStore, StoreError};

pub use crate::store::redis::LAYOUT_VERSION;

/// Brings the Redis layout to this build's version. Version 1 is the first
/// layout, so there is nothing to transform yet: it records the version, or
/// refuses a newer one.
pub async fn apply(store: &RedisStore) -> Result<u64, StoreError> {
    use crate::store::StateStore;
    let holder = uuid::Uuid::new_v4().to_string();
    let mut locked = false;
    for _ in 0..50 {
        if store
            .try_lock("migrate", &holder, Duration::from_secs(30))
            .await?
        {
            locked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !locked {
        return Err(StoreError::Unavailable(
            "the migration lock stayed taken".into(),
        ));
    }
    let result = store.ensure_layout(LAYOUT_VERSION).await;
    let _ = store.unlock("migrate", &holder).await;
    result
}
