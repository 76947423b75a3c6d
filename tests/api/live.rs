//! The Live API through the gateway: frames relayed both ways, keys that
//! fail before setup retried and recorded, a per-key session cap shared by
//! replicas, slots released on disconnect, sessions drained on SIGTERM.

use std::time::{Duration, Instant};

use awc::ws::{Frame, Message};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;

use crate::helpers::*;

pub(crate) const LIVE: &str =
    "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent";

pub(crate) type Conn = actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>;

/// A Live session through a gateway, past `setupComplete`.
pub(crate) async fn open(gw: &Gateway) -> Conn {
    open_with(&client(), gw).await
}

async fn open_with(client: &awc::Client, gw: &Gateway) -> Conn {
    let ws_url = format!(
        "{}{LIVE}",
        gw.url
            .replacen("http://", "ws://", 1)
            .replacen("https://", "wss://", 1)
    );
    let req = client.ws(ws_url).set_header("x-goog-api-key", TOKEN);
    setup(req).await
}

async fn setup(req: awc::ws::WebsocketsRequest) -> Conn {
    let (_, mut conn) = req.connect().await.expect("Live handshake");
    let setup = json!({"setup": {"model": "models/gemini-live-2.5-flash"}});
    conn.send(Message::Text(setup.to_string().into()))
        .await
        .expect("setup sent");
    match next_text(&mut conn).await {
        Some(t) => assert!(t.contains("setupComplete"), "{t}"),
        None => panic!("closed before setupComplete"),
    }
    conn
}

/// The next text frame; `None` on close.
pub(crate) async fn next_text(conn: &mut Conn) -> Option<String> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), conn.next())
            .await
            .expect("a frame in time")?;
        match frame.expect("frame") {
            Frame::Text(b) | Frame::Binary(b) => return Some(String::from_utf8_lossy(&b).into()),
            Frame::Close(_) => return None,
            _ => {}
        }
    }
}

pub(crate) async fn send_turn(conn: &mut Conn, text: &str) {
    let turn = json!({"clientContent": {"turns": [{"role": "user", "parts": [{"text": text}]}], "turnComplete": true}});
    conn.send(Message::Text(turn.to_string().into()))
        .await
        .expect("turn sent");
}

