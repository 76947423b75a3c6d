//! `GB_ADMIN_LISTEN`: metrics and admin on an internal listener only, the
//! public listener answers 404 there.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;

const ADMIN: &str = "admin-secret-token-77";

async fn get(url: &str, bearer: Option<&str>) -> (u16, String) {
    let mut req = client().get(url);
    if let Some(t) = bearer {
        req = req.insert_header(("authorization", format!("Bearer {t}")));
    }
    let mut resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.body().await.unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn assert_gemini_404(status: u16, body: &str, what: &str) {
    assert_eq!(status, 404, "{what}: {body}");
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    assert_eq!(
        v["error"]["code"], 404,
        "{what}: a Gemini-shaped error: {body}"
    );
}

/// The internal listener's URL, from the line the gateway logs at start.
fn admin_url(gw: &Gateway) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = gw.log_text();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("on the internal listener "))
        {
            let rest = line.split("on the internal listener ").nth(1).unwrap();
            return rest.split_whitespace().next().unwrap().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no internal listener logged:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[actix_rt::test]
async fn with_an_admin_listener_metrics_and_admin_leave_the_public_side() {
    let ks = keys(2);
    let fake = FakeUpstream::start(&ks);
    let gw = Gateway::start(
        &fake,
        None,
        &[
            ("GB_ADMIN_TOKEN", ADMIN),
            ("GB_ADMIN_LISTEN", "127.0.0.1:0"),
        ],
    );
    let internal = admin_url(&gw);
    assert_ne!(internal, gw.url);

    // Public side: the gateway works, operations are 404 even with the
    // admin token, however the path is spelled.
    let (status, _) = post_json(
        &format!("{}/v1beta/models/gemini-2.0-flash:generateContent", gw.url),
        &generate_body(),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    for path in [
        "/metrics",
        "/admin",
        "/admin/",
        "/admin/api/keys",
        "/%61dmin/api/keys",
        "/%6detrics",
    ] {
        let (status, body) = get(&format!("{}{path}", gw.url), Some(ADMIN)).await;
        assert_gemini_404(status, &body, &format!("public {path}"));
    }
    assert_eq!(get(&format!("{}/healthz", gw.url), None).await.0, 200);

    // Internal side: metrics (counting the public traffic), admin, health.
    let (status, metrics) = get(&format!("{internal}/metrics"), None).await;
    assert_eq!(status, 200);
    assert!(metrics.contains("# TYPE"), "{metrics}");
    let (status, body) = get(&format!("{internal}/admin/api/keys"), Some(ADMIN)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&key_id(&ks[0])), "{body}");
    assert_eq!(
        get(&format!("{internal}/admin/api/keys"), None).await.0,
        401
    );
    assert_eq!(get(&format!("{internal}/healthz"), None).await.0, 200);
    assert_eq!(get(&format!("{internal}/readyz"), None).await.0, 200);
    // and it does not proxy model traffic.
    let (status, body) = post_json(
        &format!("{internal}/v1beta/models/gemini-2.0-flash:generateContent"),
        &generate_body(),
        &[],
    )
    .await;
    assert_eq!(status, 404, "{body}");
    gw.assert_no_secrets_logged(&ks);
}

#[actix_rt::test]
async fn without_an_admin_listener_the_public_side_serves_metrics() {
    let fake = FakeUpstream::start(&keys(1));
    let gw = Gateway::start(&fake, None, &[]);
    let (status, body) = get(&format!("{}/metrics", gw.url), None).await;
    assert_eq!(status, 200, "{body}");
    assert!(!gw.log_text().contains("internal listener"));
}

#[test]
fn a_bad_admin_listen_address_stops_the_start_naming_the_variable() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    for bad in ["9000", "admin:9000", busy.as_str()] {
        let (code, err) = run_gateway_expecting_exit(&[
            ("GB_API_KEYS", "k1"),
            ("GB_AUTH_TOKENS", TOKEN),
            ("GB_ADMIN_LISTEN", bad),
        ]);
        assert_ne!(code, 0, "{bad}");
        assert!(err.contains("GB_ADMIN_LISTEN"), "{bad}: {err}");
    }
}
