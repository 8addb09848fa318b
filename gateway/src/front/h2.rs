//! HTTP/2 clients (ALPN `h2` on TLS listeners) on Pingora's session: every request is
//! answered in `request_filter` by the same pipeline as HTTP/1.x, through [`Session2`].

use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use filters::cert::PeerCert;
use pingora::http::ResponseHeader;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;

use super::downstream::{Downstream, ReadError};
use crate::http1::{Collected, Head, Name};
use crate::pipeline::respond::ResponseHead;
use crate::pipeline::{Ctx, Gateway};

/// How long a refused request's unread body is still taken in after the answer.
const DRAIN_AFTER_ANSWER: std::time::Duration = std::time::Duration::from_secs(1);

/// The gateway on Pingora's session, for HTTP/2 clients: everything happens in
/// `request_filter`, which answers every request itself.
pub struct H2Gateway(pub Arc<Gateway>);

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
            Err(broke_off())
        }
    }

    /// The pipeline has already counted and logged (below warn, SPEC §8) a response that broke
    /// off; Pingora must not log it again as an error.
    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, e: &pingora::Error) -> bool {
        is_broke_off(e)
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

const BROKE_OFF: &str = "response broke off";

/// A response that broke off (its client went away, or its backend mid-stream): a downstream
/// `ConnectionClosed`, for which Pingora's `fail_to_proxy` sends no error answer on the dead
/// stream (the stream is reset).
fn broke_off() -> Box<pingora::Error> {
    pingora::Error::create(
        pingora::ErrorType::ConnectionClosed,
        pingora::ErrorSource::Downstream,
        Some(BROKE_OFF.into()),
        None,
    )
}

fn is_broke_off(e: &pingora::Error) -> bool {
    e.etype() == &pingora::ErrorType::ConnectionClosed
        && e.esource() == &pingora::ErrorSource::Downstream
        && e.context.as_ref().is_some_and(|c| c.as_str() == BROKE_OFF)
}

/// One request on Pingora's session (HTTP/2).
pub struct Session2<'a> {
    session: &'a mut pingora::proxy::Session,
    head: Head,
}

impl<'a> Session2<'a> {
    pub fn new(session: &'a mut pingora::proxy::Session) -> Self {
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
        let head = Head::request(req.method.as_str(), &target, headers);
        Session2 { session, head }
    }

    fn response(resp: &ResponseHead, len: Option<usize>) -> io::Result<Box<ResponseHeader>> {
        let mut out =
            ResponseHeader::build(resp.status, Some(resp.fields().count() + 1)).map_err(io_err)?;
        for (n, v) in resp.fields() {
            out.append_header(String::from_utf8_lossy(n).into_owned(), v)
                .map_err(io_err)?;
        }
        if let Some(n) = len {
            out.insert_header("content-length", n.to_string())
                .map_err(io_err)?;
        }
        Ok(Box::new(out))
    }
}

fn io_err(e: Box<pingora::Error>) -> io::Error {
    io::Error::other(e.to_string())
}

impl Downstream for Session2<'_> {
    fn head(&self) -> &Head {
        &self.head
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
            .write_response_header(head, false)
            .await
            .map_err(io_err)?;
        self.session
            .write_response_body(Some(Bytes::copy_from_slice(body)), true)
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
            .write_response_header(head, false)
            .await
            .map_err(io_err)
    }

    async fn send_chunk(&mut self, data: Bytes) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.session
            .write_response_body(Some(data), false)
            .await
            .map_err(io_err)
    }

    async fn send_end(&mut self, last: Bytes) -> io::Result<()> {
        self.session
            .write_response_body(Some(last), true)
            .await
            .map_err(io_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_off_response_is_recognized_and_nothing_else() {
        assert!(is_broke_off(&broke_off()));
        assert!(!is_broke_off(&pingora::Error::new_str(BROKE_OFF)));
        assert!(!is_broke_off(&pingora::Error::create(
            pingora::ErrorType::ConnectionClosed,
            pingora::ErrorSource::Downstream,
            Some("other".into()),
            None,
        )));
    }
}
