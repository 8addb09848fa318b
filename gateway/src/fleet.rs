//! One fleet (SPEC §14): the cooldowns a gateway starts and the revoked API keys, shared by
//! every gateway on the same Redis (`state.store: redis`).
//!
//! Nothing here runs on the request path but [`Fleet::cooled`] (a `try_send` on a channel,
//! only after a 429/503) and the revoked-set lookup of the identity check (one relaxed load
//! while nothing is revoked). A background task ([`FleetSync`]) does all the I/O:
//! - it subscribes to `agw:fleet` and applies what the others publish — a cooldown into the
//!   local [`PoolState`] ([`apply_cooldown`]), a change of revocations by reading the revoked
//!   hash again into the local set;
//! - it publishes the cooldowns this gateway starts (and keeps them in Redis, expiring with
//!   the cooldown, for gateways that connect later);
//! - every [`RECONCILE`] it reads the revoked hash and the store's epoch again (a missed
//!   message is repaired; a Redis that came back empty gets the revocations this gateway knew
//!   written back);
//! - when Redis is away it goes on with what it knew, logs one warning, sets
//!   `aoai_gateway_state_store_up` to 0, reconnects every [`RETRY`], and on return catches up
//!   (revocations, live cooldowns, and the cooldowns it started meanwhile) and logs one line.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use filters::fleet::{
    check_epoch, cooldown_key, Epoch, Message, RevokedKeys, CHANNEL, EPOCH_KEY, REVOKED_KEY,
};
use futures::StreamExt;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::mpsc;

use crate::config::file::StoreKindFile;
use crate::config::runtime::Config;
use crate::observe::metrics::Metrics;
use crate::state::Snapshot;
use crate::upstream::select::{now_ms, PoolState};

/// Longest wait for one Redis round trip (connecting included) of the fleet task.
const TIMEOUT: Duration = Duration::from_millis(500);
/// Between two reconnection attempts while Redis is away.
const RETRY: Duration = Duration::from_secs(1);
/// Between two full reads of the revoked set and the epoch while connected.
pub const RECONCILE: Duration = Duration::from_secs(2);
/// Cooldowns started while the channel to the task is full are not published (the local
/// cooldown holds regardless).
const OUTBOX: usize = 1024;

/// A cooldown this gateway started, to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cooled {
    pub backend: Arc<str>,
    /// Client-facing name.
    pub deployment: Arc<str>,
    /// The deployment's name on the backend.
    pub upstream: Arc<str>,
    pub until_ms: u64,
}

/// What the request path and the fleet task share; one per process, kept across reloads.
pub struct Fleet {
    /// This process among the fleet (messages it sent itself are skipped).
    pub instance: String,
    pub revoked: Arc<RevokedKeys>,
    outbox: mpsc::Sender<Cooled>,
    inbox: Mutex<Option<mpsc::Receiver<Cooled>>>,
    /// The store epoch read before serving ([`initial_sync`]).
    start_epoch: Mutex<Option<String>>,
    /// `aoai_gateway_state_store_up` (extension): 1 while Redis answers (always 1 with
    /// `state.store: memory`).
    store_up: prometheus::IntGauge,
    /// `aoai_gateway_revoked_keys` (extension): revoked key ids known to this process.
    revoked_keys: prometheus::IntGauge,
}

impl Fleet {
    pub fn new(metrics: &Metrics) -> Arc<Fleet> {
        let (outbox, inbox) = mpsc::channel(OUTBOX);
        let gauge = |name: &str, help: &str| {
            let g = prometheus::IntGauge::new(name, help).expect("a constant, valid metric name");
            if let Err(e) = metrics.registry.register(Box::new(g.clone())) {
                log::debug!("metric {name}: {e}");
            }
            g
        };
        let store_up = gauge(
            "aoai_gateway_state_store_up",
            "Whether the shared state store (Redis) answers: 1 yes, 0 no (always 1 with state.store: memory).",
        );
        store_up.set(1);
        let revoked_keys = gauge(
            "aoai_gateway_revoked_keys",
            "API key ids revoked with `aoai-gateway keys revoke`, as known to this process.",
        );
        Arc::new(Fleet {
            instance: hex::encode(rand::random::<[u8; 8]>()),
            revoked: Arc::default(),
            outbox,
            inbox: Mutex::new(Some(inbox)),
            start_epoch: Mutex::new(None),
            store_up,
            revoked_keys,
        })
    }

