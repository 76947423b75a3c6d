//! Reading token counts out of answers without deserializing them: Google
//! puts `usageMetadata` (OpenAI-compatible: `usage`) at the end of an answer,
//! and in a stream on its last event, so only the tail of a body is looked
//! at, and only the one object found there is parsed.

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

/// Tokens of one answer, by kind. `output` excludes thoughts, as Google's
/// `candidatesTokenCount` does.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub output: u64,
    pub thoughts: u64,
    pub cached: u64,
    pub total: u64,
}

impl Tokens {
    pub const KINDS: [&'static str; 5] = ["prompt", "output", "thoughts", "cached", "total"];

    pub fn by_kind(&self) -> [(&'static str, u64); 5] {
        [
            ("prompt", self.prompt),
            ("output", self.output),
            ("thoughts", self.thoughts),
            ("cached", self.cached),
            ("total", self.total),
        ]
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(
    clippy::struct_field_names,
    reason = "the fields are Google's, named as it names them"
)]
struct GeminiUsage {
    #[serde(default)]
    prompt_token_count: u64,
    /// The Live API names the answer's tokens `responseTokenCount`.
    #[serde(default, alias = "responseTokenCount")]
    candidates_token_count: u64,
    #[serde(default)]
    thoughts_token_count: u64,
    #[serde(default)]
    cached_content_token_count: u64,
    #[serde(default)]
    total_token_count: u64,
}

#[derive(Deserialize, Default)]
struct Details {
    #[serde(default)]
    cached_tokens: u64,
    #[serde(default)]
    reasoning_tokens: u64,
}

#[derive(Deserialize)]
struct OpenAiUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    total_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
    #[serde(default)]
    completion_tokens_details: Option<Details>,
}

/// Which answer format a body is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Gemini,
    OpenAi,
}

/// The token counts of the last usage object in `tail`, if it holds one
/// whole.
pub fn tokens(format: Format, tail: &[u8]) -> Option<Tokens> {
    match format {
        Format::Gemini => {
            let obj = last_object(tail, marker(format))?;
            let u: GeminiUsage = serde_json::from_slice(obj).ok()?;
            Some(Tokens {
                prompt: u.prompt_token_count,
                output: u.candidates_token_count,
                thoughts: u.thoughts_token_count,
                cached: u.cached_content_token_count,
                total: u.total_token_count,
            })
        }
        Format::OpenAi => {
            let obj = last_object(tail, marker(format))?;
            let u: OpenAiUsage = serde_json::from_slice(obj).ok()?;
            let reasoning = u
                .completion_tokens_details
                .unwrap_or_default()
                .reasoning_tokens;
            Some(Tokens {
                prompt: u.prompt_tokens,
                output: u.completion_tokens.saturating_sub(reasoning),
                thoughts: reasoning,
                cached: u.prompt_tokens_details.unwrap_or_default().cached_tokens,
                total: u.total_tokens,
            })
        }
    }
}

/// The JSON object that follows the last `"name":` in `hay`, whole (`null`
/// and cut-off objects are skipped for an earlier one).
fn last_object<'a>(hay: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let mut end = hay.len();
    while let Some(at) = rfind(&hay[..end], name) {
        end = at;
        let rest = &hay[at + name.len()..];
        let rest = skip_ws(rest);
        let Some(rest) = rest.strip_prefix(b":") else {
            continue;
        };
        let rest = skip_ws(rest);
        if rest.first() != Some(&b'{') {
            continue;
        }
        if let Some(len) = object_len(rest) {
            return Some(&rest[..len]);
        }
    }
    None
}

fn skip_ws(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| b.is_ascii_whitespace()).count();
    &s[n..]
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::rfind(hay, needle)
}

