//! Google's error bodies, as the real API sends them.

use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use serde_json::{json, Value};

pub fn google(status: u16, message: &str, status_name: &str, details: Value) -> Value {
    let mut err = json!({"code": status, "message": message, "status": status_name});
    if details.as_array().is_some_and(|d| !d.is_empty()) {
        err["details"] = details;
    }
    json!({"error": err})
}

/// The OpenAI-compatible endpoint wraps the same error in a list.
pub fn respond(status: u16, body: Value, openai: bool) -> HttpResponse {
    let body = if openai { json!([body]) } else { body };
    HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .content_type("application/json; charset=UTF-8")
        .body(body.to_string())
}

pub fn invalid_key() -> Value {
    google(
        400,
        "API key not valid. Please pass a valid API key.",
        "INVALID_ARGUMENT",
        json!([{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "API_KEY_INVALID",
            "domain": "googleapis.com",
            "metadata": {"service": "generativelanguage.googleapis.com"}
        }, {
            "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
            "locale": "en-US",
            "message": "API key not valid. Please pass a valid API key."
        }]),
    )
}

pub fn no_key() -> Value {
    google(
        403,
        "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
        "PERMISSION_DENIED",
        json!([]),
    )
}

pub fn quota(retry_delay: Option<&str>, quota_id: Option<&str>, model: Option<&str>) -> Value {
    let quota_id = quota_id.unwrap_or(if model.is_some() {
        "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
    } else {
        "GenerateRequestsPerMinutePerProject-FreeTier"
    });
    let dimensions = match model {
        Some(m) => json!({"location": "global", "model": m}),
        None => json!({"location": "global"}),
    };
    let mut details = vec![
        json!({
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [{
                "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                "quotaId": quota_id,
                "quotaDimensions": dimensions,
                "quotaValue": "15"
            }]
        }),
        json!({
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [{"description": "Learn more about Gemini API quotas", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]
        }),
    ];
    if let Some(delay) = retry_delay {
        details.push(
            json!({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}),
        );
    }
    google(
        429,
        "You exceeded your current quota, please check your plan and billing details.",
        "RESOURCE_EXHAUSTED",
        Value::Array(details),
    )
}

pub fn file_denied(id: &str) -> Value {
    google(
        403,
        &format!("You do not have permission to access the File {id} or it may not exist."),
        "PERMISSION_DENIED",
        json!([]),
    )
}

pub fn server(status: u16) -> Value {
    let name = match status {
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    };
    google(status, "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting", name, json!([]))
}
