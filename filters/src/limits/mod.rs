//! Per-client request and token limits (SPEC §3 `limits`, §6).
//!
//! The gateway keeps one [`Limiter`] per process (its store settings rarely change; the limits
//! themselves are passed with every call, so a configuration reload needs no new limiter and
//! keeps the counters). For every request that passed identity and authorization it calls
//! [`Limiter::admit`] with the client's [`ClientLimits`] and the token reservation
//! (`estimated prompt tokens + requested max output tokens`), and after the response
//! [`Limiter::reconcile`] with the usage the backend reported.
//!
//! * `requests_per_minute`, `tokens_per_minute`: GCRA windows (a sliding leaky bucket; see
//!   `limits/window.rs` for the choice and the arithmetic). `tokens_per_day`: the UTC calendar day.
//! * Client-wide windows, and per (client, deployment) windows on top; a request must fit
//!   every applicable window and is counted in all of them or in none.
//! * Stores: [`StoreKind::Memory`] (per process, sharded mutexes) or [`StoreKind::Redis`]
//!   (shared by every gateway on the same Redis; one Lua script round trip to admit, which also
//!   carries the corrections of requests finished since; what no admission carried within
//!   10 ms is sent in one call for all). See `redis_store.rs` for failure handling, the clock
//!   choice and what the batching changes.

mod memory;
mod redis_store;
pub(crate) mod window;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::FilterError;
use memory::MemoryStore;
use redis_store::RedisStore;
use window::{ceil_ms, cost_us, day_index, gcra_admit, gcra_remaining, until_day_end, MINUTE_US};

/// One set of limits (`clients[].limits`, a `limits.deployments` entry, or
/// `unlisted_clients.limits`). `None` = no limit of that kind.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LimitSpec {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
}

impl LimitSpec {
    pub fn is_empty(&self) -> bool {
        self.requests_per_minute.is_none()
            && self.tokens_per_minute.is_none()
            && self.tokens_per_day.is_none()
    }
}

/// A client's limits: client-wide, plus per client-facing deployment on top.
#[derive(Clone, Debug, Default)]
pub struct ClientLimits {
    pub client: LimitSpec,
    pub per_deployment: HashMap<String, LimitSpec>,
    /// `limits.per_user`: each distinct user of the client (its `user_claim` value) held to
    /// these on top (their own `per_user` is always `None`). Requests without a user value
    /// share one bucket of the client.
    pub per_user: Option<Box<ClientLimits>>,
}

impl ClientLimits {
    /// Whether any limit of this set applies to `deployment` (per-user ones included).
    pub fn applies_to(&self, deployment: &str) -> bool {
        !self.client.is_empty()
            || self
                .per_deployment
                .get(deployment)
                .is_some_and(|s| !s.is_empty())
            || self
                .per_user
                .as_ref()
                .is_some_and(|u| u.applies_to(deployment))
    }
}

pub use crate::store::StoreKind;

/// What to do while Redis is unreachable (`limits.on_store_failure`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStoreFailure {
    /// Decide with this process's own memory counters (each gateway then enforces the limits
    /// on its own share of the traffic).
    Local,
    /// Refuse with [`FilterError::LimitStoreUnavailable`] (503).
    Reject,
}

/// Tuning of the Redis store; [`Limiter::new`] uses the defaults.
#[derive(Clone, Debug)]
pub struct LimiterOptions {
    /// Longest wait for one Redis round trip (connecting included) before the request is
    /// decided by `on_store_failure`. Default 250 ms.
    pub command_timeout: Duration,
    /// After a Redis failure, requests skip Redis (and go straight to `on_store_failure`) for
    /// this long, then try again on a fresh connection. Default 1 s.
    pub retry_interval: Duration,
    /// Prefix of every Redis key. Default `agw:lim:`.
    pub key_prefix: String,
    /// Longest a reconciliation waits for an admission to carry it to Redis before it is sent
    /// on its own (with every other one queued). Default 10 ms.
    pub flush_delay: Duration,
}

