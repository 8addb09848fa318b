//! Checks shared by the fuzz targets (`fuzz_targets/*.rs`) and the regression test
//! (`tests/regressions.rs`). Each target is one plain function `check_xxx(data: &[u8])` that
//! panics when an invariant breaks, so a finding can be replayed with `cargo test`.
//!
//! - [`check_request_head`]: the gateway's HTTP/1 codec reading pipelined requests;
//! - [`check_chunked_body`]: the chunked decoder against [`reference::chunked`];
//! - [`check_response_framing`]: backend answers (interim heads, framing, body);
//! - [`check_body_fields`]: the request-body field reader and the usage reader against serde;
//! - [`check_sse_usage`]: the SSE usage tracker, whole and split;
//! - [`check_config_load`]: the configuration loader;
//! - [`check_framing_differential`]: the gateway's codec against hyper's HTTP/1 server.

use std::future::Future;

use bytes::Bytes;
use gateway::http1::framing::MAX_INTERIM;
use gateway::http1::{BodyReader, Conn, Framing, H1Error, Head, MAX_HEAD};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

pub mod differential;
pub mod reference;

pub use differential::check_framing_differential;

thread_local! {
    /// Whether known findings fail the checks (`FUZZ_STRICT=1`, or [`set_strict`]).
    static STRICT: std::cell::Cell<bool> =
        std::cell::Cell::new(std::env::var_os("FUZZ_STRICT").is_some_and(|v| v != "0"));
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
}

/// Runs a future to its end on this thread's runtime (one per fuzzing thread, reused).
pub fn block_on<F: Future>(f: F) -> F::Output {
    RT.with(|rt| rt.block_on(f))
}

/// Makes known findings fail the checks on this thread (or step around them again).
pub fn set_strict(on: bool) {
    STRICT.with(|s| s.set(on));
}

/// A known finding (README.md, "Findings") that `applies` to this input: the checks step
/// around it so that fuzzing goes on past it, unless strict. Each has a saved input in
/// `fuzz/regressions/<target>/<id>-*`, which the regression test replays strictly and
/// expects to fail until the finding is fixed.
pub fn known(id: &str, applies: bool) -> bool {
    let _ = id;
    applies && !STRICT.with(std::cell::Cell::get)
}

/// FNV-1a: a cheap, stable hash of an input (chooses how its bytes are delivered).
pub fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// How the input reaches the codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// All bytes are in the pipe before the first read.
    Whole,
    /// The pipe holds at most this many bytes: every read returns at most that many, so
    /// heads, chunk lines and trailers arrive in pieces.
    Trickle(usize),
}

impl Delivery {
    /// The two deliveries every codec check runs: whole, and in pieces of 1 to 16 bytes
    /// (chosen by the input's hash; larger for inputs over 1 KiB).
    pub fn both(data: &[u8]) -> [Delivery; 2] {
        [
            Delivery::Whole,
            // At most ~64 reads for a large input: a partial head or line is parsed again
            // from its start at every read, so 1-byte pieces of a 4 KiB input are slow.
            Delivery::Trickle((1 + (fnv(data) % 16) as usize).max(data.len() / 64)),
        ]
    }

    fn capacity(self, len: usize) -> usize {
        match self {
            Delivery::Whole => len + 1,
            Delivery::Trickle(n) => n,
        }
    }
}

