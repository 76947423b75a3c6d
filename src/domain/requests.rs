//! The request log: one record for every finished API request, so an
//! operator can look up what happened to a request a client complains
//! about (by the `X-Request-Id` it got, its token, key, model, status…).
//!
//! A request's [`Trail`] gathers what the steps learn (the key chosen and
//! how, each key tried, the upstream latency, the tokens Google reported);
//! when the answer has been sent, the trail becomes a [`Record`] in this
//! replica's buffer, written to the shared store in batches by a background
//! writer every second, or as soon as a batch is full (no store round trip
//! on the request path). The log keeps at most
//! `GB_REQUEST_LOG_MAX` records, none older than `GB_REQUEST_LOG_HOURS`.
//!
//! A record never holds a body, a query string, a key, a client token or a
//! session id: ids, labels, numbers and fixed words only.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::domain::scan::usage::Tokens;
use crate::state::{IndexEntry, StateStore, StoreError};

/// The shared index the records live in.
pub const INDEX: &str = crate::state::keyspace::index::REQUESTS;

/// How a request's key was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chosen {
    Rotation,
    /// A session the client named.
    Session,
    /// The implicit upload binding of its client token.
    UploadBinding,
    /// The owner of a file or resource it names.
    ResourceOwner,
    /// An ephemeral token's minting key (Live).
    EphemeralToken,
}

impl Chosen {
    pub fn name(self) -> &'static str {
        match self {
            Chosen::Rotation => "rotation",
            Chosen::Session => "session",
            Chosen::UploadBinding => "upload_binding",
            Chosen::ResourceOwner => "resource_owner",
            Chosen::EphemeralToken => "ephemeral_token",
        }
    }
}

/// Token counts as Google reported them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCounts {
    pub prompt: u64,
    pub output: u64,
    pub thoughts: u64,
    pub cached: u64,
}

/// One finished request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub time_ms: u64,
    pub replica: String,
    pub request_id: String,
    /// The client token's label, else its id.
    pub token: String,
    pub token_id: String,
    pub key_id: Option<String>,
    pub model: Option<String>,
    pub route: Cow<'static, str>,
    pub status: u16,
    /// `success`, or what went wrong in a word (`rate_limited`,
    /// `client_limited`, the gateway's error kind, `upstream_error`…).
    pub outcome: Cow<'static, str>,
    pub attempts: u32,
    pub keys_tried: Vec<String>,
    pub latency_ms: u64,
    /// From sending upstream to the answer's head, summed over attempts.
    pub upstream_ms: Option<u64>,
    pub tokens: Option<TokenCounts>,
    pub chosen_by: Option<Cow<'static, str>>,
    /// The kind of resource the request was routed by, if any.
    pub resource: Option<Cow<'static, str>>,
}

#[derive(Debug, Default)]
struct TrailData {
    token_id: Option<String>,
    model: Option<String>,
    key_id: Option<String>,
    keys_tried: Vec<String>,
    upstream_ms: Option<u64>,
    tokens: Option<TokenCounts>,
    chosen_by: Option<Chosen>,
    resource: Option<&'static str>,
    outcome: Option<&'static str>,
}

/// What one request's steps learn, shared by them (a clone is a reference
/// count: the steps pass it around freely).
#[derive(Debug, Clone)]
pub struct Trail(Arc<TrailInner>);

#[derive(Debug)]
struct TrailInner {
    request_id: String,
    route: &'static str,
    started: Instant,
    data: Mutex<TrailData>,
}

impl Trail {
    pub fn new(request_id: String, route: &'static str) -> Self {
        Self(Arc::new(TrailInner {
            request_id,
            route,
            started: Instant::now(),
            data: Mutex::default(),
        }))
    }

