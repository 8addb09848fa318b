//! HTTP/2 clients (ALPN `h2` on TLS listeners): Pingora's HTTP/2 server (the connection, its
//! handshake and settings, one task per stream, GOAWAY on shutdown) hands each stream to
//! [`H2App`], which answers it with the same pipeline as HTTP/1.x through [`Session2`].
//!
//! The streams are served by the gateway's own `HttpServerApp` rather than Pingora's proxy
//! (`HttpProxy` with every request answered in `request_filter`, as before): the proxy's
//! per-request state (its session with a cache context and module contexts, and a future
//! sized for its whole upstream state machine, about 5 KiB moved twice per request) was work
//! that no request of the gateway used.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use filters::cert::PeerCert;
use http::header::{self, HeaderName, HeaderValue};
use http::StatusCode;
use pingora::apps::{HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;

use super::downstream::{Downstream, ReadError};
use crate::http1::{Collected, Head, Name};
use crate::pipeline::respond::{split_fields, ResponseHead};
use crate::pipeline::Gateway;

/// How long a refused request's unread body is still taken in after the answer.
const DRAIN_AFTER_ANSWER: std::time::Duration = std::time::Duration::from_secs(1);

/// The gateway as Pingora's HTTP application for HTTP/2 streams.
pub struct H2App(pub Arc<Gateway>);

#[async_trait]
impl HttpServerApp for H2App {
    /// One stream ([`serve_stream`]), its future boxed where it is made ([`boxed_in_place`]):
    /// `async fn` here would have `async_trait` make it on the stack and copy all of it — the
    /// pipeline's state, ~8 KiB — into its box, on every request.
    fn process_new_http<'life0, 'life1, 'async_trait>(
        self: &'life0 Arc<Self>,
        session: ServerSession,
        _shutdown: &'life1 ShutdownWatch,
    ) -> Pin<Box<dyn Future<Output = Option<ReusedHttpStream>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        boxed_in_place(move || serve_stream(&self.0, session))
    }
}

/// One stream: answered by the pipeline, then ended — or, when the response broke off (the
/// client went away, or the backend mid-stream; the pipeline has counted and logged it, below
/// warn: SPEC §8), dropped unended, which resets the stream and no other. Accounted (metrics,
/// audit) either way. A stream is never reused.
async fn serve_stream(gateway: &Gateway, mut session: ServerSession) -> Option<ReusedHttpStream> {
    let mut ctx = gateway.new_ctx();
    let head = Session2::head_of(&session);
    let whole = gateway
        .serve(&mut Session2::new(&mut session, &head), &head, &mut ctx)
        .await;
    gateway.finish(&mut ctx).await;
    if whole {
        // Ends the stream if the answer did not (it always does: a no-op).
        let _ = session.finish().await;
    }
    None
}

/// A future made in the box that holds it: the box is allocated first, so the future's
/// first state (its arguments) is written there rather than made on the stack and copied,
/// whole, into the box.
fn boxed_in_place<'a, F>(
    make: impl FnOnce() -> F,
) -> Pin<Box<dyn Future<Output = F::Output> + Send + 'a>>
where
    F: Future + Send + 'a,
{
    let made: Box<F> = Box::write(Box::new_uninit(), make());
    Box::into_pin(made)
}

/// One request on Pingora's HTTP/2 session.
pub struct Session2<'a> {
    session: &'a mut ServerSession,
    head: &'a Head,
}

impl<'a> Session2<'a> {
    /// The request on `session`, answered through it; `head` is its head ([`Self::head_of`]).
    pub fn new(session: &'a mut ServerSession, head: &'a Head) -> Self {
        Session2 { session, head }
    }

    /// The head of the request on `session`.
    pub fn head_of(session: &ServerSession) -> Head {
        let req = session.req_header();
        let target = req
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let headers: Vec<(&str, &[u8])> = req
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        Head::request(req.method.as_str(), &target, headers)
    }

    fn response(resp: &ResponseHead, len: Option<usize>) -> io::Result<Box<ResponseHeader>> {
        h2_response(resp, len)
            .map(Box::new)
            .map_err(io::Error::other)
    }
}

