//! The Redis store: counters shared by every gateway on the same Redis.
//!
//! * One round trip per admission: a Lua script reads every applicable window, decides exactly
//!   like `evaluate` in `mod.rs` and, only if all fit, writes all of them (Redis runs a script
//!   atomically, so concurrent gateways can neither over-admit nor half-count). Every key has a
//!   TTL (a per-minute key lives one minute past its drain time, a day key one hour past its
//!   day), so idle clients leave nothing behind.
//! * Reconciliations cost no round trip of their own under load: a finished request's
//!   corrections are queued ([`Pending`]) and ride on this gateway's next admission script call
//!   (any client's: the script applies them first, then decides), and what no admission took
//!   within [`FLUSH_DELAY`] is sent by one reconciliation script call for all of them. Each
//!   correction carries the time its usage was known and is applied as of that time, so the
//!   counts end up as if it had been sent at once; the difference is *when* other admissions
//!   see it: up to [`FLUSH_DELAY`] (10 ms) later. A script call may therefore touch several
//!   clients' keys: fine on one Redis (the store has no cluster support).
//! * Keys: `{prefix}{<subject>}:r|t|d:<YYYYMMDD>` client-wide and
//!   `{prefix}{<subject>}:dep:<deployment>:r|t|d:<YYYYMMDD>` per deployment; `%`, `{`, `}`
//!   and `:` in names are percent-escaped. The subject is a hash tag, so one request's keys
//!   share a cluster slot.
//! * Clock: the gateway passes its own `now` (µs) into the scripts rather than reading Redis
//!   `TIME`. The memory store and Redis then decide identically and are tested with the same
//!   injected clock, and `retry-after-ms` is computed on the clock the gateway answers with.
//!   The cost: clock skew between gateways shifts a client's per-minute budget by at most the
//!   skew's worth of refill (NTP keeps VMs within milliseconds: a few ms of a 60 s window), and
//!   the UTC day flips on each gateway's clock. Redis' own clock is used only for key TTLs,
//!   which carry a one-minute margin.
//! * Failure: the connection is the state store's ([`crate::store::RedisConn`], shared with
//!   the object records): every round trip is bounded, and on any error or timeout the request
//!   is decided by `on_store_failure` while Redis is skipped for a while and then reconnected.
//!   Corrections lost with a failed call (carried or flushed) are dropped, each request's
//!   counted once in `on_store_error`, as before.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Script;

use super::window::{day_label, DAY_US};
use super::{evaluate, Correction, Kind, LimitStore, Plan, Scope, MAX_CHECKS};
use crate::store::{escape_into, RedisConn};
use crate::FilterError;

/// One correction of a token window (Lua function shared by both scripts): mirrors
/// `window::gcra_adjust` (kind `g`) and the day counter (kind `d`, never below 0; a missing day
/// key is only created by a surcharge). `now` is the time the usage was known.
const CORRECT_LUA: &str = r#"
local function correct(key, kind, delta, cap, ttl, now)
  local raw = redis.call('GET', key)
  local cur = tonumber(raw or '0') or 0
  if kind == 'g' then
    local new = nil
    if delta > 0 then
      local base = cur
      if base < now then base = now end
      new = base + delta
    elseif delta < 0 and cur > now then
      local room = cap - now
      if room < 0 then room = 0 end
      local refund = -delta
      if refund > room then refund = room end
      new = cur - refund
      if new < now then new = now end
    end
    if new then
      redis.call('SET', key, string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 60000)
    end
  elseif raw or delta > 0 then
    local new = cur + delta
    if new < 0 then new = 0 end
    redis.call('SET', key, string.format('%.0f', new), 'PX', ttl)
  end
end
-- Applies the corrections of KEYS[first..#KEYS], five ARGV from `at` each:
-- kind, delta, cap, TTL ms (day keys), now (µs).
local function correct_all(first, at)
  for i = first, #KEYS do
    local j = at + (i - first) * 5
    correct(KEYS[i], ARGV[j], tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2]),
      tonumber(ARGV[j + 3]), tonumber(ARGV[j + 4]))
  end
end
"#;

