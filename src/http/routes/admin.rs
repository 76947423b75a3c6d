//! `/admin`: a JSON API and a small server-rendered status page for
//! operators, behind `GB_ADMIN_TOKEN` (every admin route answers 404 while it
//! is unset). The API takes the token as `Authorization: Bearer`; the page
//! logs in with a form and keeps a session cookie (a random id, checked in
//! the shared store, see `admin_session`), and its forms carry a CSRF token.
//! Every action is logged with the key id, never the key.

use std::fmt::Write as _;

use actix_web::http::header::{LOCATION, SET_COOKIE};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::admin_access::{check, esc, generation, not_enabled, same_origin, Caller};
use crate::background::heartbeat;
use crate::domain::files;
use crate::domain::gateway::Gateway;
use crate::domain::keys::{KeyView, RING};
use crate::domain::session::{self, SessionId};
use crate::domain::stats::KeyStats;
use crate::http::admin_session;
use crate::http::error::ApiError;
use crate::state::{now_ms, Transition};
use crate::upstream::client::Upstream;

const COOKIE_NAME: &str = "gb_admin";

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/admin")
            .route("", web::get().to(page))
            .route("/", web::get().to(page))
            .route("/login", web::post().to(login))
            .route("/logout", web::post().to(logout))
            .route("/keys/{id}/{action}", web::post().to(page_action))
            .route("/api/keys", web::get().to(api_keys))
            .route("/api/keys/{id}/{action}", web::post().to(api_action))
            .route("/api/sessions/{sid}", web::get().to(api_session))
            .route("/api/files/{id}", web::get().to(api_file))
            .route("/api/replicas", web::get().to(api_replicas))
            .route("/api/proxies", web::get().to(api_proxies))
            .route("/api/usage", web::get().to(super::admin_usage::api_usage))
            .route("/api/errors", web::get().to(super::admin_usage::api_errors))
            .route(
                "/api/limits",
                web::get().to(super::admin_limits::api_limits),
            )
            .route(
                "/api/requests",
                web::get().to(super::admin_requests::api_requests),
            )
            .route("/requests", web::get().to(super::admin_requests::page))
            .default_service(web::to(|| async { Err::<HttpResponse, _>(not_enabled()) })),
    );
}

/// Whether the request may carry the session cookie over HTTPS only: the
/// public URL is HTTPS, the listener serves TLS, or a trusted proxy says so.
fn https(gw: &Gateway, req: &HttpRequest) -> bool {
    gw.settings
        .listen
        .public_url
        .as_deref()
        .is_some_and(|u| u.starts_with("https://"))
        || req.app_config().secure()
        || (gw.settings.listen.trust_forwarded
            && req
                .headers()
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("https")))
}

#[derive(serde::Serialize)]
struct KeyRow {
    #[serde(flatten)]
    view: KeyView,
    last_hour: std::collections::HashMap<String, u64>,
    failures_last_hour: u64,
    requests_last_hour: u64,
}

async fn key_rows(gw: &Gateway) -> Result<Vec<KeyRow>, ApiError> {
    let store = gw.store();
    let states = store
        .member_states(RING)
        .await
        .map_err(crate::http::pipeline::store_down)?;
    let mut hour = KeyStats::last_hour(store).await.unwrap_or_default();
    Ok(gw
        .keys
        .view(&states, now_ms())
        .into_iter()
        .map(|view| {
            let last_hour = hour.remove(&view.id).unwrap_or_default();
            let requests = last_hour.values().sum();
            let failures = last_hour
                .iter()
                .filter(|(k, _)| k.as_str() != "success" && k.as_str() != "client_error")
                .map(|(_, n)| n)
                .sum();
            KeyRow {
                view,
                last_hour,
                failures_last_hour: failures,
                requests_last_hour: requests,
            }
        })
        .collect())
}

async fn api_keys(gw: web::Data<Gateway>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    check(&gw, &req).await?;
    Ok(HttpResponse::Ok().json(json!({"keys": key_rows(&gw).await?})))
}

