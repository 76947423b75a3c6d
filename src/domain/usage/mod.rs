//! Usage an operator can see: requests, errors and Google's token counts per
//! hour × client token id × key id × model, and the last upstream errors.
//!
//! Like [`crate::domain::stats`], counts are added up in process memory on the
//! request path and flushed to the shared store with the heartbeat, so the
//! request path pays no store round trip and the sum over replicas is exact
//! (each replica adds only its own counts, with `HINCRBY`).
//!
//! Series are bounded: a replica records at most `GB_USAGE_MAX_SERIES`
//! distinct series per hour; past that, new series count under model
//! `other` and the overflow is counted (metric and API). Buckets expire
//! after `GB_USAGE_RETENTION_DAYS`, and reads never reach further back.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};

use crate::ops::metrics::{model_label, Metrics, ModelKind, ModelOutcome, TokenKind};
use crate::state::{now_ms, StateStore, StoreError};
use crate::{FastMap, FastSet};

pub mod meter;
// The scanner sits with the other byte scanners, in `domain::scan`.
pub use crate::domain::scan::usage as scan;

pub use scan::Tokens;

pub const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;
/// Recent upstream errors kept across the cluster.
pub const RECENT_ERRORS: usize = 200;
const ERRORS_INDEX: &str = crate::state::keyspace::index::USAGE_ERRORS;
const OVERFLOW: &str = "~overflow";
const SEP: char = '|';

fn bucket(hour: u64) -> String {
    crate::state::keyspace::bucket::usage(hour)
}

/// A model name as a series part: bounded and free of separators (a client
/// writes the model into its request).
pub fn clean_model(model: Option<&str>) -> String {
    let mut out = String::new();
    push_clean_model(&mut out, model);
    out
}

/// [`clean_model`], written onto `out` (no allocation of its own).
fn push_clean_model(out: &mut String, model: Option<&str>) {
    match model {
        None => out.push('-'),
        Some(m) => out.extend(m.chars().take(64).map(|c| {
            if c.is_ascii_alphanumeric() || "-._".contains(c) {
                c
            } else {
                '_'
            }
        })),
    }
}

/// Who used what: one series of the counters.
#[derive(Debug, Clone)]
pub struct Series {
    pub token_id: String,
    pub key_id: String,
    pub model: Option<String>,
}

/// One upstream error answer, as the status page lists it. Holds no body,
/// key, token or query: only ids and Google's enum values.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorEntry {
    pub time_ms: u64,
    pub key_id: String,
    pub model: String,
    pub route: String,
    pub status: u16,
    /// Google's `error.status` (`RESOURCE_EXHAUSTED`, …).
    pub google_status: Option<String>,
    /// Google's `ErrorInfo.reason` (`API_KEY_INVALID`, …), or what cut a
    /// stream (`stream_cut`, `stream_stalled`).
    pub reason: Option<String>,
    /// Google's `RetryInfo.retryDelay`, in seconds.
    pub retry_delay_s: Option<f64>,
    /// Makes entries of one millisecond distinct in the shared index.
    #[serde(default)]
    pub n: String,
}

/// An enum value from an error body: letters, digits and `_` only, so no
/// free text (which could quote a request) is ever kept.
fn enum_value(v: Option<&serde_json::Value>) -> Option<String> {
    let s = v?.as_str()?;
    (!s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .then(|| s.to_string())
}

/// Google's `status`, `ErrorInfo.reason` and `RetryInfo.retryDelay` of an
/// error body (Gemini-shaped, or an array of one as the OpenAI-compatible
/// routes sometimes answer).
pub fn error_facts(body: &[u8]) -> (Option<String>, Option<String>, Option<f64>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (None, None, None);
    };
    let v = match &v {
        serde_json::Value::Array(items) => items.first().cloned().unwrap_or_default(),
        _ => v,
    };
    let err = &v["error"];
    let details = err["details"].as_array().cloned().unwrap_or_default();
    let reason = details.iter().find_map(|d| enum_value(d.get("reason")));
    let delay = details.iter().find_map(|d| {
        d.get("retryDelay")
            .and_then(|r| r.as_str())
            .and_then(|r| r.strip_suffix('s'))
            .and_then(|r| r.parse::<f64>().ok())
            .filter(|r| r.is_finite() && *r >= 0.0)
    });
    (enum_value(err.get("status")), reason, delay)
}

