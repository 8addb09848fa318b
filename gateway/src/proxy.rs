//! The request path. Pingora's native proxy path cannot see the body before it picks an
//! upstream and cannot replay a body over 64 KiB (../shared/notes/pingora-0.9.md), and this
//! gateway needs both: so `request_filter` reads the whole body (bounded), runs the filters,
//! then runs its own attempt loop over pingora's pooled HTTP/1.1 connector and streams the
//! chosen response to the client itself, returning `Ok(true)` ("answered").

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use filters::identity::Presented;
use filters::tokens::{JsonTail, SseTracker, Usage};
use filters::{FilterContext, Operation, Outcome, Phase};
use pingora::connectors::http::v1::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::v1::client::{http_req_header_to_wire, HttpSession};
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use serde_json::Value;
use tokio::time::timeout_at;

use crate::audit::{AuditLog, AuditRecord};
use crate::body::{self, RequestBody};
use crate::config::runtime::{Credential, Deployment};
use crate::errors::{ErrorCode, GatewayError};
use crate::metrics::Metrics;
use crate::pool::{cooldown_for, now_ms, pick, Candidate, Pick};
use crate::route::{classify, Route};
use crate::state::Snapshot;
use crate::upstream_token::UpstreamToken;

/// Headers that never go upstream: hop-by-hop, and the client's credentials.
const STRIP_UPSTREAM: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "accept-encoding",
    "api-key",
    "authorization",
    "cookie",
    "expect",
];

/// Hop-by-hop response headers the gateway sets itself.
const STRIP_DOWNSTREAM: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "set-cookie",
];

/// A failed answer kept to be returned when every attempt failed is read up to this size.
const MAX_KEPT_ERROR_BODY: usize = 256 * 1024;
/// The tail of a plain response kept to read its usage.
const USAGE_TAIL: usize = 64 * 1024;

pub struct Gateway {
    /// Requests in flight, for draining on shutdown and upgrade.
    pub in_flight: Arc<AtomicUsize>,
    pub state: Arc<ArcSwap<Snapshot>>,
    pub connector: Connector,
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
    request_id: String,
    snap: Option<Arc<Snapshot>>,
    rec: AuditRecord,
    client_label: Arc<str>,
    operation: Option<Operation>,
    deployment: Option<Arc<str>>,
    admission: Option<filters::limits::Admission>,
    reserved: u64,
    usage: Option<Usage>,
    rejected: Option<GatewayError>,
}

/// How handling ended when it did not end well.
enum Failure {
    /// Nothing was sent yet: answer this error.
    Answer(GatewayError),
    /// The response was under way: the connection must be closed.
    Abort(Box<pingora::Error>),
}

impl From<GatewayError> for Failure {
    fn from(e: GatewayError) -> Self {
        Failure::Answer(e)
    }
}

/// What became of one attempt before a response header arrived.
enum AttemptError {
    Timeout,
    Failed(String),
}

/// A random UUID-shaped id, written without the formatting machinery (it is per request).
fn new_request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let v: u128 = rand::random();
    let mut out = String::with_capacity(36);
    for i in 0..32 {
        if matches!(i, 8 | 12 | 16 | 20) {
            out.push('-');
        }
        out.push(HEX[((v >> (124 - 4 * i)) & 0xf) as usize] as char);
    }
    out
}

/// The `client` of requests whose credential failed or was not needed, shared.
fn anonymous() -> Arc<str> {
    static ANON: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    ANON.get_or_init(|| Arc::from("anonymous")).clone()
}