impl Default for LimiterOptions {
    fn default() -> Self {
        LimiterOptions {
            command_timeout: Duration::from_millis(250),
            retry_interval: Duration::from_secs(1),
            key_prefix: "agw:lim:".to_owned(),
            flush_delay: redis_store::FLUSH_DELAY,
        }
    }
}

/// Values for the `x-ratelimit-*` response headers: for requests and for tokens, the
/// applicable limit with the least remaining (this request counted). `None` when no limit of
/// that kind applies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RateLimitHeaders {
    pub limit_requests: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub limit_tokens: Option<u64>,
    pub remaining_tokens: Option<u64>,
}

/// Who decided an admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decider {
    /// No limit applies: nothing was counted.
    Unlimited,
    /// The memory store (`store: memory`).
    Memory,
    /// The shared Redis store.
    Redis,
    /// This process's memory counters because Redis was unreachable (`on_store_failure: local`).
    LocalFallback,
}

/// An admitted request: the headers to send, and what [`Limiter::reconcile`] needs.
#[derive(Debug)]
pub struct Admission {
    pub headers: RateLimitHeaders,
    ticket: Option<Box<Ticket>>,
}

#[derive(Debug)]
struct Ticket {
    subject: String,
    /// The user key (see [`user_key`]) when the plan has per-user windows, else empty.
    user: String,
    deployment: String,
    plan: Plan,
    /// Each window's value right after admission (`tat` µs, or the day's count).
    after: [i64; MAX_CHECKS],
    /// The UTC day the request was admitted in.
    day: i64,
    reserved: u64,
    decider: Decider,
    reconciled: AtomicBool,
}

impl Admission {
    fn unlimited() -> Admission {
        Admission {
            headers: RateLimitHeaders::default(),
            ticket: None,
        }
    }

    /// Who decided (for logs and tests).
    pub fn decided_by(&self) -> Decider {
        self.ticket
            .as_ref()
            .map_or(Decider::Unlimited, |t| t.decider)
    }

    /// Tokens reserved in the token windows (0 when no limit applies).
    pub fn reserved_tokens(&self) -> u64 {
        self.ticket.as_ref().map_or(0, |t| t.reserved)
    }
}

// ---------------------------------------------------------------------------------------------
// The plan: which windows apply to one request, without allocating.

pub(crate) const MAX_CHECKS: usize = 12;
/// Limits and amounts are capped at 2^52 (far beyond any real limit) so that every count stays
/// exact in Lua's doubles and fits an `i64`.
pub(crate) const MAX_UNITS: u64 = 1 << 52;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    Client,
    Deployment,
    /// The client's windows for one user (`limits.per_user`).
    User,
    /// One user's windows for one deployment (`limits.per_user.deployments`).
    UserDeployment,
}

/// The key of a user's windows: its `user_claim` value; requests without one share the
/// empty key (a user value is never empty: such a claim counts as absent).
pub(crate) fn user_key(user: Option<&str>) -> &str {
    user.unwrap_or("")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Requests,
    Tokens,
    Day,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Check {
    pub(crate) scope: Scope,
    pub(crate) kind: Kind,
    pub(crate) limit: u64,
    /// Units this request takes: 1 request, or the reserved tokens.
    pub(crate) amount: u64,
}

const NO_CHECK: Check = Check {
    scope: Scope::Client,
    kind: Kind::Requests,
    limit: 0,
    amount: 0,
};

#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    checks: [Check; MAX_CHECKS],
    len: usize,
}

impl Plan {
    fn build(limits: &ClientLimits, deployment: &str, reserve: u64) -> Plan {
        let mut plan = Plan {
            checks: [NO_CHECK; MAX_CHECKS],
            len: 0,
        };
        plan.add(Scope::Client, &limits.client, reserve);
        if !limits.per_deployment.is_empty() {
            if let Some(spec) = limits.per_deployment.get(deployment) {
                plan.add(Scope::Deployment, spec, reserve);
            }
        }
        if let Some(user) = &limits.per_user {
            plan.add(Scope::User, &user.client, reserve);
            if let Some(spec) = user.per_deployment.get(deployment) {
                plan.add(Scope::UserDeployment, spec, reserve);
            }
        }
        plan
    }