/// After [`CORRECT_LUA`]. KEYS: the `n` windows to admit in, then carried corrections.
/// ARGV[1]: now (µs), ARGV[2]: n. Then four per window: kind, a, b, c. kind `g` (per-minute
/// GCRA): a = cost µs, b = window µs. kind `d` (day): a = amount, b = limit, c = TTL ms. Then
/// five per carried correction (see `correct_all`), applied first. Returns `{1, new values…}`
/// when admitted (all written), or `{0, current values…}` when refused (nothing of the
/// admission written; the caller derives the refusal from the values with the same arithmetic).
const ADMIT_LUA: &str = r#"
local now = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
correct_all(n + 1, 3 + n * 4)
local cur = {}
local new = {}
local ok = true
for i = 1, n do
  local j = 3 + (i - 1) * 4
  local a = tonumber(ARGV[j + 1])
  local b = tonumber(ARGV[j + 2])
  local v = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  cur[i] = v
  if ARGV[j] == 'g' then
    local base = v
    if base < now then base = now end
    new[i] = base + a
    if new[i] - now > b then ok = false end
  else
    if v < 0 then v = 0 end
    new[i] = v + a
    if new[i] > b then ok = false end
  end
end
if not ok then
  table.insert(cur, 1, 0)
  return cur
end
for i = 1, n do
  local j = 3 + (i - 1) * 4
  local ttl
  if ARGV[j] == 'g' then
    ttl = math.ceil((new[i] - now) / 1000) + 60000
  else
    ttl = tonumber(ARGV[j + 3])
  end
  redis.call('SET', KEYS[i], string.format('%.0f', new[i]), 'PX', ttl)
end
table.insert(new, 1, 1)
return new
"#;

/// After [`CORRECT_LUA`]. KEYS: token windows to correct, five ARGV each (see `correct_all`).
const RECONCILE_LUA: &str = r#"
correct_all(1, 1)
return 1
"#;

/// The longest a queued correction waits for an admission to carry it before it is sent on
/// its own.
pub(crate) const FLUSH_DELAY: Duration = Duration::from_millis(10);
/// At most this many corrections ride on one admission (the rest on the next ones or the
/// flush), so an admission after a quiet spell does not carry a large script call.
const MAX_CARRIED: usize = 48;
/// At most this many corrections go in one flush script call (a flush sends several calls,
/// one after the other, when more are queued).
const MAX_FLUSHED: usize = 512;

/// Day keys outlive their UTC day by this much (ms).
const DAY_KEY_MARGIN_MS: i64 = 3_600_000;

/// One queued correction of one window, ready for a script call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Queued {
    key: String,
    /// `g` (per-minute GCRA) or `d` (day counter).
    kind: &'static str,
    delta: i64,
    cap: i64,
    /// TTL of a day key (ms).
    ttl_ms: i64,
    /// When the usage was known (µs): the correction is applied as of then.
    now: i64,
}

/// Corrections taken from [`Pending`] for one script call.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Taken {
    entries: Vec<Queued>,
    /// How many requests' corrections: each counts once in `on_store_error` if the call fails.
    requests: usize,
}

/// The corrections of finished requests not yet sent to Redis, and whether a flush is
/// scheduled. Bookkeeping only (no I/O, no clock): [`RedisStore`] does the sending.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    /// One entry per request (1..=`MAX_CHECKS` corrections), oldest first.
    requests: std::collections::VecDeque<Vec<Queued>>,
    flush_scheduled: bool,
}

impl Pending {
    /// Queues one request's corrections. `true`: no flush is scheduled yet, the caller must
    /// schedule one (to fire after [`FLUSH_DELAY`]).
    pub(crate) fn push(&mut self, corrections: Vec<Queued>) -> bool {
        if corrections.is_empty() {
            return false;
        }
        self.requests.push_back(corrections);
        !std::mem::replace(&mut self.flush_scheduled, true)
    }

    /// Whole requests' corrections, oldest first, as many as fit in `max` corrections (a
    /// request is never split: its windows are corrected together).
    pub(crate) fn take(&mut self, max: usize) -> Taken {
        let mut taken = Taken::default();
        while self
            .requests
            .front()
            .is_some_and(|r| taken.entries.len() + r.len() <= max)
        {
            if let Some(r) = self.requests.pop_front() {
                taken.entries.extend(r);
                taken.requests += 1;
            }
        }
        taken
    }

