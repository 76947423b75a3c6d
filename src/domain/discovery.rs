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

use actix_web::http::StatusCode;

use crate::domain::attempt;
use crate::domain::gateway::Gateway;
use crate::domain::keys::ApiKey;
use crate::domain::resources::{self, Kind, OwnerRecord};
use crate::state::StoreError;
use crate::upstream::client::{KeyStyle, Upstream};

const MISS_NS: &str = crate::state::keyspace::ns::DISCOVERY_MISS;
const MISS_TTL: Duration = Duration::from_secs(300);
const WAVE: usize = 8;
const PER_KEY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why discovery did not run to the end.
#[derive(Debug)]
pub enum DiscoveryError {
    Store(StoreError),
    /// The request's lookup budget ran out before these many resources were
    /// searched on every key.
    OverBudget {
        unknown: usize,
        budget: usize,
    },
    /// The calling token spent its lookups for this minute.
    RateLimited {
        retry_after_secs: u64,
    },
}

impl From<StoreError> for DiscoveryError {
    fn from(e: StoreError) -> Self {
        DiscoveryError::Store(e)
    }
}

impl DiscoveryError {
    /// Why the lookups were refused, when they were (a store failure is an
    /// outage, not a refusal).
    pub fn refusal(&self) -> Option<Refusal> {
        match *self {
            DiscoveryError::Store(_) => None,
            DiscoveryError::OverBudget { unknown, budget } => {
                Some(Refusal::OverBudget { unknown, budget })
            }
            DiscoveryError::RateLimited { retry_after_secs } => {
                Some(Refusal::RateLimited { retry_after_secs })
            }
        }
    }
}

/// Lookups of unknown owners that were not made, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A request names more unknown resources than its budget can search.
    OverBudget { unknown: usize, budget: usize },
    /// The token spent its lookups for this minute.
    RateLimited { retry_after_secs: u64 },
}

/// Lookups one token may make per minute, across every replica: a few
/// requests' worth of `GB_DISCOVERY_BUDGET`.
fn per_minute(gw: &Gateway) -> u64 {
    gw.settings.sessions.discovery_budget as u64 * 5
}

fn rate_bucket(token_id: &str, now_ms: u64) -> String {
    crate::state::keyspace::bucket::discovery(token_id, now_ms / 60_000)
}

/// The owners of `names` (in order), discovered and recorded (owned by
/// `token_id` from now on); `None` where no key can see the resource. At
/// most `GB_DISCOVERY_BUDGET` upstream lookups in all, a wave of keys at a
/// time, charged to the token's per-minute allowance.
pub async fn discover_many(
    gw: &Gateway,
    up: &Upstream,
    names: &[String],
    token_id: &str,
) -> Result<Vec<Option<OwnerRecord>>, DiscoveryError> {
    let store = gw.store();
    let missed = store.get_many(MISS_NS, names).await?;
    let mut found: Vec<Option<OwnerRecord>> = vec![None; names.len()];
    let todo: Vec<usize> = (0..names.len()).filter(|i| missed[*i].is_none()).collect();
    if todo.is_empty() {
        return Ok(found);
    }
    let now = crate::state::now_ms();
    let bucket = rate_bucket(token_id, now);
    let spent_this_minute = store
        .read_counts(std::slice::from_ref(&bucket))
        .await?
        .get("lookups")
        .copied()
        .unwrap_or(0);
    if spent_this_minute >= per_minute(gw) {
        let retry_after_secs = (60_000 - now % 60_000).div_ceil(1000);
        return Err(DiscoveryError::RateLimited { retry_after_secs });
    }
    let budget = gw.settings.sessions.discovery_budget;
    let mut spent = 0usize;
    let mut unresolved = 0usize;
    for i in todo {
        if spent >= budget {
            unresolved += 1;
            continue;
        }
        match search(gw, up, &names[i], budget - spent).await {
            (asked, Search::Found(key)) => {
                spent += asked;
                let record = OwnerRecord::new(&key.id, token_id);
                let name = &names[i];
                let ttl = Kind::of(name).unwrap_or(Kind::File).ttl(&gw.settings);
                resources::remember(store, name, &record, ttl).await?;
                if name.starts_with("files/") {
                    tracing::info!(file = %name, key_id = %key.id, "file owner discovered and recorded");
                } else {
                    tracing::info!(resource = %name, key_id = %key.id, "resource owner discovered and recorded");
                }
                found[i] = Some(record);
            }
            (asked, Search::Nobody) => {
                spent += asked;
                tracing::info!(resource = %names[i], "no pool key can see the resource; treated as unknown");
                store.put(MISS_NS, &names[i], "1", MISS_TTL).await?;
            }
            (asked, Search::Unsure) => {
                spent += asked;
                tracing::info!(resource = %names[i], "no pool key could confirm the resource now; treated as unknown, not remembered");
            }
            (asked, Search::CutShort) => {
                spent += asked;
                unresolved += 1;
            }
        }
    }
    if spent > 0 {
        store
            .add_counts(
                &bucket,
                &[("lookups".to_string(), spent as u64)],
                Duration::from_secs(120),
            )
            .await?;
    }
    if unresolved > 0 {
        tracing::warn!(
            unresolved,
            budget,
            "discovery budget spent; request refused"
        );
        return Err(DiscoveryError::OverBudget {
            unknown: unresolved,
            budget,
        });
    }
    Ok(found)
}

