//! The backend pool: health per backend, cooldown per (backend, deployment) pair, and the
//! pure choice of the next member to try (SPEC §7).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::runtime::{Config, RetrySettings};
use crate::observe::metrics::PoolReading;
use crate::upstream::capacity::Capacity;

pub fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Health of one backend, updated by the health checker.
#[derive(Debug)]
pub struct BackendHealth {
    healthy: AtomicBool,
    successes: AtomicU32,
    failures: AtomicU32,
}

impl Default for BackendHealth {
    fn default() -> Self {
        // Backends start healthy: the first checks confirm or refute it.
        BackendHealth {
            healthy: AtomicBool::new(true),
            successes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
        }
    }
}

impl BackendHealth {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records one probe; returns the new health. Flips after `threshold` consecutive
    /// results of the other kind.
    pub fn record(&self, ok: bool, successes_before_up: u32, failures_before_down: u32) -> bool {
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            let n = self.successes.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= successes_before_up {
                self.healthy.store(true, Ordering::Relaxed);
            }
        } else {
            self.successes.store(0, Ordering::Relaxed);
            let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= failures_before_down {
                self.healthy.store(false, Ordering::Relaxed);
            }
        }
        self.is_healthy()
    }
}

/// Cooldown of one (backend, deployment) pair: unix milliseconds until which it is skipped.
#[derive(Debug, Default)]
pub struct Cooldown {
    until_ms: AtomicU64,
}

impl Cooldown {
    pub fn until_ms(&self) -> u64 {
        self.until_ms.load(Ordering::Relaxed)
    }

    pub fn cool_until(&self, until_ms: u64) {
        self.until_ms.fetch_max(until_ms, Ordering::Relaxed);
    }
}

/// How long a throttled pair cools: `retry-after-ms`, else `retry-after` (seconds), else
/// the default; capped by the maximum.
pub fn cooldown_for(
    retry_after_ms: Option<&[u8]>,
    retry_after: Option<&[u8]>,
    retries: &RetrySettings,
) -> Duration {
    let parse = |v: Option<&[u8]>| -> Option<u64> {
        std::str::from_utf8(v?)
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|x| *x >= 0.0)
            .map(|x| x as u64)
    };
    let d = parse(retry_after_ms)
        .map(Duration::from_millis)
        .or_else(|| parse(retry_after).map(Duration::from_secs))
        .unwrap_or(retries.default_cooldown);
    d.min(retries.max_cooldown)
}

/// Shared pool state, kept across configuration reloads (keyed by names).
#[derive(Debug, Default)]
pub struct PoolState {
    /// By backend index of the current configuration.
    pub health: Vec<Arc<BackendHealth>>,
    /// By deployment name, one per member (same order as the deployment's members).
    pub cooldowns: HashMap<String, Vec<Arc<Cooldown>>, foldhash::fast::RandomState>,
    /// By deployment name, one per member: the last capacity report of its (backend,
    /// upstream deployment) pair, shared by every client-facing deployment on that pair.
    pub capacity: HashMap<String, Vec<Arc<Capacity>>, foldhash::fast::RandomState>,
}

impl PoolState {
    /// Builds the state for `cfg`, reusing the entries of `prev` whose backend (and
    /// upstream deployment) names match.
    pub fn for_config(
        cfg: &Config,
        prev: Option<&PoolState>,
        prev_cfg: Option<&Config>,
    ) -> PoolState {
        let mut old_health: HashMap<&str, Arc<BackendHealth>> = HashMap::new();
        let mut old_cool: HashMap<(&str, &str), Arc<Cooldown>> = HashMap::new();
        if let (Some(p), Some(pc)) = (prev, prev_cfg) {
            for (i, b) in pc.backends.iter().enumerate() {
                if let Some(h) = p.health.get(i) {
                    old_health.insert(&b.name, h.clone());
                }
            }
            for (name, d) in &pc.deployments {
                if let Some(cs) = p.cooldowns.get(name) {
                    for (m, c) in d.members.iter().zip(cs) {
                        old_cool.insert(
                            (&pc.backends[m.backend].name, &m.upstream_deployment),
                            c.clone(),
                        );
                    }
                }
            }
        }
        let health = cfg
            .backends
            .iter()
            .map(|b| old_health.get(&*b.name).cloned().unwrap_or_default())
            .collect();
        let cooldowns = cfg
            .deployments
            .iter()
            .map(|(name, d)| {
                let cs = d
                    .members
                    .iter()
                    .map(|m| {
                        old_cool
                            .get(&(&*cfg.backends[m.backend].name, &*m.upstream_deployment))
                            .cloned()
                            .unwrap_or_default()
                    })
                    .collect();
                (name.clone(), cs)
            })
            .collect();
        let capacity = capacity_for(cfg, prev, prev_cfg);
        PoolState {
            health,
            cooldowns,
            capacity,
        }
    }

