//! Validated runtime configuration: every reference resolved, every value checked, hashes
//! parsed, lists turned into lookup tables. Built once per load or reload by
//! [`validate`] (one module per section of the file, in `config/validate/`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use filters::apikey::KeyStore;
use filters::authz::Policy;
use filters::cert::CertMap;
use filters::identity::TokenMap;
use filters::limits::ClientLimits;
use filters::oidc::OidcProviderConfig;

use super::file::{
    HandshakePacing, IdentitySource, OnStoreFailureFile, PromptEstimateFile, StoreKindFile,
};
pub use super::validate::{parse_backend_url, validate};

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
    /// The largest streamed upload (multipart forms: files, audio, image edits).
    pub max_upload_bytes: u64,
    pub request_timeout: Duration,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub backend_idle: Duration,
    pub tls_handshakes_per_thread: usize,
    pub tls_handshake_pacing: HandshakePacing,
    pub shutdown_grace: Duration,
    pub realtime: Realtime,
    pub front_door_ids: Vec<String>,
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// Realtime session limits (`server.realtime_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Realtime {
    pub idle: Duration,
    pub max_session: Duration,
    pub max_message_bytes: usize,
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
    /// How long a capacity report is believed, in ms (0: capacity-aware routing off).
    pub capacity_window_ms: u64,
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
    pub on_store_failure: OnStoreFailureFile,
    pub prompt_estimate: PromptEstimateFile,
    pub default_completion_reservation: u64,
}

/// `state` (with `limits.store`/`limits.redis_url` merged in): where limit counters and
/// stored-object records live, and how long records are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateSettings {
    pub store: StoreKindFile,
    pub redis_url: Option<String>,
    pub retention: std::time::Duration,
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
    /// `identity.token_cache_entries`.
    pub token_cache_entries: usize,
    /// `identity.verify_threads`.
    pub verify_threads: usize,
    /// Looked up per request: a fast hash (the names come from the file).
    pub deployments: HashMap<String, Arc<Deployment>, foldhash::fast::RandomState>,
    /// Deployment names in file order (for `models.read` and `/healthz`).
    pub deployment_names: Vec<Arc<str>>,
    pub backends: Vec<Backend>,
    pub upstream_identity: UpstreamIdentity,
    pub health: HealthSettings,
    pub retries: RetrySettings,
    pub limits: LimitSettings,
    pub state: StateSettings,
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