/// [`discover_many`] for one resource.
pub async fn discover(
    gw: &Gateway,
    up: &Upstream,
    name: &str,
    token_id: &str,
) -> Result<Option<OwnerRecord>, DiscoveryError> {
    Ok(discover_many(gw, up, &[name.to_string()], token_id)
        .await?
        .into_iter()
        .next()
        .flatten())
}

enum Search {
    Found(std::sync::Arc<ApiKey>),
    /// Every key answered that it cannot see it (403 or 404).
    Nobody,
    /// No key could see it, but some could not say (rate-limited, failing,
    /// unreachable): the owner may be one of them, so no miss is remembered.
    Unsure,
    /// The budget ran out before every key was asked.
    CutShort,
}

/// Asks the pool's keys, a wave at a time and at most `allowance` in all,
/// which of them can see `name`. Returns how many were asked.
/// One key's answer to "can you see it?".
enum Asked<'k> {
    Sees(&'k std::sync::Arc<ApiKey>),
    Denies,
    Unsure,
}

async fn search(gw: &Gateway, up: &Upstream, name: &str, allowance: usize) -> (usize, Search) {
    let path = format!("/v1beta/{name}");
    let headers = HeaderMap::new();
    let keys = gw.keys.keys();
    let mut asked = 0;
    let mut unsure = false;
    while asked < keys.len() {
        let room = allowance - asked;
        if room == 0 {
            return (asked, Search::CutShort);
        }
        let wave = &keys[asked..(asked + WAVE.min(room)).min(keys.len())];
        asked += wave.len();
        let asks = wave.iter().map(|key| {
            let request = attempt::Request {
                method: Method::GET,
                target: attempt::Target::Path(&path),
                headers: &headers,
                style: KeyStyle::GoogHeader,
                api: "discovery",
                timeout: Some(PER_KEY_TIMEOUT),
            };
            async move {
                match attempt::attempt(gw, up, key, request, attempt::Body::Empty).await {
                    attempt::Sent::Answer(_) => Asked::Sees(key),
                    attempt::Sent::Refused { status, .. }
                        if status == StatusCode::FORBIDDEN || status == StatusCode::NOT_FOUND =>
                    {
                        Asked::Denies
                    }
                    _ => Asked::Unsure,
                }
            }
        });
        for answer in join_all(asks).await {
            match answer {
                Asked::Sees(key) => return (asked, Search::Found(key.clone())),
                Asked::Unsure => unsure = true,
                Asked::Denies => {}
            }
        }
    }
    (
        asked,
        if unsure {
            Search::Unsure
        } else {
            Search::Nobody
        },
    )
}
