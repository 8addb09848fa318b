//! The HTTP/1.1 codec of the request path, both sides: requests from clients, responses from
//! backends. Pingora's own HTTP/1 session keeps every header in a `HeaderMap` plus a
//! case-preserving copy, builds a response header object per request and runs a module
//! pipeline; measured, that costs more per request than the whole rest of the gateway
//! (load-tests/results.md). Here a head is parsed once by `httparse` into one buffer with
//! offsets, looked up by a linear case-insensitive scan (a request has a dozen headers), and a
//! response leaves in one write. Pingora still owns the listeners, TLS, the upstream
//! connect/TLS handshake and the process lifecycle.
//!
//! - [`head`]: a parsed head, its header names recognized once ([`Name`]);
//! - [`framing`]: every framing decision of RFC 9112 §6–7 as pure functions — where a body
//!   ends, the chunk-line and trailer-line grammars, which fields are hop-by-hop;
//! - [`body`]: reads one body by its framing, with per-message limits;
//! - [`conn`]: one connection, its read buffer and the head-read timeout;
//! - [`fast`]: the usual head in its strictest form, read without `httparse` (which reads
//!   every other head);
//! - [`encode`]: response heads and chunks as they leave.
//!
//! A head that cannot be parsed, or is larger than [`MAX_HEAD`] (64 KiB) or has more than
//! 128 fields, is answered 400 `InvalidRequestBody` and the connection closed.

use std::io;

mod body;
mod conn;
mod encode;
mod fast;
pub mod framing;
mod head;
#[cfg(test)]
mod tests;

pub use body::{BodyReader, Collected};
pub use conn::Conn;
pub use encode::{encode_chunk, encode_head, reason, OutFraming};
pub use framing::Framing;
pub use head::{Head, HeaderKey, Name, Text};

/// The largest request or response head accepted.
pub const MAX_HEAD: usize = 64 * 1024;
pub(crate) const MAX_HEADERS: usize = 128;
/// Room for a read while the messages come in large pieces (the last read filled its room).
pub(crate) const READ_CHUNK: usize = 16 * 1024;
/// Room for a read otherwise: a connection's first read, a request head and its small body,
/// an answer's head, an SSE event. A stream that waits holds this much, not [`READ_CHUNK`]
/// (issue 18: memory per open stream).
pub(crate) const READ_SMALL: usize = 4 * 1024;
/// Room for a backend read while an SSE answer streams (its events are a few hundred bytes):
/// what an open stream holds on the backend side while it waits (issue 18).
pub const READ_STREAM: usize = 2 * 1024;
/// Less room than this after the buffered bytes and the buffer is made room in before a read.
pub(crate) const READ_MIN_FREE: usize = 1024;

#[derive(Debug)]
pub enum H1Error {
    /// The peer closed the connection (cleanly or not) before the message was complete.
    Closed,
    Io(io::Error),
    /// Not HTTP/1.x, or framing that cannot be trusted: answer 400 and close.
    Malformed(&'static str),
    /// The head is larger than [`MAX_HEAD`] or has too many fields (a request gets 400
    /// `InvalidRequestBody` and the connection is closed).
    HeadTooLarge,
    /// A request head started but did not complete within the head-read timeout.
    HeadTimeout,
}

impl std::fmt::Display for H1Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            H1Error::Closed => f.write_str("connection closed"),
            H1Error::Io(e) => write!(f, "{e}"),
            H1Error::Malformed(why) => write!(f, "malformed message: {why}"),
            H1Error::HeadTooLarge => f.write_str("message head too large"),
            H1Error::HeadTimeout => f.write_str("request head not received in time"),
        }
    }
}

impl std::error::Error for H1Error {}

impl From<io::Error> for H1Error {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => H1Error::Closed,
            _ => H1Error::Io(e),
        }
    }
}
