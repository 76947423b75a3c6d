//! Client limits (`GB_LIMITS_FILE`), the same on every replica: three
//! replicas on one Redis deployment decide each request atomically, refuse
//! in Google's (or OpenAI's) 429 shape before the upstream is called, and
//! return a dead replica's slots when its leases lapse.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::usage::{admin_get, ADMIN};

const GENERATE: &str = "/v1beta/models/gemini-2.0-flash:generateContent";
const STREAM: &str = "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse";

/// Three replicas (or `n`) on `redis`, with `limits` as their limits file.
struct Stack {
    fake: FakeUpstream,
    gws: Vec<Gateway>,
    dir: TempDir,
}

impl Stack {
    fn start(redis: &dyn RedisEnv, limits: &str, fake_env: &[(&str, String)]) -> Stack {
        let dir = TempDir::new("limits");
        let file = dir.path("limits.toml");
        std::fs::write(&file, limits).unwrap();
        let fake = FakeUpstream::start_with(&keys(3), fake_env);
        let gws = (0..3)
            .map(|_| {
                Gateway::start(
                    &fake,
                    Some(redis),
                    &[
                        ("GB_LIMITS_FILE", file.as_str()),
                        ("GB_ADMIN_TOKEN", ADMIN),
                        ("GB_RELOAD_INTERVAL", "1"),
                    ],
                )
            })
            .collect();
        Stack { fake, gws, dir }
    }

    fn url(&self, i: usize, path: &str) -> String {
        format!("{}{path}", self.gws[i % self.gws.len()].url)
    }

    async fn generate(&self, i: usize, token: &str) -> (u16, Value, Option<String>) {
        let mut resp = client()
            .post(self.url(i, GENERATE))
            .insert_header(("x-goog-api-key", token))
            .send_json(&generate_body())
            .await
            .unwrap();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        (resp.status().as_u16(), body, retry_after)
    }

    async fn model_calls(&self) -> usize {
        self.fake
            .requests()
            .await
            .iter()
            .filter(|r| r["path"].as_str().is_some_and(|p| p.contains(":")))
            .count()
    }
}

/// The details of a Gemini error body, by their type's last word.
fn detail<'a>(body: &'a Value, kind: &str) -> Option<&'a Value> {
    body["error"]["details"]
        .as_array()?
        .iter()
        .find(|d| d["@type"].as_str().is_some_and(|t| t.ends_with(kind)))
}

async fn rpm_is_exact_across_replicas(mode: Mode) {
    let redis = Deployment::start(mode);
    let stack = Stack::start(&redis, "[clients.default]\nrpm = 30\n", &[]);
    // 60 requests, 12 at a time, spread over the three replicas.
    let started = Instant::now();
    let mut answers = Vec::new();
    for wave in 0..5 {
        let sends = (0..12).map(|i| stack.generate(wave * 12 + i, TOKEN));
        answers.extend(futures_util::future::join_all(sends).await);
    }
    assert!(
        started.elapsed() < Duration::from_secs(55),
        "the 60 requests must fall in one minute for the count to be exact"
    );
    let ok = answers.iter().filter(|(s, _, _)| *s == 200).count();
    assert_eq!(ok, 30, "exactly rpm requests succeed: {answers:?}");
    for (status, body, retry_after) in answers.iter().filter(|(s, _, _)| *s != 200) {
        assert_eq!(*status, 429, "{body}");
        assert_eq!(body["error"]["status"], "RESOURCE_EXHAUSTED");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("30 requests per minute (rpm)"),
            "{message}"
        );
        assert!(message.contains("It frees up in"), "{message}");
        let delay = detail(body, "RetryInfo").expect("RetryInfo")["retryDelay"]
            .as_str()
            .unwrap();
        let secs: u64 = delay.trim_end_matches('s').parse().unwrap();
        assert!((1..=60).contains(&secs), "{delay}");
        assert_eq!(retry_after.as_deref(), Some(secs.to_string().as_str()));
        let violation = &detail(body, "QuotaFailure").expect("QuotaFailure")["violations"][0];
        assert_eq!(violation["quotaId"], "ClientRequestsPerMinute");
        assert_eq!(violation["quotaValue"], "30");
        assert_eq!(violation["quotaDimensions"]["client"], "default");
    }
    assert_eq!(
        stack.model_calls().await,
        30,
        "refused requests never reach the upstream"
    );
    // The other token has its own window.
    assert_eq!(stack.generate(0, TOKEN_B).await.0, 200);
    let metrics = metrics_text(&stack.gws[1].url).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("gb_client_limited_total{limit=\"rpm\"}")),
        "{metrics}"
    );
}

