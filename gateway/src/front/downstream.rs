//! The client side of a request, as the pipeline sees it: the head, the body read whole and
//! bounded, and a response sent whole or streamed. Two kinds: HTTP/1.x on the gateway's own
//! codec (`super::h1`), and HTTP/2 (negotiated by ALPN on TLS listeners) on Pingora's session
//! (`super::h2`).

use std::future::Future;
use std::io;
use std::net::IpAddr;

use bytes::Bytes;
use filters::cert::PeerCert;

use crate::http1::Head;
use crate::pipeline::respond::ResponseHead;

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
    /// The body's length as the client declared it (`None`: chunked, or not said).
    fn declared_length(&self) -> Option<u64>;
    /// The next piece of the body as it arrives (`None` at its end), for a body streamed
    /// to the backend rather than read whole. The caller bounds the total.
    fn read_chunk(&mut self) -> impl Future<Output = Result<Option<Bytes>, ReadError>> + Send;
    /// A response with its whole body (`content-length`).
    fn send_full(
        &mut self,
        resp: &ResponseHead,
        body: &[u8],
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// The head of a streamed response; `send_chunk` and `send_end` follow.
    fn send_stream_head(
        &mut self,
        resp: &ResponseHead,
    ) -> impl Future<Output = io::Result<()>> + Send;
    fn send_chunk(&mut self, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    fn send_end(&mut self, last: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Whether the connection can be taken over by a WebSocket session (HTTP/1.1 only: the
    /// HTTP/2 server does not offer extended CONNECT).
    fn can_upgrade(&self) -> bool {
        false
    }
    /// The connection's stream and the bytes already read past the head, for a WebSocket
    /// session after its `101`; the connection carries no further request. `None` where
    /// [`Downstream::can_upgrade`] is false.
    fn take_over(&mut self) -> Option<(&mut pingora::protocols::Stream, Vec<u8>)> {
        None
    }
}