    fn with(&self, f: impl FnOnce(&mut TrailData)) {
        let mut data = self
            .0
            .data
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut data);
    }

    /// The client and the model the request is for.
    pub fn client(&self, token_id: &str, model: Option<&str>) {
        self.with(|d| {
            if d.token_id.is_none() {
                d.token_id = Some(token_id.to_string());
            }
            if let (None, Some(m)) = (&d.model, model) {
                d.model = Some(m.to_string());
            }
        });
    }

    pub fn chosen(&self, how: Chosen) {
        self.with(|d| d.chosen_by = Some(how));
    }

    pub fn resource(&self, kind: &'static str) {
        self.with(|d| d.resource = Some(kind));
    }

    /// The route class the request was counted under.
    pub fn route(&self) -> &'static str {
        self.0.route
    }

    /// Upstream calls made so far.
    pub fn attempts(&self) -> u32 {
        let mut n = 0;
        self.with(|d| n = d.keys_tried.len() as u32);
        n
    }

    /// One upstream call on `key_id`, answered (or failed) after `took`.
    pub fn tried(&self, key_id: &str, took: Duration) {
        self.with(|d| {
            d.keys_tried.push(key_id.to_string());
            d.key_id = Some(key_id.to_string());
            d.upstream_ms = Some(d.upstream_ms.unwrap_or(0) + took.as_millis() as u64);
        });
    }

    /// Tokens Google reported (added up, for a Live session's turns).
    pub fn tokens(&self, t: &Tokens) {
        self.with(|d| {
            let c = d.tokens.get_or_insert_with(TokenCounts::default);
            c.prompt += t.prompt;
            c.output += t.output;
            c.thoughts += t.thoughts;
            c.cached += t.cached;
        });
    }

    /// A more precise outcome than the status says (`client_limited`, a
    /// cut stream…).
    pub fn outcome(&self, outcome: &'static str) {
        self.with(|d| d.outcome = Some(outcome));
    }

    /// The record of the finished request. Called once, when the request
    /// ends: what the trail holds is moved into the record.
    pub fn finish(
        &self,
        status: u16,
        error_kind: Option<&'static str>,
        label: impl FnOnce(&str) -> Option<String>,
    ) -> Record {
        let mut d = self
            .0
            .data
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let token_id = d.token_id.take().unwrap_or_default();
        let outcome = d.outcome.or(error_kind).unwrap_or(match status {
            100..=399 => "success",
            429 => "rate_limited",
            400..=499 => "upstream_client_error",
            _ => "upstream_error",
        });
        let keys_tried = std::mem::take(&mut d.keys_tried);
        Record {
            time_ms: crate::state::now_ms(),
            replica: String::new(),
            request_id: self.0.request_id.clone(),
            token: if token_id.is_empty() {
                String::new()
            } else {
                label(&token_id).unwrap_or_else(|| token_id.clone())
            },
            token_id,
            key_id: d.key_id.take(),
            model: d.model.take(),
            route: Cow::Borrowed(self.0.route),
            status,
            outcome: Cow::Borrowed(outcome),
            attempts: keys_tried.len() as u32,
            keys_tried,
            latency_ms: self.0.started.elapsed().as_millis() as u64,
            upstream_ms: d.upstream_ms,
            tokens: d.tokens.take(),
            chosen_by: d.chosen_by.map(|c| Cow::Borrowed(c.name())),
            resource: d.resource.map(Cow::Borrowed),
        }
    }
}

/// This replica's records not yet written, and the log's bounds.
pub struct RequestLog {
    replica: String,
    max: usize,
    keep: Duration,
    /// Records as written (JSON) with their expiry, oldest first.
    pending: Mutex<std::collections::VecDeque<(String, u64)>>,
    /// Wakes the writer when a batch is ready.
    pub ready: tokio::sync::Notify,
}

/// Records written in one exchange at most (one `ZADD`): a batch small
/// enough that writing it never holds Redis up for long.
pub const BATCH: usize = 1000;

/// Records a replica holds while the store cannot take them, at most.
const PENDING_MAX: usize = 10_000;

