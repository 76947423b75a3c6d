//! Keys and tokens change without a restart: two replicas reading the same
//! mounted files, polled every second (or told by SIGHUP).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::helpers::*;

const GENERATE: &str = "/v1beta/models/gemini-2.0-flash:generateContent";

struct Files {
    dir: std::path::PathBuf,
}

impl Files {
    fn new() -> Files {
        let dir = std::env::temp_dir().join(format!("gb-reload-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Files { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// Replaces a file the way a Secret update or an editor's save does: a
    /// new file moved over the old one.
    fn write(&self, name: &str, text: &str) {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.join(name)).unwrap();
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(fake: &FakeUpstream, redis: &Redis, files: &Files, interval: &str) -> Gateway {
    let env = vec![
        ("GB_API_KEYS_FILE".to_string(), files.path("keys")),
        ("GB_AUTH_TOKENS_FILE".to_string(), files.path("tokens")),
        ("GB_UPSTREAM_URL".to_string(), fake.url.clone()),
        ("GB_REDIS_URL".to_string(), redis.url()),
        ("GB_RELOAD_INTERVAL".to_string(), interval.to_string()),
    ];
    Gateway::start_env(&env)
}

fn used_keys(seen: &[Value]) -> std::collections::HashSet<String> {
    seen.iter()
        .filter_map(|r| r["key"].as_str().map(str::to_string))
        .collect()
}

/// Sends generate requests through every replica until `cond` holds on the
/// keys the upstream saw since the last reset (bounded).
async fn until_keys(
    gws: &[Gateway],
    fake: &FakeUpstream,
    what: &str,
    cond: impl Fn(&std::collections::HashSet<String>) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for gw in gws {
            let (status, body) =
                post_json(&format!("{}{GENERATE}", gw.url), &generate_body(), &[]).await;
            assert_eq!(status, 200, "{body}");
        }
        if cond(&used_keys(&fake.requests().await)) {
            return;
        }
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_rt::test]
async fn keys_added_and_removed_in_the_file_reach_every_replica() {
    let redis = Redis::start();
    let ks = keys(3);
    let fake = FakeUpstream::start(&ks);
    let files = Files::new();
    files.write("keys", &format!("{}\n{}\n", ks[0], ks[1]));
    files.write("tokens", &format!("{TOKEN}\n{TOKEN_B}\n"));
    let gws: Vec<Gateway> = (0..2).map(|_| start(&fake, &redis, &files, "1")).collect();

    // A session bound to key 1, and a file owned by key 1.
    let bind = |sid: &'static str| {
        let url = format!("{}{GENERATE}", gws[0].url);
        async move { post_json(&url, &generate_body(), &[("x-session-id", sid)]).await }
    };
    let mut session = None;
    for sid in ["s-a", "s-b", "s-c", "s-d"] {
        bind(sid).await;
        if fake.requests().await.last().unwrap()["key"] == ks[1].as_str() {
            session = Some(sid);
            break;
        }
    }
    let session = session.expect("a session on key 1");
    let upload = format!("{}/upload/v1beta/files", gws[0].url);
    let file = upload_file(&upload, None, &[("x-session-id", session)], b"on key 1").await;
    assert_eq!(fake.owner_key(&file).await, ks[1]);

    // Appended: both replicas use the new key.
    files.write("keys", &format!("{}\n{}\n{}\n", ks[0], ks[1], ks[2]));
    fake.post("/_fake/reset", json!({})).await;
    until_keys(&gws, &fake, "the added key is used", |used| {
        used.contains(&ks[2])
    })
    .await;
    for gw in &gws {
        gw.wait_for_log("keys reloaded").await;
        assert!(
            gw.log_text().contains(&key_id(&ks[2])),
            "the added key's id is logged"
        );
    }

    let removed_series = format!("gb_key_state{{key_id=\"{}\"", key_id(&ks[1]));
    assert!(metrics_text(&gws[0].url).await.contains(&removed_series));

    // Removed: after one interval neither replica uses it.
    files.write("keys", &format!("{}\n{}\n", ks[0], ks[2]));
    for gw in &gws {
        let deadline = Instant::now() + Duration::from_secs(30);
        while gw.log_text().matches("keys reloaded").count() < 2 {
            assert!(Instant::now() < deadline, "never reloaded");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    fake.post("/_fake/reset", json!({})).await;
    for _ in 0..6 {
        for gw in &gws {
            assert_eq!(
                post_json(&format!("{}{GENERATE}", gw.url), &generate_body(), &[])
                    .await
                    .0,
                200
            );
        }
    }
    assert!(
        !used_keys(&fake.requests().await).contains(&ks[1]),
        "the removed key is never used"
    );
    // Nor is it in the key gauges any more (the answer counters by key keep
    // what it did).
    let metrics = metrics_text(&gws[0].url).await;
    let stale: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("gb_key_") && l.contains(&key_id(&ks[1])))
        .collect();
    assert!(stale.is_empty(), "{stale:?}");
    assert!(metrics.contains(&format!("gb_key_state{{key_id=\"{}\"", key_id(&ks[0]))));

    // Its session moves to another key; its file gets a clear error with no
    // upstream call.
    fake.post("/_fake/reset", json!({})).await;
    assert_eq!(bind(session).await.0, 200);
    let moved = fake.requests().await.last().unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(moved, ks[1]);
    gws[0].wait_for_log("session re-bound").await;
    fake.post("/_fake/reset", json!({})).await;
    let (status, body) = post_json(
        &format!("{}{GENERATE}", gws[1].url),
        &file_body(&[&file]),
        &[],
    )
    .await;
    assert_eq!(status, 410, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&file) && message.contains("no longer configured"),
        "{message}"
    );
    assert!(
        fake.requests().await.is_empty(),
        "never sent on another key"
    );
    for gw in &gws {
        gw.assert_no_secrets_logged(&ks);
    }
}

#[actix_rt::test]
async fn a_revoked_token_is_refused_on_every_replica_and_a_returning_one_sees_its_files() {
    let redis = Redis::start();
    let fake = FakeUpstream::start(&keys(2));
    let files = Files::new();
    files.write("keys", &keys(2).join("\n"));
    files.write("tokens", &format!("team-a={TOKEN}\n{TOKEN_B}\n"));
    let gws: Vec<Gateway> = (0..2).map(|_| start(&fake, &redis, &files, "1")).collect();
    let name = upload_file(
        &format!("{}/upload/v1beta/files", gws[0].url),
        None,
        &[],
        b"mine",
    )
    .await;

    files.write("tokens", &format!("{TOKEN_B}\n"));
    for gw in &gws {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, _) =
                post_json(&format!("{}{GENERATE}", gw.url), &generate_body(), &[]).await;
            if status == 403 {
                break;
            }
            assert_eq!(status, 200);
            assert!(Instant::now() < deadline, "the revoked token still works");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The token comes back: its files are still its own.
    files.write("tokens", &format!("{TOKEN}\n{TOKEN_B}\n"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let resp = client()
            .get(format!("{}/v1beta/{name}", gws[1].url))
            .insert_header(("x-goog-api-key", TOKEN))
            .send()
            .await
            .unwrap();
        if resp.status().as_u16() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the returning token never saw its file"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_rt::test]
async fn a_bad_file_keeps_the_last_good_set_and_is_reported_once() {
    let redis = Redis::start();
    let ks = keys(2);
    let fake = FakeUpstream::start(&ks);
    let files = Files::new();
    files.write("keys", &format!("{}\n{}\n", ks[0], ks[1]));
    files.write("tokens", &format!("{TOKEN}\n"));
    let gw = start(&fake, &redis, &files, "1");
    let scrape = || async {
        let body = client()
            .get(format!("{}/metrics", gw.url))
            .send()
            .await
            .unwrap()
            .body()
            .await
            .unwrap();
        String::from_utf8_lossy(&body).to_string()
    };
    for (case, write) in [
        ("empty", Some("# nothing here\n")),
        ("bad line", Some("AIza-fine\nthis is not a key\n")),
        ("deleted", None),
    ] {
        match write {
            Some(text) => files.write("keys", text),
            None => std::fs::remove_file(files.path("keys")).unwrap(),
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while gw.log_text().matches("reload refused").count()
            < 1 + ["empty", "bad line", "deleted"]
                .iter()
                .position(|c| *c == case)
                .unwrap()
        {
            assert!(
                Instant::now() < deadline,
                "{case}: never reported: {}",
                gw.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Several more polls pass: still one line for this problem.
        let polls = Instant::now();
        while polls.elapsed() < Duration::from_millis(2500) {
            assert_eq!(
                post_json(&format!("{}{GENERATE}", gw.url), &generate_body(), &[])
                    .await
                    .0,
                200,
                "{case}: the old keys serve"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let reported = gw.log_text().matches("reload refused").count();
        assert_eq!(
            reported,
            1 + ["empty", "bad line", "deleted"]
                .iter()
                .position(|c| *c == case)
                .unwrap(),
            "{case}: logged once"
        );
    }
    assert!(scrape().await.contains("gb_config_reload_errors_total 3"));
    assert!(
        !gw.log_text().contains("this is not a key"),
        "never the file's contents"
    );
    assert_eq!(
        used_keys(&fake.requests().await),
        ks.iter().cloned().collect(),
        "only the good keys"
    );
    // A good file again is taken.
    files.write("keys", &format!("{}\n", ks[0]));
    gw.wait_for_log("keys reloaded").await;
    assert!(scrape().await.contains("gb_config_reloads_total 1"));
}

#[actix_rt::test]
async fn sighup_reloads_at_once_and_requests_in_flight_finish_on_their_key() {
    let redis = Redis::start();
    let ks = keys(2);
    let fake = FakeUpstream::start(&ks);
    let files = Files::new();
    files.write("keys", &format!("{}\n", ks[0]));
    files.write("tokens", &format!("{TOKEN}\n"));
    // Polling is an hour apart: only SIGHUP can make the change visible.
    let gw = start(&fake, &redis, &files, "3600");
    let mut held = client()
        .post(format!(
            "{}/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
            gw.url
        ))
        .insert_header(("x-goog-api-key", TOKEN))
        .insert_header(("x-fake-hold", "reload-race"))
        .send_json(&generate_body())
        .await
        .unwrap();
    let first = held.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("chunk 0"));

    // Swap key 0 for key 1 while the stream is held and a burst runs.
    files.write("keys", &format!("{}\n", ks[1]));
    let url = format!("{}{GENERATE}", gw.url);
    let burst = futures_util::future::join_all((0..40).map(|_| {
        let url = url.clone();
        async move { post_json(&url, &generate_body(), &[]).await }
    }));
    let pid = gw.proc.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    for (status, body) in burst.await {
        assert_eq!(status, 200, "nothing dropped during the reload: {body}");
    }
    gw.wait_for_log("SIGHUP").await;
    gw.wait_for_log("keys reloaded").await;
    fake.post("/_fake/release/reload-race", json!({})).await;
    let mut rest = Vec::new();
    while let Some(chunk) = held.next().await {
        rest.extend_from_slice(&chunk.expect("the held stream finishes"));
    }
    assert!(String::from_utf8_lossy(&rest).contains("chunk 2"));
    let stream = fake
        .requests()
        .await
        .into_iter()
        .find(|r| r["path"].as_str().unwrap().contains("stream"))
        .unwrap();
    assert_eq!(
        stream["key"],
        ks[0].as_str(),
        "the stream kept the key it started with"
    );
    fake.post("/_fake/reset", json!({})).await;
    for _ in 0..4 {
        assert_eq!(post_json(&url, &generate_body(), &[]).await.0, 200);
    }
    assert_eq!(
        used_keys(&fake.requests().await),
        [ks[1].clone()].into_iter().collect()
    );
}

#[test]
fn a_variable_and_its_file_together_stop_the_start() {
    let (code, out) = run_gateway_expecting_exit(&[
        ("GB_API_KEYS", "k1"),
        ("GB_API_KEYS_FILE", "/nonexistent"),
        ("GB_AUTH_TOKENS", "t"),
    ]);
    assert_ne!(code, 0);
    assert!(out.contains("GB_API_KEYS and GB_API_KEYS_FILE"), "{out}");
    let (code, out) = run_gateway_expecting_exit(&[
        ("GB_API_KEYS", "k1"),
        ("GB_AUTH_TOKENS", "t"),
        ("GB_ADMIN_TOKEN", "a"),
        ("GB_ADMIN_TOKEN_FILE", "/nonexistent"),
    ]);
    assert_ne!(code, 0);
    assert!(
        out.contains("GB_ADMIN_TOKEN and GB_ADMIN_TOKEN_FILE"),
        "{out}"
    );
}

#[actix_rt::test]
async fn the_admin_api_shows_which_replicas_serve_with_the_same_sets() {
    let redis = Redis::start();
    let ks = keys(3);
    let fake = FakeUpstream::start(&ks);
    let (a, b) = (Files::new(), Files::new());
    a.write("keys", &format!("{}\n{}\n", ks[0], ks[1]));
    b.write("keys", &format!("{}\n{}\n", ks[0], ks[1]));
    for f in [&a, &b] {
        f.write("tokens", &format!("{TOKEN}\n"));
    }
    let admin = "reload-admin-token";
    let with_admin = |files: &Files| {
        Gateway::start_env(&[
            ("GB_API_KEYS_FILE".to_string(), files.path("keys")),
            ("GB_AUTH_TOKENS_FILE".to_string(), files.path("tokens")),
            ("GB_ADMIN_TOKEN".to_string(), admin.to_string()),
            ("GB_UPSTREAM_URL".to_string(), fake.url.clone()),
            ("GB_REDIS_URL".to_string(), redis.url()),
            ("GB_RELOAD_INTERVAL".to_string(), "1".to_string()),
        ])
    };
    let (ga, gb) = (with_admin(&a), with_admin(&b));
    let replicas = || async {
        let v: Value = client()
            .get(format!("{}/admin/api/replicas", ga.url))
            .insert_header(("authorization", format!("Bearer {admin}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = replicas().await;
        let rows = v["replicas"].as_array().unwrap();
        if rows.len() == 2 && rows.iter().all(|r| r["differs"] == false) {
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Replica B's mounted file changes and A's does not: B is flagged.
    b.write("keys", &format!("{}\n{}\n", ks[0], ks[2]));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = replicas().await;
        let flagged: Vec<&Value> = v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["differs"] == true)
            .collect();
        if flagged.len() == 1 {
            assert_ne!(
                flagged[0]["keys_digest"], v["this_replica"]["keys_digest"],
                "{v}"
            );
            assert!(!v.to_string().contains(&ks[2]), "ids, never keys");
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(gb);
}
