//! Sessions, resumable uploads through any replica, and file-ownership
//! routing.

use serde_json::{json, Value};

use crate::helpers::*;

const GENERATE: &str = "/v1beta/models/gemini-2.0-flash:generateContent";

struct Cluster {
    _redis: Deployment,
    fake: FakeUpstream,
    gws: Vec<Gateway>,
}

fn cluster(replicas: usize, n_keys: usize) -> Cluster {
    cluster_on(Mode::Standalone, replicas, n_keys)
}

fn cluster_on(mode: Mode, replicas: usize, n_keys: usize) -> Cluster {
    let redis = Deployment::start(mode);
    let fake = FakeUpstream::start(&keys(n_keys));
    let gws = (0..replicas)
        .map(|_| Gateway::start(&fake, Some(&redis), &[]))
        .collect();
    Cluster {
        _redis: redis,
        fake,
        gws,
    }
}

async fn files_of_one_session_uploaded_on_two_replicas_work_together_on_a_third(mode: Mode) {
    let c = cluster_on(mode, 3, 4);
    let sid = "0b1c6a1e-5a7e-4d3c-9d52-2f0d1b7c9e11";
    let f1 = upload_file(
        &format!("{}/upload/v1beta/files", c.gws[0].url),
        None,
        &[("x-session-id", sid)],
        b"one",
    )
    .await;
    let f2 = upload_file(
        &format!("{}/upload/v1beta/files", c.gws[1].url),
        None,
        &[("x-session-id", sid)],
        b"two",
    )
    .await;
    let owners = c.fake.file_owners().await;
    assert_eq!(owners[&f1], owners[&f2], "one session, one key");
    let uris = [format!("{}/v1beta/{f1}", c.fake.url), f2.clone()];
    let (status, v) = post_json(
        &format!("{}{GENERATE}", c.gws[2].url),
        &file_body(&[&uris[0], &uris[1]]),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v.to_string().contains("2 files"));
    // The binding was logged where it was made and where it was reused.
    let logs: String = c.gws.iter().map(Gateway::log_text).collect();
    assert!(logs.contains("session bound to a key"), "{logs}");
    assert!(logs.contains("reusing the key bound to the session"));
    for gw in &c.gws {
        gw.assert_no_secrets_logged(&c.fake.keys);
    }
}

in_every_redis_mode!(files_of_one_session_uploaded_on_two_replicas_work_together_on_a_third);

#[actix_rt::test]
async fn the_session_path_prefix_and_query_parameter_bind_too() {
    let c = cluster(2, 4);
    let f1 = upload_file(
        &format!("{}/session/Sess-P/upload/v1beta/files", c.gws[0].url),
        None,
        &[],
        b"a",
    )
    .await;
    let f2 = upload_file(
        &format!("{}/upload/v1beta/files?session_id=sess-p", c.gws[1].url),
        None,
        &[],
        b"b",
    )
    .await;
    let owners = c.fake.file_owners().await;
    assert_eq!(
        owners[&f1], owners[&f2],
        "path and query ids are the same normalised session"
    );
    for r in c.fake.requests().await {
        let text = r.to_string();
        assert!(
            !text.to_lowercase().contains("sess-p"),
            "session id reached the upstream: {text}"
        );
    }
}

#[actix_rt::test]
async fn ten_concurrent_first_uploads_of_a_new_session_end_on_one_key() {
    let c = cluster(3, 5);
    let uploads = (0..10).map(|i| {
        let url = format!("{}/upload/v1beta/files", c.gws[i % 3].url);
        async move { upload_file(&url, None, &[("x-session-id", "burst-session")], b"x").await }
    });
    let names = futures_util::future::join_all(uploads).await;
    let owners = c.fake.file_owners().await;
    let keys: std::collections::HashSet<&String> = names.iter().map(|n| &owners[n]).collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
}

