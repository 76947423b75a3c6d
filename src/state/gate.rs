//! Bindings wait for the key layout.
//!
//! A replica reads and writes bindings (sessions, files, resources) only once
//! it knows the layout Redis holds is one it can read. Until the check has
//! run (Redis was down at start, or another replica held the migration lock
//! too long), and for good when Redis holds a newer layout, every binding
//! call fails as a store outage would, so requests that need one get a 503;
//! key rotation, health, locks and counters pass through, so unpinned
//! traffic keeps flowing.
//!
//! Every call through it is a `store` span (at debug level) naming its
//! operation, which a request's trace shows as a child of the step that
//! made it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;

use super::limits::{
    Ask, ClientUse, Held, KeySettle, KeyWindow, KeyWindowUse, Settle, Verdict, WindowAsk,
};
use super::{Applied, IndexEntry, MemberState, Pick, StateStore, StoreError, Transition};

/// What a replica knows of the layout its store holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayoutStatus {
    /// Not checked yet: the check is retried in the background.
    Unchecked,
    /// Checked (and brought up to date): this build can read it.
    Compatible { version: u64 },
    /// Newer than this build knows: bindings stay refused.
    Newer { reason: String },
}

impl LayoutStatus {
    /// `unchecked`, `compatible` or `newer`, for `/readyz`.
    pub fn name(&self) -> &'static str {
        match self {
            LayoutStatus::Unchecked => "unchecked",
            LayoutStatus::Compatible { .. } => "compatible",
            LayoutStatus::Newer { .. } => "newer",
        }
    }
}

/// The layout status one replica shares between its requests and the task
/// that checks the layout.
#[derive(Debug)]
pub struct LayoutGate {
    status: RwLock<LayoutStatus>,
}

impl LayoutGate {
    pub fn new(status: LayoutStatus) -> Self {
        Self {
            status: RwLock::new(status),
        }
    }

    pub fn status(&self) -> LayoutStatus {
        self.status
            .read()
            .map_or(LayoutStatus::Unchecked, |s| s.clone())
    }

    pub fn set(&self, status: LayoutStatus) {
        if let Ok(mut s) = self.status.write() {
            *s = status;
        }
    }

    /// Whether bindings may be used now; the error a binding call answers
    /// otherwise.
    fn open(&self) -> Result<(), StoreError> {
        match self.status() {
            LayoutStatus::Compatible { .. } => Ok(()),
            LayoutStatus::Unchecked => Err(StoreError::Unavailable(
                "the key layout of the store is not checked yet".into(),
            )),
            LayoutStatus::Newer { reason } => Err(StoreError::Layout(reason)),
        }
    }
}

/// A store whose bindings and indexes wait for its [`LayoutGate`].
pub struct GatedStore {
    inner: Arc<dyn StateStore>,
    gate: Arc<LayoutGate>,
}

impl GatedStore {
    pub fn new(inner: Arc<dyn StateStore>, gate: Arc<LayoutGate>) -> Self {
        Self { inner, gate }
    }
}

