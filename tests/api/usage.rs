//! Usage accounting: Google's token counts per model, key and client token,
//! summed over replicas, the recent upstream errors, and what never shows.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::helpers::*;

pub(crate) const ADMIN: &str = "admin-secret-token-42";
/// Text only a request body holds: it must never reach the usage data.
const BODY_MARK: &str = "private-prompt-text-7781";

fn body() -> Value {
    json!({"contents": [{"parts": [{"text": BODY_MARK}]}]})
}

fn chat(stream: bool, include_usage: bool) -> Value {
    let mut b = json!({"model": "gemini-2.5-flash", "stream": stream,
                       "messages": [{"role": "user", "content": BODY_MARK}]});
    if include_usage {
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

/// Sends a request with a client token; status and raw body text.
async fn send(url: &str, token: &str, body: &Value, openai: bool) -> (u16, String) {
    let req = client().post(url);
    let req = if openai {
        req.insert_header(("authorization", format!("Bearer {token}")))
    } else {
        req.insert_header(("x-goog-api-key", token))
    };
    let mut resp = req.send_json(body).await.unwrap();
    let status = resp.status().as_u16();
    let mut text = Vec::new();
    while let Some(chunk) = resp.next().await {
        match chunk {
            Ok(c) => text.extend_from_slice(&c),
            Err(_) => break,
        }
    }
    (status, String::from_utf8_lossy(&text).into_owned())
}

/// The usage the client saw in an answer, as `[prompt, output, thoughts,
/// cached, total]`: the last one an SSE stream or JSON array carried.
fn seen_usage(text: &str) -> Option<[u64; 5]> {
    let text = &text.replace("\r\n", "\n");
    let docs: Vec<Value> = if text.trim_start().starts_with('[') {
        serde_json::from_str::<Vec<Value>>(text).ok()?
    } else if text.contains("data: ") {
        text.split("\n\n")
            .filter_map(|e| e.trim().strip_prefix("data: "))
            .filter_map(|e| serde_json::from_str(e).ok())
            .collect()
    } else {
        vec![serde_json::from_str(text).ok()?]
    };
    docs.iter().rev().find_map(|d| {
        if let Some(u) = d.get("usageMetadata") {
            let n = |k: &str| u[k].as_u64().unwrap_or(0);
            return Some([
                n("promptTokenCount"),
                n("candidatesTokenCount"),
                n("thoughtsTokenCount"),
                n("cachedContentTokenCount"),
                n("totalTokenCount"),
            ]);
        }
        let u = d.get("usage").filter(|u| u.is_object())?;
        let reasoning = u["completion_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap_or(0);
        Some([
            u["prompt_tokens"].as_u64().unwrap_or(0),
            u["completion_tokens"].as_u64().unwrap_or(0) - reasoning,
            reasoning,
            u["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0),
            u["total_tokens"].as_u64().unwrap_or(0),
        ])
    })
}

pub(crate) async fn admin_get(gw: &Gateway, path: &str) -> Value {
    let mut resp = client()
        .get(format!("{}{path}", gw.url))
        .insert_header(("authorization", format!("Bearer {ADMIN}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "{path}");
    resp.json().limit(1 << 22).await.unwrap()
}

/// Polls the usage API until its totals show `requests` (the replicas flush
/// every few seconds).
pub(crate) async fn usage_with(gw: &Gateway, query: &str, requests: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = admin_get(gw, &format!("/admin/api/usage{query}")).await;
        if v["totals"]["requests"].as_u64() == Some(requests) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "usage never reached {requests} requests: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn add(sum: &mut [u64; 5], u: [u64; 5]) {
    for (s, n) in sum.iter_mut().zip(u) {
        *s += n;
    }
}

fn totals_of(v: &Value) -> [u64; 5] {
    let t = &v["totals"];
    [
        "prompt_tokens",
        "output_tokens",
        "thoughts_tokens",
        "cached_tokens",
        "total_tokens",
    ]
    .map(|k| t[k].as_u64().unwrap())
}

#[actix_rt::test]
async fn token_sums_over_every_answer_shape_and_two_replicas_equal_what_the_upstream_sent() {
    let redis = Redis::start();
    let ks = keys(3);
    let fake = FakeUpstream::start(&ks);
    let tokens = format!("alice={TOKEN},{TOKEN_B}");
    let env = [
        ("GB_ADMIN_TOKEN", ADMIN),
        ("GB_AUTH_TOKENS", tokens.as_str()),
        ("GB_USAGE_RETENTION_DAYS", "2"),
    ];
    let gws: Vec<Gateway> = (0..2)
        .map(|_| Gateway::start(&fake, Some(&redis), &env))
        .collect();
    let flash = "/v1beta/models/gemini-2.0-flash";
    let pro = "/v1beta/models/gemini-2.5-pro";
    let mut sent = [0u64; 5];
    let mut answers = 0;
    // Plain, SSE and JSON-array answers, and OpenAI-compatible ones, over
    // both replicas and both client tokens.
    let native = [
        (0, TOKEN, format!("{flash}:generateContent"), 3),
        (
            1,
            TOKEN_B,
            format!("{pro}:streamGenerateContent?alt=sse"),
            2,
        ),
        (0, TOKEN, format!("{pro}:streamGenerateContent"), 2),
    ];
    for (g, token, path, n) in &native {
        for _ in 0..*n {
            let (status, text) =
                send(&format!("{}{path}", gws[*g].url), token, &body(), false).await;
            assert_eq!(status, 200, "{text}");
            add(
                &mut sent,
                seen_usage(&text).expect("the answer carries usage"),
            );
            answers += 1;
        }
    }
    let chat_url = |g: usize| format!("{}/v1beta/openai/chat/completions", gws[g].url);
    for g in 0..2 {
        let (status, text) = send(&chat_url(g), TOKEN_B, &chat(false, false), true).await;
        assert_eq!(status, 200, "{text}");
        add(&mut sent, seen_usage(&text).unwrap());
        answers += 1;
    }
    let (_, asked) = send(&chat_url(1), TOKEN, &chat(true, true), true).await;
    let per_stream = seen_usage(&asked).expect("a client that asks gets the usage chunk");
    add(&mut sent, per_stream);
    answers += 1;
    for g in 0..2 {
        let (status, text) = send(&chat_url(g), TOKEN, &chat(true, false), true).await;
        assert_eq!(status, 200);
        assert_eq!(
            seen_usage(&text),
            None,
            "usage leaked to the client: {text}"
        );
        // The upstream still sent it (the gateway asked): counted below.
        add(&mut sent, per_stream);
        answers += 1;
    }
    // countTokens is a request, not token use.
    let (status, _) = send(
        &format!("{}{flash}:countTokens", gws[1].url),
        TOKEN,
        &body(),
        false,
    )
    .await;
    assert_eq!(status, 200);

    let v = usage_with(&gws[0], "", answers + 1).await;
    assert_eq!(totals_of(&v), sent, "{v}");
    assert!(
        sent.iter().all(|&n| n > 0),
        "every kind is exercised: {sent:?}"
    );
    assert_eq!(v["totals"]["errors"], 0);
    let models: Vec<&str> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["model"].as_str().unwrap())
        .collect();
    assert_eq!(
        models,
        ["gemini-2.0-flash", "gemini-2.5-flash", "gemini-2.5-pro"]
    );

    // Every grouping adds up to the same totals; keys and tokens show by id
    // or label, never as secrets.
    for by in ["key", "token", "hour", "key,model"] {
        let v = usage_with(&gws[1], &format!("?by={by}"), answers + 1).await;
        let rows = v["rows"].as_array().unwrap();
        let sum: u64 = rows
            .iter()
            .map(|r| r["total_tokens"].as_u64().unwrap())
            .sum();
        assert_eq!(sum, sent[4], "by={by}: {v}");
        let requests: u64 = rows.iter().map(|r| r["requests"].as_u64().unwrap()).sum();
        assert_eq!(requests, answers + 1);
        let text = v.to_string();
        for secret in ks
            .iter()
            .map(String::as_str)
            .chain([TOKEN, TOKEN_B, BODY_MARK])
        {
            assert!(!text.contains(secret), "{text}");
        }
    }
    let by_token = usage_with(&gws[1], "?by=token", answers + 1).await;
    let labels: Vec<&str> = by_token["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["label"].as_str().unwrap())
        .collect();
    assert!(labels.contains(&"alice"), "{by_token}");
    assert!(labels.contains(&key_id(TOKEN_B).as_str()), "{by_token}");
    let by_key = usage_with(&gws[1], "?by=key", answers + 1).await;
    let ids: Vec<String> = ks.iter().map(|k| key_id(k)).collect();
    for row in by_key["rows"].as_array().unwrap() {
        assert!(ids.contains(&row["key_id"].as_str().unwrap().to_string()));
    }

    // A range that ends before the traffic holds none of it; a bad `by` is
    // a clear error.
    let empty = admin_get(&gws[0], "/admin/api/usage?from=2020-01-01&to=2020-01-02").await;
    assert_eq!(empty["totals"]["requests"], 0);
    let offset = admin_get(
        &gws[0],
        "/admin/api/usage?from=2020-01-01T02:00%2B02:00&to=2020-01-02T00:00+02:00",
    )
    .await;
    assert_eq!(offset["from"], empty["from"], "{offset}");
    assert_eq!(offset["totals"]["requests"], 0);
    let resp = client()
        .get(format!("{}/admin/api/usage?by=colour", gws[0].url))
        .insert_header(("authorization", format!("Bearer {ADMIN}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);

    // The store forgets an hour's counts two hours after the retention.
    let buckets = redis.cmd(&["KEYS", "gb:stats:usage:*"]);
    let bucket = buckets
        .lines()
        .find(|l| l.starts_with("gb:"))
        .expect("a usage bucket");
    let ttl: u64 = redis
        .cmd(&["TTL", bucket])
        .trim()
        .trim_start_matches(':')
        .parse()
        .unwrap();
    assert!(ttl > 2 * 86_400 && ttl <= 2 * 86_400 + 7_200, "{ttl}");

    // Prometheus sees the same tokens, with bounded model labels.
    let mut metrics = String::new();
    for gw in &gws {
        let mut resp = client()
            .get(format!("{}/metrics", gw.url))
            .send()
            .await
            .unwrap();
        metrics.push_str(&String::from_utf8_lossy(&resp.body().await.unwrap()));
    }
    let total: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("gb_tokens_total{") && l.contains("kind=\"total\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(total, sent[4], "{metrics}");
    assert!(metrics
        .contains("gb_requests_by_model_total{model=\"gemini-2.5-pro\",outcome=\"success\"}"));
}

#[actix_rt::test]
async fn an_added_include_usage_keeps_the_rest_of_the_stream_intact() {
    let fake = FakeUpstream::start(&keys(1));
    let gw = Gateway::start(&fake, None, &[]);
    let url = format!("{}/v1beta/openai/chat/completions", gw.url);
    let (_, plain) = send(&url, TOKEN, &chat(true, false), true).await;
    let (_, asked) = send(&url, TOKEN, &chat(true, true), true).await;
    let events = |t: &str| -> Vec<String> {
        t.split("\n\n")
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect()
    };
    let (plain, asked) = (events(&plain), events(&asked));
    assert!(!plain.iter().any(|e| e.contains("\"usage\"")), "{plain:?}");
    assert_eq!(plain.last().map(String::as_str), Some("data: [DONE]"));
    // The same events, less the usage chunk the client did not ask for.
    let without: Vec<String> = asked
        .into_iter()
        .filter(|e| !e.contains("\"usage\""))
        .collect();
    assert_eq!(plain, without);
}

/// Every value the shared store holds, as text.
fn dump(redis: &Redis) -> String {
    let keys = redis.cmd(&["KEYS", "*"]);
    let mut out = String::new();
    for key in keys
        .lines()
        .filter(|l| !l.starts_with('*') && !l.starts_with('$'))
    {
        out.push_str(key);
        let kind = redis.cmd(&["TYPE", key]);
        let value = match kind.trim() {
            "+hash" => redis.cmd(&["HGETALL", key]),
            "+zset" => redis.cmd(&["ZRANGE", key, "0", "-1"]),
            "+string" => redis.cmd(&["GET", key]),
            "+list" => redis.cmd(&["LRANGE", key, "0", "-1"]),
            "+set" => redis.cmd(&["SMEMBERS", key]),
            _ => String::new(),
        };
        out.push_str(&value);
    }
    out
}

#[actix_rt::test]
async fn upstream_errors_are_listed_across_replicas_without_secrets() {
    let redis = Redis::start();
    let ks = keys(3);
    let fake = FakeUpstream::start(&ks);
    let gws: Vec<Gateway> = (0..2)
        .map(|_| Gateway::start(&fake, Some(&redis), &[("GB_ADMIN_TOKEN", ADMIN)]))
        .collect();
    fake.set_mode(&ks[0], json!({"mode": "quota", "retryDelay": "7s"}))
        .await;
    fake.set_mode(&ks[1], json!({"mode": "invalid"})).await;
    fake.set_mode(&ks[2], json!({"mode": "break_stream"})).await;
    // Rotation tries every key first once in three requests: the first two
    // keys fail once each (then cool or stay disabled), the third serves.
    let path = "/v1beta/models/gemini-2.5-pro:generateContent";
    for _ in 0..3 {
        let (status, text) = send(
            &format!("{}{path}?key={TOKEN}", gws[0].url),
            TOKEN,
            &body(),
            false,
        )
        .await;
        assert_eq!(status, 200, "{text}");
    }
    // A stream cut mid-way, on the other replica.
    let stream = "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse";
    let (status, _) = send(&format!("{}{stream}", gws[1].url), TOKEN_B, &body(), false).await;
    assert_eq!(status, 200);

    let deadline = Instant::now() + Duration::from_secs(60);
    let errors = loop {
        let v = admin_get(&gws[1], "/admin/api/errors").await;
        let list = v["errors"].as_array().cloned().unwrap_or_default();
        if list.len() >= 3 {
            break list;
        }
        assert!(Instant::now() < deadline, "errors never listed: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let find = |f: &dyn Fn(&Value) -> bool| errors.iter().find(|e| f(e)).cloned();
    let quota = find(&|e| e["status"] == 429).expect("the 429 is listed");
    assert_eq!(quota["google_status"], "RESOURCE_EXHAUSTED");
    assert_eq!(quota["retry_delay_s"], 7.0);
    assert_eq!(quota["key_id"], key_id(&ks[0]));
    assert_eq!(quota["model"], "gemini-2.5-pro");
    assert_eq!(quota["route"], "generate");
    let invalid = find(&|e| e["reason"] == "API_KEY_INVALID").expect("the rejected key is listed");
    assert_eq!(invalid["key_id"], key_id(&ks[1]));
    let cut = find(&|e| e["reason"] == "stream_cut").expect("the cut stream is listed");
    assert_eq!(cut["route"], "stream");

    // Counted as errors by outcome, too.
    let usage = usage_with(&gws[0], "?by=key", 6).await;
    assert_eq!(usage["totals"]["errors"], 3, "{usage}");
    let outcomes = usage["totals"]["errors_by_outcome"].to_string();
    for o in ["rate_limited", "key_rejected", "stream_cut"] {
        assert!(outcomes.contains(o), "{outcomes}");
    }

    // Nothing secret in the answers, the shared store or the logs.
    let everything = format!("{errors:?}{usage}{}", dump(&redis));
    assert!(
        everything.contains("RESOURCE_EXHAUSTED"),
        "the dump holds the errors"
    );
    for secret in ks
        .iter()
        .map(String::as_str)
        .chain([TOKEN, TOKEN_B, BODY_MARK, ADMIN])
    {
        assert!(
            !everything.contains(secret),
            "{secret} leaked: {everything}"
        );
    }
    for gw in &gws {
        gw.assert_no_secrets_logged(&ks);
    }
}

#[actix_rt::test]
async fn series_past_the_limit_fold_into_other_and_are_counted() {
    let fake = FakeUpstream::start(&keys(1));
    let gw = Gateway::start(
        &fake,
        None,
        &[("GB_ADMIN_TOKEN", ADMIN), ("GB_USAGE_MAX_SERIES", "1")],
    );
    for model in ["gemini-2.5-flash", "gemini-2.5-pro", "gemini-2.0-flash"] {
        let url = format!("{}/v1beta/models/{model}:generateContent", gw.url);
        assert_eq!(post_json(&url, &body(), &[]).await.0, 200);
    }
    let v = usage_with(&gw, "", 3).await;
    assert_eq!(v["overflow_series"], 2, "{v}");
    let models: Vec<&str> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["model"].as_str())
        .collect();
    assert!(models.contains(&"other"), "{v}");
    let metrics = client()
        .get(format!("{}/metrics", gw.url))
        .send()
        .await
        .unwrap()
        .body()
        .await
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("gb_usage_series_overflow_total 2"),
        "{metrics}"
    );
}
