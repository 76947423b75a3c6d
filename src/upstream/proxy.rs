//! Outbound proxies: each key leaves through one proxy, chosen by a stable
//! hash of its key id on a consistent-hash ring (the same on every replica
//! and across restarts). A proxy that refuses or times out is marked down in
//! the state store for a short cooldown; only the keys hashed to it move, to
//! the next healthy proxy on the ring, until it recovers.
//!
//! Each proxy is an `awc` connector: it opens the tunnel (HTTP `CONNECT` or
//! SOCKS5 with remote DNS), and awc runs TLS over it, keeping its own
//! connection pool per proxy.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix_tls::connect::{ConnectError, ConnectInfo, Connection};
use actix_web::dev::Service;
use awc::http::Uri;
use futures_util::future::LocalBoxFuture;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use crate::settings::{parse_proxy as parse, ProxyKind as Kind, ProxySpec};
use crate::state::{now_ms, MemberState, StateStore, Transition};

/// The rotation ring name under which proxy states are shared.
pub const RING: &str = crate::state::keyspace::ring::PROXIES;
const VNODES: usize = 64;

fn hash64(s: &str) -> u64 {
    let d = Sha256::digest(s.as_bytes());
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// The awc connector for one proxy.
#[derive(Clone)]
pub struct ProxyConnector {
    spec: Arc<ProxySpec>,
    timeout: Duration,
}

impl ProxyConnector {
    pub fn new(spec: Arc<ProxySpec>, timeout: Duration) -> Self {
        Self { spec, timeout }
    }
}

fn io_err(msg: &str) -> ConnectError {
    ConnectError::Io(std::io::Error::other(msg.to_string()))
}

impl Service<ConnectInfo<Uri>> for ProxyConnector {
    type Response = Connection<Uri, TcpStream>;
    type Error = ConnectError;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    actix_web::dev::always_ready!();

    fn call(&self, req: ConnectInfo<Uri>) -> Self::Future {
        let spec = self.spec.clone();
        let timeout = self.timeout;
        let host = req.hostname().to_string();
        let port = req.port();
        let uri = req.request().clone();
        Box::pin(async move {
            let work = async {
                let mut stream = TcpStream::connect((spec.host.as_str(), spec.port))
                    .await
                    .map_err(ConnectError::Io)?;
                let _ = stream.set_nodelay(true);
                match spec.kind {
                    Kind::Http => http_connect(&mut stream, &spec, &host, port).await?,
                    Kind::Socks5 => socks5_connect(&mut stream, &spec, &host, port).await?,
                }
                Ok(Connection::new(uri, stream))
            };
            tokio::time::timeout(timeout, work)
                .await
                .map_err(|_| io_err("proxy timed out"))?
        })
    }
}

async fn http_connect(
    stream: &mut TcpStream,
    spec: &ProxySpec,
    host: &str,
    port: u16,
) -> Result<(), ConnectError> {
    let mut req = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n");
    if let Some((user, pass)) = &spec.auth {
        let token = base64(format!("{user}:{}", pass.expose_secret()).as_bytes());
        let _ = write!(req, "Proxy-Authorization: Basic {token}\r\n");
    }
    req.push_str("\r\n");
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(ConnectError::Io)?;
    // Read the proxy's answer head, byte by byte so nothing of the tunnel
    // is consumed.
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 {
            return Err(io_err("proxy answer head too long"));
        }
        let b = stream.read_u8().await.map_err(ConnectError::Io)?;
        head.push(b);
    }
    let status = head.split(|b| *b == b' ').nth(1).unwrap_or(b"");
    if status != b"200" {
        return Err(io_err("proxy refused the tunnel"));
    }
    Ok(())
}

async fn socks5_connect(
    stream: &mut TcpStream,
    spec: &ProxySpec,
    host: &str,
    port: u16,
) -> Result<(), ConnectError> {
    let io = ConnectError::Io;
    let method: u8 = if spec.auth.is_some() { 2 } else { 0 };
    stream.write_all(&[5, 1, method]).await.map_err(io)?;
    let mut reply = [0u8; 2];
    stream.read_exact(&mut reply).await.map_err(io)?;
    if reply != [5, method] {
        return Err(io_err("SOCKS5 proxy refused the authentication method"));
    }
    if let Some((user, pass)) = &spec.auth {
        let (u, p) = (user.as_bytes(), pass.expose_secret().as_bytes());
        if u.len() > 255 || p.len() > 255 {
            return Err(io_err("SOCKS5 credentials too long"));
        }
        let mut msg = vec![1, u.len() as u8];
        msg.extend_from_slice(u);
        msg.push(p.len() as u8);
        msg.extend_from_slice(p);
        stream.write_all(&msg).await.map_err(io)?;
        let mut ok = [0u8; 2];
        stream.read_exact(&mut ok).await.map_err(io)?;
        if ok[1] != 0 {
            return Err(io_err("SOCKS5 proxy refused the credentials"));
        }
    }
    if host.len() > 255 {
        return Err(io_err("host name too long for SOCKS5"));
    }
    // CONNECT by domain name: the proxy resolves it (remote DNS).
    let mut msg = vec![5, 1, 0, 3, host.len() as u8];
    msg.extend_from_slice(host.as_bytes());
    msg.extend_from_slice(&port.to_be_bytes());
    stream.write_all(&msg).await.map_err(io)?;
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await.map_err(io)?;
    if head[1] != 0 {
        return Err(io_err("SOCKS5 proxy could not connect"));
    }
    let skip = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => usize::from(stream.read_u8().await.map_err(io)?) + 2,
        _ => return Err(io_err("SOCKS5 proxy sent a bad address type")),
    };
    let mut rest = vec![0u8; skip];
    stream.read_exact(&mut rest).await.map_err(io)?;
    Ok(())
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Which proxy each key uses, and which proxies are down. Shared by the
/// workers of a replica; the down set mirrors the state store.
pub struct ProxyRouter {
    pub specs: Vec<Arc<ProxySpec>>,
    ring: Vec<(u64, usize)>,
    down: RwLock<HashMap<usize, u64>>,
    pub cooldown: Duration,
}

