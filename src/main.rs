//! The `gemini-balancer` binary: loads the settings, answers the
//! `healthcheck` subcommand, or starts logging and serves until stopped.
//! Everything else lives in the library.

// The actix server future of the whole app is deeply nested; type checking
// its auto traits needs more than the default query depth.
#![recursion_limit = "256"]
// Detached tasks start only in the library's `background` (see clippy.toml).
#![deny(clippy::disallowed_methods)]

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, Ordering};

use gemini_balancer::{ops::telemetry, settings, startup::Application};

/// mimalloc: per-thread free lists suit a server that allocates and frees
/// small buffers on every request on the thread that served it; glibc's
/// malloc spent about a tenth of the gateway's CPU time under load.
#[global_allocator]
static ALLOCATOR: LeanMiMalloc = LeanMiMalloc;

/// `mi_option_arena_eager_commit` in mimalloc.h (the same index in mimalloc
/// 2 and 3).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// mimalloc, told before its first allocation to commit arena memory as it
/// is used rather than up front: an idle replica stays under 10 MiB resident
/// instead of about 20, at the same speed under load.
/// `MIMALLOC_ARENA_EAGER_COMMIT` in the environment still wins.
struct LeanMiMalloc;

static CONFIGURED: AtomicBool = AtomicBool::new(false);

impl LeanMiMalloc {
    #[inline]
    fn configure() {
        if !CONFIGURED.load(Ordering::Relaxed) {
            CONFIGURED.store(true, Ordering::Relaxed);
            // SAFETY: sets one integer option, before any allocation (a race
            // between threads would only set the same value twice).
            unsafe { libmimalloc_sys::mi_option_set_default(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
        }
    }
}

/// One more allocation (a `realloc` counts as one), in a build with the
/// `count-allocations` feature only.
#[inline]
fn count_allocation() {
    #[cfg(feature = "count-allocations")]
    gemini_balancer::ops::metrics::ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
}

// SAFETY: every call is passed on unchanged to mimalloc.
unsafe impl GlobalAlloc for LeanMiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::configure();
        count_allocation();
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::configure();
        count_allocation();
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_allocation();
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[actix_web::main]
#[allow(
    clippy::print_stderr,
    reason = "configuration errors and the healthcheck verdict are reported before logging exists"
)]
async fn main() -> std::process::ExitCode {
    // Names only: a misspelt variable's value may be a secret.
    let unknown = settings::unknown_in_environment();
    let settings = match settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gemini-balancer: configuration error: {e}");
            // A misspelt variable is the likely cause of a missing one.
            for u in &unknown {
                eprintln!("gemini-balancer: {u}");
            }
            return std::process::ExitCode::from(2);
        }
    };
    // `gemini-balancer healthcheck`: for container HEALTHCHECKs in images
    // without curl.
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        let probed = match &settings.tls {
            Some(tls) => {
                gemini_balancer::ops::healthcheck::probe_health_tls(settings.listen.addr, &tls.cert)
            }
            None => gemini_balancer::ops::healthcheck::probe_health(settings.listen.addr),
        };
        return match probed {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gemini-balancer: unhealthy: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let traces = match telemetry::init(&settings.logging) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("gemini-balancer: configuration error: GB_OTLP_ENDPOINT: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    for u in &unknown {
        tracing::warn!(variable = %u.name, did_you_mean = u.nearest, "{u}");
    }
    let result = async {
        Application::build(settings)
            .await?
            .run_until_stopped()
            .await
    }
    .await;
    // Sends the spans not yet sent.
    drop(traces);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("gemini-balancer: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
