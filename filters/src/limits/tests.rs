//! Limiter tests. Every window test runs with an injected clock (no sleeping) and, where it
//! makes sense, against both stores: the memory store and a real `redis-server` started by
//! the test on a free loopback port (the Lua scripts must decide exactly like the Rust code).

use super::window::{day_index, DAY_US};
use super::*;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// 2025-06-15T15:06:40Z.
const T0: i64 = 1_750_000_000_000_000;
const S: i64 = 1_000_000;

fn at(us: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(us as u64)
}

fn spec(rpm: Option<u64>, tpm: Option<u64>, tpd: Option<u64>) -> LimitSpec {
    LimitSpec {
        requests_per_minute: rpm,
        tokens_per_minute: tpm,
        tokens_per_day: tpd,
    }
}

fn client(rpm: Option<u64>, tpm: Option<u64>, tpd: Option<u64>) -> ClientLimits {
    ClientLimits {
        client: spec(rpm, tpm, tpd),
        per_deployment: HashMap::new(),
        per_user: None,
    }
}

fn memory() -> Limiter {
    Limiter::new(StoreKind::Memory, OnStoreFailure::Reject, Arc::new(|| {})).unwrap()
}

fn rate(retry_after_ms: u64, tokens: bool) -> FilterError {
    FilterError::RateLimitExceeded {
        retry_after_ms,
        tokens,
    }
}

fn quota(retry_after_ms: u64) -> FilterError {
    FilterError::QuotaExceeded { retry_after_ms }
}

async fn ok(l: &Limiter, s: &str, d: &str, lim: &ClientLimits, n: u64, now: i64) -> Admission {
    match l.admit(s, d, lim, n, at(now)).await {
        Ok(a) => a,
        Err(e) => panic!("{s}/{d}: {n} tokens at T0{:+}µs refused: {e:?}", now - T0),
    }
}

