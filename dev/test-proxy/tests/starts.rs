//! The proxy opens an HTTP CONNECT tunnel and reports it on stdout. Also why
//! `cargo test` at the workspace root leaves a built `test-proxy` in the
//! target directory: cargo builds a package's binaries for its integration
//! tests, and the gateway's suite runs this one.
#![allow(clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tunnels_a_connect_and_reports_it() {
    let target = TcpListener::bind("127.0.0.1:0").expect("binds");
    let target_addr = target.local_addr().expect("address");
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = target.accept() {
            let mut buf = [0u8; 4];
            if s.read_exact(&mut buf).is_ok() {
                let _ = s.write_all(&buf);
            }
        }
    });

    let mut child = Command::new(env!("CARGO_BIN_EXE_test-proxy"))
        .env("PROXY_KIND", "http")
        .env("PROXY_LISTEN", "127.0.0.1:0")
        .env_remove("PROXY_AUTH")
        .env_remove("PROXY_BIND_IP")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("test-proxy starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let _guard = Killed(child);
    let first = lines.next().expect("a line").expect("utf-8");
    let proxy = first
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line: {first:?}"))
        .to_string();

    let mut s = TcpStream::connect(&proxy).expect("connects");
    write!(
        s,
        "CONNECT {target_addr} HTTP/1.1\r\nHost: {target_addr}\r\n\r\n"
    )
    .expect("writes");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("reads the answer");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"ping").expect("writes");
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo).expect("reads the echo");
    assert_eq!(&echo, b"ping");
    let report = lines.next().expect("a line").expect("utf-8");
    assert_eq!(report, format!("tunnel 1 {target_addr}"));
}
