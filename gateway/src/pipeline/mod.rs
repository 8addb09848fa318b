//! The request path as typed stages. Each stage takes the previous one's result:
//!
//! ```text
//! admit ──► authenticate ──► operation ──► read body ──► plan ──► [lookup] ──► reserve + admit limits
//!   │ Entry        │ Identity      │ Operation   │ RequestBody  │ Plan     │ Pinned       │ Admission
//!   ▼                                                                                     ▼
//! /healthz                                      models list ◄── Plan::Models / Plan::Forward ──► forward
//!                                                                     (failover, exchange, respond, stream)
//!
//! `lookup` runs only for a request whose path or body names a stored object
//! ([`objects::refs`]); it pins the request to the backend that holds them.
//! finish: metrics, limit reconciliation and the audit line, all from the Outcome
//! ```
//!
//! The decisions are pure functions with table tests beside them ([`admit`], [`plan`],
//! [`failover`], [`respond`], [`outcome`]); this module and [`forward`] do the I/O between
//! them. Both HTTP/1.x connections and HTTP/2 streams (`crate::front`) arrive at
//! [`Gateway::serve`] through the [`Downstream`] trait.

pub mod admit;
pub mod failover;
mod finish;
pub mod objects;
pub use finish::health_answer;
mod forward;
pub mod outcome;
pub mod plan;
mod realtime;
pub mod respond;
pub mod route;
mod upload;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use filters::identity::{Identity, Presented};
use filters::objects::Owner;
use filters::{Credentials, Operation, Planned};

use crate::body::RequestBody;
use crate::deadline::timeout_at;
use crate::errors::{ErrorCode, GatewayError};
use crate::front::downstream::{Downstream, ReadError};
use crate::http1::{Head, Name};
use crate::observe::audit::AuditLog;
use crate::observe::metrics::Metrics;
use crate::observe::request_id::RequestId;
use crate::state::Snapshot;
use crate::upstream::pool::Upstreams;
use crate::upstream::token::UpstreamToken;
use admit::Entry;
use outcome::{Caller, Ending, Outcome};
use plan::Plan;
use respond::json_head;

/// The gateway: what every request needs, built once.
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

/// One request's context: its clocks, the in-flight guard, and its [`Outcome`].
pub struct Ctx {
    _in_flight: InFlight,
    start: Instant,
    /// The wall clock at `start` (read once: key expiry, cooldowns, the audit timestamp).
    started: SystemTime,
    /// `started` in milliseconds since the Unix epoch (cooldowns, capacity reports).
    started_ms: u64,
    outcome: Outcome,
    /// The configuration the request was served under (metrics, limiter, audit).
    snap: Option<Arc<Snapshot>>,
}

impl Ctx {
    /// When the whole request must be done.
    fn deadline(&self, snap: &Snapshot) -> Instant {
        self.start + snap.cfg.server.request_timeout
    }
}

/// How handling ended when it did not end well.
enum Failure {
    /// Nothing was sent yet: answer this error.
    Answer(GatewayError),
    /// The response broke off on the backend's side (or the request's deadline passed
    /// while streaming): the connection must be closed.
    Abort(String),
    /// The client went away before the response ended (SPEC §8: 499, never a 5xx).
    ClientGone(String),
    /// The client did not send its body within the request timeout.
    ClientTimeout,
}

impl From<GatewayError> for Failure {
    fn from(e: GatewayError) -> Self {
        Failure::Answer(e)
    }
}

impl From<filters::FilterError> for Failure {
    fn from(e: filters::FilterError) -> Self {
        Failure::Answer(e.into())
    }
}

fn abort(e: impl std::fmt::Display) -> Failure {
    Failure::Abort(e.to_string())
}

fn client_gone(e: impl std::fmt::Display) -> Failure {
    Failure::ClientGone(e.to_string())
}

