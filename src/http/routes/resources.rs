//! Per-project resources other than files: context caches, batches,
//! long-running operations and file search stores (with their documents and
//! operations). Each is created on some key, recorded against that key and
//! the creating client token, and from then on read, changed and deleted on
//! that key only; another token gets 404, as if it did not exist. Lists are
//! the calling token's resources, fetched from their owner keys.

use actix_web::http::{Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::future::join_all;
use serde_json::{json, Value};

use super::{authorized_json, Edge};
use crate::domain::gateway::Gateway;
use crate::domain::keys::ApiKey;
use crate::domain::resources::{self, Kind, OwnerRecord};
use crate::http::error::{ApiError, Flavor};
use crate::http::pipeline::{self, Call};
use crate::state::{now_ms, IndexEntry};
use crate::upstream::client::{query_param, Upstream};

const FLAVOR: Flavor = Flavor::Gemini;
const DEFAULT_PAGE: usize = 10;
const MAX_PAGE: usize = 100;
/// Largest answer read to learn what it created or produced.
const ANSWER_LIMIT: usize = 8 << 20;

/// Model methods whose answer names a new resource on the key that served it.
const CREATING_ACTIONS: [&str; 3] = [
    ":batchGenerateContent",
    ":asyncBatchEmbedContent",
    ":predictLongRunning",
];

/// What a `/{ver}/…` path (segments after the version) asks of a resource.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// Creates a resource; the answer names it.
    Create,
    /// The calling token's resources of one type.
    List(Kind),
    /// Anything on an existing resource (its sub-resources included), by the
    /// name of the resource that decides the key.
    Owned(String),
    /// Mints an ephemeral Live API token on some key.
    MintToken,
    /// A resource path with an id that cannot be one.
    BadId,
}

/// The resource route of a path, if it is one.
pub fn route(segs: &[&str], method: &Method) -> Option<Route> {
    let owned = |coll: &str, id: &str| {
        let bare = id.split(':').next().unwrap_or("");
        if resources::valid_id(bare) {
            Route::Owned(format!("{coll}/{bare}"))
        } else {
            Route::BadId
        }
    };
    match segs {
        ["auth_tokens"] if method == Method::POST => Some(Route::MintToken),
        [coll @ ("cachedContents" | "fileSearchStores")] if method == Method::POST => {
            let _ = coll;
            Some(Route::Create)
        }
        [coll @ ("cachedContents" | "fileSearchStores" | "batches")] if method == Method::GET => {
            Kind::of(&format!("{coll}/x")).map(Route::List)
        }
        [coll @ ("cachedContents" | "fileSearchStores" | "batches" | "operations"), id, ..] => {
            Some(owned(coll, id))
        }
        ["models", model, "operations", id] => {
            let bare = id.split(':').next().unwrap_or("");
            if resources::valid_id(bare) && !model.is_empty() {
                Some(Route::Owned(format!("models/{model}/operations/{bare}")))
            } else {
                Some(Route::BadId)
            }
        }
        ["models", action]
            if method == Method::POST && CREATING_ACTIONS.iter().any(|a| action.ends_with(a)) =>
        {
            Some(Route::Create)
        }
        _ => None,
    }
}

