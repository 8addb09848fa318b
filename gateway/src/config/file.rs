//! The configuration file as written (SPEC §3). Every struct refuses unknown keys; defaults
//! are those of the SPEC. `config/validate/` turns these into the types of [`super::runtime`].

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub listeners: Vec<ListenerFile>,
    #[serde(default)]
    pub admin_address: Option<String>,
    #[serde(default)]
    pub threads: Option<usize>,
    #[serde(default = "default_max_body")]
    pub max_request_body_bytes: usize,
    /// The largest streamed upload (`POST /openai/files`, multipart audio and image edits).
    #[serde(default = "default_max_upload")]
    pub max_upload_bytes: u64,
    #[serde(default = "default_request_timeout")]
    pub request_timeout_seconds: u64,
    /// From a request head's first byte to its end (slow heads get 408 and a close).
    #[serde(default = "default_header_timeout")]
    pub header_timeout_seconds: u64,
    /// A keep-alive client connection with no request for this long is closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_seconds: u64,
    /// A pooled backend connection idle for this long is closed, never reused (below the
    /// idle timeout of Azure's front ends, so the gateway closes first).
    #[serde(default = "default_backend_idle")]
    pub backend_idle_seconds: u64,
    /// TLS handshakes under way at once per worker thread; more wait for a turn.
    #[serde(default = "default_tls_handshakes_per_thread")]
    pub tls_handshakes_per_thread: usize,
    /// How a worker thread interleaves the CPU-heavy first step of new TLS handshakes with
    /// the connections it already serves.
    #[serde(default)]
    pub tls_handshake_pacing: HandshakePacing,
    /// On SIGTERM or an upgrade, how long open realtime sessions (and requests) may still
    /// run (SPEC §12).
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_seconds: u64,
    /// A realtime session with no message either way for this long is closed.
    #[serde(default = "default_realtime_idle")]
    pub realtime_idle_seconds: u64,
    /// A realtime session is closed after this long, however busy.
    #[serde(default = "default_realtime_session")]
    pub realtime_max_session_seconds: u64,
    /// The largest single WebSocket message either side may send in a realtime session.
    #[serde(default = "default_realtime_message")]
    pub realtime_max_message_bytes: usize,
    #[serde(default)]
    pub front_door_ids: Vec<String>,
    #[serde(default)]
    pub trusted_proxy_cidrs: Vec<String>,
}

fn default_max_body() -> usize {
    26_214_400
}
fn default_max_upload() -> u64 {
    512 * 1024 * 1024
}
fn default_request_timeout() -> u64 {
    600
}
fn default_header_timeout() -> u64 {
    10
}
fn default_idle_timeout() -> u64 {
    60
}
fn default_backend_idle() -> u64 {
    55
}
fn default_tls_handshakes_per_thread() -> usize {
    16
}
/// `server.tls_handshake_pacing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandshakePacing {
    /// One handshake's first step (ClientHello in, signed server flight out) per event-loop
    /// pass per worker thread, after the tasks that were ready before it (nginx's
    /// `multi_accept off`, one connection per pass).
    #[default]
    PerPass,
    /// Handshakes run as soon as they are scheduled, bounded only by
    /// `tls_handshakes_per_thread` (the behaviour before pacing; kept for comparison).
    None,
}

