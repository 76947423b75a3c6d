//! Shared state: one interface, two implementations side by side.
//!
//! The store speaks of rotation rings, member health, bindings (a namespaced
//! id bound to a value with an expiry) and indexes (members with an expiry).
//! It knows nothing of HTTP or Gemini; callers give their data its meaning.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;

pub mod connect;
pub mod gate;
pub mod keyspace;
pub mod limits;
pub mod memory;
pub mod migrations;
pub mod redis;
pub mod snapshot;

pub use connect::{RedisConfig, RedisMode};
pub use gate::{GatedStore, LayoutGate, LayoutStatus};
pub use keyspace::Keyspace;
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

/// What the store keeps about one member of a rotation ring, or about one
/// `(member, model)` pair. A member with no state is healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberState {
    /// Skipped by rotation until this Unix time (ms). `reason` says why
    /// (`per_minute`, `per_day`, `proxy`, …; empty when written by a build
    /// that did not record reasons).
    Cooling { until_ms: u64, reason: String },
    /// Skipped until re-enabled. `reason` is the origin: [`ADMIN`] for an
    /// operator's decision, else what the upstream said (`api_key_invalid`, …).
    Disabled { since_ms: u64, reason: String },
}

/// The disable origin of an operator's decision: only an admin enable undoes it.
pub const ADMIN: &str = "admin";

/// The reason of a cooldown that names none: a per-minute limit.
pub const PER_MINUTE: &str = "per_minute";

/// Separates a member from a model in the field of a per-model state.
pub const MODEL_SEP: char = '|';

/// The field that holds the state of `member` for `model` (key-wide: `None`).
pub fn state_field(member: &str, model: Option<&str>) -> String {
    match model {
        Some(m) => format!("{member}{MODEL_SEP}{m}"),
        None => member.to_string(),
    }
}