pub async fn handle(
    gw: &Gateway,
    up: &Upstream,
    req: &HttpRequest,
    payload: web::Payload,
    edge: &Edge,
    ver: &str,
    route: Route,
) -> Result<HttpResponse, ApiError> {
    match route {
        Route::Create => create(gw, up, req, payload, edge).await,
        Route::MintToken => mint(gw, up, req, payload, edge).await,
        Route::List(kind) => list(gw, up, req, edge, ver, kind).await,
        Route::Owned(name) => owned(gw, up, req, payload, edge, &name).await,
        Route::BadId => Err(ApiError::bad_request(
            "A resource id is 1-128 characters of A-Z, a-z, 0-9, - and _.",
        )),
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::not_found(format!(
        "{name} was not found. It may have expired or been deleted, or it was not created \
         through this gateway with this token."
    ))
}

fn call(req: &HttpRequest, edge: &Edge, token_id: &str, body: Bytes) -> Call {
    Call {
        model: crate::domain::keys::model_from_path(&edge.path),
        ..super::call_of(req, edge, FLAVOR, token_id, body)
    }
}

/// The hooks of a create: routed like any request, the answer read whole.
const CREATE: pipeline::Hooks = pipeline::Hooks {
    resolve: pipeline::Resolve::Routed,
    respond: pipeline::Respond::Read(ANSWER_LIMIT),
};

/// How long the owner of a freshly created or updated resource is kept: a
/// cache's own `expireTime`, else the type's TTL.
fn ttl_of(gw: &Gateway, kind: Kind, answer: &Value) -> std::time::Duration {
    let expiry = answer
        .get("expireTime")
        .and_then(Value::as_str)
        .and_then(|t| resources::ttl_until(t, now_ms()));
    match (kind, expiry) {
        (Kind::CachedContent, Some(ttl)) => ttl,
        _ => kind.ttl(&gw.settings),
    }
}

async fn record(gw: &Gateway, name: &str, key: &ApiKey, token_id: &str, answer: &Value) {
    let Some(kind) = Kind::of(name) else {
        return;
    };
    let ttl = ttl_of(gw, kind, answer);
    let rec = OwnerRecord::new(&key.id, token_id);
    match resources::remember(gw.store(), name, &rec, ttl).await {
        Ok(()) => {
            tracing::info!(resource = name, key_id = %key.id, ttl_s = ttl.as_secs(), "resource owner recorded");
        }
        Err(e) => {
            tracing::warn!(resource = name, error = %e, "resource created but its owner could not be recorded");
        }
    }
}

/// A create: routed like any request (to the owner of what the body names,
/// else the session's key, else rotation); the new resource is recorded
/// against the key that created it.
async fn create(
    gw: &Gateway,
    up: &Upstream,
    req: &HttpRequest,
    payload: web::Payload,
    edge: &Edge,
) -> Result<HttpResponse, ApiError> {
    let (token, body) = authorized_json(gw, req, payload, edge, true).await?;
    let c = call(req, edge, &token.id, body);
    let answered = match pipeline::run(gw, up, c, CREATE).await? {
        pipeline::Reply::Read(answered) => answered,
        other => return other.into_response(),
    };
    if let Ok(v) = serde_json::from_slice::<Value>(answered.body()?) {
        if let Some(name) = v.get("name").and_then(Value::as_str) {
            record(gw, name, &answered.key, &token.id, &v).await;
        }
    }
    answered.back()
}

/// `POST /v1alpha/auth_tokens`: an ephemeral Live token, minted on the
/// session's key or the next one, recorded (as a hash) against that key
/// until the expiry the request asks for, or 30 minutes.
async fn mint(
    gw: &Gateway,
    up: &Upstream,
    req: &HttpRequest,
    payload: web::Payload,
    edge: &Edge,
) -> Result<HttpResponse, ApiError> {
    let (token, body) = authorized_json(gw, req, payload, edge, true).await?;
    let asked: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let ttl = asked
        .get("expireTime")
        .and_then(Value::as_str)
        .and_then(|t| resources::ttl_until(t, now_ms()))
        .unwrap_or_else(|| Kind::LiveToken.ttl(&gw.settings));
    let c = call(req, edge, &token.id, body);
    let answered = match pipeline::run(gw, up, c, CREATE).await? {
        pipeline::Reply::Read(answered) => answered,
        other => return other.into_response(),
    };
    let minted = serde_json::from_slice::<Value>(answered.body()?)
        .ok()
        .and_then(|v| v.get("name").and_then(Value::as_str).map(str::to_string));
    if let Some(minted) = minted {
        let name = resources::live_token_name(&minted);
        let rec = OwnerRecord::new(&answered.key.id, &token.id);
        match resources::remember(gw.store(), &name, &rec, ttl).await {
            Ok(()) => {
                tracing::info!(key_id = %answered.key.id, ttl_s = ttl.as_secs(), "ephemeral Live token recorded");
            }
            Err(e) => tracing::warn!(error = %e, "ephemeral Live token minted but not recorded"),
        }
    }
    answered.back()
}

/// A discovery failure as the client's error.
pub(super) fn discovery_error(e: crate::domain::discovery::DiscoveryError) -> ApiError {
    match e.refusal() {
        Some(refusal) => ApiError::from(refusal),
        None => match e {
            crate::domain::discovery::DiscoveryError::Store(s) => pipeline::store_down(s),
            _ => ApiError::store_unavailable(),
        },
    }
}

/// The owner record of `name` for this token: known, or discovered.
pub(super) async fn owner_for(
    gw: &Gateway,
    up: &Upstream,
    name: &str,
    token_id: &str,
) -> Result<OwnerRecord, ApiError> {
    let known = resources::owner(gw.store(), name)
        .await
        .map_err(pipeline::store_down)?;
    let record = match known {
        Some(r) => Some(r),
        None => crate::domain::discovery::discover(gw, up, name, token_id)
            .await
            .map_err(discovery_error)?,
    };
    record
        .filter(|r| r.owner == token_id)
        .ok_or_else(|| not_found(name))
}

/// A read, change, delete or action on an existing resource, on its owner.
async fn owned(
    gw: &Gateway,
    up: &Upstream,
    req: &HttpRequest,
    payload: web::Payload,
    edge: &Edge,
    name: &str,
) -> Result<HttpResponse, ApiError> {
    let (token, body) = authorized_json(gw, req, payload, edge, false).await?;
    let owner = owner_for(gw, up, name, &token.id).await?;
    let key = gw.keys.by_id(&owner.key).ok_or_else(|| not_found(name))?;
    // What the body names (a file imported into a store) must live on the
    // same key.
    match resources::body_owner(gw, up, &body, &token.id).await {
        Ok(Some(other)) if other.id != key.id => {
            let mut names = resources::scan_refs(&body);
            names.push(name.to_string());
            return Err(pipeline::mixed_owners(gw, &names));
        }
        Ok(_) => {}
        Err(e) => return Err(pipeline::ref_error(gw, e, Vec::new())),
    }
    let method = req.method();
    // `cachedContents/x`, not `fileSearchStores/x/documents/y`.
    let whole = edge.path.ends_with(name) || edge.path.ends_with(&format!("{name}:cancel"));
    let kind = Kind::of(name);
    let deletes = method == Method::DELETE && edge.path.ends_with(name);
    // A cache's change renews its owner record; a batch's or operation's
    // read names the files it produced.
    let reads_answer = whole
        && ((method == Method::PATCH && kind == Some(Kind::CachedContent))
            || (method == Method::GET && matches!(kind, Some(Kind::Batch | Kind::Operation))));
    let hooks = pipeline::Hooks {
        resolve: pipeline::Resolve::Owner(key.clone()),
        respond: if reads_answer {
            pipeline::Respond::Read(ANSWER_LIMIT)
        } else {
            pipeline::Respond::Stream
        },
    };
    let reply = pipeline::run(gw, up, call(req, edge, &token.id, body), hooks).await?;
    if deletes && matches!(reply, pipeline::Reply::Streamed(_)) {
        if let Err(e) = resources::forget(gw.store(), name, &token.id).await {
            tracing::warn!(resource = name, error = %e, "deleted upstream but the owner record stays until it expires");
        }
    }
    let pipeline::Reply::Read(answered) = reply else {
        return reply.into_response();
    };
    let answer = answered.body()?;
    if method == Method::PATCH {
        if let Ok(v) = serde_json::from_slice::<Value>(answer) {
            record(gw, name, &key, &token.id, &v).await;
        }
    } else {
        // The files a batch or operation produced belong to its key.
        let produced = resources::produced_files(answer);
        if !produced.is_empty() {
            let known = resources::owners(gw.store(), &produced)
                .await
                .unwrap_or_default();
            for (file, rec) in produced
                .iter()
                .zip(known.iter().chain(std::iter::repeat(&None)))
            {
                if rec.is_none() {
                    record(gw, file, &key, &token.id, &Value::Null).await;
                }
            }
        }
    }
    answered.back()
}

/// One page of a list (files or other resources), each read from its owner
/// key concurrently, one pipeline run each, in the page's order; one that
/// could not be read is left out, one Google no longer has (404, 403) is
/// forgotten.
#[allow(
    clippy::too_many_arguments,
    reason = "the request, the page and its owners, each used once"
)]
pub(super) async fn read_page(
    gw: &Gateway,
    up: &Upstream,
    req: &HttpRequest,
    ver: &str,
    token_id: &str,
    page: &[String],
    owners: Vec<Option<std::sync::Arc<ApiKey>>>,
    limit: usize,
) -> Vec<Value> {
    let reads = page.iter().zip(owners).map(|(name, key)| async move {
        let mut c = Call::new(FLAVOR, Method::GET, format!("/{ver}/{name}"), token_id);
        c.headers = req.headers().clone();
        c.trail = super::trail_of(req);
        let hooks = pipeline::Hooks {
            resolve: pipeline::Resolve::Only(key?),
            respond: pipeline::Respond::Read(limit),
        };
        match pipeline::run(gw, up, c, hooks).await.ok()? {
            pipeline::Reply::Read(answered) => {
                serde_json::from_slice::<Value>(answered.body.as_ref()?).ok()
            }
            pipeline::Reply::Refused(refused) => {
                let status = refused.status();
                if status == StatusCode::NOT_FOUND || status == StatusCode::FORBIDDEN {
                    let _ = resources::forget(gw.store(), name, token_id).await;
                }
                None
            }
            pipeline::Reply::Streamed(_) => None,
        }
    });
    join_all(reads).await.into_iter().flatten().collect()
}

