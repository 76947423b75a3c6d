//! Operating it: admin API, metrics, request ids, JSON logs, graceful
//! shutdown, Redis outages.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::helpers::*;

const GENERATE: &str = "/v1beta/models/gemini-2.0-flash:generateContent";
const ADMIN: &str = "admin-secret-token-42";

async fn admin_get(gw: &Gateway, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = client().get(format!("{}{path}", gw.url));
    if let Some(t) = token {
        req = req.insert_header(("authorization", format!("Bearer {t}")));
    }
    let mut resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.body().await.unwrap();
    (
        status,
        serde_json::from_slice(&body)
            .unwrap_or(Value::String(String::from_utf8_lossy(&body).into())),
    )
}

async fn admin_post(gw: &Gateway, path: &str) -> (u16, Value) {
    let mut resp = client()
        .post(format!("{}{path}", gw.url))
        .insert_header(("authorization", format!("Bearer {ADMIN}")))
        .send()
        .await
        .unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    )
}

#[actix_rt::test]
async fn admin_is_404_while_no_admin_token_is_set() {
    let fake = FakeUpstream::start(&keys(1));
    let gw = Gateway::start(&fake, None, &[]);
    assert_eq!(admin_get(&gw, "/admin/api/keys", Some(TOKEN)).await.0, 404);
    assert_eq!(admin_get(&gw, "/admin", None).await.0, 404);
}