/// Calls `f` with the per-model field name of `member` and `model`, built
/// in a buffer each thread reuses (this runs for every key a rotation looks
/// at, on every request).
fn with_field<R>(member: &str, model: &str, f: impl FnOnce(&str) -> R) -> R {
    thread_local! {
        static FIELD: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    FIELD.with(|buf| match buf.try_borrow_mut() {
        Ok(mut buf) => {
            buf.clear();
            buf.push_str(member);
            buf.push(MODEL_SEP);
            buf.push_str(model);
            f(&buf)
        }
        // Re-entered from `f` itself: build a fresh one.
        Err(_) => f(&state_field(member, Some(model))),
    })
}

impl MemberState {
    /// A cooldown; an empty reason is the default one, [`PER_MINUTE`].
    pub fn cooling(until_ms: u64, reason: &str) -> Self {
        MemberState::Cooling {
            until_ms,
            reason: if reason.is_empty() {
                PER_MINUTE
            } else {
                reason
            }
            .to_string(),
        }
    }

    /// The stored form. A per-minute cooldown is written as `c:<until>`,
    /// without its reason: the form replicas of layout 1 read, so they keep
    /// skipping cooling keys during a rolling upgrade.
    pub fn encode(&self) -> String {
        match self {
            MemberState::Cooling { until_ms, reason }
                if reason.is_empty() || reason == PER_MINUTE =>
            {
                format!("c:{until_ms}")
            }
            MemberState::Cooling { until_ms, reason } => format!("c:{until_ms}:{reason}"),
            MemberState::Disabled { since_ms, reason } => format!("d:{since_ms}:{reason}"),
        }
    }

    pub fn decode(raw: &str) -> Option<MemberState> {
        let (kind, rest) = raw.split_once(':')?;
        let (num, reason) = rest.split_once(':').unwrap_or((rest, ""));
        let num: u64 = num.parse().ok()?;
        match kind {
            "c" => Some(MemberState::cooling(num, reason)),
            "d" => Some(MemberState::Disabled {
                since_ms: num,
                reason: reason.to_string(),
            }),
            _ => None,
        }
    }

    /// Whether rotation may pick a member in this state at `now_ms`.
    pub fn usable_at(state: Option<&MemberState>, now_ms: u64) -> bool {
        match state {
            None => true,
            Some(MemberState::Cooling { until_ms, .. }) => *until_ms <= now_ms,
            Some(MemberState::Disabled { .. }) => false,
        }
    }

    pub fn is_admin_disabled(&self) -> bool {
        matches!(self, MemberState::Disabled { reason, .. } if reason == ADMIN)
    }

    fn active_until(&self, now_ms: u64) -> Option<u64> {
        match self {
            MemberState::Cooling { until_ms, .. } if *until_ms > now_ms => Some(*until_ms),
            _ => None,
        }
    }
}

/// What a member's state in `states` (a ring's fields, as the store keeps
/// them) means for a request for `model`: a disabled member is disabled for
/// every model; otherwise the later of its key-wide and its per-model
/// cooldown counts.
pub fn effective_state(
    states: &HashMap<String, MemberState>,
    member: &str,
    model: Option<&str>,
    now_ms: u64,
) -> Option<MemberState> {
    let key_wide = states.get(member);
    if let Some(d @ MemberState::Disabled { .. }) = key_wide {
        return Some(d.clone());
    }
    // Most rings have no per-model entry at all: no field name to build then.
    let per_model = match model {
        Some(m) if states.len() > usize::from(key_wide.is_some()) => {
            with_field(member, m, |f| states.get(f))
        }
        _ => None,
    };
    let key_until = key_wide.and_then(|s| s.active_until(now_ms));
    let model_until = per_model.and_then(|s| s.active_until(now_ms));
    match (key_until, model_until) {
        (None, None) => None,
        (Some(k), Some(m)) if m > k => per_model.cloned(),
        (Some(_), _) => key_wide.cloned(),
        (None, Some(_)) => per_model.cloned(),
    }
}

/// One event for a member's state. Every state change goes through
/// [`apply`] (the embedded store) or its Lua twin `lua/transition.lua`
/// (Redis), atomically, so every replica sees the same result for the same
/// sequence of events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Rate-limited until then (for one model, or key-wide). Never replaces
    /// `Disabled`; of two cooldowns the later end wins.
    Cool { until_ms: u64, reason: String },
    /// The key is unusable: `reason` is [`ADMIN`] for an operator, else what
    /// the upstream said. An admin disable is kept over an upstream one.
    Disable { reason: String },
    /// An operator's enable: clears the key-wide state, whatever it is.
    Enable,
    /// The re-check found the key working: clears a disable the upstream
    /// caused, never an admin's.
    Recovered,
    /// Clears a cooldown (its 429s were the egress IP's, not the key's);
    /// never a disable.
    Lift,
}

impl Transition {
    /// The event as the Lua script takes it: kind, number, reason.
    pub fn wire(&self) -> (&'static str, u64, &str) {
        match self {
            Transition::Cool { until_ms, reason } => ("cool", *until_ms, reason),
            Transition::Disable { reason } => ("disable", 0, reason),
            Transition::Enable => ("enable", 0, ""),
            Transition::Recovered => ("recovered", 0, ""),
            Transition::Lift => ("lift", 0, ""),
        }
    }
}