#[actix_rt::test]
async fn chunks_go_to_any_replica_and_unknown_upload_ids_are_final_404s() {
    let c = cluster(2, 3);
    let name = upload_file(
        &format!("{}/upload/v1beta/files", c.gws[0].url),
        Some(&c.gws[1].url),
        &[],
        b"hello world",
    )
    .await;
    assert!(name.starts_with("files/"));
    // Chunks carried no key; the gateway used the upload's key, never the client's.
    let chunk_reqs: Vec<Value> = c
        .fake
        .requests()
        .await
        .into_iter()
        .filter(|r| r["query"].as_str().unwrap_or("").contains("upload_id"))
        .collect();
    assert_eq!(chunk_reqs.len(), 1);
    let mut resp = client()
        .post(format!(
            "{}/upload/v1beta/files?upload_id={}&upload_protocol=resumable",
            c.gws[1].url,
            "ab".repeat(32)
        ))
        .insert_header(("x-goog-upload-command", "upload, finalize"))
        .insert_header(("x-goog-upload-offset", "0"))
        .send_body("data")
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    assert_eq!(resp.headers().get("x-goog-upload-status").unwrap(), "final");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], 404);
    let resp = client()
        .post(format!(
            "{}/upload/v1beta/files?upload_id=garbage",
            c.gws[0].url
        ))
        .insert_header(("x-goog-upload-command", "query"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    assert_eq!(resp.headers().get("x-goog-upload-status").unwrap(), "final");
}

#[actix_rt::test]
async fn multi_chunk_uploads_with_status_queries_keep_their_offsets() {
    let c = cluster(2, 2);
    let resp = client()
        .post(format!("{}/upload/v1/files", c.gws[0].url))
        .insert_header(("x-goog-api-key", TOKEN))
        .insert_header(("x-goog-upload-protocol", "resumable"))
        .insert_header(("x-goog-upload-command", "start"))
        .send_json(&json!({"file": {"displayName": "two-part", "mimeType": "text/plain", "sizeBytes": "10"}}))
        .await
        .unwrap();
    let url = resp
        .headers()
        .get("x-goog-upload-url")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(url.starts_with(&c.gws[0].url), "{url}");
    assert!(url.contains("/upload/v1/files?upload_id="));
    let send = |url: String, cmd: &'static str, offset: &'static str, body: &'static str| async move {
        client()
            .put(url)
            .insert_header(("x-goog-upload-command", cmd))
            .insert_header(("x-goog-upload-offset", offset))
            .insert_header(("content-type", "application/json"))
            .send_body(body)
            .await
            .unwrap()
    };
    let r = send(rehost(&url, &c.gws[1].url), "upload", "0", "hello").await;
    assert_eq!(r.status().as_u16(), 200);
    let r = client()
        .post(rehost(&url, &c.gws[0].url))
        .insert_header(("x-goog-upload-command", "query"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers().get("x-goog-upload-size-received").unwrap(), "5");
    let mut r = send(rehost(&url, &c.gws[1].url), "upload,finalize", "5", "world").await;
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["file"]["sizeBytes"], "10");
}

async fn a_file_is_always_routed_to_its_owner_while_rotation_moves_on(mode: Mode) {
    let c = cluster_on(mode, 3, 5);
    let name = upload_file(
        &format!("{}/upload/v1beta/files", c.gws[0].url),
        None,
        &[],
        b"data",
    )
    .await;
    let owner = c.fake.file_owners().await[&name].clone();
    c.fake.post("/_fake/reset", json!({})).await;
    for i in 0..20 {
        let uri = if i % 2 == 0 {
            name.clone()
        } else {
            format!("https://generativelanguage.googleapis.com/v1beta/{name}")
        };
        let body = if i % 3 == 0 {
            json!({"contents": [{"parts": [{"file_data": {"file_uri": uri, "mime_type": "text/plain"}}]}]})
        } else {
            file_body(&[&uri])
        };
        let (status, v) = post_json(&format!("{}{GENERATE}", c.gws[i % 3].url), &body, &[]).await;
        assert_eq!(status, 200, "{v}");
        // Interleave unpinned traffic so rotation keeps moving.
        let (status, _) = post_json(
            &format!("{}{GENERATE}", c.gws[(i + 1) % 3].url),
            &generate_body(),
            &[],
        )
        .await;
        assert_eq!(status, 200);
    }
    let file_calls: Vec<Value> = c
        .fake
        .requests()
        .await
        .into_iter()
        .filter(|r| r["path"] == GENERATE)
        .collect();
    assert_eq!(file_calls.len(), 40);
    let served = c.fake.served().await;
    assert!(
        served[&owner] >= 20,
        "owner served every file request: {served:?}"
    );
}