    /// The flush timer fired: everything queued, in calls of at most `max` corrections (at
    /// least one request each), and the next push schedules a new flush.
    pub(crate) fn fire(&mut self, max: usize) -> Vec<Taken> {
        self.flush_scheduled = false;
        let mut calls = Vec::new();
        while !self.requests.is_empty() {
            let mut t = self.take(max);
            if t.requests == 0 {
                // One request larger than `max` (not with MAX_CHECKS ≤ max): send it alone.
                if let Some(r) = self.requests.pop_front() {
                    t.entries = r;
                    t.requests = 1;
                }
            }
            calls.push(t);
        }
        calls
    }
}

/// What the admission path and the flush task share.
struct Shared {
    conn: Arc<RedisConn>,
    reconcile: Script,
    pending: Mutex<Pending>,
    on_error: Arc<dyn Fn() + Send + Sync>,
    flush_delay: Duration,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn dropped(&self, requests: usize) {
        for _ in 0..requests {
            (self.on_error)();
        }
    }

    /// Sends everything queued (the flush timer fired, or there is no runtime to run one).
    async fn flush(&self) {
        let calls = self.pending().fire(MAX_FLUSHED);
        for t in calls {
            let mut inv = self.reconcile.prepare_invoke();
            add_corrections(&mut inv, &t.entries);
            let ok = self
                .conn
                .run("reconciliation", |mut c| async move {
                    inv.invoke_async::<i64>(&mut c).await
                })
                .await
                .is_some();
            if !ok {
                self.dropped(t.requests);
            }
        }
    }
}

fn add_corrections(inv: &mut redis::ScriptInvocation<'_>, entries: &[Queued]) {
    for q in entries {
        inv.key(&q.key);
        inv.arg(q.kind)
            .arg(q.delta)
            .arg(q.cap)
            .arg(q.ttl_ms)
            .arg(q.now);
    }
}

pub(crate) struct RedisStore {
    shared: Arc<Shared>,
    admit: Script,
    prefix: String,
}

impl RedisStore {
    /// `on_error`: called once per request whose corrections are lost with a failed call.
    /// `flush_delay`: [`FLUSH_DELAY`] but in tests.
    pub(crate) fn new(
        conn: Arc<RedisConn>,
        key_prefix: &str,
        on_error: Arc<dyn Fn() + Send + Sync>,
        flush_delay: Duration,
    ) -> RedisStore {
        RedisStore {
            shared: Arc::new(Shared {
                conn,
                reconcile: Script::new(&format!("{CORRECT_LUA}{RECONCILE_LUA}")),
                pending: Mutex::new(Pending::default()),
                on_error,
                flush_delay,
            }),
            admit: Script::new(&format!("{CORRECT_LUA}{ADMIT_LUA}")),
            prefix: key_prefix.to_owned(),
        }
    }

    /// Sends the queued corrections now (tests; a flush timer may still fire and find nothing).
    #[cfg(test)]
    pub(crate) async fn flush_now(&self) {
        self.shared.flush().await
    }

    fn key(
        &self,
        subject: &str,
        user: &str,
        deployment: &str,
        scope: Scope,
        kind: Kind,
        day: i64,
    ) -> String {
        let mut k = String::with_capacity(
            self.prefix.len() + subject.len() + user.len() + deployment.len() + 28,
        );
        k.push_str(&self.prefix);
        k.push('{');
        escape_into(&mut k, subject);
        k.push_str("}:");
        // A user's windows: `u:<user>:` (`nouser:` for requests without a user value; `:`
        // is escaped in names, so neither can be mistaken for the other or a deployment's).
        if matches!(scope, Scope::User | Scope::UserDeployment) {
            if user.is_empty() {
                k.push_str("nouser:");
            } else {
                k.push_str("u:");
                escape_into(&mut k, user);
                k.push(':');
            }
        }
        if matches!(scope, Scope::Deployment | Scope::UserDeployment) {
            k.push_str("dep:");
            escape_into(&mut k, deployment);
            k.push(':');
        }
        match kind {
            Kind::Requests => k.push('r'),
            Kind::Tokens => k.push('t'),
            Kind::Day => {
                k.push_str("d:");
                k.push_str(&day_label(day));
            }
        }
        k
    }
}

