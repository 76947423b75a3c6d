//! Per-key request counts by outcome over the last hour, shared by every
//! replica. Counted in process memory on the request path and flushed to
//! the store in one batch every few seconds, so the request path pays no
//! extra store round trip.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::state::{now_ms, StateStore, StoreError};

const BUCKET_MS: u64 = 60_000;
const WINDOW_BUCKETS: u64 = 60;

#[derive(Default)]
pub struct KeyStats {
    pending: Mutex<HashMap<String, u64>>,
}

fn bucket(ms: u64) -> String {
    crate::state::keyspace::bucket::key_stats(ms / BUCKET_MS)
}

impl KeyStats {
    pub fn record(&self, key_id: &str, outcome: &str) {
        if let Ok(mut pending) = self.pending.lock() {
            *pending.entry(format!("{key_id}:{outcome}")).or_insert(0) += 1;
        }
    }

    /// Moves the pending counts into the current minute's bucket. On a store
    /// failure they are kept for the next flush.
    pub async fn flush(&self, store: &dyn StateStore) -> Result<(), StoreError> {
        let batch: Vec<(String, u64)> = match self.pending.lock() {
            Ok(mut pending) => pending.drain().collect(),
            Err(_) => return Ok(()),
        };
        if batch.is_empty() {
            return Ok(());
        }
        let ttl = Duration::from_millis(BUCKET_MS * (WINDOW_BUCKETS + 5));
        if let Err(e) = store.add_counts(&bucket(now_ms()), &batch, ttl).await {
            if let Ok(mut pending) = self.pending.lock() {
                for (name, n) in batch {
                    *pending.entry(name).or_insert(0) += n;
                }
            }
            return Err(e);
        }
        Ok(())
    }

    /// key id → outcome → count over the last hour (every replica's flushed
    /// counts).
    pub async fn last_hour(
        store: &dyn StateStore,
    ) -> Result<HashMap<String, HashMap<String, u64>>, StoreError> {
        let now = now_ms();
        let buckets: Vec<String> = (0..WINDOW_BUCKETS)
            .map(|i| bucket(now.saturating_sub(i * BUCKET_MS)))
            .collect();
        let mut out: HashMap<String, HashMap<String, u64>> = HashMap::new();
        for (name, n) in store.read_counts(&buckets).await? {
            if let Some((key, outcome)) = name.split_once(':') {
                *out.entry(key.to_string())
                    .or_default()
                    .entry(outcome.to_string())
                    .or_insert(0) += n;
            }
        }
        Ok(out)
    }
}