#[derive(Default)]
struct Inner {
    /// hour → field → count, not yet flushed.
    pending: HashMap<u64, FastMap<String, u64>>,
    seen_hour: u64,
    seen: FastSet<String>,
    errors: Vec<ErrorEntry>,
    /// The buffer field names are built in.
    scratch: String,
}

pub struct Usage {
    retention_days: u64,
    max_series: usize,
    metrics: Arc<Metrics>,
    replica: String,
    seq: AtomicU64,
    inner: Mutex<Inner>,
    /// Where counted tokens also go: the client limits they count against.
    limits: Option<Arc<crate::domain::limits::Limiter>>,
    /// Each client token's `gb_client_tokens_total` counters, one per kind
    /// of [`Tokens::by_kind`], kept so that counting looks a token up by
    /// its id instead of building a label set (and its id's copy) per kind.
    client_counters: Mutex<FastMap<String, [Option<Counter>; 5]>>,
}

impl Usage {
    pub fn new(
        retention_days: u64,
        max_series: usize,
        metrics: Arc<Metrics>,
        replica: String,
    ) -> Self {
        Self {
            retention_days,
            max_series,
            metrics,
            replica,
            seq: AtomicU64::new(0),
            inner: Mutex::new(Inner::default()),
            limits: None,
            client_counters: Mutex::default(),
        }
    }

    /// Counted tokens are also settled against their client's limits.
    #[must_use]
    pub fn settling(mut self, limits: Arc<crate::domain::limits::Limiter>) -> Self {
        self.limits = Some(limits);
        self
    }

    pub fn retention(&self) -> Duration {
        Duration::from_millis(self.retention_days * DAY_MS)
    }

    /// A successful answer and the tokens Google reported for it.
    pub fn success(&self, series: &Series, tokens: Option<&Tokens>, now_ms: u64) {
        self.by_model(model_label(series.model.as_deref()), "success");
        self.count(series, 1, tokens, now_ms);
    }

    /// Tokens Google reported without a request of their own (the turns of
    /// a Live session, which counted as one request when it opened).
    pub fn add_tokens(&self, series: &Series, tokens: &Tokens, now_ms: u64) {
        self.count(series, 0, Some(tokens), now_ms);
    }