/// Runs `serve` on one end of a duplex pipe while `data` is written into the other end
/// (then its write side is shut down: the peer sees EOF) and everything `serve` writes back
/// (a `100 Continue`, say) is drained. Bounded: the writer ends at the end of `data` or when
/// `serve` drops its end.
pub async fn over_pipe<T, F, Fut>(data: &[u8], delivery: Delivery, serve: F) -> T
where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: Future<Output = T>,
{
    let (client, server) = tokio::io::duplex(delivery.capacity(data.len()));
    let (mut rd, mut wr) = tokio::io::split(client);
    let write = async move {
        let _ = wr.write_all(data).await;
        let _ = wr.shutdown().await;
    };
    let drain = async move {
        let mut sink = [0u8; 1024];
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let (out, (), ()) = tokio::join!(serve(server), write, drain);
    out
}

/// Reads a body to its end (every piece non-empty, the reader done at the end).
pub async fn read_body(
    conn: &mut Conn<DuplexStream>,
    framing: Framing,
) -> Result<Vec<u8>, H1Error> {
    let mut reader = BodyReader::new(framing);
    let mut body = Vec::new();
    while let Some(piece) = reader.next(conn).await? {
        assert!(!piece.is_empty(), "an empty piece before the end of a body");
        body.extend_from_slice(&piece);
    }
    assert!(
        reader.is_done(),
        "a body reader answered None before its end"
    );
    Ok(body)
}

/// Every byte still to come on a connection (its buffer, then the pipe to EOF).
pub async fn rest(conn: &mut Conn<DuplexStream>) -> Vec<u8> {
    read_body(conn, Framing::Close)
        .await
        .expect("reading to EOF never fails")
}

/// One request as the gateway's codec read it.
#[derive(Debug, Clone)]
pub struct GwRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub minor: u8,
    pub wire_len: usize,
    pub framing: Framing,
    pub body: Vec<u8>,
    pub keep_alive: bool,
    pub expect_continue: bool,
    /// (name, value) of every field, as the head reports them.
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Why the gateway's read of a connection stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GwEnd {
    /// EOF where a request could begin.
    Eof,
    /// The last request did not allow another one (`Connection: close`, HTTP/1.0).
    Close,
    /// A head that could not be read (the text of the error).
    Head(String),
    /// A head whose framing the gateway refuses.
    Framing(String),
    /// A body that could not be read to its framed end.
    Body(String),
}

impl GwEnd {
    pub fn is_refusal(&self) -> bool {
        !matches!(self, GwEnd::Eof | GwEnd::Close)
    }
}

#[derive(Debug, Clone)]
pub struct GwRun {
    pub requests: Vec<GwRequest>,
    pub end: GwEnd,
}

fn request_of(head: &Head, framing: Framing, body: Vec<u8>) -> GwRequest {
    GwRequest {
        method: head.method().to_string(),
        path: head.path().to_string(),
        query: head.query().map(str::to_string),
        minor: head.minor,
        wire_len: head.wire_len(),
        framing,
        body,
        keep_alive: head.keep_alive(),
        expect_continue: head
            .get(gateway::http1::Name::Expect)
            .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue")),
        fields: head
            .fields()
            .map(|(_, n, v)| (n.to_vec(), v.to_vec()))
            .collect(),
    }
}

/// The gateway's request loop (as `serve_h1` and `H1::read_body` do it): a head, its framing,
/// its body (a `100 Continue` first when asked and nothing is buffered), and the next
/// request while the connection may carry one. Stops at the first error.
pub async fn gateway_requests(data: &[u8], delivery: Delivery) -> GwRun {
    over_pipe(data, delivery, |io| async move {
        let mut conn = Conn::new(io);
        let mut requests = Vec::new();
        let end = loop {
            let head = match conn.read_head(false).await {
                Ok(None) => break GwEnd::Eof,
                Ok(Some(h)) => h,
                Err(e) => break GwEnd::Head(e.to_string()),
            };
            assert!(
                head.wire_len() <= MAX_HEAD,
                "a head of {} bytes was accepted",
                head.wire_len()
            );
            assert_eq!(head.status, 0, "a request head with a status");
            assert!(head.minor <= 1, "HTTP/1.{}", head.minor);
            let framing = match head.request_framing() {
                Ok(f) => f,
                Err(e) => break GwEnd::Framing(e.to_string()),
            };
            reference::assert_request_framing_sound(&head, framing);
            if head
                .get(gateway::http1::Name::Expect)
                .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"))
                && head.minor == 1
                && !conn.has_buffered()
                && framing != Framing::Length(0)
            {
                let _ = conn.send(b"HTTP/1.1 100 Continue\r\n\r\n").await;
            }
            let body = match read_body(&mut conn, framing).await {
                Ok(b) => b,
                Err(e) => break GwEnd::Body(e.to_string()),
            };
            if let Framing::Length(n) = framing {
                assert_eq!(body.len() as u64, n, "a Length({n}) body of another size");
            }
            let keep_alive = head.keep_alive();
            requests.push(request_of(&head, framing, body));
            if !keep_alive {
                break GwEnd::Close;
            }
        };
        GwRun { requests, end }
    })
    .await
}

