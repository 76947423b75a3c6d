//! The upstream side: one `awc` client per worker (it is `!Send`), TLS with
//! rustls and the webpki roots (plus `GB_UPSTREAM_CA_FILE`), and the rules for
//! what crosses from the client's request to Google's and back.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{HeaderMap, HeaderName};
use actix_web::http::Method;
use anyhow::Context;
use awc::{Client, ClientRequest, Connector};
use bytes::Bytes;

use crate::upstream::proxy::{ProxyConnector, ProxyRouter};

/// How the real key travels upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStyle {
    /// `x-goog-api-key` (native Gemini routes).
    GoogHeader,
    /// `Authorization: Bearer` (OpenAI-compatible routes).
    Bearer,
}

/// Builds the TLS configuration once; every worker's connector shares it.
pub fn tls_config(ca_file: Option<&str>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path)
            .with_context(|| format!("GB_UPSTREAM_CA_FILE: cannot read {path}"))?
        {
            let cert = cert.context("GB_UPSTREAM_CA_FILE: not a PEM certificate")?;
            roots
                .add(cert)
                .context("GB_UPSTREAM_CA_FILE: certificate rejected")?;
            added += 1;
        }
        anyhow::ensure!(added > 0, "GB_UPSTREAM_CA_FILE: no certificate in the file");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS setup")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// One worker's upstream clients: a direct one, and one per outbound proxy
/// (each with its own connection pool).
pub struct Upstream {
    direct: Client,
    via: Vec<Client>,
    /// The same over HTTP/1.1 only: a WebSocket cannot be opened over an
    /// HTTP/2 connection, which ALPN would otherwise pick.
    ws_direct: Client,
    ws_via: Vec<Client>,
    router: Option<Arc<ProxyRouter>>,
    base: String,
}

/// An awc client over `connector` (direct TCP or a proxy tunnel) with the
/// gateway's TLS, pool and timeout settings.
fn client<S, Io>(
    connector: Connector<S>,
    tls: &Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
    timeout: Duration,
) -> Client
where
    S: actix_web::dev::Service<
            actix_tls::connect::ConnectInfo<awc::http::Uri>,
            Response = actix_tls::connect::Connection<awc::http::Uri, Io>,
            Error = actix_tls::connect::ConnectError,
        > + Clone
        + 'static,
    Io: actix_rt::net::ActixStream + std::fmt::Debug + 'static,
{
    Client::builder()
        .connector(
            connector
                .rustls_0_23(tls.clone())
                .timeout(connect_timeout)
                .limit(1024)
                .conn_keep_alive(Duration::from_secs(60)),
        )
        .timeout(timeout)
        .disable_redirects()
        .no_default_headers()
        .finish()
}

impl Upstream {
    pub fn new(
        base: &str,
        tls: Arc<rustls::ClientConfig>,
        timeout: Duration,
        router: Option<Arc<ProxyRouter>>,
    ) -> Self {
        let connect_timeout = Duration::from_secs(10);
        let mut h1 = (*tls).clone();
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        let h1 = Arc::new(h1);
        let clients = |tls: &Arc<rustls::ClientConfig>| {
            let direct = client(Connector::new(), tls, connect_timeout, timeout);
            let via: Vec<Client> = router
                .iter()
                .flat_map(|r| r.specs.iter())
                .map(|spec| {
                    let tunnel = ProxyConnector::new(spec.clone(), connect_timeout);
                    client(
                        Connector::new().connector(tunnel),
                        tls,
                        connect_timeout,
                        timeout,
                    )
                })
                .collect();
            (direct, via)
        };
        let (direct, via) = clients(&tls);
        let (ws_direct, ws_via) = clients(&h1);
        Self {
            direct,
            via,
            ws_direct,
            ws_via,
            router,
            base: base.to_string(),
        }
    }

    /// The proxy (index) the requests of the key `key_id` leave through
    /// now, if any.
    pub fn proxy_of(&self, key_id: &str) -> Option<usize> {
        self.router.as_ref().and_then(|r| r.route(key_id))
    }