impl Gateway {
    pub fn new_ctx(&self) -> Ctx {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let started = SystemTime::now();
        Ctx {
            _in_flight: InFlight(self.in_flight.clone()),
            start: Instant::now(),
            started,
            started_ms: crate::upstream::select::unix_ms(started),
            outcome: Outcome::new(RequestId::new()),
            snap: None,
        }
    }

    /// Handles one request. `false`: the response broke off and the connection must close.
    ///
    /// `head` is `d`'s head, borrowed apart from `d` (which the stages use mutably) so that
    /// it need not be copied for them.
    pub async fn serve<D: Downstream>(&self, d: &mut D, head: &Head, ctx: &mut Ctx) -> bool {
        debug_assert!(std::ptr::eq(head, d.head()));
        let snap = self.state.load_full();
        ctx.outcome.client_ip = admit_client_ip(d, &snap);
        let result = self.stages(d, head, ctx, &snap).await;
        ctx.snap = Some(snap);
        match result {
            Ok(()) => true,
            Err(Failure::Answer(e)) => {
                self.answer_error(d, &mut ctx.outcome, e).await;
                true
            }
            Err(Failure::Abort(why)) => {
                let o = &mut ctx.outcome;
                log::debug!("request {}: connection closed: {why}", o.request_id);
                if o.ending == Ending::Open {
                    o.ending = Ending::Aborted(502);
                }
                false
            }
            Err(e @ (Failure::ClientGone(_) | Failure::ClientTimeout)) => {
                self.client_failed(&mut ctx.outcome, e);
                false
            }
        }
    }

