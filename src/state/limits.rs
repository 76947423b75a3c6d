//! Client limits as the store keeps them, for one client (a client token
//! id): a log of its requests in the last minute, its tokens per second in
//! the last minute, its tokens per calendar day, and the leases of what it
//! holds open (requests in flight, Live sessions).
//!
//! One admission is one atomic step: every limit is checked before any is
//! counted, so a refused request spends nothing. Requests per minute are a
//! sliding log, exact: at most `rpm` admissions in any 60 s, with no burst
//! at a window's edge. Tokens are known only from answers, so they are
//! checked before a request against what was settled, and settled after.
//!
//! [`Windows`] is the rule, applied in memory by the embedded store; the
//! Redis store runs the same rule as a script (`lua/admit.lua`).

use std::collections::{BTreeMap, HashMap, VecDeque};

/// How far back the per-minute limits look.
pub const MINUTE_MS: u64 = 60_000;

/// A limit a client can reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    Rpm,
    Tpm,
    TokensPerDay,
    Concurrent,
    LiveSessions,
}

impl Limit {
    pub const ALL: [Limit; 5] = [
        Limit::Rpm,
        Limit::Tpm,
        Limit::TokensPerDay,
        Limit::Concurrent,
        Limit::LiveSessions,
    ];

    /// The limit's name in the limits file, metrics and the admin API.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Rpm => "rpm",
            Limit::Tpm => "tpm",
            Limit::TokensPerDay => "tokens_per_day",
            Limit::Concurrent => "concurrent",
            Limit::LiveSessions => "live_sessions",
        }
    }

    /// The number the script answers with.
    pub fn code(self) -> u64 {
        match self {
            Limit::Rpm => 1,
            Limit::Tpm => 2,
            Limit::TokensPerDay => 3,
            Limit::Concurrent => 4,
            Limit::LiveSessions => 5,
        }
    }

    pub fn from_code(code: u64) -> Option<Limit> {
        Limit::ALL.into_iter().find(|l| l.code() == code)
    }
}

/// The two kinds of lease a client holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseSet {
    /// A request in flight, until its answer is sent.
    Concurrent,
    /// An open Live session.
    Live,
}

impl LeaseSet {
    pub fn name(self) -> &'static str {
        match self {
            LeaseSet::Concurrent => "concurrent",
            LeaseSet::Live => "live",
        }
    }

    pub fn limit(self) -> Limit {
        match self {
            LeaseSet::Concurrent => Limit::Concurrent,
            LeaseSet::Live => Limit::LiveSessions,
        }
    }
}

/// A lease an admission takes when its set has room.
#[derive(Debug, Clone)]
pub struct LeaseAsk<'a> {
    pub set: LeaseSet,
    pub limit: u64,
    /// Unique among the client's leases.
    pub id: &'a str,
    /// When the lease lapses unless renewed (Unix ms): a replica renews
    /// what it holds on every heartbeat, so a dead replica's leases lapse.
    pub until_ms: u64,
}

/// One admission: the limits in force for the client (`None`: no limit).
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub per_day: Option<u64>,
    /// The calendar day (UTC) tokens per day are counted in, and when it ends.
    pub day: &'a str,
    pub day_ends_ms: u64,
    pub lease: Option<LeaseAsk<'a>>,
    /// Unique among the client's requests: its entry in the request log.
    pub request_id: &'a str,
    pub now_ms: u64,
    /// Leases of the asked set this replica released and has not written
    /// yet: removed before the slots are counted, so a client's next request
    /// right after an answer finds its slot free.
    pub released: &'a [String],
}

/// What an admission decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Admitted,
    /// `limit` is reached: `used` of `allowed`; it frees up in `retry_ms`.
    Refused {
        limit: Limit,
        retry_ms: u64,
        used: u64,
        allowed: u64,
    },
}

/// Tokens an answer reported, counted against its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settle {
    pub client: String,
    pub tokens: u64,
    pub day: String,
    /// Whether the client has a per-minute token limit (else only the
    /// day's count is kept).
    pub per_minute: bool,
}

/// A lease a replica holds, to renew or release.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Held {
    pub client: String,
    pub set: LeaseSet,
    pub id: String,
}