/// The backend's own request id (`apim-request-id`, else `x-request-id`).
fn upstream_request_id(resp: &ResponseHeader) -> Option<String> {
    resp.headers
        .get("apim-request-id")
        .or_else(|| resp.headers.get("x-request-id"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn header_str<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a str> {
    req.headers.get(name).and_then(|v| v.to_str().ok())
}

impl Gateway {
    fn client_ip(&self, session: &Session, snap: &Snapshot) -> Option<IpAddr> {
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())?;
        let trusted = snap
            .cfg
            .server
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&peer));
        if trusted {
            let req = session.req_header();
            if let Some(ip) =
                header_str(req, "x-azure-clientip").and_then(|v| v.trim().parse().ok())
            {
                return Some(ip);
            }
            if let Some(xff) = header_str(req, "x-forwarded-for") {
                // The right-most address not belonging to a trusted proxy.
                for part in xff.rsplit(',') {
                    if let Ok(ip) = part.trim().parse::<IpAddr>() {
                        if !snap
                            .cfg
                            .server
                            .trusted_proxies
                            .iter()
                            .any(|n| n.contains(&ip))
                        {
                            return Some(ip);
                        }
                    }
                }
            }
        }
        Some(peer)
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

    async fn write_simple(
        &self,
        session: &mut Session,
        ctx: &Ctx,
        status: u16,
        body: Bytes,
        extra: &[(&str, String)],
    ) -> pingora::Result<()> {
        let mut resp = ResponseHeader::build(status, Some(4 + extra.len()))?;
        resp.insert_header("content-type", "application/json")?;
        resp.insert_header("content-length", body.len().to_string())?;
        resp.insert_header("x-request-id", ctx.request_id.as_str())?;
        for (k, v) in extra {
            resp.insert_header(k.to_string(), v.as_str())?;
        }
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await
    }

    async fn answer_error(&self, session: &mut Session, ctx: &mut Ctx, e: GatewayError) {
        ctx.rec.status = e.status();
        ctx.rec.error_code = Some(e.code.as_str());
        let headers: Vec<(&str, String)> = e.headers();
        let _ = self
            .write_simple(session, ctx, e.status(), e.body(), &headers)
            .await;
        ctx.rejected = Some(e);
    }

    async fn handle(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        snap: &Arc<Snapshot>,
    ) -> Result<(), Failure> {
        let req = session.req_header();
        let method = req.method.as_str().to_string();
        let path = req.uri.path().to_string();
        let query = req.uri.query().map(str::to_string);
        ctx.rec.method = method.clone();
        ctx.rec.path = path.clone();

        if path == "/healthz" && (method == "GET" || method == "HEAD") {
            let (status, body) = Self::health_answer(snap);
            ctx.rec.status = status;
            self.write_simple(session, ctx, status, body, &[])
                .await
                .map_err(Failure::Abort)?;
            return Ok(());
        }

        let fdids = &snap.cfg.server.front_door_ids;
        if !fdids.is_empty() {
            let ok = header_str(session.req_header(), "x-azure-fdid")
                .is_some_and(|v| fdids.iter().any(|id| id.eq_ignore_ascii_case(v.trim())));
            if !ok {
                return Err(GatewayError::new(ErrorCode::ForbiddenOrigin).into());
            }
        }

        let route = classify(&method, &path);
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
            } => (operation, Some(deployment.to_string()), rest),
        };
        let rest = rest.to_string();
        if let Some(d) = path_deployment
            .as_deref()
            .and_then(|d| snap.cfg.deployments.get(d))
        {
            // Known before identity, so refusals are counted against it (configured names only).
            ctx.deployment = Some(d.name.clone());
            ctx.rec.deployment = Some(d.name.clone());
        }
        ctx.operation = Some(operation);
        ctx.rec.operation = Some(operation.as_str());

        // Identity, before any body byte is read.
        let req = session.req_header();
        let presented = Presented::from_headers(
            req.headers.get("api-key").map(|v| v.as_bytes()),
            req.headers.get("authorization").map(|v| v.as_bytes()),
        );
        let presented = match presented {
            Ok(mut p) => {
                p.certificate = crate::tls::peer_certificate(session);
                p
            }
            Err(e) => {
                ctx.rec.auth = if req.headers.contains_key("authorization") {
                    "oidc"
                } else {
                    "api_key"
                };
                return Err(GatewayError::from(e).into());
            }
        };
        let mut fcx = FilterContext::new(presented, operation);
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
        let raw = body::read_bounded(session, snap.cfg.server.max_request_body_bytes)
            .await
            .map_err(|e| match e {
                body::ReadError::TooLarge => {
                    Failure::Answer(GatewayError::new(ErrorCode::RequestTooLarge))
                }
                body::ReadError::Io(e) => Failure::Abort(e),
            })?;

        let mut body = if operation == Operation::ModelsRead {
            None
        } else {
            let ct = header_str(session.req_header(), "content-type").unwrap_or("");
            Some(RequestBody::inspect(raw, operation, &rest, ct)?)
        };

        let deployment_name: String = match (&path_deployment, &body) {
            (Some(d), _) => d.clone(),
            (None, Some(b)) => b
                .model()
                .ok_or_else(|| {
                    GatewayError::with_message(
                        ErrorCode::InvalidRequestBody,
                        "The request body must name the deployment in `model`.",
                    )
                })?
                .to_string(),
            (None, None) => String::new(),
        };

        let deployment: Option<Arc<Deployment>> = if operation == Operation::ModelsRead {
            None
        } else {
            match snap.cfg.deployments.get(&deployment_name) {
                Some(d) => Some(d.clone()),
                None => return Err(GatewayError::new(ErrorCode::DeploymentNotFound).into()),
            }
        };
        if let Some(d) = &deployment {
            fcx.deployment = Some(d.name.clone());
            ctx.deployment = Some(d.name.clone());
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
            return self
                .answer_models(session, ctx, snap, identity.client)
                .await;
        };
        let body = body.as_mut().expect("inference operations have a body");
        ctx.rec.stream = body.stream;
        let strip_usage = body.ensure_stream_usage(operation);

        self.proxy(
            session,
            ctx,
            snap,
            &deployment,
            body,
            &rest,
            query.as_deref(),
            &path,
            identity.jwt_authenticated,
            strip_usage,
        )
        .await
    }

    async fn answer_models(
        &self,
        session: &mut Session,
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
        self.write_simple(session, ctx, 200, body, &[])
            .await
            .map_err(Failure::Abort)
    }

    #[allow(clippy::too_many_arguments)]
    fn upstream_request(
        &self,
        session: &Session,
        path: &str,
        query: Option<&str>,
        host: &str,
        body_len: usize,
        credential: &Credential,
        token: Option<&str>,
        caller_jwt: Option<&str>,
    ) -> pingora::Result<Box<RequestHeader>> {
        let full = match query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        let client_req = session.req_header();
        let mut req = RequestHeader::build(
            client_req.method.clone(),
            full.as_bytes(),
            Some(client_req.headers.len() + 3),
        )?;
        for (name, value) in client_req.headers.iter() {
            if STRIP_UPSTREAM.contains(&name.as_str()) {
                continue;
            }
            req.append_header(name.clone(), value.clone())?;
        }
        req.insert_header("host", host)?;
        req.insert_header("content-length", body_len.to_string())?;
        match credential {
            Credential::ApiKey(k) => req.insert_header("api-key", k.as_str())?,
            Credential::ManagedIdentity => {
                if let Some(t) = token {
                    req.insert_header("authorization", t)?;
                }
            }
            Credential::Forward => {
                if let Some(j) = caller_jwt {
                    req.insert_header("authorization", format!("Bearer {j}"))?;
                }
            }
        }
        Ok(Box::new(req))
    }

    /// Connects (or reuses a pooled connection), sends the request and reads the response
    /// header. The request line, headers and body leave in one write: Pingora's
    /// `write_request_header` flushes the header on its own, which costs every request a
    /// second `send` (and the backend a second wake-up). A reused connection that fails
    /// before any response is retried once on a fresh one (the backend may have closed it
    /// while idle).
    async fn exchange(
        &self,
        peer: &HttpPeer,
        req: &RequestHeader,
        body: &Bytes,
        deadline: tokio::time::Instant,
    ) -> Result<HttpSession, AttemptError> {
        use tokio::io::AsyncWriteExt;
        let wire = http_req_header_to_wire(req)
            .ok_or_else(|| AttemptError::Failed("request header not representable".into()))?;
        for _ in 0..2 {
            let (http, reused) =
                match timeout_at(deadline, self.connector.get_http_session(peer)).await {
                    Err(_) => return Err(AttemptError::Timeout),
                    Ok(Err(e)) => return Err(AttemptError::Failed(format!("connect: {e}"))),
                    Ok(Ok(s)) => s,
                };
            let mut stream = http.into_inner();
            let sent = timeout_at(deadline, async {
                // Both go through the stream's write buffer; one flush sends them.
                stream.write_all(&wire).await?;
                stream.write_all(body).await?;
                stream.flush().await?;
                let mut http = HttpSession::new_with_options(stream, peer);
                http.read_response().await.map_err(std::io::Error::other)?;
                Ok::<HttpSession, std::io::Error>(http)
            })
            .await;
            match sent {
                Err(_) => return Err(AttemptError::Timeout),
                Ok(Ok(http)) => return Ok(http),
                Ok(Err(e)) if reused => {
                    log::debug!("pooled connection failed ({e}); retrying on a new one");
                    continue;
                }
                Ok(Err(e)) => return Err(AttemptError::Failed(e.to_string())),
            }
        }
        Err(AttemptError::Failed("connection closed".into()))
    }

    #[allow(clippy::too_many_arguments)]
    async fn proxy(
        &self,
        session: &mut Session,
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
        let deadline = tokio::time::Instant::from_std(ctx.start + snap.cfg.server.request_timeout);
        let retries = &snap.cfg.retries;
        let cools = &snap.pool.cooldowns[&*deployment.name];
        let members = &deployment.members;
        let mut tried = vec![false; members.len()];
        let mut last_answer: Option<(Box<ResponseHeader>, Bytes)> = None;
        let caller_jwt = if jwt_authenticated {
            header_str(session.req_header(), "authorization")
                .and_then(|v| v.split_once(' ').map(|(_, t)| t.trim().to_string()))
        } else {
            None
        };

        for attempt in 0..retries.max_attempts {
            let cands: Vec<Candidate> = members
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let forward_unusable = snap.cfg.backends[m.backend].credential
                        == Credential::Forward
                        && caller_jwt.is_none();
                    Candidate {
                        priority: m.priority,
                        weight: m.weight,
                        healthy: snap.pool.health[m.backend].is_healthy(),
                        cooling_until_ms: cools[i].until_ms(),
                        tried: tried[i] || forward_unusable,
                    }
                })
                .collect();
            let i = match pick(&cands, now_ms(), rand::random()) {
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
            tried[i] = true;
            let member = &members[i];
            let backend = &snap.cfg.backends[member.backend];
            let peer = snap.peers[member.backend].load_full();
            let peer = &*peer;
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
                format!("/openai/deployments/{}{rest}", member.upstream_deployment)
            } else {
                client_path.to_string()
            };
            let payload = body.for_upstream(&deployment.name, &member.upstream_deployment);
            let req = self
                .upstream_request(
                    session,
                    &upstream_path,
                    query,
                    &backend.host_header,
                    payload.len(),
                    &backend.credential,
                    token.as_ref().map(|t| t.header.as_str()),
                    caller_jwt.as_deref(),
                )
                .map_err(|e| {
                    Failure::Answer(GatewayError::with_message(
                        ErrorCode::InvalidRequestBody,
                        format!("bad request header: {:?}", e.etype()),
                    ))
                })?;
            let attempt_start = Instant::now();
            let mut http = match self.exchange(peer, &req, &payload, deadline).await {
                Ok(h) => h,
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
                        ctx.request_id,
                        backend.name
                    );
                    self.metrics
                        .upstream_attempts
                        .with_label_values(&[&backend.name, &deployment.name, "error"])
                        .inc();
                    continue;
                }
            };
            let ttfb = attempt_start.elapsed();
            let head = http.resp_header().expect("response header was read");
            let status = head.status.as_u16();
            self.metrics
                .upstream_attempts
                .with_label_values(&[&backend.name, &deployment.name, status_label(status)])
                .inc();
            self.metrics
                .ttfb
                .with_label_values(&[&deployment.name, &backend.name])
                .observe(ttfb.as_secs_f64());

            if retries.on_status.contains(&status) {
                if status == 429 || status == 503 {
                    let cool = cooldown_for(
                        head.headers.get("retry-after-ms").map(|v| v.as_bytes()),
                        head.headers.get("retry-after").map(|v| v.as_bytes()),
                        retries,
                    );
                    cools[i].cool_until(now_ms() + cool.as_millis() as u64);
                }
                // Keep this answer in case it is the last.
                let resp = Box::new(head.clone());
                let kept =
                    match timeout_at(deadline, read_capped(&mut http, MAX_KEPT_ERROR_BODY)).await {
                        Ok(Ok((b, complete))) => {
                            if complete {
                                self.connector.release_http_session(http, peer, None).await;
                            }
                            b
                        }
                        _ => Bytes::new(),
                    };
                last_answer = Some((resp, kept));
                continue;
            }

            ctx.rec.ttfb_ms = Some(ctx.start.elapsed().as_millis() as u64);
            ctx.rec.upstream_request_id = upstream_request_id(head);
            return self
                .stream_response(session, ctx, http, peer, deadline, strip_usage)
                .await;
        }

        // Every attempt failed: the last backend answer if there was one (a 429 keeps its
        // retry headers), else what went wrong without an answer.
        if let Some((resp, body)) = last_answer {
            return self.send_kept(session, ctx, resp, body).await;
        }
        Err(GatewayError::new(ErrorCode::BadGateway).into())
    }

    /// Returns the backend's own (failed) answer, e.g. its 429 with retry headers.
    async fn send_kept(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        resp: Box<ResponseHeader>,
        body: Bytes,
    ) -> Result<(), Failure> {
        let status = resp.status.as_u16();
        let mut out = self.downstream_header(&resp, ctx, Some(body.len()))?;
        out.insert_header("x-request-id", ctx.request_id.as_str())
            .map_err(Failure::Abort)?;
        ctx.rec.status = status;
        ctx.rec.upstream_request_id = resp
            .headers
            .get("apim-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        session
            .write_response_header(out, false)
            .await
            .map_err(Failure::Abort)?;
        session
            .write_response_body(Some(body), true)
            .await
            .map_err(Failure::Abort)
    }

    fn downstream_header(
        &self,
        resp: &ResponseHeader,
        ctx: &Ctx,
        content_length: Option<usize>,
    ) -> Result<Box<ResponseHeader>, Failure> {
        let mut out = ResponseHeader::build(resp.status, Some(resp.headers.len() + 6))
            .map_err(Failure::Abort)?;
        // Where the gateway limits this client, its x-ratelimit-* replace the backend's
        // (a backend's fleet-wide numbers beside per-client ones would mislead).
        let own_limits = ctx.admission.is_some();
        for (name, value) in resp.headers.iter() {
            if STRIP_DOWNSTREAM.contains(&name.as_str())
                || name.as_str() == "content-length"
                || name.as_str() == "x-request-id"
                || (own_limits && name.as_str().starts_with("x-ratelimit-"))
            {
                continue;
            }
            out.append_header(name.clone(), value.clone())
                .map_err(Failure::Abort)?;
        }
        match content_length {
            Some(n) => out
                .insert_header("content-length", n.to_string())
                .map_err(Failure::Abort)?,
            None => out
                .insert_header("transfer-encoding", "chunked")
                .map_err(Failure::Abort)?,
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
                    out.insert_header(k, v.to_string())
                        .map_err(Failure::Abort)?;
                }
            }
        }
        Ok(Box::new(out))
    }

    #[allow(clippy::too_many_arguments)]
    async fn stream_response(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        mut http: HttpSession,
        peer: &HttpPeer,
        deadline: tokio::time::Instant,
        strip_usage: bool,
    ) -> Result<(), Failure> {
        let resp = http.resp_header().expect("response header was read");
        let status = resp.status.as_u16();
        let is_sse = resp
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let upstream_len: Option<usize> = resp
            .headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let keep_len = if is_sse { None } else { upstream_len };
        let mut out = self.downstream_header(resp, ctx, keep_len)?;
        out.insert_header("x-request-id", ctx.request_id.as_str())
            .map_err(Failure::Abort)?;
        ctx.rec.status = status;
        if status == 204 || status == 304 {
            session
                .write_response_header(out, true)
                .await
                .map_err(Failure::Abort)?;
            return Ok(());
        }
        session
            .write_response_header(out, false)
            .await
            .map_err(Failure::Abort)?;

        let mut sse = is_sse.then(|| SseTracker::new(strip_usage));
        let mut tail = (!is_sse && status < 300).then(|| JsonTail::new(USAGE_TAIL));
        loop {
            let chunk = match timeout_at(deadline, http.read_body_bytes()).await {
                Err(_) => {
                    log::warn!(
                        "request {}: whole-request timeout while streaming",
                        ctx.request_id
                    );
                    return Err(Failure::Abort(pingora::Error::new_str(
                        "request timeout while streaming",
                    )));
                }
                Ok(Err(e)) => {
                    log::warn!(
                        "request {}: backend failed mid-response: {e}",
                        ctx.request_id
                    );
                    return Err(Failure::Abort(e));
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
                if let Err(e) = session.write_response_body(Some(send), false).await {
                    // The client went away: the upstream connection is dropped, not pooled.
                    log::info!(
                        "request {}: client disconnected mid-response",
                        ctx.request_id
                    );
                    ctx.usage = sse.as_ref().and_then(|s| s.usage());
                    return Err(Failure::Abort(e));
                }
            }
        }
        let last = sse.as_mut().map(|s| s.finish()).unwrap_or_default();
        ctx.usage = match (&sse, &tail) {
            (Some(s), _) => s.usage(),
            (None, Some(t)) => t.usage(),
            _ => None,
        };
        session
            .write_response_body(Some(last), true)
            .await
            .map_err(Failure::Abort)?;
        self.connector.release_http_session(http, peer, None).await;
        Ok(())
    }

    fn finish_record(&self, ctx: &mut Ctx) {
        let deployment = ctx.deployment.clone();
        let dep_label = deployment.as_deref().unwrap_or("");
        let op_label = ctx.operation.map(|o| o.as_str()).unwrap_or("");
        let client = ctx.client_label.clone();
        let status = ctx.rec.status;
        self.metrics
            .requests
            .with_label_values(&[&client, dep_label, op_label, status_label(status)])
            .inc();
        self.metrics
            .duration
            .with_label_values(&[&client, dep_label, op_label])
            .observe(ctx.start.elapsed().as_secs_f64());
        if let Some(e) = &ctx.rejected {
            if let Some(reason) = e.rejection_reason() {
                self.metrics
                    .rejections
                    .with_label_values(&[&client, reason])
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
            self.metrics
                .tokens
                .with_label_values(&[&client, dep_label, backend, "prompt"])
                .inc_by(u.prompt);
            self.metrics
                .tokens
                .with_label_values(&[&client, dep_label, backend, "completion"])
                .inc_by(u.completion);
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
async fn read_capped(http: &mut HttpSession, cap: usize) -> pingora::Result<(Bytes, bool)> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = http.read_body_bytes().await? {
        if buf.len() + chunk.len() > cap {
            return Ok((buf.freeze(), false));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((buf.freeze(), true))
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Ctx {
            _in_flight: InFlight(self.in_flight.clone()),
            start: Instant::now(),
            request_id: new_request_id(),
            snap: None,
            rec: AuditRecord {
                client: anonymous(),
                auth: "none",
                usage_source: "none",
                ..Default::default()
            },
            client_label: anonymous(),
            operation: None,
            deployment: None,
            admission: None,
            reserved: 0,
            usage: None,
            rejected: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
        let snap = self.state.load_full();
        ctx.snap = Some(snap.clone());
        if let Some(ip) = self.client_ip(session, &snap) {
            ctx.rec.client_ip = Some(ip.to_string());
        }
        match self.handle(session, ctx, &snap).await {
            Ok(()) => Ok(true),
            Err(Failure::Answer(e)) => {
                self.answer_error(session, ctx, e).await;
                Ok(true)
            }
            Err(Failure::Abort(e)) => {
                if ctx.rec.status == 0 {
                    ctx.rec.status = 502;
                }
                Err(e)
            }
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
        // Front Door's /healthz probes are neither traffic nor audit events.
        if ctx.snap.is_none() || ctx.rec.path == "/healthz" {
            return;
        }
        self.finish_record(ctx);
        if let (Some(a), Some(snap)) = (ctx.admission.take(), &ctx.snap) {
            let actual = match ctx.rec.usage_source {
                "response" => ctx.rec.total_tokens,
                _ => None,
            };
            snap.limiter.reconcile(&a, actual).await;
        }
        let mut rec = std::mem::take(&mut ctx.rec);
        rec.ended = Some(time::OffsetDateTime::now_utc());
        rec.request_id = std::mem::take(&mut ctx.request_id);
        rec.duration_ms = ctx.start.elapsed().as_millis() as u64;
        self.audit.log(rec);
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

    #[test]
    fn request_ids_are_uuid_shaped_and_distinct() {
        let a = new_request_id();
        assert_eq!(a.len(), 36);
        assert_ne!(a, new_request_id());
    }
}
