//! A parsed request or response head: one buffer, the spans of its parts, and its header
//! names recognized once ([`Name`]).

use bytes::Bytes;
use bytestring::ByteString;

use super::framing::{self, Framing};
use super::{H1Error, MAX_HEADERS};

pub(super) type Span = (u32, u32);

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
    Http2Settings,
    /// `sec-websocket-*`
    SecWebSocket,
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

/// `name` equals the lower-case literal `lit` of the same length with any of its letters in
/// upper case, every other byte equal, eight bytes at a time. Unlike [`eq_lower`], exact for
/// any bytes (a control byte never passes for `-`).
fn eq_exact_lower(name: &[u8], lit: &[u8]) -> bool {
    // The case bit (0x20) of the bytes of `l` that are lower-case letters.
    fn case_bits(l: u64) -> u64 {
        const ONES: u64 = 0x0101_0101_0101_0101;
        let at_least_a = l.wrapping_add(ONES * (0x80 - u64::from(b'a')));
        let above_z = l.wrapping_add(ONES * (0x7f - u64::from(b'z')));
        (at_least_a & !above_z & (ONES * 0x80)) >> 2
    }
    let n = name.len();
    if n != lit.len() {
        return false;
    }
    if n < 8 {
        return name
            .iter()
            .zip(lit)
            .all(|(&a, &l)| a == l || (l.is_ascii_lowercase() && a == l - 0x20));
    }
    let word = |s: &[u8], i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let same = |i: usize| {
        let l = word(lit, i);
        (word(name, i) ^ l) & !case_bits(l) == 0
    };
    let mut i = 0;
    while i + 8 < n {
        if !same(i) {
            return false;
        }
        i += 8;
    }
    same(n - 8)
}

/// How many [`Name`]s there are.
const NAMES: usize = Name::RateLimit as usize + 1;
// One bit of `Head::repeated` each.
const _: () = assert!(NAMES <= 32);

impl Name {
    /// The name of a header as sent (any case).
    pub fn of(name: &[u8]) -> Name {
        if let Some(known) = Name::literal(name, eq_lower) {
            return known;
        }
        Name::unlisted(name)
    }

    /// A name that is none of the known literals: one of the families (`x-ratelimit-*`,
    /// `sec-websocket-*`) or [`Name::Other`].
    pub(super) fn unlisted(name: &[u8]) -> Name {
        match name.len() {
            n if n > 12 && name[..12].eq_ignore_ascii_case(b"x-ratelimit-") => Name::RateLimit,
            n if n > 14 && name[..14].eq_ignore_ascii_case(b"sec-websocket-") => Name::SecWebSocket,
            _ => Name::Other,
        }
    }

    /// A name written as one of the known literals, each letter in either case and every
    /// other byte itself: recognized, and a token with no other check (the literals are
    /// letters, digits and `-`). `None` for any other name, the `x-ratelimit-*` and
    /// `sec-websocket-*` ones included.
    pub(super) fn known(name: &[u8]) -> Option<Name> {
        Name::literal(name, eq_exact_lower)
    }

    /// The known literal `name` is, compared by `eq`.
    #[inline(always)]
    fn literal(name: &[u8], eq: fn(&[u8], &[u8]) -> bool) -> Option<Name> {
        let is = |s: &str| eq(name, s.as_bytes());
        Some(match name.len() {
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
            14 if is("http2-settings") => Name::Http2Settings,
            _ => return None,
        })
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
                | Name::Http2Settings
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
                    | Name::SecWebSocket
            )
    }

    /// Never passed from a backend's answer to the client: hop-by-hop, cookies, and what
    /// the gateway sets itself (length, `x-request-id`).
    pub fn never_downstream(self) -> bool {
        self.hop_by_hop()
            || matches!(
                self,
                Name::SetCookie | Name::ContentLength | Name::XRequestId | Name::SecWebSocket
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
            Name::Other | Name::RateLimit | Name::SecWebSocket => Err(self),
            known => Ok(known),
        }
    }
}

