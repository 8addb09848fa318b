//! The realtime stage (SPEC §12): after identity, a WebSocket opening is checked, its
//! deployment looked up and authorized, the session admitted (one request, nothing
//! reserved), a member's WebSocket opened with the gateway's own credential and the
//! member's deployment name — failing over only until that upgrade completes — and only
//! then is the client answered `101` and the session relayed (`crate::realtime`). Anything
//! refused before that is the usual JSON error, and reaches no backend.

use std::sync::Arc;
use std::time::Instant;

use filters::identity::Identity;
use filters::{Operation, Planned};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::WebSocketStream;

use super::failover::{self, Next, Verdict};
use super::outcome::{Ending, Tried};
use super::{bearer, client_gone, Ctx, Failure, Gateway};
use crate::config::runtime::{Credential, Deployment};
use crate::deadline::timeout_at;
use crate::errors::{ErrorCode, GatewayError};
use crate::front::downstream::Downstream;
use crate::http1::{Head, Name};
use crate::observe::metrics::{status_label, Label};
use crate::realtime::protocol::{
    check_opening, deployment_param, query_param, switching_protocols, upstream_query, Opening,
};
use crate::realtime::{relay, ws_config, Governor};
use crate::state::Snapshot;
use crate::upstream::pool::Io;
use crate::upstream::select::{now_ms, Candidate};

/// Every value of a `sec-websocket-*` field named `name` (lower case).
fn ws_fields<'h>(head: &'h Head, name: &str) -> Vec<&'h str> {
    head.fields()
        .filter(|(kind, n, _)| {
            *kind == Name::SecWebSocket && n.eq_ignore_ascii_case(name.as_bytes())
        })
        .filter_map(|(_, _, v)| std::str::from_utf8(v).ok())
        .collect()
}

