//! Per-project resources other than files — context caches, batches,
//! long-running operations, file search stores — follow the key that
//! created them, on every replica, and only for the token that created them.

use serde_json::{json, Value};

use crate::helpers::*;

const MODEL: &str = "/v1beta/models/gemini-2.0-flash";

struct Cluster {
    redis: Redis,
    fake: FakeUpstream,
    gws: Vec<Gateway>,
}

fn cluster(replicas: usize, n_keys: usize) -> Cluster {
    let redis = Redis::start();
    let fake = FakeUpstream::start(&keys(n_keys));
    let gws = (0..replicas)
        .map(|_| Gateway::start(&fake, Some(&redis), &[]))
        .collect();
    Cluster { redis, fake, gws }
}

/// Any method, with a token and an optional JSON body: status and JSON.
async fn send(
    method: &str,
    url: &str,
    token: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let method = awc::http::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = client()
        .request(method, url)
        .insert_header(("x-goog-api-key", token));
    for h in headers {
        req = req.insert_header(*h);
    }
    let mut resp = match body {
        Some(b) => req.send_json(&b).await,
        None => req.send().await,
    }
    .expect("request");
    let status = resp.status().as_u16();
    let bytes = resp.body().limit(64 << 20).await.expect("body");
    (
        status,
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into())),
    )
}

impl Cluster {
    fn url(&self, i: usize, path: &str) -> String {
        format!("{}{path}", self.gws[i % self.gws.len()].url)
    }

    /// resource name → raw owner key, as the fake sees it.
    async fn owner_of(&self, name: &str) -> String {
        let v = self.fake.get("/_fake/resources").await;
        v[name]
            .as_str()
            .expect("the fake knows the resource")
            .to_string()
    }

    /// The keys the fake saw on requests whose path mentions `name`.
    async fn keys_used_for(&self, name: &str) -> Vec<String> {
        self.fake
            .requests()
            .await
            .iter()
            .filter(|r| r["path"].as_str().unwrap_or("").contains(name))
            .map(|r| r["key"].as_str().unwrap_or("").to_string())
            .collect()
    }

    /// Seconds left on an owner record in Redis.
    fn ttl_of(&self, name: &str) -> i64 {
        let raw = self.redis.cmd(&["TTL", &format!("gb:res:{name}")]);
        raw.trim().trim_start_matches(':').parse().unwrap_or(-9)
    }
}

fn cache_body(file: Option<&str>, ttl: &str) -> Value {
    let mut parts = vec![json!({"text": "a long document"})];
    if let Some(f) = file {
        parts.push(json!({"fileData": {"fileUri": f, "mimeType": "text/plain"}}));
    }
    json!({"model": "models/gemini-2.0-flash", "contents": [{"role": "user", "parts": parts}], "ttl": ttl})
}

fn ask(cache: &str) -> Value {
    json!({"contents": [{"parts": [{"text": "question"}]}], "cachedContent": cache})
}

