//! Every route family is counted in the usage view, through two replicas
//! on one Redis: each upstream call a client causes is one request of its
//! token, the key that served it and its model, with the tokens Google
//! reported. For each family, the usage API's sums equal what the fake
//! upstream saw (requests per key) and reported (tokens).

use std::collections::HashMap;

use awc::ws::Message;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};

use crate::helpers::*;
use crate::usage::{usage_with, ADMIN};

const MODEL: &str = "/v1beta/models/gemini-2.0-flash";

/// `[prompt, output, thoughts, cached, total]`.
type Tokens = [u64; 5];

struct Pool {
    _redis: Redis,
    fake: FakeUpstream,
    gws: Vec<Gateway>,
    /// What the client saw Google report, added up.
    seen: Tokens,
}

impl Pool {
    fn start() -> Pool {
        let redis = Redis::start();
        let fake = FakeUpstream::start(&keys(3));
        let gws = (0..2)
            .map(|_| Gateway::start(&fake, Some(&redis), &[("GB_ADMIN_TOKEN", ADMIN)]))
            .collect();
        Pool {
            _redis: redis,
            fake,
            gws,
            seen: [0; 5],
        }
    }

    fn url(&self, i: usize, path: &str) -> String {
        format!("{}{path}", self.gws[i % 2].url)
    }

    /// One request; its status and raw body. The tokens in the answer are
    /// added to what the client saw.
    async fn send(
        &mut self,
        i: usize,
        method: &str,
        path: &str,
        body: Option<Value>,
        openai: bool,
    ) -> (u16, String) {
        let verb = awc::http::Method::from_bytes(method.as_bytes()).unwrap();
        let req = client().request(verb, self.url(i, path));
        let req = if openai {
            req.insert_header(("authorization", format!("Bearer {TOKEN}")))
        } else {
            req.insert_header(("x-goog-api-key", TOKEN))
        };
        let mut resp = match body {
            Some(b) => req.send_json(&b).await,
            None => req.send().await,
        }
        .expect("request");
        let status = resp.status().as_u16();
        let mut text = Vec::new();
        while let Some(chunk) = resp.next().await {
            text.extend_from_slice(&chunk.expect("answer"));
        }
        let text = String::from_utf8_lossy(&text).into_owned();
        // Token use is what a generate, a chat or a cache's creation
        // reports; a cache read shows the cache's size again.
        let uses_tokens = path.contains(":generateContent")
            || path.contains(":streamGenerateContent")
            || path.contains("chat/completions")
            || (method == "POST" && path.ends_with("/cachedContents"));
        if let Some(t) = last_usage(&text).filter(|_| uses_tokens) {
            add(&mut self.seen, t);
        }
        (status, text)
    }

    async fn json(&mut self, i: usize, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, text) = self.send(i, method, path, body, false).await;
        assert_eq!(status, 200, "{path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// The usage API agrees with the upstream: as many requests per key as
    /// the fake saw on that key, the tokens the client saw, no error.
    async fn assert_counted(&self) {
        let mut per_key: HashMap<String, u64> = HashMap::new();
        for r in self.fake.requests().await {
            *per_key
                .entry(key_id(r["key"].as_str().unwrap()))
                .or_default() += 1;
        }
        let total: u64 = per_key.values().sum();
        assert!(total > 0);
        let v = usage_with(&self.gws[0], "?by=key", total).await;
        let counted: HashMap<String, u64> = v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["key_id"].as_str().unwrap().to_string(),
                    r["requests"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(counted, per_key, "requests per key: {v}");
        let t = &v["totals"];
        let totals: Tokens = [
            "prompt_tokens",
            "output_tokens",
            "thoughts_tokens",
            "cached_tokens",
            "total_tokens",
        ]
        .map(|k| t[k].as_u64().unwrap());
        assert_eq!(totals, self.seen, "tokens: {v}");
        assert_eq!(t["errors"], 0, "{v}");
    }
}

fn add(sum: &mut Tokens, t: Tokens) {
    for (s, n) in sum.iter_mut().zip(t) {
        *s += n;
    }
}

/// The last usage an answer reports (Google's `usageMetadata`, the Live
/// API's `responseTokenCount` included, or OpenAI's `usage`), in a JSON
/// document, a JSON array or an SSE stream.
fn last_usage(text: &str) -> Option<Tokens> {
    let text = text.replace("\r\n", "\n");
    let docs: Vec<Value> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).ok()?
    } else if text.contains("data: ") {
        text.split("\n\n")
            .filter_map(|e| e.trim().strip_prefix("data: "))
            .filter_map(|e| serde_json::from_str(e).ok())
            .collect()
    } else {
        vec![serde_json::from_str(&text).ok()?]
    };
    docs.iter().rev().find_map(usage_of)
}

