//! Errors the gateway itself answers with, in the error JSON of the API the
//! client is speaking: Gemini (`{"error":{"code","message","status"}}`),
//! OpenAI (`{"error":{"message","type","code"}}`) or the upload path (Gemini
//! JSON plus `x-goog-upload-status: final`, without which the SDKs retry).

use actix_web::http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

/// Which API's error shape the client expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flavor {
    #[default]
    Gemini,
    OpenAi,
    Upload,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub retry_after: Option<u64>,
    pub flavor: Flavor,
    /// What went wrong, in a word metrics count
    /// (`gb_gateway_errors_total{kind}`): one of a few fixed values, never
    /// anything from the request.
    pub kind: &'static str,
    /// The quota a 429 or 403 of the gateway's own limits names, as
    /// Google's `QuotaFailure` does (and OpenAI's error `code`).
    pub quota: Option<Box<Quota>>,
}

/// A quota violation, in the words of Google's `QuotaFailure` detail.
#[derive(Debug, Clone)]
pub struct Quota {
    /// `ClientRequestsPerMinute`, …
    pub id: &'static str,
    /// The limit's name in the limits file (`rpm`, …).
    pub limit: &'static str,
    /// Who it is set for: a label, a token id or `default`.
    pub client: String,
    pub value: Option<u64>,
    /// OpenAI's error type: `requests` or `tokens`.
    pub openai_type: &'static str,
}

/// The kind an answer carries to the metrics step (`crate::startup`), in the
/// response's extensions.
#[derive(Debug, Clone, Copy)]
pub struct ErrorKind(pub &'static str);

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
            flavor: Flavor::Gemini,
            kind: Self::kind_of(status),
            quota: None,
        }
    }

    #[must_use]
    pub fn quota(mut self, quota: Quota) -> Self {
        self.quota = Some(Box::new(quota));
        self
    }

    /// A kind more precise than the status says.
    #[must_use]
    pub fn kind(mut self, kind: &'static str) -> Self {
        self.kind = kind;
        self
    }

    /// The kind of an error with only its status to go by.
    fn kind_of(status: StatusCode) -> &'static str {
        match status.as_u16() {
            400 => "bad_request",
            401 => "unauthenticated",
            403 => "forbidden",
            404 => "not_found",
            405 => "method_not_allowed",
            409 => "conflict",
            410 => "gone",
            413 | 414 | 431 => "too_large",
            429 => "rate_limited",
            502 => "upstream_unreachable",
            503 => "unavailable",
            504 => "upstream_timeout",
            _ => "other",
        }
    }

    #[must_use]
    pub fn flavor(mut self, flavor: Flavor) -> Self {
        self.flavor = flavor;
        self
    }

    #[must_use]
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn unauthenticated() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "Missing gateway token. Send it as the x-goog-api-key header, the key query \
             parameter, or Authorization: Bearer.",
        )
    }

    pub fn forbidden_token() -> Self {
        Self::new(StatusCode::FORBIDDEN, "The gateway token is not valid.").kind("token_refused")
    }

    pub fn store_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "The session store is unavailable; requests that need a session or file binding \
             cannot be routed right now. Retry shortly.",
        )
        .retry_after(1)
        .kind("store_unavailable")
    }

    /// Google's canonical status name for an HTTP status.
    pub fn gemini_status(status: StatusCode) -> &'static str {
        match status.as_u16() {
            400 | 411 | 413 | 414 | 431 => "INVALID_ARGUMENT",
            401 => "UNAUTHENTICATED",
            403 => "PERMISSION_DENIED",
            404 | 405 => "NOT_FOUND",
            409 => "ABORTED",
            429 => "RESOURCE_EXHAUSTED",
            499 => "CANCELLED",
            501 => "UNIMPLEMENTED",
            503 => "UNAVAILABLE",
            504 => "DEADLINE_EXCEEDED",
            _ if status.is_server_error() => "INTERNAL",
            _ => "FAILED_PRECONDITION",
        }
    }

    fn openai_type(status: StatusCode) -> &'static str {
        match status.as_u16() {
            401 | 403 => "authentication_error",
            404 => "not_found_error",
            409 => "conflict_error",
            429 => "rate_limit_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn body(&self) -> serde_json::Value {
        match self.flavor {
            Flavor::OpenAi => match &self.quota {
                Some(q) if self.status == StatusCode::TOO_MANY_REQUESTS => json!({
                    "error": {
                        "message": self.message,
                        "type": q.openai_type,
                        "param": null,
                        "code": "rate_limit_exceeded",
                    }
                }),
                _ => json!({
                    "error": {
                        "message": self.message,
                        "type": Self::openai_type(self.status),
                        "code": self.status.as_u16(),
                    }
                }),
            },
            Flavor::Gemini | Flavor::Upload => {
                let mut body = json!({
                    "error": {
                        "code": self.status.as_u16(),
                        "message": self.message,
                        "status": Self::gemini_status(self.status),
                    }
                });
                let mut details = Vec::new();
                // A 429 carries Google's RetryInfo, which the SDKs read.
                if let (Some(secs), 429) = (self.retry_after, self.status.as_u16()) {
                    details.push(json!({
                        "@type": "type.googleapis.com/google.rpc.RetryInfo",
                        "retryDelay": format!("{secs}s"),
                    }));
                }
                if let Some(q) = &self.quota {
                    let mut violation = json!({
                        "quotaMetric": format!("gemini-balancer/client_{}", q.limit),
                        "quotaId": q.id,
                        "quotaDimensions": {"client": q.client},
                        "description": self.message,
                    });
                    if let Some(v) = q.value {
                        violation["quotaValue"] = json!(v.to_string());
                    }
                    details.push(json!({
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [violation],
                    }));
                }
                if !details.is_empty() {
                    body["error"]["details"] = json!(details);
                }
                body
            }
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut builder = HttpResponse::build(self.status);
        builder.insert_header((CONTENT_TYPE, HeaderValue::from_static("application/json")));
        if let Some(secs) = self.retry_after {
            builder.insert_header((RETRY_AFTER, secs.to_string()));
        }
        if self.flavor == Flavor::Upload {
            builder.insert_header(("x-goog-upload-status", "final"));
        }
        let mut response = builder.body(self.body().to_string());
        response.extensions_mut().insert(ErrorKind(self.kind));
        response
    }
}

