//! Per-project resources, each visible only to the key that created it, with
//! Google's error for any other key: context caches, batches, long-running
//! operations (video generation), file search stores with their documents
//! and operations, and files that batches and operations produce.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::{HttpRequest, HttpResponse};
use serde_json::{json, Value};

use crate::errors;
use crate::gemini;
use crate::state::{random_id, Fake, FileMeta, Res};

fn not_found() -> HttpResponse {
    errors::respond(
        404,
        errors::google(
            404,
            "Requested entity was not found.",
            "NOT_FOUND",
            json!([]),
        ),
        false,
    )
}

/// Google's answer for a resource of another project (or none at all).
fn denied(name: &str) -> HttpResponse {
    let message = if name.starts_with("cachedContents/") {
        "CachedContent not found (or permission denied)".to_string()
    } else {
        format!("Permission denied on resource {name} (or it may not exist).")
    };
    errors::respond(
        403,
        errors::google(403, &message, "PERMISSION_DENIED", json!([])),
        false,
    )
}

pub fn rfc3339(at: SystemTime) -> String {
    let ms = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64;
    let (secs, millis) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `"600s"` or `"1.5s"` → a duration.
fn parse_ttl(v: &Value) -> Option<Duration> {
    let s = v.as_str()?.strip_suffix('s')?;
    s.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite() && *x >= 0.0)
        .map(Duration::from_secs_f64)
}

fn expiry(body: &Value) -> String {
    let ttl = body
        .get("ttl")
        .and_then(parse_ttl)
        .unwrap_or(Duration::from_secs(3600));
    match body.get("expireTime").and_then(Value::as_str) {
        Some(t) => t.to_string(),
        None => rfc3339(SystemTime::now() + ttl),
    }
}

/// The names of what a generate body uses beyond files: its cache and the
/// file search stores of its tools.
fn used(body: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for field in ["cachedContent", "cached_content"] {
        if let Some(name) = body.get(field).and_then(Value::as_str) {
            out.push(name.to_string());
        }
    }
    for tool in body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let fs = tool.get("fileSearch").or_else(|| tool.get("file_search"));
        let names = fs.and_then(|f| {
            f.get("fileSearchStoreNames")
                .or_else(|| f.get("file_search_store_names"))
        });
        for name in names.and_then(Value::as_array).into_iter().flatten() {
            if let Some(n) = name.as_str() {
                out.push(n.to_string());
            }
        }
    }
    out
}

/// Google refuses a cache or store of another project in a generate call.
pub fn check_used(fake: &Fake, key: &str, body: &Value) -> Result<(), HttpResponse> {
    let inner = fake.lock();
    for name in used(body) {
        match inner.resources.get(&name) {
            Some(r) if r.owner == key => {}
            _ => return Err(denied(&name)),
        }
    }
    Ok(())
}

fn file_owned(fake: &Fake, key: &str, name: &str) -> Result<(), HttpResponse> {
    match fake.lock().files.get(name) {
        Some(meta) if meta.owner == key => Ok(()),
        _ => Err(errors::respond(
            403,
            errors::file_denied(name.trim_start_matches("files/")),
            false,
        )),
    }
}

fn insert(fake: &Fake, key: &str, name: &str, value: Value) -> Value {
    fake.lock().resources.insert(
        name.to_string(),
        Res {
            owner: key.to_string(),
            value: value.clone(),
        },
    );
    value
}

/// A file the fake made itself (a batch's results, a generated video), with
/// its content for `:download`.
fn produce_file(fake: &Fake, key: &str, mime: &str, content: String) -> String {
    let name = format!("files/{}", random_id(12));
    let mut inner = fake.lock();
    inner.files.insert(
        name.clone(),
        FileMeta {
            owner: key.to_string(),
            display_name: "produced".into(),
            mime_type: mime.into(),
            size: content.len() as u64,
            created: rfc3339(SystemTime::now()),
        },
    );
    inner.contents.insert(name.clone(), content);
    name
}

