//! The forward stage: the attempt loop over a deployment's members ([`super::failover`]
//! decides), one send per member ([`crate::upstream::request`]), and the chosen answer
//! delivered to the client — whole when it is a small plain answer, else streamed as it
//! arrives, with its usage read on the way.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use filters::estimate::encoding_for_model;
use filters::tokens::{JsonTail, SseTracker, StreamUsage, Usage};
use filters::Operation;

use super::failover::{self, Next, Verdict};
use super::objects::{record_for, response_id_in_json, NewRecord, SseIdCapture};
use super::outcome::{Ending, Tried};
use super::plan::Path;
use super::respond::client_head;
use super::{abort, client_gone, Ctx, Failure, Gateway};
use crate::body::RequestBody;
use crate::config::runtime::{Backend, Credential, Deployment, Member};
use crate::deadline::timeout_at;
use crate::errors::{ErrorCode, GatewayError};
use crate::front::downstream::Downstream;
use crate::http1::{BodyReader, Collected, Framing, H1Error, Head, Name, Text};
use crate::observe::metrics::status_label;
use crate::state::Snapshot;
use crate::upstream::capacity::{parse_report, shortfall, Capacity};
use crate::upstream::pool::Upstream;
use crate::upstream::request::{exchange, Auth, Request, Send, SendError, Target};
use crate::upstream::select::{capacity_skips, now_ms, Candidate, Cooldown};
use crate::upstream::token::Token;

/// The kept body of a retried answer is capped at this size.
const MAX_KEPT_ERROR_BODY: usize = 256 * 1024;
/// A plain answer up to this size is read whole and sent in one write; the tail of a
/// larger one is kept to read its usage.
const USAGE_TAIL: usize = 64 * 1024;
/// Members whose candidates live on the stack.
pub(super) const INLINE: usize = 8;
/// The start of a long JSON answer searched for its `id`.
const JSON_ID_WINDOW: usize = 4096;

/// How to stream an answer.
struct Streaming<'a> {
    is_sse: bool,
    deadline: Instant,
    record: Option<&'a NewRecord>,
}

/// What the forward stage needs from the earlier ones.
pub(super) struct Forward<'a> {
    pub deployment: &'a Deployment,
    pub body: &'a RequestBody,
    pub path: Path<'a>,
    pub query: Option<&'a str>,
    /// The caller's JWT, for `forward` backends.
    pub caller_jwt: Option<&'a str>,
    pub operation: Operation,
    /// How a streamed answer's usage is had (hidden again where the gateway asked for it,
    /// counted by the gateway where the `api-version` takes no `stream_options`).
    pub stream_usage: StreamUsage,
    /// The backend that holds the objects the request names: only its members are tried,
    /// with no failover elsewhere (SPEC §11).
    pub pinned: Option<usize>,
    /// An object to record when the backend creates one (`POST …/responses`, stored; a file
    /// upload; a new batch).
    pub record: Option<&'a NewRecord>,
    /// A batch's answer (`GET`, cancel): the output and error files it names are recorded as
    /// this (the batch's owner and deployment), on the backend that answered.
    pub outputs: Option<&'a NewRecord>,
}

/// An answer being streamed: what is kept of it once its head has gone to the client (not
/// the head itself, which shares the backend connection's first read buffer).
struct Streamed {
    up: Upstream,
    framing: Framing,
    key: u64,
    head_at: Instant,
    status: u16,
    keep_alive: bool,
}

/// An answer from one member.
pub(super) struct Answer {
    pub(super) up: Upstream,
    pub(super) head: Head,
    pub(super) framing: Framing,
    /// Where its connection goes back to, and since when it has been quiet.
    pub(super) key: u64,
    pub(super) head_at: Instant,
    /// From the request's start to this answer's head (its time to first byte).
    pub(super) since_start: std::time::Duration,
}

