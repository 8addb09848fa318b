//! The admin listener: `/metrics` (Prometheus text), `/healthz` (as on every listener) and
//! `/status` (backends, health, cooldowns, capacity reports — no secrets).

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::observe::metrics::Metrics;
use crate::pipeline::health_answer;
use crate::state::Snapshot;
use crate::upstream::select::now_ms;

pub struct Admin {
    pub state: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .body(body)
        .expect("valid response")
}

/// The `/status` document.
pub fn status_json(snap: &Snapshot) -> serde_json::Value {
    let now = now_ms();
    let backends: Vec<_> = snap
        .cfg
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            serde_json::json!({
                "name": &*b.name,
                "region": &*b.region,
                "url": format!("{}://{}", if b.tls { "https" } else { "http" }, b.host_header),
                "credential": match b.credential {
                    crate::config::runtime::Credential::ManagedIdentity => "managed_identity",
                    crate::config::runtime::Credential::ApiKey(_) => "api_key",
                    crate::config::runtime::Credential::Forward => "forward",
                },
                "healthy": snap.pool.health[i].is_healthy(),
            })
        })
        .collect();
    let deployments: serde_json::Map<String, serde_json::Value> = snap
        .cfg
        .deployment_names
        .iter()
        .map(|name| {
            let d = &snap.cfg.deployments[&**name];
            let members: Vec<_> = d
                .members
                .iter()
                .zip(&snap.pool.cooldowns[&**name])
                .map(|(m, c)| {
                    serde_json::json!({
                        "backend": &*snap.cfg.backends[m.backend].name,
                        "deployment": &*m.upstream_deployment,
                        "priority": m.priority,
                        "weight": m.weight,
                        "cooldown_remaining_ms": c.until_ms().saturating_sub(now),
                    })
                })
                .collect();
            (name.to_string(), serde_json::Value::Array(members))
        })
        .collect();
    serde_json::json!({
        "backends": backends,
        "deployments": deployments,
        "oidc_providers": snap.oidc.as_ref().map(|o| o.status().len()).unwrap_or(0),
        "oidc_token_cache": snap.oidc.as_ref().map(|o| {
            let c = o.cache_stats();
            serde_json::json!({"entries": c.entries, "hits": c.hits, "misses": c.misses})
        }),
        "clients": snap.cfg.clients.len(),
        "capacity": capacity_json(snap, now),
        "fleet": {
            "state_store_up": snap.fleet.store_up(),
            "revoked_keys": snap.fleet.revoked.len(),
        },
    })
}

/// The last capacity report of every (backend, upstream deployment) pair that has one:
/// `[{backend, deployment, remaining_tokens, remaining_requests, age_ms}]` (SPEC §14).
fn capacity_json(snap: &Snapshot, now: u64) -> serde_json::Value {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for name in &snap.cfg.deployment_names {
        let (Some(d), Some(caps)) = (
            snap.cfg.deployments.get(&**name),
            snap.pool.capacity.get(&**name),
        ) else {
            continue;
        };
        for (m, c) in d.members.iter().zip(caps) {
            let backend = &*snap.cfg.backends[m.backend].name;
            let (Some(r), true) = (c.report(), seen.insert((backend, &*m.upstream_deployment)))
            else {
                continue;
            };
            out.push(serde_json::json!({
                "backend": backend,
                "deployment": &*m.upstream_deployment,
                "remaining_tokens": r.tokens,
                "remaining_requests": r.requests,
                "age_ms": now.saturating_sub(r.at_ms),
            }));
        }
    }
    serde_json::Value::Array(out)
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let snap = self.state.load_full();
        match path.as_str() {
            "/metrics" => reply(200, "text/plain; version=0.0.4", self.metrics.render()),
            "/healthz" => {
                let (status, body) = health_answer(&snap);
                reply(status, "application/json", body.to_vec())
            }
            "/status" => reply(
                200,
                "application/json",
                status_json(&snap).to_string().into_bytes(),
            ),
            _ => reply(
                404,
                "application/json",
                br#"{"error":{"code":"NotFound","message":"/metrics, /healthz or /status"}}"#
                    .to_vec(),
            ),
        }
    }
}
