//! The per-request context every step reads: what the client asked for
//! ([`Call`]) and who its upstream calls are counted against ([`Bill`]).

use actix_web::http::header::HeaderMap;
use actix_web::http::Method;
use actix_web::web;
use bytes::Bytes;

use crate::domain::gateway::Gateway;
use crate::domain::requests::Trail;
use crate::domain::session::Session;
use crate::domain::usage::scan::{self, Format};
use crate::domain::usage::Series;
use crate::http::error::Flavor;
use crate::state::now_ms;
use crate::upstream::client::KeyStyle;

/// One client request, parsed at the edge: the context the pipeline's steps
/// share.
pub struct Call {
    pub flavor: Flavor,
    pub method: Method,
    /// Upstream path, without any `/session/{sid}` prefix.
    pub path: String,
    /// Query string without the client's token and session id.
    pub query: String,
    /// An absolute URL Google handed out (an upload session's), sent to
    /// instead of `path` and `query`.
    pub url: Option<String>,
    pub headers: HeaderMap,
    /// The buffered body (small JSON, so it can be re-sent on another key).
    pub body: Bytes,
    /// A body streamed as it arrives (uploads), with its length when known:
    /// sent instead of `body`, once, so never retried on another key.
    pub stream: Option<(web::Payload, Option<u64>)>,
    pub session: Option<Session>,
    /// Id of the client token the request authenticated with (an upload
    /// chunk's: the token that started the upload).
    pub token_id: String,
    pub key_style: KeyStyle,
    /// The model the request is for (normalised), when it names one: keys
    /// cooling for that model are skipped.
    pub model: Option<String>,
    /// What the request log learns of this request.
    pub trail: Option<Trail>,
}

impl Call {
    /// A request with no body, model or session, for the given path; the
    /// route sets what else it has.
    pub fn new(flavor: Flavor, method: Method, path: String, token_id: &str) -> Self {
        Self {
            flavor,
            method,
            path,
            query: String::new(),
            url: None,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            stream: None,
            session: None,
            token_id: token_id.to_string(),
            key_style: KeyStyle::GoogHeader,
            model: None,
            trail: None,
        }
    }

    /// Who this call's upstream calls are counted against.
    pub fn bill(&self) -> Bill {
        Bill {
            token_id: self.token_id.clone(),
            model: self.model.clone(),
            // Named once, by the router, in the trail it gives every API
            // request.
            route: self.trail.as_ref().map_or("unknown", Trail::route),
            trail: self.trail.clone(),
        }
    }

    /// The label of this call's upstream latency: the API it speaks.
    pub fn api(&self) -> &'static str {
        match self.flavor {
            Flavor::OpenAi => "openai",
            Flavor::Upload => "upload",
            // `/v1beta/files/…`, `/download/v1beta/files/…`
            Flavor::Gemini if self.path.split('/').take(4).any(|s| s == "files") => "files",
            Flavor::Gemini => "gemini",
        }
    }

    /// How the tokens of a successful answer are read, on the routes whose
    /// answers report token use: content generation and embeddings
    /// (Google's `usageMetadata`, OpenAI's `usage` on the OpenAI routes) and
    /// a cache's creation. Elsewhere none: `countTokens` is a request, not
    /// token use, and reading a cache again reports its size again.
    pub(super) fn format(&self, route: &str) -> Option<Format> {
        let creates_cache = self.method == Method::POST && self.path.ends_with("/cachedContents");
        match (route, self.flavor) {
            ("generate" | "stream" | "embed", _) => Some(Format::Gemini),
            (_, Flavor::OpenAi) if route.starts_with("openai_") => Some(Format::OpenAi),
            _ if creates_cache => Some(Format::Gemini),
            _ => None,
        }
    }

    pub fn path_and_query(&self) -> String {
        if self.query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, self.query)
        }
    }
}

/// Who a request's upstream calls are counted against in the usage view:
/// every upstream call a client causes counts as one request of its token,
/// the key that served it and its model, with the tokens Google reported
/// (the gateway's own calls, discovery and the re-check, are not counted).
#[derive(Debug, Clone)]
pub struct Bill {
    pub token_id: String,
    pub model: Option<String>,
    /// The route class, for the recent-errors list.
    pub route: &'static str,
    /// The request's trail, for the request log.
    pub trail: Option<Trail>,
}

impl Bill {
    /// A request of `token_id` that names no model.
    pub fn to(token_id: &str, route: &'static str) -> Self {
        Self {
            token_id: token_id.to_string(),
            model: None,
            route,
            trail: None,
        }
    }

    /// The same, noting what it learns in the request's trail.
    #[must_use]
    pub fn traced(mut self, trail: Option<Trail>) -> Self {
        if let Some(t) = &trail {
            t.client(&self.token_id, self.model.as_deref());
        }
        self.trail = trail;
        self
    }

    /// Whether the call counts against a key's published per-model limits
    /// (`[keys]` of the limits file): content generation and embeddings,
    /// native or OpenAI. Model listings and token counts do not.
    pub fn spends_quota(&self) -> bool {
        matches!(
            self.route,
            "generate" | "stream" | "embed" | "openai_chat" | "openai_embeddings"
        )
    }

    pub fn series(&self, key_id: &str) -> Series {
        Series {
            token_id: self.token_id.clone(),
            key_id: key_id.to_string(),
            model: self.model.clone(),
        }
    }

    /// A successful answer, with the tokens Google reported in it.
    pub fn served(&self, gw: &Gateway, key_id: &str, tokens: Option<&scan::Tokens>) {
        gw.usage.success(&self.series(key_id), tokens, now_ms());
        if let (Some(trail), Some(t)) = (&self.trail, tokens) {
            trail.tokens(t);
        }
    }

    /// An upstream error answer (or no answer), as the usage view lists it.
    pub fn refused(
        &self,
        gw: &Gateway,
        key_id: &str,
        status: u16,
        body: &[u8],
        outcome: &'static str,
    ) {
        crate::domain::usage::record_error(
            &gw.usage,
            &self.series(key_id),
            self.route,
            status,
            body,
            outcome,
        );
    }
}
