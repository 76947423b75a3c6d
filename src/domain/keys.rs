//! The key pool: which real Gemini key serves a request, and what an
//! upstream answer says about the key's health.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use secrecy::{ExposeSecret, SecretString};

use crate::domain::identity::{mask, short_id};
use crate::settings::{KeyLimit, KeyLimits};
use crate::state::limits::{KeyWindow, KeyWindowUse, WindowAsk};
use crate::state::{now_ms, MemberState, Pick, StateStore, Transition, MODEL_SEP};

/// A key limit as the store counts it (`0`: none).
fn window(limit: Option<KeyLimit>) -> KeyWindow {
    let l = limit.unwrap_or_default();
    KeyWindow {
        rpm: l.rpm.unwrap_or(0),
        tpm: l.tpm.unwrap_or(0),
        rpd: l.rpd.unwrap_or(0),
    }
}
use crate::upstream::outcome::Outcome;

/// The rotation ring every replica shares for the key pool.
pub const RING: &str = crate::state::keyspace::ring::KEYS;

/// One real Gemini key. Only [`ApiKey::expose`] hands out the secret, at the
/// line that sends it upstream.
pub struct ApiKey {
    pub id: String,
    pub masked: String,
    secret: SecretString,
}

impl ApiKey {
    pub fn new(secret: SecretString) -> Self {
        Self {
            id: short_id(&secret),
            masked: mask(&secret),
            secret,
        }
    }

    pub fn expose(&self) -> &str {
        self.secret.expose_secret()
    }

    /// What an upstream call needs of this key.
    pub fn credential(&self) -> crate::upstream::client::Credential<'_> {
        crate::upstream::client::Credential {
            id: &self.id,
            secret: self.secret.expose_secret(),
        }
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey({})", self.id)
    }
}

/// The pool's keys. They can change while the gateway runs (a reloaded keys
/// file): a request holds the `Arc` of the key it started with, so it
/// finishes on that key whatever the pool becomes meanwhile.
pub struct KeyPool {
    set: RwLock<Arc<KeySet>>,
    /// Process-local rotation, used only while the state store is unreachable.
    local: AtomicU64,
    /// The keys' known limits per model (`GB_LIMITS_FILE`'s `[keys]`).
    limits: RwLock<Arc<KeyLimits>>,
    /// Numbers this replica's requests in the keys' windows.
    seq: AtomicU64,
    replica: String,
}

/// One version of the pool.
pub struct KeySet {
    keys: Vec<Arc<ApiKey>>,
    ids: Vec<String>,
    /// A short digest of the key ids, to tell replicas' sets apart.
    digest: String,
}

impl KeySet {
    fn new(secrets: &[SecretString]) -> Self {
        let keys: Vec<Arc<ApiKey>> = secrets
            .iter()
            .cloned()
            .map(|s| Arc::new(ApiKey::new(s)))
            .collect();
        let ids: Vec<String> = keys.iter().map(|k| k.id.clone()).collect();
        Self {
            digest: set_digest(&ids),
            keys,
            ids,
        }
    }
}

/// A short digest of a set of ids, in any order.
pub fn set_digest(ids: &[String]) -> String {
    use sha2::{Digest, Sha256};
    let mut sorted: Vec<&String> = ids.iter().collect();
    sorted.sort();
    let mut h = Sha256::new();
    for id in sorted {
        h.update(id.as_bytes());
        h.update(b"\n");
    }
    hex::encode(&h.finalize()[..6])
}

/// What a reload changed, by key id.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

/// Why no key could be chosen.
#[derive(Debug)]
pub enum NoKey {
    AllCooling {
        retry_after_secs: u64,
    },
    AllDisabled,
    Exhausted,
    /// Every key has used its known limit for `model` (`[keys]` of the
    /// limits file) until `until_ms`.
    WindowsFull {
        model: String,
        until_ms: u64,
    },
}

/// A pinned key's window for the request's model is full until `until_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowFull {
    pub until_ms: u64,
}

impl KeyPool {
    pub fn new(secrets: &[SecretString]) -> Self {
        Self {
            set: RwLock::new(Arc::new(KeySet::new(secrets))),
            local: AtomicU64::new(0),
            limits: RwLock::new(Arc::new(KeyLimits::default())),
            seq: AtomicU64::new(0),
            replica: uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
        }
    }