/// The chooser's view of every member now; `tried` carries over between attempts (and
/// `forward` members count as tried for a caller without a JWT). `room`: the members'
/// capacity reports, the request's token reservation (`None` until some report could be
/// short for it: capacity is then not looked at) and the time.
pub(super) fn candidates(
    snap: &Snapshot,
    f: &Forward<'_>,
    cools: &[Arc<Cooldown>],
    room: (&[Arc<Capacity>], Option<u64>, u64),
    cands: &mut [Candidate],
) {
    let (caps, need, now) = room;
    for (i, (m, c)) in f
        .deployment
        .members
        .iter()
        .zip(cands.iter_mut())
        .enumerate()
    {
        let backend = &snap.cfg.backends[m.backend];
        let forward_only = backend.credential == Credential::Forward;
        let unusable = !usable(m.backend, forward_only, f.caller_jwt.is_some(), f.pinned);
        let short = match (need, caps.get(i)) {
            (Some(need), Some(cap)) => {
                shortfall(cap.report(), now, backend.capacity_window_ms, need)
            }
            _ => None,
        };
        *c = Candidate {
            priority: m.priority,
            weight: m.weight,
            healthy: snap.pool.health[m.backend].is_healthy(),
            cooling_until_ms: cools[i].until_ms(),
            tried: c.tried || unusable,
            short,
        };
    }
}

/// Output tokens a request is taken to reserve at most when deciding whether its exact
/// reservation must be computed for routing (the largest output of today's models).
const OUTPUT_BOUND: u64 = 131_072;

/// Whether some member's capacity report (younger than its window) could be short for a
/// request reserving up to `bound` tokens: only then is the exact reservation worth computing.
/// With Azure's usual reports (far more room than any one request) this is a few atomic
/// loads per member and no tokenizing.
fn capacity_may_bind(
    snap: &Snapshot,
    f: &Forward<'_>,
    caps: &[Arc<Capacity>],
    now: u64,
    bound: u64,
) -> bool {
    f.deployment.members.iter().zip(caps).any(|(m, c)| {
        let window = snap.cfg.backends[m.backend].capacity_window_ms;
        shortfall(c.report(), now, window, bound).is_some()
    })
}

/// The random number the chooser weighs members with: drawn only when there is more than
/// one (with one member every draw picks the same).
fn chance(members: usize) -> u64 {
    if members > 1 {
        rand::random()
    } else {
        0
    }
}

/// The credential a member's request carries: its key, the gateway's token, or the caller's
/// JWT for a `forward` backend.
pub(super) fn auth_for<'a>(
    credential: &'a Credential,
    token: Option<&'a Token>,
    caller_jwt: Option<&'a str>,
) -> Auth<'a> {
    match (credential, token, caller_jwt) {
        (Credential::ApiKey(k), _, _) => Auth::ApiKey(k),
        (Credential::ManagedIdentity, Some(t), _) => Auth::Authorization(&t.header),
        (Credential::Forward, _, Some(jwt)) => Auth::BearerJwt(jwt),
        _ => Auth::None,
    }
}

/// Whether a member may be tried for a request: a `forward` backend only with the caller's
/// JWT, and only the holder's members for a request pinned to it.
fn usable(backend: usize, forward_only: bool, has_jwt: bool, pinned: Option<usize>) -> bool {
    (!forward_only || has_jwt) && pinned.is_none_or(|b| b == backend)
}

/// What one attempt came to. (Lives on the stack for one step: boxing the answer would add
/// an allocation per request.)
#[allow(clippy::large_enum_variant)]
enum Attempt {
    Answered(Answer),
    /// No answer (connect, write or read failed, or an answer not to trust): counted.
    Failed,
    /// A managed-identity member without a valid token: not tried, counted.
    NoToken,
}

/// The backend's own request id (`apim-request-id`, else `x-request-id`).
fn upstream_request_id(resp: &Head) -> Option<Text> {
    resp.get_text(Name::ApimRequestId)
        .or_else(|| resp.get_text(Name::XRequestId))
}

