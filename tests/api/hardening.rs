//! Hostile input, lost bindings, misbehaving clients and upstreams.

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

const GENERATE: &str = "/v1beta/models/gemini-2.0-flash:generateContent";

fn rss_kib(gw: &Gateway) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.proc.child.id())).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[actix_rt::test]
async fn after_redis_loses_its_data_files_are_rediscovered_and_rebound() {
    let redis = Redis::start();
    let ks = keys(4);
    let fake = FakeUpstream::start(&ks);
    let gws: Vec<Gateway> = (0..2)
        .map(|_| Gateway::start(&fake, Some(&redis), &[]))
        .collect();
    let a = upload_file(
        &format!("{}/upload/v1beta/files", gws[0].url),
        None,
        &[("x-session-id", "before-flush")],
        b"a",
    )
    .await;
    let b = upload_file(
        &format!("{}/upload/v1beta/files", gws[0].url),
        None,
        &[("x-session-id", "before-flush")],
        b"b",
    )
    .await;
    assert!(redis.cmd(&["FLUSHALL"]).contains("OK"));
    let (status, v) = post_json(
        &format!("{}{GENERATE}", gws[1].url),
        &file_body(&[&a, &b]),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v.to_string().contains("2 files"));
    let owner = fake.file_owners().await[&a].clone();
    for name in [&a, &b] {
        let rec = redis.cmd(&["GET", &format!("gb:file:{name}")]);
        assert!(rec.contains(&owner), "binding back in Redis: {rec}");
    }
    // The token that used it can read it again; the metadata came from the owner key.
    let mut r = client()
        .get(format!("{}/v1beta/{a}", gws[0].url))
        .insert_header(("x-goog-api-key", TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let meta: Value = r.json().await.unwrap();
    assert_eq!(meta["name"], a.as_str());
    // A file no key can see stays unknown: normal rotation, Google's own 403.
    let (status, _) = post_json(
        &format!("{}{GENERATE}", gws[1].url),
        &file_body(&["files/nosuchfile"]),
        &[],
    )
    .await;
    assert_eq!(status, 403);
    assert!(redis
        .cmd(&["EXISTS", "gb:file-miss:files/nosuchfile"])
        .contains(":1"));
    let logs: String = gws.iter().map(Gateway::log_text).collect();
    assert!(logs.contains("file owner discovered"));
}

#[actix_rt::test]
async fn a_corpus_of_hostile_requests_gets_only_4xx_error_json() {
    let fake = FakeUpstream::start(&keys(2));
    let gw = Gateway::start(&fake, None, &[("GB_MAX_BODY_BYTES", "65536")]);
    let idle_rss = rss_kib(&gw);
    let c = client();
    let auth = ("x-goog-api-key", TOKEN);
    let u = |p: &str| format!("{}{p}", gw.url);
    let long_model = "m".repeat(3000);
    let mut cases: Vec<(&str, Result<awc::ClientResponse<_>, _>)> = vec![
        (
            "over-long path",
            c.get(u(&format!("/v1beta/models/{long_model}")))
                .insert_header(auth)
                .send()
                .await,
        ),
        (
            "over-long query",
            c.get(u(&format!("/v1beta/models?x={}", "q".repeat(9000))))
                .insert_header(auth)
                .send()
                .await,
        ),
        (
            "malformed json",
            c.post(u(GENERATE))
                .insert_header(auth)
                .send_body("{\"contents\":")
                .await,
        ),
        (
            "invalid utf-8",
            c.post(u(GENERATE))
                .insert_header(auth)
                .insert_header(("content-type", "application/json"))
                .send_body(&b"{\"contents\":\"\xff\xfe\"}"[..])
                .await,
        ),
        (
            "huge nesting",
            c.post(u(GENERATE))
                .insert_header(auth)
                .send_body(format!("{}1{}", "{\"a\":".repeat(500), "}".repeat(500)))
                .await,
        ),
        (
            "body over limit",
            c.post(u(GENERATE))
                .insert_header(auth)
                .send_body(vec![b' '; 100_000])
                .await,
        ),
        (
            "traversal",
            c.get(u("/v1beta/models/../../../admin"))
                .insert_header(auth)
                .send()
                .await,
        ),
        (
            "encoded traversal",
            c.get(u("/v1beta/files/%2e%2e/x"))
                .insert_header(auth)
                .send()
                .await,
        ),
        (
            "bad file id",
            c.get(u("/v1beta/files/NOT_A_FILE"))
                .insert_header(auth)
                .send()
                .await,
        ),
        (
            "bad page token",
            c.get(u("/v1beta/files?pageToken=zz"))
                .insert_header(auth)
                .send()
                .await,
        ),
        (
            "unknown upload id",
            c.put(u("/upload/v1beta/files?upload_id=zzz"))
                .insert_header(("x-goog-upload-command", "upload"))
                .send_body("x")
                .await,
        ),
        (
            "bad upload command",
            c.post(u("/upload/v1beta/files"))
                .insert_header(auth)
                .insert_header(("x-goog-upload-protocol", "resumable"))
                .insert_header(("x-goog-upload-command", "start, explode"))
                .send_body("{}")
                .await,
        ),
        (
            "resumable without start",
            c.post(u("/upload/v1beta/files"))
                .insert_header(auth)
                .insert_header(("x-goog-upload-protocol", "resumable"))
                .insert_header(("x-goog-upload-command", "upload"))
                .send_body("{}")
                .await,
        ),
        (
            "wrong method",
            c.delete(u(GENERATE)).insert_header(auth).send().await,
        ),
        (
            "no token",
            c.post(u(GENERATE)).send_json(&generate_body()).await,
        ),
        (
            "oversized header",
            c.get(u("/v1beta/models"))
                .insert_header(auth)
                .insert_header(("x-junk", "j".repeat(9000)))
                .send()
                .await,
        ),
        ("unknown route", c.get(u("/etc/passwd")).send().await),
        (
            "admin probe",
            c.get(u("/admin/api/keys")).insert_header(auth).send().await,
        ),
    ];
    let upload_start = c
        .post(u("/upload/v1beta/files"))
        .insert_header(auth)
        .insert_header(("x-goog-upload-protocol", "resumable"))
        .insert_header(("x-goog-upload-command", "start"))
        .send_json(&json!({"file": {}}))
        .await
        .unwrap();
    let upload_url = upload_start
        .headers()
        .get("x-goog-upload-url")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    cases.push((
        "bad offset",
        c.put(&upload_url)
            .insert_header(("x-goog-upload-command", "upload"))
            .insert_header(("x-goog-upload-offset", "-5"))
            .send_body("x")
            .await,
    ));
    let before = fake.requests().await.len();
    for (what, resp) in cases {
        let mut resp = resp.unwrap_or_else(|e| panic!("{what}: {e}"));
        let status = resp.status().as_u16();
        assert!((400..500).contains(&status), "{what}: {status}");
        let v: Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("{what}: not error JSON ({e})"));
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
    }
    assert_eq!(
        fake.requests().await.len(),
        before,
        "nothing hostile went upstream"
    );
    assert_eq!(
        client()
            .get(u("/healthz"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    // A ratio to the idle replica, not an absolute size: buffering one of
    // the oversized inputs would multiply it.
    let rss = rss_kib(&gw);
    assert!(
        rss < 8 * idle_rss.max(8 * 1024),
        "memory stays bounded: {rss} KiB after, {idle_rss} KiB idle"
    );
}

#[actix_rt::test]
async fn a_client_that_drops_mid_upload_leaves_the_upload_resumable() {
    let fake = FakeUpstream::start(&keys(1));
    let gw = Gateway::start(&fake, None, &[]);
    let resp = client()
        .post(format!("{}/upload/v1beta/files", gw.url))
        .insert_header(("x-goog-api-key", TOKEN))
        .insert_header(("x-goog-upload-protocol", "resumable"))
        .insert_header(("x-goog-upload-command", "start"))
        .send_json(&json!({"file": {"size_bytes": 200_000}}))
        .await
        .unwrap();
    let url = resp
        .headers()
        .get("x-goog-upload-url")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let path = url.splitn(4, '/').nth(3).map(|p| format!("/{p}")).unwrap();
    let addr = gw.url.trim_start_matches("http://").to_string();
    {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nx-goog-upload-command: upload, finalize\r\nx-goog-upload-offset: 0\r\ncontent-length: 200000\r\n\r\n"
        )
        .unwrap();
        s.write_all(&vec![b'x'; 50_000]).unwrap();
        s.flush().unwrap();
        // The chunk is on its way upstream before the client goes away with
        // 150 000 bytes unsent.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !fake.requests().await.iter().any(|r| r["method"] == "PUT") {
            assert!(
                std::time::Instant::now() < deadline,
                "the chunk never went upstream"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    gw.wait_for_log("upload chunk could not be forwarded").await;
    let q = client()
        .post(&url)
        .insert_header(("x-goog-upload-command", "query"))
        .send()
        .await
        .unwrap();
    assert_eq!(q.status().as_u16(), 200, "the upload record survived");
    assert_eq!(q.headers().get("x-goog-upload-size-received").unwrap(), "0");
    let mut done = client()
        .put(&url)
        .insert_header(("x-goog-upload-command", "upload, finalize"))
        .insert_header(("x-goog-upload-offset", "0"))
        .send_body(vec![b'y'; 200_000])
        .await
        .unwrap();
    assert_eq!(done.status().as_u16(), 200);
    let v: Value = done.json().await.unwrap();
    assert_eq!(v["file"]["sizeBytes"], "200000");
    // The gateway is still alive and serving.
    let mut s = std::net::TcpStream::connect(&addr).expect("the gateway still accepts connections");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[actix_rt::test]
async fn an_upstream_that_hangs_gets_a_504_not_a_hang() {
    let ks = keys(2);
    let fake = FakeUpstream::start(&ks);
    let gw = Gateway::start(
        &fake,
        None,
        &[("GB_UPSTREAM_TIMEOUT", "1"), ("GB_MAX_RETRIES", "1")],
    );
    for k in &ks {
        fake.set_mode(k, json!({"mode": "slow", "ms": 5000})).await;
    }
    let (status, v) = post_json(&format!("{}{GENERATE}", gw.url), &generate_body(), &[]).await;
    assert_eq!(status, 504, "{v}");
    assert_eq!(v["error"]["status"], "DEADLINE_EXCEEDED");
    assert_eq!(
        fake.requests().await.len(),
        2,
        "tried once more on the other key"
    );
    for k in &ks {
        fake.set_mode(k, json!({"mode": "normal"})).await;
    }
    assert_eq!(
        post_json(&format!("{}{GENERATE}", gw.url), &generate_body(), &[])
            .await
            .0,
        200
    );
}

/// Every spelling of a parameter only the gateway reads: percent-encoded
/// names (Google decodes them), other cases, a name with a NUL.
const SPELLINGS: [&str; 11] = [
    "k%65y",
    "%6Bey",
    "%6b%65%79",
    "KEY",
    "Key",
    "%24key",
    "$key",
    "key%00",
    "session%5Fid",
    "SESSION_ID",
    "%73ession_id",
];

#[actix_rt::test]
async fn no_spelling_of_the_token_or_session_parameter_reaches_the_upstream() {
    let fake = FakeUpstream::start(&keys(2));
    let gw = Gateway::start(&fake, None, &[]);
    let secret = "AIzaEVILsmuggled";
    let c = client();
    let mut forwarded = 0;
    for name in SPELLINGS {
        let values = if name.to_ascii_lowercase().contains("ession") {
            vec!["sess-smuggled"]
        } else {
            vec![TOKEN, secret]
        };
        for value in values {
            let query = format!("alt=sse&{name}={value}&x=1");
            let before = fake.requests().await.len();
            // A valid token in the header: only the query could leak.
            let mut post = c
                .post(format!("{}{GENERATE}?{query}", gw.url))
                .insert_header(("x-goog-api-key", TOKEN))
                .send_json(&generate_body())
                .await
                .unwrap();
            let mut get = c
                .get(format!("{}/v1beta/models?{query}", gw.url))
                .insert_header(("x-goog-api-key", TOKEN))
                .send()
                .await
                .unwrap();
            for resp in [&mut post, &mut get] {
                let status = resp.status().as_u16();
                let body: Value = serde_json::from_slice(&resp.body().await.unwrap()).unwrap();
                if name.contains("%00") {
                    assert_eq!(status, 400, "{name}: {body}");
                    assert!(
                        body["error"]["message"].as_str().unwrap().contains("query"),
                        "{body}"
                    );
                } else {
                    assert_eq!(status, 200, "{name}: {body}");
                }
            }
            let seen = fake.requests().await;
            for r in &seen[before..] {
                forwarded += 1;
                let q = r["query"].as_str().unwrap();
                assert!(q.contains("alt=sse") && q.contains("x=1"), "{q}");
                assert!(
                    !q.contains(value),
                    "{name}={value} reached the upstream: {q}"
                );
                assert!(!q.to_ascii_lowercase().contains("session"), "{q}");
            }
        }
    }
    // Two requests for each spelling and value but the refused `key%00`:
    // seven key spellings with two values, three session ones with one.
    assert_eq!(
        forwarded,
        2 * (7 * 2 + 3),
        "every valid request was forwarded"
    );
    // Nothing in any upstream request line or header carries the token.
    for r in fake.requests().await {
        let text = r.to_string();
        assert!(!text.contains(TOKEN) && !text.contains(secret), "{text}");
    }
    // The refusals are the gateway's own answers, counted by kind.
    let without_token = c
        .get(format!("{}/v1beta/models", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(without_token.status().as_u16(), 401);
    let mut scraped = c.get(format!("{}/metrics", gw.url)).send().await.unwrap();
    let text = String::from_utf8(scraped.body().await.unwrap().to_vec()).unwrap();
    for (kind, n) in [("bad_query", 4), ("unauthenticated", 1)] {
        let line = format!("gb_gateway_errors_total{{kind=\"{kind}\"}} {n}");
        assert!(text.contains(&line), "no {line:?} in:\n{text}");
    }
}

/// Errors are written once, at the edge, in the dialect of the route that
/// answers: OpenAI's on the OpenAI routes, Google's with
/// `x-goog-upload-status: final` on uploads, Google's elsewhere.
#[actix_rt::test]
async fn each_route_family_answers_errors_in_its_own_dialect() {
    let fake = FakeUpstream::start(&keys(1));
    let gw = Gateway::start(&fake, None, &[]);
    let c = client();
    // OpenAI: no token, then a body that is not JSON.
    let mut r = c
        .post(format!("{}/v1/chat/completions", gw.url))
        .send_body("{}")
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "authentication_error", "{v}");
    let mut r = c
        .post(format!("{}/v1beta/openai/chat/completions", gw.url))
        .insert_header(("authorization", format!("Bearer {TOKEN}")))
        .insert_header(("content-type", "application/json"))
        .send_body("{not json")
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    // Upload: Google's JSON, and the header without which the SDKs retry.
    let mut r = c
        .post(format!("{}/upload/v1beta/files", gw.url))
        .send_body("x")
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.headers().get("x-goog-upload-status").unwrap(), "final");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["status"], "UNAUTHENTICATED", "{v}");
    // Native: Google's JSON, no upload header.
    let mut r = c
        .post(format!("{}{GENERATE}", gw.url))
        .send_body("{}")
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers().get("x-goog-upload-status").is_none());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["status"], "UNAUTHENTICATED", "{v}");
}
