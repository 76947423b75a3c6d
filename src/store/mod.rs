//! Shared state: one interface, two implementations side by side.
//!
//! The store speaks of rotation rings, member health, bindings (a namespaced
//! id bound to a value with an expiry) and indexes (members with an expiry).
//! It knows nothing of HTTP or Gemini; callers give their data its meaning.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;

pub mod connect;
pub mod layout;
pub mod memory;
pub mod redis;

pub use connect::{RedisConfig, RedisMode};
pub use layout::KeyLayout;
pub use memory::MemoryStore;
pub use redis::RedisStore;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the state store did not answer in time")]
    Timeout,
    #[error("the state store is unavailable: {0}")]
    Unavailable(String),
    #[error("the state store holds data this version cannot read: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Layout(String),
    /// The server answers but cannot serve this configuration.
    #[error("{0}")]
    Misconfigured(String),
}

/// What the store keeps about one member of a rotation ring. A member with no
/// state is healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberState {
    /// Skipped by rotation until this Unix time (ms).
    Cooling { until_ms: u64 },
    /// Skipped until re-enabled.
    Disabled { since_ms: u64, reason: String },
}

impl MemberState {
    pub fn encode(&self) -> String {
        match self {
            MemberState::Cooling { until_ms } => format!("c:{until_ms}"),
            MemberState::Disabled { since_ms, reason } => format!("d:{since_ms}:{reason}"),
        }
    }

    pub fn decode(raw: &str) -> Option<MemberState> {
        let (kind, rest) = raw.split_once(':')?;
        match kind {
            "c" => rest
                .parse()
                .ok()
                .map(|until_ms| MemberState::Cooling { until_ms }),
            "d" => {
                let (since, reason) = rest.split_once(':').unwrap_or((rest, ""));
                Some(MemberState::Disabled {
                    since_ms: since.parse().ok()?,
                    reason: reason.to_string(),
                })
            }
            _ => None,
        }
    }

    /// Whether rotation may pick a member in this state at `now_ms`.
    pub fn usable_at(state: Option<&MemberState>, now_ms: u64) -> bool {
        match state {
            None => true,
            Some(MemberState::Cooling { until_ms }) => *until_ms <= now_ms,
            Some(MemberState::Disabled { .. }) => false,
        }
    }
}

/// The answer of one rotation step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pick {
    /// Index into the members given.
    Member(usize),
    /// Every member not excluded is cooling; the earliest is usable again then.
    AllCooling { until_ms: u64 },
    /// Every member not excluded is disabled.
    AllDisabled,
    /// Healthy members exist but every one of them was excluded.
    Exhausted,
}

/// The rotation rule both stores apply: among the usable members not
/// excluded, take the `counter`-th (round-robin), so K usable members each get
/// N/K ± 1 of N picks. The embedded store advances its counter only when a
/// member is picked; Redis advances it on every call (pipelined with the
/// read of the states), which changes nothing while members are usable.
pub fn choose(
    members: &[String],
    states: &[Option<MemberState>],
    exclude: &[String],
    now_ms: u64,
    next_counter: impl FnOnce() -> u64,
) -> Pick {
    let mut usable = Vec::with_capacity(members.len());
    let mut min_until: Option<u64> = None;
    let mut any_excluded_usable = false;
    for (i, member) in members.iter().enumerate() {
        let state = states.get(i).and_then(Option::as_ref);
        if let Some(MemberState::Cooling { until_ms }) = state {
            if *until_ms > now_ms {
                min_until = Some(min_until.map_or(*until_ms, |m| m.min(*until_ms)));
            }
        }
        if MemberState::usable_at(state, now_ms) {
            if exclude.contains(member) {
                any_excluded_usable = true;
            } else {
                usable.push(i);
            }
        }
    }
    if usable.is_empty() {
        return match (min_until, any_excluded_usable) {
            (_, true) => Pick::Exhausted,
            (Some(until_ms), false) => Pick::AllCooling { until_ms },
            (None, false) => Pick::AllDisabled,
        };
    }
    let c = next_counter();
    Pick::Member(usable[(c.saturating_sub(1) % usable.len() as u64) as usize])
}

#[async_trait]
pub trait StateStore: Send + Sync {
    /// `memory` or `redis`, for logs and `/readyz`.
    fn kind(&self) -> &'static str;

