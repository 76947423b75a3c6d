//! Redis Cluster and Sentinel under traffic (a master killed, slots moved,
//! a sentinel failover), and what holds in every Redis mode: the store's
//! outage, readiness, the cost of a rotation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;

const GENERATE: &str = "/v1beta/models/gemini-2.0-flash:generateContent";
/// The gateways' bound on one Redis call (`GB_REDIS_TIMEOUT_MS`).
const REDIS_TIMEOUT_MS: u64 = 500;
/// A request makes a few store calls one after the other, each bounded by
/// the timeout, and the circuit breaker fails calls at once while open. A
/// request taking longer than this hung on the store.
const HANG_BOUND: Duration = Duration::from_millis(REDIS_TIMEOUT_MS * 6);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Rotation only: flows even while the store is unreachable.
    Unpinned,
    /// Needs its session's binding.
    Session,
    /// Needs its file's owner.
    File,
}

#[derive(Debug, Clone)]
struct Outcome {
    kind: Kind,
    /// Since the traffic started.
    at: Duration,
    took: Duration,
    status: u16,
    body: String,
}

struct Traffic {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Outcome>>,
    t0: Instant,
}

impl Traffic {
    /// Steady load from `workers` concurrent clients over every gateway, in
    /// its own thread and runtime, so the test can block on Redis meanwhile.
    /// Each client pauses 25 ms between requests: a steady load, not a
    /// saturating one, so that tests running beside it keep their share of
    /// the machine.
    fn start(gws: &[Gateway], files: &[String], sessions: &[String], workers: usize) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let urls: Vec<String> = gws.iter().map(|g| g.url.clone()).collect();
        let files = files.to_vec();
        let sessions = sessions.to_vec();
        let t0 = Instant::now();
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let runs = (0..workers).map(|w| {
                    let (urls, files, sessions, flag) =
                        (urls.clone(), files.clone(), sessions.clone(), flag.clone());
                    async move {
                        let mut out = Vec::new();
                        let mut i = w;
                        while !flag.load(Ordering::Relaxed) {
                            let url = format!("{}{GENERATE}", urls[i % urls.len()]);
                            let kind = [Kind::Unpinned, Kind::Session, Kind::File][i % 3];
                            let started = Instant::now();
                            let (status, v) = match kind {
                                Kind::Unpinned => post_json(&url, &generate_body(), &[]).await,
                                Kind::Session => {
                                    let sid = &sessions[(i / 3) % sessions.len()];
                                    post_json(&url, &generate_body(), &[("x-session-id", sid)])
                                        .await
                                }
                                Kind::File => {
                                    let name = &files[(i / 3) % files.len()];
                                    post_json(&url, &file_body(&[name]), &[("x-test-file", name)])
                                        .await
                                }
                            };
                            out.push(Outcome {
                                kind,
                                at: started - t0,
                                took: started.elapsed(),
                                status,
                                body: v.to_string(),
                            });
                            i += 7;
                            actix_rt::time::sleep(Duration::from_millis(25)).await;
                        }
                        out
                    }
                });
                futures_util::future::join_all(runs)
                    .await
                    .into_iter()
                    .flatten()
                    .collect()
            })
        });
        Traffic { stop, handle, t0 }
    }

    fn since_start(&self) -> Duration {
        self.t0.elapsed()
    }

    fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("traffic thread")
    }
}

/// What every disruption must leave true: nothing hung, unpinned traffic
/// never failed, pinned requests either worked or got the store's 503, and
/// no file went to a key that does not own it.
async fn check_common(outcomes: &[Outcome], fake: &FakeUpstream, what: &str) {
    assert!(outcomes.len() > 50, "{what}: too little traffic");
    let slowest = outcomes.iter().map(|o| o.took).max().unwrap_or_default();
    assert!(
        slowest < HANG_BOUND,
        "{what}: a request took {slowest:?} (bound {HANG_BOUND:?})"
    );
    for o in outcomes {
        match o.kind {
            Kind::Unpinned => assert_eq!(o.status, 200, "{what}: unpinned {o:?}"),
            Kind::Session | Kind::File => assert!(
                o.status == 200 || (o.status == 503 && o.body.contains("session store")),
                "{what}: {o:?}"
            ),
        }
    }
    let owners = fake.file_owners().await;
    let seen = fake.requests().await;
    let mut file_calls = 0;
    for r in &seen {
        if let Some(name) = r["headers"]["x-test-file"].as_str() {
            file_calls += 1;
            let key = r["key"].as_str().unwrap_or("");
            assert_eq!(
                key_id(key),
                owners[name],
                "{what}: {name} went to a key that does not own it"
            );
        }
    }
    assert!(
        file_calls > 0,
        "{what}: no file request reached the upstream"
    );
}