    /// Health of every backend and remaining cooldown of every member of `cfg` (the
    /// configuration this state was built for) at `now_ms`: what the pool's gauges show.
    pub fn reading(&self, cfg: &Config, now_ms: u64) -> PoolReading {
        let healthy = cfg
            .backends
            .iter()
            .zip(&self.health)
            .map(|(b, h)| (b.name.clone(), b.region.clone(), h.is_healthy()))
            .collect();
        let mut cooldowns = Vec::new();
        for name in &cfg.deployment_names {
            let (Some(d), Some(cs)) = (cfg.deployments.get(&**name), self.cooldowns.get(&**name))
            else {
                continue;
            };
            for (m, c) in d.members.iter().zip(cs) {
                let left_ms = c.until_ms().saturating_sub(now_ms);
                cooldowns.push((
                    cfg.backends[m.backend].name.clone(),
                    name.clone(),
                    left_ms as f64 / 1000.0,
                ));
            }
        }
        PoolReading { healthy, cooldowns }
    }
}

/// The capacity reports for `cfg`: one per (backend, upstream deployment) pair, kept from
/// `prev` where the pair was already there.
fn capacity_for(
    cfg: &Config,
    prev: Option<&PoolState>,
    prev_cfg: Option<&Config>,
) -> HashMap<String, Vec<Arc<Capacity>>, foldhash::fast::RandomState> {
    let mut pairs: HashMap<(Arc<str>, Arc<str>), Arc<Capacity>> = HashMap::new();
    if let (Some(p), Some(pc)) = (prev, prev_cfg) {
        for (name, d) in &pc.deployments {
            if let Some(cs) = p.capacity.get(name) {
                for (m, c) in d.members.iter().zip(cs) {
                    let key = (
                        pc.backends[m.backend].name.clone(),
                        Arc::from(&*m.upstream_deployment),
                    );
                    pairs.insert(key, c.clone());
                }
            }
        }
    }
    cfg.deployments
        .iter()
        .map(|(name, d)| {
            let cs = d
                .members
                .iter()
                .map(|m| {
                    let key = (
                        cfg.backends[m.backend].name.clone(),
                        Arc::from(&*m.upstream_deployment),
                    );
                    pairs.entry(key).or_default().clone()
                })
                .collect();
            (name.clone(), cs)
        })
        .collect()
}

/// What the chooser knows of one member.
#[derive(Debug, Clone, Copy, Default)]
pub struct Candidate {
    pub priority: u32,
    pub weight: u32,
    pub healthy: bool,
    pub cooling_until_ms: u64,
    pub tried: bool,
    /// Its last capacity report says it cannot take this request: `Some(room)` (see
    /// [`crate::upstream::capacity::shortfall`]). Skipped as if cooling, unless every member
    /// that could be tried is short.
    pub short: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    Member(usize),
    /// Every untried member is cooling down (or down, with at least one cooling): wait this long.
    AllCooling {
        retry_after_ms: u64,
    },
    /// Every untried member is down.
    AllDown,
    /// Every member was tried in this request.
    Exhausted,
}

/// The best priority tier with an available member; a weighted choice inside it.
/// `rand` is any uniformly random number. A member short of capacity is not available;
/// when every member that could be tried is short, the one with the most room is tried
/// (better tier first on a tie): Azure may still take it, and a 429 fails over as usual.
pub fn pick(cands: &[Candidate], now_ms: u64, rand: u64) -> Pick {
    let open = |c: &Candidate| !c.tried && c.healthy && c.cooling_until_ms <= now_ms;
    let available = |c: &Candidate| open(c) && c.short.is_none();
    let best = cands
        .iter()
        .filter(|c| available(c))
        .map(|c| c.priority)
        .min();
    if let Some(tier) = best {
        let total: u64 = cands
            .iter()
            .filter(|c| available(c) && c.priority == tier)
            .map(|c| c.weight as u64)
            .sum();
        let mut r = rand % total.max(1);
        for (i, c) in cands.iter().enumerate() {
            if available(c) && c.priority == tier {
                if r < c.weight as u64 {
                    return Pick::Member(i);
                }
                r -= c.weight as u64;
            }
        }
    }
    let roomiest = cands
        .iter()
        .enumerate()
        .filter(|(_, c)| open(c))
        .filter_map(|(i, c)| c.short.map(|room| (room, std::cmp::Reverse(c.priority), i)))
        .max_by_key(|&(room, prio, i)| (room, prio, std::cmp::Reverse(i)));
    if let Some((_, _, i)) = roomiest {
        return Pick::Member(i);
    }
    let untried: Vec<&Candidate> = cands.iter().filter(|c| !c.tried).collect();
    if untried.is_empty() {
        return Pick::Exhausted;
    }
    match untried
        .iter()
        .filter(|c| c.healthy && c.cooling_until_ms > now_ms)
        .map(|c| c.cooling_until_ms - now_ms)
        .min()
    {
        Some(ms) => Pick::AllCooling { retry_after_ms: ms },
        None => Pick::AllDown,
    }
}