/// Where the bytes of each request sit in the input: re-parses every head the gateway
/// accepted at the offset where the previous message ended (httparse itself, with the same
/// limits) and checks that it is the same head, that a length body is the bytes after it,
/// and that a chunked body is what [`reference::chunked`] decodes there. Returns the
/// offset where the last request ended and each request's raw target.
pub fn locate_requests(data: &[u8], run: &GwRun) -> (usize, Vec<String>) {
    let mut at = 0usize;
    let mut targets = Vec::new();
    for (i, r) in run.requests.iter().enumerate() {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        let used = match req.parse(&data[at..]) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("request {i} at offset {at}: the gateway read a head httparse does not find there ({other:?})"),
        };
        // The gateway drops CRLF pairs before a request itself; httparse skips empty lines.
        assert!(
            used >= r.wire_len,
            "request {i}: head longer than its bytes"
        );
        let skipped = used - r.wire_len;
        assert!(
            data[at..at + skipped]
                .iter()
                .all(|&b| b == b'\r' || b == b'\n'),
            "request {i}: {skipped} bytes before the head are not empty lines"
        );
        assert_eq!(req.method.unwrap_or(""), r.method, "request {i}: method");
        assert_eq!(req.version, Some(r.minor), "request {i}: version");
        let fields: Vec<(Vec<u8>, Vec<u8>)> = req
            .headers
            .iter()
            .map(|h| (h.name.as_bytes().to_vec(), h.value.to_vec()))
            .collect();
        assert_eq!(fields, r.fields, "request {i}: fields");
        // httparse hands the target over as `str` without checking it is UTF-8.
        let target = std::str::from_utf8(req.path.unwrap_or("").as_bytes()).unwrap_or("");
        let (path, query) = reference::target_path_query(target);
        if !target.is_empty() {
            assert_eq!(
                (r.path.as_str(), r.query.as_deref()),
                (path.as_str(), query),
                "request {i}: path and query of {target:?}"
            );
        }
        targets.push(target.to_string());
        at += used;
        match r.framing {
            Framing::Length(n) => {
                let n = n as usize;
                assert!(at + n <= data.len(), "request {i}: body past the input");
                assert_eq!(&data[at..at + n], &r.body[..], "request {i}: length body");
                at += n;
            }
            Framing::Chunked => match reference::chunked(&data[at..]) {
                reference::Chunked::Complete { body, used, .. } => {
                    assert_eq!(body, r.body, "request {i}: chunked body differs from the reference");
                    at += used;
                }
                other => panic!(
                    "request {i}: the gateway decoded a chunked body the reference does not: {other:?}"
                ),
            },
            Framing::Close => panic!("request {i}: a request body delimited by the close"),
        }
    }
    assert!(at <= data.len(), "consumed more than the input");
    (at, targets)
}

/// Target `request_head`: the gateway's request loop over any bytes, delivered whole and in
/// pieces. No panic; heads within [`MAX_HEAD`]; length bodies of their length; chunked
/// bodies as the reference decodes them; every head where the previous message ended;
/// never more consumed than given; the same requests however the bytes arrive.
pub fn check_request_head(data: &[u8]) {
    let mut runs = Vec::new();
    for delivery in Delivery::both(data) {
        let run = block_on(gateway_requests(data, delivery));
        let (end, _) = locate_requests(data, &run);
        if run.end == GwEnd::Eof {
            // EOF where a request could begin: only empty lines were left.
            assert!(
                data[end..].chunks(2).all(|p| p == b"\r\n"),
                "{delivery:?}: clean EOF with unread bytes"
            );
        }
        runs.push((delivery, run));
    }
    let (a, b) = (&runs[0].1, &runs[1].1);
    let same = |x: &GwRequest, y: &GwRequest| {
        x.method == y.method
            && x.path == y.path
            && x.query == y.query
            && x.body == y.body
            && x.framing == y.framing
    };
    assert_eq!(
        a.requests.len(),
        b.requests.len(),
        "whole vs {:?}: {} vs {} requests ({:?} / {:?})",
        runs[1].0,
        a.requests.len(),
        b.requests.len(),
        a.end,
        b.end
    );
    for (i, (x, y)) in a.requests.iter().zip(&b.requests).enumerate() {
        assert!(
            same(x, y),
            "request {i} differs by delivery: {x:?} vs {y:?}"
        );
    }
    assert_eq!(
        a.end.is_refusal(),
        b.end.is_refusal(),
        "{:?} vs {:?}",
        a.end,
        b.end
    );
}