/// How long requests needing a binding failed: from the first failure's
/// start to the last failure's end.
fn binding_outage(outcomes: &[Outcome]) -> Option<(Duration, Duration, usize)> {
    let failed: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.kind != Kind::Unpinned && o.status != 200)
        .collect();
    let first = failed.iter().map(|o| o.at).min()?;
    let last = failed.iter().map(|o| o.at + o.took).max()?;
    Some((first, last - first, failed.len()))
}

fn start_gateways(redis: &dyn RedisEnv, fake: &FakeUpstream, n: usize) -> Vec<Gateway> {
    let timeout = REDIS_TIMEOUT_MS.to_string();
    (0..n)
        .map(|_| {
            Gateway::start(
                fake,
                Some(redis),
                &[("GB_REDIS_TIMEOUT_MS", &timeout), ("GB_ADMIN_TOKEN", ADMIN)],
            )
        })
        .collect()
}

/// The key id each session is bound to, from the admin API.
async fn session_keys(gw: &Gateway, sids: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for sid in sids {
        let mut resp = client()
            .get(format!("{}/admin/api/sessions/{sid}", gw.url))
            .insert_header(("authorization", format!("Bearer {ADMIN}")))
            .send()
            .await
            .expect("admin api");
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        out.push(v["key_id"].as_str().unwrap_or("").to_string());
    }
    out
}

async fn upload_files(gw: &Gateway, n: usize) -> Vec<String> {
    let mut files = Vec::new();
    for i in 0..n {
        files.push(
            upload_file(
                &format!("{}/upload/v1beta/files", gw.url),
                None,
                &[],
                format!("file {i}").as_bytes(),
            )
            .await,
        );
    }
    files
}

async fn readyz(gw: &Gateway) -> Value {
    let mut resp = client()
        .get(format!("{}/readyz", gw.url))
        .send()
        .await
        .expect("readyz");
    assert_eq!(resp.status().as_u16(), 200);
    resp.json().await.expect("readyz json")
}

fn sessions(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("failover-session-{i}")).collect()
}

#[actix_rt::test]
async fn a_cluster_master_killed_under_traffic_is_replaced_and_sessions_come_back() {
    let mut cluster = RedisCluster::start();
    let fake = FakeUpstream::start(&keys(4));
    let gws = start_gateways(&cluster, &fake, 2);
    let files = upload_files(&gws[0], 3).await;
    let sids = sessions(12);
    assert_eq!(readyz(&gws[0]).await["store_mode"], "cluster");
    fake.post("/_fake/reset", serde_json::json!({})).await;

    let traffic = Traffic::start(&gws, &files, &sids, 6);
    std::thread::sleep(Duration::from_secs(2));
    let bound_before = session_keys(&gws[0], &sids).await;
    assert!(
        bound_before.iter().all(|k| !k.is_empty()),
        "{bound_before:?}"
    );
    // Sessions spread over every master, each binding on its own slot's.
    let mut holders = std::collections::HashSet::new();
    for sid in &sids {
        let key = format!("gb:session:{sid}");
        let master = cluster.master_of(&key);
        assert!(
            redis_cmd(master, &["EXISTS", &key])
                .unwrap_or_default()
                .contains(":1"),
            "{key} on {master}"
        );
        holders.insert(master);
    }
    assert_eq!(holders.len(), 3, "sessions on every master");
    // The master holding the first session: some sessions and maybe files
    // and the rotation ring live there.
    let victim = cluster.master_of(&format!("gb:session:{}", sids[0]));
    let killed_at = traffic.since_start();
    cluster.kill(victim);
    cluster.wait_healthy(30);
    let promoted_at = traffic.since_start();
    assert!(!cluster.masters().contains(&victim));
    // Sessions come back within a few seconds of the promotion.
    std::thread::sleep(Duration::from_millis(6500));
    let outcomes = traffic.finish();

    check_common(&outcomes, &fake, "cluster master kill").await;
    // The promoted replica had the bindings: every session kept its key.
    assert_eq!(session_keys(&gws[1], &sids).await, bound_before);
    let late_failures: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.at > promoted_at + Duration::from_secs(5) && o.status != 200)
        .collect();
    assert!(
        late_failures.is_empty(),
        "requests still failing 5 s after the promotion: {late_failures:?}"
    );
    let session_ok_after = outcomes
        .iter()
        .filter(|o| o.kind == Kind::Session && o.at > promoted_at && o.status == 200)
        .count();
    assert!(
        session_ok_after > 0,
        "no session served after the promotion"
    );
    let slowest = outcomes.iter().map(|o| o.took).max().unwrap_or_default();
    eprintln!(
        "cluster master kill: killed at {killed_at:?}, promoted at {promoted_at:?}; \
         binding requests failed {:?}; slowest request {slowest:?}; {} requests",
        binding_outage(&outcomes),
        outcomes.len()
    );
    for gw in &gws {
        gw.assert_no_secrets_logged(&fake.keys);
    }
    let ready = readyz(&gws[1]).await;
    assert_eq!(ready["status"], "ready", "{ready}");
}

