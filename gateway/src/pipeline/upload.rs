//! Streamed uploads (SPEC §11 files, §13 multipart media; decisions in [`crate::upload`]).
//!
//! [`Gateway::read_form`] reads the start of a multipart body: a form that ends within
//! [`STREAM_FROM`] bytes, or before what routing needs is known, is held whole (bounded by
//! `server.max_request_body_bytes`) and goes the usual way. Otherwise the prefix that names
//! the deployment is held, and [`Gateway::forward_form`] sends the head, the prefix and then
//! the rest of the body to one member as it arrives (bounded by `server.max_upload_bytes`),
//! checked and rewritten on the way. Another member is tried only while nothing after the
//! held prefix was read from the client (a connect or write failure); once the rest streams,
//! the request is the member's. A form or batch line found bad mid-stream ends the upstream
//! request unfinished (the connection is closed, never pooled) and the client gets 400.

use std::time::Instant;

use bytes::Bytes;
use filters::identity::Identity;
use filters::Operation;
use tokio::io::AsyncWriteExt;

use super::failover::{self, Next, Verdict};
use super::forward::{auth_for, candidates, Answer, Forward, INLINE};
use super::plan::{self, Path, Plan};
use super::route::Route;
use super::{Ctx, Failure, Gateway};
use crate::body::RequestBody;
use crate::deadline::timeout_at;
use crate::errors::{ErrorCode, GatewayError};
use crate::front::downstream::{Downstream, ReadError};
use crate::http1::{encode_chunk, Head};
use crate::multipart::{Piece, Scanner};
use crate::state::Snapshot;
use crate::upload::{concat, upstream_length, Checker, FormKind, Part, Renderer, UploadError};
use crate::upstream::pool::Upstream;
use crate::upstream::request::{final_head, Request, Target};
use crate::upstream::select::{now_ms, Candidate};

/// Rendered bytes are written upstream in pieces of about this size.
const WRITE_AT: usize = 64 * 1024;

/// A form whose start was read: held whole, or to be streamed.
pub(super) enum Held {
    Whole(Bytes),
    Streamed(Box<StreamedForm>),
}

/// The start of a form to stream, and the state to read the rest with.
pub(super) struct StreamedForm {
    kind: FormKind,
    scanner: Scanner,
    checker: Checker,
    held: Vec<(Part, Piece)>,
    /// Body bytes read from the client so far.
    read: u64,
    declared: Option<u64>,
    max_upload: u64,
    max_line: usize,
}

impl StreamedForm {
    /// The deployment the form names (the `model` field, or a batch file's lines).
    pub(super) fn model(&self) -> Option<&str> {
        self.checker.model()
    }

    pub(super) fn is_batch(&self) -> bool {
        self.checker.is_batch()
    }
}

fn read_failure(e: ReadError) -> Failure {
    match e {
        ReadError::TooLarge => Failure::Answer(GatewayError::new(ErrorCode::RequestTooLarge)),
        ReadError::Malformed(why) => Failure::Answer(GatewayError::with_message(
            ErrorCode::InvalidRequestBody,
            format!("The request body could not be read: {why}."),
        )),
        ReadError::Io(e) => Failure::ClientGone(e),
    }
}

fn refused(e: UploadError) -> Failure {
    Failure::Answer(e.into())
}

fn form_refused(why: &'static str) -> Failure {
    refused(UploadError::Form(why))
}

/// Which form a request's body is, where it is one.
pub(super) fn form_kind(route: &Route<'_>, operation: Operation, rest: &str) -> Option<FormKind> {
    match route {
        Route::Upload => Some(FormKind::Upload),
        Route::InBody { .. } if crate::body::is_form(operation, rest) => Some(FormKind::Media),
        Route::InPath { .. } if crate::body::is_form(operation, rest) => {
            Some(FormKind::MediaInPath)
        }
        _ => None,
    }
}

/// Why a streamed upstream request was given up after its body began.
enum Broken {
    /// The client's side: answered as such (400, 413, 408, 499).
    Client(Failure),
    /// Writing to the member failed.
    Upstream(String),
}

