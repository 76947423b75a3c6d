//! Wiring: the store, the shared gateway state, one upstream client per
//! worker, the routes, and a server bound before it is returned (so tests
//! can bind port 0 and read the address).

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::{web, App, HttpMessage, HttpServer};
use anyhow::Context;
use tracing_actix_web::TracingLogger;

use crate::background::Background;
use crate::domain::gateway::Gateway;
use crate::http::routes;
use crate::ops::metrics::Metrics;
use crate::ops::telemetry::{GatewaySpan, RequestId};
use crate::settings::Settings;
use crate::state::{
    GatedStore, LayoutGate, LayoutStatus, MemoryStore, RedisConfig, RedisStore, StateStore,
};
use crate::upstream::client::{tls_config, Upstream};

pub struct Application {
    server: Server,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    gateway: Arc<Gateway>,
    background: Background,
}

/// With `GB_ADMIN_LISTEN` set, which listener serves which paths: the
/// internal one serves `/metrics`, `/admin` and the health checks only, the
/// public one everything else. Without it, one listener serves everything.
#[derive(Clone, Copy)]
struct ListenerSplit {
    admin: Option<SocketAddr>,
}

impl ListenerSplit {
    /// `local` is the address of the listener the request came in on, `path`
    /// the decoded path the router matches.
    fn refuses(&self, local: SocketAddr, path: &str) -> bool {
        let Some(admin) = self.admin else {
            return false;
        };
        let ops = path == "/metrics" || path == "/admin" || path.starts_with("/admin/");
        if local == admin {
            !(ops || path == "/healthz" || path == "/readyz")
        } else {
            ops
        }
    }
}

/// Opens the configured store. Redis is checked for a layout this build can
/// read; when that cannot be done at start (Redis is down, or another
/// replica holds the migration lock), the check is retried in the background
/// and requests that need bindings get 503 until it is done.
pub async fn open_store(
    settings: &Settings,
    metrics: &Arc<Metrics>,
    background: &mut Background,
) -> anyhow::Result<Arc<dyn StateStore>> {
    let Some(url) = &settings.redis.url else {
        tracing::info!("no GB_REDIS_URL: using the embedded in-memory store (single replica only)");
        return Ok(Arc::new(MemoryStore::new()));
    };
    let store = RedisStore::open(&RedisConfig {
        mode: settings.redis.mode,
        url,
        sentinel_master: &settings.redis.sentinel_master,
        prefix: &settings.redis.prefix,
        timeout: settings.redis.timeout,
        pool_size: settings.redis.pool_size,
        threads: settings.listen.workers,
    })?
    .with_observer({
        let metrics = metrics.clone();
        Arc::new(move |elapsed, ok| metrics.store_call(elapsed, ok))
    });
    // A server that answers but cannot serve the gateway (a cluster node in
    // standalone mode) is a configuration error, not an outage.
    let reachable = match store.ping().await {
        Err(crate::state::StoreError::Misconfigured(msg)) => anyhow::bail!(msg),
        other => other.is_ok(),
    };
    let store = Arc::new(store);
    background.probe_store(store.clone());
    let checked = if reachable {
        crate::state::migrations::apply_within(
            &store,
            crate::state::migrations::MIGRATIONS,
            START_PATIENCE,
        )
        .await
    } else {
        Err(crate::state::StoreError::Unavailable(
            "Redis did not answer a ping".into(),
        ))
    };
    let gate = match checked {
        Ok(version) => {
            tracing::info!(layout = version, prefix = %settings.redis.prefix, mode = settings.redis.mode.as_str(), "Redis store ready");
            Arc::new(LayoutGate::new(LayoutStatus::Compatible { version }))
        }
        Err(crate::state::StoreError::Layout(msg)) => anyhow::bail!(msg),
        Err(e) => {
            tracing::warn!(error = %e, "Redis key layout unchecked at start; serving unpinned traffic and retrying the check in the background");
            let gate = Arc::new(LayoutGate::new(LayoutStatus::Unchecked));
            background.check_layout(store.clone(), gate.clone());
            gate
        }
    };
    Ok(Arc::new(GatedStore::new(store, gate)))
}