/// A master whose host vanished: connections to it hang rather than being
/// refused, so the cluster client's view of the slots keeps pointing at it
/// until the replica is promoted and something reads the slots again.
#[actix_rt::test]
async fn a_cluster_master_that_stops_answering_is_replaced_within_a_second_of_the_promotion() {
    let mut cluster = RedisCluster::start();
    let fake = FakeUpstream::start(&keys(4));
    let gws = start_gateways(&cluster, &fake, 2);
    let files = upload_files(&gws[0], 3).await;
    let sids = sessions(12);
    fake.post("/_fake/reset", serde_json::json!({})).await;
    let traffic = Traffic::start(&gws, &files, &sids, 6);
    std::thread::sleep(Duration::from_secs(2));
    let bound_before = session_keys(&gws[0], &sids).await;
    let victim = cluster.master_of(&format!("gb:session:{}", sids[0]));
    let frozen_at = traffic.since_start();
    cluster.freeze(victim);
    cluster.wait_healthy(30);
    let promoted_at = traffic.since_start();
    std::thread::sleep(Duration::from_secs(4));
    let outcomes = traffic.finish();
    let late: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.at > promoted_at + Duration::from_secs(1) && o.status != 200)
        .collect();
    eprintln!(
        "cluster master frozen: at {frozen_at:?}, promoted at {promoted_at:?}; binding \
         requests failed {:?}; {} late; {} requests",
        binding_outage(&outcomes),
        late.len(),
        outcomes.len()
    );
    assert!(
        late.is_empty(),
        "{} requests failed from 1 s after the promotion, the first: {:?}",
        late.len(),
        late.first()
    );
    check_common(&outcomes, &fake, "cluster master frozen").await;
    assert_eq!(session_keys(&gws[1], &sids).await, bound_before);
}