impl Gateway {
    /// Tries members until one answers with something to deliver (SPEC §7); when every
    /// attempt failed, the last backend answer (a 429 keeps its retry headers) or 502.
    pub(super) async fn forward<D: Downstream>(
        &self,
        d: &mut D,
        ctx: &mut Ctx,
        snap: &Snapshot,
        f: &Forward<'_>,
    ) -> Result<(), Failure> {
        let members = &f.deployment.members;
        let cools = &snap.pool.cooldowns[&*f.deployment.name];
        let caps = snap
            .pool
            .capacity
            .get(&*f.deployment.name)
            .map_or(&[][..], |c| &c[..]);
        // The reservation routing compares with capacity reports (once one could bind).
        let mut need: Option<u64> = None;
        // Members already counted as skipped for capacity in this request.
        let mut skipped: u64 = 0;
        let mut inline = [Candidate::default(); INLINE];
        let mut spilled = Vec::new();
        let cands: &mut [Candidate] = if members.len() <= INLINE {
            &mut inline[..members.len()]
        } else {
            spilled.resize(members.len(), Candidate::default());
            &mut spilled
        };
        let mut last: Option<(Head, Bytes)> = None;
        // A managed-identity member was skipped: the gateway has no valid token.
        let mut no_token = false;
        for attempt in 0..snap.cfg.retries.max_attempts {
            // The first attempt goes out at the request's start, as far as cooldowns go.
            let now = if attempt == 0 {
                ctx.started_ms
            } else {
                now_ms()
            };
            if need.is_none() {
                // The reservation the limits computed, else an upper bound of it (the body's
                // bytes and the largest output) until a report makes the exact one matter.
                let reserved = ctx.outcome.reserved;
                let bound = if reserved > 0 {
                    reserved
                } else {
                    let default = snap.cfg.limits.default_completion_reservation;
                    (f.body.byte_len() as u64).saturating_add(OUTPUT_BOUND.max(default))
                };
                if capacity_may_bind(snap, f, caps, now, bound) {
                    need = Some(self.routing_reservation(ctx, snap, f).await);
                }
            }
            candidates(snap, f, cools, (caps, need, now), cands);
            let i = match failover::next_member(attempt, cands, now, chance(cands.len())) {
                Next::Try(i) => i,
                // Only the holder can answer: it being unavailable is 503, whatever the reason.
                Next::Refuse(_) if f.pinned.is_some() => {
                    return Err(GatewayError::with_message(
                        ErrorCode::BackendUnavailable,
                        "The resource that holds this object is unavailable.",
                    )
                    .into())
                }
                Next::Refuse(e) => return Err(e.into()),
                Next::Stop => break,
            };
            if need.is_some() {
                for j in capacity_skips(cands, i, now) {
                    if j >= 64 || skipped & (1 << j) == 0 {
                        skipped |= 1u64.checked_shl(j as u32).unwrap_or(0);
                        let m = &members[j];
                        self.metrics
                            .upstream_skips
                            .with_label_values(&[
                                &snap.cfg.backends[m.backend].name,
                                &f.deployment.name,
                                "capacity",
                            ])
                            .inc();
                    }
                }
            }
            cands[i].tried = true;
            let answer = match self.attempt(d.head(), ctx, snap, f, i).await? {
                Attempt::Answered(a) => a,
                Attempt::Failed => continue,
                Attempt::NoToken => {
                    no_token = true;
                    continue;
                }
            };
            let h = &answer.head;
            let retries = &snap.cfg.retries;
            match failover::verdict(
                h.status,
                h.get(Name::RetryAfterMs),
                h.get(Name::RetryAfter),
                retries,
            ) {
                Verdict::Deliver => return self.deliver(d, ctx, snap, answer, f).await,
                Verdict::Retry { cool } => {
                    if let Some(cool) = cool {
                        let until = now_ms() + cool.as_millis() as u64;
                        cools[i].cool_until(until);
                        snap.fleet.cooled(&snap.cfg, f.deployment, i, until);
                    }
                    last = Some(self.keep(answer, ctx.deadline(snap)).await);
                }
            }
        }
        match last {
            Some((head, body)) => self.send_kept(d, ctx, head, body).await,
            None if no_token => Err(GatewayError::with_message(
                ErrorCode::BackendUnavailable,
                "The gateway has no valid managed-identity token for this backend; see the gateway's log.",
            )
            .into()),
            None => Err(GatewayError::new(ErrorCode::BadGateway).into()),
        }
    }

