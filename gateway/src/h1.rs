//! The HTTP/1.1 codec of the request path, both sides: requests from clients, responses from
//! backends. Pingora's own HTTP/1 session keeps every header in a `HeaderMap` plus a
//! case-preserving copy, builds a response header object per request and runs a module
//! pipeline; measured, that costs more per request than the whole rest of the gateway
//! (load-tests/results.md). Here a head is parsed once by `httparse` into one buffer with
//! offsets, looked up by a linear case-insensitive scan (a request has a dozen headers), and a
//! response leaves in one write. Pingora still owns the listeners, TLS, the upstream
//! connect/TLS handshake and the process lifecycle.
//!
//! Framing follows RFC 9112: `Transfer-Encoding: chunked` or one `Content-Length` (several
//! that disagree, a `Transfer-Encoding` other than `chunked`, or both headers on a request
//! are refused — the request-smuggling cases); a response without either is read to close.

use std::io;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest request or response head accepted.
pub const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
const READ_CHUNK: usize = 16 * 1024;

#[derive(Debug)]
pub enum H1Error {
    /// The peer closed the connection (cleanly or not) before the message was complete.
    Closed,
    Io(io::Error),
    /// Not HTTP/1.x, or framing that cannot be trusted: answer 400 and close.
    Malformed(&'static str),
    /// The head is larger than [`MAX_HEAD`] (431 for a request).
    HeadTooLarge,
}

impl std::fmt::Display for H1Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            H1Error::Closed => f.write_str("connection closed"),
            H1Error::Io(e) => write!(f, "{e}"),
            H1Error::Malformed(why) => write!(f, "malformed message: {why}"),
            H1Error::HeadTooLarge => f.write_str("message head too large"),
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

type Span = (u32, u32);

/// The header names the gateway acts on, recognized once when a head is parsed, so that
/// lookups and the forwarding filters compare a byte rather than names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Name {
    Other = 0,
    ContentLength,
    TransferEncoding,
    Connection,
    KeepAlive,
    ProxyConnection,
    Te,
    Trailer,
    Upgrade,
    ProxyAuthorization,
    Host,
    AcceptEncoding,
    ApiKey,
    Authorization,
    Cookie,
    Expect,
    SetCookie,
    ContentType,
    XRequestId,
    ApimRequestId,
    RetryAfter,
    RetryAfterMs,
    XAzureFdid,
    XAzureClientIp,
    XForwardedFor,
    /// `x-ratelimit-*`
    RateLimit,
}

/// `name` equals the lower-case literal `lit` of the same length, ignoring case, eight
/// bytes at a time. The literals are lower case letters and `-`; for token characters (all a
/// header name may hold) `b | 0x20` equals one of them only for that letter in either case,
/// or `-` itself.
fn eq_lower(name: &[u8], lit: &[u8]) -> bool {
    const LOWER: u64 = 0x2020_2020_2020_2020;
    let n = name.len();
    if n != lit.len() {
        return false;
    }
    if n < 8 {
        return name.iter().zip(lit).all(|(&a, &b)| a | 0x20 == b);
    }
    let word = |s: &[u8], i: usize| u64::from_le_bytes(s[i..i + 8].try_into().expect("8 bytes"));
    let mut i = 0;
    while i + 8 < n {
        if word(name, i) | LOWER != word(lit, i) {
            return false;
        }
        i += 8;
    }
    word(name, n - 8) | LOWER == word(lit, n - 8)
}

/// How many [`Name`]s there are.
const NAMES: usize = Name::RateLimit as usize + 1;

impl Name {
    /// The name of a header as sent (any case).
    pub fn of(name: &[u8]) -> Name {
        let is = |s: &str| eq_lower(name, s.as_bytes());
        match name.len() {
            2 if is("te") => Name::Te,
            4 if is("host") => Name::Host,
            6 if is("cookie") => Name::Cookie,
            6 if is("expect") => Name::Expect,
            7 if is("api-key") => Name::ApiKey,
            7 if is("trailer") => Name::Trailer,
            7 if is("upgrade") => Name::Upgrade,
            10 if is("connection") => Name::Connection,
            10 if is("keep-alive") => Name::KeepAlive,
            10 if is("set-cookie") => Name::SetCookie,
            11 if is("retry-after") => Name::RetryAfter,
            12 if is("content-type") => Name::ContentType,
            12 if is("x-request-id") => Name::XRequestId,
            12 if is("x-azure-fdid") => Name::XAzureFdid,
            13 if is("authorization") => Name::Authorization,
            14 if is("content-length") => Name::ContentLength,
            14 if is("retry-after-ms") => Name::RetryAfterMs,
            15 if is("apim-request-id") => Name::ApimRequestId,
            15 if is("accept-encoding") => Name::AcceptEncoding,
            15 if is("x-forwarded-for") => Name::XForwardedFor,
            16 if is("proxy-connection") => Name::ProxyConnection,
            16 if is("x-azure-clientip") => Name::XAzureClientIp,
            17 if is("transfer-encoding") => Name::TransferEncoding,
            19 if is("proxy-authorization") => Name::ProxyAuthorization,
            n if n > 12 && name[..12].eq_ignore_ascii_case(b"x-ratelimit-") => Name::RateLimit,
            _ => Name::Other,
        }
    }

