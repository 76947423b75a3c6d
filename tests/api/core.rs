//! Rotation across replicas, what is and is not forwarded, streaming, auth,
//! bad input.

use futures_util::StreamExt;
use serde_json::json;

use crate::helpers::*;

const GENERATE: &str = "/v1beta/models/gemini-2.0-flash:generateContent";

async fn spread(gateways: &[Gateway], calls: usize) {
    let body = generate_body();
    let mut pending = Vec::new();
    for i in 0..calls {
        let url = format!("{}{GENERATE}", gateways[i % gateways.len()].url);
        let body = body.clone();
        pending.push(async move { post_json(&url, &body, &[]).await });
        if pending.len() == 10 {
            for (status, v) in futures_util::future::join_all(pending.drain(..)).await {
                assert_eq!(status, 200, "{v}");
            }
        }
    }
    for (status, v) in futures_util::future::join_all(pending).await {
        assert_eq!(status, 200, "{v}");
    }
}

async fn three_replicas_on_one_redis_share_one_rotation(mode: Mode) {
    let redis = Deployment::start(mode);
    let fake = FakeUpstream::start(&keys(5));
    let gws: Vec<Gateway> = (0..3)
        .map(|_| Gateway::start(&fake, Some(&redis), &[]))
        .collect();
    spread(&gws, 300).await;
    let served = fake.served().await;
    assert_eq!(served.len(), 5, "every key served: {served:?}");
    for (key, n) in &served {
        assert!((59..=61).contains(n), "key {key} served {n}, want 60 ± 1");
    }
}

in_every_redis_mode!(three_replicas_on_one_redis_share_one_rotation);

#[actix_rt::test]
async fn embedded_store_rotates_evenly_in_one_process() {
    let fake = FakeUpstream::start(&keys(5));
    let gw = Gateway::start(&fake, None, &[]);
    spread(std::slice::from_ref(&gw), 100).await;
    let served = fake.served().await;
    assert_eq!(served.len(), 5);
    assert!(served.values().all(|n| (19..=21).contains(n)), "{served:?}");
}

#[actix_rt::test]
async fn client_credentials_and_session_ids_never_reach_the_upstream() {
    let fake = FakeUpstream::start(&keys(2));
    let gw = Gateway::start(&fake, None, &[]);
    let body = generate_body();
    let c = client();
    for req in [
        c.post(format!("{}{GENERATE}", gw.url))
            .insert_header(("x-goog-api-key", TOKEN)),
        c.post(format!(
            "{}{GENERATE}?key={TOKEN}&session_id=q-sess",
            gw.url
        )),
        c.post(format!("{}{GENERATE}", gw.url))
            .insert_header(("authorization", format!("Bearer {TOKEN}")))
            .insert_header(("x-session-id", "h-sess")),
        c.post(format!("{}/session/p-sess{GENERATE}", gw.url))
            .insert_header(("x-goog-api-key", TOKEN)),
    ] {
        let resp = req
            .insert_header(("user-agent", "test-agent/1"))
            .send_json(&body)
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
    }
    let seen = fake.requests().await;
    assert_eq!(seen.len(), 4);
    for r in &seen {
        let text = r.to_string();
        assert!(
            !text.contains(TOKEN),
            "client token reached the upstream: {text}"
        );
        assert!(
            !text.contains("sess"),
            "session id reached the upstream: {text}"
        );
        assert!(!r["query"].as_str().unwrap().contains("key="), "{text}");
        assert!(r["headers"].get("authorization").is_none(), "{text}");
        assert!(r["headers"].get("x-session-id").is_none(), "{text}");
        assert_eq!(r["path"], GENERATE, "session prefix stripped");
        assert!(fake
            .keys
            .contains(&r["headers"]["x-goog-api-key"].as_str().unwrap().to_string()));
        assert_eq!(
            r["headers"]["user-agent"], "test-agent/1",
            "other headers pass"
        );
    }
    gw.assert_no_secrets_logged(&fake.keys);
}

#[actix_rt::test]
async fn a_streamed_event_reaches_the_client_while_the_upstream_holds_the_rest() {
    let fake = FakeUpstream::start(&keys(1));
    let gw = Gateway::start(&fake, None, &[]);
    let mut resp = client()
        .post(format!(
            "{}/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
            gw.url
        ))
        .insert_header(("x-goog-api-key", TOKEN))
        .insert_header(("x-fake-hold", "s1"))
        .send_json(&generate_body())
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "text/event-stream"
    );
    let mut first = Vec::new();
    while !String::from_utf8_lossy(&first).contains("\r\n\r\n") {
        let chunk = resp.next().await.expect("first event").unwrap();
        first.extend_from_slice(&chunk);
    }
    let first = String::from_utf8_lossy(&first).to_string();
    assert!(first.contains("chunk 0"), "{first}");
    assert!(
        !first.contains("chunk 1"),
        "the rest was not yet released: {first}"
    );
    fake.post("/_fake/release/s1", json!({})).await;
    let mut rest = Vec::new();
    while let Some(chunk) = resp.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.contains("chunk 1") && rest.contains("chunk 2"),
        "{rest}"
    );
}

