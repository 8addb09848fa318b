//! Window arithmetic shared by both stores. The Redis Lua scripts (`redis_store.rs`) mirror
//! these functions line by line, so the memory store and Redis decide identically.
//!
//! All times are integer microseconds since the Unix epoch. Every value kept stays below
//! 2^53 (≈ 285 years of µs), so Lua's double-precision numbers represent it exactly.
//!
//! # Per-minute windows: GCRA
//!
//! `requests_per_minute` and `tokens_per_minute` are enforced with GCRA (the generic cell rate
//! algorithm, a leaky bucket written as one timestamp). A window of limit `L` per minute `W`
//! stores its *theoretical arrival time* `tat`: the instant at which everything admitted so far
//! has drained at `L / W`. A request of `n` units costs `n · W / L` µs and is admitted iff
//! `max(tat, now) + cost − now ≤ W`, i.e. an empty window takes a burst of exactly `L`, and the
//! budget comes back continuously (a sliding window, not a fixed minute).
//!
//! Why GCRA rather than a two-sub-window sliding counter:
//! * the wait until a refused request fits is exact and trivial: `max(tat, now) + cost − now − W`;
//!   the sliding counter's weighted estimate makes that a piecewise formula across the
//!   sub-window boundary;
//! * a reservation is corrected later by moving `tat` by the cost difference (earlier for a
//!   refund, later for a surcharge); one integer per window, one key per window in Redis;
//! * it is exact for its model rather than an approximation of "the last 60 s".
//!
//! Costs are rounded down to whole µs (at least 1 µs for a non-zero amount), so `L` requests of
//! a non-divisible limit (e.g. 7 per minute) still fit an empty window. The rounding error is
//! below 1 µs per admission.
//!
//! # Per-day window
//!
//! `tokens_per_day` is a plain counter of the UTC calendar day the request was admitted in
//! (in Redis a key that names the day); it resets at 00:00 UTC.

/// Length of the per-minute windows.
pub(crate) const MINUTE_US: i64 = 60_000_000;
/// Length of a UTC day.
pub(crate) const DAY_US: i64 = 86_400_000_000;
/// Largest cost or correction applied in one step (≈ 31 years): keeps values below 2^53.
pub(crate) const MAX_COST_US: i64 = 1_000_000_000_000_000;

/// The µs a per-minute window charges for `amount` units against `limit` per minute.
pub(crate) fn cost_us(amount: u64, limit: u64) -> i64 {
    if amount == 0 {
        return 0;
    }
    if limit == 0 {
        return MAX_COST_US;
    }
    let c = (u128::from(amount) * MINUTE_US as u128) / u128::from(limit);
    (c.min(MAX_COST_US as u128) as i64).max(1)
}

/// GCRA admission: `Ok(new tat)` or `Err(µs to wait until it fits)`.
pub(crate) fn gcra_admit(tat: i64, now: i64, cost: i64) -> Result<i64, i64> {
    let new = tat.max(now) + cost;
    let over = new - now - MINUTE_US;
    if over <= 0 {
        Ok(new)
    } else {
        Err(over)
    }
}

/// Corrects a per-minute window by `delta` µs (actual cost − reserved cost). `cap` is the
/// window's `tat` right after the reservation was admitted. Returns the new `tat`, or `None`
/// when nothing changes.
///
/// * Surcharge (`delta > 0`): `tat = max(tat, now) + delta`. It may push `tat` beyond
///   `now + W`: the client is then in debt and waits longer.
/// * Refund (`delta < 0`): only the part of the reservation that has not drained yet can come
///   back. The reservation occupied `[cap − cost, cap]` on the `tat` axis, so at most
///   `cap − now` is still in the window; and `tat` never goes below `now` (an empty window
///   stays empty: a late refund after the window rolled over does not create credit).
pub(crate) fn gcra_adjust(tat: i64, now: i64, delta: i64, cap: i64) -> Option<i64> {
    if delta > 0 {
        Some(tat.max(now) + delta.min(MAX_COST_US))
    } else if delta < 0 && tat > now {
        let refund = (-delta).min((cap - now).max(0));
        Some((tat - refund).max(now))
    } else {
        None
    }
}

