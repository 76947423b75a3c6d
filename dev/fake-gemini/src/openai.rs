//! Google's OpenAI-compatible endpoints (`/v1beta/openai/…`), Bearer auth.

use actix_web::HttpResponse;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::gemini::{MODELS, USAGE};

/// The same counts as the native answers, in OpenAI's shape
/// (`completion_tokens` includes the reasoning tokens).
fn usage() -> Value {
    let [prompt, output, thoughts, cached, total] = USAGE;
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": output + thoughts,
        "total_tokens": total,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": thoughts}
    })
}

pub fn models() -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "object": "list",
        "data": MODELS.iter().map(|m| json!({"id": format!("models/{m}"), "object": "model", "created": 0, "owned_by": "google"})).collect::<Vec<_>>()
    }))
}

pub fn model(id: &str) -> HttpResponse {
    HttpResponse::Ok().json(json!({"id": format!("models/{}", id.trim_start_matches("models/")), "object": "model", "created": 0, "owned_by": "google"}))
}

pub fn chat(body: &Value) -> HttpResponse {
    let model = body
        .get("model")
        .and_then(|m| m.as_str())
        .unwrap_or("gemini-2.0-flash")
        .to_string();
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(|v| v.as_bool())
        == Some(true);
    if body.get("stream").and_then(|s| s.as_bool()) == Some(true) {
        let chunks: Vec<String> = (0..3)
            .map(|i| {
                let delta = if i == 0 { json!({"role": "assistant", "content": "Hello "}) } else { json!({"content": format!("part {i} ")}) };
                let finish = if i == 2 { json!("stop") } else { Value::Null };
                format!(
                    "data: {}\n\n",
                    json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
                )
            })
            .chain(include_usage.then(|| {
                format!(
                    "data: {}\n\n",
                    json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
                           "choices": [], "usage": usage()})
                )
            }))
            .chain(std::iter::once("data: [DONE]\n\n".to_string()))
            .collect();
        let stream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::io::Error>(Bytes::from(c))),
        );
        return HttpResponse::Ok()
            .content_type("text/event-stream")
            .streaming(stream);
    }
    HttpResponse::Ok().json(json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the fake upstream."}, "finish_reason": "stop"}],
        "usage": usage()
    }))
}

pub fn embeddings(body: &Value) -> HttpResponse {
    let n = match body.get("input") {
        Some(Value::Array(items)) => items.len(),
        _ => 1,
    };
    HttpResponse::Ok().json(json!({
        "object": "list",
        "data": (0..n).map(|i| json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]})).collect::<Vec<_>>(),
        "model": body.get("model").cloned().unwrap_or(json!("text-embedding-004")),
        "usage": {"prompt_tokens": 2, "total_tokens": 2}
    }))
}
