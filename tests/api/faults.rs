//! Faults from outside: upstreams that stall half-way through an answer.
//! Every wait here is bounded by the test client's own 30 s timeout; the
//! checks are on what the client got, never on how long it took.

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::helpers::*;

const GENERATE: &str = "/v1beta/models/gemini-2.0-flash:generateContent";
const STREAM: &str = "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse";

/// Far longer than the idle timeout these tests set: reaching it means the
/// gateway held the client.
const HELD: std::time::Duration = std::time::Duration::from_secs(30);

fn idle() -> [(&'static str, &'static str); 1] {
    [("GB_UPSTREAM_IDLE_TIMEOUT", "1")]
}

#[actix_rt::test]
async fn a_success_body_that_stalls_is_cut_instead_of_holding_the_client() {
    let ks = keys(1);
    let fake = FakeUpstream::start(&ks);
    let gw = Gateway::start(&fake, None, &idle());
    fake.set_mode(&ks[0], json!({"mode": "stall", "status": 200, "after": 10}))
        .await;
    let mut resp = client()
        .post(format!("{}{GENERATE}", gw.url))
        .insert_header(("x-goog-api-key", TOKEN))
        .send_json(&generate_body())
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "the head had arrived");
    let promised: usize = resp
        .headers()
        .get("content-length")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let read = tokio::time::timeout(HELD, resp.body().limit(1 << 20))
        .await
        .expect("the gateway held the client's connection");
    match read {
        // The connection closed short of the promised length.
        Ok(body) => assert!(body.len() < promised, "{} of {promised}", body.len()),
        Err(awc::error::PayloadError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
            panic!("the client's own timeout fired: the gateway held the connection")
        }
        Err(_) => {}
    }
    gw.wait_for_log("upstream body stalled").await;
}

#[actix_rt::test]
async fn a_stream_that_stalls_ends_with_an_error_event() {
    let ks = keys(1);
    let fake = FakeUpstream::start(&ks);
    let gw = Gateway::start(&fake, None, &idle());
    fake.set_mode(
        &ks[0],
        json!({"mode": "stall", "status": 200, "after": 100000, "sse": true}),
    )
    .await;
    let mut resp = client()
        .post(format!("{}{STREAM}", gw.url))
        .insert_header(("x-goog-api-key", TOKEN))
        .send_json(&generate_body())
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut text = String::new();
    while let Some(chunk) = resp.next().await {
        text.push_str(&String::from_utf8_lossy(
            &chunk.expect("the stream ends cleanly"),
        ));
    }
    let events: Vec<Value> = text
        .split("\r\n\r\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{text}");
    assert!(
        events[0]["candidates"].is_array(),
        "the first event came through"
    );
    assert_eq!(events[1]["error"]["status"], "DEADLINE_EXCEEDED", "{text}");
}

#[actix_rt::test]
async fn an_error_body_that_stalls_is_a_transport_error_retried_elsewhere_unless_pinned() {
    let ks = keys(2);
    let fake = FakeUpstream::start(&ks);
    let gw = Gateway::start(&fake, None, &idle());
    // Bind a session first, then make its key stall on a 429's body.
    let (status, _) = post_json(
        &format!("{}{GENERATE}", gw.url),
        &generate_body(),
        &[("x-session-id", "stalled")],
    )
    .await;
    assert_eq!(status, 200);
    let pinned_key = fake.requests().await.last().unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    fake.set_mode(
        &pinned_key,
        json!({"mode": "stall", "status": 429, "after": 20}),
    )
    .await;
    fake.post("/_fake/reset", json!({})).await;

    // Unpinned: whichever key rotation picks, the client gets an answer.
    for _ in 0..2 {
        let (status, body) =
            post_json(&format!("{}{GENERATE}", gw.url), &generate_body(), &[]).await;
        assert_eq!(status, 200, "{body}");
    }
    let seen = fake.requests().await;
    assert!(
        seen.iter().any(|r| r["key"] == pinned_key.as_str()),
        "the stalling key was tried"
    );

    // Pinned: a Gemini-shaped 504, at once after the deadline.
    let (status, body) = post_json(
        &format!("{}{GENERATE}", gw.url),
        &generate_body(),
        &[("x-session-id", "stalled")],
    )
    .await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["status"], "DEADLINE_EXCEEDED");
    // The stall says nothing about the key: it is not cooling.
    assert!(
        !gw.log_text().contains("key rate-limited"),
        "a stalled 429 body is not read as a quota answer"
    );
}

