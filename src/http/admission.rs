//! The edge step after authentication: a request is admitted against its
//! client's limits ([`crate::domain::limits`]) before it costs anything
//! upstream. The admission's ticket rides in the request's extensions, and
//! [`crate::http::routes::dispatch`] ties it to the answer's body, so a
//! `concurrent` slot is held until the last byte is sent.

use actix_web::{HttpMessage, HttpRequest};

use crate::domain::gateway::Gateway;
use crate::domain::identity::ClientToken;
use crate::domain::limits::{Kind, Refusal, Ticket};
use crate::domain::requests::Trail;
use crate::domain::usage::{ErrorEntry, Series};
use crate::http::error::ApiError;
use crate::state::now_ms;

/// Admits one request of `token`; `model` (computed only when the client's
/// limits name models) is the model it is for.
pub async fn admit(
    gw: &Gateway,
    req: &HttpRequest,
    token: &ClientToken,
    model: impl FnOnce() -> Option<String>,
) -> Result<(), ApiError> {
    // The trail dispatch left: it names the route the request is counted
    // under.
    let trail = req.extensions().get::<Trail>().cloned();
    let route = trail.as_ref().map_or("unknown", Trail::route);
    if let Some(t) = &trail {
        t.client(&token.id, None);
    }
    match admit_as(gw, &token.id, model, Kind::Request, route).await {
        Ok(Some(ticket)) => {
            req.extensions_mut().insert(ticket);
        }
        Ok(None) => {}
        Err(e) => {
            if let Some(t) = &trail {
                t.outcome("client_limited");
            }
            return Err(e);
        }
    }
    Ok(())
}

/// [`admit`] for what holds its own ticket (a Live session, for as long as
/// it is open); `None` when the client has no limits.
pub async fn admit_as(
    gw: &Gateway,
    token_id: &str,
    model: impl FnOnce() -> Option<String>,
    kind: Kind,
    route: &'static str,
) -> Result<Option<Ticket>, ApiError> {
    let Some(client) = gw.limits.client(token_id, || gw.auth.label_of(token_id)) else {
        return Ok(None);
    };
    let model = if client.limits.models.is_some() {
        let model = model();
        // A model call whose model cannot be read cannot be checked.
        if model.is_none() && MODEL_CALLS.contains(&route) {
            let refusal = Refusal::Model {
                model: "(none that can be read)".into(),
            };
            return Err(refused(gw, token_id, None, route, refusal));
        }
        model
    } else {
        None
    };
    match gw
        .limits
        .admit(gw.store(), &client, model.as_deref(), kind, now_ms())
        .await
    {
        Ok(ticket) => Ok(Some(ticket)),
        Err(refusal) => Err(refused(gw, token_id, model, route, refusal)),
    }
}

/// A refusal, counted in metrics and in the usage view as an error of its
/// token (with no key: it never reached one).
pub fn refused(
    gw: &Gateway,
    token_id: &str,
    model: Option<String>,
    route: &'static str,
    refusal: Refusal,
) -> ApiError {
    let limit = refusal.limit_name();
    gw.metrics
        .client_limited
        .get_or_create(&crate::ops::metrics::LimitLabel { limit })
        .inc();
    let err = ApiError::from(refusal);
    let series = Series {
        token_id: token_id.to_string(),
        key_id: NO_KEY.to_string(),
        model,
    };
    gw.usage.failure(
        &series,
        "client_limited",
        ErrorEntry {
            time_ms: now_ms(),
            key_id: NO_KEY.to_string(),
            model: crate::domain::usage::clean_model(series.model.as_deref()),
            route: route.to_string(),
            status: err.status.as_u16(),
            google_status: Some(ApiError::gemini_status(err.status).to_string()),
            reason: Some(format!("client_{limit}")),
            retry_delay_s: err.retry_after.map(|s| s as f64),
            n: String::new(),
        },
    );
    err
}

/// The routes whose requests name the model they call.
const MODEL_CALLS: [&str; 6] = [
    "generate",
    "stream",
    "embed",
    "count_tokens",
    "openai_chat",
    "openai_embeddings",
];

/// The key id a refused request is counted under in the usage view.
pub const NO_KEY: &str = "-";