/// What the usual `Connection` field says ([`Head::usual_connection`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UsualConnection {
    Absent,
    KeepAlive,
    Close,
}

/// One header: where its name and value sit in the head's buffer, and which it is.
#[derive(Debug, Clone, Copy)]
pub(super) struct Field {
    pub(super) name: Span,
    pub(super) value: Span,
    pub(super) kind: Name,
}

/// UTF-8 text that shares the buffer of the head it was read from: the audit record keeps
/// the method, path and backend request id without copying them per request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Text(ByteString);

impl Text {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The same text in its own allocation, so that it no longer keeps the buffer of the
    /// head it was read from (that buffer's room is then free for the connection's reads).
    pub fn detached(&self) -> Text {
        Text(ByteString::from(self.as_str().to_owned()))
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
    pub(super) raw: Raw,
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
    /// Per [`Name`] (a bit each), whether a second field of it follows the first: the
    /// values of a name that is there once are its first field alone, with no walk over
    /// the fields after it.
    repeated: u32,
    /// [`Head::usual_connection`], found once.
    connection: Option<UsualConnection>,
}

/// A head's bytes. A request head that is all UTF-8 (checked once when it is made) is kept as
/// text: its method, path, query and header values are then borrowed as `str` without
/// checking each again. Response heads are not checked as a whole: their few text parts
/// are checked one by one.
#[derive(Debug, Clone)]
pub(super) enum Raw {
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

pub(super) fn span_of(buf: &[u8], part: &[u8]) -> Span {
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
            // The authority ends at the first `/`, `?` or `#` (RFC 3986 §3.2).
            start = match memchr::memchr3(b'/', b'?', b'#', rest) {
                Some(i) if rest[i] == b'/' => scheme.len() + i,
                // No path: `/` (the empty span marks it), then the query if there is one.
                Some(i) if rest[i] == b'?' => {
                    let q = at + (scheme.len() + i + 1) as u32;
                    return ((end, end), Some((q, end)));
                }
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

    pub(super) fn new(
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
        let mut repeated = 0u32;
        for (i, f) in fields.iter().enumerate() {
            let slot = &mut first[f.kind as usize];
            if *slot == 0 {
                // At most MAX_HEADERS (128) fields.
                *slot = (i + 1) as u8;
            } else {
                repeated |= 1 << f.kind as u32;
            }
        }
        // `Other` is never looked up by its slot.
        first[Name::Other as usize] = 0;
        let connection = Head::usual_connection_of(&buf, &fields, &first, repeated);
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
            repeated,
            connection,
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
        // The usual methods as static text: no handle on the head's buffer to take and drop.
        for m in ["POST", "GET", "DELETE"] {
            if self.slice(self.method) == m.as_bytes() {
                return Text(ByteString::from_static(m));
            }
        }
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

    /// The fields from the first of `kind` (a known name) to the last that may be one of it:
    /// none when it is absent, its first alone when it is not repeated.
    fn of_kind(&self, kind: Name) -> &[Field] {
        let len = self.fields.len();
        let (from, to) = match self.first[kind as usize] {
            0 => (len, len),
            i if self.repeated & (1 << kind as u32) == 0 => (i as usize - 1, i as usize),
            i => (i as usize - 1, len),
        };
        &self.fields[from..to]
    }

    /// The values of every header recognized as `kind` (a known name), from its first.
    fn values(&self, kind: Name) -> impl DoubleEndedIterator<Item = &[u8]> {
        self.of_kind(kind)
            .iter()
            .filter(move |f| f.kind == kind)
            .map(|f| self.slice(f.value))
    }

    /// The name and value of every header recognized as `kind`, from its first (nothing to
    /// walk when there is none).
    pub fn named(&self, kind: Name) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.of_kind(kind)
            .iter()
            .filter(move |f| f.kind == kind)
            .map(|f| (self.slice(f.name), self.slice(f.value)))
    }

    /// Whether a `Connection` header lists this option.
    fn connection_has(&self, option: &str) -> bool {
        let option = option.as_bytes();
        self.values(Name::Connection).any(|v| {
            // One option (`keep-alive`, `close`: the usual value) is compared as it is.
            if memchr::memchr(b',', v).is_none() {
                return v.trim_ascii().eq_ignore_ascii_case(option);
            }
            v.split(|&b| b == b',')
                .any(|o| o.trim_ascii().eq_ignore_ascii_case(option))
        })
    }

    /// What the head's `Connection` field says when it says what nearly every message
    /// says: nothing (no such field), or one field whose whole value is `keep-alive` or
    /// `close` (any case). `None`: anything else, read by the general rules. (Found once,
    /// when the head is made: [`Head::usual_connection_of`].)
    fn usual_connection(&self) -> Option<UsualConnection> {
        self.connection
    }

    fn usual_connection_of(
        buf: &[u8],
        fields: &[Field],
        first: &[u8; NAMES],
        repeated: u32,
    ) -> Option<UsualConnection> {
        let kind = Name::Connection;
        match first[kind as usize] {
            0 => Some(UsualConnection::Absent),
            _ if repeated & (1 << kind as u32) != 0 => None,
            i => {
                let s = fields.get(i as usize - 1)?.value;
                let v = buf.get(s.0 as usize..s.1 as usize)?;
                if eq_exact_lower(v, b"keep-alive") {
                    Some(UsualConnection::KeepAlive)
                } else if eq_exact_lower(v, b"close") {
                    Some(UsualConnection::Close)
                } else {
                    None
                }
            }
        }
    }

    /// Whether the connection may carry another message after this one.
    pub fn keep_alive(&self) -> bool {
        // The usual `Connection` field decides at once, as the rules below decide it
        // (`keep_alive_by_the_rules` is the oracle of the test beside them).
        match self.usual_connection() {
            Some(UsualConnection::Absent) => self.minor != 0,
            Some(UsualConnection::KeepAlive) => true,
            Some(UsualConnection::Close) => false,
            None => self.keep_alive_by_the_rules(),
        }
    }

    fn keep_alive_by_the_rules(&self) -> bool {
        // `close` wins over `keep-alive` in either version (RFC 9112 §9.3, §9.6). HTTP/1.0
        // keeps the connection only on a `Connection` field that is all visible ASCII: one
        // with other bytes is not read as granting anything (as hyper reads it: closing is
        // never the unsafe choice).
        if self.minor == 0 {
            self.connection_has("keep-alive")
                && !self.connection_has("close")
                && self
                    .values(Name::Connection)
                    .all(|v| v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)))
        } else {
            !self.connection_has("close")
        }
    }

