//! The gateway's own bearer token for `credential: managed_identity` backends, obtained with
//! `azure_identity` (App Service endpoint through IDENTITY_ENDPOINT/IDENTITY_HEADER, IMDS on
//! a VM, workload identity, a client secret, or the Azure CLI).
//!
//! Only the background task of [`UpstreamToken::refresh_loop`] fetches: at start, then
//! before expiry; a failed refresh keeps the token, which stays in use until its real
//! expiry, and is retried with backoff (SPEC §7). A request reads the cached token with
//! [`UpstreamToken::current`], which never waits: without a valid token it answers
//! [`NoToken`] at once. The one exception is the very first fetch of the process: requests
//! that arrive while it is under way wait for its end ([`UpstreamToken::get`]), at most
//! [`START_WAIT`] after start.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use azure_core::credentials::{Secret, TokenCredential};
use azure_core::http::{ClientOptions, ExponentialRetryOptions, RetryOptions};
use azure_identity::{
    AzureCliCredential, ClientAssertionCredentialOptions, ClientSecretCredential,
    ClientSecretCredentialOptions, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId, WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};

use crate::config::file::IdentitySource;
use crate::config::runtime::UpstreamIdentity;
use crate::observe::metrics::Metrics;

/// A token and when it expires (unix seconds).
#[derive(Debug)]
pub struct Token {
    /// `Bearer …`, ready for the header.
    pub header: String,
    pub expires_at: i64,
}

/// Why there is no token to send: the gateway has none that is still valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoToken {
    /// None was ever obtained (the token endpoint has failed since start, or the first
    /// fetch is still under way).
    NeverFetched,
    /// The last one expired at this time (unix seconds) and no refresh has succeeded since.
    Expired { at: i64 },
}

impl std::fmt::Display for NoToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoToken::NeverFetched => {
                f.write_str("no managed-identity token: none could be obtained yet")
            }
            NoToken::Expired { at } => {
                let when = time::OffsetDateTime::from_unix_timestamp(*at)
                    .ok()
                    .and_then(|t| {
                        t.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_else(|| at.to_string());
                write!(
                    f,
                    "no managed-identity token: the last one expired at {when} and every refresh since has failed"
                )
            }
        }
    }
}

impl std::error::Error for NoToken {}

/// A fetch (with `azure_identity`'s own few quick retries) that takes longer fails.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests wait for the first fetch of the process at most this long after start.
pub const START_WAIT: Duration = Duration::from_secs(11);
/// Longest wait between failed refreshes while the cached token is valid (also never more
/// than half of its remaining life) ...
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// ... and while there is none: every request to a managed-identity backend fails then.
const MAX_BACKOFF_WITHOUT_TOKEN: Duration = Duration::from_secs(10);

pub struct UpstreamToken {
    credential: Arc<dyn TokenCredential>,
    scope: String,
    current: ArcSwapOption<Token>,
    /// `true` once the first fetch has ended, either way.
    first_fetch_done: tokio::sync::watch::Sender<bool>,
    created: Instant,
    metrics: Arc<Metrics>,
}

fn now_unix_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// When to refresh a token that expires at `expires_at`: five minutes before (where
/// `azure_identity`'s own cache starts to fetch again), or at half its remaining life for
/// short-lived tokens.
pub fn refresh_at(now: i64, expires_at: i64) -> i64 {
    let life = (expires_at - now).max(0);
    if life > 600 {
        expires_at - 300
    } else {
        now + life / 2
    }
}

/// How long the refresher waits before its next fetch, `failures` fetches in a row having
/// failed since the last success, the cached token expiring at `expires_at` (unix
/// seconds; `None`: there never was one).
pub fn next_attempt_in(now: i64, expires_at: Option<i64>, failures: u32) -> Duration {
    let valid_for = expires_at.map_or(0, |e| (e - now).max(0));
    if failures == 0 {
        return match expires_at {
            None => Duration::ZERO,
            // At least a second: a token that is already near its end is not fetched in a loop.
            Some(e) => Duration::from_secs((refresh_at(now, e) - now).max(1) as u64),
        };
    }
    let backoff = Duration::from_secs(1u64 << (failures - 1).min(16));
    if valid_for > 0 {
        // Another try before the token runs out.
        let half_life = Duration::from_secs((valid_for / 2).max(1) as u64);
        backoff.min(MAX_BACKOFF).min(half_life)
    } else {
        backoff.min(MAX_BACKOFF_WITHOUT_TOKEN)
    }
}