/// What the chunked decoder made of one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GwChunked {
    /// The body, and every byte after it.
    Ok {
        body: Vec<u8>,
        rest: Vec<u8>,
    },
    /// EOF before the end.
    Closed,
    Malformed(String),
}

pub async fn gateway_chunked(data: &[u8], delivery: Delivery) -> GwChunked {
    over_pipe(data, delivery, |io| async move {
        let mut conn = Conn::new(io);
        match read_body(&mut conn, Framing::Chunked).await {
            Ok(body) => GwChunked::Ok {
                body,
                rest: rest(&mut conn).await,
            },
            Err(H1Error::Closed) => GwChunked::Closed,
            Err(e) => GwChunked::Malformed(e.to_string()),
        }
    })
    .await
}

/// Target `chunked_body`: the gateway's chunked decoder against a plain reference decoder of
/// RFC 9112 §7.1 ([`reference::chunked`]). Whenever the gateway accepts, the reference
/// accepts the same bytes with the same body (and the gateway leaves exactly what follows);
/// EOF before the end only where the reference needs more bytes too; and what the reference
/// accepts within the gateway's documented limits is accepted.
pub fn check_chunked_body(data: &[u8]) {
    let reference = reference::chunked(data);
    let mut outcomes = Vec::new();
    for delivery in Delivery::both(data) {
        let got = block_on(gateway_chunked(data, delivery));
        match (&got, &reference) {
            (
                GwChunked::Ok { body, rest },
                reference::Chunked::Complete {
                    body: want, used, ..
                },
            ) => {
                assert_eq!(body, want, "{delivery:?}: body differs from the reference");
                assert_eq!(
                    &rest[..],
                    &data[*used..],
                    "{delivery:?}: the body ended elsewhere"
                );
            }
            (GwChunked::Ok { .. }, other) => {
                panic!("{delivery:?}: the gateway accepted what the reference refuses: {other:?}")
            }
            (GwChunked::Closed, reference::Chunked::Incomplete) => {}
            // The CRLF after chunk data is checked once both bytes are in: a wrong last byte
            // of the input is then EOF, not a refusal. Both refuse.
            (GwChunked::Closed, reference::Chunked::Invalid(at)) if *at + 1 == data.len() => {}
            (GwChunked::Closed, other) => {
                panic!("{delivery:?}: EOF needed, but the reference says {other:?}")
            }
            (GwChunked::Malformed(why), reference::Chunked::Complete { stats, .. }) => {
                assert!(
                    !stats.within_gateway_limits(),
                    "{delivery:?}: refused ({why}) a valid body within every limit: {stats:?}"
                );
            }
            (GwChunked::Malformed(_), _) => {}
        }
        outcomes.push(got);
    }
    // However the bytes arrive, the same answer (a refusal may be worded differently).
    match (&outcomes[0], &outcomes[1]) {
        (GwChunked::Malformed(_), GwChunked::Malformed(_)) => {}
        (x, y) => assert_eq!(x, y, "the outcome depends on delivery"),
    }
}

/// One response as the gateway's codec read it.
#[derive(Debug)]
pub struct GwResponse {
    pub status: u16,
    pub wire_len: usize,
    pub framing: Framing,
    pub body: Vec<u8>,
}