    /// The token reservation that capacity reports are compared with: the one the limits
    /// computed, else (no token limit applies to this client) computed now the same way.
    async fn routing_reservation(&self, ctx: &Ctx, snap: &Snapshot, f: &Forward<'_>) -> u64 {
        if ctx.outcome.reserved > 0 {
            return ctx.outcome.reserved;
        }
        let hint = f
            .deployment
            .members
            .first()
            .map_or(&*f.deployment.name, |m| &*m.upstream_deployment);
        let default = snap.cfg.limits.default_completion_reservation;
        f.body
            .reservation(&snap.estimator, f.operation, hint, default)
            .await
    }

    /// The start of every attempt on a member (whole or streamed request): counted, recorded
    /// as the one tried, and the gateway's managed-identity token when the member needs it
    /// (`Err` when it has none: logged and counted as the member's error).
    pub(super) async fn open_attempt(
        &self,
        ctx: &mut Ctx,
        backend: &Backend,
        f: &Forward<'_>,
    ) -> Result<Option<Arc<Token>>, ()> {
        let o = &mut ctx.outcome;
        o.attempts += 1;
        o.tried = Some(Tried {
            backend: backend.name.clone(),
            region: Some(backend.region.clone()).filter(|r| !r.is_empty()),
        });
        match (&backend.credential, &self.token) {
            (Credential::ManagedIdentity, Some(t)) => match t.get().await {
                Ok(t) => Ok(Some(t)),
                Err(e) => {
                    log::error!("backend {}: {e}", backend.name);
                    self.attempt_failed(backend, f);
                    Err(())
                }
            },
            _ => Ok(None),
        }
    }

    /// An attempt that ended without an answer (`code="error"`).
    pub(super) fn attempt_failed(&self, backend: &Backend, f: &Forward<'_>) {
        self.metrics
            .upstream_attempts
            .with_label_values(&[&backend.name, &f.deployment.name, "error"])
            .inc()
    }

    /// An attempt answered: its status counted and its time to the answer's head observed.
    pub(super) fn attempt_answered(
        &self,
        backend: &Backend,
        f: &Forward<'_>,
        status: u16,
        to_head: std::time::Duration,
    ) {
        let series =
            self.metrics
                .attempt_series(&backend.name, &f.deployment.name, status_label(status));
        series.attempts.inc();
        series.ttfb.observe(to_head.as_secs_f64());
    }

