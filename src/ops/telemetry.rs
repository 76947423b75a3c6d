//! Logging and traces. Logs: `tracing` to stderr, text or one JSON object a
//! line, level from `RUST_LOG`. Every request gets a root span carrying its
//! request id (the client's `x-request-id` when it sends a sane one). The
//! span records the path only, with a session id masked: the query can
//! carry a client token (`?key=`).
//!
//! Traces: with `GB_OTLP_ENDPOINT` set, the same spans also go to an
//! OpenTelemetry collector over OTLP/HTTP — the request span (route, model,
//! key id, token id, status), its `attempt` spans and its `store` calls, and
//! a `live_session` span per Live session. A client's W3C `traceparent`
//! makes the request part of the client's trace. Without the variable the
//! subscriber is the plain logger and nothing is exported.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::HttpMessage;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use tracing::Span;
use tracing_actix_web::RootSpanBuilder;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::settings::{LogFormat, Logging, Otlp};

/// Whether spans are exported (a client's `traceparent` is read only then).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// How often finished spans are sent, at most.
const EXPORT_EVERY: Duration = Duration::from_secs(1);

/// How long one export may take before it is given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stopping replica waits to send the spans it still holds:
/// longer than one export may take.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(15);

/// A failed export is logged at most this often (the exporter tries again
/// with every batch).
const FAILURE_LOG_EVERY_MS: u64 = 60_000;

/// Whether spans are exported: what only a trace needs is done only then.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The current request's span when spans are exported, else none (holding
/// it costs a reference count).
pub fn request_span() -> Span {
    if exporting() {
        Span::current()
    } else {
        Span::none()
    }
}

/// The trace exporter, while one runs; dropping it sends what is left.
pub struct Traces {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Traces {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown_with_timeout(SHUTDOWN_WAIT) {
                tracing::warn!(error = %e, "traces not all sent at shutdown");
            }
        }
    }
}

fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,actix_server=warn"))
}

/// Starts logging, and the trace exporter when `GB_OTLP_ENDPOINT` is set.
pub fn init(logging: &Logging) -> anyhow::Result<Traces> {
    let Some(otlp) = &logging.otlp else {
        let builder = tracing_subscriber::fmt()
            .with_env_filter(env_filter())
            .with_writer(std::io::stderr)
            .with_target(false);
        let result = match logging.format {
            LogFormat::Json => builder.json().flatten_event(true).try_init(),
            LogFormat::Text => builder.with_ansi(false).try_init(),
        };
        // A second init (tests) keeps the first subscriber.
        let _ = result;
        return Ok(Traces { provider: None });
    };
    let provider = tracer_provider(otlp)?;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match logging.format {
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        LogFormat::Text => fmt.with_ansi(false).boxed(),
    };
    // Only the attributes the spans declare: no source locations, threads,
    // targets or busy/idle times on every span.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("gemini-balancer"))
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_filter(
            tracing_subscriber::filter::dynamic_filter_fn(exported)
                // Decided once per callsite for everything but the
                // gateway's spans, so other crates' debug events are
                // skipped as they are without traces.
                .with_callsite_filter(|meta| {
                    if meta.is_span() && meta.target().starts_with("gemini_balancer") {
                        tracing::subscriber::Interest::sometimes()
                    } else {
                        tracing::subscriber::Interest::never()
                    }
                }),
        );
    let layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> =
        vec![fmt.with_filter(env_filter()).boxed(), otel.boxed()];
    let _ = tracing_subscriber::registry().with(layers).try_init();
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    EXPORTING.store(true, Ordering::Relaxed);
    tracing::info!(endpoint = %otlp.traces_url, sample = otlp.sample, "exporting traces over OTLP/HTTP");
    Ok(Traces {
        provider: Some(provider),
    })
}

/// The spans a trace holds: the gateway's own, and only those of an API
/// request or a Live session — a background task's store calls have no
/// request to belong to and would each be a trace of one span, and health
/// probes and scrapes (`ops_request` spans) are not traced at all.
fn exported(meta: &tracing::Metadata<'_>, cx: &Context<'_, Registry>) -> bool {
    meta.is_span()
        && meta.target().starts_with("gemini_balancer")
        && (meta.name() == "request" || cx.lookup_current().is_some())
}

fn tracer_provider(otlp: &Otlp) -> anyhow::Result<SdkTracerProvider> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(EXPORT_TIMEOUT))
        .http_status_as_error(false)
        // Straight to the collector: the proxy variables of the environment
        // are not the gateway's configuration.
        .proxy(None)
        .build()
        .into();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(Exporter(agent))
        .with_endpoint(otlp.traces_url.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()?;
    let batches = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(EXPORT_EVERY)
                .build(),
        )
        .build();
    let resource = opentelemetry_sdk::Resource::builder_empty()
        .with_service_name("gemini-balancer")
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(batches)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            otlp.sample,
        ))))
        .with_resource(resource)
        .build())
}