/// The gateway's backend-answer loop (`final_head` in proxy.rs: interim answers skipped, at
/// most [`MAX_INTERIM`], a 101 refused), the body by its framing, and — as on a pooled
/// connection — the next answer after a body that did not end with the connection.
pub async fn gateway_responses(
    data: &[u8],
    delivery: Delivery,
) -> (Vec<GwResponse>, Vec<usize>, Option<String>) {
    over_pipe(data, delivery, |io| async move {
        let mut conn = Conn::new(io);
        let mut out = Vec::new();
        // Wire lengths of every head read, interim ones included.
        let mut heads = Vec::new();
        let err = 'answers: loop {
            let mut interim = 0;
            let head = loop {
                match conn.read_head(true).await {
                    Ok(None) if interim == 0 => break 'answers None,
                    Ok(None) => break 'answers Some("closed after an interim answer".into()),
                    Err(e) => break 'answers Some(e.to_string()),
                    Ok(Some(h)) => {
                        assert!(h.wire_len() <= MAX_HEAD, "a head of {} bytes", h.wire_len());
                        assert!(h.minor <= 1);
                        assert!((100..=999).contains(&h.status), "status {}", h.status);
                        heads.push(h.wire_len());
                        // Whatever the framing fields say, an answer to HEAD has no body.
                        assert_eq!(h.response_framing(true).ok(), Some(Framing::Length(0)));
                        if h.status == 101 {
                            break 'answers Some("101".into());
                        }
                        if h.status < 200 {
                            interim += 1;
                            if interim > MAX_INTERIM {
                                break 'answers Some("too many interim answers".into());
                            }
                            continue;
                        }
                        break h;
                    }
                }
            };
            let framing = match head.response_framing(false) {
                Ok(f) => f,
                Err(e) => break Some(e.to_string()),
            };
            reference::assert_response_framing_sound(&head, framing);
            let body = match read_body(&mut conn, framing).await {
                Ok(b) => b,
                Err(e) => break Some(e.to_string()),
            };
            if let Framing::Length(n) = framing {
                assert_eq!(body.len() as u64, n);
            }
            out.push(GwResponse {
                status: head.status,
                wire_len: head.wire_len(),
                framing,
                body,
            });
            if framing == Framing::Close {
                break None;
            }
        };
        (out, heads, err)
    })
    .await
}

/// Target `response_framing`: backend answers over any bytes. Heads within [`MAX_HEAD`],
/// framing as the reference allows, length bodies of their length, chunked bodies as the
/// reference decodes them, a close-delimited body is all the rest, every head where the
/// previous answer ended, the same answers however the bytes arrive.
pub fn check_response_framing(data: &[u8]) {
    let mut runs = Vec::new();
    for delivery in Delivery::both(data) {
        let (answers, heads, err) = block_on(gateway_responses(data, delivery));
        // Walk the input: every head (interim ones too) is where httparse finds one.
        let mut at = 0usize;
        let mut head_iter = heads.iter();
        for (i, a) in answers.iter().enumerate() {
            loop {
                let len = *head_iter.next().expect("a head per answer");
                let mut headers = [httparse::EMPTY_HEADER; 128];
                let mut resp = httparse::Response::new(&mut headers);
                match resp.parse(&data[at..]) {
                    Ok(httparse::Status::Complete(n)) => {
                        assert_eq!(n, len, "answer {i}: head length")
                    }
                    other => panic!("answer {i} at {at}: no head there for httparse: {other:?}"),
                }
                let code = resp.code.expect("complete");
                at += len;
                if code >= 200 {
                    assert_eq!(code, a.status);
                    break;
                }
            }
            match a.framing {
                Framing::Length(n) => {
                    assert_eq!(
                        &data[at..at + n as usize],
                        &a.body[..],
                        "answer {i}: length body"
                    );
                    at += n as usize;
                }
                Framing::Chunked => match reference::chunked(&data[at..]) {
                    reference::Chunked::Complete { body, used, .. } => {
                        assert_eq!(body, a.body, "answer {i}: chunked body");
                        at += used;
                    }
                    other => panic!("answer {i}: chunked body the reference refuses: {other:?}"),
                },
                Framing::Close => {
                    assert_eq!(
                        &data[at..],
                        &a.body[..],
                        "answer {i}: a close-delimited body is the rest"
                    );
                    at = data.len();
                }
            }
        }
        assert!(at <= data.len());
        runs.push((answers, err));
    }
    let (a, b) = (&runs[0], &runs[1]);
    assert_eq!(
        a.0.len(),
        b.0.len(),
        "answers differ by delivery: {:?} / {:?}",
        a.1,
        b.1
    );
    for (x, y) in a.0.iter().zip(&b.0) {
        assert_eq!(
            (x.status, x.framing, &x.body),
            (y.status, y.framing, &y.body)
        );
        assert_eq!(x.wire_len, y.wire_len);
    }
    assert_eq!(a.1.is_some(), b.1.is_some(), "{:?} vs {:?}", a.1, b.1);
}

