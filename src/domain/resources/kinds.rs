//! The resource types that belong to a key, and how long the owner of each
//! is remembered.

use std::time::Duration;

use crate::settings::Settings;
use crate::state::keyspace::{index, ns};

/// The resource types that belong to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    CachedContent,
    Batch,
    /// A long-running operation (`operations/…` or `models/{m}/operations/…`).
    Operation,
    FileSearchStore,
    /// An ephemeral Live API token, recorded under a hash of itself.
    LiveToken,
}

/// An ephemeral token lives 30 minutes unless its creator says otherwise.
const LIVE_TOKEN_TTL: Duration = Duration::from_secs(30 * 60);

/// How long a batch's owner is remembered: Google keeps batch jobs and their
/// results for days after they finish.
const BATCH_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Generated media of long-running operations is kept two days.
const OPERATION_TTL: Duration = Duration::from_secs(2 * 24 * 3600);
/// File search stores live until they are deleted.
const STORE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// A cache whose expiry cannot be read is remembered this long (Google's
/// default cache TTL).
const CACHE_DEFAULT_TTL: Duration = Duration::from_secs(3600);

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::File,
        Kind::CachedContent,
        Kind::Batch,
        Kind::Operation,
        Kind::FileSearchStore,
        Kind::LiveToken,
    ];

    /// The collection segment of the type's names (`cachedContents/…`), and
    /// the field of its list answers.
    pub fn collection(self) -> &'static str {
        match self {
            Kind::File => "files",
            Kind::CachedContent => "cachedContents",
            Kind::Batch => "batches",
            Kind::Operation => "operations",
            Kind::FileSearchStore => "fileSearchStores",
            Kind::LiveToken => "auth_tokens",
        }
    }

    /// The type of a resource name, by its first segment.
    pub fn of(name: &str) -> Option<Kind> {
        if name.starts_with("models/") && name.contains("/operations/") {
            return Some(Kind::Operation);
        }
        let first = name.split('/').next()?;
        Kind::ALL.into_iter().find(|k| k.collection() == first)
    }

    /// The store namespace of its owner records. Files keep the namespace
    /// they always had, so replicas of earlier versions read them unchanged.
    pub(super) fn ns(self) -> &'static str {
        match self {
            Kind::File => ns::FILE,
            _ => ns::RESOURCE,
        }
    }

    pub(super) fn token_index(self, token_id: &str) -> String {
        match self {
            Kind::File => index::token_files(token_id),
            k => index::token_resources(k.collection(), token_id),
        }
    }

    /// How long an owner record lives when the resource itself does not say.
    pub fn ttl(self, settings: &Settings) -> Duration {
        match self {
            Kind::File => settings.sessions.file_ttl,
            Kind::CachedContent => CACHE_DEFAULT_TTL,
            Kind::Batch => BATCH_TTL,
            Kind::Operation => OPERATION_TTL,
            Kind::FileSearchStore => STORE_TTL,
            Kind::LiveToken => LIVE_TOKEN_TTL,
        }
    }
}

/// The time left until an RFC 3339 timestamp (`2026-01-02T03:04:05.123Z`,
/// any offset, fractions cut to the millisecond), or `None` when it cannot
/// be read.
pub fn ttl_until(expire_time: &str, now_ms: u64) -> Option<Duration> {
    let at = parse_rfc3339_ms(expire_time)?;
    Some(Duration::from_millis(at.saturating_sub(now_ms)))
}

/// Unix ms of an RFC 3339 timestamp; `None` for one that is malformed or
/// before 1970.
fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let at: jiff::Timestamp = s.parse().ok()?;
    u64::try_from(at.as_millisecond()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_of_names() {
        assert_eq!(Kind::of("files/a"), Some(Kind::File));
        assert_eq!(Kind::of("cachedContents/a"), Some(Kind::CachedContent));
        assert_eq!(Kind::of("batches/a"), Some(Kind::Batch));
        assert_eq!(Kind::of("models/veo/operations/a"), Some(Kind::Operation));
        assert_eq!(Kind::of("fileSearchStores/a"), Some(Kind::FileSearchStore));
        assert_eq!(Kind::of("models/a"), None);
    }

    #[test]
    fn expiry_times_become_ttls() {
        let now = parse_rfc3339_ms("2026-03-01T00:00:00Z").unwrap();
        assert_eq!(now, 1_772_323_200_000);
        assert_eq!(
            ttl_until("2026-03-01T01:00:00.500Z", now),
            Some(Duration::from_millis(3_600_500))
        );
        assert_eq!(
            ttl_until("2026-03-01T00:10:00.123456789Z", now),
            Some(Duration::from_millis(600_123))
        );
        assert_eq!(ttl_until("2026-02-28T00:00:00Z", now), Some(Duration::ZERO));
        assert_eq!(ttl_until("yesterday", now), None);
        assert_eq!(ttl_until("2026-13-01T00:00:00Z", now), None);
    }

    #[test]
    fn expiry_times_with_offsets_and_fractions() {
        let now = parse_rfc3339_ms("2026-03-01T00:00:00Z").unwrap();
        for same in [
            "2026-03-01T01:00:00+01:00",
            "2026-02-28T16:00:00-08:00",
            "2026-03-01T05:30:00+05:30",
            "2026-03-01T00:00:00.000+00:00",
            "2026-03-01T00:00:00.0009Z",
        ] {
            assert_eq!(parse_rfc3339_ms(same), Some(now), "{same}");
        }
        assert_eq!(
            parse_rfc3339_ms("2026-03-01T00:00:00.999999999Z"),
            Some(now + 999)
        );
        assert_eq!(parse_rfc3339_ms("1969-12-31T23:59:59Z"), None);
    }

    #[test]
    fn malformed_expiry_times_are_refused() {
        for bad in [
            "",
            "Z",
            "2026-03-01",
            "2026-03-01T00:00:00",
            "2026-02-30T00:00:00Z",
            "2026-03-01T24:00:01Z",
            "2026-03-01T00:60:00Z",
            "2026-03-01T00:00:00+99:00",
            "2026-03-01T00:00:00.Z",
            "2026-03-01T00:00:00Zjunk",
            "\u{e9}2026-03-01T00:00:00Z",
            "2026-03-01T00:00:00\u{e9}",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad:?}");
        }
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn reading_arbitrary_expiry_times_never_panics(s in "\\PC{0,40}", now in any::<u64>()) {
                let _ = ttl_until(&s, now);
            }

            #[test]
            fn expiry_times_round_trip(ms in 0i64..253_402_300_799_999) {
                let text = jiff::Timestamp::from_millisecond(ms).unwrap().to_string();
                prop_assert_eq!(parse_rfc3339_ms(&text), Some(ms as u64));
            }
        }
    }
}
