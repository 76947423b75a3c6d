//! What the settings in the README's table do, observed on a running
//! gateway: TTLs in Redis, the key prefix, a configuration file under the
//! environment, keys files with comments, the Redis timeout and circuit
//! breaker against a Redis that stops answering, proxies turned off.

use std::time::{Duration, Instant};

use crate::helpers::*;

const GENERATE: &str = "/v1beta/models/gemini-2.0-flash:generateContent";

/// The remaining TTL of a Redis key in seconds (`-2` when it is gone).
fn ttl(redis: &Redis, key: &str) -> i64 {
    let raw = redis.cmd(&["TTL", key]);
    raw.trim()
        .trim_start_matches(':')
        .parse()
        .unwrap_or_else(|_| panic!("TTL {key}: {raw:?}"))
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_rt::test]
async fn ttls_and_the_prefix_shape_what_redis_holds_and_sessions_slide() {
    let redis = Redis::start();
    let fake = FakeUpstream::start(&keys(2));
    let gw = Gateway::start(
        &fake,
        Some(&redis),
        &[
            ("GB_REDIS_PREFIX", "teamx"),
            ("GB_SESSION_TTL", "4"),
            ("GB_FILE_TTL", "700"),
            ("GB_UPLOAD_TTL", "900"),
        ],
    );
    let url = format!("{}{GENERATE}", gw.url);
    for sid in ["kept", "dropped"] {
        assert_eq!(
            post_json(&url, &generate_body(), &[("x-session-id", sid)])
                .await
                .0,
            200
        );
    }
    assert!((1..=4).contains(&ttl(&redis, "teamx:session:kept")));
    let name = upload_file(
        &format!("{}/upload/v1beta/files", gw.url),
        None,
        &[("x-session-id", "kept")],
        b"f",
    )
    .await;
    let file_ttl = ttl(&redis, &format!("teamx:file:{name}"));
    assert!((600..=700).contains(&file_ttl), "{file_ttl}");
    let uploads = redis.cmd(&["KEYS", "teamx:upload:*"]);
    let upload_key = uploads
        .lines()
        .find(|l| l.starts_with("teamx:upload:"))
        .unwrap()
        .to_string();
    assert!((800..=900).contains(&ttl(&redis, &upload_key)));
    assert!(
        !redis.cmd(&["KEYS", "gb:*"]).contains("gb:"),
        "nothing outside the prefix"
    );

    // A binding used before it expires lives on; an unused one expires.
    wait_until("the kept session's TTL runs down", || {
        ttl(&redis, "teamx:session:kept") <= 2
    })
    .await;
    assert_eq!(
        post_json(&url, &generate_body(), &[("x-session-id", "kept")])
            .await
            .0,
        200
    );
    assert!(
        ttl(&redis, "teamx:session:kept") >= 3,
        "the use slid its expiry"
    );
    wait_until("the unused session expires", || {
        ttl(&redis, "teamx:session:dropped") == -2
    })
    .await;
    assert!(
        ttl(&redis, "teamx:session:kept") > 0,
        "the used one is still bound"
    );
}

#[actix_rt::test]
async fn a_config_file_is_layered_under_the_environment() {
    let redis = Redis::start();
    let fake = FakeUpstream::start(&keys(2));
    let dir = tempdir();
    let file = format!("{dir}/gateway.toml");
    std::fs::write(
        &file,
        "session_ttl = 111\nupload_ttl = 222\nredis_prefix = \"fromfile\"\n",
    )
    .unwrap();
    let gw = Gateway::start(
        &fake,
        Some(&redis),
        &[("GB_CONFIG", &file), ("GB_UPLOAD_TTL", "333")],
    );
    post_json(
        &format!("{}{GENERATE}", gw.url),
        &generate_body(),
        &[("x-session-id", "layered")],
    )
    .await;
    assert!(
        (100..=111).contains(&ttl(&redis, "fromfile:session:layered")),
        "the file's session TTL"
    );
    upload_file(&format!("{}/upload/v1beta/files", gw.url), None, &[], b"f").await;
    let uploads = redis.cmd(&["KEYS", "fromfile:upload:*"]);
    let upload_key = uploads
        .lines()
        .find(|l| l.starts_with("fromfile:upload:"))
        .unwrap()
        .to_string();
    assert!(
        (300..=333).contains(&ttl(&redis, &upload_key)),
        "the environment wins over the file"
    );
}