/// Sends a turn; the key id the answer came from.
async fn ask(conn: &mut Conn, text: &str) -> String {
    send_turn(conn, text).await;
    let answer = next_text(conn).await.expect("an answer");
    assert!(answer.contains(&format!(": {text}")), "{answer}");
    let done = next_text(conn).await.expect("turn complete");
    assert!(done.contains("turnComplete"), "{done}");
    answer
        .split("echo from key ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .expect("a key id in the echo")
        .to_string()
}

fn open_on(redis: &Redis, key_id: &str) -> usize {
    let raw = redis.cmd(&["ZCARD", &format!("gb:idx:live:{key_id}")]);
    raw.trim().trim_start_matches(':').parse().unwrap_or(0)
}

#[actix_rt::test]
async fn a_key_that_fails_before_setup_is_retried_on_another_and_recorded() {
    let redis = Redis::start();
    let fake = FakeUpstream::start(&keys(2));
    fake.set_mode(&fake.keys[0], json!({"mode": "invalid"}))
        .await;
    let gw = Gateway::start(&fake, Some(&redis), &[]);
    let good = key_id(&fake.keys[1]);
    for i in 0..3 {
        let mut conn = open(&gw).await;
        assert_eq!(ask(&mut conn, &format!("hello {i}")).await, good);
    }
    let state = redis.cmd(&["HGET", "gb:{ring:keys}:s", &key_id(&fake.keys[0])]);
    assert!(state.contains("d:"), "the invalid key is disabled: {state}");
    assert!(gw.log_text().contains("closed before setup completed"));
    gw.assert_no_secrets_logged(&fake.keys);
}

#[actix_rt::test]
async fn a_quota_close_before_setup_cools_the_key_and_moves_on() {
    let redis = Redis::start();
    let fake = FakeUpstream::start(&keys(2));
    fake.set_mode(&fake.keys[1], json!({"mode": "quota"})).await;
    let gw = Gateway::start(&fake, Some(&redis), &[]);
    for _ in 0..2 {
        let mut conn = open(&gw).await;
        assert_eq!(ask(&mut conn, "hi").await, key_id(&fake.keys[0]));
    }
    let state = redis.cmd(&["HGET", "gb:{ring:keys}:s", &key_id(&fake.keys[1])]);
    assert!(state.contains("c:"), "the key cools down: {state}");
}

#[actix_rt::test]
async fn the_session_cap_per_key_is_shared_by_replicas() {
    let redis = Redis::start();
    let fake = FakeUpstream::start(&keys(2));
    let env = [("GB_LIVE_SESSIONS_PER_KEY", "1")];
    let gws = [
        Gateway::start(&fake, Some(&redis), &env),
        Gateway::start(&fake, Some(&redis), &env),
    ];
    let mut a = open(&gws[0]).await;
    let first = ask(&mut a, "a").await;
    assert_eq!(open_on(&redis, &first), 1);
    // Plain rotation would give the next session the same key again.
    let (status, _) = post_json(
        &format!(
            "{}/v1beta/models/gemini-2.0-flash:generateContent",
            gws[1].url
        ),
        &generate_body(),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    let mut b = open(&gws[1]).await;
    let second = ask(&mut b, "b").await;
    assert_ne!(first, second, "the key at its cap was passed over");
    // With every key at its cap, a session is still served.
    let mut c = open(&gws[0]).await;
    ask(&mut c, "c").await;
    assert_eq!(open_on(&redis, &first) + open_on(&redis, &second), 3);
}

#[actix_rt::test]
async fn a_client_that_disconnects_mid_turn_releases_its_slot() {
    let redis = Redis::start();
    let fake = FakeUpstream::start(&keys(1));
    let gw = Gateway::start(&fake, Some(&redis), &[]);
    let id = key_id(&fake.keys[0]);
    let mut conn = open(&gw).await;
    ask(&mut conn, "first").await;
    assert_eq!(open_on(&redis, &id), 1);
    send_turn(&mut conn, "cut off").await;
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(20);
    while open_on(&redis, &id) != 0 {
        assert!(Instant::now() < deadline, "the slot was never released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The upstream session was closed too.
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.get("/_fake/live").await[&fake.keys[0]] != json!(0) {
        assert!(
            Instant::now() < deadline,
            "the upstream session stayed open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_rt::test]
async fn sigterm_lets_live_sessions_run_through_the_grace_then_closes_them() {
    let redis = Redis::start();
    let fake = FakeUpstream::start(&keys(1));
    let mut gw = Gateway::start(&fake, Some(&redis), &[("GB_SHUTDOWN_GRACE", "6")]);
    let mut conn = open(&gw).await;
    ask(&mut conn, "before").await;
    let pid = gw.proc.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // Still served while draining.
    ask(&mut conn, "during the drain").await;
    // Then closed with "going away" before the process exits.
    let deadline = Instant::now() + Duration::from_secs(30);
    let reason = loop {
        assert!(Instant::now() < deadline, "never closed");
        match tokio::time::timeout(Duration::from_secs(30), conn.next()).await {
            Ok(Some(Ok(Frame::Close(reason)))) => break reason,
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(
        reason.map(|r| u16::from(r.code)),
        Some(1001),
        "closed as going away"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = gw.proc.child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the replica did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(open_on(&redis, &key_id(&fake.keys[0])), 0);
}

#[actix_rt::test]
async fn with_a_certificate_the_gateway_serves_https_and_wss() {
    // TLS on both sides: the upstream over HTTPS too (as Google is, where
    // ALPN would pick HTTP/2, on which no WebSocket can be opened).
    let pki = Pki::new();
    let fake = pki.fake(&keys(2));
    let port = fake.url.rsplit(':').next().unwrap().to_string();
    let upstream = format!("https://localhost:{port}");
    let (cert, key, ca) = (
        pki.path("cert.pem"),
        pki.path("key.pem"),
        pki.path("ca.pem"),
    );
    let gw = Gateway::start(
        &fake,
        None,
        &[
            ("GB_TLS_CERT", &cert),
            ("GB_TLS_KEY", &key),
            ("GB_UPSTREAM_URL", &upstream),
            ("GB_UPSTREAM_CA_FILE", &ca),
        ],
    );
    assert!(gw.url.starts_with("https://"), "{}", gw.url);
    let tls = gemini_balancer::upstream::client::tls_config(Some(&ca)).unwrap();
    let mut h1 = (*tls).clone();
    h1.alpn_protocols = vec![b"http/1.1".to_vec()];
    let client = awc::Client::builder()
        .connector(awc::Connector::new().rustls_0_23(std::sync::Arc::new(h1)))
        .timeout(Duration::from_secs(30))
        .finish();
    let mut resp = client
        .post(format!(
            "{}/v1beta/models/gemini-2.0-flash:generateContent",
            gw.url
        ))
        .insert_header(("x-goog-api-key", TOKEN))
        .send_json(&generate_body())
        .await
        .expect("https request");
    assert_eq!(resp.status().as_u16(), 200, "{:?}", resp.body().await);
    let mut conn = open_with(&client, &gw).await;
    let served_by = ask(&mut conn, "over wss").await;
    assert!(fake.keys.iter().any(|k| key_id(k) == served_by));
    // The container healthcheck speaks TLS to a TLS listener.
    let listen = gw.url.trim_start_matches("https://").to_string();
    let probe = |tls: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gemini-balancer"));
        cmd.arg("healthcheck")
            .env_clear()
            .env("GB_LISTEN", &listen)
            .env("GB_API_KEYS", "k1")
            .env("GB_AUTH_TOKENS", "t1");
        if tls {
            cmd.env("GB_TLS_CERT", &cert).env("GB_TLS_KEY", &key);
        }
        cmd.output().unwrap().status.success()
    };
    assert!(probe(true), "healthcheck over TLS");
    assert!(!probe(false), "a plain-HTTP probe gets no answer");
    // A plain-HTTP client gets no answer from the TLS listener.
    let plain = client
        .get(format!(
            "{}/healthz",
            gw.url.replacen("https://", "http://", 1)
        ))
        .send()
        .await;
    assert!(!plain.map(|r| r.status().is_success()).unwrap_or(false));
}

#[test]
fn tls_settings_come_in_pairs_and_must_exist() {
    let (code, err) = run_gateway_expecting_exit(&[
        ("GB_API_KEYS", "k1"),
        ("GB_AUTH_TOKENS", "t1"),
        ("GB_TLS_CERT", "/nonexistent/cert.pem"),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("GB_TLS_KEY"), "{err}");
    let pki = Pki::new();
    let cert = pki.path("cert.pem");
    let (code, err) = run_gateway_expecting_exit(&[
        ("GB_API_KEYS", "k1"),
        ("GB_AUTH_TOKENS", "t1"),
        ("GB_TLS_CERT", &cert),
        ("GB_TLS_KEY", "/nonexistent/key.pem"),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("GB_TLS_KEY") && err.contains("does not exist"),
        "{err}"
    );
}

#[actix_rt::test]
async fn an_ephemeral_token_minted_through_the_gateway_goes_to_its_key() {
    let redis = Redis::start();
    let fake = FakeUpstream::start(&keys(3));
    let gws = [
        Gateway::start(&fake, Some(&redis), &[]),
        Gateway::start(&fake, Some(&redis), &[]),
    ];
    let (status, minted) = post_json(
        &format!("{}/v1alpha/auth_tokens", gws[0].url),
        &json!({"uses": 1}),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{minted}");
    let token = minted["name"].as_str().unwrap().to_string();
    let owner = fake.get("/_fake/resources").await[&token]
        .as_str()
        .unwrap()
        .to_string();
    let constrained = LIVE.replace("BidiGenerateContent", "BidiGenerateContentConstrained");
    for _ in 0..3 {
        let url = format!(
            "{}{constrained}",
            gws[1].url.replacen("http://", "ws://", 1)
        );
        let req = client()
            .ws(url)
            .set_header("authorization", format!("Token {token}"));
        let mut conn = setup(req).await;
        assert_eq!(ask(&mut conn, "short-lived").await, key_id(&owner));
        // Plain rotation moves on between sessions; the token does not.
        let (status, _) = post_json(
            &format!(
                "{}/v1beta/models/gemini-2.0-flash:generateContent",
                gws[0].url
            ),
            &generate_body(),
            &[],
        )
        .await;
        assert_eq!(status, 200);
    }
    // An unknown token is refused at the handshake.
    let url = format!(
        "{}{constrained}",
        gws[0].url.replacen("http://", "ws://", 1)
    );
    let refused = client()
        .ws(url)
        .set_header("authorization", "Token auth_tokens/not-minted-here")
        .connect()
        .await;
    assert!(refused.is_err());
    // The token itself is a credential: Redis holds only its hash.
    let everything = redis.cmd(&["KEYS", "*"]);
    assert!(everything.contains("auth_tokens/"), "{everything}");
    assert!(!everything.contains(&token["auth_tokens/".len()..]));
    for gw in &gws {
        assert!(!gw.log_text().contains(&token["auth_tokens/".len()..]));
    }
}

#[actix_rt::test]
async fn a_session_id_pins_live_sessions_and_the_key_query_parameter_authenticates() {
    let redis = Redis::start();
    let fake = FakeUpstream::start(&keys(3));
    let gw = Gateway::start(&fake, Some(&redis), &[]);
    let sid = "live-and-files";
    let file = upload_file(
        &format!("{}/upload/v1beta/files", gw.url),
        None,
        &[("x-session-id", sid)],
        b"notes",
    )
    .await;
    let owner = key_id(&fake.owner_key(&file).await);
    for _ in 0..3 {
        let url = format!(
            "{}{LIVE}?key={TOKEN}",
            gw.url.replacen("http://", "ws://", 1)
        );
        let mut conn = setup(client().ws(url).set_header("x-session-id", sid)).await;
        assert_eq!(ask(&mut conn, "pinned").await, owner);
    }
    // Without a token the handshake is refused.
    let url = format!("{}{LIVE}", gw.url.replacen("http://", "ws://", 1));
    assert!(client().ws(url).connect().await.is_err());
    for r in fake.requests().await {
        assert!(
            !r.to_string().contains(TOKEN),
            "the gateway token went upstream"
        );
    }
}

#[actix_rt::test]
async fn the_sessions_of_a_replica_that_dies_stop_counting() {
    let redis = Redis::start();
    let fake = FakeUpstream::start(&keys(1));
    let gw = Gateway::start(&fake, Some(&redis), &[]);
    let id = key_id(&fake.keys[0]);
    let mut conn = open(&gw).await;
    ask(&mut conn, "alive").await;
    let live = |redis: &Redis| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            .to_string();
        let raw = redis.cmd(&[
            "ZCOUNT",
            &format!("gb:idx:live:{id}"),
            &format!("({now}"),
            "+inf",
        ]);
        raw.trim()
            .trim_start_matches(':')
            .parse::<usize>()
            .unwrap_or(99)
    };
    assert_eq!(live(&redis), 1);
    drop(gw); // SIGKILL: no release, no more heartbeats
    let deadline = Instant::now() + Duration::from_secs(90);
    while live(&redis) != 0 {
        assert!(
            Instant::now() < deadline,
            "the dead replica's session still counts"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
