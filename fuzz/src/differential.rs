//! Target `framing_differential`: the gateway's HTTP/1 request codec against hyper's HTTP/1
//! server over the same bytes. A proxy and the server behind it (or the one in front) must
//! never disagree about where a request ends: for any input, each request both accept must
//! be the same (method, target, body), and a request the gateway accepts but hyper refuses
//! must be refused by hyper for a reason that has nothing to do with framing.
//!
//! The rules by which a refusal by hyper is *not* a finding (each is counted by the regression
//! test's seeds and described in README.md):
//!
//! - R1 (request target): hyper's URI parser (`http::Uri`) is stricter than httparse: hyper
//!   answered `invalid URI` / `URI too long`, or refused the method (`invalid HTTP method`).
//! - R2 (Content-Length list): hyper's server takes one `Content-Length` value, not a list;
//!   the gateway accepts a list of equal values (RFC 9110 §8.6). Hyper said `invalid
//!   content-length` and the gateway's value is such a list.
//! - R3 (keep-alive) is retired: the gateway now lets `close` win in HTTP/1.0 as hyper does
//!   (observation O2), so a connection hyper ends and the gateway reads on is a finding.
//! - R4 (trailer fields): hyper refused a trailer field line by `http`'s header-name or
//!   header-value rules after the body ended where the gateway says (trailers are dropped by
//!   the gateway).
//!
//! Targets are compared as path and query, cut at `#` (hyper drops a fragment, the gateway
//! keeps it — not allowed in a request target by RFC 9112 §3.2, and not framing), and only
//! for origin-form and `http(s)://` absolute-form targets (`*` and authority form have no
//! path to compare), including `http://h?q` and `http://h#x/p` (findings F2 and F3, fixed).

use std::cell::RefCell;
use std::convert::Infallible;
use std::rc::Rc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::{block_on, gateway_requests, locate_requests, over_pipe, Delivery, GwEnd, GwRun};

/// One request as hyper's server handed it to its service.
#[derive(Debug, Clone)]
pub struct HyRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub http10: bool,
    /// Whether hyper keeps the connection after this request (its own rule, re-stated).
    pub keep_alive: bool,
    /// The body, or hyper's error reading it (with its causes).
    pub body: Result<Vec<u8>, String>,
}

#[derive(Debug)]
pub struct HyRun {
    pub requests: Vec<HyRequest>,
    /// How the connection ended (hyper's error with its causes).
    pub end: Result<(), String>,
}

/// An error and its causes, as one line.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// hyper's keep-alive rule (proto/h1/role.rs, `Server::parse`): HTTP/1.1 keeps the
/// connection unless a `Connection` value has a `close` token; HTTP/1.0 keeps it only if one
/// has `keep-alive` and none before it had `close`; values that are not visible ASCII count
/// for neither.
fn hyper_keep_alive(http10: bool, headers: &http::HeaderMap) -> bool {
    let has = |v: &http::HeaderValue, t: &str| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|x| x.trim().eq_ignore_ascii_case(t)))
    };
    let mut keep = !http10;
    let mut saw_close = false;
    for v in headers.get_all(http::header::CONNECTION) {
        if saw_close || has(v, "close") {
            saw_close = true;
            keep = false;
        } else if !keep {
            keep = has(v, "keep-alive");
        }
    }
    keep
}

/// hyper's HTTP/1 server over `data` (written whole, then the write side shut down), with
/// the gateway's header-count limit. Its service reads every body whole and answers 200
/// (405 to CONNECT, which would otherwise ask for a tunnel).
pub async fn hyper_requests(data: &[u8]) -> HyRun {
    let seen: Rc<RefCell<Vec<HyRequest>>> = Rc::default();
    let rec = seen.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let rec = rec.clone();
        async move {
            let method = req.method().as_str().to_string();
            let uri = req.uri().clone();
            let http10 = req.version() == http::Version::HTTP_10;
            let keep_alive = hyper_keep_alive(http10, req.headers());
            let body = match req.into_body().collect().await {
                Ok(c) => Ok(c.to_bytes().to_vec()),
                Err(e) => Err(chain(&e)),
            };
            rec.borrow_mut().push(HyRequest {
                method: method.clone(),
                path: uri.path().to_string(),
                query: uri.query().map(str::to_string),
                http10,
                keep_alive,
                body,
            });
            let status = if method == "CONNECT" { 405 } else { 200 };
            let resp = Response::builder()
                .status(status)
                .body(Empty::<Bytes>::new())
                .expect("a plain response");
            Ok::<_, Infallible>(resp)
        }
    });
    let end = over_pipe(data, Delivery::Whole, |io| async move {
        let mut builder = http1::Builder::new();
        builder
            .max_headers(128)
            // The input's end is a half-close: requests already sent are still answered.
            .half_close(true)
            .header_read_timeout(None::<std::time::Duration>)
            .auto_date_header(false);
        builder
            .serve_connection(TokioIo::new(io), service)
            .await
            .map_err(|e| chain(&e))
    })
    .await;
    let requests = seen.take();
    HyRun { requests, end }
}

