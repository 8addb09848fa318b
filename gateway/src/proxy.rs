//! The request path. Pingora's native proxy path cannot see the body before it picks an
//! upstream and cannot replay a body over 64 KiB (../shared/notes/pingora-0.9.md), and this
//! gateway needs both: so a request's body is read whole (bounded), the filters run, then
//! the gateway's own attempt loop sends it to a backend over a pooled connection and streams
//! the chosen response back.
//!
//! HTTP/1.x clients are served on the gateway's own codec (`h1`, measured several times
//! cheaper per request than Pingora's HTTP session); HTTP/2 clients (ALPN on a TLS listener)
//! go through Pingora's HTTP/2 session and `ProxyHttp::request_filter`. Both reach the same
//! `Gateway::serve`, generic over the [`Downstream`] they answer on.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use filters::cert::PeerCert;
use filters::identity::Presented;
use filters::tokens::{JsonTail, SseTracker, Usage};
use filters::{FilterContext, Operation, Outcome, Phase};
use pingora::apps::ServerApp;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::{HttpProxy, ProxyHttp, Session};
use pingora::server::ShutdownWatch;
use pingora::time::fast_timeout::fast_timeout;
use pingora::upstreams::peer::HttpPeer;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::observe::audit::{AuditLog, AuditRecord};
use crate::body::RequestBody;
use crate::config::runtime::{Credential, Deployment};
use crate::deadline::timeout_at;
use crate::front::downstream::{Downstream, ReadError, Session2, H1};
use crate::errors::{ErrorCode, GatewayError};
use crate::http1::framing::{forward_downstream, forward_upstream, MAX_INTERIM};
use crate::http1::{BodyReader, Collected, Conn, Framing, H1Error, Head, Name, RespHead, Text};
use crate::observe::metrics::{Label, Metrics};
use crate::upstream::select::{cooldown_for, now_ms, pick, unix_ms, Candidate, Pick};
use crate::observe::request_id::RequestId;
use crate::route::{classify, Route};
use crate::state::Snapshot;
use crate::upstream::pool::{Upstream, Upstreams};
use crate::upstream::token::UpstreamToken;

/// A failed answer kept to be returned when every attempt failed is read up to this size.
/// Bodies up to this size are copied behind the request header and sent with it.
const ONE_WRITE_MAX_BODY: usize = 64 * 1024;
/// The kept body of a retried answer is capped at this size.
const MAX_KEPT_ERROR_BODY: usize = 256 * 1024;
/// The tail of a plain response kept to read its usage.
const USAGE_TAIL: usize = 64 * 1024;

pub struct Gateway {
    /// Requests in flight, for draining on shutdown and upgrade.
    pub in_flight: Arc<AtomicUsize>,
    pub state: Arc<ArcSwap<Snapshot>>,
    pub upstreams: Upstreams,
    pub token: Option<Arc<UpstreamToken>>,
    pub metrics: Arc<Metrics>,
    pub audit: AuditLog,
}

/// Counts a request in flight for as long as its context lives.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Per-request state (one per request, across all attempts).
pub struct Ctx {
    _in_flight: InFlight,
    start: Instant,
    /// The wall clock at `start` (read once: key expiry, cooldowns, the audit timestamp).
    started: SystemTime,
    /// Set when the response is done.
    elapsed: std::time::Duration,
    snap: Option<Arc<Snapshot>>,
    rec: AuditRecord,
    client_label: Arc<str>,
    operation: Option<Operation>,
    admission: Option<filters::limits::Admission>,
    reserved: u64,
    usage: Option<Usage>,
    rejected: Option<GatewayError>,
}

/// How handling ended when it did not end well.
enum Failure {
    /// Nothing was sent yet: answer this error.
    Answer(GatewayError),
    /// The response was under way, or the client is gone: the connection must be closed.
    Abort(String),
}

impl From<GatewayError> for Failure {
    fn from(e: GatewayError) -> Self {
        Failure::Answer(e)
    }
}

/// Where a backend connection goes back to once its answer is read: its pool, and since
/// when it has been quiet (the answer's head; earlier than the end, so never too late).
#[derive(Clone, Copy)]
struct Release {
    key: u64,
    since: Instant,
}

/// The path of the upstream request.
#[derive(Clone, Copy)]
enum UpstreamPath<'a> {
    /// The client's path (`/openai/v1/...`: the deployment is in the body).
    AsSent(&'a str),
    /// `/openai/deployments/{name}{rest}`, with the member's own deployment name.
    Deployment { name: &'a str, rest: &'a str },
}

/// What became of one attempt before a response header arrived.
enum AttemptError {
    Timeout,
    Failed(String),
}

/// The `client` of requests whose credential failed or was not needed, shared.
fn anonymous() -> Arc<str> {
    static ANON: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    ANON.get_or_init(|| Arc::from("anonymous")).clone()
}

/// The backend's own request id (`apim-request-id`, else `x-request-id`).
fn upstream_request_id(resp: &Head) -> Option<Text> {
    resp.get_text(Name::ApimRequestId)
        .or_else(|| resp.get_text(Name::XRequestId))
}

/// The head of an answer the gateway writes itself.
fn json_head(status: u16, request_id: RequestId) -> RespHead {
    let mut resp = RespHead::new(status);
    resp.add("content-type", "application/json");
    resp.add("x-request-id", request_id.text());
    resp
}