    /// A cooldown this gateway started on member `member` of `deployment` (request path: no
    /// I/O, never waits).
    pub fn cooled(
        &self,
        cfg: &Config,
        deployment: &crate::config::runtime::Deployment,
        member: usize,
        until_ms: u64,
    ) {
        let Some(m) = deployment.members.get(member) else {
            return;
        };
        let _ = self.outbox.try_send(Cooled {
            backend: cfg.backends[m.backend].name.clone(),
            deployment: deployment.name.clone(),
            upstream: m.upstream_deployment.clone(),
            until_ms,
        });
    }

    /// Whether the state store answers (`/status`).
    pub fn store_up(&self) -> bool {
        self.store_up.get() == 1
    }

    fn set_revoked(&self, ids: HashSet<String>) -> filters::fleet::Diff {
        let d = self.revoked.replace(ids);
        self.revoked_keys.set(self.revoked.len() as i64);
        for id in &d.added {
            log::info!("API key {id} is revoked: refused from now on");
        }
        for id in &d.removed {
            log::info!("API key {id} is no longer revoked");
        }
        d
    }
}

/// What [`apply_cooldown`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The member now cools until the given time.
    Cooled,
    /// The local cooldown already lasted as long (or the remote one is over).
    Unchanged,
    /// No such member in this configuration.
    Unknown,
}

/// Merges a cooldown another gateway started into the local pool state: the member named by
/// (backend, client-facing deployment, upstream deployment) cools until `until_ms`, capped at
/// `now_ms + max_cooldown` (a remote value is not trusted beyond what this gateway would
/// itself apply), never shortened.
pub fn apply_cooldown(
    pool: &PoolState,
    cfg: &Config,
    backend: &str,
    deployment: &str,
    upstream: &str,
    until_ms: u64,
    now_ms: u64,
) -> Applied {
    let (Some(d), Some(cools)) = (
        cfg.deployments.get(deployment),
        pool.cooldowns.get(deployment),
    ) else {
        return Applied::Unknown;
    };
    let Some(i) = d.members.iter().position(|m| {
        &*cfg.backends[m.backend].name == backend && &*m.upstream_deployment == upstream
    }) else {
        return Applied::Unknown;
    };
    let Some(c) = cools.get(i) else {
        return Applied::Unknown;
    };
    let until = until_ms.min(now_ms + cfg.retries.max_cooldown.as_millis() as u64);
    if until <= now_ms || c.until_ms() >= until {
        return Applied::Unchanged;
    }
    c.cool_until(until);
    Applied::Cooled
}

/// The Redis URL of the configuration, if the state store is Redis.
fn redis_url(cfg: &Config) -> Option<String> {
    match cfg.state.store {
        StoreKindFile::Memory => None,
        StoreKindFile::Redis => cfg.state.redis_url.clone(),
    }
}

/// Reads the revoked set once, before the gateway serves (a restarted gateway refuses
/// revoked keys from its first request). Redis away: starts with none, with a warning; the
/// task catches up when it answers.
pub fn initial_sync(snap: &Snapshot) {
    let Some(url) = redis_url(&snap.cfg) else {
        return;
    };
    match filters::fleet::cli::read_state(&url, Duration::from_secs(1)) {
        Ok((epoch, ids)) => {
            snap.fleet.set_revoked(ids);
            // The task starts from this epoch: should Redis lose its data before the task
            // connects, what was read here is written back.
            *snap.fleet.start_epoch.lock().unwrap_or_else(|e| e.into_inner()) = epoch;
        }
        Err(e) => log::warn!(
            "state store: cannot read the revoked keys at start ({e}); starting without, reading them when Redis answers"
        ),
    }
}

/// Why a connected session ended.
enum End {
    Shutdown,
    Lost(String),
    /// `state.store` or `state.redis_url` changed on reload.
    Reconfigured,
}

/// A member across the fleet: (backend, client-facing deployment, upstream deployment).
type MemberName = (Arc<str>, Arc<str>, Arc<str>);

/// Reachability as last logged.
#[derive(Default)]
struct Link {
    /// `None` until the first attempt.
    up: Option<bool>,
    /// The store epoch last seen (see `filters::fleet`).
    epoch: Option<String>,
    /// Cooldowns started while Redis was away, published on return if still running.
    pending: HashMap<MemberName, u64>,
}

/// The background task.
pub struct FleetSync {
    pub state: Arc<ArcSwap<Snapshot>>,
}

type Conn = redis::aio::MultiplexedConnection;