/// Target `body_fields`: the request body's routing fields (`gateway::peek`), the usage
/// reader (`filters::tokens::usage_in_json`) and `RequestBody` over any bytes.
pub fn check_body_fields(data: &[u8]) {
    use gateway::peek;
    // The fast reader accepts only what serde accepts, with the same fields.
    if let Some(fast) = peek::top_level(data) {
        let slow = peek::by_serde(data);
        assert_eq!(
            slow.as_ref(),
            Some(&fast),
            "the fast reader and serde disagree"
        );
    }
    let peeked = peek::read(data);

    // RequestBody: never panics, whatever is called on an accepted body.
    let raw = Bytes::copy_from_slice(data);
    for (op, rest, ct) in [
        (
            filters::Operation::ChatCompletions,
            "/chat/completions",
            "application/json",
        ),
        (filters::Operation::Completions, "/completions", ""),
        (
            filters::Operation::Embeddings,
            "/embeddings",
            "application/vnd.x+json",
        ),
        (filters::Operation::Responses, "/responses", "text/plain"),
        (
            filters::Operation::Audio,
            "/audio/transcriptions",
            "multipart/form-data",
        ),
    ] {
        let Ok(mut body) = gateway::body::RequestBody::inspect(raw.clone(), op, rest, ct) else {
            continue;
        };
        let is_json = op != filters::Operation::Audio && ct != "text/plain";
        if is_json {
            let p = peeked
                .as_ref()
                .expect("inspect accepted a body peek refuses");
            let model = p.model.as_deref().filter(|m| !m.is_empty());
            assert_eq!(body.model(), model, "model");
            assert_eq!(body.stream, p.stream.unwrap_or(false), "stream");
        } else {
            assert_eq!(body.model(), None);
        }
        let model = body.model().map(str::to_string);
        // Whether the api-version takes `stream_options` comes from the data too.
        let accepts = data.len() % 2 == 0;
        let added =
            body.ensure_stream_usage(op, || accepts) == filters::tokens::StreamUsage::Injected;
        let up = body.for_upstream(model.as_deref().unwrap_or("m"), "backend-name");
        if added || (model.is_some() && is_json) {
            // What goes upstream is JSON again, with the backend's name.
            let v: serde_json::Value =
                serde_json::from_slice(&up).expect("the upstream body is JSON");
            if model.is_some() {
                assert_eq!(v["model"], "backend-name");
            }
            if added {
                assert_eq!(v["stream_options"]["include_usage"], true);
            }
        } else {
            assert_eq!(&up[..], data, "an untouched body must pass unchanged");
        }
    }

    check_usage_reader(data);
}

