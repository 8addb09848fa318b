//! aoai-mock: an Azure OpenAI imitation for the tests, demo and benchmarks of
//! aoai-gateway. It also plays the App Service managed-identity token endpoint
//! and an OIDC provider. See README.md next to Cargo.toml.

#![forbid(unsafe_code)]

mod body;
mod builders;
mod capacity;
mod files;
mod oidc;
mod realtime;
mod state;
mod stored;
mod util;

use body::MockBody;
use builders::{Meta, Reply};
use bytes::Bytes;
use clap::Parser;
use http::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use state::{Decision, Fault, FaultPatch, FaultValues, Faults, Record, Recorder, Stats};
use std::io::{self, Write as _};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use util::{form_pairs, json_str, now_secs, pair};

/// Azure OpenAI imitation (plus managed-identity token endpoint and OIDC provider).
#[derive(Parser, Debug)]
#[command(name = "aoai-mock", version)]
struct Cli {
    /// Address to listen on (port 0: any free port; the bound one is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Backend name: in the reply text ("Hello from NAME.") and the `x-mock-name` header.
    #[arg(long, default_value = "mock")]
    name: String,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Sleep before answering each data-plane request.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Pause between streamed content chunks.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Content chunks of a stream (at least 4; more repeat " again" before the final ".").
    #[arg(long, default_value_t = 4)]
    stream_chunks: usize,
    /// Data-plane requests must carry `Authorization: Bearer TOKEN`.
    #[arg(long)]
    require_bearer: Option<String>,
    /// Data-plane requests must carry `api-key: KEY` (with --require-bearer too: either one).
    #[arg(long)]
    require_api_key: Option<String>,
    /// The managed-identity endpoint's access token.
    #[arg(long, default_value = "mock-mi-token")]
    identity_token: String,
    /// The secret the managed-identity endpoint expects in `X-IDENTITY-HEADER`.
    #[arg(long, default_value = "mock-identity-secret")]
    identity_header: String,
    /// Lifetime of managed-identity tokens.
    #[arg(long, default_value_t = 3600)]
    identity_expires_in: u64,
    /// Serve an OIDC provider (discovery, JWKS, client-credentials tokens).
    #[arg(long)]
    oidc: bool,
    /// The OIDC issuer (default: http://127.0.0.1:PORT).
    #[arg(long)]
    oidc_issuer: Option<String>,
    /// The next N data-plane requests answer 429.
    #[arg(long, default_value_t = 0)]
    fail_429_count: u64,
    /// This share (0..1) of data-plane requests answers 429, evenly spread (deterministic).
    #[arg(long, default_value_t = 0.0)]
    fail_429_share: f64,
    /// `retry-after-ms` of injected 429s (`retry-after` is its ceiling in seconds).
    #[arg(long, default_value_t = 1000)]
    retry_after_ms: u64,
    /// Status of the --fail-count failures.
    #[arg(long, default_value_t = 500)]
    fail_status: u16,
    /// The next N data-plane requests answer --fail-status.
    #[arg(long, default_value_t = 0)]
    fail_count: u64,
    /// The next N data-plane requests get their connection closed (RST) without an answer.
    #[arg(long, default_value_t = 0)]
    reset_count: u64,
    /// The next N data-plane requests sleep --stall-ms before their headers.
    #[arg(long, default_value_t = 0)]
    stall_count: u64,
    /// Length of a stall.
    #[arg(long, default_value_t = 10000)]
    stall_ms: u64,
    /// A `background: true` response completes this long after it was created.
    #[arg(long, default_value_t = 500)]
    background_delay_ms: u64,
    /// `x-ratelimit-remaining-tokens` announced on answers (`PUT /_mock/capacity` changes
    /// it per deployment at run time).
    #[arg(long, default_value_t = 999_000)]
    remaining_tokens: u64,
    /// `x-ratelimit-remaining-requests` announced on answers.
    #[arg(long, default_value_t = 9_999)]
    remaining_requests: u64,
}

const RECORD_CAPACITY: usize = 1000;
const CONTROL_BODY_LIMIT: usize = 1 << 20;

static APIM_REQUEST_ID: HeaderName = HeaderName::from_static("apim-request-id");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_RL_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
static X_RL_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
static X_MOCK_NAME: HeaderName = HeaderName::from_static("x-mock-name");
static RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
static RETRY_AFTER: HeaderName = HeaderName::from_static("retry-after");
static API_KEY: HeaderName = HeaderName::from_static("api-key");
static X_IDENTITY_HEADER: HeaderName = HeaderName::from_static("x-identity-header");

const JSON: &str = "application/json";
const SSE: &str = "text/event-stream";

/// Shared by all connections.
struct State {
    name_hv: HeaderValue,
    reply: Reply,
    require_bearer: Option<String>,
    require_api_key: Option<String>,
    identity_token: String,
    identity_header: String,
    identity_expires_in: u64,
    oidc: Option<oidc::Oidc>,
    faults: Faults,
    initial_faults: FaultValues,
    recorder: Recorder,
    stats: Stats,
    ids: util::IdGen,
    /// The responses this resource stores.
    responses: stored::Responses,
    /// The files and batches this resource keeps.
    files: files::Files,
    /// The remaining capacity each deployment announces.
    capacity: capacity::Capacity,
}

