//! One suite, both stores: the embedded store must mean what Redis means.

use std::sync::Arc;
use std::time::Duration;

use gemini_balancer::store::{
    MemberState, MemoryStore, Pick, RedisConfig, RedisMode, RedisStore, StateStore,
};
use secrecy::SecretString;

use crate::helpers::{in_every_redis_mode, Deployment, Mode, Redis, RedisEnv};

/// A store on a test deployment, configured as a gateway would be.
pub fn open_store(redis: &dyn RedisEnv, prefix: &str, timeout: Duration) -> RedisStore {
    let env: std::collections::HashMap<String, String> = redis.gateway_env().into_iter().collect();
    let mode = match env.get("GB_REDIS_MODE").map(String::as_str) {
        Some("cluster") => RedisMode::Cluster,
        Some("sentinel") => RedisMode::Sentinel,
        _ => RedisMode::Standalone,
    };
    let url = SecretString::from(env["GB_REDIS_URL"].clone());
    RedisStore::open(&RedisConfig {
        mode,
        url: &url,
        sentinel_master: env
            .get("GB_REDIS_SENTINEL_MASTER")
            .map_or("mymaster", String::as_str),
        prefix,
        timeout,
        pool_size: 4,
        threads: 2,
    })
    .unwrap()
}

fn members(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("m{i}")).collect()
}