/// The state machine's rule: the new state of a field, given the member's
/// key-wide state, the field's current state (the same as the key-wide state
/// for a key-wide event) and the event. Model-scoped events are only `Cool`
/// and `Lift`; others act key-wide.
pub fn apply(
    key_wide: Option<&MemberState>,
    current: Option<&MemberState>,
    event: &Transition,
    now_ms: u64,
) -> Option<MemberState> {
    let disabled = matches!(key_wide, Some(MemberState::Disabled { .. }));
    match event {
        Transition::Cool { until_ms, reason } => {
            if disabled {
                return current.cloned();
            }
            match current {
                Some(MemberState::Cooling { until_ms: cur, .. }) if *cur >= *until_ms => {
                    current.cloned()
                }
                Some(d @ MemberState::Disabled { .. }) => Some(d.clone()),
                _ => Some(MemberState::cooling(*until_ms, reason)),
            }
        }
        Transition::Disable { reason } => match current {
            Some(d @ MemberState::Disabled { .. }) if d.is_admin_disabled() || reason != ADMIN => {
                Some(d.clone())
            }
            _ => Some(MemberState::Disabled {
                since_ms: now_ms,
                reason: reason.clone(),
            }),
        },
        Transition::Enable => None,
        Transition::Recovered => match current {
            Some(d @ MemberState::Disabled { .. }) if d.is_admin_disabled() => Some(d.clone()),
            Some(MemberState::Disabled { .. }) => None,
            other => other.cloned(),
        },
        Transition::Lift => match current {
            Some(MemberState::Cooling { .. }) => None,
            other => other.cloned(),
        },
    }
}

/// What one transition did: the field's state before and after, and the
/// member's key-wide state before (the input of [`apply`] besides the event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub key_before: Option<MemberState>,
    pub before: Option<MemberState>,
    pub after: Option<MemberState>,
}

/// Whether a field may be pruned: a cooldown that has ended.
pub fn lapsed(state: &MemberState, now_ms: u64) -> bool {
    matches!(state, MemberState::Cooling { until_ms, .. } if *until_ms <= now_ms)
}

/// One live member of an index with its expiry (its score in Redis): a
/// place a listing can resume after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub member: String,
    pub expires_ms: u64,
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
    /// Every member not excluded is cooling or has its window for the
    /// model full ([`StateStore::rotate_within`]); the earliest window
    /// frees then, before any cooldown ends.
    WindowsFull { until_ms: u64 },
}