    /// admit → authenticate → operation → read body → plan → admit limits → answer.
    async fn stages<D: Downstream>(
        &self,
        d: &mut D,
        head: &Head,
        ctx: &mut Ctx,
        snap: &Arc<Snapshot>,
    ) -> Result<(), Failure> {
        let (method, path) = (head.method(), head.path());
        ctx.outcome.method = head.method_text();
        ctx.outcome.path = head.path_text();
        let lookup = |name: &str| snap.cfg.deployments.get(name).cloned();
        let fdid = head.get_str(Name::XAzureFdid);
        let route = match admit::admit(
            method,
            path,
            d.framing_error(),
            fdid,
            &snap.cfg.server.front_door_ids,
        )? {
            Entry::Health => return self.answer_health(d, &mut ctx.outcome, snap).await,
            Entry::Request(route) => route,
        };
        ctx.outcome.deployment = plan::named_deployment(&route, lookup);
        // Known before identity (its refusals are labelled with it), refused after it.
        let routed = plan::operation(&route);
        ctx.outcome.operation = routed.as_ref().ok().map(|&(op, _)| op);
        let identity = self.authenticate(d, head, ctx, snap).await?;
        let (operation, rest) = routed?;
        if let route::Route::Realtime { v1 } = route {
            // The rarely used large stages are boxed (here and below): inline, the largest
            // of them would size every request's state, an open SSE stream's included.
            return Box::pin(self.realtime(d, ctx, snap, head, &identity, v1)).await;
        }
        let mut body = match upload::form_kind(&route, operation, rest) {
            // A multipart form: streamed to the backend when it is large (SPEC §11, §13).
            Some(kind) => {
                let ct = head.get_str(Name::ContentType).unwrap_or("");
                match self.read_form(d, ctx, snap, kind, ct).await? {
                    upload::Held::Whole(raw) => {
                        Self::inspect_body(raw, head, (operation, rest), &route)?
                    }
                    upload::Held::Streamed(form) => {
                        return Box::pin(self.streamed_form(
                            d,
                            ctx,
                            snap,
                            head,
                            &identity,
                            (operation, &route),
                            form,
                        ))
                        .await
                    }
                }
            }
            None => {
                self.read_body(d, head, ctx, snap, (operation, rest), &route)
                    .await?
            }
        };
        if route == route::Route::Upload {
            // A file of another purpose than `batch` goes to `?deployment=D`, else to the
            // first deployment (file order) the caller may use.
            if let Some(b) = body.as_mut().filter(|b| b.model().is_none()) {
                let policy = &snap.cfg.clients[identity.client].policy;
                let chosen = query_param(head.query(), "deployment").or_else(|| {
                    policy
                        .visible(snap.cfg.deployment_names.iter().map(|n| &**n))
                        .into_iter()
                        .find(|n| granted(&identity, n))
                });
                if let Some(name) = chosen {
                    b.set_model(name);
                }
            }
        }
        let plan = plan::plan(&route, path, body.as_ref().and_then(|b| b.model()), lookup)?;
        match plan {
            Plan::Models => {
                self.admit_limits(ctx, snap, &identity, operation, None, None)
                    .await?;
                self.answer_models(d, &mut ctx.outcome, snap, &identity, None)
                    .await
            }
            Plan::Model { id } => {
                self.admit_limits(ctx, snap, &identity, operation, None, None)
                    .await?;
                self.answer_models(d, &mut ctx.outcome, snap, &identity, Some(id))
                    .await
            }
            Plan::Forward { deployment, path } => {
                let Some(mut body) = body else {
                    return Err(GatewayError::new(ErrorCode::InvalidRequestBody).into());
                };
                ctx.outcome.deployment = Some(deployment.name.clone());
                // Only a request that names a stored object pays for a lookup.
                let refs = objects::refs(&route, Some(&body));
                let pinned = if refs.is_empty() {
                    None
                } else {
                    Some(
                        self.lookup(ctx, snap, &identity, &refs, Some(&deployment))
                            .await?,
                    )
                };
                self.admit_limits(
                    ctx,
                    snap,
                    &identity,
                    operation,
                    Some(&deployment),
                    Some(&body),
                )
                .await?;
                ctx.outcome.stream = body.stream;
                let v1 = matches!(path, plan::Path::AsSent(_));
                let stream_usage = body.ensure_stream_usage(operation, || {
                    crate::api_version::accepts_stream_options(v1, head.query())
                });
                let caller_jwt = identity.jwt_authenticated.then(|| bearer(head)).flatten();
                let record = body.stores_response().then(|| objects::NewRecord {
                    owner: owner(&identity),
                    deployment: deployment.name.clone(),
                    background: body.background(),
                    reserved: ctx.outcome.reserved,
                    created: unix_secs(ctx.started),
                    retention_secs: snap.cfg.state.retention.as_secs() as i64,
                });
                let f = forward::Forward {
                    deployment: &deployment,
                    body: &body,
                    path,
                    query: head.query(),
                    caller_jwt,
                    operation,
                    stream_usage,
                    pinned: pinned.map(|(p, _)| p.backend),
                    record: record.as_ref(),
                    outputs: None,
                };
                self.forward(d, ctx, snap, &f).await
            }
            Plan::Upload { deployment, path } => {
                let Some(body) = body else {
                    return Err(GatewayError::new(ErrorCode::InvalidRequestBody).into());
                };
                ctx.outcome.deployment = Some(deployment.name.clone());
                self.admit_limits(ctx, snap, &identity, operation, Some(&deployment), None)
                    .await?;
                let record = self.new_record(ctx, snap, &identity, &deployment.name);
                let query = without_param(head.query(), "deployment");
                let f = forward::Forward {
                    deployment: &deployment,
                    body: &body,
                    path: plan::Path::AsSent(path),
                    query: query.as_deref(),
                    caller_jwt: identity.jwt_authenticated.then(|| bearer(head)).flatten(),
                    operation,
                    stream_usage: filters::tokens::StreamUsage::AsSent,
                    pinned: None,
                    record: Some(&record),
                    outputs: None,
                };
                self.forward(d, ctx, snap, &f).await
            }
            Plan::CreateBatch { path } => {
                let Some(body) = body else {
                    return Err(GatewayError::new(ErrorCode::InvalidRequestBody).into());
                };
                // Pinned to the input file's holder, for the file's deployment.
                let refs = objects::refs(&route, Some(&body));
                let (pinned, _) = self.lookup(ctx, snap, &identity, &refs, None).await?;
                let deployment = pinned.deployment;
                ctx.outcome.deployment = Some(deployment.name.clone());
                self.admit_limits(ctx, snap, &identity, operation, Some(&deployment), None)
                    .await?;
                let record = self.new_record(ctx, snap, &identity, &deployment.name);
                let f = forward::Forward {
                    deployment: &deployment,
                    body: &body,
                    path: plan::Path::AsSent(path),
                    query: head.query(),
                    caller_jwt: identity.jwt_authenticated.then(|| bearer(head)).flatten(),
                    operation,
                    stream_usage: filters::tokens::StreamUsage::AsSent,
                    pinned: Some(pinned.backend),
                    record: Some(&record),
                    outputs: None,
                };
                self.forward(d, ctx, snap, &f).await
            }
            Plan::List { operation, path } => {
                self.admit_limits(ctx, snap, &identity, operation, None, None)
                    .await?;
                Box::pin(self.answer_list(d, ctx, snap, head, &identity, operation, path)).await
            }
            Plan::Stored { id, action, path } => {
                let Some(body) = body else {
                    return Err(GatewayError::new(ErrorCode::InvalidRequestBody).into());
                };
                let refs = objects::refs(&route, Some(&body));
                let (pinned, record) = self.lookup(ctx, snap, &identity, &refs, None).await?;
                let deployment = pinned.deployment;
                ctx.outcome.deployment = Some(deployment.name.clone());
                ctx.outcome.stream = head
                    .query()
                    .is_some_and(|q| q.split('&').any(|p| p == "stream=true"));
                self.admit_limits(ctx, snap, &identity, operation, Some(&deployment), None)
                    .await?;
                let caller_jwt = identity.jwt_authenticated.then(|| bearer(head)).flatten();
                // A batch's output and error files become its owner's when its answer names them.
                let outputs = (operation == Operation::Batches)
                    .then(|| self.new_record(ctx, snap, &identity, &deployment.name));
                let f = forward::Forward {
                    deployment: &deployment,
                    body: &body,
                    path: plan::Path::AsSent(path),
                    query: head.query(),
                    caller_jwt,
                    operation,
                    stream_usage: filters::tokens::StreamUsage::AsSent,
                    pinned: Some(pinned.backend),
                    record: None,
                    outputs: outputs.as_ref(),
                };
                self.forward(d, ctx, snap, &f).await?;
                let status = ctx.outcome.status();
                if action == route::ObjectAction::Delete && (200..300).contains(&status) {
                    snap.objects.delete(id).await;
                }
                let Some(record) = record else {
                    return Ok(());
                };
                let o = &mut ctx.outcome;
                match objects::follow_up_usage(&record, status, o.usage.is_some()) {
                    objects::FollowUpUsage::Settle if snap.objects.settle(id).await => {
                        o.settle = Some(outcome::Settle {
                            client: identity.client,
                            deployment: deployment.name.clone(),
                            reserved: record.reserved,
                            created: std::time::UNIX_EPOCH
                                + std::time::Duration::from_secs(record.created.max(0) as u64),
                        });
                    }
                    // Charged already (at creation, or by the gateway that settled it).
                    _ => o.usage = None,
                }
                Ok(())
            }
        }
    }

