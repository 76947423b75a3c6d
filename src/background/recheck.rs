//! The periodic re-check of disabled keys: a cheap `models.list` call with
//! each disabled key; a key that works again is re-enabled. One replica runs
//! it per interval, cluster-wide, under a store lock that is left to lapse
//! (so the next interval may run anywhere).

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::HeaderMap;
use actix_web::http::Method;

use crate::domain::gateway::Gateway;
use crate::domain::keys::{ApiKey, RING};
use crate::state::{now_ms, MemberState, Transition};
use crate::upstream::client::{KeyStyle, Upstream};

const LOCK: &str = crate::state::keyspace::lock::RECHECK;

/// Runs forever on the current (actix) runtime.
pub async fn run(gw: Arc<Gateway>, upstream: Upstream, replica: String) {
    let interval = gw.settings.keys.recheck_interval;
    loop {
        tokio::time::sleep(interval).await;
        if gw.draining() {
            return;
        }
        match gw.store().try_lock(LOCK, &replica, interval).await {
            Ok(true) => {
                let n = recheck_once(&gw, &upstream).await;
                if n > 0 {
                    tracing::info!(replica = %replica, re_enabled = n, "re-check of disabled keys done");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e, "re-check skipped"),
        }
    }
}

/// Checks every disabled key once; returns how many were re-enabled.
pub async fn recheck_once(gw: &Gateway, upstream: &Upstream) -> usize {
    let Ok(states) = gw.store().member_states(RING).await else {
        return 0;
    };
    let mut re_enabled = 0;
    for key in gw.keys.keys() {
        // An operator's disable stands until an operator enables the key.
        let upstream_disabled = matches!(states.get(&key.id), Some(s @ MemberState::Disabled { .. }) if !s.is_admin_disabled());
        if upstream_disabled && recheck_key(gw, upstream, &key).await {
            re_enabled += 1;
        }
    }
    re_enabled
}

/// Checks one key now (admin "re-check"): re-enabled if it works and the
/// upstream, not an operator, had disabled it. Returns whether it works.
pub async fn recheck_key(gw: &Gateway, upstream: &Upstream, key: &ApiKey) -> bool {
    let ok = works(gw, upstream, key).await;
    if ok {
        match gw
            .store()
            .transition(RING, &key.id, None, &Transition::Recovered, now_ms())
            .await
        {
            Ok(applied) if applied.before != applied.after => {
                tracing::info!(key_id = %key.id, "re-enabled key: it works again");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(key_id = %key.id, error = %e, "could not re-enable key"),
        }
    }
    ok
}

async fn works(gw: &Gateway, upstream: &Upstream, key: &ApiKey) -> bool {
    let headers = HeaderMap::new();
    let request = crate::domain::attempt::Request {
        method: Method::GET,
        target: crate::domain::attempt::Target::Path("/v1beta/models?pageSize=1"),
        headers: &headers,
        style: KeyStyle::GoogHeader,
        api: "recheck",
        timeout: Some(Duration::from_secs(30)),
    };
    matches!(
        crate::domain::attempt::attempt(
            gw,
            upstream,
            key,
            request,
            crate::domain::attempt::Body::Empty
        )
        .await,
        crate::domain::attempt::Sent::Answer(_)
    )
}
