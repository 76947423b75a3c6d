//! The Files API: resumable and single-shot uploads, get, list, delete, each
//! file visible only to the key that uploaded it.

use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::errors;
use crate::state::{random_id, Fake, FileMeta, Mode, Upload};

fn header<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn base_url(req: &HttpRequest) -> String {
    let scheme = if req.app_config().secure() {
        "https"
    } else {
        "http"
    };
    // HTTP/2 carries the host as the :authority, not a Host header.
    let host = header(req, "host")
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_else(|| "localhost".into());
    format!("{scheme}://{host}")
}

fn upload_error(status: u16, message: &str) -> HttpResponse {
    let mut r = errors::respond(
        status,
        errors::google(
            status,
            message,
            if status == 404 {
                "NOT_FOUND"
            } else {
                "INVALID_ARGUMENT"
            },
            json!([]),
        ),
        false,
    );
    r.headers_mut().insert(
        actix_web::http::header::HeaderName::from_static("x-goog-upload-status"),
        actix_web::http::header::HeaderValue::from_static("final"),
    );
    r
}

pub fn file_json(base: &str, ver: &str, name: &str, meta: &FileMeta) -> Value {
    json!({
        "name": name,
        "displayName": meta.display_name,
        "mimeType": meta.mime_type,
        "sizeBytes": meta.size.to_string(),
        "createTime": meta.created,
        "updateTime": meta.created,
        "expirationTime": "2099-01-01T00:00:00Z",
        "sha256Hash": "ZmFrZQ==",
        "uri": format!("{base}/{ver}/{name}"),
        "state": "ACTIVE",
        "source": "UPLOADED"
    })
}

async fn drain(mut payload: web::Payload) -> Result<(u64, Vec<u8>), HttpResponse> {
    // Counts the bytes and keeps only the first few KiB: uploads of any size
    // cost the fake no memory.
    let mut n = 0u64;
    let mut head = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| upload_error(400, "The upload body could not be read."))?;
        n += chunk.len() as u64;
        if head.len() < 64 * 1024 {
            head.extend_from_slice(&chunk[..chunk.len().min(64 * 1024 - head.len())]);
        }
    }
    Ok((n, head))
}

fn metadata(v: &Value) -> (String, String, Option<u64>) {
    let file = v.get("file").unwrap_or(v);
    let s = |a: &str, b: &str| {
        file.get(a)
            .or_else(|| file.get(b))
            .and_then(|x| x.as_str())
            .unwrap_or("")
            .to_string()
    };
    let size = file
        .get("sizeBytes")
        .or_else(|| file.get("size_bytes"))
        .and_then(|x| {
            x.as_u64()
                .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
        });
    (
        s("displayName", "display_name"),
        s("mimeType", "mime_type"),
        size,
    )
}

fn create_file(
    fake: &Fake,
    key: &str,
    display: String,
    mime: String,
    size: u64,
) -> (String, FileMeta) {
    let name = format!("files/{}", random_id(12));
    let meta = FileMeta {
        owner: key.to_string(),
        display_name: display,
        mime_type: if mime.is_empty() {
            "application/octet-stream".into()
        } else {
            mime
        },
        size,
        created: "2026-01-01T00:00:00.000000Z".into(),
    };
    fake.lock().files.insert(name.clone(), meta.clone());
    (name, meta)
}

/// `POST /upload/{ver}/files` (start or single-shot) and the chunk URL.
pub async fn upload(
    fake: &Fake,
    req: &HttpRequest,
    payload: web::Payload,
    ver: &str,
    key: Option<String>,
) -> HttpResponse {
    let query = req.query_string();
    let upload_id = query
        .split('&')
        .find_map(|p| p.strip_prefix("upload_id="))
        .map(str::to_string);
    let command = header(req, "x-goog-upload-command")
        .unwrap_or("")
        .to_ascii_lowercase();
    let commands: Vec<&str> = command.split(',').map(str::trim).collect();
    if let Some(id) = upload_id {
        return chunk(fake, req, payload, ver, &id, &commands).await;
    }
    let key = match crate::gemini::gate(fake, key, false).await {
        Ok(k) => k,
        Err(mut r) => {
            r.headers_mut().insert(
                actix_web::http::header::HeaderName::from_static("x-goog-upload-status"),
                actix_web::http::header::HeaderValue::from_static("final"),
            );
            return r;
        }
    };
    let protocol = header(req, "x-goog-upload-protocol")
        .unwrap_or("")
        .to_ascii_lowercase();
    if protocol == "resumable" && commands.contains(&"start") {
        let (_, head) = match drain(payload).await {
            Ok(x) => x,
            Err(r) => return r,
        };
        let v: Value = serde_json::from_slice(&head).unwrap_or(json!({}));
        let (display, mime, size) = metadata(&v);
        let id = random_id(40);
        fake.lock().uploads.insert(
            id.clone(),
            Upload {
                key,
                display_name: display,
                mime_type: mime,
                declared: size,
                received: 0,
                done: None,
            },
        );
        let url = format!(
            "{}/upload/{ver}/files?upload_id={id}&upload_protocol=resumable",
            base_url(req)
        );
        return HttpResponse::Ok()
            .insert_header(("x-goog-upload-url", url))
            .insert_header(("x-goog-upload-status", "active"))
            .insert_header(("x-goog-upload-chunk-granularity", "8388608"))
            .finish();
    }
    // Single shot: raw bytes or multipart/related (metadata part, then bytes).
    let mime = header(req, "content-type").unwrap_or("").to_string();
    let (n, _) = match drain(payload).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let (name, meta) = create_file(
        fake,
        &key,
        String::new(),
        if mime.starts_with("multipart") {
            String::new()
        } else {
            mime
        },
        n,
    );
    HttpResponse::Ok().json(json!({"file": file_json(&base_url(req), ver, &name, &meta)}))
}