    fn client_for(&self, key: Option<Credential<'_>>) -> &Client {
        key.and_then(|k| self.proxy_of(k.id))
            .and_then(|i| self.via.get(i))
            .unwrap_or(&self.direct)
    }

    /// A request to `path_and_query` on the upstream with the client's
    /// forwardable headers and the real key.
    pub fn request(
        &self,
        method: Method,
        path_and_query: &str,
        client_headers: &HeaderMap,
        key: Option<Credential<'_>>,
        style: KeyStyle,
    ) -> ClientRequest {
        self.request_to(
            method,
            &format!("{}{}", self.base, path_and_query),
            client_headers,
            key,
            style,
        )
    }

    /// Same as [`Upstream::request`] with an absolute URL (upload sessions).
    pub fn request_to(
        &self,
        method: Method,
        url: &str,
        client_headers: &HeaderMap,
        key: Option<Credential<'_>>,
        style: KeyStyle,
    ) -> ClientRequest {
        let mut req = self.client_for(key).request(method, url);
        for (name, value) in client_headers {
            if forwardable(name) {
                req = req.append_header((name.clone(), value.clone()));
            }
        }
        if let Some(key) = key {
            req = match style {
                KeyStyle::GoogHeader => req.insert_header((GOOG_API_KEY, key.secret)),
                KeyStyle::Bearer => {
                    req.insert_header(("authorization", format!("Bearer {}", key.secret)))
                }
            };
        }
        req
    }
}

impl Upstream {
    /// A WebSocket handshake to `path_and_query` on the upstream (the Live
    /// API) with the client's forwardable headers and the real key, or an
    /// ephemeral token minted with that key (`Authorization: Token …`).
    pub fn ws(
        &self,
        path_and_query: &str,
        client_headers: &HeaderMap,
        key: Option<Credential<'_>>,
        ephemeral: Option<&str>,
        max_frame: usize,
    ) -> awc::ws::WebsocketsRequest {
        let ws_client = key
            .and_then(|k| self.proxy_of(k.id))
            .and_then(|i| self.ws_via.get(i))
            .unwrap_or(&self.ws_direct);
        let mut req = ws_client
            .ws(format!("{}{}", self.base, path_and_query))
            .max_frame_size(max_frame);
        for (name, value) in client_headers {
            if forwardable(name) && !name.as_str().starts_with("sec-websocket") {
                req = req.set_header(name.clone(), value.clone());
            }
        }
        match (ephemeral, key) {
            (Some(token), _) => req = req.set_header("authorization", format!("Token {token}")),
            (None, Some(key)) => req = req.set_header("x-goog-api-key", key.secret),
            (None, None) => {}
        }
        req
    }
}

/// The header a key travels in: named once (parsing a name that is not a
/// standard header allocates).
const GOOG_API_KEY: actix_web::http::header::HeaderName =
    actix_web::http::header::HeaderName::from_static("x-goog-api-key");

/// What the upstream needs of a pool key: its id (which proxy its requests
/// leave through) and its secret, written into the request at the last
/// moment.
#[derive(Clone, Copy)]
pub struct Credential<'a> {
    pub id: &'a str,
    pub secret: &'a str,
}

/// Longest a small body (an error answer, a resource's metadata) may take to
/// arrive whole.
const SMALL_BODY_DEADLINE: Duration = Duration::from_secs(10);

/// A small upstream body read whole, within `limit` bytes and the lesser of
/// `idle` and 10 s; `None` when it is larger, stalls, or ends short of the
/// length it promised.
pub async fn read_small<S>(
    resp: &mut awc::ClientResponse<S>,
    limit: usize,
    idle: Duration,
) -> Option<Bytes>
where
    S: futures_util::Stream<Item = Result<Bytes, awc::error::PayloadError>> + Unpin,
{
    let promised = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    match tokio::time::timeout(idle.min(SMALL_BODY_DEADLINE), resp.body().limit(limit)).await {
        // A connection closed early ends the body as if it were complete.
        Ok(Ok(body)) if promised.is_some_and(|n| n != body.len()) => {
            tracing::warn!(got = body.len(), promised, "upstream body ended early");
            None
        }
        Ok(Ok(body)) => Some(body),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "upstream body could not be read");
            None
        }
        Err(_) => {
            tracing::warn!("upstream body stalled");
            None
        }
    }
}