    /// One attempt on member `i`: its credential, the request encoded for it, one send.
    /// Without an answer the loop moves on to another member; a timeout ends the request
    /// (504): the whole-request deadline has passed.
    async fn attempt(
        &self,
        client_head: &Head,
        ctx: &mut Ctx,
        snap: &Snapshot,
        f: &Forward<'_>,
        i: usize,
    ) -> Result<Attempt, Failure> {
        let member = &f.deployment.members[i];
        let backend = &snap.cfg.backends[member.backend];
        let deadline = ctx.deadline(snap);
        let error = || self.attempt_failed(backend, f);
        let Ok(token) = self.open_attempt(ctx, backend, f).await else {
            return Ok(Attempt::NoToken);
        };
        let o = &ctx.outcome;
        let payload = f
            .body
            .for_upstream(&f.deployment.name, &member.upstream_deployment);
        let auth = auth_for(&backend.credential, token.as_deref(), f.caller_jwt);
        let wire = encode_for(client_head, f, member, &backend.host_header, &payload, auth);
        let peer = snap.peers[member.backend].load_full();
        let started = Instant::now();
        let key = peer.key;
        let send = Send {
            peer: &peer.http,
            key,
            wire: &wire,
            body: &payload,
            started,
            deadline,
            max_idle: snap.cfg.server.backend_idle,
        };
        let (up, head, framing) = match exchange(&self.upstreams, &send).await {
            Ok(x) => x,
            Err(SendError::Timeout) => {
                error();
                return Err(GatewayError::new(ErrorCode::BackendTimeout).into());
            }
            Err(SendError::Failed(why)) => {
                log::warn!(
                    "request {}: backend {} failed: {why}",
                    o.request_id,
                    backend.name
                );
                error();
                return Ok(Attempt::Failed);
            }
        };
        let head_at = Instant::now();
        let since_start = head_at - ctx.start;
        // Every answer's capacity report is kept, but a 429's: its retry headers say when
        // to come back (the cooldown), and its "0 remaining" would outlast them.
        if head.status != 429 {
            let (tokens, requests) = parse_report(head.named(Name::RateLimit));
            if tokens.is_some() || requests.is_some() {
                if let Some(cap) = snap
                    .pool
                    .capacity
                    .get(&*f.deployment.name)
                    .and_then(|c| c.get(i))
                {
                    // The head's arrival on the wall clock, from the request's start: no
                    // second clock read.
                    let at = ctx.started_ms + since_start.as_millis() as u64;
                    cap.record(tokens, requests, at);
                }
            }
        }
        self.attempt_answered(backend, f, head.status, head_at - started);
        Ok(Attempt::Answered(Answer {
            up,
            head,
            framing,
            key,
            head_at,
            since_start,
        }))
    }

    /// Reads a failed answer (capped) to return it if it is the last; its connection goes
    /// back to the pool when the answer was read to its end.
    async fn keep(&self, a: Answer, deadline: Instant) -> (Head, Bytes) {
        let Answer {
            mut up,
            head,
            framing,
            key,
            head_at,
            ..
        } = a;
        let read = timeout_at(deadline, read_capped(&mut up, framing, MAX_KEPT_ERROR_BODY)).await;
        let body = match read {
            Ok(Ok((b, complete))) => {
                if complete {
                    self.release(key, up, head_at, head.keep_alive(), framing);
                }
                b
            }
            _ => Bytes::new(),
        };
        (head, body)
    }

    /// Returns the backend's own (failed) answer, e.g. its 429 with retry headers.
    async fn send_kept<D: Downstream>(
        &self,
        d: &mut D,
        ctx: &mut Ctx,
        resp: Head,
        body: Bytes,
    ) -> Result<(), Failure> {
        let o = &mut ctx.outcome;
        let out = client_head(
            &resp,
            o.admission.as_ref().map(|a| &a.headers),
            o.request_id,
        );
        o.ending = Ending::Answered(resp.status);
        o.upstream_request_id = resp.get_text(Name::ApimRequestId);
        d.send_full(&out, &body).await.map_err(client_gone)
    }