impl Gateway {
    /// Reads the start of a multipart form (see the module's documentation).
    pub(super) async fn read_form<D: Downstream>(
        &self,
        d: &mut D,
        ctx: &Ctx,
        snap: &Snapshot,
        kind: FormKind,
        content_type: &str,
    ) -> Result<Held, Failure> {
        let Some(boundary) = crate::multipart::boundary(content_type) else {
            drain(d).await;
            return Err(GatewayError::with_message(
                ErrorCode::InvalidRequestBody,
                "The request body must be multipart/form-data with a boundary.",
            )
            .into());
        };
        let server = &snap.cfg.server;
        let declared = d.declared_length();
        if declared.is_some_and(|n| n > server.max_upload_bytes) {
            drain(d).await;
            return Err(GatewayError::new(ErrorCode::RequestTooLarge).into());
        }
        let max_line = server.max_request_body_bytes;
        let mut form = StreamedForm {
            kind,
            scanner: Scanner::new(boundary),
            checker: Checker::new(kind, max_line),
            held: Vec::new(),
            read: 0,
            declared,
            max_upload: server.max_upload_bytes,
            max_line,
        };
        let deadline = ctx.deadline(snap);
        let max_held = server.max_request_body_bytes as u64;
        let held = Self::read_prefix(d, &mut form, deadline, max_held).await;
        match held {
            Ok(true) => Ok(Held::Streamed(Box::new(form))),
            Ok(false) => {
                // The whole body is here: the usual way.
                let rest = form.scanner.take_buffered();
                Ok(Held::Whole(concat(&form.held, &rest)))
            }
            Err(failure) => {
                if let Failure::Answer(_) = failure {
                    drain(d).await;
                }
                Err(failure)
            }
        }
    }

    /// Reads until what routing needs is known and [`crate::upload::STREAM_FROM`] bytes are
    /// held (`true`: stream), or the body ends (`false`: held whole).
    async fn read_prefix<D: Downstream>(
        d: &mut D,
        form: &mut StreamedForm,
        deadline: Instant,
        max_held: u64,
    ) -> Result<bool, Failure> {
        loop {
            let chunk = timeout_at(deadline, d.read_chunk())
                .await
                .map_err(|_| Failure::ClientTimeout)?
                .map_err(read_failure)?;
            let Some(chunk) = chunk else {
                return Ok(false);
            };
            form.read += chunk.len() as u64;
            form.scanner.push(&chunk);
            while let Some(p) = form.scanner.next(false).map_err(form_refused)? {
                let part = form.checker.see(&p).map_err(refused)?;
                form.held.push((part, p));
            }
            if form.checker.ready() && form.read >= crate::upload::STREAM_FROM as u64 {
                return Ok(true);
            }
            if form.read > max_held {
                return Err(refused(UploadError::FieldsFirst));
            }
        }
    }

