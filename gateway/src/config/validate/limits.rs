//! Rate limits: a client's (or unlisted-clients template's) `limits`, per client and per
//! deployment, and the top-level `limits` section (where the counters live).

use std::collections::{BTreeMap, HashMap};

use filters::limits::{ClientLimits, LimitSpec};

use crate::config::file::{LimitSpecFile, LimitsFile, LimitsStoreFile, MemberFile, StoreKindFile};
use crate::config::load::Errors;
use crate::config::runtime::LimitSettings;

/// `path` is that of the `limits` mapping; `deployments` are the file's, for the references.
pub(super) fn client_limits(
    l: &LimitsFile,
    path: &str,
    deployments: &BTreeMap<String, Vec<MemberFile>>,
    errs: &mut Errors,
) -> ClientLimits {
    let client = parse_limits(
        &LimitSpecFile {
            requests_per_minute: l.requests_per_minute,
            tokens_per_minute: l.tokens_per_minute,
            tokens_per_day: l.tokens_per_day,
        },
        path,
        errs,
    );
    let mut per_deployment = HashMap::new();
    for (d, spec) in &l.deployments {
        let p = format!("{path}.deployments.{d}");
        if !deployments.contains_key(d) {
            errs.at(&p, format!("unknown deployment `{d}`"));
        }
        per_deployment.insert(d.clone(), parse_limits(spec, &p, errs));
    }
    ClientLimits {
        client,
        per_deployment,
    }
}

fn parse_limits(l: &LimitSpecFile, path: &str, errs: &mut Errors) -> LimitSpec {
    for (name, v) in [
        ("requests_per_minute", l.requests_per_minute),
        ("tokens_per_minute", l.tokens_per_minute),
        ("tokens_per_day", l.tokens_per_day),
    ] {
        if v == Some(0) {
            errs.at(
                format!("{path}.{name}"),
                "must be at least 1 (omit it for no limit)",
            );
        }
    }
    LimitSpec {
        requests_per_minute: l.requests_per_minute,
        tokens_per_minute: l.tokens_per_minute,
        tokens_per_day: l.tokens_per_day,
    }
}

/// The top-level `limits` section.
pub(super) fn store(f: &LimitsStoreFile, errs: &mut Errors) -> LimitSettings {
    if f.store == StoreKindFile::Redis && f.redis_url.is_none() {
        errs.at("limits.redis_url", "store: redis needs redis_url");
    }
    LimitSettings {
        store: f.store,
        redis_url: f.redis_url.clone(),
        on_store_failure: f.on_store_failure,
        prompt_estimate: f.prompt_estimate,
        default_completion_reservation: f.default_completion_reservation,
    }
}

#[cfg(test)]
mod tests {
    use super::super::table::{assert_cases, run};
    use super::*;

    fn check(l: &LimitsFile, errs: &mut Errors) -> ClientLimits {
        let deployments = BTreeMap::from([("d".to_string(), Vec::new())]);
        client_limits(l, "clients[0].limits", &deployments, errs)
    }

    #[test]
    fn client_limit_errors_have_their_paths() {
        const ZERO: &str = "must be at least 1 (omit it for no limit)";
        let cases: &[(&str, &[(&str, &str)])] = &[
            ("{}", &[]),
            (
                "{requests_per_minute: 1, deployments: {d: {tokens_per_day: 1}}}",
                &[],
            ),
            (
                "{requests_per_minute: 0, tokens_per_minute: 0, tokens_per_day: 0}",
                &[
                    ("clients[0].limits.requests_per_minute", ZERO),
                    ("clients[0].limits.tokens_per_minute", ZERO),
                    ("clients[0].limits.tokens_per_day", ZERO),
                ],
            ),
            (
                // Per deployment, in name order; an unknown name is still checked.
                "{deployments: {e: {tokens_per_minute: 0}, d: {requests_per_minute: 0}}}",
                &[
                    ("clients[0].limits.deployments.d.requests_per_minute", ZERO),
                    ("clients[0].limits.deployments.e", "unknown deployment `e`"),
                    ("clients[0].limits.deployments.e.tokens_per_minute", ZERO),
                ],
            ),
        ];
        assert_cases(cases, check);
    }

    #[test]
    fn client_limits_are_carried_over() {
        let (l, errs) = run(
            "{tokens_per_day: 5, deployments: {d: {requests_per_minute: 2}}}",
            check,
        );
        assert_eq!(errs, []);
        assert_eq!(l.client.tokens_per_day, Some(5));
        assert_eq!(l.client.requests_per_minute, None);
        assert_eq!(l.per_deployment["d"].requests_per_minute, Some(2));
    }

    #[test]
    fn store_errors_have_their_paths() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            ("{}", &[]),
            ("{store: redis, redis_url: 'redis://r'}", &[]),
            (
                "{store: redis, on_store_failure: reject}",
                &[("limits.redis_url", "store: redis needs redis_url")],
            ),
        ];
        assert_cases(cases, store);
    }
}
