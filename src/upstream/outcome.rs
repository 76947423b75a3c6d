//! What an upstream answer says about the key that got it: rate-limited
//! (and until when), rejected (invalid, expired, leaked, suspended), a server
//! error, or the request's own fault.
//!
//! This is the verdict on one answer. Key health, the state every replica
//! shares (cooling, disabled), is kept by [`crate::domain::keys`], which
//! turns an [`Outcome`] into a state change in the store.

use actix_web::http::StatusCode;

/// What one upstream answer means for the key that got it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success,
    /// 429: cool down until then; only for `model` when Google's
    /// `QuotaFailure` names one (its limits are per project and per model).
    RateLimited {
        until_ms: u64,
        per_day: bool,
        model: Option<String>,
    },
    /// The key itself is invalid, expired, leaked or suspended.
    KeyRejected {
        reason: &'static str,
    },
    /// 5xx: counted, retried elsewhere, never disabling.
    ServerError,
    /// Any other answer: the request's fault, not the key's.
    ClientError,
}

impl Outcome {
    /// The outcome's name in metrics and statistics.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::RateLimited { .. } => "rate_limited",
            Outcome::KeyRejected { .. } => "key_rejected",
            Outcome::ServerError => "server_error",
            Outcome::ClientError => "client_error",
        }
    }

    /// Whether an unpinned request should be tried again on another key.
    pub fn retryable(&self, status: StatusCode) -> bool {
        match self {
            Outcome::RateLimited { .. } | Outcome::KeyRejected { .. } => true,
            Outcome::ServerError => matches!(status.as_u16(), 500 | 502 | 503 | 504),
            _ => false,
        }
    }
}

const DEFAULT_COOLDOWN_MS: u64 = 60_000;

/// Classifies one upstream answer from its status and (error) body.
pub fn classify(status: StatusCode, body: &[u8], now: u64) -> Outcome {
    let code = status.as_u16();
    if status.is_success() || status.is_informational() || status.is_redirection() {
        return Outcome::Success;
    }
    if status.is_server_error() {
        return Outcome::ServerError;
    }
    let err = error_object(body);
    let message = err
        .as_ref()
        .and_then(|e| e.get("message"))
        .and_then(|m| m.as_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let details: Vec<&serde_json::Value> = err
        .as_ref()
        .and_then(|e| e.get("details"))
        .and_then(|d| d.as_array())
        .map(|d| d.iter().collect())
        .unwrap_or_default();
    let has_reason = |r: &str| {
        details
            .iter()
            .any(|d| d.get("reason").and_then(|v| v.as_str()) == Some(r))
    };
    match code {
        429 => rate_limit(&details, now),
        400 if has_reason("API_KEY_INVALID") || message.contains("api key not valid") => {
            Outcome::KeyRejected {
                reason: "api_key_invalid",
            }
        }
        401 | 403 => {
            if message.contains("expired") && message.contains("api key")
                || has_reason("API_KEY_EXPIRED")
            {
                Outcome::KeyRejected {
                    reason: "api_key_expired",
                }
            } else if message.contains("leaked") {
                Outcome::KeyRejected {
                    reason: "api_key_leaked",
                }
            } else if message.contains("suspended") || has_reason("CONSUMER_SUSPENDED") {
                Outcome::KeyRejected {
                    reason: "consumer_suspended",
                }
            } else if has_reason("API_KEY_SERVICE_BLOCKED") || has_reason("SERVICE_DISABLED") {
                Outcome::KeyRejected {
                    reason: "service_blocked",
                }
            } else {
                Outcome::ClientError
            }
        }
        _ => Outcome::ClientError,
    }
}

/// A 429's cooldown. Each `QuotaFailure` violation lasts until the next
/// midnight Pacific (a per-day `quotaId`) or for the `RetryInfo` delay
/// (default 60 s), scoped to the model its `quotaDimensions` name, or to the
/// whole key; of several violations the longest wins.
fn rate_limit(details: &[&serde_json::Value], now: u64) -> Outcome {
    let delay = details
        .iter()
        .filter_map(|d| d.get("retryDelay").and_then(|v| v.as_str()))
        .find_map(parse_duration_ms)
        .unwrap_or(DEFAULT_COOLDOWN_MS);
    let violations = details
        .iter()
        .filter_map(|d| d.get("violations").and_then(|v| v.as_array()))
        .flatten();
    let mut best: Option<Outcome> = None;
    for v in violations {
        let per_day = v
            .get("quotaId")
            .and_then(|q| q.as_str())
            .is_some_and(|q| q.contains("PerDay"));
        let until_ms = if per_day {
            next_pacific_midnight_ms(now)
        } else {
            now + delay
        };
        let model = v
            .get("quotaDimensions")
            .and_then(|d| d.get("model"))
            .and_then(|m| m.as_str())
            .and_then(crate::upstream::model::normalize_model);
        if best
            .as_ref()
            .is_none_or(|b| matches!(b, Outcome::RateLimited { until_ms: u, .. } if until_ms > *u))
        {
            best = Some(Outcome::RateLimited {
                until_ms,
                per_day,
                model,
            });
        }
    }
    best.unwrap_or(Outcome::RateLimited {
        until_ms: now + delay,
        per_day: false,
        model: None,
    })
}

/// The `error` object of a Google error body; the OpenAI-compatible endpoint
/// wraps it in a one-element array.
fn error_object(body: &[u8]) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let v = match v {
        serde_json::Value::Array(mut items) if !items.is_empty() => items.swap_remove(0),
        other => other,
    };
    v.get("error").cloned()
}