#[actix_rt::test]
async fn a_cache_made_from_a_file_answers_on_the_owner_key_through_every_replica() {
    let c = cluster(3, 4);
    let file = upload_file(&c.url(0, "/upload/v1beta/files"), None, &[], b"doc").await;
    let file_owner = c.fake.owner_key(&file).await;
    let (status, cache) = send(
        "POST",
        &c.url(1, "/v1beta/cachedContents"),
        TOKEN,
        Some(cache_body(Some(&file), "600s")),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{cache}");
    let name = cache["name"].as_str().unwrap().to_string();
    assert_eq!(
        c.owner_of(&name).await,
        file_owner,
        "made on the file's key"
    );
    let before = c.fake.served().await;
    for i in 0..3 {
        let (status, v) = post_json(
            &c.url(i, &format!("{MODEL}:generateContent")),
            &ask(&name),
            &[],
        )
        .await;
        assert_eq!(status, 200, "replica {i}: {v}");
    }
    let (status, v) = post_json(&c.url(2, &format!("{MODEL}:countTokens")), &ask(&name), &[]).await;
    assert_eq!(status, 200, "{v}");
    let (status, _) = post_json(
        &c.url(1, &format!("{MODEL}:streamGenerateContent?alt=sse")),
        &ask(&name),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    let after = c.fake.served().await;
    let owner_id = key_id(&file_owner);
    assert_eq!(
        after.get(&owner_id).copied().unwrap_or(0) - before.get(&owner_id).copied().unwrap_or(0),
        5,
        "every question on the owner key: {after:?}"
    );
    // get, update and delete through yet another path, on the owner.
    let path = format!("/v1beta/{name}");
    let (status, got) = send("GET", &c.url(2, &path), TOKEN, None, &[]).await;
    assert_eq!((status, got["name"].as_str()), (200, Some(name.as_str())));
    let (status, _) = send(
        "PATCH",
        &c.url(0, &path),
        TOKEN,
        Some(json!({"ttl": "7200s"})),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = send("DELETE", &c.url(1, &path), TOKEN, None, &[]).await;
    assert_eq!(status, 200);
    assert!(c
        .keys_used_for(&name)
        .await
        .iter()
        .all(|k| *k == file_owner));
    let (status, v) = send("GET", &c.url(2, &path), TOKEN, None, &[]).await;
    assert_eq!(status, 404, "{v}");
    for gw in &c.gws {
        gw.assert_no_secrets_logged(&c.fake.keys);
    }
}

#[actix_rt::test]
async fn a_cache_owner_lives_as_long_as_the_cache_and_patch_extends_it() {
    let c = cluster(1, 3);
    let (status, cache) = send(
        "POST",
        &c.url(0, "/v1beta/cachedContents"),
        TOKEN,
        Some(cache_body(None, "600s")),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{cache}");
    let name = cache["name"].as_str().unwrap().to_string();
    let ttl = c.ttl_of(&name);
    assert!(
        (500..=600).contains(&ttl),
        "owner TTL from expireTime: {ttl}"
    );
    let (status, _) = send(
        "PATCH",
        &c.url(0, &format!("/v1beta/{name}")),
        TOKEN,
        Some(json!({"ttl": "7200s"})),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    let ttl = c.ttl_of(&name);
    assert!((7000..=7200).contains(&ttl), "PATCH moved the TTL: {ttl}");
    // Stores outlive caches; batches keep a week.
    let (_, store) = send(
        "POST",
        &c.url(0, "/v1beta/fileSearchStores"),
        TOKEN,
        Some(json!({"displayName": "s"})),
        &[],
    )
    .await;
    let store_ttl = c.ttl_of(store["name"].as_str().unwrap());
    assert!(store_ttl > 300 * 24 * 3600, "{store_ttl}");
    let (_, batch) = send(
        "POST",
        &c.url(0, &format!("{MODEL}:batchGenerateContent")),
        TOKEN,
        Some(inline_batch(1)),
        &[],
    )
    .await;
    let batch_ttl = c.ttl_of(batch["name"].as_str().unwrap());
    assert!(
        (6 * 24 * 3600..=7 * 24 * 3600).contains(&batch_ttl),
        "{batch_ttl}"
    );
    let (_, op) = send(
        "POST",
        &c.url(0, "/v1beta/models/veo-2.0-generate-001:predictLongRunning"),
        TOKEN,
        Some(json!({"instances": []})),
        &[],
    )
    .await;
    let op_ttl = c.ttl_of(op["name"].as_str().unwrap());
    assert!((47 * 3600..=48 * 3600).contains(&op_ttl), "{op_ttl}");
}

#[actix_rt::test]
async fn another_token_gets_404_for_caches_batches_and_stores_and_lists_only_its_own() {
    let c = cluster(2, 3);
    let mut names = Vec::new();
    for (path, body) in [
        ("/v1beta/cachedContents", cache_body(None, "600s")),
        ("/v1beta/fileSearchStores", json!({"displayName": "mine"})),
        (
            &format!("{MODEL}:batchGenerateContent") as &str,
            inline_batch(2),
        ),
    ] {
        let (status, v) = send("POST", &c.url(0, path), TOKEN, Some(body), &[]).await;
        assert_eq!(status, 200, "{path}: {v}");
        names.push(v["name"].as_str().unwrap().to_string());
    }
    for name in &names {
        let path = format!("/v1beta/{name}");
        for method in ["GET", "DELETE"] {
            let (status, v) = send(method, &c.url(1, &path), TOKEN_B, None, &[]).await;
            assert_eq!(status, 404, "{method} {name} with another token: {v}");
            assert_eq!(v["error"]["status"], "NOT_FOUND");
        }
        let (status, _) = send("GET", &c.url(1, &path), TOKEN, None, &[]).await;
        assert_eq!(status, 200, "still there for its owner");
    }
    for (list, field) in [
        ("cachedContents", "cachedContents"),
        ("fileSearchStores", "fileSearchStores"),
        ("batches", "operations"),
    ] {
        let (status, mine) = send(
            "GET",
            &c.url(1, &format!("/v1beta/{list}")),
            TOKEN,
            None,
            &[],
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(
            mine[field].as_array().map(Vec::len),
            Some(1),
            "{list}: {mine}"
        );
        let (status, theirs) = send(
            "GET",
            &c.url(0, &format!("/v1beta/{list}")),
            TOKEN_B,
            None,
            &[],
        )
        .await;
        assert_eq!(status, 200);
        assert!(
            theirs.get(field).is_none(),
            "{list} of another token: {theirs}"
        );
    }
}

#[actix_rt::test]
async fn a_cache_and_a_file_on_different_keys_in_one_request_get_409() {
    let c = cluster(1, 3);
    let url = c.url(0, "/upload/v1beta/files");
    let file = upload_file(&url, None, &[("x-session-id", "s-a")], b"a").await;
    let file_owner = c.fake.owner_key(&file).await;
    let mut n = 0;
    let cache = loop {
        let other = upload_file(&url, None, &[("x-session-id", &format!("s-b{n}"))], b"b").await;
        n += 1;
        if c.fake.owner_key(&other).await == file_owner {
            continue;
        }
        let (status, v) = send(
            "POST",
            &c.url(0, "/v1beta/cachedContents"),
            TOKEN,
            Some(cache_body(Some(&other), "600s")),
            &[],
        )
        .await;
        assert_eq!(status, 200, "{v}");
        break v["name"].as_str().unwrap().to_string();
    };
    c.fake.post("/_fake/reset", json!({})).await;
    let mut body = file_body(&[&file]);
    body["cachedContent"] = json!(cache);
    let (status, v) = post_json(&c.url(0, &format!("{MODEL}:generateContent")), &body, &[]).await;
    assert_eq!(status, 409, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains(&file) && msg.contains(&cache) && msg.contains("different API keys"),
        "{msg}"
    );
    assert!(c.fake.requests().await.is_empty(), "nothing went upstream");
}

fn inline_batch(n: usize) -> Value {
    let requests: Vec<Value> = (0..n)
        .map(|i| json!({"request": {"contents": [{"parts": [{"text": format!("q{i}")}]}]}, "metadata": {"key": i.to_string()}}))
        .collect();
    json!({"batch": {"displayName": "b", "inputConfig": {"requests": {"requests": requests}}}})
}

/// Polls a batch through the replicas in turn until it is done.
async fn poll_until_done(c: &Cluster, name: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut i = 0;
    loop {
        let (status, v) = send(
            "GET",
            &c.url(i, &format!("/v1beta/{name}")),
            TOKEN,
            None,
            &[],
        )
        .await;
        assert_eq!(status, 200, "{v}");
        if v["done"] == json!(true) {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "batch never finished: {v}"
        );
        i += 1;
    }
}

#[actix_rt::test]
async fn batches_inline_or_from_a_file_are_polled_cancelled_and_downloaded_on_their_owner() {
    let c = cluster(3, 4);
    let (status, batch) = send(
        "POST",
        &c.url(0, &format!("{MODEL}:batchGenerateContent")),
        TOKEN,
        Some(inline_batch(3)),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{batch}");
    let name = batch["name"].as_str().unwrap().to_string();
    let owner = c.owner_of(&name).await;
    let done = poll_until_done(&c, &name).await;
    let answers = done["metadata"]["output"]["inlinedResponses"]["inlinedResponses"]
        .as_array()
        .unwrap();
    assert_eq!(answers.len(), 3, "{done}");
    assert!(c.keys_used_for(&name).await.iter().all(|k| *k == owner));

    // A file input pins the batch to the file's key; its results file is
    // downloaded on that key through any replica.
    let input = upload_file(
        &c.url(1, "/upload/v1beta/files"),
        None,
        &[],
        b"{\"request\":{}}",
    )
    .await;
    let file_owner = c.fake.owner_key(&input).await;
    let body = json!({"batch": {"displayName": "f", "inputConfig": {"fileName": input}}});
    let (status, batch) = send(
        "POST",
        &c.url(2, &format!("{MODEL}:batchGenerateContent")),
        TOKEN,
        Some(body),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{batch}");
    let name = batch["name"].as_str().unwrap().to_string();
    assert_eq!(c.owner_of(&name).await, file_owner);
    let done = poll_until_done(&c, &name).await;
    let results = done["metadata"]["output"]["responsesFile"]
        .as_str()
        .unwrap()
        .to_string();
    let id = results.trim_start_matches("files/");
    let (status, content) = send(
        "GET",
        &c.url(
            0,
            &format!("/download/v1beta/files/{id}:download?alt=media"),
        ),
        TOKEN,
        None,
        &[],
    )
    .await;
    assert_eq!(status, 200, "{content}");
    assert!(content.to_string().contains("Batch answer"), "{content}");
    let (status, _) = send(
        "GET",
        &c.url(
            1,
            &format!("/download/v1beta/files/{id}:download?alt=media"),
        ),
        TOKEN_B,
        None,
        &[],
    )
    .await;
    assert_eq!(status, 404, "another token cannot download the results");

    // cancel and delete, on the owner.
    let (status, batch) = send(
        "POST",
        &c.url(0, &format!("{MODEL}:asyncBatchEmbedContent")),
        TOKEN,
        Some(inline_batch(1)),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{batch}");
    let name = batch["name"].as_str().unwrap().to_string();
    let owner = c.owner_of(&name).await;
    let (status, _) = send(
        "POST",
        &c.url(1, &format!("/v1beta/{name}:cancel")),
        TOKEN,
        Some(json!({})),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    let (status, v) = send(
        "GET",
        &c.url(2, &format!("/v1beta/{name}")),
        TOKEN,
        None,
        &[],
    )
    .await;
    assert_eq!(
        v["metadata"]["state"], "BATCH_STATE_CANCELLED",
        "{status} {v}"
    );
    let (status, _) = send(
        "DELETE",
        &c.url(0, &format!("/v1beta/{name}")),
        TOKEN,
        None,
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert!(c.keys_used_for(&name).await.iter().all(|k| *k == owner));
}

#[actix_rt::test]
async fn a_long_running_operation_and_its_video_stay_on_the_owner_key() {
    let c = cluster(3, 4);
    let (status, op) = send(
        "POST",
        &c.url(0, "/v1beta/models/veo-2.0-generate-001:predictLongRunning"),
        TOKEN,
        Some(json!({"instances": [{"prompt": "a cat"}]})),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{op}");
    let name = op["name"].as_str().unwrap().to_string();
    let owner = c.owner_of(&name).await;
    let (status, done) = send(
        "GET",
        &c.url(1, &format!("/v1beta/{name}")),
        TOKEN,
        None,
        &[],
    )
    .await;
    assert_eq!(status, 200, "{done}");
    let uri = done["response"]["generateVideoResponse"]["generatedSamples"][0]["video"]["uri"]
        .as_str()
        .unwrap()
        .to_string();
    let id = uri
        .split("files/")
        .nth(1)
        .unwrap()
        .split(':')
        .next()
        .unwrap();
    let (status, video) = send(
        "GET",
        &c.url(
            2,
            &format!("/download/v1beta/files/{id}:download?alt=media"),
        ),
        TOKEN,
        None,
        &[],
    )
    .await;
    assert_eq!((status, video), (200, json!("fake video")));
    assert!(c.keys_used_for(&name).await.iter().all(|k| *k == owner));
    assert!(c.keys_used_for(id).await.iter().all(|k| *k == owner));
    let (status, _) = send(
        "GET",
        &c.url(2, &format!("/v1beta/{name}")),
        TOKEN_B,
        None,
        &[],
    )
    .await;
    assert_eq!(status, 404);
}

#[actix_rt::test]
async fn a_file_search_store_its_documents_and_the_file_search_tool_use_its_key() {
    let c = cluster(3, 4);
    let sid = [("x-session-id", "store-work")];
    let file = upload_file(&c.url(0, "/upload/v1beta/files"), None, &sid, b"manual").await;
    let (status, store) = send(
        "POST",
        &c.url(1, "/v1beta/fileSearchStores"),
        TOKEN,
        Some(json!({"displayName": "docs"})),
        &sid,
    )
    .await;
    assert_eq!(status, 200, "{store}");
    let store = store["name"].as_str().unwrap().to_string();
    let owner = c.owner_of(&store).await;
    assert_eq!(owner, c.fake.owner_key(&file).await, "one session, one key");
    let (status, op) = send(
        "POST",
        &c.url(2, &format!("/v1beta/{store}:importFile")),
        TOKEN,
        Some(json!({"fileName": file})),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{op}");
    let op_name = op["name"].as_str().unwrap();
    let (status, op) = send(
        "GET",
        &c.url(0, &format!("/v1beta/{op_name}")),
        TOKEN,
        None,
        &[],
    )
    .await;
    assert_eq!((status, &op["done"]), (200, &json!(true)), "{op}");
    let (status, docs) = send(
        "GET",
        &c.url(1, &format!("/v1beta/{store}/documents")),
        TOKEN,
        None,
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        docs["documents"].as_array().map(Vec::len),
        Some(1),
        "{docs}"
    );
    let before = c.fake.served().await;
    let body = json!({
        "contents": [{"parts": [{"text": "what does the manual say?"}]}],
        "tools": [{"fileSearch": {"fileSearchStoreNames": [store]}}]
    });
    for i in 0..3 {
        let (status, v) =
            post_json(&c.url(i, &format!("{MODEL}:generateContent")), &body, &[]).await;
        assert_eq!(status, 200, "{v}");
    }
    let after = c.fake.served().await;
    let id = key_id(&owner);
    assert_eq!(after[&id] - before.get(&id).copied().unwrap_or(0), 3);
    let (status, _) = send(
        "GET",
        &c.url(2, &format!("/v1beta/{store}/documents")),
        TOKEN_B,
        None,
        &[],
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = send(
        "DELETE",
        &c.url(2, &format!("/v1beta/{store}?force=true")),
        TOKEN,
        None,
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert!(c.keys_used_for(&store).await.iter().all(|k| *k == owner));
    let (status, _) = send(
        "GET",
        &c.url(0, &format!("/v1beta/{store}")),
        TOKEN,
        None,
        &[],
    )
    .await;
    assert_eq!(status, 404);
}

#[actix_rt::test]
async fn after_redis_loses_everything_each_resource_type_is_discovered_on_its_key() {
    let c = cluster(2, 4);
    let mut names = Vec::new();
    for (path, body) in [
        ("/v1beta/cachedContents", cache_body(None, "600s")),
        ("/v1beta/fileSearchStores", json!({"displayName": "s"})),
        (
            &format!("{MODEL}:batchGenerateContent") as &str,
            inline_batch(1),
        ),
        (
            "/v1beta/models/veo-2.0-generate-001:predictLongRunning",
            json!({"instances": []}),
        ),
    ] {
        let (status, v) = send("POST", &c.url(0, path), TOKEN, Some(body), &[]).await;
        assert_eq!(status, 200, "{path}: {v}");
        names.push(v["name"].as_str().unwrap().to_string());
    }
    let cache_owner = c.owner_of(&names[0]).await;
    assert!(c.redis.cmd(&["FLUSHALL"]).contains("OK"));
    for name in &names {
        let (status, v) = send(
            "GET",
            &c.url(1, &format!("/v1beta/{name}")),
            TOKEN,
            None,
            &[],
        )
        .await;
        assert_eq!(status, 200, "{name} after FLUSHALL: {v}");
    }
    assert!(c.redis.cmd(&["FLUSHALL"]).contains("OK"));
    let before = c.fake.served().await;
    for i in 0..4 {
        let (status, v) = post_json(
            &c.url(i, &format!("{MODEL}:generateContent")),
            &ask(&names[0]),
            &[],
        )
        .await;
        assert_eq!(status, 200, "{v}");
    }
    let after = c.fake.served().await;
    let id = key_id(&cache_owner);
    assert_eq!(after[&id] - before.get(&id).copied().unwrap_or(0), 4);
    let logs: String = c.gws.iter().map(Gateway::log_text).collect();
    assert!(logs.contains("resource owner discovered"), "{logs}");
}

#[actix_rt::test]
async fn the_openai_routes_send_a_cached_content_to_its_owner() {
    let c = cluster(2, 4);
    let (status, cache) = send(
        "POST",
        &c.url(0, "/v1beta/cachedContents"),
        TOKEN,
        Some(cache_body(None, "600s")),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{cache}");
    let name = cache["name"].as_str().unwrap().to_string();
    let body = json!({
        "model": "gemini-2.0-flash",
        "messages": [{"role": "user", "content": "about the cached document"}],
        "extra_body": {"google": {"cached_content": name}}
    });
    for i in 0..4 {
        let mut resp = client()
            .post(c.url(i, "/v1beta/openai/chat/completions"))
            .insert_header(("authorization", format!("Bearer {TOKEN}")))
            .send_json(&body)
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{:?}", resp.body().await);
    }
    let owner = c.owner_of(&name).await;
    let used: Vec<String> = c
        .fake
        .requests()
        .await
        .iter()
        .filter(|r| {
            r["path"]
                .as_str()
                .unwrap_or("")
                .contains("chat/completions")
        })
        .map(|r| r["key"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(used.len(), 4);
    assert!(used.iter().all(|k| *k == owner), "{used:?}");
}

/// Calls of one Redis command since the last `CONFIG RESETSTAT`.
fn calls(redis: &Redis, command: &str) -> u64 {
    let info = redis.cmd(&["INFO", "commandstats"]);
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[actix_rt::test]
async fn a_request_that_names_no_resource_reads_no_owner_record() {
    let c = cluster(1, 3);
    let generate = c.url(0, &format!("{MODEL}:generateContent"));
    // Warm up, then count only what the requests themselves cost.
    let (status, _) = post_json(&generate, &generate_body(), &[]).await;
    assert_eq!(status, 200);
    assert!(c.redis.cmd(&["CONFIG", "RESETSTAT"]).contains("OK"));
    for _ in 0..5 {
        let (status, _) = post_json(&generate, &generate_body(), &[]).await;
        assert_eq!(status, 200);
    }
    assert_eq!(
        calls(&c.redis, "get"),
        0,
        "no owner lookup without a reference"
    );
    // A request that names a cache costs one read of its owner record.
    let (_, cache) = send(
        "POST",
        &c.url(0, "/v1beta/cachedContents"),
        TOKEN,
        Some(cache_body(None, "600s")),
        &[],
    )
    .await;
    let name = cache["name"].as_str().unwrap().to_string();
    assert!(c.redis.cmd(&["CONFIG", "RESETSTAT"]).contains("OK"));
    let (status, _) = post_json(&generate, &ask(&name), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(calls(&c.redis, "get"), 1);
}

#[actix_rt::test]
async fn an_upload_into_a_file_search_store_starts_on_its_key_and_finishes_on_any_replica() {
    let c = cluster(3, 4);
    let (status, store) = send(
        "POST",
        &c.url(0, "/v1beta/fileSearchStores"),
        TOKEN,
        Some(json!({"displayName": "docs"})),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{store}");
    let store = store["name"].as_str().unwrap().to_string();
    let owner = c.owner_of(&store).await;
    let start = |gw: usize, token: &'static str| {
        client()
            .post(c.url(
                gw,
                &format!("/upload/v1beta/{store}:uploadToFileSearchStore"),
            ))
            .insert_header(("x-goog-api-key", token))
            .insert_header(("x-goog-upload-protocol", "resumable"))
            .insert_header(("x-goog-upload-command", "start"))
            .insert_header(("x-goog-upload-header-content-length", "11"))
            .send_json(&json!({"displayName": "manual", "mimeType": "text/plain"}))
    };
    let resp = start(1, TOKEN_B).await.unwrap();
    assert_eq!(
        resp.status().as_u16(),
        404,
        "another token cannot upload into the store"
    );
    assert_eq!(
        resp.headers().get("x-goog-upload-status").unwrap(),
        "final",
        "an upload error ends the upload, or the SDKs retry"
    );
    // The owner key is rate-limited: Google's error, final too.
    c.fake
        .set_mode(&owner, json!({"mode": "quota", "retryDelay": "1s"}))
        .await;
    let resp = start(1, TOKEN).await.unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(resp.headers().get("x-goog-upload-status").unwrap(), "final");
    c.fake.set_mode(&owner, json!({"mode": "normal"})).await;
    let resp = start(1, TOKEN).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let url = resp
        .headers()
        .get("x-goog-upload-url")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        url.starts_with(&c.gws[1].url),
        "the gateway's own upload URL: {url}"
    );
    let mut resp = client()
        .post(rehost(&url, &c.gws[2].url))
        .insert_header(("x-goog-upload-command", "upload, finalize"))
        .insert_header(("x-goog-upload-offset", "0"))
        .send_body("hello store")
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let op: Value = resp.json().await.unwrap();
    let op_name = op["name"].as_str().unwrap().to_string();
    assert!(
        op_name.starts_with(&format!("{store}/upload/operations/")),
        "{op}"
    );
    let (status, polled) = send(
        "GET",
        &c.url(0, &format!("/v1beta/{op_name}")),
        TOKEN,
        None,
        &[],
    )
    .await;
    assert_eq!((status, &polled["done"]), (200, &json!(true)), "{polled}");
    let (_, docs) = send(
        "GET",
        &c.url(1, &format!("/v1beta/{store}/documents")),
        TOKEN,
        None,
        &[],
    )
    .await;
    assert_eq!(
        docs["documents"].as_array().map(Vec::len),
        Some(1),
        "{docs}"
    );
    assert!(c.keys_used_for(&store).await.iter().all(|k| *k == owner));
    let logs: String = c.gws.iter().map(Gateway::log_text).collect();
    assert!(logs.contains("upload into a file search store started"));
    assert!(!logs.contains("names no file"), "{logs}");
}

#[actix_rt::test]
async fn importing_a_file_of_another_key_into_a_store_gets_409() {
    let c = cluster(1, 3);
    let (status, store) = send(
        "POST",
        &c.url(0, "/v1beta/fileSearchStores"),
        TOKEN,
        Some(json!({"displayName": "s"})),
        &[("x-session-id", "store-side")],
    )
    .await;
    assert_eq!(status, 200, "{store}");
    let store = store["name"].as_str().unwrap().to_string();
    let owner = c.owner_of(&store).await;
    let url = c.url(0, "/upload/v1beta/files");
    let mut n = 0;
    let file = loop {
        let f = upload_file(
            &url,
            None,
            &[("x-session-id", &format!("file-side-{n}"))],
            b"x",
        )
        .await;
        n += 1;
        if c.fake.owner_key(&f).await != owner {
            break f;
        }
    };
    c.fake.post("/_fake/reset", json!({})).await;
    let (status, v) = send(
        "POST",
        &c.url(0, &format!("/v1beta/{store}:importFile")),
        TOKEN,
        Some(json!({"fileName": file})),
        &[],
    )
    .await;
    assert_eq!(status, 409, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains(&file) && msg.contains(&store), "{msg}");
    assert!(c.fake.requests().await.is_empty(), "nothing went upstream");
}