/// Length of the object starting at `s[0] == b'{'`, strings respected.
fn object_len(s: &[u8]) -> Option<usize> {
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    for (i, &b) in s.iter().enumerate() {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' => depth += 1,
            b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// The end of a body, as much as finding its last usage object needs:
/// copied out of the chunks (a chunk is often a slice of a larger read
/// buffer shared with other streams, which holding it would keep alive),
/// and cut down to the last whole usage object as soon as one has arrived,
/// so a long stream keeps about one event, not its whole tail.
pub struct Tail {
    marker: &'static [u8],
    buf: Vec<u8>,
    /// Where the next search starts: the last usage object still arriving,
    /// else the end (bytes before it hold no whole object newer than the one
    /// the buffer starts with).
    settled: usize,
}

/// Most of an answer's end kept while no whole usage object is in it: a
/// usage object with per-modality details is a few hundred bytes.
pub const TAIL_BYTES: usize = 16 * 1024;

impl Tail {
    pub fn new(format: Format) -> Self {
        Self {
            marker: marker(format),
            buf: Vec::new(),
            settled: 0,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        self.buf.extend_from_slice(chunk);
        // A marker may straddle the old end: look again from just before it.
        let from = self.settled.saturating_sub(self.marker.len());
        if let Some(at) = last_whole_from(&self.buf, from, self.marker) {
            self.buf.drain(..at);
            // The buffer now starts with the last whole object; any later
            // marker belongs to an object still arriving.
            let len = self.marker.len();
            self.settled = rfind(&self.buf[len.min(self.buf.len())..], self.marker)
                .map_or(self.buf.len(), |i| i + len);
        } else {
            // An object still arriving is looked at again with the next chunk.
            self.settled =
                rfind(&self.buf[from..], self.marker).map_or(self.buf.len(), |i| i + from);
        }
        if self.buf.len() > 2 * TAIL_BYTES {
            let cut = self.buf.len() - TAIL_BYTES;
            self.buf.drain(..cut);
            self.settled = self.settled.saturating_sub(cut);
        }
        if self.buf.capacity() > 4 * self.buf.len().max(1024) {
            self.buf.shrink_to(self.buf.len().max(1024));
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
}

fn marker(format: Format) -> &'static [u8] {
    match format {
        Format::Gemini => b"\"usageMetadata\"",
        Format::OpenAi => b"\"usage\"",
    }
}

/// Where the last `"name":` whose object is whole starts, searching only
/// markers at or after `from` (earlier ones were looked at before).
fn last_whole_from(hay: &[u8], from: usize, name: &[u8]) -> Option<usize> {
    let mut end = hay.len();
    while let Some(at) = rfind(&hay[from.min(end)..end], name).map(|i| i + from.min(end)) {
        end = at;
        let rest = skip_ws(&hay[at + name.len()..]);
        let Some(rest) = rest.strip_prefix(b":") else {
            continue;
        };
        let rest = skip_ws(rest);
        if rest.first() == Some(&b'{') && object_len(rest).is_some() {
            return Some(at);
        }
    }
    None
}

/// Whether an OpenAI-compatible chat request streams without asking for
/// usage: then `stream_options.include_usage` is added upstream and the
/// usage the answer carries is kept from the client. Returns the body to
/// send (unchanged when nothing was added).
pub fn inject_include_usage(body: &Bytes) -> Option<Bytes> {
    // Cheap test first: most requests do not stream.
    rfind(body, b"\"stream\"")?;
    let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let obj = v.as_object_mut()?;
    if obj.get("stream").and_then(serde_json::Value::as_bool) != Some(true) {
        return None;
    }
    let opts = obj
        .entry("stream_options")
        .or_insert_with(|| serde_json::json!({}));
    let opts = opts.as_object_mut()?;
    if opts
        .get("include_usage")
        .and_then(serde_json::Value::as_bool)
        == Some(true)
    {
        return None;
    }
    opts.insert("include_usage".into(), serde_json::Value::Bool(true));
    serde_json::to_vec(&v).ok().map(Bytes::from)
}

/// Removes usage from an OpenAI-compatible SSE stream whose client did not
/// ask for it: the usage-only event (empty `choices`) is dropped, and a
/// `usage` on an event with choices is set to `null`. Partial events are
/// held until their end arrives.
#[derive(Default)]
pub struct HideUsage {
    carry: BytesMut,
}

impl HideUsage {
    pub fn chunk(&mut self, chunk: &Bytes) -> Bytes {
        self.carry.extend_from_slice(chunk);
        let Some(end) = last_event_end(&self.carry) else {
            return Bytes::new();
        };
        let whole = self.carry.split_to(end).freeze();
        filter_events(&whole)
    }

    /// What is left when the stream ends (an unterminated last event).
    pub fn finish(&mut self) -> Bytes {
        let rest = self.carry.split().freeze();
        filter_events(&rest)
    }
}

/// End (exclusive) of the last complete event: after a blank line.
fn last_event_end(buf: &[u8]) -> Option<usize> {
    (1..buf.len())
        .rev()
        .find(|&i| {
            buf[i] == b'\n' && (buf[i - 1] == b'\n' || (i >= 3 && &buf[i - 3..i] == b"\n\r\n"))
        })
        .map(|i| i + 1)
}

fn filter_events(events: &Bytes) -> Bytes {
    if rfind(events, b"\"usage\"").is_none() {
        return events.clone();
    }
    let mut out = Vec::with_capacity(events.len());
    let mut start = 0;
    while start < events.len() {
        let end = next_event_end(&events[start..]).map_or(events.len(), |e| start + e);
        let event = &events[start..end];
        match rewrite(event) {
            Some(replacement) => out.extend_from_slice(&replacement),
            None => out.extend_from_slice(event),
        }
        start = end;
    }
    Bytes::from(out)
}

fn next_event_end(buf: &[u8]) -> Option<usize> {
    (1..buf.len())
        .find(|&i| {
            buf[i] == b'\n' && (buf[i - 1] == b'\n' || (i >= 3 && &buf[i - 3..i] == b"\n\r\n"))
        })
        .map(|i| i + 1)
}

/// `Some(new bytes)` for an event carrying usage (empty to drop it).
fn rewrite(event: &[u8]) -> Option<Vec<u8>> {
    rfind(event, b"\"usage\"")?;
    let text = std::str::from_utf8(event).ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix("data:"))?.trim();
    let mut v: serde_json::Value = serde_json::from_str(line).ok()?;
    let obj = v.as_object_mut()?;
    if obj.get("usage").is_none_or(serde_json::Value::is_null) {
        return None;
    }
    let no_choices = obj
        .get("choices")
        .and_then(serde_json::Value::as_array)
        .is_none_or(Vec::is_empty);
    if no_choices {
        return Some(Vec::new());
    }
    obj.insert("usage".into(), serde_json::Value::Null);
    let newline = if event.ends_with(b"\r\n\r\n") {
        "\r\n\r\n"
    } else {
        "\n\n"
    };
    Some(format!("data: {}{newline}", serde_json::to_string(&v).ok()?).into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_usage_metadata_of_a_stream_counts() {
        let sse = b"data: {\"candidates\":[],\"usageMetadata\":{\"promptTokenCount\":5,\"candidatesTokenCount\":1,\"totalTokenCount\":6}}\r\n\r\n\
data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"a } \\\" {\"}]}}],\"usageMetadata\":{\"promptTokenCount\":5,\"candidatesTokenCount\":9,\"thoughtsTokenCount\":2,\"cachedContentTokenCount\":1,\"totalTokenCount\":16,\"promptTokensDetails\":[{\"modality\":\"TEXT\",\"tokenCount\":5}]},\"modelVersion\":\"x\"}\r\n\r\n";
        assert_eq!(
            tokens(Format::Gemini, sse),
            Some(Tokens {
                prompt: 5,
                output: 9,
                thoughts: 2,
                cached: 1,
                total: 16
            })
        );
        assert_eq!(tokens(Format::Gemini, b"{\"candidates\":[]}"), None);
        assert_eq!(
            tokens(Format::Gemini, b"\"usageMetadata\": {\"promptTok"),
            None
        );
    }

    #[test]
    fn openai_usage_maps_reasoning_to_thoughts() {
        let body = br#"{"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":10,"total_tokens":21,"completion_tokens_details":{"reasoning_tokens":3},"prompt_tokens_details":{"cached_tokens":2}}}"#;
        assert_eq!(
            tokens(Format::OpenAi, body),
            Some(Tokens {
                prompt: 11,
                output: 7,
                thoughts: 3,
                cached: 2,
                total: 21
            })
        );
        assert_eq!(tokens(Format::OpenAi, br#"{"usage": null}"#), None);
    }

    #[test]
    fn without_a_usage_object_the_tail_keeps_a_bounded_end() {
        let mut t = Tail::new(Format::Gemini);
        for i in 0..100u8 {
            t.push(&[i; 1000]);
        }
        let b = t.bytes();
        assert!(b.len() >= TAIL_BYTES && b.len() <= 2 * TAIL_BYTES);
        assert_eq!(*b.last().unwrap(), 99);
    }

    #[test]
    #[allow(
        clippy::many_single_char_names,
        reason = "a, b, c: the pieces of one split event"
    )]
    fn the_tail_keeps_little_more_than_the_last_whole_usage_object() {
        let event = |n: u64| {
            format!(
                "data: {{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"{}\"}}]}}}}],\
                 \"usageMetadata\":{{\"promptTokenCount\":5,\"candidatesTokenCount\":{n},\
                 \"totalTokenCount\":{}}}}}\r\n\r\n",
                "x".repeat(2000),
                5 + n
            )
        };
        let mut t = Tail::new(Format::Gemini);
        for n in 1..=50 {
            // Split each event at awkward places, the marker included.
            let e = event(n);
            let at = e.find("usageMetadata").unwrap() + 4;
            let (a, b) = e.as_bytes().split_at(at);
            let (b, c) = b.split_at(7);
            t.push(a);
            t.push(b);
            t.push(c);
        }
        assert!(t.bytes().len() < 200, "kept {} bytes", t.bytes().len());
        assert_eq!(
            tokens(Format::Gemini, t.bytes()).map(|u| u.output),
            Some(50)
        );
    }

    #[test]
    fn a_cut_last_event_leaves_the_previous_whole_usage_readable() {
        let mut t = Tail::new(Format::Gemini);
        t.push(br#"data: {"usageMetadata":{"candidatesTokenCount":3}}"#);
        t.push(b"\r\n\r\ndata: {\"x\":1,\"usageMetadata\":{\"candidatesTokenCount\":");
        assert_eq!(tokens(Format::Gemini, t.bytes()).map(|u| u.output), Some(3));
        t.push(b"9}}");
        assert_eq!(tokens(Format::Gemini, t.bytes()).map(|u| u.output), Some(9));
        // The object that arrived in pieces was found whole: the older one is gone.
        assert!(t
            .bytes()
            .starts_with(b"\"usageMetadata\":{\"candidatesTokenCount\":9"));
    }

    #[test]
    fn the_openai_tail_finds_usage_split_across_chunks() {
        let mut t = Tail::new(Format::OpenAi);
        for part in [
            &b"data: {\"choices\":[],\"us"[..],
            b"age\":{\"prompt_tokens\":4,",
            b"\"completion_tokens\":6,\"total_tokens\":10}}\n\n",
        ] {
            t.push(part);
        }
        assert_eq!(tokens(Format::OpenAi, t.bytes()).map(|u| u.total), Some(10));
        // The object was found whole although its marker arrived in pieces.
        assert!(
            t.bytes().starts_with(b"\"usage\""),
            "{:?}",
            String::from_utf8_lossy(t.bytes())
        );
    }

    #[test]
    fn include_usage_is_added_only_to_streams_without_it() {
        let added = inject_include_usage(&Bytes::from_static(
            br#"{"model":"m","stream":true,"messages":[]}"#,
        ))
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&added).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert!(inject_include_usage(&Bytes::from_static(br#"{"stream":false}"#)).is_none());
        assert!(inject_include_usage(&Bytes::from_static(
            br#"{"stream":true,"stream_options":{"include_usage":true}}"#
        ))
        .is_none());
    }

    #[test]
    fn hidden_usage_leaves_the_stream_otherwise_unchanged_across_any_split() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":1}}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"total_tokens\":2}}\n\n\
data: [DONE]\n\n";
        for cut in 1..stream.len() {
            let mut h = HideUsage::default();
            let mut out = Vec::new();
            out.extend_from_slice(&h.chunk(&Bytes::from(stream[..cut].to_string())));
            out.extend_from_slice(&h.chunk(&Bytes::from(stream[cut..].to_string())));
            out.extend_from_slice(&h.finish());
            let out = String::from_utf8(out).unwrap();
            assert!(out.starts_with(
                "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n"
            ));
            assert!(!out.contains("prompt_tokens"), "{out}");
            assert!(out.contains("finish_reason"));
            assert!(out.ends_with("data: [DONE]\n\n"));
        }
    }
}
