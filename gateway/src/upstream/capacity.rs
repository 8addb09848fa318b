//! Capacity-aware routing (SPEC §14): Azure announces `x-ratelimit-remaining-tokens` and
//! `x-ratelimit-remaining-requests` on every answer. The last report of each (backend,
//! deployment) pair is kept in three atomics ([`Capacity`]); a member whose report is younger
//! than its backend's `capacity_window_seconds` and cannot cover a request's token
//! reservation (or has no request left) is skipped for that request, as if cooling, so the
//! tier spills before Azure answers 429. The decision is [`shortfall`], a pure function.
//!
//! Reports are per process: each gateway learns them from its own answers (every answer
//! carries one, so a busy replica is never more than one answer behind), which costs no
//! round trip on the request path.

use std::sync::atomic::{AtomicU64, Ordering};

/// "No value" in the atomics.
const NONE: u64 = u64::MAX;

/// The last capacity report of one (backend, deployment) pair.
#[derive(Debug)]
pub struct Capacity {
    tokens: AtomicU64,
    requests: AtomicU64,
    /// Unix ms of the report; 0: never reported.
    at_ms: AtomicU64,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            tokens: AtomicU64::new(NONE),
            requests: AtomicU64::new(NONE),
            at_ms: AtomicU64::new(0),
        }
    }
}

/// One report: what the backend said remained, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub tokens: Option<u64>,
    pub requests: Option<u64>,
    pub at_ms: u64,
}

impl Capacity {
    /// Keeps a report (an answer without either header changes nothing).
    pub fn record(&self, tokens: Option<u64>, requests: Option<u64>, at_ms: u64) {
        if tokens.is_none() && requests.is_none() {
            return;
        }
        self.tokens.store(tokens.unwrap_or(NONE), Ordering::Relaxed);
        self.requests
            .store(requests.unwrap_or(NONE), Ordering::Relaxed);
        self.at_ms.store(at_ms.max(1), Ordering::Release);
    }

    /// The last report, if any.
    pub fn report(&self) -> Option<Report> {
        let at_ms = self.at_ms.load(Ordering::Acquire);
        if at_ms == 0 {
            return None;
        }
        let get = |a: &AtomicU64| Some(a.load(Ordering::Relaxed)).filter(|v| *v != NONE);
        Some(Report {
            tokens: get(&self.tokens),
            requests: get(&self.requests),
            at_ms,
        })
    }
}

/// The remaining tokens and requests an answer's head announces (`x-ratelimit-remaining-*`
/// as decimal integers; any other spelling is ignored as no report). `fields`: the head's
/// `x-ratelimit-*` fields, name and value.
pub fn parse_report<'a>(
    fields: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> (Option<u64>, Option<u64>) {
    let (mut tokens, mut requests) = (None, None);
    for (name, value) in fields {
        let slot = if name.eq_ignore_ascii_case(b"x-ratelimit-remaining-tokens") {
            &mut tokens
        } else if name.eq_ignore_ascii_case(b"x-ratelimit-remaining-requests") {
            &mut requests
        } else {
            continue;
        };
        if slot.is_none() {
            *slot = decimal(value);
        }
    }
    (tokens, requests)
}

