//! Outbound proxies: every key through one proxy, the same on every replica;
//! a stopped proxy moves only its keys; no credential in any log line.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::*;

const GENERATE: &str = "/v1beta/models/gemini-2.0-flash:generateContent";
const SECRETS: [&str; 2] = ["pw-for-http", "pw-for-socks"];
const IPS: [&str; 3] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];

struct Setup {
    _pki: Pki,
    _redis: Redis,
    fake: FakeUpstream,
    proxies: Vec<TestProxy>,
    gws: Vec<Gateway>,
    ks: Vec<String>,
    /// `GB_PROXIES` as given to the gateways.
    list: String,
}

fn setup(proxy_cooldown: &str) -> Setup {
    let pki = Pki::new();
    let redis = Redis::start();
    let ks = keys(6);
    let fake = pki.fake(&ks);
    let proxies = vec![
        TestProxy::start("http", IPS[0], Some("alice:pw-for-http"), 0),
        TestProxy::start("socks5", IPS[1], Some("bob:pw-for-socks"), 0),
        TestProxy::start("http", IPS[2], None, 0),
    ];
    let list = format!(
        "http://alice:pw-for-http@127.0.0.1:{},socks5://bob:pw-for-socks@127.0.0.1:{},http://127.0.0.1:{}",
        proxies[0].port, proxies[1].port, proxies[2].port
    );
    let port = fake.url.rsplit(':').next().unwrap().to_string();
    let upstream = format!("https://localhost:{port}");
    let ca = pki.path("ca.pem");
    let gws = (0..2)
        .map(|_| {
            Gateway::start_for(
                &upstream,
                &ks,
                Some(&redis),
                &[
                    ("GB_UPSTREAM_CA_FILE", &ca),
                    ("GB_PROXIES", &list),
                    ("GB_PROXY_COOLDOWN", proxy_cooldown),
                    ("GB_ADMIN_TOKEN", "proxy-admin"),
                ],
            )
        })
        .collect();
    Setup {
        _pki: pki,
        _redis: redis,
        fake,
        proxies,
        gws,
        ks,
        list,
    }
}

/// key → the set of source IPs (proxies) its requests came from.
async fn routes(fake: &FakeUpstream) -> HashMap<String, HashSet<String>> {
    let mut out: HashMap<String, HashSet<String>> = HashMap::new();
    for r in fake.requests().await {
        if let Some(k) = r["key"].as_str() {
            out.entry(k.to_string())
                .or_default()
                .insert(r["peer"].as_str().unwrap_or("").to_string());
        }
    }
    out
}

async fn traffic(s: &Setup, n: usize) {
    for i in 0..n {
        let (status, v) = post_json(
            &format!("{}{GENERATE}", s.gws[i % 2].url),
            &generate_body(),
            &[],
        )
        .await;
        assert_eq!(status, 200, "{v}");
    }
}

