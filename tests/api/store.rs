//! One suite, both stores: the embedded store must mean what Redis means.

use std::sync::Arc;
use std::time::Duration;

use gemini_balancer::state::{
    apply, IndexEntry, MemberState, MemoryStore, Pick, RedisConfig, RedisMode, RedisStore,
    StateStore, Transition, ADMIN,
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

fn cool(until_ms: u64, reason: &str) -> Transition {
    Transition::Cool {
        until_ms,
        reason: reason.into(),
    }
}

fn disable(reason: &str) -> Transition {
    Transition::Disable {
        reason: reason.into(),
    }
}

/// Applies one transition and checks the store did what the rule says.
async fn set(
    store: &dyn StateStore,
    member: &str,
    model: Option<&str>,
    event: Transition,
    now: u64,
) {
    let applied = store
        .transition("r", member, model, &event, now)
        .await
        .unwrap();
    assert_eq!(
        applied.after,
        apply(
            applied.key_before.as_ref(),
            applied.before.as_ref(),
            &event,
            now
        ),
        "{}: {event:?} on {applied:?}",
        store.kind()
    );
}

async fn suite(store: Arc<dyn StateStore>) {
    let kind = store.kind();
    let ring = members(3);
    // Round-robin, fair.
    let mut hits = [0; 3];
    for _ in 0..30 {
        match store.rotate("r", &ring, &[], None, 1_000).await.unwrap() {
            Pick::Member(i) => hits[i] += 1,
            other => panic!("{kind}: {other:?}"),
        }
    }
    assert_eq!(hits, [10, 10, 10], "{kind}");

    // Cooling and disabled members are skipped; fairness holds over the rest.
    set(&*store, "m0", None, cool(5_000, "per_minute"), 1_000).await;
    set(&*store, "m1", None, disable("api_key_invalid"), 1_000).await;
    for _ in 0..5 {
        assert_eq!(
            store.rotate("r", &ring, &[], None, 1_000).await.unwrap(),
            Pick::Member(2),
            "{kind}"
        );
    }
    assert_eq!(
        store
            .rotate("r", &ring, &["m2".into()], None, 1_000)
            .await
            .unwrap(),
        Pick::Exhausted,
        "{kind}"
    );
    set(&*store, "m2", None, cool(3_000, "per_minute"), 1_000).await;
    assert_eq!(
        store.rotate("r", &ring, &[], None, 1_000).await.unwrap(),
        Pick::AllCooling { until_ms: 3_000 },
        "{kind}: the earliest cooldown"
    );
    // Time passes: cooldowns lapse by themselves.
    assert!(
        matches!(
            store.rotate("r", &ring, &[], None, 6_000).await.unwrap(),
            Pick::Member(0 | 2)
        ),
        "{kind}"
    );
    let states = store.member_states("r").await.unwrap();
    assert!(
        matches!(states.get("m1"), Some(MemberState::Disabled { .. })),
        "{kind}"
    );
    // A cooldown never replaces a disable; the re-check's recovery does.
    set(&*store, "m1", None, cool(9_000, "per_day"), 6_000).await;
    assert!(
        matches!(
            store.member_states("r").await.unwrap().get("m1"),
            Some(MemberState::Disabled { .. })
        ),
        "{kind}"
    );
    set(&*store, "m1", None, Transition::Recovered, 6_000).await;
    assert!(
        !store.member_states("r").await.unwrap().contains_key("m1"),
        "{kind}"
    );
    for m in ["m0", "m1", "m2"] {
        set(&*store, m, None, disable("api_key_invalid"), 6_000).await;
    }
    assert_eq!(
        store.rotate("r", &ring, &[], None, 6_000).await.unwrap(),
        Pick::AllDisabled,
        "{kind}"
    );
    for m in ["m0", "m1", "m2"] {
        set(&*store, m, None, Transition::Enable, 6_000).await;
    }

    // A cooldown for one model hides the member for that model only, and
    // lapses (and is pruned) by itself.
    set(&*store, "m0", Some("pro"), cool(8_000, "per_day"), 6_000).await;
    let mut pro = [0; 3];
    let mut flash = [0; 3];
    for _ in 0..30 {
        if let Pick::Member(i) = store
            .rotate("r", &ring, &[], Some("pro"), 6_000)
            .await
            .unwrap()
        {
            pro[i] += 1;
        }
        if let Pick::Member(i) = store
            .rotate("r", &ring, &[], Some("flash"), 6_000)
            .await
            .unwrap()
        {
            flash[i] += 1;
        }
    }
    assert_eq!(pro[0], 0, "{kind}: m0 is cooling for pro");
    assert_eq!(pro[1] + pro[2], 30, "{kind}");
    assert!(
        flash.iter().all(|n| *n >= 9),
        "{kind}: flash is served by all: {flash:?}"
    );
    assert!(
        store
            .member_states("r")
            .await
            .unwrap()
            .contains_key("m0|pro"),
        "{kind}"
    );
    set(&*store, "m1", None, cool(8_500, "per_minute"), 8_000).await;
    assert!(
        !store
            .member_states("r")
            .await
            .unwrap()
            .contains_key("m0|pro"),
        "{kind}: a lapsed model cooldown is pruned"
    );
    set(&*store, "m1", None, Transition::Enable, 8_000).await;

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
    index_pages(&*store).await;
    limits(&*store).await;
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

/// Client limits and key windows: the same decisions from both stores.
async fn limits(store: &dyn StateStore) {
    use gemini_balancer::state::limits::{
        Ask, Held, KeySettle, KeyWindow, LeaseAsk, LeaseSet, Limit, Settle, Verdict, WindowAsk,
    };
    let kind = store.kind();
    let now = gemini_balancer::state::now_ms();
    let day_ends_ms = now + 3_600_000;
    let ask = |rpm: Option<u64>, id: &'static str, at: u64| Ask {
        rpm,
        tpm: None,
        per_day: Some(10),
        day: "2026-12-03",
        day_ends_ms,
        lease: None,
        request_id: id,
        now_ms: at,
        released: &[],
    };
    assert_eq!(
        store.admit("c", &ask(Some(2), "a", now)).await.unwrap(),
        Verdict::Admitted
    );
    assert_eq!(
        store.admit("c", &ask(Some(2), "b", now + 1)).await.unwrap(),
        Verdict::Admitted
    );
    assert_eq!(
        store
            .admit("c", &ask(Some(2), "c", now + 10_000))
            .await
            .unwrap(),
        Verdict::Refused {
            limit: Limit::Rpm,
            retry_ms: 50_000,
            used: 2,
            allowed: 2
        },
        "{kind}"
    );
    assert_eq!(
        store
            .admit("c", &ask(Some(2), "d", now + 60_000))
            .await
            .unwrap(),
        Verdict::Admitted,
        "{kind}: the first request left the window"
    );
    // Leases: one slot, taken, refused, released, taken again.
    let lease = |id: &'static str| LeaseAsk {
        set: LeaseSet::Concurrent,
        limit: 1,
        id,
        until_ms: now + 20_000,
    };
    let mut with_lease = ask(None, "e", now);
    with_lease.lease = Some(lease("l1"));
    assert_eq!(
        store.admit("c", &with_lease).await.unwrap(),
        Verdict::Admitted
    );
    with_lease.lease = Some(lease("l2"));
    assert!(matches!(
        store.admit("c", &with_lease).await.unwrap(),
        Verdict::Refused {
            limit: Limit::Concurrent,
            ..
        }
    ));
    let held = Held {
        client: "c".into(),
        set: LeaseSet::Concurrent,
        id: "l1".into(),
    };
    store.leases(&[held], &[], 0).await.unwrap();
    assert_eq!(
        store.admit("c", &with_lease).await.unwrap(),
        Verdict::Admitted
    );
    // Tokens per day, settled after the answers.
    store
        .settle(
            &[Settle {
                client: "c".into(),
                tokens: 10,
                day: "2026-12-03".into(),
                per_minute: false,
            }],
            now,
        )
        .await
        .unwrap();
    assert!(matches!(
        store.admit("c", &ask(None, "f", now)).await.unwrap(),
        Verdict::Refused {
            limit: Limit::TokensPerDay,
            used: 10,
            ..
        }
    ));
    let used = store.client_use("c", "2026-12-03", now + 1).await.unwrap();
    assert_eq!(used.requests_last_minute, 2, "{kind}");
    assert_eq!(used.tokens_today, 10, "{kind}");
    assert_eq!(used.concurrent, 1, "{kind}");
    // A lease that lapsed (the store was out of reach past its life) is
    // put back by its holder's renewal: its request is still in flight.
    let l2 = Held {
        client: "c".into(),
        set: LeaseSet::Concurrent,
        id: "l2".into(),
    };
    let lapsed_at = now + 20_001;
    let concurrent = |at| async move {
        store
            .client_use("c", "2026-12-03", at)
            .await
            .unwrap()
            .concurrent
    };
    assert_eq!(concurrent(lapsed_at).await, 0, "{kind}");
    store.leases(&[], &[l2], lapsed_at + 20_000).await.unwrap();
    assert_eq!(
        concurrent(lapsed_at).await,
        1,
        "{kind}: renewed after it lapsed"
    );

    // Key windows: one request a minute each, then full; a full window is
    // passed over, and all full says when the first frees.
    let ring = members(2);
    let w = KeyWindow {
        rpm: 1,
        tpm: 5,
        rpd: 0,
    };
    let wask = |id: &'static str| WindowAsk {
        model: "m",
        day: "2026-12-03",
        day_ends_ms,
        request_id: id,
    };
    let mut picked = Vec::new();
    for (i, id) in ["w1", "w2"].into_iter().enumerate() {
        match store
            .rotate_within("wr", &ring, &[], &[w, w], &wask(id), now + i as u64)
            .await
            .unwrap()
        {
            Pick::Member(m) => picked.push(m),
            other => panic!("{kind}: {other:?}"),
        }
    }
    picked.sort();
    assert_eq!(picked, [0, 1], "{kind}");
    assert_eq!(
        store
            .rotate_within("wr", &ring, &[], &[w, w], &wask("w3"), now + 5)
            .await
            .unwrap(),
        Pick::WindowsFull {
            until_ms: now + 61_000
        },
        "{kind}"
    );
    assert_eq!(
        store
            .rotate_within(
                "wr",
                &ring,
                &["m0".to_string()],
                &[w, w],
                &wask("w4"),
                now + 5
            )
            .await
            .unwrap(),
        Pick::Exhausted,
        "{kind}: a member excluded (tried already) is not looked at, as in `rotate`"
    );
    // Tokens fill a key's window too.
    let later = now + 62_000;
    store
        .settle_keys(
            "wr",
            &[KeySettle {
                member: "m0".into(),
                model: "m".into(),
                tokens: 5,
            }],
            later,
        )
        .await
        .unwrap();
    for id in ["w5", "w6"] {
        assert_eq!(
            store
                .rotate_within("wr", &ring, &[], &[w, w], &wask(id), later)
                .await
                .unwrap(),
            if id == "w5" {
                Pick::Member(1)
            } else {
                Pick::WindowsFull {
                    until_ms: later / 1000 * 1000 + 60_000,
                }
            },
            "{kind} {id}"
        );
    }
    let used = store
        .key_windows("wr", &ring, &wask(""), later)
        .await
        .unwrap();
    assert_eq!(used[0].tokens_last_minute, 5, "{kind}");
    assert_eq!(used[1].requests_last_minute, 1, "{kind}");
    // Requests per day: full until the day ends, then free again.
    let rpd = KeyWindow {
        rpm: 0,
        tpm: 0,
        rpd: 1,
    };
    let one = members(1);
    let day = |date: &'static str, ends: u64, id: &'static str| WindowAsk {
        model: "m",
        day: date,
        day_ends_ms: ends,
        request_id: id,
    };
    let pick = |ask: WindowAsk<'static>, at: u64| {
        let one = one.clone();
        async move {
            store
                .rotate_within("wd", &one, &[], &[rpd], &ask, at)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        pick(day("d1", day_ends_ms, "p1"), now).await,
        Pick::Member(0)
    );
    assert_eq!(
        pick(day("d1", day_ends_ms, "p2"), now + 70_000).await,
        Pick::WindowsFull {
            until_ms: day_ends_ms
        },
        "{kind}"
    );
    assert_eq!(
        pick(day("d2", day_ends_ms + 86_400_000, "p3"), day_ends_ms).await,
        Pick::Member(0),
        "{kind}: a new day"
    );
}

