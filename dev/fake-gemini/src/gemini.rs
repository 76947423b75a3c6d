//! The native Gemini endpoints: models, generate, stream, count, embed, and
//! the per-key gate every call passes (key checks and the test's switches).

use std::time::Duration;

use actix_web::http::header::HeaderMap;
use actix_web::{HttpRequest, HttpResponse};
use bytes::Bytes;
use serde_json::{json, Value};

use crate::errors;
use crate::state::{Fake, Mode};

pub const MODELS: [&str; 3] = ["gemini-2.0-flash", "gemini-2.5-flash", "text-embedding-004"];

/// The key a request authenticates with: `x-goog-api-key`, `?key=` or Bearer.
pub fn presented_key(headers: &HeaderMap, query: &str) -> Option<String> {
    if let Some(v) = headers.get("x-goog-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.to_string());
    }
    if let Some(k) = query
        .split('&')
        .find_map(|p| p.strip_prefix("key="))
        .map(str::to_string)
    {
        return Some(k);
    }
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string)
}

/// Checks the key and applies its switch. `Ok(key)` lets the call proceed.
pub async fn gate(fake: &Fake, key: Option<String>, openai: bool) -> Result<String, HttpResponse> {
    gate_for(fake, key, openai, None).await
}

/// [`gate`] for a call to `model` (a per-model quota refuses only its model).
pub async fn gate_for(
    fake: &Fake,
    key: Option<String>,
    openai: bool,
    model: Option<&str>,
) -> Result<String, HttpResponse> {
    let Some(key) = key else {
        return Err(errors::respond(403, errors::no_key(), openai));
    };
    let (valid, mode) = {
        let inner = fake.lock();
        (
            inner.keys.contains(&key),
            inner.modes.get(&key).cloned().unwrap_or_default(),
        )
    };
    if !valid {
        return Err(errors::respond(400, errors::invalid_key(), openai));
    }
    if let (Mode::Normal, Some(model)) = (&mode, model) {
        let model = model.trim_start_matches("models/");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        if let Err((secs, quota_id)) = fake.lock().spend(&key, model, now) {
            return Err(errors::respond(
                429,
                errors::quota(Some(&format!("{secs}s")), Some(quota_id), Some(model)),
                openai,
            ));
        }
    }
    match mode {
        Mode::Normal | Mode::BreakStream | Mode::CutFinalize => Ok(key),
        Mode::Drop => Err(dropped()),
        Mode::Stall { status, after, sse } => Err(stalled(status, after, sse)),
        Mode::Quota {
            model: Some(limited),
            ..
        } if model.map(|m| m.trim_start_matches("models/")) != Some(limited.as_str()) => Ok(key),
        Mode::Quota {
            retry_delay,
            quota_id,
            model: limited,
        } => Err(errors::respond(
            429,
            errors::quota(
                retry_delay.as_deref(),
                quota_id.as_deref(),
                limited.as_deref(),
            ),
            openai,
        )),
        Mode::Invalid => Err(errors::respond(400, errors::invalid_key(), openai)),
        Mode::Error { status } => Err(errors::respond(status, errors::server(status), openai)),
        Mode::Slow { ms } => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(key)
        }
    }
}

/// A response whose body fails before anything is written: the server
/// closes the connection without sending even the status line.
fn dropped() -> HttpResponse {
    let fail = futures_util::stream::once(async {
        Err::<Bytes, _>(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "dropped by test switch",
        ))
    });
    HttpResponse::Ok().streaming(fail)
}