fn abort(e: impl std::fmt::Display) -> Failure {
    Failure::Abort(e.to_string())
}

/// After the shutdown signal, how long an idle client connection is still read from (the
/// supervisor waits longer than this before it checks that nothing is in flight).
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_millis(300);

impl Gateway {
    fn client_ip<D: Downstream>(&self, d: &D, snap: &Snapshot) -> Option<IpAddr> {
        let peer = d.client_addr()?;
        let trusted = &snap.cfg.server.trusted_proxies;
        if trusted.is_empty() {
            return Some(peer);
        }
        let head = d.head();
        Some(crate::pipeline::admit::client_ip(
            peer,
            trusted,
            head.all_str(Name::XAzureClientIp),
            head.all_str(Name::XForwardedFor),
        ))
    }

    /// `/healthz`: 200 when every configured deployment has an available member.
    pub fn health_answer(snap: &Snapshot) -> (u16, Bytes) {
        let now = now_ms();
        let mut missing = Vec::new();
        for name in &snap.cfg.deployment_names {
            let d = &snap.cfg.deployments[&**name];
            let cools = &snap.pool.cooldowns[&**name];
            let ok = d
                .members
                .iter()
                .zip(cools)
                .any(|(m, c)| snap.pool.health[m.backend].is_healthy() && c.until_ms() <= now);
            if !ok {
                missing.push(name.to_string());
            }
        }
        let status = if missing.is_empty() { 200 } else { 503 };
        let body = serde_json::json!({
            "status": if missing.is_empty() { "ok" } else { "degraded" },
            "unavailable_deployments": missing,
        });
        (status, Bytes::from(body.to_string()))
    }

    async fn write_simple<D: Downstream>(
        &self,
        d: &mut D,
        ctx: &Ctx,
        status: u16,
        body: Bytes,
        extra: &[(&str, String)],
    ) -> std::io::Result<()> {
        let mut resp = json_head(status, ctx.rec.request_id);
        for (k, v) in extra {
            resp.add(k, v.as_str());
        }
        d.send_full(&resp, &body).await
    }

    async fn answer_error<D: Downstream>(&self, d: &mut D, ctx: &mut Ctx, e: GatewayError) {
        ctx.rec.status = e.status();
        ctx.rec.error_code = Some(e.code.as_str());
        let headers: Vec<(&str, String)> = e.headers();
        let _ = self
            .write_simple(d, ctx, e.status(), e.body(), &headers)
            .await;
        ctx.rejected = Some(e);
    }