#[async_trait]
impl StateStore for GatedStore {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn mode(&self) -> &'static str {
        self.inner.mode()
    }

    fn layout(&self) -> LayoutStatus {
        self.gate.status()
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "ping"))]
    async fn ping(&self) -> Result<Duration, StoreError> {
        self.inner.ping().await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "rotate"))]
    async fn rotate(
        &self,
        ring: &str,
        members: &[String],
        exclude: &[String],
        model: Option<&str>,
        now_ms: u64,
    ) -> Result<Pick, StoreError> {
        self.inner
            .rotate(ring, members, exclude, model, now_ms)
            .await
    }

    #[tracing::instrument(
        name = "store",
        level = "debug",
        skip_all,
        fields(op = "member_states")
    )]
    async fn member_states(&self, ring: &str) -> Result<HashMap<String, MemberState>, StoreError> {
        self.inner.member_states(ring).await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "transition"))]
    async fn transition(
        &self,
        ring: &str,
        member: &str,
        model: Option<&str>,
        event: &Transition,
        now_ms: u64,
    ) -> Result<Applied, StoreError> {
        self.inner
            .transition(ring, member, model, event, now_ms)
            .await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "touch"))]
    async fn touch(&self, ns: &str, id: &str, ttl: Duration) -> Result<Option<String>, StoreError> {
        self.gate.open()?;
        self.inner.touch(ns, id, ttl).await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "claim"))]
    async fn claim(
        &self,
        ns: &str,
        id: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<(String, bool), StoreError> {
        self.gate.open()?;
        self.inner.claim(ns, id, value, ttl).await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "replace"))]
    async fn replace(
        &self,
        ns: &str,
        id: &str,
        expected: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<String, StoreError> {
        self.gate.open()?;
        self.inner.replace(ns, id, expected, value, ttl).await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "put"))]
    async fn put(&self, ns: &str, id: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        self.gate.open()?;
        self.inner.put(ns, id, value, ttl).await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "get_many"))]
    async fn get_many(&self, ns: &str, ids: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        self.gate.open()?;
        self.inner.get_many(ns, ids).await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "delete"))]
    async fn delete(&self, ns: &str, id: &str) -> Result<(), StoreError> {
        self.gate.open()?;
        self.inner.delete(ns, id).await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "index_add"))]
    async fn index_add(
        &self,
        name: &str,
        member: &str,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.gate.open()?;
        self.inner.index_add(name, member, ttl, now_ms).await
    }

    #[tracing::instrument(
        name = "store",
        level = "debug",
        skip_all,
        fields(op = "index_members")
    )]
    async fn index_members(&self, name: &str, now_ms: u64) -> Result<Vec<String>, StoreError> {
        self.gate.open()?;
        self.inner.index_members(name, now_ms).await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "index_page"))]
    async fn index_page(
        &self,
        name: &str,
        now_ms: u64,
        after: Option<&IndexEntry>,
        count: usize,
    ) -> Result<Vec<IndexEntry>, StoreError> {
        self.gate.open()?;
        self.inner.index_page(name, now_ms, after, count).await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "index_remove"))]
    async fn index_remove(&self, name: &str, member: &str) -> Result<(), StoreError> {
        self.gate.open()?;
        self.inner.index_remove(name, member).await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "try_lock"))]
    async fn try_lock(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.inner.try_lock(name, holder, ttl).await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "unlock"))]
    async fn unlock(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        self.inner.unlock(name, holder).await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "add_counts"))]
    async fn add_counts(
        &self,
        bucket: &str,
        counts: &[(String, u64)],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.add_counts(bucket, counts, ttl).await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "read_counts"))]
    async fn read_counts(&self, buckets: &[String]) -> Result<HashMap<String, u64>, StoreError> {
        self.inner.read_counts(buckets).await
    }

    #[tracing::instrument(
        name = "store",
        level = "debug",
        skip_all,
        fields(op = "index_add_many")
    )]
    async fn index_add_many(
        &self,
        name: &str,
        members: &[(String, u64)],
        keep: usize,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.inner.index_add_many(name, members, keep, now_ms).await
    }

    // Client limits and key windows are counters, not bindings: they pass
    // through.

    #[tracing::instrument(
        name = "store",
        level = "debug",
        skip_all,
        fields(op = "rotate_within")
    )]
    async fn rotate_within(
        &self,
        ring: &str,
        members: &[String],
        exclude: &[String],
        windows: &[KeyWindow],
        ask: &WindowAsk<'_>,
        now_ms: u64,
    ) -> Result<Pick, StoreError> {
        self.inner
            .rotate_within(ring, members, exclude, windows, ask, now_ms)
            .await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "settle_keys"))]
    async fn settle_keys(
        &self,
        ring: &str,
        settles: &[KeySettle],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.inner.settle_keys(ring, settles, now_ms).await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "key_windows"))]
    async fn key_windows(
        &self,
        ring: &str,
        members: &[String],
        ask: &WindowAsk<'_>,
        now_ms: u64,
    ) -> Result<Vec<KeyWindowUse>, StoreError> {
        self.inner.key_windows(ring, members, ask, now_ms).await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "admit"))]
    async fn admit(&self, client: &str, ask: &Ask<'_>) -> Result<Verdict, StoreError> {
        self.inner.admit(client, ask).await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "settle"))]
    async fn settle(&self, settles: &[Settle], now_ms: u64) -> Result<(), StoreError> {
        self.inner.settle(settles, now_ms).await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "leases"))]
    async fn leases(
        &self,
        release: &[Held],
        renew: &[Held],
        until_ms: u64,
    ) -> Result<(), StoreError> {
        self.inner.leases(release, renew, until_ms).await
    }

    #[tracing::instrument(name = "store", level = "debug", skip_all, fields(op = "client_use"))]
    async fn client_use(
        &self,
        client: &str,
        day: &str,
        now_ms: u64,
    ) -> Result<ClientUse, StoreError> {
        self.inner.client_use(client, day, now_ms).await
    }
}