    /// Hop-by-hop: about one connection, never forwarded either way.
    pub fn hop_by_hop(self) -> bool {
        matches!(
            self,
            Name::Connection
                | Name::KeepAlive
                | Name::ProxyConnection
                | Name::Te
                | Name::Trailer
                | Name::TransferEncoding
                | Name::Upgrade
        )
    }

    /// Never sent to a backend: hop-by-hop, the client's credentials, and what the gateway
    /// sets itself (host, length; no compression, so the gateway can read usage).
    pub fn never_upstream(self) -> bool {
        self.hop_by_hop()
            || matches!(
                self,
                Name::ProxyAuthorization
                    | Name::Host
                    | Name::ContentLength
                    | Name::AcceptEncoding
                    | Name::ApiKey
                    | Name::Authorization
                    | Name::Cookie
                    | Name::Expect
            )
    }

    /// Never passed from a backend's answer to the client: hop-by-hop, cookies, and what
    /// the gateway sets itself (length, `x-request-id`).
    pub fn never_downstream(self) -> bool {
        self.hop_by_hop()
            || matches!(
                self,
                Name::SetCookie | Name::ContentLength | Name::XRequestId
            )
    }
}

/// What a header is looked up by: a [`Name`] (no name comparison at all) or any name.
pub trait HeaderKey: Copy {
    /// The known [`Name`], or the name as written when it is not one.
    fn key(self) -> Result<Name, &'static str>;
}

impl HeaderKey for Name {
    fn key(self) -> Result<Name, &'static str> {
        Ok(self)
    }
}

impl HeaderKey for &'static str {
    fn key(self) -> Result<Name, &'static str> {
        match Name::of(self.as_bytes()) {
            Name::Other | Name::RateLimit => Err(self),
            known => Ok(known),
        }
    }
}

/// One header: where its name and value sit in the head's buffer, and which it is.
#[derive(Debug, Clone, Copy)]
struct Field {
    name: Span,
    value: Span,
    kind: Name,
}

/// UTF-8 text that shares the buffer of the head it was read from: the audit record keeps
/// the method, path and backend request id without copying them per request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Text(ByteString);

impl Text {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

#[cfg(test)]
impl From<String> for Text {
    fn from(s: String) -> Text {
        Text(ByteString::from(s))
    }
}

impl serde::Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A parsed request or response head: the raw bytes and where each part sits in them.
#[derive(Debug, Clone)]
pub struct Head {
    raw: Raw,
    method: Span,
    /// The path of the request target (the absolute form reduced to it) and its query.
    path: Span,
    query: Option<Span>,
    /// 0 for requests.
    pub status: u16,
    /// HTTP/1.`minor`.
    pub minor: u8,
    fields: Vec<Field>,
    /// Per [`Name`], 1 + the index of its first field (0: absent).
    first: [u8; NAMES],
}

/// A head's bytes. A request head that is all UTF-8 (checked once when it is made) is kept as
/// text: its method, path, query and header values are then borrowed as `str` without
/// checking each again. Response heads are not checked as a whole: their few text parts
/// are checked one by one.
#[derive(Debug, Clone)]
enum Raw {
    Text(ByteString),
    Bytes(Bytes),
}

impl Raw {
    fn bytes(&self) -> &Bytes {
        match self {
            Raw::Text(t) => t.as_bytes(),
            Raw::Bytes(b) => b,
        }
    }
}

fn span_of(buf: &[u8], part: &[u8]) -> Span {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    (start as u32, (start + part.len()) as u32)
}

/// The path and query spans of a request target at `at` in a buffer: origin form
/// `/path?query`; the absolute form `http://host/path?query` is reduced to its path and
/// query (`/` when it has none).
fn target_spans(target: &[u8], at: u32) -> (Span, Option<Span>) {
    let end = at + target.len() as u32;
    let mut start = 0usize;
    for scheme in [&b"http://"[..], b"https://"] {
        if target.len() >= scheme.len() && target[..scheme.len()].eq_ignore_ascii_case(scheme) {
            let rest = &target[scheme.len()..];
            start = match memchr::memchr2(b'/', b'?', rest) {
                Some(i) if rest[i] == b'/' => scheme.len() + i,
                // No path: `/` (the empty span marks it).
                _ => return ((end, end), None),
            };
            break;
        }
    }
    let t = &target[start..];
    let p0 = at + start as u32;
    match memchr::memchr(b'?', t) {
        Some(i) => ((p0, p0 + i as u32), Some((p0 + i as u32 + 1, end))),
        None => ((p0, end), None),
    }
}

impl Head {
    fn slice(&self, s: Span) -> &[u8] {
        &self.raw.bytes()[s.0 as usize..s.1 as usize]
    }