    async fn handle<D: Downstream>(
        &self,
        d: &mut D,
        ctx: &mut Ctx,
        snap: &Arc<Snapshot>,
    ) -> Result<(), Failure> {
        // A copy of the head (its buffer is shared) to borrow from while `d` is in use.
        let head = d.head().clone();
        let (method, path, query) = (head.method(), head.path(), head.query());
        ctx.rec.method = head.method_text();
        ctx.rec.path = head.path_text();

        if path == "/healthz" && (method == "GET" || method == "HEAD") {
            let (status, body) = Self::health_answer(snap);
            ctx.rec.status = status;
            self.write_simple(d, ctx, status, body, &[])
                .await
                .map_err(abort)?;
            return Ok(());
        }

        if let Some(why) = d.framing_error() {
            // Request-smuggling shapes are refused before anything else is looked at.
            return Err(GatewayError::with_message(
                ErrorCode::InvalidRequestBody,
                format!("The request's framing is invalid: {why}."),
            )
            .into());
        }

        let fdids = &snap.cfg.server.front_door_ids;
        if !fdids.is_empty() {
            let ok = head
                .get_str(Name::XAzureFdid)
                .is_some_and(|v| fdids.iter().any(|id| id.eq_ignore_ascii_case(v.trim())));
            if !ok {
                return Err(GatewayError::new(ErrorCode::ForbiddenOrigin).into());
            }
        }

        let route = classify(method, path);
        let (operation, path_deployment, rest) = match route {
            Route::NotSupported => {
                return Err(GatewayError::new(ErrorCode::OperationNotSupported).into())
            }
            Route::Models => (Operation::ModelsRead, None, ""),
            Route::InBody { operation } => (operation, None, ""),
            Route::InPath {
                operation,
                deployment,
                rest,
            } => (operation, Some(deployment), rest),
        };
        if let Some(d) = path_deployment.and_then(|d| snap.cfg.deployments.get(d)) {
            // Known before identity, so refusals are counted against it (configured names only).
            ctx.rec.deployment = Some(d.name.clone());
        }
        ctx.operation = Some(operation);
        ctx.rec.operation = Some(operation.as_str());

        // Identity, before any body byte is read.
        let presented =
            Presented::from_headers(head.get(Name::ApiKey), head.get(Name::Authorization));
        let presented = match presented {
            Ok(mut p) => {
                p.certificate = d.certificate();
                p
            }
            Err(e) => {
                ctx.rec.auth = if head.contains(Name::Authorization) {
                    "oidc"
                } else {
                    "api_key"
                };
                return Err(GatewayError::from(e).into());
            }
        };
        let mut fcx = FilterContext::at(presented, operation, ctx.started);
        ctx.rec.auth = fcx.presented.method().as_str();
        if let Outcome::Reject(e) = snap.chain.run(Phase::Headers, &mut fcx).await {
            return Err(GatewayError::from(e).into());
        }
        let identity = fcx.identity.clone().expect("identity filter sets identity");
        ctx.client_label = self.metrics.client_label(&identity.client_id);
        ctx.rec.client = identity.client_id.clone();
        ctx.rec.key_id = identity.key_id.clone();
        ctx.rec.user = identity.user.clone();
        ctx.rec.provider = identity.provider.clone();

        // The body, bounded.
        let raw = timeout_at(
            ctx.start + snap.cfg.server.request_timeout,
            d.read_body(snap.cfg.server.max_request_body_bytes),
        )
        .await
        .map_err(|_| abort("request body not received within the request timeout"))?
        .map_err(|e| match e {
            ReadError::TooLarge => Failure::Answer(GatewayError::new(ErrorCode::RequestTooLarge)),
            ReadError::Malformed(why) => Failure::Answer(GatewayError::with_message(
                ErrorCode::InvalidRequestBody,
                format!("The request body could not be read: {why}."),
            )),
            ReadError::Io(e) => Failure::Abort(e),
        })?;

        let mut body = if operation == Operation::ModelsRead {
            None
        } else {
            let ct = head.get_str(Name::ContentType).unwrap_or("");
            Some(RequestBody::inspect(raw, operation, rest, ct)?)
        };

        let deployment: Option<Arc<Deployment>> = if operation == Operation::ModelsRead {
            None
        } else {
            let name = match (path_deployment, &body) {
                (Some(d), _) => d,
                (None, Some(b)) => b.model().ok_or_else(|| {
                    GatewayError::with_message(
                        ErrorCode::InvalidRequestBody,
                        "The request body must name the deployment in `model`.",
                    )
                })?,
                (None, None) => "",
            };
            match snap.cfg.deployments.get(name) {
                Some(d) => Some(d.clone()),
                None => return Err(GatewayError::new(ErrorCode::DeploymentNotFound).into()),
            }
        };
        if let Some(d) = &deployment {
            fcx.deployment = Some(d.name.clone());
            ctx.rec.deployment = Some(d.name.clone());
        }

        // Token reservation, only where a token limit applies.
        if let (Some(d), Some(b)) = (&deployment, &body) {
            let limits = &snap.cfg.clients[identity.client].limits;
            if filters::limits_filter::has_token_limits(limits, &d.name) {
                let hint = d
                    .members
                    .first()
                    .map(|m| &*m.upstream_deployment)
                    .unwrap_or(&d.name);
                fcx.reserve_tokens = b
                    .reservation(
                        &snap.estimator,
                        operation,
                        hint,
                        snap.cfg.limits.default_completion_reservation,
                    )
                    .await;
            }
        }
        ctx.reserved = fcx.reserve_tokens;

        // Authorization, then limits.
        let outcome = snap.chain.run(Phase::Body, &mut fcx).await;
        ctx.admission = fcx.admission.take();
        if let Outcome::Reject(e) = outcome {
            return Err(GatewayError::from(e).into());
        }

        let Some(deployment) = deployment else {
            return self.answer_models(d, ctx, snap, identity.client).await;
        };
        let body = body.as_mut().expect("inference operations have a body");
        ctx.rec.stream = body.stream;
        let strip_usage = body.ensure_stream_usage(operation);

        self.proxy(
            d,
            ctx,
            snap,
            &deployment,
            body,
            rest,
            query,
            path,
            identity.jwt_authenticated,
            strip_usage,
        )
        .await
    }

    async fn answer_models<D: Downstream>(
        &self,
        d: &mut D,
        ctx: &mut Ctx,
        snap: &Snapshot,
        client: usize,
    ) -> Result<(), Failure> {
        let policy = &snap.cfg.clients[client].policy;
        let names = policy.visible(snap.cfg.deployment_names.iter().map(|n| &**n));
        let data: Vec<Value> = names
            .iter()
            .map(|n| serde_json::json!({"id": n, "object": "model", "created": 0, "owned_by": "aoai-gateway", "model": n, "status": "succeeded"}))
            .collect();
        let body = Bytes::from(serde_json::json!({"object": "list", "data": data}).to_string());
        ctx.rec.status = 200;
        self.write_simple(d, ctx, 200, body, &[])
            .await
            .map_err(abort)
    }

    /// The upstream request: its line, the client's headers without hop-by-hop ones and
    /// credentials, host, length and the backend's credential — and the body when it is
    /// small, so that all of it leaves in one `send`.
    #[allow(clippy::too_many_arguments)]
    fn upstream_request(
        head: &Head,
        path: UpstreamPath<'_>,
        query: Option<&str>,
        host: &str,
        body: &[u8],
        credential: &Credential,
        token: Option<&str>,
        caller_jwt: Option<&str>,
    ) -> Vec<u8> {
        let with_body = body.len() <= ONE_WRITE_MAX_BODY;
        // Room for what is forwarded of the client's head (at most all of it) and what is
        // added, so that it is allocated once and no larger than needed (small allocations
        // take the allocator's fast path).
        let added = match path {
            UpstreamPath::Deployment { name, .. } => name.len(),
            UpstreamPath::AsSent(_) => 0,
        } + host.len()
            + token.map_or(0, str::len)
            + caller_jwt.map_or(0, str::len)
            + match credential {
                Credential::ApiKey(k) => k.len(),
                _ => 0,
            };
        let mut out = Vec::with_capacity(
            head.wire_len() + added + 128 + if with_body { body.len() } else { 0 },
        );
        out.extend_from_slice(head.method().as_bytes());
        out.push(b' ');
        match path {
            UpstreamPath::AsSent(p) => out.extend_from_slice(p.as_bytes()),
            UpstreamPath::Deployment { name, rest } => {
                out.extend_from_slice(b"/openai/deployments/");
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(rest.as_bytes());
            }
        }
        if let Some(q) = query {
            out.push(b'?');
            out.extend_from_slice(q.as_bytes());
        }
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let mut line = |name: &[u8], value: &[u8]| {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        };
        for (_, name, value) in head.end_to_end_fields(forward_upstream) {
            line(name, value);
        }
        line(b"host", host.as_bytes());
        line(
            b"content-length",
            itoa::Buffer::new().format(body.len()).as_bytes(),
        );
        match credential {
            Credential::ApiKey(k) => line(b"api-key", k.as_bytes()),
            Credential::ManagedIdentity => {
                if let Some(t) = token {
                    line(b"authorization", t.as_bytes());
                }
            }
            Credential::Forward => {
                if let Some(j) = caller_jwt {
                    line(b"authorization", format!("Bearer {j}").as_bytes());
                }
            }
        }
        out.extend_from_slice(b"\r\n");
        if with_body {
            out.extend_from_slice(body);
        }
        out
    }