    fn add(&mut self, scope: Scope, spec: &LimitSpec, reserve: u64) {
        let kinds = [
            (Kind::Requests, spec.requests_per_minute, 1),
            (Kind::Tokens, spec.tokens_per_minute, reserve),
            (Kind::Day, spec.tokens_per_day, reserve),
        ];
        for (kind, limit, amount) in kinds {
            if let Some(limit) = limit {
                self.checks[self.len] = Check {
                    scope,
                    kind,
                    limit: limit.min(MAX_UNITS),
                    amount: amount.min(MAX_UNITS),
                };
                self.len += 1;
            }
        }
    }

    pub(crate) fn checks(&self) -> &[Check] {
        &self.checks[..self.len]
    }

    fn has_deployment_checks(&self) -> bool {
        self.checks()
            .iter()
            .any(|c| matches!(c.scope, Scope::Deployment | Scope::UserDeployment))
    }

    fn has_user_checks(&self) -> bool {
        self.checks()
            .iter()
            .any(|c| matches!(c.scope, Scope::User | Scope::UserDeployment))
    }
}

/// What refused a request; turned into the [`FilterError`].
#[derive(Default)]
struct Refusal {
    refused: bool,
    wait_us: i64,
    tokens: bool,
    quota: bool,
}

impl Refusal {
    fn add(&mut self, kind: Kind, wait_us: i64) {
        self.refused = true;
        self.wait_us = self.wait_us.max(wait_us);
        match kind {
            Kind::Requests => {}
            Kind::Tokens => self.tokens = true,
            Kind::Day => self.quota = true,
        }
    }

    fn error(&self) -> FilterError {
        let retry_after_ms = ceil_ms(self.wait_us);
        if self.quota {
            FilterError::QuotaExceeded { retry_after_ms }
        } else {
            FilterError::RateLimitExceeded {
                retry_after_ms,
                tokens: self.tokens,
            }
        }
    }
}

/// A request whose amount exceeds a limit can never fit: refused at once (without asking the
/// store) with the window length as the wait (per-minute: 60 s; per-day: until the UTC day
/// ends, when the day's count is 0 again — it still will not fit, but no shorter wait is true).
fn oversized(plan: &Plan, now: i64) -> Option<FilterError> {
    let mut refusal = Refusal::default();
    for c in plan.checks() {
        if c.amount > c.limit {
            let wait = match c.kind {
                Kind::Day => until_day_end(now),
                Kind::Requests | Kind::Tokens => MINUTE_US,
            };
            refusal.add(c.kind, wait);
        }
    }
    refusal.refused.then(|| refusal.error())
}

/// Decides a request against the windows' current values (`tat` µs for per-minute windows,
/// today's count for the day window): all new values, or the refusal. Every refusing window
/// contributes its wait and the longest one is returned, so after waiting it every window fits
/// (waiting only drains per-minute windows; the day counter restarts at midnight).
pub(crate) fn evaluate(
    plan: &Plan,
    current: &[i64],
    now: i64,
) -> Result<[i64; MAX_CHECKS], FilterError> {
    if let Some(e) = oversized(plan, now) {
        return Err(e);
    }
    let mut after = [0i64; MAX_CHECKS];
    let mut refusal = Refusal::default();
    for (i, c) in plan.checks().iter().enumerate() {
        match c.kind {
            Kind::Requests | Kind::Tokens => {
                match gcra_admit(current[i], now, cost_us(c.amount, c.limit)) {
                    Ok(tat) => after[i] = tat,
                    Err(wait) => refusal.add(c.kind, wait),
                }
            }
            Kind::Day => {
                let used = current[i].max(0).saturating_add(c.amount as i64);
                if used as u64 > c.limit {
                    refusal.add(Kind::Day, until_day_end(now));
                } else {
                    after[i] = used;
                }
            }
        }
    }
    if refusal.refused {
        Err(refusal.error())
    } else {
        Ok(after)
    }
}