/// The calling token's resources of one type, newest first, paged with the
/// gateway's own page tokens (a place in the list, not an offset, so
/// resources created meanwhile shift nothing); each fetched from its owner key concurrently.
async fn list(
    gw: &Gateway,
    up: &Upstream,
    req: &HttpRequest,
    edge: &Edge,
    ver: &str,
    kind: Kind,
) -> Result<HttpResponse, ApiError> {
    let token = super::authorized(gw, req, edge).await?;
    let (page_size, after) = page_request(edge, kind)?;
    let (page, next) =
        resources::page_of_token(gw.store(), kind, &token.id, after.as_ref(), page_size)
            .await
            .map_err(pipeline::store_down)?;
    let records = resources::owners(gw.store(), &page)
        .await
        .map_err(pipeline::store_down)?;
    let owners = records
        .iter()
        .map(|r| r.as_ref().and_then(|r| gw.keys.by_id(&r.key)))
        .collect();
    let found = read_page(gw, up, req, ver, &token.id, &page, owners, ANSWER_LIMIT).await;
    let mut out = json!({});
    if !found.is_empty() {
        // Batches are listed as operations.
        let field = if kind == Kind::Batch {
            "operations"
        } else {
            kind.collection()
        };
        out[field] = Value::Array(found);
    }
    if let Some(next) = next {
        out["nextPageToken"] = Value::String(resources::page_token(&next));
    }
    Ok(HttpResponse::Ok()
        .content_type("application/json; charset=UTF-8")
        .body(out.to_string()))
}