/// Pages of an index: every live member once, in `index_members` order,
/// whatever arrives or leaves between pages.
async fn index_pages(store: &dyn StateStore) {
    let kind = store.kind();
    let members = |page: &[IndexEntry]| page.iter().map(|e| e.member.clone()).collect::<Vec<_>>();
    // m0..m5, m2 and m3 sharing one expiry; one lapsed member.
    for (m, secs) in [("m0", 10), ("m1", 20), ("m2", 30), ("m3", 30), ("m4", 40)] {
        store
            .index_add("pg", m, Duration::from_secs(secs), 1_000)
            .await
            .unwrap();
    }
    store
        .index_add("pg", "gone", Duration::from_secs(1), 1_000)
        .await
        .unwrap();
    let all = store.index_members("pg", 5_000).await.unwrap();
    assert_eq!(all, vec!["m4", "m3", "m2", "m1", "m0"], "{kind}");
    let first = store.index_page("pg", 5_000, None, 2).await.unwrap();
    assert_eq!(members(&first), vec!["m4", "m3"], "{kind}");
    assert_eq!(first[1].expires_ms, 31_000, "{kind}");
    // A newer member arrives and an unseen one leaves between pages.
    store
        .index_add("pg", "m9", Duration::from_secs(90), 2_000)
        .await
        .unwrap();
    store.index_remove("pg", "m1").await.unwrap();
    let second = store
        .index_page("pg", 5_000, first.last(), 2)
        .await
        .unwrap();
    assert_eq!(
        members(&second),
        vec!["m2", "m0"],
        "{kind}: after m3, same expiry first"
    );
    assert!(
        store
            .index_page("pg", 5_000, second.last(), 2)
            .await
            .unwrap()
            .is_empty(),
        "{kind}"
    );
    // A position whose member is gone still resumes in place.
    let gone = IndexEntry {
        member: "m35".into(),
        expires_ms: 31_000,
    };
    assert_eq!(
        members(
            &store
                .index_page("pg", 5_000, Some(&gone), 10)
                .await
                .unwrap()
        ),
        vec!["m3", "m2", "m0"],
        "{kind}"
    );
    // Lapsed members are never listed; an empty or unknown index is empty.
    assert_eq!(
        members(&store.index_page("pg", 25_000, None, 10).await.unwrap()),
        vec!["m9", "m4", "m3", "m2"],
        "{kind}"
    );
    assert!(store
        .index_page("none", 0, None, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .index_page("pg", 5_000, None, 0)
        .await
        .unwrap()
        .is_empty());
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

/// How often each of two members was picked in `n` rotations.
async fn picks(store: &RedisStore, ring: &[String], n: usize) -> [u32; 2] {
    let mut seen = [0; 2];
    for _ in 0..n {
        match store.rotate("r", ring, &[], None, 1_000).await.unwrap() {
            Pick::Member(i) => seen[i] += 1,
            other => panic!("{other:?}"),
        }
    }
    seen
}

/// Each replica keeps its copy of a ring's states while the counter's
/// version is unchanged (`state::snapshot`): a change made by one replica
/// reaches every other replica's very next rotation, and a change written
/// without the version step (a replica of an earlier build) within a second.
async fn a_state_change_reaches_every_replicas_next_rotation(mode: Mode) {
    let redis = Deployment::start(mode);
    let a = open_store(&redis, "gbsnap", Duration::from_secs(2));
    let b = open_store(&redis, "gbsnap", Duration::from_secs(2));
    // Both connected first, so that a's copy is young when b writes: what
    // a sees then comes from the version step, not from the copy's age.
    a.ping().await.unwrap();
    b.ping().await.unwrap();
    let ring = members(2);
    assert_eq!(
        picks(&a, &ring, 4).await,
        [2, 2],
        "{mode:?}: a holds a copy now"
    );
    set(&b, "m0", None, cool(50_000, "per_minute"), 1_000).await;
    assert_eq!(
        picks(&a, &ring, 4).await,
        [0, 4],
        "{mode:?}: b's cooldown, seen by a at once"
    );
    set(&b, "m0", None, Transition::Enable, 1_000).await;
    assert_eq!(
        picks(&a, &ring, 4).await,
        [2, 2],
        "{mode:?}: the lift, seen at once"
    );

    // Written without the step, as a replica of an earlier build does: seen
    // once a's copy is a second old (the deadline only bounds a hang).
    let states = "gbsnap:{ring:r}:s";
    redis.cmd(&[
        "HSET",
        states,
        "m1",
        &MemberState::cooling(50_000, "per_minute").encode(),
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while picks(&a, &ring, 2).await != [2, 0] {
        assert!(
            std::time::Instant::now() < deadline,
            "{mode:?}: a change without the version step was never seen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

in_every_redis_mode!(a_state_change_reaches_every_replicas_next_rotation);

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
    assert!(store.rotate("r", &members(2), &[], None, 0).await.is_err());
    // Not a timing assertion on speed, a bound against hanging forever.
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A small deterministic generator, so a failing sequence can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }

    fn event(&mut self) -> (usize, Option<&'static str>, Transition) {
        let member = self.next(3) as usize;
        let model = [None, Some("gemini-2.5-pro"), Some("gemini-2.5-flash")][self.next(3) as usize];
        let event = match self.next(6) {
            0 | 1 => cool(
                1_000 + self.next(1_000),
                if self.next(2) == 0 {
                    "per_minute"
                } else {
                    "per_day"
                },
            ),
            2 => disable(if self.next(2) == 0 {
                ADMIN
            } else {
                "api_key_invalid"
            }),
            3 => Transition::Enable,
            4 => Transition::Recovered,
            _ => Transition::Lift,
        };
        // Only cooldowns and lifts are scoped to a model.
        let model = match event {
            Transition::Cool { .. } | Transition::Lift => model,
            _ => None,
        };
        (member, model, event)
    }
}

/// Three replicas (three store clients on one Redis) apply random key-state
/// events to the same keys at once. Each transition is atomic, so each one
/// the store reports must be exactly what the rule allows from the state it
/// found: no forbidden transition under any interleaving.
#[actix_rt::test]
async fn concurrent_key_state_transitions_follow_the_rules() {
    let redis = Redis::start();
    let replicas: Vec<RedisStore> = (0..3)
        .map(|_| {
            RedisStore::new(
                &SecretString::from(redis.url()),
                "gbrace",
                Duration::from_secs(5),
                2,
                1,
            )
            .unwrap()
        })
        .collect();
    let mut checked = 0;
    for round in 0..20u64 {
        let now = 1_000 + round * 100;
        let runs = replicas.iter().enumerate().map(|(r, store)| async move {
            let mut rng = Lcg(round * 31 + r as u64);
            let mut seen = Vec::new();
            for _ in 0..20 {
                let (member, model, event) = rng.event();
                let m = format!("m{member}");
                let applied = store.transition("r", &m, model, &event, now).await.unwrap();
                seen.push((event, applied));
            }
            seen
        });
        for seen in futures_util::future::join_all(runs).await {
            for (event, applied) in seen {
                let want = apply(
                    applied.key_before.as_ref(),
                    applied.before.as_ref(),
                    &event,
                    now,
                );
                assert_eq!(
                    applied.after, want,
                    "round {round}: {event:?} on {applied:?}"
                );
                if let Some(before @ MemberState::Disabled { .. }) = &applied.before {
                    let may_leave = matches!(event, Transition::Enable)
                        || (matches!(event, Transition::Recovered) && !before.is_admin_disabled());
                    if !may_leave {
                        assert!(
                            matches!(applied.after, Some(MemberState::Disabled { .. })),
                            "{event:?} on {applied:?}"
                        );
                    }
                    if before.is_admin_disabled() && event != Transition::Enable {
                        assert_eq!(applied.after.as_ref(), Some(before), "{event:?}");
                    }
                }
                checked += 1;
            }
        }
        // Every replica reads the same states afterwards.
        let first = replicas[0].member_states("r").await.unwrap();
        for other in &replicas[1..] {
            assert_eq!(other.member_states("r").await.unwrap(), first);
        }
    }
    assert_eq!(checked, 20 * 3 * 20);
}

/// The embedded store and Redis give the same states for the same sequence.
#[actix_rt::test]
async fn both_stores_agree_on_a_sequence_of_key_events() {
    let redis = Redis::start();
    let redis_store = RedisStore::new(
        &SecretString::from(redis.url()),
        "gbseq",
        Duration::from_secs(5),
        2,
        1,
    )
    .unwrap();
    let memory = MemoryStore::new();
    let mut rng = Lcg(7);
    for step in 0..300u64 {
        let now = 1_000 + step * 7;
        let (member, model, event) = rng.event();
        let m = format!("m{member}");
        let a = redis_store
            .transition("r", &m, model, &event, now)
            .await
            .unwrap();
        let b = memory
            .transition("r", &m, model, &event, now)
            .await
            .unwrap();
        assert_eq!(a, b, "step {step}: {event:?}");
    }
    assert_eq!(
        redis_store.member_states("r").await.unwrap(),
        memory.member_states("r").await.unwrap()
    );
}

/// Every key and value the gateway writes to Redis, through every kind of
/// request, is free of real keys and client or admin tokens.
#[actix_rt::test]
async fn nothing_the_gateway_writes_to_redis_holds_a_key_or_a_token() {
    use crate::helpers::*;
    use serde_json::json;
    let redis = Redis::start();
    let ks = keys(3);
    let fake = FakeUpstream::start(&ks[..2]); // the third key is invalid
    let admin = "admin-token-scanned-for";
    let gw = Gateway::start_for(&fake.url, &ks, Some(&redis), &[("GB_ADMIN_TOKEN", admin)]);
    let generate = format!("{}/v1beta/models/gemini-2.0-flash:generateContent", gw.url);
    for _ in 0..4 {
        post_json(&generate, &generate_body(), &[]).await;
    }
    post_json(
        &generate,
        &generate_body(),
        &[("x-session-id", "scan-session")],
    )
    .await;
    let upload = format!("{}/upload/v1beta/files", gw.url);
    let a = upload_file(&upload, None, &[], b"a").await;
    let b = upload_file(&upload, None, &[("x-session-id", "scan-session")], b"b").await;
    post_json(&generate, &file_body(&[&a]), &[]).await;
    post_json(&generate, &file_body(&[&b]), &[]).await;
    fake.set_mode(
        &ks[0],
        json!({"mode": "quota", "model": "gemini-2.0-flash", "retryDelay": "30s"}),
    )
    .await;
    for _ in 0..3 {
        post_json(&generate, &generate_body(), &[]).await;
    }
    let login = client()
        .post(format!("{}/admin/login", gw.url))
        .send_form(&[("token", admin)])
        .await
        .unwrap();
    assert_eq!(login.status().as_u16(), 303);
    // Counters reach Redis on the statistics flush.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !redis.cmd(&["KEYS", "gb:stats:*"]).contains("gb:stats:") {
        assert!(
            std::time::Instant::now() < deadline,
            "statistics never flushed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let names: Vec<String> = redis
        .cmd(&["KEYS", "*"])
        .lines()
        .filter(|l| !l.starts_with('*') && !l.starts_with('$'))
        .map(str::to_string)
        .collect();
    let mut dump = String::new();
    for name in &names {
        let kind = redis.cmd(&["TYPE", name]);
        let value = match kind.trim().trim_start_matches('+') {
            "string" => redis.cmd(&["GET", name]),
            "hash" => redis.cmd(&["HGETALL", name]),
            "zset" => redis.cmd(&["ZRANGE", name, "0", "-1", "WITHSCORES"]),
            "set" => redis.cmd(&["SMEMBERS", name]),
            "list" => redis.cmd(&["LRANGE", name, "0", "-1"]),
            other => panic!("{name} has an unexpected type {other}"),
        };
        dump.push_str(&format!("{name} => {value}\n"));
    }
    for kind in [
        "session",
        "upload",
        "file",
        "ring",
        "stats",
        "admin-session",
    ] {
        assert!(
            dump.contains(&format!("gb:{kind}")) || dump.contains(&format!("gb:{{{kind}")),
            "the scan saw {kind} data:\n{dump}"
        );
    }
    for secret in ks.iter().map(String::as_str).chain([TOKEN, TOKEN_B, admin]) {
        assert!(!dump.contains(secret), "Redis holds a secret:\n{dump}");
    }
}
