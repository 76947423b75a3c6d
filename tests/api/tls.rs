//! The HTTPS upstream path: the fake served over TLS with a test CA that the
//! gateway trusts through GB_UPSTREAM_CA_FILE.

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
