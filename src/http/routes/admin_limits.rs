//! `GET /admin/api/limits`: each client token's use against each of its
//! limits (`GB_LIMITS_FILE`), with when each frees up.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::admin_access::{check, esc};
use crate::domain::gateway::Gateway;
use crate::domain::limits::day_of;
use crate::http::error::ApiError;
use crate::state::now_ms;

pub async fn api_limits(
    gw: web::Data<Gateway>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    check(&gw, &req).await?;
    Ok(HttpResponse::Ok().json(json!({
        "clients": rows(&gw).await?,
        "keys": key_rows(&gw).await?,
    })))
}

/// One row per key and model the limits file names for keys (a glob is
/// shown as written: its window is counted per model a request names).
pub async fn key_rows(gw: &Gateway) -> Result<Vec<Value>, ApiError> {
    let now = now_ms();
    let (_, day_ends_ms) = crate::domain::limits::pacific_day(now);
    let mut rows = Vec::new();
    // A glob's windows are counted per model a request names: only names
    // written out have a row.
    for model in gw
        .keys
        .limits()
        .models()
        .into_iter()
        .filter(|m| !m.contains('*'))
    {
        let windows = gw
            .keys
            .window_use(gw.store(), &model)
            .await
            .map_err(crate::http::pipeline::store_down)?;
        for (key_id, w, used) in windows {
            if w.is_none() {
                continue;
            }
            let set = |n: u64| (n > 0).then_some(n);
            let limits: Vec<Value> = [
                limit("rpm", set(w.rpm), used.requests_last_minute, None),
                limit("tpm", set(w.tpm), used.tokens_last_minute, None),
                limit("rpd", set(w.rpd), used.requests_today, Some(day_ends_ms)),
            ]
            .into_iter()
            .flatten()
            .collect();
            rows.push(json!({"key_id": key_id, "model": model, "limits": limits}));
        }
    }
    Ok(rows)
}

/// One limit's use, when the limit is set.
fn limit(name: &str, allowed: Option<u64>, used: u64, frees_at_ms: Option<u64>) -> Option<Value> {
    allowed.map(|allowed| {
        json!({
            "limit": name,
            "allowed": allowed,
            "used": used,
            "reached": used >= allowed,
            "frees_at_ms": frees_at_ms,
        })
    })
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
        let limits: Vec<Value> = [
            limit(
                "rpm",
                l.rpm,
                used.requests_last_minute,
                used.requests_free_at_ms,
            ),
            limit("tpm", l.tpm, used.tokens_last_minute, None),
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

/// The status page's "Limits" section: each client's and each key's use
/// against its limits; empty without a limits file that sets any.
pub async fn section(gw: &Gateway) -> String {
    use std::fmt::Write as _;
    let clients = rows(gw).await.unwrap_or_default();
    let keys = key_rows(gw).await.unwrap_or_default();
    if clients.is_empty() && keys.is_empty() {
        return String::new();
    }
    let now = now_ms();
    let cell = |l: &Value| {
        let frees = l["frees_at_ms"]
            .as_u64()
            .map(|t| format!(", frees in {} s", t.saturating_sub(now).div_ceil(1000)))
            .unwrap_or_default();
        format!(
            "<span class=\"state {}\">{} {}/{}{}</span>",
            if l["reached"] == true {
                "cooling"
            } else {
                "healthy"
            },
            esc(l["limit"].as_str().unwrap_or("")),
            l["used"],
            l["allowed"],
            frees
        )
    };
    let mut out = String::from(
        "<h2>Limits</h2><table id=\"client-limits\"><tr><th>client token</th><th>entry</th>\
         <th>models</th><th>use / limit</th></tr>",
    );
    for c in &clients {
        let limits: Vec<String> = c["limits"]
            .as_array()
            .map(|a| a.iter().map(cell).collect())
            .unwrap_or_default();
        let who = c["label"].as_str().or(c["token_id"].as_str()).unwrap_or("");
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(who),
            esc(c["entry"].as_str().unwrap_or("")),
            esc(&c["models"].as_array().map_or_else(
                || "all".to_string(),
                |m| m
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            limits.join(" · ")
        );
    }
    out.push_str(
        "</table><table id=\"key-windows\"><tr><th>key</th><th>model</th><th>use / limit</th></tr>",
    );
    for k in &keys {
        let limits: Vec<String> = k["limits"]
            .as_array()
            .map(|a| a.iter().map(cell).collect())
            .unwrap_or_default();
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(k["key_id"].as_str().unwrap_or("")),
            esc(k["model"].as_str().unwrap_or("")),
            limits.join(" · ")
        );
    }
    out.push_str("</table>");
    out
}
