//! The admin page's sessions: random ids checked in the shared store, cookie
//! attributes, logout, CSRF tokens on forms, cross-origin posts, and a new
//! admin token ending every session.

use serde_json::Value;

use crate::helpers::*;

const ADMIN: &str = "admin-token-for-sessions-1";

async fn login(gw: &Gateway) -> (String, String) {
    let resp = client()
        .post(format!("{}/admin/login", gw.url))
        .send_form(&[("token", ADMIN)])
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 303);
    let set = resp
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let id = set
        .strip_prefix("gb_admin=")
        .and_then(|r| r.split(';').next())
        .unwrap()
        .to_string();
    (id, set)
}

async fn with_cookie(gw: &Gateway, id: &str, path: &str) -> (u16, String) {
    let mut resp = client()
        .get(format!("{}{path}", gw.url))
        .insert_header(("cookie", format!("gb_admin={id}")))
        .send()
        .await
        .unwrap();
    let body = resp.body().await.unwrap();
    (
        resp.status().as_u16(),
        String::from_utf8_lossy(&body).into(),
    )
}

async fn post_form(
    gw: &Gateway,
    id: &str,
    path: &str,
    csrf: Option<&str>,
    origin: Option<&str>,
) -> u16 {
    let mut req = client()
        .post(format!("{}{path}", gw.url))
        .insert_header(("cookie", format!("gb_admin={id}")));
    if let Some(o) = origin {
        req = req.insert_header(("origin", o));
    }
    let form: Vec<(&str, &str)> = csrf.map(|c| vec![("csrf", c)]).unwrap_or_default();
    req.send_form(&form).await.unwrap().status().as_u16()
}

fn csrf_of(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .expect("the page's forms carry a csrf token");
    page[at + 19..].split('"').next().unwrap().to_string()
}

#[actix_rt::test]
async fn admin_sessions_are_random_revocable_and_bound_to_the_admin_token() {
    let redis = Redis::start();
    let ks = keys(2);
    let fake = FakeUpstream::start(&ks);
    let gw = Gateway::start(&fake, Some(&redis), &[("GB_ADMIN_TOKEN", ADMIN)]);
    let (id, set_cookie) = login(&gw).await;
    assert_eq!(id.len(), 64, "256 random bits");
    for attr in [
        "Path=/admin",
        "HttpOnly",
        "SameSite=Strict",
        "Max-Age=43200",
    ] {
        assert!(set_cookie.contains(attr), "{set_cookie}");
    }
    assert!(!set_cookie.contains("Secure"), "plain HTTP: {set_cookie}");
    let (id2, _) = login(&gw).await;
    assert_ne!(id, id2, "every login gets a new id");

    // The cookie opens the API and the page; the store holds neither the
    // cookie nor the token.
    assert_eq!(with_cookie(&gw, &id, "/admin/api/keys").await.0, 200);
    let (_, page) = with_cookie(&gw, &id, "/admin").await;
    let csrf = csrf_of(&page);
    let dump = redis.cmd(&["KEYS", "*"]);
    assert!(
        dump.contains("admin-session"),
        "the session lives in the shared store: {dump}"
    );
    for k in dump.lines().filter(|l| l.starts_with("gb:")) {
        let v = redis.cmd(&["GET", k]);
        for secret in [id.as_str(), ADMIN] {
            assert!(!k.contains(secret) && !v.contains(secret), "{k} = {v}");
        }
    }

    // Forms need the session's CSRF token and the same origin.
    let disable = format!("/admin/keys/{}/disable", key_id(&ks[0]));
    assert_eq!(post_form(&gw, &id, &disable, None, None).await, 403);
    assert_eq!(
        post_form(
            &gw,
            &id,
            &disable,
            Some(&csrf_of(&with_cookie(&gw, &id2, "/admin").await.1)),
            None
        )
        .await,
        403,
        "another session's token"
    );
    assert_eq!(
        post_form(&gw, &id, &disable, Some(&csrf), Some("http://evil.example")).await,
        403
    );
    let host = gw.url.trim_start_matches("http://").to_string();
    assert_eq!(
        post_form(
            &gw,
            &id,
            &disable,
            Some(&csrf),
            Some(&format!("http://{host}"))
        )
        .await,
        303
    );
    let (_, keys_json) = with_cookie(&gw, &id, "/admin/api/keys").await;
    let v: Value = serde_json::from_str(&keys_json).unwrap();
    assert_eq!(v["keys"][0]["state"], "disabled", "{v}");

    // Logout ends this session only.
    assert_eq!(
        post_form(&gw, &id, "/admin/logout", Some(&csrf), None).await,
        303
    );
    assert_eq!(with_cookie(&gw, &id, "/admin/api/keys").await.0, 401);
    assert_eq!(with_cookie(&gw, &id2, "/admin/api/keys").await.0, 200);

    // A replica with a new admin token does not honour sessions of the old one.
    let rotated = Gateway::start(
        &fake,
        Some(&redis),
        &[("GB_ADMIN_TOKEN", "a-brand-new-admin-token")],
    );
    assert_eq!(with_cookie(&rotated, &id2, "/admin/api/keys").await.0, 401);
    assert_eq!(with_cookie(&gw, &id2, "/admin/api/keys").await.0, 200);
}

#[actix_rt::test]
async fn the_admin_cookie_is_secure_behind_https() {
    let ks = keys(1);
    let fake = FakeUpstream::start(&ks);
    let gw = Gateway::start(
        &fake,
        None,
        &[
            ("GB_ADMIN_TOKEN", ADMIN),
            ("GB_PUBLIC_URL", "https://gateway.example"),
            ("GB_ADMIN_SESSION_TTL", "600"),
        ],
    );
    let (_, set_cookie) = login(&gw).await;
    assert!(set_cookie.contains("; Secure"), "{set_cookie}");
    assert!(set_cookie.contains("Max-Age=600;"), "{set_cookie}");
    let trusted = Gateway::start(
        &fake,
        None,
        &[("GB_ADMIN_TOKEN", ADMIN), ("GB_TRUST_FORWARDED", "true")],
    );
    let resp = client()
        .post(format!("{}/admin/login", trusted.url))
        .insert_header(("x-forwarded-proto", "https"))
        .send_form(&[("token", ADMIN)])
        .await
        .unwrap();
    let set = resp.headers().get("set-cookie").unwrap().to_str().unwrap();
    assert!(set.contains("; Secure"), "{set}");
}