/// Units left in a per-minute window whose `tat` is given.
pub(crate) fn gcra_remaining(tat: i64, now: i64, limit: u64) -> u64 {
    let used = (tat - now).clamp(0, MINUTE_US);
    ((MINUTE_US - used) as u128 * u128::from(limit) / MINUTE_US as u128) as u64
}

/// The UTC day (days since the epoch) that `now` falls in.
pub(crate) fn day_index(now: i64) -> i64 {
    now.div_euclid(DAY_US)
}

/// µs from `now` until the UTC day ends.
pub(crate) fn until_day_end(now: i64) -> i64 {
    (day_index(now) + 1) * DAY_US - now
}

/// Rounds a wait up to whole milliseconds (at least 1 ms), so that waiting it is enough.
pub(crate) fn ceil_ms(us: i64) -> u64 {
    (us.max(1) as u64).div_ceil(1000)
}

/// `YYYYMMDD` of a UTC day index (for Redis keys an operator can read).
pub(crate) fn day_label(day: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(day.saturating_mul(86_400)) {
        Ok(t) => format!("{:04}{:02}{:02}", t.year(), u8::from(t.month()), t.day()),
        Err(_) => day.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_750_000_000_000_000;

    #[test]
    fn burst_of_exactly_the_limit_fits_an_empty_window() {
        for limit in [1u64, 7, 10, 600, 150_000] {
            let cost = cost_us(1, limit);
            let mut tat = 0;
            for i in 0..limit {
                tat = gcra_admit(tat, T0, cost).unwrap_or_else(|_| panic!("{i} of {limit}"));
            }
            assert!(gcra_admit(tat, T0, cost).is_err(), "limit {limit}");
            assert_eq!(gcra_remaining(tat, T0, limit), 0);
        }
    }

    #[test]
    fn wait_is_exact() {
        let cost = cost_us(1, 10); // 6 s per request
        let mut tat = 0;
        for _ in 0..10 {
            tat = gcra_admit(tat, T0, cost).unwrap();
        }
        let wait = gcra_admit(tat, T0, cost).unwrap_err();
        assert_eq!(wait, 6_000_000);
        assert!(gcra_admit(tat, T0 + wait - 1, cost).is_err());
        assert!(gcra_admit(tat, T0 + wait, cost).is_ok());
    }

    #[test]
    fn adjust_never_goes_below_now_and_refunds_only_undrained_part() {
        let cost = cost_us(1000, 1000); // a full window
        let tat = gcra_admit(0, T0, cost).unwrap();
        assert_eq!(tat, T0 + MINUTE_US);
        // Refund everything 2 minutes later: the window already drained, nothing changes.
        assert_eq!(gcra_adjust(tat, T0 + 2 * MINUTE_US, -cost, tat), None);
        // Refund everything 45 s later: only the 15 s still in the window come back.
        assert_eq!(
            gcra_adjust(tat, T0 + 45_000_000, -cost, tat),
            Some(T0 + 45_000_000)
        );
        // Refund half at once.
        assert_eq!(
            gcra_adjust(tat, T0, -cost / 2, tat),
            Some(T0 + MINUTE_US / 2)
        );
        // Surcharge on a drained window starts from now.
        assert_eq!(gcra_adjust(0, T0, 5, 0), Some(T0 + 5));
    }

    #[test]
    fn day_arithmetic() {
        let midnight = day_index(T0) * DAY_US;
        assert_eq!(until_day_end(midnight), DAY_US);
        assert_eq!(until_day_end(midnight + DAY_US - 1), 1);
        assert_eq!(day_label(0), "19700101");
        assert_eq!(day_label(day_index(1_767_225_600_000_000)), "20260101");
        assert_eq!(ceil_ms(1), 1);
        assert_eq!(ceil_ms(1000), 1);
        assert_eq!(ceil_ms(1001), 2);
        assert_eq!(ceil_ms(0), 1);
    }

    #[test]
    fn values_stay_exact_in_lua_doubles() {
        let big = T0 + MAX_COST_US + MAX_COST_US;
        assert!(big < (1i64 << 53));
        assert_eq!(cost_us(u64::MAX, 1), MAX_COST_US);
        assert_eq!(cost_us(1, 0), MAX_COST_US);
        assert_eq!(cost_us(1, u64::MAX), 1);
    }
}
