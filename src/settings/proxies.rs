//! `proxies`: the outbound proxies the keys leave through.

use std::time::Duration;

use secrecy::SecretString;
use sha2::{Digest, Sha256};

use super::raw::Raw;
use super::{err, SettingsError};

/// Outbound proxies the keys leave through.
#[derive(Debug, Clone)]
pub struct Proxies {
    /// `GB_PROXIES`, parsed; empty with `GB_PROXY_MODE=none`.
    pub list: Vec<ProxySpec>,
    /// How long a failed proxy stays out of use (`GB_PROXY_COOLDOWN`).
    pub cooldown: Duration,
}

impl Proxies {
    pub const VARS: &'static [&'static str] = &["GB_PROXIES", "GB_PROXY_MODE", "GB_PROXY_COOLDOWN"];

    pub(super) fn load(raw: &Raw) -> Result<Self, SettingsError> {
        let hash = raw.choice("GB_PROXY_MODE", &[("hash", true), ("none", false)])?;
        let given = raw.opt("GB_PROXIES").unwrap_or_default();
        let list = if hash {
            given
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .enumerate()
                .map(|(i, url)| {
                    parse(url)
                        .map_err(|problem| err("GB_PROXIES", format!("entry {} {problem}", i + 1)))
                })
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        Ok(Proxies {
            list,
            cooldown: raw.secs("GB_PROXY_COOLDOWN")?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Http,
    Socks5,
}

#[derive(Clone)]
pub struct ProxySpec {
    /// Stable id: first 12 hex of the SHA-256 of scheme, user, host and port
    /// (never the password).
    pub id: String,
    /// The URL with any password masked, for logs and admin.
    pub display: String,
    pub kind: Kind,
    pub host: String,
    pub port: u16,
    /// User and password, sent in the tunnel's handshake only.
    pub auth: Option<(String, SecretString)>,
}

impl std::fmt::Debug for ProxySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Proxy({})", self.display)
    }
}

fn short_hash(s: &str) -> String {
    hex::encode(&Sha256::digest(s.as_bytes())[..6])
}

/// Parses `http://[user:pass@]host:port` or `socks5://…`. Errors never echo
/// the URL (it may hold a password).
pub fn parse(url: &str) -> Result<ProxySpec, String> {
    let (kind, rest) = if let Some(r) = url.strip_prefix("http://") {
        (Kind::Http, r)
    } else if let Some(r) = url
        .strip_prefix("socks5://")
        .or_else(|| url.strip_prefix("socks5h://"))
    {
        (Kind::Socks5, r)
    } else {
        return Err("must start with http:// or socks5://".into());
    };
    let rest = rest.trim_end_matches('/');
    let (auth, hostport) = match rest.rsplit_once('@') {
        Some((auth, hp)) => {
            let (user, pass) = auth.split_once(':').unwrap_or((auth, ""));
            (
                Some((user.to_string(), SecretString::from(pass.to_string()))),
                hp,
            )
        }
        None => (None, rest),
    };
    let (host, port) = hostport
        .rsplit_once(':')
        .ok_or_else(|| "needs host:port".to_string())?;
    let port: u16 = port
        .parse()
        .map_err(|_| "has an invalid port".to_string())?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() || host.contains('/') {
        return Err("has an invalid host".into());
    }
    let scheme = if kind == Kind::Http { "http" } else { "socks5" };
    let display = match &auth {
        Some((user, _)) => format!("{scheme}://{user}:****@{hostport}"),
        None => format!("{scheme}://{hostport}"),
    };
    // The id names the proxy without its password: it is shown in metrics
    // and the admin API, and a hash of a short password could be reversed.
    let identity = match &auth {
        Some((user, _)) => format!("{scheme}://{user}@{host}:{port}"),
        None => format!("{scheme}://{host}:{port}"),
    };
    Ok(ProxySpec {
        id: short_hash(&identity),
        display,
        kind,
        host,
        port,
        auth,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_id_does_not_depend_on_its_password() {
        let a = parse("http://alice:one@proxy.example:3128").unwrap();
        let b = parse("http://alice:two@proxy.example:3128").unwrap();
        let c = parse("http://bob:one@proxy.example:3128").unwrap();
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_ne!(a.id, short_hash("http://alice:one@proxy.example:3128"));
    }

    #[test]
    fn urls_parse_and_mask_credentials() {
        let p = parse("http://alice:s3cret@proxy.example:3128").unwrap();
        assert_eq!(
            (p.kind, p.host.as_str(), p.port),
            (Kind::Http, "proxy.example", 3128)
        );
        assert_eq!(p.display, "http://alice:****@proxy.example:3128");
        assert!(!format!("{p:?}").contains("s3cret"));
        let s = parse("socks5://10.0.0.1:1080").unwrap();
        assert_eq!(s.kind, Kind::Socks5);
        for bad in [
            "ftp://x:1",
            "http://host",
            "http://host:notaport",
            "socks5://:1",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(!e.contains("host:notaport"));
        }
    }
}