    /// The chosen answer to the client: a plain answer of known length (the usual JSON, or
    /// none: 204, 304) in one write, anything else streamed.
    pub(super) async fn deliver<D: Downstream>(
        &self,
        d: &mut D,
        ctx: &mut Ctx,
        snap: &Snapshot,
        mut a: Answer,
        f: &Forward<'_>,
    ) -> Result<(), Failure> {
        let deadline = ctx.deadline(snap);
        // A new response to record (only `POST …/responses` asks).
        let record = f.record.filter(|_| record_for(a.head.status, true));
        let o = &mut ctx.outcome;
        o.ttfb = Some(a.since_start);
        o.upstream_request_id = upstream_request_id(&a.head);
        o.ending = Ending::Answered(a.head.status);
        let out = client_head(
            &a.head,
            o.admission.as_ref().map(|a| &a.headers),
            o.request_id,
        );
        let is_sse = a
            .head
            .get(Name::ContentType)
            .is_some_and(|v| v.starts_with(b"text/event-stream"));
        if let Framing::Length(n) = a.framing {
            if (n == 0 || !is_sse) && n as usize <= USAGE_TAIL {
                let body = match timeout_at(deadline, read_capped(&mut a.up, a.framing, n as usize))
                    .await
                {
                    Err(_) => return Err(GatewayError::new(ErrorCode::BackendTimeout).into()),
                    Ok(Err(e)) => {
                        log::warn!("request {}: backend failed mid-response: {e}", o.request_id);
                        return Err(GatewayError::new(ErrorCode::BadGateway).into());
                    }
                    Ok(Ok((body, _))) => body,
                };
                if a.head.status < 300 {
                    o.usage = filters::tokens::usage_in_json(&body);
                }
                self.release(a.key, a.up, a.head_at, a.head.keep_alive(), a.framing);
                if let Some(r) = record {
                    // Recorded before the client has the id, so its next request finds it.
                    self.record(snap, r, response_id_in_json(&body), &ctx.outcome)
                        .await;
                }
                if let Some(r) = f.outputs.filter(|_| a.head.status < 300) {
                    for id in super::objects::batch_files(&body) {
                        if matches!(snap.objects.get(&id).await, Ok(None)) {
                            self.record(snap, r, Some(id), &ctx.outcome).await;
                        }
                    }
                }
                return d.send_full(&out, &body).await.map_err(client_gone);
            }
        }
        // While the answer streams, nothing keeps its heads: neither the one sent to the
        // client nor the backend's, whose buffer the stream's reads can then reuse (issue 18:
        // memory per open stream).
        if let Some(id) = &mut o.upstream_request_id {
            *id = id.detached();
        }
        d.send_stream_head(&out).await.map_err(client_gone)?;
        drop(out);
        let Answer {
            up,
            head,
            framing,
            key,
            head_at,
            ..
        } = a;
        let streamed = Streamed {
            up,
            framing,
            key,
            head_at,
            status: head.status,
            keep_alive: head.keep_alive(),
        };
        drop(head);
        let s = Streaming {
            is_sse,
            deadline,
            record,
        };
        self.stream(d, ctx, snap, streamed, f, s).await
    }

    /// One request to member `i` read whole (at most `cap` bytes): its status and body, `None`
    /// when the member gave no (complete) answer. For the lists the gateway gathers.
    pub(super) async fn fetch(
        &self,
        client_head: &Head,
        ctx: &mut Ctx,
        snap: &Snapshot,
        f: &Forward<'_>,
        i: usize,
        cap: usize,
    ) -> Result<Option<(u16, Bytes)>, Failure> {
        let mut a = match self.attempt(client_head, ctx, snap, f, i).await? {
            Attempt::Answered(a) => a,
            Attempt::Failed | Attempt::NoToken => return Ok(None),
        };
        let read = timeout_at(ctx.deadline(snap), read_capped(&mut a.up, a.framing, cap)).await;
        match read {
            Err(_) => Err(GatewayError::new(ErrorCode::BackendTimeout).into()),
            Ok(Ok((body, true))) => {
                self.release(a.key, a.up, a.head_at, a.head.keep_alive(), a.framing);
                Ok(Some((a.head.status, body)))
            }
            Ok(_) => Ok(None),
        }
    }

    /// Records a response the backend created (`id`, if its answer had a usable one) as held
    /// by the backend that answered.
    async fn record(
        &self,
        snap: &Snapshot,
        r: &NewRecord,
        id: Option<String>,
        o: &super::outcome::Outcome,
    ) {
        let (Some(id), Some(tried)) = (id, &o.tried) else {
            log::warn!(
                "request {}: a stored response without a readable id was not recorded",
                o.request_id
            );
            return;
        };
        snap.objects
            .put(&id, r.record(&tried.backend), r.created)
            .await;
    }

