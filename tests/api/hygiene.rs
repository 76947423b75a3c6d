//! What the gateway writes about a request: never its query string, body,
//! upload bytes or secret headers; never a request id it did not vouch for.
//! And the OpenAI routes under a `/session/{id}` base URL.

use serde_json::{json, Value};

use crate::helpers::*;

const GENERATE: &str = "/v1beta/models/gemini-2.0-flash:generateContent";

/// A probe string per place a request can carry data the logs must not hold.
const PROBES: [&str; 9] = [
    "qprobe7731",
    "qvalueprobe7732",
    "bodyprobe7733",
    "uploadbytesprobe7734",
    "uploadnameprobe7735",
    "headerprobe7736",
    "cookieprobe7737",
    "openaibodyprobe7738",
    "errbodyprobe7739",
];

#[actix_rt::test]
async fn logs_never_hold_query_strings_bodies_upload_bytes_or_secret_headers() {
    let fake = FakeUpstream::start(&keys(2));
    let gw = Gateway::start(&fake, None, &[("RUST_LOG", "debug")]);
    let gen = format!("{}{GENERATE}?{}={}", gw.url, PROBES[0], PROBES[1]);
    let body = json!({"contents": [{"parts": [{"text": PROBES[2]}]}]});
    let (status, v) = post_json(
        &gen,
        &body,
        &[
            ("x-probe", PROBES[5]),
            ("cookie", &format!("c={}", PROBES[6])),
        ],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // Streaming, with the query string Google needs.
    let mut resp = client()
        .post(format!(
            "{}/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse&{}=1",
            gw.url, PROBES[0]
        ))
        .insert_header(("x-goog-api-key", TOKEN))
        .send_json(&body)
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp.body().await.unwrap();
    // An upload: its metadata and its bytes.
    let resp = client()
        .post(format!("{}/upload/v1beta/files?{}=1", gw.url, PROBES[0]))
        .insert_header(("x-goog-api-key", TOKEN))
        .insert_header(("x-goog-upload-protocol", "resumable"))
        .insert_header(("x-goog-upload-command", "start"))
        .send_json(&json!({"file": {"display_name": PROBES[4], "mime_type": "text/plain"}}))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let url = resp
        .headers()
        .get("x-goog-upload-url")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let mut resp = client()
        .post(&url)
        .insert_header(("x-goog-upload-command", "upload, finalize"))
        .insert_header(("x-goog-upload-offset", "0"))
        .send_body(PROBES[3])
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "{:?}", resp.body().await);
    // The OpenAI route, with a bearer token.
    let mut resp = client()
        .post(format!("{}/v1/chat/completions?{}=1", gw.url, PROBES[0]))
        .insert_header(("authorization", format!("Bearer {TOKEN}")))
        .send_json(&json!({"model": "gemini-2.0-flash",
            "messages": [{"role": "user", "content": PROBES[7]}]}))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "{:?}", resp.body().await);
    // Refused requests: a body that is not JSON, a bad token, an unknown route.
    let mut resp = client()
        .post(&gen)
        .insert_header(("x-goog-api-key", TOKEN))
        .insert_header(("content-type", "application/json"))
        .send_body(format!("{{not json {}", PROBES[8]))
        .await
        .unwrap();
    assert!(resp.status().is_client_error(), "{:?}", resp.body().await);
    let resp = client()
        .post(&gen)
        .insert_header(("x-goog-api-key", PROBES[5]))
        .send_json(&body)
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let resp = client()
        .get(format!("{}/nowhere?{}=1", gw.url, PROBES[0]))
        .insert_header(("x-goog-api-key", TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    // The last request's line is written: every earlier one is too.
    gw.wait_for_log("/nowhere").await;
    let log = gw.log_text();
    assert!(log.contains(GENERATE), "the requests were logged at all");
    for probe in PROBES {
        assert!(!log.contains(probe), "{probe} was logged:\n{log}");
    }
    gw.assert_no_secrets_logged(&fake.keys);
}

#[actix_rt::test]
async fn a_bad_request_id_is_replaced_and_never_logged() {
    let fake = FakeUpstream::start(&keys(1));
    let gw = Gateway::start(&fake, None, &[("GB_LOG_FORMAT", "json")]);
    let too_long = format!("longprobe{}", "x".repeat(200));
    let bad: [&[u8]; 4] = [
        too_long.as_bytes(),
        b"tabprobe\tinjected",
        b"quoteprobe\" level=error",
        b"utf8probe\xc3\xa9",
    ];
    for value in bad {
        let resp = client()
            .get(format!("{}/v1beta/models", gw.url))
            .insert_header(("x-goog-api-key", TOKEN))
            .insert_header((
                "x-request-id",
                awc::http::header::HeaderValue::from_bytes(value).unwrap(),
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let id = resp
            .headers()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert_ne!(id.as_bytes(), value);
        assert_eq!(id.len(), 23, "a generated id: {id}");
        gw.wait_for_log(&id).await;
    }
    let log = gw.log_text();
    for probe in [
        "longprobe",
        "tabprobe",
        "injected",
        "quoteprobe",
        "utf8probe",
    ] {
        assert!(!log.contains(probe), "{probe} was logged:\n{log}");
    }
}

#[actix_rt::test]
async fn openai_routes_under_a_session_base_url_keep_the_sessions_key() {
    let redis = Redis::start();
    let ks = keys(4);
    let fake = FakeUpstream::start(&ks);
    let gw = Gateway::start(&fake, Some(&redis), &[]);
    let chat = json!({"model": "gemini-2.0-flash",
        "messages": [{"role": "user", "content": "hi"}]});
    for path in [
        "/session/oa-sess/v1/chat/completions",
        "/session/oa-sess/v1beta/openai/chat/completions",
    ] {
        for _ in 0..4 {
            let mut resp = client()
                .post(format!("{}{path}", gw.url))
                .insert_header(("authorization", format!("Bearer {TOKEN}")))
                .send_json(&chat)
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            assert_eq!(status, 200, "{path}: {v}");
            assert!(v["choices"].is_array(), "{v}");
        }
    }
    let used: std::collections::HashSet<String> = fake
        .requests()
        .await
        .iter()
        .filter(|r| {
            r["path"]
                .as_str()
                .unwrap_or("")
                .contains("chat/completions")
        })
        .map(|r| r["key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(used.len(), 1, "one key for the session: {used:?}");
    let bound = redis.cmd(&["GET", "gb:session:oa-sess"]);
    let key = used.iter().next().unwrap();
    assert!(bound.contains(&key_id(key)), "the binding: {bound}");
    // Without the session, the same calls rotate over the keys.
    fake.post("/_fake/reset", json!({})).await;
    for _ in 0..8 {
        let resp = client()
            .post(format!("{}/v1/chat/completions", gw.url))
            .insert_header(("authorization", format!("Bearer {TOKEN}")))
            .send_json(&chat)
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
    }
    let rotated: std::collections::HashSet<String> = fake
        .requests()
        .await
        .iter()
        .filter_map(|r| r["key"].as_str().map(str::to_string))
        .collect();
    assert!(rotated.len() > 1, "{rotated:?}");
}
