//! Key health shared by every replica: cooldowns, disabled keys, retries,
//! throttling, the re-check.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::helpers::*;

const GENERATE: &str = "/v1beta/models/gemini-2.0-flash:generateContent";

/// key id → raw state, straight from Redis.
fn states(redis: &dyn RedisEnv) -> std::collections::HashMap<String, String> {
    let raw = redis.cmd(&["HGETALL", "gb:{ring:keys}:s"]);
    let vals: Vec<&str> = raw
        .lines()
        .filter(|l| !l.starts_with('*') && !l.starts_with('$'))
        .collect();
    vals.chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (c[0].to_string(), c[1].to_string()))
        .collect()
}

async fn generate(gw: &Gateway) -> (u16, Value) {
    post_json(&format!("{}{GENERATE}", gw.url), &generate_body(), &[]).await
}

fn count_for(seen: &[Value], key: &str) -> usize {
    seen.iter().filter(|r| r["key"] == key).count()
}

async fn a_cooling_key_gets_no_traffic_from_any_replica_until_its_delay_passes(mode: Mode) {
    let redis = Deployment::start(mode);
    let ks = keys(3);
    let fake = FakeUpstream::start(&ks);
    let gws: Vec<Gateway> = (0..2)
        .map(|_| Gateway::start(&fake, Some(&redis), &[]))
        .collect();
    fake.set_mode(&ks[0], json!({"mode": "quota", "retryDelay": "4s"}))
        .await;
    // Replica 1 meets the 429 (and retries elsewhere: the client sees success).
    for _ in 0..3 {
        assert_eq!(generate(&gws[0]).await.0, 200);
    }
    let st = states(&redis);
    let raw = &st[&key_id(&ks[0])];
    assert!(raw.starts_with("c:"), "{st:?}");
    let until: u64 = raw[2..].split(':').next().unwrap().parse().unwrap();
    fake.set_mode(&ks[0], json!({"mode": "normal"})).await;
    fake.post("/_fake/reset", json!({})).await;
    // Replica 2 sends nothing to the key before its cooldown ends, and uses
    // it again after: judged by when each request reached the upstream, not
    // by how fast the test runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    let back = loop {
        assert_eq!(generate(&gws[1]).await.0, 200);
        let seen = fake.requests().await;
        if let Some(r) = seen.iter().find(|r| r["key"] == ks[0].as_str()) {
            break r["at_ms"].as_u64().unwrap();
        }
        assert!(Instant::now() < deadline, "key never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        back >= until,
        "the cooling key was used {} ms early",
        until - back
    );
}

in_every_redis_mode!(a_cooling_key_gets_no_traffic_from_any_replica_until_its_delay_passes);

async fn an_invalid_key_is_disabled_after_its_first_400_on_every_replica(mode: Mode) {
    let redis = Deployment::start(mode);
    let ks = keys(5);
    // The fake knows only four of the five keys: the fifth is invalid.
    let fake = FakeUpstream::start(&ks[..4]);
    let gws: Vec<Gateway> = (0..3)
        .map(|_| Gateway::start_for(&fake.url, &ks, Some(&redis), &[]))
        .collect();
    for i in 0..100 {
        let (status, v) = generate(&gws[i % 3]).await;
        assert_eq!(status, 200, "{v}");
    }
    let seen = fake.requests().await;
    assert_eq!(
        count_for(&seen, &ks[4]),
        1,
        "one request found it invalid; none after"
    );
    let st = states(&redis);
    assert!(st[&key_id(&ks[4])].starts_with("d:"), "{st:?}");
    assert!(st[&key_id(&ks[4])].contains("api_key_invalid"));
    for gw in &gws {
        gw.assert_no_secrets_logged(&ks);
    }
}

in_every_redis_mode!(an_invalid_key_is_disabled_after_its_first_400_on_every_replica);

