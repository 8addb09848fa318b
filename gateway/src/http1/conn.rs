//! One HTTP/1.x connection: its stream, its read buffer, and the head-read timeout.

use std::io;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::fast;
use super::head::{span_of, Field, Head, Name};
use super::{H1Error, MAX_HEAD, MAX_HEADERS, READ_CHUNK, READ_MIN_FREE, READ_SMALL};
use crate::deadline::timeout_at;

/// One HTTP/1.x connection: the stream and its read buffer (bytes read past the current
/// message stay for the next one: pipelined requests).
pub struct Conn<S> {
    pub io: S,
    pub(super) rbuf: BytesMut,
    /// How long a request head may take from its first byte to its end.
    head_timeout: Option<Duration>,
    /// When the first byte of the head being read arrived (set only once it has to wait).
    head_started: Option<Instant>,
    /// The last read filled all the room it had: more is likely waiting (a large body), so
    /// the next reads get [`READ_CHUNK`] bytes of room rather than [`READ_SMALL`].
    bulk: bool,
    /// The size of the read buffer's allocation (made here, so known here: `BytesMut`
    /// shows only the room past its own view).
    alloc: usize,
    /// The room of a small read ([`READ_SMALL`], or less for an SSE stream's events).
    small: usize,
}

/// How the read buffer is readied for the next read ([`prep_read`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Prep {
    /// Read into the room there is.
    Keep,
    /// Room for this many more bytes: the buffer's own allocation when the pieces split
    /// from it are gone and it is large enough, else a new one of the buffered bytes plus
    /// this many (the old one is freed with its last piece).
    Room(usize),
    /// Nothing is buffered and the allocation is larger than the reads now need (a large
    /// body went by, a stream trickles): a new one of this size.
    Shrink(usize),
}

/// The pure decision before every read: `len` bytes buffered, `free` bytes of room after
/// them, `alloc` the allocation's size, `bulk` whether the last read filled its room. Small
/// reads (a request head and its small body, a chat answer, an SSE event) get
/// [`READ_SMALL`] bytes of room, and a connection waiting between them holds that much; a
/// read that filled its room asks for [`READ_CHUNK`].
#[cfg(test)]
pub(super) fn prep_read(len: usize, free: usize, alloc: usize, bulk: bool) -> Prep {
    prep_read_with(len, free, alloc, bulk, READ_SMALL)
}

/// [`prep_read`] with `small` bytes of room for a small read (an SSE stream's backend reads:
/// [`super::READ_STREAM`]).
pub(super) fn prep_read_with(
    len: usize,
    free: usize,
    alloc: usize,
    bulk: bool,
    small: usize,
) -> Prep {
    let want = if bulk { READ_CHUNK } else { small };
    if len == 0 && alloc > want {
        Prep::Shrink(want)
    } else if free < READ_MIN_FREE {
        Prep::Room(want)
    } else {
        Prep::Keep
    }
}