in_every_redis_mode!(a_file_is_always_routed_to_its_owner_while_rotation_moves_on);

#[actix_rt::test]
async fn files_of_different_owners_in_one_request_get_409_and_nothing_goes_upstream() {
    let c = cluster(1, 3);
    let url = format!("{}/upload/v1beta/files", c.gws[0].url);
    let a = upload_file(&url, None, &[("x-session-id", "owner-a")], b"a").await;
    let mut b = upload_file(&url, None, &[("x-session-id", "owner-b")], b"b").await;
    let mut owners = c.fake.file_owners().await;
    let mut n = 0;
    while owners[&a] == owners[&b] {
        n += 1;
        b = upload_file(
            &url,
            None,
            &[("x-session-id", &format!("owner-b{n}"))],
            b"b",
        )
        .await;
        owners = c.fake.file_owners().await;
    }
    c.fake.post("/_fake/reset", json!({})).await;
    let (status, v) = post_json(
        &format!("{}{GENERATE}", c.gws[0].url),
        &file_body(&[&a, &b]),
        &[],
    )
    .await;
    assert_eq!(status, 409, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&a) && msg.contains(&b) && msg.contains("session"),
        "{msg}"
    );
    assert!(
        c.fake.requests().await.is_empty(),
        "the fake received nothing"
    );
}

#[actix_rt::test]
async fn another_token_cannot_get_delete_or_list_a_file() {
    let c = cluster(2, 3);
    let name = upload_file(
        &format!("{}/upload/v1beta/files", c.gws[0].url),
        None,
        &[],
        b"secret",
    )
    .await;
    let get = |gw: &str, token: &'static str, method: &str| {
        let url = format!("{gw}/v1beta/{name}");
        let req = match method {
            "DELETE" => client().delete(url),
            _ => client().get(url),
        };
        req.insert_header(("x-goog-api-key", token)).send()
    };
    let mut r = get(&c.gws[1].url, TOKEN, "GET").await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["name"], name.as_str());
    let mut r = get(&c.gws[1].url, TOKEN_B, "GET").await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["status"], "NOT_FOUND");
    assert_eq!(
        get(&c.gws[0].url, TOKEN_B, "DELETE")
            .await
            .unwrap()
            .status()
            .as_u16(),
        404
    );
    let list = |token: &'static str| {
        client()
            .get(format!("{}/v1beta/files", c.gws[1].url))
            .insert_header(("x-goog-api-key", token))
            .send()
    };
    let mut resp = list(TOKEN_B).await.unwrap();
    assert_eq!(
        resp.status().as_u16(),
        200,
        "another token lists nothing, without an error"
    );
    let v: Value = resp.json().await.unwrap();
    assert!(v.get("files").is_none() && v.get("error").is_none(), "{v}");
    let v: Value = list(TOKEN).await.unwrap().json().await.unwrap();
    assert_eq!(v["files"][0]["name"], name.as_str());
    // The owner deletes it; then it is gone for everyone.
    assert_eq!(
        get(&c.gws[0].url, TOKEN, "DELETE")
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        get(&c.gws[1].url, TOKEN, "GET")
            .await
            .unwrap()
            .status()
            .as_u16(),
        404
    );
}

#[actix_rt::test]
async fn file_listing_is_paged_across_owner_keys() {
    let c = cluster(1, 3);
    let url = format!("{}/upload/v1beta/files", c.gws[0].url);
    let mut names = Vec::new();
    for i in 0..5 {
        let sid = format!("list-{i}");
        names.push(upload_file(&url, None, &[("x-session-id", &sid)], b"x").await);
    }
    let owners = c.fake.file_owners().await;
    let distinct: std::collections::HashSet<_> = names.iter().map(|n| &owners[n]).collect();
    assert!(distinct.len() > 1, "new sessions are bound by rotation");
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let mut resp = client()
            .get(format!(
                "{}/v1beta/files?pageSize=2&pageToken={token}",
                c.gws[0].url
            ))
            .insert_header(("x-goog-api-key", TOKEN))
            .send()
            .await
            .unwrap();
        let v: Value = resp.json().await.unwrap();
        for f in v["files"].as_array().unwrap() {
            seen.push(f["name"].as_str().unwrap().to_string());
        }
        match v["nextPageToken"].as_str() {
            Some(t) => token = t.to_string(),
            None => break,
        }
    }
    seen.sort();
    names.sort();
    assert_eq!(seen, names);
}