fn tempdir() -> String {
    let dir = std::env::temp_dir().join(format!("gb-settings-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.to_string_lossy().into_owned()
}

#[actix_rt::test]
async fn a_keys_file_with_comments_is_read_by_the_binary() {
    let ks = keys(2);
    let fake = FakeUpstream::start(&ks);
    let dir = tempdir();
    let file = format!("{dir}/keys");
    std::fs::write(
        &file,
        format!(
            "# the team's keys\n{}  # first project\n\n{}\n# {}\n",
            ks[0], ks[1], "retired-key-not-used"
        ),
    )
    .unwrap();
    let env = vec![
        ("GB_API_KEYS_FILE".to_string(), file),
        ("GB_AUTH_TOKENS".to_string(), TOKEN.to_string()),
        ("GB_UPSTREAM_URL".to_string(), fake.url.clone()),
    ];
    let gw = Gateway::start_env(&env);
    for _ in 0..4 {
        assert_eq!(
            post_json(&format!("{}{GENERATE}", gw.url), &generate_body(), &[])
                .await
                .0,
            200
        );
    }
    let used: std::collections::HashSet<String> = fake
        .requests()
        .await
        .iter()
        .map(|r| r["key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        used,
        ks.iter().cloned().collect(),
        "exactly the two keys, without comments"
    );
}

#[actix_rt::test]
async fn a_redis_that_stops_answering_costs_a_timeout_then_the_breaker_fails_fast() {
    let redis = Redis::start();
    let fake = FakeUpstream::start(&keys(2));
    let gw = Gateway::start(
        &fake,
        Some(&redis),
        &[("GB_REDIS_TIMEOUT_MS", "300"), ("GB_REDIS_POOL_SIZE", "2")],
    );
    let url = format!("{}{GENERATE}", gw.url);
    assert_eq!(
        post_json(&url, &generate_body(), &[("x-session-id", "frozen")])
            .await
            .0,
        200
    );
    // The server accepts connections but never answers.
    redis.signal("-STOP");
    for _ in 0..4 {
        let started = Instant::now();
        let (status, v) = post_json(&url, &generate_body(), &[("x-session-id", "frozen")]).await;
        assert_eq!(status, 503, "{v}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "hung for {:?}",
            started.elapsed()
        );
        assert_eq!(
            post_json(&url, &generate_body(), &[]).await.0,
            200,
            "unpinned traffic flows"
        );
    }
    gw.wait_for_log("did not answer in time").await;
    gw.wait_for_log("circuit open").await;
    redis.signal("-CONT");
    // After the breaker's window, the first call probes Redis again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = post_json(&url, &generate_body(), &[("x-session-id", "frozen")]).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[actix_rt::test]
async fn proxy_mode_none_ignores_the_proxy_list() {
    let ks = keys(2);
    let fake = FakeUpstream::start(&ks);
    let unused = free_port();
    let gw = Gateway::start(
        &fake,
        None,
        &[
            ("GB_PROXIES", &format!("http://127.0.0.1:{unused}")),
            ("GB_PROXY_MODE", "none"),
        ],
    );
    // The listed proxy does not exist: with proxies in use, every call would fail.
    for _ in 0..3 {
        assert_eq!(
            post_json(&format!("{}{GENERATE}", gw.url), &generate_body(), &[])
                .await
                .0,
            200
        );
    }
    assert!(fake
        .requests()
        .await
        .iter()
        .all(|r| r["peer"] == "127.0.0.1"));
}

/// A misspelt variable leaves its setting at the default; the gateway says
/// so at start, one line per variable, with the name it most likely meant,
/// and never the value (it may be a password).
#[actix_rt::test]
async fn a_misspelt_variable_is_named_with_a_suggestion_and_its_value_never_logged() {
    let fake = FakeUpstream::start(&keys(1));
    let typo = [
        ("GB_REDIS_ULR", "redis://:typo-s3cret-9f2e@127.0.0.1:1"),
        ("GB_NOTHING_LIKE_ANY_SETTING", "far-s3cret-71c0"),
        ("GB_BIN_DIR", "/opt/tools"),
    ];
    let gw = Gateway::start(&fake, None, &typo);
    let log = gw.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("GB_REDIS_ULR"))
        .unwrap_or_else(|| panic!("no line names GB_REDIS_ULR:\n{log}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("did you mean GB_REDIS_URL?"), "{line}");
    let far: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("GB_NOTHING_LIKE_ANY_SETTING"))
        .collect();
    assert_eq!(far.len(), 1, "{log}");
    assert!(!far[0].contains("did you mean"), "{}", far[0]);
    assert!(
        !log.contains("GB_BIN_DIR"),
        "a tools variable was reported:\n{log}"
    );
    assert!(!log.contains("s3cret"), "a value was logged:\n{log}");
    assert!(log.contains("embedded in-memory store"), "{log}");
    drop(gw);

    // The same as fields of a JSON line.
    let gw = Gateway::start(&fake, None, &[typo[0], ("GB_LOG_FORMAT", "json")]);
    let log = gw.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("GB_REDIS_ULR"))
        .unwrap_or_else(|| panic!("no line names GB_REDIS_ULR:\n{log}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["level"], "WARN", "{v}");
    assert_eq!(v["variable"], "GB_REDIS_ULR", "{v}");
    assert_eq!(v["did_you_mean"], "GB_REDIS_URL", "{v}");
    assert!(!log.contains("s3cret"), "a value was logged:\n{log}");
}

/// When the misspelling leaves a required variable unset, the error line
/// comes with the name that was given instead.
#[test]
fn a_configuration_error_names_the_misspelt_variable_too() {
    let (code, err) = run_gateway_expecting_exit(&[
        ("GB_API_KEY", "AIzaTypoKey-s3cret-5b1d"),
        ("GB_AUTH_TOKENS", "t"),
    ]);
    assert_eq!(code, 2, "{err}");
    let lines: Vec<&str> = err.trim().lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(lines[0].contains("GB_API_KEYS: at least one"), "{err}");
    assert!(
        lines[1].contains("GB_API_KEY is not") && lines[1].contains("did you mean GB_API_KEYS?"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "a value was printed: {err}");
}
