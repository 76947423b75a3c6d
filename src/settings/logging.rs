//! `logging`: log output, and traces sent over OTLP.

use super::raw::Raw;
use super::{err, SettingsError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Log output; the level comes from `RUST_LOG`.
#[derive(Debug, Clone)]
pub struct Logging {
    /// `GB_LOG_FORMAT`.
    pub format: LogFormat,
    /// Where traces go, when they go anywhere.
    pub otlp: Option<Otlp>,
}

/// OpenTelemetry traces over OTLP/HTTP (protobuf).
#[derive(Debug, Clone, PartialEq)]
pub struct Otlp {
    /// The collector's traces URL: `GB_OTLP_ENDPOINT` as given when it ends
    /// in `/v1/traces`, else with `/v1/traces` added (as the OpenTelemetry
    /// base endpoint is read).
    pub traces_url: String,
    /// The share of new traces kept, 0 to 1 (`GB_OTLP_SAMPLE`). A request
    /// that continues a client's trace follows the client's decision.
    pub sample: f64,
}

impl Logging {
    pub const VARS: &'static [&'static str] =
        &["GB_LOG_FORMAT", "GB_OTLP_ENDPOINT", "GB_OTLP_SAMPLE"];

    pub(super) fn load(raw: &Raw) -> Result<Self, SettingsError> {
        let sample_text = raw.req("GB_OTLP_SAMPLE")?;
        let sample = sample_text
            .parse::<f64>()
            .ok()
            .filter(|s| (0.0..=1.0).contains(s))
            .ok_or_else(|| {
                err(
                    "GB_OTLP_SAMPLE",
                    format!("expected a number from 0 to 1, got {sample_text:?}"),
                )
            })?;
        let otlp = match raw.opt("GB_OTLP_ENDPOINT") {
            None => None,
            Some(endpoint) => Some(Otlp {
                traces_url: traces_url(&endpoint)?,
                sample,
            }),
        };
        Ok(Logging {
            format: raw.choice(
                "GB_LOG_FORMAT",
                &[("text", LogFormat::Text), ("json", LogFormat::Json)],
            )?,
            otlp,
        })
    }
}

fn traces_url(endpoint: &str) -> Result<String, SettingsError> {
    let bad = |why: &str| err("GB_OTLP_ENDPOINT", why.to_string());
    let Some((scheme, rest)) = endpoint.split_once("://") else {
        return Err(bad("expected an http:// or https:// URL"));
    };
    if !matches!(scheme, "http" | "https") {
        return Err(bad("expected an http:// or https:// URL"));
    }
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || authority.contains('@') {
        // Credentials in a URL end up in logs; collectors take a header.
        return Err(bad("expected a host, and no user or password in the URL"));
    }
    if endpoint.contains(['?', '#']) {
        return Err(bad("expected no query or fragment"));
    }
    let base = endpoint.trim_end_matches('/');
    Ok(if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    })
}

#[cfg(test)]
mod tests {
    use super::traces_url;

    #[test]
    fn the_traces_path_is_added_to_a_base_endpoint_once() {
        assert_eq!(
            traces_url("http://collector:4318").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://otel.example/v1/traces").unwrap(),
            "https://otel.example/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/prefix").unwrap(),
            "http://c:4318/prefix/v1/traces"
        );
        for bad in [
            "collector:4318",
            "ftp://c",
            "http://",
            "http://u:p@c",
            "http://c/?a=b",
        ] {
            assert!(traces_url(bad).is_err(), "{bad}");
        }
    }
}