    fn count_client_tokens(&self, token_id: &str, by_kind: &[(&'static str, u64); 5]) {
        let mut kept = self
            .client_counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !kept.contains_key(token_id) {
            kept.insert(token_id.to_string(), Default::default());
        }
        let Some(counters) = kept.get_mut(token_id) else {
            return;
        };
        for (slot, (kind, n)) in counters.iter_mut().zip(by_kind) {
            if *n == 0 {
                continue;
            }
            // A series appears once its kind is first counted, as before.
            slot.get_or_insert_with(|| {
                self.metrics
                    .client_tokens
                    .get_or_create(&TokenKind {
                        token_id: token_id.to_string(),
                        kind,
                    })
                    .clone()
            })
            .inc_by(*n);
        }
    }

    fn count(&self, series: &Series, requests: u64, tokens: Option<&Tokens>, now_ms: u64) {
        let model = model_label(series.model.as_deref());
        if let (Some(limits), Some(t)) = (&self.limits, tokens) {
            limits.settle(&series.token_id, t.total);
            if let Some(model) = &series.model {
                limits.settle_key(&series.key_id, model, t.total);
            }
        }
        let by_kind = tokens.map(Tokens::by_kind).unwrap_or_default();
        for (kind, n) in by_kind {
            if n > 0 {
                self.metrics
                    .tokens
                    .get_or_create(&ModelKind { model, kind })
                    .inc_by(n);
            }
        }
        if by_kind.iter().any(|(_, n)| *n > 0) {
            self.count_client_tokens(&series.token_id, &by_kind);
        }
        self.add(series, now_ms, |add| {
            if requests > 0 {
                add("requests", requests);
            }
            for (kind, n) in by_kind {
                if n > 0 {
                    add(kind, n);
                }
            }
        });
    }

    /// An upstream error answer (or a stream cut mid-way), with what the
    /// recent-errors list keeps of it.
    pub fn failure(&self, series: &Series, outcome: &'static str, entry: ErrorEntry) {
        self.by_model(model_label(series.model.as_deref()), outcome);
        let now = entry.time_ms;
        self.add(series, now, |add| {
            add("requests", 1);
            add(&format!("err:{outcome}"), 1);
        });
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let entry = ErrorEntry {
            n: format!("{}-{n}", self.replica),
            ..entry
        };
        if let Ok(mut inner) = self.inner.lock() {
            if inner.errors.len() >= RECENT_ERRORS {
                inner.errors.remove(0);
            }
            inner.errors.push(entry);
        }
    }

    fn by_model(&self, model: &'static str, outcome: &'static str) {
        self.metrics
            .requests_by_model
            .get_or_create(&ModelOutcome { model, outcome })
            .inc();
    }

    fn add(&self, series: &Series, now_ms: u64, f: impl FnOnce(&mut dyn FnMut(&str, u64))) {
        let hour = now_ms / HOUR_MS;
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if inner.seen_hour != hour {
            inner.seen_hour = hour;
            inner.seen.clear();
        }
        // Field names are built in one reused buffer; a String is allocated
        // only for a field not seen yet this hour.
        let mut field = std::mem::take(&mut inner.scratch);
        field.clear();
        let _ = write!(field, "{}{SEP}{}{SEP}", series.token_id, series.key_id);
        push_clean_model(&mut field, series.model.as_deref());
        let mut overflow = 0;
        if !inner.seen.contains(field.as_str()) {
            if inner.seen.len() >= self.max_series {
                field.clear();
                let _ = write!(field, "{}{SEP}{}{SEP}other", series.token_id, series.key_id);
                overflow = 1;
                self.metrics.usage_series_overflow.inc();
            } else {
                inner.seen.insert(field.clone());
            }
        }
        let prefix_len = field.len();
        let counts = inner.pending.entry(hour).or_default();
        if overflow > 0 {
            *counts.entry(OVERFLOW.to_string()).or_insert(0) += overflow;
        }
        f(&mut |name, n| {
            field.truncate(prefix_len);
            field.push(SEP);
            field.push_str(name);
            match counts.get_mut(field.as_str()) {
                Some(count) => *count += n,
                None => {
                    counts.insert(field.clone(), n);
                }
            }
        });
        inner.scratch = field;
    }

    /// Moves pending counts and errors to the store (what fails stays
    /// pending for the next flush).
    pub async fn flush(&self, store: &dyn StateStore) -> Result<(), StoreError> {
        self.flush_at(store, now_ms()).await
    }

    pub async fn flush_at(&self, store: &dyn StateStore, now_ms: u64) -> Result<(), StoreError> {
        let (pending, errors) = match self.inner.lock() {
            Ok(mut inner) => (
                std::mem::take(&mut inner.pending),
                std::mem::take(&mut inner.errors),
            ),
            Err(_) => return Ok(()),
        };
        let ttl = self.retention() + Duration::from_millis(2 * HOUR_MS);
        let mut failed: Option<StoreError> = None;
        let mut keep: HashMap<u64, FastMap<String, u64>> = HashMap::new();
        for (hour, counts) in pending {
            if failed.is_some() {
                keep.insert(hour, counts);
                continue;
            }
            let batch: Vec<(String, u64)> = counts.iter().map(|(k, n)| (k.clone(), *n)).collect();
            if let Err(e) = store.add_counts(&bucket(hour), &batch, ttl).await {
                failed = Some(e);
                keep.insert(hour, counts);
            }
        }
        let mut unsent = Vec::new();
        if failed.is_none() && !errors.is_empty() {
            for (i, entry) in errors.iter().enumerate() {
                let Ok(json) = serde_json::to_string(entry) else {
                    continue;
                };
                let expires = entry
                    .time_ms
                    .saturating_add(self.retention().as_millis() as u64);
                let ttl = Duration::from_millis(expires.saturating_sub(now_ms).max(1));
                if let Err(e) = store.index_add(ERRORS_INDEX, &json, ttl, now_ms).await {
                    failed = Some(e);
                    unsent = errors[i..].to_vec();
                    break;
                }
            }
            if failed.is_none() {
                if let Ok(members) = store.index_members(ERRORS_INDEX, now_ms).await {
                    for old in members.iter().skip(RECENT_ERRORS) {
                        let _ = store.index_remove(ERRORS_INDEX, old).await;
                    }
                }
            }
        } else if failed.is_some() {
            unsent = errors;
        }
        if !keep.is_empty() || !unsent.is_empty() {
            if let Ok(mut inner) = self.inner.lock() {
                for (hour, counts) in keep {
                    let into = inner.pending.entry(hour).or_default();
                    for (k, n) in counts {
                        *into.entry(k).or_insert(0) += n;
                    }
                }
                unsent.append(&mut inner.errors);
                let extra = unsent.len().saturating_sub(RECENT_ERRORS);
                unsent.drain(..extra);
                inner.errors = unsent;
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The last upstream errors of every replica, newest first.
    pub async fn recent_errors(
        &self,
        store: &dyn StateStore,
    ) -> Result<Vec<ErrorEntry>, StoreError> {
        let mut all: Vec<ErrorEntry> = store
            .index_members(ERRORS_INDEX, now_ms())
            .await?
            .iter()
            .filter_map(|m| serde_json::from_str(m).ok())
            .collect();
        all.sort_by(|a, b| b.time_ms.cmp(&a.time_ms).then_with(|| b.n.cmp(&a.n)));
        all.truncate(RECENT_ERRORS);
        Ok(all)
    }

    /// Every replica's flushed counts for the hours from `from_ms` to
    /// `to_ms` (both included), never older than the retention allows at
    /// `now_ms`.
    pub async fn read(
        &self,
        store: &dyn StateStore,
        from_ms: u64,
        to_ms: u64,
        now_ms: u64,
    ) -> Result<Counts, StoreError> {
        let oldest = now_ms.saturating_sub(self.retention().as_millis() as u64) / HOUR_MS + 1;
        let first = (from_ms / HOUR_MS).max(oldest);
        let last = (to_ms.min(now_ms) / HOUR_MS).min(first + self.retention_days * 24);
        let mut counts = Counts::default();
        for hour in first..=last {
            let raw = store.read_counts(&[bucket(hour)]).await?;
            for (field, n) in raw {
                if field == OVERFLOW {
                    counts.overflow += n;
                    continue;
                }
                let mut parts = field.splitn(4, SEP);
                let (Some(token), Some(key), Some(model), Some(name)) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                let cell = counts
                    .cells
                    .entry((hour, token.to_string(), key.to_string(), model.to_string()))
                    .or_default();
                match name {
                    "requests" => cell.requests += n,
                    "prompt" => cell.tokens.prompt += n,
                    "output" => cell.tokens.output += n,
                    "thoughts" => cell.tokens.thoughts += n,
                    "cached" => cell.tokens.cached += n,
                    "total" => cell.tokens.total += n,
                    other => {
                        if let Some(outcome) = other.strip_prefix("err:") {
                            cell.errors += n;
                            *cell
                                .errors_by_outcome
                                .entry(outcome.to_string())
                                .or_insert(0) += n;
                        }
                    }
                }
            }
        }
        counts.from_hour = first;
        counts.to_hour = last;
        Ok(counts)
    }
}

/// The counters of one series in one hour.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Cell {
    pub requests: u64,
    pub errors: u64,
    pub errors_by_outcome: BTreeMap<String, u64>,
    pub tokens: Tokens,
}

impl Cell {
    fn add(&mut self, other: &Cell) {
        self.requests += other.requests;
        self.errors += other.errors;
        for (k, n) in &other.errors_by_outcome {
            *self.errors_by_outcome.entry(k.clone()).or_insert(0) += n;
        }
        self.tokens.prompt += other.tokens.prompt;
        self.tokens.output += other.tokens.output;
        self.tokens.thoughts += other.tokens.thoughts;
        self.tokens.cached += other.tokens.cached;
        self.tokens.total += other.tokens.total;
    }
}

/// Counts read back: (hour, token id, key id, model) → cell.
#[derive(Debug, Default)]
pub struct Counts {
    pub cells: BTreeMap<(u64, String, String, String), Cell>,
    /// Series counted under `other` because a replica's limit was reached.
    pub overflow: u64,
    pub from_hour: u64,
    pub to_hour: u64,
}

/// What the rows of a usage answer are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum By {
    Model,
    Key,
    Token,
    Hour,
}

impl By {
    pub fn parse(s: &str) -> Option<By> {
        match s {
            "model" => Some(By::Model),
            "key" => Some(By::Key),
            "token" => Some(By::Token),
            "hour" => Some(By::Hour),
            _ => None,
        }
    }
}

impl Counts {
    /// Cells summed by one or more dimensions, in order.
    pub fn group(&self, by: &[By]) -> Vec<(Vec<String>, Cell)> {
        let mut out: BTreeMap<Vec<String>, Cell> = BTreeMap::new();
        for ((hour, token, key, model), cell) in &self.cells {
            let k: Vec<String> = by
                .iter()
                .map(|b| match b {
                    By::Model => model.clone(),
                    By::Key => key.clone(),
                    By::Token => token.clone(),
                    By::Hour => format!("{hour:012}"),
                })
                .collect();
            out.entry(k).or_default().add(cell);
        }
        out.into_iter().collect()
    }

    pub fn total(&self) -> Cell {
        let mut c = Cell::default();
        for cell in self.cells.values() {
            c.add(cell);
        }
        c
    }
}

/// Records an upstream error answer to a request of `series` on `route`
/// (`body`: the error body as read, bounded; only Google's enum values are
/// kept of it).
pub fn record_error(
    usage: &Usage,
    series: &Series,
    route: &str,
    status: u16,
    body: &[u8],
    outcome: &'static str,
) {
    let (google_status, reason, retry_delay_s) = error_facts(body);
    usage.failure(
        series,
        outcome,
        ErrorEntry {
            time_ms: now_ms(),
            key_id: series.key_id.clone(),
            model: clean_model(series.model.as_deref()),
            route: route.to_string(),
            status,
            google_status,
            reason,
            retry_delay_s,
            n: String::new(),
        },
    );
}

/// The hour (Unix ms of its start) of a grouped hour value.
pub fn hour_ms(grouped: &str) -> u64 {
    grouped.parse::<u64>().unwrap_or(0) * HOUR_MS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::MemoryStore;

    fn usage(days: u64, max: usize) -> Usage {
        Usage::new(days, max, Arc::new(Metrics::new()), "r1".into())
    }

    fn series(model: &str) -> Series {
        Series {
            token_id: "tok".into(),
            key_id: "key".into(),
            model: Some(model.into()),
        }
    }

    const T0: u64 = 1_800_000_000_000;

    fn tokens() -> Tokens {
        Tokens {
            prompt: 11,
            output: 7,
            thoughts: 3,
            cached: 2,
            total: 21,
        }
    }

    #[tokio::test]
    async fn counts_are_kept_for_the_retention_and_no_longer() {
        let store = MemoryStore::new();
        let u = usage(7, 100);
        u.success(&series("gemini-2.5-flash"), Some(&tokens()), T0);
        u.flush_at(&store, T0).await.unwrap();
        let at = |days: u64| T0 + days * DAY_MS;
        let read = |now: u64| {
            let u = &u;
            let store = &store;
            async move { u.read(store, T0 - HOUR_MS, now, now).await.unwrap() }
        };
        assert_eq!(read(T0).await.total().tokens, tokens());
        assert_eq!(read(at(6)).await.total().requests, 1);
        let late = read(at(8)).await;
        assert_eq!(late.total(), Cell::default());
        assert!(late.from_hour > T0 / HOUR_MS);
        // A shorter retention forgets sooner.
        let short = usage(1, 100);
        assert_eq!(
            short.read(&store, T0, at(2), at(2)).await.unwrap().total(),
            Cell::default()
        );
    }

    #[tokio::test]
    async fn series_past_the_limit_fold_into_other_and_are_counted() {
        let store = MemoryStore::new();
        let u = usage(7, 2);
        for m in ["a", "b", "c", "d"] {
            u.success(&series(m), Some(&tokens()), T0);
        }
        u.flush_at(&store, T0).await.unwrap();
        let c = u.read(&store, T0, T0, T0).await.unwrap();
        assert_eq!(c.overflow, 2);
        let models: Vec<String> = c
            .group(&[By::Model])
            .into_iter()
            .map(|(k, _)| k[0].clone())
            .collect();
        assert_eq!(models, ["a", "b", "other"]);
        assert_eq!(c.total().tokens.total, 4 * 21);
    }

    #[test]
    fn error_facts_keep_only_google_enums() {
        let body = br#"{"error":{"code":429,"message":"key AIzaSECRET quota","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"RATE_LIMIT_EXCEEDED"},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"12.5s"}]}}"#;
        assert_eq!(
            error_facts(body),
            (
                Some("RESOURCE_EXHAUSTED".into()),
                Some("RATE_LIMIT_EXCEEDED".into()),
                Some(12.5)
            )
        );
        let free_text = br#"{"error":{"status":"has spaces AIza","details":[{"reason":"x y"}]}}"#;
        assert_eq!(error_facts(free_text), (None, None, None));
    }
}