    /// A part of the head as `str`, if it is UTF-8.
    fn str_at(&self, s: Span) -> Option<&str> {
        let range = s.0 as usize..s.1 as usize;
        match &self.raw {
            Raw::Text(t) => t.get(range),
            Raw::Bytes(b) => std::str::from_utf8(&b[range]).ok(),
        }
    }

    /// A part of the head as [`Text`] sharing its buffer, if it is UTF-8.
    fn text_at(&self, s: Span) -> Option<Text> {
        let range = s.0 as usize..s.1 as usize;
        match &self.raw {
            Raw::Text(t) => Some(Text(t.slice_ref(t.get(range)?))),
            Raw::Bytes(b) => ByteString::try_from(b.slice(range)).ok().map(Text),
        }
    }

    fn new(
        buf: Bytes,
        method: Span,
        target: Span,
        status: u16,
        minor: u8,
        fields: Vec<Field>,
    ) -> Head {
        let (path, query) = if status == 0 {
            target_spans(&buf[target.0 as usize..target.1 as usize], target.0)
        } else {
            ((0, 0), None)
        };
        let mut first = [0u8; NAMES];
        for (i, f) in fields.iter().enumerate() {
            let slot = &mut first[f.kind as usize];
            if *slot == 0 && f.kind != Name::Other {
                // At most MAX_HEADERS (128) fields.
                *slot = (i + 1) as u8;
            }
        }
        // (`try_from` drops the bytes of a head that is not UTF-8: it gets a second handle
        // of the shared buffer, which costs less than checking the bytes twice.)
        let raw = match status {
            0 => ByteString::try_from(buf.clone()).map_or(Raw::Bytes(buf), Raw::Text),
            _ => Raw::Bytes(buf),
        };
        Head {
            raw,
            method,
            path,
            query,
            status,
            minor,
            fields,
            first,
        }
    }

    /// A request head from parts (HTTP/2 requests, tests).
    pub fn request<'a>(
        method: &str,
        target: &str,
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Head {
        let mut raw = Vec::with_capacity(256);
        raw.extend_from_slice(method.as_bytes());
        let method_span = (0, raw.len() as u32);
        let t0 = raw.len() as u32;
        raw.extend_from_slice(target.as_bytes());
        let target_span = (t0, raw.len() as u32);
        let mut fields = Vec::new();
        for (n, v) in headers.into_iter().take(MAX_HEADERS) {
            let n0 = raw.len() as u32;
            raw.extend_from_slice(n.as_bytes());
            let n1 = raw.len() as u32;
            raw.extend_from_slice(v);
            fields.push(Field {
                name: (n0, n1),
                value: (n1, raw.len() as u32),
                kind: Name::of(n.as_bytes()),
            });
        }
        Head::new(Bytes::from(raw), method_span, target_span, 0, 1, fields)
    }

    pub fn method(&self) -> &str {
        // httparse only accepts token characters in a method.
        self.str_at(self.method).unwrap_or("")
    }

    /// The path of the request target (absolute form reduced to it).
    pub fn path(&self) -> &str {
        if self.path.0 == self.path.1 {
            return "/";
        }
        self.str_at(self.path).unwrap_or("")
    }

    pub fn query(&self) -> Option<&str> {
        self.query.map(|q| self.str_at(q).unwrap_or(""))
    }

    /// The method, sharing the head's buffer.
    pub fn method_text(&self) -> Text {
        self.text_at(self.method).unwrap_or_default()
    }

    /// The path (without the query), sharing the head's buffer; empty if it is not UTF-8.
    pub fn path_text(&self) -> Text {
        if self.path.0 == self.path.1 {
            return Text(ByteString::from_static("/"));
        }
        self.text_at(self.path).unwrap_or_default()
    }

    /// A header value that is valid UTF-8, sharing the head's buffer.
    pub fn get_text(&self, name: impl HeaderKey) -> Option<Text> {
        self.text_at(self.value_span(name)?)
    }