#[actix_rt::test]
async fn live_resharding_under_traffic_fails_no_request() {
    let cluster = RedisCluster::start();
    let fake = FakeUpstream::start(&keys(4));
    let gws = start_gateways(&cluster, &fake, 2);
    let files = upload_files(&gws[0], 3).await;
    let sids = sessions(12);
    fake.post("/_fake/reset", serde_json::json!({})).await;

    // Move the lowest slots of the master holding the rotation ring, up to
    // past the ring's slot (`redis-cli --cluster reshard` takes a source's
    // slots from its lowest), to another master while traffic runs: every
    // unpinned request meets the ring in migration.
    let ring_master = cluster.master_of("gb:{ring:keys}:n");
    let table = cluster.node_table();
    let from = table
        .iter()
        .find(|n| n.port == ring_master)
        .expect("ring master")
        .clone();
    let to = table
        .iter()
        .find(|n| n.master && n.port != ring_master)
        .expect("another master")
        .clone();
    let ring_slot = gemini_balancer::state::keyspace::slot("gb:{ring:keys}:n");
    let mut ranges = from.slots.clone();
    ranges.sort_unstable();
    let owned: u32 = ranges.iter().map(|(a, b)| u32::from(b - a) + 1).sum();
    let below: u32 = ranges
        .iter()
        .map(|(a, b)| {
            u32::from((*b).min(ring_slot).saturating_sub(*a)) + u32::from(*a <= ring_slot)
        })
        .sum();
    let moving = (below + 500).min(owned);

    let traffic = Traffic::start(&gws, &files, &sids, 6);
    std::thread::sleep(Duration::from_secs(1));
    // `redis-cli --cluster reshard` itself can stop half way under load (a
    // slot left open); the cluster is then mended with `--cluster fix` and
    // the rest moved, as an operator would. Either way the traffic meets
    // slots in migration, which is what this test is about.
    let mut left = moving;
    for round in 1..=3 {
        let out = std::process::Command::new("redis-cli")
            .args(["--cluster", "reshard", &format!("127.0.0.1:{}", from.port)])
            .args(["--cluster-from", &from.id, "--cluster-to", &to.id])
            .args(["--cluster-slots", &left.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster reshard");
        if out.status.success() {
            break;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("resharding round {round} stopped: {tail:?} {stderr}");
        // A key that exists on both sides is a broken migration, not load:
        // `fix` would not mend it.
        assert!(
            !text.contains("BUSYKEY") && !stderr.contains("BUSYKEY"),
            "resharding met a key on both nodes: {tail:?} {stderr}"
        );
        assert!(round < 3, "redis-cli --cluster reshard failed three times");
        let fixed = std::process::Command::new("redis-cli")
            .args(["--cluster", "fix", &format!("127.0.0.1:{}", from.port)])
            .arg("--cluster-yes")
            .output()
            .expect("redis-cli --cluster fix");
        assert!(
            fixed.status.success(),
            "redis-cli --cluster fix failed: {} {}",
            String::from_utf8_lossy(&fixed.stdout),
            String::from_utf8_lossy(&fixed.stderr)
        );
        let still: u32 = cluster
            .node_table()
            .iter()
            .find(|n| n.port == from.port)
            .map(|n| {
                n.slots
                    .iter()
                    .map(|(a, b)| {
                        u32::from((*b).min(ring_slot).saturating_sub(*a))
                            + u32::from(*a <= ring_slot)
                    })
                    .sum()
            })
            .unwrap_or(0);
        if still == 0 {
            break;
        }
        left = (still + 500).min(left);
    }
    std::thread::sleep(Duration::from_secs(1));
    let outcomes = traffic.finish();

    assert_eq!(
        cluster.master_of("gb:{ring:keys}:n"),
        to.port,
        "the ring moved"
    );
    check_common(&outcomes, &fake, "resharding").await;
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.status != 200).collect();
    assert!(failed.is_empty(), "failed during resharding: {failed:?}");
    eprintln!(
        "resharding: moved {moving} slots; {} requests, none failed",
        outcomes.len()
    );
}

#[actix_rt::test]
async fn a_sentinel_failover_under_traffic_is_followed() {
    sentinel_failover_under_traffic(false).await;
}

#[actix_rt::test]
async fn a_killed_sentinel_master_is_replaced_under_traffic() {
    sentinel_failover_under_traffic(true).await;
}

/// `SENTINEL FAILOVER`, or (`kill`) the master's death.
async fn sentinel_failover_under_traffic(kill: bool) {
    let mut sentinel = RedisSentinel::start();
    let fake = FakeUpstream::start(&keys(4));
    let gws = start_gateways(&sentinel, &fake, 2);
    let files = upload_files(&gws[0], 3).await;
    let sids = sessions(12);
    assert_eq!(readyz(&gws[0]).await["store_mode"], "sentinel");
    fake.post("/_fake/reset", serde_json::json!({})).await;

    let traffic = Traffic::start(&gws, &files, &sids, 6);
    std::thread::sleep(Duration::from_secs(2));
    let bound_before = session_keys(&gws[0], &sids).await;
    assert!(
        bound_before.iter().all(|k| !k.is_empty()),
        "{bound_before:?}"
    );
    let before = sentinel.master_port().expect("a master");
    let asked_at = traffic.since_start();
    let after = if kill {
        sentinel.kill_data(before);
        sentinel.wait_new_master(before)
    } else {
        sentinel.failover()
    };
    let promoted_at = traffic.since_start();
    assert_ne!(before, after);
    std::thread::sleep(Duration::from_millis(6500));
    let outcomes = traffic.finish();

    check_common(&outcomes, &fake, "sentinel failover").await;
    assert_eq!(
        session_keys(&gws[1], &sids).await,
        bound_before,
        "every session kept its key"
    );
    let late_failures: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.at > promoted_at + Duration::from_secs(5) && o.status != 200)
        .collect();
    assert!(
        late_failures.is_empty(),
        "requests still failing 5 s after the failover: {late_failures:?}"
    );
    // The new master holds the sessions bound before and after.
    assert!(
        redis_cmd(after, &["EXISTS", &format!("gb:session:{}", sids[0])])
            .unwrap_or_default()
            .contains(":1")
    );
    let slowest = outcomes.iter().map(|o| o.took).max().unwrap_or_default();
    eprintln!(
        "sentinel {}: asked at {asked_at:?}, new master at {promoted_at:?}; \
         binding requests failed {:?}; slowest request {slowest:?}; {} requests",
        if kill { "master killed" } else { "failover" },
        binding_outage(&outcomes),
        outcomes.len()
    );
    let ready = readyz(&gws[1]).await;
    assert_eq!(ready["status"], "ready", "{ready}");
}

/// Every server of the deployment gone: unpinned traffic flows, pinned
/// requests get the store's 503 at once, readiness says degraded; the
/// servers back (empty) on their ports are picked up without a restart.
async fn with_the_store_gone_unpinned_traffic_flows(mode: Mode) {
    let mut redis = Deployment::start(mode);
    let fake = FakeUpstream::start(&keys(3));
    let gws = start_gateways(&redis, &fake, 1);
    let gw = &gws[0];
    let name = upload_files(gw, 1).await.remove(0);
    let ready = readyz(gw).await;
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["store_mode"], format!("{mode:?}").to_lowercase());

    redis.stop_all();
    for i in 0..30 {
        let url = format!("{}{GENERATE}", gw.url);
        let started = Instant::now();
        let (status, v) = match i % 3 {
            0 => post_json(&url, &file_body(&[&name]), &[]).await,
            1 => post_json(&url, &generate_body(), &[("x-session-id", "s-outage")]).await,
            _ => post_json(&url, &generate_body(), &[]).await,
        };
        assert!(
            started.elapsed() < HANG_BOUND,
            "{mode:?}: request {i} took {:?}",
            started.elapsed()
        );
        if i % 3 == 2 {
            assert_eq!(status, 200, "{mode:?}: unpinned traffic keeps flowing: {v}");
        } else {
            assert_eq!(status, 503, "{mode:?}: {v}");
            assert!(v["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("session store"));
        }
    }
    let ready = readyz(gw).await;
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert_eq!(ready["store_up"], false);

    redis.restart_all();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = post_json(
            &format!("{}{GENERATE}", gw.url),
            &generate_body(),
            &[("x-session-id", "after-outage")],
        )
        .await;
        let ready = readyz(gw).await;
        if status == 200 && ready["status"] == "ready" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{mode:?}: never recovered: {ready}"
        );
        actix_rt::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(redis
        .cmd(&["EXISTS", "gb:session:after-outage"])
        .contains(":1"));
}

in_every_redis_mode!(with_the_store_gone_unpinned_traffic_flows);

#[actix_rt::test]
async fn a_cluster_node_given_as_a_standalone_url_stops_the_start_naming_the_mode() {
    let cluster = RedisCluster::start();
    let url = format!("redis://127.0.0.1:{}", cluster.nodes[0].port);
    let (code, err) = run_gateway_expecting_exit(&[
        ("GB_API_KEYS", "k1"),
        ("GB_AUTH_TOKENS", "t1"),
        ("GB_REDIS_URL", &url),
        ("GB_UPSTREAM_URL", "http://127.0.0.1:9"),
    ]);
    assert_ne!(code, 0);
    let last = err.trim().lines().last().unwrap_or("");
    assert!(
        last.starts_with("gemini-balancer: GB_REDIS_URL") && last.contains("GB_REDIS_MODE=cluster"),
        "{err}"
    );
}

const ADMIN: &str = "admin-token-for-redis-modes";

/// The admin status page's store line.
async fn admin_store_line(gw: &Gateway) -> String {
    let mut resp = client()
        .get(format!("{}/admin", gw.url))
        .insert_header(("authorization", format!("Bearer {ADMIN}")))
        .send()
        .await
        .expect("admin page");
    assert_eq!(resp.status().as_u16(), 200);
    let page = String::from_utf8_lossy(&resp.body().await.expect("page")).into_owned();
    page.split("id=\"store\">")
        .nth(1)
        .and_then(|rest| rest.split("</b>").next())
        .unwrap_or("")
        .to_string()
}

#[actix_rt::test]
async fn readiness_reports_a_cluster_that_lost_slots_as_degraded() {
    let mut cluster = RedisCluster::start();
    let fake = FakeUpstream::start(&keys(2));
    let gw = Gateway::start(&fake, Some(&cluster), &[("GB_ADMIN_TOKEN", ADMIN)]);
    let ready = readyz(&gw).await;
    assert_eq!(ready["status"], "ready", "{ready}");
    let line = admin_store_line(&gw).await;
    assert!(line.starts_with("redis (cluster) up"), "{line}");
    // A master and its replica gone: a third of the slots has no server.
    let victim = cluster.masters()[0];
    let replica = cluster
        .nodes
        .iter()
        .map(|n| n.port)
        .find(|p| {
            info_field(
                &redis_cmd(*p, &["INFO", "replication"]).unwrap_or_default(),
                "master_port",
            )
            .as_deref()
                == Some(victim.to_string().as_str())
        })
        .expect("the victim's replica");
    cluster.kill(replica);
    cluster.kill(victim);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = readyz(&gw).await;
        if ready["status"] == "degraded" {
            assert_eq!(ready["store_up"], false);
            assert_eq!(ready["store_mode"], "cluster");
            let line = admin_store_line(&gw).await;
            assert!(line.starts_with("redis (cluster) DOWN"), "{line}");
            // And it stays so: no replica can take those slots over.
            for _ in 0..5 {
                actix_rt::time::sleep(Duration::from_millis(300)).await;
                let again = readyz(&gw).await;
                assert_eq!(again["status"], "degraded", "{again}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "still {ready}");
        actix_rt::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Store round trips a replica counted, from its `/metrics`.
async fn store_round_trips(gw: &Gateway) -> f64 {
    let mut r = client()
        .get(format!("{}/metrics", gw.url))
        .send()
        .await
        .expect("metrics");
    let text = String::from_utf8_lossy(&r.body().await.expect("metrics body")).into_owned();
    text.lines()
        .filter(|l| l.starts_with("gb_store_command_latency_seconds_count"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `(port, INCR calls, HGETALL calls)` of every master.
fn rotation_calls(redis: &Deployment) -> Vec<(u16, u64, u64)> {
    let ports = match redis {
        Deployment::Standalone(r) => vec![r.port],
        Deployment::Cluster(c) => c.masters(),
        Deployment::Sentinel(s) => s.master_port().into_iter().collect(),
    };
    ports
        .into_iter()
        .map(|port| {
            let stats = match redis {
                Deployment::Sentinel(s) => s.cmd_on(port, &["INFO", "commandstats"]),
                _ => redis_cmd(port, &["INFO", "commandstats"]).unwrap_or_default(),
            };
            let calls = |cmd: &str| {
                info_field(&stats, &format!("cmdstat_{cmd}"))
                    .and_then(|v| {
                        v.split(',')
                            .find_map(|kv| kv.strip_prefix("calls="))
                            .and_then(|n| n.parse().ok())
                    })
                    .unwrap_or(0)
            };
            (port, calls("incr"), calls("hgetall"))
        })
        .collect()
}

/// A rotation is one command, one round trip, in every mode: the counter's
/// `INCR` carries the ring's state version, so the states are read again
/// only after a change or once the replica's copy is a second old
/// (`state::snapshot`). N unpinned requests cost N round trips, plus those
/// reads and the few of the scrapes and the replica's heartbeat.
async fn an_unpinned_request_costs_one_store_round_trip(mode: Mode) {
    let redis = Deployment::start(mode);
    let fake = FakeUpstream::start(&keys(3));
    let gw = &start_gateways(&redis, &fake, 1)[0];
    let n: u32 = 200;
    let before = store_round_trips(gw).await;
    let calls_before = rotation_calls(&redis);
    let started = std::time::Instant::now();
    for _ in 0..n {
        let (status, v) = post_json(&format!("{}{GENERATE}", gw.url), &generate_body(), &[]).await;
        assert_eq!(status, 200, "{v}");
    }
    let calls_after = rotation_calls(&redis);
    let seconds = started.elapsed().as_secs();
    let trips = store_round_trips(gw).await - before;
    // Every INCR and HGETALL went to one server: the ring's master.
    let busy: Vec<(u16, u64, u64)> = calls_after
        .iter()
        .map(|(port, incr, hgetall)| {
            let (_, incr0, hgetall0) = calls_before
                .iter()
                .find(|(p, _, _)| p == port)
                .copied()
                .unwrap_or((*port, 0, 0));
            (*port, incr - incr0, hgetall - hgetall0)
        })
        .filter(|(_, incr, hgetall)| incr + hgetall > 0)
        .collect();
    assert_eq!(busy.len(), 1, "{mode:?}: {busy:?}");
    assert_eq!(busy[0].1, u64::from(n), "{mode:?}: one INCR a request");
    // No key changed state: the copy is read once, then again only when
    // it is a second old (the bound counts each started second).
    assert!(
        (1..=seconds + 1).contains(&busy[0].2),
        "{mode:?}: {} HGETALL in {seconds} s for {n} requests",
        busy[0].2
    );
    // The re-reads are round trips of their own.
    let rotations = trips - busy[0].2 as f64;
    assert!(
        (f64::from(n)..=f64::from(n) * 1.05).contains(&rotations),
        "{mode:?}: {trips} round trips for {n} requests, {} of them re-reads",
        busy[0].2
    );
    let served = fake.served().await;
    assert!(served.values().all(|c| (66..=68).contains(c)), "{served:?}");
}

in_every_redis_mode!(an_unpinned_request_costs_one_store_round_trip);

#[actix_rt::test]
async fn a_standalone_url_naming_a_replica_is_not_ready() {
    let master = Redis::start();
    let replica_port = free_port();
    let _replica = Redis::spawn_with(
        replica_port,
        &["--replicaof", "127.0.0.1", &master.port.to_string()],
    )
    .expect("replica starts");
    let fake = FakeUpstream::start(&keys(2));
    let gw = Gateway::start_for(
        &fake.url,
        &fake.keys,
        None,
        &[("GB_REDIS_URL", &format!("redis://127.0.0.1:{replica_port}"))],
    );
    let ready = readyz(&gw).await;
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert!(
        ready["store_error"]
            .as_str()
            .unwrap_or("")
            .contains("not a master"),
        "{ready}"
    );
    // Unpinned traffic still flows.
    let (status, v) = post_json(&format!("{}{GENERATE}", gw.url), &generate_body(), &[]).await;
    assert_eq!(status, 200, "{v}");
}

#[actix_rt::test]
async fn sentinel_mode_uses_the_urls_password_for_sentinels_and_data_nodes() {
    let sentinel = RedisSentinel::start_with_password("s3cret-pw");
    let fake = FakeUpstream::start(&keys(2));
    let gw = Gateway::start(&fake, Some(&sentinel), &[]);
    let ready = readyz(&gw).await;
    assert_eq!(ready["status"], "ready", "{ready}");
    let (status, v) = post_json(
        &format!("{}{GENERATE}", gw.url),
        &generate_body(),
        &[("x-session-id", "with-a-password")],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(sentinel
        .cmd(&["EXISTS", "gb:session:with-a-password"])
        .contains(":1"));
    assert!(
        !gw.log_text().contains("s3cret-pw"),
        "the password was logged"
    );
}

#[test]
fn bad_redis_mode_combinations_stop_the_start_with_one_line() {
    for (env, var) in [
        (
            vec![("GB_REDIS_URL", "redis://:pw-9d3f@a:1,redis://:pw-9d3f@b:1")],
            "GB_REDIS_URL",
        ),
        (
            vec![
                ("GB_REDIS_MODE", "cluster"),
                ("GB_REDIS_URL", "redis://:pw-9d3f@a:7000/2"),
            ],
            "GB_REDIS_URL",
        ),
        (vec![("GB_REDIS_MODE", "replicated")], "GB_REDIS_MODE"),
        (vec![("GB_REDIS_MODE", "sentinel")], "GB_REDIS_URL"),
    ] {
        let mut all = vec![("GB_API_KEYS", "k1"), ("GB_AUTH_TOKENS", "t1")];
        all.extend(env.iter().copied());
        let (code, err) = run_gateway_expecting_exit(&all);
        assert_ne!(code, 0, "{env:?}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(var), "{err}");
        assert!(!err.contains("pw-9d3f"), "the password was echoed: {err}");
    }
}

#[actix_rt::test]
async fn readiness_names_the_embedded_store_too() {
    let fake = FakeUpstream::start(&keys(1));
    let gw = Gateway::start(&fake, None, &[]);
    let ready = readyz(&gw).await;
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["store"], "memory");
    assert_eq!(ready["store_mode"], "embedded");
}
