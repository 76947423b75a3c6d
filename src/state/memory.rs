//! The embedded store: one process, no Redis. Same semantics as the Redis
//! store, kept in maps behind one short-held lock.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::FastMap;

use async_trait::async_trait;

use super::limits::{
    Ask, ClientUse, Held, KeySettle, KeyUse, KeyWindow, KeyWindowUse, Settle, Verdict, WindowAsk,
    Windows,
};

use super::{
    apply, choose, effective_state, lapsed, state_field, Applied, IndexEntry, MemberState, Pick,
    StateStore, StoreError, Transition,
};

/// One index: each member's expiry, and the members ordered by (expiry,
/// member) like a Redis sorted set, so a page is read without a sort.
#[derive(Default)]
struct Index {
    expiry: FastMap<String, u64>,
    order: BTreeSet<(u64, String)>,
}

impl Index {
    fn insert(&mut self, member: &str, expires_ms: u64) {
        self.remove(member);
        self.expiry.insert(member.to_string(), expires_ms);
        self.order.insert((expires_ms, member.to_string()));
    }

    fn remove(&mut self, member: &str) {
        if let Some(old) = self.expiry.remove(member) {
            self.order.remove(&(old, member.to_string()));
        }
    }

    fn prune(&mut self, now_ms: u64) {
        while self.order.first().is_some_and(|(exp, _)| *exp <= now_ms) {
            if let Some((_, member)) = self.order.pop_first() {
                self.expiry.remove(&member);
            }
        }
    }

    /// Live members, latest expiry first, from the one after `after`.
    fn page(
        &self,
        now_ms: u64,
        after: Option<&IndexEntry>,
    ) -> impl Iterator<Item = IndexEntry> + '_ {
        let below: Box<dyn DoubleEndedIterator<Item = &(u64, String)>> = match after {
            Some(a) => Box::new(self.order.range(..(a.expires_ms, a.member.clone()))),
            None => Box::new(self.order.iter()),
        };
        below
            .rev()
            .take_while(move |(exp, _)| *exp > now_ms)
            .map(|(exp, member)| IndexEntry {
                member: member.clone(),
                expires_ms: *exp,
            })
    }
}

#[derive(Default)]
struct Inner {
    counters: HashMap<String, u64>,
    states: HashMap<String, HashMap<String, MemberState>>,
    bindings: FastMap<String, (String, Instant)>,
    indexes: FastMap<String, Index>,
    locks: HashMap<String, (String, Instant)>,
    counts: HashMap<String, (HashMap<String, u64>, Instant)>,
    /// Client limits by client token id.
    clients: HashMap<String, Windows>,
    /// Key windows by ring, member and model.
    key_use: HashMap<(String, String, String), KeyUse>,
    writes_since_sweep: usize,
}

impl Inner {
    /// Each member's state for `model`, as rotation reads it.
    fn states_of(
        &self,
        ring: &str,
        members: &[String],
        model: Option<&str>,
        now_ms: u64,
    ) -> Vec<Option<MemberState>> {
        match self.states.get(ring) {
            Some(ring_states) => members
                .iter()
                .map(|m| effective_state(ring_states, m, model, now_ms))
                .collect(),
            None => vec![None; members.len()],
        }
    }

    fn live(&mut self, key: &str) -> Option<&mut (String, Instant)> {
        let now = Instant::now();
        if self.bindings.get(key).is_some_and(|(_, exp)| *exp <= now) {
            self.bindings.remove(key);
        }
        self.bindings.get_mut(key)
    }

    fn insert(&mut self, key: String, value: String, ttl: Duration) {
        self.writes_since_sweep += 1;
        if self.writes_since_sweep >= 4096 {
            let now = Instant::now();
            self.bindings.retain(|_, (_, exp)| *exp > now);
            self.locks.retain(|_, (_, exp)| *exp > now);
            self.counts.retain(|_, (_, exp)| *exp > now);
            self.writes_since_sweep = 0;
        }
        self.bindings.insert(key, (value, Instant::now() + ttl));
    }
}

#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> Result<T, StoreError> {
        let mut guard = self
            .inner
            .lock()
            .map_err(|_| StoreError::Unavailable("embedded store lock poisoned".into()))?;
        Ok(f(&mut guard))
    }
}

fn key(ns: &str, id: &str) -> String {
    format!("{ns}:{id}")
}