/// Applies enable / disable / recheck to one key.
async fn act(
    gw: &Gateway,
    up: &Upstream,
    id: &str,
    action: &str,
) -> Result<serde_json::Value, ApiError> {
    let key = gw
        .keys
        .by_id(id)
        .ok_or_else(|| ApiError::not_found(format!("No key with id {id}.")))?;
    let store = gw.store();
    let down = crate::http::pipeline::store_down;
    let result = match action {
        "enable" => {
            store
                .transition(RING, &key.id, None, &Transition::Enable, now_ms())
                .await
                .map_err(down)?;
            json!({"id": key.id, "state": "healthy"})
        }
        "disable" => {
            let event = Transition::Disable {
                reason: crate::state::ADMIN.into(),
            };
            store
                .transition(RING, &key.id, None, &event, now_ms())
                .await
                .map_err(down)?;
            json!({"id": key.id, "state": "disabled"})
        }
        "recheck" => {
            let works = crate::background::recheck::recheck_key(gw, up, &key).await;
            json!({"id": key.id, "works": works})
        }
        other => {
            return Err(ApiError::not_found(format!(
                "Unknown action {:?}; use enable, disable or recheck.",
                other.chars().take(20).collect::<String>()
            )))
        }
    };
    tracing::info!(key_id = %key.id, action, "admin action");
    Ok(result)
}

async fn api_action(
    gw: web::Data<Gateway>,
    up: web::Data<Upstream>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    check(&gw, &req).await?;
    let (id, action) = path.into_inner();
    Ok(HttpResponse::Ok().json(act(&gw, &up, &id, &action).await?))
}

async fn api_session(
    gw: web::Data<Gateway>,
    req: HttpRequest,
    sid: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    check(&gw, &req).await?;
    let sid =
        SessionId::parse_any(&sid).ok_or_else(|| ApiError::bad_request("Invalid session id."))?;
    let key = session::lookup(gw.store(), &sid)
        .await
        .map_err(crate::http::pipeline::store_down)?
        .ok_or_else(|| ApiError::not_found(format!("Session {sid} is not bound.")))?;
    Ok(HttpResponse::Ok().json(json!({"session": sid.as_str(), "key_id": key})))
}

async fn api_file(
    gw: web::Data<Gateway>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    check(&gw, &req).await?;
    let id = id.trim_start_matches("files/").to_string();
    if !files::valid_file_id(&id) {
        return Err(ApiError::bad_request(
            "A file id is 1-40 characters of a-z, 0-9 and -.",
        ));
    }
    let name = format!("files/{id}");
    let record = files::owner(gw.store(), &name)
        .await
        .map_err(crate::http::pipeline::store_down)?
        .ok_or_else(|| ApiError::not_found(format!("No owner recorded for {name}.")))?;
    Ok(HttpResponse::Ok()
        .json(json!({"file": name, "key_id": record.key, "owner_token_id": record.owner})))
}

async fn api_replicas(gw: web::Data<Gateway>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    check(&gw, &req).await?;
    let list = heartbeat::list(gw.store())
        .await
        .map_err(crate::http::pipeline::store_down)?;
    let (keys, tokens) = (gw.keys.digest(), gw.auth.tokens_digest());
    let rows: Vec<serde_json::Value> = list
        .iter()
        .map(|r| {
            let mut v = json!(r);
            v["differs"] = json!(r.keys_digest != keys || r.tokens_digest != tokens);
            v
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "replicas": rows,
        "this_replica": {"id": gw.replica, "keys_digest": keys, "tokens_digest": tokens, "loaded_ms": gw.loaded_ms()},
    })))
}

fn proxy_rows(gw: &Gateway) -> Vec<serde_json::Value> {
    gw.proxies
        .as_ref()
        .map(|r| {
            r.status()
                .into_iter()
                .map(|(display, id, up)| json!({"id": id, "proxy": display, "state": if up { "up" } else { "down" }}))
                .collect()
        })
        .unwrap_or_default()
}

async fn api_proxies(gw: web::Data<Gateway>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    check(&gw, &req).await?;
    Ok(HttpResponse::Ok().json(json!({"proxies": proxy_rows(&gw)})))
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: Option<String>,
}

