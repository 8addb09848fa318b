//! HTTP/1.x clients: the connection loop (one request after the other, pipelined ones
//! included, under the head, idle and shutdown clocks) and [`H1`], one request on it as the
//! pipeline sees it.

use std::io;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use filters::cert::PeerCert;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use pingora::time::fast_timeout::fast_timeout;
use tokio::io::AsyncWriteExt;

use super::downstream::{Downstream, ReadError};
use crate::deadline::{timeout_at, ConnClock, Woken};
use crate::errors::{ErrorCode, GatewayError};
use crate::http1::{
    encode_chunk, encode_head, BodyReader, Collected, Conn, Framing, H1Error, Head, Name,
    OutFraming,
};
use crate::observe::request_id::RequestId;
use crate::pipeline::respond::{json_head, ResponseHead};
use crate::pipeline::Gateway;

/// After the shutdown signal, how long an idle client connection is still read from (the
/// supervisor waits longer than this before it checks that nothing is in flight).
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(300);

/// The response buffer a connection starts with: room for a response head and a small answer
/// or SSE event. An open stream holds this, not more (issue 18: memory per open stream).
const OUT_FIRST: usize = 1024;
/// A response buffer grown past this (an answer sent whole, a large chunk) is given back
/// after the message has gone, rather than kept for the connection's life.
const OUT_KEEP: usize = 32 * 1024;

/// Gives back a response buffer grown past [`OUT_KEEP`] (the pure decision: `true` when
/// `out` was replaced by a new one of [`OUT_FIRST`]).
fn trim_out(out: &mut Vec<u8>) -> bool {
    if out.capacity() > OUT_KEEP {
        *out = Vec::with_capacity(OUT_FIRST);
        true
    } else {
        false
    }
}

/// Serves the requests of one HTTP/1.x connection, one after the other (pipelined ones
/// included), until the client closes, asks to close, stays idle for
/// `server.idle_timeout_seconds` (up to 100 ms more), takes longer than
/// `server.header_timeout_seconds` to send a head (408), sends something that is not
/// HTTP/1.x (400), or the server shuts down.
pub async fn serve_connection(gw: &Gateway, stream: Stream, shutdown: &ShutdownWatch) {
    let client = stream
        .get_socket_digest()
        .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
    let cert: Option<PeerCert> = stream
        .get_ssl_digest()
        .and_then(|d| d.extension.get::<PeerCert>().cloned());
    let (header_timeout, idle) = {
        let snap = gw.state.load();
        (snap.cfg.server.header_timeout, snap.cfg.server.idle_timeout)
    };
    let mut conn = Conn::new(stream);
    conn.set_head_timeout(header_timeout);
    let mut clocks = Clocks::new(shutdown, idle);
    let mut out = Vec::with_capacity(OUT_FIRST);
    loop {
        let head = match clocks.next_head(&mut conn).await {
            Some(Ok(Some(h))) => h,
            Some(Err(
                e @ (H1Error::Malformed(_) | H1Error::HeadTooLarge | H1Error::HeadTimeout),
            )) => {
                refuse_head(gw, &mut conn, &mut out, client, e).await;
                break;
            }
            // Closed, idle too long, shut down, or a broken connection.
            _ => break,
        };
        let closing = clocks.shutting_down();
        let mut d = H1::new(&mut conn, &head, client, &cert, &mut out, closing);
        let mut ctx = gw.new_ctx();
        let reusable = gw.serve(&mut d, &head, &mut ctx).await && d.reusable();
        gw.finish(&mut ctx).await;
        if !reusable {
            break;
        }
    }
    let _ = timeout_at(Instant::now() + Duration::from_secs(1), conn.io.shutdown()).await;
}

/// The clocks a connection waits under between requests: the shutdown signal and the idle
/// timeout, kept by this thread's deadline ticker ([`ConnClock`]: registered once per
/// connection; a request costs no timer and no channel waiter). A wait for the next head
/// that lasts the idle timeout (`idle` to `idle` + 2 ticks of 50 ms) closes the connection.
struct Clocks<'a> {
    shutdown: &'a ShutdownWatch,
    clock: ConnClock,
}

