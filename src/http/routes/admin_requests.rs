//! The request log as operators read it: `GET /admin/api/requests` (JSON,
//! or `format=ndjson` for pipelines) and the status page's Requests view
//! (`GET /admin/requests`, plain HTML forms), with the same filters.

use std::fmt::Write as _;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::admin_access::{check, esc};
use crate::domain::gateway::Gateway;
use crate::domain::requests::{Filter, Record};
use crate::http::error::ApiError;
use crate::state::{now_ms, IndexEntry};
use crate::upstream::client::query_param;

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

fn bad(message: &str) -> ApiError {
    ApiError::bad_request(message.to_string()).kind("bad_query")
}

/// The filters, limit and cursor of a query string.
fn parse(query: &str) -> Result<(Filter, usize, Option<IndexEntry>), ApiError> {
    let get = |name: &str| query_param(query, name).filter(|v| !v.is_empty());
    let time = |name: &str, end: bool| -> Result<Option<u64>, ApiError> {
        get(name)
            .map(|v| {
                super::admin_usage::parse_time(&v, end).ok_or_else(|| {
                    bad("`from` and `to` are Unix seconds or ms, YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC), or a time with its offset.")
                })
            })
            .transpose()
    };
    let status_class = get("status")
        .map(|v| match v.trim_end_matches("xx").trim_end_matches("XX") {
            "2" => Ok(2),
            "3" => Ok(3),
            "4" => Ok(4),
            "5" => Ok(5),
            _ => Err(bad("`status` is a status class: 2xx, 3xx, 4xx or 5xx.")),
        })
        .transpose()?;
    let filter = Filter {
        token: get("token"),
        key_id: get("key"),
        model: get("model"),
        status_class,
        outcome: get("outcome"),
        from_ms: time("from", false)?,
        to_ms: time("to", true)?.map(|t| t + 1),
        request_id: get("request_id"),
    };
    let limit = match get("limit") {
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| bad("`limit` is a number from 1 to 1000."))?,
        None => DEFAULT_LIMIT,
    };
    let cursor = get("cursor")
        .map(|c| parse_cursor(&c).ok_or_else(|| bad("`cursor` is not one this gateway gave.")))
        .transpose()?;
    Ok((filter, limit, cursor))
}

/// A place in the log: the record's expiry and the record, opaque.
fn cursor_of(place: &IndexEntry) -> String {
    format!(
        "{}.{}",
        place.expires_ms,
        hex::encode(place.member.as_bytes())
    )
}

fn parse_cursor(raw: &str) -> Option<IndexEntry> {
    let (expires, member) = raw.split_once('.')?;
    let member = String::from_utf8(hex::decode(member).ok()?).ok()?;
    serde_json::from_str::<Record>(&member).ok()?;
    Some(IndexEntry {
        member,
        expires_ms: expires.parse().ok()?,
    })
}

async fn find(gw: &Gateway, query: &str) -> Result<(Vec<Record>, Option<String>), ApiError> {
    let (filter, limit, cursor) = parse(query)?;
    let (records, next) = gw
        .requests
        .find(gw.store(), &filter, cursor, limit, now_ms())
        .await
        .map_err(crate::http::pipeline::store_down)?;
    Ok((records, next.as_ref().map(cursor_of)))
}

/// `GET /admin/api/requests`: `{"requests": [...], "next": cursor|null}`
/// newest first; `format=ndjson`: one record a line, then (when more may
/// match) `{"next": cursor}`.
pub async fn api_requests(
    gw: web::Data<Gateway>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    check(&gw, &req).await?;
    let (records, next) = find(&gw, req.query_string()).await?;
    if query_param(req.query_string(), "format").as_deref() == Some("ndjson") {
        let mut out = String::new();
        for r in &records {
            if let Ok(line) = serde_json::to_string(r) {
                out.push_str(&line);
                out.push('\n');
            }
        }
        if let Some(next) = &next {
            let _ = writeln!(out, "{}", json!({ "next": next }));
        }
        return Ok(HttpResponse::Ok()
            .content_type("application/x-ndjson")
            .body(out));
    }
    Ok(HttpResponse::Ok().json(json!({ "requests": records, "next": next })))
}

/// `GET /admin/requests`: the Requests view of the status page.
pub async fn page(gw: web::Data<Gateway>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    check(&gw, &req).await?;
    let query = req.query_string();
    let field = |name: &str| esc(&query_param(query, name).unwrap_or_default());
    let mut body = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Requests · gemini-balancer</title></head>\
         <body><h1>Requests</h1><p><a href=\"/admin\">Status page</a></p>\
         <form method=\"get\" action=\"/admin/requests\">",
    );
    for (name, label) in [
        ("request_id", "request id"),
        ("token", "client token"),
        ("key", "key id"),
        ("model", "model"),
        ("status", "status (2xx…5xx)"),
        ("outcome", "outcome"),
        ("from", "from"),
        ("to", "to"),
    ] {
        let _ = write!(
            body,
            "<label>{label} <input name=\"{name}\" value=\"{}\"></label> ",
            field(name)
        );
    }
    body.push_str("<button>Search</button></form>");
    match find(&gw, query).await {
        Ok((records, next)) => {
            body.push_str(
                "<table id=\"requests\"><tr><th>time (UTC)</th><th>request id</th><th>client</th>\
                 <th>route</th><th>model</th><th>status</th><th>outcome</th><th>key</th>\
                 <th>keys tried</th><th>chosen by</th><th>ms (upstream)</th><th>tokens in/out</th>\
                 <th>replica</th></tr>",
            );
            for r in &records {
                let tokens = r
                    .tokens
                    .as_ref()
                    .map(|t| format!("{}/{}", t.prompt, t.output))
                    .unwrap_or_default();
                let _ = write!(
                    body,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                     <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} ({})</td><td>{}</td><td>{}</td></tr>",
                    esc(&super::admin_usage::iso_minute(r.time_ms)),
                    esc(&r.request_id),
                    esc(&r.token),
                    esc(&r.route),
                    esc(r.model.as_deref().unwrap_or("")),
                    r.status,
                    esc(&r.outcome),
                    esc(r.key_id.as_deref().unwrap_or("")),
                    esc(&r.keys_tried.join(", ")),
                    esc(r.chosen_by.as_deref().unwrap_or("")),
                    r.latency_ms,
                    r.upstream_ms.map(|m| m.to_string()).unwrap_or_default(),
                    tokens,
                    esc(&r.replica),
                );
            }
            body.push_str("</table>");
            if let Some(next) = next {
                let mut params: Vec<String> = query
                    .split('&')
                    .filter(|p| !p.is_empty() && !p.starts_with("cursor="))
                    .map(str::to_string)
                    .collect();
                params.push(format!("cursor={next}"));
                let _ = write!(
                    body,
                    "<p><a id=\"next\" href=\"/admin/requests?{}\">Older</a></p>",
                    esc(&params.join("&"))
                );
            }
        }
        Err(e) => {
            let _ = write!(body, "<p class=\"error\">{}</p>", esc(&e.message));
        }
    }
    body.push_str("</body></html>");
    Ok(HttpResponse::build(StatusCode::OK)
        .content_type("text/html; charset=utf-8")
        .body(body))
}