/// How long a replica starting waits for another's migration lock before it
/// starts serving and leaves the check to the background.
const START_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// Raises the open-files soft limit to the hard one: a replica holds one
/// socket per client connection (and per upstream connection over
/// HTTP/1.1), so thousands of open streams need more than the usual soft
/// limit of 1,024. The hard limit is the operator's (compose `ulimits`, the
/// container runtime's default in Kubernetes).
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < 16_384 => tracing::warn!(
            limit,
            "open-files limit is low: each client connection takes one; raise the hard limit (ulimit -n, compose ulimits)"
        ),
        Ok(limit) => tracing::info!(limit, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "could not read or raise the open-files limit"),
    }
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        raise_open_files_limit();
        let metrics = Arc::new(Metrics::new());
        let mut background = Background::new();
        let store = open_store(&settings, &metrics, &mut background).await?;
        let tls = tls_config(settings.upstream.ca_file.as_deref())?;
        let listener = TcpListener::bind(settings.listen.addr)
            .with_context(|| format!("GB_LISTEN: cannot bind {}", settings.listen.addr))?;
        let addr = listener.local_addr()?;
        let admin_listener = match settings.admin.listen {
            Some(a) => Some(
                TcpListener::bind(a)
                    .with_context(|| format!("GB_ADMIN_LISTEN: cannot bind {a}"))?,
            ),
            None => None,
        };
        let admin_addr = match &admin_listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };
        let split = ListenerSplit { admin: admin_addr };
        let grace = settings.listen.shutdown_grace;
        let workers = settings.listen.workers;
        let tls_listener = match &settings.tls {
            Some(tls) => Some(listener_tls(&tls.cert, &tls.key)?),
            None => None,
        };
        let gateway = Arc::new(Gateway::new(settings, store, metrics));
        let data = web::Data::from(gateway.clone());
        let worker_tls = tls.clone();
        let server = HttpServer::new(move || {
            let tls = worker_tls.clone();
            let upstream = Upstream::new(
                &data.settings.upstream.url,
                tls.clone(),
                data.settings.upstream.timeout,
                data.proxies.clone(),
            );
            App::new()
                .app_data(data.clone())
                .app_data(web::Data::new(upstream))
                .wrap_fn(move |req, srv| {
                    use futures_util::future::{ready, Either, FutureExt};
                    if split.refuses(req.app_config().local_addr(), req.match_info().as_str()) {
                        let res = req.error_response(crate::http::error::ApiError::not_found(
                            "No route for this path.",
                        ));
                        Either::Left(ready(Ok(res.map_into_right_body())))
                    } else {
                        let fut = actix_web::dev::Service::call(srv, req);
                        Either::Right(
                            fut.map(|r| r.map(actix_web::dev::ServiceResponse::map_into_left_body)),
                        )
                    }
                })
                .wrap_fn(|req, srv| {
                    let id = req.extensions().get::<RequestId>().cloned();
                    let metrics = req
                        .app_data::<web::Data<Gateway>>()
                        .map(|gw| gw.metrics.clone());
                    let fut = actix_web::dev::Service::call(srv, req);
                    async move {
                        let mut res = fut.await?;
                        if let Some(metrics) = metrics {
                            // API routes are labelled by the table dispatch
                            // follows; the rest by the router's scopes.
                            let label = res
                                .request()
                                .extensions()
                                .get::<crate::http::routes::RouteLabel>()
                                .copied();
                            let route = match label {
                                Some(crate::http::routes::RouteLabel(l)) => l,
                                None => {
                                    crate::ops::metrics::operational_route(res.request().path())
                                }
                            };
                            metrics.request(route, res.status().as_u16());
                            let kind = res
                                .response()
                                .extensions()
                                .get::<crate::http::error::ErrorKind>()
                                .copied();
                            if let Some(crate::http::error::ErrorKind(kind)) = kind {
                                metrics.gateway_error(kind);
                            }
                        }
                        if let Some(RequestId(id)) = id {
                            if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&id) {
                                res.headers_mut().insert(
                                    actix_web::http::header::HeaderName::from_static(
                                        "x-request-id",
                                    ),
                                    v,
                                );
                            }
                        }
                        Ok(res)
                    }
                })
                .wrap(TracingLogger::<GatewaySpan>::new())
                .route("/healthz", web::get().to(routes::ops::healthz))
                .route("/readyz", web::get().to(routes::ops::readyz))
                .route("/metrics", web::get().to(routes::ops::metrics))
                .configure(routes::admin::configure)
                .default_service(web::to(routes::dispatch))
        })
        .workers(workers);
        let (server, scheme) = match &tls_listener {
            Some(cfg) => (server.listen_rustls_0_23(listener, cfg.clone())?, "https"),
            None => (server.listen(listener)?, "http"),
        };
        let server = match admin_listener {
            Some(l) => server.listen(l)?,
            None => server,
        };
        let server = server
            .shutdown_timeout(grace.as_secs())
            .disable_signals()
            .run();
        tracing::info!("listening on {scheme}://{addr}");
        if let Some(a) = admin_addr {
            tracing::info!("metrics and admin on the internal listener http://{a} only");
        }
        {
            let gw = gateway.clone();
            let upstream = Upstream::new(
                &gw.settings.upstream.url,
                tls.clone(),
                gw.settings.upstream.timeout,
                gw.proxies.clone(),
            );
            background.start(&gw, upstream, addr);
        }
        Ok(Self {
            server,
            addr,
            admin_addr,
            gateway,
            background,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The internal listener's address, when `GB_ADMIN_LISTEN` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Serves until SIGTERM or SIGINT, then drains: no new connections are
    /// accepted (a request already being handled sees readiness 503), and
    /// in-flight requests and streams finish within `GB_SHUTDOWN_GRACE`
    /// seconds.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Self {
            mut server,
            gateway,
            background,
            ..
        } = self;
        let handle = server.handle();
        let served = tokio::select! {
            served = &mut server => served,
            () = wait_for_signal() => {
                tracing::info!("shutdown signal: draining in-flight requests");
                gateway.start_draining();
                // Awaiting the server is what drives its graceful stop.
                let (served, ()) = futures_util::future::join(&mut server, handle.stop(true)).await;
                served
            }
        };
        background.stop(&gateway).await;
        served?;
        tracing::info!("stopped");
        Ok(())
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The TLS configuration of the listener (`GB_TLS_CERT`, `GB_TLS_KEY`: PEM),
/// so clients that insist on `https://` and `wss://` (the Python SDK's Live
/// API) can reach the gateway directly.
fn listener_tls(cert: &str, key: &str) -> anyhow::Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<_, _>>)
        .map_err(|e| anyhow::anyhow!("GB_TLS_CERT: cannot read a PEM certificate chain: {e}"))?;
    if certs.is_empty() {
        anyhow::bail!("GB_TLS_CERT: the file holds no certificate");
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("GB_TLS_KEY: cannot read a PEM private key: {e}"))?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("GB_TLS_CERT/GB_TLS_KEY: the key does not match the certificate")
}
