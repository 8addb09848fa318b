//! `health_checks`: how often and how each backend is probed.

use std::time::Duration;

use crate::config::file::HealthChecksFile;
use crate::config::load::Errors;
use crate::config::runtime::HealthSettings;

pub(super) fn health_checks(f: &HealthChecksFile, errs: &mut Errors) -> HealthSettings {
    if f.interval_seconds == 0 {
        errs.at("health_checks.interval_seconds", "must be at least 1");
    }
    if f.timeout_seconds == 0 {
        errs.at("health_checks.timeout_seconds", "must be at least 1");
    }
    if !f.path.starts_with('/') {
        errs.at("health_checks.path", "must start with /");
    }
    HealthSettings {
        interval: Duration::from_secs(f.interval_seconds),
        timeout: Duration::from_secs(f.timeout_seconds),
        failures_before_down: f.failures_before_down.max(1),
        successes_before_up: f.successes_before_up.max(1),
        path: f.path.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::table::{assert_cases, run};
    use super::*;

    #[test]
    fn errors_have_their_paths() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            ("{}", &[]),
            (
                "{interval_seconds: 0, timeout_seconds: 0, path: healthz}",
                &[
                    ("health_checks.interval_seconds", "must be at least 1"),
                    ("health_checks.timeout_seconds", "must be at least 1"),
                    ("health_checks.path", "must start with /"),
                ],
            ),
            ("{path: ''}", &[("health_checks.path", "must start with /")]),
        ];
        assert_cases(cases, health_checks);
    }

    #[test]
    fn zero_thresholds_mean_one() {
        let (h, errs) = run(
            "{failures_before_down: 0, successes_before_up: 0, interval_seconds: 3}",
            health_checks,
        );
        assert_eq!(errs, []);
        assert_eq!((h.failures_before_down, h.successes_before_up), (1, 1));
        assert_eq!(h.interval, Duration::from_secs(3));
        assert_eq!(h.timeout, Duration::from_secs(5));
    }
}