    /// The stage that looks up the records of the objects a request names (`refs`, not
    /// empty) and pins it to the backend that holds them ([`objects::pin`]); also returns the
    /// record of the object named in the path. The state store not answering (Redis away
    /// and the id not known here) is 503: the gateway does not guess where an object is.
    async fn lookup(
        &self,
        ctx: &Ctx,
        snap: &Snapshot,
        identity: &Identity,
        refs: &objects::Refs<'_>,
        requested: Option<&Arc<crate::config::runtime::Deployment>>,
    ) -> Result<(objects::Pinned, Option<filters::objects::ObjectRecord>), Failure> {
        let mut found = Vec::with_capacity(2);
        for id in refs.ids() {
            let record = snap.objects.get(id).await.map_err(|_| {
                GatewayError::with_message(
                    ErrorCode::LimitStoreUnavailable,
                    "The shared state store is unavailable.",
                )
            })?;
            found.push((id, record));
        }
        let looked_up: Vec<_> = found.iter().map(|(id, r)| (*id, r.as_ref())).collect();
        let pinned = objects::pin(
            &looked_up,
            &owner(identity),
            unix_secs(ctx.started),
            requested,
            |name| snap.cfg.deployments.get(name).cloned(),
            |name| snap.cfg.backends.iter().position(|b| &*b.name == name),
        )?;
        let path_record = match refs.path {
            Some(_) => found.into_iter().next().and_then(|(_, r)| r),
            None => None,
        };
        Ok((pinned, path_record))
    }