/// `"38s"`, `"1.5s"`, `"0.250s"` → milliseconds, parsed as a decimal (no
/// float rounding), sub-millisecond remainders rounded up, capped at a week.
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    const CAP: u64 = 7 * 86_400_000;
    let num = s.trim().strip_suffix('s')?;
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
        return None;
    }
    if int.len() > 12 {
        return Some(CAP);
    }
    let secs: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let ms: u64 = format!("{:0<3}", &frac[..frac.len().min(3)]).parse().ok()?;
    let round_up = u64::from(frac.bytes().skip(3).any(|b| b != b'0'));
    Some((secs * 1000 + ms + round_up).min(CAP))
}

/// The next midnight in `America/Los_Angeles` (Google's daily quota reset),
/// as Unix ms, by the time zone database compiled into the binary (the
/// release image has no system zone files). Should that ever fail (a time
/// past the year 9999), a day from now.
pub fn next_pacific_midnight_ms(now_ms: u64) -> u64 {
    const DAY_MS: u64 = 24 * 3600 * 1000;
    let next = || -> Result<u64, jiff::Error> {
        let now = jiff::Timestamp::from_millisecond(i64::try_from(now_ms).unwrap_or(i64::MAX))?;
        let midnight = now
            .in_tz("America/Los_Angeles")?
            .tomorrow()?
            .start_of_day()?;
        Ok(u64::try_from(midnight.timestamp().as_millisecond()).unwrap_or(now_ms))
    };
    next().unwrap_or(now_ms.saturating_add(DAY_MS))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[allow(clippy::needless_pass_by_value, reason = "takes json! literals")]
    fn body(v: serde_json::Value) -> Vec<u8> {
        v.to_string().into_bytes()
    }

    #[test]
    fn retry_delay_sets_the_cooldown() {
        let b = body(
            json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1.5s"}]}}),
        );
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, &b, 1000),
            Outcome::RateLimited {
                until_ms: 2500,
                per_day: false,
                model: None
            }
        );
    }

    #[test]
    fn missing_retry_info_means_sixty_seconds() {
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, b"not json", 0),
            Outcome::RateLimited {
                until_ms: 60_000,
                per_day: false,
                model: None
            }
        );
    }

    #[test]
    fn per_day_quota_cools_until_pacific_midnight() {
        let b = body(json!([{"error": {"code": 429, "details": [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
             "violations": [{"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "20s"}]}}]));
        // 2026-07-01T12:00:00Z is 05:00 PDT; next midnight PDT is 2026-07-02T07:00:00Z.
        let now = 1_782_907_200_000;
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, &b, now),
            Outcome::RateLimited {
                until_ms: 1_782_975_600_000,
                per_day: true,
                model: None
            }
        );
    }

    #[test]
    fn a_quota_naming_a_model_cools_that_model_only() {
        let b = body(
            json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
             "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
               "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
               "quotaDimensions": {"location": "global", "model": "gemini-2.5-pro"}}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "20s"}]}}),
        );
        let now = 1_782_907_200_000;
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, &b, now),
            Outcome::RateLimited {
                until_ms: 1_782_975_600_000,
                per_day: true,
                model: Some("gemini-2.5-pro".into())
            }
        );
    }

    #[test]
    fn of_mixed_violations_the_longest_wins() {
        // A per-minute violation for flash and a per-day one for pro: the
        // per-day one lasts longer.
        let b = body(json!({"error": {"code": 429, "details": [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                {"quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                 "quotaDimensions": {"model": "gemini-2.5-flash"}},
                {"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                 "quotaDimensions": {"model": "models/gemini-2.5-pro"}}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}]}}));
        let now = 1_782_907_200_000;
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, &b, now),
            Outcome::RateLimited {
                until_ms: 1_782_975_600_000,
                per_day: true,
                model: Some("gemini-2.5-pro".into())
            }
        );
        // Two per-minute violations: the retry delay, the first one's scope.
        let b = body(json!({"error": {"code": 429, "details": [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                {"quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                 "quotaDimensions": {"model": "gemini-2.5-flash"}},
                {"quotaId": "GenerateContentInputTokensPerModelPerMinute-FreeTier"}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}]}}));
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, &b, 1_000),
            Outcome::RateLimited {
                until_ms: 31_000,
                per_day: false,
                model: Some("gemini-2.5-flash".into())
            }
        );
    }

    #[test]
    fn pacific_midnight_in_winter_is_eight_hours_behind() {
        // 2026-01-15T20:00:00Z is 12:00 PST; next midnight is 2026-01-16T08:00:00Z.
        assert_eq!(
            next_pacific_midnight_ms(1_768_507_200_000),
            1_768_550_400_000
        );
    }

    #[test]
    fn pacific_midnight_across_the_autumn_change() {
        // 2026-11-01 is the first Sunday of November: PDT until 02:00 local.
        // 2026-10-31T20:00:00Z is 13:00 PDT on Oct 31; the next midnight is
        // Nov 1 00:00 PDT = 07:00Z.
        assert_eq!(
            next_pacific_midnight_ms(1_793_476_800_000),
            1_793_516_400_000
        );
        // 2026-11-01T12:00:00Z is 04:00 PST on Nov 1; next midnight is Nov 2
        // 00:00 PST = 08:00Z.
        assert_eq!(
            next_pacific_midnight_ms(1_793_534_400_000),
            1_793_606_400_000
        );
    }

    #[test]
    fn pacific_midnight_across_the_spring_change() {
        // 2026-03-08 is the second Sunday of March. 2026-03-08T12:00:00Z is
        // 05:00 PDT (after the 02:00 switch); next midnight Mar 9 00:00 PDT
        // = 07:00Z. 2026-03-07T20:00:00Z is 12:00 PST; next midnight Mar 8
        // 00:00 PST = 08:00Z.
        assert_eq!(
            next_pacific_midnight_ms(1_772_971_200_000),
            1_773_039_600_000
        );
        assert_eq!(
            next_pacific_midnight_ms(1_772_913_600_000),
            1_772_956_800_000
        );
    }

    #[test]
    fn pacific_midnight_on_the_days_of_the_change() {
        // 2026-03-08T09:00:00Z is 01:00 PST, before that day's switch; the
        // next midnight is Mar 9 00:00 PDT = 07:00Z.
        assert_eq!(
            next_pacific_midnight_ms(1_772_960_400_000),
            1_773_039_600_000
        );
        // At midnight exactly, the next one is a day later.
        assert_eq!(
            next_pacific_midnight_ms(1_773_039_600_000),
            1_773_126_000_000
        );
        // 2026-11-01T08:30:00Z is 01:30 PDT, the first of the two 01:30s;
        // the next midnight is Nov 2 00:00 PST = 08:00Z.
        assert_eq!(
            next_pacific_midnight_ms(1_793_521_800_000),
            1_793_606_400_000
        );
    }

    #[test]
    fn pacific_midnight_follows_the_rules_of_its_year() {
        // Before 2007 daylight time ran from the first Sunday of April to the
        // last Sunday of October. 2006-04-01T20:00:00Z is 12:00 PST; the
        // next midnight, Apr 2 00:00 PST, is 08:00Z.
        assert_eq!(
            next_pacific_midnight_ms(1_143_921_600_000),
            1_143_964_800_000
        );
        // 2006-10-29T12:00:00Z is 04:00 PST, after that year's change; the
        // next midnight is Oct 30 00:00 PST = 08:00Z.
        assert_eq!(
            next_pacific_midnight_ms(1_162_123_200_000),
            1_162_195_200_000
        );
    }

    #[test]
    fn pacific_midnight_past_the_calendar_is_a_day_away() {
        assert_eq!(next_pacific_midnight_ms(u64::MAX - 1), u64::MAX);
        let far = 300_000_000_000_000; // past the year 9999
        assert_eq!(next_pacific_midnight_ms(far), far + 86_400_000);
    }

    #[test]
    fn invalid_and_leaked_keys_are_rejected_but_file_permission_is_not() {
        let invalid = body(
            json!({"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT", "details": [{"reason": "API_KEY_INVALID"}]}}),
        );
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, &invalid, 0),
            Outcome::KeyRejected { .. }
        ));
        let leaked = body(
            json!({"error": {"code": 403, "message": "Your API key was reported as leaked. Please use another API key."}}),
        );
        assert!(matches!(
            classify(StatusCode::FORBIDDEN, &leaked, 0),
            Outcome::KeyRejected { .. }
        ));
        let file = body(
            json!({"error": {"code": 403, "message": "You do not have permission to access the File abc or it may not exist.", "status": "PERMISSION_DENIED"}}),
        );
        assert_eq!(
            classify(StatusCode::FORBIDDEN, &file, 0),
            Outcome::ClientError
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_ms("38s"), Some(38_000));
        assert_eq!(parse_duration_ms("0.25s"), Some(250));
        assert_eq!(parse_duration_ms("x"), None);
        assert_eq!(parse_duration_ms("-1s"), None);
        assert_eq!(parse_duration_ms("0.0001s"), Some(1));
        assert_eq!(parse_duration_ms(".5s"), Some(500));
        assert_eq!(parse_duration_ms("99999999999999s"), Some(7 * 86_400_000));
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn classifying_arbitrary_answers_never_panics(status in 100u16..600, body in proptest::collection::vec(any::<u8>(), 0..512)) {
                if let Ok(status) = StatusCode::from_u16(status) {
                    let _ = classify(status, &body, 1_000);
                }
            }

            #[test]
            fn retry_delays_become_cooldowns(secs in 0u32..100_000, millis in 0u32..1000) {
                let delay = format!("{secs}.{millis:03}s");
                let body = serde_json::json!({"error": {"code": 429, "details": [
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}]}});
                let want = (u64::from(secs) * 1000 + u64::from(millis)).min(7 * 86_400_000);
                prop_assert_eq!(
                    classify(StatusCode::TOO_MANY_REQUESTS, body.to_string().as_bytes(), 5),
                    Outcome::RateLimited { until_ms: 5 + want, per_day: false, model: None }
                );
            }

            #[test]
            fn pacific_midnight_is_ahead_and_within_a_day(now in 0u64..4_102_444_800_000) {
                let next = next_pacific_midnight_ms(now);
                prop_assert!(next > now && next - now <= 25 * 3_600_000);
                // Midnight Pacific is 07:00 or 08:00 UTC.
                let hour = (next / 3_600_000) % 24;
                prop_assert!(hour == 7 || hour == 8, "hour {}", hour);
            }
        }
    }
}
