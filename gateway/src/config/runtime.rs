//! Validated runtime configuration: every reference resolved, every value checked, hashes
//! parsed, lists turned into lookup tables. Built once per load or reload.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use filters::apikey::{parse_hash, KeyRecord, KeyStore};
use filters::authz::{AllowSet, Policy};
use filters::cert::{normalize_fingerprint, CertMap};
use filters::identity::TokenMap;
use filters::limits::{ClientLimits, LimitSpec};
use filters::oidc::OidcProviderConfig;
use filters::Operation;

use super::file::*;
use super::load::{ConfigError, Errors, FileConfig};

/// A listener as configured.
#[derive(Debug, Clone)]
pub struct Listener {
    pub address: String,
    pub tls: Option<ListenerTls>,
}

#[derive(Debug, Clone)]
pub struct ListenerTls {
    pub certificate: String,
    pub private_key: String,
    pub client_certificates: Option<ClientCertSettings>,
}

#[derive(Debug, Clone)]
pub struct ClientCertSettings {
    pub required: bool,
    pub trust_bundle: String,
    pub crls: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub listeners: Vec<Listener>,
    pub admin_address: Option<String>,
    pub threads: usize,
    pub max_request_body_bytes: usize,
    pub request_timeout: Duration,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub backend_idle: Duration,
    pub front_door_ids: Vec<String>,
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// A configured client, or the template of one provider's unlisted applications.
#[derive(Debug, Clone)]
pub struct Client {
    pub id: Arc<str>,
    pub policy: Policy,
    pub limits: ClientLimits,
    /// (key_id, expires unix) of every key, for the expiry gauge.
    pub key_expiries: Vec<(String, i64)>,
}

#[derive(Debug, Clone)]
pub struct Member {
    /// Index into [`Config::backends`].
    pub backend: usize,
    /// The deployment's name on that backend.
    pub upstream_deployment: Arc<str>,
    pub priority: u32,
    pub weight: u32,
}

#[derive(Debug, Clone)]
pub struct Deployment {
    pub name: Arc<str>,
    /// Sorted by priority (best first).
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    ManagedIdentity,
    ApiKey(String),
    Forward,
}

#[derive(Debug, Clone)]
pub struct Backend {
    pub name: Arc<str>,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// `Host` header value: the host, with the port when it is not the scheme's default.
    pub host_header: String,
    pub region: Arc<str>,
    pub credential: Credential,
    pub ca_file: Option<String>,
}

#[derive(Debug, Clone)]
pub struct UpstreamIdentity {
    pub source: IdentitySource,
    pub client_id: Option<String>,
    pub tenant_id: Option<String>,
    pub client_secret: Option<String>,
    pub scope: String,
}

#[derive(Debug, Clone)]
pub struct HealthSettings {
    pub interval: Duration,
    pub timeout: Duration,
    pub failures_before_down: u32,
    pub successes_before_up: u32,
    pub path: String,
}

#[derive(Debug, Clone)]
pub struct RetrySettings {
    pub max_attempts: u32,
    pub on_status: HashSet<u16>,
    pub default_cooldown: Duration,
    pub max_cooldown: Duration,
}

#[derive(Debug, Clone)]
pub struct LimitSettings {
    pub store: StoreKindFile,
    pub redis_url: Option<String>,
    pub on_store_failure: OnStoreFailureFile,
    pub prompt_estimate: PromptEstimateFile,
    pub default_completion_reservation: u64,
}

/// The whole validated configuration.
#[derive(Debug)]
pub struct Config {
    pub server: Server,
    /// Configured clients first, then one unlisted-clients template per provider that has one.
    pub clients: Vec<Client>,
    pub keys: KeyStore,
    pub certs: CertMap,
    pub tokens: TokenMap,
    pub oidc: Vec<OidcProviderConfig>,
    /// Looked up per request: a fast hash (the names come from the file).
    pub deployments: HashMap<String, Arc<Deployment>, foldhash::fast::RandomState>,
    /// Deployment names in file order (for `models.read` and `/healthz`).
    pub deployment_names: Vec<Arc<str>>,
    pub backends: Vec<Backend>,
    pub upstream_identity: UpstreamIdentity,
    pub health: HealthSettings,
    pub retries: RetrySettings,
    pub limits: LimitSettings,
    pub audit_path: String,
}

impl Config {
    /// Whether any backend calls Azure with the gateway's own token.
    pub fn needs_upstream_token(&self) -> bool {
        self.backends
            .iter()
            .any(|b| b.credential == Credential::ManagedIdentity)
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

fn client_limits(
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

fn policy(
    a: &AllowFile,
    path: &str,
    deployments: &BTreeMap<String, Vec<MemberFile>>,
    errs: &mut Errors,
) -> Policy {
    let deps = if a.deployments.iter().any(|d| d == "*") {
        AllowSet::All
    } else {
        for (i, d) in a.deployments.iter().enumerate() {
            if !deployments.contains_key(d) {
                errs.at(
                    format!("{path}.deployments[{i}]"),
                    format!("unknown deployment `{d}`"),
                );
            }
        }
        AllowSet::Only(a.deployments.iter().cloned().collect())
    };
    let ops = if a.operations.iter().any(|o| o == "*") {
        AllowSet::All
    } else {
        let mut set = HashSet::new();
        for (i, o) in a.operations.iter().enumerate() {
            match Operation::parse(o) {
                Some(op) => {
                    set.insert(op);
                }
                None => errs.at(
                    format!("{path}.operations[{i}]"),
                    format!(
                        "unknown operation `{o}` (one of: {}, or \"*\")",
                        Operation::ALL.map(|o| o.as_str()).join(", ")
                    ),
                ),
            }
        }
        AllowSet::Only(set)
    };
    Policy {
        deployments: deps,
        operations: ops,
    }
}

/// Splits `https://host[:port][/]` into (tls, host, port).
pub fn parse_backend_url(url: &str) -> Result<(bool, String, u16), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err("must start with https:// (or http:// for a local test backend)".into());
    };
    let hostport = rest.trim_end_matches('/');
    if hostport.contains('/') || hostport.contains('?') || hostport.contains('@') {
        return Err("must be the resource's base URL, without a path".into());
    }
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => match p.parse::<u16>() {
            Ok(port) => (h.trim_matches(['[', ']']).to_string(), port),
            Err(_) => return Err(format!("bad port `{p}`")),
        },
        _ => (hostport.to_string(), if tls { 443 } else { 80 }),
    };
    if host.is_empty() {
        return Err("has no host".into());
    }
    Ok((tls, host, port))
}

fn unix_of(rfc3339: &str) -> Result<i64, String> {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| format!("not an RFC 3339 time ({e}), e.g. 2027-06-30T00:00:00Z"))
}