    /// Where the value of the first header of this name is.
    fn value_span(&self, name: impl HeaderKey) -> Option<Span> {
        match name.key() {
            Ok(known) => match self.first[known as usize] {
                0 => None,
                i => Some(self.fields[i as usize - 1].value),
            },
            Err(name) => self
                .fields
                .iter()
                .find(|f| self.slice(f.name).eq_ignore_ascii_case(name.as_bytes()))
                .map(|f| f.value),
        }
    }

    /// The first header of this name (a [`Name`], or any name, case-insensitive).
    pub fn get(&self, name: impl HeaderKey) -> Option<&[u8]> {
        self.value_span(name).map(|v| self.slice(v))
    }

    pub fn get_str(&self, name: impl HeaderKey) -> Option<&str> {
        self.str_at(self.value_span(name)?)
    }

    pub fn contains(&self, name: impl HeaderKey) -> bool {
        self.get(name).is_some()
    }

    /// The size of the head as received (request line or status line, and headers).
    pub fn wire_len(&self) -> usize {
        self.raw.bytes().len()
    }

    /// Every header in order with the [`Name`] it was recognized as.
    pub fn fields(&self) -> impl Iterator<Item = (Name, &[u8], &[u8])> {
        self.fields
            .iter()
            .map(|f| (f.kind, self.slice(f.name), self.slice(f.value)))
    }

    /// The values of every header recognized as `kind` (a known name), from its first.
    fn values(&self, kind: Name) -> impl Iterator<Item = &[u8]> {
        let from = match self.first[kind as usize] {
            0 => self.fields.len(),
            i => i as usize - 1,
        };
        self.fields[from..]
            .iter()
            .filter(move |f| f.kind == kind)
            .map(|f| self.slice(f.value))
    }

    /// Whether a `Connection` header lists this option.
    fn connection_has(&self, option: &str) -> bool {
        self.values(Name::Connection).any(|v| {
            v.split(|&b| b == b',')
                .any(|o| o.trim_ascii().eq_ignore_ascii_case(option.as_bytes()))
        })
    }

    /// Whether the connection may carry another message after this one.
    pub fn keep_alive(&self) -> bool {
        if self.minor == 0 {
            self.connection_has("keep-alive")
        } else {
            !self.connection_has("close")
        }
    }

    /// How the body of this request is delimited.
    pub fn request_framing(&self) -> Result<Framing, H1Error> {
        let te = self.transfer_encoding()?;
        let cl = self.content_length()?;
        match (te, cl) {
            (Some(_), Some(_)) => Err(H1Error::Malformed(
                "both Transfer-Encoding and Content-Length",
            )),
            (Some(()), None) => Ok(Framing::Chunked),
            (None, Some(n)) => Ok(Framing::Length(n)),
            (None, None) => Ok(Framing::Length(0)),
        }
    }

    /// How the body of this response is delimited (`head_request`: it answers a HEAD).
    pub fn response_framing(&self, head_request: bool) -> Result<Framing, H1Error> {
        if head_request || self.status < 200 || self.status == 204 || self.status == 304 {
            return Ok(Framing::Length(0));
        }
        if self.transfer_encoding()?.is_some() {
            return Ok(Framing::Chunked);
        }
        Ok(match self.content_length()? {
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        })
    }

    fn transfer_encoding(&self) -> Result<Option<()>, H1Error> {
        let mut seen = false;
        for v in self.values(Name::TransferEncoding) {
            for coding in v.split(|&b| b == b',') {
                let coding = coding.trim_ascii();
                if coding.is_empty() {
                    continue;
                }
                if !coding.eq_ignore_ascii_case(b"chunked") || seen {
                    return Err(H1Error::Malformed("unsupported Transfer-Encoding"));
                }
                seen = true;
            }
        }
        Ok(seen.then_some(()))
    }