/// See [`Mode::Stall`].
fn stalled(status: u16, after: usize, sse: bool) -> HttpResponse {
    use futures_util::StreamExt;
    let body = if status == 200 {
        let ev = candidate("stalled ");
        if sse {
            format!("data: {ev}\r\n\r\n")
        } else {
            ev.to_string()
        }
    } else {
        errors::quota(Some("1s"), None, None).to_string()
    };
    let first = Bytes::from(body.as_bytes()[..after.min(body.len())].to_vec());
    let silence = futures_util::stream::once(async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Err::<Bytes, _>(std::io::Error::other("stalled"))
    });
    let stream = futures_util::StreamExt::chain(
        futures_util::stream::once(async move { Ok::<_, std::io::Error>(first) }),
        silence,
    )
    .boxed_local();
    let mut builder = HttpResponse::build(
        actix_web::http::StatusCode::from_u16(status).unwrap_or(actix_web::http::StatusCode::OK),
    );
    if sse {
        builder.content_type("text/event-stream");
        builder.streaming(stream)
    } else {
        builder.content_type("application/json");
        builder.body(actix_web::body::SizedStream::new(
            body.len() as u64 + 1000,
            stream,
        ))
    }
}

pub fn served(fake: &Fake, key: &str) {
    *fake.lock().served.entry(key.to_string()).or_insert(0) += 1;
}

fn model_json(name: &str) -> Value {
    json!({
        "name": format!("models/{name}"),
        "version": "001",
        "displayName": name,
        "description": "A model of the fake Gemini upstream.",
        "inputTokenLimit": 1048576,
        "outputTokenLimit": 8192,
        "supportedGenerationMethods": ["generateContent", "countTokens", "embedContent", "batchEmbedContents"]
    })
}

pub fn models_list() -> HttpResponse {
    HttpResponse::Ok()
        .json(json!({"models": MODELS.iter().map(|m| model_json(m)).collect::<Vec<_>>()}))
}

pub fn model_get(name: &str) -> HttpResponse {
    if MODELS.contains(&name) {
        HttpResponse::Ok().json(model_json(name))
    } else {
        errors::respond(
            404,
            errors::google(
                404,
                &format!("models/{name} is not found for API version v1beta, or is not supported."),
                "NOT_FOUND",
                json!([]),
            ),
            false,
        )
    }
}

/// Every `fileData` URI in a request, in both spellings.
pub fn file_refs(body: &Value) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    if (k == "fileUri" || k == "file_uri") && v.is_string() {
                        if let Some(s) = v.as_str() {
                            if let Some(at) = s.rfind("files/") {
                                out.push(s[at..].to_string());
                            }
                        }
                    } else {
                        walk(v, out);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    walk(body, &mut out);
    out
}

/// Google refuses a file that the calling key did not upload.
pub fn check_files(
    fake: &Fake,
    key: &str,
    body: &Value,
    openai: bool,
) -> Result<usize, HttpResponse> {
    let refs = file_refs(body);
    let inner = fake.lock();
    for name in &refs {
        let id = name.trim_start_matches("files/");
        match inner.files.get(name) {
            Some(meta) if meta.owner == key => {}
            _ => return Err(errors::respond(403, errors::file_denied(id), openai)),
        }
    }
    Ok(refs.len())
}

/// Token counts every answer reports, as Google does: prompt 11 (2 of
/// them cached), 7 output, 3 thoughts, 21 in all. A stream reports running
/// counts on every event (2, 4, then 7 output tokens), so only its last
/// event holds the answer's total.
pub const USAGE: [u64; 5] = [11, 7, 3, 2, 21];

fn usage_metadata(output: u64) -> Value {
    let [prompt, _, thoughts, cached, _] = USAGE;
    json!({
        "promptTokenCount": prompt,
        "candidatesTokenCount": output,
        "thoughtsTokenCount": thoughts,
        "cachedContentTokenCount": cached,
        "totalTokenCount": prompt + output + thoughts,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}]
    })
}

fn candidate(text: &str) -> Value {
    candidate_with(text, USAGE[1])
}

fn candidate_with(text: &str, output: u64) -> Value {
    json!({
        "candidates": [{
            "content": {"parts": [{"text": text}], "role": "model"},
            "finishReason": "STOP",
            "index": 0
        }],
        "usageMetadata": usage_metadata(output),
        "modelVersion": "gemini-2.0-flash"
    })
}

pub fn parse_json(body: &Bytes) -> Result<Value, HttpResponse> {
    serde_json::from_slice(body).map_err(|_| {
        errors::respond(
            400,
            errors::google(
                400,
                "Invalid JSON payload received.",
                "INVALID_ARGUMENT",
                json!([]),
            ),
            false,
        )
    })
}