/// What a client has used, as the admin API shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClientUse {
    pub requests_last_minute: u64,
    /// When the oldest request of the last minute leaves the window (Unix ms).
    pub requests_free_at_ms: Option<u64>,
    pub tokens_last_minute: u64,
    pub tokens_today: u64,
    pub concurrent: u64,
    pub live_sessions: u64,
}

/// One client's windows, kept in memory by the embedded store.
#[derive(Debug, Default)]
pub struct Windows {
    requests: VecDeque<u64>,
    /// Tokens by second (Unix s).
    tokens: BTreeMap<u64, u64>,
    days: BTreeMap<String, u64>,
    leases: HashMap<LeaseSet, HashMap<String, u64>>,
}

impl Windows {
    fn prune(&mut self, now_ms: u64) {
        while self
            .requests
            .front()
            .is_some_and(|&t| t + MINUTE_MS <= now_ms)
        {
            self.requests.pop_front();
        }
        let first_second = (now_ms / 1000).saturating_sub(59);
        self.tokens = self.tokens.split_off(&first_second);
        for leases in self.leases.values_mut() {
            leases.retain(|_, until| *until > now_ms);
        }
    }

    /// Checks every limit, then counts the request and takes the lease.
    pub fn admit(&mut self, ask: &Ask<'_>) -> Verdict {
        let now = ask.now_ms;
        self.prune(now);
        if let Some(allowed) = ask.per_day {
            let used = self.days.get(ask.day).copied().unwrap_or(0);
            if used >= allowed {
                return Verdict::Refused {
                    limit: Limit::TokensPerDay,
                    retry_ms: ask.day_ends_ms.saturating_sub(now),
                    used,
                    allowed,
                };
            }
        }
        if let Some(allowed) = ask.tpm {
            let used: u64 = self.tokens.values().sum();
            if used >= allowed {
                let oldest = self.tokens.keys().next().copied().unwrap_or(now / 1000);
                return Verdict::Refused {
                    limit: Limit::Tpm,
                    // At most a minute: tokens settled by a replica whose
                    // clock ran ahead (or whose settle came after this
                    // admission was timed) still free within one.
                    retry_ms: ((oldest + 60) * 1000).saturating_sub(now).min(MINUTE_MS),
                    used,
                    allowed,
                };
            }
        }
        if let Some(lease) = &ask.lease {
            for id in ask.released {
                self.release(lease.set, id);
            }
            let held = self.leases.get(&lease.set).map_or(0, HashMap::len) as u64;
            if held >= lease.limit {
                return Verdict::Refused {
                    limit: lease.set.limit(),
                    retry_ms: 1000,
                    used: held,
                    allowed: lease.limit,
                };
            }
        }
        if let Some(allowed) = ask.rpm {
            let used = self.requests.len() as u64;
            if used >= allowed {
                let oldest = self.requests.front().copied().unwrap_or(now);
                return Verdict::Refused {
                    limit: Limit::Rpm,
                    retry_ms: (oldest + MINUTE_MS).saturating_sub(now),
                    used,
                    allowed,
                };
            }
            self.requests.push_back(now);
        }
        if let Some(lease) = &ask.lease {
            self.leases
                .entry(lease.set)
                .or_default()
                .insert(lease.id.to_string(), lease.until_ms);
        }
        Verdict::Admitted
    }

    pub fn settle(&mut self, tokens: u64, day: &str, per_minute: bool, now_ms: u64) {
        if per_minute {
            *self.tokens.entry(now_ms / 1000).or_insert(0) += tokens;
        }
        *self.days.entry(day.to_string()).or_insert(0) += tokens;
        // Only today's and yesterday's counts can still be asked for.
        while self.days.len() > 2 {
            self.days.pop_first();
        }
    }

    pub fn release(&mut self, set: LeaseSet, id: &str) {
        if let Some(leases) = self.leases.get_mut(&set) {
            leases.remove(id);
        }
    }

    /// Renews a lease, or puts it back if it lapsed meanwhile (the store
    /// was unreachable for longer than a lease lives): its request is still
    /// in flight.
    pub fn renew(&mut self, set: LeaseSet, id: &str, until_ms: u64) {
        self.leases
            .entry(set)
            .or_default()
            .insert(id.to_string(), until_ms);
    }