/// How close together the 429s of every key behind one proxy must be to
/// count as that egress IP being throttled.
pub const THROTTLE_WINDOW: Duration = Duration::from_secs(10);

impl ProxyRouter {
    pub fn new(specs: Vec<ProxySpec>, cooldown: Duration) -> Self {
        let specs: Vec<Arc<ProxySpec>> = specs.into_iter().map(Arc::new).collect();
        let mut ring: Vec<(u64, usize)> = specs
            .iter()
            .enumerate()
            .flat_map(|(i, s)| (0..VNODES).map(move |v| (hash64(&format!("{}#{v}", s.id)), i)))
            .collect();
        ring.sort_unstable();
        Self {
            specs,
            ring,
            down: RwLock::new(HashMap::new()),
            cooldown,
        }
    }

    pub fn is_down(&self, idx: usize, now: u64) -> bool {
        self.down
            .read()
            .is_ok_and(|d| d.get(&idx).is_some_and(|until| *until > now))
    }

    /// The key's home proxy: first on the ring after the key's hash.
    pub fn home(&self, key_id: &str) -> Option<usize> {
        self.walk(key_id).next()
    }

    fn walk(&self, key_id: &str) -> impl Iterator<Item = usize> + '_ {
        let h = hash64(key_id);
        let start = self.ring.partition_point(|(p, _)| *p < h);
        let n = self.ring.len();
        (0..n).map(move |i| self.ring[(start + i) % n].1)
    }

    /// The proxy a key leaves through now: its home proxy, or the next
    /// healthy one on the ring while the home proxy is down. With every
    /// proxy down, the home proxy (going direct could leak the real IP).
    pub fn route(&self, key_id: &str) -> Option<usize> {
        let now = now_ms();
        self.walk(key_id)
            .find(|i| !self.is_down(*i, now))
            .or_else(|| self.home(key_id))
    }

    /// The key ids whose requests leave through proxy `idx` now.
    pub fn keys_behind<'k>(
        &self,
        idx: usize,
        key_ids: impl Iterator<Item = &'k str>,
    ) -> Vec<String> {
        key_ids
            .filter(|k| self.route(k) == Some(idx))
            .map(str::to_string)
            .collect()
    }

    /// Marks a proxy down here and in the shared store.
    pub async fn mark_down(&self, store: &dyn StateStore, idx: usize) {
        let until = now_ms() + self.cooldown.as_millis() as u64;
        if let Ok(mut d) = self.down.write() {
            d.insert(idx, until);
        }
        if let Some(spec) = self.specs.get(idx) {
            tracing::warn!(proxy = %spec.display, proxy_id = %spec.id, cooldown_s = self.cooldown.as_secs(), "proxy failed; its keys move to the next proxy");
            let _ = store
                .transition(
                    RING,
                    &spec.id,
                    None,
                    &Transition::Cool {
                        until_ms: until,
                        reason: "proxy_failed".into(),
                    },
                    now_ms(),
                )
                .await;
        }
    }

    /// Pulls the shared down set (other replicas' findings).
    pub async fn refresh(&self, store: &dyn StateStore) {
        let Ok(states) = store.member_states(RING).await else {
            return;
        };
        let now = now_ms();
        let fresh: HashMap<usize, u64> = self
            .specs
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match states.get(&s.id) {
                Some(MemberState::Cooling { until_ms, .. }) if *until_ms > now => {
                    Some((i, *until_ms))
                }
                _ => None,
            })
            .collect();
        if let Ok(mut d) = self.down.write() {
            *d = fresh;
        }
    }

    /// `(display, id, up)` for every proxy, for admin and metrics.
    pub fn status(&self) -> Vec<(String, String, bool)> {
        let now = now_ms();
        self.specs
            .iter()
            .enumerate()
            .map(|(i, s)| (s.display.clone(), s.id.clone(), !self.is_down(i, now)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
    }

    #[test]
    fn only_a_down_proxys_keys_move() {
        let specs = (0..3)
            .map(|i| parse(&format!("http://127.0.0.1:{}", 9000 + i)).unwrap())
            .collect();
        let r = ProxyRouter::new(specs, Duration::from_secs(30));
        let keys: Vec<String> = (0..200).map(|i| format!("key{i}")).collect();
        let before: Vec<usize> = keys.iter().map(|k| r.route(k).unwrap()).collect();
        assert!((0..3).all(|p| before.contains(&p)), "every proxy gets keys");
        r.down.write().unwrap().insert(1, u64::MAX);
        for (k, b) in keys.iter().zip(&before) {
            let now = r.route(k).unwrap();
            if *b == 1 {
                assert_ne!(now, 1);
            } else {
                assert_eq!(now, *b, "a key of a healthy proxy stays");
            }
        }
    }
}