    /// Sends the request once — on a pooled connection that passed its reuse check, or a new
    /// one — and reads the final response head and its framing. Whatever fails after this,
    /// the caller never writes the request to this member again (the backend may have run
    /// it): the failure is this attempt's error.
    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        &self,
        peer: &HttpPeer,
        key: u64,
        wire: &[u8],
        body: &[u8],
        started: Instant,
        deadline: Instant,
        max_idle: std::time::Duration,
    ) -> Result<(Upstream, Head, Framing), AttemptError> {
        let body_apart = body.len() > ONE_WRITE_MAX_BODY;
        let mut conn = match self.upstreams.take(key, started, max_idle) {
            Some(c) => c,
            None => match timeout_at(deadline, self.upstreams.connect(peer)).await {
                Err(_) => return Err(AttemptError::Timeout),
                Ok(Err(e)) => return Err(AttemptError::Failed(format!("connect: {e}"))),
                Ok(Ok(c)) => c,
            },
        };
        let sent = timeout_at(deadline, async {
            conn.io.write_all(wire).await?;
            if body_apart {
                conn.io.write_all(body).await?;
            }
            conn.io.flush().await?;
            final_head(&mut conn).await
        })
        .await;
        match sent {
            Err(_) => Err(AttemptError::Timeout),
            Ok(Ok((head, framing))) => Ok((conn, head, framing)),
            Ok(Err(e)) => Err(AttemptError::Failed(e.to_string())),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn proxy<D: Downstream>(
        &self,
        d: &mut D,
        ctx: &mut Ctx,
        snap: &Arc<Snapshot>,
        deployment: &Arc<Deployment>,
        body: &RequestBody,
        rest: &str,
        query: Option<&str>,
        client_path: &str,
        jwt_authenticated: bool,
        strip_usage: bool,
    ) -> Result<(), Failure> {
        let deadline = ctx.start + snap.cfg.server.request_timeout;
        let retries = &snap.cfg.retries;
        let cools = &snap.pool.cooldowns[&*deployment.name];
        let members = &deployment.members;
        // The chooser's view of every member, on the stack for the usual few members;
        // `tried` carries over from one attempt to the next.
        const INLINE: usize = 8;
        let mut inline = [Candidate::default(); INLINE];
        let mut spilled = Vec::new();
        let cands: &mut [Candidate] = if members.len() <= INLINE {
            &mut inline[..members.len()]
        } else {
            spilled.resize(members.len(), Candidate::default());
            &mut spilled
        };
        let mut last_answer: Option<(Head, Bytes)> = None;
        let caller_jwt = if jwt_authenticated {
            d.head()
                .get_str(Name::Authorization)
                .and_then(|v| v.split_once(' ').map(|(_, t)| t.trim().to_string()))
        } else {
            None
        };

        for attempt in 0..retries.max_attempts {
            for (i, (m, c)) in members.iter().zip(cands.iter_mut()).enumerate() {
                let forward_unusable = snap.cfg.backends[m.backend].credential
                    == Credential::Forward
                    && caller_jwt.is_none();
                *c = Candidate {
                    priority: m.priority,
                    weight: m.weight,
                    healthy: snap.pool.health[m.backend].is_healthy(),
                    cooling_until_ms: cools[i].until_ms(),
                    tried: c.tried || forward_unusable,
                };
            }
            // The first attempt goes out at the request's start, as far as cooldowns (ms) go.
            let now = if attempt == 0 {
                unix_ms(ctx.started)
            } else {
                now_ms()
            };
            let i = match pick(cands, now, rand::random()) {
                Pick::Member(i) => i,
                Pick::AllCooling { retry_after_ms } if attempt == 0 => {
                    return Err(GatewayError::new(ErrorCode::BackendThrottled)
                        .retry_after(retry_after_ms)
                        .into())
                }
                Pick::AllDown if attempt == 0 => {
                    return Err(GatewayError::new(ErrorCode::BackendUnavailable).into())
                }
                Pick::Exhausted if attempt == 0 => {
                    // Only `forward` members, and the caller has no JWT.
                    return Err(GatewayError::with_message(
                        ErrorCode::Forbidden,
                        "This deployment is only reachable with an OIDC token.",
                    )
                    .into());
                }
                _ => break,
            };
            cands[i].tried = true;
            let member = &members[i];
            let backend = &snap.cfg.backends[member.backend];
            let peer = snap.peers[member.backend].load_full();
            let peer = &*peer;
            let key = Upstreams::key(peer);
            ctx.rec.attempts += 1;
            ctx.rec.backend = Some(backend.name.clone());
            ctx.rec.region = Some(backend.region.clone()).filter(|r| !r.is_empty());

            let token = match (&backend.credential, &self.token) {
                (Credential::ManagedIdentity, Some(t)) => match t.get().await {
                    Ok(t) => Some(t),
                    Err(e) => {
                        log::error!("{e}");
                        self.metrics
                            .upstream_attempts
                            .with_label_values(&[&backend.name, &deployment.name, "error"])
                            .inc();
                        continue;
                    }
                },
                _ => None,
            };
            let upstream_path = if client_path.starts_with("/openai/deployments/") {
                UpstreamPath::Deployment {
                    name: &member.upstream_deployment,
                    rest,
                }
            } else {
                UpstreamPath::AsSent(client_path)
            };
            let payload = body.for_upstream(&deployment.name, &member.upstream_deployment);
            let wire = Self::upstream_request(
                d.head(),
                upstream_path,
                query,
                &backend.host_header,
                &payload,
                &backend.credential,
                token.as_ref().map(|t| t.header.as_str()),
                caller_jwt.as_deref(),
            );
            let attempt_start = Instant::now();
            let (mut up, head, framing) = match self
                .exchange(
                    peer,
                    key,
                    &wire,
                    &payload,
                    attempt_start,
                    deadline,
                    snap.cfg.server.backend_idle,
                )
                .await
            {
                Ok(x) => x,
                Err(AttemptError::Timeout) => {
                    self.metrics
                        .upstream_attempts
                        .with_label_values(&[&backend.name, &deployment.name, "error"])
                        .inc();
                    return Err(GatewayError::new(ErrorCode::BackendTimeout).into());
                }
                Err(AttemptError::Failed(why)) => {
                    log::warn!(
                        "request {}: backend {} failed: {why}",
                        ctx.rec.request_id,
                        backend.name
                    );
                    self.metrics
                        .upstream_attempts
                        .with_label_values(&[&backend.name, &deployment.name, "error"])
                        .inc();
                    continue;
                }
            };
            let head_at = Instant::now();
            let ttfb = head_at - attempt_start;
            let back = Release {
                key,
                since: head_at,
            };
            let status = head.status;
            let series =
                self.metrics
                    .attempt_series(&backend.name, &deployment.name, status_label(status));
            series.attempts.inc();
            series.ttfb.observe(ttfb.as_secs_f64());

            if retries.on_status.contains(&status) {
                if status == 429 || status == 503 {
                    let cool = cooldown_for(
                        head.get(Name::RetryAfterMs),
                        head.get(Name::RetryAfter),
                        retries,
                    );
                    cools[i].cool_until(now_ms() + cool.as_millis() as u64);
                }
                // Keep this answer in case it is the last.
                let kept =
                    match timeout_at(deadline, read_capped(&mut up, framing, MAX_KEPT_ERROR_BODY))
                        .await
                    {
                        Ok(Ok((b, complete))) => {
                            if complete {
                                self.release(back, up, &head, framing);
                            }
                            b
                        }
                        _ => Bytes::new(),
                    };
                last_answer = Some((head, kept));
                continue;
            }

            ctx.rec.ttfb_ms = Some((head_at - ctx.start).as_millis() as u64);
            ctx.rec.upstream_request_id = upstream_request_id(&head);
            return self
                .stream_response(d, ctx, up, head, framing, back, deadline, strip_usage)
                .await;
        }

        // Every attempt failed: the last backend answer if there was one (a 429 keeps its
        // retry headers), else what went wrong without an answer.
        if let Some((resp, body)) = last_answer {
            return self.send_kept(d, ctx, resp, body).await;
        }
        Err(GatewayError::new(ErrorCode::BadGateway).into())
    }

    /// Returns the backend's own (failed) answer, e.g. its 429 with retry headers.
    async fn send_kept<D: Downstream>(
        &self,
        d: &mut D,
        ctx: &mut Ctx,
        resp: Head,
        body: Bytes,
    ) -> Result<(), Failure> {
        let out = self.downstream_header(&resp, ctx);
        ctx.rec.status = resp.status;
        ctx.rec.upstream_request_id = resp.get_text(Name::ApimRequestId);
        d.send_full(&out, &body).await.map_err(abort)
    }

    /// The client's response head from the backend's: hop-by-hop headers, its length and
    /// request id left out (the gateway sets its own), the gateway's x-ratelimit-* where it
    /// limits this client.
    fn downstream_header(&self, resp: &Head, ctx: &Ctx) -> RespHead {
        let mut out = RespHead::new(resp.status);
        // Where the gateway limits this client, its x-ratelimit-* replace the backend's
        // (a backend's fleet-wide numbers beside per-client ones would mislead).
        let own_limits = ctx.admission.is_some();
        let keep = |kind: Name, _: &[u8]| {
            forward_downstream(kind) && !(own_limits && kind == Name::RateLimit)
        };
        for (_, name, value) in resp.end_to_end_fields(keep) {
            out.add_parsed(name, value);
        }
        if let Some(a) = &ctx.admission {
            let h = &a.headers;
            for (k, v) in [
                ("x-ratelimit-limit-requests", h.limit_requests),
                ("x-ratelimit-remaining-requests", h.remaining_requests),
                ("x-ratelimit-limit-tokens", h.limit_tokens),
                ("x-ratelimit-remaining-tokens", h.remaining_tokens),
            ] {
                if let Some(v) = v {
                    out.add_u64(k, v);
                }
            }
        }
        out.add("x-request-id", ctx.rec.request_id.text());
        out
    }

    #[allow(clippy::too_many_arguments)]
    async fn stream_response<D: Downstream>(
        &self,
        d: &mut D,
        ctx: &mut Ctx,
        mut up: Upstream,
        resp: Head,
        framing: Framing,
        back: Release,
        deadline: Instant,
        strip_usage: bool,
    ) -> Result<(), Failure> {
        let status = resp.status;
        let is_sse = resp
            .get(Name::ContentType)
            .is_some_and(|v| v.starts_with(b"text/event-stream"));
        let out = self.downstream_header(&resp, ctx);
        ctx.rec.status = status;

        // A plain answer of known length (the usual JSON, or none: 204, 304) goes out in
        // one write.
        if let Framing::Length(n) = framing {
            if (n == 0 || !is_sse) && n as usize <= USAGE_TAIL {
                let body =
                    match timeout_at(deadline, read_capped(&mut up, framing, n as usize)).await {
                        Err(_) => return Err(GatewayError::new(ErrorCode::BackendTimeout).into()),
                        Ok(Err(e)) => {
                            log::warn!(
                                "request {}: backend failed mid-response: {e}",
                                ctx.rec.request_id
                            );
                            return Err(GatewayError::new(ErrorCode::BadGateway).into());
                        }
                        Ok(Ok((body, _))) => body,
                    };
                if status < 300 {
                    ctx.usage = filters::tokens::usage_in_json(&body);
                }
                self.release(back, up, &resp, framing);
                return d.send_full(&out, &body).await.map_err(abort);
            }
        }

        let mut reader = BodyReader::new(framing);
        d.send_stream_head(&out).await.map_err(abort)?;

        let mut sse = is_sse.then(|| SseTracker::new(strip_usage));
        let mut tail = (!is_sse && status < 300).then(|| JsonTail::new(USAGE_TAIL));
        loop {
            let chunk = match timeout_at(deadline, reader.next(&mut up)).await {
                Err(_) => {
                    log::warn!(
                        "request {}: whole-request timeout while streaming",
                        ctx.rec.request_id
                    );
                    return Err(abort("request timeout while streaming"));
                }
                Ok(Err(e)) => {
                    log::warn!(
                        "request {}: backend failed mid-response: {e}",
                        ctx.rec.request_id
                    );
                    return Err(abort(e));
                }
                Ok(Ok(c)) => c,
            };
            let Some(chunk) = chunk else { break };
            let send = match (&mut sse, &mut tail) {
                (Some(s), _) => s.push(&chunk),
                (None, Some(t)) => {
                    t.push(&chunk);
                    chunk
                }
                (None, None) => chunk,
            };
            if !send.is_empty() {
                if let Err(e) = d.send_chunk(send).await {
                    // The client went away: the upstream connection is dropped, not pooled.
                    log::info!(
                        "request {}: client disconnected mid-response",
                        ctx.rec.request_id
                    );
                    ctx.usage = sse.as_ref().and_then(|s| s.usage());
                    return Err(abort(e));
                }
            }
        }
        let last = sse.as_mut().map(|s| s.finish()).unwrap_or_default();
        ctx.usage = match (&sse, &tail) {
            (Some(s), _) => s.usage(),
            (None, Some(t)) => t.usage(),
            _ => None,
        };
        d.send_end(last).await.map_err(abort)?;
        self.release(back, up, &resp, framing);
        Ok(())
    }

    /// Pools a backend connection whose response was read to its end, unless the backend
    /// closes it (`Connection: close`, HTTP/1.0, a body delimited by the close).
    fn release(&self, back: Release, up: Upstream, resp: &Head, framing: Framing) {
        if framing != Framing::Close && resp.keep_alive() {
            self.upstreams.put(back.key, up, back.since);
        }
    }

    fn finish_record(&self, ctx: &mut Ctx) {
        let dep_label = ctx
            .rec
            .deployment
            .as_ref()
            .map_or(Label::Static(""), Label::Config);
        let op_label = ctx.operation.map(|o| o.as_str()).unwrap_or("");
        let client = Label::Config(&ctx.client_label);
        let status = ctx.rec.status;
        let series = self
            .metrics
            .request_series(client, dep_label, op_label, status_label(status));
        series.requests.inc();
        series.duration.observe(ctx.elapsed.as_secs_f64());
        if let Some(e) = &ctx.rejected {
            if let Some(reason) = e.rejection_reason() {
                self.metrics
                    .rejections
                    .with_label_values(&[&ctx.client_label, reason])
                    .inc();
            }
        }
        let counts_tokens = ctx.operation.is_some_and(|o| o.counts_tokens());
        let (usage, source) = match (ctx.usage, ctx.rec.attempts) {
            (Some(u), _) => (Some(u), "response"),
            (None, n) if n > 0 && counts_tokens && ctx.reserved > 0 => (
                Some(Usage {
                    prompt: ctx.reserved,
                    completion: 0,
                    total: ctx.reserved,
                }),
                "reserved",
            ),
            _ => (None, "none"),
        };
        if let (Some(u), Some(backend)) = (usage, &ctx.rec.backend) {
            let series = self.metrics.token_series(client, dep_label, backend);
            series.prompt.inc_by(u.prompt);
            series.completion.inc_by(u.completion);
        }
        ctx.rec.prompt_tokens = usage.map(|u| u.prompt);
        ctx.rec.completion_tokens = usage.map(|u| u.completion);
        ctx.rec.total_tokens = usage.map(|u| u.total);
        ctx.rec.usage_source = source;
    }
}

/// The status as a label: static strings, built once, so no allocation per request and no
/// unbounded label values.
fn status_label(status: u16) -> &'static str {
    static CODES: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    let codes = CODES.get_or_init(|| {
        (100..600u16)
            .map(|c| &*Box::leak(c.to_string().into_boxed_str()))
            .collect()
    });
    if (100..600).contains(&status) {
        codes[(status - 100) as usize]
    } else {
        "error"
    }
}