    fn content_length(&self) -> Result<Option<u64>, H1Error> {
        let mut len: Option<u64> = None;
        for v in self.values(Name::ContentLength) {
            for part in v.split(|&b| b == b',') {
                let n =
                    decimal(part.trim_ascii()).ok_or(H1Error::Malformed("bad Content-Length"))?;
                if len.is_some_and(|l| l != n) {
                    return Err(H1Error::Malformed("conflicting Content-Length"));
                }
                len = Some(n);
            }
        }
        Ok(len)
    }
}

/// One to 18 decimal digits (no sign, no spaces) as a number.
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut n = 0u64;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u64::from(d - b'0');
    }
    Some(n)
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    /// Until the peer closes (responses only).
    Close,
}

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
        }
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
                Chunk::Size => match httparse::parse_chunk_size(&conn.rbuf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        let _ = conn.rbuf.split_to(used);
                        self.chunk = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) => {
                        if conn.rbuf.len() > 4096 {
                            return Err(H1Error::Malformed("chunk size line too long"));
                        }
                        if conn.fill().await? == 0 {
                            return Err(H1Error::Closed);
                        }
                    }
                    Err(_) => return Err(H1Error::Malformed("bad chunk size")),
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
                Chunk::Trailers => match memchr::memmem::find(&conn.rbuf, b"\r\n") {
                    Some(0) => {
                        let _ = conn.rbuf.split_to(2);
                        self.done = true;
                        return Ok(None);
                    }
                    // A trailer field: read and dropped.
                    Some(i) => {
                        let _ = conn.rbuf.split_to(i + 2);
                    }
                    None => {
                        if conn.rbuf.len() > MAX_HEAD {
                            return Err(H1Error::HeadTooLarge);
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

/// One HTTP/1.x connection: the stream and its read buffer (bytes read past the current
/// message stay for the next one: pipelined requests).
pub struct Conn<S> {
    pub io: S,
    rbuf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(io: S) -> Self {
        Conn {
            io,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
        }
    }

    /// Whether bytes past the last message are waiting.
    pub fn has_buffered(&self) -> bool {
        !self.rbuf.is_empty()
    }

    async fn fill(&mut self) -> Result<usize, H1Error> {
        if self.rbuf.capacity() - self.rbuf.len() < 1024 {
            self.rbuf.reserve(READ_CHUNK);
        }
        Ok(self.io.read_buf(&mut self.rbuf).await?)
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
                    return Ok(Some(head));
                }
                if self.rbuf.len() >= MAX_HEAD {
                    return Err(H1Error::HeadTooLarge);
                }
            }
            let was_empty = self.rbuf.is_empty();
            if self.fill().await? == 0 {
                return if was_empty {
                    Ok(None)
                } else {
                    Err(H1Error::Closed)
                };
            }
        }
    }

    fn try_parse(&mut self, response: bool) -> Result<Option<Head>, H1Error> {
        // Left uninitialized: httparse writes only the slots it fills.
        let mut headers =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let config = httparse::ParserConfig::default();
        let (used, method, target, status, minor, spans);
        if response {
            let mut r = httparse::Response::new(&mut []);
            match config.parse_response_with_uninit_headers(&mut r, &self.rbuf, &mut headers) {
                Ok(httparse::Status::Complete(n)) => {
                    used = n;
                    method = (0, 0);
                    target = (0, 0);
                    status = r.code.unwrap_or(0);
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

/// A response head being built: the status and its header lines, written as they are added.
#[derive(Debug, Clone)]
pub struct RespHead {
    pub status: u16,
    lines: Vec<u8>,
}

impl RespHead {
    pub fn new(status: u16) -> Self {
        RespHead {
            status,
            lines: Vec::with_capacity(512),
        }
    }

    /// Adds a header line. Values with CR or LF are dropped (they would split the head).
    pub fn add(&mut self, name: &str, value: impl AsRef<[u8]>) {
        self.add_raw(name.as_bytes(), value.as_ref());
    }

    pub fn add_raw(&mut self, name: &[u8], value: &[u8]) {
        if memchr::memchr2(b'\r', b'\n', value).is_none() {
            self.add_parsed(name, value);
        }
    }

    /// Adds a header line from a parsed head (httparse refuses CR and LF in values).
    pub fn add_parsed(&mut self, name: &[u8], value: &[u8]) {
        self.lines.extend_from_slice(name);
        self.lines.extend_from_slice(b": ");
        self.lines.extend_from_slice(value);
        self.lines.extend_from_slice(b"\r\n");
    }

    pub fn add_u64(&mut self, name: &str, value: u64) {
        self.add(name, itoa::Buffer::new().format(value));
    }

    /// The header lines as (name, value) pairs.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.lines
            .split(|&b| b == b'\n')
            .filter_map(|l| l.strip_suffix(b"\r"))
            .filter_map(|l| {
                let i = l.iter().position(|&b| b == b':')?;
                Some((&l[..i], l[i + 1..].trim_ascii()))
            })
    }

    /// Writes the status line and headers into `out`, then the framing headers and the
    /// blank line.
    pub fn encode(&self, out: &mut Vec<u8>, framing: OutFraming, close: bool) {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(itoa::Buffer::new().format(self.status).as_bytes());
        out.push(b' ');
        out.extend_from_slice(reason(self.status).as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.lines);
        match framing {
            OutFraming::Length(n) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            OutFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            OutFraming::Close | OutFraming::None => {}
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// How a response body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutFraming {
    Length(usize),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client of a stream).
    Close,
    /// No body and no length (204, 304).
    None,
}

/// Appends one chunk of a chunked body.
pub fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let mut hex = [0u8; 16];
    let mut n = data.len();
    let mut i = hex.len();
    while n > 0 {
        i -= 1;
        hex[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
    }
    out.extend_from_slice(&hex[i..]);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

pub fn reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    async fn conn_with(input: &'static [u8]) -> Conn<tokio::io::DuplexStream> {
        let (a, mut b) = duplex(1 << 20);
        b.write_all(input).await.unwrap();
        drop(b);
        Conn::new(a)
    }

    async fn body_of(
        c: &mut Conn<tokio::io::DuplexStream>,
        f: Framing,
    ) -> Result<Vec<u8>, H1Error> {
        let mut r = BodyReader::new(f);
        let mut out = Vec::new();
        while let Some(b) = r.next(c).await? {
            out.extend_from_slice(&b);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn parses_a_request_and_keeps_the_pipelined_rest() {
        let mut c = conn_with(
            b"POST /openai/deployments/x/chat/completions?api-version=1 HTTP/1.1\r\nHost: a\r\nAPI-Key: k\r\nContent-Length: 2\r\n\r\n{}GET /healthz HTTP/1.1\r\n\r\n",
        )
        .await;
        let h = c.read_head(false).await.unwrap().unwrap();
        assert_eq!(h.method(), "POST");
        assert_eq!(h.path(), "/openai/deployments/x/chat/completions");
        assert_eq!(h.query(), Some("api-version=1"));
        assert_eq!(h.get("api-key"), Some(&b"k"[..]));
        assert_eq!(h.get_str("HOST"), Some("a"));
        assert!(h.keep_alive());
        assert_eq!(h.request_framing().unwrap(), Framing::Length(2));
        assert_eq!(body_of(&mut c, Framing::Length(2)).await.unwrap(), b"{}");
        let h2 = c.read_head(false).await.unwrap().unwrap();
        assert_eq!((h2.method(), h2.path()), ("GET", "/healthz"));
        assert!(c.read_head(false).await.unwrap().is_none(), "clean close");
    }

    #[test]
    fn header_names_are_recognized_in_any_case_and_only_exactly() {
        let known = [
            ("te", Name::Te),
            ("host", Name::Host),
            ("cookie", Name::Cookie),
            ("expect", Name::Expect),
            ("api-key", Name::ApiKey),
            ("trailer", Name::Trailer),
            ("upgrade", Name::Upgrade),
            ("connection", Name::Connection),
            ("keep-alive", Name::KeepAlive),
            ("set-cookie", Name::SetCookie),
            ("retry-after", Name::RetryAfter),
            ("content-type", Name::ContentType),
            ("x-request-id", Name::XRequestId),
            ("x-azure-fdid", Name::XAzureFdid),
            ("authorization", Name::Authorization),
            ("content-length", Name::ContentLength),
            ("retry-after-ms", Name::RetryAfterMs),
            ("apim-request-id", Name::ApimRequestId),
            ("accept-encoding", Name::AcceptEncoding),
            ("x-forwarded-for", Name::XForwardedFor),
            ("proxy-connection", Name::ProxyConnection),
            ("x-azure-clientip", Name::XAzureClientIp),
            ("transfer-encoding", Name::TransferEncoding),
            ("proxy-authorization", Name::ProxyAuthorization),
            ("x-ratelimit-remaining-tokens", Name::RateLimit),
        ];
        for (lit, name) in known {
            assert_eq!(Name::of(lit.as_bytes()), name, "{lit}");
            assert_eq!(Name::of(lit.to_uppercase().as_bytes()), name, "{lit}");
            // One character off, or one longer: not that header.
            for at in [0, lit.len() / 2, lit.len() - 1] {
                if name == Name::RateLimit && at >= 12 {
                    continue;
                }
                let mut off = lit.as_bytes().to_vec();
                off[at] = b'!';
                assert_eq!(Name::of(&off), Name::Other, "{lit} changed at {at}");
            }
            if name != Name::RateLimit {
                assert_eq!(
                    Name::of(format!("{lit}x").as_bytes()),
                    Name::Other,
                    "{lit}x"
                );
            }
        }
        for other in [
            "x-ratelimit-",
            "content_length",
            "api_key",
            "hostx",
            "",
            "x",
        ] {
            assert_eq!(Name::of(other.as_bytes()), Name::Other, "{other}");
        }
        assert!(Name::ApiKey.never_upstream() && !Name::ApiKey.never_downstream());
        assert!(Name::SetCookie.never_downstream() && !Name::SetCookie.never_upstream());
        assert!(Name::Connection.never_upstream() && Name::Connection.never_downstream());
        assert!(!Name::ContentType.never_upstream() && !Name::Other.never_downstream());
    }

    #[test]
    fn request_targets_split_into_path_and_query() {
        for (target, path, query) in [
            ("/a/b?x=1&y", "/a/b", Some("x=1&y")),
            ("/a/b", "/a/b", None),
            ("/a?", "/a", Some("")),
            ("http://host/a/b?x=1", "/a/b", Some("x=1")),
            ("HTTPS://host:443/a", "/a", None),
            ("http://host", "/", None),
            ("http://host?x=1", "/", None),
            ("*", "*", None),
        ] {
            let h = Head::request("GET", target, []);
            assert_eq!(h.path(), path, "{target}");
            assert_eq!(h.path_text().as_str(), path, "{target}");
            assert_eq!(h.query(), query, "{target}");
        }
    }

    #[test]
    fn lookups_find_the_first_of_repeated_headers_and_framing_sees_all() {
        let h = Head::request(
            "POST",
            "/",
            [
                ("X-Custom", &b"1"[..]),
                ("Content-Length", b"5"),
                ("content-length", b"6"),
                ("x-custom", b"2"),
            ],
        );
        assert_eq!(h.get("content-length"), Some(&b"5"[..]));
        assert_eq!(h.get("x-custom"), Some(&b"1"[..]));
        assert!(h.get("api-key").is_none());
        assert!(matches!(
            h.request_framing(),
            Err(H1Error::Malformed("conflicting Content-Length"))
        ));
        let t = h.get_text("content-length").unwrap();
        assert_eq!(t.as_str(), "5");
    }

    #[test]
    fn text_parts_of_heads_with_and_without_bytes_above_ascii() {
        // A UTF-8 head: its parts are borrowed from the one check of the whole head.
        let h = Head::request(
            "POST",
            "/caf\u{e9}?q=\u{e9}",
            [("x-name", "J\u{f6}rg".as_bytes()), ("api-key", b"k")],
        );
        assert!(matches!(h.raw, Raw::Text(_)));
        assert_eq!(
            (h.method(), h.path(), h.query()),
            ("POST", "/caf\u{e9}", Some("q=\u{e9}"))
        );
        assert_eq!(h.method_text().as_str(), "POST");
        assert_eq!(h.path_text().as_str(), "/caf\u{e9}");
        assert_eq!(h.get_str("x-name"), Some("J\u{f6}rg"));
        assert_eq!(h.get_text("x-name").unwrap().as_str(), "J\u{f6}rg");
        // One header value that is not UTF-8 (obs-text): only that one has no text.
        let h = Head::request(
            "GET",
            "/p",
            [("x-latin1", &b"J\xf6rg"[..]), ("api-key", b"k")],
        );
        assert!(matches!(h.raw, Raw::Bytes(_)));
        assert_eq!((h.method(), h.path()), ("GET", "/p"));
        assert_eq!(h.path_text().as_str(), "/p");
        assert_eq!(h.get_str("x-latin1"), None);
        assert!(h.get_text("x-latin1").is_none());
        assert_eq!(h.get("x-latin1"), Some(&b"J\xf6rg"[..]));
        assert_eq!(h.get_str(Name::ApiKey), Some("k"));
    }

    #[tokio::test]
    async fn response_heads_give_their_header_values_as_text() {
        let mut c =
            conn_with(b"HTTP/1.1 200 OK\r\napim-request-id: abc-1\r\nx-bad: \xff\r\n\r\n").await;
        let h = c.read_head(true).await.unwrap().unwrap();
        assert_eq!(h.get_text(Name::ApimRequestId).unwrap().as_str(), "abc-1");
        assert!(h.get_text("x-bad").is_none());
    }

    #[tokio::test]
    async fn decodes_chunked_bodies_with_extensions_and_trailers() {
        let mut c = conn_with(b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nx-t: 1\r\n\r\nNEXT").await;
        assert_eq!(
            body_of(&mut c, Framing::Chunked).await.unwrap(),
            b"Wikipedia"
        );
        assert_eq!(&c.rbuf[..], b"NEXT");
    }

    #[tokio::test]
    async fn truncated_bodies_are_errors_not_short_bodies() {
        let mut c = conn_with(b"abc").await;
        assert!(matches!(
            body_of(&mut c, Framing::Length(5)).await,
            Err(H1Error::Closed)
        ));
        let mut c = conn_with(b"5\r\nab").await;
        assert!(matches!(
            body_of(&mut c, Framing::Chunked).await,
            Err(H1Error::Closed)
        ));
        let mut c = conn_with(b"2\r\nabXY0\r\n\r\n").await;
        assert!(matches!(
            body_of(&mut c, Framing::Chunked).await,
            Err(H1Error::Malformed(_))
        ));
        let mut c = conn_with(b"zz\r\n").await;
        assert!(matches!(
            body_of(&mut c, Framing::Chunked).await,
            Err(H1Error::Malformed(_))
        ));
    }

    #[test]
    fn collected_keeps_one_piece_and_joins_several() {
        let one = Bytes::from_static(b"whole");
        let mut c = Collected::default();
        c.push(one.clone(), 5);
        assert_eq!(c.len(), 5);
        let got = c.freeze();
        assert_eq!(got, one);
        assert_eq!(got.as_ptr(), one.as_ptr(), "a single piece is not copied");
        let mut c = Collected::default();
        for p in [&b"ab"[..], b"", b"cd", b"e"] {
            c.push(Bytes::copy_from_slice(p), 0);
        }
        assert_eq!((c.len(), &c.freeze()[..]), (5, &b"abcde"[..]));
        assert_eq!(Collected::default().freeze().len(), 0);
    }

    #[tokio::test]
    async fn close_delimited_bodies_end_at_eof() {
        let mut c = conn_with(b"data: 1\n\ndata: 2\n\n").await;
        assert_eq!(
            body_of(&mut c, Framing::Close).await.unwrap(),
            b"data: 1\n\ndata: 2\n\n"
        );
    }

    #[tokio::test]
    async fn smuggling_shapes_are_refused() {
        for raw in [
            &b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        ] {
            let raw: &'static [u8] = Box::leak(raw.to_vec().into_boxed_slice());
            let mut c = conn_with(raw).await;
            let h = c.read_head(false).await.unwrap().unwrap();
            assert!(
                matches!(h.request_framing(), Err(H1Error::Malformed(_))),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        // The same length twice is one length.
        let mut c =
            conn_with(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n").await;
        let h = c.read_head(false).await.unwrap().unwrap();
        assert_eq!(h.request_framing().unwrap(), Framing::Length(3));
    }

    #[tokio::test]
    async fn garbage_oversized_and_truncated_heads() {
        let mut c = conn_with(b"\x16\x03\x01 not http\r\n\r\n").await;
        assert!(matches!(
            c.read_head(false).await,
            Err(H1Error::Malformed(_))
        ));
        let big: &'static [u8] = Box::leak(
            format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(MAX_HEAD))
                .into_bytes()
                .into_boxed_slice(),
        );
        let mut c = conn_with(big).await;
        assert!(matches!(
            c.read_head(false).await,
            Err(H1Error::HeadTooLarge)
        ));
        let mut c = conn_with(b"GET / HTTP/1.1\r\nHost: a\r\n").await;
        assert!(matches!(c.read_head(false).await, Err(H1Error::Closed)));
    }

    #[tokio::test]
    async fn response_framing_and_keep_alive() {
        let mut c = conn_with(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n").await;
        let h = c.read_head(true).await.unwrap().unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.response_framing(false).unwrap(), Framing::Close);
        let mut c = conn_with(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n").await;
        let h = c.read_head(true).await.unwrap().unwrap();
        assert_eq!(h.response_framing(false).unwrap(), Framing::Length(0));
        let mut c = conn_with(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n").await;
        let h = c.read_head(true).await.unwrap().unwrap();
        assert!(!h.keep_alive());
        let mut c = conn_with(b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Close\r\n\r\n").await;
        assert!(!c.read_head(true).await.unwrap().unwrap().keep_alive());
        let h = Head::request("GET", "http://gw.example/healthz?x=1", []);
        assert_eq!((h.path(), h.query()), ("/healthz", Some("x=1")));
    }

    #[test]
    fn response_heads_encode_and_refuse_header_injection() {
        let mut r = RespHead::new(429);
        r.add("retry-after", "3");
        r.add("x-evil", "a\r\nset-cookie: b");
        r.add_u64("x-n", 42);
        let mut out = Vec::new();
        r.encode(&mut out, OutFraming::Length(2), true);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 429 Too Many Requests\r\nretry-after: 3\r\nx-n: 42\r\ncontent-length: 2\r\nconnection: close\r\n\r\n"
        );
        let pairs: Vec<_> = r.iter().collect();
        assert_eq!(
            pairs,
            vec![(&b"retry-after"[..], &b"3"[..]), (&b"x-n"[..], &b"42"[..])]
        );
        let mut out = Vec::new();
        encode_chunk(&mut out, &[b'x'; 26]);
        assert!(out.starts_with(b"1a\r\nxxx"));
        assert!(out.ends_with(b"x\r\n"));
    }
}
