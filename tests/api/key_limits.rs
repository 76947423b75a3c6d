//! Known key limits (`[keys]` of the limits file): the gateway keeps every
//! key under the limits Google publishes for its tier, exactly, across
//! replicas, instead of learning them from Google's 429s. The fake upstream
//! enforces the same limits per key and model, as Google does.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::*;

const MODEL: &str = "gemini-2.5-pro";
const LOAD_SECS: u64 = 120;

struct Run {
    /// Upstream answers by minute of the run (by the fake's clock).
    served_per_minute: [u64; 2],
    upstream_429s: u64,
    client_ok: usize,
    client_429: usize,
}

/// Four keys that Google (the fake) allows 5 requests a minute each for
/// the model; three replicas; one request a second for two minutes: three
/// times what the pool can serve.
async fn run(limits: &str) -> Run {
    let redis = Redis::start();
    let fake = FakeUpstream::start(&keys(4));
    let mut per_key = serde_json::Map::new();
    per_key.insert(MODEL.to_string(), json!({"rpm": 5}));
    fake.post("/_fake/limits", Value::Object(per_key)).await;
    let dir = TempDir::new("key-limits");
    let file = dir.path("limits.toml");
    std::fs::write(&file, limits).unwrap();
    let gws: Vec<Gateway> = (0..3)
        .map(|_| Gateway::start(&fake, Some(&redis), &[("GB_LIMITS_FILE", file.as_str())]))
        .collect();
    let path = format!("/v1beta/models/{MODEL}:generateContent");
    let start = Instant::now();
    let start_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let sends = (0..LOAD_SECS).map(|i| {
        let url = format!("{}{path}", gws[i as usize % 3].url);
        async move {
            tokio::time::sleep_until((start + Duration::from_secs(i)).into()).await;
            let mut resp = client()
                .post(url)
                .insert_header(("x-goog-api-key", TOKEN))
                .send_json(&generate_body())
                .await
                .unwrap();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            (resp.status().as_u16(), body)
        }
    });
    let answers = futures_util::future::join_all(sends).await;
    let client_ok = answers.iter().filter(|(s, _)| *s == 200).count();
    let client_429 = answers.iter().filter(|(s, _)| *s == 429).count();
    for (status, body) in &answers {
        assert!(*status == 200 || *status == 429, "{status} {body}");
        if *status == 429 {
            assert!(
                body["error"]["details"].to_string().contains("RetryInfo"),
                "{body}"
            );
        }
    }
    let limited: std::collections::HashMap<String, u64> =
        serde_json::from_value(fake.get("/_fake/limited").await).unwrap();
    let upstream_429s = limited.values().sum::<u64>();
    // Every model call the fake saw, by minute of the run; with no 429 from
    // it, each was served.
    let mut served_per_minute = [0u64; 2];
    for r in fake.requests().await {
        if r["path"].as_str().is_some_and(|p| p.contains(MODEL)) {
            let minute = (r["at_ms"].as_u64().unwrap() - start_ms) / 60_000;
            if let Some(n) = served_per_minute.get_mut(minute as usize) {
                *n += 1;
            }
        }
    }
    Run {
        served_per_minute,
        upstream_429s,
        client_ok,
        client_429,
    }
}

#[actix_rt::test]
async fn with_known_key_limits_no_request_gets_googles_429_and_the_pool_serves_its_capacity() {
    let run = run(&format!("[keys.\"{MODEL}\"]\nrpm = 5\n")).await;
    eprintln!(
        "with [keys]: upstream 429s {}, served per minute {:?}, client 200 {}, client 429 {}",
        run.upstream_429s, run.served_per_minute, run.client_ok, run.client_429
    );
    assert_eq!(
        run.upstream_429s, 0,
        "the gateway never went over a key's limit"
    );
    assert_eq!(
        run.served_per_minute,
        [20, 20],
        "4 keys × 5 a minute, every minute"
    );
}

#[actix_rt::test]
async fn without_known_key_limits_google_would_have_sent_429s() {
    let run = run("").await;
    eprintln!(
        "without [keys]: upstream 429s {}, client 200 {}, client 429 {}",
        run.upstream_429s, run.client_ok, run.client_429
    );
    assert!(run.upstream_429s > 0, "the pool was driven past its limits");
}

/// The windows are decided in the rotation's own round trip, in the ring's
/// slot: exact on every deployment. A session pins its requests to one key,
/// which waits (up to `GB_PIN_WAIT`) for its window, then gets 429.
async fn windows_are_exact_and_pinned_requests_wait(mode: Mode) {
    let redis = Deployment::start(mode);
    let fake = FakeUpstream::start(&keys(2));
    let mut per_key = serde_json::Map::new();
    per_key.insert(MODEL.to_string(), json!({"rpm": 2}));
    fake.post("/_fake/limits", Value::Object(per_key)).await;
    let dir = TempDir::new("key-windows");
    let file = dir.path("limits.toml");
    std::fs::write(&file, format!("[keys.\"{MODEL}\"]\nrpm = 2\n")).unwrap();
    let gws: Vec<Gateway> = (0..3)
        .map(|_| {
            Gateway::start(
                &fake,
                Some(&redis),
                &[
                    ("GB_LIMITS_FILE", file.as_str()),
                    ("GB_PIN_WAIT", "0"),
                    ("GB_ADMIN_TOKEN", crate::usage::ADMIN),
                ],
            )
        })
        .collect();
    let path = format!("/v1beta/models/{MODEL}:generateContent");
    let send = |i: usize, session: Option<&'static str>| {
        let mut req = client()
            .post(format!("{}{path}", gws[i % 3].url))
            .insert_header(("x-goog-api-key", TOKEN));
        if let Some(s) = session {
            req = req.insert_header(("x-session-id", s));
        }
        async move {
            let mut resp = req.send_json(&generate_body()).await.unwrap();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            (resp.status().as_u16(), body)
        }
    };
    // One pinned request takes one slot of its key.
    assert_eq!(send(0, Some("s1")).await.0, 200);
    let answers = futures_util::future::join_all((0..12).map(|i| send(i, None))).await;
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(
        ok, 3,
        "2 keys × 2 a minute, one taken by the session: {answers:?}"
    );
    for (status, body) in answers.iter().filter(|(s, _)| *s != 200) {
        assert_eq!(*status, 429);
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("known limit for model gemini-2.5-pro"),
            "{body}"
        );
    }
    let (status, body) = send(1, Some("s1")).await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is pinned to API key"),
        "{body}"
    );
    let limited: std::collections::HashMap<String, u64> =
        serde_json::from_value(fake.get("/_fake/limited").await).unwrap();
    assert_eq!(limited.values().sum::<u64>(), 0, "no upstream 429");
    let calls = fake
        .requests()
        .await
        .iter()
        .filter(|r| r["path"].as_str().is_some_and(|p| p.contains(MODEL)))
        .count();
    assert_eq!(calls, 4);
    let metrics = metrics_text(&gws[0].url).await;
    assert!(
        metrics.contains("gb_key_window_full_total{model="),
        "{metrics}"
    );
}

#[actix_rt::test]
async fn key_windows_are_exact_on_standalone_redis() {
    windows_are_exact_and_pinned_requests_wait(Mode::Standalone).await;
}

#[actix_rt::test]
async fn key_windows_are_exact_on_a_redis_cluster() {
    windows_are_exact_and_pinned_requests_wait(Mode::Cluster).await;
}

#[actix_rt::test]
async fn key_windows_are_exact_with_sentinel() {
    windows_are_exact_and_pinned_requests_wait(Mode::Sentinel).await;
}
