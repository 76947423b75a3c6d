//! SIGTERM as the README promises it: a stream that outlives
//! `GB_SHUTDOWN_GRACE` is cut and the process still exits 0, an upload in
//! flight finishes. And `gemini-balancer healthcheck`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::helpers::*;

const STREAM: &str = "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse";

fn addr(gw: &Gateway) -> String {
    gw.url.trim_start_matches("http://").to_string()
}

/// A connection to the gateway that has served one request, so the gateway
/// has surely accepted it: it stays usable after the listener closes.
fn kept_connection(gw: &Gateway) -> TcpStream {
    let mut conn = TcpStream::connect(addr(gw)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let (status, _) = exchange(&mut conn, "GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n", b"");
    assert_eq!(status, 200);
    conn
}

/// One request on a raw keep-alive connection; the status and body of its
/// answer (framed by `Content-Length`).
fn exchange(conn: &mut TcpStream, head: &str, body: &[u8]) -> (u16, String) {
    conn.write_all(head.as_bytes()).unwrap();
    conn.write_all(body).unwrap();
    read_answer(conn)
}

fn read_answer(conn: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(conn.read(&mut byte).unwrap(), 1, "connection closed early");
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let status = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).unwrap();
    (status, String::from_utf8_lossy(&body).to_string())
}

fn sigterm(gw: &Gateway) {
    let pid = gw.proc.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
}

async fn wait_listener_closed(gw: &Gateway) {
    let addr = addr(gw).parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_exit(gw: &mut Gateway, secs: u64) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = gw.proc.child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type Streamed = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<bytes::Bytes, awc::error::PayloadError>>>,
>;

async fn held_stream(gw: &Gateway, hold: &str) -> Streamed {
    let mut resp = client()
        .post(format!("{}{STREAM}", gw.url))
        .insert_header(("x-goog-api-key", TOKEN))
        .insert_header(("x-fake-hold", hold))
        .send_json(&generate_body())
        .await
        .unwrap();
    let first = resp.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("chunk 0"));
    Box::pin(resp)
}

#[actix_rt::test]
async fn a_stream_that_outlives_the_grace_is_cut_and_the_process_exits_0() {
    let fake = FakeUpstream::start(&keys(1));
    // The fake holds the stream for up to 30 s: far beyond the grace.
    let mut gw = Gateway::start(&fake, None, &[("GB_SHUTDOWN_GRACE", "2")]);
    let mut resp = held_stream(&gw, "outlives-grace").await;
    sigterm(&gw);
    let mut rest = Vec::new();
    while let Some(chunk) = resp.next().await {
        match chunk {
            Ok(b) => rest.extend_from_slice(&b),
            Err(_) => break,
        }
    }
    assert!(
        !String::from_utf8_lossy(&rest).contains("chunk 2"),
        "the stream was cut, not finished"
    );
    assert_eq!(wait_exit(&mut gw, 60).await.code(), Some(0));
    fake.post("/_fake/release/outlives-grace", json!({})).await;
}

