//! Key health per model, and key states that never go backwards: per-model
//! quotas, admin disables that the re-check leaves alone, pinned requests to
//! cooling or disabled keys.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::*;

const ADMIN: &str = "admin-token-for-key-health";
const PRO: &str = "/v1beta/models/gemini-2.5-pro:generateContent";
const FLASH: &str = "/v1beta/models/gemini-2.5-flash:generateContent";

async fn admin(gw: &Gateway, method: &str, path: &str) -> (u16, Value) {
    let url = format!("{}{path}", gw.url);
    let req = if method == "POST" {
        client().post(url)
    } else {
        client().get(url)
    };
    let mut resp = req
        .insert_header(("authorization", format!("Bearer {ADMIN}")))
        .send()
        .await
        .unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    )
}

async fn key_row(gw: &Gateway, key: &str) -> Value {
    let (status, v) = admin(gw, "GET", "/admin/api/keys").await;
    assert_eq!(status, 200, "{v}");
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == key_id(key))
        .cloned()
        .unwrap()
}

fn calls_with(seen: &[Value], key: &str, path: &str) -> usize {
    seen.iter()
        .filter(|r| r["key"] == key && r["path"].as_str().unwrap_or("").starts_with(path))
        .count()
}

#[actix_rt::test]
async fn a_key_whose_pro_day_quota_is_spent_still_serves_its_share_of_flash() {
    let redis = Redis::start();
    let ks = keys(5);
    let fake = FakeUpstream::start(&ks);
    let extra = [("GB_ADMIN_TOKEN", ADMIN)];
    let gws: Vec<Gateway> = (0..2)
        .map(|_| Gateway::start(&fake, Some(&redis), &extra))
        .collect();
    fake.set_mode(
        &ks[0],
        json!({"mode": "quota", "model": "gemini-2.5-pro",
               "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier", "retryDelay": "20s"}),
    )
    .await;
    // Pro calls until key 0 has met its 429 (each is retried elsewhere).
    for _ in 0..5 {
        let (status, body) =
            post_json(&format!("{}{PRO}", gws[0].url), &generate_body(), &[]).await;
        assert_eq!(status, 200, "{body}");
    }
    let field = format!("{}|gemini-2.5-pro", key_id(&ks[0]));
    let raw = redis.cmd(&["HGET", "gb:{ring:keys}:s", &field]);
    assert!(raw.contains("c:") && raw.contains("per_day"), "{raw:?}");
    assert!(
        redis
            .cmd(&["HEXISTS", "gb:{ring:keys}:s", &key_id(&ks[0])])
            .contains('0'),
        "the key as a whole is not cooling"
    );

    fake.post("/_fake/reset", json!({})).await;
    for i in 0..50 {
        let gw = &gws[i % 2];
        assert_eq!(
            post_json(&format!("{}{FLASH}", gw.url), &generate_body(), &[])
                .await
                .0,
            200
        );
    }
    for i in 0..20 {
        let gw = &gws[i % 2];
        assert_eq!(
            post_json(&format!("{}{PRO}", gw.url), &generate_body(), &[])
                .await
                .0,
            200
        );
    }
    let seen = fake.requests().await;
    let flash = calls_with(&seen, &ks[0], FLASH);
    assert!(
        (9..=11).contains(&flash),
        "key 0 served {flash} of 50 flash calls"
    );
    assert_eq!(
        calls_with(&seen, &ks[0], PRO),
        0,
        "key 0 is skipped for pro"
    );

    let metrics = client()
        .get(format!("{}/metrics", gws[1].url))
        .send()
        .await
        .unwrap()
        .body()
        .await
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics);
    let line = format!(
        "gb_key_model_cooling_seconds{{key_id=\"{}\",model=\"gemini-2.5-pro\"}}",
        key_id(&ks[0])
    );
    assert!(metrics.contains(&line), "{metrics}");
    let row = key_row(&gws[1], &ks[0]).await;
    assert_eq!(row["state"], "healthy", "{row}");
    assert_eq!(
        row["model_cooldowns"][0]["model"], "gemini-2.5-pro",
        "{row}"
    );
    assert_eq!(row["model_cooldowns"][0]["kind"], "per_day", "{row}");
}