fn usage_of(d: &Value) -> Option<Tokens> {
    if let Some(u) = d.get("usageMetadata") {
        let n = |k: &str| u[k].as_u64().unwrap_or(0);
        return Some([
            n("promptTokenCount"),
            n("candidatesTokenCount") + n("responseTokenCount"),
            n("thoughtsTokenCount"),
            n("cachedContentTokenCount"),
            n("totalTokenCount"),
        ]);
    }
    let u = d.get("usage").filter(|u| u.is_object())?;
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let reasoning = n(&u["completion_tokens_details"]["reasoning_tokens"]);
    Some([
        n(&u["prompt_tokens"]),
        n(&u["completion_tokens"]) - reasoning,
        reasoning,
        n(&u["prompt_tokens_details"]["cached_tokens"]),
        n(&u["total_tokens"]),
    ])
}

fn ask() -> Value {
    json!({"contents": [{"parts": [{"text": "hello there"}]}]})
}

#[actix_rt::test]
async fn native_generate_and_stream_are_counted() {
    let mut p = Pool::start();
    for i in 0..2 {
        let (status, text) = p
            .send(
                i,
                "POST",
                &format!("{MODEL}:generateContent"),
                Some(ask()),
                false,
            )
            .await;
        assert_eq!(status, 200, "{text}");
        let path = format!("{MODEL}:streamGenerateContent?alt=sse");
        let (status, text) = p.send(i, "POST", &path, Some(ask()), false).await;
        assert_eq!(status, 200, "{text}");
    }
    assert!(p.seen[4] > 0);
    p.assert_counted().await;
}

#[actix_rt::test]
async fn openai_chat_and_stream_are_counted() {
    let mut p = Pool::start();
    for i in 0..2 {
        for stream in [false, true] {
            let body = json!({"model": "gemini-2.5-flash", "stream": stream,
                              "stream_options": {"include_usage": true},
                              "messages": [{"role": "user", "content": "hi"}]});
            let body = if stream {
                body
            } else {
                json!({"model": "gemini-2.5-flash", "messages": body["messages"]})
            };
            let (status, text) = p
                .send(
                    i,
                    "POST",
                    "/v1beta/openai/chat/completions",
                    Some(body),
                    true,
                )
                .await;
            assert_eq!(status, 200, "{text}");
        }
    }
    assert!(p.seen[4] > 0);
    p.assert_counted().await;
}

#[actix_rt::test]
async fn a_cache_create_and_a_generate_on_the_cache_are_counted() {
    let mut p = Pool::start();
    let body = json!({"model": "models/gemini-2.0-flash", "ttl": "600s",
                      "contents": [{"role": "user", "parts": [{"text": "a long document"}]}]});
    let cache = p
        .json(0, "POST", "/v1beta/cachedContents", Some(body))
        .await;
    assert!(
        cache["usageMetadata"]["totalTokenCount"].as_u64().unwrap() > 0,
        "{cache}"
    );
    let name = cache["name"].as_str().unwrap();
    let ask = json!({"contents": [{"parts": [{"text": "question"}]}], "cached_content": name});
    let (status, text) = p
        .send(
            1,
            "POST",
            &format!("{MODEL}:generateContent"),
            Some(ask),
            false,
        )
        .await;
    assert_eq!(status, 200, "{text}");
    // Reading the cache again shows its size again: a request, no tokens.
    let read = p.json(0, "GET", &format!("/v1beta/{name}"), None).await;
    assert!(
        read["usageMetadata"]["totalTokenCount"].as_u64().unwrap() > 0,
        "{read}"
    );
    // A list asks each listed cache's owner: one call per cache.
    let list = p.json(1, "GET", "/v1beta/cachedContents", None).await;
    assert_eq!(list["cachedContents"][0]["name"], name, "{list}");
    p.assert_counted().await;
}