async fn login(
    gw: web::Data<Gateway>,
    req: HttpRequest,
    form: web::Form<LoginForm>,
) -> Result<HttpResponse, ApiError> {
    if !gw.auth.admin_enabled() {
        return Err(not_enabled());
    }
    same_origin(&req)?;
    if !gw.auth.is_admin(Some(form.token.trim())) {
        tracing::warn!("admin login refused");
        return Ok(html(
            StatusCode::FORBIDDEN,
            &login_page(Some("That is not the admin token.")),
        ));
    }
    let down = crate::http::pipeline::store_down;
    let id = admin_session::new_id().map_err(down)?;
    let ttl = gw.settings.admin.session_ttl;
    admin_session::open(gw.store(), &id, &generation(&gw).unwrap_or_default(), ttl)
        .await
        .map_err(down)?;
    tracing::info!("admin logged in");
    let secure = if https(&gw, &req) { "; Secure" } else { "" };
    Ok(HttpResponse::SeeOther()
        .insert_header((LOCATION, "/admin"))
        .insert_header((
            SET_COOKIE,
            format!(
                "{COOKIE_NAME}={id}; Path=/admin; Max-Age={}; HttpOnly; SameSite=Strict{secure}",
                ttl.as_secs()
            ),
        ))
        .finish())
}

async fn logout(
    gw: web::Data<Gateway>,
    req: HttpRequest,
    form: web::Form<CsrfForm>,
) -> Result<HttpResponse, ApiError> {
    if let Ok(caller) = check(&gw, &req).await {
        caller.check_form(&req, form.csrf.as_deref())?;
        if let Caller::Page { session } = caller {
            if let Err(e) = admin_session::close(gw.store(), &session).await {
                tracing::warn!(error = %e, "admin session could not be closed");
            }
            tracing::info!("admin logged out");
        }
    }
    let secure = if https(&gw, &req) { "; Secure" } else { "" };
    Ok(HttpResponse::SeeOther()
        .insert_header((LOCATION, "/admin"))
        .insert_header((
            SET_COOKIE,
            format!("{COOKIE_NAME}=; Path=/admin; Max-Age=0; HttpOnly; SameSite=Strict{secure}"),
        ))
        .finish())
}

async fn page_action(
    gw: web::Data<Gateway>,
    up: web::Data<Upstream>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    form: web::Form<CsrfForm>,
) -> Result<HttpResponse, ApiError> {
    check(&gw, &req)
        .await?
        .check_form(&req, form.csrf.as_deref())?;
    let (id, action) = path.into_inner();
    act(&gw, &up, &id, &action).await?;
    Ok(HttpResponse::SeeOther()
        .insert_header((LOCATION, "/admin"))
        .finish())
}