    pub fn usage(&mut self, day: &str, now_ms: u64) -> ClientUse {
        self.prune(now_ms);
        ClientUse {
            requests_last_minute: self.requests.len() as u64,
            requests_free_at_ms: self.requests.front().map(|t| t + MINUTE_MS),
            tokens_last_minute: self.tokens.values().sum(),
            tokens_today: self.days.get(day).copied().unwrap_or(0),
            concurrent: self
                .leases
                .get(&LeaseSet::Concurrent)
                .map_or(0, HashMap::len) as u64,
            live_sessions: self.leases.get(&LeaseSet::Live).map_or(0, HashMap::len) as u64,
        }
    }

    /// Whether nothing is left to remember.
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
            && self.tokens.is_empty()
            && self.days.is_empty()
            && self.leases.values().all(HashMap::is_empty)
    }
}

/// One key's published limits for one model (`0`: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyWindow {
    pub rpm: u64,
    pub tpm: u64,
    /// Requests per day, the day ending at `WindowAsk::day_ends_ms`.
    pub rpd: u64,
}

impl KeyWindow {
    pub fn is_none(&self) -> bool {
        self.rpm == 0 && self.tpm == 0 && self.rpd == 0
    }
}

/// A rotation that keeps every key within its windows for `model`.
#[derive(Debug, Clone)]
pub struct WindowAsk<'a> {
    pub model: &'a str,
    /// The day requests per day are counted in (Google's: Pacific time),
    /// and when it ends.
    pub day: &'a str,
    pub day_ends_ms: u64,
    /// Unique among the requests of the minute.
    pub request_id: &'a str,
}

/// How much longer than a minute a key's request stays in its window: the
/// upstream counts a request when it arrives, a moment after the gateway
/// admitted it, and its clock is not ours.
pub const WINDOW_MARGIN_MS: u64 = 1_000;

/// One key's use of one model, kept in memory by the embedded store.
#[derive(Debug, Default)]
pub struct KeyUse {
    requests: VecDeque<u64>,
    tokens: BTreeMap<u64, u64>,
    day: (String, u64),
}

impl KeyUse {
    /// Forgets what left the window, and a day that ended.
    fn prune(&mut self, ask: &WindowAsk<'_>, now_ms: u64) {
        let span = MINUTE_MS + WINDOW_MARGIN_MS;
        while self.requests.front().is_some_and(|&t| t + span <= now_ms) {
            self.requests.pop_front();
        }
        self.tokens = self.tokens.split_off(&(now_ms / 1000).saturating_sub(59));
        if self.day.0 != ask.day {
            self.day = (ask.day.to_string(), 0);
        }
    }

    /// When the key's window frees up, if it is full now.
    pub fn full_until(&mut self, w: &KeyWindow, ask: &WindowAsk<'_>, now_ms: u64) -> Option<u64> {
        self.prune(ask, now_ms);
        let span = MINUTE_MS + WINDOW_MARGIN_MS;
        if w.rpd > 0 && self.day.1 >= w.rpd {
            return Some(ask.day_ends_ms);
        }
        if w.rpm > 0 && self.requests.len() as u64 >= w.rpm {
            return self.requests.front().map(|t| t + span);
        }
        if w.tpm > 0 && self.tokens.values().sum::<u64>() >= w.tpm {
            return self.tokens.keys().next().map(|s| (s + 60) * 1000);
        }
        None
    }

    /// Counts one request sent on the key.
    pub fn spend(&mut self, w: &KeyWindow, now_ms: u64) {
        if w.rpm > 0 {
            self.requests.push_back(now_ms);
        }
        if w.rpd > 0 {
            self.day.1 += 1;
        }
    }

    pub fn settle(&mut self, tokens: u64, now_ms: u64) {
        *self.tokens.entry(now_ms / 1000).or_insert(0) += tokens;
    }

    /// Requests of the last minute, tokens of the last minute, requests of
    /// the day.
    pub fn usage(&mut self, ask: &WindowAsk<'_>, now_ms: u64) -> (u64, u64, u64) {
        self.prune(ask, now_ms);
        (
            self.requests.len() as u64,
            self.tokens.values().sum(),
            self.day.1,
        )
    }
}

/// Tokens an answer reported, counted against the key that served it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySettle {
    pub member: String,
    pub model: String,
    pub tokens: u64,
}