    /// Streams the body as it arrives; SSE streams are tracked for their usage chunk
    /// (hidden from the client when the gateway asked for it), plain ones keep their tail.
    #[allow(clippy::too_many_arguments)]
    async fn stream<D: Downstream>(
        &self,
        d: &mut D,
        ctx: &mut Ctx,
        snap: &Snapshot,
        mut a: Streamed,
        f: &Forward<'_>,
        s: Streaming<'_>,
    ) -> Result<(), Failure> {
        let Streaming {
            is_sse,
            deadline,
            mut record,
        } = s;
        let mut reader = BodyReader::new(a.framing);
        if is_sse {
            a.up.set_small_reads(crate::http1::READ_STREAM);
        }
        let mut sse = is_sse.then(|| SseTracker::new(f.stream_usage));
        let mut tail = (!is_sse && a.status < 300).then(|| JsonTail::new(USAGE_TAIL));
        // A new response's id: the first event of a stream, the start of a long JSON answer.
        let mut sse_id = record.filter(|_| is_sse).map(|_| SseIdCapture::default());
        let mut json_start: Vec<u8> = Vec::new();
        loop {
            let o = &mut ctx.outcome;
            let chunk = match timeout_at(deadline, reader.next(&mut a.up)).await {
                Err(_) => {
                    log::warn!(
                        "request {}: whole-request timeout while streaming",
                        o.request_id
                    );
                    return Err(abort("request timeout while streaming"));
                }
                Ok(Err(e)) => {
                    log::warn!("request {}: backend failed mid-response: {e}", o.request_id);
                    return Err(abort(e));
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(c))) => c,
            };
            if let Some(r) = record {
                let id = match &mut sse_id {
                    Some(c) => c.push(&chunk),
                    None => {
                        json_start.extend_from_slice(&chunk[..chunk.len().min(JSON_ID_WINDOW)]);
                        response_id_in_json(&json_start)
                    }
                };
                let over = sse_id
                    .as_ref()
                    .map_or(json_start.len() >= JSON_ID_WINDOW, |c| c.done());
                if id.is_some() || over {
                    // Recorded before the client sees the id. (Boxed, here and at the end:
                    // only a stored response records, and inline it would be the largest
                    // step of every stream's state.)
                    Box::pin(self.record(snap, r, id, &ctx.outcome)).await;
                    record = None;
                }
            }
            let o = &mut ctx.outcome;
            let send = match (&mut sse, &mut tail) {
                (Some(s), _) => s.push(&chunk),
                (None, Some(t)) => {
                    t.push(&chunk);
                    chunk
                }
                (None, None) => chunk,
            };
            if let Err(e) = d.send_chunk(send).await {
                // The client went away: the upstream connection is dropped, not pooled, and
                // the backend stops generating for nobody.
                o.usage = sse.as_ref().and_then(|s| s.usage());
                if let Some(s) = &sse {
                    estimate_stream(o, snap, f, s, a.status).await;
                }
                return Err(client_gone(e));
            }
        }
        if let Some(r) = record {
            let id = response_id_in_json(&json_start);
            Box::pin(self.record(snap, r, id, &ctx.outcome)).await;
        }
        let o = &mut ctx.outcome;
        let last = sse.as_mut().map(|s| s.finish()).unwrap_or_default();
        o.usage = match (&sse, &tail) {
            (Some(s), _) => s.usage(),
            (None, Some(t)) => t.usage(),
            _ => None,
        };
        if let Some(s) = &sse {
            estimate_stream(o, snap, f, s, a.status).await;
        }
        d.send_end(last).await.map_err(client_gone)?;
        a.up.set_small_reads(crate::http1::READ_SMALL);
        self.release(a.key, a.up, a.head_at, a.keep_alive, a.framing);
        Ok(())
    }

    /// Pools a backend connection whose answer was read to its end, unless the backend
    /// closes it (`Connection: close` or HTTP/1.0 without keep-alive: `keep_alive` false; a
    /// body delimited by the close).
    fn release(&self, key: u64, up: Upstream, since: Instant, keep_alive: bool, framing: Framing) {
        if framing != Framing::Close && keep_alive {
            self.upstreams.put(key, up, since);
        }
    }
}