/// The usage reader (its fast path and its serde fallback) against serde alone: for a body
/// `{"usage": <data>}` whose data has no other `"usage"`, `usage_in_json` must answer what
/// serde's reading of a usage object at `data` answers. Also `JsonTail` fed in pieces.
pub fn check_usage_reader(data: &[u8]) {
    use filters::tokens::{usage_in_json, JsonTail};
    let mut doc = b"{\"id\":\"x\",\"usage\":".to_vec();
    doc.extend_from_slice(data);
    let got = usage_in_json(&doc);
    if !contains(data, b"\"usage\"") {
        assert_eq!(
            got,
            reference::usage_by_serde(data),
            "usage reader vs serde"
        );
    }
    // The tail keeps exactly the last `cap` bytes, however they are pushed.
    let cap = 1 + (fnv(data) % 64) as usize;
    let mut tail = JsonTail::new(cap);
    for piece in doc.chunks(1 + (fnv(&doc) % 7) as usize) {
        tail.push(piece);
    }
    let from = doc.len().saturating_sub(cap);
    assert_eq!(tail.usage(), usage_in_json(&doc[from..]), "JsonTail");
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Target `sse_usage`: the first byte chooses `strip` (bit 0) and where the rest is split
/// (the other bits seed the cut points); the rest is an SSE stream. Pushed whole or in
/// pieces, the tracker passes the same bytes and reads the same usage; without `strip` it
/// passes every byte unchanged.
pub fn check_sse_usage(data: &[u8]) {
    use filters::tokens::SseTracker;
    let Some((&ctl, stream)) = data.split_first() else {
        return;
    };
    let strip = ctl & 1 == 1;
    let mode = if strip {
        filters::tokens::StreamUsage::Injected
    } else if ctl & 0x10 == 0 {
        filters::tokens::StreamUsage::AsSent
    } else {
        filters::tokens::StreamUsage::Estimate
    };
    let run = |cuts: &[usize]| {
        let mut t = SseTracker::new(mode);
        let mut out = Vec::new();
        let mut from = 0;
        for &c in cuts.iter().chain(std::iter::once(&stream.len())) {
            out.extend_from_slice(&t.push(&stream[from..c]));
            from = c;
        }
        out.extend_from_slice(&t.finish());
        (out, t.usage(), t.completion_text().map(str::to_string))
    };
    let whole = run(&[]);
    // Up to 4 cut points from a generator seeded by the control byte and the length.
    let mut x = u64::from(ctl >> 1) << 32 | stream.len() as u64 | 1;
    let mut cuts = Vec::new();
    for _ in 0..=(ctl >> 5) % 5 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        cuts.push((x % (stream.len() as u64 + 1)) as usize);
    }
    cuts.sort_unstable();
    let split = run(&cuts);
    assert_eq!(
        String::from_utf8_lossy(&whole.0),
        String::from_utf8_lossy(&split.0),
        "output differs when split at {cuts:?}"
    );
    assert_eq!(whole.0, split.0);
    assert_eq!(whole.1, split.1, "usage differs when split at {cuts:?}");
    assert_eq!(
        whole.2, split.2,
        "completion text differs when split at {cuts:?}"
    );
    // Byte by byte too.
    if stream.len() <= 512 {
        let every: Vec<usize> = (1..stream.len()).collect();
        let bytewise = run(&every);
        assert_eq!(
            whole.0, bytewise.0,
            "output differs when pushed byte by byte"
        );
        assert_eq!(
            whole.1, bytewise.1,
            "usage differs when pushed byte by byte"
        );
    }
    if !strip {
        assert_eq!(whole.0, stream, "without strip every byte passes unchanged");
    } else {
        assert!(whole.0.len() <= stream.len());
    }
}

/// Target `config_load`: any UTF-8 text; the loader never panics, refuses with at least one
/// error, and answers the same twice.
pub fn check_config_load(data: &[u8]) {
    init_env();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let first = gateway::config::load_str(text);
    if let Err(errors) = &first {
        assert!(!errors.is_empty(), "refused without an error");
        let again = gateway::config::load_str(text).expect_err("refused once, accepted again");
        let show = |e: &[gateway::config::ConfigError]| {
            e.iter().map(|e| e.to_string()).collect::<Vec<_>>()
        };
        assert_eq!(show(errors), show(&again));
    }
}

/// Sets the environment the shipped configurations refer to (`${VAR}`), once, so that their
/// seeds load; fuzzed text may refer to them too.
pub fn init_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for (k, v) in [
            ("AOAI_SWEDEN_KEY", "k"),
            ("AFD_ID", "x"),
            ("TENANT_ID", "t"),
        ] {
            std::env::set_var(k, v);
        }
    });
}

