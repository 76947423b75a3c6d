//! The HTTPS upstream path: the fake served over TLS with a test CA that the
//! gateway trusts through GB_UPSTREAM_CA_FILE.

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

use crate::helpers::*;

struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir =
            std::env::temp_dir().join(format!("gb-tls-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).unwrap();
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[actix_rt::test]
async fn the_upstream_is_reached_over_https_with_a_trusted_ca() {
    let pki = Pki::new();
    let fake = FakeUpstream::start_with(
        &keys(2),
        &[
            ("FAKE_TLS_CERT", pki.path("cert.pem")),
            ("FAKE_TLS_KEY", pki.path("key.pem")),
        ],
    );
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