async fn suite(store: Arc<dyn StateStore>) {
    let kind = store.kind();
    let ring = members(3);
    // Round-robin, fair.
    let mut hits = [0; 3];
    for _ in 0..30 {
        match store.rotate("r", &ring, &[], 1_000).await.unwrap() {
            Pick::Member(i) => hits[i] += 1,
            other => panic!("{kind}: {other:?}"),
        }
    }
    assert_eq!(hits, [10, 10, 10], "{kind}");

    // Cooling and disabled members are skipped; fairness holds over the rest.
    store
        .set_member_state("r", "m0", Some(&MemberState::Cooling { until_ms: 5_000 }))
        .await
        .unwrap();
    store
        .set_member_state(
            "r",
            "m1",
            Some(&MemberState::Disabled {
                since_ms: 1,
                reason: "api_key_invalid".into(),
            }),
        )
        .await
        .unwrap();
    for _ in 0..5 {
        assert_eq!(
            store.rotate("r", &ring, &[], 1_000).await.unwrap(),
            Pick::Member(2),
            "{kind}"
        );
    }
    assert_eq!(
        store
            .rotate("r", &ring, &["m2".into()], 1_000)
            .await
            .unwrap(),
        Pick::Exhausted,
        "{kind}"
    );
    store
        .set_member_state("r", "m2", Some(&MemberState::Cooling { until_ms: 3_000 }))
        .await
        .unwrap();
    assert_eq!(
        store.rotate("r", &ring, &[], 1_000).await.unwrap(),
        Pick::AllCooling { until_ms: 3_000 },
        "{kind}: the earliest cooldown"
    );
    // Time passes: cooldowns lapse by themselves.
    assert!(
        matches!(
            store.rotate("r", &ring, &[], 6_000).await.unwrap(),
            Pick::Member(0 | 2)
        ),
        "{kind}"
    );
    let states = store.member_states("r").await.unwrap();
    assert!(
        matches!(states.get("m1"), Some(MemberState::Disabled { .. })),
        "{kind}"
    );
    store.set_member_state("r", "m1", None).await.unwrap();
    assert!(
        !store.member_states("r").await.unwrap().contains_key("m1"),
        "{kind}"
    );
    for m in ["m0", "m2"] {
        store
            .set_member_state(
                "r",
                m,
                Some(&MemberState::Disabled {
                    since_ms: 1,
                    reason: String::new(),
                }),
            )
            .await
            .unwrap();
    }
    store
        .set_member_state(
            "r",
            "m1",
            Some(&MemberState::Disabled {
                since_ms: 1,
                reason: String::new(),
            }),
        )
        .await
        .unwrap();
    assert_eq!(
        store.rotate("r", &ring, &[], 1_000).await.unwrap(),
        Pick::AllDisabled,
        "{kind}"
    );

    // Bindings: claim is set-if-absent, concurrent claims agree.
    let ttl = Duration::from_secs(60);
    let claims = futures_util::future::join_all((0..10).map(|i| {
        let store = store.clone();
        async move {
            store
                .claim("session", "s1", &format!("k{i}"), ttl)
                .await
                .unwrap()
        }
    }))
    .await;
    let winner = claims[0].0.clone();
    assert!(
        claims.iter().all(|(v, _)| *v == winner),
        "{kind}: {claims:?}"
    );
    assert_eq!(
        claims.iter().filter(|(_, created)| *created).count(),
        1,
        "{kind}"
    );
    assert_eq!(
        store.touch("session", "s1", ttl).await.unwrap().as_deref(),
        Some(winner.as_str())
    );
    assert_eq!(store.touch("session", "nope", ttl).await.unwrap(), None);
    // Replace is compare-and-set.
    assert_eq!(
        store
            .replace("session", "s1", "not-it", "kx", ttl)
            .await
            .unwrap(),
        winner,
        "{kind}"
    );
    assert_eq!(
        store
            .replace("session", "s1", &winner, "kx", ttl)
            .await
            .unwrap(),
        "kx",
        "{kind}"
    );
    // get_many keeps order and gaps.
    store.put("file", "files/a", "A", ttl).await.unwrap();
    store.put("file", "files/c", "C", ttl).await.unwrap();
    let got = store
        .get_many(
            "file",
            &["files/a".into(), "files/b".into(), "files/c".into()],
        )
        .await
        .unwrap();
    assert_eq!(
        got,
        vec![Some("A".into()), None, Some("C".into())],
        "{kind}"
    );
    store.delete("file", "files/a").await.unwrap();
    assert_eq!(
        store.get_many("file", &["files/a".into()]).await.unwrap(),
        vec![None]
    );
    // Expiry.
    store
        .put("upload", "u", "x", Duration::from_secs(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        store.get_many("upload", &["u".into()]).await.unwrap(),
        vec![None],
        "{kind}: expired"
    );
    // Indexes: newest first, lapsed members gone.
    store
        .index_add("ix", "old", Duration::from_secs(10), 1_000)
        .await
        .unwrap();
    store
        .index_add("ix", "new", Duration::from_secs(20), 1_000)
        .await
        .unwrap();
    store
        .index_add("ix", "short", Duration::from_secs(1), 1_000)
        .await
        .unwrap();
    assert_eq!(
        store.index_members("ix", 5_000).await.unwrap(),
        vec!["new", "old"],
        "{kind}"
    );
    store.index_remove("ix", "new").await.unwrap();
    assert_eq!(
        store.index_members("ix", 5_000).await.unwrap(),
        vec!["old"],
        "{kind}"
    );
    // Locks.
    assert!(store.try_lock("l", "a", ttl).await.unwrap());
    assert!(!store.try_lock("l", "b", ttl).await.unwrap());
    store.unlock("l", "b").await.unwrap();
    assert!(
        !store.try_lock("l", "b", ttl).await.unwrap(),
        "{kind}: only the holder unlocks"
    );
    store.unlock("l", "a").await.unwrap();
    assert!(store.try_lock("l", "b", ttl).await.unwrap());
}

#[actix_rt::test]
async fn embedded_store_passes_the_suite() {
    suite(Arc::new(MemoryStore::new())).await;
}

async fn redis_store_passes_the_suite(mode: Mode) {
    let redis = Deployment::start(mode);
    let store = open_store(&redis, "gbtest", Duration::from_secs(2));
    assert_eq!(store.mode(), format!("{mode:?}").to_lowercase());
    store.ping().await.unwrap();
    suite(Arc::new(store)).await;
    // Everything lives under the prefix; nothing holds a key or token.
    let keys = redis.all_keys();
    assert!(keys.len() >= 5, "{keys:?}");
    for key in keys {
        assert!(key.starts_with("gbtest:"), "{key}");
    }
}

in_every_redis_mode!(redis_store_passes_the_suite);

#[actix_rt::test]
async fn redis_store_fails_fast_when_redis_is_gone() {
    let redis = Redis::start();
    let url = redis.url();
    drop(redis);
    let store = RedisStore::new(
        &SecretString::from(url),
        "gb",
        Duration::from_millis(300),
        2,
        2,
    )
    .unwrap();
    let started = std::time::Instant::now();
    assert!(store.ping().await.is_err());
    assert!(store.rotate("r", &members(2), &[], 0).await.is_err());
    // Not a timing assertion on speed, a bound against hanging forever.
    assert!(started.elapsed() < Duration::from_secs(10));
}