/// A list request's `pageSize` (default 10, at most 100) and the place its
/// `pageToken` resumes after; 400 for a token this gateway did not write.
pub fn page_request(edge: &Edge, kind: Kind) -> Result<(usize, Option<IndexEntry>), ApiError> {
    let page_size = query_param(&edge.query, "pageSize")
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_PAGE)
        .min(MAX_PAGE);
    let after = match query_param(&edge.query, "pageToken").filter(|t| !t.is_empty()) {
        Some(t) => Some(resources::parse_page_token(&t, kind).ok_or_else(|| {
            ApiError::bad_request(
                "Invalid pageToken: pass the nextPageToken of the previous page of this list unchanged.",
            )
        })?),
        None => None,
    };
    Ok((page_size, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_paths_route_to_their_owner() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(route(&["cachedContents"], &post), Some(Route::Create));
        assert_eq!(
            route(&["cachedContents"], &get),
            Some(Route::List(Kind::CachedContent))
        );
        assert_eq!(
            route(&["batches", "b1:cancel"], &post),
            Some(Route::Owned("batches/b1".into()))
        );
        assert_eq!(
            route(&["fileSearchStores", "s1", "documents", "d1"], &get),
            Some(Route::Owned("fileSearchStores/s1".into()))
        );
        assert_eq!(
            route(&["models", "veo-2", "operations", "op1"], &get),
            Some(Route::Owned("models/veo-2/operations/op1".into()))
        );
        assert_eq!(
            route(&["models", "gemini-2.0-flash:batchGenerateContent"], &post),
            Some(Route::Create)
        );
        assert_eq!(route(&["models", "m:generateContent"], &post), None);
        assert_eq!(route(&["cachedContents", "a.b"], &get), Some(Route::BadId));
        assert_eq!(route(&["models"], &get), None);
    }
}