// What the layers below report, as a client reads it. Their errors carry
// facts (ids, counts, delays); the words are written here, once, in the
// dialect of the route that answers (`flavor`).

impl From<crate::domain::attempt::Unreachable> for ApiError {
    fn from(e: crate::domain::attempt::Unreachable) -> Self {
        use crate::domain::attempt::Unreachable;
        match e {
            Unreachable::Timeout => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "The upstream did not answer in time.",
            ),
            Unreachable::Failed => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "The upstream could not be reached.",
            ),
            Unreachable::Stalled => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "The upstream stopped sending in the middle of its answer.",
            )
            .kind("upstream_stalled"),
        }
    }
}

impl From<crate::domain::keys::NoKey> for ApiError {
    fn from(e: crate::domain::keys::NoKey) -> Self {
        use crate::domain::keys::NoKey;
        match e {
            NoKey::AllCooling { retry_after_secs } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "Every API key of the gateway is rate-limited right now. Retry after the \
                 Retry-After delay.",
            )
            .retry_after(retry_after_secs)
            .kind("keys_cooling"),
            NoKey::WindowsFull { model, until_ms } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "Every API key of the gateway has used its known limit for model {model} \
                     (the limits file's [keys]) until the Retry-After delay."
                ),
            )
            .retry_after(
                until_ms
                    .saturating_sub(crate::state::now_ms())
                    .div_ceil(1000),
            )
            .kind("key_windows_full"),
            NoKey::AllDisabled => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "No API key of the gateway is usable: every key is disabled.",
            )
            .kind("keys_disabled"),
            NoKey::Exhausted => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "The upstream failed on every key tried.",
            )
            .kind("keys_exhausted"),
        }
    }
}

impl From<crate::domain::discovery::Refusal> for ApiError {
    fn from(e: crate::domain::discovery::Refusal) -> Self {
        use crate::domain::discovery::Refusal;
        match e {
            Refusal::OverBudget { unknown, budget } => ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "This request names {unknown} files or resources the gateway does not know, \
                     and finding their owners would take more than the {budget} lookups one \
                     request may make (GB_DISCOVERY_BUDGET). Use resources created through the \
                     gateway, or name fewer unknown ones per request."
                ),
            )
            .kind("discovery_budget"),
            Refusal::RateLimited { retry_after_secs } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "This token has made too many lookups of unknown files or resources in the \
                 last minute. Retry after the Retry-After delay.",
            )
            .retry_after(retry_after_secs)
            .kind("discovery_rate"),
        }
    }
}