/// One key's use of one model, as the admin API shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct KeyWindowUse {
    pub requests_last_minute: u64,
    pub tokens_last_minute: u64,
    pub requests_today: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(now_ms: u64, rpm: Option<u64>) -> Ask<'static> {
        Ask {
            rpm,
            tpm: None,
            per_day: None,
            day: "2026-12-03",
            day_ends_ms: 86_400_000,
            lease: None,
            request_id: "r",
            now_ms,
            released: &[],
        }
    }

    #[test]
    fn requests_per_minute_slide_without_a_burst_at_the_edge() {
        let mut w = Windows::default();
        for i in 0..3 {
            assert_eq!(w.admit(&ask(1_000 + i, Some(3))), Verdict::Admitted);
        }
        assert_eq!(
            w.admit(&ask(59_000, Some(3))),
            Verdict::Refused {
                limit: Limit::Rpm,
                retry_ms: 2_000,
                used: 3,
                allowed: 3
            }
        );
        // The first request leaves the window 60 s after it was admitted.
        assert_eq!(w.admit(&ask(61_000, Some(3))), Verdict::Admitted);
        assert!(matches!(
            w.admit(&ask(61_000, Some(3))),
            Verdict::Refused { .. }
        ));
    }

    #[test]
    fn a_refused_request_spends_nothing() {
        let mut w = Windows::default();
        let lease = |id: &'static str| LeaseAsk {
            set: LeaseSet::Concurrent,
            limit: 1,
            id,
            until_ms: 30_000,
        };
        let mut a = ask(1_000, Some(5));
        a.lease = Some(lease("a"));
        assert_eq!(w.admit(&a), Verdict::Admitted);
        let mut b = ask(1_001, Some(5));
        b.lease = Some(lease("b"));
        assert!(matches!(
            w.admit(&b),
            Verdict::Refused {
                limit: Limit::Concurrent,
                ..
            }
        ));
        assert_eq!(w.usage("2026-12-03", 1_002).requests_last_minute, 1);
        w.release(LeaseSet::Concurrent, "a");
        assert_eq!(w.admit(&b), Verdict::Admitted);
    }

    #[test]
    fn leases_lapse_unless_renewed_and_a_renewal_puts_a_lapsed_one_back() {
        let mut w = Windows::default();
        let mut a = ask(1_000, None);
        a.lease = Some(LeaseAsk {
            set: LeaseSet::Live,
            limit: 1,
            id: "a",
            until_ms: 21_000,
        });
        assert_eq!(w.admit(&a), Verdict::Admitted);
        w.renew(LeaseSet::Live, "a", 41_000);
        assert_eq!(w.usage("d", 30_000).live_sessions, 1);
        assert_eq!(w.usage("d", 41_000).live_sessions, 0);
        w.renew(LeaseSet::Live, "a", 61_000);
        assert_eq!(w.usage("d", 42_000).live_sessions, 1);
    }

    #[test]
    fn a_release_not_yet_written_frees_the_slot_for_the_next_request() {
        let mut w = Windows::default();
        let lease = |id: &'static str| LeaseAsk {
            set: LeaseSet::Concurrent,
            limit: 1,
            id,
            until_ms: 30_000,
        };
        let mut a = ask(1_000, None);
        a.lease = Some(lease("a"));
        assert_eq!(w.admit(&a), Verdict::Admitted);
        let released = ["a".to_string()];
        let mut b = ask(1_001, None);
        b.lease = Some(lease("b"));
        b.released = &released;
        assert_eq!(w.admit(&b), Verdict::Admitted);
    }

    #[test]
    fn tokens_are_checked_against_what_was_settled() {
        let mut w = Windows::default();
        let mut a = ask(10_000, None);
        a.tpm = Some(100);
        a.per_day = Some(1_000);
        assert_eq!(w.admit(&a), Verdict::Admitted);
        w.settle(100, "2026-12-03", true, 10_500);
        a.now_ms = 30_000;
        assert_eq!(
            w.admit(&a),
            Verdict::Refused {
                limit: Limit::Tpm,
                retry_ms: 40_000,
                used: 100,
                allowed: 100
            }
        );
        a.now_ms = 70_000;
        assert_eq!(w.admit(&a), Verdict::Admitted);
        w.settle(950, "2026-12-03", true, 70_000);
        a.now_ms = 200_000;
        assert!(matches!(
            w.admit(&a),
            Verdict::Refused {
                limit: Limit::TokensPerDay,
                used: 1_050,
                ..
            }
        ));
    }
}
