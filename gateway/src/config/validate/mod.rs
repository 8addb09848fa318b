//! From file types to runtime types: every reference resolved, every value checked.
//!
//! One module per section of the file. [`validate`] calls them in a fixed order (server,
//! backends, deployments, identity providers, clients, retries, health checks, limits,
//! upstream identity) so errors come out in that order; each section records its errors with
//! their YAML paths in the shared [`Errors`] and returns its runtime value regardless, so one
//! bad section never hides the errors of the next.

mod allow;
mod backends;
mod clients;
mod deployments;
mod health;
mod identity;
mod limits;
mod retries;
mod server;
mod upstream_identity;

pub use backends::parse_backend_url;

use super::load::{ConfigError, Errors, FileConfig};
use super::runtime::Config;

/// Validates the file types; `errs` maps paths to lines.
pub fn validate(f: FileConfig, mut errs: Errors) -> Result<Config, Vec<ConfigError>> {
    let server = server::server(&f.server, &mut errs);
    let (backends, backend_index) = backends::backends(&f.backends, &mut errs);
    let (deployments, deployment_names) =
        deployments::deployments(&f.deployments, &backend_index, &mut errs);
    let oidc = identity::oidc_providers(&f.identity.oidc, &f.deployments, &mut errs);
    identity::verify_threads(f.identity.verify_threads, &mut errs);
    let clients = clients::clients(&f.clients, &f.identity.oidc, &f.deployments, &mut errs);
    clients::warn_if_certificates_unused(&f.clients, &server.listeners);
    let retries = retries::retries(&f.retries, &mut errs);
    let health = health::health_checks(&f.health_checks, &mut errs);
    let limits = limits::store(&f.limits, &mut errs);
    let state = limits::state(&f.state, &f.limits, &mut errs);
    let upstream_identity = upstream_identity::upstream_identity(&f.upstream_identity, &mut errs);

    if !errs.list.is_empty() {
        return Err(errs.list);
    }
    Ok(Config {
        server,
        clients: clients.clients,
        keys: clients.keys,
        certs: clients.certs,
        tokens: clients.tokens,
        oidc,
        token_cache_entries: f.identity.token_cache_entries,
        verify_threads: f.identity.verify_threads,
        deployments,
        deployment_names,
        backends,
        upstream_identity,
        health,
        retries,
        limits,
        state,
        audit_path: f.audit_log.path,
    })
}

/// Helpers for the sections' table tests.
#[cfg(test)]
mod table {
    use serde::de::DeserializeOwned;

    use crate::config::load::{errors_for, Errors};

    /// Parses `yaml` as a file section and runs `check` on it; returns its value and the
    /// (path, message) of every error, in order.
    pub fn run<T: DeserializeOwned, R>(
        yaml: &str,
        check: impl FnOnce(&T, &mut Errors) -> R,
    ) -> (R, Vec<(String, String)>) {
        let section: T = serde_norway::from_str(yaml)
            .unwrap_or_else(|e| panic!("test input does not parse: {e}\n{yaml}"));
        let mut errs = errors_for("");
        let value = check(&section, &mut errs);
        let list = errs.list.into_iter().map(|e| (e.path, e.message)).collect();
        (value, list)
    }

    /// Asserts that every case yields exactly the expected (path, message) list.
    pub fn assert_cases<T: DeserializeOwned, R>(
        cases: &[(&str, &[(&str, &str)])],
        check: impl Fn(&T, &mut Errors) -> R,
    ) {
        for (yaml, want) in cases {
            let (_, got) = run::<T, R>(yaml, &check);
            let want: Vec<(String, String)> = want
                .iter()
                .map(|(p, m)| (p.to_string(), m.to_string()))
                .collect();
            assert_eq!(got, want, "for input:\n{yaml}");
        }
    }

    /// A file that exists, for the checks that a configured path can be read.
    pub const READABLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
}