async fn bounded<T>(
    what: &str,
    f: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: timed out")),
    }
}

impl FleetSync {
    fn fleet(&self) -> Arc<Fleet> {
        self.state.load().fleet.clone()
    }

    fn down(&self, link: &mut Link, why: &str) {
        let fleet = self.fleet();
        fleet.store_up.set(0);
        if link.up != Some(false) {
            log::warn!(
                "state store: Redis is unreachable ({why}); going on with the {} revoked keys and the cooldowns known, reconnecting every {RETRY:?}",
                fleet.revoked.len()
            );
        }
        link.up = Some(false);
    }

    fn up(&self, link: &mut Link) {
        self.fleet().store_up.set(1);
        if link.up == Some(false) {
            log::info!("state store: Redis answers again; revocations and cooldowns caught up");
        }
        link.up = Some(true);
    }

    /// Reads the revoked set again, after checking the epoch: a Redis that lost its data
    /// since the last read gets back the revocations this gateway knew.
    async fn reconcile(&self, conn: &mut Conn, link: &mut Link) -> Result<(), String> {
        let fleet = self.fleet();
        let mut epoch: Option<String> =
            bounded("GET", redis::cmd("GET").arg(EPOCH_KEY).query_async(conn)).await?;
        if epoch.is_none() {
            let mine = hex::encode(rand::random::<[u8; 8]>());
            let _: Option<String> = bounded(
                "SET",
                redis::cmd("SET")
                    .arg(EPOCH_KEY)
                    .arg(&mine)
                    .arg("NX")
                    .query_async(conn),
            )
            .await?;
            epoch = bounded("GET", redis::cmd("GET").arg(EPOCH_KEY).query_async(conn)).await?;
        }
        let epoch = epoch.unwrap_or_default();
        if check_epoch(link.epoch.as_deref(), &epoch) == Epoch::Changed {
            let known = fleet.revoked.snapshot();
            if !known.is_empty() {
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                let mut pipe = redis::pipe();
                for id in known.iter() {
                    pipe.cmd("HSETNX")
                        .arg(REVOKED_KEY)
                        .arg(id)
                        .arg(now)
                        .ignore();
                }
                let notice = Message::Revocations {
                    from: fleet.instance.clone(),
                }
                .encode();
                pipe.cmd("PUBLISH").arg(CHANNEL).arg(notice).ignore();
                bounded("HSETNX", pipe.query_async::<()>(conn)).await?;
                log::warn!(
                    "state store: Redis lost the fleet's state since it was last read; wrote back the {} revoked keys this gateway knew",
                    known.len()
                );
            }
        }
        link.epoch = Some(epoch);
        let all: HashMap<String, String> = bounded(
            "HGETALL",
            redis::cmd("HGETALL").arg(REVOKED_KEY).query_async(conn),
        )
        .await?;
        fleet.set_revoked(all.into_keys().collect());
        Ok(())
    }

    /// On (re)connection: the cooldowns other gateways keep in Redis, and the publication of
    /// those this gateway started while away.
    async fn catch_up_cooldowns(&self, conn: &mut Conn, link: &mut Link) -> Result<(), String> {
        let snap = self.state.load_full();
        let fleet = &snap.fleet;
        let now = now_ms();
        for ((backend, deployment, upstream), until) in std::mem::take(&mut link.pending) {
            if until > now {
                publish(
                    conn,
                    fleet,
                    &Cooled {
                        backend,
                        deployment,
                        upstream,
                        until_ms: until,
                    },
                )
                .await?;
            }
        }
        let mut members = Vec::new();
        for (name, d) in &snap.cfg.deployments {
            for m in &d.members {
                members.push((
                    snap.cfg.backends[m.backend].name.clone(),
                    name.clone(),
                    m.upstream_deployment.clone(),
                ));
            }
        }
        if members.is_empty() {
            return Ok(());
        }
        let mut mget = redis::cmd("MGET");
        for (b, d, u) in &members {
            mget.arg(cooldown_key(b, d, u));
        }
        let values: Vec<Option<String>> = bounded("MGET", mget.query_async(conn)).await?;
        let now = now_ms();
        for ((b, d, u), v) in members.iter().zip(values) {
            if let Some(until) = v.and_then(|v| v.parse::<u64>().ok()) {
                apply_cooldown(&snap.pool, &snap.cfg, b, d, u, until, now);
            }
        }
        Ok(())
    }