#[actix_rt::test]
async fn an_admin_disabled_key_survives_the_recheck_and_is_never_used() {
    let redis = Redis::start();
    let ks = keys(3);
    // The fake does not know key 2: it is disabled by its first 400 and the
    // re-check then probes it every interval, which shows the re-check runs.
    let fake = FakeUpstream::start(&ks[..2]);
    let extra = [("GB_ADMIN_TOKEN", ADMIN), ("GB_RECHECK_INTERVAL", "1")];
    let gw = Gateway::start_for(&fake.url, &ks, Some(&redis), &extra);
    let (status, _) = admin(
        &gw,
        "POST",
        &format!("/admin/api/keys/{}/disable", key_id(&ks[0])),
    )
    .await;
    assert_eq!(status, 200);
    fake.post("/_fake/reset", json!({})).await;
    for _ in 0..6 {
        assert_eq!(
            post_json(&format!("{}{FLASH}", gw.url), &generate_body(), &[])
                .await
                .0,
            200
        );
    }
    assert_eq!(key_row(&gw, &ks[2]).await["state"], "disabled");
    let deadline = Instant::now() + Duration::from_secs(60);
    while calls_with(&fake.requests().await, &ks[2], "/v1beta/models") < 3 + 1 {
        assert!(
            Instant::now() < deadline,
            "the re-check never ran three times"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for _ in 0..6 {
        assert_eq!(
            post_json(&format!("{}{FLASH}", gw.url), &generate_body(), &[])
                .await
                .0,
            200
        );
    }
    let seen = fake.requests().await;
    assert_eq!(
        calls_with(&seen, &ks[0], "/"),
        0,
        "neither rotation nor re-check used it"
    );
    let row = key_row(&gw, &ks[0]).await;
    assert_eq!(
        (row["state"].as_str(), row["disabled_reason"].as_str()),
        (Some("disabled"), Some("admin")),
        "{row}"
    );

    // Only an admin enable brings it back.
    assert_eq!(
        admin(
            &gw,
            "POST",
            &format!("/admin/api/keys/{}/enable", key_id(&ks[0]))
        )
        .await
        .0,
        200
    );
    for _ in 0..4 {
        assert_eq!(
            post_json(&format!("{}{FLASH}", gw.url), &generate_body(), &[])
                .await
                .0,
            200
        );
    }
    assert!(calls_with(&fake.requests().await, &ks[0], FLASH) > 0);
}

#[actix_rt::test]
async fn a_session_pinned_to_a_cooling_key_waits_briefly_or_gets_429_without_an_upstream_call() {
    let redis = Redis::start();
    let ks = keys(3);
    let fake = FakeUpstream::start(&ks);
    let gw = Gateway::start(&fake, Some(&redis), &[("GB_PIN_WAIT", "5")]);
    let (gw, fake) = (&gw, &fake);
    let bound = |sid: &'static str| async move {
        let (status, _) = post_json(
            &format!("{}{FLASH}", gw.url),
            &generate_body(),
            &[("x-session-id", sid)],
        )
        .await;
        assert_eq!(status, 200);
        let seen = fake.requests().await;
        seen.last().unwrap()["key"].as_str().unwrap().to_string()
    };

    // A long cooldown: 429 at once, with RetryInfo, naming key and model.
    let long_key = bound("sess-long").await;
    fake.set_mode(
        &long_key,
        json!({"mode": "quota", "model": "gemini-2.5-flash", "retryDelay": "120s"}),
    )
    .await;
    let (status, _) = post_json(
        &format!("{}{FLASH}", gw.url),
        &generate_body(),
        &[("x-session-id", "sess-long")],
    )
    .await;
    assert_eq!(
        status, 429,
        "the pinned request meets the upstream's 429 and is not moved"
    );
    let before = fake.requests().await.len();
    let mut resp = client()
        .post(format!("{}{FLASH}", gw.url))
        .insert_header(("x-goog-api-key", TOKEN))
        .insert_header(("x-session-id", "sess-long"))
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
    assert!((100..=120).contains(&retry_after), "{retry_after}");
    let body: Value = resp.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&key_id(&long_key)) && message.contains("gemini-2.5-flash"),
        "{message}"
    );
    assert_eq!(
        body["error"]["details"][0]["@type"],
        "type.googleapis.com/google.rpc.RetryInfo"
    );
    assert_eq!(fake.requests().await.len(), before, "no upstream call");
    // Another model is not pinned to that cooldown.
    let (status, _) = post_json(
        &format!("{}{PRO}", gw.url),
        &generate_body(),
        &[("x-session-id", "sess-long")],
    )
    .await;
    assert_eq!(status, 200);

    // A short cooldown: the request waits it out, then is sent.
    let mut sid_short = None;
    for sid in ["sess-a", "sess-b", "sess-c", "sess-d", "sess-e", "sess-f"] {
        if bound(sid).await != long_key {
            sid_short = Some(sid);
            break;
        }
    }
    let sid = sid_short.expect("a session bound to another key");
    let short_key = bound(sid).await;
    fake.set_mode(
        &short_key,
        json!({"mode": "quota", "model": "gemini-2.5-flash", "retryDelay": "2s"}),
    )
    .await;
    assert_eq!(
        post_json(
            &format!("{}{FLASH}", gw.url),
            &generate_body(),
            &[("x-session-id", sid)]
        )
        .await
        .0,
        429
    );
    let field = format!("{}|gemini-2.5-flash", key_id(&short_key));
    let raw = redis.cmd(&["HGET", "gb:{ring:keys}:s", &field]);
    let until: u64 = raw
        .lines()
        .find_map(|l| l.strip_prefix("c:"))
        .and_then(|r| r.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{raw:?}"));
    fake.set_mode(&short_key, json!({"mode": "normal"})).await;
    let (status, body) = post_json(
        &format!("{}{FLASH}", gw.url),
        &generate_body(),
        &[("x-session-id", sid)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let last = fake.requests().await.last().cloned().unwrap();
    assert_eq!(last["key"], short_key.as_str());
    assert!(
        last["at_ms"].as_u64().unwrap() >= until,
        "sent only after the cooldown ended"
    );
}

#[actix_rt::test]
async fn a_file_owned_by_a_disabled_key_is_not_sent_and_the_key_stays_disabled() {
    let redis = Redis::start();
    let ks = keys(3);
    let fake = FakeUpstream::start(&ks);
    let gw = Gateway::start(&fake, Some(&redis), &[("GB_ADMIN_TOKEN", ADMIN)]);
    let name = upload_file(
        &format!("{}/upload/v1beta/files", gw.url),
        None,
        &[],
        b"hello",
    )
    .await;
    let owner = fake.owner_key(&name).await;
    assert_eq!(
        admin(
            &gw,
            "POST",
            &format!("/admin/api/keys/{}/disable", key_id(&owner))
        )
        .await
        .0,
        200
    );
    fake.set_mode(&owner, json!({"mode": "quota", "retryDelay": "30s"}))
        .await;
    fake.post("/_fake/reset", json!({})).await;
    let (status, body) = post_json(&format!("{}{FLASH}", gw.url), &file_body(&[&name]), &[]).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&key_id(&owner)),
        "{body}"
    );
    assert_eq!(
        calls_with(&fake.requests().await, &owner, "/"),
        0,
        "never sent on a disabled key"
    );
    let row = key_row(&gw, &owner).await;
    assert_eq!(
        (row["state"].as_str(), row["disabled_reason"].as_str()),
        (Some("disabled"), Some("admin"))
    );
}