/// A response head for Pingora's HTTP/2 session, built as `http` parts: no case map (HTTP/2
/// names are lowercase on the wire), each name parsed once ([`field_name`]), the values sharing
/// one copy of the head's field lines, and the values that are new in every response marked
/// never to be indexed ([`never_indexed`]). A field `http` refuses (a name that is not a token,
/// a control byte in a value) fails the response, as before.
fn h2_response(resp: &ResponseHead, len: Option<usize>) -> Result<ResponseHeader, http::Error> {
    let lines = Bytes::copy_from_slice(resp.field_lines());
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = StatusCode::from_u16(resp.status)?;
    // Pingora adds `date` to what is here.
    parts.headers.reserve(split_fields(&lines).count() + 2);
    for (n, v) in split_fields(&lines) {
        let name = field_name(n)?;
        let mut value = HeaderValue::from_maybe_shared(lines.slice_ref(v))?;
        value.set_sensitive(never_indexed(&name));
        parts.headers.append(name, value);
    }
    if let Some(n) = len {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    Ok(ResponseHeader::from(parts))
}

/// The custom names in (nearly) every answer, made once rather than per response; standard
/// names are found by `http` without an allocation anyway.
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static APIM_REQUEST_ID: HeaderName = HeaderName::from_static("apim-request-id");
static RATELIMIT_REMAINING_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-requests");
static RATELIMIT_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-tokens");
static RATELIMIT_LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
static RATELIMIT_LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");

fn field_name(n: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
    Ok(match n {
        b"x-request-id" => X_REQUEST_ID.clone(),
        b"apim-request-id" => APIM_REQUEST_ID.clone(),
        b"x-ratelimit-remaining-requests" => RATELIMIT_REMAINING_REQUESTS.clone(),
        b"x-ratelimit-remaining-tokens" => RATELIMIT_REMAINING_TOKENS.clone(),
        b"x-ratelimit-limit-requests" => RATELIMIT_LIMIT_REQUESTS.clone(),
        b"x-ratelimit-limit-tokens" => RATELIMIT_LIMIT_TOKENS.clone(),
        _ => HeaderName::from_bytes(n)?,
    })
}

/// Values that are new in every response (request ids): HPACK would add each to the
/// connection's dynamic table, evicting what repeats (content type, rate-limit values) and
/// lengthening the chain that every later response's lookup under the same name walks, for no
/// gain. Never indexed, they are sent as literals and leave the table alone.
fn never_indexed(name: &HeaderName) -> bool {
    name == X_REQUEST_ID || name == APIM_REQUEST_ID
}

fn io_err(e: Box<pingora::Error>) -> io::Error {
    io::Error::other(e.to_string())
}

impl Downstream for Session2<'_> {
    fn head(&self) -> &Head {
        self.head
    }

    fn client_addr(&self) -> Option<IpAddr> {
        self.session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
    }

    fn certificate(&self) -> Option<PeerCert> {
        let digest = self.session.digest()?;
        let ssl = digest.ssl_digest.as_ref()?;
        ssl.extension.get::<PeerCert>().cloned()
    }

    async fn read_body(&mut self, max: usize) -> Result<Bytes, ReadError> {
        let declared = self
            .head
            .get_str(Name::ContentLength)
            .and_then(|v| v.trim().parse::<usize>().ok());
        if declared.is_some_and(|n| n > max) {
            return Err(ReadError::TooLarge);
        }
        let mut body = Collected::default();
        while let Some(piece) = self
            .session
            .read_request_body()
            .await
            .map_err(|e| ReadError::Io(e.to_string()))?
        {
            if body.len() + piece.len() > max {
                return Err(ReadError::TooLarge);
            }
            body.push(piece, declared.unwrap_or(0));
        }
        Ok(body.freeze())
    }

    fn declared_length(&self) -> Option<u64> {
        self.head
            .get_str(Name::ContentLength)
            .and_then(|v| v.trim().parse::<u64>().ok())
    }

    async fn read_chunk(&mut self) -> Result<Option<Bytes>, ReadError> {
        self.session
            .read_request_body()
            .await
            .map_err(|e| ReadError::Io(e.to_string()))
    }

    async fn send_full(&mut self, resp: &ResponseHead, body: &[u8]) -> io::Result<()> {
        let head = Self::response(resp, Some(body.len()))?;
        self.session
            .write_response_header(head)
            .await
            .map_err(io_err)?;
        self.session
            .write_response_body(Bytes::copy_from_slice(body), true)
            .await
            .map_err(io_err)?;
        // An answer given before the request body was read (a refusal): take in what the
        // client is still sending, briefly and bounded, so that its stream ends cleanly
        // rather than in a reset that the client reports as an error (nginx does the same).
        if !self.session.is_body_done() {
            let drain = self.session.drain_request_body();
            let _ = tokio::time::timeout(DRAIN_AFTER_ANSWER, drain).await;
        }
        Ok(())
    }

    async fn send_stream_head(&mut self, resp: &ResponseHead) -> io::Result<()> {
        let head = Self::response(resp, None)?;
        self.session
            .write_response_header(head)
            .await
            .map_err(io_err)
    }

    async fn send_chunk(&mut self, data: Bytes) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.session
            .write_response_body(data, false)
            .await
            .map_err(io_err)
    }

    async fn send_end(&mut self, last: Bytes) -> io::Result<()> {
        self.session
            .write_response_body(last, true)
            .await
            .map_err(io_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(status: u16, fields: &[(&str, &str)]) -> ResponseHead {
        let mut h = ResponseHead::new(status);
        for (n, v) in fields {
            h.add(n, v);
        }
        h
    }

    #[test]
    fn an_h2_response_head_keeps_fields_in_order_and_never_indexes_request_ids() {
        let h = head(
            200,
            &[
                ("Content-Type", "application/json"),
                ("apim-request-id", "b5c1"),
                ("x-ratelimit-remaining-requests", "9"),
                ("x-custom", "a: b"),
                ("x-custom", "second"),
                ("x-request-id", "0123-4567"),
            ],
        );
        let r = h2_response(&h, Some(376)).unwrap();
        assert_eq!(r.status, 200);
        let got: Vec<(&str, &[u8], bool)> = r
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes(), v.is_sensitive()))
            .collect();
        assert_eq!(
            got,
            [
                ("content-type", &b"application/json"[..], false),
                ("apim-request-id", b"b5c1", true),
                ("x-ratelimit-remaining-requests", b"9", false),
                ("x-custom", b"a: b", false),
                ("x-custom", b"second", false),
                ("x-request-id", b"0123-4567", true),
                ("content-length", b"376", false),
            ]
        );
        // A streamed head has no length.
        let r = h2_response(&head(429, &[("retry-after", "3")]), None).unwrap();
        assert_eq!(r.status, 429);
        assert_eq!(r.headers.len(), 1);
        assert!(r.headers.get("content-length").is_none());
    }

    #[test]
    fn what_http_refuses_fails_the_response() {
        for (status, fields) in [
            (200, &[("bad name", "v")][..]),
            (200, &[("x-ok", "bell\u{7}")][..]),
            (200, &[("", "v")][..]),
            (1000, &[][..]),
        ] {
            assert!(
                h2_response(&head(status, fields), None).is_err(),
                "{fields:?}"
            );
        }
    }

    #[test]
    fn names_made_once_are_the_names_http_parses() {
        for n in [
            "x-request-id",
            "apim-request-id",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-limit-requests",
            "x-ratelimit-limit-tokens",
            "content-type",
            "X-Request-Id",
            "x-other",
        ] {
            let oracle = HeaderName::from_bytes(n.as_bytes()).unwrap();
            assert_eq!(field_name(n.as_bytes()).unwrap(), oracle, "{n}");
            assert_eq!(
                never_indexed(&oracle),
                n.eq_ignore_ascii_case("x-request-id") || n == "apim-request-id",
                "{n}"
            );
        }
    }
}