impl State {
    /// Whether the data-plane credentials match (anything goes when none is required).
    fn authorized(&self, h: &HeaderMap) -> bool {
        if self.require_bearer.is_none() && self.require_api_key.is_none() {
            return true;
        }
        let bearer_ok = self.require_bearer.as_deref().is_some_and(|want| {
            h.get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split_once(' '))
                .is_some_and(|(s, t)| s.eq_ignore_ascii_case("bearer") && t.trim() == want)
        });
        let key_ok = self.require_api_key.as_deref().is_some_and(|want| {
            h.get(&API_KEY)
                .is_some_and(|v| v.as_bytes() == want.as_bytes())
        });
        bearer_ok || key_ok
    }

    /// A response with the data-plane headers.
    fn respond(&self, status: u16, ctype: &'static str, body: MockBody) -> Response<MockBody> {
        let mut r = Response::new(body);
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let id = HeaderValue::from_str(&self.ids.uuid(self.ids.next()))
            .unwrap_or(HeaderValue::from_static("0"));
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
        h.insert(APIM_REQUEST_ID.clone(), id.clone());
        h.insert(X_REQUEST_ID.clone(), id);
        h.insert(X_RL_REQUESTS.clone(), HeaderValue::from_static("9999"));
        h.insert(X_RL_TOKENS.clone(), HeaderValue::from_static("999000"));
        h.insert(X_MOCK_NAME.clone(), self.name_hv.clone());
        if ctype == SSE {
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        }
        r
    }

    fn json(&self, status: u16, body: impl Into<Bytes>) -> Response<MockBody> {
        self.respond(status, JSON, MockBody::full(body))
    }

    fn error(&self, status: u16, message: &str) -> Response<MockBody> {
        self.json(status, builders::error_body(&status.to_string(), message))
    }

    /// A plain JSON response (control plane, token endpoints).
    fn plain(&self, status: u16, body: impl Into<Bytes>) -> Response<MockBody> {
        let mut r = Response::new(MockBody::full(body));
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
        r.headers_mut()
            .insert(X_MOCK_NAME.clone(), self.name_hv.clone());
        r
    }

    fn no_content(&self) -> Response<MockBody> {
        let mut r = Response::new(MockBody::Full(None));
        *r.status_mut() = StatusCode::NO_CONTENT;
        r.headers_mut()
            .insert(X_MOCK_NAME.clone(), self.name_hv.clone());
        r
    }
}

/// One connection: the state plus the flag that turns its close into a reset.
struct Conn {
    st: Arc<State>,
    reset: AtomicBool,
}

/// The accepted socket; dropped with `SO_LINGER 0` (an RST) when a reset was injected.
struct ConnIo {
    stream: TcpStream,
    conn: Arc<Conn>,
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        if self.conn.reset.load(Ordering::Relaxed) {
            // A zero linger does not block: close sends an RST at once.
            #[allow(deprecated)]
            let _ = self.stream.set_linger(Some(Duration::ZERO));
        }
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The service error that makes hyper drop the connection without an answer.
#[derive(Debug)]
struct ResetConn;

impl std::fmt::Display for ResetConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset by aoai-mock")
    }
}

impl std::error::Error for ResetConn {}

/// Data-plane operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Chat,
    Completions,
    Embeddings,
    Responses,
    ImagesGenerations,
    ImagesEdits,
    AudioTranscriptions,
    AudioTranslations,
    AudioSpeech,
    /// GET/DELETE/cancel/input_items of a stored response.
    ResponseFollowUp,
    /// Files and batches (`files.rs`).
    Files,
    NotFound,
}

impl Op {
    fn from_suffix(s: &str) -> Op {
        match s {
            "chat/completions" => Op::Chat,
            "completions" => Op::Completions,
            "embeddings" => Op::Embeddings,
            "images/generations" => Op::ImagesGenerations,
            "images/edits" => Op::ImagesEdits,
            "audio/transcriptions" => Op::AudioTranscriptions,
            "audio/translations" => Op::AudioTranslations,
            "audio/speech" => Op::AudioSpeech,
            _ => Op::NotFound,
        }
    }

    /// Whether the request body is JSON (the others are multipart).
    fn json_body(self) -> bool {
        !matches!(
            self,
            Op::ImagesEdits
                | Op::AudioTranscriptions
                | Op::AudioTranslations
                | Op::ResponseFollowUp
                | Op::Files
                | Op::NotFound
        )
    }

    /// Whether a `/openai/v1` request must name its model in the body.
    fn needs_model(self) -> bool {
        matches!(
            self,
            Op::Chat | Op::Completions | Op::Embeddings | Op::Responses
        )
    }

    /// The Azure operation name (429 messages).
    fn azure_name(self) -> &'static str {
        match self {
            Op::Chat => "ChatCompletions_Create",
            Op::Completions => "Completions_Create",
            Op::Embeddings => "Embeddings_Create",
            Op::Responses => "Responses_Create",
            Op::ImagesGenerations => "ImageGenerations_Create",
            Op::ImagesEdits => "ImageEdits_Create",
            Op::AudioTranscriptions => "Transcriptions_Create",
            Op::AudioTranslations => "Translations_Create",
            Op::AudioSpeech => "Speech_Create",
            Op::ResponseFollowUp => "Responses_Get",
            Op::Files => "Files_Get",
            Op::NotFound => "Unknown",
        }
    }
}

