//! Request filters of aoai-gateway: identity (API key, OIDC, client certificate),
//! authorization and limits, plus token accounting.
//!
//! Each filter is a type behind [`RequestFilter`] with an explicit [`Outcome`]. The gateway
//! builds them once from configuration and runs them in a fixed order:
//! identity → authorization → limits. Decisions are pure functions over plain data with
//! unit tests next to them; network I/O (JWKS, Redis) stays at the edges.
#![forbid(unsafe_code)]

pub mod apikey;
pub mod authz;
pub mod bpe;
pub mod cert;
pub mod estimate;
pub mod fleet;
pub mod grants;
pub mod identity;
pub mod json;
pub mod limits;
pub mod limits_filter;
pub mod objects;
pub mod oidc;
pub mod operation;
pub mod store;
pub mod tokens;

pub use operation::Operation;

/// How the caller proved who it is (the audit log's `auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ApiKey,
    Oidc,
    Certificate,
    None,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ApiKey => "api_key",
            AuthMethod::Oidc => "oidc",
            AuthMethod::Certificate => "certificate",
            AuthMethod::None => "none",
        }
    }
}

/// Why a filter refused a request. The gateway maps each variant to its status and JSON
/// body in one place (`gateway::errors`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("no credential was presented")]
    MissingCredential,
    #[error("the credential is not valid")]
    InvalidCredential,
    /// A configured API key whose id is revoked (SPEC §14): answered as
    /// [`FilterError::InvalidCredential`]; the id goes to the audit line.
    #[error("the credential is not valid")]
    RevokedKey { key_id: std::sync::Arc<str> },
    #[error("the caller is not allowed to use this gateway")]
    Forbidden,
    #[error("the caller may not use this deployment")]
    DeploymentNotAllowed,
    #[error("the caller may not use this operation")]
    OperationNotAllowed,
    #[error("rate limit exceeded")]
    RateLimitExceeded {
        retry_after_ms: u64,
        /// `true` when a token limit (not a request limit) refused the request.
        tokens: bool,
    },
    #[error("daily token quota exceeded")]
    QuotaExceeded { retry_after_ms: u64 },
    #[error("the shared limit store is unavailable")]
    LimitStoreUnavailable,
}

/// What the identity filter decides on: the credentials a request presented, and when.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    pub presented: &'a identity::Presented<'a>,
    pub now: std::time::SystemTime,
}

impl Credentials<'_> {
    pub fn now_unix(&self) -> i64 {
        unix_seconds(self.now)
    }
}

/// What authorization and limits decide on, once identity is known and the body has named
/// the deployment: who, what, where, and how many tokens to reserve.
#[derive(Debug, Clone, Copy)]
pub struct Planned<'a> {
    pub identity: &'a identity::Identity,
    pub operation: Operation,
    /// Client-facing deployment name (`None` for `models.read`).
    pub deployment: Option<&'a str>,
    /// Tokens to reserve: estimated prompt plus requested output.
    pub reserve_tokens: u64,
    pub now: std::time::SystemTime,
}

fn unix_seconds(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// One request filter: a decision over plain inputs with an explicit outcome — what it
/// found (`Pass`), or why the request is refused. Each filter is its own type; the chain
/// calls them in a fixed order with typed inputs, so nothing is "filled in" for a later one.
pub trait RequestFilter<In>: Send + Sync {
    type Pass;
    fn apply(
        &self,
        input: &In,
    ) -> impl std::future::Future<Output = Result<Self::Pass, FilterError>> + Send;
}

/// The filters in their fixed order: identity → authorization → limits. A request refused
/// by one filter never reaches the next, so it consumes nothing there.
pub struct FilterChain {
    identity: identity::IdentityFilter,
    authz: authz::AuthzFilter,
    limits: limits_filter::LimitsFilter,
}

impl FilterChain {
    pub fn new(
        identity: identity::IdentityFilter,
        authz: authz::AuthzFilter,
        limits: limits_filter::LimitsFilter,
    ) -> Self {
        FilterChain {
            identity,
            authz,
            limits,
        }
    }

    /// Identity: who presented these credentials (before any body byte is read).
    pub async fn authenticate(
        &self,
        credentials: &Credentials<'_>,
    ) -> Result<identity::Identity, FilterError> {
        self.identity.apply(credentials).await
    }

    /// Authorization, then limits: the admission (`None` where no limit applies), or why
    /// not. A request that authorization refuses consumes nothing of its limits.
    pub async fn admit(
        &self,
        planned: &Planned<'_>,
    ) -> Result<Option<limits::Admission>, FilterError> {
        self.authz.apply(planned).await?;
        self.limits.apply(planned).await
    }
}