async fn chunk(
    fake: &Fake,
    req: &HttpRequest,
    payload: web::Payload,
    ver: &str,
    id: &str,
    commands: &[&str],
) -> HttpResponse {
    let Some(upload) = fake.lock().uploads.get(id).cloned() else {
        return upload_error(404, "Upload not found.");
    };
    // A finished upload answers a query, or a repeated finalize, with its
    // file, as the upload service does.
    let finished = upload.done.as_ref().and_then(|name| {
        fake.lock()
            .files
            .get(name)
            .cloned()
            .map(|m| (name.clone(), m))
    });
    if let Some((name, meta)) = finished {
        if commands.contains(&"query") || commands.contains(&"finalize") {
            return HttpResponse::Ok()
                .insert_header(("x-goog-upload-status", "final"))
                .insert_header(("x-goog-upload-size-received", upload.received.to_string()))
                .json(json!({"file": file_json(&base_url(req), ver, &name, &meta)}));
        }
    }
    if commands.contains(&"query") {
        return HttpResponse::Ok()
            .insert_header(("x-goog-upload-status", "active"))
            .insert_header(("x-goog-upload-size-received", upload.received.to_string()))
            .finish();
    }
    if upload.done.is_some() {
        return upload_error(400, "The upload is already finalized.");
    }
    let offset: Option<u64> =
        header(req, "x-goog-upload-offset").and_then(|v| v.trim().parse().ok());
    if offset != Some(upload.received) {
        return upload_error(
            400,
            &format!(
                "Invalid X-Goog-Upload-Offset; expected {}.",
                upload.received
            ),
        );
    }
    let (n, _) = match drain(payload).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let received = upload.received + n;
    if !commands.contains(&"finalize") {
        if let Some(u) = fake.lock().uploads.get_mut(id) {
            u.received = received;
        }
        return HttpResponse::Ok()
            .insert_header(("x-goog-upload-status", "active"))
            .insert_header(("x-goog-upload-size-received", received.to_string()))
            .finish();
    }
    if upload.declared.is_some_and(|d| d != received) {
        return upload_error(400, "The uploaded size does not match the declared size.");
    }
    let (name, meta) = create_file(
        fake,
        &upload.key,
        upload.display_name.clone(),
        upload.mime_type.clone(),
        received,
    );
    let cut = {
        let mut inner = fake.lock();
        if let Some(u) = inner.uploads.get_mut(id) {
            u.received = received;
            u.done = Some(name.clone());
        }
        matches!(inner.modes.get(&upload.key), Some(Mode::CutFinalize))
    };
    let body = json!({"file": file_json(&base_url(req), ver, &name, &meta)}).to_string();
    if cut {
        // The file exists, but its answer breaks off after a few bytes.
        let first = Bytes::from(body.as_bytes()[..8].to_vec());
        let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(first) })
            .chain(futures_util::stream::once(async {
                // Let the head and the first bytes reach the wire first.
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                Err(std::io::Error::other("final answer cut by test switch"))
            }));
        return HttpResponse::Ok()
            .insert_header(("x-goog-upload-status", "final"))
            .content_type("application/json")
            .body(actix_web::body::SizedStream::new(body.len() as u64, stream));
    }
    HttpResponse::Ok()
        .insert_header(("x-goog-upload-status", "final"))
        .content_type("application/json")
        .body(body)
}

/// `GET/DELETE /{ver}/files/{id}` and `GET /{ver}/files`.
pub fn files(
    fake: &Fake,
    req: &HttpRequest,
    ver: &str,
    key: &str,
    id: Option<&str>,
) -> HttpResponse {
    let base = base_url(req);
    let Some(id) = id else {
        let inner = fake.lock();
        let mut list: Vec<Value> = inner
            .files
            .iter()
            .filter(|(_, m)| m.owner == key)
            .map(|(n, m)| file_json(&base, ver, n, m))
            .collect();
        list.sort_by_key(|v| v["name"].as_str().unwrap_or("").to_string());
        return HttpResponse::Ok().json(if list.is_empty() {
            json!({})
        } else {
            json!({"files": list})
        });
    };
    let name = format!("files/{id}");
    let meta = fake.lock().files.get(&name).cloned();
    match meta {
        Some(m) if m.owner == key => {
            if req.method() == actix_web::http::Method::DELETE {
                fake.lock().files.remove(&name);
                HttpResponse::Ok().json(json!({}))
            } else {
                HttpResponse::Ok().json(file_json(&base, ver, &name, &m))
            }
        }
        _ => errors::respond(403, errors::file_denied(id), false),
    }
}