/// The gateway's target as path and query, cut at `#`.
fn gateway_target(path: &str, query: Option<&str>) -> String {
    let mut t = path.to_string();
    if let Some(q) = query {
        t.push('?');
        t.push_str(q);
    }
    match t.find('#') {
        Some(i) => t[..i].to_string(),
        None => t,
    }
}

fn hyper_target(h: &HyRequest) -> String {
    let mut t = h.path.clone();
    if let Some(q) = &h.query {
        t.push('?');
        t.push_str(q);
    }
    t
}

/// Whether a raw request target has a path both sides read the same way.
fn comparable(raw: &str) -> bool {
    let lower = raw.to_ascii_lowercase();
    raw.starts_with('/') || lower.starts_with("http://") || lower.starts_with("https://")
}

/// Why hyper refused request `i` (which the gateway accepted), if the reason is not framing.
fn non_framing_refusal(gw: &GwRun, hy: &HyRun, i: usize) -> Option<&'static str> {
    if let Some(h) = hy.requests.get(i) {
        // Hyper read the head; it refused the body.
        let err = h.body.as_ref().err()?;
        if err.contains("Invalid header name") || err.contains("Invalid header value") {
            return Some("R4");
        }
        return None;
    }
    match &hy.end {
        Err(e) => {
            if e.contains("invalid URI")
                || e.contains("URI too long")
                || e.contains("invalid HTTP method")
            {
                return Some("R1");
            }
            if e.contains("invalid content-length") {
                let g = &gw.requests[i];
                let list = g
                    .fields
                    .iter()
                    .filter(|(n, _)| n.eq_ignore_ascii_case(b"content-length"))
                    .count()
                    > 1
                    || g.fields.iter().any(|(n, v)| {
                        n.eq_ignore_ascii_case(b"content-length") && v.contains(&b',')
                    });
                if list {
                    return Some("R2");
                }
            }
            None
        }
        // hyper ended the connection cleanly before request i: the gateway, reading on,
        // disagrees about keep-alive (rule R3 until O2 was fixed; now a finding).
        Ok(()) => None,
    }
}

/// Target `framing_differential`. Panics with both readings on a finding.
pub fn check_framing_differential(data: &[u8]) {
    let gw = block_on(gateway_requests(data, Delivery::Whole));
    let (_, targets) = locate_requests(data, &gw);
    let hy = block_on(hyper_requests(data));
    let show = || {
        format!(
            "\ninput: {:?}\ngateway: {:#?}\nhyper: {:#?}",
            String::from_utf8_lossy(data),
            gw,
            hy
        )
    };
    for (i, g) in gw.requests.iter().enumerate() {
        let h = match hy.requests.get(i) {
            Some(h) if h.body.is_ok() => h,
            _ => {
                if non_framing_refusal(&gw, &hy, i).is_none() {
                    panic!(
                        "request {i}: the gateway accepted it, hyper refused it{}",
                        show()
                    );
                }
                return;
            }
        };
        assert_eq!(g.method, h.method, "request {i}: method{}", show());
        let raw = &targets[i];
        if comparable(raw) {
            let want = gateway_target(&g.path, g.query.as_deref());
            let got = hyper_target(h);
            assert_eq!(want, got, "request {i}: target {raw:?}{}", show());
        }
        let body = h.body.as_ref().expect("checked above");
        assert!(g.body == *body, "request {i}: the bodies differ{}", show());
    }
    // The gateway stopped first. If it refused, fine (it may be stricter); if it stopped
    // because the connection ended or was not to be reused, hyper must not have read more.
    let hyper_more = hy.requests.len() > gw.requests.len();
    match &gw.end {
        GwEnd::Eof => assert!(
            !hyper_more,
            "hyper read a request after the gateway's clean EOF{}",
            show()
        ),
        GwEnd::Close => {
            // R3 the other way round: the gateway closed after a request that hyper keeps
            // the connection for (a `Connection: …, close` value that is not visible ASCII is
            // no `close` to hyper). Hyper must have read that request as the gateway did
            // (checked above) and decided to keep the connection.
            let i = gw.requests.len() - 1;
            assert!(
                !hyper_more || hy.requests[i].keep_alive,
                "hyper read on after a request it was to close on{}",
                show()
            );
        }
        _ => {}
    }
}

/// How a seed or regression input fares (for the regression test's summary): which rule, if
/// any, excused a refusal by hyper.
pub fn excuse(data: &[u8]) -> Option<&'static str> {
    let gw = block_on(gateway_requests(data, Delivery::Whole));
    let hy = block_on(hyper_requests(data));
    let accepted = hy.requests.iter().take_while(|h| h.body.is_ok()).count();
    if gw.requests.len() > accepted {
        non_framing_refusal(&gw, &hy, accepted)
    } else {
        None
    }
}

/// One line on how both sides read an input (the regression test prints it for the seeds).
pub fn summary(data: &[u8]) -> String {
    let gw = block_on(gateway_requests(data, Delivery::Whole));
    let hy = block_on(hyper_requests(data));
    let accepted = hy.requests.iter().take_while(|h| h.body.is_ok()).count();
    format!(
        "gateway {} request(s), end {:?}; hyper {} request(s) ({} with a body read), end {:?}; excused by {:?}",
        gw.requests.len(),
        gw.end,
        hy.requests.len(),
        accepted,
        hy.end,
        excuse(data)
    )
}
