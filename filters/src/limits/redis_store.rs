//! The Redis store: counters shared by every gateway on the same Redis.
//!
//! * One round trip per admission: a Lua script reads every applicable window, decides exactly
//!   like `evaluate` in `mod.rs` and, only if all fit, writes all of them (Redis runs a script
//!   atomically, so concurrent gateways can neither over-admit nor half-count). One round trip
//!   per reconciliation, another script. Every key has a TTL (a per-minute key lives one
//!   minute past its drain time, a day key one hour past its day), so idle clients leave
//!   nothing behind.
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

use std::sync::Arc;

use redis::Script;

use super::window::{day_label, DAY_US};
use super::{evaluate, Correction, Kind, LimitStore, Plan, Scope, MAX_CHECKS};
use crate::store::{escape_into, RedisConn};
use crate::FilterError;

/// KEYS: one per window. ARGV[1]: now (µs). Then four per key: kind, a, b, c.
/// kind `g` (per-minute GCRA): a = cost µs, b = window µs. kind `d` (day): a = amount,
/// b = limit, c = TTL ms. Returns `{1, new values…}` when admitted (all written), or
/// `{0, current values…}` when refused (nothing written; the caller derives the refusal from
/// the values with the same arithmetic).
const ADMIT_LUA: &str = r#"
local now = tonumber(ARGV[1])
local n = #KEYS
local cur = {}
local new = {}
local ok = true
for i = 1, n do
  local j = 2 + (i - 1) * 4
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
  local j = 2 + (i - 1) * 4
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

/// KEYS: token windows to correct. ARGV[1]: now (µs). Then four per key: kind, delta, cap,
/// TTL ms. Mirrors `window::gcra_adjust` (kind `g`) and the day counter (kind `d`, never
/// below 0; a missing day key is only created by a surcharge).
const RECONCILE_LUA: &str = r#"
local now = tonumber(ARGV[1])
for i = 1, #KEYS do
  local j = 2 + (i - 1) * 4
  local delta = tonumber(ARGV[j + 1])
  local cap = tonumber(ARGV[j + 2])
  local raw = redis.call('GET', KEYS[i])
  local cur = tonumber(raw or '0') or 0
  if ARGV[j] == 'g' then
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
      redis.call('SET', KEYS[i], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 60000)
    end
  elseif raw or delta > 0 then
    local new = cur + delta
    if new < 0 then new = 0 end
    redis.call('SET', KEYS[i], string.format('%.0f', new), 'PX', tonumber(ARGV[j + 3]))
  end
end
return 1
"#;

/// Day keys outlive their UTC day by this much (ms).
const DAY_KEY_MARGIN_MS: i64 = 3_600_000;

pub(crate) struct RedisStore {
    conn: Arc<RedisConn>,
    admit: Script,
    reconcile: Script,
    prefix: String,
}

impl RedisStore {
    pub(crate) fn new(conn: Arc<RedisConn>, key_prefix: &str) -> RedisStore {
        RedisStore {
            conn,
            admit: Script::new(ADMIT_LUA),
            reconcile: Script::new(RECONCILE_LUA),
            prefix: key_prefix.to_owned(),
        }
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
        let mut inv = self.admit.prepare_invoke();
        inv.arg(now);
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
        let reply: Vec<i64> = self
            .conn
            .run("admission", |mut c| async move {
                inv.invoke_async(&mut c).await
            })
            .await?;
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

    /// Applies the corrections; `false` when Redis could not (they are dropped).
    async fn reconcile(
        &self,
        subject: &str,
        user: &str,
        deployment: &str,
        day: i64,
        corrections: &[Correction],
        now: i64,
    ) -> bool {
        let ttl_ms = ((day + 1) * DAY_US - now) / 1000 + DAY_KEY_MARGIN_MS;
        let mut inv = self.reconcile.prepare_invoke();
        inv.arg(now);
        for c in corrections {
            inv.key(self.key(subject, user, deployment, c.scope, c.kind, day));
            let kind = if c.kind == Kind::Day { "d" } else { "g" };
            inv.arg(kind).arg(c.delta).arg(c.cap).arg(ttl_ms.max(1));
        }
        self.conn
            .run("reconciliation", |mut c| async move {
                inv.invoke_async::<i64>(&mut c).await
            })
            .await
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unambiguous_and_share_a_hash_tag() {
        let conn = RedisConn::open("redis://127.0.0.1:1/", &Default::default()).unwrap();
        let s = RedisStore::new(conn, "agw:lim:");
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
}
