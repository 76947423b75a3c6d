//! Prometheus metrics. Labels are low-cardinality by construction: route
//! classes, status codes, key ids (never keys), outcome names.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: &'static str,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Api {
    pub api: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyOutcome {
    pub key_id: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyState {
    pub key_id: String,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyReason {
    pub key_id: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenKind {
    pub token_id: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyLabel {
    pub proxy_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabel {
    pub key_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyModel {
    pub key_id: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelKind {
    pub model: &'static str,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelOutcome {
    pub model: &'static str,
    pub outcome: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

pub struct Metrics {
    registry: Registry,
    /// Held while a scrape refills the gauges it reads at scrape time and
    /// encodes them.
    pub scrape: std::sync::Mutex<()>,
    pub requests: Family<RouteStatus, Counter>,
    pub upstream_latency: Family<Api, Histogram, fn() -> Histogram>,
    pub retries: Family<Reason, Counter>,
    pub upstream_responses: Family<KeyOutcome, Counter>,
    pub key_state: Family<KeyState, Gauge>,
    pub key_cooldown: Family<KeyLabel, Gauge>,
    /// Only the pairs cooling now: rebuilt on every scrape, so it stays
    /// bounded by what Google's 429s named.
    pub key_model_cooling: Family<KeyModel, Gauge>,
    pub store_up: Gauge,
    pub store_latency: Histogram,
    pub store_errors: Counter,
    pub sessions_bound: Counter,
    pub config_reloads: Counter,
    pub config_reload_errors: Counter,
    pub uploads_bound_by_token: Counter,
    pub mixed_owner_conflicts: Counter,
    pub uploads_started: Counter,
    pub files_recorded: Counter,
    pub proxy_requests: Family<ProxyLabel, Counter>,
    pub proxy_up: Family<ProxyLabel, Gauge>,
    /// Tokens Google reported, by model family label and kind.
    pub tokens: Family<ModelKind, Counter>,
    pub requests_by_model: Family<ModelOutcome, Counter>,
    pub usage_series_overflow: Counter,
    /// Answers the gateway made itself (not passed on from Google), by kind.
    pub gateway_errors: Family<Kind, Counter>,
    /// Requests a client limit refused, by limit.
    pub client_limited: Family<LimitLabel, Counter>,
    /// Requests that found every key's known window for their model full
    /// (or their pinned key's), by model family.
    pub key_window_full: Family<ModelLabel, Counter>,
    /// Only the keys disabled now, with who disabled them (`admin`, or the
    /// reason Google gave): rebuilt on every scrape.
    pub key_disabled: Family<KeyReason, Gauge>,
    pub store_layout_refused: Gauge,
    /// Tokens by client token id: bounded by the configured tokens.
    pub client_tokens: Family<TokenKind, Counter>,
    pub live_sessions: Gauge,
    pub open_fds: Gauge,
    /// Heap allocations since the start (`count-allocations` builds only).
    pub allocations: Counter,
    pub max_fds: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("gb");
        let m = Self {
            requests: Family::default(),
            upstream_latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            retries: Family::default(),
            upstream_responses: Family::default(),
            key_state: Family::default(),
            key_cooldown: Family::default(),
            key_model_cooling: Family::default(),
            store_up: Gauge::default(),
            store_latency: latency_histogram(),
            store_errors: Counter::default(),
            sessions_bound: Counter::default(),
            config_reloads: Counter::default(),
            config_reload_errors: Counter::default(),
            uploads_bound_by_token: Counter::default(),
            mixed_owner_conflicts: Counter::default(),
            uploads_started: Counter::default(),
            files_recorded: Counter::default(),
            proxy_requests: Family::default(),
            proxy_up: Family::default(),
            tokens: Family::default(),
            requests_by_model: Family::default(),
            usage_series_overflow: Counter::default(),
            gateway_errors: Family::default(),
            client_limited: Family::default(),
            key_window_full: Family::default(),
            key_disabled: Family::default(),
            store_layout_refused: Gauge::default(),
            client_tokens: Family::default(),
            live_sessions: Gauge::default(),
            open_fds: Gauge::default(),
            allocations: Counter::default(),
            max_fds: Gauge::default(),
            registry: Registry::default(),
            scrape: std::sync::Mutex::new(()),
        };
        registry.register(
            "requests",
            "Requests served, by route class and status",
            m.requests.clone(),
        );
        registry.register(
            "key_window_full",
            "Requests that found every key's known limit for their model reached (GB_LIMITS_FILE [keys]), by model",
            m.key_window_full.clone(),
        );
        registry.register(
            "client_limited",
            "Requests refused by a client limit (GB_LIMITS_FILE), by limit",
            m.client_limited.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Time from sending upstream to the upstream's response head",
            m.upstream_latency.clone(),
        );
        registry.register(
            "retries",
            "Requests moved to another key, by reason",
            m.retries.clone(),
        );
        registry.register(
            "upstream_responses",
            "Upstream answers by key id and outcome",
            m.upstream_responses.clone(),
        );
        registry.register(
            "key_state",
            "1 for the current state of each key (healthy, cooling, disabled)",
            m.key_state.clone(),
        );
        registry.register(
            "key_cooldown_seconds",
            "Seconds until a cooling key is usable again",
            m.key_cooldown.clone(),
        );
        registry.register(
            "key_model_cooling_seconds",
            "Seconds until a key cooling for one model serves it again",
            m.key_model_cooling.clone(),
        );
        registry.register(
            "store_up",
            "1 while the state store answers",
            m.store_up.clone(),
        );
        registry.register(
            "store_command_latency_seconds",
            "Latency of state store commands",
            m.store_latency.clone(),
        );
        registry.register(
            "store_errors",
            "State store commands that failed or timed out",
            m.store_errors.clone(),
        );
        registry.register(
            "sessions_bound",
            "Sessions bound to a key by this replica",
            m.sessions_bound.clone(),
        );
        registry.register(
            "config_reloads",
            "Reloads of the keys, tokens or admin token files that took effect",
            m.config_reloads.clone(),
        );
        registry.register(
            "config_reload_errors",
            "Reloads refused (unreadable, empty or malformed file; the last good set stays)",
            m.config_reload_errors.clone(),
        );
        registry.register(
            "uploads_bound_by_token",
            "Implicit per-token upload sessions bound to a key (GB_UPLOAD_AFFINITY=token)",
            m.uploads_bound_by_token.clone(),
        );
        registry.register(
            "mixed_owner_conflicts",
            "Requests refused with 409 because their files belong to different keys",
            m.mixed_owner_conflicts.clone(),
        );
        registry.register(
            "uploads_started",
            "Resumable uploads started through this replica",
            m.uploads_started.clone(),
        );
        registry.register(
            "files_recorded",
            "File owners recorded by this replica",
            m.files_recorded.clone(),
        );
        registry.register(
            "proxy_requests",
            "Upstream requests sent through each outbound proxy",
            m.proxy_requests.clone(),
        );
        registry.register(
            "proxy_up",
            "1 while an outbound proxy is usable",
            m.proxy_up.clone(),
        );
        registry.register(
            "tokens",
            "Tokens Google reported in successful answers, by model and kind",
            m.tokens.clone(),
        );
        registry.register(
            "requests_by_model",
            "Upstream answers by model and outcome",
            m.requests_by_model.clone(),
        );
        registry.register(
            "gateway_errors",
            "Error answers the gateway made itself (never Google's, passed on), by kind",
            m.gateway_errors.clone(),
        );
        registry.register(
            "usage_series_overflow",
            "Usage counted under model `other` because the hour's series limit was reached",
            m.usage_series_overflow.clone(),
        );
        registry.register(
            "key_disabled",
            "1 for each disabled key, by who disabled it (admin, or Google's reason)",
            m.key_disabled.clone(),
        );
        registry.register(
            "store_layout_refused",
            "1 while the store's key layout is newer than this replica knows (bindings refused)",
            m.store_layout_refused.clone(),
        );
        registry.register(
            "client_tokens",
            "Tokens Google reported in successful answers, by client token id and kind",
            m.client_tokens.clone(),
        );
        registry.register(
            "live_sessions",
            "Live API sessions this replica relays now",
            m.live_sessions.clone(),
        );
        registry.register(
            "process_open_fds",
            "File descriptors this process holds open",
            m.open_fds.clone(),
        );
        registry.register(
            "process_max_fds",
            "The process's open-files soft limit",
            m.max_fds.clone(),
        );
        #[cfg(feature = "count-allocations")]
        registry.register(
            "process_allocations",
            "Heap allocations since the process started (a count-allocations build)",
            m.allocations.clone(),
        );
        Self { registry, ..m }
    }

    pub fn request(&self, route: &'static str, status: u16) {
        self.requests
            .get_or_create(&RouteStatus {
                route,
                status: status.to_string(),
            })
            .inc();
    }

    pub fn upstream(&self, api: &'static str, elapsed: Duration) {
        self.upstream_latency
            .get_or_create(&Api { api })
            .observe(elapsed.as_secs_f64());
    }

    pub fn outcome(&self, key_id: &str, outcome: &'static str) {
        self.upstream_responses
            .get_or_create(&KeyOutcome {
                key_id: key_id.to_string(),
                outcome,
            })
            .inc();
    }

    pub fn proxy_request(&self, proxy_id: &str) {
        self.proxy_requests
            .get_or_create(&ProxyLabel {
                proxy_id: proxy_id.to_string(),
            })
            .inc();
    }

    pub fn gateway_error(&self, kind: &'static str) {
        self.gateway_errors.get_or_create(&Kind { kind }).inc();
    }

    pub fn window_full(&self, model: &str) {
        self.key_window_full
            .get_or_create(&ModelLabel {
                model: model_label(Some(model)),
            })
            .inc();
    }

    pub fn retry(&self, reason: &'static str) {
        self.retries.get_or_create(&Reason { reason }).inc();
    }

    pub fn store_call(&self, elapsed: Duration, ok: bool) {
        self.store_latency.observe(elapsed.as_secs_f64());
        if !ok {
            self.store_errors.inc();
        }
    }

    /// Brings `gb_process_allocations_total` up to the allocator's count.
    pub fn read_allocations(&self) {
        let now = ALLOCATIONS.load(std::sync::atomic::Ordering::Relaxed);
        self.allocations
            .inc_by(now.saturating_sub(self.allocations.get()));
    }

    /// Open descriptors against the soft limit, read at scrape time (Linux:
    /// `/proc/self/fd`; elsewhere the open count stays 0).
    pub fn read_fds(&self) {
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(dir.count() as i64);
        }
        if let Ok((soft, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
            self.max_fds.set(i64::try_from(soft).unwrap_or(i64::MAX));
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Heap allocations so far: counted by the binary's allocator in a build
/// with the `count-allocations` feature (the benchmark's allocations per
/// request), else always 0.
pub static ALLOCATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A model's label: its name for Google's known families (bounded), else
/// `other`, so a client naming models cannot grow the label set.
pub fn model_label(model: Option<&str>) -> &'static str {
    const KNOWN: &[&str] = &[
        "gemini-2.5-pro",
        "gemini-2.5-flash-lite",
        "gemini-2.5-flash-image",
        "gemini-2.5-flash",
        "gemini-2.0-flash-lite",
        "gemini-2.0-flash",
        "gemini-1.5-pro",
        "gemini-1.5-flash-8b",
        "gemini-1.5-flash",
        "gemini-3-pro",
        "gemini-3-flash",
        "gemini-embedding",
        "gemma-3",
        "text-embedding",
        "embedding",
        "imagen",
        "veo",
        "learnlm",
        "aqa",
    ];
    let Some(m) = model else {
        return "none";
    };
    KNOWN
        .iter()
        .find(|family| {
            m.strip_prefix(**family)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
        })
        .copied()
        .unwrap_or("other")
}

/// The route class of a path the API dispatcher does not see: the health
/// checks, metrics, admin, and paths nothing serves. API routes are labelled
/// by the dispatcher's own table (`crate::http::routes::Target::label`).
pub fn operational_route(path: &str) -> &'static str {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["healthz" | "readyz"] => "health",
        ["metrics"] => "metrics",
        ["admin", ..] => "admin",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operational_routes_are_classified() {
        assert_eq!(operational_route("/healthz"), "health");
        assert_eq!(operational_route("/metrics"), "metrics");
        assert_eq!(operational_route("/admin/api/keys"), "admin");
        assert_eq!(operational_route("/nope"), "unknown");
    }

    #[test]
    fn models_fold_into_known_families_or_other() {
        assert_eq!(model_label(Some("gemini-2.5-flash")), "gemini-2.5-flash");
        assert_eq!(
            model_label(Some("gemini-2.5-flash-preview-05-20")),
            "gemini-2.5-flash"
        );
        assert_eq!(
            model_label(Some("gemini-2.5-flash-lite")),
            "gemini-2.5-flash-lite"
        );
        assert_eq!(model_label(Some("gemini-2.5-flashy")), "other");
        assert_eq!(model_label(Some("my-own-model-123")), "other");
        assert_eq!(model_label(None), "none");
    }

    #[test]
    fn encodes_prometheus_text() {
        let m = Metrics::new();
        m.request("generate", 200);
        m.upstream("gemini", Duration::from_millis(3));
        let text = m.encode();
        assert!(
            text.contains("gb_requests_total{route=\"generate\",status=\"200\"} 1"),
            "{text}"
        );
        assert!(text.contains("gb_upstream_latency_seconds_bucket"));
        assert!(text.trim_end().ends_with("# EOF"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_open_files_against_the_limit() {
        let m = Metrics::new();
        m.read_fds();
        assert!(m.open_fds.get() > 0);
        assert!(m.max_fds.get() >= m.open_fds.get());
    }
}