#[actix_rt::test]
async fn every_key_leaves_through_one_proxy_on_every_replica() {
    let s = setup("2");
    traffic(&s, 24).await;
    for i in 0..4 {
        let mut resp = client()
            .post(format!(
                "{}/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
                s.gws[i % 2].url
            ))
            .insert_header(("x-goog-api-key", TOKEN))
            .send_json(&generate_body())
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert!(String::from_utf8_lossy(&resp.body().await.unwrap()).contains("chunk 2"));
    }
    let name = upload_file(
        &format!("{}/upload/v1beta/files", s.gws[0].url),
        Some(&s.gws[1].url),
        &[],
        b"via proxy",
    )
    .await;
    let (status, v) = post_json(
        &format!("{}{GENERATE}", s.gws[1].url),
        &file_body(&[&name]),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{v}");

    let routes = routes(&s.fake).await;
    assert_eq!(routes.len(), s.ks.len(), "every key was used: {routes:?}");
    // Each key leaves through its home proxy on the consistent-hash ring,
    // the same on both replicas.
    let specs = s
        .list
        .split(',')
        .map(|u| gemini_balancer::upstream::proxy::parse(u).unwrap())
        .collect();
    let ring = gemini_balancer::upstream::proxy::ProxyRouter::new(specs, Duration::from_secs(30));
    for (key, ips) in &routes {
        let home = IPS[ring.home(&key_id(key)).unwrap()];
        assert_eq!(
            ips.iter().map(String::as_str).collect::<Vec<_>>(),
            [home],
            "key {} never leaves through another proxy, never direct",
            key_id(key)
        );
    }
    let used: HashSet<&String> = routes.values().flatten().collect();
    for (i, p) in s.proxies.iter().enumerate() {
        if used.contains(&IPS[i].to_string()) {
            assert!(p.tunnel_count() > 0, "proxy {i} carried its keys' tunnels");
        }
    }
    // Admin and metrics show proxies without credentials.
    let mut r = client()
        .get(format!("{}/admin/api/proxies", s.gws[0].url))
        .insert_header(("authorization", "Bearer proxy-admin"))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["proxies"].as_array().unwrap().len(), 3);
    let mut m = client()
        .get(format!("{}/metrics", s.gws[0].url))
        .send()
        .await
        .unwrap();
    let metrics = String::from_utf8(m.body().await.unwrap().to_vec()).unwrap();
    assert!(metrics.contains("gb_proxy_requests_total"));
    for p in v["proxies"].as_array().unwrap() {
        let line = format!(
            "gb_proxy_up{{proxy_id=\"{}\"}} 1",
            p["id"].as_str().unwrap()
        );
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
    for secret in SECRETS {
        assert!(!v.to_string().contains(secret) && !metrics.contains(secret));
        for gw in &s.gws {
            assert!(
                !gw.log_text().contains(secret),
                "a proxy credential was logged"
            );
        }
    }
}

#[actix_rt::test]
async fn stopping_a_proxy_moves_only_its_keys_and_restarting_brings_them_back() {
    let mut s = setup("2");
    traffic(&s, 24).await;
    let before: HashMap<String, String> = routes(&s.fake)
        .await
        .into_iter()
        .map(|(k, ips)| (k, ips.into_iter().next().unwrap()))
        .collect();
    // Stop the proxy that carries the most keys.
    let victim = (0..3)
        .max_by_key(|i| before.values().filter(|ip| *ip == IPS[*i]).count())
        .unwrap();
    let victim_ip = IPS[victim].to_string();
    let port = s.proxies[victim].port;
    let kind = if victim == 1 { "socks5" } else { "http" };
    let auth = [Some("alice:pw-for-http"), Some("bob:pw-for-socks"), None][victim];
    drop(std::mem::replace(
        &mut s.proxies[victim],
        TestProxy::start("http", "127.0.0.9", None, 0),
    ));
    s.fake.post("/_fake/reset", json!({})).await;
    traffic(&s, 36).await;
    let during = routes(&s.fake).await;
    for (key, ips) in &during {
        if before[key] == victim_ip {
            assert!(
                !ips.contains(&victim_ip),
                "a key of the stopped proxy moved"
            );
        } else {
            assert_eq!(
                ips,
                &HashSet::from([before[key].clone()]),
                "a key of a healthy proxy stayed"
            );
        }
    }
    // Restart it on its port: after its cooldown its keys come back.
    s.proxies[victim] = TestProxy::start(kind, &victim_ip, auth, port);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        s.fake.post("/_fake/reset", json!({})).await;
        traffic(&s, 12).await;
        let now = routes(&s.fake).await;
        let back = now
            .iter()
            .filter(|(k, _)| before[*k] == victim_ip)
            .all(|(_, ips)| ips == &HashSet::from([victim_ip.clone()]));
        if back && now.keys().any(|k| before[k] == victim_ip) {
            break;
        }
        assert!(Instant::now() < deadline, "keys never came back: {now:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for gw in &s.gws {
        for secret in SECRETS {
            assert!(
                !gw.log_text().contains(secret),
                "a proxy credential was logged"
            );
        }
    }
}

#[actix_rt::test]
async fn an_egress_ip_throttle_moves_the_proxys_keys_instead_of_cooling_them() {
    let s = setup("60");
    traffic(&s, 24).await;
    let before: HashMap<String, String> = routes(&s.fake)
        .await
        .into_iter()
        .map(|(k, ips)| (k, ips.into_iter().next().unwrap()))
        .collect();
    let throttled_ip = before.values().next().unwrap().clone();
    let behind: Vec<&String> = before
        .iter()
        .filter(|(_, ip)| **ip == throttled_ip)
        .map(|(k, _)| k)
        .collect();
    // Google throttles that proxy's egress IP: every key behind it gets 429.
    s.fake
        .post(
            &format!("/_fake/throttle/{throttled_ip}"),
            json!({"on": true}),
        )
        .await;
    // While the 429s arrive, requests are retried on other keys; a request
    // may still meet the throttle on every attempt, so any answer is fine here.
    for i in 0..24 {
        let (status, v) = post_json(
            &format!("{}{GENERATE}", s.gws[i % 2].url),
            &generate_body(),
            &[],
        )
        .await;
        assert!(status == 200 || status == 429, "{status}: {v}");
    }
    s.fake.post("/_fake/reset", json!({})).await;
    traffic(&s, 24).await;
    let after = routes(&s.fake).await;
    for k in &behind {
        let ips = after.get(*k).unwrap_or_else(|| {
            panic!(
                "key {} got no traffic: its cooldown was not lifted",
                key_id(k)
            )
        });
        assert!(
            !ips.contains(&throttled_ip),
            "moved off the throttled egress IP"
        );
    }
    let logs: String = s.gws.iter().map(Gateway::log_text).collect();
    assert!(logs.contains("egress IP is throttled"));
}

/// `gb_proxy_up{proxy_id=…}` as one replica reports it.
async fn proxy_up(gw: &Gateway, proxy_id: &str) -> f64 {
    let mut m = client()
        .get(format!("{}/metrics", gw.url))
        .send()
        .await
        .unwrap();
    let text = String::from_utf8(m.body().await.unwrap().to_vec()).unwrap();
    let prefix = format!("gb_proxy_up{{proxy_id=\"{proxy_id}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in {text}"))
}