/// A target's check.
pub type Check = fn(&[u8]);

/// Every check by target name (the regression test and `scripts/fuzz.sh` use these names).
/// Target `multipart_model`: the first byte picks the boundary (`b`, `xYzZY` or
/// `----0123456789`), the rest is a multipart body. What `gateway::multipart::find_model`
/// accepts, `multer` reads whole, with the same `model` value and no other field named
/// `model` in any letter case; the body with the value replaced (as the gateway sends it)
/// reads the same with the new value.
pub fn check_multipart_model(data: &[u8]) {
    let Some((&ctl, body)) = data.split_first() else {
        return;
    };
    let boundary = ["b", "xYzZY", "----0123456789"][usize::from(ctl % 3)];
    // A streamed upload reads the same form in pieces (here of 1 to 8 bytes, from the
    // control byte): the same verdict, and the pieces are the body byte for byte.
    let split = usize::from(ctl / 3 % 8) + 1;
    let mut scanner = gateway::multipart::Scanner::new(boundary);
    let mut pieces = Vec::new();
    let mut scanned = body.chunks(split).try_for_each(|c| {
        scanner.push(c);
        while let Some(p) = scanner.next(false)? {
            pieces.extend_from_slice(p.raw());
        }
        Ok::<(), &str>(())
    });
    if scanned.is_ok() {
        scanned = (|| {
            while let Some(p) = scanner.next(true)? {
                pieces.extend_from_slice(p.raw());
            }
            Ok(())
        })();
    }
    let found = gateway::multipart::find_model(body, boundary);
    if scanned.is_ok() {
        assert_eq!(pieces, body, "the pieces are not the body");
    }
    // (The whole-body reader also applies the `model` rules, which the scanner leaves to
    // its caller: accepted whole means scanned in pieces.)
    if found.is_ok() {
        assert!(
            scanned.is_ok(),
            "accepted whole, refused in pieces of {split}"
        );
    }
    let Ok(found) = found else {
        return;
    };
    let read = |b: &[u8]| multer_read(b, boundary);
    let (models, model) = read(body).unwrap_or_else(|e| {
        panic!(
            "multer refuses a body the gateway accepted ({e}): {:?}",
            String::from_utf8_lossy(body)
        )
    });
    let ours = found.clone().map(|r| body[r].to_vec());
    assert_eq!(ours, model, "the model differs");
    assert!(models <= 1, "{models} fields named model");
    if let Some(r) = found {
        let mut rewritten = body[..r.start].to_vec();
        rewritten.extend_from_slice(b"deployment-eastus");
        rewritten.extend_from_slice(&body[r.end..]);
        let (_, model) = read(&rewritten).expect("multer reads the rewritten body");
        assert_eq!(model.as_deref(), Some(&b"deployment-eastus"[..]));
    }
}

/// `multer` over a whole body: how many fields are named `model` (any letter case), and the
/// value of the one named exactly `model`.
fn multer_read(body: &[u8], boundary: &str) -> Result<(usize, Option<Vec<u8>>), String> {
    let body = bytes::Bytes::copy_from_slice(body);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(body) });
        let mut m = multer::Multipart::new(stream, boundary);
        let (mut models, mut model) = (0, None);
        while let Some(f) = m.next_field().await.map_err(|e| e.to_string())? {
            let name = f.name().map(str::to_string);
            let data = f.bytes().await.map_err(|e| e.to_string())?;
            if name
                .as_deref()
                .is_some_and(|n| n.eq_ignore_ascii_case("model"))
            {
                models += 1;
            }
            if name.as_deref() == Some("model") {
                model = Some(data.to_vec());
            }
        }
        Ok((models, model))
    })
}

pub const TARGETS: &[(&str, Check)] = &[
    ("request_head", check_request_head),
    ("chunked_body", check_chunked_body),
    ("response_framing", check_response_framing),
    ("body_fields", check_body_fields),
    ("sse_usage", check_sse_usage),
    ("config_load", check_config_load),
    ("framing_differential", check_framing_differential),
    ("multipart_model", check_multipart_model),
];