    /// One connected session: until Redis is lost, the store is reconfigured, or shutdown.
    async fn session(
        &self,
        url: &str,
        inbox: &mut mpsc::Receiver<Cooled>,
        shutdown: &mut ShutdownWatch,
        link: &mut Link,
    ) -> End {
        let client = match redis::Client::open(url) {
            Ok(c) => c,
            Err(e) => return End::Lost(format!("state.redis_url: {e}")),
        };
        let mut conn = match bounded("connect", client.get_multiplexed_async_connection()).await {
            Ok(c) => c,
            Err(e) => return End::Lost(e),
        };
        let mut pubsub = match bounded("connect", client.get_async_pubsub()).await {
            Ok(p) => p,
            Err(e) => return End::Lost(e),
        };
        if let Err(e) = bounded("SUBSCRIBE", pubsub.subscribe(CHANNEL)).await {
            return End::Lost(e);
        }
        let mut messages = pubsub.into_on_message();
        // Subscribed first: nothing published from here on is missed by the catch-up.
        if let Err(e) = self.reconcile(&mut conn, link).await {
            return End::Lost(e);
        }
        if let Err(e) = self.catch_up_cooldowns(&mut conn, link).await {
            return End::Lost(e);
        }
        self.up(link);
        let mut tick = tokio::time::interval(RECONCILE);
        tick.reset();
        loop {
            tokio::select! {
                m = messages.next() => {
                    let Some(m) = m else {
                        return End::Lost("the subscription was closed".into());
                    };
                    if let Err(e) = self.on_message(m.get_payload_bytes(), &mut conn, link).await {
                        return End::Lost(e);
                    }
                }
                c = inbox.recv() => {
                    let Some(c) = c else { return End::Shutdown };
                    let fleet = self.fleet();
                    if let Err(e) = publish(&mut conn, &fleet, &c).await {
                        link.pending.insert((c.backend, c.deployment, c.upstream), c.until_ms);
                        return End::Lost(e);
                    }
                }
                _ = tick.tick() => {
                    if redis_url(&self.state.load().cfg).as_deref() != Some(url) {
                        return End::Reconfigured;
                    }
                    if let Err(e) = self.reconcile(&mut conn, link).await {
                        return End::Lost(e);
                    }
                }
                _ = shutdown.changed() => return End::Shutdown,
            }
        }
    }

    async fn on_message(
        &self,
        payload: &[u8],
        conn: &mut Conn,
        link: &mut Link,
    ) -> Result<(), String> {
        let msg = match Message::decode(payload) {
            Ok(m) => m,
            Err(e) => {
                log::debug!("fleet: ignored a message on {CHANNEL}: {e}");
                return Ok(());
            }
        };
        let snap = self.state.load_full();
        if msg.from() == snap.fleet.instance {
            return Ok(());
        }
        match msg {
            Message::Cooldown {
                backend,
                deployment,
                upstream,
                until_ms,
                ..
            } => {
                let applied = apply_cooldown(
                    &snap.pool,
                    &snap.cfg,
                    &backend,
                    &deployment,
                    &upstream,
                    until_ms,
                    now_ms(),
                );
                log::debug!(
                    "fleet: cooldown of {backend}/{deployment} until {until_ms}: {applied:?}"
                );
                Ok(())
            }
            Message::Revocations { .. } => self.reconcile(conn, link).await,
        }
    }
}

/// Keeps the cooldown in Redis until it ends and tells the other gateways.
async fn publish(conn: &mut Conn, fleet: &Fleet, c: &Cooled) -> Result<(), String> {
    let now = now_ms();
    if c.until_ms <= now {
        return Ok(());
    }
    let msg = Message::Cooldown {
        from: fleet.instance.clone(),
        backend: c.backend.to_string(),
        deployment: c.deployment.to_string(),
        upstream: c.upstream.to_string(),
        until_ms: c.until_ms,
    }
    .encode();
    let mut pipe = redis::pipe();
    pipe.cmd("SET")
        .arg(cooldown_key(&c.backend, &c.deployment, &c.upstream))
        .arg(c.until_ms)
        .arg("PX")
        .arg(c.until_ms - now)
        .ignore()
        .cmd("PUBLISH")
        .arg(CHANNEL)
        .arg(msg)
        .ignore();
    bounded("publish", pipe.query_async::<()>(conn)).await
}