pub(super) fn html(status: StatusCode, body: &str) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .insert_header(("cache-control", "no-store"))
        .body(body.to_string())
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}\
.healthy{color:#070}.cooling{color:#a60}.disabled{color:#b00}form{display:inline}\
td.n{text-align:right}svg{border:1px solid #ccc;background:#fff}.legend span{margin-right:1em}";

fn login_page(error: Option<&str>) -> String {
    let error = error
        .map(|e| format!("<p class=\"disabled\">{}</p>", esc(e)))
        .unwrap_or_default();
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>gemini-balancer admin</title>\
         <style>{STYLE}</style></head><body><h1>gemini-balancer</h1>{error}\
         <form method=\"post\" action=\"/admin/login\"><label>Admin token \
         <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"off\"></label> \
         <button type=\"submit\" id=\"login\">Log in</button></form></body></html>"
    )
}

async fn page(gw: web::Data<Gateway>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    if !gw.auth.admin_enabled() {
        return Err(not_enabled());
    }
    let Ok(caller) = check(&gw, &req).await else {
        return Ok(html(StatusCode::OK, &login_page(None)));
    };
    let csrf = format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        caller.csrf()
    );
    let store = gw.store();
    let store_status = match store.ping().await {
        Ok(latency) => format!(
            "{} ({}) up ({:.2} ms)",
            store.kind(),
            store.mode(),
            latency.as_secs_f64() * 1000.0
        ),
        Err(e) => format!("{} ({}) DOWN: {}", store.kind(), store.mode(), e),
    };
    let rows = key_rows(&gw).await.unwrap_or_default();
    let replicas = heartbeat::list(store).await.unwrap_or_default();
    let now = now_ms();
    let total: u64 = rows.iter().map(|r| r.requests_last_hour).sum();
    let mut body = String::new();
    let _ = write!(
        body,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>gemini-balancer admin</title>\
         <style>{STYLE}</style></head><body><h1>gemini-balancer</h1>\
         <p>State store: <b id=\"store\">{}</b> · requests in the last hour: <b>{total}</b> \
         ({:.1}/min) · <form method=\"post\" action=\"/admin/logout\">{csrf}<button>Log out</button></form></p>\
         <h2>Keys</h2><table id=\"keys\"><tr><th>id</th><th>key</th><th>state</th><th>until / reason</th>\
         <th>requests (1h)</th><th>failures (1h)</th><th>by outcome</th><th>actions</th></tr>",
        esc(&store_status),
        total as f64 / 60.0
    );
    for r in &rows {
        let v = &r.view;
        let detail = match (v.cooldown_until_ms, &v.disabled_reason) {
            (Some(until), _) => format!("{} s left", until.saturating_sub(now).div_ceil(1000)),
            (_, Some(reason)) => esc(reason),
            _ => String::new(),
        };
        let mut outcomes: Vec<String> = r
            .last_hour
            .iter()
            .map(|(k, n)| format!("{}: {n}", esc(k)))
            .collect();
        outcomes.sort();
        let (action, label) = if v.state == "disabled" {
            ("enable", "Enable")
        } else {
            ("disable", "Disable")
        };
        let id = esc(&v.id);
        let _ = write!(
            body,
            "<tr id=\"key-{id}\"><td>{id}</td><td>{}</td><td class=\"state {}\">{}</td><td>{detail}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>\
             <form method=\"post\" action=\"/admin/keys/{id}/{action}\">{csrf}<button name=\"{action}\">{label}</button></form> \
             <form method=\"post\" action=\"/admin/keys/{id}/recheck\">{csrf}<button>Re-check</button></form></td></tr>",
            esc(&v.masked),
            v.state,
            v.state,
            r.requests_last_hour,
            r.failures_last_hour,
            outcomes.join(", ")
        );
    }
    body.push_str("</table><h2>Replicas seen recently</h2><table id=\"replicas\"><tr><th>id</th><th>address</th><th>version</th><th>last seen</th><th>keys / tokens (digests)</th><th>loaded</th></tr>");
    let (keys_digest, tokens_digest) = (gw.keys.digest(), gw.auth.tokens_digest());
    for rep in &replicas {
        let differs = rep.keys_digest != keys_digest || rep.tokens_digest != tokens_digest;
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} s ago</td><td class=\"{}\">{} / {}{}</td><td>{} s ago</td></tr>",
            esc(&rep.id),
            esc(&rep.addr),
            esc(&rep.version),
            now.saturating_sub(rep.seen_ms) / 1000,
            if differs { "disabled" } else { "healthy" },
            esc(&rep.keys_digest),
            esc(&rep.tokens_digest),
            if differs { " (differs from this replica)" } else { "" },
            now.saturating_sub(rep.loaded_ms) / 1000
        );
    }
    body.push_str("</table>");
    let proxies = proxy_rows(&gw);
    if !proxies.is_empty() {
        body.push_str("<h2>Outbound proxies</h2><table id=\"proxies\"><tr><th>id</th><th>proxy</th><th>state</th></tr>");
        for p in &proxies {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(p["id"].as_str().unwrap_or("")),
                esc(p["proxy"].as_str().unwrap_or("")),
                esc(p["state"].as_str().unwrap_or(""))
            );
        }
        body.push_str("</table>");
    }
    body.push_str(&super::admin_limits::section(&gw).await);
    body.push_str(&super::admin_usage::section(&gw, req.query_string()).await);
    body.push_str("</body></html>");
    Ok(html(StatusCode::OK, &body))
}
