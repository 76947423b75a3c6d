//! `GET /admin/api/limits`: each client token's use against each of its
//! limits (`GB_LIMITS_FILE`), with when each frees up.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::admin_access::check;
use crate::domain::gateway::Gateway;
use crate::domain::limits::day_of;
use crate::http::error::ApiError;
use crate::state::limits::MINUTE_MS;
use crate::state::now_ms;

pub async fn api_limits(
    gw: web::Data<Gateway>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    check(&gw, &req).await?;
    Ok(HttpResponse::Ok().json(json!({ "clients": rows(&gw).await? })))
}

/// One row per client token that has limits.
pub async fn rows(gw: &Gateway) -> Result<Vec<Value>, ApiError> {
    let now = now_ms();
    let (_, day_ends_ms) = day_of(now);
    let mut rows = Vec::new();
    for id in gw.auth.token_ids() {
        let label = gw.auth.label_of(&id);
        let Some(client) = gw.limits.client(&id, || label.clone()) else {
            continue;
        };
        let used = gw
            .limits
            .usage(gw.store(), &id, now)
            .await
            .map_err(crate::http::pipeline::store_down)?;
        let l = &client.limits;
        let limit = |name: &str, allowed: Option<u64>, used: u64, frees_at_ms: Option<u64>| {
            allowed.map(|allowed| {
                json!({
                    "limit": name,
                    "allowed": allowed,
                    "used": used,
                    "reached": used >= allowed,
                    "frees_at_ms": frees_at_ms,
                })
            })
        };
        let limits: Vec<Value> = [
            limit(
                "rpm",
                l.rpm,
                used.requests_last_minute,
                used.requests_free_at_ms,
            ),
            limit(
                "tpm",
                l.tpm,
                used.tokens_last_minute,
                (used.tokens_last_minute > 0).then_some(now + MINUTE_MS),
            ),
            limit(
                "tokens_per_day",
                l.tokens_per_day,
                used.tokens_today,
                Some(day_ends_ms),
            ),
            limit("concurrent", l.concurrent, used.concurrent, None),
            limit("live_sessions", l.live_sessions, used.live_sessions, None),
        ]
        .into_iter()
        .flatten()
        .collect();
        rows.push(json!({
            "token_id": id,
            "label": label,
            "entry": client.entry,
            "models": l.models,
            "limits": limits,
        }));
    }
    Ok(rows)
}
