//! The fake starts, announces its URL and answers a model call for a valid
//! key only. Also why `cargo test` at the workspace root leaves a built
//! `fake-gemini` in the target directory: cargo builds a package's binaries
//! for its integration tests, and the gateway's suite runs this one.
#![allow(clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn post(addr: &str, path: &str, key: &str, body: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connects");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nx-goog-api-key: {key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("writes");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("reads");
    out
}

#[test]
fn answers_a_valid_key_and_refuses_another() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fake-gemini"))
        .env("FAKE_KEYS", "smoke-key")
        .env("FAKE_LISTEN", "127.0.0.1:0")
        .env_remove("FAKE_TLS_CERT")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("fake-gemini starts");
    let stdout = child.stdout.take().expect("stdout");
    let _guard = Killed(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("a line");
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_string();

    let path = "/v1beta/models/gemini-2.0-flash:generateContent";
    let body = r#"{"contents":[{"parts":[{"text":"hello"}]}]}"#;
    let ok = post(&addr, path, "smoke-key", body);
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("candidates"), "{ok}");
    let refused = post(&addr, path, "another-key", body);
    assert!(!refused.starts_with("HTTP/1.1 200"), "{refused}");
}
