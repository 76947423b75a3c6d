//! The per-answer hook the pipeline's respond step calls: it keeps the
//! tail of a successful answer as it streams past, reads the token counts
//! there when the answer ends, and records the answer (or the cut).

use std::sync::Arc;

use bytes::Bytes;

use super::scan::{self, Format, HideUsage, Tail};
use super::{ErrorEntry, Series, Usage};
use crate::state::now_ms;

pub struct Meter {
    usage: Arc<Usage>,
    series: Series,
    route: &'static str,
    /// `None`: the answer carries no tokens to count (countTokens).
    format: Option<Format>,
    tail: Option<Tail>,
    hide: Option<HideUsage>,
    done: bool,
    /// The request's trail, told the tokens too.
    trail: Option<crate::domain::requests::Trail>,
}

impl Meter {
    pub fn new(
        usage: Arc<Usage>,
        series: Series,
        route: &'static str,
        format: Option<Format>,
        hide_usage: bool,
    ) -> Self {
        Self {
            usage,
            series,
            route,
            format,
            tail: format.map(Tail::new),
            hide: hide_usage.then(HideUsage::default),
            done: false,
            trail: None,
        }
    }

    /// Tells the request's trail what it counts.
    #[must_use]
    pub fn traced(mut self, trail: Option<crate::domain::requests::Trail>) -> Self {
        self.trail = trail;
        self
    }

    /// A body with a promised length is passed on unchanged.
    pub fn keep_length(&mut self) {
        self.hide = None;
    }

    /// One chunk on its way to the client: what the client gets of it.
    pub fn chunk(&mut self, chunk: Bytes) -> Bytes {
        if let Some(tail) = &mut self.tail {
            tail.push(&chunk);
        }
        match &mut self.hide {
            Some(h) => h.chunk(&chunk),
            None => chunk,
        }
    }

    /// The answer ended whole: records it; returns what is still held back.
    pub fn finish(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        self.served();
        self.hide
            .as_mut()
            .map(HideUsage::finish)
            .filter(|b| !b.is_empty())
    }

    /// Records a served answer with the tokens its tail reports.
    fn served(&mut self) {
        self.done = true;
        let tokens = match (self.format, &self.tail) {
            (Some(f), Some(tail)) => scan::tokens(f, tail.bytes()),
            _ => None,
        };
        self.usage.success(&self.series, tokens.as_ref(), now_ms());
        if let (Some(trail), Some(t)) = (&self.trail, &tokens) {
            trail.tokens(t);
        }
    }

    /// The answer was cut mid-way (`stream_cut`, `stream_stalled`).
    pub fn cut(&mut self, reason: &'static str, status: u16) {
        if self.done {
            return;
        }
        self.done = true;
        if let Some(trail) = &self.trail {
            trail.outcome(reason);
        }
        self.usage.failure(
            &self.series,
            reason,
            ErrorEntry {
                time_ms: now_ms(),
                key_id: self.series.key_id.clone(),
                model: super::clean_model(self.series.model.as_deref()),
                route: self.route.to_string(),
                status,
                google_status: None,
                reason: Some(reason.to_string()),
                retry_delay_s: None,
                n: String::new(),
            },
        );
    }
}

impl Drop for Meter {
    /// An answer whose end was never polled: a body of known length sent
    /// whole, or a client that hung up mid-answer. The upstream served it,
    /// so it counts as a request, with the tokens its tail reports (a
    /// stream's running counts so far), if any.
    fn drop(&mut self) {
        if !self.done {
            self.served();
        }
    }
}