/// Headers never passed on: hop-by-hop ones, the client's credentials and
/// session id, those the client library recomputes, and method overrides
/// (Google honours them: a POST the gateway routed as a POST could act as a
/// DELETE on a key the gateway did not choose for one).
const DROPPED: [&str; 18] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "x-goog-api-key",
    "authorization",
    "x-session-id",
    "expect",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

pub fn forwardable(name: &HeaderName) -> bool {
    !DROPPED.contains(&name.as_str())
}

/// Response headers not copied back to the client.
pub fn response_forwardable(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
            | "alt-svc"
    )
}

/// Query parameters never forwarded, in whatever case or percent-encoding
/// the client spelled their names (Google decodes `k%65y` as `key`): the
/// gateway's own (`key`, the client token; `session_id`) and every other
/// form Google reads a credential from (`$key`, `access_token`): a
/// credential the gateway did not choose could get a pool key blamed for
/// it. The Live API's ephemeral token goes upstream in a header.
const GATEWAY_ONLY: [&str; 4] = ["key", "session_id", "$key", "access_token"];

/// A query parameter name that is not text: it does not decode to UTF-8, or
/// holds a control character.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a query parameter name is not valid text")]
pub struct BadParamName;

/// The decoded name of one `name=value` pair.
fn param_name(pair: &str) -> Result<std::borrow::Cow<'_, str>, BadParamName> {
    let raw = pair.split_once('=').map_or(pair, |(name, _)| name);
    let name = if raw.bytes().any(|b| b == b'%' || b == b'+') {
        std::borrow::Cow::Owned(
            String::from_utf8(percent_decode_bytes(raw)).map_err(|_| BadParamName)?,
        )
    } else {
        std::borrow::Cow::Borrowed(raw)
    };
    if name.chars().any(char::is_control) {
        return Err(BadParamName);
    }
    Ok(name)
}

/// The query string without the parameters only the gateway reads (the
/// client's token, the session id), matched by their decoded names without
/// regard to case; the pairs kept are passed on as the client wrote them.
pub fn filtered_query(query: &str) -> Result<String, BadParamName> {
    let mut kept = String::with_capacity(query.len());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let name = param_name(pair)?;
        if GATEWAY_ONLY.iter().any(|g| name.eq_ignore_ascii_case(g)) {
            continue;
        }
        if !kept.is_empty() {
            kept.push('&');
        }
        kept.push_str(pair);
    }
    Ok(kept)
}

/// The value of one query parameter, percent-decoded, found by its decoded
/// name (the first occurrence).
pub fn query_param(query: &str, wanted: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let value = pair.split_once('=').map_or("", |(_, v)| v);
        param_name(pair)
            .is_ok_and(|name| name == wanted)
            .then(|| percent_decode(value))
    })
}

fn percent_decode(s: &str) -> String {
    String::from_utf8_lossy(&percent_decode_bytes(s)).into_owned()
}

