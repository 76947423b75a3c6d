//! A fake Gemini API for the gateway's tests, demos and benchmarks. A
//! development tool, not part of the product: its own crate so that the
//! release build and image leave it out, and without the gateway's library
//! so that it copies Google's behaviour rather than the gateway's idea of it.
//!
//! It behaves like Google where the gateway depends on it: per-key file
//! ownership with Google's 403, the resumable upload protocol with offset
//! checks, 429 with RetryInfo, invalid keys, SSE streams, the
//! OpenAI-compatible endpoints; context caches, batches, long-running
//! operations and file search stores, each visible only to the key that
//! created it.
//!
//! Environment: `FAKE_LISTEN` (default `127.0.0.1:0`), `FAKE_KEYS` (the valid
//! keys, comma-separated), `FAKE_TLS_CERT`/`FAKE_TLS_KEY` (PEM; serve HTTPS),
//! `FAKE_DELAY_MS` (added to every model call), `FAKE_RECORD` (`0` turns the
//! request log off, for benchmarks), `FAKE_SSE_EVENTS` / `FAKE_SSE_INTERVAL_MS`
//! (events per stream, default 3, and the pause before each after the first,
//! default 0). Prints `listening on URL` on stdout
//! (over TLS, first `control on URL`: the same endpoints in plain HTTP).
//!
//! Control endpoints for tests, under `/_fake/`: `GET requests`, `POST reset`,
//! `GET served` (successful model calls per key), `POST limits` with
//! per-key limits by model as Google enforces them for a tier
//! (`{"gemini-2.5-pro": {"rpm": 5, "rpd": 100}}`: past one, Google's 429 with
//! `QuotaFailure` naming the model and `RetryInfo`), `GET limited` (those
//! 429s per key), `POST keys/{key}` with a
//! JSON mode (`{"mode":"quota","retryDelay":"2s"}`, `invalid`, `error`,
//! `slow`, `break_stream`, `drop`, `normal`), `POST throttle/{ip}` with
//! `{"on": bool}` (every request from that source IP gets 429: an IP-level
//! throttle), `POST release/{name}` (let a held stream continue), `GET files`
//! and `GET resources` (name → owner key), `GET live` (open Live sessions per
//! key). The Live API WebSocket answers `setupComplete` and echoes turns with
//! the serving key's id.
#![allow(clippy::print_stdout, clippy::result_large_err)]

mod errors;
mod files;
mod gemini;
mod live;
mod openai;
mod resources;
mod state;

use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::json;

use state::{Fake, Mode, Seen};

struct Config {
    delay: Duration,
    record: bool,
}

async fn read_all(mut payload: web::Payload) -> Bytes {
    let mut buf = bytes::BytesMut::new();
    while let Some(Ok(chunk)) = payload.next().await {
        buf.extend_from_slice(&chunk);
    }
    buf.freeze()
}