#[async_trait]
impl StateStore for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn ping(&self) -> Result<Duration, StoreError> {
        let start = Instant::now();
        self.with(|_| ())?;
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
        self.with(|inner| {
            let states = inner.states_of(ring, members, model, now_ms);
            choose(members, &states, exclude, now_ms, || {
                let c = inner.counters.entry(ring.to_string()).or_insert(0);
                *c += 1;
                *c
            })
        })
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
        self.with(|inner| {
            let mut states = inner.states_of(ring, members, Some(ask.model), now_ms);
            // A full window is passed over as a cooldown is.
            let mut first_free: Option<u64> = None;
            for (i, member) in members.iter().enumerate() {
                let w = windows.get(i).copied().unwrap_or_default();
                if w.is_none()
                    || exclude.contains(member)
                    || !MemberState::usable_at(states[i].as_ref(), now_ms)
                {
                    continue;
                }
                let key = (ring.to_string(), member.clone(), ask.model.to_string());
                if let Some(until) = inner
                    .key_use
                    .entry(key)
                    .or_default()
                    .full_until(&w, ask, now_ms)
                {
                    first_free = Some(first_free.map_or(until, |f| f.min(until)));
                    states[i] = Some(MemberState::cooling(until, "window"));
                }
            }
            let pick = choose(members, &states, exclude, now_ms, || {
                let c = inner.counters.entry(ring.to_string()).or_insert(0);
                *c += 1;
                *c
            });
            match pick {
                Pick::Member(i) => {
                    let w = windows.get(i).copied().unwrap_or_default();
                    if !w.is_none() {
                        let key = (ring.to_string(), members[i].clone(), ask.model.to_string());
                        inner.key_use.entry(key).or_default().spend(&w, now_ms);
                    }
                    Pick::Member(i)
                }
                Pick::AllCooling { until_ms } if first_free == Some(until_ms) => {
                    Pick::WindowsFull { until_ms }
                }
                other => other,
            }
        })
    }

    async fn settle_keys(
        &self,
        ring: &str,
        settles: &[KeySettle],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.with(|inner| {
            for s in settles {
                let key = (ring.to_string(), s.member.clone(), s.model.clone());
                inner
                    .key_use
                    .entry(key)
                    .or_default()
                    .settle(s.tokens, now_ms);
            }
        })
    }

    async fn key_windows(
        &self,
        ring: &str,
        members: &[String],
        ask: &WindowAsk<'_>,
        now_ms: u64,
    ) -> Result<Vec<KeyWindowUse>, StoreError> {
        self.with(|inner| {
            members
                .iter()
                .map(|m| {
                    let key = (ring.to_string(), m.clone(), ask.model.to_string());
                    let (requests, tokens, today) = inner
                        .key_use
                        .get_mut(&key)
                        .map(|u| u.usage(ask, now_ms))
                        .unwrap_or_default();
                    KeyWindowUse {
                        requests_last_minute: requests,
                        tokens_last_minute: tokens,
                        requests_today: today,
                    }
                })
                .collect()
        })
    }

    async fn member_states(&self, ring: &str) -> Result<HashMap<String, MemberState>, StoreError> {
        self.with(|inner| inner.states.get(ring).cloned().unwrap_or_default())
    }

    async fn transition(
        &self,
        ring: &str,
        member: &str,
        model: Option<&str>,
        event: &Transition,
        now_ms: u64,
    ) -> Result<Applied, StoreError> {
        self.with(|inner| {
            let ring_states = inner.states.entry(ring.to_string()).or_default();
            ring_states.retain(|_, s| !lapsed(s, now_ms));
            let field = state_field(member, model);
            let key_before = ring_states.get(member).cloned();
            let before = ring_states.get(&field).cloned();
            let after = apply(key_before.as_ref(), before.as_ref(), event, now_ms);
            match &after {
                Some(s) => {
                    ring_states.insert(field, s.clone());
                }
                None => {
                    ring_states.remove(&field);
                }
            }
            Applied {
                key_before,
                before,
                after,
            }
        })
    }

    async fn touch(&self, ns: &str, id: &str, ttl: Duration) -> Result<Option<String>, StoreError> {
        self.with(|inner| {
            inner.live(&key(ns, id)).map(|(value, exp)| {
                *exp = Instant::now() + ttl;
                value.clone()
            })
        })
    }

    async fn claim(
        &self,
        ns: &str,
        id: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<(String, bool), StoreError> {
        self.with(|inner| {
            let k = key(ns, id);
            if let Some((current, exp)) = inner.live(&k) {
                *exp = Instant::now() + ttl;
                return (current.clone(), false);
            }
            inner.insert(k, value.to_string(), ttl);
            (value.to_string(), true)
        })
    }

    async fn replace(
        &self,
        ns: &str,
        id: &str,
        expected: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<String, StoreError> {
        self.with(|inner| {
            let k = key(ns, id);
            match inner.live(&k) {
                Some((current, exp)) if current != expected => {
                    *exp = Instant::now() + ttl;
                    current.clone()
                }
                _ => {
                    inner.insert(k, value.to_string(), ttl);
                    value.to_string()
                }
            }
        })
    }

    async fn put(&self, ns: &str, id: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        self.with(|inner| inner.insert(key(ns, id), value.to_string(), ttl))
    }

    async fn get_many(&self, ns: &str, ids: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        self.with(|inner| {
            ids.iter()
                .map(|id| inner.live(&key(ns, id)).map(|(v, _)| v.clone()))
                .collect()
        })
    }

    async fn delete(&self, ns: &str, id: &str) -> Result<(), StoreError> {
        self.with(|inner| {
            inner.bindings.remove(&key(ns, id));
        })
    }

    async fn index_add(
        &self,
        name: &str,
        member: &str,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.with(|inner| {
            let index = inner.indexes.entry(name.to_string()).or_default();
            index.prune(now_ms);
            index.insert(member, now_ms + ttl.as_millis() as u64);
        })
    }

    async fn index_add_many(
        &self,
        name: &str,
        members: &[(String, u64)],
        keep: usize,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.with(|inner| {
            let index = inner.indexes.entry(name.to_string()).or_default();
            index.prune(now_ms);
            for (member, expires_ms) in members {
                index.insert(member, *expires_ms);
            }
            while index.order.len() > keep {
                if let Some((_, member)) = index.order.pop_first() {
                    index.expiry.remove(&member);
                }
            }
        })
    }

    async fn index_members(&self, name: &str, now_ms: u64) -> Result<Vec<String>, StoreError> {
        self.with(|inner| {
            inner.indexes.get(name).map_or_else(Vec::new, |index| {
                index.page(now_ms, None).map(|e| e.member).collect()
            })
        })
    }

    async fn index_page(
        &self,
        name: &str,
        now_ms: u64,
        after: Option<&IndexEntry>,
        count: usize,
    ) -> Result<Vec<IndexEntry>, StoreError> {
        self.with(|inner| {
            inner.indexes.get(name).map_or_else(Vec::new, |index| {
                index.page(now_ms, after).take(count).collect()
            })
        })
    }

    async fn index_remove(&self, name: &str, member: &str) -> Result<(), StoreError> {
        self.with(|inner| {
            if let Some(index) = inner.indexes.get_mut(name) {
                index.remove(member);
            }
        })
    }

    async fn try_lock(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.with(|inner| {
            let now = Instant::now();
            match inner.locks.get(name) {
                // Held: by this holder (as the Redis store answers), or not.
                Some((by, exp)) if *exp > now => by == holder,
                _ => {
                    inner
                        .locks
                        .insert(name.to_string(), (holder.to_string(), now + ttl));
                    true
                }
            }
        })
    }

    async fn unlock(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        self.with(|inner| {
            if inner.locks.get(name).is_some_and(|(h, _)| h == holder) {
                inner.locks.remove(name);
            }
        })
    }

    async fn add_counts(
        &self,
        bucket: &str,
        counts: &[(String, u64)],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.with(|inner| {
            let now = Instant::now();
            let entry = inner
                .counts
                .entry(bucket.to_string())
                .or_insert_with(|| (HashMap::new(), now + ttl));
            if entry.1 <= now {
                *entry = (HashMap::new(), now + ttl);
            }
            for (name, n) in counts {
                *entry.0.entry(name.clone()).or_insert(0) += n;
            }
        })
    }

    async fn read_counts(&self, buckets: &[String]) -> Result<HashMap<String, u64>, StoreError> {
        self.with(|inner| {
            let now = Instant::now();
            let mut sum = HashMap::new();
            for b in buckets {
                if let Some((counts, exp)) = inner.counts.get(b) {
                    if *exp > now {
                        for (name, n) in counts {
                            *sum.entry(name.clone()).or_insert(0) += n;
                        }
                    }
                }
            }
            sum
        })
    }

    async fn admit(&self, client: &str, ask: &Ask<'_>) -> Result<Verdict, StoreError> {
        self.with(|inner| {
            let verdict = inner
                .clients
                .entry(client.to_string())
                .or_default()
                .admit(ask);
            if inner.clients.len() > 1024 {
                inner.clients.retain(|_, w| !w.is_empty());
            }
            verdict
        })
    }

    async fn settle(&self, settles: &[Settle], now_ms: u64) -> Result<(), StoreError> {
        self.with(|inner| {
            for s in settles {
                inner.clients.entry(s.client.clone()).or_default().settle(
                    s.tokens,
                    &s.day,
                    s.per_minute,
                    now_ms,
                );
            }
        })
    }

    async fn leases(
        &self,
        release: &[Held],
        renew: &[Held],
        until_ms: u64,
    ) -> Result<(), StoreError> {
        self.with(|inner| {
            for h in release {
                if let Some(w) = inner.clients.get_mut(&h.client) {
                    w.release(h.set, &h.id);
                }
            }
            for h in renew {
                inner
                    .clients
                    .entry(h.client.clone())
                    .or_default()
                    .renew(h.set, &h.id, until_ms);
            }
        })
    }

    async fn client_use(
        &self,
        client: &str,
        day: &str,
        now_ms: u64,
    ) -> Result<ClientUse, StoreError> {
        self.with(|inner| {
            inner
                .clients
                .get_mut(client)
                .map(|w| w.usage(day, now_ms))
                .unwrap_or_default()
        })
    }
}