    /// The framing fields of the usual head, read without the general rules: no
    /// `Transfer-Encoding`, and no `Content-Length` (`Some(None)`) or one whose value is
    /// 1–18 digits (`Some(Some(n))`). `None`: anything else, for the general rules.
    fn usual_length(&self) -> Option<Option<u64>> {
        let (te, cl) = (Name::TransferEncoding, Name::ContentLength);
        if self.first[te as usize] != 0 || self.repeated & (1 << cl as u32) != 0 {
            return None;
        }
        match self.first[cl as usize] {
            0 => Some(None),
            i => framing::decimal(self.slice(self.fields[i as usize - 1].value)).map(Some),
        }
    }

    /// How the body of this request is delimited ([`framing::request_framing`]).
    pub fn request_framing(&self) -> Result<Framing, H1Error> {
        if let Some(length) = self.usual_length() {
            return Ok(Framing::Length(length.unwrap_or(0)));
        }
        self.request_framing_by_the_rules()
    }

    fn request_framing_by_the_rules(&self) -> Result<Framing, H1Error> {
        framing::request_framing(
            self.minor,
            self.values(Name::TransferEncoding),
            self.values(Name::ContentLength),
        )
        .map_err(H1Error::Malformed)
    }

    /// How the body of this response is delimited (`head_request`: it answers a HEAD;
    /// [`framing::response_framing`]).
    pub fn response_framing(&self, head_request: bool) -> Result<Framing, H1Error> {
        if !framing::bodiless(self.status, head_request) {
            match self.usual_length() {
                Some(Some(n)) => return Ok(Framing::Length(n)),
                Some(None) => return Ok(Framing::Close),
                None => {}
            }
        }
        self.response_framing_by_the_rules(head_request)
    }