#[actix_rt::test]
async fn all_keys_429_gives_the_client_429_with_retry_after_and_disables_nothing() {
    let redis = Redis::start();
    let ks = keys(3);
    let fake = FakeUpstream::start(&ks);
    let gw = Gateway::start(&fake, Some(&redis), &[]);
    for k in &ks {
        fake.set_mode(k, json!({"mode": "quota", "retryDelay": "30s"}))
            .await;
    }
    let mut resp = client()
        .post(format!("{}{GENERATE}", gw.url))
        .insert_header(("x-goog-api-key", TOKEN))
        .send_json(&generate_body())
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    let retry_after: u64 = resp
        .headers()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry_after));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], 429);
    let (status, _) = generate(&gw).await;
    assert_eq!(
        status, 429,
        "still throttled, answered without an upstream call"
    );
    assert_eq!(fake.requests().await.len(), 3, "each key tried once");
    let st = states(&redis);
    assert_eq!(st.len(), 3);
    assert!(
        st.values().all(|s| s.starts_with("c:")),
        "cooling, never disabled: {st:?}"
    );
}

#[actix_rt::test]
async fn streams_are_retried_only_before_their_first_byte() {
    let ks = keys(2);
    let fake = FakeUpstream::start(&ks);
    let gw = Gateway::start(&fake, None, &[]);
    let stream_url = format!(
        "{}/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
        gw.url
    );
    // Fails before the first byte (503): retried on the other key.
    fake.set_mode(&ks[0], json!({"mode": "error", "status": 503}))
        .await;
    for _ in 0..4 {
        let mut resp = client()
            .post(&stream_url)
            .insert_header(("x-goog-api-key", TOKEN))
            .send_json(&generate_body())
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let body = resp.body().await.unwrap();
        assert!(String::from_utf8_lossy(&body).contains("chunk 2"));
    }
    // Breaks after the first byte: the client keeps what it got, no retry.
    fake.set_mode(&ks[0], json!({"mode": "break_stream"})).await;
    fake.set_mode(&ks[1], json!({"mode": "break_stream"})).await;
    fake.post("/_fake/reset", json!({})).await;
    let mut resp = client()
        .post(&stream_url)
        .insert_header(("x-goog-api-key", TOKEN))
        .send_json(&generate_body())
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut got = Vec::new();
    while let Some(Ok(chunk)) = resp.next().await {
        got.extend_from_slice(&chunk);
    }
    let got = String::from_utf8_lossy(&got);
    assert!(got.contains("chunk 0") && !got.contains("chunk 1"), "{got}");
    assert_eq!(fake.requests().await.len(), 1, "not retried");
    gw.wait_for_log("upstream body ended with an error").await;
    // The gateway is still fine.
    fake.set_mode(&ks[0], json!({"mode": "normal"})).await;
    fake.set_mode(&ks[1], json!({"mode": "normal"})).await;
    assert_eq!(generate(&gw).await.0, 200);
}

#[actix_rt::test]
async fn a_request_pinned_to_a_file_is_not_moved_when_its_key_answers_429() {
    let ks = keys(3);
    let fake = FakeUpstream::start(&ks);
    let gw = Gateway::start(&fake, None, &[]);
    let name = upload_file(
        &format!("{}/upload/v1beta/files", gw.url),
        None,
        &[],
        b"pinned",
    )
    .await;
    let owner = fake.owner_key(&name).await;
    fake.set_mode(&owner, json!({"mode": "quota", "retryDelay": "20s"}))
        .await;
    fake.post("/_fake/reset", json!({})).await;
    let (status, v) = post_json(&format!("{}{GENERATE}", gw.url), &file_body(&[&name]), &[]).await;
    assert_eq!(status, 429, "{v}");
    let seen = fake.requests().await;
    assert_eq!(seen.len(), 1, "never retried on another key: {seen:?}");
    assert_eq!(seen[0]["key"], owner.as_str());
}