/// Posts OTLP batches. The SDK exports on its own thread and waits for each
/// export there, so a blocking client is what it needs.
#[derive(Debug)]
struct Exporter(ureq::Agent);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Exporter {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let (parts, body) = request.into_parts();
        let mut answer = match self.0.run(http::Request::from_parts(parts, body.to_vec())) {
            Ok(answer) => answer,
            Err(e) => {
                export_failed(&e.to_string());
                return Err(e.into());
            }
        };
        let status = answer.status();
        if !status.is_success() {
            export_failed(&format!("the collector answered {status}"));
        }
        let body = answer
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_vec()?;
        Ok(http::Response::builder()
            .status(status)
            .body(opentelemetry_http::Bytes::from(body))?)
    }
}

/// Logs that an export failed, at most once a minute (exports run on the
/// SDK's thread; these log events never reach the trace layer).
fn export_failed(why: &str) {
    static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    /// Milliseconds since the first failure before which none is logged.
    static QUIET_UNTIL_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = u64::try_from(
        STARTED
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis(),
    )
    .unwrap_or(u64::MAX);
    let until = QUIET_UNTIL_MS.load(Ordering::Relaxed);
    if now >= until
        && QUIET_UNTIL_MS
            .compare_exchange(
                until,
                now + FAILURE_LOG_EVERY_MS,
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
    {
        tracing::warn!(error = why, "traces could not be sent to the collector (GB_OTLP_ENDPOINT); logged at most once a minute");
    }
}

/// A request's path as spans and logs show it: a session id (which names a
/// client's conversation) masked, as the prefix of an API path and in the
/// admin API's session lookup.
fn shown_path(path: &str) -> std::borrow::Cow<'_, str> {
    for prefix in ["/session/", "/admin/api/sessions/"] {
        if let Some(rest) = path.strip_prefix(prefix) {
            let tail = rest.find('/').map_or("", |i| &rest[i..]);
            return std::borrow::Cow::Owned(format!("{prefix}-{tail}"));
        }
    }
    std::borrow::Cow::Borrowed(path)
}

/// Health probes and metric scrapes: served, logged, never traced.
fn is_ops_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
}

/// A span that a finished request's record is written on
/// (`http::routes::record_on`):
/// the fields given, then the record's, declared empty until it ends.
macro_rules! record_span {
    ($name:literal, $($field:tt)*) => {
        tracing::info_span!(
            $name,
            $($field)*
            route = tracing::field::Empty,
            replica = tracing::field::Empty,
            model = tracing::field::Empty,
            key_id = tracing::field::Empty,
            token_id = tracing::field::Empty,
            attempts = tracing::field::Empty,
            outcome = tracing::field::Empty,
            chosen_by = tracing::field::Empty,
            tokens.prompt = tracing::field::Empty,
            tokens.output = tracing::field::Empty,
        )
    };
}
pub(crate) use record_span;

/// The request id of a request, set by the root span.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

fn sane_request_id(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// A new request id: a random per-process prefix and a counter. Unique across
/// replicas without a random draw (a syscall) per request.
fn new_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static PREFIX: OnceLock<String> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let mut b = [0u8; 6];
        let _ = getrandom::fill(&mut b);
        hex::encode(b)
    });
    format!("{prefix}-{:010x}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

pub struct GatewaySpan;

impl RootSpanBuilder for GatewaySpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let id = request
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| sane_request_id(v))
            .map_or_else(new_request_id, str::to_string);
        request.extensions_mut().insert(RequestId(id.clone()));
        if is_ops_path(request.path()) {
            return tracing::info_span!(
                "ops_request",
                request_id = %id,
                method = %request.method(),
                path = %request.path(),
                status = tracing::field::Empty,
            );
        }
        let span = record_span!(
            "request",
            otel.kind = "server",
            request_id = %id,
            method = %request.method(),
            path = %shown_path(request.path()),
            status = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        if exporting() {
            let parent = opentelemetry::global::get_text_map_propagator(|p| {
                p.extract(&Headers(request.headers()))
            });
            let _ = span.set_parent(parent);
        }
        span
    }

    fn on_request_end<B: MessageBody>(
        span: Span,
        outcome: &Result<ServiceResponse<B>, actix_web::Error>,
    ) {
        let status = match outcome {
            Ok(resp) => resp.status().as_u16(),
            Err(e) => e.as_response_error().status_code().as_u16(),
        };
        // As `i64`, the integer type OTLP attributes have.
        span.record("status", i64::from(status));
        if status >= 500 {
            span.record("otel.status_code", "ERROR");
        }
        let _guard = span.enter();
        tracing::info!(status, "served");
    }
}

/// A request's headers, as the trace-context propagator reads them.
struct Headers<'a>(&'a actix_web::http::header::HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .map(actix_web::http::header::HeaderName::as_str)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::shown_path;

    #[test]
    fn a_session_id_is_masked_in_the_path_spans_show() {
        assert_eq!(
            shown_path("/session/abc123/v1beta/models/m:generateContent"),
            "/session/-/v1beta/models/m:generateContent"
        );
        assert_eq!(shown_path("/session/abc123"), "/session/-");
        assert_eq!(
            shown_path("/admin/api/sessions/abc123"),
            "/admin/api/sessions/-"
        );
        assert_eq!(shown_path("/admin/api/sessions"), "/admin/api/sessions");
        assert_eq!(shown_path("/v1beta/models"), "/v1beta/models");
    }
}