fn owned(fake: &Fake, key: &str, name: &str) -> Result<Value, HttpResponse> {
    match fake.lock().resources.get(name) {
        Some(r) if r.owner == key => Ok(r.value.clone()),
        _ => Err(denied(name)),
    }
}

fn list(fake: &Fake, key: &str, prefix: &str, field: &str) -> HttpResponse {
    let inner = fake.lock();
    let items: Vec<Value> = inner
        .resources
        .iter()
        .filter(|(n, r)| {
            r.owner == key && n.starts_with(prefix) && !n[prefix.len()..].contains('/')
        })
        .map(|(_, r)| r.value.clone())
        .collect();
    HttpResponse::Ok().json(json!({ field: items }))
}

/// `/upload/{ver}/fileSearchStores/{id}:uploadToFileSearchStore`: a
/// resumable upload into a store (start, then one or more chunks; the last
/// one answers with the import operation).
pub async fn store_upload(
    fake: &Fake,
    req: &HttpRequest,
    mut payload: actix_web::web::Payload,
    ver: &str,
    id: &str,
    key: Option<String>,
) -> HttpResponse {
    use futures_util::StreamExt;
    let Some(store_id) = id.strip_suffix(":uploadToFileSearchStore") else {
        return not_found();
    };
    let store = format!("fileSearchStores/{store_id}");
    let key = match gemini::gate(fake, key, false).await {
        Ok(k) => k,
        Err(r) => return r,
    };
    let mut received = 0usize;
    while let Some(Ok(chunk)) = payload.next().await {
        received += chunk.len();
    }
    let upload_id = req
        .query_string()
        .split('&')
        .find_map(|p| p.strip_prefix("upload_id="))
        .map(str::to_string);
    let Some(upload_id) = upload_id else {
        if let Err(r) = owned(fake, &key, &store) {
            return r;
        }
        let uid = random_id(40);
        insert(
            fake,
            &key,
            &format!("store-upload/{uid}"),
            json!({"store": store, "received": 0}),
        );
        let url = format!(
            "{}/upload/{ver}/fileSearchStores/{store_id}:uploadToFileSearchStore?upload_id={uid}",
            base_url(req)
        );
        return HttpResponse::Ok()
            .insert_header(("x-goog-upload-url", url))
            .insert_header(("x-goog-upload-status", "active"))
            .finish();
    };
    let pending = format!("store-upload/{upload_id}");
    let Ok(state) = owned(fake, &key, &pending) else {
        return denied(&store);
    };
    let total = state["received"].as_u64().unwrap_or(0) + received as u64;
    let command = req
        .headers()
        .get("x-goog-upload-command")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if !command.contains("finalize") {
        insert(
            fake,
            &key,
            &pending,
            json!({"store": store, "received": total}),
        );
        return HttpResponse::Ok()
            .insert_header(("x-goog-upload-status", "active"))
            .insert_header(("x-goog-upload-size-received", total.to_string()))
            .finish();
    }
    fake.lock().resources.remove(&pending);
    let doc = format!("{store}/documents/{}", random_id(12));
    insert(
        fake,
        &key,
        &doc,
        json!({"name": doc, "displayName": "uploaded", "state": "STATE_ACTIVE", "sizeBytes": total.to_string()}),
    );
    let op = format!("{store}/upload/operations/{}", random_id(12));
    let value = json!({
        "name": op,
        "done": true,
        "response": {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.UploadToFileSearchStoreResponse",
            "parent": store,
            "documentName": doc
        }
    });
    insert(fake, &key, &op, value.clone());
    HttpResponse::Ok()
        .insert_header(("x-goog-upload-status", "final"))
        .json(value)
}

/// The key that minted an ephemeral token.
pub fn token_owner(fake: &Fake, token: &str) -> Option<String> {
    fake.lock()
        .resources
        .get(token)
        .filter(|_| token.starts_with("auth_tokens/"))
        .map(|r| r.owner.clone())
}