#[actix_rt::test]
async fn the_recheck_re_enables_a_key_that_works_again_on_one_replica() {
    let redis = Redis::start();
    let ks = keys(3);
    let fake = FakeUpstream::start(&ks);
    let gws: Vec<Gateway> = (0..2)
        .map(|_| Gateway::start(&fake, Some(&redis), &[("GB_RECHECK_INTERVAL", "1")]))
        .collect();
    fake.set_mode(&ks[1], json!({"mode": "invalid"})).await;
    for _ in 0..4 {
        assert_eq!(generate(&gws[0]).await.0, 200);
    }
    assert!(states(&redis)[&key_id(&ks[1])].starts_with("d:"));
    fake.set_mode(&ks[1], json!({"mode": "normal"})).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while states(&redis).contains_key(&key_id(&ks[1])) {
        assert!(Instant::now() < deadline, "never re-enabled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lines = || -> Vec<String> {
        gws.iter()
            .flat_map(|g| {
                g.log_text()
                    .lines()
                    .filter(|l| l.contains("re-enabled key"))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    while lines().is_empty() {
        assert!(Instant::now() < deadline, "the re-enable was never logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lines = lines();
    assert_eq!(
        lines.len(),
        1,
        "exactly one replica re-enabled it: {lines:?}"
    );
    assert!(lines[0].contains(&key_id(&ks[1])));
}

#[actix_rt::test]
async fn a_dropped_connection_is_retried_on_another_key_unless_pinned() {
    let ks = keys(2);
    let fake = FakeUpstream::start(&ks);
    let gw = Gateway::start(&fake, None, &[]);
    let name = upload_file(
        &format!("{}/upload/v1beta/files", gw.url),
        None,
        &[],
        b"pinned",
    )
    .await;
    let owner = fake.owner_key(&name).await;
    fake.set_mode(&owner, json!({"mode": "drop"})).await;
    fake.post("/_fake/reset", json!({})).await;
    for _ in 0..4 {
        assert_eq!(
            generate(&gw).await.0,
            200,
            "unpinned: retried on the other key"
        );
    }
    assert!(
        count_for(&fake.requests().await, &owner) >= 1,
        "the dropping key was tried"
    );
    let (status, v) = post_json(&format!("{}{GENERATE}", gw.url), &file_body(&[&name]), &[]).await;
    assert_eq!(status, 502, "pinned to the dropping key: {v}");
    assert_eq!(v["error"]["code"], 502);
    gw.wait_for_log("upstream unreachable").await;
}

#[actix_rt::test]
async fn a_session_bound_to_a_key_that_gets_disabled_is_re_bound_on_its_next_use() {
    let redis = Redis::start();
    let ks = keys(3);
    let fake = FakeUpstream::start(&ks);
    let gws: Vec<Gateway> = (0..2)
        .map(|_| Gateway::start(&fake, Some(&redis), &[]))
        .collect();
    let session = [("x-session-id", "rebind-me")];
    let url = |i: usize| format!("{}{GENERATE}", gws[i].url);
    assert_eq!(post_json(&url(0), &generate_body(), &session).await.0, 200);
    let bound = fake.requests().await[0]["key"]
        .as_str()
        .unwrap()
        .to_string();
    fake.set_mode(&bound, json!({"mode": "invalid"})).await;
    // The pinned request meets the invalid key: Google's answer, not retried.
    assert_eq!(post_json(&url(1), &generate_body(), &session).await.0, 400);
    assert!(states(&redis)[&key_id(&bound)].starts_with("d:"));
    fake.post("/_fake/reset", json!({})).await;
    for i in 0..4 {
        assert_eq!(
            post_json(&url(i % 2), &generate_body(), &session).await.0,
            200
        );
    }
    let seen = fake.requests().await;
    let keys_used: HashSet<&str> = seen.iter().filter_map(|r| r["key"].as_str()).collect();
    assert_eq!(keys_used.len(), 1, "re-bound to one new key: {keys_used:?}");
    assert!(!keys_used.contains(bound.as_str()));
    let logs: String = gws.iter().map(Gateway::log_text).collect();
    assert!(logs.contains("session re-bound"), "{logs}");
}
