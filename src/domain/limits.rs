//! Limits per client token, the same on every replica: each request is
//! admitted (or refused) by one atomic step in the shared store before it
//! costs anything upstream, answers' tokens are settled against their
//! client, and what a client holds open (requests in flight, Live sessions)
//! is a lease that this replica renews while it holds it, so a replica that
//! dies leaks no slot.
//!
//! A token with no limits (no `GB_LIMITS_FILE`, or no entry and no
//! `[clients.default]`) is not looked up in the store at all.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::settings::{ClientLimits, LimitSet};
use crate::state::limits::{
    Ask, ClientUse, Held, KeySettle, LeaseAsk, LeaseSet, Limit, Settle, Verdict,
};
use crate::state::{StateStore, StoreError};

/// How long a lease lives unless renewed: the replica heartbeat's lifetime.
pub const LEASE_LIFE: Duration = Duration::from_secs(20);

/// What an admission is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A request: counts against `rpm`, holds a `concurrent` slot until its
    /// answer is sent.
    Request,
    /// A Live session: counts against `rpm`, holds a `live_sessions` slot
    /// until it closes.
    Live,
}

/// Why a client's request is not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The client may not use this model (`models`).
    Model { model: String },
    /// A limit is reached: `used` of `allowed`; it frees up in `retry_ms`.
    Reached {
        limit: Limit,
        retry_ms: u64,
        used: u64,
        allowed: u64,
        /// Who the limit is set for: the client's label or `default`.
        client: String,
    },
}

impl Refusal {
    /// The limit's name, for metrics and the usage view.
    pub fn limit_name(&self) -> &'static str {
        match self {
            Refusal::Model { .. } => "models",
            Refusal::Reached { limit, .. } => limit.name(),
        }
    }
}

/// The limits in force for one request's client.
#[derive(Debug, Clone)]
pub struct Client {
    pub token_id: String,
    /// The entry of the limits file that applies: a label, a token id or
    /// `default`.
    pub entry: String,
    pub limits: Arc<ClientLimits>,
}

#[derive(Default)]
struct Pending {
    /// Tokens by client, and whether per minute too.
    settles: HashMap<String, (u64, bool)>,
    /// Tokens by (key id, model), for keys with a known `tpm`.
    key_settles: HashMap<(String, String), u64>,
    releases: Vec<Held>,
}

