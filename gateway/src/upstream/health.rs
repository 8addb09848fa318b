//! Active health checks: each backend is probed on `health_checks.path` (a models list costs
//! no tokens) with its own credential, every `interval_seconds`; it goes down after
//! `failures_before_down` failed probes in a row and up after `successes_before_up` good ones.
//! (The health and cooldown gauges are read from the pool when scraped, see
//! [`crate::observe::metrics::PoolReading`].)

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::connectors::http::v1::Connector;
use pingora::http::RequestHeader;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::config::runtime::Credential;
use crate::state::Snapshot;
use crate::upstream::token::UpstreamToken;

pub struct HealthChecker {
    pub state: Arc<ArcSwap<Snapshot>>,
    pub token: Option<Arc<UpstreamToken>>,
    pub connector: Connector,
}

/// Whether a probe's status means the backend is serving. 429 is throttling (handled by
/// cooldowns), not an outage; a `forward` backend answers 401/403 to a probe without the
/// caller's token and is still up.
pub fn probe_ok(status: u16, credential: &Credential) -> bool {
    (200..300).contains(&status)
        || status == 429
        || (*credential == Credential::Forward && (status == 401 || status == 403))
}

impl HealthChecker {
    /// Azure endpoints sit behind DNS that can change: each probe round looks the host up
    /// again and moves new connections to a changed address (pooled ones age out).
    async fn re_resolve(&self, snap: &Snapshot, i: usize) {
        let b = &snap.cfg.backends[i];
        let Ok(Ok(addrs)) = tokio::time::timeout(
            snap.cfg.health.timeout,
            tokio::net::lookup_host((b.host.as_str(), b.port)),
        )
        .await
        else {
            return; // keep the last good address
        };
        let addrs: Vec<std::net::SocketAddr> = addrs.collect();
        let current = snap.peers[i].load().http._address.as_inet().copied();
        if addrs.is_empty() || addrs.iter().any(|a| Some(*a) == current) {
            return;
        }
        match crate::state::peer_at(b, addrs[0]) {
            Ok(peer) => {
                log::warn!(
                    "backend {}: {} now resolves to {}",
                    b.name,
                    b.host,
                    addrs[0]
                );
                snap.peers[i].store(Arc::new(crate::state::Peer::new(peer)));
            }
            Err(e) => log::error!("{e}"),
        }
    }

    async fn probe(&self, snap: &Snapshot, i: usize) -> bool {
        let b = &snap.cfg.backends[i];
        let timeout = snap.cfg.health.timeout;
        self.re_resolve(snap, i).await;
        let peer = snap.peers[i].load_full();
        let peer = &peer.http;
        let Ok(mut req) = RequestHeader::build("GET", snap.cfg.health.path.as_bytes(), Some(3))
        else {
            return false;
        };
        let _ = req.insert_header("host", b.host_header.as_str());
        let _ = req.insert_header("content-length", "0");
        match &b.credential {
            Credential::ApiKey(k) => {
                let _ = req.insert_header("api-key", k.as_str());
            }
            Credential::ManagedIdentity => {
                if let Some(t) = &self.token {
                    // Waits only for the first fetch at start-up, never for a refresh.
                    match t.get().await {
                        Ok(t) => {
                            let _ = req.insert_header("authorization", t.header.as_str());
                        }
                        // No token is the gateway's problem, not the backend's.
                        Err(_) => return snap.pool.health[i].is_healthy(),
                    }
                }
            }
            Credential::Forward => {}
        }
        let result = tokio::time::timeout(timeout, async {
            let (mut http, _) = self.connector.get_http_session(peer).await?;
            http.write_request_header(Box::new(req)).await?;
            http.finish_body().await?;
            http.read_response().await?;
            let status = http.resp_header().map(|r| r.status.as_u16()).unwrap_or(0);
            while http.read_body_bytes().await?.is_some() {}
            self.connector.release_http_session(http, peer, None).await;
            Ok::<u16, Box<pingora::Error>>(status)
        })
        .await;
        match result {
            Ok(Ok(status)) => probe_ok(status, &b.credential),
            Ok(Err(e)) => {
                log::warn!("health check of {} failed: {e}", b.name);
                false
            }
            Err(_) => {
                log::warn!("health check of {} timed out", b.name);
                false
            }
        }
    }

    async fn round(&self) -> Duration {
        let snap = self.state.load_full();
        let probes = (0..snap.cfg.backends.len()).map(|i| {
            let snap = snap.clone();
            async move { (i, self.probe(&snap, i).await) }
        });
        let results = futures::future::join_all(probes).await;
        if !Arc::ptr_eq(&snap, &self.state.load_full()) {
            // A reload happened meanwhile: these backends may be gone; the next round
            // probes the new configuration.
            return Duration::from_millis(100);
        }
        for (i, ok) in results {
            let b = &snap.cfg.backends[i];
            let h = &snap.pool.health[i];
            let was = h.is_healthy();
            let now = h.record(
                ok,
                snap.cfg.health.successes_before_up,
                snap.cfg.health.failures_before_down,
            );
            if was != now {
                log::warn!(
                    "backend {} is now {}",
                    b.name,
                    if now { "healthy" } else { "down" }
                );
            }
        }
        snap.cfg.health.interval
    }
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let wait = self.round().await;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_statuses() {
        assert!(probe_ok(200, &Credential::ManagedIdentity));
        assert!(probe_ok(429, &Credential::ManagedIdentity));
        assert!(!probe_ok(500, &Credential::ManagedIdentity));
        assert!(!probe_ok(401, &Credential::ManagedIdentity));
        assert!(probe_ok(401, &Credential::Forward));
    }
}