pub fn generate(files: usize) -> HttpResponse {
    HttpResponse::Ok().json(candidate(&format!(
        "Hello from the fake upstream ({files} files)."
    )))
}

/// The stream shape set by `FAKE_SSE_EVENTS` and `FAKE_SSE_INTERVAL_MS`
/// (read once): how many events, and the pause before each one after the
/// first. Unset: three events, no pause.
fn stream_shape() -> (usize, Duration) {
    static SHAPE: std::sync::OnceLock<(usize, Duration)> = std::sync::OnceLock::new();
    *SHAPE.get_or_init(|| {
        let num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        (
            num("FAKE_SSE_EVENTS").map_or(3, |n| n.clamp(1, 10_000) as usize),
            Duration::from_millis(num("FAKE_SSE_INTERVAL_MS").unwrap_or(0)),
        )
    })
}

/// `streamGenerateContent?alt=sse`: three events (or the shape above). With
/// `x-fake-hold: NAME` the fake sends the first event, then waits for
/// `/_fake/release/NAME`.
pub fn stream(fake: &Fake, req: &HttpRequest, key: &str, sse: bool) -> HttpResponse {
    let breaks = matches!(fake.lock().modes.get(key), Some(Mode::BreakStream));
    let hold = req
        .headers()
        .get("x-fake-hold")
        .and_then(|v| v.to_str().ok())
        .map(|name| fake.hold(name));
    let (count, pause) = stream_shape();
    let events: Vec<Value> = (0..count)
        .map(|i| {
            // The last event carries the final output count.
            let out = if i + 1 == count {
                USAGE[1]
            } else {
                2 * (i as u64 + 1)
            };
            candidate_with(&format!("chunk {i} "), out)
        })
        .collect();
    let stream = async_stream(events, hold, sse, breaks, pause);
    let content_type = if sse {
        "text/event-stream"
    } else {
        "application/json"
    };
    let mut builder = HttpResponse::Ok();
    builder.content_type(content_type);
    if breaks {
        // Promise more than is sent, so the cut is visible on the wire.
        return builder.body(actix_web::body::SizedStream::new(1 << 20, stream));
    }
    builder.streaming(stream)
}

fn async_stream(
    events: Vec<Value>,
    hold: Option<std::sync::Arc<tokio::sync::Notify>>,
    sse: bool,
    breaks: bool,
    pause: Duration,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    let n = events.len();
    futures_util::stream::unfold(
        (0usize, events, hold),
        move |(i, events, hold)| async move {
            if i >= n {
                return None;
            }
            if i == 1 && breaks {
                // Let the first event reach the wire before the break.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let err = std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "stream broken by test switch",
                );
                return Some((Err(err), (n, events, hold)));
            }
            if i > 0 && !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            if i == 1 {
                if let Some(h) = &hold {
                    let _ = tokio::time::timeout(Duration::from_secs(30), h.notified()).await;
                }
            }
            let ev = &events[i];
            let chunk = if sse {
                format!("data: {ev}\r\n\r\n")
            } else {
                let sep = if i == 0 { "[" } else { "," };
                let end = if i + 1 == n { "]" } else { "" };
                format!("{sep}{ev}{end}")
            };
            Some((Ok(Bytes::from(chunk)), (i + 1, events, hold)))
        },
    )
}

pub fn count_tokens(body: &Value) -> HttpResponse {
    let n = body.to_string().len() / 4;
    HttpResponse::Ok().json(json!({"totalTokens": n.max(1)}))
}

pub fn embed() -> HttpResponse {
    HttpResponse::Ok().json(json!({"embedding": {"values": [0.1, 0.2, 0.3]}}))
}

pub fn batch_embed(body: &Value) -> HttpResponse {
    let n = body
        .get("requests")
        .and_then(|r| r.as_array())
        .map_or(1, Vec::len);
    HttpResponse::Ok().json(json!({"embeddings": (0..n).map(|_| json!({"values": [0.1, 0.2, 0.3]})).collect::<Vec<_>>()}))
}
