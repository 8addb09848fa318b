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
pub mod cert;
pub mod estimate;
pub mod identity;
pub mod json;
pub mod limits;
pub mod limits_filter;
pub mod oidc;
pub mod operation;
pub mod tokens;

use std::sync::Arc;

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

/// A filter's verdict.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Continue,
    Reject(FilterError),
}

/// When a filter can decide: identity before the body is read (an unauthenticated caller
/// never gets to upload a body), authorization and limits once the body named the
/// deployment and the token estimate is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Headers,
    Body,
}

/// The plain facts about one request that filters decide on, and what they found.
#[derive(Debug)]
pub struct FilterContext {
    pub presented: identity::Presented,
    pub now: std::time::SystemTime,
    pub operation: Operation,
    /// Client-facing deployment name (`None` for `models.read`).
    pub deployment: Option<Arc<str>>,
    /// Tokens to reserve: estimated prompt plus requested output.
    pub reserve_tokens: u64,
    /// Set by the identity filter.
    pub identity: Option<identity::Identity>,
    /// Set by the limits filter.
    pub admission: Option<limits::Admission>,
}

impl FilterContext {
    pub fn new(presented: identity::Presented, operation: Operation) -> Self {
        Self::at(presented, operation, std::time::SystemTime::now())
    }

    /// With the clock already read (the request's start).
    pub fn at(
        presented: identity::Presented,
        operation: Operation,
        now: std::time::SystemTime,
    ) -> Self {
        FilterContext {
            presented,
            now,
            operation,
            deployment: None,
            reserve_tokens: 0,
            identity: None,
            admission: None,
        }
    }

    pub fn now_unix(&self) -> i64 {
        self.now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }
}

/// One request filter.
#[async_trait::async_trait]
pub trait RequestFilter: Send + Sync {
    fn phase(&self) -> Phase;
    async fn apply(&self, cx: &mut FilterContext) -> Outcome;
}

/// The filters in their fixed order: identity → authorization → limits. A request refused
/// by one filter never reaches the next, so it consumes nothing there.
pub struct FilterChain {
    filters: Vec<Box<dyn RequestFilter>>,
}

impl FilterChain {
    pub fn new(
        identity: identity::IdentityFilter,
        authz: authz::AuthzFilter,
        limits: limits_filter::LimitsFilter,
    ) -> Self {
        FilterChain {
            filters: vec![Box::new(identity), Box::new(authz), Box::new(limits)],
        }
    }

    /// Runs, in order, the filters that decide in `phase`.
    pub async fn run(&self, phase: Phase, cx: &mut FilterContext) -> Outcome {
        for f in self.filters.iter().filter(|f| f.phase() == phase) {
            if let Outcome::Reject(e) = f.apply(cx).await {
                return Outcome::Reject(e);
            }
        }
        Outcome::Continue
    }
}
