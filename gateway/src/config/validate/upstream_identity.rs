//! `upstream_identity`: how the gateway gets its own token for `managed_identity` backends.

use crate::config::file::{IdentitySource, UpstreamIdentityFile};
use crate::config::load::Errors;
use crate::config::runtime::UpstreamIdentity;

pub(super) fn upstream_identity(f: &UpstreamIdentityFile, errs: &mut Errors) -> UpstreamIdentity {
    if f.source == IdentitySource::ClientSecret
        && (f.client_id.is_none() || f.tenant_id.is_none() || f.client_secret.is_none())
    {
        errs.at(
            "upstream_identity",
            "source: client_secret needs client_id, tenant_id and client_secret",
        );
    }
    UpstreamIdentity {
        source: f.source,
        client_id: f.client_id.clone(),
        tenant_id: f.tenant_id.clone(),
        client_secret: f.client_secret.clone(),
        scope: f.scope.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::table::assert_cases;
    use super::*;

    #[test]
    fn errors_have_their_paths() {
        const NEEDS: &str = "source: client_secret needs client_id, tenant_id and client_secret";
        let cases: &[(&str, &[(&str, &str)])] = &[
            ("{}", &[]),
            ("{source: workload_identity, client_id: c}", &[]),
            (
                "{source: client_secret, client_id: c, tenant_id: t, client_secret: s}",
                &[],
            ),
            ("{source: client_secret}", &[("upstream_identity", NEEDS)]),
            (
                "{source: client_secret, client_id: c, tenant_id: t}",
                &[("upstream_identity", NEEDS)],
            ),
            (
                "{source: client_secret, tenant_id: t, client_secret: s}",
                &[("upstream_identity", NEEDS)],
            ),
        ];
        assert_cases(cases, upstream_identity);
    }
}