#[actix_rt::test]
async fn an_implicit_upload_binding_shows_in_the_admin_session_lookup() {
    let ks = keys(3);
    let fake = FakeUpstream::start(&ks);
    let gw = Gateway::start(&fake, None, &[("GB_ADMIN_TOKEN", ADMIN)]);
    let name = upload_file(&format!("{}/upload/v1beta/files", gw.url), None, &[], b"x").await;
    let owner = fake.owner_key(&name).await;
    let (status, v) = admin(
        &gw,
        "GET",
        &format!("/admin/api/sessions/@token:{}", key_id(TOKEN)),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["key_id"], key_id(&owner).as_str());
    assert!(!v.to_string().contains(TOKEN));
}

#[actix_rt::test]
async fn answers_to_file_calls_reach_key_health_like_any_other() {
    let redis = Redis::start();
    let ks = keys(2);
    let fake = FakeUpstream::start(&ks);
    let gw = Gateway::start(&fake, Some(&redis), &[("GB_ADMIN_TOKEN", ADMIN)]);
    let name = upload_file(&format!("{}/upload/v1beta/files", gw.url), None, &[], b"x").await;
    let owner = fake.owner_key(&name).await;
    fake.set_mode(&owner, json!({"mode": "invalid"})).await;
    let resp = client()
        .get(format!("{}/v1beta/{name}", gw.url))
        .insert_header(("x-goog-api-key", TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400, "Google's answer is passed on");
    let row = key_row(&gw, &owner).await;
    assert_eq!(
        (row["state"].as_str(), row["disabled_reason"].as_str()),
        (Some("disabled"), Some("api_key_invalid")),
        "{row}"
    );
}
