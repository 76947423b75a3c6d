//! Live API sessions: which key a new session gets, how open sessions are
//! counted per key across replicas, and what an early close says about a
//! key.
//!
//! Google limits concurrent Live sessions per project, so every open
//! session is a member of the shared index `live:{key id}` with a short
//! expiry that the relaying replica renews; a replica that dies stops
//! renewing and its sessions age out. A new session prefers a key with
//! fewer than `GB_LIVE_SESSIONS_PER_KEY` open sessions.

use std::time::Duration;

use crate::domain::gateway::Gateway;
use crate::domain::keys::{ApiKey, NoKey};
use crate::state::{now_ms, StateStore, StoreError};
use crate::upstream::outcome::Outcome;

/// How long an open session counts without a heartbeat.
pub const SESSION_TTL: Duration = Duration::from_secs(30);
/// How often the relaying replica renews its sessions.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// How long a key rate-limited by a Live close cools down.
const QUOTA_COOLDOWN: Duration = Duration::from_secs(60);

fn index(key_id: &str) -> String {
    crate::state::keyspace::index::live_sessions(key_id)
}

/// Counts (or renews) one open session on a key.
pub async fn hold(store: &dyn StateStore, key_id: &str, session: &str) -> Result<(), StoreError> {
    store
        .index_add(&index(key_id), session, SESSION_TTL, now_ms())
        .await
}

pub async fn release(store: &dyn StateStore, key_id: &str, session: &str) {
    if let Err(e) = store.index_remove(&index(key_id), session).await {
        tracing::warn!(key_id, error = %e, "a closed Live session stays counted until it expires");
    }
}

/// Open Live sessions on a key, across replicas.
pub async fn open_on(store: &dyn StateStore, key_id: &str) -> Result<usize, StoreError> {
    Ok(store.index_members(&index(key_id), now_ms()).await?.len())
}

/// The key for a new session: the next healthy key by rotation that has
/// room, skipping `tried`; when every healthy key is at the cap, the first
/// of them (Google, not the gateway, has the last word on the limit).
pub async fn choose(gw: &Gateway, tried: &[String]) -> Result<std::sync::Arc<ApiKey>, NoKey> {
    let cap = gw.settings.live.sessions_per_key;
    let mut exclude = tried.to_vec();
    let mut full: Option<std::sync::Arc<ApiKey>> = None;
    for _ in 0..gw.keys.keys().len() {
        let key = match gw.keys.next(gw.store(), &exclude, None).await {
            Ok(key) => key,
            Err(no) => return full.ok_or(no),
        };
        match open_on(gw.store(), &key.id).await {
            Ok(n) if n >= cap => {
                tracing::debug!(key_id = %key.id, open = n, "key at its Live session cap; trying another");
                full.get_or_insert_with(|| key.clone());
                exclude.push(key.id.clone());
            }
            _ => return Ok(key),
        }
    }
    full.ok_or(NoKey::Exhausted)
}

/// What a close before `setupComplete` says about the key, if anything:
/// an invalid key or exhausted quota (another key may do); `None` for any
/// other reason, which is the session's own fault.
pub fn classify_close(code: u16, reason: &str) -> Option<Outcome> {
    let lower = reason.to_ascii_lowercase();
    if lower.contains("api key not valid")
        || lower.contains("api_key_invalid")
        || lower.contains("api key expired")
    {
        return Some(Outcome::KeyRejected {
            reason: "api_key_invalid",
        });
    }
    if lower.contains("quota") || lower.contains("resource_exhausted") || code == 1013 {
        return Some(Outcome::RateLimited {
            until_ms: now_ms() + QUOTA_COOLDOWN.as_millis() as u64,
            per_day: false,
            model: None,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_closes_are_read_for_what_they_say_about_the_key() {
        assert!(matches!(
            classify_close(1007, "API key not valid. Please pass a valid API key."),
            Some(Outcome::KeyRejected { .. })
        ));
        assert!(matches!(
            classify_close(
                1011,
                "You exceeded your current quota, please check your plan and billing details."
            ),
            Some(Outcome::RateLimited { .. })
        ));
        assert!(classify_close(1007, "models/nope is not found").is_none());
        assert!(classify_close(1000, "").is_none());
    }
}
