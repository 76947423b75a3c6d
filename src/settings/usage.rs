//! `usage`: hourly usage records and the request log.

use super::raw::Raw;
use super::{err, SettingsError};

/// Hourly usage records.
#[derive(Debug, Clone)]
pub struct Usage {
    /// Days of hourly usage kept (`GB_USAGE_RETENTION_DAYS`, 1–90).
    pub retention_days: u64,
    /// Distinct usage series (token × key × model) one replica records per
    /// hour before folding new models into `other` (`GB_USAGE_MAX_SERIES`).
    pub max_series: usize,
    /// Records the request log keeps (`GB_REQUEST_LOG_MAX`).
    pub request_log_max: usize,
    /// Hours a request log record is kept (`GB_REQUEST_LOG_HOURS`, 1–720).
    pub request_log_hours: u64,
}

impl Usage {
    pub const VARS: &'static [&'static str] = &[
        "GB_USAGE_RETENTION_DAYS",
        "GB_USAGE_MAX_SERIES",
        "GB_REQUEST_LOG_MAX",
        "GB_REQUEST_LOG_HOURS",
    ];

    pub(super) fn load(raw: &Raw) -> Result<Self, SettingsError> {
        let retention_days @ 1..=90 = raw.num::<u64>("GB_USAGE_RETENTION_DAYS")? else {
            return Err(err("GB_USAGE_RETENTION_DAYS", "must be between 1 and 90"));
        };
        let request_log_hours @ 1..=720 = raw.num::<u64>("GB_REQUEST_LOG_HOURS")? else {
            return Err(err("GB_REQUEST_LOG_HOURS", "must be between 1 and 720"));
        };
        Ok(Usage {
            retention_days,
            max_series: raw.positive("GB_USAGE_MAX_SERIES")?,
            request_log_max: raw.positive("GB_REQUEST_LOG_MAX")?,
            request_log_hours,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::settings::testing::with_secrets;

    #[test]
    fn retention_is_a_week_by_default_and_never_zero() {
        assert_eq!(with_secrets(&[]).unwrap().usage.retention_days, 7);
        let e = with_secrets(&[("GB_USAGE_RETENTION_DAYS", "0")]).unwrap_err();
        assert_eq!(e.var, "GB_USAGE_RETENTION_DAYS");
    }
}