    /// A streamed form's request: its deployment (the `model` field, a batch file's lines, or
    /// for another file `?deployment=D` / the first the caller may use), planned, authorized
    /// and admitted as the whole-body way does, then sent by [`Self::forward_form`].
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn streamed_form<D: Downstream>(
        &self,
        d: &mut D,
        ctx: &mut Ctx,
        snap: &Snapshot,
        head: &Head,
        identity: &Identity,
        (operation, route): (Operation, &Route<'_>),
        form: Box<StreamedForm>,
    ) -> Result<(), Failure> {
        let lookup = |name: &str| snap.cfg.deployments.get(name).cloned();
        let chosen: Option<String> = if form.kind == FormKind::Upload && !form.is_batch() {
            let policy = &snap.cfg.clients[identity.client].policy;
            super::query_param(head.query(), "deployment")
                .map(str::to_string)
                .or_else(|| {
                    policy
                        .visible(snap.cfg.deployment_names.iter().map(|n| &**n))
                        .first()
                        .map(|n| n.to_string())
                })
        } else {
            form.model().map(str::to_string)
        };
        let caller_jwt = identity
            .jwt_authenticated
            .then(|| super::bearer(head))
            .flatten();
        let empty = RequestBody::passthrough(Bytes::new());
        match plan::plan(route, head.path(), chosen.as_deref(), lookup)? {
            Plan::Upload { deployment, path } => {
                ctx.outcome.deployment = Some(deployment.name.clone());
                self.admit_limits(ctx, snap, identity, operation, Some(&deployment), None)
                    .await?;
                let record = self.new_record(ctx, snap, identity, &deployment.name);
                let query = super::without_param(head.query(), "deployment");
                let f = Forward {
                    deployment: &deployment,
                    body: &empty,
                    path: Path::AsSent(path),
                    query: query.as_deref(),
                    caller_jwt,
                    operation,
                    stream_usage: filters::tokens::StreamUsage::AsSent,
                    pinned: None,
                    record: Some(&record),
                    outputs: None,
                };
                self.forward_form(d, ctx, snap, &f, form).await
            }
            Plan::Forward { deployment, path } => {
                ctx.outcome.deployment = Some(deployment.name.clone());
                self.admit_limits(
                    ctx,
                    snap,
                    identity,
                    operation,
                    Some(&deployment),
                    Some(&empty),
                )
                .await?;
                let f = Forward {
                    deployment: &deployment,
                    body: &empty,
                    path,
                    query: head.query(),
                    caller_jwt,
                    operation,
                    stream_usage: filters::tokens::StreamUsage::AsSent,
                    pinned: None,
                    record: None,
                    outputs: None,
                };
                self.forward_form(d, ctx, snap, &f, form).await
            }
            _ => Err(GatewayError::new(ErrorCode::InvalidRequestBody).into()),
        }
    }

    /// Sends a streamed form to a member of `f.deployment` (see the module's
    /// documentation) and delivers its answer.
    pub(super) async fn forward_form<D: Downstream>(
        &self,
        d: &mut D,
        ctx: &mut Ctx,
        snap: &Snapshot,
        f: &Forward<'_>,
        mut form: Box<StreamedForm>,
    ) -> Result<(), Failure> {
        let members = &f.deployment.members;
        let cools = &snap.pool.cooldowns[&*f.deployment.name];
        let mut inline = [Candidate::default(); INLINE];
        let mut spilled = Vec::new();
        let cands: &mut [Candidate] = if members.len() <= INLINE {
            &mut inline[..members.len()]
        } else {
            spilled.resize(members.len(), Candidate::default());
            &mut spilled
        };
        let head = d.head().clone();
        for attempt in 0..snap.cfg.retries.max_attempts {
            let now = if attempt == 0 {
                ctx.started_ms
            } else {
                now_ms()
            };
            // An upload reserves no tokens: members' capacity reports are not looked at.
            candidates(snap, f, cools, (&[], None, now), cands);
            let i = match failover::next_member(attempt, cands, now, rand::random()) {
                Next::Try(i) => i,
                Next::Refuse(e) => return Err(e.into()),
                Next::Stop => break,
            };
            cands[i].tried = true;
            let Some(answer) = self.send_form(d, &head, ctx, snap, f, i, &mut form).await? else {
                continue;
            };
            // The body went once: whatever the member answered is the answer (a 429 or 503
            // still cools it down for the next requests).
            let h = &answer.head;
            let retries = &snap.cfg.retries;
            if let Verdict::Retry { cool: Some(cool) } = failover::verdict(
                h.status,
                h.get(crate::http1::Name::RetryAfterMs),
                h.get(crate::http1::Name::RetryAfter),
                retries,
            ) {
                cools[i].cool_until(now_ms() + cool.as_millis() as u64);
            }
            return self.deliver(d, ctx, snap, answer, f).await;
        }
        Err(GatewayError::new(ErrorCode::BadGateway).into())
    }

    /// One attempt on member `i`: `None` when it failed before any byte after the held
    /// prefix was read (another member may be tried), else the member's answer.
    #[allow(clippy::too_many_arguments)]
    async fn send_form<D: Downstream>(
        &self,
        d: &mut D,
        client_head: &Head,
        ctx: &mut Ctx,
        snap: &Snapshot,
        f: &Forward<'_>,
        i: usize,
        form: &mut StreamedForm,
    ) -> Result<Option<Answer>, Failure> {
        let member = &f.deployment.members[i];
        let backend = &snap.cfg.backends[member.backend];
        let deadline = ctx.deadline(snap);
        let error = || self.attempt_failed(backend, f);
        let Ok(token) = self.open_attempt(ctx, backend, f).await else {
            return Ok(None);
        };
        let o = &ctx.outcome;
        let auth = auth_for(&backend.credential, token.as_deref(), f.caller_jwt);
        let upstream = &*member.upstream_deployment;
        let model = form.model().unwrap_or_default().to_string();
        let batch = form.is_batch();
        // The `model` field is renamed only where it names the deployment (on a deployment
        // path the SDKs send it too; another name there passes as sent).
        let renamed = if model != *f.deployment.name {
            model.as_str()
        } else {
            upstream
        };
        let length = upstream_length(form.declared, form.kind, batch, &model, renamed);
        let target = match f.path {
            Path::Deployment { rest } => Target::Deployment {
                name: upstream,
                rest,
            },
            Path::AsSent(p) => Target::AsSent(p),
        };
        let wire = Request {
            head: client_head,
            target,
            query: f.query,
            host: &backend.host_header,
            body: &[],
            auth,
        }
        .encode_head(length);
        let mut renderer = if batch {
            Renderer::new(upstream, Some(&*model), form.max_line)
        } else {
            Renderer::new(renamed, None, form.max_line)
        };
        let mut out = Vec::with_capacity(WRITE_AT + 1024);
        let held = form
            .held
            .iter()
            .try_for_each(|(part, p)| renderer.render(*part, p, &mut out));
        if let Err(e) = held {
            drain(d).await;
            return Err(refused(e));
        }
        let peer = snap.peers[member.backend].load_full();
        let started = Instant::now();
        let key = peer.key;
        // A new connection: a pooled one that the backend closed meanwhile would fail only
        // once the body streams, when no other member can be tried.
        let mut up = match timeout_at(deadline, self.upstreams.connect(&peer.http)).await {
            Err(_) => {
                error();
                return Err(GatewayError::new(ErrorCode::BackendTimeout).into());
            }
            Ok(Err(e)) => {
                log::warn!(
                    "request {}: backend {} failed: connect: {e}",
                    o.request_id,
                    backend.name
                );
                error();
                return Ok(None);
            }
            Ok(Ok(c)) => c,
        };
        let chunked = length.is_none();
        let first = timeout_at(deadline, async {
            up.io.write_all(&wire).await?;
            write_body(&mut up, &out, chunked).await
        })
        .await;
        match first {
            Err(_) => {
                error();
                return Err(GatewayError::new(ErrorCode::BackendTimeout).into());
            }
            Ok(Err(e)) => {
                log::warn!(
                    "request {}: backend {} failed: {e}",
                    o.request_id,
                    backend.name
                );
                error();
                return Ok(None);
            }
            Ok(Ok(())) => {}
        }
        out.clear();
        // From here on the member has the request: no other member is tried.
        let streamed = self
            .stream_rest(d, &mut up, form, &mut renderer, &mut out, chunked, deadline)
            .await;
        match streamed {
            Ok(()) => {}
            Err(Broken::Client(failure)) => {
                // The member never sees a whole request: its connection is closed unfinished.
                // (The client's doing: not counted as the backend's error.)
                drop(up);
                if let Failure::Answer(_) = failure {
                    drain(d).await;
                }
                return Err(failure);
            }
            Err(Broken::Upstream(why)) => {
                log::warn!(
                    "request {}: backend {} failed mid-upload: {why}",
                    ctx.outcome.request_id,
                    backend.name
                );
                error();
                return Err(GatewayError::new(ErrorCode::BadGateway).into());
            }
        }
        let head = match timeout_at(deadline, final_head(&mut up)).await {
            Err(_) => {
                error();
                return Err(GatewayError::new(ErrorCode::BackendTimeout).into());
            }
            Ok(Err(e)) => {
                log::warn!(
                    "request {}: backend {} failed: {e}",
                    ctx.outcome.request_id,
                    backend.name
                );
                error();
                return Err(GatewayError::new(ErrorCode::BadGateway).into());
            }
            Ok(Ok(h)) => h,
        };
        let (head, framing) = head;
        let head_at = Instant::now();
        self.attempt_answered(backend, f, head.status, head_at - started);
        Ok(Some(Answer {
            up,
            head,
            framing,
            key,
            head_at,
            since_start: head_at - ctx.start,
        }))
    }

    /// Reads the rest of the form from the client, checks and renders it, and writes it to
    /// the member as it comes; ends the chunked body when the form ended well.
    #[allow(clippy::too_many_arguments)]
    async fn stream_rest<D: Downstream>(
        &self,
        d: &mut D,
        up: &mut Upstream,
        form: &mut StreamedForm,
        renderer: &mut Renderer<'_>,
        out: &mut Vec<u8>,
        chunked: bool,
        deadline: Instant,
    ) -> Result<(), Broken> {
        let client = |f: Failure| Broken::Client(f);
        let mut eof = false;
        loop {
            while let Some(p) = form
                .scanner
                .next(eof)
                .map_err(|why| client(form_refused(why)))?
            {
                let part = form.checker.see(&p).map_err(|e| client(refused(e)))?;
                renderer
                    .render(part, &p, out)
                    .map_err(|e| client(refused(e)))?;
                if out.len() >= WRITE_AT {
                    timed_write(up, out, chunked, deadline).await?;
                    out.clear();
                }
            }
            if eof {
                break;
            }
            let chunk = timeout_at(deadline, d.read_chunk())
                .await
                .map_err(|_| client(Failure::ClientTimeout))?
                .map_err(|e| client(read_failure(e)))?;
            match chunk {
                None => eof = true,
                Some(c) => {
                    form.read += c.len() as u64;
                    if form.read > form.max_upload {
                        return Err(client(GatewayError::new(ErrorCode::RequestTooLarge).into()));
                    }
                    form.scanner.push(&c);
                }
            }
        }
        timed_write(up, out, chunked, deadline).await?;
        out.clear();
        let end = timeout_at(deadline, async {
            if chunked {
                up.io.write_all(b"0\r\n\r\n").await?;
            }
            up.io.flush().await
        })
        .await;
        match end {
            Err(_) => Err(Broken::Upstream("timed out".into())),
            Ok(Err(e)) => Err(Broken::Upstream(e.to_string())),
            Ok(Ok(())) => Ok(()),
        }
    }
}

/// How long the rest of a refused upload is still read (and dropped) before the answer, so
/// that a client still sending reads the answer rather than a connection reset.
const DRAIN_AFTER_REFUSAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads and drops what the client still sends of its body, for a bounded time.
async fn drain<D: Downstream>(d: &mut D) {
    let rest = async { while let Ok(Some(_)) = d.read_chunk().await {} };
    let _ = tokio::time::timeout(DRAIN_AFTER_REFUSAL, rest).await;
}

async fn timed_write(
    up: &mut Upstream,
    data: &[u8],
    chunked: bool,
    deadline: Instant,
) -> Result<(), Broken> {
    match timeout_at(deadline, write_body(up, data, chunked)).await {
        Err(_) => Err(Broken::Upstream("timed out".into())),
        Ok(Err(e)) => Err(Broken::Upstream(e.to_string())),
        Ok(Ok(())) => Ok(()),
    }
}

/// Writes body bytes, as one chunk when the body is chunked.
async fn write_body(up: &mut Upstream, data: &[u8], chunked: bool) -> std::io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    if chunked {
        let mut framed = Vec::with_capacity(data.len() + 16);
        encode_chunk(&mut framed, data);
        up.io.write_all(&framed).await
    } else {
        up.io.write_all(data).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_bodies_are_forms() {
        let in_body = |operation, rest| Route::InBody { operation, rest };
        let in_path = |operation, rest| Route::InPath {
            operation,
            deployment: "d",
            rest,
        };
        use Operation::*;
        for (route, op, rest, want) in [
            (Route::Upload, Files, "", Some(FormKind::Upload)),
            (
                in_body(Audio, "/audio/transcriptions"),
                Audio,
                "/audio/transcriptions",
                Some(FormKind::Media),
            ),
            (
                in_body(Images, "/images/edits"),
                Images,
                "/images/edits",
                Some(FormKind::Media),
            ),
            (
                in_path(Audio, "/audio/translations"),
                Audio,
                "/audio/translations",
                Some(FormKind::MediaInPath),
            ),
            // JSON bodies keep the whole-body read.
            (
                in_body(Audio, "/audio/speech"),
                Audio,
                "/audio/speech",
                None,
            ),
            (
                in_body(ChatCompletions, "/chat/completions"),
                ChatCompletions,
                "/chat/completions",
                None,
            ),
            (Route::CreateBatch, Batches, "", None),
        ] {
            assert_eq!(form_kind(&route, op, rest), want, "{route:?}");
        }
    }
}