async fn control(
    fake: &Fake,
    req: &HttpRequest,
    payload: web::Payload,
    rest: &[&str],
) -> HttpResponse {
    match rest {
        ["requests"] => HttpResponse::Ok().json(&fake.lock().seen),
        ["served"] => HttpResponse::Ok().json(&fake.lock().served),
        ["limited"] => HttpResponse::Ok().json(&fake.lock().limited),
        // A collector that takes OTLP/HTTP exports and keeps only their
        // count and size; an empty body is an empty ExportTraceServiceResponse.
        ["v1", "traces"] if req.method() == actix_web::http::Method::POST => {
            let body = read_all(payload).await;
            let mut inner = fake.lock();
            inner.trace_posts += 1;
            inner.trace_bytes += body.len() as u64;
            HttpResponse::Ok()
                .content_type("application/x-protobuf")
                .finish()
        }
        ["traces"] => {
            let inner = fake.lock();
            HttpResponse::Ok().json(json!({"posts": inner.trace_posts, "bytes": inner.trace_bytes}))
        }
        ["limits"] if req.method() == actix_web::http::Method::POST => {
            let body = read_all(payload).await;
            match serde_json::from_slice(&body) {
                Ok(limits) => {
                    fake.lock().limits = limits;
                    HttpResponse::Ok().json(json!({}))
                }
                Err(e) => HttpResponse::BadRequest().body(e.to_string()),
            }
        }
        ["reset"] => {
            let mut inner = fake.lock();
            inner.seen.clear();
            inner.served.clear();
            inner.windows.clear();
            inner.limited.clear();
            HttpResponse::Ok().json(json!({}))
        }
        ["throttle", ip] => {
            let body = read_all(payload).await;
            let on = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("on").and_then(|b| b.as_bool()))
                .unwrap_or(true);
            let mut inner = fake.lock();
            if on {
                inner.throttled_ips.insert(ip.to_string());
            } else {
                inner.throttled_ips.remove(*ip);
            }
            HttpResponse::Ok().json(json!({}))
        }
        ["release", name] => {
            fake.release(name);
            HttpResponse::Ok().json(json!({}))
        }
        ["keys", key] if req.method() == actix_web::http::Method::POST => {
            let body = read_all(payload).await;
            match serde_json::from_slice::<Mode>(&body) {
                Ok(mode) => {
                    fake.lock().modes.insert(key.to_string(), mode);
                    HttpResponse::Ok().json(json!({}))
                }
                Err(e) => HttpResponse::BadRequest().body(e.to_string()),
            }
        }
        ["live"] => HttpResponse::Ok().json(&fake.lock().live_open),
        ["resources"] => {
            let inner = fake.lock();
            let owners: std::collections::HashMap<&String, &String> =
                inner.resources.iter().map(|(n, r)| (n, &r.owner)).collect();
            HttpResponse::Ok().json(owners)
        }
        ["files"] => {
            let inner = fake.lock();
            let owners: std::collections::HashMap<&String, &String> =
                inner.files.iter().map(|(n, m)| (n, &m.owner)).collect();
            HttpResponse::Ok().json(owners)
        }
        _ => HttpResponse::NotFound().finish(),
    }
}