    /// The record of an object the caller creates now (a file, a batch, a batch's output).
    fn new_record(
        &self,
        ctx: &Ctx,
        snap: &Snapshot,
        identity: &Identity,
        deployment: &Arc<str>,
    ) -> objects::NewRecord {
        objects::NewRecord {
            owner: owner(identity),
            deployment: deployment.clone(),
            background: false,
            reserved: 0,
            created: unix_secs(ctx.started),
            retention_secs: snap.cfg.state.retention.as_secs() as i64,
        }
    }

    /// `GET /openai/files`, `/openai/batches`: the caller's own objects, gathered from every
    /// backend (each asked once, through a deployment with a member on it), kept when their
    /// record is the caller's on that backend, merged newest first and paged by the gateway.
    #[allow(clippy::too_many_arguments)]
    async fn answer_list<D: Downstream>(
        &self,
        d: &mut D,
        ctx: &mut Ctx,
        snap: &Snapshot,
        head: &Head,
        identity: &Identity,
        operation: Operation,
        path: &str,
    ) -> Result<(), Failure> {
        let default_limit = if operation == Operation::Batches {
            20
        } else {
            10_000
        };
        let (limit, after) = objects::list_params(head.query(), default_limit)?;
        // Each backend is asked for as many as it gives in one page.
        let mut query = without_param(head.query(), "limit")
            .and_then(|q| without_param(Some(&q), "after"))
            .unwrap_or_default();
        if operation == Operation::Batches {
            if !query.is_empty() {
                query.push('&');
            }
            query.push_str("limit=100");
        }
        let query = Some(query).filter(|q| !q.is_empty());
        let caller = owner(identity);
        let now = unix_secs(ctx.started);
        let caller_jwt = identity.jwt_authenticated.then(|| bearer(head)).flatten();
        let empty = RequestBody::passthrough(Bytes::new());
        let mut kept = Vec::new();
        for (b, backend) in snap.cfg.backends.iter().enumerate() {
            // A deployment with a member on this backend carries the request (and its labels).
            let Some((deployment, i)) = snap.cfg.deployment_names.iter().find_map(|n| {
                let d = snap.cfg.deployments.get(&**n)?;
                let i = d.members.iter().position(|m| m.backend == b)?;
                Some((d.clone(), i))
            }) else {
                continue;
            };
            let f = forward::Forward {
                deployment: &deployment,
                body: &empty,
                path: plan::Path::AsSent(path),
                query: query.as_deref(),
                caller_jwt,
                operation,
                stream_usage: filters::tokens::StreamUsage::AsSent,
                pinned: Some(b),
                record: None,
                outputs: None,
            };
            let answer = self.fetch(head, ctx, snap, &f, i, 16 << 20).await?;
            let data = match answer {
                Some((status, body)) if (200..300).contains(&status) => {
                    serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|mut v| v.get_mut("data").map(serde_json::Value::take))
                }
                _ => None,
            };
            let Some(serde_json::Value::Array(entries)) = data else {
                return Err(GatewayError::with_message(
                    ErrorCode::BadGateway,
                    "A resource did not answer the list; it may hold some of your objects.",
                )
                .into());
            };
            for e in entries {
                let Some(id) = e.get("id").and_then(|i| i.as_str()) else {
                    continue;
                };
                let record = snap.objects.get(id).await.map_err(|_| {
                    GatewayError::with_message(
                        ErrorCode::LimitStoreUnavailable,
                        "The shared state store is unavailable.",
                    )
                })?;
                if record.is_some_and(|r| {
                    r.backend == *backend.name && filters::objects::visible(&r, &caller, now)
                }) {
                    kept.push(e);
                }
            }
        }
        let body = Bytes::from(objects::merge_list(kept, limit, after).to_string());
        let o = &mut ctx.outcome;
        o.ending = Ending::Answered(200);
        d.send_full(&json_head(200, o.request_id), &body)
            .await
            .map_err(client_gone)
    }

    /// Identity, before any body byte is read: the caller, or why its credentials fail
    /// (logged with the method it presented).
    async fn authenticate<D: Downstream>(
        &self,
        d: &D,
        head: &Head,
        ctx: &mut Ctx,
        snap: &Snapshot,
    ) -> Result<Identity, Failure> {
        // The values as text (a request head is checked as UTF-8 once, as a whole); one that
        // is not UTF-8 is an invalid credential.
        let text = |name| match head.get(name) {
            None => Ok(None),
            Some(_) => head
                .get_str(name)
                .map(Some)
                .ok_or(filters::FilterError::InvalidCredential),
        };
        let presented = text(Name::ApiKey)
            .and_then(|key| Presented::from_text(key, text(Name::Authorization)?));
        let mut presented = presented.map_err(|e| {
            ctx.outcome.caller.auth = if head.contains(Name::Authorization) {
                filters::AuthMethod::Oidc
            } else {
                filters::AuthMethod::ApiKey
            };
            Failure::from(e)
        })?;
        presented.certificate = d.certificate();
        let auth = presented.method();
        ctx.outcome.caller.auth = auth;
        let credentials = Credentials {
            presented: &presented,
            now: ctx.started,
        };
        let identity = snap
            .chain
            .authenticate(&credentials)
            .await
            .inspect_err(|e| {
                // A revoked key (SPEC §14) is answered as an unknown one; its audit line
                // names the key id.
                if let filters::FilterError::RevokedKey { key_id } = e {
                    ctx.outcome.caller.key_id = Some(key_id.clone());
                }
            })?;
        let label = self.metrics.client_label(&identity.client_id);
        ctx.outcome.caller = Caller::identified(&identity, label, auth);
        Ok(identity)
    }

    /// The body, whole and bounded (by size and by the request's deadline), inspected for
    /// the operation (`None` for `models.read`, whose body is read and dropped).
    async fn read_body<D: Downstream>(
        &self,
        d: &mut D,
        head: &Head,
        ctx: &Ctx,
        snap: &Snapshot,
        (operation, rest): (Operation, &str),
        route: &route::Route<'_>,
    ) -> Result<Option<RequestBody>, Failure> {
        let raw = timeout_at(
            ctx.deadline(snap),
            d.read_body(snap.cfg.server.max_request_body_bytes),
        )
        .await
        .map_err(|_| Failure::ClientTimeout)?
        .map_err(|e| match e {
            ReadError::TooLarge => Failure::Answer(GatewayError::new(ErrorCode::RequestTooLarge)),
            ReadError::Malformed(why) => Failure::Answer(GatewayError::with_message(
                ErrorCode::InvalidRequestBody,
                format!("The request body could not be read: {why}."),
            )),
            ReadError::Io(e) => Failure::ClientGone(e),
        })?;
        Self::inspect_body(raw, head, (operation, rest), route)
    }

    /// A body read whole, inspected for the operation (`None` for `models.read`).
    fn inspect_body(
        raw: Bytes,
        head: &Head,
        (operation, rest): (Operation, &str),
        route: &route::Route<'_>,
    ) -> Result<Option<RequestBody>, Failure> {
        if operation == Operation::ModelsRead {
            return Ok(None);
        }
        let ct = head.get_str(Name::ContentType).unwrap_or("");
        match route {
            route::Route::Stored { .. } | route::Route::List { .. } => {
                return Ok(Some(RequestBody::passthrough(raw)))
            }
            route::Route::Upload => return Ok(Some(RequestBody::inspect_upload(raw, ct)?)),
            route::Route::CreateBatch => return Ok(Some(RequestBody::inspect_batch(raw)?)),
            _ => {}
        }
        Ok(Some(RequestBody::inspect(raw, operation, rest, ct)?))
    }

    /// Tokens to reserve (only where a token limit applies and the body asks for tokens),
    /// then authorization and limits.
    async fn admit_limits(
        &self,
        ctx: &mut Ctx,
        snap: &Snapshot,
        identity: &Identity,
        operation: Operation,
        deployment: Option<&crate::config::runtime::Deployment>,
        body: Option<&RequestBody>,
    ) -> Result<(), Failure> {
        let mut reserve_tokens = 0;
        if let (Some(d), Some(body)) = (deployment, body) {
            let limits = &snap.cfg.clients[identity.client].limits;
            if filters::limits_filter::has_token_limits(limits, &d.name) {
                let hint = d
                    .members
                    .first()
                    .map_or(&*d.name, |m| &*m.upstream_deployment);
                let default = snap.cfg.limits.default_completion_reservation;
                reserve_tokens = body
                    .reservation(&snap.estimator, operation, hint, default)
                    .await;
            }
        }
        ctx.outcome.reserved = reserve_tokens;
        let planned = Planned {
            identity,
            operation,
            deployment: deployment.map(|d| &*d.name),
            reserve_tokens,
            now: ctx.started,
        };
        ctx.outcome.admission = snap.chain.admit(&planned).await?;
        Ok(())
    }

    /// `/healthz`: 200 when every configured deployment has an available member.
    async fn answer_health<D: Downstream>(
        &self,
        d: &mut D,
        o: &mut Outcome,
        snap: &Snapshot,
    ) -> Result<(), Failure> {
        o.probe = true;
        let (status, body) = health_answer(snap);
        o.ending = Ending::Answered(status);
        let resp = json_head(status, o.request_id);
        d.send_full(&resp, &body).await.map_err(client_gone)
    }

    /// `models.read`: the deployments this client may use, or the one named `id` (404
    /// `DeploymentNotFound` for one it may not see, as for one that does not exist).
    async fn answer_models<D: Downstream>(
        &self,
        d: &mut D,
        o: &mut Outcome,
        snap: &Snapshot,
        identity: &Identity,
        id: Option<&str>,
    ) -> Result<(), Failure> {
        let policy = &snap.cfg.clients[identity.client].policy;
        let mut names = policy.visible(snap.cfg.deployment_names.iter().map(|n| &**n));
        names.retain(|n| granted(identity, n));
        let object = |n: &str| serde_json::json!({"id": n, "object": "model", "created": 0, "owned_by": "aoai-gateway", "model": n, "status": "succeeded"});
        let body = match id {
            Some(id) => {
                let Some(name) = names.iter().find(|n| **n == id) else {
                    return Err(GatewayError::new(ErrorCode::DeploymentNotFound).into());
                };
                o.deployment = snap.cfg.deployments.get(*name).map(|d| d.name.clone());
                Bytes::from(object(name).to_string())
            }
            None => {
                let data: Vec<serde_json::Value> = names.iter().map(|n| object(n)).collect();
                Bytes::from(serde_json::json!({"object": "list", "data": data}).to_string())
            }
        };
        o.ending = Ending::Answered(200);
        d.send_full(&json_head(200, o.request_id), &body)
            .await
            .map_err(client_gone)
    }

    /// A client that went away (499 `ClientClosedRequest`, whatever had been sent) or sent
    /// its body too slowly (408 `RequestTimeout`): normal traffic, counted in
    /// `downstream_errors_total` and logged below warn.
    fn client_failed(&self, o: &mut Outcome, e: Failure) {
        let (kind, code) = match e {
            Failure::ClientTimeout => ("timeout", ErrorCode::RequestTimeout),
            _ => ("client_closed", ErrorCode::ClientClosedRequest),
        };
        if let Failure::ClientGone(why) = &e {
            log::debug!("request {}: client went away: {why}", o.request_id);
        }
        self.metrics
            .downstream_errors
            .with_label_values(&[kind])
            .inc();
        o.ending = Ending::Aborted(code.status());
        o.error = Some(GatewayError::new(code));
    }

    /// The gateway's own error answer (SPEC §8).
    async fn answer_error<D: Downstream>(&self, d: &mut D, o: &mut Outcome, e: GatewayError) {
        let mut resp = json_head(e.status(), o.request_id);
        for (k, v) in e.headers() {
            resp.add(k, v.as_str());
        }
        o.ending = Ending::Answered(e.status());
        let _ = d.send_full(&resp, &e.body()).await;
        o.error = Some(e);
    }
}