/// Sends unpinned requests until every key in `keys` has been asked once
/// since the fake's last reset (each may answer 429: the request is retried
/// on another key).
async fn reach(s: &Setup, keys: &[&String]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    loop {
        let asked: HashSet<String> = s
            .fake
            .requests()
            .await
            .iter()
            .filter_map(|r| r["key"].as_str().map(str::to_string))
            .collect();
        if keys.iter().all(|k| asked.contains(*k)) {
            return;
        }
        assert!(Instant::now() < deadline, "keys never asked: {asked:?}");
        post_json(
            &format!("{}{GENERATE}", s.gws[i % 2].url),
            &generate_body(),
            &[],
        )
        .await;
        i += 1;
    }
}

#[actix_rt::test]
async fn only_429s_from_every_key_behind_a_proxy_within_10_s_are_a_throttle_and_the_proxy_comes_back(
) {
    let s = setup("3");
    let specs: Vec<_> = s
        .list
        .split(',')
        .map(|u| gemini_balancer::upstream::proxy::parse(u).unwrap())
        .collect();
    let ids: Vec<String> = specs.iter().map(|p| p.id.clone()).collect();
    let ring = gemini_balancer::upstream::proxy::ProxyRouter::new(specs, Duration::from_secs(30));
    // The proxy with the most keys: at least two of the six.
    let p = (0..3)
        .max_by_key(|i| {
            s.ks.iter()
                .filter(|k| ring.home(&key_id(k)) == Some(*i))
                .count()
        })
        .unwrap();
    let behind: Vec<&String> =
        s.ks.iter()
            .filter(|k| ring.home(&key_id(k)) == Some(p))
            .collect();
    assert!(behind.len() >= 2);
    let (first, rest) = behind.split_first().unwrap();
    let index = format!("gb:idx:proxy-429:{}", ids[p]);
    for gw in &s.gws {
        assert_eq!(proxy_up(gw, &ids[p]).await, 1.0);
    }

    // Some keys behind the proxy answer 429 (their own quota): not a throttle.
    for k in rest {
        s.fake
            .set_mode(k, json!({"mode": "quota", "retryDelay": "1s"}))
            .await;
    }
    s.fake.post("/_fake/reset", json!({})).await;
    reach(&s, rest).await;
    for gw in &s.gws {
        assert_eq!(proxy_up(gw, &ids[p]).await, 1.0, "a partial set");
    }
    assert_eq!(
        s._redis.cmd(&["ZCARD", &index]).trim(),
        format!(":{}", rest.len()),
        "the 429s were counted"
    );

    // Once those 429s are older than 10 s, the last key's 429 completes
    // the set, but not within the window: still not a throttle.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let lapsed = rest.iter().all(|k| {
            let raw = s._redis.cmd(&["ZSCORE", &index, &key_id(k)]);
            resp_strings(&raw)
                .first()
                .and_then(|v| v.parse::<f64>().ok())
                // Gone with the whole index once its last member lapsed.
                .is_none_or(|until| (until as u128) < now)
        });
        if lapsed {
            break;
        }
        assert!(Instant::now() < deadline, "the window never passed");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for k in rest {
        s.fake.set_mode(k, json!({"mode": "normal"})).await;
    }
    s.fake
        .set_mode(first, json!({"mode": "quota", "retryDelay": "1s"}))
        .await;
    s.fake.post("/_fake/reset", json!({})).await;
    reach(&s, &[first]).await;
    for gw in &s.gws {
        assert_eq!(proxy_up(gw, &ids[p]).await, 1.0, "429s 10 s apart");
    }
    let logs: String = s.gws.iter().map(Gateway::log_text).collect();
    assert!(!logs.contains("egress IP is throttled"), "{logs}");
    s.fake.set_mode(first, json!({"mode": "normal"})).await;

    // Google throttles the proxy's egress IP: every key behind it answers
    // 429 at once. The proxy goes down on both replicas.
    s.fake
        .post(&format!("/_fake/throttle/{}", IPS[p]), json!({"on": true}))
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    loop {
        post_json(
            &format!("{}{GENERATE}", s.gws[i % 2].url),
            &generate_body(),
            &[],
        )
        .await;
        i += 1;
        if proxy_up(&s.gws[0], &ids[p]).await == 0.0 && proxy_up(&s.gws[1], &ids[p]).await == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the proxy never went down");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s
        .gws
        .iter()
        .any(|g| g.log_text().contains("egress IP is throttled"))
    {
        assert!(Instant::now() < deadline, "the throttle was not logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.fake
        .post(&format!("/_fake/throttle/{}", IPS[p]), json!({"on": false}))
        .await;
    // After its cooldown it is up again and carries its keys once more.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        s.fake.post("/_fake/reset", json!({})).await;
        traffic(&s, 12).await;
        let now = routes(&s.fake).await;
        let home = behind.iter().all(|k| {
            now.get(*k)
                .is_none_or(|ips| ips == &HashSet::from([IPS[p].to_string()]))
        });
        let up =
            proxy_up(&s.gws[0], &ids[p]).await == 1.0 && proxy_up(&s.gws[1], &ids[p]).await == 1.0;
        if up && home && behind.iter().any(|k| now.contains_key(*k)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy never came back: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
