//! Owner records: who owns each resource, kept per name with the TTL of
//! its type, and the per-token index that lists a client's resources page
//! by page.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Kind;
use crate::state::keyspace::ns;
use crate::state::{now_ms, IndexEntry, StateStore, StoreError};

/// Who owns one resource.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OwnerRecord {
    /// Key id of the owner key.
    pub key: String,
    /// Token id of the client that created it.
    pub owner: String,
    /// When it was recorded (ms since the epoch); 0 in records written by
    /// earlier versions.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub created: u64,
}

#[allow(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl OwnerRecord {
    pub fn new(key: &str, owner: &str) -> Self {
        Self {
            key: key.to_string(),
            owner: owner.to_string(),
            created: now_ms(),
        }
    }
}

/// The name an ephemeral Live token's owner is recorded under: a hash, since
/// the token itself is a credential.
pub fn live_token_name(token: &str) -> String {
    use sha2::{Digest, Sha256};
    format!(
        "auth_tokens/{}",
        hex::encode(&Sha256::digest(token.as_bytes())[..12])
    )
}

/// `[A-Za-z0-9_-]{1,128}`: the id part of a resource name (Google's ids are
/// lower-case letters, digits and dashes; a little leeway costs nothing).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The owner records of several resources, in order; `None` for unknown
/// ones. One store read per type named.
pub async fn owners(
    store: &dyn StateStore,
    names: &[String],
) -> Result<Vec<Option<OwnerRecord>>, StoreError> {
    let mut out = vec![None; names.len()];
    for namespace in [ns::FILE, ns::RESOURCE] {
        let (at, group): (Vec<usize>, Vec<String>) = names
            .iter()
            .enumerate()
            .filter(|(_, n)| Kind::of(n).unwrap_or(Kind::File).ns() == namespace)
            .map(|(i, n)| (i, n.clone()))
            .unzip();
        if group.is_empty() {
            continue;
        }
        let raw = store.get_many(namespace, &group).await?;
        for (i, value) in at.into_iter().zip(raw) {
            out[i] = value.and_then(|s| serde_json::from_str(&s).ok());
        }
    }
    Ok(out)
}

pub async fn owner(store: &dyn StateStore, name: &str) -> Result<Option<OwnerRecord>, StoreError> {
    Ok(owners(store, &[name.to_string()])
        .await?
        .into_iter()
        .next()
        .flatten())
}

/// Records that `name` belongs to `record.key` and to the token
/// `record.owner`, for `ttl`.
pub async fn remember(
    store: &dyn StateStore,
    name: &str,
    record: &OwnerRecord,
    ttl: Duration,
) -> Result<(), StoreError> {
    let kind = Kind::of(name).unwrap_or(Kind::File);
    let value = serde_json::to_string(record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let ttl = ttl.max(Duration::from_secs(1));
    store.put(kind.ns(), name, &value, ttl).await?;
    store
        .index_add(&kind.token_index(&record.owner), name, ttl, now_ms())
        .await
}

pub async fn forget(store: &dyn StateStore, name: &str, owner: &str) -> Result<(), StoreError> {
    let kind = Kind::of(name).unwrap_or(Kind::File);
    store.delete(kind.ns(), name).await?;
    store.index_remove(&kind.token_index(owner), name).await
}

/// The resources of one type a client token created that are still alive,
/// newest first.
pub async fn of_token(
    store: &dyn StateStore,
    kind: Kind,
    token_id: &str,
) -> Result<Vec<String>, StoreError> {
    store
        .index_members(&kind.token_index(token_id), now_ms())
        .await
}

/// One page of the resources of one type a client token created, newest
/// first, and the place the next page starts after (when there is one).
pub async fn page_of_token(
    store: &dyn StateStore,
    kind: Kind,
    token_id: &str,
    after: Option<&IndexEntry>,
    size: usize,
) -> Result<(Vec<String>, Option<IndexEntry>), StoreError> {
    let mut entries = store
        .index_page(&kind.token_index(token_id), now_ms(), after, size + 1)
        .await?;
    let next = if entries.len() > size {
        entries.truncate(size);
        entries.last().cloned()
    } else {
        None
    };
    Ok((entries.into_iter().map(|e| e.member).collect(), next))
}

/// The page token of a place in a token's list: the entry's expiry and its
/// name, opaque to clients. Files that arrive later sort before it, so the
/// pages after it neither repeat nor skip one.
pub fn page_token(place: &IndexEntry) -> String {
    format!(
        "{}.{}",
        place.expires_ms,
        hex::encode(place.member.as_bytes())
    )
}

/// The place a page token names, if it is one this gateway wrote for a list
/// of `kind`.
pub fn parse_page_token(token: &str, kind: Kind) -> Option<IndexEntry> {
    let (expires, member) = token.split_once('.')?;
    if expires.is_empty() || !expires.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let member = String::from_utf8(hex::decode(member).ok()?).ok()?;
    let id = member.rsplit('/').next()?;
    (Kind::of(&member) == Some(kind) && valid_id(id)).then_some(IndexEntry {
        member,
        expires_ms: expires.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_garbage_is_refused() {
        let place = IndexEntry {
            member: "files/abc-1".into(),
            expires_ms: 1_764_400_000_000,
        };
        let token = page_token(&place);
        assert_eq!(parse_page_token(&token, Kind::File), Some(place));
        assert_eq!(parse_page_token(&token, Kind::CachedContent), None);
        for bad in [
            "",
            "10",
            "zz",
            "1.zz",
            ".6669",
            "x.66696c65732f61",
            "-1.66696c65732f61",
        ] {
            assert_eq!(parse_page_token(bad, Kind::File), None, "{bad}");
        }
    }
}
