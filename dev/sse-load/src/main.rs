//! The client side of the concurrent-streams benchmark (`bench/streams.py`):
//! opens many SSE streams over HTTP/1.1, spread evenly over a ramp, keeps
//! them all open, and reports per stream whether it got every event and how
//! long its first event took from the start of the TCP connect. A load
//! generator in a scripting language is itself the bottleneck at ten
//! thousand streams; this one is not.
//!
//! Usage: `sse-load ADDR PATH CREDENTIAL STREAMS RAMP_SECS EVENTS TIMEOUT_SECS`
//! (ADDR is host:port). Prints one JSON object on stdout.

// Its report is its output; a wrong argument is said on stderr.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BODY: &str = r#"{"contents":[{"parts":[{"text":"hello"}]}]}"#;

/// What became of one stream.
struct Outcome {
    first_ms: Option<f64>,
    events: usize,
    error: Option<&'static str>,
}

async fn one(addr: String, request: std::sync::Arc<Vec<u8>>) -> Outcome {
    let started = Instant::now();
    let mut out = Outcome {
        first_ms: None,
        events: 0,
        error: None,
    };
    let mut conn = match TcpStream::connect(&addr).await {
        Ok(c) => c,
        Err(_) => {
            out.error = Some("connect");
            return out;
        }
    };
    if conn.write_all(&request).await.is_err() {
        out.error = Some("write");
        return out;
    }
    let mut buf = vec![0u8; 16 * 1024];
    // Bytes kept from the previous read, so a marker split across reads is
    // found once.
    let mut carry: Vec<u8> = Vec::new();
    let mut status_checked = false;
    loop {
        let n = match conn.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(_) => {
                out.error = Some("reset");
                return out;
            }
        };
        carry.extend_from_slice(&buf[..n]);
        if !status_checked {
            if carry.len() < 12 {
                continue;
            }
            if !carry.starts_with(b"HTTP/1.1 200") {
                out.error = Some("status");
                return out;
            }
            status_checked = true;
        }
        let found = memchr::memmem::find_iter(&carry, b"data: ").count();
        if found > 0 && out.first_ms.is_none() {
            out.first_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
        }
        out.events += found;
        let keep = carry.len().min(5);
        let tail = carry[carry.len() - keep..].to_vec();
        carry = if tail.ends_with(b"data: ") {
            Vec::new()
        } else {
            tail
        };
    }
    out
}

fn arg(args: &[String], i: usize, name: &str) -> String {
    args.get(i).cloned().unwrap_or_else(|| {
        eprintln!("missing argument {name}");
        std::process::exit(2)
    })
}

fn num<T: std::str::FromStr>(args: &[String], i: usize, name: &str) -> T {
    arg(args, i, name).parse().unwrap_or_else(|_| {
        eprintln!("argument {name} is not a number");
        std::process::exit(2)
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr = arg(&args, 1, "ADDR");
    let path = arg(&args, 2, "PATH");
    let credential = arg(&args, 3, "CREDENTIAL");
    let streams: usize = num(&args, 4, "STREAMS");
    let ramp: f64 = num(&args, 5, "RAMP_SECS");
    let events: usize = num(&args, 6, "EVENTS");
    let timeout: u64 = num(&args, 7, "TIMEOUT_SECS");
    let request = std::sync::Arc::new(
        format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nx-goog-api-key: {credential}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
            BODY.len()
        )
        .into_bytes(),
    );
    let begin = Instant::now();
    let mut tasks = Vec::with_capacity(streams);
    for i in 0..streams {
        let due = begin + Duration::from_secs_f64(ramp * i as f64 / streams.max(1) as f64);
        tokio::time::sleep_until(due.into()).await;
        let (addr, request) = (addr.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(timeout), one(addr, request)).await {
                Ok(o) => o,
                Err(_) => Outcome {
                    first_ms: None,
                    events: 0,
                    error: Some("timeout"),
                },
            }
        }));
    }
    let opened_s = begin.elapsed().as_secs_f64();
    let mut firsts = Vec::with_capacity(streams);
    let (mut complete, mut errors) = (0usize, std::collections::BTreeMap::<&str, usize>::new());
    for t in tasks {
        let o = t.await.unwrap_or(Outcome {
            first_ms: None,
            events: 0,
            error: Some("panic"),
        });
        if let Some(f) = o.first_ms {
            firsts.push(f);
        }
        match o.error {
            Some(e) => *errors.entry(e).or_default() += 1,
            None if o.events == events => complete += 1,
            None => *errors.entry("missing events").or_default() += 1,
        }
    }
    firsts.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f64| {
        firsts
            .get(((firsts.len() as f64 * q) as usize).min(firsts.len().saturating_sub(1)))
            .map(|v| (v * 100.0).round() / 100.0)
    };
    let report = serde_json::json!({
        "streams": streams,
        "complete": complete,
        "errors": errors.values().sum::<usize>(),
        "error_kinds": errors,
        "first_event_p50_ms": pct(0.5),
        "first_event_p99_ms": pct(0.99),
        "first_event_max_ms": firsts.last().map(|v| (v * 100.0).round() / 100.0),
        "opened_in_s": (opened_s * 100.0).round() / 100.0,
        "wall_s": (begin.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    });
    println!("{report}");
}
