//! The request log: every finished request leaves one record, written to
//! the shared store in batches per replica, found by the `X-Request-Id` the
//! client got and by filters, never holding a secret or a body.

use std::time::{Duration, Instant};

use awc::ws::Message;
use futures_util::SinkExt;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::usage::ADMIN;

const GENERATE: &str = "/v1beta/models/gemini-2.0-flash:generateContent";
const SESSION: &str = "sess-secret-4242";
const BODY_MARK: &str = "body-mark-xyzzy";

fn request_id(resp: &awc::ClientResponse<impl futures_util::Stream>) -> String {
    resp.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("x-request-id")
        .to_string()
}

async fn admin(gw: &Gateway, query: &str) -> Value {
    let mut resp = client()
        .get(format!("{}/admin/api/requests?{query}", gw.url))
        .insert_header(("authorization", format!("Bearer {ADMIN}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "{query}");
    resp.json().await.unwrap()
}

/// The record of one request, once its replica has flushed it.
async fn record_of(gw: &Gateway, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = admin(gw, &format!("request_id={id}")).await;
        if let Some(r) = found["requests"].as_array().and_then(|a| a.first()) {
            assert_eq!(found["requests"].as_array().unwrap().len(), 1);
            return r.clone();
        }
        assert!(Instant::now() < deadline, "no record of request {id}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[actix_rt::test]
async fn each_request_is_found_by_its_id_with_its_key_attempts_and_tokens() {
    let redis = Redis::start();
    let fake = FakeUpstream::start(&keys(2));
    let dir = TempDir::new("request-log");
    let limits = dir.path("limits.toml");
    // TOKEN_B may use one model only.
    std::fs::write(
        &limits,
        format!(
            "[clients.{}]\nmodels = [\"gemini-2.5-flash*\"]\n",
            key_id(TOKEN_B)
        ),
    )
    .unwrap();
    let gws: Vec<Gateway> = (0..3)
        .map(|_| {
            Gateway::start(
                &fake,
                Some(&redis),
                &[
                    ("GB_ADMIN_TOKEN", ADMIN),
                    ("GB_LIMITS_FILE", limits.as_str()),
                ],
            )
        })
        .collect();
    let (a, b) = (key_id(&fake.keys[0]), key_id(&fake.keys[1]));
    fake.set_mode(&fake.keys[0], json!({"mode": "quota", "retryDelay": "60s"}))
        .await;

    // A retried request: the first key answers 429, the second 200. The
    // second request is sure to start on the first key if the first did not.
    let mut retried = None;
    for i in 0..2 {
        let mut resp = client()
            .post(format!("{}{GENERATE}", gws[i].url))
            .insert_header(("x-goog-api-key", TOKEN))
            .send_json(&json!({"contents": [{"parts": [{"text": BODY_MARK}]}]}))
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let id = request_id(&resp);
        let _ = resp.body().await;
        let record = record_of(&gws[2], &id).await;
        assert_eq!(record["status"], 200);
        assert_eq!(record["route"], "generate");
        assert_eq!(record["model"], "gemini-2.0-flash");
        assert_eq!(record["chosen_by"], "rotation");
        assert_eq!(record["key_id"], b.as_str());
        assert!(record["tokens"]["prompt"].as_u64().unwrap() > 0, "{record}");
        assert!(record["tokens"]["output"].as_u64().unwrap() > 0, "{record}");
        if record["attempts"] == 2 {
            assert_eq!(record["keys_tried"], json!([a, b]));
            retried = Some(record);
            break;
        }
        assert_eq!(record["keys_tried"], json!([b]));
    }
    let retried = retried.expect("one request was retried");
    assert_eq!(retried["outcome"], "success");
    assert!(retried["upstream_ms"].as_u64().is_some());
    assert!(retried["replica"].as_str().is_some_and(|r| !r.is_empty()));

    // A pinned upload (its start): the session's key.
    let resp = client()
        .post(format!("{}/upload/v1beta/files", gws[1].url))
        .insert_header(("x-goog-api-key", TOKEN))
        .insert_header(("x-session-id", SESSION))
        .insert_header(("x-goog-upload-protocol", "resumable"))
        .insert_header(("x-goog-upload-command", "start"))
        .insert_header(("x-goog-upload-header-content-length", "3"))
        .send_json(&json!({"file": {"display_name": "t"}}))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let record = record_of(&gws[0], &request_id(&resp)).await;
    assert_eq!(record["route"], "upload");
    assert_eq!(record["chosen_by"], "session");
    assert_eq!(record["key_id"], b.as_str(), "the only key not cooling");

    // A refused request: a model outside TOKEN_B's list.
    let resp = client()
        .post(format!("{}{GENERATE}", gws[2].url))
        .insert_header(("x-goog-api-key", TOKEN_B))
        .send_json(&generate_body())
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let record = record_of(&gws[1], &request_id(&resp)).await;
    assert_eq!(record["status"], 403);
    assert_eq!(record["outcome"], "client_limited");
    assert_eq!(record["attempts"], 0);
    assert_eq!(record["token"], key_id(TOKEN_B));

    // A Live session: one record when it ends, with its turns' tokens.
    let ws_url = format!(
        "{}{}",
        gws[0].url.replacen("http://", "ws://", 1),
        crate::live::LIVE
    );
    let (resp, mut conn) = client()
        .ws(ws_url)
        .set_header("x-goog-api-key", TOKEN)
        .connect()
        .await
        .unwrap();
    let live_id = request_id(&resp);
    conn.send(Message::Text(
        json!({"setup": {"model": "models/gemini-live-2.5-flash"}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    assert!(crate::live::next_text(&mut conn)
        .await
        .unwrap()
        .contains("setupComplete"));
    crate::live::send_turn(&mut conn, "hello").await;
    while let Some(t) = crate::live::next_text(&mut conn).await {
        if t.contains("usageMetadata") {
            break;
        }
    }
    conn.send(Message::Close(None)).await.unwrap();
    drop(conn);
    let record = record_of(&gws[1], &live_id).await;
    assert_eq!(record["route"], "live");
    assert_eq!(record["status"], 101);
    assert_eq!(record["outcome"], "success");
    assert_eq!(record["model"], "gemini-live-2.5-flash");
    assert_eq!(record["key_id"], b.as_str());
    assert!(record["tokens"]["prompt"].as_u64().unwrap() > 0, "{record}");

    // Filters return exactly the matching records; pages of one, followed
    // by their cursor, return the same records once each.
    let all = admin(&gws[0], "limit=1000").await["requests"]
        .as_array()
        .unwrap()
        .clone();
    assert!(all.len() >= 4, "{all:?}");
    let of_b = admin(&gws[1], &format!("token={}", key_id(TOKEN_B))).await;
    let want: Vec<&Value> = all
        .iter()
        .filter(|r| r["token_id"] == key_id(TOKEN_B).as_str())
        .collect();
    assert_eq!(
        of_b["requests"]
            .as_array()
            .unwrap()
            .iter()
            .collect::<Vec<_>>(),
        want
    );
    for (query, keep) in [
        (
            "model=gemini-live-2.5-flash",
            &(|r: &Value| r["model"] == "gemini-live-2.5-flash") as &dyn Fn(&Value) -> bool,
        ),
        ("outcome=client_limited", &|r: &Value| {
            r["outcome"] == "client_limited"
        }),
    ] {
        let found = admin(&gws[0], query).await;
        let want: Vec<&Value> = all.iter().filter(|r| keep(r)).collect();
        assert_eq!(want.len(), 1, "{query}");
        assert_eq!(
            found["requests"]
                .as_array()
                .unwrap()
                .iter()
                .collect::<Vec<_>>(),
            want,
            "{query}"
        );
    }
    let newest = all[0]["time_ms"].as_u64().unwrap();
    let from_newest = admin(&gws[0], &format!("from={newest}")).await;
    assert_eq!(from_newest["requests"][0], all[0]);
    assert!(from_newest["requests"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["time_ms"].as_u64().unwrap() >= newest));
    // The same bound as a time with its offset, `+` encoded or not.
    let at = jiff::Timestamp::from_millisecond(i64::try_from(newest).unwrap())
        .unwrap()
        .display_with_offset(jiff::tz::offset(2))
        .to_string();
    assert!(at.contains("+02:00"), "{at}");
    for form in [at.replace('+', "%2B"), at.clone()] {
        let found = admin(&gws[0], &format!("from={form}")).await;
        assert_eq!(found["requests"], from_newest["requests"], "{form}");
    }
    let before_oldest = admin(&gws[0], &format!("to={}", newest - 3_600_000)).await;
    assert_eq!(before_oldest["requests"], json!([]));
    let fours = admin(&gws[1], "status=4xx").await;
    let want: Vec<&Value> = all
        .iter()
        .filter(|r| r["status"].as_u64().unwrap() / 100 == 4)
        .collect();
    assert_eq!(
        fours["requests"]
            .as_array()
            .unwrap()
            .iter()
            .collect::<Vec<_>>(),
        want
    );
    let with_key_a = admin(&gws[2], &format!("key={a}")).await;
    assert_eq!(
        with_key_a["requests"].as_array().unwrap().len(),
        1,
        "only the retried one tried key a"
    );
    let mut paged = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = admin(&gws[2], &format!("limit=1&cursor={cursor}")).await;
        paged.extend(page["requests"].as_array().unwrap().clone());
        match page["next"].as_str() {
            Some(next) => cursor = next.to_string(),
            None => break,
        }
        assert!(paged.len() <= all.len(), "paging repeats");
    }
    assert_eq!(paged, all);
    // NDJSON for pipelines.
    let mut resp = client()
        .get(format!(
            "{}/admin/api/requests?format=ndjson&limit=2",
            gws[0].url
        ))
        .insert_header(("authorization", format!("Bearer {ADMIN}")))
        .send()
        .await
        .unwrap();
    let text = String::from_utf8(resp.body().await.unwrap().to_vec()).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "two records and where to go on: {text}");
    assert_eq!(lines[0], all[0]);
    assert!(lines[2]["next"].is_string());
    // The status page's Requests view, with the same filters.
    let page = client()
        .get(format!(
            "{}/admin/requests?request_id={live_id}",
            gws[2].url
        ))
        .insert_header(("authorization", format!("Bearer {ADMIN}")))
        .send()
        .await
        .unwrap()
        .body()
        .await
        .unwrap();
    let page = String::from_utf8_lossy(&page);
    let table = &page[page.find("id=\"requests\"").expect("the table")..];
    assert_eq!(table.matches("<tr><td>").count(), 1, "{table}");
    assert!(table.contains(&live_id));

    // No record holds a key, a token, a session id or a body.
    let raw = serde_json::to_string(&all).unwrap();
    for secret in fake
        .keys
        .iter()
        .map(String::as_str)
        .chain([TOKEN, TOKEN_B, SESSION, BODY_MARK])
    {
        assert!(!raw.contains(secret), "a record holds {secret}");
    }
    for key in redis.all_keys() {
        if key.contains("idx:requests") {
            // What a record costs in Redis (reported, not asserted).
            let bytes = redis.cmd(&["MEMORY", "USAGE", &key]);
            let n = redis.cmd(&["ZCARD", &key]);
            eprintln!(
                "request log in Redis: {} bytes for {} records",
                bytes.trim(),
                n.trim()
            );
            let stored = redis.cmd(&["ZRANGE", &key, "0", "-1"]);
            for secret in [TOKEN, TOKEN_B, SESSION, BODY_MARK, "AIzaFakeKey"] {
                assert!(!stored.contains(secret), "the log in Redis holds {secret}");
            }
        }
    }
}

#[actix_rt::test]
async fn the_log_keeps_at_most_its_bound() {
    let redis = Redis::start();
    let fake = FakeUpstream::start(&keys(2));
    let gw = Gateway::start(
        &fake,
        Some(&redis),
        &[
            ("GB_ADMIN_TOKEN", ADMIN),
            ("GB_REQUEST_LOG_MAX", "200"),
            ("GB_REQUEST_LOG_HOURS", "2"),
        ],
    );
    for _ in 0..1200 {
        let mut resp = client()
            .post(format!("{}{GENERATE}", gw.url))
            .insert_header(("x-goog-api-key", TOKEN))
            .send_json(&generate_body())
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let _ = resp.body().await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = admin(&gw, "limit=1000").await;
        let n = found["requests"].as_array().unwrap().len();
        assert!(n <= 200, "{n} records");
        if n == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "{n} records");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let key = redis
        .all_keys()
        .into_iter()
        .find(|k| k.ends_with("idx:requests"))
        .unwrap();
    assert_eq!(redis.cmd(&["ZCARD", &key]).trim(), ":200");
    // Records lapse after GB_REQUEST_LOG_HOURS: so does the log.
    let ttl: i64 = redis
        .cmd(&["PTTL", &key])
        .trim()
        .trim_start_matches(':')
        .parse()
        .unwrap();
    assert!((7_000_000..=7_200_000).contains(&ttl), "{ttl}");
    // What a record costs in Redis (reported for the README, not asserted).
    let bytes = redis.cmd(&["MEMORY", "USAGE", &key, "SAMPLES", "0"]);
    eprintln!(
        "request log in Redis: {} bytes for 200 generate records",
        bytes.trim()
    );
}
