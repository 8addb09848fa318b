//! The client side of a request, as the request handler sees it: the head, the body read
//! whole and bounded, and a response sent whole or streamed. Two kinds: HTTP/1.x on the
//! gateway's own codec (`h1`), and HTTP/2 (negotiated by ALPN on TLS listeners) on Pingora's
//! session.

use std::future::Future;
use std::io;
use std::net::IpAddr;

use bytes::Bytes;
use filters::cert::PeerCert;
use pingora::http::ResponseHeader;
use pingora::protocols::Stream;

use crate::http1::{
    encode_chunk, BodyReader, Collected, Conn, Framing, H1Error, Head, Name, OutFraming, RespHead,
};

pub enum ReadError {
    TooLarge,
    /// The body's framing cannot be trusted (answer 400, close).
    Malformed(&'static str),
    /// The client went away or the connection failed.
    Io(String),
}

pub trait Downstream: Send {
    fn head(&self) -> &Head;
    fn client_addr(&self) -> Option<IpAddr>;
    fn certificate(&self) -> Option<PeerCert>;
    /// Why the request's body framing cannot be trusted, if it cannot.
    fn framing_error(&self) -> Option<&'static str> {
        None
    }
    /// The whole body, refused above `max` bytes (by a declared length before reading
    /// anything, else while reading). A refused body closes the connection afterwards.
    fn read_body(&mut self, max: usize) -> impl Future<Output = Result<Bytes, ReadError>> + Send;
    /// A response with its whole body (`content-length`).
    fn send_full(
        &mut self,
        resp: &RespHead,
        body: &[u8],
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// The head of a streamed response; `send_chunk` and `send_end` follow.
    fn send_stream_head(&mut self, resp: &RespHead) -> impl Future<Output = io::Result<()>> + Send;
    fn send_chunk(&mut self, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    fn send_end(&mut self, last: Bytes) -> impl Future<Output = io::Result<()>> + Send;
}

/// One request on an HTTP/1.x connection.
pub struct H1<'a> {
    conn: &'a mut Conn<Stream>,
    head: Head,
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
}

impl<'a> H1<'a> {
    pub fn new(
        conn: &'a mut Conn<Stream>,
        head: Head,
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
}

impl Downstream for H1<'_> {
    fn head(&self) -> &Head {
        &self.head
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

    async fn send_full(&mut self, resp: &RespHead, body: &[u8]) -> io::Result<()> {
        let close = self.must_close();
        self.out.clear();
        let framing = if resp.status == 204 || resp.status == 304 {
            OutFraming::None
        } else {
            OutFraming::Length(body.len())
        };
        resp.encode(self.out, framing, close);
        if !self.head_only() && framing != OutFraming::None {
            self.out.extend_from_slice(body);
        }
        self.conn.send(self.out).await
    }

    async fn send_stream_head(&mut self, resp: &RespHead) -> io::Result<()> {
        self.streaming = if self.head.minor == 0 {
            // An HTTP/1.0 client cannot read chunks: the body ends with the connection.
            self.close = true;
            OutFraming::Close
        } else {
            OutFraming::Chunked
        };
        let close = self.must_close();
        self.out.clear();
        resp.encode(self.out, self.streaming, close);
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
        self.conn.send(self.out).await
    }
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

    fn response(resp: &RespHead, len: Option<usize>) -> io::Result<Box<ResponseHeader>> {
        let mut out =
            ResponseHeader::build(resp.status, Some(resp.iter().count() + 1)).map_err(io_err)?;
        for (n, v) in resp.iter() {
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

    async fn send_full(&mut self, resp: &RespHead, body: &[u8]) -> io::Result<()> {
        let head = Self::response(resp, Some(body.len()))?;
        self.session
            .write_response_header(head, false)
            .await
            .map_err(io_err)?;
        self.session
            .write_response_body(Some(Bytes::copy_from_slice(body)), true)
            .await
            .map_err(io_err)
    }

    async fn send_stream_head(&mut self, resp: &RespHead) -> io::Result<()> {
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
