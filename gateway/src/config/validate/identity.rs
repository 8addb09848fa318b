//! `identity.oidc`: the token issuers clients may present tokens of. Their unlisted-clients
//! templates are validated with the clients ([`super::clients`]).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use filters::grants::{Grant, Grants, Pattern, MAX_GRANTS};
use filters::oidc::OidcProviderConfig;

use crate::config::file::{GrantFile, MemberFile, OidcFile};
use crate::config::load::Errors;

pub(super) fn oidc_providers(
    file: &[OidcFile],
    deployments: &BTreeMap<String, Vec<MemberFile>>,
    errs: &mut Errors,
) -> Vec<OidcProviderConfig> {
    let mut oidc = Vec::new();
    let mut names = HashSet::new();
    for (i, p) in file.iter().enumerate() {
        let path = format!("identity.oidc[{i}]");
        if !names.insert(p.name.clone()) {
            errs.at(
                format!("{path}.name"),
                format!("duplicate provider `{}`", p.name),
            );
        }
        let cfg = OidcProviderConfig {
            name: p.name.clone(),
            issuer: p.issuer.clone(),
            audiences: p.audiences.clone(),
            discovery_url: p.discovery_url.clone(),
            jwks_url: p.jwks_url.clone(),
            ca_file: p.ca_file.as_ref().map(Into::into),
            algorithms: p.algorithms.clone(),
            clock_skew_seconds: p.clock_skew_seconds,
            required_claims: p.required_claims.clone(),
            client_claim: p.client_claim.clone(),
            user_claim: p.user_claim.clone(),
            grants: p
                .grants
                .as_ref()
                .map(|g| Arc::new(grants(g, &format!("{path}.grants"), deployments, errs))),
        };
        for (field, msg) in filters::oidc::validate_provider(&cfg) {
            errs.at(format!("{path}.{field}"), msg);
        }
        oidc.push(cfg);
    }
    oidc
}

/// `identity.verify_threads`: at most [`filters::oidc::MAX_VERIFY_THREADS`] (0: signatures
/// checked on the event loop).
pub(super) fn verify_threads(threads: usize, errs: &mut Errors) {
    if threads > filters::oidc::MAX_VERIFY_THREADS {
        errs.at(
            "identity.verify_threads",
            format!(
                "{threads} threads: at most {} (0 checks signatures on the event loop)",
                filters::oidc::MAX_VERIFY_THREADS
            ),
        );
    }
}

/// `identity.oidc[].grants`: each needs a claim, a value (one word: `scp` is split on
/// spaces), operations, and deployment patterns that name configured deployments.
fn grants(
    file: &[GrantFile],
    path: &str,
    deployments: &BTreeMap<String, Vec<MemberFile>>,
    errs: &mut Errors,
) -> Grants {
    if file.is_empty() {
        errs.at(
            path,
            "list at least one grant (or omit grants: allow alone decides)",
        );
    }
    if file.len() > MAX_GRANTS {
        errs.at(path, format!("at most {MAX_GRANTS} grants per provider"));
    }
    let mut list = Vec::new();
    for (i, g) in file.iter().enumerate() {
        let p = format!("{path}[{i}]");
        if g.claim.trim().is_empty() {
            errs.at(format!("{p}.claim"), "must not be empty");
        }
        if g.value.is_empty() || g.value.chars().any(char::is_whitespace) {
            errs.at(
                format!("{p}.value"),
                "must be one word (a role or scope name, without spaces)",
            );
        }
        if g.operations.is_empty() {
            errs.at(
                format!("{p}.operations"),
                "list at least one operation (or \"*\")",
            );
        }
        if g.deployments.is_empty() {
            errs.at(
                format!("{p}.deployments"),
                "list at least one deployment (or \"*\")",
            );
        }
        let operations = super::allow::allowed_operations(&g.operations, &p, errs);
        let mut patterns = Vec::new();
        for (j, d) in g.deployments.iter().enumerate() {
            let at = format!("{p}.deployments[{j}]");
            match Pattern::parse(d) {
                Ok(pat) => {
                    if !deployments.keys().any(|name| pat.matches(name)) {
                        errs.at(at, format!("`{d}` matches no configured deployment"));
                    }
                    patterns.push(pat);
                }
                Err(why) => errs.at(at, why),
            }
        }
        list.push(Grant {
            claim: g.claim.clone(),
            value: g.value.clone(),
            operations,
            deployments: patterns,
        });
    }
    Grants { list }
}

#[cfg(test)]
mod tests {
    use super::super::table::{assert_cases, run};
    use super::*;

