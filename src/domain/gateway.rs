//! The state every worker shares: settings, key pool, client tokens, store.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::domain::clients::Auth;
use crate::domain::keys::KeyPool;
use crate::domain::stats::KeyStats;
use crate::ops::metrics::Metrics;
use crate::settings::Settings;
use crate::state::StateStore;
use crate::upstream::proxy::ProxyRouter;

pub struct Gateway {
    pub settings: Settings,
    pub keys: KeyPool,
    pub auth: Auth,
    pub store: Arc<dyn StateStore>,
    pub metrics: Arc<Metrics>,
    pub stats: KeyStats,
    /// This process's id among the replicas (heartbeats, locks, logs).
    pub replica: String,
    pub started_ms: u64,
    /// Outbound proxies, when configured.
    pub proxies: Option<Arc<ProxyRouter>>,
    /// Usage per hour, token, key and model, and the recent upstream errors.
    pub usage: Arc<crate::domain::usage::Usage>,
    /// Limits per client token.
    pub limits: Arc<crate::domain::limits::Limiter>,
    /// The request log's records not yet written.
    pub requests: Arc<crate::domain::requests::RequestLog>,
    draining: AtomicBool,
    /// When the keys or tokens in force were last loaded (Unix ms).
    loaded_ms: AtomicU64,
}

impl Gateway {
    pub fn new(settings: Settings, store: Arc<dyn StateStore>, metrics: Arc<Metrics>) -> Self {
        let settings_proxies = settings.proxies.list.clone();
        let proxy_cooldown = settings.proxies.cooldown;
        let settings_usage = (settings.usage.retention_days, settings.usage.max_series);
        let metrics_usage = metrics.clone();
        let replica = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let limits = Arc::new(crate::domain::limits::Limiter::new(
            settings.limits.set.clone(),
            &replica,
        ));
        let requests = Arc::new(crate::domain::requests::RequestLog::new(
            &replica,
            settings.usage.request_log_max,
            std::time::Duration::from_secs(settings.usage.request_log_hours * 3600),
        ));
        let keys = KeyPool::new(&settings.keys.list);
        keys.set_limits(settings.limits.set.keys.clone());
        Self {
            keys,
            auth: Auth::new(
                &settings.clients.tokens,
                settings.clients.labels.clone(),
                settings.admin.token.as_ref(),
            ),
            settings,
            store,
            metrics,
            stats: KeyStats::default(),
            replica,
            started_ms: crate::state::now_ms(),
            proxies: (!settings_proxies.is_empty())
                .then(|| Arc::new(ProxyRouter::new(settings_proxies, proxy_cooldown))),
            usage: Arc::new(
                crate::domain::usage::Usage::new(
                    settings_usage.0,
                    settings_usage.1,
                    metrics_usage,
                    uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
                )
                .settling(limits.clone()),
            ),
            requests,
            limits,
            draining: AtomicBool::new(false),
            loaded_ms: AtomicU64::new(crate::state::now_ms()),
        }
    }

    /// Notes that keys or tokens were (re)loaded now.
    pub fn mark_loaded(&self) {
        self.loaded_ms
            .store(crate::state::now_ms(), Ordering::Relaxed);
    }

    /// When the keys or tokens in force were last loaded (Unix ms).
    pub fn loaded_ms(&self) -> u64 {
        self.loaded_ms.load(Ordering::Relaxed)
    }

    /// Records one upstream answer for a key: metrics and hourly statistics.
    pub fn observe(&self, key_id: &str, outcome: &'static str) {
        self.metrics.outcome(key_id, outcome);
        self.stats.record(key_id, outcome);
    }

    pub fn store(&self) -> &dyn StateStore {
        self.store.as_ref()
    }

    /// Marks the replica as shutting down: `/readyz` turns 503 so load
    /// balancers stop sending new work while in-flight requests finish.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}
