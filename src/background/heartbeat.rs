//! Replica heartbeats (so operators see who is serving, with which key and
//! token sets) and, on the same beat, the flush of the per-key statistics
//! and usage counted in memory. A stopping replica flushes once more and
//! takes its heartbeat down ([`sign_off`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::gateway::Gateway;
use crate::state::{now_ms, StateStore, StoreError};

const NS: &str = crate::state::keyspace::ns::REPLICA;
const INDEX: &str = crate::state::keyspace::index::REPLICAS;
const EVERY: Duration = Duration::from_secs(5);
const LIVES: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub id: String,
    pub addr: String,
    pub version: String,
    pub started_ms: u64,
    pub seen_ms: u64,
    /// Digests of the key ids and client token ids the replica serves with,
    /// and when it last loaded them: after a change of the mounted secrets,
    /// every replica should show the same digests.
    #[serde(default)]
    pub keys_digest: String,
    #[serde(default)]
    pub tokens_digest: String,
    #[serde(default)]
    pub loaded_ms: u64,
}

/// Beats and flushes every few seconds, until `stop` is notified. It stops
/// only between beats, never in the middle of a flush: a flush takes the
/// pending counts out of memory before it writes them, so cutting it there
/// would lose them.
pub async fn run(gw: Arc<Gateway>, addr: SocketAddr, stop: Arc<tokio::sync::Notify>) {
    loop {
        beat(&gw, addr).await;
        if let Err(e) = gw.stats.flush(gw.store()).await {
            tracing::debug!(error = %e, "statistics flush deferred");
        }
        if let Err(e) = gw.usage.flush(gw.store()).await {
            tracing::debug!(error = %e, "usage flush deferred");
        }
        tokio::select! {
            () = tokio::time::sleep(EVERY) => {}
            () = stop.notified() => return,
        }
    }
}

/// The last flush of a stopping replica, and the end of its heartbeat.
pub async fn sign_off(gw: &Gateway) {
    let _ = gw.limits.flush(gw.store(), now_ms()).await;
    let _ = gw.stats.flush(gw.store()).await;
    let _ = gw.usage.flush(gw.store()).await;
    let _ = gw.requests.flush(gw.store(), now_ms()).await;
    let _ = gw.store().delete(NS, &gw.replica).await;
}

async fn beat(gw: &Gateway, addr: SocketAddr) {
    let info = ReplicaInfo {
        id: gw.replica.clone(),
        addr: addr.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_ms: gw.started_ms,
        seen_ms: now_ms(),
        keys_digest: gw.keys.digest(),
        tokens_digest: gw.auth.tokens_digest(),
        loaded_ms: gw.loaded_ms(),
    };
    let Ok(value) = serde_json::to_string(&info) else {
        return;
    };
    let store = gw.store();
    let result = async {
        store.put(NS, &info.id, &value, LIVES).await?;
        store.index_add(INDEX, &info.id, LIVES, now_ms()).await
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "heartbeat not recorded");
    }
}

/// Replicas that sent a heartbeat recently, newest first.
pub async fn list(store: &dyn StateStore) -> Result<Vec<ReplicaInfo>, StoreError> {
    let ids = store.index_members(INDEX, now_ms()).await?;
    Ok(store
        .get_many(NS, &ids)
        .await?
        .into_iter()
        .flatten()
        .filter_map(|v| serde_json::from_str(&v).ok())
        .collect())
}
