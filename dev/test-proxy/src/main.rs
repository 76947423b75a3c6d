//! A small outbound proxy for the gateway's outbound-proxy tests. A
//! development tool, not part of the product: its own crate so that the
//! release build and image leave it out.
//!
//! HTTP CONNECT or SOCKS5 (CONNECT by domain name, optional
//! username/password). Prints `listening on URL`, then `tunnel N HOST:PORT`
//! for every tunnel it opens, on stdout.
//!
//! Environment: `PROXY_KIND` (`http` or `socks5`), `PROXY_LISTEN` (default
//! `127.0.0.1:0`), `PROXY_AUTH` (`user:pass`, required when set),
//! `PROXY_BIND_IP` (source address of the proxy's own connections, so a test
//! can tell proxies apart at the upstream).
#![allow(clippy::print_stdout)]

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

struct Config {
    socks: bool,
    auth: Option<(String, String)>,
    bind: Option<IpAddr>,
    tunnels: AtomicU64,
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn dial(cfg: &Config, host: &str, port: u16) -> std::io::Result<TcpStream> {
    let addr: SocketAddr = tokio::net::lookup_host((host, port))
        .await?
        .find(|a| a.is_ipv4())
        .ok_or_else(|| std::io::Error::other("no IPv4 address"))?;
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = cfg.bind {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(addr).await
}

fn basic(user: &str, pass: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{user}:{pass}").into_bytes();
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                T[((n >> (18 - 6 * i)) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

async fn http(
    cfg: &Config,
    mut client: TcpStream,
) -> std::io::Result<(TcpStream, TcpStream, String)> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(client.read_u8().await?);
        if head.len() > 8192 {
            return Err(std::io::Error::other("head too long"));
        }
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let target = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("CONNECT "))
        .and_then(|l| l.split(' ').next())
        .unwrap_or("")
        .to_string();
    if let Some((user, pass)) = &cfg.auth {
        let want = format!("proxy-authorization: basic {}", basic(user, pass)).to_lowercase();
        if !text.to_lowercase().lines().any(|l| l.trim() == want) {
            client
                .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                .await?;
            return Err(std::io::Error::other("bad credentials"));
        }
    }
    let (host, port) = target
        .rsplit_once(':')
        .ok_or_else(|| std::io::Error::other("bad target"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| std::io::Error::other("bad port"))?;
    let upstream = dial(cfg, host, port).await?;
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    Ok((client, upstream, target))
}

async fn socks5(
    cfg: &Config,
    mut client: TcpStream,
) -> std::io::Result<(TcpStream, TcpStream, String)> {
    let mut hello = [0u8; 2];
    client.read_exact(&mut hello).await?;
    let mut methods = vec![0u8; usize::from(hello[1])];
    client.read_exact(&mut methods).await?;
    let want: u8 = if cfg.auth.is_some() { 2 } else { 0 };
    if !methods.contains(&want) {
        client.write_all(&[5, 0xff]).await?;
        return Err(std::io::Error::other("no acceptable method"));
    }
    client.write_all(&[5, want]).await?;
    if let Some((user, pass)) = &cfg.auth {
        let mut v = [0u8; 2];
        client.read_exact(&mut v).await?;
        let mut u = vec![0u8; usize::from(v[1])];
        client.read_exact(&mut u).await?;
        let plen = client.read_u8().await?;
        let mut p = vec![0u8; usize::from(plen)];
        client.read_exact(&mut p).await?;
        if u != user.as_bytes() || p != pass.as_bytes() {
            client.write_all(&[1, 1]).await?;
            return Err(std::io::Error::other("bad credentials"));
        }
        client.write_all(&[1, 0]).await?;
    }
    let mut req = [0u8; 4];
    client.read_exact(&mut req).await?;
    let host = match req[3] {
        3 => {
            let len = client.read_u8().await?;
            let mut h = vec![0u8; usize::from(len)];
            client.read_exact(&mut h).await?;
            String::from_utf8_lossy(&h).to_string()
        }
        1 => {
            let mut ip = [0u8; 4];
            client.read_exact(&mut ip).await?;
            std::net::Ipv4Addr::from(ip).to_string()
        }
        _ => return Err(std::io::Error::other("unsupported address type")),
    };
    let port = client.read_u16().await?;
    let upstream = dial(cfg, &host, port).await?;
    client.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
    Ok((client, upstream, format!("{host}:{port}")))
}

async fn serve(cfg: Arc<Config>, client: TcpStream) {
    let opened = if cfg.socks {
        socks5(&cfg, client).await
    } else {
        http(&cfg, client).await
    };
    if let Ok((mut client, mut upstream, target)) = opened {
        let n = cfg.tunnels.fetch_add(1, Ordering::SeqCst) + 1;
        say(format!("tunnel {n} {target}"));
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }
}

fn main() -> std::io::Result<()> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let cfg = Arc::new(Config {
        socks: env("PROXY_KIND").as_deref() == Some("socks5"),
        auth: env("PROXY_AUTH").and_then(|a| {
            a.split_once(':')
                .map(|(u, p)| (u.to_string(), p.to_string()))
        }),
        bind: env("PROXY_BIND_IP").and_then(|ip| ip.parse().ok()),
        tunnels: AtomicU64::new(0),
    });
    let listen = env("PROXY_LISTEN").unwrap_or_else(|| "127.0.0.1:0".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(&listen).await?;
        let scheme = if cfg.socks { "socks5" } else { "http" };
        say(format!(
            "listening on {scheme}://{}",
            listener.local_addr()?
        ));
        loop {
            let (client, _) = listener.accept().await?;
            tokio::spawn(serve(cfg.clone(), client));
        }
    })
}