async fn refused(
    l: &Limiter,
    s: &str,
    d: &str,
    lim: &ClientLimits,
    n: u64,
    now: i64,
) -> FilterError {
    match l.admit(s, d, lim, n, at(now)).await {
        Ok(_) => panic!("{s}/{d}: {n} tokens at T0{:+}µs admitted", now - T0),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios run against both stores.

async fn rpm_rejects_at_the_right_request_and_recovers(l: &Limiter, s: &str) {
    let lim = client(Some(10), None, None);
    for i in 0..10 {
        let a = ok(l, s, "d", &lim, 0, T0).await;
        assert_eq!(a.headers.remaining_requests, Some(9 - i));
        assert_eq!(a.headers.limit_requests, Some(10));
    }
    // The 11th: one request drains every 6 s.
    assert_eq!(refused(l, s, "d", &lim, 0, T0).await, rate(6000, false));
    assert_eq!(
        refused(l, s, "d", &lim, 0, T0 + 6 * S - 1).await,
        rate(1, false)
    );
    ok(l, s, "d", &lim, 0, T0 + 6 * S).await;
    assert_eq!(
        refused(l, s, "d", &lim, 0, T0 + 6 * S).await,
        rate(6000, false)
    );
    // A whole window after the last admission the full budget is back.
    for _ in 0..10 {
        ok(l, s, "d", &lim, 0, T0 + 66 * S).await;
    }
    assert_eq!(
        refused(l, s, "d", &lim, 0, T0 + 66 * S).await,
        rate(6000, false)
    );
}

async fn tpm_retry_after_is_exact(l: &Limiter, s: &str) {
    let lim = client(None, Some(1000), None);
    let a = ok(l, s, "d", &lim, 600, T0).await;
    assert_eq!(a.headers.remaining_tokens, Some(400));
    assert_eq!(a.headers.limit_tokens, Some(1000));
    assert_eq!(a.headers.limit_requests, None);
    // 600 more need 200 tokens to drain at 1000/min: 12 s.
    assert_eq!(refused(l, s, "d", &lim, 600, T0).await, rate(12_000, true));
    assert_eq!(
        refused(l, s, "d", &lim, 600, T0 + 12 * S - 1).await,
        rate(1, true)
    );
    let a = ok(l, s, "d", &lim, 600, T0 + 12 * S).await;
    assert_eq!(a.headers.remaining_tokens, Some(0));
}

async fn tpd_quota_until_midnight(l: &Limiter, s: &str) {
    let midnight = (day_index(T0) + 1) * DAY_US;
    let lim = client(None, None, Some(1000));
    let now = midnight - 3600 * S; // 23:00 UTC
    ok(l, s, "d", &lim, 400, now).await;
    let a = ok(l, s, "d", &lim, 400, now).await;
    assert_eq!(a.headers.remaining_tokens, Some(200));
    assert_eq!(refused(l, s, "d", &lim, 400, now).await, quota(3_600_000));
    ok(l, s, "d", &lim, 200, now).await;
    assert_eq!(
        refused(l, s, "d", &lim, 1, now + 1000).await,
        quota(3_599_999)
    );
    // A new UTC day starts from 0.
    assert_eq!(refused(l, s, "d", &lim, 1, midnight - 1).await, quota(1));
    let a = ok(l, s, "d", &lim, 1000, midnight).await;
    assert_eq!(a.headers.remaining_tokens, Some(0));
}

async fn oversized_never_fits(l: &Limiter, s: &str) {
    let lim = client(Some(5), Some(1000), None);
    assert_eq!(refused(l, s, "d", &lim, 1001, T0).await, rate(60_000, true));
    let day = client(None, None, Some(1000));
    let midnight = (day_index(T0) + 1) * DAY_US;
    assert_eq!(
        refused(l, s, "d", &day, 1001, T0).await,
        quota(((midnight - T0) / 1000) as u64)
    );
    // Nothing was consumed: the whole budget is there.
    let a = ok(l, s, "d", &lim, 1000, T0).await;
    assert_eq!(a.headers.remaining_requests, Some(4));
    assert_eq!(a.headers.remaining_tokens, Some(0));
    ok(l, s, "d", &day, 1000, T0).await;
}

async fn reconcile_below_restores_budget(l: &Limiter, s: &str) {
    let lim = client(None, Some(1000), Some(10_000));
    let a = ok(l, s, "d", &lim, 800, T0).await;
    assert_eq!(a.reserved_tokens(), 800);
    l.reconcile_at(&a, Some(100), at(T0)).await;
    // Used 100: 900 fit again, and not one more.
    let b = ok(l, s, "d", &lim, 900, T0).await;
    assert_eq!(b.headers.remaining_tokens, Some(0));
    assert_eq!(refused(l, s, "d", &lim, 1, T0).await, rate(60, true));
    // Reconciling twice does nothing.
    l.reconcile_at(&a, Some(0), at(T0)).await;
    assert_eq!(refused(l, s, "d", &lim, 1, T0).await, rate(60, true));
    // The day count was corrected too: 800 reserved → 100, plus 900 = 1000 of 10 000.
    l.reconcile_at(&b, Some(900), at(T0)).await;
    let c = ok(l, s, "e", &client(None, None, Some(10_000)), 9000, T0).await;
    assert_eq!(c.headers.remaining_tokens, Some(0));
}

async fn reconcile_above_charges_more(l: &Limiter, s: &str) {
    let lim = client(None, Some(1000), None);
    let a = ok(l, s, "d", &lim, 100, T0).await;
    l.reconcile_at(&a, Some(900), at(T0)).await;
    // 900 used + 200 = 1100: 100 tokens must drain first (6 s).
    assert_eq!(refused(l, s, "d", &lim, 200, T0).await, rate(6000, true));
    ok(l, s, "d", &lim, 200, T0 + 6 * S).await;

    let day = client(None, None, Some(1000));
    let a = ok(l, s, "x", &day, 100, T0).await;
    l.reconcile_at(&a, Some(950), at(T0)).await;
    ok(l, s, "x", &day, 50, T0).await;
    assert!(matches!(
        refused(l, s, "x", &day, 1, T0).await,
        FilterError::QuotaExceeded { .. }
    ));
}

/// A realtime session: admitted once with nothing reserved, then charged each response's
/// usage as it arrives; a zero-token admission fits until the client is in debt.
async fn charges_accumulate_and_put_the_client_in_debt(l: &Limiter, s: &str) {
    let lim = client(None, Some(1000), Some(5000));
    let session = ok(l, s, "d", &lim, 0, T0).await;
    l.charge_at(&session, 600, at(T0)).await;
    ok(l, s, "d", &lim, 0, T0).await;
    assert_eq!(refused(l, s, "d", &lim, 401, T0).await, rate(60, true));
    l.charge_at(&session, 600, at(T0)).await;
    // 1200 of 1000 per minute: even nothing more fits until 200 tokens drained (12 s).
    assert_eq!(refused(l, s, "d", &lim, 0, T0).await, rate(12_000, true));
    ok(l, s, "d", &lim, 0, T0 + 12 * S).await;
    // The day window counts every charge (1200 + 3800 = 5000).
    l.charge_at(&session, 3800, at(T0 + 12 * S)).await;
    assert!(matches!(
        refused(l, s, "d", &lim, 1, T0 + 120 * S).await,
        FilterError::QuotaExceeded { .. }
    ));
    // No limit, no ticket: charging does nothing.
    let free = ok(l, s, "d", &client(None, None, None), 0, T0).await;
    l.charge_at(&free, 10, at(T0)).await;
}

async fn reconcile_none_keeps_the_reservation(l: &Limiter, s: &str) {
    let lim = client(None, Some(1000), None);
    let a = ok(l, s, "d", &lim, 800, T0).await;
    l.reconcile_at(&a, None, at(T0)).await;
    assert_eq!(refused(l, s, "d", &lim, 300, T0).await, rate(6000, true));
}

async fn reconcile_after_rollover_does_not_go_negative(l: &Limiter, s: &str) {
    let (m, p, q) = (format!("{s}/m"), format!("{s}/p"), format!("{s}/q"));
    // Per minute: a refund after the window drained gives no credit.
    let lim = client(None, Some(1000), None);
    let a = ok(l, &m, "d", &lim, 1000, T0).await;
    l.reconcile_at(&a, Some(0), at(T0 + 120 * S)).await;
    ok(l, &m, "d", &lim, 1000, T0 + 120 * S).await;
    assert_eq!(
        refused(l, &m, "d", &lim, 1, T0 + 120 * S).await,
        rate(60, true)
    );

    // Only the part still in the window comes back: 45 s after a full-window reservation,
    // 15 s (250 tokens) of it remain; refunding all of it empties the window, no more.
    let a = ok(l, &p, "d", &lim, 1000, T0).await;
    l.reconcile_at(&a, Some(0), at(T0 + 45 * S)).await;
    ok(l, &p, "d", &lim, 1000, T0 + 45 * S).await;
    assert_eq!(
        refused(l, &p, "d", &lim, 1, T0 + 45 * S).await,
        rate(60, true)
    );

    // Per day: a refund after midnight does not touch the new day's count.
    let midnight = (day_index(T0) + 1) * DAY_US;
    let day = client(None, None, Some(1000));
    let a = ok(l, &q, "d", &day, 1000, midnight - 60 * S).await;
    ok(l, &q, "d", &day, 600, midnight + S).await;
    l.reconcile_at(&a, Some(0), at(midnight + 2 * S)).await;
    ok(l, &q, "d", &day, 400, midnight + 3 * S).await;
    assert!(matches!(
        refused(l, &q, "d", &day, 1, midnight + 3 * S).await,
        FilterError::QuotaExceeded { .. }
    ));
}

async fn per_deployment_limits_apply_on_top(l: &Limiter, s: &str) {
    let mut lim = client(None, Some(1000), None);
    lim.per_deployment
        .insert("gpt-4o".into(), spec(None, Some(300), None));
    let a = ok(l, s, "gpt-4o", &lim, 300, T0).await;
    assert_eq!(a.headers.limit_tokens, Some(300));
    assert_eq!(a.headers.remaining_tokens, Some(0));
    // 1 token drains in 60/300 s = 200 ms.
    assert_eq!(refused(l, s, "gpt-4o", &lim, 1, T0).await, rate(200, true));
    // The client-wide window counted the 300 too.
    let b = ok(l, s, "other", &lim, 700, T0).await;
    assert_eq!(b.headers.limit_tokens, Some(1000));
    assert_eq!(b.headers.remaining_tokens, Some(0));
    assert_eq!(refused(l, s, "other", &lim, 1, T0).await, rate(60, true));
}

async fn refused_request_consumes_nothing(l: &Limiter, s: &str) {
    let mut lim = client(Some(100), Some(10_000), Some(100_000));
    lim.per_deployment
        .insert("gpt-4o".into(), spec(Some(1), None, None));
    ok(l, s, "gpt-4o", &lim, 1000, T0).await;
    for _ in 0..5 {
        assert_eq!(
            refused(l, s, "gpt-4o", &lim, 1000, T0).await,
            rate(60_000, false)
        );
    }
    // Only the admitted requests are in the client-wide windows.
    let a = ok(l, s, "other", &lim, 1000, T0).await;
    assert_eq!(a.headers.remaining_requests, Some(98));
    assert_eq!(a.headers.remaining_tokens, Some(8000));
}

async fn headers_show_the_tightest_limit(l: &Limiter, s: &str) {
    let mut lim = client(Some(10), Some(1000), Some(100_000));
    lim.per_deployment
        .insert("gpt-4o".into(), spec(Some(5), Some(500), None));
    let a = ok(l, s, "gpt-4o", &lim, 100, T0).await;
    assert_eq!(
        a.headers,
        RateLimitHeaders {
            limit_requests: Some(5),
            remaining_requests: Some(4),
            limit_tokens: Some(500),
            remaining_tokens: Some(400),
        }
    );
    // Elsewhere the day quota is the tightest token limit once it runs low.
    let day = client(None, Some(1_000_000), Some(1000));
    // (the client's day count already holds the 100 above)
    let a = ok(l, s, "x", &day, 800, T0).await;
    assert_eq!(a.headers.limit_tokens, Some(1000));
    assert_eq!(a.headers.remaining_tokens, Some(100));
}

async fn a_token_limit_sets_the_tokens_flag(l: &Limiter, s: &str) {
    let lim = client(Some(1), Some(100), None);
    ok(l, s, "d", &lim, 100, T0).await;
    assert_eq!(refused(l, s, "d", &lim, 100, T0).await, rate(60_000, true));
    assert_eq!(refused(l, s, "d", &lim, 0, T0).await, rate(60_000, false));
}

/// Random traffic: whenever a request is refused, waiting exactly `retry_after_ms` lets the
/// same request in, and waiting 1 ms less does not.
async fn retry_after_is_the_true_wait(l: &Limiter, s: &str, rounds: usize) {
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut lim = client(Some(7), Some(1234), None);
    lim.per_deployment
        .insert("a".into(), spec(Some(3), Some(777), None));
    let mut now = T0;
    let mut refusals = 0;
    for _ in 0..rounds {
        now += next(3 * S as u64) as i64;
        let dep = if next(2) == 0 { "a" } else { "b" };
        let tokens = next(700); // below every token limit: never oversized
        match l.admit(s, dep, &lim, tokens, at(now)).await {
            Ok(a) => {
                if next(2) == 0 {
                    l.reconcile_at(&a, Some(next(1500)), at(now)).await;
                }
            }
            Err(FilterError::RateLimitExceeded { retry_after_ms, .. }) => {
                refusals += 1;
                let wait = retry_after_ms as i64 * 1000;
                let early = l.admit(s, dep, &lim, tokens, at(now + wait - 1000)).await;
                assert!(
                    early.is_err(),
                    "admitted 1 ms before retry-after {retry_after_ms}"
                );
                now += wait;
                l.admit(s, dep, &lim, tokens, at(now))
                    .await
                    .unwrap_or_else(|e| panic!("still refused after {retry_after_ms} ms: {e:?}"));
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(
        refusals >= rounds / 10,
        "only {refusals} refusals in {rounds} requests"
    );
}

/// A background response: its reservation is charged at creation (its admission is
/// reconciled with no usage), and its usage, seen later, replaces it once (`settle`) — in the
/// day window and the per-minute one.
async fn settle_replaces_an_earlier_reservation(l: &Limiter, s: &str) {
    let lim = client(None, Some(10_000), Some(1_000));
    let created = T0;
    let a = ok(l, s, "d", &lim, 300, created).await;
    l.reconcile_at(&a, None, at(created + S)).await;
    let probe = ok(l, s, "d", &lim, 0, created + 2 * S).await;
    assert_eq!(probe.headers.remaining_tokens, Some(700));
    l.settle(
        s,
        None,
        "d",
        &lim,
        300,
        100,
        at(created),
        at(created + 3 * S),
    )
    .await;
    let probe = ok(l, s, "d", &lim, 0, created + 3 * S).await;
    assert_eq!(probe.headers.remaining_tokens, Some(900), "refund of 200");
    l.settle(
        s,
        None,
        "d",
        &lim,
        100,
        400,
        at(created),
        at(created + 3 * S),
    )
    .await;
    let probe = ok(l, s, "d", &lim, 0, created + 3 * S).await;
    assert_eq!(
        probe.headers.remaining_tokens,
        Some(600),
        "surcharge of 300"
    );
    // Created yesterday: today's day count is not corrected.
    let (a2, _) = (ok(l, s, "d", &lim, 0, T0 + DAY_US).await, ());
    let before = a2.headers.remaining_tokens;
    l.settle(s, None, "d", &lim, 300, 0, at(created), at(T0 + DAY_US))
        .await;
    let after = ok(l, s, "d", &lim, 0, T0 + DAY_US).await;
    assert_eq!(after.headers.remaining_tokens, before);
}

async fn per_user_limits_hold_each_user_on_top_of_the_client(l: &Limiter, s: &str) {
    // The client: 5 requests per minute; each user 2, and 100 tokens a minute on `d`.
    let mut lim = client(Some(5), None, None);
    let mut user = client(Some(2), None, None);
    user.per_deployment
        .insert("d".into(), spec(None, Some(100), None));
    lim.per_user = Some(Box::new(user));
    let adm = |u: Option<&'static str>, d: &'static str, n: u64, now: i64| {
        let lim = lim.clone();
        async move { l.admit_user(s, u, d, &lim, n, at(now)).await }
    };
    for _ in 0..2 {
        adm(Some("alice"), "e", 0, T0).await.unwrap();
    }
    // Her own limit: 2 a minute, 30 s apart.
    assert_eq!(
        adm(Some("alice"), "e", 0, T0).await.unwrap_err(),
        rate(30_000, false)
    );
    // Bob is another user: his own bucket.
    let a = adm(Some("bob"), "e", 0, T0).await.unwrap();
    assert_eq!(a.headers.remaining_requests, Some(1), "his, the tightest");
    adm(Some("bob"), "e", 0, T0).await.unwrap();
    // Requests without a user value share one bucket.
    adm(None, "e", 0, T0).await.unwrap();
    // The client's own limit holds across all of them (5 so far: alice 2, bob 2, one
    // without a user): a sixth request is refused for a fresh user too.
    assert_eq!(
        adm(Some("carol"), "e", 0, T0).await.unwrap_err(),
        rate(12_000, false)
    );
    // Carol's refused request consumed nothing of hers: a minute later she has both.
    for _ in 0..2 {
        adm(Some("carol"), "e", 0, T0 + 60 * S).await.unwrap();
    }

    // Per user and deployment, with no client-wide limit at all: tokens reserved and
    // reconciled in the user's own window.
    let s2 = format!("{s}-tokens");
    let mut lim = ClientLimits::default();
    let mut user = ClientLimits::default();
    user.per_deployment
        .insert("d".into(), spec(None, Some(100), None));
    lim.per_user = Some(Box::new(user));
    let a = l
        .admit_user(&s2, Some("dave"), "d", &lim, 80, at(T0))
        .await
        .unwrap();
    assert_eq!(a.headers.remaining_tokens, Some(20));
    let e = l
        .admit_user(&s2, Some("dave"), "d", &lim, 30, at(T0))
        .await
        .unwrap_err();
    assert!(
        matches!(e, FilterError::RateLimitExceeded { tokens: true, .. }),
        "{e:?}"
    );
    // Another deployment, or another user: not limited by dave's window.
    l.admit_user(&s2, Some("dave"), "e", &lim, 500, at(T0))
        .await
        .unwrap();
    l.admit_user(&s2, Some("erin"), "d", &lim, 100, at(T0))
        .await
        .unwrap();
    // Dave's 80 were 10 in the end: 90 fit again.
    l.reconcile_at(&a, Some(10), at(T0)).await;
    l.admit_user(&s2, Some("dave"), "d", &lim, 90, at(T0))
        .await
        .unwrap();
}

async fn all_scenarios(l: &Limiter, prefix: &str) {
    let s = |n: &str| format!("{prefix}{n}");
    rpm_rejects_at_the_right_request_and_recovers(l, &s("rpm")).await;
    tpm_retry_after_is_exact(l, &s("tpm")).await;
    tpd_quota_until_midnight(l, &s("tpd")).await;
    oversized_never_fits(l, &s("oversized")).await;
    reconcile_below_restores_budget(l, &s("below")).await;
    reconcile_above_charges_more(l, &s("above")).await;
    reconcile_none_keeps_the_reservation(l, &s("none")).await;
    charges_accumulate_and_put_the_client_in_debt(l, &s("charge")).await;
    reconcile_after_rollover_does_not_go_negative(l, &s("rollover")).await;
    per_deployment_limits_apply_on_top(l, &s("perdep")).await;
    refused_request_consumes_nothing(l, &s("nothing")).await;
    headers_show_the_tightest_limit(l, &s("headers")).await;
    a_token_limit_sets_the_tokens_flag(l, &s("flag")).await;
    settle_replaces_an_earlier_reservation(l, &s("settle")).await;
    per_user_limits_hold_each_user_on_top_of_the_client(l, &s("peruser")).await;
}

// ---------------------------------------------------------------------------------------------
// Memory store.

#[tokio::test]
async fn memory_store_scenarios() {
    all_scenarios(&memory(), "unlisted:contoso:").await;
}

#[tokio::test]
async fn memory_retry_after_is_the_true_wait() {
    retry_after_is_the_true_wait(&memory(), "random", 3000).await;
}

#[tokio::test]
async fn no_limits_is_free() {
    let l = memory();
    let mut lim = ClientLimits::default();
    let a = ok(&l, "c", "d", &lim, 1000, T0).await;
    assert_eq!(a.decided_by(), Decider::Unlimited);
    assert_eq!(a.headers, RateLimitHeaders::default());
    assert_eq!(a.reserved_tokens(), 0);
    l.reconcile_at(&a, Some(5), at(T0)).await;
    // A per-deployment limit of another deployment does not apply either.
    lim.per_deployment
        .insert("other".into(), spec(Some(1), None, None));
    ok(&l, "c", "d", &lim, 1000, T0).await;
    assert_eq!(l.local.len(), 0, "nothing stored for unlimited requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_admit_exactly_ten_memory() {
    let l = Arc::new(memory());
    let lim = Arc::new(client(Some(10), None, None));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (l, lim) = (l.clone(), lim.clone());
            tokio::spawn(async move { l.admit("c", "d", &lim, 0, at(T0)).await.is_ok() })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    assert_eq!(admitted, 10);
}

#[tokio::test]
async fn idle_subjects_are_evicted() {
    let l = memory();
    let mut lim = client(Some(10), Some(1000), None);
    lim.per_deployment
        .insert("d".into(), spec(None, Some(1000), None));
    for i in 0..100 {
        // 900 of 1000 tokens per minute: 54 s to drain.
        ok(&l, &format!("c{i}"), "d", &lim, 900, T0).await;
    }
    let quota_only = client(None, None, Some(1000));
    ok(&l, "daily", "d", &quota_only, 10, T0).await;
    assert_eq!(l.local.len(), 101);
    l.local.sweep_all(T0 + 30 * S);
    assert_eq!(l.local.len(), 101, "still in the window");
    l.local.sweep_all(T0 + 61 * S);
    assert_eq!(
        l.local.len(),
        1,
        "drained windows are gone, today's count stays"
    );
    l.local.sweep_all((day_index(T0) + 1) * DAY_US);
    assert_eq!(l.local.len(), 0);
    // Requests sweep by themselves once per minute of request time.
    ok(&l, "x", "d", &lim, 10, T0 + 200 * S).await;
    ok(&l, "y", "d", &lim, 10, T0 + 400 * S).await;
    assert!(l.local.len() <= 2);
}

// ---------------------------------------------------------------------------------------------
// Redis store, against a real redis-server.

/// A `redis-server` on a loopback port, killed on drop. Never skips: a missing server fails
/// the test (`make test` installs it).
pub(crate) struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    pub(crate) fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut server = RedisServer { port, child: None };
        server.restart();
        server
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn restart(&mut self) {
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): the Redis limit-store tests need it on PATH \
                     (Debian: apt-get install redis-server; `make test` installs it)"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if ping(self.port) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGSTOP / SIGCONT the server: connections stay open but nothing answers.
    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {sig} {pid}");
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 16];
    s.write_all(b"PING\r\n").is_ok()
        && s.read(&mut buf)
            .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
}

fn counter() -> (Arc<AtomicU64>, Arc<dyn Fn() + Send + Sync>) {
    let n = Arc::new(AtomicU64::new(0));
    let m = n.clone();
    (
        n,
        Arc::new(move || {
            m.fetch_add(1, Ordering::Relaxed);
        }),
    )
}

fn redis_limiter(
    server: &RedisServer,
    on_failure: OnStoreFailure,
    on_error: Arc<dyn Fn() + Send + Sync>,
    timeout: Duration,
) -> Limiter {
    Limiter::with_options(
        StoreKind::Redis { url: server.url() },
        on_failure,
        on_error,
        LimiterOptions {
            command_timeout: timeout,
            retry_interval: Duration::from_millis(200),
            key_prefix: "test:".into(),
            flush_delay: redis_store::FLUSH_DELAY,
        },
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_scenarios() {
    let server = RedisServer::start();
    let (errors, on_error) = counter();
    // Generous timeout: the machine may be busy compiling; a timeout would fail the test.
    let l = redis_limiter(
        &server,
        OnStoreFailure::Reject,
        on_error,
        Duration::from_secs(5),
    );
    all_scenarios(&l, "unlisted:contoso:").await;
    retry_after_is_the_true_wait(&l, "random", 300).await;
    let a = ok(&l, "decider", "d", &client(Some(1), None, None), 0, T0).await;
    assert_eq!(a.decided_by(), Decider::Redis);
    assert_eq!(errors.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_one_limit_exactly() {
    let server = RedisServer::start();
    let (errors, on_error) = counter();
    let t = Duration::from_secs(5);
    let a = Arc::new(redis_limiter(
        &server,
        OnStoreFailure::Reject,
        on_error.clone(),
        t,
    ));
    let b = Arc::new(redis_limiter(&server, OnStoreFailure::Reject, on_error, t));

    // Alternating between the two gateways: 10 per minute in total, not per gateway.
    let lim = client(Some(10), Some(10_000), None);
    for i in 0..10 {
        let l = if i % 2 == 0 { &a } else { &b };
        let adm = ok(l, "shared", "d", &lim, 100, T0).await;
        assert_eq!(adm.headers.remaining_requests, Some(9 - i));
    }
    assert_eq!(
        refused(&a, "shared", "d", &lim, 100, T0).await,
        rate(6000, false)
    );
    assert_eq!(
        refused(&b, "shared", "d", &lim, 100, T0).await,
        rate(6000, false)
    );
    // A reconciliation through one gateway frees budget seen by the other.
    let lim = client(None, Some(1000), None);
    let adm = ok(&a, "tok", "d", &lim, 1000, T0).await;
    assert_eq!(
        refused(&b, "tok", "d", &lim, 500, T0).await,
        rate(30_000, true)
    );
    a.reconcile_at(&adm, Some(500), at(T0)).await;
    // Queued in `a` for its next admission or the flush at most FLUSH_DELAY later.
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.admit("tok", "d", &lim, 500, at(T0)).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the correction never reached Redis"
        );
        tokio::time::sleep(redis_store::FLUSH_DELAY).await;
    }

    // 50 concurrent admissions across both gateways: exactly 10.
    let lim = Arc::new(client(Some(10), None, None));
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let l = if i % 2 == 0 { a.clone() } else { b.clone() };
            let lim = lim.clone();
            tokio::spawn(async move { l.admit("burst", "d", &lim, 0, at(T0)).await })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(adm) => {
                assert_eq!(adm.decided_by(), Decider::Redis);
                admitted += 1;
            }
            Err(e) => assert!(matches!(e, FilterError::RateLimitExceeded { .. }), "{e:?}"),
        }
    }
    assert_eq!(admitted, 10);
    assert_eq!(errors.load(Ordering::Relaxed), 0);
}

/// Scripts Redis ran so far (`EVALSHA` and `EVAL` calls, from `INFO commandstats`).
async fn script_calls(server: &RedisServer) -> u64 {
    let client = redis::Client::open(server.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            let calls = l.split_once("calls=")?.1;
            calls.split(',').next()?.parse::<u64>().ok()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliations_ride_on_the_next_admission_or_one_flush() {
    let server = RedisServer::start();
    let (errors, on_error) = counter();
    // A flush that never fires on its own: what reaches Redis is what admissions carry.
    let l = Limiter::with_options(
        StoreKind::Redis { url: server.url() },
        OnStoreFailure::Reject,
        on_error.clone(),
        LimiterOptions {
            command_timeout: Duration::from_secs(5),
            retry_interval: Duration::from_millis(200),
            key_prefix: "test:".into(),
            flush_delay: Duration::from_secs(3600),
        },
    )
    .unwrap();
    let other = redis_limiter(
        &server,
        OnStoreFailure::Reject,
        on_error,
        Duration::from_secs(5),
    );
    let lim = client(Some(100), Some(1000), Some(100_000));
    ok(&l, "warm", "d", &lim, 0, T0).await; // loads the script
    let calls = script_calls(&server).await;

    let a = ok(&l, "c", "d", &lim, 1000, T0).await;
    l.reconcile_at(&a, Some(100), at(T0)).await; // queued: no call
    assert_eq!(script_calls(&server).await - calls, 1);
    // Not in Redis yet: the other gateway still sees the full reservation.
    assert_eq!(
        refused(&other, "c", "d", &lim, 800, T0).await,
        rate(48_000, true)
    );
    // The next admission here (of any client) carries it: 800 fits only after the refund.
    let b = ok(&l, "someone-else", "d", &lim, 0, T0).await;
    let c = ok(&other, "c", "d", &lim, 800, T0).await;
    assert_eq!(
        script_calls(&server).await - calls,
        4,
        "admit, refused, carry, admit"
    );

    // Without admissions, the flush sends every queued request's corrections in one call.
    l.reconcile_at(&b, Some(0), at(T0)).await;
    other.reconcile_at(&c, Some(50), at(T0)).await; // `other` flushes on its own, after 10 ms
    let d = ok(&l, "c", "d", &lim, 0, T0).await; // carries nothing (b had no correction)
    l.reconcile_at(&d, Some(30), at(T0)).await;
    let e = ok(&l, "e", "d", &lim, 10, T0).await; // carries d's surcharge of 30
    l.reconcile_at(&e, Some(10), at(T0)).await; // no correction: nothing queued
    l.redis.as_ref().unwrap().flush_now().await; // nothing left: no call
    let deadline = Instant::now() + Duration::from_secs(5);
    // c: 800 reconciled to 50; a: 100; d: 30 → 820 free of 1000 once other's flush landed.
    while other.admit("c", "d", &lim, 820, at(T0)).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the other gateway's flush never came"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(errors.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_failure_then_recovery() {
    let mut server = RedisServer::start();
    let (local_errors, on_local_error) = counter();
    let (reject_errors, on_reject_error) = counter();
    let t = Duration::from_millis(250);
    let local = redis_limiter(&server, OnStoreFailure::Local, on_local_error, t);
    let reject = redis_limiter(&server, OnStoreFailure::Reject, on_reject_error, t);
    let lim = client(Some(1000), None, None);
    let now = micros(SystemTime::now());

    let a = ok(&local, "c", "d", &lim, 0, now).await;
    assert_eq!(a.decided_by(), Decider::Redis);
    ok(&reject, "c", "d", &lim, 0, now).await;

    server.stop();
    let started = Instant::now();
    for _ in 0..20 {
        let a = ok(&local, "c", "d", &lim, 0, now).await;
        assert_eq!(a.decided_by(), Decider::LocalFallback);
        // Reconciling a local decision stays local.
        local.reconcile_at(&a, Some(1), at(now)).await;
        assert_eq!(
            refused(&reject, "c", "d", &lim, 0, now).await,
            FilterError::LimitStoreUnavailable
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a dead Redis stalled requests"
    );
    assert_eq!(local_errors.load(Ordering::Relaxed), 20);
    assert_eq!(reject_errors.load(Ordering::Relaxed), 20);
    // The local fallback still enforces the limits, on this process's own counts.
    let small = client(Some(2), None, None);
    ok(&local, "f", "d", &small, 0, now).await;
    ok(&local, "f", "d", &small, 0, now).await;
    assert_eq!(
        refused(&local, "f", "d", &small, 0, now).await,
        rate(30_000, false)
    );

    // Redis comes back on the same port: both recover by themselves.
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut local_back, mut reject_back) = (false, false);
    while !(local_back && reject_back) {
        assert!(
            Instant::now() < deadline,
            "did not recover after Redis returned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        if !local_back {
            local_back = ok(&local, "c", "d", &lim, 0, now).await.decided_by() == Decider::Redis;
        }
        if !reject_back {
            reject_back = reject.admit("c", "d", &lim, 0, at(now)).await.is_ok();
        }
    }
    // And they share counters again (the restarted server started empty).
    let one = client(Some(1), None, None);
    ok(&reject, "after", "d", &one, 0, now).await;
    assert_eq!(
        refused(&local, "after", "d", &one, 0, now).await,
        rate(60_000, false)
    );
}

#[test]
fn limiter_needs_no_runtime_to_be_built() {
    let l = Limiter::new(
        StoreKind::Redis {
            url: "redis://127.0.0.1:6379/0".into(),
        },
        OnStoreFailure::Local,
        Arc::new(|| {}),
    );
    assert!(l.is_ok());
    assert!(Limiter::new(
        StoreKind::Redis {
            url: "http://x".into()
        },
        OnStoreFailure::Local,
        Arc::new(|| {})
    )
    .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_costs_at_most_the_command_timeout() {
    let server = RedisServer::start();
    let (errors, on_error) = counter();
    let l = redis_limiter(
        &server,
        OnStoreFailure::Local,
        on_error,
        Duration::from_millis(250),
    );
    let lim = client(Some(1000), None, None);
    let now = micros(SystemTime::now());
    assert_eq!(
        ok(&l, "c", "d", &lim, 0, now).await.decided_by(),
        Decider::Redis
    );

    // The server stops answering but the connection stays open (like a half-open TCP
    // connection): the first request waits out the timeout, the next ones skip Redis.
    server.signal("-STOP");
    let started = Instant::now();
    let a = ok(&l, "c", "d", &lim, 0, now).await;
    let first = started.elapsed();
    assert_eq!(a.decided_by(), Decider::LocalFallback);
    assert!(first < Duration::from_millis(1000), "stalled {first:?}");
    let started = Instant::now();
    for _ in 0..10 {
        ok(&l, "c", "d", &lim, 0, now).await;
    }
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "requests waited on Redis"
    );
    assert_eq!(errors.load(Ordering::Relaxed), 11);

    // Once it answers again, the limiter is back on Redis by itself (the stuck connection was
    // replaced, not waited on).
    server.signal("-CONT");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            Instant::now() < deadline,
            "did not recover after Redis resumed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        if ok(&l, "c", "d", &lim, 0, now).await.decided_by() == Decider::Redis {
            break;
        }
    }
}

#[test]
fn limiter_and_its_futures_are_send_and_sync() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let l = memory();
    send_sync(&l);
    let lim = ClientLimits::default();
    let fut = l.admit("c", "d", &lim, 0, SystemTime::now());
    send(&fut);
    let a = Admission::unlimited();
    send_sync(&a);
    send(&l.reconcile(&a, Some(1)));
}
