//! Reads one message body by its [`Framing`]: a length, chunks, or to the close. Chunk lines
//! and trailer lines go through the strict grammars of [`super::framing`], with per-message
//! budgets for extension and trailer bytes, so that nothing after a body is ever read as
//! the next message unless the body ended exactly where its framing says.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use super::framing::{
    chunk_line, trailer_line, Framing, TrailerLine, MAX_CHUNK_EXTENSIONS, MAX_CHUNK_LINE,
    MAX_TRAILER_BYTES, MAX_TRAILER_LINES,
};
use super::{Conn, H1Error};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// Reads one message body, chunk by chunk, from a [`Conn`].
#[derive(Debug)]
pub struct BodyReader {
    framing: Framing,
    left: u64,
    chunk: Chunk,
    done: bool,
    /// Chunk-extension bytes still allowed in this message.
    extensions_left: usize,
    /// Trailer bytes and lines read so far.
    trailer_bytes: usize,
    trailer_lines: usize,
}

impl BodyReader {
    pub fn new(framing: Framing) -> Self {
        let left = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        BodyReader {
            framing,
            left,
            chunk: Chunk::Size,
            done: matches!(framing, Framing::Length(0)),
            extensions_left: MAX_CHUNK_EXTENSIONS,
            trailer_bytes: 0,
            trailer_lines: 0,
        }
    }

    /// Whether the body was read to its framed end.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The next piece of the body; `None` at its end.
    pub async fn next<S>(&mut self, conn: &mut Conn<S>) -> Result<Option<Bytes>, H1Error>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if self.done {
            return Ok(None);
        }
        match self.framing {
            Framing::Length(_) => {
                if conn.rbuf.is_empty() && conn.fill().await? == 0 {
                    return Err(H1Error::Closed);
                }
                let n = (conn.rbuf.len() as u64).min(self.left) as usize;
                self.left -= n as u64;
                self.done = self.left == 0;
                Ok(Some(conn.rbuf.split_to(n).freeze()))
            }
            Framing::Close => {
                if conn.rbuf.is_empty() && conn.fill().await? == 0 {
                    self.done = true;
                    return Ok(None);
                }
                Ok(Some(conn.rbuf.split().freeze()))
            }
            Framing::Chunked => self.next_chunked(conn).await,
        }
    }

    async fn next_chunked<S>(&mut self, conn: &mut Conn<S>) -> Result<Option<Bytes>, H1Error>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            match self.chunk {
                Chunk::Size => match chunk_line(&conn.rbuf).map_err(H1Error::Malformed)? {
                    // Refused whole as in pieces: a line longer than the limit is refused
                    // however it arrives.
                    Some(line) if line.used > MAX_CHUNK_LINE => {
                        return Err(H1Error::Malformed("chunk size line too long"));
                    }
                    Some(line) => {
                        self.extensions_left = self
                            .extensions_left
                            .checked_sub(line.extensions)
                            .ok_or(H1Error::Malformed("too many chunk extension bytes"))?;
                        let _ = conn.rbuf.split_to(line.used);
                        self.chunk = if line.size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(line.size)
                        };
                    }
                    None => {
                        if conn.rbuf.len() >= MAX_CHUNK_LINE {
                            return Err(H1Error::Malformed("chunk size line too long"));
                        }
                        if conn.fill().await? == 0 {
                            return Err(H1Error::Closed);
                        }
                    }
                },
                Chunk::Data(left) => {
                    if conn.rbuf.is_empty() && conn.fill().await? == 0 {
                        return Err(H1Error::Closed);
                    }
                    let n = (conn.rbuf.len() as u64).min(left) as usize;
                    self.chunk = if n as u64 == left {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - n as u64)
                    };
                    return Ok(Some(conn.rbuf.split_to(n).freeze()));
                }
                Chunk::DataEnd => {
                    while conn.rbuf.len() < 2 {
                        if conn.fill().await? == 0 {
                            return Err(H1Error::Closed);
                        }
                    }
                    if &conn.rbuf[..2] != b"\r\n" {
                        return Err(H1Error::Malformed("chunk not followed by CRLF"));
                    }
                    let _ = conn.rbuf.split_to(2);
                    self.chunk = Chunk::Size;
                }
                Chunk::Trailers => match trailer_line(&conn.rbuf).map_err(H1Error::Malformed)? {
                    Some(TrailerLine::End) => {
                        let _ = conn.rbuf.split_to(2);
                        self.done = true;
                        return Ok(None);
                    }
                    // A trailer field: checked, counted and dropped (never forwarded).
                    Some(TrailerLine::Field(used)) => {
                        self.trailer_bytes += used;
                        self.trailer_lines += 1;
                        if self.trailer_bytes > MAX_TRAILER_BYTES
                            || self.trailer_lines > MAX_TRAILER_LINES
                        {
                            return Err(H1Error::Malformed("trailer section too large"));
                        }
                        let _ = conn.rbuf.split_to(used);
                    }
                    None => {
                        // A lone CR is the start of the final CRLF, not of a field: it is
                        // not counted, so a split final CRLF is judged as a whole one.
                        let pending = if conn.rbuf[..] == [b'\r'] {
                            0
                        } else {
                            conn.rbuf.len()
                        };
                        if self.trailer_bytes + pending > MAX_TRAILER_BYTES {
                            return Err(H1Error::Malformed("trailer section too large"));
                        }
                        if conn.fill().await? == 0 {
                            return Err(H1Error::Closed);
                        }
                    }
                },
            }
        }
    }
}

/// A body gathered from the pieces a [`BodyReader`] yields. The usual body arrives in one
/// piece and is kept as it is; only a second piece makes a copy.
#[derive(Debug, Default)]
pub struct Collected {
    first: Option<Bytes>,
    more: BytesMut,
}

impl Collected {
    pub fn len(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.more.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a piece; `hint` is the expected total, reserved at the first copy.
    pub fn push(&mut self, piece: Bytes, hint: usize) {
        match self.first.take() {
            None if self.more.is_empty() => self.first = Some(piece),
            first => {
                if let Some(f) = first {
                    self.more.reserve(hint.max(f.len() + piece.len()));
                    self.more.extend_from_slice(&f);
                }
                self.more.extend_from_slice(&piece);
            }
        }
    }

    pub fn freeze(self) -> Bytes {
        self.first.unwrap_or_else(|| self.more.freeze())
    }
}