/// The headers for an admitted request: per family, the window with the least remaining.
pub(crate) fn headers(plan: &Plan, after: &[i64], now: i64) -> RateLimitHeaders {
    let mut h = RateLimitHeaders::default();
    for (i, c) in plan.checks().iter().enumerate() {
        let remaining = match c.kind {
            Kind::Requests | Kind::Tokens => gcra_remaining(after[i], now, c.limit),
            Kind::Day => c.limit.saturating_sub(after[i].max(0) as u64),
        };
        let (limit, rem) = match c.kind {
            Kind::Requests => (&mut h.limit_requests, &mut h.remaining_requests),
            Kind::Tokens | Kind::Day => (&mut h.limit_tokens, &mut h.remaining_tokens),
        };
        if rem.is_none_or(|r| remaining < r) {
            *limit = Some(c.limit);
            *rem = Some(remaining);
        }
    }
    h
}

/// A correction to apply to one token window at reconciliation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Correction {
    pub(crate) scope: Scope,
    pub(crate) kind: Kind,
    /// µs for a per-minute window, tokens for the day window (actual − reserved).
    pub(crate) delta: i64,
    /// Per-minute: the window's `tat` right after admission (limits the refund).
    pub(crate) cap: i64,
}

/// The corrections that replace `reserved` by `actual` in the token windows the reservation
/// was counted in. The day window is corrected only while the day it was counted in lasts (a
/// correction arriving after midnight is dropped: yesterday's count no longer matters, and
/// today's must not pay for yesterday).
fn corrections(ticket: &Ticket, actual: u64, now: i64) -> ([Correction; MAX_CHECKS], usize) {
    let mut out = [Correction {
        scope: Scope::Client,
        kind: Kind::Requests,
        delta: 0,
        cap: 0,
    }; MAX_CHECKS];
    let mut n = 0;
    for (i, c) in ticket.plan.checks().iter().enumerate() {
        let delta = match c.kind {
            Kind::Requests => continue,
            Kind::Tokens => cost_us(actual, c.limit) - cost_us(ticket.reserved, c.limit),
            Kind::Day => {
                if day_index(now) != ticket.day {
                    continue;
                }
                actual.min(MAX_UNITS) as i64 - ticket.reserved as i64
            }
        };
        if delta != 0 {
            out[n] = Correction {
                scope: c.scope,
                kind: c.kind,
                delta,
                cap: ticket.after[i],
            };
            n += 1;
        }
    }
    (out, n)
}

pub(crate) fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The stores.

/// Where the counters live: this process's memory ([`MemoryStore`]) or Redis shared by every
/// gateway ([`RedisStore`]). Both answer the same two questions for a [`Plan`]: admit (all
/// checks or none: the windows' values after admission, or the refusal) and reconcile (apply
/// the corrections of a finished request). `None` / `false`: the store could not answer
/// (Redis away), and the limiter applies `on_store_failure`.
pub(crate) trait LimitStore: Send + Sync {
    fn admit(
        &self,
        subject: &str,
        user: &str,
        deployment: &str,
        plan: &Plan,
        now: i64,
    ) -> impl std::future::Future<Output = Option<Result<[i64; MAX_CHECKS], FilterError>>> + Send;

    fn reconcile(
        &self,
        subject: &str,
        user: &str,
        deployment: &str,
        day: i64,
        corrections: &[Correction],
        now: i64,
    ) -> impl std::future::Future<Output = bool> + Send;
}

impl LimitStore for MemoryStore {
    async fn admit(
        &self,
        subject: &str,
        user: &str,
        deployment: &str,
        plan: &Plan,
        now: i64,
    ) -> Option<Result<[i64; MAX_CHECKS], FilterError>> {
        Some(self.admit_now(subject, user, deployment, plan, now))
    }

    async fn reconcile(
        &self,
        subject: &str,
        user: &str,
        deployment: &str,
        day: i64,
        corrections: &[Correction],
        now: i64,
    ) -> bool {
        self.reconcile_now(subject, user, deployment, day, corrections, now);
        true
    }
}

// ---------------------------------------------------------------------------------------------
// The limiter.