/// `azure_identity`'s pipeline retries a failing token endpoint 8 times over up to a minute
/// by default; the refresher has its own backoff, so each fetch only rides out a blip.
fn client_options() -> ClientOptions {
    ClientOptions {
        retry: RetryOptions::exponential(ExponentialRetryOptions {
            initial_delay: time::Duration::milliseconds(200),
            max_retries: 2,
            max_total_elapsed: time::Duration::seconds(5),
            max_delay: time::Duration::seconds(1),
        }),
        ..Default::default()
    }
}

impl UpstreamToken {
    pub fn new(cfg: &UpstreamIdentity, metrics: Arc<Metrics>) -> Result<Arc<Self>, String> {
        let credential: Arc<dyn TokenCredential> = match cfg.source {
            IdentitySource::ManagedIdentity => {
                ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                    user_assigned_id: cfg.client_id.clone().map(UserAssignedId::ClientId),
                    client_options: client_options(),
                }))
                .map_err(|e| e.to_string())?
            }
            IdentitySource::WorkloadIdentity => {
                WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
                    client_id: cfg.client_id.clone(),
                    tenant_id: cfg.tenant_id.clone(),
                    credential_options: ClientAssertionCredentialOptions {
                        client_options: client_options(),
                    },
                    ..Default::default()
                }))
                .map_err(|e| e.to_string())?
            }
            IdentitySource::ClientSecret => ClientSecretCredential::new(
                cfg.tenant_id.as_deref().unwrap_or_default(),
                cfg.client_id.clone().unwrap_or_default(),
                Secret::new(cfg.client_secret.clone().unwrap_or_default()),
                Some(ClientSecretCredentialOptions {
                    client_options: client_options(),
                }),
            )
            .map_err(|e| e.to_string())?,
            IdentitySource::AzureCli => AzureCliCredential::new(None).map_err(|e| e.to_string())?,
        };
        Ok(Self::with_credential(
            credential,
            cfg.scope.clone(),
            metrics,
        ))
    }

    fn with_credential(
        credential: Arc<dyn TokenCredential>,
        scope: String,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(UpstreamToken {
            credential,
            scope,
            current: ArcSwapOption::empty(),
            first_fetch_done: tokio::sync::watch::Sender::new(false),
            created: Instant::now(),
            metrics,
        })
    }

    /// The cached token while it is valid (until its real expiry); never waits, never
    /// fetches.
    pub fn current(&self) -> Result<Arc<Token>, NoToken> {
        match self.current.load_full() {
            Some(t) if now_unix_ms() < t.expires_at.saturating_mul(1000) => Ok(t),
            Some(t) => Err(NoToken::Expired { at: t.expires_at }),
            None => Err(NoToken::NeverFetched),
        }
    }

    /// [`Self::current`], except right after start: while the process's first fetch is
    /// under way, waits for its end (at most until [`START_WAIT`] after start). Never waits
    /// on a refresh.
    pub async fn get(&self) -> Result<Arc<Token>, NoToken> {
        let now = self.current();
        if now.is_ok() || *self.first_fetch_done.borrow() {
            return now;
        }
        let Some(left) = START_WAIT.checked_sub(self.created.elapsed()) else {
            return now;
        };
        let mut done = self.first_fetch_done.subscribe();
        let _ = tokio::time::timeout(left, done.wait_for(|d| *d)).await;
        self.current()
    }

    /// One fetch, counted in `upstream_token_refreshes_total`; on success the new token is
    /// the cached one.
    async fn fetch(&self) -> Result<Arc<Token>, String> {
        let got = tokio::time::timeout(
            FETCH_TIMEOUT,
            self.credential.get_token(&[self.scope.as_str()], None),
        )
        .await;
        let result = match got {
            Ok(Ok(at)) => {
                let t = Arc::new(Token {
                    header: format!("Bearer {}", at.token.secret()),
                    expires_at: at.expires_on.unix_timestamp(),
                });
                self.current.store(Some(t.clone()));
                Ok(t)
            }
            // The error text of azure_identity names endpoints, never the token.
            Ok(Err(e)) => Err(format!("could not get the upstream token: {e}")),
            Err(_) => Err(format!(
                "could not get the upstream token: no answer within {FETCH_TIMEOUT:?}"
            )),
        };
        let label = if result.is_ok() { "success" } else { "failure" };
        self.metrics
            .token_refreshes
            .with_label_values(&[label])
            .inc();
        result
    }

    /// Fetches the first token at once, then keeps it fresh; runs forever.
    pub async fn refresh_loop(self: Arc<Self>) {
        let mut failures = 0u32;
        loop {
            let expires_at = self.current.load().as_ref().map(|t| t.expires_at);
            let now = now_unix_ms() / 1000;
            tokio::time::sleep(next_attempt_in(now, expires_at, failures)).await;
            let result = self.fetch().await;
            self.first_fetch_done.send_replace(true);
            match result {
                Ok(_) => failures = 0,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let now = now_unix_ms() / 1000;
                    let next = next_attempt_in(now, expires_at, failures);
                    match self.current() {
                        Ok(t) => log::warn!(
                            "{e}; the current token stays in use ({} s left); retrying in {next:?}",
                            t.expires_at - now
                        ),
                        Err(why) => log::error!(
                            "{e}; {why}; requests to managed_identity backends fail until a refresh succeeds; retrying in {next:?}"
                        ),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};

    #[test]
    fn refreshes_before_expiry() {
        assert_eq!(refresh_at(1_000, 1_000 + 3_600), 1_000 + 3_300);
        assert_eq!(refresh_at(1_000, 1_000 + 400), 1_200);
        assert_eq!(refresh_at(1_000, 900), 1_000);
    }

    #[test]
    fn retries_back_off_but_not_past_the_tokens_end() {
        let s = Duration::from_secs;
        // No token yet: fetch at once; after failures, 1, 2, 4, 8, then every 10 s.
        assert_eq!(next_attempt_in(0, None, 0), Duration::ZERO);
        let waits: Vec<_> = (1..=7).map(|f| next_attempt_in(0, None, f)).collect();
        assert_eq!(waits, [s(1), s(2), s(4), s(8), s(10), s(10), s(10)]);
        assert_eq!(next_attempt_in(0, None, u32::MAX), s(10));
        // An expired token is no token.
        assert_eq!(next_attempt_in(100, Some(50), 6), s(10));
        // A fresh one-hour token: refresh 5 minutes before it ends.
        assert_eq!(next_attempt_in(0, Some(3_600), 0), s(3_300));
        // A short-lived one: at half its life; one about to end: not before a second.
        assert_eq!(next_attempt_in(0, Some(8), 0), s(4));
        assert_eq!(next_attempt_in(10, Some(10), 0), s(1));
        // Failed refreshes of a valid token: backoff up to 30 s, but never more than half
        // the remaining life (at least a second), so it is tried again before it ends.
        assert_eq!(next_attempt_in(0, Some(3_000), 1), s(1));
        assert_eq!(next_attempt_in(0, Some(3_000), 4), s(8));
        assert_eq!(next_attempt_in(0, Some(3_000), 9), s(30));
        assert_eq!(next_attempt_in(0, Some(20), 9), s(10));
        assert_eq!(next_attempt_in(0, Some(3), 9), s(1));
        assert_eq!(next_attempt_in(0, Some(1), 9), s(1));
    }

    /// A token endpoint that answers after `delay`, fails while `fail` is set, and hands
    /// out tokens that live `ttl` seconds.
    #[derive(Debug)]
    struct FakeEndpoint {
        fail: AtomicBool,
        ttl: AtomicI64,
        delay: Duration,
        calls: AtomicU32,
    }

    #[async_trait::async_trait]
    impl TokenCredential for FakeEndpoint {
        async fn get_token(
            &self,
            _scopes: &[&str],
            _options: Option<azure_core::credentials::TokenRequestOptions<'_>>,
        ) -> azure_core::Result<azure_core::credentials::AccessToken> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            if self.fail.load(Ordering::SeqCst) {
                return Err(azure_core::Error::with_message(
                    azure_core::error::ErrorKind::Credential,
                    "token endpoint down (test)",
                ));
            }
            Ok(azure_core::credentials::AccessToken::new(
                Secret::new(format!("t{n}")),
                time::OffsetDateTime::now_utc()
                    + time::Duration::seconds(self.ttl.load(Ordering::SeqCst)),
            ))
        }
    }

    fn fake(ttl: i64, delay: Duration) -> (Arc<FakeEndpoint>, Arc<UpstreamToken>, Arc<Metrics>) {
        let ep = Arc::new(FakeEndpoint {
            fail: AtomicBool::new(false),
            ttl: AtomicI64::new(ttl),
            delay,
            calls: AtomicU32::new(0),
        });
        let metrics = Metrics::new();
        let t = UpstreamToken::with_credential(ep.clone(), "scope".into(), metrics.clone());
        (ep, t, metrics)
    }

    fn refreshes(m: &Metrics, result: &str) -> u64 {
        m.token_refreshes.with_label_values(&[result]).get()
    }

    #[tokio::test]
    async fn a_request_never_waits_on_a_failing_refresh() {
        // A token endpoint that takes 3 s to fail: a request must not notice it.
        let (ep, t, metrics) = fake(4, Duration::from_secs(3));
        let refresher = tokio::spawn(t.clone().refresh_loop());
        // Start-up: the first fetch (3 s) is waited for by `get`, not by `current`.
        assert_eq!(t.current().unwrap_err(), NoToken::NeverFetched);
        let first = t.get().await.expect("the first token");
        assert_eq!(first.header, "Bearer t0");
        assert_eq!(refreshes(&metrics, "success"), 1);

        ep.fail.store(true, Ordering::SeqCst);
        // The refresh at half-life starts (at ~2 s of the 4) and hangs for 3 s, past the
        // token's end; until that end the token is served at once, after it NoToken at once.
        let started = Instant::now();
        let mut served = 0;
        let expired = loop {
            let asked = Instant::now();
            let got = t.get().await;
            assert!(
                asked.elapsed() < Duration::from_millis(500),
                "a request waited"
            );
            match got {
                Ok(tok) => {
                    assert_eq!(tok.header, "Bearer t0");
                    served += 1;
                }
                Err(e) => break e,
            }
            assert!(
                started.elapsed() < Duration::from_secs(8),
                "the token never expired"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            served > 20,
            "the cached token was used while refreshes failed"
        );
        assert_eq!(
            expired,
            NoToken::Expired {
                at: first.expires_at
            }
        );
        assert!(ep.calls.load(Ordering::SeqCst) >= 2, "a refresh was tried");
        assert!(expired.to_string().contains("expired"), "{expired}");
        // The refresh under way fails (counted); the expired token is not used again.
        tokio::time::timeout(Duration::from_secs(10), async {
            while refreshes(&metrics, "failure") == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the failed refresh is counted");
        assert_eq!(t.current().unwrap_err(), expired);

        // The endpoint recovers: the refresher's next try brings a token, no restart.
        ep.fail.store(false, Ordering::SeqCst);
        let recovered = Instant::now();
        let fresh = loop {
            if let Ok(tok) = t.current() {
                break tok;
            }
            assert!(recovered.elapsed() < Duration::from_secs(20), "no recovery");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_ne!(fresh.header, "Bearer t0");
        assert_eq!(refreshes(&metrics, "success"), 2);
        refresher.abort();
    }

    #[tokio::test]
    async fn without_any_token_requests_are_answered_at_once_after_the_first_fetch() {
        let (ep, t, metrics) = fake(3600, Duration::from_millis(200));
        ep.fail.store(true, Ordering::SeqCst);
        let refresher = tokio::spawn(t.clone().refresh_loop());
        // The first fetch fails: the request that waited for it gets NoToken ...
        assert_eq!(t.get().await.unwrap_err(), NoToken::NeverFetched);
        assert_eq!(refreshes(&metrics, "failure"), 1);
        // ... and later ones do not wait at all.
        let asked = Instant::now();
        assert_eq!(t.get().await.unwrap_err(), NoToken::NeverFetched);
        assert!(asked.elapsed() < Duration::from_millis(500));
        assert!(NoToken::NeverFetched
            .to_string()
            .contains("managed-identity"));
        // Retried with backoff (1 s, then 2 s): recovers by itself.
        ep.fail.store(false, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(10), async {
            while t.current().is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("a token after the endpoint recovered");
        assert_eq!(refreshes(&metrics, "success"), 1);
        refresher.abort();
    }

    #[tokio::test]
    async fn the_start_up_wait_is_bounded() {
        // Nobody fetches (no refresher): a request waits at most until START_WAIT after
        // start, and not at all afterwards.
        let (_ep, t, _) = fake(3600, Duration::ZERO);
        tokio::time::pause();
        let asked = tokio::time::Instant::now();
        assert_eq!(t.get().await.unwrap_err(), NoToken::NeverFetched);
        assert!(asked.elapsed() < START_WAIT + Duration::from_millis(50));
    }
}