impl From<crate::domain::limits::Refusal> for ApiError {
    fn from(e: crate::domain::limits::Refusal) -> Self {
        use crate::domain::limits::Refusal;
        use crate::state::limits::Limit;
        match e {
            Refusal::Model { model } => ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "This client token may not use model {model}: the gateway's limits file \
                     allows it other models only."
                ),
            )
            .kind("client_model"),
            Refusal::Reached {
                limit,
                retry_ms,
                used,
                allowed,
                client,
            } => {
                let (what, id, openai_type) = match limit {
                    Limit::Rpm => (
                        format!("{allowed} requests per minute (rpm)"),
                        "ClientRequestsPerMinute",
                        "requests",
                    ),
                    Limit::Tpm => (
                        format!("{allowed} tokens per minute (tpm)"),
                        "ClientTokensPerMinute",
                        "tokens",
                    ),
                    Limit::TokensPerDay => (
                        format!("{allowed} tokens per day (tokens_per_day, UTC)"),
                        "ClientTokensPerDay",
                        "tokens",
                    ),
                    Limit::Concurrent => (
                        format!("{allowed} requests in flight at once (concurrent)"),
                        "ClientConcurrentRequests",
                        "requests",
                    ),
                    Limit::LiveSessions => (
                        format!("{allowed} open Live sessions (live_sessions)"),
                        "ClientLiveSessions",
                        "requests",
                    ),
                };
                let secs = retry_ms.div_ceil(1000).max(1);
                let frees = match limit {
                    Limit::Concurrent | Limit::LiveSessions => {
                        "It frees up when one of them ends.".to_string()
                    }
                    _ => format!("It frees up in {secs} s."),
                };
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "This client token reached its gateway limit of {what}: {used} used. \
                         {frees}"
                    ),
                )
                .retry_after(secs)
                .kind("client_limit")
                .quota(Quota {
                    id,
                    limit: limit.name(),
                    client,
                    value: Some(allowed),
                    openai_type,
                })
            }
        }
    }
}

/// Resources whose owner key was removed from the gateway's configuration:
/// they exist only in that key's project, so no other key can serve them,
/// and the request is never sent.
pub fn gone_key<S: AsRef<str>>(names: &[S]) -> ApiError {
    let names: Vec<&str> = names.iter().map(AsRef::as_ref).collect();
    ApiError::new(
        StatusCode::GONE,
        format!(
            "{} belong to an API key that is no longer configured on the gateway: they \
             exist only in that key's project. Upload or create them again.",
            names.join(", ")
        ),
    )
    .kind("key_gone")
}

/// The 409 message for resources on different keys.
/// `file_advice` says how files come to be split in the upload affinity
/// mode in force, and how to avoid it.
pub fn mixed_message(names: &[String], file_advice: &str) -> String {
    let all_files = names.iter().all(|n| n.starts_with("files/"));
    if all_files {
        format!(
            "The files {} were uploaded under different API keys and cannot be used in one \
             request. {file_advice}",
            names.join(", ")
        )
    } else {
        format!(
            "The resources {} were created under different API keys and cannot be used in one \
             request: each exists only in the project of the key that created it. Create \
             resources that are used together with one session id (X-Session-Id header or the \
             /session/{{id}} base URL), or from each other (a cache from the files it holds).",
            names.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemini_shape() {
        let e = ApiError::not_found("nope");
        assert_eq!(
            e.body(),
            json!({"error": {"code": 404, "message": "nope", "status": "NOT_FOUND"}})
        );
    }

    #[test]
    fn openai_shape() {
        let e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "slow down").flavor(Flavor::OpenAi);
        assert_eq!(
            e.body(),
            json!({"error": {"message": "slow down", "type": "rate_limit_error", "code": 429}})
        );
    }

    #[test]
    fn upload_errors_say_final() {
        let r = ApiError::not_found("x")
            .flavor(Flavor::Upload)
            .error_response();
        assert_eq!(r.headers().get("x-goog-upload-status").unwrap(), "final");
    }
}
