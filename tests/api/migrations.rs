//! Redis layout migrations: applied once under a lock, refused when newer.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use gemini_balancer::state::migrations::{apply_with, Migration, MIGRATIONS};
use gemini_balancer::state::{RedisStore, StoreError};
use secrecy::SecretString;
use serde_json::json;

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

/// A test layout 3 that marks every file record, and dies half-way the first
/// time (while `gb:test:die` exists), as a replica killed mid-step would.
fn marking(
    store: &RedisStore,
) -> Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + '_>> {
    Box::pin(async move {
        for i in 0..4 {
            if i == 2 {
                let mut del = deadpool_redis::redis::cmd("DEL");
                del.arg(store.key(&["test", "die"]));
                let died: i64 = store.command(del).await?;
                if died == 1 {
                    return Err(StoreError::Unavailable("killed half-way".into()));
                }
            }
            // Idempotent: a record marked before the death is marked again,
            // to the same value.
            let mut set = deadpool_redis::redis::cmd("HSET");
            set.arg(store.key(&["test", "marked"]))
                .arg(i.to_string())
                .arg("3");
            let _: i64 = store.command(set).await?;
            let mut runs = deadpool_redis::redis::cmd("HINCRBY");
            runs.arg(store.key(&["test", "runs"]))
                .arg(i.to_string())
                .arg(1);
            let _: i64 = store.command(runs).await?;
        }
        Ok(())
    })
}

const WITH_A_STEP_THAT_DIES: &[Migration] = &[
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
        name: "0003_test_marking",
        up: marking,
    },
];

#[actix_rt::test]
async fn a_migration_that_died_half_way_runs_again_to_the_end() {
    let redis = Redis::start();
    let s = store(&redis);
    redis.cmd(&["SET", "gb:test:die", "1"]);
    let err = apply_with(&s, WITH_A_STEP_THAT_DIES).await.unwrap_err();
    assert!(err.to_string().contains("killed half-way"), "{err}");
    // Half done: the steps before it are recorded, its own version is not,
    // and the lock is free for the next replica.
    assert_eq!(redis.cmd(&["GET", "gb:layout"]), "$1\r\n2\r\n");
    assert_eq!(redis.cmd(&["HLEN", "gb:test:marked"]).trim(), ":2");
    assert_eq!(redis.cmd(&["EXISTS", "gb:lock:migrate"]).trim(), ":0");
    // The next replica's start runs the step again, to the end.
    assert_eq!(apply_with(&s, WITH_A_STEP_THAT_DIES).await.unwrap(), 3);
    assert_eq!(redis.cmd(&["GET", "gb:layout"]), "$1\r\n3\r\n");
    assert_eq!(redis.cmd(&["HLEN", "gb:test:marked"]).trim(), ":4");
    let runs = resp_strings(&redis.cmd(&["HGETALL", "gb:test:runs"]));
    assert_eq!(
        runs,
        ["0", "2", "1", "2", "2", "1", "3", "1"],
        "re-run from the start"
    );
    // And never again.
    apply_with(&s, WITH_A_STEP_THAT_DIES).await.unwrap();
    assert_eq!(redis.cmd(&["HGET", "gb:test:runs", "3"]), "$1\r\n1\r\n");
}

#[actix_rt::test]
async fn a_migration_lock_held_by_another_replica_times_out_without_migrating() {
    let redis = Redis::start();
    // A replica that took the lock and hangs (its lease far from over).
    redis.cmd(&["SET", "gb:lock:migrate", "someone-else", "EX", "600"]);
    let err = apply_with(&store(&redis), WITH_TEST_MIGRATION)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("the migration lock stayed taken for 30 s"),
        "{err}"
    );
    assert_eq!(redis.cmd(&["EXISTS", "gb:layout"]).trim(), ":0");
    assert_eq!(
        redis.cmd(&["EXISTS", "gb:test:migration-runs"]).trim(),
        ":0"
    );
    assert_eq!(
        redis.cmd(&["GET", "gb:lock:migrate"]),
        "$12\r\nsomeone-else\r\n",
        "another replica's lock is left alone"
    );
}