#[actix_rt::test]
async fn the_admin_api_refuses_client_tokens_and_never_shows_a_key() {
    let redis = Redis::start();
    let ks = keys(3);
    let fake = FakeUpstream::start(&ks);
    let gws: Vec<Gateway> = (0..2)
        .map(|_| Gateway::start(&fake, Some(&redis), &[("GB_ADMIN_TOKEN", ADMIN)]))
        .collect();
    let gw = &gws[0];
    assert_eq!(admin_get(gw, "/admin/api/keys", None).await.0, 401);
    assert_eq!(admin_get(gw, "/admin/api/keys", Some(TOKEN)).await.0, 403);
    assert_eq!(
        admin_get(gw, "/admin/api/keys", Some("nonsense")).await.0,
        403
    );

    // Some traffic, a session and a file to look up.
    let name = upload_file(
        &format!("{}/upload/v1beta/files", gw.url),
        None,
        &[("x-session-id", "adm-sess")],
        b"x",
    )
    .await;
    for _ in 0..6 {
        assert_eq!(
            post_json(&format!("{}{GENERATE}", gws[1].url), &generate_body(), &[])
                .await
                .0,
            200
        );
    }
    let mut all = String::new();
    let (status, v) = admin_get(gw, "/admin/api/keys", Some(ADMIN)).await;
    assert_eq!(status, 200);
    all.push_str(&v.to_string());
    let rows = v["keys"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for r in rows {
        assert_eq!(r["state"], "healthy");
        assert!(r["masked"].as_str().unwrap().contains('…'));
    }
    let (status, v) = admin_get(gw, "/admin/api/sessions/adm-sess", Some(ADMIN)).await;
    assert_eq!(status, 200, "{v}");
    let session_key = v["key_id"].as_str().unwrap().to_string();
    all.push_str(&v.to_string());
    let (status, v) = admin_get(gw, &format!("/admin/api/{name}"), Some(ADMIN)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["key_id"], session_key.as_str());
    all.push_str(&v.to_string());
    assert_eq!(
        admin_get(gw, "/admin/api/sessions/nobody", Some(ADMIN))
            .await
            .0,
        404
    );

    // Disable on one replica, seen on the other; enable again.
    let (status, v) = admin_post(gw, &format!("/admin/api/keys/{}/disable", key_id(&ks[0]))).await;
    assert_eq!(status, 200, "{v}");
    let (_, v) = admin_get(&gws[1], "/admin/api/keys", Some(ADMIN)).await;
    all.push_str(&v.to_string());
    let row = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == key_id(&ks[0]).as_str())
        .unwrap()
        .clone();
    assert_eq!(row["state"], "disabled");
    fake.post("/_fake/reset", json!({})).await;
    for _ in 0..6 {
        assert_eq!(
            post_json(&format!("{}{GENERATE}", gws[1].url), &generate_body(), &[])
                .await
                .0,
            200
        );
    }
    assert!(
        fake.requests()
            .await
            .iter()
            .all(|r| r["key"] != ks[0].as_str()),
        "a disabled key gets no traffic"
    );
    let (status, v) = admin_post(gw, &format!("/admin/api/keys/{}/recheck", key_id(&ks[0]))).await;
    assert_eq!(
        (status, v["works"].clone()),
        (200, json!(true)),
        "re-check re-enables a working key"
    );
    assert_eq!(admin_post(gw, "/admin/api/keys/nope/enable").await.0, 404);

    // Heartbeats: both replicas are listed.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, v) = admin_get(gw, "/admin/api/replicas", Some(ADMIN)).await;
        if v["replicas"].as_array().is_some_and(|r| r.len() == 2) {
            break;
        }
        assert!(Instant::now() < deadline, "replicas never both seen: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Per-key statistics reach the admin view within a flush interval.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = admin_get(gw, "/admin/api/keys", Some(ADMIN)).await;
        let total: u64 = v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["requests_last_hour"].as_u64().unwrap())
            .sum();
        if total >= 12 {
            all.push_str(&v.to_string());
            break;
        }
        assert!(Instant::now() < deadline, "statistics never flushed: {v}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (status, page) = admin_get(gw, "/admin", Some(ADMIN)).await;
    assert_eq!(status, 200);
    all.push_str(page.as_str().unwrap());
    for k in &ks {
        assert!(!all.contains(k.as_str()), "a raw key in an admin response");
    }
    assert!(!all.contains(ADMIN) && !all.contains(TOKEN));
    let logs: String = gws.iter().map(Gateway::log_text).collect();
    assert!(logs.contains("admin action") && logs.contains(&key_id(&ks[0])));
    assert!(!logs.contains(ADMIN));
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[actix_rt::test]
async fn metrics_move_as_requests_flow() {
    let mut redis = Redis::start();
    let ks = keys(2);
    let fake = FakeUpstream::start(&ks);
    let gw = Gateway::start(&fake, Some(&redis), &[]);
    let scrape = || async {
        let mut r = client()
            .get(format!("{}/metrics", gw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        String::from_utf8(r.body().await.unwrap().to_vec()).unwrap()
    };
    let before = scrape().await;
    for _ in 0..5 {
        post_json(&format!("{}{GENERATE}", gw.url), &generate_body(), &[]).await;
    }
    fake.set_mode(&ks[0], json!({"mode": "quota", "retryDelay": "30s"}))
        .await;
    for _ in 0..3 {
        post_json(&format!("{}{GENERATE}", gw.url), &generate_body(), &[]).await;
    }
    let after = scrape().await;
    let gen = "gb_requests_total{route=\"generate\",status=\"200\"}";
    assert_eq!(metric(&after, gen) - metric(&before, gen), 8.0, "{after}");
    assert!(metric(&after, "gb_upstream_latency_seconds_count") >= 8.0);
    assert_eq!(
        metric(&after, "gb_retries_total{reason=\"rate_limited\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            &format!(
                "gb_key_state{{key_id=\"{}\",state=\"cooling\"}}",
                key_id(&ks[0])
            )
        ),
        1.0
    );
    assert!(
        metric(
            &after,
            &format!("gb_key_cooldown_seconds{{key_id=\"{}\"}}", key_id(&ks[0]))
        ) > 0.0
    );
    assert_eq!(metric(&after, "gb_store_up"), 1.0);
    assert!(metric(&after, "gb_store_command_latency_seconds_count") > 0.0);
    assert!(after.trim_end().ends_with("# EOF"));
    for k in &ks {
        assert!(!after.contains(k.as_str()));
    }
    let answers = format!(
        "gb_upstream_responses_total{{key_id=\"{}\",outcome=\"rate_limited\"}}",
        key_id(&ks[0])
    );
    assert_eq!(metric(&after, &answers), 1.0, "{after}");

    // Sessions, uploads and file owners.
    let session = [("x-session-id", "metered")];
    post_json(&format!("{}{GENERATE}", gw.url), &generate_body(), &session).await;
    upload_file(
        &format!("{}/upload/v1beta/files", gw.url),
        None,
        &session,
        b"m",
    )
    .await;
    let later = scrape().await;
    for (name, by) in [
        ("gb_sessions_bound_total", 1.0),
        ("gb_uploads_started_total", 1.0),
        ("gb_files_recorded_total", 1.0),
    ] {
        assert_eq!(
            metric(&later, name) - metric(&after, name),
            by,
            "{name}: {later}"
        );
    }

    // Store errors, and the store reported down.
    redis.stop();
    let (status, _) = post_json(&format!("{}{GENERATE}", gw.url), &generate_body(), &session).await;
    assert_eq!(status, 503);
    let down = scrape().await;
    assert!(metric(&down, "gb_store_errors_total") > metric(&later, "gb_store_errors_total"));
    assert_eq!(metric(&down, "gb_store_up"), 0.0);
}

#[actix_rt::test]
async fn request_ids_are_honoured_or_generated_and_logged() {
    let fake = FakeUpstream::start(&keys(1));
    let gw = Gateway::start(&fake, None, &[("GB_LOG_FORMAT", "json")]);
    let resp = client()
        .get(format!("{}/v1beta/models", gw.url))
        .insert_header(("x-goog-api-key", TOKEN))
        .insert_header(("x-request-id", "trace-abc-123"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers().get("x-request-id").unwrap(), "trace-abc-123");
    let resp = client()
        .get(format!("{}/healthz", gw.url))
        .send()
        .await
        .unwrap();
    let generated = resp
        .headers()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(generated.len(), 23, "{generated}");
    let again = client()
        .get(format!("{}/healthz", gw.url))
        .send()
        .await
        .unwrap();
    assert_ne!(
        again
            .headers()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap(),
        generated
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.log_text().contains(&generated) {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = gw.log_text();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    for line in &lines {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v.get("level").is_some());
    }
    assert!(lines
        .iter()
        .any(|l| l.contains("trace-abc-123") && l.contains("\"status\":200")));
}

#[actix_rt::test]
async fn sigterm_lets_a_slow_stream_finish_refuses_new_connections_and_exits_0() {
    let fake = FakeUpstream::start(&keys(1));
    let mut gw = Gateway::start(&fake, None, &[("GB_SHUTDOWN_GRACE", "20")]);
    let mut resp = client()
        .post(format!(
            "{}/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
            gw.url
        ))
        .insert_header(("x-goog-api-key", TOKEN))
        .insert_header(("x-fake-hold", "slow-shutdown"))
        .send_json(&generate_body())
        .await
        .unwrap();
    let first = resp.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("chunk 0"));
    let pid = gw.proc.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // New connections are refused once the listener is closed.
    let addr = gw.url.trim_start_matches("http://").to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(200))
        .is_ok()
    {
        assert!(
            Instant::now() < deadline,
            "still accepting connections after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gw.proc.child.try_wait().unwrap().is_none(),
        "waits for the stream"
    );
    fake.post("/_fake/release/slow-shutdown", json!({})).await;
    let mut rest = Vec::new();
    while let Some(chunk) = resp.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert!(
        String::from_utf8_lossy(&rest).contains("chunk 2"),
        "the stream completed"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = gw.proc.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
}

#[actix_rt::test]
async fn a_redis_outage_never_hangs_a_request_and_recovery_is_automatic() {
    let mut redis = Redis::start();
    let fake = FakeUpstream::start(&keys(3));
    let gw = Gateway::start(&fake, Some(&redis), &[]);
    let name = upload_file(
        &format!("{}/upload/v1beta/files", gw.url),
        None,
        &[],
        b"pinned",
    )
    .await;
    assert_eq!(
        post_json(&format!("{}{GENERATE}", gw.url), &file_body(&[&name]), &[])
            .await
            .0,
        200
    );

    redis.stop();
    let mut unpinned_ok = 0;
    for i in 0..30 {
        let started = Instant::now();
        let (status, v) = if i % 3 == 0 {
            post_json(&format!("{}{GENERATE}", gw.url), &file_body(&[&name]), &[]).await
        } else if i % 3 == 1 {
            post_json(
                &format!("{}{GENERATE}", gw.url),
                &generate_body(),
                &[("x-session-id", "during-outage")],
            )
            .await
        } else {
            post_json(&format!("{}{GENERATE}", gw.url), &generate_body(), &[]).await
        };
        // Not a speed check: a bound against hanging, far above the
        // Redis timeout a request may wait for.
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "request {i} hung for {:?}",
            started.elapsed()
        );
        if i % 3 == 2 {
            assert_eq!(status, 200, "unpinned traffic keeps flowing: {v}");
            unpinned_ok += 1;
        } else {
            assert_eq!(status, 503, "{v}");
            assert!(v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("session store"));
        }
    }
    assert_eq!(unpinned_ok, 10);
    let (status, ready) = admin_get(&gw, "/readyz", None).await;
    assert_eq!(status, 200);
    assert_eq!(ready["status"], "degraded");

    // A new Redis on the same port (its data is gone) is picked up without a restart.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = post_json(
            &format!("{}{GENERATE}", gw.url),
            &generate_body(),
            &[("x-session-id", "after-outage")],
        )
        .await;
        let (_, ready) = admin_get(&gw, "/readyz", None).await;
        if status == 200 && ready["status"] == "ready" {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(redis
        .cmd(&["EXISTS", "gb:session:after-outage"])
        .contains(":1"));
}
