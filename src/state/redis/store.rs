//! The store's contract ([`StateStore`]) on Redis: each method is written
//! beside the others of its concern (`rings`, `records`, `counts`).

use super::{
    async_trait, check, Applied, Ask, ClientUse, Duration, HashMap, Held, IndexEntry, Instant,
    KeySettle, KeyWindow, KeyWindowUse, MemberState, Ordering, Pick, RedisMode, RedisStore, Settle,
    StateStore, StoreError, Transition, Verdict, WindowAsk,
};

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
        RedisStore::rotate(self, ring, members, exclude, model, now_ms).await
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
        RedisStore::rotate_within(self, ring, members, exclude, windows, ask, now_ms).await
    }

    async fn settle_keys(
        &self,
        ring: &str,
        settles: &[KeySettle],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        RedisStore::settle_keys(self, ring, settles, now_ms).await
    }

    async fn key_windows(
        &self,
        ring: &str,
        members: &[String],
        ask: &WindowAsk<'_>,
        now_ms: u64,
    ) -> Result<Vec<KeyWindowUse>, StoreError> {
        RedisStore::key_windows(self, ring, members, ask, now_ms).await
    }

    async fn member_states(&self, ring: &str) -> Result<HashMap<String, MemberState>, StoreError> {
        RedisStore::member_states(self, ring).await
    }

    async fn transition(
        &self,
        ring: &str,
        member: &str,
        model: Option<&str>,
        event: &Transition,
        now_ms: u64,
    ) -> Result<Applied, StoreError> {
        RedisStore::transition(self, ring, member, model, event, now_ms).await
    }

    async fn touch(&self, ns: &str, id: &str, ttl: Duration) -> Result<Option<String>, StoreError> {
        RedisStore::touch(self, ns, id, ttl).await
    }

    async fn claim(
        &self,
        ns: &str,
        id: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<(String, bool), StoreError> {
        RedisStore::claim(self, ns, id, value, ttl).await
    }

    async fn replace(
        &self,
        ns: &str,
        id: &str,
        expected: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<String, StoreError> {
        RedisStore::replace(self, ns, id, expected, value, ttl).await
    }

    async fn put(&self, ns: &str, id: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        RedisStore::put(self, ns, id, value, ttl).await
    }

    async fn get_many(&self, ns: &str, ids: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        RedisStore::get_many(self, ns, ids).await
    }

    async fn delete(&self, ns: &str, id: &str) -> Result<(), StoreError> {
        RedisStore::delete(self, ns, id).await
    }

    async fn index_add(
        &self,
        name: &str,
        member: &str,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        RedisStore::index_add(self, name, member, ttl, now_ms).await
    }

    async fn index_add_many(
        &self,
        name: &str,
        members: &[(String, u64)],
        keep: usize,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        RedisStore::index_add_many(self, name, members, keep, now_ms).await
    }

    async fn index_members(&self, name: &str, now_ms: u64) -> Result<Vec<String>, StoreError> {
        RedisStore::index_members(self, name, now_ms).await
    }

    async fn index_page(
        &self,
        name: &str,
        now_ms: u64,
        after: Option<&IndexEntry>,
        count: usize,
    ) -> Result<Vec<IndexEntry>, StoreError> {
        RedisStore::index_page(self, name, now_ms, after, count).await
    }

    async fn index_remove(&self, name: &str, member: &str) -> Result<(), StoreError> {
        RedisStore::index_remove(self, name, member).await
    }

    async fn try_lock(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        RedisStore::try_lock(self, name, holder, ttl).await
    }

    async fn unlock(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        RedisStore::unlock(self, name, holder).await
    }

    async fn add_counts(
        &self,
        bucket: &str,
        counts: &[(String, u64)],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        RedisStore::add_counts(self, bucket, counts, ttl).await
    }

    async fn read_counts(&self, buckets: &[String]) -> Result<HashMap<String, u64>, StoreError> {
        RedisStore::read_counts(self, buckets).await
    }

    async fn admit(&self, client: &str, ask: &Ask<'_>) -> Result<Verdict, StoreError> {
        RedisStore::admit(self, client, ask).await
    }

    async fn settle(&self, settles: &[Settle], now_ms: u64) -> Result<(), StoreError> {
        RedisStore::settle(self, settles, now_ms).await
    }

    async fn leases(
        &self,
        release: &[Held],
        renew: &[Held],
        until_ms: u64,
    ) -> Result<(), StoreError> {
        RedisStore::leases(self, release, renew, until_ms).await
    }

    async fn client_use(
        &self,
        client: &str,
        day: &str,
        now_ms: u64,
    ) -> Result<ClientUse, StoreError> {
        RedisStore::client_use(self, client, day, now_ms).await
    }
}