#[actix_rt::test]
async fn single_shot_raw_and_multipart_uploads_record_the_owner() {
    let c = cluster(1, 3);
    for (protocol, ctype, body) in [
        ("raw", "text/plain", "just bytes".to_string()),
        ("multipart", "multipart/related; boundary=xyz", "--xyz\r\nContent-Type: application/json\r\n\r\n{\"file\":{}}\r\n--xyz\r\nContent-Type: text/plain\r\n\r\nhi\r\n--xyz--".to_string()),
    ] {
        let mut resp = client()
            .post(format!("{}/upload/v1beta/files?session_id=single", c.gws[0].url))
            .insert_header(("x-goog-api-key", TOKEN))
            .insert_header(("x-goog-upload-protocol", protocol))
            .insert_header(("content-type", ctype))
            .send_body(body)
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{protocol}");
        let v: Value = resp.json().await.unwrap();
        let name = v["file"]["name"].as_str().unwrap().to_string();
        let (status, out) = post_json(&format!("{}{GENERATE}", c.gws[0].url), &file_body(&[&name]), &[]).await;
        assert_eq!(status, 200, "{protocol}: {out}");
    }
    let owners: std::collections::HashSet<String> =
        c.fake.file_owners().await.into_values().collect();
    assert_eq!(owners.len(), 1, "one session, one key");
}

/// A single-shot upload's body is streamed: held back or refused before it
/// is read, the client would meet a reset instead of an answer. It goes to
/// its session's key whatever that key's health, and Google's answer is
/// what the client gets; a generate on the same session, whose body is
/// buffered, is refused at once while the key cools.
#[actix_rt::test]
async fn a_single_shot_upload_goes_to_its_sessions_key_while_that_key_cools() {
    let redis = Redis::start();
    let ks = keys(2);
    let fake = FakeUpstream::start(&ks);
    let gw = Gateway::start(&fake, Some(&redis), &[("GB_PIN_WAIT", "1")]);
    let url = format!("{}{GENERATE}", gw.url);
    let session = [("x-session-id", "cooling")];
    let (status, _) = post_json(&url, &generate_body(), &session).await;
    assert_eq!(status, 200);
    let key = fake.requests().await.last().unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    // Google rate-limits the key for two minutes, for every model.
    fake.set_mode(&key, json!({"mode": "quota", "retryDelay": "120s"}))
        .await;
    let (status, _) = post_json(&url, &generate_body(), &session).await;
    assert_eq!(status, 429);
    fake.set_mode(&key, json!({"mode": "normal"})).await;
    let before = fake.requests().await.len();
    let (status, body) = post_json(&url, &generate_body(), &session).await;
    assert_eq!(status, 429, "the pinned key cools: {body}");
    assert_eq!(fake.requests().await.len(), before, "no upstream call");

    let mut resp = client()
        .post(format!("{}/upload/v1beta/files", gw.url))
        .insert_header(("x-goog-api-key", TOKEN))
        .insert_header(session[0])
        .insert_header(("x-goog-upload-protocol", "raw"))
        .insert_header(("content-type", "text/plain"))
        .send_body("while cooling")
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    let name = v["file"]["name"].as_str().unwrap();
    assert_eq!(fake.owner_key(name).await, key, "on the session's key");
}