/// The operation and the deployment named in the path (None: in the body).
fn parse_route<'a>(method: &Method, path: &'a str) -> (Op, Option<&'a str>) {
    if method != Method::POST {
        return (Op::NotFound, None);
    }
    if let Some(rest) = path.strip_prefix("/openai/deployments/") {
        if let Some((dep, op)) = rest.split_once('/') {
            if !dep.is_empty() {
                return (Op::from_suffix(op), Some(dep));
            }
        }
        return (Op::NotFound, None);
    }
    let op = match path {
        "/openai/responses" | "/openai/v1/responses" => Op::Responses,
        _ => match path.strip_prefix("/openai/v1/") {
            Some(s) => Op::from_suffix(s),
            None => Op::NotFound,
        },
    };
    (op, None)
}

fn is_health_path(path: &str) -> Option<bool> {
    match path {
        "/openai/models" | "/openai/v1/models" => Some(false),
        "/openai/deployments" => Some(true),
        _ => None,
    }
}

async fn handle(conn: Arc<Conn>, req: Request<Incoming>) -> Result<Response<MockBody>, ResetConn> {
    let st = &*conn.st;
    let path = req.uri().path();
    if let Some(rest) = path.strip_prefix("/_mock/") {
        let rest = rest.to_string();
        return Ok(control(st, &rest, req).await);
    }
    if path == "/msi/token" {
        return Ok(msi_token(st, &req));
    }
    if let Some(o) = &st.oidc {
        if path.ends_with("/.well-known/openid-configuration") {
            Stats::inc(&st.stats.discovery_requests);
            return Ok(if o.is_down() {
                st.plain(
                    503,
                    oidc::token_error_body("temporarily_unavailable", "IdP outage (aoai-mock)"),
                )
            } else {
                st.plain(200, o.discovery())
            });
        }
        if path == "/jwks" || path.ends_with("/discovery/v2.0/keys") {
            Stats::inc(&st.stats.jwks_requests);
            return Ok(if o.is_down() {
                st.plain(
                    503,
                    oidc::token_error_body("temporarily_unavailable", "IdP outage (aoai-mock)"),
                )
            } else {
                st.plain(200, o.jwks())
            });
        }
        if path.ends_with("/oauth2/token") || path.ends_with("/oauth2/v2.0/token") {
            Stats::inc(&st.stats.oidc_token_requests);
            return Ok(oidc_token(conn.clone(), req).await);
        }
    }
    if req.method() == Method::GET {
        if let Some(deployments) = is_health_path(path) {
            Stats::inc(&st.stats.health_requests);
            return Ok(health(st, req.headers(), deployments));
        }
    }
    if realtime::is_realtime(&req) {
        return Ok(realtime::upgrade(&conn, req));
    }
    data_plane(&conn, req).await
}

/// `/openai/models` and friends: not data-plane requests; only `health_status` applies.
fn health(st: &State, headers: &HeaderMap, deployments: bool) -> Response<MockBody> {
    if let Some(s) = st.faults.health_status() {
        return st.error(s, "Backend marked unhealthy (aoai-mock health_status).");
    }
    if !st.authorized(headers) {
        return unauthorized(st);
    }
    st.json(200, builders::model_list(now_secs(), deployments))
}

fn unauthorized(st: &State) -> Response<MockBody> {
    st.error(
        401,
        "Access denied due to invalid subscription key or wrong API endpoint.",
    )
}

fn body_field(v: Option<&Value>, k: &str) -> Value {
    v.and_then(|v| v.get(k)).cloned().unwrap_or(Value::Null)
}