fn decimal(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Nineteen digits at most: below 10^19, so the sum cannot overflow a u64.
    Some(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// The pure decision: `None` when the member may take a request that reserves `need`
/// tokens; `Some(room)` when its report (younger than `window_ms`; 0 = the check is off)
/// says it cannot — no request left (`room` 0), or fewer tokens left than the reservation
/// (at least 1: a member that announced 0 tokens takes nothing). `room` ranks the members
/// when every one is short.
pub fn shortfall(report: Option<Report>, now_ms: u64, window_ms: u64, need: u64) -> Option<u64> {
    let r = report?;
    if window_ms == 0 || now_ms >= r.at_ms.saturating_add(window_ms) {
        return None;
    }
    if r.requests == Some(0) {
        return Some(0);
    }
    match r.tokens {
        Some(t) if t < need.max(1) => Some(t),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rep(tokens: Option<u64>, requests: Option<u64>, at_ms: u64) -> Option<Report> {
        Some(Report {
            tokens,
            requests,
            at_ms,
        })
    }

    #[test]
    fn shortfall_table() {
        let w = 60_000;
        for (report, now, window, need, want) in [
            // Never reported: no opinion.
            (None, 1_000, w, 500, None),
            // Enough tokens, or exactly enough.
            (rep(Some(1_000), Some(10), 1_000), 2_000, w, 500, None),
            (rep(Some(500), Some(10), 1_000), 2_000, w, 500, None),
            // Too few tokens: short, with the room it has.
            (rep(Some(499), Some(10), 1_000), 2_000, w, 500, Some(499)),
            // No request left: short whatever the tokens.
            (rep(Some(9_999), Some(0), 1_000), 2_000, w, 1, Some(0)),
            // Zero tokens: short even for a request that reserves nothing.
            (rep(Some(0), None, 1_000), 2_000, w, 0, Some(0)),
            (rep(Some(1), None, 1_000), 2_000, w, 0, None),
            // Only requests reported: tokens are no reason to skip.
            (rep(None, Some(3), 1_000), 2_000, w, 1 << 40, None),
            // The report is as old as the window: it no longer says anything.
            (rep(Some(0), Some(0), 1_000), 61_000, w, 500, None),
            (rep(Some(0), Some(0), 1_000), 60_999, w, 500, Some(0)),
            // Window 0: the check is off for that backend.
            (rep(Some(0), Some(0), 1_000), 1_000, 0, 500, None),
        ] {
            assert_eq!(
                shortfall(report, now, window, need),
                want,
                "{report:?} now={now} window={window} need={need}"
            );
        }
    }

    #[test]
    fn reports_are_read_from_the_head_fields() {
        let f = |pairs: &[(&'static str, &'static str)]| {
            parse_report(pairs.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
        };
        assert_eq!(
            f(&[
                ("x-ratelimit-remaining-requests", "9"),
                ("X-RateLimit-Remaining-Tokens", " 1200 "),
            ]),
            (Some(1200), Some(9))
        );
        assert_eq!(f(&[("x-ratelimit-limit-tokens", "5")]), (None, None));
        // Not a plain decimal: no report (never a guess).
        for bad in ["-1", "1e3", "12.5", "", "0x10", "99999999999999999999"] {
            assert_eq!(
                f(&[("x-ratelimit-remaining-tokens", bad)]),
                (None, None),
                "{bad}"
            );
        }
        // The first of repeated fields counts.
        assert_eq!(
            f(&[
                ("x-ratelimit-remaining-tokens", "7"),
                ("x-ratelimit-remaining-tokens", "9")
            ]),
            (Some(7), None)
        );
    }

    #[test]
    fn decimal_agrees_with_str_parse() {
        let oracle = |v: &str| {
            let t = v.trim_ascii();
            let plain = !t.is_empty() && t.len() <= 19 && t.bytes().all(|b| b.is_ascii_digit());
            plain.then(|| t.parse::<u64>().ok()).flatten()
        };
        for v in [
            "0",
            "7",
            " 42 ",
            "0042",
            "1200",
            "9999999999999999999",
            "18446744073709551615",
            "10000000000000000000",
            "",
            " ",
            "+1",
            "-0",
            "1 2",
            "٣",
        ] {
            assert_eq!(decimal(v.as_bytes()), oracle(v), "{v:?}");
        }
        assert_eq!(
            decimal(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
    }

    #[test]
    fn the_atomics_keep_the_last_report() {
        let c = Capacity::default();
        assert_eq!(c.report(), None);
        c.record(None, None, 5);
        assert_eq!(c.report(), None, "no header, no report");
        c.record(Some(100), None, 10);
        assert_eq!(c.report(), rep(Some(100), None, 10));
        c.record(None, Some(0), 20);
        assert_eq!(c.report(), rep(None, Some(0), 20));
    }
}