impl<'a> Clocks<'a> {
    fn new(shutdown: &'a ShutdownWatch, idle: Duration) -> Clocks<'a> {
        Clocks {
            shutdown,
            clock: ConnClock::new(idle, shutdown),
        }
    }

    fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// The next request head; `None` when the connection is to be closed without one.
    async fn next_head(
        &mut self,
        conn: &mut Conn<Stream>,
    ) -> Option<Result<Option<Head>, H1Error>> {
        loop {
            if self.shutting_down() {
                // Shutting down: a request the client sent as the signal came is still
                // answered (with `connection: close`); a connection quiet for the grace
                // period is closed. Closing at once would cut such a request off.
                return fast_timeout(SHUTDOWN_GRACE, conn.read_head(false))
                    .await
                    .ok();
            }
            // `read_head` keeps what it read in the connection's buffer: dropping it when
            // the shutdown signal ends the wait loses nothing.
            match self.clock.wait(conn.read_head(false)).await {
                Ok(r) => return Some(r),
                Err(Woken::Idle) => return None,
                Err(Woken::Shutdown) => {}
            }
        }
    }
}

/// Answers a head that cannot be served (400, or 408 when it came too slowly), counts it,
/// and leaves the connection to be closed.
async fn refuse_head(
    gw: &Gateway,
    conn: &mut Conn<Stream>,
    out: &mut Vec<u8>,
    client: Option<IpAddr>,
    e: H1Error,
) {
    log::debug!("client {client:?}: {e}");
    let (kind, e) = match e {
        H1Error::HeadTimeout => ("timeout", GatewayError::new(ErrorCode::RequestTimeout)),
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
    gw.metrics
        .downstream_errors
        .with_label_values(&[kind])
        .inc();
    let resp = json_head(e.status(), RequestId::new());
    let body = e.body();
    out.clear();
    encode_head(
        resp.status,
        resp.field_lines(),
        out,
        OutFraming::Length(body.len()),
        true,
    );
    out.extend_from_slice(&body);
    let _ = conn.send(out).await;
}

/// One request on an HTTP/1.x connection.
pub struct H1<'a> {
    conn: &'a mut Conn<Stream>,
    head: &'a Head,
    client: Option<IpAddr>,
    cert: &'a Option<PeerCert>,
    out: &'a mut Vec<u8>,
    /// The body's framing, or why it cannot be trusted (read once from the head).
    framing: Result<Framing, &'static str>,
    /// The client asked to close, the server is shutting down, or the stream is
    /// close-delimited.
    close: bool,
    /// A body that is not read must not be taken for the next request: close then.
    body_read: bool,
    streaming: OutFraming,
    /// The body read piece by piece ([`Downstream::read_chunk`]).
    reader: Option<BodyReader>,
}

impl<'a> H1<'a> {
    pub fn new(
        conn: &'a mut Conn<Stream>,
        head: &'a Head,
        client: Option<IpAddr>,
        cert: &'a Option<PeerCert>,
        out: &'a mut Vec<u8>,
        closing: bool,
    ) -> Self {
        let close = closing || !head.keep_alive();
        let framing = head.request_framing().map_err(|e| match e {
            H1Error::Malformed(why) => why,
            _ => "unreadable",
        });
        H1 {
            conn,
            head,
            client,
            cert,
            out,
            close,
            body_read: framing == Ok(Framing::Length(0)),
            framing,
            streaming: OutFraming::None,
            reader: None,
        }
    }

    /// Whether the connection can carry the next request.
    pub fn reusable(&self) -> bool {
        !self.must_close()
    }

    fn must_close(&self) -> bool {
        self.close || !self.body_read
    }

    fn head_only(&self) -> bool {
        self.head.method() == "HEAD"
    }

    /// `Expect: 100-continue` from an HTTP/1.1 client that has sent nothing yet: told to go on.
    async fn continue_if_expected(&mut self) -> Result<(), ReadError> {
        let expects_continue = self
            .head
            .get(Name::Expect)
            .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"));
        if expects_continue && self.head.minor == 1 && !self.conn.has_buffered() {
            self.conn
                .send(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .map_err(|e| ReadError::Io(e.to_string()))?;
        }
        Ok(())
    }
}

fn read_error(e: H1Error) -> ReadError {
    match e {
        H1Error::Malformed(why) => ReadError::Malformed(why),
        e => ReadError::Io(e.to_string()),
    }
}

impl Downstream for H1<'_> {
    fn head(&self) -> &Head {
        self.head
    }

    fn client_addr(&self) -> Option<IpAddr> {
        self.client
    }

    fn certificate(&self) -> Option<PeerCert> {
        self.cert.clone()
    }

    fn framing_error(&self) -> Option<&'static str> {
        self.framing.err()
    }

