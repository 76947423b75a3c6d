//! Which key a body must go to: the one owning every resource it names.

use crate::domain::gateway::Gateway;
use crate::domain::keys::ApiKey;
use crate::state::StoreError;
use crate::upstream::client::Upstream;

use super::{owners, scan_refs};

/// Why the resources a body names cannot decide its key.
#[derive(Debug)]
pub enum RefError {
    Store(StoreError),
    /// Discovery of unknown owners was refused (over budget, or the token's
    /// lookup rate).
    Refused(crate::domain::discovery::Refusal),
    /// The named resources belong to a key no longer configured (their
    /// names).
    GoneKey(Vec<String>),
    /// The named resources belong to different keys (their names).
    Mixed(Vec<String>),
}

impl From<crate::domain::discovery::DiscoveryError> for RefError {
    fn from(e: crate::domain::discovery::DiscoveryError) -> Self {
        match e.refusal() {
            Some(refusal) => RefError::Refused(refusal),
            None => match e {
                crate::domain::discovery::DiscoveryError::Store(s) => RefError::Store(s),
                _ => RefError::Store(StoreError::Unavailable("discovery failed".into())),
            },
        }
    }
}

/// The key owning every resource `body` names, if it names any the gateway
/// knows (or can discover); an error when they belong to different keys.
pub async fn body_owner(
    gw: &Gateway,
    up: &Upstream,
    body: &[u8],
    token_id: &str,
) -> Result<Option<std::sync::Arc<ApiKey>>, RefError> {
    let refs = scan_refs(body);
    if refs.is_empty() {
        return Ok(None);
    }
    let mut records = owners(gw.store(), &refs).await.map_err(RefError::Store)?;
    let unknown: Vec<usize> = (0..refs.len()).filter(|i| records[*i].is_none()).collect();
    if !unknown.is_empty() {
        let names: Vec<String> = unknown.iter().map(|i| refs[*i].clone()).collect();
        let found = crate::domain::discovery::discover_many(gw, up, &names, token_id)
            .await
            .map_err(RefError::from)?;
        for (i, record) in unknown.into_iter().zip(found) {
            records[i] = record;
        }
    }
    let mut owned: Vec<(&str, &str)> = refs
        .iter()
        .zip(&records)
        .filter_map(|(name, rec)| rec.as_ref().map(|r| (name.as_str(), r.key.as_str())))
        .collect();
    owned.sort_by_key(|(_, key)| *key);
    let mut keys: Vec<&str> = owned.iter().map(|(_, k)| *k).collect();
    keys.dedup();
    match keys.as_slice() {
        [] => Ok(None),
        [one] => match gw.keys.by_id(one) {
            Some(key) => Ok(Some(key)),
            None => Err(RefError::GoneKey(
                owned.iter().map(|(n, _)| (*n).to_string()).collect(),
            )),
        },
        _ => Err(RefError::Mixed(
            owned.iter().map(|(n, _)| n.to_string()).collect(),
        )),
    }
}