/// The limits in force and what this replica holds and owes the store.
pub struct Limiter {
    set: RwLock<Arc<LimitSet>>,
    replica: String,
    seq: AtomicU64,
    /// Token ids whose answers' tokens are counted (learnt at admission),
    /// and whether per minute too (`tpm`), not only per day.
    counted: RwLock<HashMap<String, bool>>,
    held: Mutex<HashSet<Held>>,
    pending: Mutex<Pending>,
    /// Wakes the task that writes what is pending.
    pub wake: tokio::sync::Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Limiter {
    pub fn new(set: LimitSet, replica: &str) -> Self {
        Self {
            set: RwLock::new(Arc::new(set)),
            replica: replica.to_string(),
            seq: AtomicU64::new(0),
            counted: RwLock::new(HashMap::new()),
            held: Mutex::new(HashSet::new()),
            pending: Mutex::new(Pending::default()),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// The limits in force.
    pub fn current(&self) -> Arc<LimitSet> {
        self.set
            .read()
            .map_or_else(|p| p.into_inner().clone(), |s| s.clone())
    }

    /// Puts a reloaded set in force, from the next request on.
    pub fn replace(&self, set: LimitSet) {
        match self.set.write() {
            Ok(mut s) => *s = Arc::new(set),
            Err(p) => *p.into_inner() = Arc::new(set),
        }
    }

    /// The limits of a client token, if it has any.
    pub fn client(&self, token_id: &str, label: impl FnOnce() -> Option<String>) -> Option<Client> {
        let set = self.current();
        if set.is_empty() {
            return None;
        }
        let label = label();
        set.of(token_id, label.as_deref())
            .map(|(entry, limits)| Client {
                token_id: token_id.to_string(),
                entry: entry.to_string(),
                limits,
            })
    }

    fn next_id(&self) -> String {
        format!(
            "{}-{}",
            self.replica,
            self.seq.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Admits one request of `client` for `model`, or says which limit it
    /// reached. A model the client may not use is refused before anything
    /// is counted. A store that cannot be asked admits (the outage is
    /// logged): limits are not worth refusing every request for.
    pub async fn admit(
        self: &Arc<Self>,
        store: &dyn StateStore,
        client: &Client,
        model: Option<&str>,
        kind: Kind,
        now_ms: u64,
    ) -> Result<Ticket, Refusal> {
        if let Some(model) = model {
            if !client.limits.allows(model) {
                return Err(Refusal::Model {
                    model: model.to_string(),
                });
            }
        }
        let limits = &client.limits;
        if limits.counts_tokens() && self.counts(&client.token_id) != Some(limits.tpm.is_some()) {
            if let Ok(mut counted) = self.counted.write() {
                counted.insert(client.token_id.clone(), limits.tpm.is_some());
            }
        }
        let (set, lease_limit) = match kind {
            Kind::Request => (LeaseSet::Concurrent, limits.concurrent),
            Kind::Live => (LeaseSet::Live, limits.live_sessions),
        };
        if limits.rpm.is_none() && !limits.counts_tokens() && lease_limit.is_none() {
            return Ok(Ticket::none());
        }
        let (day, day_ends_ms) = day_of(now_ms);
        let request_id = self.next_id();
        let lease_id = lease_limit.map(|_| self.next_id());
        let released = if lease_limit.is_some() {
            self.take_releases(&client.token_id, set)
        } else {
            Vec::new()
        };
        let ask = Ask {
            rpm: limits.rpm,
            tpm: limits.tpm,
            per_day: limits.tokens_per_day,
            day: &day,
            day_ends_ms,
            lease: lease_limit
                .zip(lease_id.as_deref())
                .map(|(limit, id)| LeaseAsk {
                    set,
                    limit,
                    id,
                    until_ms: now_ms + LEASE_LIFE.as_millis() as u64,
                }),
            request_id: &request_id,
            now_ms,
            released: &released,
        };
        let verdict = store.admit(&client.token_id, &ask).await;
        if verdict.is_err() && !released.is_empty() {
            let mut pending = lock(&self.pending);
            pending.releases.extend(released.into_iter().map(|id| Held {
                client: client.token_id.clone(),
                set,
                id,
            }));
        }
        match verdict {
            Ok(Verdict::Admitted) => {
                let held = lease_id.map(|id| Held {
                    client: client.token_id.clone(),
                    set,
                    id,
                });
                if let Some(h) = &held {
                    lock(&self.held).insert(h.clone());
                }
                Ok(Ticket {
                    limiter: held.as_ref().map(|_| self.clone()),
                    held,
                })
            }
            Ok(Verdict::Refused {
                limit,
                retry_ms,
                used,
                allowed,
            }) => Err(Refusal::Reached {
                limit,
                retry_ms,
                used,
                allowed,
                client: client.entry.clone(),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "client limits could not be checked; the request is admitted");
                Ok(Ticket::none())
            }
        }
    }

    /// Whether `token_id`'s tokens are counted: `Some(per minute too)`.
    fn counts(&self, token_id: &str) -> Option<bool> {
        self.counted
            .read()
            .ok()
            .and_then(|counted| counted.get(token_id).copied())
    }

    /// This replica's releases of `client`'s leases of `set` not written
    /// yet, taken to be written by the client's next admission.
    fn take_releases(&self, client: &str, set: LeaseSet) -> Vec<String> {
        let mut pending = lock(&self.pending);
        if pending.releases.is_empty() {
            return Vec::new();
        }
        let mut taken = Vec::new();
        pending.releases.retain(|h| {
            let mine = h.client == client && h.set == set;
            if mine {
                taken.push(h.id.clone());
            }
            !mine
        });
        taken
    }

    /// Tokens an answer reported for `token_id`: counted against its
    /// client's token limits, written with the next flush.
    pub fn settle(&self, token_id: &str, tokens: u64) {
        if tokens == 0 {
            return;
        }
        let Some(per_minute) = self.counts(token_id) else {
            return;
        };
        let mut pending = lock(&self.pending);
        let entry = pending
            .settles
            .entry(token_id.to_string())
            .or_insert((0, per_minute));
        entry.0 += tokens;
        drop(pending);
        self.wake.notify_one();
    }

    /// Tokens an answer reported for `key_id` and `model`: counted in the
    /// key's window when its known limits for the model count tokens.
    pub fn settle_key(&self, key_id: &str, model: &str, tokens: u64) {
        if tokens == 0 {
            return;
        }
        let set = self.current();
        if set.keys.is_empty() || set.keys.of(key_id, model).and_then(|l| l.tpm).is_none() {
            return;
        }
        *lock(&self.pending)
            .key_settles
            .entry((key_id.to_string(), model.to_string()))
            .or_insert(0) += tokens;
        self.wake.notify_one();
    }

    fn release(&self, held: Held) {
        lock(&self.held).remove(&held);
        lock(&self.pending).releases.push(held);
        self.wake.notify_one();
    }

    /// Writes the settled tokens and released leases gathered since the
    /// last flush, in one exchange. What could not be written is kept for
    /// the next one.
    pub async fn flush(&self, store: &dyn StateStore, now_ms: u64) -> Result<(), StoreError> {
        let Pending {
            settles,
            key_settles,
            releases,
        } = std::mem::take(&mut *lock(&self.pending));
        if settles.is_empty() && key_settles.is_empty() && releases.is_empty() {
            return Ok(());
        }
        let keys_settled = if key_settles.is_empty() {
            Ok(())
        } else {
            let list: Vec<KeySettle> = key_settles
                .into_iter()
                .map(|((member, model), tokens)| KeySettle {
                    member,
                    model,
                    tokens,
                })
                .collect();
            store
                .settle_keys(crate::domain::keys::RING, &list, now_ms)
                .await
        };
        let (day, _) = day_of(now_ms);
        let list: Vec<Settle> = settles
            .iter()
            .map(|(client, (tokens, per_minute))| Settle {
                client: client.clone(),
                tokens: *tokens,
                day: day.clone(),
                per_minute: *per_minute,
            })
            .collect();
        let settled = if list.is_empty() {
            Ok(())
        } else {
            store.settle(&list, now_ms).await
        };
        let released = if releases.is_empty() {
            Ok(())
        } else {
            store.leases(&releases, &[], now_ms).await
        };
        // Settles are counts: one that may have been written is not sent
        // again. Releases are safe to send again.
        if let Err(e) = &released {
            lock(&self.pending).releases.extend(releases);
            tracing::debug!(error = %e, "lease releases deferred");
        }
        settled.and(released).and(keys_settled)
    }

    /// Renews every lease this replica holds for another [`LEASE_LIFE`].
    pub async fn renew(&self, store: &dyn StateStore, now_ms: u64) -> Result<(), StoreError> {
        let held: Vec<Held> = lock(&self.held).iter().cloned().collect();
        if held.is_empty() {
            return Ok(());
        }
        store
            .leases(&[], &held, now_ms + LEASE_LIFE.as_millis() as u64)
            .await
    }

    /// What a client has used now.
    pub async fn usage(
        &self,
        store: &dyn StateStore,
        token_id: &str,
        now_ms: u64,
    ) -> Result<ClientUse, StoreError> {
        let (day, _) = day_of(now_ms);
        store.client_use(token_id, &day, now_ms).await
    }
}

/// The day of `now_ms` in Google's quota time zone (Pacific), and when it
/// ends: per-day key limits reset then.
pub fn pacific_day(now_ms: u64) -> (String, u64) {
    thread_local! {
        static CACHE: std::cell::RefCell<Option<(u64, u64, String)>> = const { std::cell::RefCell::new(None) };
    }
    CACHE.with(|cache| {
        if let Some((from, ends, date)) = &*cache.borrow() {
            if (*from..*ends).contains(&now_ms) {
                return (date.clone(), *ends);
            }
        }
        let ends = crate::upstream::outcome::next_pacific_midnight_ms(now_ms);
        let date = i64::try_from(now_ms)
            .ok()
            .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
            .and_then(|t| t.in_tz("America/Los_Angeles").ok())
            .map(|z| z.date().to_string())
            .unwrap_or_default();
        *cache.borrow_mut() = Some((now_ms, ends, date.clone()));
        (date, ends)
    })
}

/// The UTC calendar day of `now_ms` (`2026-12-03`) and when it ends.
pub fn day_of(now_ms: u64) -> (String, u64) {
    const DAY_MS: u64 = 86_400_000;
    thread_local! {
        static CACHE: std::cell::RefCell<Option<(u64, String)>> = const { std::cell::RefCell::new(None) };
    }
    let start = now_ms - now_ms % DAY_MS;
    CACHE.with(|cache| {
        if let Some((cached, date)) = &*cache.borrow() {
            if *cached == start {
                return (date.clone(), start + DAY_MS);
            }
        }
        let date = i64::try_from(start)
            .ok()
            .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
            .and_then(|t| t.in_tz("UTC").ok())
            .map(|z| z.date().to_string())
            .unwrap_or_default();
        *cache.borrow_mut() = Some((start, date.clone()));
        (date, start + DAY_MS)
    })
}

/// An admitted request's hold on its client's slot, released when dropped
/// (when the answer has been sent, or the Live session closed).
pub struct Ticket {
    limiter: Option<Arc<Limiter>>,
    held: Option<Held>,
}

impl Ticket {
    /// An admission that holds nothing.
    pub fn none() -> Self {
        Self {
            limiter: None,
            held: None,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let (Some(limiter), Some(held)) = (self.limiter.take(), self.held.take()) {
            limiter.release(held);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_utc_calendar_days() {
        // 2026-12-03T23:59:59.999Z
        let (day, ends) = day_of(1_796_342_399_999);
        assert_eq!(day, "2026-12-03");
        assert_eq!(ends, 1_796_342_400_000);
        assert_eq!(day_of(ends).0, "2026-12-04");
        assert_eq!(day_of(ends - 1).0, "2026-12-03", "a day already seen");
    }

    #[test]
    fn pacific_days_end_at_pacific_midnight() {
        // 2026-12-04T07:59:59.999Z is still 2026-12-03 in Los Angeles (PST).
        let (day, ends) = pacific_day(1_796_371_199_999);
        assert_eq!(day, "2026-12-03");
        assert_eq!(ends, 1_796_371_200_000);
        assert_eq!(pacific_day(ends).0, "2026-12-04");
        assert_eq!(pacific_day(ends - 1).0, "2026-12-03");
    }
}