/// `GET /download/{ver}/files/{id}:download?alt=media`.
pub fn download(fake: &Fake, key: &str, id: &str) -> HttpResponse {
    let name = format!("files/{}", id.split(':').next().unwrap_or(""));
    if let Err(r) = file_owned(fake, key, &name) {
        return r;
    }
    let content = fake.lock().contents.get(&name).cloned().unwrap_or_default();
    HttpResponse::Ok()
        .content_type("application/octet-stream")
        .body(content)
}

/// Model methods that create resources: batches and long-running operations.
pub fn model_action(
    fake: &Fake,
    key: &str,
    model: &str,
    method: &str,
    body: &Value,
) -> Option<HttpResponse> {
    match method {
        "batchGenerateContent" | "asyncBatchEmbedContent" => {
            Some(create_batch(fake, key, model, method, body))
        }
        "predictLongRunning" => {
            let name = format!("models/{model}/operations/{}", random_id(12));
            Some(HttpResponse::Ok().json(insert(fake, key, &name, json!({ "name": name }))))
        }
        _ => None,
    }
}

fn create_batch(fake: &Fake, key: &str, model: &str, method: &str, body: &Value) -> HttpResponse {
    let batch = body.get("batch").unwrap_or(body);
    let input = batch.get("inputConfig").unwrap_or(&Value::Null);
    if let Some(file) = input.get("fileName").and_then(Value::as_str) {
        if let Err(r) = file_owned(fake, key, file) {
            return r;
        }
    }
    if let Err(r) = gemini::check_files(fake, key, body, false) {
        return r;
    }
    let n = input
        .pointer("/requests/requests")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let name = format!("batches/{}", random_id(12));
    let now = rfc3339(SystemTime::now());
    let value = json!({
        "name": name,
        "metadata": {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
            "model": format!("models/{model}"),
            "displayName": batch.get("displayName").cloned().unwrap_or(json!("batch")),
            "state": "BATCH_STATE_PENDING",
            "createTime": now,
            "updateTime": now,
            "batchStats": {"requestCount": n.to_string(), "pendingRequestCount": n.to_string()},
            "fileInput": input.get("fileName").is_some(),
            "embed": method == "asyncBatchEmbedContent",
        },
        "done": false
    });
    HttpResponse::Ok().json(insert(fake, key, &name, value))
}

/// A batch runs when first read and is done when read again.
fn get_batch(fake: &Fake, key: &str, name: &str) -> Result<Value, HttpResponse> {
    let mut v = owned(fake, key, name)?;
    match v.pointer("/metadata/state").and_then(Value::as_str) {
        Some("BATCH_STATE_PENDING") => {
            v["metadata"]["state"] = json!("BATCH_STATE_RUNNING");
            Ok(insert(fake, key, name, v))
        }
        Some("BATCH_STATE_RUNNING") => Ok(finish_batch(fake, key, name, v)),
        _ => Ok(v),
    }
}

fn finish_batch(fake: &Fake, key: &str, name: &str, mut v: Value) -> Value {
    let n: usize = v
        .pointer("/metadata/batchStats/requestCount")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let embed = v.pointer("/metadata/embed") == Some(&json!(true));
    let one = |i: usize| {
        if embed {
            json!({"response": {"embedding": {"values": [0.1, 0.2, 0.3]}}})
        } else {
            json!({"response": {
                "candidates": [{"content": {"parts": [{"text": format!("Batch answer {i} from the fake upstream.")}], "role": "model"}, "finishReason": "STOP", "index": 0}]
            }})
        }
    };
    let output = if v.pointer("/metadata/fileInput") == Some(&json!(true)) {
        let lines: Vec<String> = (0..n.max(1))
            .map(|i| json!({"key": i.to_string(), "response": one(i)["response"]}).to_string())
            .collect();
        let file = produce_file(fake, key, "application/jsonl", lines.join("\n"));
        json!({"responsesFile": file})
    } else {
        json!({"inlinedResponses": {"inlinedResponses": (0..n).map(one).collect::<Vec<_>>()}})
    };
    let now = rfc3339(SystemTime::now());
    v["metadata"]["state"] = json!("BATCH_STATE_SUCCEEDED");
    v["metadata"]["endTime"] = json!(now);
    v["metadata"]["updateTime"] = json!(now);
    v["metadata"]["output"] = output.clone();
    v["done"] = json!(true);
    let mut response = output;
    response["@type"] =
        json!("type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput");
    v["response"] = response;
    insert(fake, key, name, v)
}

