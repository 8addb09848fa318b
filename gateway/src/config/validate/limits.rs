//! Rate limits: a client's (or unlisted-clients template's) `limits`, per client and per
//! deployment, and the top-level `limits` section (where the counters live).

use std::collections::{BTreeMap, HashMap};

use filters::limits::{ClientLimits, LimitSpec};

use crate::config::file::{
    LimitSpecFile, LimitsFile, LimitsStoreFile, MemberFile, StateFile, StoreKindFile,
};
use crate::config::load::Errors;
use crate::config::runtime::{LimitSettings, StateSettings};

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
    let per_user = l.per_user.as_ref().map(|u| {
        let p = format!("{path}.per_user");
        if u.per_user.is_some() {
            errs.at(
                format!("{p}.per_user"),
                "per_user limits are per user already: it cannot be nested",
            );
        }
        let mut user = client_limits(u, &p, deployments, errs);
        user.per_user = None;
        Box::new(user)
    });
    ClientLimits {
        client,
        per_deployment,
        per_user,
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

/// The top-level `limits` section (its `store`/`redis_url` are [`state`]'s).
pub(super) fn store(f: &LimitsStoreFile, _errs: &mut Errors) -> LimitSettings {
    LimitSettings {
        on_store_failure: f.on_store_failure,
        prompt_estimate: f.prompt_estimate,
        default_completion_reservation: f.default_completion_reservation,
    }
}

/// Records are kept this many days unless `state.retention_days` says otherwise.
const DEFAULT_RETENTION_DAYS: u64 = 30;

/// The `state` section, with the older `limits.store`/`limits.redis_url` merged in: either
/// place may name them; both may, if they agree.
pub(super) fn state(f: &StateFile, limits: &LimitsStoreFile, errs: &mut Errors) -> StateSettings {
    if let (Some(a), Some(b)) = (f.store, limits.store) {
        if a != b {
            errs.at(
                "state.store",
                "differs from limits.store (one store serves both: name it once, under state)",
            );
        }
    }
    if let (Some(a), Some(b)) = (&f.redis_url, &limits.redis_url) {
        if a != b {
            errs.at(
                "state.redis_url",
                "differs from limits.redis_url (one store serves both: name it once, under state)",
            );
        }
    }
    let store = f.store.or(limits.store).unwrap_or_default();
    let redis_url = f.redis_url.clone().or_else(|| limits.redis_url.clone());
    if store == StoreKindFile::Redis && redis_url.is_none() {
        let path = if f.store.is_some() {
            "state.redis_url"
        } else {
            "limits.redis_url"
        };
        errs.at(path, "store: redis needs redis_url");
    }
    let days = f.retention_days.unwrap_or(DEFAULT_RETENTION_DAYS);
    if !(1..=3650).contains(&days) {
        errs.at("state.retention_days", "must be within 1..3650");
    }
    StateSettings {
        store,
        redis_url,
        retention: std::time::Duration::from_secs(days.clamp(1, 3650) * 86_400),
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
            (
                "{per_user: {requests_per_minute: 0, deployments: {e: {tokens_per_day: 1}}, per_user: {}}}",
                &[
                    (
                        "clients[0].limits.per_user.per_user",
                        "per_user limits are per user already: it cannot be nested",
                    ),
                    ("clients[0].limits.per_user.requests_per_minute", ZERO),
                    ("clients[0].limits.per_user.deployments.e", "unknown deployment `e`"),
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
        assert!(l.per_user.is_none());
        let (l, errs) = run(
            "{requests_per_minute: 10, per_user: {requests_per_minute: 2, deployments: {d: {tokens_per_minute: 7}}}}",
            check,
        );
        assert_eq!(errs, []);
        let u = l.per_user.expect("per_user");
        assert_eq!(u.client.requests_per_minute, Some(2));
        assert_eq!(u.per_deployment["d"].tokens_per_minute, Some(7));
        assert_eq!(l.client.requests_per_minute, Some(10));
    }

    /// `state` and `limits` given as one mapping `{state: …, limits: …}`.
    #[derive(serde::Deserialize)]
    struct Both {
        #[serde(default)]
        state: StateFile,
        #[serde(default)]
        limits: LimitsStoreFile,
    }

    fn both(b: &Both, errs: &mut Errors) -> StateSettings {
        state(&b.state, &b.limits, errs)
    }

    #[test]
    fn state_errors_have_their_paths() {
        const SAME: &str =
            "differs from limits.store (one store serves both: name it once, under state)";
        const URL: &str =
            "differs from limits.redis_url (one store serves both: name it once, under state)";
        let cases: &[(&str, &[(&str, &str)])] = &[
            ("{}", &[]),
            ("{limits: {store: redis, redis_url: 'redis://r'}}", &[]),
            ("{state: {store: redis, redis_url: 'redis://r'}}", &[]),
            // Both places, agreeing (or split between them): fine.
            (
                "{state: {store: redis, redis_url: 'redis://r'}, limits: {store: redis, redis_url: 'redis://r'}}",
                &[],
            ),
            ("{state: {store: redis}, limits: {redis_url: 'redis://r'}}", &[]),
            (
                "{limits: {store: redis, on_store_failure: reject}}",
                &[("limits.redis_url", "store: redis needs redis_url")],
            ),
            (
                "{state: {store: redis}}",
                &[("state.redis_url", "store: redis needs redis_url")],
            ),
            (
                "{state: {store: memory}, limits: {store: redis, redis_url: 'redis://r'}}",
                &[("state.store", SAME)],
            ),
            (
                "{state: {store: redis, redis_url: 'redis://a'}, limits: {redis_url: 'redis://b'}}",
                &[("state.redis_url", URL)],
            ),
            (
                "{state: {retention_days: 0}}",
                &[("state.retention_days", "must be within 1..3650")],
            ),
        ];
        assert_cases(cases, both);
    }

    #[test]
    fn state_settings_merge_both_places() {
        let (s, errs) = run(
            "{limits: {store: redis, redis_url: 'redis://r'}, state: {retention_days: 2}}",
            both,
        );
        assert_eq!(errs, []);
        assert_eq!(s.store, StoreKindFile::Redis);
        assert_eq!(s.redis_url.as_deref(), Some("redis://r"));
        assert_eq!(s.retention.as_secs(), 2 * 86_400);
        let (s, _) = run("{}", both);
        assert_eq!(s.store, StoreKindFile::Memory);
        assert_eq!(s.retention.as_secs(), 30 * 86_400);
    }
}
