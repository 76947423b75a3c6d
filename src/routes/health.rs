//! Liveness and readiness.

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::gateway::Gateway;

/// Alive as long as the process answers.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Ready while the replica can serve. A store outage makes it `degraded`,
/// still 200: unpinned traffic keeps flowing, and taking every replica out
/// of the load balancer because Redis blinked would be worse. Only draining
/// (shutdown) makes it 503.
pub async fn readyz(gw: web::Data<Gateway>) -> HttpResponse {
    if gw.draining() {
        return HttpResponse::ServiceUnavailable().json(json!({"status": "draining"}));
    }
    let store = gw.store();
    match store.ping().await {
        Ok(latency) => HttpResponse::Ok().json(json!({
            "status": "ready",
            "store": store.kind(),
            "store_up": true,
            "store_latency_ms": latency.as_secs_f64() * 1000.0,
        })),
        Err(e) => HttpResponse::Ok().json(json!({
            "status": "degraded",
            "store": store.kind(),
            "store_up": false,
            "store_error": e.to_string(),
        })),
    }
}
