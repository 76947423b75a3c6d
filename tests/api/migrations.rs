//! Redis layout migrations: applied once under a lock, refused when newer.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use gemini_balancer::migrations::{apply_with, Migration, MIGRATIONS};
use gemini_balancer::store::{RedisStore, StoreError};
use secrecy::SecretString;

use crate::helpers::*;

/// A test layout 3: counts how often it ran, and takes its time so that a
/// second replica starting at once has to wait for the lock.
fn counting(
    store: &RedisStore,
) -> Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + '_>> {
    Box::pin(async move {
        let mut cmd = deadpool_redis::redis::cmd("INCR");
        cmd.arg(store.key(&["test", "migration-runs"]));
        let _: i64 = store.command(cmd).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(())
    })
}

const WITH_TEST_MIGRATION: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_initial",
        up: MIGRATIONS[0].up,
    },
    Migration {
        version: 2,
        name: "0002_resources",
        up: MIGRATIONS[1].up,
    },
    Migration {
        version: 3,
        name: "0003_test_counter",
        up: counting,
    },
];

fn store(redis: &Redis) -> RedisStore {
    RedisStore::new(
        &SecretString::from(redis.url()),
        "gb",
        Duration::from_secs(2),
        4,
        2,
    )
    .unwrap()
}

#[actix_rt::test]
async fn two_replicas_starting_at_once_apply_a_migration_exactly_once() {
    let redis = Redis::start();
    let (a, b) = (store(&redis), store(&redis));
    let (ra, rb) = futures_util::future::join(
        apply_with(&a, WITH_TEST_MIGRATION),
        apply_with(&b, WITH_TEST_MIGRATION),
    )
    .await;
    assert_eq!((ra.unwrap(), rb.unwrap()), (3, 3));
    assert!(
        redis
            .cmd(&["GET", "gb:test:migration-runs"])
            .contains("\r\n1\r\n"),
        "ran once"
    );
    assert!(redis.cmd(&["GET", "gb:layout"]).contains("\r\n3\r\n"));
    // Applying again is a no-op.
    apply_with(&a, WITH_TEST_MIGRATION).await.unwrap();
    assert!(redis
        .cmd(&["GET", "gb:test:migration-runs"])
        .contains("\r\n1\r\n"));
}

#[actix_rt::test]
async fn a_replica_refuses_a_layout_newer_than_it_knows() {
    let redis = Redis::start();
    apply_with(&store(&redis), WITH_TEST_MIGRATION)
        .await
        .unwrap();
    let url = redis.url();
    let (code, err) = run_gateway_expecting_exit(&[
        ("GB_API_KEYS", "k1"),
        ("GB_AUTH_TOKENS", "t1"),
        ("GB_REDIS_URL", &url),
        ("GB_UPSTREAM_URL", "http://127.0.0.1:9"),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("layout version 3") && err.contains("newer than this build knows (2)"),
        "{err}"
    );
}

#[actix_rt::test]
async fn real_replicas_starting_together_record_the_newest_layout_once() {
    let redis = Redis::start();
    let fake = FakeUpstream::start(&keys(1));
    let gws: Vec<Gateway> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| s.spawn(|| Gateway::start(&fake, Some(&redis), &[])))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let applied = gws
        .iter()
        .map(|g| {
            g.log_text()
                .matches("applied Redis layout migration")
                .count()
        })
        .sum::<usize>();
    assert_eq!(applied, MIGRATIONS.len());
    assert!(redis.cmd(&["GET", "gb:layout"]).contains("\r\n2\r\n"));
}

const GENERATE: &str = "/v1beta/models/gemini-2.0-flash:generateContent";

