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