    /// Puts the keys' known limits in force.
    pub fn set_limits(&self, limits: KeyLimits) {
        match self.limits.write() {
            Ok(mut l) => *l = Arc::new(limits),
            Err(p) => *p.into_inner() = Arc::new(limits),
        }
    }

    pub fn limits(&self) -> Arc<KeyLimits> {
        self.limits
            .read()
            .map_or_else(|p| p.into_inner().clone(), |l| l.clone())
    }

    /// Each of `ids`' window for `model`, when any key has one.
    fn windows(&self, ids: &[String], model: &str) -> Option<Vec<KeyWindow>> {
        let limits = self.limits();
        if limits.is_empty() {
            return None;
        }
        let windows: Vec<KeyWindow> = ids.iter().map(|id| window(limits.of(id, model))).collect();
        windows.iter().any(|w| !w.is_none()).then_some(windows)
    }

    fn request_id(&self) -> String {
        format!(
            "{}-{}",
            self.replica,
            self.seq.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn current(&self) -> Arc<KeySet> {
        match self.set.read() {
            Ok(set) => set.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The keys now (a snapshot).
    pub fn keys(&self) -> Vec<Arc<ApiKey>> {
        self.current().keys.clone()
    }

    pub fn by_id(&self, id: &str) -> Option<Arc<ApiKey>> {
        self.current().keys.iter().find(|k| k.id == id).cloned()
    }

    /// The digest of the key ids now.
    pub fn digest(&self) -> String {
        self.current().digest.clone()
    }

    /// Puts a new set of keys in place at once; requests in flight keep the
    /// key they hold. Returns what changed.
    pub fn replace(&self, secrets: &[SecretString]) -> Changes {
        let next = Arc::new(KeySet::new(secrets));
        let before = self.current();
        let changes = Changes {
            added: next
                .ids
                .iter()
                .filter(|id| !before.ids.contains(id))
                .cloned()
                .collect(),
            removed: before
                .ids
                .iter()
                .filter(|id| !next.ids.contains(id))
                .cloned()
                .collect(),
        };
        match self.set.write() {
            Ok(mut set) => *set = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        changes
    }

    /// The next key by shared round-robin over the keys usable for `model`
    /// (healthy, and not cooling for that model), skipping `exclude`. While
    /// the store is down, falls back to process-local round-robin so
    /// unpinned traffic keeps flowing.
    pub async fn next(
        &self,
        store: &dyn StateStore,
        exclude: &[String],
        model: Option<&str>,
    ) -> Result<Arc<ApiKey>, NoKey> {
        self.next_for(store, exclude, model, true).await
    }

    /// [`Self::next`]; `windowed`: whether the request counts in the keys'
    /// known per-model windows (a model call that spends quota).
    pub async fn next_for(
        &self,
        store: &dyn StateStore,
        exclude: &[String],
        model: Option<&str>,
        windowed: bool,
    ) -> Result<Arc<ApiKey>, NoKey> {
        let now = now_ms();
        let set = self.current();
        let windows = model
            .filter(|_| windowed)
            .and_then(|m| Some((m, self.windows(&set.ids, m)?)));
        let pick = match &windows {
            Some((model, windows)) => {
                self.within(store, &set.ids, exclude, windows, model, now)
                    .await
            }
            None => store.rotate(RING, &set.ids, exclude, model, now).await,
        };
        match pick {
            Ok(Pick::Member(i)) => set.keys.get(i).cloned().ok_or(NoKey::Exhausted),
            Ok(Pick::WindowsFull { until_ms }) => Err(NoKey::WindowsFull {
                model: model.unwrap_or_default().to_string(),
                until_ms,
            }),
            Ok(Pick::AllCooling { until_ms }) => Err(NoKey::AllCooling {
                retry_after_secs: until_ms.saturating_sub(now).div_ceil(1000),
            }),
            Ok(Pick::AllDisabled) => Err(NoKey::AllDisabled),
            Ok(Pick::Exhausted) => Err(NoKey::Exhausted),
            Err(e) => {
                tracing::warn!(error = %e, "rotating keys locally");
                self.next_local(&set, exclude)
            }
        }
    }

    /// One rotation among `ids` within their windows for `model`, counted
    /// in the Pacific day Google's per-day limits use.
    async fn within(
        &self,
        store: &dyn StateStore,
        ids: &[String],
        exclude: &[String],
        windows: &[KeyWindow],
        model: &str,
        now: u64,
    ) -> Result<Pick, crate::state::StoreError> {
        let (day, day_ends_ms) = crate::domain::limits::pacific_day(now);
        let request_id = self.request_id();
        let ask = WindowAsk {
            model,
            day: &day,
            day_ends_ms,
            request_id: &request_id,
        };
        store
            .rotate_within(RING, ids, exclude, windows, &ask, now)
            .await
    }

    /// Counts a request pinned to `key` in its window for `model`, when
    /// the key has one; says when it frees up when it is full.
    pub async fn spend_pinned(
        &self,
        store: &dyn StateStore,
        key: &ApiKey,
        model: &str,
    ) -> Result<(), WindowFull> {
        let ids = [key.id.clone()];
        let Some(windows) = self.windows(&ids, model) else {
            return Ok(());
        };
        // A pinned key's health was checked already: its window alone
        // decides here.
        match self
            .within(store, &ids, &[], &windows, model, now_ms())
            .await
        {
            Ok(Pick::WindowsFull { until_ms }) => Err(WindowFull { until_ms }),
            _ => Ok(()),
        }
    }

    /// Each key's use of its window for `model`, with its limit.
    pub async fn window_use(
        &self,
        store: &dyn StateStore,
        model: &str,
    ) -> Result<Vec<(String, KeyWindow, KeyWindowUse)>, crate::state::StoreError> {
        let set = self.current();
        let limits = self.limits();
        let now = now_ms();
        let (day, day_ends_ms) = crate::domain::limits::pacific_day(now);
        let ask = WindowAsk {
            model,
            day: &day,
            day_ends_ms,
            request_id: "",
        };
        let used = store.key_windows(RING, &set.ids, &ask, now).await?;
        Ok(set
            .ids
            .iter()
            .zip(used)
            .map(|(id, used)| (id.clone(), window(limits.of(id, model)), used))
            .collect())
    }

    fn next_local(&self, set: &KeySet, exclude: &[String]) -> Result<Arc<ApiKey>, NoKey> {
        let usable: Vec<&Arc<ApiKey>> = set
            .keys
            .iter()
            .filter(|k| !exclude.contains(&k.id))
            .collect();
        if usable.is_empty() {
            return Err(NoKey::Exhausted);
        }
        let c = self.local.fetch_add(1, Ordering::Relaxed);
        Ok(usable[(c % usable.len() as u64) as usize].clone())
    }

    /// Applies what an upstream answer says about a key to the shared state,
    /// through the store's state machine (a disabled key stays disabled).
    pub async fn record(&self, store: &dyn StateStore, key: &ApiKey, outcome: &Outcome) {
        let (model, event) = match outcome {
            Outcome::RateLimited {
                until_ms,
                per_day,
                model,
            } => {
                tracing::warn!(key_id = %key.id, until_ms, per_day, model = model.as_deref().unwrap_or("*"), "key rate-limited; cooling down");
                let reason = if *per_day { "per_day" } else { "per_minute" };
                (
                    model.as_deref(),
                    Transition::Cool {
                        until_ms: *until_ms,
                        reason: reason.into(),
                    },
                )
            }
            Outcome::KeyRejected { reason } => {
                tracing::error!(key_id = %key.id, reason, "key rejected by upstream; disabled");
                (
                    None,
                    Transition::Disable {
                        reason: (*reason).to_string(),
                    },
                )
            }
            _ => return,
        };
        if let Err(e) = store
            .transition(RING, &key.id, model, &event, now_ms())
            .await
        {
            tracing::warn!(key_id = %key.id, error = %e, "could not record key state");
        }
    }
}

pub use crate::upstream::model::normalize_model;

/// The model a native route names: `/{ver}/models/{model}:{method}`.
pub fn model_from_path(path: &str) -> Option<String> {
    let rest = path.split_once("/models/")?.1;
    let name = rest.split([':', '/']).next()?;
    normalize_model(name)
}

/// The model an OpenAI-compatible request body names (`"model"`).
pub fn model_from_openai_body(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named<'a> {
        #[serde(borrow)]
        model: Option<std::borrow::Cow<'a, str>>,
    }
    let named: Named = serde_json::from_slice(body).ok()?;
    normalize_model(&named.model?)
}

/// A per-model cooldown as operators see it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelCooldown {
    pub model: String,
    /// `per_minute` or `per_day` (empty when unknown).
    pub kind: String,
    pub until_ms: u64,
}

/// One key as operators see it: never the key itself.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyView {
    pub id: String,
    pub masked: String,
    /// `healthy`, `cooling` or `disabled`.
    pub state: &'static str,
    pub cooldown_until_ms: Option<u64>,
    /// Why the key cools (`per_minute`, `per_day`, …), while it does.
    pub cooldown_reason: Option<String>,
    /// The disable origin: `admin`, or what the upstream said.
    pub disabled_reason: Option<String>,
    /// Models this key may not serve now, while the rest it may.
    pub model_cooldowns: Vec<ModelCooldown>,
}

impl KeyPool {
    /// Every configured key with its shared state at `now`.
    pub fn view(
        &self,
        states: &std::collections::HashMap<String, MemberState>,
        now: u64,
    ) -> Vec<KeyView> {
        self.keys()
            .iter()
            .map(|k| {
                let (state, until, cool_reason, reason) = match states.get(&k.id) {
                    Some(MemberState::Cooling { until_ms, reason }) if *until_ms > now => (
                        "cooling",
                        Some(*until_ms),
                        Some(reason.clone()).filter(|r| !r.is_empty()),
                        None,
                    ),
                    Some(MemberState::Disabled { reason, .. }) => {
                        ("disabled", None, None, Some(reason.clone()))
                    }
                    _ => ("healthy", None, None, None),
                };
                let prefix = format!("{}{MODEL_SEP}", k.id);
                let mut model_cooldowns: Vec<ModelCooldown> = states
                    .iter()
                    .filter_map(|(field, s)| {
                        let model = field.strip_prefix(&prefix)?;
                        match s {
                            MemberState::Cooling { until_ms, reason } if *until_ms > now => {
                                Some(ModelCooldown {
                                    model: model.to_string(),
                                    kind: reason.clone(),
                                    until_ms: *until_ms,
                                })
                            }
                            _ => None,
                        }
                    })
                    .collect();
                model_cooldowns.sort_by(|a, b| a.model.cmp(&b.model));
                KeyView {
                    id: k.id.clone(),
                    masked: k.masked.clone(),
                    state,
                    cooldown_until_ms: until,
                    cooldown_reason: cool_reason,
                    disabled_reason: reason,
                    model_cooldowns,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{model_from_openai_body, model_from_path, normalize_model};

    #[test]
    fn the_model_comes_from_the_path_or_the_openai_body() {
        assert_eq!(
            model_from_path("/v1beta/models/gemini-2.5-pro:generateContent").as_deref(),
            Some("gemini-2.5-pro")
        );
        assert_eq!(
            model_from_path("/v1/models/gemini-2.5-flash").as_deref(),
            Some("gemini-2.5-flash")
        );
        assert_eq!(model_from_path("/v1beta/files/abc"), None);
        assert_eq!(
            model_from_openai_body(br#"{"model":"models/gemini-2.5-pro","messages":[]}"#)
                .as_deref(),
            Some("gemini-2.5-pro")
        );
        assert_eq!(model_from_openai_body(b"not json"), None);
    }

    #[test]
    fn models_are_normalised() {
        assert_eq!(
            normalize_model("models/gemini-2.5-pro").as_deref(),
            Some("gemini-2.5-pro")
        );
        assert_eq!(
            normalize_model("Gemini-2.5-Flash").as_deref(),
            Some("gemini-2.5-flash")
        );
        assert_eq!(normalize_model("a|b"), None);
        assert_eq!(normalize_model(""), None);
        assert_eq!(normalize_model(&"x".repeat(101)), None);
    }
}