    /// The deployment behind the store, for `/readyz` and the admin page:
    /// `embedded`, or the Redis mode (`standalone`, `cluster`, `sentinel`).
    fn mode(&self) -> &'static str {
        "embedded"
    }

    /// Whether the store can serve the gateway's commands now, and how long
    /// finding out took.
    async fn ping(&self) -> Result<Duration, StoreError>;

    /// One round-robin step over `members` of `ring`, skipping members that are
    /// cooling, disabled or in `exclude`. Atomic across every replica.
    async fn rotate(
        &self,
        ring: &str,
        members: &[String],
        exclude: &[String],
        now_ms: u64,
    ) -> Result<Pick, StoreError>;

    /// The state of every member of `ring` that has one.
    async fn member_states(&self, ring: &str) -> Result<HashMap<String, MemberState>, StoreError>;

    /// Sets (or, with `None`, clears) one member's state.
    async fn set_member_state(
        &self,
        ring: &str,
        member: &str,
        state: Option<&MemberState>,
    ) -> Result<(), StoreError>;

    /// The value bound to `ns`/`id`, sliding its expiry to `ttl`.
    async fn touch(&self, ns: &str, id: &str, ttl: Duration) -> Result<Option<String>, StoreError>;

    /// Binds `value` unless a binding exists (`SET NX EX`). Returns the value
    /// bound after the call and whether this call created it; an existing
    /// binding gets its expiry slid to `ttl`.
    async fn claim(
        &self,
        ns: &str,
        id: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<(String, bool), StoreError>;

    /// Replaces the binding only if it still holds `expected` (or is gone).
    /// Returns the value bound after the call.
    async fn replace(
        &self,
        ns: &str,
        id: &str,
        expected: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<String, StoreError>;

    /// Unconditionally binds `value`.
    async fn put(&self, ns: &str, id: &str, value: &str, ttl: Duration) -> Result<(), StoreError>;

    /// The values of several bindings of one namespace, in order, without
    /// touching their expiry.
    async fn get_many(&self, ns: &str, ids: &[String]) -> Result<Vec<Option<String>>, StoreError>;

    async fn delete(&self, ns: &str, id: &str) -> Result<(), StoreError>;

    /// Adds `member` to the index `name`; the member lapses after `ttl`.
    async fn index_add(
        &self,
        name: &str,
        member: &str,
        ttl: Duration,
        now_ms: u64,
    ) -> Result<(), StoreError>;

    /// Live members of an index, most recently added first.
    async fn index_members(&self, name: &str, now_ms: u64) -> Result<Vec<String>, StoreError>;

    async fn index_remove(&self, name: &str, member: &str) -> Result<(), StoreError>;

    /// Takes the lock `name` for `holder` if free; it lapses after `ttl`.
    async fn try_lock(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError>;

    /// Releases the lock if `holder` still has it.
    async fn unlock(&self, name: &str, holder: &str) -> Result<(), StoreError>;

    /// Adds to named counters in one time bucket; the bucket lapses after `ttl`.
    async fn add_counts(
        &self,
        bucket: &str,
        counts: &[(String, u64)],
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// The sums of every counter over the given buckets.
    async fn read_counts(&self, buckets: &[String]) -> Result<HashMap<String, u64>, StoreError>;
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("k{i}")).collect()
    }

    #[test]
    fn state_round_trips_through_its_encoding() {
        for s in [
            MemberState::Cooling { until_ms: 42 },
            MemberState::Disabled {
                since_ms: 7,
                reason: "api_key_invalid".into(),
            },
        ] {
            assert_eq!(MemberState::decode(&s.encode()), Some(s));
        }
        assert_eq!(MemberState::decode("garbage"), None);
    }

    #[test]
    fn choose_is_fair_over_usable_members() {
        let members = ids(4);
        let states = vec![
            None,
            Some(MemberState::Cooling { until_ms: 100 }),
            None,
            None,
        ];
        let mut counter = 0;
        let mut hits = [0; 4];
        for _ in 0..30 {
            match choose(&members, &states, &[], 50, || {
                counter += 1;
                counter
            }) {
                Pick::Member(i) => hits[i] += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(hits, [10, 0, 10, 10]);
    }

    #[test]
    fn choose_reports_why_nothing_is_usable() {
        let members = ids(2);
        let cooling = vec![
            Some(MemberState::Cooling { until_ms: 900 }),
            Some(MemberState::Cooling { until_ms: 500 }),
        ];
        assert_eq!(
            choose(&members, &cooling, &[], 10, || 1),
            Pick::AllCooling { until_ms: 500 }
        );
        let disabled = vec![
            Some(MemberState::Disabled {
                since_ms: 1,
                reason: String::new(),
            }),
            Some(MemberState::Disabled {
                since_ms: 1,
                reason: String::new(),
            }),
        ];
        assert_eq!(
            choose(&members, &disabled, &[], 10, || 1),
            Pick::AllDisabled
        );
        assert_eq!(
            choose(&members, &[None, None], &members, 10, || 1),
            Pick::Exhausted
        );
    }
}
