//! The Live API: a WebSocket that answers `setup` with `setupComplete` and
//! echoes each turn's text with the serving key's id. Keys switched to
//! `invalid` or `quota` are closed before `setupComplete`, as Google does.

use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{CloseCode, CloseReason, Message};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::state::{Fake, Mode};

fn key_id(key: &str) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..6])
}

/// The text of a turn in any of the shapes the SDKs send.
fn turn_text(v: &Value) -> Option<String> {
    let content = v.get("clientContent").or_else(|| v.get("client_content"));
    if let Some(c) = content {
        let mut out = String::new();
        for turn in c
            .get("turns")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for part in turn
                .get("parts")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(t) = part.get("text").and_then(Value::as_str) {
                    out.push_str(t);
                }
            }
        }
        return Some(out);
    }
    let input = v.get("realtimeInput").or_else(|| v.get("realtime_input"))?;
    Some(
        input
            .get("text")
            .and_then(Value::as_str)
            .unwrap_or("(media)")
            .to_string(),
    )
}

pub async fn live(
    fake: web::Data<Fake>,
    req: &HttpRequest,
    payload: web::Payload,
    key: Option<String>,
) -> HttpResponse {
    // `…Constrained` takes an ephemeral token instead of a key.
    let key = if req.path().ends_with("Constrained") {
        req.headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Token "))
            .and_then(|t| crate::resources::token_owner(&fake, t))
    } else {
        key
    };
    let (valid, mode) = {
        let inner = fake.lock();
        let k = key.clone().unwrap_or_default();
        (
            inner.keys.contains(&k),
            inner.modes.get(&k).cloned().unwrap_or_default(),
        )
    };
    let (response, mut session, mut stream) = match actix_ws::handle(req, payload) {
        Ok(x) => x,
        Err(e) => return HttpResponse::BadRequest().body(e.to_string()),
    };
    let key = key.unwrap_or_default();
    actix_web::rt::spawn(async move {
        // Google reads the setup, then closes for a bad key or quota.
        let _setup = stream.recv().await;
        let refusal = if !valid || matches!(mode, Mode::Invalid) {
            Some((
                CloseCode::Invalid,
                "API key not valid. Please pass a valid API key.",
            ))
        } else if matches!(mode, Mode::Quota { .. }) {
            Some((
                CloseCode::Error,
                "You exceeded your current quota, please check your plan and billing details.",
            ))
        } else {
            None
        };
        if let Some((code, text)) = refusal {
            let _ = session
                .close(Some(CloseReason {
                    code,
                    description: Some(text.into()),
                }))
                .await;
            return;
        }
        if session
            .text(json!({"setupComplete": {}}).to_string())
            .await
            .is_err()
        {
            return;
        }
        *fake.lock().live_open.entry(key.clone()).or_insert(0) += 1;
        let id = key_id(&key);
        while let Some(Ok(msg)) = stream.recv().await {
            let text = match msg {
                Message::Text(t) => t.to_string(),
                Message::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
                Message::Ping(p) => {
                    let _ = session.pong(&p).await;
                    continue;
                }
                Message::Close(_) => break,
                _ => continue,
            };
            let Some(said) = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| turn_text(&v))
            else {
                continue;
            };
            crate::gemini::served(&fake, &key);
            let echo = format!("echo from key {id}: {said}");
            // Google reports a turn's tokens with its end, naming the
            // answer's `responseTokenCount`.
            let (prompt, response) = (said.len() as u64, echo.len() as u64);
            let answer = json!({"serverContent": {"modelTurn": {"role": "model", "parts": [{"text": echo}]}}});
            let done = json!({
                "serverContent": {"turnComplete": true},
                "usageMetadata": {
                    "promptTokenCount": prompt,
                    "responseTokenCount": response,
                    "totalTokenCount": prompt + response
                }
            });
            if session.text(answer.to_string()).await.is_err()
                || session.text(done.to_string()).await.is_err()
            {
                break;
            }
        }
        if let Some(n) = fake.lock().live_open.get_mut(&key) {
            *n = n.saturating_sub(1);
        }
        let _ = session.close(None).await;
    });
    response
}
