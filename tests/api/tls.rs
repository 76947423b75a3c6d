//! TLS on both sides: the fake served over HTTPS with a test CA that the
//! gateway trusts through GB_UPSTREAM_CA_FILE, and a Redis reached with
//! `rediss://`, its CA trusted through SSL_CERT_FILE.

use crate::helpers::*;

#[actix_rt::test]
async fn the_upstream_is_reached_over_https_with_a_trusted_ca() {
    let pki = Pki::new();
    let fake = pki.fake(&keys(2));
    assert!(fake.url.starts_with("https://"));
    let port = fake.url.rsplit(':').next().unwrap().to_string();
    let upstream = format!("https://localhost:{port}");
    let ca = pki.path("ca.pem");
    let gw = Gateway::start(
        &fake,
        None,
        &[("GB_UPSTREAM_URL", &upstream), ("GB_UPSTREAM_CA_FILE", &ca)],
    );
    let (status, v) = post_json(
        &format!("{}/v1beta/models/gemini-2.0-flash:generateContent", gw.url),
        &generate_body(),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["candidates"].is_array());

    // Without the CA the upstream's certificate is refused: 502, not a panic.
    let untrusted = Gateway::start(&fake, None, &[("GB_UPSTREAM_URL", &upstream)]);
    let (status, v) = post_json(
        &format!(
            "{}/v1beta/models/gemini-2.0-flash:generateContent",
            untrusted.url
        ),
        &generate_body(),
        &[],
    )
    .await;
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["code"], 502);
}

#[actix_rt::test]
async fn redis_is_reached_over_tls_with_a_trusted_ca() {
    let pki = Pki::new();
    let fake = FakeUpstream::start(&keys(2));
    let tls_port = free_port();
    let redis = Redis::start_tls(&pki, tls_port);
    let url = format!("rediss://localhost:{tls_port}");
    let ca = pki.path("ca.pem");
    let gw = Gateway::start(
        &fake,
        None,
        &[("GB_REDIS_URL", &url), ("SSL_CERT_FILE", &ca)],
    );
    let generate = format!("{}/v1beta/models/gemini-2.0-flash:generateContent", gw.url);
    let (status, v) = post_json(&generate, &generate_body(), &[("x-session-id", "over-tls")]).await;
    assert_eq!(status, 200, "{v}");
    // The binding went through the TLS port into this Redis.
    assert!(redis.cmd(&["EXISTS", "gb:session:over-tls"]).contains(":1"));
    assert!(!redis.cmd(&["GET", "gb:layout"]).contains("$-1"));

    // A Redis whose certificate is not trusted: a session request gets the
    // store-unavailable 503 in Gemini's error JSON, without hanging.
    let untrusted = Gateway::start(&fake, None, &[("GB_REDIS_URL", &url)]);
    let (status, v) = post_json(
        &format!(
            "{}/v1beta/models/gemini-2.0-flash:generateContent",
            untrusted.url
        ),
        &generate_body(),
        &[("x-session-id", "untrusted")],
    )
    .await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["status"], "UNAVAILABLE", "{v}");
    assert!(!redis
        .cmd(&["EXISTS", "gb:session:untrusted"])
        .contains(":1"));
    untrusted.assert_no_secrets_logged(&fake.keys);
}
