//! Failover decisions (SPEC §7) as pure functions: which member to try next, and what an
//! answer means — deliver it, or cool the member down and try another.

use std::time::Duration;

use crate::config::runtime::RetrySettings;
use crate::errors::{ErrorCode, GatewayError};
use crate::upstream::select::{cooldown_for, pick, Candidate, Pick};

/// What to do before an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Try(usize),
    /// Nothing to try on the first attempt: answer this.
    Refuse(GatewayError),
    /// Nothing left to try after earlier attempts: answer with what they got.
    Stop,
}

/// The next member (`attempt` counts from 0; `rand`: any uniformly random number). On the
/// first attempt an empty choice is the client's answer: 429 with the shortest cooldown when
/// every member cools down, 503 when all are down, 403 when only `forward` members exist and
/// the caller has no JWT. Later, it ends the loop.
pub fn next_member(attempt: u32, cands: &[Candidate], now_ms: u64, rand: u64) -> Next {
    match (pick(cands, now_ms, rand), attempt) {
        (Pick::Member(i), _) => Next::Try(i),
        (Pick::AllCooling { retry_after_ms }, 0) => {
            Next::Refuse(GatewayError::new(ErrorCode::BackendThrottled).retry_after(retry_after_ms))
        }
        (Pick::AllDown, 0) => Next::Refuse(GatewayError::new(ErrorCode::BackendUnavailable)),
        (Pick::Exhausted, 0) => Next::Refuse(GatewayError::with_message(
            ErrorCode::Forbidden,
            "This deployment is only reachable with an OIDC token.",
        )),
        _ => Next::Stop,
    }
}

/// What a backend's answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it to the client.
    Deliver,
    /// Keep it (in case it is the last), try another member; cool this one down first if
    /// `cool` is set (429 and 503).
    Retry { cool: Option<Duration> },
}

/// A status in `retries.on_status` moves on to another member; a 429 or 503 cools the
/// (backend, deployment) pair for `retry-after-ms`, else `retry-after`, else the default,
/// capped.
pub fn verdict(
    status: u16,
    retry_after_ms: Option<&[u8]>,
    retry_after: Option<&[u8]>,
    retries: &RetrySettings,
) -> Verdict {
    if !retries.on_status.contains(&status) {
        return Verdict::Deliver;
    }
    let cool =
        matches!(status, 429 | 503).then(|| cooldown_for(retry_after_ms, retry_after, retries));
    Verdict::Retry { cool }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retries() -> RetrySettings {
        RetrySettings {
            max_attempts: 3,
            on_status: [408, 429, 500, 502, 503, 504].into_iter().collect(),
            default_cooldown: Duration::from_secs(10),
            max_cooldown: Duration::from_secs(60),
        }
    }

    #[test]
    fn verdict_table() {
        let r = retries();
        let secs = |s| Some(Duration::from_secs(s));
        for (status, ms, s, want) in [
            (200, None, None, Verdict::Deliver),
            (400, None, None, Verdict::Deliver),
            (404, Some(&b"5000"[..]), None, Verdict::Deliver),
            (500, None, None, Verdict::Retry { cool: None }),
            (502, Some(&b"5000"[..]), None, Verdict::Retry { cool: None }),
            (
                429,
                Some(&b"8000"[..]),
                None,
                Verdict::Retry {
                    cool: Some(Duration::from_millis(8000)),
                },
            ),
            (429, None, Some(&b"7"[..]), Verdict::Retry { cool: secs(7) }),
            (
                429,
                Some(&b"1500"[..]),
                Some(&b"7"[..]),
                Verdict::Retry {
                    cool: Some(Duration::from_millis(1500)),
                },
            ),
            (429, None, None, Verdict::Retry { cool: secs(10) }),
            (
                503,
                None,
                Some(&b"600"[..]),
                Verdict::Retry { cool: secs(60) },
            ),
            (
                429,
                Some(&b"junk"[..]),
                None,
                Verdict::Retry { cool: secs(10) },
            ),
        ] {
            assert_eq!(verdict(status, ms, s, &r), want, "{status}");
        }
        let mut narrow = retries();
        narrow.on_status = [503].into_iter().collect();
        assert_eq!(verdict(429, None, None, &narrow), Verdict::Deliver);
    }

    fn cand(priority: u32, healthy: bool, cooling_until_ms: u64, tried: bool) -> Candidate {
        Candidate {
            priority,
            weight: 1,
            healthy,
            cooling_until_ms,
            tried,
            short: None,
        }
    }

    #[test]
    fn next_member_table() {
        let now = 1_000;
        assert_eq!(
            next_member(0, &[cand(1, true, 0, false)], now, 7),
            Next::Try(0)
        );
        assert_eq!(
            next_member(
                0,
                &[cand(1, true, 0, true), cand(2, true, 0, false)],
                now,
                7
            ),
            Next::Try(1)
        );
        match next_member(0, &[cand(1, true, 4_000, false)], now, 7) {
            Next::Refuse(e) => {
                assert_eq!(e.code, ErrorCode::BackendThrottled);
                assert_eq!(e.retry_after_ms, Some(3_000));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            next_member(0, &[cand(1, false, 0, false)], now, 7),
            Next::Refuse(GatewayError::new(ErrorCode::BackendUnavailable))
        );
        match next_member(0, &[cand(1, true, 0, true)], now, 7) {
            Next::Refuse(e) => assert_eq!(e.code, ErrorCode::Forbidden),
            other => panic!("{other:?}"),
        }
        // After the first attempt, an empty choice ends the loop with what was had.
        for cands in [
            vec![cand(1, true, 0, true)],
            vec![cand(1, true, 0, true), cand(2, true, 4_000, false)],
            vec![cand(1, true, 0, true), cand(2, false, 0, false)],
        ] {
            assert_eq!(next_member(1, &cands, now, 7), Next::Stop);
        }
    }
}
