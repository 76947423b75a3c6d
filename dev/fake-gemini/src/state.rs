//! What the fake remembers: valid keys and their switches, files and their
//! owner keys, open upload sessions, held streams, and every request seen.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// A per-key switch a test flips at run time.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Normal,
    /// 429 RESOURCE_EXHAUSTED with these details. With `model`, only calls
    /// for that model are refused, and the QuotaFailure names it in
    /// `quotaDimensions` (Google's limits are per project and per model);
    /// without, every call is refused and no model is named.
    Quota {
        #[serde(rename = "retryDelay", default)]
        retry_delay: Option<String>,
        #[serde(rename = "quotaId", default)]
        quota_id: Option<String>,
        #[serde(default)]
        model: Option<String>,
    },
    /// 400 API_KEY_INVALID, as for a key Google does not know.
    Invalid,
    /// This status with a Google error body.
    Error { status: u16 },
    /// Answer after this many milliseconds.
    Slow { ms: u64 },
    /// Streams send their first event, then the connection breaks.
    BreakStream,
    /// The connection closes with no answer at all.
    Drop,
    /// An upload's finalize creates the file, but its answer breaks off.
    CutFinalize,
    /// Answers `status` (a model answer for 200, a quota error otherwise,
    /// an SSE event with `sse`), promises more than it sends, sends the
    /// first `after` bytes, then goes silent with the connection open: a
    /// half-open upstream.
    Stall {
        #[serde(default = "ok_status")]
        status: u16,
        #[serde(default)]
        after: usize,
        #[serde(default)]
        sse: bool,
    },
}

fn ok_status() -> u16 {
    200
}

#[derive(Debug, Clone, Serialize)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: HashMap<String, String>,
    /// The key the request authenticated with, if any.
    pub key: Option<String>,
    /// The peer's IP address (tells outbound proxies apart in tests).
    pub peer: String,
    /// When it arrived (Unix ms), to check a request came after a moment.
    pub at_ms: u64,
}

#[derive(Debug, Clone)]
pub struct FileMeta {
    pub owner: String,
    pub display_name: String,
    pub mime_type: String,
    pub size: u64,
    pub created: String,
}

/// A per-project resource other than a file (a cache, a batch, an
/// operation, a file search store or one of its documents).
#[derive(Debug, Clone)]
pub struct Res {
    pub owner: String,
    pub value: serde_json::Value,
}

#[derive(Debug, Clone)]
pub struct Upload {
    pub key: String,
    pub display_name: String,
    pub mime_type: String,
    pub declared: Option<u64>,
    pub received: u64,
    pub done: Option<String>,
}

#[derive(Default)]
pub struct Inner {
    pub keys: HashSet<String>,
    pub modes: HashMap<String, Mode>,
    pub files: HashMap<String, FileMeta>,
    /// Resource name → owner key and body.
    pub resources: HashMap<String, Res>,
    /// Live sessions open now, per key.
    pub live_open: HashMap<String, u64>,
    /// Contents of the files the fake produced itself, for `:download`.
    pub contents: HashMap<String, String>,
    pub uploads: HashMap<String, Upload>,
    pub seen: Vec<Seen>,
    pub holds: HashMap<String, Arc<Notify>>,
    /// Model calls served successfully, per key.
    pub served: HashMap<String, u64>,
    /// Source IPs answered with 429 whatever the key (an IP-level throttle).
    pub throttled_ips: HashSet<String>,
    /// Per-key limits by model, as Google enforces them for a tier.
    pub limits: HashMap<String, ModelLimit>,
    /// When each key was served each limited model (ms), oldest first.
    pub windows: HashMap<(String, String), std::collections::VecDeque<u64>>,
    /// 429s sent because a key's limit for a model was reached, per key.
    pub limited: HashMap<String, u64>,
    /// OTLP trace exports taken at `/_fake/v1/traces` (the benchmark's
    /// collector): how many, and their bytes.
    pub trace_posts: u64,
    pub trace_bytes: u64,
}

/// One model's limits per key: requests in any 60 s and in one day (the
/// fake's day: since it started or was reset).
#[derive(Debug, Clone, Copy, serde::Deserialize)]
pub struct ModelLimit {
    pub rpm: Option<u64>,
    pub rpd: Option<u64>,
}

impl Inner {
    /// Counts a call of `key` for `model` against the model's limits; the
    /// seconds until a slot frees, and which quota was reached, when none
    /// is left.
    pub fn spend(
        &mut self,
        key: &str,
        model: &str,
        now_ms: u64,
    ) -> Result<(), (u64, &'static str)> {
        let Some(limit) = self.limits.get(model).copied() else {
            return Ok(());
        };
        let window = self
            .windows
            .entry((key.to_string(), model.to_string()))
            .or_default();
        let day = window.len() as u64;
        if limit.rpd.is_some_and(|rpd| day >= rpd) {
            *self.limited.entry(key.to_string()).or_insert(0) += 1;
            return Err((3600, "GenerateRequestsPerDayPerProjectPerModel-FreeTier"));
        }
        let minute: Vec<u64> = window
            .iter()
            .copied()
            .filter(|t| t + 60_000 > now_ms)
            .collect();
        if let Some(rpm) = limit.rpm {
            if minute.len() as u64 >= rpm {
                let frees = minute[minute.len() - rpm as usize] + 60_000 - now_ms;
                *self.limited.entry(key.to_string()).or_insert(0) += 1;
                return Err((
                    frees.div_ceil(1000).max(1),
                    "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                ));
            }
        }
        window.push_back(now_ms);
        Ok(())
    }
}

#[derive(Clone)]
pub struct Fake {
    inner: Arc<Mutex<Inner>>,
}

impl Fake {
    pub fn new(keys: impl IntoIterator<Item = String>) -> Self {
        let inner = Inner {
            keys: keys.into_iter().collect(),
            ..Default::default()
        };
        Self {
            inner: Arc::new(Mutex::new(inner)),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub fn hold(&self, name: &str) -> Arc<Notify> {
        self.lock()
            .holds
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    pub fn release(&self, name: &str) {
        let notify = self.hold(name);
        notify.notify_one();
    }
}

pub fn random_id(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = vec![0u8; len];
    let _ = getrandom::fill(&mut bytes);
    bytes
        .iter()
        .map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char)
        .collect()
}