/// Validates the file types; `errs` maps paths to lines.
pub fn validate(f: FileConfig, mut errs: Errors) -> Result<Config, Vec<ConfigError>> {
    // server
    if f.server.listeners.is_empty() {
        errs.at("server.listeners", "at least one listener is needed");
    }
    let mut listeners = Vec::new();
    for (i, l) in f.server.listeners.iter().enumerate() {
        if l.address.parse::<SocketAddr>().is_err() {
            errs.at(
                format!("server.listeners[{i}].address"),
                format!("`{}` is not an address like 0.0.0.0:8443", l.address),
            );
        }
        let tls = l.tls.as_ref().map(|t| {
            for (k, p) in [
                ("certificate", &t.certificate),
                ("private_key", &t.private_key),
            ] {
                if std::fs::metadata(p).is_err() {
                    errs.at(
                        format!("server.listeners[{i}].tls.{k}"),
                        format!("cannot read {p}"),
                    );
                }
            }
            ListenerTls {
                certificate: t.certificate.clone(),
                private_key: t.private_key.clone(),
                client_certificates: t.client_certificates.as_ref().map(|c| {
                    let base = format!("server.listeners[{i}].tls.client_certificates");
                    if std::fs::metadata(&c.trust_bundle).is_err() {
                        errs.at(
                            format!("{base}.trust_bundle"),
                            format!("cannot read {}", c.trust_bundle),
                        );
                    }
                    for (j, crl) in c.crls.iter().enumerate() {
                        if std::fs::metadata(crl).is_err() {
                            errs.at(format!("{base}.crls[{j}]"), format!("cannot read {crl}"));
                        }
                    }
                    ClientCertSettings {
                        required: c.mode == ClientCertMode::Required,
                        trust_bundle: c.trust_bundle.clone(),
                        crls: c.crls.clone(),
                    }
                }),
            }
        });
        listeners.push(Listener {
            address: l.address.clone(),
            tls,
        });
    }
    if let Some(a) = &f.server.admin_address {
        if a.parse::<SocketAddr>().is_err() {
            errs.at("server.admin_address", format!("`{a}` is not an address"));
        }
    }
    let mut trusted_proxies = Vec::new();
    for (i, c) in f.server.trusted_proxy_cidrs.iter().enumerate() {
        match c
            .parse::<ipnet::IpNet>()
            .or_else(|_| c.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        {
            Ok(n) => trusted_proxies.push(n),
            Err(_) => errs.at(
                format!("server.trusted_proxy_cidrs[{i}]"),
                format!("`{c}` is not a CIDR"),
            ),
        }
    }
    for (key, value) in [
        ("request_timeout_seconds", f.server.request_timeout_seconds),
        ("header_timeout_seconds", f.server.header_timeout_seconds),
        ("idle_timeout_seconds", f.server.idle_timeout_seconds),
        ("backend_idle_seconds", f.server.backend_idle_seconds),
    ] {
        if value == 0 {
            errs.at(format!("server.{key}"), "must be at least 1");
        }
    }
    if f.server.threads == Some(0) {
        errs.at("server.threads", "must be at least 1");
    }

    // backends
    let mut backends = Vec::new();
    let mut backend_index = HashMap::new();
    for (i, b) in f.backends.iter().enumerate() {
        let path = format!("backends[{i}]");
        if backend_index.insert(b.name.clone(), i).is_some() {
            errs.at(
                format!("{path}.name"),
                format!("duplicate backend name `{}`", b.name),
            );
        }
        let (tls, host, port) = match parse_backend_url(&b.url) {
            Ok(v) => v,
            Err(e) => {
                errs.at(format!("{path}.url"), format!("`{}` {e}", b.url));
                (true, String::new(), 443)
            }
        };
        let credential = match b.credential {
            CredentialKind::ManagedIdentity => Credential::ManagedIdentity,
            CredentialKind::Forward => Credential::Forward,
            CredentialKind::ApiKey => match &b.api_key {
                Some(k) if !k.is_empty() => Credential::ApiKey(k.clone()),
                _ => {
                    errs.at(
                        format!("{path}.api_key"),
                        "credential: api_key needs api_key",
                    );
                    Credential::ApiKey(String::new())
                }
            },
        };
        if b.api_key.is_some() && b.credential != CredentialKind::ApiKey {
            errs.at(
                format!("{path}.api_key"),
                "api_key is only used with credential: api_key",
            );
        }
        if let Some(ca) = &b.ca_file {
            if std::fs::metadata(ca).is_err() {
                errs.at(format!("{path}.ca_file"), format!("cannot read {ca}"));
            }
        }
        let default_port = if tls { 443 } else { 80 };
        let host_header = if port == default_port {
            host.clone()
        } else {
            format!("{host}:{port}")
        };
        backends.push(Backend {
            name: Arc::from(b.name.as_str()),
            tls,
            host,
            port,
            host_header,
            region: Arc::from(b.region.as_deref().unwrap_or("")),
            credential,
            ca_file: b.ca_file.clone(),
        });
    }

    // deployments
    let mut deployments = HashMap::default();
    let mut deployment_names = Vec::new();
    if f.deployments.is_empty() {
        errs.at("deployments", "at least one deployment is needed");
    }
    for (name, members) in &f.deployments {
        let path = format!("deployments.{name}");
        if members.is_empty() {
            errs.at(&path, "a deployment needs at least one member");
        }
        let mut seen = HashSet::new();
        let mut ms = Vec::new();
        for (i, m) in members.iter().enumerate() {
            let Some(&b) = backend_index.get(&m.backend) else {
                errs.at(
                    format!("{path}[{i}].backend"),
                    format!("unknown backend `{}`", m.backend),
                );
                continue;
            };
            let up = m.deployment.clone().unwrap_or_else(|| name.clone());
            if !seen.insert((b, up.clone())) {
                errs.at(
                    format!("{path}[{i}]"),
                    "the same backend and deployment is listed twice",
                );
            }
            if m.weight == 0 {
                errs.at(format!("{path}[{i}].weight"), "must be at least 1");
            }
            if up.is_empty() || up.contains('/') {
                errs.at(format!("{path}[{i}].deployment"), "not a deployment name");
            }
            ms.push(Member {
                backend: b,
                upstream_deployment: Arc::from(up.as_str()),
                priority: m.priority,
                weight: m.weight.max(1),
            });
        }
        ms.sort_by_key(|m| m.priority);
        let n: Arc<str> = Arc::from(name.as_str());
        deployment_names.push(n.clone());
        deployments.insert(
            name.clone(),
            Arc::new(Deployment {
                name: n,
                members: ms,
            }),
        );
    }

    // identity providers
    let mut oidc = Vec::new();
    let mut provider_names = HashSet::new();
    for (i, p) in f.identity.oidc.iter().enumerate() {
        let path = format!("identity.oidc[{i}]");
        if !provider_names.insert(p.name.clone()) {
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

    // clients
    let mut clients = Vec::new();
    let mut keys = KeyStore::default();
    let mut certs = CertMap::default();
    let mut tokens = TokenMap::default();
    let mut ids = HashSet::new();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for (ci, c) in f.clients.iter().enumerate() {
        let path = format!("clients[{ci}]");
        if c.id.is_empty() || c.id.starts_with("unlisted:") || c.id == "anonymous" {
            errs.at(
                format!("{path}.id"),
                "must be a name (not empty, `anonymous` or `unlisted:…`)",
            );
        }
        if !ids.insert(c.id.clone()) {
            errs.at(
                format!("{path}.id"),
                format!("duplicate client id `{}`", c.id),
            );
        }
        if c.api_keys.is_empty() && c.tokens.is_empty() && c.certificates.is_empty() {
            errs.at(&path, "a client needs api_keys, tokens or certificates");
        }
        let mut key_expiries = Vec::new();
        for (ki, k) in c.api_keys.iter().enumerate() {
            let kp = format!("{path}.api_keys[{ki}]");
            let Some(hash) = parse_hash(&k.sha256) else {
                errs.at(format!("{kp}.sha256"), "must be 64 hex characters (the SHA-256 of the key; see `aoai-gateway keys hash`)");
                continue;
            };
            let expires_at = match &k.expires {
                None => None,
                Some(s) => match unix_of(s) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        errs.at(format!("{kp}.expires"), e);
                        None
                    }
                },
            };
            let key_id = k.sha256.trim().to_ascii_lowercase()[..8].to_string();
            if let Some(t) = expires_at {
                key_expiries.push((key_id.clone(), t));
                if t <= now {
                    log::warn!("{kp}: key {key_id} of client {} has expired", c.id);
                }
            }
            if !keys.insert(
                hash,
                KeyRecord {
                    client: ci,
                    expires_at,
                    key_id: key_id.as_str().into(),
                },
            ) {
                errs.at(format!("{kp}.sha256"), "this key hash is listed twice");
            }
        }
        for (ti, t) in c.tokens.iter().enumerate() {
            if !provider_names.contains(&t.provider) {
                errs.at(
                    format!("{path}.tokens[{ti}].provider"),
                    format!("unknown provider `{}`", t.provider),
                );
            }
            if !tokens.add_listed(&t.provider, &t.client, ci) {
                errs.at(
                    format!("{path}.tokens[{ti}]"),
                    "this application is listed twice",
                );
            }
        }
        for (xi, x) in c.certificates.iter().enumerate() {
            let xp = format!("{path}.certificates[{xi}]");
            match (&x.sha256, &x.subject) {
                (Some(fp), None) => {
                    if normalize_fingerprint(fp).is_none() {
                        errs.at(
                            format!("{xp}.sha256"),
                            "must be a SHA-256 fingerprint (64 hex digits, colons allowed)",
                        );
                    } else if !certs.add_fingerprint(fp, ci) {
                        errs.at(format!("{xp}.sha256"), "this fingerprint is listed twice");
                    }
                }
                (None, Some(s)) => {
                    if !certs.add_subject(s, ci) {
                        errs.at(format!("{xp}.subject"), "this subject is listed twice");
                    }
                }
                _ => errs.at(&xp, "give exactly one of sha256 or subject"),
            }
        }
        clients.push(Client {
            id: Arc::from(c.id.as_str()),
            policy: policy(
                &c.allow,
                &format!("{path}.allow"),
                &f.deployments,
                &mut errs,
            ),
            limits: client_limits(
                &c.limits,
                &format!("{path}.limits"),
                &f.deployments,
                &mut errs,
            ),
            key_expiries,
        });
    }
    for (i, p) in f.identity.oidc.iter().enumerate() {
        if let Some(u) = &p.unlisted_clients {
            let path = format!("identity.oidc[{i}].unlisted_clients");
            tokens
                .unlisted
                .insert(Arc::from(p.name.as_str()), clients.len());
            clients.push(Client {
                id: Arc::from(format!("unlisted:{}", p.name).as_str()),
                policy: policy(
                    &u.allow,
                    &format!("{path}.allow"),
                    &f.deployments,
                    &mut errs,
                ),
                limits: client_limits(
                    &u.limits,
                    &format!("{path}.limits"),
                    &f.deployments,
                    &mut errs,
                ),
                key_expiries: Vec::new(),
            });
        }
    }
    let mut tls_listener_with_mtls = false;
    for l in &listeners {
        if l.tls
            .as_ref()
            .is_some_and(|t| t.client_certificates.is_some())
        {
            tls_listener_with_mtls = true;
        }
    }
    if !tls_listener_with_mtls && f.clients.iter().any(|c| !c.certificates.is_empty()) {
        log::warn!("clients list certificates but no listener asks for client certificates");
    }

    // retries, health, limits
    if f.retries.max_attempts == 0 {
        errs.at("retries.max_attempts", "must be at least 1");
    }
    for (i, s) in f.retries.on_status.iter().enumerate() {
        if !(400..=599).contains(s) {
            errs.at(
                format!("retries.on_status[{i}]"),
                "must be an HTTP error status (400-599)",
            );
        }
    }
    if f.health_checks.interval_seconds == 0 {
        errs.at("health_checks.interval_seconds", "must be at least 1");
    }
    if f.health_checks.timeout_seconds == 0 {
        errs.at("health_checks.timeout_seconds", "must be at least 1");
    }
    if !f.health_checks.path.starts_with('/') {
        errs.at("health_checks.path", "must start with /");
    }
    if f.limits.store == StoreKindFile::Redis && f.limits.redis_url.is_none() {
        errs.at("limits.redis_url", "store: redis needs redis_url");
    }
    if f.upstream_identity.source == IdentitySource::ClientSecret
        && (f.upstream_identity.client_id.is_none()
            || f.upstream_identity.tenant_id.is_none()
            || f.upstream_identity.client_secret.is_none())
    {
        errs.at(
            "upstream_identity",
            "source: client_secret needs client_id, tenant_id and client_secret",
        );
    }

    if !errs.list.is_empty() {
        return Err(errs.list);
    }
    Ok(Config {
        server: Server {
            listeners,
            admin_address: f.server.admin_address.clone(),
            threads: f.server.threads.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            }),
            max_request_body_bytes: f.server.max_request_body_bytes,
            request_timeout: Duration::from_secs(f.server.request_timeout_seconds),
            header_timeout: Duration::from_secs(f.server.header_timeout_seconds),
            idle_timeout: Duration::from_secs(f.server.idle_timeout_seconds),
            backend_idle: Duration::from_secs(f.server.backend_idle_seconds),
            front_door_ids: f.server.front_door_ids.clone(),
            trusted_proxies,
        },
        clients,
        keys,
        certs,
        tokens,
        oidc,
        deployments,
        deployment_names,
        backends,
        upstream_identity: UpstreamIdentity {
            source: f.upstream_identity.source,
            client_id: f.upstream_identity.client_id.clone(),
            tenant_id: f.upstream_identity.tenant_id.clone(),
            client_secret: f.upstream_identity.client_secret.clone(),
            scope: f.upstream_identity.scope.clone(),
        },
        health: HealthSettings {
            interval: Duration::from_secs(f.health_checks.interval_seconds),
            timeout: Duration::from_secs(f.health_checks.timeout_seconds),
            failures_before_down: f.health_checks.failures_before_down.max(1),
            successes_before_up: f.health_checks.successes_before_up.max(1),
            path: f.health_checks.path.clone(),
        },
        retries: RetrySettings {
            max_attempts: f.retries.max_attempts,
            on_status: f.retries.on_status.iter().copied().collect(),
            default_cooldown: Duration::from_secs(f.retries.default_cooldown_seconds),
            max_cooldown: Duration::from_secs(f.retries.max_cooldown_seconds),
        },
        limits: LimitSettings {
            store: f.limits.store,
            redis_url: f.limits.redis_url.clone(),
            on_store_failure: f.limits.on_store_failure,
            prompt_estimate: f.limits.prompt_estimate,
            default_completion_reservation: f.limits.default_completion_reservation,
        },
        audit_path: f.audit_log.path.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_urls() {
        assert_eq!(
            parse_backend_url("https://x.openai.azure.com").unwrap(),
            (true, "x.openai.azure.com".to_string(), 443)
        );
        assert_eq!(
            parse_backend_url("http://127.0.0.1:9000/").unwrap(),
            (false, "127.0.0.1".to_string(), 9000)
        );
        assert!(parse_backend_url("ftp://x").is_err());
        assert!(parse_backend_url("https://x/openai").is_err());
        assert!(parse_backend_url("https://x:notaport").is_err());
    }
}
