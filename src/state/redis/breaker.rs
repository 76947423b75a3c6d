//! The store's circuit breaker: after repeated failures calls fail fast,
//! and one probe at a time finds out when Redis answers again.

use super::{AtomicU32, AtomicU64, Instant, Ordering, PROBE_EVERY_MS, TRIP_AFTER};

/// The circuit breaker's state. Its times are on the monotonic clock
/// ([`monotonic_ms`]): a wall clock stepped back would keep it open for the
/// size of the step.
#[derive(Default)]
pub(super) struct Breaker {
    failures: AtomicU32,
    /// 0 while closed; while open, when the next probe may go through.
    next_probe_ms: AtomicU64,
}

impl Breaker {
    /// Whether the circuit is open: calls fail fast until a probe succeeds.
    pub(super) fn is_open(&self) -> bool {
        self.next_probe_ms.load(Ordering::Relaxed) != 0
    }

    /// Whether a call may go to Redis now: always while closed; while open,
    /// one caller per [`PROBE_EVERY_MS`] (the probe), the rest fail fast.
    pub(super) fn admit(&self) -> bool {
        let next = self.next_probe_ms.load(Ordering::Relaxed);
        if next == 0 {
            return true;
        }
        let now = monotonic_ms();
        now >= next
            && self
                .next_probe_ms
                .compare_exchange(
                    next,
                    now + PROBE_EVERY_MS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// A call worked: the circuit closes at once.
    pub(super) fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if self.next_probe_ms.load(Ordering::Relaxed) != 0
            && self.next_probe_ms.swap(0, Ordering::Relaxed) != 0
        {
            tracing::info!("the state store answers again: circuit closed");
        }
    }

    /// A call failed; how many in a row have now. The circuit opens (or, after
    /// a failed probe, stays open) from the [`TRIP_AFTER`]th.
    pub(super) fn failed(&self) -> u32 {
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures >= TRIP_AFTER {
            let was = self
                .next_probe_ms
                .swap(monotonic_ms() + PROBE_EVERY_MS, Ordering::Relaxed);
            if was == 0 {
                tracing::warn!(
                    failures,
                    "state store circuit open: calls fail fast until a probe succeeds"
                );
            }
        }
        failures
    }
}

/// Milliseconds on the monotonic clock since this process first asked
/// (never 0, so a zeroed breaker is closed).
pub(super) fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}