#[actix_rt::test]
async fn missing_and_wrong_tokens_get_gemini_errors() {
    let fake = FakeUpstream::start(&keys(1));
    let gw = Gateway::start(&fake, None, &[]);
    let mut resp = client()
        .get(format!("{}/v1beta/models", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["status"], "UNAUTHENTICATED");
    let mut resp = client()
        .get(format!("{}/v1beta/models?key=wrong", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], 403);
    assert!(fake.requests().await.is_empty(), "nothing went upstream");
}

#[actix_rt::test]
async fn bad_input_gets_error_json_and_the_process_keeps_serving() {
    let fake = FakeUpstream::start(&keys(1));
    let gw = Gateway::start(&fake, None, &[("GB_MAX_BODY_BYTES", "4096")]);
    let c = client();
    let auth = ("x-goog-api-key", TOKEN);
    let cases = vec![
        (
            "malformed json",
            c.post(format!("{}{GENERATE}", gw.url))
                .insert_header(auth)
                .send_body("{\"contents\": [")
                .await,
            400,
        ),
        (
            "unknown route",
            c.get(format!("{}/nowhere/at/all", gw.url))
                .insert_header(auth)
                .send()
                .await,
            404,
        ),
        (
            "wrong method",
            c.get(format!("{}{GENERATE}", gw.url))
                .insert_header(auth)
                .send()
                .await,
            405,
        ),
        (
            "oversized header",
            c.get(format!("{}/v1beta/models", gw.url))
                .insert_header(auth)
                .insert_header(("x-big", "a".repeat(20_000)))
                .send()
                .await,
            431,
        ),
        (
            "body over limit",
            c.post(format!("{}{GENERATE}", gw.url))
                .insert_header(auth)
                .insert_header(("content-type", "application/json"))
                .send_body(format!("{{\"x\":\"{}\"}}", "a".repeat(10_000)))
                .await,
            413,
        ),
        (
            "deep nesting",
            c.post(format!("{}{GENERATE}", gw.url))
                .insert_header(auth)
                .send_body(format!("{}{}", "[".repeat(1000), "]".repeat(1000)))
                .await,
            400,
        ),
        (
            "path traversal",
            c.get(format!("{}/v1beta/models/../../etc/passwd", gw.url))
                .insert_header(auth)
                .send()
                .await,
            400,
        ),
    ];
    for (what, resp, want) in cases {
        let mut resp = resp.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(resp.status().as_u16(), want, "{what}");
        let v: serde_json::Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
        assert_eq!(v["error"]["code"], want, "{what}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}"
        );
    }
    let (status, _) = post_json(&format!("{}{GENERATE}", gw.url), &generate_body(), &[]).await;
    assert_eq!(status, 200, "still serving");
    let seen = fake.requests().await;
    assert_eq!(seen.len(), 1, "no bad request went upstream: {seen:?}");
}

#[actix_rt::test]
async fn native_routes_pass_through_on_every_version() {
    let fake = FakeUpstream::start(&keys(2));
    let gw = Gateway::start(&fake, None, &[]);
    for ver in ["v1", "v1beta", "v1alpha"] {
        let mut resp = client()
            .get(format!("{}/{ver}/models", gw.url))
            .insert_header(("x-goog-api-key", TOKEN))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{ver}");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert!(v["models"].as_array().is_some_and(|m| !m.is_empty()));
        for (action, body) in [
            ("countTokens", generate_body()),
            (
                "embedContent",
                json!({"content": {"parts": [{"text": "x"}]}}),
            ),
            (
                "batchEmbedContents",
                json!({"requests": [{"content": {"parts": [{"text": "x"}]}}, {"content": {"parts": [{"text": "y"}]}}]}),
            ),
        ] {
            let (status, v) = post_json(
                &format!("{}/{ver}/models/text-embedding-004:{action}", gw.url),
                &body,
                &[],
            )
            .await;
            assert_eq!(status, 200, "{ver} {action}: {v}");
        }
    }
    let (status, v) = post_json(
        &format!(
            "{}/v1beta/models/text-embedding-004:batchEmbedContents",
            gw.url
        ),
        &json!({"requests": [{}, {}]}),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["embeddings"].as_array().unwrap().len(), 2);
}

#[test]
fn bad_configuration_exits_with_one_line_naming_the_variable() {
    let (code, err) = run_gateway_expecting_exit(&[("GB_API_KEYS", "k1")]);
    assert_ne!(code, 0);
    assert!(err.contains("GB_AUTH_TOKENS"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let (code, err) = run_gateway_expecting_exit(&[
        ("GB_API_KEYS", "k1"),
        ("GB_AUTH_TOKENS", "t"),
        ("GB_UPSTREAM_TIMEOUT", "later"),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("GB_UPSTREAM_TIMEOUT"), "{err}");
    let (code, err) = run_gateway_expecting_exit(&[("GB_AUTH_TOKENS", "t")]);
    assert_ne!(code, 0);
    assert!(err.contains("GB_API_KEYS"), "{err}");
}