impl LimitStore for RedisStore {
    /// `None`: Redis could not decide (skipped, error or timeout). `Some(Ok(new values))`:
    /// admitted and counted. `Some(Err(e))`: refused, nothing counted.
    async fn admit(
        &self,
        subject: &str,
        user: &str,
        deployment: &str,
        plan: &Plan,
        now: i64,
    ) -> Option<Result<[i64; MAX_CHECKS], FilterError>> {
        let day = now.div_euclid(DAY_US);
        let day_end_ms = ((day + 1) * DAY_US - now) / 1000 + DAY_KEY_MARGIN_MS;
        let carried = self.shared.pending().take(MAX_CARRIED);
        let mut inv = self.admit.prepare_invoke();
        inv.arg(now).arg(plan.checks().len());
        for c in plan.checks() {
            inv.key(self.key(subject, user, deployment, c.scope, c.kind, day));
            match c.kind {
                Kind::Requests | Kind::Tokens => {
                    inv.arg("g")
                        .arg(super::cost_us(c.amount, c.limit))
                        .arg(super::MINUTE_US)
                        .arg(0);
                }
                Kind::Day => {
                    inv.arg("d").arg(c.amount).arg(c.limit).arg(day_end_ms);
                }
            }
        }
        add_corrections(&mut inv, &carried.entries);
        let reply: Option<Vec<i64>> = self
            .shared
            .conn
            .run("admission", |mut c| async move {
                inv.invoke_async(&mut c).await
            })
            .await;
        let Some(reply) = reply else {
            self.shared.dropped(carried.requests);
            return None;
        };
        let n = plan.checks().len();
        if reply.len() != n + 1 {
            log::warn!("limit store: unexpected reply from the admission script");
            return None;
        }
        let mut values = [0i64; MAX_CHECKS];
        values[..n].copy_from_slice(&reply[1..]);
        if reply[0] == 1 {
            return Some(Ok(values));
        }
        // Refused: the same arithmetic on the values Redis read gives the refusal.
        Some(match evaluate(plan, &values, now) {
            Err(e) => Err(e),
            // Cannot happen unless the script and `evaluate` disagree; refuse briefly.
            Ok(_) => Err(FilterError::RateLimitExceeded {
                retry_after_ms: 1000,
                tokens: false,
            }),
        })
    }