/// Where the backend could not be asked for a stream's usage (its `api-version` takes no
/// `stream_options`) and reported none, the gateway counts it: the prompt estimate and the
/// streamed completion text, with the encoding of the deployment's model (SPEC §13).
async fn estimate_stream(
    o: &mut super::outcome::Outcome,
    snap: &Snapshot,
    f: &Forward<'_>,
    s: &SseTracker,
    status: u16,
) {
    let Some(text) = s.completion_text() else {
        return;
    };
    if o.usage.is_some() || status >= 300 {
        return;
    }
    let hint = f
        .deployment
        .members
        .first()
        .map_or(&*f.deployment.name, |m| &*m.upstream_deployment);
    let prompt = f
        .body
        .prompt_estimate(&snap.estimator, f.operation, hint)
        .await;
    let encoding = encoding_for_model(hint);
    // A long completion (about 1 ms of BPE work per 32 KiB) is counted off the request threads.
    let completion = if text.len() > 32 * 1024 {
        let (e, text) = (snap.estimator.clone(), text.to_string());
        tokio::task::spawn_blocking(move || e.count_text(&text, encoding))
            .await
            .unwrap_or(text_len_quarter(s))
    } else {
        snap.estimator.count_text(text, encoding)
    };
    o.usage = Some(Usage {
        prompt,
        completion,
        total: prompt + completion,
        details: Default::default(),
    });
    o.estimated = true;
}

fn text_len_quarter(s: &SseTracker) -> u64 {
    s.completion_text()
        .map_or(0, |t| t.len().div_ceil(4) as u64)
}

/// The upstream request for one member: its deployment name in the path (or the client's
/// `/openai/v1/...` path), its host and credential, and the body as it goes to it.
fn encode_for(
    client_head: &Head,
    f: &Forward<'_>,
    member: &Member,
    host: &str,
    body: &[u8],
    auth: Auth<'_>,
) -> Vec<u8> {
    let target = match f.path {
        Path::Deployment { rest } => Target::Deployment {
            name: &member.upstream_deployment,
            rest,
        },
        Path::AsSent(p) => Target::AsSent(p),
    };
    Request {
        head: client_head,
        target,
        query: f.query,
        host,
        body,
        auth,
    }
    .encode()
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

#[cfg(test)]
mod tests {
    use super::{chance, usable};
    use crate::pipeline::failover::next_member;
    use crate::upstream::select::Candidate;

    #[test]
    fn one_member_is_chosen_alike_whatever_the_draw_so_none_is_made() {
        assert_eq!(chance(0), 0);
        assert_eq!(chance(1), 0);
        let now = 1_000_000;
        for priority in [0, 5] {
            for weight in [0, 1, 3, 100] {
                for (healthy, cooling_until_ms, tried) in [
                    (true, 0, false),
                    (false, 0, false),
                    (true, now + 5_000, false),
                    (true, 0, true),
                    (false, now + 5_000, true),
                ] {
                    for short in [None, Some(0), Some(10)] {
                        let c = Candidate {
                            priority,
                            weight,
                            healthy,
                            cooling_until_ms,
                            tried,
                            short,
                        };
                        for attempt in [0, 1] {
                            let drawn = next_member(attempt, &[c], now, chance(1));
                            for r in [1, 2, 7, 99, u64::MAX, rand::random()] {
                                assert_eq!(
                                    next_member(attempt, &[c], now, r),
                                    drawn,
                                    "{c:?} attempt {attempt} draw {r}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn usable_members() {
        for (backend, forward_only, jwt, pinned, want) in [
            (0, false, false, None, true),
            (0, true, false, None, false),
            (0, true, true, None, true),
            // Pinned: the holder's members only, whatever else holds.
            (0, false, false, Some(0), true),
            (1, false, false, Some(0), false),
            (1, false, true, Some(0), false),
            (0, true, false, Some(0), false),
            (0, true, true, Some(0), true),
        ] {
            assert_eq!(
                usable(backend, forward_only, jwt, pinned),
                want,
                "{backend} {forward_only} {jwt} {pinned:?}"
            );
        }
    }
}
