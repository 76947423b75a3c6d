//! The operational routes: `/healthz` (liveness), `/readyz` (readiness: the
//! store answers, the key layout is checked, the replica is not draining)
//! and `/metrics` (Prometheus).

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::domain::gateway::Gateway;
use crate::state::LayoutStatus;

/// Alive as long as the process answers.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Ready while the replica can serve. A store outage, or a key layout not
/// checked yet (or newer than this build knows), makes it `degraded`, still
/// 200: unpinned traffic keeps flowing, and taking every replica out of the
/// load balancer because Redis blinked would be worse. Only draining
/// (shutdown) makes it 503.
pub async fn readyz(gw: web::Data<Gateway>) -> HttpResponse {
    if gw.draining() {
        return HttpResponse::ServiceUnavailable().json(json!({"status": "draining"}));
    }
    let store = gw.store();
    let layout = store.layout();
    let mut body = json!({
        "status": "ready",
        "store": store.kind(),
        "store_mode": store.mode(),
        "layout": layout.name(),
    });
    match &layout {
        LayoutStatus::Compatible { version } if *version > 0 => {
            body["layout_version"] = json!(version);
        }
        LayoutStatus::Compatible { .. } => {}
        LayoutStatus::Unchecked | LayoutStatus::Newer { .. } => body["status"] = json!("degraded"),
    }
    if let LayoutStatus::Newer { reason } = &layout {
        body["layout_error"] = json!(reason);
    }
    match store.ping().await {
        Ok(latency) => {
            body["store_up"] = json!(true);
            body["store_latency_ms"] = json!(latency.as_secs_f64() * 1000.0);
        }
        Err(e) => {
            body["status"] = json!("degraded");
            body["store_up"] = json!(false);
            body["store_error"] = json!(e.to_string());
        }
    }
    HttpResponse::Ok().json(body)
}

/// Prometheus text (OpenMetrics). Key states, cooldowns and store health are
/// read at scrape time, so every replica reports the shared view.
pub async fn metrics(gw: web::Data<Gateway>) -> HttpResponse {
    use crate::ops::metrics::{KeyLabel, KeyState};
    let store = gw.store();
    gw.metrics
        .store_up
        .set(i64::from(store.ping().await.is_ok()));
    gw.metrics.store_layout_refused.set(i64::from(matches!(
        store.layout(),
        LayoutStatus::Newer { .. }
    )));
    gw.metrics.read_fds();
    gw.metrics.read_allocations();
    let states = store.member_states(crate::domain::keys::RING).await;
    // Cleared, filled and encoded by one scrape at a time: another scrape on
    // another worker never sees the key gauges half filled.
    let _one_scrape = gw
        .metrics
        .scrape
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Ok(states) = states {
        let now = crate::state::now_ms();
        // Filled afresh: a key removed by a reload leaves no series behind.
        gw.metrics.key_model_cooling.clear();
        gw.metrics.key_disabled.clear();
        gw.metrics.key_state.clear();
        gw.metrics.key_cooldown.clear();
        for view in gw.keys.view(&states, now) {
            if let Some(reason) = &view.disabled_reason {
                gw.metrics
                    .key_disabled
                    .get_or_create(&crate::ops::metrics::KeyReason {
                        key_id: view.id.clone(),
                        reason: reason.clone(),
                    })
                    .set(1);
            }
            for cooling in &view.model_cooldowns {
                gw.metrics
                    .key_model_cooling
                    .get_or_create(&crate::ops::metrics::KeyModel {
                        key_id: view.id.clone(),
                        model: cooling.model.clone(),
                    })
                    .set(cooling.until_ms.saturating_sub(now).div_ceil(1000) as i64);
            }
            for state in ["healthy", "cooling", "disabled"] {
                gw.metrics
                    .key_state
                    .get_or_create(&KeyState {
                        key_id: view.id.clone(),
                        state,
                    })
                    .set(i64::from(state == view.state));
            }
            let cooldown = view
                .cooldown_until_ms
                .map_or(0, |until| until.saturating_sub(now).div_ceil(1000));
            gw.metrics
                .key_cooldown
                .get_or_create(&KeyLabel { key_id: view.id })
                .set(cooldown as i64);
        }
    }
    if let Some(router) = &gw.proxies {
        for (_, id, up) in router.status() {
            gw.metrics
                .proxy_up
                .get_or_create(&crate::ops::metrics::ProxyLabel { proxy_id: id })
                .set(i64::from(up));
        }
    }
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(gw.metrics.encode())
}
