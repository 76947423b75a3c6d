//! The resolve step: which key a request must use (a resource's owner, a
//! session's or upload's binding), and, for one that may use any, the next
//! healthy key by the shared rotation. A pinned key that cools or whose
//! known window is full is waited for, within `GB_PIN_WAIT`.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;

use crate::domain::gateway::Gateway;
use crate::domain::keys::{ApiKey, NoKey};
use crate::domain::requests::Chosen;
use crate::domain::resources::RefError;
use crate::domain::session::{self, BindError, Session};
use crate::http::error::{mixed_message, ApiError};
use crate::state::{effective_state, now_ms, MemberState};
use crate::upstream::client::Upstream;

/// A key a request must use, with every key's health when pinning it
/// already read that (so the send step need not read it again).
pub struct Pinned {
    pub key: Arc<ApiKey>,
    states: Option<session::KeyStates>,
    /// Why this key, for the request log.
    pub how: Chosen,
    /// Whether the key's health is checked before sending: a cooling key
    /// waited for, a disabled one refused. Not for an upload session Google
    /// already opened on the key, or a file it holds: only that key can
    /// reach them, whatever its state.
    checked: bool,
}

impl Pinned {
    /// A key known from elsewhere (a resource's owner): its health is read
    /// when the request is sent.
    pub fn to(key: Arc<ApiKey>) -> Self {
        Self {
            key,
            states: None,
            how: Chosen::ResourceOwner,
            checked: true,
        }
    }

    /// A key that is the only way to what the request names (a file, an
    /// open upload session): sent to as it is.
    pub fn only(key: Arc<ApiKey>) -> Self {
        Self::to(key).unchecked()
    }

    /// The same key, sent to whatever its health.
    #[must_use]
    pub fn unchecked(self) -> Self {
        Self {
            checked: false,
            ..self
        }
    }
}

/// The key a request must use, if any: the owner of the resources its body
/// names, else its session's key.
pub async fn pin(
    gw: &Gateway,
    up: &Upstream,
    body: &[u8],
    session: Option<&Session>,
    token_id: &str,
) -> Result<Option<Pinned>, ApiError> {
    match crate::domain::resources::body_owner(gw, up, body, token_id).await {
        Ok(Some(key)) => return Ok(Some(Pinned::to(key))),
        Ok(None) => {}
        Err(e) => return Err(ref_error(gw, e, Vec::new())),
    }
    if let Some(s) = session {
        let (ttl, wait) = (gw.settings.sessions.ttl, gw.settings.sessions.pin_wait);
        return match session::resolve(gw.store(), &gw.keys, s, ttl, wait).await {
            Ok((key, bound_now, states)) => {
                if bound_now {
                    gw.metrics.sessions_bound.inc();
                    if s.source == session::Source::Token {
                        gw.metrics.uploads_bound_by_token.inc();
                    }
                }
                Ok(Some(Pinned {
                    key,
                    states: Some(states),
                    how: if s.source == session::Source::Token {
                        Chosen::UploadBinding
                    } else {
                        Chosen::Session
                    },
                    checked: true,
                }))
            }
            Err(BindError::Store(e)) => Err(store_down(e)),
            Err(BindError::NoKey(no)) => Err(ApiError::from(no)),
        };
    }
    Ok(None)
}

/// Why the resources a body names give it no single key, as the client's
/// error; `also`: names the route adds (the resource it acts on).
pub fn ref_error(gw: &Gateway, e: RefError, also: Vec<String>) -> ApiError {
    match e {
        RefError::Store(e) => store_down(e),
        RefError::Refused(e) => ApiError::from(e),
        RefError::GoneKey(names) => crate::http::error::gone_key(&names),
        RefError::Mixed(mut names) => {
            names.extend(also);
            mixed_owners(gw, &names)
        }
    }
}

/// 409: what a request names lives on different keys.
pub fn mixed_owners(gw: &Gateway, names: &[String]) -> ApiError {
    gw.metrics.mixed_owner_conflicts.inc();
    let advice = split_advice(gw.settings.sessions.upload_affinity);
    ApiError::new(StatusCode::CONFLICT, mixed_message(names, advice)).kind("mixed_owners")
}

/// Why files that belong together can still land on different keys, and how
/// to avoid it, for the affinity mode in force.
fn split_advice(affinity: crate::settings::UploadAffinity) -> &'static str {
    match affinity {
        crate::settings::UploadAffinity::Token => {
            "With GB_UPLOAD_AFFINITY=token the uploads of one client token share a key, \
             unless that key was rate-limited or disabled when a later file was uploaded: \
             then new uploads moved to another key. Upload the files again, or wait until \
             the key's cooldown ends; to keep each conversation's files together, send one \
             session id per conversation (X-Session-Id header or the /session/{id} base URL)."
        }
        crate::settings::UploadAffinity::None => {
            "With GB_UPLOAD_AFFINITY=none uploads are spread over the keys by rotation. \
             Upload files that are used together with one session id (X-Session-Id header \
             or the /session/{id} base URL)."
        }
    }
}