/// Reads a response body up to `cap` bytes; returns it and whether the body ended.
async fn read_capped(
    up: &mut Upstream,
    framing: Framing,
    cap: usize,
) -> Result<(Bytes, bool), H1Error> {
    let mut reader = BodyReader::new(framing);
    let mut body = Collected::default();
    while let Some(piece) = reader.next(up).await? {
        if body.len() + piece.len() > cap {
            return Ok((body.freeze(), false));
        }
        body.push(piece, 0);
    }
    Ok((body.freeze(), true))
}

/// The backend's final answer head and its framing, past at most [`MAX_INTERIM`] interim
/// (1xx) answers. A `101` to a request that asked for no upgrade, or framing that cannot be
/// trusted, is a bad answer: the attempt fails and the connection is dropped.
async fn final_head(up: &mut Upstream) -> Result<(Head, Framing), H1Error> {
    for _ in 0..=MAX_INTERIM {
        match up.read_head(true).await? {
            None => return Err(H1Error::Closed),
            Some(h) if h.status == 101 => {
                return Err(H1Error::Malformed(
                    "101 Switching Protocols to a request that asked for no upgrade",
                ))
            }
            // Interim answers (100 Continue, 103 Early Hints): the final one follows.
            Some(h) if h.status < 200 => continue,
            Some(h) => {
                let framing = h.response_framing(false)?;
                return Ok((h, framing));
            }
        }
    }
    Err(H1Error::Malformed("too many interim answers"))
}