#[actix_rt::test]
async fn a_batch_counts_as_one_request_when_created() {
    let mut p = Pool::start();
    let requests: Vec<Value> = (0..3)
        .map(|i| json!({"request": {"contents": [{"parts": [{"text": format!("q{i}")}]}]}}))
        .collect();
    let body =
        json!({"batch": {"displayName": "b", "inputConfig": {"requests": {"requests": requests}}}});
    let batch = p
        .json(
            1,
            "POST",
            &format!("{MODEL}:batchGenerateContent"),
            Some(body),
        )
        .await;
    assert!(
        batch["name"].as_str().unwrap().starts_with("batches/"),
        "{batch}"
    );
    p.assert_counted().await;
}

#[actix_rt::test]
async fn file_search_store_work_and_its_generate_are_counted() {
    let mut p = Pool::start();
    let store = p
        .json(
            0,
            "POST",
            "/v1beta/fileSearchStores",
            Some(json!({"displayName": "docs"})),
        )
        .await;
    let store = store["name"].as_str().unwrap().to_string();
    let body = json!({
        "contents": [{"parts": [{"text": "what does the manual say?"}]}],
        "tools": [{"fileSearch": {"fileSearchStoreNames": [store]}}]
    });
    for i in 0..2 {
        let (status, text) = p
            .send(
                i,
                "POST",
                &format!("{MODEL}:generateContent"),
                Some(body.clone()),
                false,
            )
            .await;
        assert_eq!(status, 200, "{text}");
    }
    p.json(1, "GET", &format!("/v1beta/{store}"), None).await;
    p.assert_counted().await;
}

#[actix_rt::test]
async fn an_upload_and_its_use_are_counted() {
    let mut p = Pool::start();
    // A resumable upload started on one replica, its bytes sent through the
    // other: the start and the chunk are two upstream calls.
    let start = p.url(0, "/upload/v1beta/files");
    let other = p.gws[1].url.clone();
    let file = upload_file(&start, Some(&other), &[], b"some text").await;
    let (status, text) = p
        .send(1, "GET", &format!("/v1beta/{file}"), None, false)
        .await;
    assert_eq!(status, 200, "{text}");
    // A list asks each listed file's owner: one call per file.
    let (status, text) = p.send(0, "GET", "/v1beta/files", None, false).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains(&file), "{text}");
    let (status, text) = p
        .send(
            0,
            "POST",
            &format!("{MODEL}:generateContent"),
            Some(file_body(&[&file])),
            false,
        )
        .await;
    assert_eq!(status, 200, "{text}");
    p.assert_counted().await;
}

#[actix_rt::test]
async fn a_live_session_is_one_request_with_the_tokens_of_its_turns() {
    let mut p = Pool::start();
    let mut conn = crate::live::open(&p.gws[1]).await;
    for turn in ["first question", "second question"] {
        crate::live::send_turn(&mut conn, turn).await;
        let answer = crate::live::next_text(&mut conn).await.expect("an answer");
        assert!(answer.contains(turn), "{answer}");
        let done = crate::live::next_text(&mut conn)
            .await
            .expect("turn complete");
        let v: Value = serde_json::from_str(&done).unwrap();
        let t = usage_of(&v).expect("the turn's usage");
        assert!(t[1] > 0, "{done}");
        add(&mut p.seen, t);
    }
    conn.send(Message::Close(None)).await.unwrap();
    p.assert_counted().await;
    // The handshake is an upstream call like any other: timed per API.
    let mut scraped = client()
        .get(format!("{}/metrics", p.gws[1].url))
        .send()
        .await
        .unwrap();
    let text = String::from_utf8(scraped.body().await.unwrap().to_vec()).unwrap();
    assert!(
        text.contains("gb_upstream_latency_seconds_count{api=\"live\"} 1"),
        "{text}"
    );
}