#[actix_rt::test]
async fn an_old_replica_keeps_serving_while_a_newer_one_migrates_and_a_fresh_prefix_rolls_back() {
    let redis = Redis::start();
    let fake = FakeUpstream::start(&keys(3));
    let old = Gateway::start(&fake, Some(&redis), &[]);
    let name = upload_file(
        &format!("{}/upload/v1beta/files", old.url),
        None,
        &[("x-session-id", "before-upgrade")],
        b"kept",
    )
    .await;
    let owner = fake.owner_key(&name).await;
    // A newer build starts on the same Redis and moves the layout on.
    assert_eq!(
        apply_with(&store(&redis), WITH_TEST_MIGRATION)
            .await
            .unwrap(),
        3
    );
    assert_eq!(redis.cmd(&["GET", "gb:layout"]), "$1\r\n3\r\n");
    // The replica of the older build that was already serving carries on:
    // its file and session bindings still route, new ones are written.
    fake.post("/_fake/reset", json!({})).await;
    for body in [file_body(&[&name]), generate_body()] {
        let (status, v) = post_json(
            &format!("{}/v1beta/models/gemini-2.0-flash:generateContent", old.url),
            &body,
            &[("x-session-id", "before-upgrade")],
        )
        .await;
        assert_eq!(status, 200, "{v}");
    }
    let (status, v) = post_json(
        &format!("{}/v1beta/models/gemini-2.0-flash:generateContent", old.url),
        &generate_body(),
        &[("x-session-id", "during-upgrade")],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let served: Vec<String> = fake
        .requests()
        .await
        .iter()
        .take(2)
        .map(|r| r["key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(served, [owner.clone(), owner]);
    assert_eq!(
        redis.cmd(&["EXISTS", "gb:session:during-upgrade"]).trim(),
        ":1"
    );
    // Another replica of the older build refuses to start on that layout...
    let url = redis.url();
    let ks = fake.keys.join(",");
    let upstream = fake.url.clone();
    let (code, err) = run_gateway_expecting_exit(&[
        ("GB_API_KEYS", &ks),
        ("GB_AUTH_TOKENS", TOKEN),
        ("GB_REDIS_URL", &url),
        ("GB_UPSTREAM_URL", &upstream),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("GB_REDIS_PREFIX"), "{err}");
    // ...and rolls back on a fresh prefix, beside the newer layout.
    let back = Gateway::start(&fake, Some(&redis), &[("GB_REDIS_PREFIX", "gb-rollback")]);
    let (status, v) = post_json(
        &format!(
            "{}/v1beta/models/gemini-2.0-flash:generateContent",
            back.url
        ),
        &generate_body(),
        &[("x-session-id", "after-rollback")],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(redis.cmd(&["GET", "gb-rollback:layout"]), "$1\r\n2\r\n");
    assert_eq!(
        redis
            .cmd(&["EXISTS", "gb-rollback:session:after-rollback"])
            .trim(),
        ":1"
    );
    assert_eq!(redis.cmd(&["GET", "gb:layout"]), "$1\r\n3\r\n", "untouched");
}

#[actix_rt::test]
async fn records_written_in_layout_1_are_read_after_the_upgrade_to_layout_2() {
    let redis = Redis::start();
    let ks = keys(3);
    let fake = FakeUpstream::start(&ks);
    // A file of key 2, recorded by a replica of layout 1 (no `created`),
    // and key 0 cooling in layout 1's form.
    let name = upload_file(
        &format!("{}/upload/v1beta/files", fake.url),
        None,
        &[("x-goog-api-key", &ks[2])],
        b"from layout 1",
    )
    .await;
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 600_000;
    let record = json!({"key": key_id(&ks[2]), "owner": key_id(TOKEN)}).to_string();
    redis.cmd(&["SET", "gb:layout", "1"]);
    redis.cmd(&["SET", &format!("gb:file:{name}"), &record]);
    redis.cmd(&[
        "HSET",
        "gb:{ring:keys}:s",
        &key_id(&ks[0]),
        &format!("c:{until}"),
    ]);
    let gw = Gateway::start(&fake, Some(&redis), &[]);
    assert_eq!(redis.cmd(&["GET", "gb:layout"]), "$1\r\n2\r\n");
    let log = gw.log_text();
    assert!(log.contains("migration=\"0002_resources\""), "{log}");
    assert!(!log.contains("migration=\"0001_initial\""), "{log}");
    fake.post("/_fake/reset", json!({})).await;
    let (status, v) = post_json(
        &format!("{}/v1beta/models/gemini-2.0-flash:generateContent", gw.url),
        &file_body(&[&name]),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let seen = fake.requests().await;
    assert_eq!(seen.len(), 1, "straight to its owner, no lookup: {seen:?}");
    assert_eq!(seen[0]["key"], ks[2].as_str());
    for _ in 0..6 {
        let (status, v) = post_json(
            &format!("{}/v1beta/models/gemini-2.0-flash:generateContent", gw.url),
            &generate_body(),
            &[],
        )
        .await;
        assert_eq!(status, 200, "{v}");
    }
    assert!(
        fake.requests()
            .await
            .iter()
            .all(|r| r["key"] != ks[0].as_str()),
        "a key cooling in layout 1's form gets no traffic"
    );
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