/// The rotation rule both stores apply: among the usable members not
/// excluded, take the `counter`-th (round-robin), so K usable members each get
/// N/K ± 1 of N picks. The embedded store advances its counter only when a
/// member is picked; Redis advances it on every call (the `INCR` whose
/// answer also says whether the replica's copy of the states is current, see
/// [`snapshot`]), which changes nothing while members are usable.
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
        if let Some(MemberState::Cooling { until_ms, .. }) = state {
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

    /// What the replica knows of the key layout the store holds (the
    /// embedded store has none to check).
    fn layout(&self) -> LayoutStatus {
        LayoutStatus::Compatible { version: 0 }
    }

    /// Whether the store can serve the gateway's commands now, and how long
    /// finding out took.
    async fn ping(&self) -> Result<Duration, StoreError>;

    /// One round-robin step over `members` of `ring`, skipping members that are
    /// cooling (key-wide, or for `model`), disabled or in `exclude`. Atomic
    /// across every replica: one round trip, a second only when the states
    /// changed since this replica last read them.
    async fn rotate(
        &self,
        ring: &str,
        members: &[String],
        exclude: &[String],
        model: Option<&str>,
        now_ms: u64,
    ) -> Result<Pick, StoreError>;

    /// [`StateStore::rotate`] that also keeps every member within its
    /// window for `ask.model` (`windows[i]` for `members[i]`): a member
    /// whose window is full is passed over as a cooling one is, and the
    /// one picked has the request counted in its window, in the same
    /// atomic step (one round trip, in the ring's slot).
    async fn rotate_within(
        &self,
        ring: &str,
        members: &[String],
        exclude: &[String],
        windows: &[limits::KeyWindow],
        ask: &limits::WindowAsk<'_>,
        now_ms: u64,
    ) -> Result<Pick, StoreError>;

    /// Counts tokens answers reported against the windows of their keys.
    async fn settle_keys(
        &self,
        ring: &str,
        settles: &[limits::KeySettle],
        now_ms: u64,
    ) -> Result<(), StoreError>;

    /// Each member's use of its window for `ask.model`.
    async fn key_windows(
        &self,
        ring: &str,
        members: &[String],
        ask: &limits::WindowAsk<'_>,
        now_ms: u64,
    ) -> Result<Vec<limits::KeyWindowUse>, StoreError>;

    /// Every state field of `ring`: key-wide states by member id, per-model
    /// states by [`state_field`] (lapsed cooldowns may still be listed).
    async fn member_states(&self, ring: &str) -> Result<HashMap<String, MemberState>, StoreError>;

    /// Applies one event to a member's state (for `model`, or key-wide) by
    /// the rule of [`apply`], atomically. Lapsed cooldowns of the ring are
    /// pruned on the way.
    async fn transition(
        &self,
        ring: &str,
        member: &str,
        model: Option<&str>,
        event: &Transition,
        now_ms: u64,
    ) -> Result<Applied, StoreError>;

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

    /// Adds members with their expiry (Unix ms) to the index `name` in one
    /// exchange, drops lapsed ones, and keeps at most the `keep` latest.
    async fn index_add_many(
        &self,
        name: &str,
        members: &[(String, u64)],
        keep: usize,
        now_ms: u64,
    ) -> Result<(), StoreError>;

    /// Live members of an index, most recently added first: latest expiry
    /// first, members of one expiry in reverse byte order.
    async fn index_members(&self, name: &str, now_ms: u64) -> Result<Vec<String>, StoreError>;

    /// Up to `count` live members of an index in the order of
    /// [`StateStore::index_members`], from the one after `after` (from the
    /// first when `None`). Members added since a previous page (a later
    /// expiry) sort before `after`, so paging never shows one twice nor
    /// skips one; a member re-added since then moves to the front. Reads the
    /// members that share `after`'s expiry, then at most `count` more.
    async fn index_page(
        &self,
        name: &str,
        now_ms: u64,
        after: Option<&IndexEntry>,
        count: usize,
    ) -> Result<Vec<IndexEntry>, StoreError>;

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

    /// Admits one request of `client` against its limits, atomically across
    /// every replica, one round trip (see [`limits`]).
    async fn admit(
        &self,
        client: &str,
        ask: &limits::Ask<'_>,
    ) -> Result<limits::Verdict, StoreError>;

    /// Counts tokens answers reported against their clients.
    async fn settle(&self, settles: &[limits::Settle], now_ms: u64) -> Result<(), StoreError>;

    /// Releases leases whose requests ended and renews the ones still held
    /// until `until_ms`.
    async fn leases(
        &self,
        release: &[limits::Held],
        renew: &[limits::Held],
        until_ms: u64,
    ) -> Result<(), StoreError>;

    /// What `client` has used now, against every limit.
    async fn client_use(
        &self,
        client: &str,
        day: &str,
        now_ms: u64,
    ) -> Result<limits::ClientUse, StoreError>;
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
            MemberState::cooling(42, PER_MINUTE),
            MemberState::cooling(42, "per_day"),
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
            Some(MemberState::cooling(100, "per_minute")),
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
            Some(MemberState::cooling(900, "")),
            Some(MemberState::cooling(500, "per_day")),
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

    #[test]
    fn states_written_without_a_reason_still_decode() {
        assert_eq!(
            MemberState::decode("c:42"),
            Some(MemberState::cooling(42, PER_MINUTE))
        );
        assert_eq!(MemberState::cooling(42, PER_MINUTE).encode(), "c:42");
        assert_eq!(
            MemberState::decode("d:7:api_key_invalid"),
            Some(MemberState::Disabled {
                since_ms: 7,
                reason: "api_key_invalid".into()
            })
        );
    }

    #[test]
    fn a_model_cooldown_hides_the_key_for_that_model_only() {
        let mut states = HashMap::new();
        states.insert(
            state_field("k0", Some("gemini-2.5-pro")),
            MemberState::cooling(1_000, "per_day"),
        );
        assert!(effective_state(&states, "k0", Some("gemini-2.5-pro"), 10).is_some());
        assert_eq!(
            effective_state(&states, "k0", Some("gemini-2.5-flash"), 10),
            None
        );
        assert_eq!(effective_state(&states, "k0", None, 10), None);
        assert_eq!(
            effective_state(&states, "k0", Some("gemini-2.5-pro"), 1_000),
            None
        );
        states.insert(
            "k0".into(),
            MemberState::Disabled {
                since_ms: 1,
                reason: "api_key_invalid".into(),
            },
        );
        assert!(matches!(
            effective_state(&states, "k0", Some("gemini-2.5-flash"), 10),
            Some(MemberState::Disabled { .. })
        ));
    }

    mod rules {
        use super::super::*;
        use proptest::prelude::*;

        fn state() -> impl Strategy<Value = Option<MemberState>> {
            prop_oneof![
                Just(None),
                (0u64..100, prop_oneof![Just("per_minute"), Just("per_day")])
                    .prop_map(|(u, r)| Some(MemberState::cooling(u, r))),
                (0u64..100, prop_oneof![Just(ADMIN), Just("api_key_invalid")]).prop_map(
                    |(s, r)| Some(MemberState::Disabled {
                        since_ms: s,
                        reason: r.to_string()
                    })
                ),
            ]
        }

        fn event() -> impl Strategy<Value = Transition> {
            prop_oneof![
                (0u64..100).prop_map(|u| Transition::Cool {
                    until_ms: u,
                    reason: "per_minute".into()
                }),
                prop_oneof![Just(ADMIN), Just("api_key_leaked")].prop_map(|r| {
                    Transition::Disable {
                        reason: r.to_string(),
                    }
                }),
                Just(Transition::Enable),
                Just(Transition::Recovered),
                Just(Transition::Lift),
            ]
        }

        proptest! {
            #[test]
            fn a_disabled_key_leaves_disabled_only_by_enable_or_recovery(current in state(), e in event(), now in 0u64..100) {
                let after = apply(current.as_ref(), current.as_ref(), &e, now);
                if let Some(MemberState::Disabled { .. }) = &current {
                    let allowed = matches!(e, Transition::Enable)
                        || (matches!(e, Transition::Recovered) && !current.as_ref().is_some_and(MemberState::is_admin_disabled));
                    if !allowed {
                        prop_assert!(matches!(after, Some(MemberState::Disabled { .. })), "{current:?} --{e:?}--> {after:?}");
                    }
                }
            }

            #[test]
            fn an_admin_disable_survives_everything_but_an_admin_enable(since in 0u64..100, e in event(), now in 0u64..100) {
                let current = Some(MemberState::Disabled { since_ms: since, reason: ADMIN.into() });
                let after = apply(current.as_ref(), current.as_ref(), &e, now);
                if e == Transition::Enable {
                    prop_assert_eq!(after, None);
                } else {
                    prop_assert_eq!(after, current);
                }
            }

            #[test]
            fn of_two_cooldowns_the_later_end_wins(a in 0u64..100, b in 0u64..100) {
                let current = Some(MemberState::cooling(a, "per_minute"));
                let after = apply(current.as_ref(), current.as_ref(), &Transition::Cool { until_ms: b, reason: "per_day".into() }, 0);
                let ok = matches!(after, Some(MemberState::Cooling { until_ms, .. }) if until_ms == a.max(b));
                prop_assert!(ok, "{:?}", after);
            }

            #[test]
            fn a_model_cooldown_never_lands_on_a_disabled_key(key in state(), pair in state(), until in 0u64..100) {
                let after = apply(key.as_ref(), pair.as_ref(), &Transition::Cool { until_ms: until, reason: "per_day".into() }, 0);
                if matches!(key, Some(MemberState::Disabled { .. })) {
                    prop_assert_eq!(after, pair);
                }
            }
        }
    }
}