impl Gateway {
    pub(super) async fn realtime<D: Downstream>(
        &self,
        d: &mut D,
        ctx: &mut Ctx,
        snap: &Arc<Snapshot>,
        head: &Head,
        identity: &Identity,
        v1: bool,
    ) -> Result<(), Failure> {
        let bad = |m: &'static str| GatewayError::with_message(ErrorCode::InvalidRequestBody, m);
        if !d.can_upgrade() {
            return Err(bad(crate::realtime::protocol::UpgradeError::NotHttp11.message()).into());
        }
        let opening = Opening {
            method: head.method(),
            minor: head.minor,
            upgrade: head.all_str(Name::Upgrade).collect(),
            connection: head.all_str(Name::Connection).collect(),
            version: ws_fields(head, "sec-websocket-version"),
            key: ws_fields(head, "sec-websocket-key"),
            body: head.contains(Name::TransferEncoding)
                || head.get(Name::ContentLength).is_some_and(|v| v != b"0"),
        };
        let key = check_opening(&opening).map_err(|e| bad(e.message()))?;
        let param = deployment_param(v1);
        let Some(name) = query_param(head.query(), param) else {
            return Err(GatewayError::with_message(
                ErrorCode::InvalidRequestBody,
                format!("A realtime session names its deployment in the query: `{param}=`."),
            )
            .into());
        };
        let Some(deployment) = snap.cfg.deployments.get(name).cloned() else {
            return Err(GatewayError::new(ErrorCode::DeploymentNotFound).into());
        };
        ctx.outcome.deployment = Some(deployment.name.clone());
        let planned = Planned {
            identity,
            operation: Operation::Realtime,
            deployment: Some(&deployment.name),
            reserve_tokens: 0,
            now: ctx.started,
        };
        // Kept by the session (usage is charged to it as it comes), not by the outcome: the
        // end of the request must not reconcile it again.
        let session = snap.chain.admit(&planned).await?;
        let caller_jwt = identity.jwt_authenticated.then(|| bearer(head)).flatten();
        let mut upstream = self
            .realtime_connect(ctx, snap, &deployment, head, param, caller_jwt)
            .await?;

        // The member took the session: answer the client.
        let accept = derive_accept_key(key.as_bytes());
        let settings = snap.cfg.server.realtime;
        let Some((io, read_ahead)) = d.take_over() else {
            return Err(bad("This connection cannot be upgraded.").into());
        };
        let id = ctx.outcome.request_id.to_string();
        io.write_all(switching_protocols(&accept, &id).as_bytes())
            .await
            .map_err(client_gone)?;
        io.flush().await.map_err(client_gone)?;
        ctx.outcome.ending = Ending::Answered(101);
        ctx.outcome.ttfb = Some(ctx.start.elapsed());
        let mut client = WebSocketStream::from_partially_read(
            io,
            read_ahead,
            Role::Server,
            Some(ws_config(&settings)),
        )
        .await;

        let client_label = ctx.outcome.caller.label.clone();
        let backend = ctx
            .outcome
            .tried
            .as_ref()
            .map_or_else(|| Arc::from(""), |t| t.backend.clone());
        let metrics = &self.metrics;
        let refused = |reason: &'static str| {
            metrics
                .rejections
                .with_label_values(&[&client_label, reason])
                .inc();
        };
        let gov = Governor {
            limiter: &snap.limiter,
            client_id: &identity.client_id,
            user: identity.user.as_deref(),
            deployment: &deployment.name,
            limits: &snap.cfg.clients[identity.client].limits,
            session: session.as_ref(),
            tokens: metrics.token_series(
                Label::Config(&client_label),
                Label::Config(&deployment.name),
                &backend,
            ),
            refused: &refused,
        };
        let opened = Instant::now();
        metrics.realtime_sessions.inc();
        let summary = relay(&mut client, &mut upstream, &gov, &settings).await;
        metrics.realtime_sessions.dec();
        metrics
            .realtime_duration
            .observe(opened.elapsed().as_secs_f64());
        log::debug!(
            "request {}: realtime session ended ({:?}), {} responses, {} refused",
            ctx.outcome.request_id,
            summary.end,
            summary.responses,
            summary.refused
        );
        if summary.responses > 0 {
            let u = summary.usage;
            ctx.outcome.usage = Some(filters::tokens::Usage {
                prompt: u.input,
                completion: u.output,
                total: u.total,
                details: filters::tokens::Details {
                    cached_prompt: Some(u.cached_input),
                    reasoning: None,
                    audio_prompt: Some(u.audio_input),
                    audio_completion: Some(u.audio_output),
                },
            });
        }
        Ok(())
    }

    /// Opens a member's WebSocket: members in the failover order (SPEC §7), each with the
    /// gateway's own credential for its backend, until one answers `101`.
    async fn realtime_connect(
        &self,
        ctx: &mut Ctx,
        snap: &Snapshot,
        deployment: &Deployment,
        head: &Head,
        param: &str,
        caller_jwt: Option<&str>,
    ) -> Result<WebSocketStream<Io>, Failure> {
        let members = &deployment.members;
        let cools = &snap.pool.cooldowns[&*deployment.name];
        let deadline = ctx.deadline(snap);
        let config = ws_config(&snap.cfg.server.realtime);
        let mut tried = vec![false; members.len()];
        let mut last: Option<GatewayError> = None;
        for attempt in 0..snap.cfg.retries.max_attempts {
            let cands: Vec<Candidate> = members
                .iter()
                .zip(cools.iter())
                .zip(&tried)
                .map(|((m, c), &t)| Candidate {
                    priority: m.priority,
                    weight: m.weight,
                    healthy: snap.pool.health[m.backend].is_healthy(),
                    cooling_until_ms: c.until_ms(),
                    tried: t
                        || (snap.cfg.backends[m.backend].credential == Credential::Forward
                            && caller_jwt.is_none()),
                    // Realtime sessions reserve no tokens up front: capacity is not checked.
                    short: None,
                })
                .collect();
            let i = match failover::next_member(attempt, &cands, now_ms(), rand::random()) {
                Next::Try(i) => i,
                Next::Refuse(e) => return Err(e.into()),
                Next::Stop => break,
            };
            tried[i] = true;
            let member = &members[i];
            let backend = &snap.cfg.backends[member.backend];
            ctx.outcome.attempts += 1;
            ctx.outcome.tried = Some(Tried {
                backend: backend.name.clone(),
                region: Some(backend.region.clone()).filter(|r| !r.is_empty()),
            });
            let failed = || {
                self.metrics
                    .upstream_attempts
                    .with_label_values(&[&backend.name, &deployment.name, "error"])
                    .inc();
            };
            let auth: Option<(&str, String)> = match (&backend.credential, &self.token, caller_jwt)
            {
                (Credential::ApiKey(k), _, _) => Some(("api-key", k.clone())),
                (Credential::ManagedIdentity, Some(t), _) => match t.get().await {
                    Ok(t) => Some(("authorization", t.header.clone())),
                    Err(e) => {
                        log::error!("backend {}: {e}", backend.name);
                        failed();
                        last = Some(GatewayError::with_message(
                            ErrorCode::BackendUnavailable,
                            "The gateway has no valid managed-identity token for this backend; see the gateway's log.",
                        ));
                        continue;
                    }
                },
                (Credential::Forward, _, Some(jwt)) => {
                    Some(("authorization", format!("Bearer {jwt}")))
                }
                _ => None,
            };
            let query = upstream_query(head.query(), param, &member.upstream_deployment);
            let url = format!("ws://{}{}?{}", backend.host_header, head.path(), query);
            let mut request = match url.into_client_request() {
                Ok(r) => r,
                Err(e) => {
                    log::warn!("backend {}: realtime request: {e}", backend.name);
                    failed();
                    continue;
                }
            };
            let headers = request.headers_mut();
            if let Some((name, value)) = auth {
                match http::HeaderValue::from_str(&value) {
                    Ok(v) => {
                        headers.insert(name, v);
                    }
                    Err(_) => {
                        failed();
                        continue;
                    }
                }
            }
            if let Ok(v) = http::HeaderValue::from_str(&ctx.outcome.request_id.to_string()) {
                headers.insert("x-ms-client-request-id", v);
            }
            let peer = snap.peers[member.backend].load_full();
            let started = Instant::now();
            let conn = match timeout_at(deadline, self.upstreams.connect(&peer.http)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    log::warn!("backend {}: realtime connect failed: {e}", backend.name);
                    failed();
                    continue;
                }
                Err(_) => {
                    failed();
                    return Err(GatewayError::new(ErrorCode::BackendTimeout).into());
                }
            };
            let handshake =
                tokio_tungstenite::client_async_with_config(request, conn.io, Some(config));
            let status = match timeout_at(deadline, handshake).await {
                Ok(Ok((ws, resp))) => {
                    let series = self.metrics.attempt_series(
                        &backend.name,
                        &deployment.name,
                        status_label(resp.status().as_u16()),
                    );
                    series.attempts.inc();
                    series.ttfb.observe(started.elapsed().as_secs_f64());
                    ctx.outcome.upstream_request_id = None;
                    return Ok(ws);
                }
                Ok(Err(WsError::Http(resp))) => {
                    let status = resp.status().as_u16();
                    self.metrics
                        .attempt_series(&backend.name, &deployment.name, status_label(status))
                        .attempts
                        .inc();
                    let header = |n: &str| resp.headers().get(n).map(|v| v.as_bytes());
                    match failover::verdict(
                        status,
                        header("retry-after-ms"),
                        header("retry-after"),
                        &snap.cfg.retries,
                    ) {
                        Verdict::Retry { cool } => {
                            if let Some(cool) = cool {
                                let until = now_ms() + cool.as_millis() as u64;
                                cools[i].cool_until(until);
                                snap.fleet.cooled(&snap.cfg, deployment, i, until);
                            }
                        }
                        Verdict::Deliver => return Err(refused_by_backend(status).into()),
                    }
                    status
                }
                Ok(Err(e)) => {
                    log::warn!("backend {}: realtime upgrade failed: {e}", backend.name);
                    failed();
                    continue;
                }
                Err(_) => {
                    failed();
                    return Err(GatewayError::new(ErrorCode::BackendTimeout).into());
                }
            };
            last = Some(refused_by_backend(status));
        }
        Err(last
            .unwrap_or_else(|| GatewayError::new(ErrorCode::BadGateway))
            .into())
    }
}

/// A backend that answered the upgrade with something else than `101`: 429 stays a 429
/// (throttled), anything else is a bad gateway naming the status.
fn refused_by_backend(status: u16) -> GatewayError {
    if status == 429 {
        GatewayError::with_message(
            ErrorCode::BackendThrottled,
            "Every member of this deployment throttled the realtime session.",
        )
    } else {
        GatewayError::with_message(
            ErrorCode::BadGateway,
            format!("The backend refused the realtime session with status {status}."),
        )
    }
}