impl RequestLog {
    pub fn new(replica: &str, max: usize, keep: Duration) -> Self {
        Self {
            replica: replica.to_string(),
            max,
            keep,
            pending: Mutex::new(std::collections::VecDeque::new()),
            ready: tokio::sync::Notify::new(),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<(String, u64)>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps a finished request's record for the writer. A replica that
    /// cannot write keeps the newest `min(GB_REQUEST_LOG_MAX, 10,000)`.
    pub fn push(&self, mut record: Record) {
        record.replica.clone_from(&self.replica);
        let Ok(json) = serde_json::to_string(&record) else {
            return;
        };
        let expires = record.time_ms + self.keep.as_millis() as u64;
        let mut pending = self.pending();
        if pending.len() >= self.max.min(PENDING_MAX) {
            pending.pop_front();
        }
        pending.push_back((json, expires));
        let full = pending.len() >= BATCH;
        drop(pending);
        if full {
            self.ready.notify_one();
        }
    }

    /// Writes the pending records, in batches of at most [`BATCH`].
    pub async fn flush(&self, store: &dyn StateStore, now_ms: u64) -> Result<(), StoreError> {
        loop {
            let batch: Vec<(String, u64)> = {
                let mut pending = self.pending();
                let n = pending.len().min(BATCH);
                pending.drain(..n).collect()
            };
            if batch.is_empty() {
                return Ok(());
            }
            if let Err(e) = store.index_add_many(INDEX, &batch, self.max, now_ms).await {
                // Kept for the next flush, in order, within the bound.
                let mut pending = self.pending();
                for record in batch.into_iter().rev() {
                    pending.push_front(record);
                }
                let over = pending.len().saturating_sub(self.max.min(PENDING_MAX));
                pending.drain(..over);
                return Err(e);
            }
        }
    }

    /// Records matching `filter`, newest first, from the one after
    /// `after`; at most `limit`. Also the place to go on from, when more
    /// may match.
    pub async fn find(
        &self,
        store: &dyn StateStore,
        filter: &Filter,
        after: Option<IndexEntry>,
        limit: usize,
        now_ms: u64,
    ) -> Result<(Vec<Record>, Option<IndexEntry>), StoreError> {
        const PAGE: usize = 500;
        let mut found = Vec::new();
        let mut cursor = after;
        let mut scanned = 0;
        loop {
            let page = store
                .index_page(INDEX, now_ms, cursor.as_ref(), PAGE)
                .await?;
            let last = page.len() < PAGE;
            for entry in page {
                scanned += 1;
                if let Ok(record) = serde_json::from_str::<Record>(&entry.member) {
                    if filter.matches(&record) {
                        found.push(record);
                    }
                }
                cursor = Some(entry);
                if found.len() >= limit {
                    return Ok((found, cursor));
                }
            }
            if last || scanned >= self.max + PAGE {
                return Ok((found, None));
            }
        }
    }
}

/// What `GET /admin/api/requests` asks for; every field that is set must
/// match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// A client token's label or id.
    pub token: Option<String>,
    pub key_id: Option<String>,
    pub model: Option<String>,
    /// `2`, `4` or `5`: the status class.
    pub status_class: Option<u16>,
    pub outcome: Option<String>,
    pub from_ms: Option<u64>,
    pub to_ms: Option<u64>,
    pub request_id: Option<String>,
}

impl Filter {
    pub fn matches(&self, r: &Record) -> bool {
        self.token
            .as_ref()
            .is_none_or(|t| *t == r.token || *t == r.token_id)
            && self
                .key_id
                .as_ref()
                .is_none_or(|k| r.keys_tried.contains(k) || r.key_id.as_ref() == Some(k))
            && self
                .model
                .as_ref()
                .is_none_or(|m| r.model.as_ref() == Some(m))
            && self.status_class.is_none_or(|c| r.status / 100 == c)
            && self.outcome.as_ref().is_none_or(|o| *o == r.outcome)
            && self.from_ms.is_none_or(|f| r.time_ms >= f)
            && self.to_ms.is_none_or(|t| r.time_ms < t)
            && self
                .request_id
                .as_ref()
                .is_none_or(|id| *id == r.request_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64) -> Record {
        Record {
            time_ms: 1_000 + n,
            request_id: format!("r{n}"),
            ..Record::default()
        }
    }

    #[actix_rt::test]
    async fn a_replica_holds_the_newest_ten_thousand_and_writes_them_in_batches() {
        let log = RequestLog::new("rep", 20_000, Duration::from_secs(3600));
        for n in 0..10_050 {
            log.push(record(n));
        }
        assert_eq!(log.pending().len(), 10_000);
        assert!(
            log.pending()[0].0.contains("\"r50\""),
            "the oldest went first"
        );
        let store = crate::state::MemoryStore::new();
        log.flush(&store, 1_000).await.unwrap();
        assert!(log.pending().is_empty());
        let (found, _) = log
            .find(&store, &Filter::default(), None, 1_000, 1_000)
            .await
            .unwrap();
        assert_eq!(found.len(), 1_000);
        assert_eq!(found[0].request_id, "r10049", "newest first");
        assert_eq!(found[0].replica, "rep");
    }
}