#[actix_rt::test]
async fn rpm_is_exact_across_three_replicas_on_standalone_redis() {
    rpm_is_exact_across_replicas(Mode::Standalone).await;
}

#[actix_rt::test]
async fn rpm_is_exact_across_three_replicas_on_a_redis_cluster() {
    rpm_is_exact_across_replicas(Mode::Cluster).await;
}

#[actix_rt::test]
async fn rpm_is_exact_across_three_replicas_with_sentinel() {
    rpm_is_exact_across_replicas(Mode::Sentinel).await;
}

/// Tokens per day: checked before each request against what answers
/// reported, so the request that crosses the limit is the last admitted.
async fn tokens_per_day_refuse_once_reached_with_the_overshoot_of_what_was_in_flight(mode: Mode) {
    let redis = Deployment::start(mode);
    let stack = Stack::start(&redis, "[clients.default]\ntokens_per_day = 100\n", &[]);
    let mut counted = 0u64;
    let mut admitted = 0;
    let mut per_answer = 0u64;
    loop {
        let (status, body, _) = stack.generate(admitted, TOKEN).await;
        if status != 200 {
            assert_eq!(status, 429, "{body}");
            let violation = &detail(&body, "QuotaFailure").unwrap()["violations"][0];
            assert_eq!(violation["quotaId"], "ClientTokensPerDay");
            break;
        }
        admitted += 1;
        per_answer = body["usageMetadata"]["totalTokenCount"].as_u64().unwrap();
        let before = counted;
        counted += per_answer;
        // The answer's tokens are settled in the shared store (a moment
        // after it is sent): wait until the admin API shows them.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let limits = admin_get(&stack.gws[0], "/admin/api/limits").await;
            let used = limits["clients"][0]["limits"][0]["used"].as_u64().unwrap();
            if used == counted {
                break;
            }
            assert!(used >= before, "{limits}");
            assert!(Instant::now() < deadline, "tokens never settled: {limits}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(admitted < 100, "never refused");
    }
    assert!(per_answer > 0);
    assert!(counted >= 100, "refused only once reached: {counted}");
    assert!(
        counted - per_answer < 100,
        "the last admitted request was admitted under the limit: {counted}"
    );
    assert_eq!(stack.model_calls().await, admitted);

    // Ten requests in flight at once, with room for one: each was admitted
    // against the tokens counted so far, so the overshoot is at most what
    // those in flight reported.
    let redis = Deployment::start(mode);
    let stack = Stack::start(&redis, "[clients.default]\ntokens_per_day = 1\n", &[]);
    let answers = futures_util::future::join_all((0..10).map(|i| stack.generate(i, TOKEN))).await;
    let ok = answers.iter().filter(|(s, _, _)| *s == 200).count();
    assert!(ok >= 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let limits = admin_get(&stack.gws[0], "/admin/api/limits").await;
        let used = limits["clients"][0]["limits"][0]["used"].as_u64().unwrap();
        if used == ok as u64 * per_answer {
            break;
        }
        assert!(Instant::now() < deadline, "{limits}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stack.generate(0, TOKEN).await.0, 429);
}

async fn a_model_outside_the_list_is_refused_before_any_limit_is_counted(mode: Mode) {
    let redis = Deployment::start(mode);
    let stack = Stack::start(
        &redis,
        "[clients.default]\nrpm = 1\nmodels = [\"gemini-2.5-flash*\"]\n",
        &[],
    );
    for i in 0..3 {
        let (status, body, _) = stack.generate(i, TOKEN).await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"]["status"], "PERMISSION_DENIED");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("may not use model gemini-2.0-flash"),
            "{body}"
        );
    }
    // OpenAI's route reads the model from the body.
    let resp = client()
        .post(stack.url(0, "/v1beta/openai/chat/completions"))
        .insert_header(("authorization", format!("Bearer {TOKEN}")))
        .send_json(
            &json!({"model": "gemini-2.0-flash", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    assert_eq!(stack.model_calls().await, 0);
    // The refusals spent nothing: the one request a minute is still there.
    let allowed = "/v1beta/models/gemini-2.5-flash-lite:generateContent";
    let resp = client()
        .post(stack.url(1, allowed))
        .insert_header(("x-goog-api-key", TOKEN))
        .send_json(&generate_body())
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let resp = client()
        .post(stack.url(2, allowed))
        .insert_header(("x-goog-api-key", TOKEN))
        .send_json(&generate_body())
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
}

/// Opens a stream and reads its first chunk; the response is kept open.
async fn open_stream(
    url: String,
) -> (
    u16,
    Option<
        impl futures_util::Stream<Item = Result<bytes::Bytes, awc::error::PayloadError>> + Unpin,
    >,
) {
    let mut resp = client()
        .post(url)
        .insert_header(("x-goog-api-key", TOKEN))
        .send_json(&generate_body())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    if status != 200 {
        return (status, None);
    }
    let first = resp.next().await;
    assert!(matches!(first, Some(Ok(_))), "the stream started");
    (status, Some(resp))
}

async fn concurrent_streams_are_held_to_the_limit_and_free_their_slot_when_done(mode: Mode) {
    let redis = Deployment::start(mode);
    let stack = Stack::start(
        &redis,
        "[clients.default]\nconcurrent = 2\n",
        &[
            ("FAKE_SSE_EVENTS", "3".to_string()),
            ("FAKE_SSE_INTERVAL_MS", "1500".to_string()),
        ],
    );
    let opened =
        futures_util::future::join_all((0..10).map(|i| open_stream(stack.url(i, STREAM)))).await;
    let held: Vec<_> = opened
        .into_iter()
        .filter_map(|(s, r)| {
            assert!(s == 200 || s == 429, "{s}");
            r
        })
        .collect();
    assert_eq!(held.len(), 2, "two streams in flight at once");
    let limits = admin_get(&stack.gws[0], "/admin/api/limits").await;
    let concurrent = &limits["clients"][0]["limits"][0];
    assert_eq!(concurrent["limit"], "concurrent");
    assert_eq!(concurrent["used"], 2, "{limits}");
    // A stream read to its end frees its slot.
    for mut resp in held {
        while let Some(chunk) = resp.next().await {
            assert!(chunk.is_ok());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, resp) = open_stream(stack.url(2, STREAM)).await;
        if status == 200 {
            drop(resp);
            break;
        }
        assert!(Instant::now() < deadline, "the slots never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_killed_replicas_slots_return_when_its_leases_lapse(mode: Mode) {
    let redis = Deployment::start(mode);
    let mut stack = Stack::start(
        &redis,
        "[clients.default]\nconcurrent = 1\n",
        &[
            ("FAKE_SSE_EVENTS", "100".to_string()),
            ("FAKE_SSE_INTERVAL_MS", "1000".to_string()),
        ],
    );
    let (status, held) = open_stream(stack.url(0, STREAM)).await;
    assert_eq!(status, 200);
    assert_eq!(stack.generate(1, TOKEN).await.0, 429, "the slot is held");
    // The replica holding it dies without a word.
    drop(stack.gws.remove(0));
    drop(held);
    // Its lease was renewed at most 5 s before, for 20 s.
    let deadline = Instant::now() + Duration::from_secs(21);
    loop {
        let (status, body, _) = stack.generate(0, TOKEN).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 429, "{body}");
        assert!(
            Instant::now() < deadline,
            "the dead replica's slot never returned"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn a_reload_changes_a_limit_and_a_bad_file_keeps_the_last_good_one(mode: Mode) {
    let redis = Deployment::start(mode);
    let stack = Stack::start(&redis, "[clients.default]\nrpm = 1\n", &[]);
    assert_eq!(stack.generate(0, TOKEN).await.0, 200);
    assert_eq!(stack.generate(1, TOKEN).await.0, 429);
    let file = stack.dir.path("limits.toml");
    std::fs::write(&file, "[clients.default]\nrpm = 1\nrmp = 5\n").unwrap();
    for gw in &stack.gws {
        gw.wait_for_log("reload refused").await;
    }
    assert_eq!(
        stack.generate(2, TOKEN).await.0,
        429,
        "the last good set stays"
    );
    let log = stack.gws[0].log_text();
    assert!(log.contains("line 3"), "{log}");
    assert_eq!(
        log.matches("reload refused").count(),
        1,
        "logged once: {log}"
    );
    std::fs::write(&file, "[clients.default]\nrpm = 100\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0..3 {
        loop {
            if stack.generate(i, TOKEN).await.0 == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica {i} never took the new limit"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn limits_apply_on_every_route_and_openai_clients_get_openais_error(mode: Mode) {
    let redis = Deployment::start(mode);
    let stack = Stack::start(&redis, "[clients.default]\nrpm = 5\n", &[]);
    let get = |i: usize, path: &str| {
        client()
            .get(stack.url(i, path))
            .insert_header(("x-goog-api-key", TOKEN))
    };
    assert_eq!(stack.generate(0, TOKEN).await.0, 200);
    let chat =
        json!({"model": "gemini-2.0-flash", "messages": [{"role": "user", "content": "hi"}]});
    let resp = client()
        .post(stack.url(1, "/v1beta/openai/chat/completions"))
        .insert_header(("authorization", format!("Bearer {TOKEN}")))
        .send_json(&chat)
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let resp = client()
        .post(stack.url(2, "/upload/v1beta/files"))
        .insert_header(("x-goog-api-key", TOKEN))
        .insert_header(("x-goog-upload-protocol", "resumable"))
        .insert_header(("x-goog-upload-command", "start"))
        .insert_header(("x-goog-upload-header-content-length", "5"))
        .insert_header(("x-goog-upload-header-content-type", "text/plain"))
        .send_json(&json!({"file": {"display_name": "a"}}))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "upload start");
    assert_eq!(
        get(0, "/v1beta/files")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        get(1, "/v1beta/cachedContents")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    // The sixth request, on any route, is over the limit.
    assert_eq!(
        get(2, "/v1beta/batches")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        429
    );
    let mut resp = client()
        .post(stack.url(0, "/v1beta/openai/chat/completions"))
        .insert_header(("authorization", format!("Bearer {TOKEN}")))
        .send_json(&chat)
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(body["error"]["type"], "requests");
    // Refusals are errors of their token in the usage view (shared with
    // each replica's next flush).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let errors = admin_get(&stack.gws[1], "/admin/api/errors").await;
        let refused: Vec<&Value> = errors["errors"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["reason"] == "client_rpm")
            .collect();
        if refused.len() == 2 {
            assert!(refused
                .iter()
                .all(|e| e["status"] == 429 && e["key_id"] == "-"));
            break;
        }
        assert!(Instant::now() < deadline, "{errors}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[actix_rt::test]
async fn a_bad_limits_file_stops_the_start_naming_file_line_and_field() {
    let dir = TempDir::new("limits-bad");
    let file = dir.path("limits.toml");
    std::fs::write(&file, "[clients.alice]\nrpm = 5\nconcurent = 2\n").unwrap();
    let (code, err) = run_gateway_expecting_exit(&[
        ("GB_API_KEYS", "AIzaFakeKey00-abcdefghijklmnop"),
        ("GB_AUTH_TOKENS", TOKEN),
        ("GB_LIMITS_FILE", &file),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("GB_LIMITS_FILE"), "{err}");
    assert!(err.contains(&file), "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("concurent"), "{err}");
}

async fn live_sessions_hold_their_slot_while_open_and_a_refused_model_is_closed(mode: Mode) {
    use awc::ws::{Frame, Message};
    use futures_util::SinkExt;

    let redis = Deployment::start(mode);
    let stack = Stack::start(
        &redis,
        "[clients.default]\nlive_sessions = 1\nmodels = [\"gemini-live-*\"]\n",
        &[],
    );
    let ws = |i: usize| {
        client()
            .ws(stack
                .url(i, crate::live::LIVE)
                .replacen("http://", "ws://", 1))
            .set_header("x-goog-api-key", TOKEN)
    };
    let mut first = crate::live::open(&stack.gws[0]).await;
    // A second session, on another replica, finds the slot taken.
    let refused = ws(1).connect().await;
    match refused {
        Err(awc::error::WsClientError::InvalidResponseStatus(status)) => {
            assert_eq!(status.as_u16(), 429)
        }
        other => panic!("a second Live session was let in: {:?}", other.map(|_| ())),
    }
    crate::live::send_turn(&mut first, "hello").await;
    assert!(crate::live::next_text(&mut first).await.is_some());
    first.send(Message::Close(None)).await.unwrap();
    drop(first);
    // Closed, it frees the slot; a model outside the list is refused at
    // `setup`, with the reason in the close frame.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut conn = loop {
        match ws(2).connect().await {
            Ok((_, conn)) => break conn,
            Err(_) => {
                assert!(Instant::now() < deadline, "the Live slot never came back");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let setup = json!({"setup": {"model": "models/gemini-2.5-pro"}});
    conn.send(Message::Text(setup.to_string().into()))
        .await
        .unwrap();
    let reason = loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), conn.next())
            .await
            .expect("a frame in time")
            .expect("a frame")
            .unwrap();
        if let Frame::Close(reason) = frame {
            break reason.expect("a close reason");
        }
    };
    assert_eq!(reason.code, awc::ws::CloseCode::Policy);
    let text = reason.description.unwrap_or_default();
    assert!(text.contains("may not use model gemini-2.5-pro"), "{text}");
    let live_calls = stack
        .fake
        .requests()
        .await
        .iter()
        .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with("/ws/")))
        .count();
    assert_eq!(
        live_calls, 1,
        "only the admitted session reached the upstream"
    );
}

async fn tokens_per_minute_refuse_until_the_minutes_tokens_are_counted_out(mode: Mode) {
    let redis = Deployment::start(mode);
    let stack = Stack::start(&redis, "[clients.default]\ntpm = 1\n", &[]);
    assert_eq!(stack.generate(0, TOKEN).await.0, 200);
    // Once the answer's tokens are settled, the next request is refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (status, body, _) = stack.generate(1, TOKEN).await;
        if status == 429 {
            break body;
        }
        assert!(Instant::now() < deadline, "never refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let violation = &detail(&body, "QuotaFailure").unwrap()["violations"][0];
    assert_eq!(violation["quotaId"], "ClientTokensPerMinute");
    let delay = detail(&body, "RetryInfo").unwrap()["retryDelay"]
        .as_str()
        .unwrap();
    let secs: u64 = delay.trim_end_matches('s').parse().unwrap();
    assert!((1..=60).contains(&secs), "{delay}");
    let limits = admin_get(&stack.gws[2], "/admin/api/limits").await;
    let tpm = &limits["clients"][0]["limits"][0];
    assert_eq!(tpm["limit"], "tpm");
    assert_eq!(tpm["reached"], true, "{limits}");
    let page = client()
        .get(stack.url(0, "/admin"))
        .insert_header(("authorization", format!("Bearer {ADMIN}")))
        .send()
        .await
        .unwrap()
        .body()
        .await
        .unwrap();
    let page = String::from_utf8_lossy(&page);
    let section = &page[page
        .find("id=\"client-limits\"")
        .expect("the Limits section")..];
    assert!(section.contains("<td>default</td>"), "{section}");
    assert!(section.contains("class=\"state cooling\">tpm"), "{section}");
}

#[actix_rt::test]
async fn a_token_without_an_entry_has_no_limits_and_a_lost_store_admits() {
    let mut redis = Redis::start();
    let stack = Stack::start(&redis, "[clients.other]\nrpm = 1\n", &[]);
    for i in 0..4 {
        assert_eq!(stack.generate(i, TOKEN).await.0, 200);
    }
    let limits = admin_get(&stack.gws[0], "/admin/api/limits").await;
    assert_eq!(limits["clients"], json!([]), "no token has an entry");

    let redis_b = Redis::start();
    drop(stack);
    let stack = Stack::start(&redis_b, "[clients.default]\nrpm = 1\n", &[]);
    assert_eq!(stack.generate(0, TOKEN).await.0, 200);
    assert_eq!(stack.generate(1, TOKEN).await.0, 429);
    let mut redis_b = redis_b;
    redis_b.stop();
    for i in 0..3 {
        let (status, body, _) = stack.generate(i, TOKEN).await;
        assert_eq!(status, 200, "admitted while the store is down: {body}");
    }
    redis.stop();
}

in_every_redis_mode!(
    tokens_per_day_refuse_once_reached_with_the_overshoot_of_what_was_in_flight,
    a_model_outside_the_list_is_refused_before_any_limit_is_counted,
    concurrent_streams_are_held_to_the_limit_and_free_their_slot_when_done,
    a_killed_replicas_slots_return_when_its_leases_lapse,
    a_reload_changes_a_limit_and_a_bad_file_keeps_the_last_good_one,
    limits_apply_on_every_route_and_openai_clients_get_openais_error,
    live_sessions_hold_their_slot_while_open_and_a_refused_model_is_closed,
    tokens_per_minute_refuse_until_the_minutes_tokens_are_counted_out,
);

/// A client at `concurrent = 1` that sends its next request to the same
/// replica as soon as an answer ends (as an SDK loop on one connection
/// does) is never refused: the slot of the request that ended is freed by
/// the next admission itself.
#[actix_rt::test]
async fn requests_one_after_another_at_the_concurrent_limit_are_never_refused() {
    let redis = Redis::start();
    let stack = Stack::start(&redis, "[clients.default]\nconcurrent = 1\n", &[]);
    for i in 0..30 {
        let (status, body, _) = stack.generate(0, TOKEN).await;
        assert_eq!(status, 200, "request {i}: {body}");
    }
}

/// A lease outlives its first life while its stream runs: the replica
/// renews it, so a second stream stays refused.
#[actix_rt::test]
async fn a_long_stream_keeps_its_slot_past_a_leases_life() {
    let redis = Redis::start();
    let stack = Stack::start(
        &redis,
        "[clients.default]\nconcurrent = 1\n",
        &[
            ("FAKE_SSE_EVENTS", "40".to_string()),
            ("FAKE_SSE_INTERVAL_MS", "1000".to_string()),
        ],
    );
    let (status, mut held) = open_stream(stack.url(0, STREAM)).await;
    assert_eq!(status, 200);
    // Past the 20 s a lease lives unless renewed, reading the stream.
    let until = Instant::now() + Duration::from_secs(26);
    let held_stream = held.as_mut().unwrap();
    while Instant::now() < until {
        let chunk = tokio::time::timeout(Duration::from_secs(5), held_stream.next())
            .await
            .expect("the stream goes on");
        assert!(matches!(chunk, Some(Ok(_))));
    }
    assert_eq!(
        stack.generate(1, TOKEN).await.0,
        429,
        "the slot is still held"
    );
}

/// With `models` set, a model call whose model cannot be read is refused:
/// it cannot be checked.
#[actix_rt::test]
async fn a_model_that_cannot_be_read_is_refused_when_models_are_listed() {
    let redis = Redis::start();
    let stack = Stack::start(&redis, "[clients.default]\nmodels = [\"gemini-*\"]\n", &[]);
    let resp = client()
        .post(stack.url(0, "/v1beta/tunedModels/abc:generateContent"))
        .insert_header(("x-goog-api-key", TOKEN))
        .send_json(&generate_body())
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let resp = client()
        .post(stack.url(1, "/v1beta/openai/chat/completions"))
        .insert_header(("authorization", format!("Bearer {TOKEN}")))
        .send_json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    assert_eq!(stack.model_calls().await, 0);
    // A listing names no model and is not a model call.
    let resp = client()
        .get(stack.url(2, "/v1beta/models"))
        .insert_header(("x-goog-api-key", TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}