impl Gateway {
    fn new_ctx(&self) -> Ctx {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Ctx {
            _in_flight: InFlight(self.in_flight.clone()),
            start: Instant::now(),
            started: SystemTime::now(),
            elapsed: std::time::Duration::ZERO,
            snap: None,
            rec: AuditRecord {
                request_id: RequestId::new(),
                client: anonymous(),
                auth: "none",
                usage_source: "none",
                ..Default::default()
            },
            client_label: anonymous(),
            operation: None,
            admission: None,
            reserved: 0,
            usage: None,
            rejected: None,
        }
    }

    /// Handles one request. `false`: the response broke off and the connection must close.
    async fn serve<D: Downstream>(&self, d: &mut D, ctx: &mut Ctx) -> bool {
        let snap = self.state.load_full();
        ctx.snap = Some(snap.clone());
        if let Some(ip) = self.client_ip(d, &snap) {
            ctx.rec.client_ip = Some(ip);
        }
        match self.handle(d, ctx, &snap).await {
            Ok(()) => true,
            Err(Failure::Answer(e)) => {
                self.answer_error(d, ctx, e).await;
                true
            }
            Err(Failure::Abort(why)) => {
                log::debug!("request {}: connection closed: {why}", ctx.rec.request_id);
                if ctx.rec.status == 0 {
                    ctx.rec.status = 502;
                }
                false
            }
        }
    }