async fn handle(
    req: HttpRequest,
    payload: web::Payload,
    fake: web::Data<Fake>,
    cfg: web::Data<Config>,
) -> HttpResponse {
    let path = req.path().to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if let ["_fake", rest @ ..] = segs.as_slice() {
        return control(&fake, &req, payload, rest).await;
    }
    let key = gemini::presented_key(req.headers(), req.query_string());
    if cfg.record {
        let headers = req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    v.to_str().unwrap_or("<binary>").to_string(),
                )
            })
            .collect();
        fake.lock().seen.push(Seen {
            method: req.method().to_string(),
            path: path.clone(),
            query: req.query_string().to_string(),
            headers,
            key: key.clone(),
            peer: req
                .peer_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default(),
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        });
    }
    let peer = req
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    if fake.lock().throttled_ips.contains(&peer) {
        let openai = segs.get(1) == Some(&"openai");
        return errors::respond(429, errors::quota(Some("30s"), None, None), openai);
    }
    match segs.as_slice() {
        ["ws", method] if method.contains("GenerativeService.BidiGenerateContent") => {
            live::live(fake.clone(), &req, payload, key).await
        }
        ["upload", ver, "files"] => files::upload(&fake, &req, payload, ver, key).await,
        ["upload", ver, "fileSearchStores", id] => {
            resources::store_upload(&fake, &req, payload, ver, id, key).await
        }
        ["download", _ver, "files", id] => {
            let key = match gemini::gate(&fake, key, false).await {
                Ok(k) => k,
                Err(r) => return r,
            };
            resources::download(&fake, &key, id)
        }
        [ver, "openai", rest @ ..] => {
            let _ = ver;
            let body = read_all(payload).await;
            let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or(json!({}));
            let model = value.get("model").and_then(|m| m.as_str());
            let key = match gemini::gate_for(&fake, key, true, model).await {
                Ok(k) => k,
                Err(r) => return r,
            };
            let response = match rest {
                ["models"] => openai::models(),
                ["models", id @ ..] => openai::model(&id.join("/")),
                ["chat", "completions"] => {
                    let google = value
                        .pointer("/extra_body/google")
                        .unwrap_or(&json!(null))
                        .clone();
                    if let Err(r) = resources::check_used(&fake, &key, &google) {
                        return r;
                    }
                    if !cfg.delay.is_zero() {
                        tokio::time::sleep(cfg.delay).await;
                    }
                    openai::chat(&value)
                }
                ["embeddings"] => openai::embeddings(&value),
                _ => {
                    return errors::respond(
                        404,
                        errors::google(404, "Not found.", "NOT_FOUND", json!([])),
                        true,
                    )
                }
            };
            gemini::served(&fake, &key);
            response
        }
        [ver, rest @ ..] if ver.starts_with("v1") => {
            let model = match rest {
                ["models", action] => action.split(':').next(),
                _ => None,
            };
            let key = match gemini::gate_for(&fake, key, false, model).await {
                Ok(k) => k,
                Err(r) => return r,
            };
            match rest {
                ["models"] => gemini::models_list(),
                ["files"] => files::files(&fake, &req, ver, &key, None),
                ["files", id] => files::files(&fake, &req, ver, &key, Some(id)),
                ["models", action] if action.contains(':') => {
                    let body = read_all(payload).await;
                    let value = match gemini::parse_json(&body) {
                        Ok(v) => v,
                        Err(r) => return r,
                    };
                    let n_files = match gemini::check_files(&fake, &key, &value, false) {
                        Ok(n) => n,
                        Err(r) => return r,
                    };
                    if let Err(r) = resources::check_used(&fake, &key, &value) {
                        return r;
                    }
                    let (model, method) = action.split_once(':').unwrap_or((action, ""));
                    if let Some(r) = resources::model_action(&fake, &key, model, method, &value) {
                        return r;
                    }
                    if !cfg.delay.is_zero() {
                        tokio::time::sleep(cfg.delay).await;
                    }
                    let (_, method) = action.split_once(':').unwrap_or((action, ""));
                    let response = match method {
                        "generateContent" => gemini::generate(n_files),
                        "streamGenerateContent" => gemini::stream(
                            &fake,
                            &req,
                            &key,
                            req.query_string().contains("alt=sse"),
                        ),
                        "countTokens" => gemini::count_tokens(&value),
                        "embedContent" => gemini::embed(),
                        "batchEmbedContents" => gemini::batch_embed(&value),
                        _ => {
                            return errors::respond(
                                404,
                                errors::google(404, "Method not found.", "NOT_FOUND", json!([])),
                                false,
                            )
                        }
                    };
                    gemini::served(&fake, &key);
                    response
                }
                ["models", name] => gemini::model_get(name),
                _ => {
                    let body = read_all(payload).await;
                    let value: serde_json::Value =
                        serde_json::from_slice(&body).unwrap_or(json!({}));
                    if let Some(r) = resources::handle(&fake, &req, &key, ver, rest, &value) {
                        return r;
                    }
                    errors::respond(
                        404,
                        errors::google(404, "Not found.", "NOT_FOUND", json!([])),
                        false,
                    )
                }
            }
        }
        _ => errors::respond(
            404,
            errors::google(404, "Not found.", "NOT_FOUND", json!([])),
            false,
        ),
    }
}

fn tls_config(cert: &str, key: &str) -> std::io::Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(e.to_string()))?;
    rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| bad(e.to_string()))
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let listen = env("FAKE_LISTEN").unwrap_or_else(|| "127.0.0.1:0".into());
    let keys = env("FAKE_KEYS")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>();
    let cfg = web::Data::new(Config {
        delay: Duration::from_millis(
            env("FAKE_DELAY_MS")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        ),
        record: env("FAKE_RECORD").as_deref() != Some("0"),
    });
    let fake = web::Data::new(Fake::new(keys));
    let listener = std::net::TcpListener::bind(&listen)?;
    let addr = listener.local_addr()?;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(fake.clone())
            .app_data(cfg.clone())
            .default_service(web::to(handle))
    })
    .workers(2);
    let (server, scheme, control) = match (env("FAKE_TLS_CERT"), env("FAKE_TLS_KEY")) {
        (Some(cert), Some(key)) => {
            // Over TLS, the control endpoints are also served in plain HTTP
            // on a second port, so tests need no client TLS setup.
            let plain = std::net::TcpListener::bind("127.0.0.1:0")?;
            let control = plain.local_addr()?;
            let server = server
                .listen_rustls_0_23(listener, tls_config(&cert, &key)?)?
                .listen(plain)?;
            (server, "https", Some(control))
        }
        _ => (server.listen(listener)?, "http", None),
    };
    if let Some(control) = control {
        println!("control on http://{control}");
    }
    println!("listening on {scheme}://{addr}");
    server.run().await
}