async fn readyz(gw: &Gateway) -> serde_json::Value {
    let mut resp = client()
        .get(format!("{}/readyz", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "never out of the balancer");
    resp.json().await.unwrap()
}

async fn with_session(gw: &Gateway, sid: &str) -> (u16, serde_json::Value) {
    post_json(
        &format!("{}{GENERATE}", gw.url),
        &generate_body(),
        &[("x-session-id", sid)],
    )
    .await
}

async fn unpinned(gw: &Gateway) -> u16 {
    post_json(&format!("{}{GENERATE}", gw.url), &generate_body(), &[])
        .await
        .0
}

/// Polls `/readyz` (bounded) until its layout reads `want`.
async fn wait_for_layout(gw: &Gateway, want: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let ready = readyz(gw).await;
        if ready["layout"] == want {
            return ready;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "layout never became {want}: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// While the layout is unchecked: degraded but ready, bindings refused with
/// the Gemini 503, unpinned traffic served.
async fn assert_bindings_wait(gw: &Gateway, sid: &str) {
    let ready = readyz(gw).await;
    assert_eq!(ready["layout"], "unchecked", "{ready}");
    assert_eq!(ready["status"], "degraded", "{ready}");
    let (status, v) = with_session(gw, sid).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["status"], "UNAVAILABLE", "{v}");
    assert_eq!(unpinned(gw).await, 200, "unpinned traffic keeps flowing");
}

#[actix_rt::test]
async fn a_replica_started_while_redis_is_down_checks_the_layout_once_redis_is_back() {
    let mut redis = Redis::start();
    redis.stop();
    let fake = FakeUpstream::start(&keys(2));
    let gw = Gateway::start(&fake, Some(&redis), &[("GB_REDIS_TIMEOUT_MS", "300")]);
    assert_bindings_wait(&gw, "while-down").await;

    redis.restart();
    let ready = wait_for_layout(&gw, "compatible").await;
    assert_eq!(ready["layout_version"], MIGRATIONS.len(), "{ready}");
    assert!(redis.cmd(&["GET", "gb:layout"]).contains("\r\n2\r\n"));
    let (status, v) = with_session(&gw, "after-check").await;
    assert_eq!(status, 200, "{v}");
    assert!(redis
        .cmd(&["EXISTS", "gb:session:after-check"])
        .contains(":1"));
}

#[actix_rt::test]
async fn bindings_wait_while_another_replica_holds_the_migration_lock() {
    let redis = Redis::start();
    redis.cmd(&["SET", "gb:lock:migrate", "a-stuck-replica", "PX", "120000"]);
    let fake = FakeUpstream::start(&keys(2));
    let gw = Gateway::start(&fake, Some(&redis), &[]);
    // Redis answers: only the unchecked layout keeps the binding away.
    assert_eq!(readyz(&gw).await["store_up"], true);
    assert_bindings_wait(&gw, "while-locked").await;
    assert!(redis
        .cmd(&["EXISTS", "gb:session:while-locked"])
        .contains(":0"));

    redis.cmd(&["DEL", "gb:lock:migrate"]);
    wait_for_layout(&gw, "compatible").await;
    assert!(redis.cmd(&["GET", "gb:layout"]).contains("\r\n2\r\n"));
    let (status, v) = with_session(&gw, "after-lock").await;
    assert_eq!(status, 200, "{v}");
}

#[actix_rt::test]
async fn a_newer_layout_found_in_the_background_refuses_bindings_for_good() {
    let redis = Redis::start();
    redis.cmd(&["SET", "gb:lock:migrate", "a-newer-replica", "PX", "120000"]);
    let fake = FakeUpstream::start(&keys(2));
    let gw = Gateway::start(&fake, Some(&redis), &[]);
    assert_bindings_wait(&gw, "before").await;

    // The newer replica finishes its migration and releases the lock.
    redis.cmd(&["SET", "gb:layout", "3"]);
    redis.cmd(&["DEL", "gb:lock:migrate"]);
    gw.wait_for_log("REFUSING every request that needs a binding")
        .await;
    let ready = wait_for_layout(&gw, "newer").await;
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert!(
        ready["layout_error"]
            .as_str()
            .unwrap()
            .contains("layout version 3"),
        "{ready}"
    );
    let (status, v) = with_session(&gw, "after").await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(unpinned(&gw).await, 200);
    assert!(redis.cmd(&["GET", "gb:layout"]).contains("\r\n3\r\n"));
    assert!(redis.cmd(&["EXISTS", "gb:session:after"]).contains(":0"));
}