    /// After the response: metrics, limit reconciliation, the audit line.
    async fn finish(&self, ctx: &mut Ctx) {
        // Front Door's /healthz probes are neither traffic nor audit events.
        if ctx.snap.is_none() || ctx.rec.path.as_bytes() == b"/healthz" {
            return;
        }
        ctx.elapsed = ctx.start.elapsed();
        self.finish_record(ctx);
        if let (Some(a), Some(snap)) = (ctx.admission.take(), &ctx.snap) {
            let actual = match ctx.rec.usage_source {
                "response" => ctx.rec.total_tokens,
                _ => None,
            };
            snap.limiter.reconcile(&a, actual).await;
        }
        let mut rec = std::mem::take(&mut ctx.rec);
        // The wall clock at the end, from the start and the monotonic duration.
        rec.ended = Some(time::OffsetDateTime::from(ctx.started + ctx.elapsed));
        rec.duration_ms = ctx.elapsed.as_millis() as u64;
        self.audit.log(rec);
    }

    /// Serves the requests of one HTTP/1.x connection, one after the other (pipelined ones
    /// included), until the client closes, asks to close, stays idle for
    /// `server.idle_timeout_seconds` (N to 2N), takes longer than
    /// `server.header_timeout_seconds` to send a head (408), sends something that is not
    /// HTTP/1.x (400), or the server shuts down.
    async fn serve_h1(&self, stream: Stream, shutdown: &ShutdownWatch) {
        let client = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let cert: Option<PeerCert> = stream
            .get_ssl_digest()
            .and_then(|d| d.extension.get::<PeerCert>().cloned());
        let (header_timeout, idle) = {
            let snap = self.state.load();
            (snap.cfg.server.header_timeout, snap.cfg.server.idle_timeout)
        };
        let mut conn = Conn::new(stream);
        conn.set_head_timeout(header_timeout);
        let mut out = Vec::with_capacity(4096);
        let mut shutdown = shutdown.clone();
        // One idle clock per connection rather than a timer per request: a connection on
        // which no request completed between two ticks is closed (idle N to 2N). After a
        // request that outlasted several ticks, one late tick fires, not a burst of them.
        let mut idle_tick = tokio::time::interval_at(tokio::time::Instant::now() + idle, idle);
        idle_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut served = false;
        'conn: loop {
            let head = if *shutdown.borrow() {
                // Shutting down: a request the client sent as the signal came is still
                // answered (with `connection: close`); a connection quiet for the grace
                // period is closed. Closing at once would cut such a request off.
                match fast_timeout(SHUTDOWN_GRACE, conn.read_head(false)).await {
                    Ok(r) => r,
                    Err(_) => break 'conn,
                }
            } else {
                loop {
                    // `read_head` keeps what it read in the connection's buffer: dropping it
                    // for a tick or the shutdown signal loses nothing.
                    tokio::select! {
                        biased;
                        r = conn.read_head(false) => break r,
                        changed = shutdown.changed() => {
                            if changed.is_err() {
                                break 'conn;
                            }
                            continue 'conn;
                        }
                        _ = idle_tick.tick() => {
                            if !std::mem::replace(&mut served, false) {
                                break 'conn;
                            }
                        }
                    }
                }
            };
            let head = match head {
                Ok(Some(h)) => h,
                Err(e @ (H1Error::Malformed(_) | H1Error::HeadTooLarge | H1Error::HeadTimeout)) => {
                    log::debug!("client {client:?}: {e}");
                    let (kind, e) = match e {
                        H1Error::HeadTimeout => {
                            ("timeout", GatewayError::new(ErrorCode::RequestTimeout))
                        }
                        H1Error::HeadTooLarge => (
                            "malformed",
                            GatewayError::with_message(
                                ErrorCode::InvalidRequestBody,
                                "The request head is too large.",
                            ),
                        ),
                        _ => (
                            "malformed",
                            GatewayError::with_message(
                                ErrorCode::InvalidRequestBody,
                                "The request is not valid HTTP/1.1.",
                            ),
                        ),
                    };
                    self.metrics
                        .downstream_errors
                        .with_label_values(&[kind])
                        .inc();
                    let resp = json_head(e.status(), RequestId::new());
                    let body = e.body();
                    out.clear();
                    resp.encode(&mut out, crate::http1::OutFraming::Length(body.len()), true);
                    out.extend_from_slice(&body);
                    let _ = conn.send(&out).await;
                    break;
                }
                // Closed, idle too long, or a broken connection.
                _ => break,
            };
            let closing = *shutdown.borrow();
            let mut d = H1::new(&mut conn, head, client, &cert, &mut out, closing);
            let mut ctx = self.new_ctx();
            let reusable = self.serve(&mut d, &mut ctx).await && d.reusable();
            self.finish(&mut ctx).await;
            served = true;
            if !reusable {
                break;
            }
        }
        let _ = timeout_at(
            Instant::now() + std::time::Duration::from_secs(1),
            conn.io.shutdown(),
        )
        .await;
    }
}