/// Starts a resumable upload through the gateway; returns its upload URL.
async fn start_upload(gw: &Gateway, data: &[u8]) -> String {
    let resp = client()
        .post(format!("{}/upload/v1beta/files", gw.url))
        .insert_header(("x-goog-api-key", TOKEN))
        .insert_header(("x-goog-upload-protocol", "resumable"))
        .insert_header(("x-goog-upload-command", "start"))
        .send_json(&json!({"file": {"display_name": "f", "mime_type": "text/plain", "size_bytes": data.len()}}))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp.headers()
        .get("x-goog-upload-url")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

async fn finalize(url: &str, data: &[u8]) -> (u16, Value, Option<String>) {
    let mut resp = client()
        .post(url)
        .insert_header(("x-goog-upload-command", "upload, finalize"))
        .insert_header(("x-goog-upload-offset", "0"))
        .send_body(data.to_vec())
        .await
        .unwrap();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (resp.status().as_u16(), body, retry)
}

async fn file_status(gw: &Gateway, name: &str, token: &str) -> u16 {
    client()
        .get(format!("{}/v1beta/{name}", gw.url))
        .insert_header(("x-goog-api-key", token))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[actix_rt::test]
async fn a_finalize_whose_answer_is_lost_still_gives_the_file_to_its_uploader() {
    let redis = Redis::start();
    let ks = keys(2);
    let fake = FakeUpstream::start(&ks);
    let gw = Gateway::start(&fake, Some(&redis), &[]);
    for k in &ks {
        fake.set_mode(k, json!({"mode": "cut_finalize"})).await;
    }
    let url = start_upload(&gw, b"precious").await;
    let (status, body, _) = finalize(&url, b"precious").await;
    assert_eq!(status, 200, "{body}");
    let name = body["file"]["name"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_string();
    gw.wait_for_log("recovered by a status query").await;
    assert_eq!(
        file_status(&gw, &name, TOKEN).await,
        200,
        "the uploader owns it"
    );
    assert_eq!(
        file_status(&gw, &name, TOKEN_B).await,
        404,
        "no other token can claim it"
    );
}

#[actix_rt::test]
async fn a_finalize_whose_owner_cannot_be_recorded_is_refused_until_it_can() {
    let redis = Redis::start();
    let ks = keys(2);
    let fake = FakeUpstream::start(&ks);
    let gw = Gateway::start(&fake, Some(&redis), &[]);
    let url = start_upload(&gw, b"precious").await;
    // Redis still answers reads but refuses every write.
    assert_eq!(
        redis
            .cmd(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
            .trim(),
        "+OK"
    );
    assert_eq!(
        redis.cmd(&["CONFIG", "SET", "maxmemory", "1"]).trim(),
        "+OK"
    );
    let (status, body, retry) = finalize(&url, b"precious").await;
    assert_eq!(status, 503, "{body}");
    assert!(retry.is_some(), "the client is told to retry");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Repeat the request"),
        "{body}"
    );
    assert_eq!(
        redis.cmd(&["CONFIG", "SET", "maxmemory", "0"]).trim(),
        "+OK"
    );
    // The client repeats the finalize: the file the upload made is recorded
    // and handed out.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let name = loop {
        let (status, body, _) = finalize(&url, b"precious").await;
        if status == 200 {
            break body["file"]["name"].as_str().unwrap().to_string();
        }
        assert!(std::time::Instant::now() < deadline, "{status} {body}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(fake.file_owners().await.len(), 1, "one file, created once");
    assert_eq!(file_status(&gw, &name, TOKEN).await, 200);
    assert_eq!(file_status(&gw, &name, TOKEN_B).await, 404);
}

fn lookups(seen: &[Value]) -> usize {
    seen.iter()
        .filter(|r| {
            r["method"] == "GET"
                && r["path"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("/v1beta/files/")
        })
        .count()
}

fn made_up(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("files/{prefix}{i:03}")).collect()
}

#[actix_rt::test]
async fn unknown_files_cost_at_most_the_discovery_budget_upstream() {
    let redis = Redis::start();
    let fake = FakeUpstream::start(&keys(4));
    let gw = Gateway::start(&fake, Some(&redis), &[("GB_DISCOVERY_BUDGET", "20")]);
    let url = format!("{}{GENERATE}", gw.url);
    // Forty made-up ids over four keys would be 160 lookups.
    let names = made_up("madeup", 40);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (status, body) = post_json(&url, &file_body(&refs), &[]).await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("35 files or resources") && message.contains("GB_DISCOVERY_BUDGET"),
        "{message}"
    );
    let seen = fake.requests().await;
    assert_eq!(lookups(&seen), 20, "the budget, not 160");
    assert!(
        seen.iter()
            .all(|r| !r["path"].as_str().unwrap().contains(":generateContent")),
        "never sent"
    );

    // A few unknown ids are searched once; the misses are remembered.
    fake.post("/_fake/reset", json!({})).await;
    let few = made_up("few", 3);
    let refs: Vec<&str> = few.iter().map(String::as_str).collect();
    post_json(&url, &file_body(&refs), &[]).await;
    assert_eq!(lookups(&fake.requests().await), 12);
    post_json(&url, &file_body(&refs), &[]).await;
    assert_eq!(
        lookups(&fake.requests().await),
        12,
        "a repeat costs nothing upstream"
    );
}

#[actix_rt::test]
async fn a_token_that_keeps_naming_unknown_files_is_slowed_down_alone() {
    let redis = Redis::start();
    let fake = FakeUpstream::start(&keys(4));
    // Four lookups a request, twenty a minute per token.
    let gw = Gateway::start(&fake, Some(&redis), &[("GB_DISCOVERY_BUDGET", "4")]);
    let url = format!("{}{GENERATE}", gw.url);
    let names = made_up("probe", 6);
    // The allowance is per wall-clock minute: start well inside one.
    let second = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            % 60
    };
    while second() > 45 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    for name in &names[..5] {
        let (status, body) = post_json(&url, &file_body(&[name]), &[]).await;
        assert_ne!(status, 429, "{body}");
    }
    let mut resp = client()
        .post(&url)
        .insert_header(("x-goog-api-key", TOKEN))
        .send_json(&file_body(&[&names[5]]))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert!(resp.headers().get("retry-after").is_some());
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("lookups"),
        "{body}"
    );
    assert_eq!(lookups(&fake.requests().await), 20);
    // Another token still has its own allowance.
    let mut other = client()
        .post(&url)
        .insert_header(("x-goog-api-key", TOKEN_B))
        .send_json(&file_body(&[&names[5]]))
        .await
        .unwrap();
    assert_ne!(other.status().as_u16(), 429, "{:?}", other.body().await);
}

#[actix_rt::test]
async fn a_rate_limited_owner_is_not_remembered_as_a_miss_during_rediscovery() {
    let redis = Redis::start();
    let ks = keys(4);
    let fake = FakeUpstream::start(&ks);
    let gw = Gateway::start(&fake, Some(&redis), &[]);
    let url = format!("{}{GENERATE}", gw.url);
    let name = upload_file(
        &format!("{}/upload/v1beta/files", gw.url),
        None,
        &[],
        b"mine",
    )
    .await;
    let owner = fake.owner_key(&name).await;
    // Redis loses everything while the owner key is rate-limited.
    assert!(redis.cmd(&["FLUSHALL"]).contains("OK"));
    fake.set_mode(&owner, json!({"mode": "quota", "retryDelay": "1s"}))
        .await;
    let (status, _) = post_json(&url, &file_body(&[&name]), &[]).await;
    assert_ne!(status, 200, "the owner could not answer");
    // Once the owner answers again, its file is found again at once.
    fake.set_mode(&owner, json!({"mode": "normal"})).await;
    for _ in 0..6 {
        let (status, body) = post_json(&url, &file_body(&[&name]), &[]).await;
        assert_eq!(status, 200, "{body}");
    }
}