    #[test]
    fn errors_have_their_paths() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            (
                "[{name: a, issuer: 'https://a', audiences: [x]}, {name: a, issuer: 'https://b', audiences: [y]}]",
                &[("identity.oidc[1].name", "duplicate provider `a`")],
            ),
            (
                // The provider's own checks (filters::oidc) come out under its path.
                "[{name: a, issuer: 'https://a', audiences: [x]}, {name: b, issuer: '', audiences: []}]",
                &[
                    ("identity.oidc[1].issuer", "must not be empty"),
                    ("identity.oidc[1].audiences", "at least one audience is required"),
                ],
            ),
            (
                "[{name: a, issuer: 'https://a', audiences: [x], discovery_url: 'https://d', jwks_url: 'https://j'}]",
                &[(
                    "identity.oidc[0].jwks_url",
                    "set either discovery_url or jwks_url, not both",
                )],
            ),
            (
                "[{name: a, issuer: 'https://a', audiences: [x], ca_file: /nonexistent/ca.pem}]",
                &[(
                    "identity.oidc[0].ca_file",
                    "cannot read /nonexistent/ca.pem: No such file or directory (os error 2)",
                )],
            ),
        ];
        assert_cases(cases, |f: &Vec<OidcFile>, errs: &mut Errors| {
            oidc_providers(f, &deployments(), errs)
        });
    }

    #[test]
    fn verify_threads_are_bounded_with_their_line() {
        let text = "identity:\n  verify_threads: 65\n";
        for (threads, errors) in [(0, 0), (1, 0), (64, 0), (65, 1), (usize::MAX, 1)] {
            let mut errs = crate::config::load::errors_for(text);
            verify_threads(threads, &mut errs);
            assert_eq!(errs.list.len(), errors, "{threads}");
            if let Some(e) = errs.list.first() {
                assert_eq!(
                    (e.path.as_str(), e.line),
                    ("identity.verify_threads", Some(2))
                );
                assert!(e.message.contains("at most 64"), "{}", e.message);
            }
        }
    }

    fn deployments() -> BTreeMap<String, Vec<MemberFile>> {
        ["gpt-4o", "gpt-4o-mini", "emb"]
            .into_iter()
            .map(|d| (d.to_string(), Vec::new()))
            .collect()
    }

    #[test]
    fn grant_errors_have_their_paths() {
        const P: &str = "{name: a, issuer: 'https://a', audiences: [x], grants: ";
        let case = |g: &str| format!("[{P}{g}}}]");
        let ok = case("[{claim: roles, value: AOAI.Chat, operations: [chat.completions, responses], deployments: ['gpt-4o*']}, {claim: scp, value: Chat.Read, operations: ['*'], deployments: ['*', emb]}]");
        let empty = case("[]");
        let bad = case("[{claim: '', value: 'two words', operations: [], deployments: []}, {claim: roles, value: x, operations: [chat], deployments: ['gpt-*-mini', 'o1*', nope]}]");
        let ops = filters::Operation::ALL.map(|o| o.as_str()).join(", ");
        let chat = format!("unknown operation `chat` (one of: {ops}, or \"*\")");
        let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
            (&ok, vec![]),
            (
                &empty,
                vec![(
                    "identity.oidc[0].grants",
                    "list at least one grant (or omit grants: allow alone decides)",
                )],
            ),
            (
                &bad,
                vec![
                    ("identity.oidc[0].grants[0].claim", "must not be empty"),
                    (
                        "identity.oidc[0].grants[0].value",
                        "must be one word (a role or scope name, without spaces)",
                    ),
                    (
                        "identity.oidc[0].grants[0].operations",
                        "list at least one operation (or \"*\")",
                    ),
                    (
                        "identity.oidc[0].grants[0].deployments",
                        "list at least one deployment (or \"*\")",
                    ),
                    ("identity.oidc[0].grants[1].operations[0]", &chat),
                    (
                        "identity.oidc[0].grants[1].deployments[0]",
                        "`gpt-*-mini`: `*` may only stand alone or end a name (`gpt-4o*`)",
                    ),
                    (
                        "identity.oidc[0].grants[1].deployments[1]",
                        "`o1*` matches no configured deployment",
                    ),
                    (
                        "identity.oidc[0].grants[1].deployments[2]",
                        "`nope` matches no configured deployment",
                    ),
                ],
            ),
        ];
        let cases: Vec<(&str, &[(&str, &str)])> = cases.iter().map(|(y, e)| (*y, &e[..])).collect();
        assert_cases(&cases, |f: &Vec<OidcFile>, errs: &mut Errors| {
            oidc_providers(f, &deployments(), errs)
        });
        let (oidc, errs) = run(&ok, |f: &Vec<OidcFile>, errs: &mut Errors| {
            oidc_providers(f, &deployments(), errs)
        });
        assert_eq!(errs, []);
        let g = oidc[0].grants.as_ref().expect("grants");
        assert_eq!(g.list.len(), 2);
        assert_eq!(g.list[0].deployments, [Pattern::Prefix("gpt-4o".into())]);
        assert_eq!(oidc[0].user_claim, None);
    }

    #[test]
    fn values_are_carried_over() {
        let yaml = "[{name: a, issuer: 'https://a', audiences: [x], user_claim: upn}]";
        let (oidc, errs) = run(yaml, |f: &Vec<OidcFile>, errs: &mut Errors| {
            oidc_providers(f, &deployments(), errs)
        });
        assert_eq!(errs, []);
        assert_eq!(oidc[0].client_claim, "azp");
        assert_eq!(oidc[0].algorithms, ["RS256"]);
        assert_eq!(oidc[0].user_claim.as_deref(), Some("upn"));
        assert_eq!(oidc[0].clock_skew_seconds, 60);
    }
}