/// The session an upload is bound through: the one the client named, else
/// (with `GB_UPLOAD_AFFINITY=token`) the implicit session of its token.
pub(super) fn upload_session(
    gw: &Gateway,
    named: Option<&Session>,
    token_id: &str,
) -> Option<Session> {
    match (named, gw.settings.sessions.upload_affinity) {
        (Some(s), _) => Some(s.clone()),
        (None, crate::settings::UploadAffinity::Token) => Some(Session::for_token(token_id)),
        (None, crate::settings::UploadAffinity::None) => None,
    }
}

pub fn store_down(e: crate::state::StoreError) -> ApiError {
    tracing::warn!(error = %e, "a request that needs a binding answered 503");
    ApiError::store_unavailable()
}

/// The next key by rotation. When every key's known window for the model
/// is full, the request waits for the earliest to free up, for at most
/// `GB_PIN_WAIT` in all; then it gets 429 with that time.
pub(super) async fn next_key(
    gw: &Gateway,
    tried: &[String],
    model: Option<&str>,
    windowed: bool,
    deadline: u64,
) -> Result<Arc<ApiKey>, NoKey> {
    let mut counted = false;
    loop {
        match gw.keys.next_for(gw.store(), tried, model, windowed).await {
            Err(NoKey::WindowsFull { model, until_ms }) => {
                if !counted {
                    gw.metrics.window_full(&model);
                    counted = true;
                }
                if until_ms > deadline {
                    return Err(NoKey::WindowsFull { model, until_ms });
                }
                let rest = until_ms.saturating_sub(now_ms()).max(1);
                tokio::time::sleep(Duration::from_millis(rest)).await;
            }
            other => return other,
        }
    }
}

/// A pinned key, ready to send to. A request pinned to a key (session or
/// resource owner) never moves to another key. While that key cools
/// (key-wide, or for the request's model), the request waits out a rest of
/// at most `GB_PIN_WAIT`; a longer one is answered at once with 429 and
/// `RetryInfo`, without an upstream call. A disabled key is not sent to:
/// the answer would be sure to fail.
pub(super) async fn ready(
    gw: &Gateway,
    pinned: Pinned,
    model: Option<&str>,
    windowed: bool,
    deadline: u64,
) -> Result<Arc<ApiKey>, ApiError> {
    let Pinned {
        key,
        states,
        checked,
        ..
    } = pinned;
    if !checked {
        return Ok(key);
    }
    let states = match states {
        Some(states) => states,
        None => match gw.store().member_states(crate::domain::keys::RING).await {
            Ok(states) => states,
            // No shared view of the key's health: send, as an unpinned request would.
            Err(_) => return Ok(key),
        },
    };
    let windowed = model.filter(|_| windowed);
    match effective_state(&states, &key.id, model, now_ms()) {
        None => wait_for_window(gw, &key, windowed, deadline).await?,
        Some(MemberState::Disabled { reason, .. }) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "This request is pinned to API key {} (by its session or the files it \
                     uses), and that key is disabled ({reason}). Files uploaded with it cannot \
                     be used until it is enabled again.",
                    key.id
                ),
            )
            .kind("pinned_key_disabled"))
        }
        Some(MemberState::Cooling { until_ms, .. }) => {
            let rest = until_ms.saturating_sub(now_ms());
            if now_ms() + rest > deadline {
                let what = model.map_or_else(String::new, |m| format!(" for model {m}"));
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "This request is pinned to API key {} (by its session or the files it \
                         uses), which is rate-limited{what}. Retry after the Retry-After delay.",
                        key.id
                    ),
                )
                .retry_after(rest.div_ceil(1000))
                .kind("pinned_key_cooling"));
            }
            tracing::info!(key_id = %key.id, wait_ms = rest, "pinned key is cooling; waiting for it");
            tokio::time::sleep(Duration::from_millis(rest)).await;
            wait_for_window(gw, &key, windowed, deadline).await?;
        }
    }
    Ok(key)
}

/// A pinned request counts in its key's known window for its model; a
/// full window is waited out for at most `GB_PIN_WAIT`, else 429 with
/// `RetryInfo` and no upstream call.
async fn wait_for_window(
    gw: &Gateway,
    key: &ApiKey,
    model: Option<&str>,
    deadline: u64,
) -> Result<(), ApiError> {
    let Some(model) = model else {
        return Ok(());
    };
    let mut counted = false;
    loop {
        let Err(full) = gw.keys.spend_pinned(gw.store(), key, model).await else {
            return Ok(());
        };
        if !counted {
            gw.metrics.window_full(model);
            counted = true;
        }
        if full.until_ms > deadline {
            let rest = full.until_ms.saturating_sub(now_ms());
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "This request is pinned to API key {} (by its session or the files it \
                     uses), which has used its known limit for model {model} (the limits \
                     file's [keys]). Retry after the Retry-After delay.",
                    key.id
                ),
            )
            .retry_after(rest.div_ceil(1000))
            .kind("pinned_key_window_full"));
        }
        let rest = full.until_ms.saturating_sub(now_ms()).max(1);
        tokio::time::sleep(Duration::from_millis(rest)).await;
    }
}
