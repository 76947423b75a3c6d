//! A Redis restart costs clients nothing once Redis is back. Every worker of
//! a replica keeps its own Redis connection; a restart kills them all while
//! they are idle, and nobody notices until the next command. That command
//! is sent again on a fresh connection, on every worker, before any client
//! sees an error; the circuit breaker, opened by requests during the outage,
//! closes as soon as a probe gets an answer.

use serde_json::Value;

use crate::helpers::*;

const GENERATE: &str = "/v1beta/models/gemini-2.0-flash:generateContent";
const WORKERS: usize = 2;

/// Status, `Retry-After` and body of one generate call on a new connection
/// (a new connection per call: the replica hands connections to its workers
/// in turn, so consecutive calls reach every worker).
async fn generate(gw: &Gateway, session: Option<&str>) -> (u16, Option<String>, Value) {
    let mut req = client()
        .post(format!("{}{GENERATE}", gw.url))
        .insert_header(("x-goog-api-key", TOKEN));
    if let Some(sid) = session {
        req = req.insert_header(("x-session-id", sid));
    }
    let mut resp = req.send_json(&generate_body()).await.expect("request");
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp.body().limit(1 << 20).await.expect("body");
    (
        resp.status().as_u16(),
        retry_after,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

/// Two replicas of two workers each on one durable Redis, every worker
/// holding a connection: a binding request per worker and a few more.
async fn deployment(redis: &Redis, fake: &FakeUpstream) -> Vec<Gateway> {
    let workers = WORKERS.to_string();
    let gws: Vec<Gateway> = (0..2)
        .map(|_| Gateway::start(fake, Some(redis), &[("GB_WORKERS", &workers)]))
        .collect();
    for (g, gw) in gws.iter().enumerate() {
        gw.wait_for_log(&format!("starting {WORKERS} workers"))
            .await;
        for i in 0..4 * WORKERS {
            let (status, _, v) = generate(gw, Some(&format!("before-{g}-{i}"))).await;
            assert_eq!(status, 200, "{v}");
        }
    }
    gws
}

/// Sessions bound before a restart, and the key each is bound to.
fn bound(redis: &Redis) -> Vec<(String, String)> {
    (0..2)
        .flat_map(|g| (0..4 * WORKERS).map(move |i| format!("before-{g}-{i}")))
        .map(|sid| {
            let raw = redis.cmd(&["GET", &format!("gb:session:{sid}")]);
            let key = resp_strings(&raw).pop().expect("a bound session");
            (sid, key)
        })
        .collect()
}

/// After the restart: on each replica, a new binding on every worker and the
/// bindings made before, still on their keys.
async fn assert_served_everywhere(gws: &[Gateway], redis: &Redis, before: &[(String, String)]) {
    for (g, gw) in gws.iter().enumerate() {
        for i in 0..2 * WORKERS {
            let sid = format!("after-{g}-{i}");
            let (status, _, v) = generate(gw, Some(&sid)).await;
            assert_eq!(
                status, 200,
                "replica {g}, request {i} after the restart: {v}"
            );
        }
    }
    for (sid, key) in before {
        let (status, _, v) = generate(&gws[0], Some(sid)).await;
        assert_eq!(status, 200, "{v}");
        let raw = redis.cmd(&["GET", &format!("gb:session:{sid}")]);
        assert_eq!(
            resp_strings(&raw).pop().as_ref(),
            Some(key),
            "{sid} kept its key"
        );
    }
}

#[actix_rt::test]
async fn the_first_request_after_a_redis_restart_succeeds_on_every_worker() {
    let dir = TempDir::new("redis-restart");
    let mut redis = Redis::start_durable(&dir);
    let fake = FakeUpstream::start(&keys(3));
    let gws = deployment(&redis, &fake).await;
    let before = bound(&redis);

    // No traffic while Redis is down: every worker's connection is dead
    // and none has noticed. `restart` returns once the new server answers.
    redis.restart();
    assert_served_everywhere(&gws, &redis, &before).await;
    for gw in &gws {
        assert!(
            !gw.log_text().contains("state store unavailable"),
            "a request saw the restart:\n{}",
            gw.log_text()
        );
    }
}

#[actix_rt::test]
async fn requests_during_a_redis_outage_get_a_fast_503_and_none_fail_once_it_is_back() {
    let dir = TempDir::new("redis-outage");
    let mut redis = Redis::start_durable(&dir);
    let fake = FakeUpstream::start(&keys(3));
    let gws = deployment(&redis, &fake).await;
    let before = bound(&redis);

    redis.stop();
    for (g, gw) in gws.iter().enumerate() {
        for i in 0..3 * WORKERS {
            let (status, retry_after, v) = generate(gw, Some(&format!("during-{g}-{i}"))).await;
            assert_eq!(status, 503, "{v}");
            assert_eq!(v["error"]["status"], "UNAVAILABLE", "{v}");
            assert!(retry_after.is_some(), "a 503 says when to retry");
            let (status, _, v) = generate(gw, None).await;
            assert_eq!(status, 200, "unpinned traffic keeps flowing: {v}");
        }
        gw.wait_for_log("circuit open").await;
        // The cause is named, once.
        let log = gw.log_text();
        assert!(log.contains("connection refused"), "{log}");
        assert!(
            !log.contains("unavailable: the state store is unavailable"),
            "{log}"
        );
    }

    redis.restart();
    // The replicas' own probes close their breakers, with no request.
    for gw in &gws {
        gw.wait_for_log("circuit closed").await;
    }
    assert_served_everywhere(&gws, &redis, &before).await;
}