/// Admits requests against their client's limits. Cheap to share (`Arc<Limiter>`).
pub struct Limiter {
    redis: Option<RedisStore>,
    /// The memory store: the store itself for `store: memory`, the fallback for `local`.
    local: MemoryStore,
    on_failure: OnStoreFailure,
    on_store_error: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("redis", &self.redis.is_some())
            .field("on_failure", &self.on_failure)
            .finish()
    }
}

impl Limiter {
    /// A limiter with default [`LimiterOptions`]. `on_store_error` is called once for every
    /// request that Redis could not serve (admission decided by `on_store_failure`, or a
    /// correction dropped); wire it to `aoai_gateway_limit_store_errors_total`.
    ///
    /// Does not connect: the Redis connection is made on first use, inside the caller's Tokio
    /// runtime (so this may be called outside one). Errors only on an invalid Redis URL.
    pub fn new(
        store: StoreKind,
        on_failure: OnStoreFailure,
        on_store_error: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<Self, String> {
        Self::with_options(store, on_failure, on_store_error, LimiterOptions::default())
    }

    pub fn with_options(
        store: StoreKind,
        on_failure: OnStoreFailure,
        on_store_error: Arc<dyn Fn() + Send + Sync>,
        options: LimiterOptions,
    ) -> Result<Self, String> {
        let conn = crate::store::ConnOptions {
            command_timeout: options.command_timeout,
            retry_interval: options.retry_interval,
        };
        let store = crate::store::Store::open(store, &conn)?;
        Ok(Self::build(
            &store,
            on_failure,
            on_store_error,
            &options.key_prefix,
            options.flush_delay,
        ))
    }

    /// A limiter on the state store `store` (its Redis connection, if any, is shared with
    /// the other users of the store); Redis keys start with `key_prefix`.
    pub fn on_store(
        store: &crate::store::Store,
        on_failure: OnStoreFailure,
        on_store_error: Arc<dyn Fn() + Send + Sync>,
        key_prefix: &str,
    ) -> Self {
        Self::build(
            store,
            on_failure,
            on_store_error,
            key_prefix,
            redis_store::FLUSH_DELAY,
        )
    }

    fn build(
        store: &crate::store::Store,
        on_failure: OnStoreFailure,
        on_store_error: Arc<dyn Fn() + Send + Sync>,
        key_prefix: &str,
        flush_delay: Duration,
    ) -> Self {
        Limiter {
            redis: store.redis().map(|c| {
                RedisStore::new(c.clone(), key_prefix, on_store_error.clone(), flush_delay)
            }),
            local: MemoryStore::new(),
            on_failure,
            on_store_error,
        }
    }

    /// Counts one request and reserves `reserve_tokens` in every applicable window
    /// (client-wide and per deployment), all or nothing: a refused request consumes nothing.
    ///
    /// `subject` is the client id (`support-bot`, `unlisted:contoso:<app>`); `deployment` the
    /// client-facing name. With no limit configured for the pair this returns at once, without
    /// a lock, an allocation or a Redis round trip.
    ///
    /// Errors: [`FilterError::RateLimitExceeded`] (a per-minute window; `retry_after_ms` is the
    /// exact wait until this request fits if nothing else changes, 60 000 when the request is
    /// larger than a limit itself), [`FilterError::QuotaExceeded`] (`tokens_per_day`; waits
    /// until the UTC day ends), [`FilterError::LimitStoreUnavailable`] (Redis unreachable and
    /// `on_store_failure: reject`).
    pub async fn admit(
        &self,
        subject: &str,
        deployment: &str,
        limits: &ClientLimits,
        reserve_tokens: u64,
        now: SystemTime,
    ) -> Result<Admission, FilterError> {
        self.admit_user(subject, None, deployment, limits, reserve_tokens, now)
            .await
    }

    /// [`Limiter::admit`] for a request of `user` (the `user_claim` value, if any): the
    /// client's `per_user` windows of that user are checked and counted with the others, all
    /// or nothing. Requests without a user value share one per-user bucket of the client.
    pub async fn admit_user(
        &self,
        subject: &str,
        user: Option<&str>,
        deployment: &str,
        limits: &ClientLimits,
        reserve_tokens: u64,
        now: SystemTime,
    ) -> Result<Admission, FilterError> {
        let user = user_key(user);
        let plan = Plan::build(limits, deployment, reserve_tokens);
        if plan.len == 0 {
            return Ok(Admission::unlimited());
        }
        let now = micros(now);
        if let Some(e) = oversized(&plan, now) {
            return Err(e);
        }
        let decider = match &self.redis {
            None => Decider::Memory,
            Some(redis) => {
                if let Some(result) = redis.admit(subject, user, deployment, &plan, now).await {
                    let after = result?;
                    return Ok(self.admission(
                        subject,
                        user,
                        deployment,
                        plan,
                        after,
                        now,
                        Decider::Redis,
                    ));
                }
                (self.on_store_error)();
                match self.on_failure {
                    OnStoreFailure::Reject => return Err(FilterError::LimitStoreUnavailable),
                    OnStoreFailure::Local => Decider::LocalFallback,
                }
            }
        };
        let after = self
            .local
            .admit_now(subject, user, deployment, &plan, now)?;
        Ok(self.admission(subject, user, deployment, plan, after, now, decider))
    }

    #[allow(clippy::too_many_arguments)]
    fn admission(
        &self,
        subject: &str,
        user: &str,
        deployment: &str,
        plan: Plan,
        after: [i64; MAX_CHECKS],
        now: i64,
        decider: Decider,
    ) -> Admission {
        let reserved = plan
            .checks()
            .iter()
            .find(|c| c.kind != Kind::Requests)
            .map_or(0, |c| c.amount);
        Admission {
            headers: headers(&plan, &after, now),
            ticket: Some(Box::new(Ticket {
                subject: subject.to_owned(),
                user: if plan.has_user_checks() {
                    user.to_owned()
                } else {
                    String::new()
                },
                deployment: if plan.has_deployment_checks() {
                    deployment.to_owned()
                } else {
                    String::new()
                },
                plan,
                after,
                day: day_index(now),
                reserved,
                decider,
                reconciled: AtomicBool::new(false),
            })),
        }
    }

    /// Replaces tokens reserved (and charged) by an earlier request — a background response,
    /// admitted at `created` — with the usage reported for it now, in the token windows of
    /// `limits` for `deployment`. The same corrections as [`Limiter::reconcile_at`]: a refund
    /// takes back at most what is still in a window, the day window is corrected only while
    /// the day of `created` lasts. The caller makes sure it happens once per response.
    #[allow(clippy::too_many_arguments)]
    pub async fn settle(
        &self,
        subject: &str,
        user: Option<&str>,
        deployment: &str,
        limits: &ClientLimits,
        reserved: u64,
        actual: u64,
        created: SystemTime,
        now: SystemTime,
    ) {
        let plan = Plan::build(limits, deployment, reserved);
        if plan.len == 0 {
            return;
        }
        let decider = if self.redis.is_some() {
            Decider::Redis
        } else {
            Decider::Memory
        };
        let mut admission = self.admission(
            subject,
            user_key(user),
            deployment,
            plan,
            [0; MAX_CHECKS],
            micros(created),
            decider,
        );
        if let Some(t) = admission.ticket.as_mut() {
            // No admission-time value bounds the refund: what is left in the window does.
            t.after = [i64::MAX; MAX_CHECKS];
        }
        self.reconcile_at(&admission, Some(actual), now).await;
    }

    /// Replaces the reservation by the actual usage, now. See [`Limiter::reconcile_at`].
    pub async fn reconcile(&self, admission: &Admission, actual_tokens: Option<u64>) {
        self.reconcile_at(admission, actual_tokens, SystemTime::now())
            .await
    }

    /// Replaces the tokens reserved by `admission` with `actual_tokens` in the token windows
    /// the reservation was counted in (the request count stays). Call it once per admitted
    /// request, also for failed ones; later calls for the same admission do nothing.
    ///
    /// * `None`: no usage could be had (stream cut, backend error without usage): the
    ///   reservation stands as the charge.
    /// * Lower than reserved: the difference comes back, as far as it is still in the window
    ///   (per minute: the part of the reservation that has not drained yet; nothing goes below
    ///   empty). Per day: only while the same UTC day lasts.
    /// * Higher than reserved: the difference is charged as well (per minute from now on, so
    ///   the client may be in debt and wait longer; per day only while the same day lasts).
    /// * The correction goes to the store that admitted the request. Redis: it is queued and
    ///   carried by this limiter's next admission, or sent at most `flush_delay` (10 ms) later
    ///   with every other one queued, applied as of `now` either way. When that call fails it
    ///   is dropped (the reservation stands) and `on_store_error` is called.
    pub async fn reconcile_at(
        &self,
        admission: &Admission,
        actual_tokens: Option<u64>,
        now: SystemTime,
    ) {
        let (Some(ticket), Some(actual)) = (admission.ticket.as_deref(), actual_tokens) else {
            return;
        };
        if ticket.reconciled.swap(true, Ordering::AcqRel) {
            return;
        }
        let now = micros(now);
        let (corrections, n) = corrections(ticket, actual, now);
        if n == 0 {
            return;
        }
        let corrections = &corrections[..n];
        self.apply(ticket, ticket.day, corrections, now).await;
    }
    /// Applies corrections to the windows of `ticket`'s admission where it was decided (Redis
    /// or this process); a Redis failure drops them and calls `on_store_error`.
    async fn apply(&self, ticket: &Ticket, day: i64, corrections: &[Correction], now: i64) {
        match (ticket.decider, &self.redis) {
            (Decider::Redis, Some(redis)) => {
                let ok = redis
                    .reconcile(
                        &ticket.subject,
                        &ticket.user,
                        &ticket.deployment,
                        day,
                        corrections,
                        now,
                    )
                    .await;
                if !ok {
                    (self.on_store_error)();
                }
            }
            _ => self.local.reconcile_now(
                &ticket.subject,
                &ticket.user,
                &ticket.deployment,
                day,
                corrections,
                now,
            ),
        }
    }

    /// Charges `tokens` more to the token windows `admission` was counted in, as of `now`:
    /// the per-minute windows from now on (the client may go into debt), the day window of
    /// the current UTC day. For usage that arrives in parts with no reservation of its own —
    /// a realtime session's `response.done` events (SPEC §12) — so, unlike
    /// [`Limiter::reconcile`], it may be called any number of times for one admission.
    /// Nothing happens for an admission no limit applied to. A Redis failure drops the charge
    /// and calls `on_store_error`.
    pub async fn charge(&self, admission: &Admission, tokens: u64) {
        self.charge_at(admission, tokens, SystemTime::now()).await
    }

    pub async fn charge_at(&self, admission: &Admission, tokens: u64, now: SystemTime) {
        let Some(ticket) = admission.ticket.as_deref() else {
            return;
        };
        let now = micros(now);
        let (corrections, n) = surcharges(ticket, tokens);
        if n == 0 {
            return;
        }
        let corrections = &corrections[..n];
        let day = day_index(now);
        self.apply(ticket, day, corrections, now).await;
    }
}

/// The corrections that add `tokens` to every token window of a ticket.
fn surcharges(ticket: &Ticket, tokens: u64) -> ([Correction; MAX_CHECKS], usize) {
    let mut out = [Correction {
        scope: Scope::Client,
        kind: Kind::Requests,
        delta: 0,
        cap: 0,
    }; MAX_CHECKS];
    let mut n = 0;
    if tokens == 0 {
        return (out, 0);
    }
    for (i, c) in ticket.plan.checks().iter().enumerate() {
        let delta = match c.kind {
            Kind::Requests => continue,
            Kind::Tokens => cost_us(tokens, c.limit),
            Kind::Day => tokens.min(MAX_UNITS) as i64,
        };
        out[n] = Correction {
            scope: c.scope,
            kind: c.kind,
            delta,
            cap: ticket.after[i],
        };
        n += 1;
    }
    (out, n)
}

#[cfg(test)]
pub(crate) mod tests;