async fn data_plane(conn: &Conn, req: Request<Incoming>) -> Result<Response<MockBody>, ResetConn> {
    let st = &*conn.st;
    Stats::inc(&st.stats.requests);
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Err(ResetConn),
    };
    let path = parts.uri.path();
    let stored_req = stored::parse(&parts.method, path);
    let files_req = files::parse(&parts.method, path);
    let (op, dep) = match (&stored_req, &files_req) {
        (Some(_), _) => (Op::ResponseFollowUp, None),
        (_, Some(_)) => (Op::Files, None),
        _ => parse_route(&parts.method, path),
    };
    let upload = match files_req {
        Some(files::Req::Upload) => {
            let ct = parts
                .headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            files::read_upload(ct, body.clone()).await.ok()
        }
        _ => None,
    };
    let content_json = parts.headers.get(CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes()
            .windows(4)
            .any(|w| w.eq_ignore_ascii_case(b"json"))
    });
    let parsed: Option<Result<Value, serde_json::Error>> =
        (op.json_body() || content_json).then(|| serde_json::from_slice(&body));
    // A multipart upload is read like Azure reads it (fields and files), with `multer`.
    // (A file upload was read above: not a second time, it may be hundreds of MB.)
    let form: Option<Result<Value, String>> =
        if !op.json_body() && op != Op::NotFound && files_req != Some(files::Req::Upload) {
            let ct = parts
                .headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            Some(form_fields(ct, body.clone()).await)
        } else {
            None
        };
    let parsed = match &form {
        Some(Ok(v)) => Some(Ok(v.clone())),
        _ => parsed,
    };
    let jv = parsed.as_ref().and_then(|r| r.as_ref().ok());

    let authorized = st.authorized(&parts.headers);
    let decision = if authorized {
        st.faults.decide()
    } else {
        Decision {
            fault: Fault::None,
            sleep_ms: st.faults.snapshot().latency_ms,
            chunk_delay_ms: 0,
        }
    };
    let result = if !authorized {
        Some(unauthorized(st))
    } else {
        match decision.fault {
            Fault::Reset => None,
            Fault::Status(s) => Some(st.error(
                s,
                &format!(
                    "Injected failure (status {s}) from aoai-mock backend {}.",
                    st.name_hv.to_str().unwrap_or("")
                ),
            )),
            Fault::TooMany(ms) => {
                let api_version = parts
                    .uri
                    .query()
                    .map(form_pairs)
                    .and_then(|p| pair(&p, "api-version").map(str::to_string))
                    .unwrap_or_else(|| "v1".into());
                let mut r = st.json(
                    429,
                    builders::too_many_body(op.azure_name(), &api_version, ms),
                );
                let h = r.headers_mut();
                h.insert(RETRY_AFTER_MS.clone(), HeaderValue::from(ms));
                h.insert(
                    RETRY_AFTER.clone(),
                    HeaderValue::from(builders::retry_after_secs(ms)),
                );
                h.insert(X_RL_REQUESTS.clone(), HeaderValue::from_static("0"));
                h.insert(X_RL_TOKENS.clone(), HeaderValue::from_static("0"));
                Some(r)
            }
            Fault::None if refuses_stream_options(op, parts.uri.query(), jv) => {
                Some(st.json(400, builders::unrecognized_argument_body("stream_options")))
            }
            Fault::None => Some(match &stored_req {
                None if files_req.is_some() => {
                    let req = files_req.as_ref().unwrap_or(&files::Req::List);
                    let (status, ctype, b) = st.files.answer(req, upload.as_ref(), &body);
                    st.respond(status, ctype, MockBody::full(b))
                }
                Some((action, id)) => {
                    let q = parts.uri.query().map(form_pairs).unwrap_or_default();
                    let a = st.responses.follow_up(*action, id, &st.reply, &q);
                    stored_answer(st, a, decision.chunk_delay_ms)
                }
                None => answer(st, op, dep, parsed.as_ref(), decision.chunk_delay_ms),
            }),
        }
    };

    // The capacity this deployment announces (a 429 keeps its own "0 remaining").
    let mut result = result;
    if let Some(r) = result
        .as_mut()
        .filter(|r| r.status() != StatusCode::TOO_MANY_REQUESTS)
    {
        let model = jv.and_then(|v| v.get("model")).and_then(Value::as_str);
        let a = st.capacity.announce(dep.or(model));
        let h = r.headers_mut();
        h.insert(X_RL_TOKENS.clone(), HeaderValue::from(a.remaining_tokens));
        h.insert(
            X_RL_REQUESTS.clone(),
            HeaderValue::from(a.remaining_requests),
        );
    }

    st.recorder.push(Record {
        seq: 0,
        method: parts.method.as_str().to_string(),
        path: path.to_string(),
        query: parts.uri.query().map(str::to_string),
        body_len: body.len(),
        body_sha256: Sha256::digest(&body).into(),
        model: body_field(jv, "model"),
        stream: body_field(jv, "stream"),
        stream_options: body_field(jv, "stream_options"),
        status: result.as_ref().map_or(0, |r| r.status().as_u16()),
        headers: parts.headers,
    });

    if decision.sleep_ms > 0 {
        tokio::time::sleep(Duration::from_millis(decision.sleep_ms)).await;
    }
    match result {
        Some(r) => Ok(r),
        None => {
            conn.reset.store(true, Ordering::Relaxed);
            Err(ResetConn)
        }
    }
}

/// The fields of a multipart upload as JSON: each text field by name (`model`, `prompt`, …)
/// and each file as `{"filename", "size", "sha256"}` under `files`.
async fn form_fields(content_type: &str, body: Bytes) -> Result<Value, String> {
    let boundary = multer::parse_boundary(content_type).map_err(|e| e.to_string())?;
    let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let mut m = multer::Multipart::new(stream, boundary);
    let mut out = serde_json::Map::new();
    let mut files = serde_json::Map::new();
    while let Some(f) = m.next_field().await.map_err(|e| e.to_string())? {
        let name = f.name().unwrap_or("").to_string();
        let filename = f.file_name().map(str::to_string);
        let data = f.bytes().await.map_err(|e| e.to_string())?;
        match filename {
            Some(filename) => {
                files.insert(
                    name,
                    json!({"filename": filename, "size": data.len(), "sha256": util::hex(&Sha256::digest(&data))}),
                );
            }
            None => {
                out.insert(
                    name,
                    Value::String(String::from_utf8_lossy(&data).into_owned()),
                );
            }
        }
    }
    out.insert("files".into(), Value::Object(files));
    Ok(Value::Object(out))
}

/// Like Azure: `api-version`s before `2024-09-01-preview` (`2024-02-01`, `2024-06-01`, …)
/// refuse a chat or completions body that has `stream_options` at all.
fn refuses_stream_options(op: Op, query: Option<&str>, body: Option<&Value>) -> bool {
    if !matches!(op, Op::Chat | Op::Completions)
        || body.and_then(|b| b.get("stream_options")).is_none()
    {
        return false;
    }
    let pairs = query.map(form_pairs).unwrap_or_default();
    pair(&pairs, "api-version").is_some_and(builders::version_refuses_stream_options)
}

/// The answer of a stored-response request.
fn stored_answer(st: &State, a: stored::Answer, chunk_delay_ms: u64) -> Response<MockBody> {
    match a {
        stored::Answer::Json(status, body) => st.json(status, body),
        stored::Answer::Sse(b) => st.respond(
            200,
            SSE,
            MockBody::Sse(b.into_body(Duration::from_millis(chunk_delay_ms))),
        ),
    }
}