/// The listeners' application: HTTP/1.x on the gateway's codec, HTTP/2 through Pingora.
pub struct Front {
    gateway: Arc<Gateway>,
    h2: Arc<HttpProxy<H2Gateway>>,
}

impl Front {
    pub fn new(
        gateway: Arc<Gateway>,
        conf: &Arc<pingora::server::configuration::ServerConf>,
    ) -> Self {
        let h2 = Arc::new(pingora::proxy::http_proxy(conf, H2Gateway(gateway.clone())));
        Front { gateway, h2 }
    }
}

#[async_trait]
impl ServerApp for Front {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if stream.selected_alpn_proto() == Some(ALPN::H2) {
            return self.h2.process_new(stream, shutdown).await;
        }
        self.gateway.serve_h1(stream, shutdown).await;
        None
    }
}

/// The gateway on Pingora's session, for HTTP/2 clients: everything happens in
/// `request_filter`, which answers every request itself.
pub struct H2Gateway(Arc<Gateway>);

#[async_trait]
impl ProxyHttp for H2Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        self.0.new_ctx()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
        let mut d = Session2::new(session);
        if self.0.serve(&mut d, ctx).await {
            Ok(true)
        } else {
            Err(pingora::Error::new_str("response broke off"))
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Ctx,
    ) -> pingora::Result<Box<HttpPeer>> {
        // Every request is answered in request_filter.
        Err(pingora::Error::new_str("no native upstream"))
    }

    async fn logging(&self, _session: &mut Session, _e: Option<&pingora::Error>, ctx: &mut Ctx) {
        self.0.finish(ctx).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_labels_are_static_and_bounded() {
        assert_eq!(status_label(200), "200");
        assert_eq!(status_label(429), "429");
        assert_eq!(status_label(599), "599");
        assert_eq!(status_label(0), "error");
        assert_eq!(status_label(700), "error");
    }
}