/// Whether reads are in bulk after one of `n` bytes into `room`: it filled its room, or
/// reads were in bulk and this one was not small (a socket that has a little less than the
/// room now and then does not send the buffer back and forth between the two sizes).
pub(super) fn bulk_after(n: usize, room: usize, bulk: bool) -> bool {
    n == room || (bulk && n >= READ_SMALL)
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(io: S) -> Self {
        Conn {
            io,
            rbuf: BytesMut::new(),
            head_timeout: None,
            head_started: None,
            bulk: false,
            alloc: 0,
            small: READ_SMALL,
        }
    }

    /// The room of the small reads from now on (`READ_SMALL` by default): an SSE stream's
    /// events are a few hundred bytes, and an open stream holds this much while it waits.
    /// A read that fills its room still switches to [`READ_CHUNK`].
    pub fn set_small_reads(&mut self, room: usize) {
        self.small = room.clamp(READ_MIN_FREE * 2, READ_SMALL);
    }

    /// Bounds the time from a request head's first byte to its end (a client that trickles
    /// its head gets [`H1Error::HeadTimeout`]). Without it, only the caller bounds the wait.
    pub fn set_head_timeout(&mut self, limit: Duration) {
        self.head_timeout = Some(limit);
    }

    /// Whether bytes past the last message are waiting.
    /// The bytes read past the last head, taken out (the connection is handed over to
    /// another protocol: a WebSocket session), and the read buffer released.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        self.alloc = 0;
        std::mem::take(&mut self.rbuf).to_vec()
    }

    /// Frees the read buffer when nothing is buffered: a connection that will not be read
    /// for a while (a client's, while its answer streams) keeps no room it does not use.
    /// The pieces split from the buffer (the head, the body) keep their bytes.
    pub fn release_idle_buffer(&mut self) {
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
            self.alloc = 0;
        }
    }

    pub fn has_buffered(&self) -> bool {
        !self.rbuf.is_empty()
    }

    pub(super) async fn fill(&mut self) -> Result<usize, H1Error> {
        let len = self.rbuf.len();
        match prep_read_with(
            len,
            self.rbuf.capacity() - len,
            self.alloc,
            self.bulk,
            self.small,
        ) {
            Prep::Keep => {}
            Prep::Room(n) => {
                if !self.rbuf.try_reclaim(n) {
                    let mut grown = BytesMut::with_capacity(len + n);
                    grown.extend_from_slice(&self.rbuf);
                    self.rbuf = grown;
                    self.alloc = len + n;
                }
            }
            Prep::Shrink(n) => {
                self.rbuf = BytesMut::with_capacity(n);
                self.alloc = n;
            }
        }
        let room = self.rbuf.capacity() - self.rbuf.len();
        let n = self.io.read_buf(&mut self.rbuf).await?;
        self.bulk = bulk_after(n, room, self.bulk);
        Ok(n)
    }

    /// The size of the read buffer's allocation (for tests).
    #[cfg(test)]
    pub(super) fn allocated(&self) -> usize {
        self.alloc
    }

    /// Reads a request head (`response: false`) or a response head. `Ok(None)`: the peer
    /// closed the connection before sending a byte of it.
    pub async fn read_head(&mut self, response: bool) -> Result<Option<Head>, H1Error> {
        loop {
            // Tolerate empty lines before a request (RFC 9112 §2.2).
            if !response {
                while self.rbuf.starts_with(b"\r\n") {
                    let _ = self.rbuf.split_to(2);
                }
            }
            if !self.rbuf.is_empty() {
                if let Some(head) = self.try_parse(response)? {
                    self.head_started = None;
                    return Ok(Some(head));
                }
                if self.rbuf.len() >= MAX_HEAD {
                    return Err(H1Error::HeadTooLarge);
                }
            }
            let was_empty = self.rbuf.is_empty();
            let read = match (was_empty, self.head_timeout) {
                // A head has begun: the rest of it must come before the head timeout, however
                // it trickles in (one clock read, and only for heads that arrive in pieces).
                (false, Some(limit)) => {
                    let started = *self.head_started.get_or_insert_with(Instant::now);
                    timeout_at(started + limit, self.fill())
                        .await
                        .map_err(|_| H1Error::HeadTimeout)??
                }
                _ => self.fill().await?,
            };
            if read == 0 {
                return if was_empty {
                    Ok(None)
                } else {
                    Err(H1Error::Closed)
                };
            }
        }
    }

    fn try_parse(&mut self, response: bool) -> Result<Option<Head>, H1Error> {
        // The usual head in its strictest form first; anything else (or a head not complete
        // yet) is for httparse to decide.
        let fast = if response {
            fast::response(&self.rbuf)
        } else {
            fast::request(&self.rbuf)
        };
        if let Some(p) = fast {
            if p.used > MAX_HEAD {
                return Err(H1Error::HeadTooLarge);
            }
            let buf = self.rbuf.split_to(p.used).freeze();
            return Ok(Some(Head::new(
                buf, p.method, p.target, p.status, p.minor, p.fields,
            )));
        }
        // Left uninitialized: httparse writes only the slots it fills.
        let mut headers =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let config = httparse::ParserConfig::default();
        let (used, method, target, status, minor, spans);
        if response {
            let mut r = httparse::Response::new(&mut []);
            match config.parse_response_with_uninit_headers(&mut r, &self.rbuf, &mut headers) {
                // RFC 9110 §15: a status is 100–999 (httparse takes `000`).
                Ok(httparse::Status::Complete(_)) if r.code.is_none_or(|c| c < 100) => {
                    return Err(H1Error::Malformed("status below 100"));
                }
                Ok(httparse::Status::Complete(n)) => {
                    used = n;
                    method = (0, 0);
                    target = (0, 0);
                    status = r.code.unwrap_or(100);
                    minor = r.version.unwrap_or(1);
                    spans = collect(&self.rbuf, r.headers);
                }
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => return Err(H1Error::HeadTooLarge),
                Err(_) => return Err(H1Error::Malformed("bad response head")),
            }
        } else {
            let mut r = httparse::Request::new(&mut []);
            match config.parse_request_with_uninit_headers(&mut r, &self.rbuf, &mut headers) {
                Ok(httparse::Status::Complete(n)) => {
                    used = n;
                    method = span_of(&self.rbuf, r.method.unwrap_or("").as_bytes());
                    target = span_of(&self.rbuf, r.path.unwrap_or("").as_bytes());
                    status = 0;
                    minor = r.version.unwrap_or(1);
                    spans = collect(&self.rbuf, r.headers);
                }
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => return Err(H1Error::HeadTooLarge),
                Err(_) => return Err(H1Error::Malformed("bad request head")),
            }
        }
        if used > MAX_HEAD {
            return Err(H1Error::HeadTooLarge);
        }
        let buf = self.rbuf.split_to(used).freeze();
        Ok(Some(Head::new(buf, method, target, status, minor, spans)))
    }

    /// Writes all of `bytes` and flushes.
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }
}

fn collect(buf: &[u8], headers: &[httparse::Header<'_>]) -> Vec<Field> {
    headers
        .iter()
        .map(|h| Field {
            name: span_of(buf, h.name.as_bytes()),
            value: span_of(buf, h.value),
            kind: Name::of(h.name.as_bytes()),
        })
        .collect()
}