/// The normal answer of a data-plane request.
fn answer(
    st: &State,
    op: Op,
    dep: Option<&str>,
    parsed: Option<&Result<Value, serde_json::Error>>,
    chunk_delay_ms: u64,
) -> Response<MockBody> {
    if op == Op::NotFound {
        return st.json(404, builders::error_body("404", "Resource not found"));
    }
    let empty = Value::Null;
    let v = match parsed {
        Some(Ok(v)) => v,
        Some(Err(e)) => return st.error(400, &format!("Invalid JSON body: {e}")),
        None => &empty,
    };
    let model = match dep {
        Some(d) => d.to_string(),
        None => match v.get("model").and_then(Value::as_str) {
            Some(m) if !m.is_empty() => m.to_string(),
            _ if op.needs_model() => {
                return st.error(400, "The 'model' field is required (the deployment name).");
            }
            _ => String::new(),
        },
    };
    let model_json = json_str(&model);
    let created = now_secs();
    let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = v
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let delay = Duration::from_millis(chunk_delay_ms);
    let n = st.ids.next();
    let r = &st.reply;
    match op {
        Op::Chat => {
            let id = st.ids.object_id("chatcmpl-", n);
            let m = Meta {
                id: &id,
                created,
                model_json: &model_json,
            };
            let p = builders::chat_prompt_tokens(v);
            if stream {
                let b = builders::chat_stream(&m, r, p, include_usage);
                st.respond(200, SSE, MockBody::Sse(b.into_body(delay)))
            } else {
                st.json(200, builders::chat_completion(&m, r, p))
            }
        }
        Op::Completions => {
            let id = st.ids.object_id("cmpl-", n);
            let m = Meta {
                id: &id,
                created,
                model_json: &model_json,
            };
            let p = builders::completion_prompt_tokens(v);
            if stream {
                let b = builders::completion_stream(&m, r, p, include_usage);
                st.respond(200, SSE, MockBody::Sse(b.into_body(delay)))
            } else {
                st.json(200, builders::completion(&m, r, p))
            }
        }
        Op::Embeddings => {
            let inputs = match builders::embedding_inputs(v) {
                Ok(i) => i,
                Err(e) => return st.error(400, e),
            };
            let dims = match v.get("dimensions") {
                None | Some(Value::Null) => 8,
                Some(d) => match d.as_u64() {
                    Some(d @ 1..=16384) => d as usize,
                    _ => return st.error(400, "'dimensions' must be an integer within 1..16384."),
                },
            };
            let base64 = match v.get("encoding_format").and_then(Value::as_str) {
                None | Some("float") => false,
                Some("base64") => true,
                Some(_) => return st.error(400, "'encoding_format' must be 'float' or 'base64'."),
            };
            let p = builders::tokens_of(builders::text_bytes(&v["input"]));
            st.json(
                200,
                builders::embeddings(&model_json, &inputs, dims, base64, p),
            )
        }
        Op::Responses => {
            if let Some(refused) = st.responses.check_create(v) {
                return stored_answer(st, refused, chunk_delay_ms);
            }
            let id = st.ids.object_id("resp_", n);
            let msg_id = st.ids.object_id("msg_", n);
            let m = Meta {
                id: &id,
                created,
                model_json: &model_json,
            };
            let p = builders::responses_input_tokens(v);
            stored_answer(
                st,
                st.responses.create(&m, &msg_id, r, v, p),
                chunk_delay_ms,
            )
        }
        Op::ImagesGenerations | Op::ImagesEdits => {
            let b64 = v.get("response_format").and_then(Value::as_str) == Some("b64_json")
                || model.starts_with("gpt-image");
            st.json(200, builders::images(created, b64, &model, v))
        }
        Op::AudioTranscriptions | Op::AudioTranslations => {
            // What arrived, so that a test can tell the deployment and the file it saw.
            let file = v.get("files").and_then(|f| f.get("file")).cloned();
            let text = format!(
                "model={model} file={}",
                file.as_ref()
                    .map(|f| format!("{} {} {}", f["filename"], f["size"], f["sha256"]))
                    .unwrap_or_default()
            );
            st.json(
                200,
                json!({"text": text, "model": model, "file": file}).to_string(),
            )
        }
        Op::AudioSpeech => {
            // An MP3 frame header, then the input text: the bytes a test can compare.
            let mut audio = vec![0xff, 0xf3, 0x44, 0xc4];
            audio.extend_from_slice(
                v.get("input")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .as_bytes(),
            );
            st.respond(200, "audio/mpeg", MockBody::full(Bytes::from(audio)))
        }
        Op::ResponseFollowUp | Op::Files | Op::NotFound => {
            st.json(404, builders::error_body("404", "Resource not found"))
        }
    }
}

