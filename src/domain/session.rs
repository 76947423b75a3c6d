//! Session ids: which requests must share one key, and which key that is.

use std::fmt;
use std::time::Duration;

use crate::domain::keys::{ApiKey, KeyPool, NoKey};
use crate::state::{MemberState, StateStore, StoreError};

const NS: &str = crate::state::keyspace::ns::SESSION;

/// A normalised, valid session id: 1–128 of `[a-z0-9._:-]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionId(String);

impl SessionId {
    /// Trims and lower-cases; `None` for anything invalid.
    pub fn parse(raw: &str) -> Option<Self> {
        let s = raw.trim().to_ascii_lowercase();
        let valid = !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._:-".contains(&b));
        valid.then_some(SessionId(s))
    }

    /// The implicit session of a client token's uploads: the token's id
    /// behind a prefix no client id can have (`@` is not in the id alphabet),
    /// never the token.
    pub fn for_token(token_id: &str) -> Self {
        SessionId(format!("{TOKEN_PREFIX}{token_id}"))
    }

    /// Parses a client id, or an implicit token session's id (admin look-ups).
    pub fn parse_any(raw: &str) -> Option<Self> {
        match raw.trim().strip_prefix(TOKEN_PREFIX) {
            Some(id)
                if !id.is_empty()
                    && id.len() <= 64
                    && id.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                Some(Self::for_token(&id.to_ascii_lowercase()))
            }
            Some(_) => None,
            None => Self::parse(raw),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Prefix of implicit per-token upload sessions.
pub const TOKEN_PREFIX: &str = "@token:";

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a request carried its session id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Path,
    Header,
    Query,
    /// No id was sent: an upload bound through its client token
    /// (`GB_UPLOAD_AFFINITY=token`).
    Token,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Path => "path",
            Source::Header => "header",
            Source::Query => "query",
            Source::Token => "token",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Session {
    pub id: SessionId,
    pub source: Source,
}

impl Session {
    /// The implicit upload session of a client token.
    pub fn for_token(token_id: &str) -> Self {
        Session {
            id: SessionId::for_token(token_id),
            source: Source::Token,
        }
    }
}

/// Picks the session id of a request: path prefix, then header, then query.
/// An invalid id is ignored with a warning, never refused.
pub fn pick(path: Option<&str>, header: Option<&str>, query: Option<&str>) -> Option<Session> {
    [
        (path, Source::Path),
        (header, Source::Header),
        (query, Source::Query),
    ]
    .into_iter()
    .find_map(|(raw, source)| {
        let raw = raw?;
        match SessionId::parse(raw) {
            Some(id) => Some(Session { id, source }),
            None => {
                tracing::warn!(
                    source = source.as_str(),
                    len = raw.len(),
                    "ignoring an invalid session id (want 1-128 of a-z 0-9 . _ : -)"
                );
                None
            }
        }
    })
}

/// Every key's health as one store read saw it.
pub type KeyStates = std::collections::HashMap<String, MemberState>;

#[derive(Debug)]
pub enum BindError {
    Store(StoreError),
    NoKey(NoKey),
}

/// The key a session is bound to, binding it now if it is new (the flag says
/// whether this call bound it). Every use slides the binding's expiry. A
/// binding to a disabled (or no longer configured) key is moved to a healthy
/// key. An implicit token session also moves off a key that cools for longer
/// than `pin_wait` (files already uploaded stay with their owner); a session
/// the client named stays, and its requests wait or get 429.
pub async fn resolve(
    store: &dyn StateStore,
    pool: &KeyPool,
    session: &Session,
    ttl: Duration,
    pin_wait: Duration,
) -> Result<(std::sync::Arc<ApiKey>, bool, KeyStates), BindError> {
    let sid = session.id.as_str();
    let (bound, unusable, states) = {
        let bound = store.touch(NS, sid, ttl);
        let states = store.member_states(crate::domain::keys::RING);
        let (bound, states) = futures_util::future::join(bound, states).await;
        let bound = bound.map_err(BindError::Store)?;
        let states = states.map_err(BindError::Store)?;
        let now = crate::state::now_ms();
        let unusable = bound.as_ref().is_some_and(|id| {
            match crate::state::effective_state(&states, id, None, now) {
                Some(MemberState::Disabled { .. }) => true,
                Some(MemberState::Cooling { until_ms, .. }) => {
                    session.source == Source::Token
                        && until_ms.saturating_sub(now) > pin_wait.as_millis() as u64
                }
                None => false,
            }
        });
        (bound, unusable, states)
    };

    if let Some(id) = &bound {
        if !unusable {
            if let Some(key) = pool.by_id(id) {
                tracing::info!(session = sid, key_id = %key.id, source = session.source.as_str(), "reusing the key bound to the session");
                return Ok((key, false, states));
            }
        }
    }

    let candidate = pool
        .next(store, &[], None)
        .await
        .map_err(BindError::NoKey)?;
    match bound {
        Some(old) => {
            let now = store
                .replace(NS, sid, &old, &candidate.id, ttl)
                .await
                .map_err(BindError::Store)?;
            let key = pool.by_id(&now).unwrap_or(candidate);
            tracing::info!(session = sid, old_key_id = %old, key_id = %key.id, source = session.source.as_str(), "session re-bound: its key is disabled, cooling or gone");
            Ok((key, true, states))
        }
        None => {
            let (now, created) = store
                .claim(NS, sid, &candidate.id, ttl)
                .await
                .map_err(BindError::Store)?;
            match pool.by_id(&now) {
                Some(key) if created => {
                    tracing::info!(session = sid, key_id = %key.id, source = session.source.as_str(), "session bound to a key");
                    Ok((key, true, states))
                }
                Some(key) => {
                    tracing::info!(session = sid, key_id = %key.id, source = session.source.as_str(), "reusing the key bound to the session");
                    Ok((key, false, states))
                }
                None => {
                    // Bound concurrently by a replica that knows a key this one
                    // does not: take it over with ours.
                    let now = store
                        .replace(NS, sid, &now, &candidate.id, ttl)
                        .await
                        .map_err(BindError::Store)?;
                    Ok((pool.by_id(&now).unwrap_or(candidate), true, states))
                }
            }
        }
    }
}

/// The key id a session is bound to, without touching it (admin look-ups).
pub async fn lookup(store: &dyn StateStore, sid: &SessionId) -> Result<Option<String>, StoreError> {
    Ok(store
        .get_many(NS, &[sid.as_str().to_string()])
        .await?
        .into_iter()
        .next()
        .flatten())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_normalised_and_validated() {
        assert_eq!(
            SessionId::parse("  ABC-123:x.y_z ").unwrap().as_str(),
            "abc-123:x.y_z"
        );
        assert!(SessionId::parse("").is_none());
        assert!(SessionId::parse("has space").is_none());
        assert!(SessionId::parse("slash/no").is_none());
        assert!(SessionId::parse(&"a".repeat(128)).is_some());
        assert!(SessionId::parse(&"a".repeat(129)).is_none());
    }

    #[test]
    fn first_valid_source_wins_and_invalid_ones_are_skipped() {
        let s = pick(Some("bad id"), Some("H"), Some("q")).unwrap();
        assert_eq!((s.id.as_str(), s.source), ("h", Source::Header));
        let s = pick(Some("p"), Some("h"), None).unwrap();
        assert_eq!(s.source, Source::Path);
        assert!(pick(None, None, None).is_none());
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn parsing_is_total_and_normalises(raw in ".{0,200}") {
                if let Some(id) = SessionId::parse(&raw) {
                    let s = id.as_str();
                    prop_assert!(!s.is_empty() && s.len() <= 128);
                    prop_assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._:-".contains(&b)));
                    prop_assert_eq!(SessionId::parse(s), Some(id.clone()));
                }
            }

            #[test]
            fn valid_ids_in_any_case_parse(raw in "[A-Za-z0-9._:-]{1,128}", pad in " {0,3}") {
                let id = SessionId::parse(&format!("{pad}{raw}{pad}")).expect("valid");
                prop_assert_eq!(id.as_str(), raw.to_ascii_lowercase());
            }
        }
    }
}