    async fn read_body(&mut self, max: usize) -> Result<Bytes, ReadError> {
        let framing = self.framing.map_err(ReadError::Malformed)?;
        if let Framing::Length(n) = framing {
            if n > max as u64 {
                return Err(ReadError::TooLarge);
            }
            if n == 0 {
                return Ok(Bytes::new());
            }
        }
        self.continue_if_expected().await?;
        let declared = match framing {
            Framing::Length(n) => n as usize,
            _ => 0,
        };
        let mut reader = BodyReader::new(framing);
        let mut body = Collected::default();
        while let Some(piece) = reader.next(self.conn).await.map_err(|e| match e {
            H1Error::Malformed(why) => ReadError::Malformed(why),
            e => ReadError::Io(e.to_string()),
        })? {
            if body.len() + piece.len() > max {
                return Err(ReadError::TooLarge);
            }
            body.push(piece, declared);
        }
        self.body_read = true;
        Ok(body.freeze())
    }

    fn declared_length(&self) -> Option<u64> {
        match self.framing {
            Ok(Framing::Length(n)) => Some(n),
            _ => None,
        }
    }

    async fn read_chunk(&mut self) -> Result<Option<Bytes>, ReadError> {
        let framing = self.framing.map_err(ReadError::Malformed)?;
        if self.body_read {
            return Ok(None);
        }
        let reader = match &mut self.reader {
            Some(r) => r,
            None => {
                self.continue_if_expected().await?;
                self.reader.insert(BodyReader::new(framing))
            }
        };
        let piece = reader.next(self.conn).await.map_err(read_error)?;
        if piece.is_none() {
            self.body_read = true;
        }
        Ok(piece)
    }

    fn can_upgrade(&self) -> bool {
        self.head.minor == 1
    }

    fn take_over(&mut self) -> Option<(&mut Stream, Vec<u8>)> {
        self.close = true;
        let read_ahead = self.conn.take_buffered();
        Some((&mut self.conn.io, read_ahead))
    }

    async fn send_full(&mut self, resp: &ResponseHead, body: &[u8]) -> io::Result<()> {
        let close = self.must_close();
        self.out.clear();
        let framing = if resp.status == 204 || resp.status == 304 {
            OutFraming::None
        } else {
            OutFraming::Length(body.len())
        };
        encode_head(resp.status, resp.field_lines(), self.out, framing, close);
        if !self.head_only() && framing != OutFraming::None {
            self.out.extend_from_slice(body);
        }
        let sent = self.conn.send(self.out).await;
        trim_out(self.out);
        sent
    }

    async fn send_stream_head(&mut self, resp: &ResponseHead) -> io::Result<()> {
        self.streaming = if self.head.minor == 0 {
            // An HTTP/1.0 client cannot read chunks: the body ends with the connection.
            self.close = true;
            OutFraming::Close
        } else {
            OutFraming::Chunked
        };
        let close = self.must_close();
        self.out.clear();
        encode_head(
            resp.status,
            resp.field_lines(),
            self.out,
            self.streaming,
            close,
        );
        // The client is not read while its answer streams (a large request body may have
        // grown the buffer): nothing is kept for it meanwhile.
        self.conn.release_idle_buffer();
        self.conn.send(self.out).await
    }

    async fn send_chunk(&mut self, data: Bytes) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if self.streaming == OutFraming::Close {
            return self.conn.send(&data).await;
        }
        self.out.clear();
        encode_chunk(self.out, &data);
        self.conn.send(self.out).await
    }

    async fn send_end(&mut self, last: Bytes) -> io::Result<()> {
        if self.streaming == OutFraming::Close {
            return self.conn.send(&last).await;
        }
        self.out.clear();
        encode_chunk(self.out, &last);
        self.out.extend_from_slice(b"0\r\n\r\n");
        let sent = self.conn.send(self.out).await;
        trim_out(self.out);
        sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_buffer_grown_past_the_limit_is_given_back() {
        let mut out = Vec::with_capacity(OUT_FIRST);
        out.extend_from_slice(&[b'x'; 600]);
        assert!(!trim_out(&mut out), "a small answer keeps its buffer");
        assert_eq!(out.len(), 600);
        out.extend_from_slice(&[b'x'; OUT_KEEP]);
        assert!(trim_out(&mut out), "a large answer's buffer goes");
        assert!(out.is_empty());
        assert!((OUT_FIRST..OUT_KEEP).contains(&out.capacity()));
    }
}
