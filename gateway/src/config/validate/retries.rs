//! `retries`: how many members a request may try, on which statuses, and the cooldowns.

use std::time::Duration;

use crate::config::file::RetriesFile;
use crate::config::load::Errors;
use crate::config::runtime::RetrySettings;

pub(super) fn retries(f: &RetriesFile, errs: &mut Errors) -> RetrySettings {
    if f.max_attempts == 0 {
        errs.at("retries.max_attempts", "must be at least 1");
    }
    for (i, s) in f.on_status.iter().enumerate() {
        if !(400..=599).contains(s) {
            errs.at(
                format!("retries.on_status[{i}]"),
                "must be an HTTP error status (400-599)",
            );
        }
    }
    RetrySettings {
        max_attempts: f.max_attempts,
        on_status: f.on_status.iter().copied().collect(),
        default_cooldown: Duration::from_secs(f.default_cooldown_seconds),
        max_cooldown: Duration::from_secs(f.max_cooldown_seconds),
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
            ("{on_status: [400, 599]}", &[]),
            (
                "{max_attempts: 0, on_status: [429, 399, 503, 600]}",
                &[
                    ("retries.max_attempts", "must be at least 1"),
                    (
                        "retries.on_status[1]",
                        "must be an HTTP error status (400-599)",
                    ),
                    (
                        "retries.on_status[3]",
                        "must be an HTTP error status (400-599)",
                    ),
                ],
            ),
        ];
        assert_cases(cases, retries);
    }

    #[test]
    fn defaults_and_values() {
        let (r, _) = run("{}", retries);
        assert_eq!(r.max_attempts, 3);
        let mut on: Vec<u16> = r.on_status.into_iter().collect();
        on.sort_unstable();
        assert_eq!(on, [408, 429, 500, 502, 503, 504]);
        let (r, _) = run(
            "{max_cooldown_seconds: 5, default_cooldown_seconds: 2}",
            retries,
        );
        assert_eq!(
            (r.default_cooldown, r.max_cooldown),
            (Duration::from_secs(2), Duration::from_secs(5))
        );
    }
}