/// The App Service managed-identity endpoint (`IDENTITY_ENDPOINT`), as read by
/// `azure_identity` 1.x: `access_token`, `expires_on` (a string of Unix
/// seconds), `token_type` and `resource` are required.
fn msi_token(st: &State, req: &Request<Incoming>) -> Response<MockBody> {
    Stats::inc(&st.stats.token_requests);
    if req.method() != Method::GET {
        return st.plain(405, builders::error_body("MethodNotAllowed", "Use GET."));
    }
    if let Some(s) = st.faults.identity_status() {
        return st.plain(
            s,
            builders::error_body(
                "IdentityEndpointFault",
                "Token endpoint failing (aoai-mock identity_status).",
            ),
        );
    }
    let secret_ok = req
        .headers()
        .get(&X_IDENTITY_HEADER)
        .is_some_and(|v| v.as_bytes() == st.identity_header.as_bytes());
    if !secret_ok {
        return st.plain(
            401,
            builders::error_body("UnauthorizedRequest", "Missing or wrong X-IDENTITY-HEADER."),
        );
    }
    let q = form_pairs(req.uri().query().unwrap_or(""));
    let Some(resource) = pair(&q, "resource").filter(|r| !r.is_empty()) else {
        return st.plain(
            400,
            builders::error_body("BadRequest", "The 'resource' parameter is required."),
        );
    };
    let client_id = [
        "client_id",
        "principal_id",
        "object_id",
        "mi_res_id",
        "msi_res_id",
    ]
    .iter()
    .find_map(|k| pair(&q, k))
    .unwrap_or("00000000-0000-4000-8000-0000000000aa");
    let expires_on = now_secs() + st.identity_expires_in;
    st.plain(
        200,
        json!({
            "access_token": st.identity_token,
            "expires_on": expires_on.to_string(),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": client_id,
        })
        .to_string(),
    )
}