/// `%XX` escapes and `+` (a space) decoded; a `%` not followed by two hex
/// digits stays as it is.
fn percent_decode_bytes(s: &str) -> Vec<u8> {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = match bytes[i] {
            b'%' if i + 2 < bytes.len() => hex(bytes[i + 1]).zip(hex(bytes[i + 2])),
            _ => None,
        };
        match (decoded, bytes[i]) {
            (Some((hi, lo)), _) => {
                out.push(hi * 16 + lo);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_loses_key_and_session_only() {
        assert_eq!(
            filtered_query("alt=sse&key=secret&session_id=s1&pageSize=3").unwrap(),
            "alt=sse&pageSize=3"
        );
        assert_eq!(filtered_query("key=x").unwrap(), "");
        assert_eq!(filtered_query("").unwrap(), "");
    }

    #[test]
    fn gateway_parameters_go_in_every_spelling() {
        for q in [
            "k%65y=tok",
            "%6Bey=AIzaEVIL",
            "%6b%65%79=x",
            "KEY=tok",
            "Key=tok",
            "session%5Fid=s",
            "SESSION_ID=s",
            "%73ession_id=s",
            "$key=x",
            "%24key=x",
            "%24KEY=x",
            "access_token=x",
            "access%5Ftoken=x",
            "key",
        ] {
            assert_eq!(
                filtered_query(&format!("alt=sse&{q}&a=1")).unwrap(),
                "alt=sse&a=1",
                "{q}"
            );
        }
        // Kept pairs stay as the client wrote them.
        assert_eq!(
            filtered_query("a%20b=c%2Bd&x=1").unwrap(),
            "a%20b=c%2Bd&x=1"
        );
        assert_eq!(query_param("k%65y=t%2Bx", "key").as_deref(), Some("t+x"));
    }

    #[test]
    fn a_name_that_is_not_text_is_refused() {
        for q in ["key%00=x", "%FF=1", "a=1&k%C3=1", "%0A=1", "ke%7Fy=1"] {
            assert_eq!(filtered_query(q), Err(BadParamName), "{q}");
        }
        // Values are not names: they pass as written.
        assert_eq!(filtered_query("a=%FF%00").unwrap(), "a=%FF%00");
    }

    #[test]
    fn query_params_decode() {
        assert_eq!(query_param("a=1&key=t%2Bx", "key").as_deref(), Some("t+x"));
        assert_eq!(query_param("a=1", "key"), None);
        assert_eq!(query_param("k=%zz", "k").as_deref(), Some("%zz"));
        assert_eq!(query_param("k=%4", "k").as_deref(), Some("%4"));
    }

    #[test]
    fn credentials_and_hop_by_hop_headers_stay_behind() {
        for h in [
            "x-goog-api-key",
            "authorization",
            "x-session-id",
            "connection",
            "x-http-method-override",
        ] {
            assert!(!forwardable(&HeaderName::from_static(h)));
        }
        for h in ["x-goog-upload-command", "user-agent", "x-goog-api-client"] {
            assert!(forwardable(&HeaderName::from_static(h)));
        }
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn forwarded_queries_never_carry_credentials_or_sessions(pairs in proptest::collection::vec(("(key|session_id|alt|pageSize|[a-z]{1,6})", "[A-Za-z0-9%+=]{0,10}"), 0..8)) {
                let query = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
                let out = filtered_query(&query).unwrap();
                for p in out.split('&').filter(|p| !p.is_empty()) {
                    let name = p.split('=').next().unwrap_or("");
                    prop_assert!(name != "key" && name != "session_id");
                }
                let kept: Vec<String> = pairs.iter().filter(|(k, _)| k != "key" && k != "session_id").map(|(k, v)| format!("{k}={v}")).collect();
                prop_assert_eq!(out, kept.join("&"));
            }

            #[test]
            fn query_params_decode_without_panicking(query in ".{0,200}", name in "[a-z]{1,5}") {
                let _ = query_param(&query, &name);
            }

            #[test]
            fn no_spelling_of_a_gateway_parameter_is_forwarded(
                name in "(key|session_id)",
                upper in proptest::collection::vec(any::<bool>(), 10),
                encode in proptest::collection::vec(any::<bool>(), 10),
            ) {
                let spelled: String = name.chars().enumerate().map(|(i, c)| {
                    let c = if upper[i % 10] { c.to_ascii_uppercase() } else { c };
                    if encode[i % 10] { format!("%{:02X}", c as u8) } else { c.to_string() }
                }).collect();
                let out = filtered_query(&format!("a=1&{spelled}=secret&b=2")).unwrap();
                prop_assert_eq!(out, "a=1&b=2");
            }
        }
    }
}