async fn start_upload_url(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> String {
    let mut req = client()
        .post(format!("{}{path}", gw.url))
        .insert_header(("x-goog-api-key", TOKEN))
        .insert_header(("x-goog-upload-protocol", "resumable"))
        .insert_header(("x-goog-upload-command", "start"));
    for h in headers {
        req = req.insert_header(*h);
    }
    let resp = req.send_json(&json!({"file": {}})).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp.headers()
        .get("x-goog-upload-url")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

#[actix_rt::test]
async fn handed_out_upload_urls_use_the_public_base_and_keep_the_path_prefix() {
    let fake = FakeUpstream::start(&keys(1));
    let public = Gateway::start(
        &fake,
        None,
        &[("GB_PUBLIC_URL", "https://gw.example.com/gemini/")],
    );
    let url = start_upload_url(&public, "/session/abc/upload/v1beta/files", &[]).await;
    assert!(
        url.starts_with("https://gw.example.com/gemini/session/abc/upload/v1beta/files?upload_id="),
        "{url}"
    );
    assert!(
        !url.contains(&fake.url),
        "Google's upload URL never reaches the client"
    );

    let forwarded = [
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "api.example.org"),
        ("x-forwarded-prefix", "/llm"),
    ];
    let trusting = Gateway::start(&fake, None, &[("GB_TRUST_FORWARDED", "true")]);
    let url = start_upload_url(&trusting, "/upload/v1/files", &forwarded).await;
    assert!(
        url.starts_with("https://api.example.org/llm/upload/v1/files?upload_id="),
        "{url}"
    );
    // Partial headers: each one that is sent counts, the rest come from the
    // request itself.
    let host = trusting.url.trim_start_matches("http://");
    let url = start_upload_url(
        &trusting,
        "/upload/v1/files",
        &[("x-forwarded-proto", "https")],
    )
    .await;
    assert!(
        url.starts_with(&format!("https://{host}/upload/v1/files?upload_id=")),
        "{url}"
    );
    let url = start_upload_url(
        &trusting,
        "/upload/v1/files",
        &[("x-forwarded-host", "api.example.org")],
    )
    .await;
    assert!(
        url.starts_with("http://api.example.org/upload/v1/files?upload_id="),
        "{url}"
    );

    let plain = Gateway::start(&fake, None, &[]);
    let url = start_upload_url(&plain, "/upload/v1/files", &forwarded).await;
    assert!(
        url.starts_with(&format!("{}/upload/v1/files?upload_id=", plain.url)),
        "forwarded headers ignored unless trusted: {url}"
    );
    let id = url
        .split("upload_id=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    assert!(id.len() >= 32, "at least 128 random bits");
}

/// One page of the token's files through `gw`: names and the next token.
async fn files_page(gw: &str, page_token: &str) -> (Vec<String>, Option<String>) {
    let mut resp = client()
        .get(format!(
            "{gw}/v1beta/files?pageSize=2&pageToken={page_token}"
        ))
        .insert_header(("x-goog-api-key", TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = resp.json().await.unwrap();
    let names = v["files"]
        .as_array()
        .map(|fs| {
            fs.iter()
                .map(|f| f["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    (names, v["nextPageToken"].as_str().map(str::to_string))
}

#[actix_rt::test]
async fn listing_page_by_page_while_files_arrive_skips_and_repeats_nothing() {
    let c = cluster(2, 2);
    let url = format!("{}/upload/v1beta/files", c.gws[0].url);
    let mut before = Vec::new();
    for _ in 0..7 {
        before.push(upload_file(&url, None, &[], b"before").await);
    }
    let mut seen = Vec::new();
    let mut arrived = Vec::new();
    let mut token = String::new();
    loop {
        // Pages alternate between the replicas: the token is the gateway's,
        // not one process's.
        let gw = &c.gws[seen.len() / 2 % c.gws.len()].url;
        let (names, next) = files_page(gw, &token).await;
        seen.extend(names);
        // Two new files between every two pages: an offset would shift by
        // two and show the last two files of the page again.
        for _ in 0..2 {
            arrived.push(upload_file(&url, None, &[], b"during").await);
        }
        match next {
            Some(t) => token = t,
            None => break,
        }
        assert!(
            seen.len() <= 2 * before.len(),
            "paging never ends: {seen:?}"
        );
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        seen.len(),
        "a file was listed twice: {seen:?}"
    );
    let mut present = before.clone();
    present.sort();
    assert_eq!(unique, present, "every file present at the start, once");
    // A fresh listing starts with files that arrived meanwhile.
    let (first, _) = files_page(&c.gws[0].url, "").await;
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|n| arrived.contains(n)), "{first:?}");

    for bad in ["10", "zz", "1.zz"] {
        let mut resp = client()
            .get(format!("{}/v1beta/files?pageToken={bad}", c.gws[0].url))
            .insert_header(("x-goog-api-key", TOKEN))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{bad}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["status"], "INVALID_ARGUMENT", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("pageToken"),
            "{v}"
        );
    }
}
