//! The floor a gateway built on actix-web and awc can reach: every request
//! is sent on to `FORWARD_UPSTREAM` with its method, path, query, headers
//! and body, and the answer streamed back. No keys, no store, no metrics,
//! no logging. `bench/run` measures it next to nginx and the gateway.
//!
//! `FORWARD_LISTEN` (default `127.0.0.1:0`), `FORWARD_UPSTREAM`
//! (`http://host:port`), `FORWARD_WORKERS` (default 2).

use actix_web::http::header::{self, HeaderName};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Headers of one hop only.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "transfer-encoding" | "upgrade" | "host" | "content-length"
    )
}

async fn forward(
    req: HttpRequest,
    body: web::Bytes,
    client: web::Data<awc::Client>,
    upstream: web::Data<String>,
) -> HttpResponse {
    let mut out = client.request(
        req.method().clone(),
        format!("{}{}", upstream.as_str(), req.uri()),
    );
    for (name, value) in req.headers() {
        if !hop_by_hop(name) {
            out = out.append_header((name.clone(), value.clone()));
        }
    }
    match out.send_body(body).await {
        Ok(answer) => {
            let mut back = HttpResponse::build(answer.status());
            for (name, value) in answer.headers() {
                if !hop_by_hop(name) && name != header::DATE {
                    back.append_header((name.clone(), value.clone()));
                }
            }
            back.streaming(answer)
        }
        Err(e) => HttpResponse::BadGateway().body(e.to_string()),
    }
}

#[actix_web::main]
#[allow(
    clippy::print_stdout,
    reason = "the bench reads the address from stdout"
)]
async fn main() -> std::io::Result<()> {
    let listen = std::env::var("FORWARD_LISTEN").unwrap_or_else(|_| "127.0.0.1:0".into());
    let upstream = std::env::var("FORWARD_UPSTREAM")
        .map_err(|_| std::io::Error::other("FORWARD_UPSTREAM is required"))?;
    let workers = std::env::var("FORWARD_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(2);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(awc::Client::default()))
            .app_data(web::Data::new(upstream.clone()))
            .app_data(web::PayloadConfig::new(64 << 20))
            .default_service(web::to(forward))
    })
    .workers(workers)
    .bind(listen)?;
    for addr in server.addrs() {
        println!("listening on http://{addr}");
    }
    server.run().await
}