#[actix_rt::test]
async fn an_upload_in_flight_finishes_after_sigterm() {
    let fake = FakeUpstream::start(&keys(1));
    let mut gw = Gateway::start(&fake, None, &[("GB_SHUTDOWN_GRACE", "30")]);
    let data = vec![b'u'; 64 * 1024];
    let resp = client()
        .post(format!("{}/upload/v1beta/files", gw.url))
        .insert_header(("x-goog-api-key", TOKEN))
        .insert_header(("x-goog-upload-protocol", "resumable"))
        .insert_header(("x-goog-upload-command", "start"))
        .insert_header((
            "x-goog-upload-header-content-length",
            data.len().to_string(),
        ))
        .send_json(&json!({"file": {"display_name": "inflight", "mime_type": "text/plain"}}))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let url = resp
        .headers()
        .get("x-goog-upload-url")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let path = &url[url.find("/upload/").unwrap()..];
    // The chunk's head and its first half are sent before SIGTERM, the
    // second half only once the listener is closed.
    let mut conn = kept_connection(&gw);
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: gw\r\nx-goog-upload-command: upload, finalize\r\n\
         x-goog-upload-offset: 0\r\ncontent-length: {}\r\n\r\n",
        data.len()
    );
    conn.write_all(head.as_bytes()).unwrap();
    conn.write_all(&data[..data.len() / 2]).unwrap();
    // Signalled only once the chunk is on its way upstream: a request whose
    // head the gateway has not read yet is an idle connection, closed at
    // SIGTERM.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fake
        .requests()
        .await
        .iter()
        .any(|r| r["query"].as_str().unwrap_or("").contains("upload_id"))
    {
        assert!(
            Instant::now() < deadline,
            "the chunk never reached upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sigterm(&gw);
    wait_listener_closed(&gw).await;
    conn.write_all(&data[data.len() / 2..]).unwrap();
    let (status, body) = read_answer(&mut conn);
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let name = v["file"]["name"].as_str().unwrap();
    assert_eq!(
        v["file"]["sizeBytes"],
        data.len().to_string(),
        "every byte arrived"
    );
    assert!(fake.file_owners().await.contains_key(name));
    drop(conn);
    assert_eq!(wait_exit(&mut gw, 30).await.code(), Some(0));
}

fn healthcheck(listen: &str) -> bool {
    std::process::Command::new(env!("CARGO_BIN_EXE_gemini-balancer"))
        .arg("healthcheck")
        .env_clear()
        .env("GB_LISTEN", listen)
        .env("GB_API_KEYS", "k1")
        .env("GB_AUTH_TOKENS", "t1")
        .output()
        .unwrap()
        .status
        .success()
}

#[actix_rt::test]
async fn the_healthcheck_command_passes_on_a_live_gateway_and_fails_on_a_dead_one() {
    let fake = FakeUpstream::start(&keys(1));
    let mut gw = Gateway::start(&fake, None, &[]);
    let listen = addr(&gw);
    assert!(healthcheck(&listen), "a live gateway is healthy");
    sigterm(&gw);
    assert_eq!(wait_exit(&mut gw, 30).await.code(), Some(0));
    assert!(!healthcheck(&listen), "a dead gateway is not");
    // Something that answers, but not with 200, is not healthy either.
    let (port, _server) = answering_404();
    assert!(!healthcheck(&format!("127.0.0.1:{port}")));
}

/// A listener that answers every connection with a 404.
fn answering_404() -> (u16, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        if let Ok((mut conn, _)) = listener.accept() {
            let mut buf = [0u8; 512];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
        }
    });
    (port, server)
}

/// The "Max open files" soft and hard limits of a process.
fn open_files_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_string();
    let mut fields = line["Max open files".len()..].split_whitespace();
    (
        fields.next().unwrap().to_string(),
        fields.next().unwrap().to_string(),
    )
}

/// Starts a replica under `ulimit` settings (`sh` syntax) and returns its
/// open-files limits once it listens, and the line it logged about them.
fn start_with_ulimit(ulimit: &str, fake: &FakeUpstream) -> ((String, String), Option<String>) {
    use std::io::BufRead;
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{ulimit} && exec \"$0\""))
        .arg(env!("CARGO_BIN_EXE_gemini-balancer"))
        .env_clear()
        .env("GB_LISTEN", "127.0.0.1:0")
        .env("GB_API_KEYS", keys(1).join(","))
        .env("GB_AUTH_TOKENS", "t1")
        .env("GB_UPSTREAM_URL", &fake.url)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut logged = None;
    for line in std::io::BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.contains("open-files limit") {
            logged = Some(line.clone());
        }
        if line.contains("listening on") {
            break;
        }
    }
    let limits = open_files_limits(child.id());
    let _ = child.kill();
    let _ = child.wait();
    (limits, logged)
}

#[actix_rt::test]
async fn a_replica_raises_its_open_files_soft_limit_to_the_hard_one() {
    let fake = FakeUpstream::start(&keys(1));
    let (_, hard) = open_files_limits(std::process::id());
    // Started with a soft limit far below the hard one, as many systems do.
    let ((soft, now_hard), logged) = start_with_ulimit("ulimit -Sn 256", &fake);
    assert_eq!(now_hard, hard, "the hard limit is the operator's");
    assert_eq!(soft, hard, "the soft limit was raised to the hard one");
    let logged = logged.expect("the limit is logged at start");
    assert!(logged.contains(&format!("limit={hard}")), "{logged}");
    let hard_n: u64 = hard.parse().unwrap_or(u64::MAX); // "unlimited"
    if hard_n >= 16_384 {
        assert!(!logged.contains("is low"), "{logged}");
    }

    // A hard limit too low for many streams is warned about (a hard limit
    // can only be lowered, so never above the one this test runs under).
    let low = hard_n.min(4096);
    let ((soft, hard), logged) =
        start_with_ulimit(&format!("ulimit -Sn 256 && ulimit -Hn {low}"), &fake);
    assert_eq!((soft, hard), (low.to_string(), low.to_string()));
    let logged = logged.expect("the limit is logged at start");
    assert!(
        logged.contains("WARN") && logged.contains("open-files limit is low"),
        "{logged}"
    );
}