fn default_shutdown_grace() -> u64 {
    300
}
fn default_realtime_idle() -> u64 {
    300
}
fn default_realtime_session() -> u64 {
    1800
}
fn default_realtime_message() -> usize {
    16 * 1024 * 1024
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    pub address: String,
    #[serde(default)]
    pub tls: Option<TlsFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub certificate: String,
    pub private_key: String,
    #[serde(default)]
    pub client_certificates: Option<ClientCertificatesFile>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClientCertMode {
    Required,
    Optional,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertificatesFile {
    pub mode: ClientCertMode,
    pub trust_bundle: String,
    #[serde(default)]
    pub crls: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    #[serde(default)]
    pub oidc: Vec<OidcFile>,
    /// Verified tokens kept (CLOCK eviction); 0 turns the cache off.
    #[serde(default = "default_token_cache_entries")]
    pub token_cache_entries: usize,
    /// Threads that check the signatures of tokens not in the cache; 0: on the event loop.
    #[serde(default = "default_verify_threads")]
    pub verify_threads: usize,
}

fn default_verify_threads() -> usize {
    filters::oidc::DEFAULT_VERIFY_THREADS
}

fn default_token_cache_entries() -> usize {
    filters::oidc::DEFAULT_TOKEN_CACHE_CAPACITY
}

impl Default for IdentityFile {
    fn default() -> Self {
        IdentityFile {
            oidc: Vec::new(),
            token_cache_entries: default_token_cache_entries(),
            verify_threads: default_verify_threads(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcFile {
    pub name: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    #[serde(default)]
    pub discovery_url: Option<String>,
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default)]
    pub ca_file: Option<String>,
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    #[serde(default = "default_skew")]
    pub clock_skew_seconds: u64,
    #[serde(default)]
    pub required_claims: BTreeMap<String, Vec<String>>,
    #[serde(default = "default_client_claim")]
    pub client_claim: String,
    #[serde(default)]
    pub user_claim: Option<String>,
    #[serde(default)]
    pub unlisted_clients: Option<UnlistedClientsFile>,
    /// Claims that grant: when set, a token's permissions are its client's `allow`
    /// intersected with the union of the grants its claims match (none: 403).
    #[serde(default)]
    pub grants: Option<Vec<GrantFile>>,
}

/// One `identity.oidc[].grants` entry: a claim value and what it permits.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantFile {
    /// `roles` (an array claim), `scp` (a space-separated string), or any claim of either form.
    pub claim: String,
    pub value: String,
    pub operations: Vec<String>,
    /// Names, `*`, or prefixes ending in `*` (`gpt-4o*`).
    pub deployments: Vec<String>,
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into()]
}
fn default_skew() -> u64 {
    60
}
fn default_client_claim() -> String {
    "azp".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnlistedClientsFile {
    pub allow: AllowFile,
    #[serde(default)]
    pub limits: LimitsFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    pub id: String,
    #[serde(default)]
    pub api_keys: Vec<ApiKeyFile>,
    #[serde(default)]
    pub tokens: Vec<TokenRefFile>,
    #[serde(default)]
    pub certificates: Vec<CertificateRefFile>,
    pub allow: AllowFile,
    #[serde(default)]
    pub limits: LimitsFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyFile {
    pub sha256: String,
    #[serde(default)]
    pub expires: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRefFile {
    pub provider: String,
    pub client: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateRefFile {
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub subject: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowFile {
    pub deployments: Vec<String>,
    pub operations: Vec<String>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct LimitSpecFile {
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
    #[serde(default)]
    pub deployments: BTreeMap<String, LimitSpecFile>,
    /// Each distinct user of the client (its `user_claim` value) held to these limits (the
    /// same keys, less `per_user`) on top of the client's.
    #[serde(default)]
    pub per_user: Option<Box<LimitsFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberFile {
    pub backend: String,
    #[serde(default)]
    pub deployment: Option<String>,
    #[serde(default = "one")]
    pub priority: u32,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    ManagedIdentity,
    ApiKey,
    Forward,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendFile {
    pub name: String,
    pub url: String,
    #[serde(default)]
    pub region: Option<String>,
    pub credential: CredentialKind,
    #[serde(default)]
    pub api_key: Option<String>,
    #[serde(default)]
    pub ca_file: Option<String>,
    /// How long a capacity report (`x-ratelimit-remaining-*`) of this backend's deployments
    /// is believed (default 60: Azure's quota is per minute); 0 turns capacity-aware routing
    /// off for this backend.
    #[serde(default)]
    pub capacity_window_seconds: Option<u64>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    #[default]
    ManagedIdentity,
    WorkloadIdentity,
    ClientSecret,
    AzureCli,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamIdentityFile {
    #[serde(default)]
    pub source: IdentitySource,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub client_secret: Option<String>,
    #[serde(default = "default_scope")]
    pub scope: String,
}

impl Default for UpstreamIdentityFile {
    fn default() -> Self {
        UpstreamIdentityFile {
            source: IdentitySource::ManagedIdentity,
            client_id: None,
            tenant_id: None,
            client_secret: None,
            scope: default_scope(),
        }
    }
}

fn default_scope() -> String {
    "https://cognitiveservices.azure.com/.default".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthChecksFile {
    #[serde(default = "ten")]
    pub interval_seconds: u64,
    #[serde(default = "five")]
    pub timeout_seconds: u64,
    #[serde(default = "two")]
    pub failures_before_down: u32,
    #[serde(default = "two")]
    pub successes_before_up: u32,
    #[serde(default = "default_health_path")]
    pub path: String,
}

impl Default for HealthChecksFile {
    fn default() -> Self {
        HealthChecksFile {
            interval_seconds: 10,
            timeout_seconds: 5,
            failures_before_down: 2,
            successes_before_up: 2,
            path: default_health_path(),
        }
    }
}

fn ten() -> u64 {
    10
}
fn five() -> u64 {
    5
}
fn two() -> u32 {
    2
}
fn default_health_path() -> String {
    "/openai/models?api-version=2024-10-21".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetriesFile {
    #[serde(default = "three")]
    pub max_attempts: u32,
    #[serde(default = "default_on_status")]
    pub on_status: Vec<u16>,
    #[serde(default = "ten")]
    pub default_cooldown_seconds: u64,
    #[serde(default = "sixty")]
    pub max_cooldown_seconds: u64,
}

impl Default for RetriesFile {
    fn default() -> Self {
        RetriesFile {
            max_attempts: 3,
            on_status: default_on_status(),
            default_cooldown_seconds: 10,
            max_cooldown_seconds: 60,
        }
    }
}

fn three() -> u32 {
    3
}
fn sixty() -> u64 {
    60
}
fn default_on_status() -> Vec<u16> {
    vec![408, 429, 500, 502, 503, 504]
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum StoreKindFile {
    #[default]
    Memory,
    Redis,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreFailureFile {
    #[default]
    Local,
    Reject,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum PromptEstimateFile {
    #[default]
    Tokenizer,
    Bytes,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LimitsStoreFile {
    /// Older place of `state.store` (still accepted).
    #[serde(default)]
    pub store: Option<StoreKindFile>,
    #[serde(default)]
    pub redis_url: Option<String>,
    #[serde(default)]
    pub on_store_failure: OnStoreFailureFile,
    #[serde(default)]
    pub prompt_estimate: PromptEstimateFile,
    #[serde(default)]
    pub default_completion_reservation: u64,
}

/// `state` (SPEC §14): the store of limit counters and stored-object records.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    #[serde(default)]
    pub store: Option<StoreKindFile>,
    #[serde(default)]
    pub redis_url: Option<String>,
    #[serde(default)]
    pub retention_days: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditLogFile {
    #[serde(default = "dash")]
    pub path: String,
}

impl Default for AuditLogFile {
    fn default() -> Self {
        AuditLogFile { path: dash() }
    }
}

fn dash() -> String {
    "-".into()
}
