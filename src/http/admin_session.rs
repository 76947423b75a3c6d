//! Sessions of the admin status page: a random id in the browser's cookie,
//! its digest in the shared store with a fixed lifetime. Logging out deletes
//! it; a new admin token ends every session (each session remembers which
//! token opened it, by a digest); any replica can check a session. The
//! store never holds the cookie or the token.

use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::state::{StateStore, StoreError};

const NS: &str = crate::state::keyspace::ns::ADMIN_SESSION;

/// A new session id: 256 random bits, hex.
pub fn new_id() -> Result<String, StoreError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| StoreError::Unavailable(format!("no randomness for a session id: {e}")))?;
    Ok(hex::encode(bytes))
}

fn digest(label: &str, value: &str) -> String {
    hex::encode(Sha256::digest(format!("{label}:{value}").as_bytes()))
}

/// Which admin token opened a session (a digest, never the token).
pub use crate::domain::clients::generation;

/// The form token that proves a POST comes from a page of this session.
pub fn csrf_token(session_id: &str) -> String {
    digest("gb-admin-csrf", session_id)
}

pub fn csrf_matches(session_id: &str, presented: &str) -> bool {
    bool::from(
        csrf_token(session_id)
            .as_bytes()
            .ct_eq(presented.as_bytes()),
    )
}

pub async fn open(
    store: &dyn StateStore,
    id: &str,
    generation: &str,
    ttl: Duration,
) -> Result<(), StoreError> {
    store
        .put(NS, &digest("gb-admin-session", id), generation, ttl)
        .await
}

/// Whether `id` is a live session opened by the current admin token.
pub async fn valid(store: &dyn StateStore, id: &str, generation: &str) -> bool {
    let key = digest("gb-admin-session", id);
    match store.get_many(NS, &[key]).await {
        Ok(found) => found
            .into_iter()
            .next()
            .flatten()
            .is_some_and(|g| bool::from(g.as_bytes().ct_eq(generation.as_bytes()))),
        Err(_) => false,
    }
}

pub async fn close(store: &dyn StateStore, id: &str) -> Result<(), StoreError> {
    store.delete(NS, &digest("gb-admin-session", id)).await
}