/// The client's address (see [`admit::client_ip`]).
fn admit_client_ip<D: Downstream>(d: &D, snap: &Snapshot) -> Option<std::net::IpAddr> {
    let peer = d.client_addr()?;
    let trusted = &snap.cfg.server.trusted_proxies;
    if trusted.is_empty() {
        return Some(peer);
    }
    let head = d.head();
    Some(admit::client_ip(
        peer,
        trusted,
        head.all_str(Name::XAzureClientIp),
        head.all_str(Name::XForwardedFor),
    ))
}

/// Whether the caller's token grants (if its provider has `grants`) name this deployment.
fn granted(identity: &Identity, deployment: &str) -> bool {
    identity.grants.as_ref().is_none_or(|g| g.shows(deployment))
}

/// The owner of the objects a caller creates, and the only one who sees them.
fn owner(identity: &Identity) -> Owner {
    Owner {
        client: identity.client_id.to_string(),
        user: identity.user.clone(),
    }
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The token of a `Bearer` authorization (the caller's JWT, for `forward` backends).
fn bearer(head: &Head) -> Option<&str> {
    head.get_str(Name::Authorization)
        .and_then(|v| v.split_once(' ').map(|(_, t)| t.trim()))
}

/// The value of the query parameter `name` (as sent, not decoded).
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .find_map(|p| {
            p.split_once('=')
                .filter(|(k, _)| *k == name)
                .map(|(_, v)| v)
        })
        .filter(|v| !v.is_empty())
}

/// The query without the parameter `name` (`None` when nothing is left).
fn without_param(query: Option<&str>, name: &str) -> Option<String> {
    let kept: Vec<&str> = query?
        .split('&')
        .filter(|p| !p.is_empty() && p.split_once('=').map_or(*p, |(k, _)| k) != name)
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params() {
        let q = Some("api-version=2024-10-21&deployment=gpt-4o&x");
        assert_eq!(query_param(q, "deployment"), Some("gpt-4o"));
        assert_eq!(query_param(q, "limit"), None);
        assert_eq!(query_param(Some("deployment="), "deployment"), None);
        assert_eq!(
            without_param(q, "deployment").as_deref(),
            Some("api-version=2024-10-21&x")
        );
        assert_eq!(without_param(Some("deployment=a"), "deployment"), None);
        assert_eq!(without_param(None, "deployment"), None);
    }
}