async fn oidc_token(conn: Arc<Conn>, req: Request<Incoming>) -> Response<MockBody> {
    let st = &*conn.st;
    if req.method() != Method::POST {
        return st.plain(405, oidc::token_error_body("invalid_request", "Use POST."));
    }
    let auth = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match read_limited(req.into_body()).await {
        Ok(b) => b,
        Err(e) => return st.plain(400, oidc::token_error_body("invalid_request", &e)),
    };
    let tr = match oidc::parse_token_request(&String::from_utf8_lossy(&body), auth.as_deref()) {
        Ok(t) => t,
        Err((s, code, desc)) => return st.plain(s, oidc::token_error_body(code, &desc)),
    };
    let c2 = conn.clone();
    let minted = tokio::task::spawn_blocking(move || match &c2.st.oidc {
        Some(o) => o.token_body(&tr, now_secs()),
        None => Err("OIDC disabled".to_string()),
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    match minted {
        Ok(b) => st.plain(200, b),
        Err(e) => st.plain(500, oidc::token_error_body("server_error", &e)),
    }
}

async fn read_limited(body: Incoming) -> Result<Bytes, String> {
    let b = http_body_util::Limited::new(body, CONTROL_BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| format!("cannot read body: {e}"))?;
    Ok(b.to_bytes())
}

fn control_error(st: &State, status: u16, msg: &str) -> Response<MockBody> {
    st.plain(status, json!({"error": msg}).to_string())
}

/// `/_mock/…`: the control API.
async fn control(st: &State, rest: &str, req: Request<Incoming>) -> Response<MockBody> {
    let method = req.method().clone();
    match (rest, method) {
        ("faults", Method::GET) => st.plain(
            200,
            serde_json::to_string(&st.faults.snapshot()).unwrap_or_default(),
        ),
        ("faults", Method::POST | Method::PUT | Method::PATCH) => {
            let body = match read_limited(req.into_body()).await {
                Ok(b) => b,
                Err(e) => return control_error(st, 400, &e),
            };
            let patch: FaultPatch = match serde_json::from_slice(&body) {
                Ok(p) => p,
                Err(e) => return control_error(st, 400, &format!("invalid faults: {e}")),
            };
            match st.faults.apply(&patch) {
                Ok(v) => st.plain(200, serde_json::to_string(&v).unwrap_or_default()),
                Err(e) => control_error(st, 400, &e),
            }
        }
        ("requests", Method::GET) => {
            let list: Vec<Value> = st.recorder.list().iter().map(|r| r.to_json()).collect();
            st.plain(200, Value::Array(list).to_string())
        }
        ("requests", Method::DELETE) => {
            st.recorder.clear();
            st.no_content()
        }
        ("stats", Method::GET) => st.plain(200, st.stats.to_json().to_string()),
        ("stats", Method::DELETE) => {
            st.stats.clear();
            st.no_content()
        }
        ("capacity", Method::GET) => st.plain(200, st.capacity.to_json().to_string()),
        ("capacity", Method::POST | Method::PUT | Method::PATCH) => {
            let body = match read_limited(req.into_body()).await {
                Ok(b) => b,
                Err(e) => return control_error(st, 400, &e),
            };
            match serde_json::from_slice::<capacity::Patch>(&body) {
                Ok(p) => {
                    st.capacity.apply(p);
                    st.plain(200, st.capacity.to_json().to_string())
                }
                Err(e) => control_error(
                    st,
                    400,
                    &format!("body must be {{\"DEPLOYMENT or *\": {{\"remaining_tokens\": N, \"remaining_requests\": N}} or null}}: {e}"),
                ),
            }
        }
        ("capacity", Method::DELETE) => {
            st.capacity.clear();
            st.no_content()
        }
        ("reset", Method::POST) => {
            st.capacity.clear();
            let _ = st.faults.set(&st.initial_faults);
            st.recorder.clear();
            st.stats.clear();
            if let Some(o) = &st.oidc {
                o.set_jwks(None);
                o.set_down(false);
            }
            st.no_content()
        }
        ("oidc/jwks", m @ (Method::PUT | Method::POST | Method::DELETE)) => {
            let Some(o) = &st.oidc else {
                return control_error(st, 404, "OIDC provider not enabled (--oidc)");
            };
            if m == Method::DELETE {
                o.set_jwks(None);
                return st.no_content();
            }
            let body = match read_limited(req.into_body()).await {
                Ok(b) => b,
                Err(e) => return control_error(st, 400, &e),
            };
            match serde_json::from_slice::<Value>(&body) {
                Ok(v) if v.get("keys").is_some_and(Value::is_array) => {
                    o.set_jwks(Some(body));
                    st.no_content()
                }
                _ => control_error(st, 400, "body must be a JWKS: {\"keys\":[...]}"),
            }
        }
        ("oidc/outage", Method::POST | Method::PUT) => {
            let Some(o) = &st.oidc else {
                return control_error(st, 404, "OIDC provider not enabled (--oidc)");
            };
            let body = match read_limited(req.into_body()).await {
                Ok(b) => b,
                Err(e) => return control_error(st, 400, &e),
            };
            match serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("down").and_then(Value::as_bool))
            {
                Some(d) => {
                    o.set_down(d);
                    st.plain(200, json!({"down": d}).to_string())
                }
                None => control_error(st, 400, "body must be {\"down\": true|false}"),
            }
        }
        _ => control_error(st, 404, "unknown control endpoint"),
    }
}

async fn serve(listener: TcpListener, st: Arc<State>) {
    let mut builder = http1::Builder::new();
    builder.keep_alive(true);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("aoai-mock: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(Conn {
            st: st.clone(),
            reset: AtomicBool::new(false),
        });
        let io = TokioIo::new(ConnIo {
            stream,
            conn: conn.clone(),
        });
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(conn.clone(), req));
            let _ = builder.serve_connection(io, svc).with_upgrades().await;
        });
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("aoai-mock: {e}");
        std::process::exit(2);
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let initial_faults = FaultValues {
        latency_ms: cli.latency_ms,
        chunk_delay_ms: cli.chunk_delay_ms,
        fail_429_count: cli.fail_429_count,
        fail_429_share: cli.fail_429_share,
        retry_after_ms: cli.retry_after_ms,
        fail_status: cli.fail_status,
        fail_count: cli.fail_count,
        reset_count: cli.reset_count,
        stall_count: cli.stall_count,
        stall_ms: cli.stall_ms,
        health_status: 0,
        identity_status: 0,
    };
    let faults = Faults::new(&initial_faults)?;
    let name_hv = HeaderValue::from_str(&cli.name)
        .map_err(|_| "--name must be a valid header value".to_string())?;
    // One thread: a current-thread runtime (no cross-thread wake-ups at all).
    let mut rt = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(cli.threads);
        b
    };
    let rt = rt
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async move {
        let listener = TcpListener::bind(&cli.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", cli.listen))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let oidc = if cli.oidc {
            let host = if addr.ip().is_unspecified() {
                format!("127.0.0.1:{}", addr.port())
            } else {
                addr.to_string()
            };
            Some(oidc::Oidc::generate(
                &format!("http://{host}"),
                cli.oidc_issuer.as_deref(),
            )?)
        } else {
            None
        };
        let st = Arc::new(State {
            reply: Reply::with_pieces(&cli.name, cli.stream_chunks),
            name_hv,
            require_bearer: cli.require_bearer,
            require_api_key: cli.require_api_key,
            identity_token: cli.identity_token,
            identity_header: cli.identity_header,
            identity_expires_in: cli.identity_expires_in,
            oidc,
            faults,
            initial_faults,
            recorder: Recorder::new(RECORD_CAPACITY),
            stats: Stats::default(),
            ids: util::IdGen::new(),
            responses: stored::Responses::new(Duration::from_millis(cli.background_delay_ms)),
            files: files::Files::new(Duration::from_millis(cli.background_delay_ms)),
            capacity: capacity::Capacity::new(capacity::Announce {
                remaining_tokens: cli.remaining_tokens,
                remaining_requests: cli.remaining_requests,
            }),
        });
        {
            let mut out = io::stdout().lock();
            let _ = writeln!(out, "aoai-mock listening on {addr}");
            let _ = out.flush();
        }
        serve(listener, st).await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let p = Method::POST;
        assert_eq!(
            parse_route(&p, "/openai/deployments/gpt-4o/chat/completions"),
            (Op::Chat, Some("gpt-4o"))
        );
        assert_eq!(
            parse_route(&p, "/openai/v1/chat/completions"),
            (Op::Chat, None)
        );
        assert_eq!(
            parse_route(&p, "/openai/deployments/d/completions"),
            (Op::Completions, Some("d"))
        );
        assert_eq!(
            parse_route(&p, "/openai/v1/embeddings"),
            (Op::Embeddings, None)
        );
        assert_eq!(parse_route(&p, "/openai/responses"), (Op::Responses, None));
        assert_eq!(
            parse_route(&p, "/openai/v1/responses"),
            (Op::Responses, None)
        );
        assert_eq!(
            parse_route(&p, "/openai/deployments/d/audio/speech"),
            (Op::AudioSpeech, Some("d"))
        );
        assert_eq!(
            parse_route(&p, "/openai/deployments/d/images/generations"),
            (Op::ImagesGenerations, Some("d"))
        );
        assert_eq!(
            parse_route(&p, "/openai/deployments//chat/completions").0,
            Op::NotFound
        );
        assert_eq!(parse_route(&p, "/openai/files").0, Op::NotFound);
        assert_eq!(
            parse_route(&p, "/openai/deployments/d/files").0,
            Op::NotFound
        );
        assert_eq!(
            parse_route(&Method::GET, "/openai/v1/chat/completions").0,
            Op::NotFound
        );
        assert_eq!(is_health_path("/openai/models"), Some(false));
        assert_eq!(is_health_path("/openai/deployments"), Some(true));
        assert_eq!(is_health_path("/openai/v1/models"), Some(false));
        assert_eq!(is_health_path("/openai/v1/chat"), None);
    }

    fn state(bearer: Option<&str>, key: Option<&str>) -> State {
        State {
            name_hv: HeaderValue::from_static("t"),
            reply: Reply::new("t"),
            require_bearer: bearer.map(str::to_string),
            require_api_key: key.map(str::to_string),
            identity_token: String::new(),
            identity_header: String::new(),
            identity_expires_in: 0,
            oidc: None,
            faults: Faults::new(&FaultValues {
                fail_status: 500,
                ..Default::default()
            })
            .unwrap(),
            initial_faults: FaultValues::default(),
            recorder: Recorder::new(1),
            stats: Stats::default(),
            ids: util::IdGen::new(),
            responses: stored::Responses::new(Duration::from_millis(10)),
            files: files::Files::new(Duration::from_millis(10)),
            capacity: capacity::Capacity::new(capacity::Announce {
                remaining_tokens: 999_000,
                remaining_requests: 9_999,
            }),
        }
    }

    #[test]
    fn auth() {
        let mut h = HeaderMap::new();
        assert!(state(None, None).authorized(&h));
        assert!(!state(Some("t1"), None).authorized(&h));
        h.insert("authorization", "Bearer t1".parse().unwrap());
        assert!(state(Some("t1"), None).authorized(&h));
        assert!(!state(Some("t2"), None).authorized(&h));
        assert!(!state(None, Some("k")).authorized(&h));
        h.insert("api-key", "k".parse().unwrap());
        assert!(state(None, Some("k")).authorized(&h));
        assert!(state(Some("t2"), Some("k")).authorized(&h));
        let mut h = HeaderMap::new();
        h.insert("authorization", "bearer t1".parse().unwrap());
        assert!(state(Some("t1"), None).authorized(&h));
    }

    /// Sends one raw HTTP/1.1 request (Connection: close); the bytes read, or an error.
    async fn raw(addr: std::net::SocketAddr, req: &str) -> io::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn post(path: &str, body: &str) -> String {
        format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[tokio::test]
    async fn end_to_end_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let st = Arc::new(state(None, None));
        tokio::spawn(serve(listener, st.clone()));
        let chat = "/openai/deployments/d1/chat/completions?api-version=2024-10-21";

        let r = raw(
            addr,
            &post(
                chat,
                r#"{"messages":[{"role":"user","content":"abcdabcd"}]}"#,
            ),
        )
        .await
        .unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("\"prompt_tokens\":2"), "{r}");
        assert!(r.contains("x-mock-name: t"), "{r}");

        let r = raw(addr, &post(chat, r#"{"stream":true,"messages":[]}"#))
            .await
            .unwrap();
        assert!(r.contains("transfer-encoding: chunked"), "{r}");
        assert!(r.contains("text/event-stream"), "{r}");
        assert!(r.contains("data: [DONE]"), "{r}");

        st.faults
            .apply(&serde_json::from_str(r#"{"reset_count":1}"#).unwrap())
            .unwrap();
        // Closed without an answer: nothing or a connection reset.
        match raw(addr, &post(chat, "{}")).await {
            Ok(s) => assert_eq!(s, ""),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        }
        let r = raw(addr, &post(chat, "{}")).await.unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");

        let r = raw(
            addr,
            "GET /_mock/stats HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        assert!(r.contains("\"requests\":4"), "{r}");
        let statuses: Vec<u16> = st.recorder.list().iter().map(|r| r.status).collect();
        assert_eq!(statuses, vec![200]); // capacity 1 in this test state
    }

    #[tokio::test]
    async fn identity_endpoint_issues_short_lived_tokens_and_can_fail() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut st = state(None, None);
        st.identity_token = "mi".into();
        st.identity_header = "secret".into();
        st.identity_expires_in = 5;
        let st = Arc::new(st);
        tokio::spawn(serve(listener, st.clone()));
        let get = "GET /msi/token?api-version=2019-08-01&resource=https://cognitiveservices.azure.com HTTP/1.1\r\nhost: x\r\nx-identity-header: secret\r\nconnection: close\r\n\r\n";

        let r = raw(addr, get).await.unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let body: Value = serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["access_token"], "mi");
        let expires: u64 = body["expires_on"].as_str().unwrap().parse().unwrap();
        let now = now_secs();
        assert!((now + 4..=now + 5).contains(&expires), "{expires} vs {now}");

        st.faults
            .apply(&serde_json::from_str(r#"{"identity_status":503}"#).unwrap())
            .unwrap();
        let r = raw(addr, get).await.unwrap();
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(!r.contains("\"access_token\""), "{r}");
        st.faults
            .apply(&serde_json::from_str(r#"{"identity_status":0}"#).unwrap())
            .unwrap();
        let r = raw(addr, get).await.unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert_eq!(st.stats.to_json()["token_requests"], 3);
    }

    #[test]
    fn response_headers() {
        let st = state(None, None);
        let r = st.json(200, "{}");
        let h = r.headers();
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["apim-request-id"], h["x-request-id"]);
        assert_eq!(h["apim-request-id"].len(), 36);
        assert_eq!(h["x-mock-name"], "t");
        assert!(h.contains_key("x-ratelimit-remaining-requests"));
        assert!(h.contains_key("x-ratelimit-remaining-tokens"));
        let r2 = st.json(200, "{}");
        assert_ne!(r2.headers()["apim-request-id"], h["apim-request-id"]);
    }
}