    fn response_framing_by_the_rules(&self, head_request: bool) -> Result<Framing, H1Error> {
        framing::response_framing(
            self.status,
            self.minor,
            head_request,
            self.values(Name::TransferEncoding),
            self.values(Name::ContentLength),
        )
        .map_err(H1Error::Malformed)
    }

    /// Whether the `Connection` field names a field that is not dropped anyway
    /// ([`framing::nominates_fields`]; the usual field names none).
    fn nominates(&self) -> bool {
        match self.usual_connection() {
            Some(_) => false,
            None => self.nominates_by_the_rules(),
        }
    }

    fn nominates_by_the_rules(&self) -> bool {
        self.first[Name::Connection as usize] != 0
            && framing::nominates_fields(self.values(Name::Connection))
    }

    /// The fields that may cross this hop: those `keep` accepts, less any that the message's
    /// `Connection` field nominates (RFC 9110 §7.6.1).
    pub fn end_to_end_fields<'a>(
        &'a self,
        keep: impl Fn(Name, &[u8]) -> bool + 'a,
    ) -> impl Iterator<Item = (Name, &'a [u8], &'a [u8])> + 'a {
        let check = self.nominates();
        self.fields().filter(move |&(kind, name, _)| {
            keep(kind, name) && !(check && framing::nominated(name, self.values(Name::Connection)))
        })
    }

    /// Writes the fields [`Head::end_to_end_fields`] gives as field lines into `out`, each
    /// `name: value\r\n`. A run of such fields that arrived one after the other in exactly
    /// that form (one space after the colon, no trailing whitespace, CRLF) is copied as it
    /// arrived, in one piece: the same bytes as written field by field
    /// (`end_to_end_lines_are_the_fields_written_one_by_one` checks).
    pub fn write_end_to_end_fields(&self, keep: impl Fn(Name, &[u8]) -> bool, out: &mut Vec<u8>) {
        let raw = self.raw.bytes().as_ref();
        let check = self.nominates();
        // The received bytes not written yet, from the first kept line of a run to its end.
        let mut run = 0..0;
        for f in &self.fields {
            let name = self.slice(f.name);
            if !keep(f.kind, name)
                || (check && framing::nominated(name, self.values(Name::Connection)))
            {
                continue;
            }
            let (n0, n1) = (f.name.0 as usize, f.name.1 as usize);
            let (v0, v1) = (f.value.0 as usize, f.value.1 as usize);
            if v0 == n1 + 2
                && raw.get(n1..v0) == Some(&b": "[..])
                && raw.get(v1..v1 + 2) == Some(&b"\r\n"[..])
            {
                if run.end != n0 {
                    if !run.is_empty() {
                        out.extend_from_slice(&raw[run]);
                    }
                    run = n0..n0;
                }
                run.end = v1 + 2;
                continue;
            }
            if !run.is_empty() {
                out.extend_from_slice(&raw[run]);
                run = 0..0;
            }
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(&raw[v0..v1]);
            out.extend_from_slice(b"\r\n");
        }
        if !run.is_empty() {
            out.extend_from_slice(&raw[run]);
        }
    }

    /// Every value of a header recognized as `kind`, in order, as text (values that are not
    /// UTF-8 are skipped).
    pub fn all_str(&self, kind: Name) -> impl DoubleEndedIterator<Item = &str> {
        self.values(kind)
            .filter_map(|v| std::str::from_utf8(v).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head of these fields, as any version and status (0: a request).
    fn head(minor: u8, status: u16, headers: &[(&str, &[u8])]) -> Head {
        let h = Head::request("GET", "/", headers.iter().copied());
        Head { minor, status, ..h }
    }

    fn framing_of(r: Result<Framing, H1Error>) -> Result<Framing, String> {
        r.map_err(|e| e.to_string())
    }

    /// The usual `Connection` and framing fields are decided at once: exactly as the
    /// general rules decide them, for every mix of the fields, versions and statuses.
    #[test]
    fn the_usual_fields_are_decided_as_the_rules_decide_them() {
        let connections: &[&[&[u8]]] = &[
            &[],
            &[b"keep-alive"],
            &[b"Keep-Alive"],
            &[b"KEEP-ALIVE"],
            &[b"close"],
            &[b"Close"],
            &[b"keep-alive, close"],
            &[b"close, keep-alive"],
            &[b" keep-alive"],
            &[b"keep-alive\t"],
            &[b"keep-alivex"],
            &[b"keep_alive"],
            &[b"keep\x0dalive"],
            &[b"closed"],
            &[b"keep-alive, X-Hop"],
            &[b"upgrade"],
            &[b""],
            &[b","],
            &[b"k\xffeep-alive"],
            &[b"keep-alive", b"close"],
            &[b"close", b"keep-alive"],
            &[b"keep-alive", b"keep-alive"],
            &[b"keep-alive", b"x-other"],
        ];
        let lengths: &[&[&[u8]]] = &[
            &[],
            &[b"0"],
            &[b"5"],
            &[b"007"],
            &[b"999999999999999999"],
            &[b"1000000000000000000"],
            &[b"5, 5"],
            &[b"5,6"],
            &[b" 5"],
            &[b"5\t"],
            &[b""],
            &[b"-1"],
            &[b"+5"],
            &[b"0x5"],
            &[b"5", b"5"],
            &[b"5", b"6"],
        ];
        let codings: &[&[&[u8]]] = &[
            &[],
            &[b"chunked"],
            &[b"Chunked"],
            &[b"gzip, chunked"],
            &[b""],
            &[b"chunked", b"chunked"],
        ];
        let (mut usual_connection, mut usual_length) = (0, 0);
        for conn in connections {
            for cl in lengths {
                for te in codings {
                    let mut fields: Vec<(&str, &[u8])> = vec![("x-first", b"1")];
                    fields.extend(conn.iter().map(|v| ("Connection", *v)));
                    fields.extend(cl.iter().map(|v| ("Content-Length", *v)));
                    fields.extend(te.iter().map(|v| ("transfer-encoding", *v)));
                    fields.push(("x-last", b"2"));
                    for minor in [0, 1] {
                        for status in [0, 100, 101, 200, 204, 304, 404] {
                            let h = head(minor, status, &fields);
                            let what = format!("{minor} {status} {fields:?}");
                            usual_connection += usize::from(h.usual_connection().is_some());
                            usual_length += usize::from(h.usual_length().is_some());
                            assert_eq!(h.keep_alive(), h.keep_alive_by_the_rules(), "{what}");
                            assert_eq!(h.nominates(), h.nominates_by_the_rules(), "{what}");
                            if status == 0 {
                                assert_eq!(
                                    framing_of(h.request_framing()),
                                    framing_of(h.request_framing_by_the_rules()),
                                    "{what}"
                                );
                                continue;
                            }
                            for head_request in [false, true] {
                                assert_eq!(
                                    framing_of(h.response_framing(head_request)),
                                    framing_of(h.response_framing_by_the_rules(head_request)),
                                    "{what} {head_request}"
                                );
                            }
                        }
                    }
                }
            }
        }
        // Both ways are taken many times (the test compares something).
        assert!(usual_connection > 1000 && usual_length > 1000);
        assert!(usual_connection < 30_000 && usual_length < 30_000);
    }
}
