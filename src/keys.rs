//! The key pool: which real Gemini key serves a request, and what an
//! upstream answer says about the key's health.

use std::sync::atomic::{AtomicU64, Ordering};

use actix_web::http::StatusCode;
use secrecy::{ExposeSecret, SecretString};

use crate::error::ApiError;
use crate::health::Outcome;
use crate::identity::{mask, short_id};
use crate::store::{now_ms, MemberState, Pick, StateStore};

/// The rotation ring every replica shares for the key pool.
pub const RING: &str = "keys";

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
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey({})", self.id)
    }
}

pub struct KeyPool {
    keys: Vec<ApiKey>,
    ids: Vec<String>,
    /// Process-local rotation, used only while the state store is unreachable.
    local: AtomicU64,
}

/// Why no key could be chosen.
#[derive(Debug)]
pub enum NoKey {
    AllCooling { retry_after_secs: u64 },
    AllDisabled,
    Exhausted,
}

impl NoKey {
    pub fn into_error(self) -> ApiError {
        match self {
            NoKey::AllCooling { retry_after_secs } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "Every API key of the gateway is rate-limited right now. Retry after the \
                 Retry-After delay.",
            )
            .retry_after(retry_after_secs),
            NoKey::AllDisabled => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "No API key of the gateway is usable: every key is disabled.",
            ),
            NoKey::Exhausted => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "The upstream failed on every key tried.",
            ),
        }
    }
}

impl KeyPool {
    pub fn new(secrets: &[SecretString]) -> Self {
        let keys: Vec<ApiKey> = secrets.iter().cloned().map(ApiKey::new).collect();
        let ids = keys.iter().map(|k| k.id.clone()).collect();
        Self {
            keys,
            ids,
            local: AtomicU64::new(0),
        }
    }

    pub fn keys(&self) -> &[ApiKey] {
        &self.keys
    }

    pub fn by_id(&self, id: &str) -> Option<&ApiKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// The next key by shared round-robin over the healthy keys, skipping
    /// `exclude`. While the store is down, falls back to process-local
    /// round-robin so unpinned traffic keeps flowing.
    pub async fn next(&self, store: &dyn StateStore, exclude: &[String]) -> Result<&ApiKey, NoKey> {
        let now = now_ms();
        match store.rotate(RING, &self.ids, exclude, now).await {
            Ok(Pick::Member(i)) => self.keys.get(i).ok_or(NoKey::Exhausted),
            Ok(Pick::AllCooling { until_ms }) => Err(NoKey::AllCooling {
                retry_after_secs: until_ms.saturating_sub(now).div_ceil(1000),
            }),
            Ok(Pick::AllDisabled) => Err(NoKey::AllDisabled),
            Ok(Pick::Exhausted) => Err(NoKey::Exhausted),
            Err(e) => {
                tracing::warn!(error = %e, "state store unreachable; rotating keys locally");
                self.next_local(exclude)
            }
        }
    }

    fn next_local(&self, exclude: &[String]) -> Result<&ApiKey, NoKey> {
        let usable: Vec<&ApiKey> = self
            .keys
            .iter()
            .filter(|k| !exclude.contains(&k.id))
            .collect();
        if usable.is_empty() {
            return Err(NoKey::Exhausted);
        }
        let c = self.local.fetch_add(1, Ordering::Relaxed);
        Ok(usable[(c % usable.len() as u64) as usize])
    }

    /// Applies what an upstream answer says about a key to the shared state.
    pub async fn record(&self, store: &dyn StateStore, key: &ApiKey, outcome: &Outcome) {
        let state = match outcome {
            Outcome::RateLimited { until_ms, per_day } => {
                tracing::warn!(key_id = %key.id, until_ms, per_day, "key rate-limited; cooling down");
                MemberState::Cooling {
                    until_ms: *until_ms,
                }
            }
            Outcome::KeyRejected { reason } => {
                tracing::error!(key_id = %key.id, reason, "key rejected by upstream; disabled");
                MemberState::Disabled {
                    since_ms: now_ms(),
                    reason: reason.to_string(),
                }
            }
            _ => return,
        };
        if let Err(e) = store.set_member_state(RING, &key.id, Some(&state)).await {
            tracing::warn!(key_id = %key.id, error = %e, "could not record key state");
        }
    }
}

/// One key as operators see it: never the key itself.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyView {
    pub id: String,
    pub masked: String,
    /// `healthy`, `cooling` or `disabled`.
    pub state: &'static str,
    pub cooldown_until_ms: Option<u64>,
    pub disabled_reason: Option<String>,
}

impl KeyPool {
    /// Every configured key with its shared state at `now`.
    pub fn view(
        &self,
        states: &std::collections::HashMap<String, MemberState>,
        now: u64,
    ) -> Vec<KeyView> {
        self.keys
            .iter()
            .map(|k| {
                let (state, until, reason) = match states.get(&k.id) {
                    Some(MemberState::Cooling { until_ms }) if *until_ms > now => {
                        ("cooling", Some(*until_ms), None)
                    }
                    Some(MemberState::Disabled { reason, .. }) => {
                        ("disabled", None, Some(reason.clone()))
                    }
                    _ => ("healthy", None, None),
                };
                KeyView {
                    id: k.id.clone(),
                    masked: k.masked.clone(),
                    state,
                    cooldown_until_ms: until,
                    disabled_reason: reason,
                }
            })
            .collect()
    }
}
