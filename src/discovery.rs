//! Lost bindings recover: when a request names a resource (a file, a cache, a
//! batch, an operation, a file search store) whose owner the store
//! does not know (uploaded before the gateway kept state, uploaded directly
//! with a pool key, or Redis lost its data), the owner is found by asking the
//! pool's keys for the file's metadata — a few keys at a time, stopping at
//! the first that can see it — and recorded like an upload's. A miss is
//! remembered briefly, so a bogus file id cannot make every request fan out.

use std::time::Duration;

use actix_web::http::header::HeaderMap;
use actix_web::http::Method;
use futures_util::future::join_all;

use crate::gateway::Gateway;
use crate::resources::{self, Kind, OwnerRecord};
use crate::store::StoreError;
use crate::upstream::{KeyStyle, Upstream};

const MISS_NS: &str = "file-miss";
const MISS_TTL: Duration = Duration::from_secs(300);
const WAVE: usize = 8;
const PER_KEY_TIMEOUT: Duration = Duration::from_secs(10);

/// The owner of `name`, discovered and recorded (owned by `token_id` from
/// now on), or `None` when no key can see it.
pub async fn discover(
    gw: &Gateway,
    up: &Upstream,
    name: &str,
    token_id: &str,
) -> Result<Option<OwnerRecord>, StoreError> {
    let store = gw.store();
    if store
        .get_many(MISS_NS, &[name.to_string()])
        .await?
        .into_iter()
        .flatten()
        .next()
        .is_some()
    {
        return Ok(None);
    }
    let path = format!("/v1beta/{name}");
    let headers = HeaderMap::new();
    let mut owner = None;
    for wave in gw.keys.keys().chunks(WAVE) {
        let asks = wave.iter().map(|key| {
            let req = up.request(
                Method::GET,
                &path,
                &headers,
                Some(key),
                KeyStyle::GoogHeader,
            );
            async move {
                match tokio::time::timeout(PER_KEY_TIMEOUT, req.send()).await {
                    Ok(Ok(resp)) if resp.status().is_success() => Some(key),
                    _ => None,
                }
            }
        });
        if let Some(key) = join_all(asks).await.into_iter().flatten().next() {
            owner = Some(key);
            break;
        }
    }
    let Some(key) = owner else {
        tracing::info!(
            resource = name,
            "no pool key can see the resource; treated as unknown"
        );
        store.put(MISS_NS, name, "1", MISS_TTL).await?;
        return Ok(None);
    };
    let record = OwnerRecord::new(&key.id, token_id);
    let ttl = Kind::of(name).unwrap_or(Kind::File).ttl(&gw.settings);
    resources::remember(store, name, &record, ttl).await?;
    if name.starts_with("files/") {
        tracing::info!(file = name, key_id = %key.id, "file owner discovered and recorded");
    } else {
        tracing::info!(resource = name, key_id = %key.id, "resource owner discovered and recorded");
    }
    Ok(Some(record))
}
