//! `identity.oidc`: the token issuers clients may present tokens of. Their unlisted-clients
//! templates are validated with the clients ([`super::clients`]).

use std::collections::HashSet;

use filters::oidc::OidcProviderConfig;

use crate::config::file::OidcFile;
use crate::config::load::Errors;

pub(super) fn oidc_providers(file: &[OidcFile], errs: &mut Errors) -> Vec<OidcProviderConfig> {
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
        };
        for (field, msg) in filters::oidc::validate_provider(&cfg) {
            errs.at(format!("{path}.{field}"), msg);
        }
        oidc.push(cfg);
    }
    oidc
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
            oidc_providers(f, errs)
        });
    }

    #[test]
    fn values_are_carried_over() {
        let yaml = "[{name: a, issuer: 'https://a', audiences: [x], user_claim: upn}]";
        let (oidc, errs) = run(yaml, |f: &Vec<OidcFile>, errs: &mut Errors| {
            oidc_providers(f, errs)
        });
        assert_eq!(errs, []);
        assert_eq!(oidc[0].client_claim, "azp");
        assert_eq!(oidc[0].algorithms, ["RS256"]);
        assert_eq!(oidc[0].user_claim.as_deref(), Some("upn"));
        assert_eq!(oidc[0].clock_skew_seconds, 60);
    }
}