/// The members skipped for capacity when `chosen` was picked: short, otherwise available,
/// and in a tier at least as good as the chosen one's (those it would have competed with).
/// None when the chosen member is itself short (every one was: nothing was skipped).
pub fn capacity_skips(
    cands: &[Candidate],
    chosen: usize,
    now_ms: u64,
) -> impl Iterator<Item = usize> + '_ {
    let c = cands[chosen];
    let tier = c.priority;
    let any = c.short.is_none();
    cands.iter().enumerate().filter_map(move |(i, m)| {
        (any && i != chosen
            && m.short.is_some()
            && !m.tried
            && m.healthy
            && m.cooling_until_ms <= now_ms
            && m.priority <= tier)
            .then_some(i)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(priority: u32, weight: u32) -> Candidate {
        Candidate {
            priority,
            weight,
            healthy: true,
            cooling_until_ms: 0,
            tried: false,
            short: None,
        }
    }

    #[test]
    fn best_tier_first() {
        let cs = [c(2, 1), c(1, 1)];
        for r in 0..10 {
            assert_eq!(pick(&cs, 100, r), Pick::Member(1));
        }
    }

    #[test]
    fn weights_share_a_tier() {
        let cs = [c(1, 3), c(1, 1)];
        let mut counts = [0; 2];
        for r in 0..400 {
            if let Pick::Member(i) = pick(&cs, 0, r) {
                counts[i] += 1;
            }
        }
        assert_eq!(counts, [300, 100]);
    }

    #[test]
    fn cooling_and_tried_members_are_skipped() {
        let mut cs = [c(1, 1), c(2, 1)];
        cs[0].cooling_until_ms = 500;
        assert_eq!(pick(&cs, 100, 0), Pick::Member(1));
        assert_eq!(pick(&cs, 500, 0), Pick::Member(0), "cooldown over");
        cs[1].tried = true;
        assert_eq!(
            pick(&cs, 100, 0),
            Pick::AllCooling {
                retry_after_ms: 400
            }
        );
    }

    #[test]
    fn down_members_are_skipped() {
        let mut cs = [c(1, 1), c(2, 1)];
        cs[0].healthy = false;
        assert_eq!(pick(&cs, 0, 0), Pick::Member(1));
        cs[1].healthy = false;
        assert_eq!(pick(&cs, 0, 0), Pick::AllDown);
        cs[1].healthy = true;
        cs[1].cooling_until_ms = 2_000;
        assert_eq!(
            pick(&cs, 0, 0),
            Pick::AllCooling {
                retry_after_ms: 2_000
            }
        );
    }

    #[test]
    fn exhausted_when_all_tried() {
        let mut cs = [c(1, 1)];
        cs[0].tried = true;
        assert_eq!(pick(&cs, 0, 0), Pick::Exhausted);
    }

    #[test]
    fn members_short_of_capacity_spill_to_the_next() {
        // Tier 1: a PTU member; tier 2: pay-as-you-go.
        let mut cs = [c(1, 1), c(2, 1)];
        cs[0].short = Some(100);
        for r in 0..5 {
            assert_eq!(pick(&cs, 0, r), Pick::Member(1), "spills to tier 2");
        }
        assert_eq!(capacity_skips(&cs, 1, 0).collect::<Vec<_>>(), [0]);
        // Room again (a new report, or the window passed): used again.
        cs[0].short = None;
        assert_eq!(pick(&cs, 0, 0), Pick::Member(0));
        assert_eq!(capacity_skips(&cs, 0, 0).count(), 0);
        // Inside a tier: the other member takes it all.
        let mut cs = [c(1, 5), c(1, 1), c(2, 1)];
        cs[0].short = Some(0);
        for r in 0..12 {
            assert_eq!(pick(&cs, 0, r), Pick::Member(1));
        }
        assert_eq!(capacity_skips(&cs, 1, 0).collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn when_every_member_is_short_the_roomiest_is_tried() {
        // (priority, short, tried, cooling_until) per member
        type Member = (u32, Option<u64>, bool, u64);
        let table: &[(&[Member], Pick)] = &[
            (
                &[(1, Some(10), false, 0), (2, Some(50), false, 0)],
                Pick::Member(1),
            ),
            // A tie on room: the better tier, then the first.
            (
                &[(2, Some(10), false, 0), (1, Some(10), false, 0)],
                Pick::Member(1),
            ),
            (
                &[(1, Some(0), false, 0), (1, Some(0), false, 0)],
                Pick::Member(0),
            ),
            // Cooling or tried members are not candidates for the fallback.
            (
                &[(1, Some(90), false, 5_000), (2, Some(5), false, 0)],
                Pick::Member(1),
            ),
            (
                &[(1, Some(90), true, 0), (2, Some(5), false, 0)],
                Pick::Member(1),
            ),
            // A member with room wins over any short one, whatever its tier.
            (
                &[(1, Some(90), false, 0), (3, None, false, 0)],
                Pick::Member(1),
            ),
            // Short and cooling everywhere: cooling answers as before.
            (
                &[(1, Some(90), false, 5_000)],
                Pick::AllCooling {
                    retry_after_ms: 4_000,
                },
            ),
        ];
        for (members, want) in table {
            let cs: Vec<Candidate> = members
                .iter()
                .map(|&(p, short, tried, cool)| Candidate {
                    short,
                    tried,
                    cooling_until_ms: cool,
                    ..c(p, 1)
                })
                .collect();
            assert_eq!(pick(&cs, 1_000, 7), *want, "{members:?}");
            if let Pick::Member(i) = want {
                if cs[*i].short.is_some() {
                    assert_eq!(capacity_skips(&cs, *i, 1_000).count(), 0);
                }
            }
        }
    }

    #[test]
    fn health_flips_after_thresholds() {
        let h = BackendHealth::default();
        assert!(h.record(false, 2, 2));
        assert!(!h.record(false, 2, 2));
        assert!(!h.record(true, 2, 2));
        assert!(h.record(true, 2, 2));
    }

    #[test]
    fn the_reading_is_the_state_at_that_instant() {
        let cfg = crate::config::load_str(
            "\
server:
  listeners: [{address: 127.0.0.1:8080}]
clients: []
deployments:
  gpt-4o:
    - backend: east
    - backend: west
      deployment: gpt-4o-ptu
  mini:
    - backend: west
backends:
  - name: east
    url: http://127.0.0.1:1
    region: eastus
    credential: api_key
    api_key: k
  - name: west
    url: http://127.0.0.1:2
    credential: api_key
    api_key: k
",
        )
        .expect("valid configuration");
        let pool = PoolState::for_config(&cfg, None, None);
        let name = |s: &str| -> Arc<str> { s.into() };
        let at = |now| pool.reading(&cfg, now);
        assert_eq!(
            at(1_000).healthy,
            [
                (name("east"), name("eastus"), true),
                (name("west"), name(""), true)
            ]
        );
        assert!(at(1_000).cooldowns.iter().all(|c| c.2 == 0.0));

        // A 429 from west for gpt-4o-ptu at t = 1 s with retry-after-ms 8000: the reading
        // shows it at once, and less as time passes, until it is over.
        pool.cooldowns["gpt-4o"][1].cool_until(9_000);
        pool.health[0].record(false, 1, 1);
        let r = at(1_000);
        assert!(!r.healthy[0].2);
        assert_eq!(
            r.cooldowns,
            [
                (name("east"), name("gpt-4o"), 0.0),
                (name("west"), name("gpt-4o"), 8.0),
                (name("west"), name("mini"), 0.0),
            ]
        );
        assert_eq!(at(3_500).cooldowns[1].2, 5.5);
        assert_eq!(at(9_000).cooldowns[1].2, 0.0);
        assert_eq!(at(20_000).cooldowns[1].2, 0.0);
    }

    #[test]
    fn cooldown_sources_in_order_and_capped() {
        let r = RetrySettings {
            max_attempts: 3,
            on_status: Default::default(),
            default_cooldown: Duration::from_secs(10),
            max_cooldown: Duration::from_secs(60),
        };
        assert_eq!(
            cooldown_for(Some(b"1500"), Some(b"9"), &r),
            Duration::from_millis(1500)
        );
        assert_eq!(cooldown_for(None, Some(b"9"), &r), Duration::from_secs(9));
        assert_eq!(cooldown_for(None, None, &r), Duration::from_secs(10));
        assert_eq!(
            cooldown_for(Some(b"600000"), None, &r),
            Duration::from_secs(60)
        );
        assert_eq!(
            cooldown_for(Some(b"junk"), None, &r),
            Duration::from_secs(10)
        );
    }
}