    /// Queues the corrections for this gateway's next admission call, or the flush at most
    /// [`FLUSH_DELAY`] later; always `true` (a correction lost with a failed call is counted
    /// in `on_store_error` by the store itself).
    async fn reconcile(
        &self,
        subject: &str,
        user: &str,
        deployment: &str,
        day: i64,
        corrections: &[Correction],
        now: i64,
    ) -> bool {
        let ttl_ms = (((day + 1) * DAY_US - now) / 1000 + DAY_KEY_MARGIN_MS).max(1);
        let queued: Vec<Queued> = corrections
            .iter()
            .map(|c| Queued {
                key: self.key(subject, user, deployment, c.scope, c.kind, day),
                kind: if c.kind == Kind::Day { "d" } else { "g" },
                delta: c.delta,
                cap: c.cap,
                ttl_ms,
                now,
            })
            .collect();
        if !self.shared.pending().push(queued) {
            return true;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let shared = self.shared.clone();
                runtime.spawn(async move {
                    tokio::time::sleep(shared.flush_delay).await;
                    shared.flush().await;
                });
            }
            // No runtime to wait in (the Redis client needs one anyway): send at once.
            Err(_) => self.shared.flush().await,
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unambiguous_and_share_a_hash_tag() {
        let conn = RedisConn::open("redis://127.0.0.1:1/", &Default::default()).unwrap();
        let s = RedisStore::new(conn, "agw:lim:", Arc::new(|| {}), FLUSH_DELAY);
        let day = 20_000; // 2024-10-04
        assert_eq!(
            s.key(
                "support-bot",
                "u",
                "gpt-4o",
                Scope::Client,
                Kind::Requests,
                day
            ),
            "agw:lim:{support-bot}:r"
        );
        assert_eq!(
            s.key(
                "unlisted:contoso:a{b}",
                "",
                "gpt:4o",
                Scope::Deployment,
                Kind::Day,
                day
            ),
            "agw:lim:{unlisted%3Acontoso%3Aa%7Bb%7D}:dep:gpt%3A4o:d:20241004"
        );
        assert_eq!(
            s.key("a", "", "x", Scope::Client, Kind::Tokens, day),
            "agw:lim:{a}:t"
        );
        // Per user: the user's own keys under the client's hash tag.
        assert_eq!(
            s.key("a", "oid:1", "x", Scope::User, Kind::Requests, day),
            "agw:lim:{a}:u:oid%3A1:r"
        );
        assert_eq!(
            s.key("a", "oid", "g:4", Scope::UserDeployment, Kind::Day, day),
            "agw:lim:{a}:u:oid:dep:g%3A4:d:20241004"
        );
        assert_eq!(
            s.key("a", "", "x", Scope::User, Kind::Tokens, day),
            "agw:lim:{a}:nouser:t"
        );
        assert_eq!(
            s.key("a", "", "x", Scope::UserDeployment, Kind::Tokens, day),
            "agw:lim:{a}:nouser:dep:x:t"
        );
    }

    fn q(key: &str) -> Queued {
        Queued {
            key: key.to_owned(),
            kind: "g",
            delta: -1,
            cap: 0,
            ttl_ms: 1,
            now: 0,
        }
    }

    fn request(name: &str, windows: usize) -> Vec<Queued> {
        (0..windows).map(|i| q(&format!("{name}{i}"))).collect()
    }

    fn keys(t: &Taken) -> Vec<&str> {
        t.entries.iter().map(|e| e.key.as_str()).collect()
    }

    #[test]
    fn the_first_queued_request_schedules_one_flush_until_it_fires() {
        let mut p = Pending::default();
        // (what is pushed, must the caller schedule a flush?)
        let steps: [(usize, bool); 5] = [(0, false), (2, true), (1, false), (3, false), (0, false)];
        for (i, (windows, schedule)) in steps.into_iter().enumerate() {
            assert_eq!(p.push(request("r", windows)), schedule, "step {i}");
        }
        // An admission taking everything does not unschedule the timer: it fires and finds
        // nothing, and the next push after it schedules again.
        assert_eq!(p.take(MAX_CARRIED).requests, 3);
        assert!(!p.push(request("s", 1)));
        assert_eq!(p.fire(MAX_FLUSHED).len(), 1);
        assert!(p.fire(MAX_FLUSHED).is_empty());
        assert!(p.push(request("t", 1)));
    }

    #[test]
    fn admissions_carry_whole_requests_oldest_first_up_to_the_cap() {
        // (requests queued as window counts, cap, requests taken, corrections taken, left)
        let cases: [(&[usize], usize, usize, usize, usize); 6] = [
            (&[], 48, 0, 0, 0),
            (&[1], 48, 1, 1, 0),
            (&[2, 2, 2], 48, 3, 6, 0),
            (&[3, 3, 3], 7, 2, 6, 1),
            (&[12, 1], 12, 1, 12, 1),
            (&[5, 1], 4, 0, 0, 2), // the oldest does not fit: nothing jumps the queue
        ];
        for (i, (queued, cap, requests, corrections, left)) in cases.into_iter().enumerate() {
            let mut p = Pending::default();
            for (n, w) in queued.iter().enumerate() {
                p.push(request(&format!("r{n}."), *w));
            }
            let t = p.take(cap);
            assert_eq!(
                (t.requests, t.entries.len()),
                (requests, corrections),
                "case {i}"
            );
            assert_eq!(p.requests.len(), left, "case {i}");
        }
        let mut p = Pending::default();
        p.push(request("a", 2));
        p.push(request("b", 1));
        assert_eq!(keys(&p.take(MAX_CARRIED)), ["a0", "a1", "b0"]);
    }

    #[test]
    fn a_flush_sends_everything_in_bounded_calls() {
        let mut p = Pending::default();
        for n in 0..5 {
            p.push(request(&format!("r{n}."), 3));
        }
        let calls = p.fire(7);
        let sizes: Vec<(usize, usize)> = calls
            .iter()
            .map(|t| (t.requests, t.entries.len()))
            .collect();
        assert_eq!(sizes, [(2, 6), (2, 6), (1, 3)]);
        assert!(p.requests.is_empty());
        // A request larger than a call still goes out, alone.
        p.push(request("big", 9));
        let calls = p.fire(7);
        assert_eq!(calls.len(), 1);
        assert_eq!((calls[0].requests, calls[0].entries.len()), (1, 9));
    }
}