#[async_trait]
impl BackgroundService for FleetSync {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut inbox) = self
            .fleet()
            .inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let mut link = Link {
            epoch: self
                .fleet()
                .start_epoch
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
            ..Link::default()
        };
        loop {
            let Some(url) = redis_url(&self.state.load().cfg) else {
                // memory: nothing to share; cooldowns stay local, and no key can be revoked
                // (a reload from redis to memory forgets the revocations read there).
                let fleet = self.fleet();
                fleet.store_up.set(1);
                if !fleet.revoked.is_empty() {
                    fleet.set_revoked(HashSet::new());
                }
                tokio::select! {
                    c = inbox.recv() => if c.is_none() { return },
                    _ = tokio::time::sleep(RETRY) => {}
                    _ = shutdown.changed() => return,
                }
                continue;
            };
            match self
                .session(&url, &mut inbox, &mut shutdown, &mut link)
                .await
            {
                End::Shutdown => return,
                End::Reconfigured => continue,
                End::Lost(why) => {
                    self.down(&mut link, &why);
                    // Wait before the next attempt, keeping the cooldowns started meanwhile.
                    let until = tokio::time::Instant::now() + RETRY;
                    loop {
                        tokio::select! {
                            c = inbox.recv() => match c {
                                Some(c) => {
                                    let e = link.pending.entry((c.backend, c.deployment, c.upstream)).or_default();
                                    *e = (*e).max(c.until_ms);
                                }
                                None => return,
                            },
                            _ = tokio::time::sleep_until(until) => break,
                            _ = shutdown.changed() => return,
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        crate::config::load_str(
            "\
server:
  listeners: [{address: 127.0.0.1:8080}]
clients: []
retries: {max_cooldown_seconds: 60}
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
    credential: api_key
    api_key: k
  - name: west
    url: http://127.0.0.1:2
    credential: api_key
    api_key: k
",
        )
        .expect("valid configuration")
    }

    #[test]
    fn a_remote_cooldown_merges_into_the_local_state() {
        let cfg = cfg();
        let pool = PoolState::for_config(&cfg, None, None);
        let now = 1_000_000;
        let until = |d: &str, i: usize| pool.cooldowns[d][i].until_ms();
        // (backend, deployment, upstream, until, expected, resulting until of gpt-4o[1])
        let table: [(&str, &str, &str, u64, Applied, u64); 8] = [
            // the member named by all three names cools
            (
                "west",
                "gpt-4o",
                "gpt-4o-ptu",
                now + 5_000,
                Applied::Cooled,
                now + 5_000,
            ),
            // a shorter one does not shorten it, an equal one changes nothing
            (
                "west",
                "gpt-4o",
                "gpt-4o-ptu",
                now + 2_000,
                Applied::Unchanged,
                now + 5_000,
            ),
            (
                "west",
                "gpt-4o",
                "gpt-4o-ptu",
                now + 5_000,
                Applied::Unchanged,
                now + 5_000,
            ),
            // a longer one extends it, capped at max_cooldown (60 s) from now
            (
                "west",
                "gpt-4o",
                "gpt-4o-ptu",
                now + 3_600_000,
                Applied::Cooled,
                now + 60_000,
            ),
            // one that is over already changes nothing
            (
                "west",
                "gpt-4o",
                "gpt-4o-ptu",
                now - 1,
                Applied::Unchanged,
                now + 60_000,
            ),
            // names this configuration does not have
            (
                "west",
                "gpt-4o",
                "gpt-4o",
                now + 5_000,
                Applied::Unknown,
                now + 60_000,
            ),
            (
                "north",
                "gpt-4o",
                "gpt-4o-ptu",
                now + 5_000,
                Applied::Unknown,
                now + 60_000,
            ),
            (
                "west",
                "nope",
                "gpt-4o-ptu",
                now + 5_000,
                Applied::Unknown,
                now + 60_000,
            ),
        ];
        for (b, d, u, t, expected, after) in table {
            assert_eq!(
                apply_cooldown(&pool, &cfg, b, d, u, t, now),
                expected,
                "{b}/{d}/{u} until {t}"
            );
            assert_eq!(until("gpt-4o", 1), after, "{b}/{d}/{u} until {t}");
        }
        // the other members are untouched: same backend, other client-facing deployment
        assert_eq!(until("gpt-4o", 0), 0);
        assert_eq!(until("mini", 0), 0);
        assert_eq!(
            apply_cooldown(&pool, &cfg, "west", "mini", "mini", now + 1_000, now),
            Applied::Cooled
        );
        assert_eq!(until("mini", 0), now + 1_000);
    }
}