fn base_url(req: &HttpRequest) -> String {
    let scheme = if req.app_config().secure() {
        "https"
    } else {
        "http"
    };
    let host = req
        .headers()
        .get("host")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| "localhost".into());
    format!("{scheme}://{host}")
}

/// `/{ver}/{cachedContents|batches|operations|fileSearchStores|models/m/operations}…`;
/// `None` when the path is none of them.
pub fn handle(
    fake: &Fake,
    req: &HttpRequest,
    key: &str,
    ver: &str,
    rest: &[&str],
    body: &Value,
) -> Option<HttpResponse> {
    let method = req.method().as_str();
    let r = |x: Result<Value, HttpResponse>| match x {
        Ok(v) => HttpResponse::Ok().json(v),
        Err(r) => r,
    };
    Some(match (method, rest) {
        ("POST", ["auth_tokens"]) => {
            let name = format!("auth_tokens/{}", random_id(40));
            let value = json!({"name": name});
            insert(fake, key, &name, value.clone());
            HttpResponse::Ok().json(value)
        }
        ("POST", ["cachedContents"]) => {
            if let Err(r) = gemini::check_files(fake, key, body, false) {
                return Some(r);
            }
            let name = format!("cachedContents/{}", random_id(12));
            let now = rfc3339(SystemTime::now());
            let value = json!({
                "name": name,
                "model": body.get("model").cloned().unwrap_or(json!("models/gemini-2.0-flash")),
                "displayName": body.get("displayName").cloned().unwrap_or(json!("")),
                "createTime": now,
                "updateTime": now,
                "expireTime": expiry(body),
                "usageMetadata": {"totalTokenCount": 4096}
            });
            HttpResponse::Ok().json(insert(fake, key, &name, value))
        }
        ("GET", ["cachedContents"]) => list(fake, key, "cachedContents/", "cachedContents"),
        ("GET", ["batches"]) => list(fake, key, "batches/", "operations"),
        ("GET", ["fileSearchStores"]) => list(fake, key, "fileSearchStores/", "fileSearchStores"),
        ("POST", ["fileSearchStores"]) => {
            let name = format!("fileSearchStores/{}", random_id(12));
            let now = rfc3339(SystemTime::now());
            let value = json!({
                "name": name,
                "displayName": body.get("displayName").cloned().unwrap_or(json!("")),
                "createTime": now,
                "updateTime": now
            });
            HttpResponse::Ok().json(insert(fake, key, &name, value))
        }
        (_, ["cachedContents", id]) => {
            let name = format!("cachedContents/{id}");
            match method {
                "GET" => r(owned(fake, key, &name)),
                "DELETE" => match owned(fake, key, &name) {
                    Ok(_) => {
                        fake.lock().resources.remove(&name);
                        HttpResponse::Ok().json(json!({}))
                    }
                    Err(r) => r,
                },
                "PATCH" => match owned(fake, key, &name) {
                    Ok(mut v) => {
                        v["expireTime"] = json!(expiry(body));
                        v["updateTime"] = json!(rfc3339(SystemTime::now()));
                        HttpResponse::Ok().json(insert(fake, key, &name, v))
                    }
                    Err(r) => r,
                },
                _ => not_found(),
            }
        }
        (_, ["batches", id]) => {
            let (id, action) = id.split_once(':').unwrap_or((id, ""));
            let name = format!("batches/{id}");
            match (method, action) {
                ("GET", "") => r(get_batch(fake, key, &name)),
                ("DELETE", "") => match owned(fake, key, &name) {
                    Ok(_) => {
                        fake.lock().resources.remove(&name);
                        HttpResponse::Ok().json(json!({}))
                    }
                    Err(r) => r,
                },
                ("POST", "cancel") => match owned(fake, key, &name) {
                    Ok(mut v) => {
                        v["metadata"]["state"] = json!("BATCH_STATE_CANCELLED");
                        v["done"] = json!(true);
                        insert(fake, key, &name, v);
                        HttpResponse::Ok().json(json!({}))
                    }
                    Err(r) => r,
                },
                _ => not_found(),
            }
        }
        ("GET", ["models", model, "operations", id]) => {
            let name = format!("models/{model}/operations/{id}");
            match owned(fake, key, &name) {
                Ok(v) if v.get("done") == Some(&json!(true)) => HttpResponse::Ok().json(v),
                Ok(_) => {
                    let file = produce_file(fake, key, "video/mp4", "fake video".into());
                    let uri = format!("{}/{ver}/{file}:download?alt=media", base_url(req));
                    let v = json!({
                        "name": name,
                        "done": true,
                        "response": {
                            "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.PredictLongRunningResponse",
                            "generateVideoResponse": {"generatedSamples": [{"video": {"uri": uri}}]}
                        }
                    });
                    HttpResponse::Ok().json(insert(fake, key, &name, v))
                }
                Err(r) => r,
            }
        }
        (_, ["fileSearchStores", id, sub @ ..]) => {
            let (id, action) = id.split_once(':').unwrap_or((id, ""));
            let store = format!("fileSearchStores/{id}");
            if let Err(r) = owned(fake, key, &store) {
                return Some(r);
            }
            match (method, action, sub) {
                ("GET", "", []) => r(owned(fake, key, &store)),
                ("DELETE", "", []) => {
                    fake.lock()
                        .resources
                        .retain(|n, _| n != &store && !n.starts_with(&format!("{store}/")));
                    HttpResponse::Ok().json(json!({}))
                }
                ("POST", "importFile", []) => {
                    let Some(file) = body.get("fileName").and_then(Value::as_str) else {
                        return Some(errors::respond(
                            400,
                            errors::google(
                                400,
                                "fileName is required.",
                                "INVALID_ARGUMENT",
                                json!([]),
                            ),
                            false,
                        ));
                    };
                    if let Err(r) = file_owned(fake, key, file) {
                        return Some(r);
                    }
                    let doc = format!("{store}/documents/{}", random_id(12));
                    insert(
                        fake,
                        key,
                        &doc,
                        json!({"name": doc, "displayName": file, "state": "STATE_ACTIVE", "createTime": rfc3339(SystemTime::now())}),
                    );
                    let op = format!("{store}/operations/{}", random_id(12));
                    let v = json!({
                        "name": op,
                        "done": true,
                        "response": {
                            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.ImportFileResponse",
                            "parent": store,
                            "documentName": doc
                        }
                    });
                    HttpResponse::Ok().json(insert(fake, key, &op, v))
                }
                ("GET", "", ["operations", op]) => {
                    r(owned(fake, key, &format!("{store}/operations/{op}")))
                }
                ("GET", "", ["upload", "operations", op]) => {
                    r(owned(fake, key, &format!("{store}/upload/operations/{op}")))
                }
                ("GET", "", ["documents"]) => {
                    list(fake, key, &format!("{store}/documents/"), "documents")
                }
                ("GET", "", ["documents", doc]) => {
                    r(owned(fake, key, &format!("{store}/documents/{doc}")))
                }
                ("DELETE", "", ["documents", doc]) => {
                    let name = format!("{store}/documents/{doc}");
                    match owned(fake, key, &name) {
                        Ok(_) => {
                            fake.lock().resources.remove(&name);
                            HttpResponse::Ok().json(json!({}))
                        }
                        Err(r) => r,
                    }
                }
                _ => not_found(),
            }
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        let at = UNIX_EPOCH + Duration::from_millis(1_772_323_200_123);
        assert_eq!(rfc3339(at), "2026-03-01T00:00:00.123Z");
    }
}
