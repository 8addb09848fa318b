//! Where a message ends and what belongs to one hop: RFC 9112 §6–7 and RFC 9110 §7.6.1 as
//! pure functions over a head's field values and a buffer's bytes. The codec
//! ([`super::Conn`], [`super::BodyReader`]) and the request path call these; nothing else
//! decides framing. Anything the grammar does not allow is refused, never guessed at: a proxy
//! that adds its own credential must not disagree with anyone about where a message ends.

use super::head::Name;

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    /// Until the peer closes (responses only).
    Close,
}

/// Why a message's framing cannot be trusted (a request gets 400 and the connection is
/// closed; a backend's answer is a failed attempt and its connection is dropped).
pub type Refusal = &'static str;

/// The longest chunk-size line, extensions included.
pub const MAX_CHUNK_LINE: usize = 4096;
/// All chunk extensions of one message together.
pub const MAX_CHUNK_EXTENSIONS: usize = 16 * 1024;
/// A trailer section's bytes and field lines.
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;
pub const MAX_TRAILER_LINES: usize = 64;
/// Interim (1xx) answers a backend may send before its final one.
pub const MAX_INTERIM: usize = 8;

/// RFC 9112 §6.3 for a request: `Transfer-Encoding` (exactly `chunked`, HTTP/1.1 only, never
/// beside a `Content-Length`), else one `Content-Length` (a list of equal values is one),
/// else no body.
pub fn request_framing<'a>(
    minor: u8,
    te: impl Iterator<Item = &'a [u8]>,
    cl: impl Iterator<Item = &'a [u8]>,
) -> Result<Framing, Refusal> {
    body_framing(minor, te, cl, Framing::Length(0))
}

/// RFC 9112 §6.3 for a response (`head_request`: it answers a HEAD). No body for HEAD, 1xx,
/// 204 and 304; both framing fields, or one that is not exactly right, are refused (a
/// response that could be split two ways is no answer); without either, the body ends at
/// the close.
pub fn response_framing<'a>(
    status: u16,
    minor: u8,
    head_request: bool,
    te: impl Iterator<Item = &'a [u8]>,
    cl: impl Iterator<Item = &'a [u8]>,
) -> Result<Framing, Refusal> {
    if bodiless(status, head_request) {
        return Ok(Framing::Length(0));
    }
    body_framing(minor, te, cl, Framing::Close)
}

/// A response that has no body whatever its fields say: to a HEAD, 1xx, 204 and 304.
pub fn bodiless(status: u16, head_request: bool) -> bool {
    head_request || status < 200 || status == 204 || status == 304
}

/// The rules both directions share: `chunked` alone, else one length, never both;
/// `neither` when the message has no framing field.
fn body_framing<'a>(
    minor: u8,
    te: impl Iterator<Item = &'a [u8]>,
    cl: impl Iterator<Item = &'a [u8]>,
    neither: Framing,
) -> Result<Framing, Refusal> {
    let chunked = transfer_coding(minor, te)?;
    match (chunked, content_length(cl)?) {
        (true, Some(_)) => Err("both Transfer-Encoding and Content-Length"),
        (true, None) => Ok(Framing::Chunked),
        (false, Some(n)) => Ok(Framing::Length(n)),
        (false, None) => Ok(neither),
    }
}

/// Optional whitespace (SP, HTAB) trimmed from both ends.
fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Whether the message is chunked: every `Transfer-Encoding` element together must be exactly
/// `chunked`, once. An empty element, another coding (which the gateway does not decode), or
/// any `Transfer-Encoding` in an HTTP/1.0 message (§6.1: faulty framing) is refused.
fn transfer_coding<'a>(minor: u8, te: impl Iterator<Item = &'a [u8]>) -> Result<bool, Refusal> {
    let mut present = false;
    let mut chunked = false;
    for value in te {
        present = true;
        for coding in value.split(|&b| b == b',') {
            let coding = trim_ows(coding);
            if coding.is_empty() {
                return Err("empty Transfer-Encoding element");
            }
            if chunked {
                return Err("chunked is not the last transfer coding");
            }
            if !coding.eq_ignore_ascii_case(b"chunked") {
                return Err("unsupported Transfer-Encoding");
            }
            chunked = true;
        }
    }
    if present && minor == 0 {
        return Err("Transfer-Encoding in an HTTP/1.0 message");
    }
    if present && !chunked {
        return Err("empty Transfer-Encoding");
    }
    Ok(chunked)
}

/// The one length of every `Content-Length` element (1 to 18 digits each, all equal).
fn content_length<'a>(cl: impl Iterator<Item = &'a [u8]>) -> Result<Option<u64>, Refusal> {
    let mut len: Option<u64> = None;
    for value in cl {
        // One element (the usual value) is read as it is.
        if memchr::memchr(b',', value).is_none() {
            let n = decimal(trim_ows(value)).ok_or("bad Content-Length")?;
            if len.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length");
            }
            len = Some(n);
            continue;
        }
        for part in value.split(|&b| b == b',') {
            let n = decimal(trim_ows(part)).ok_or("bad Content-Length")?;
            if len.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length");
            }
            len = Some(n);
        }
    }
    Ok(len)
}

/// One to 18 decimal digits (no sign, no spaces) as a number.
pub(super) fn decimal(digits: &[u8]) -> Option<u64> {
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

/// A token character (RFC 9110 §5.6.2).
pub fn is_tchar(b: u8) -> bool {
    matches!(b,
        b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_'
        | b'`' | b'|' | b'~' | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z')
}

/// A complete chunk-size line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLine {
    /// Bytes of the line, CRLF included.
    pub used: usize,
    pub size: u64,
    /// Bytes of its extensions (from the first `;` to the CR).
    pub extensions: usize,
}

/// Where a byte-wise grammar stopped.
enum Scan {
    /// At this offset, having read every byte before it.
    At(usize),
    /// The buffer ended first: more bytes are needed.
    More,
}

/// Skips SP and HTAB from `i`.
fn skip_ws(buf: &[u8], mut i: usize) -> usize {
    while i < buf.len() && matches!(buf[i], b' ' | b'\t') {
        i += 1;
    }
    i
}

/// One or more token characters from `i`.
fn token(buf: &[u8], i: usize) -> Result<Scan, Refusal> {
    let mut j = i;
    while j < buf.len() && is_tchar(buf[j]) {
        j += 1;
    }
    if j == buf.len() {
        return Ok(Scan::More);
    }
    if j == i {
        return Err("bad chunk extension");
    }
    Ok(Scan::At(j))
}

/// A quoted-string from `i` (at its opening quote).
fn quoted(buf: &[u8], i: usize) -> Result<Scan, Refusal> {
    let mut j = i + 1;
    while j < buf.len() {
        match buf[j] {
            b'"' => return Ok(Scan::At(j + 1)),
            b'\\' => match buf.get(j + 1) {
                None => return Ok(Scan::More),
                Some(b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff) => j += 2,
                Some(_) => return Err("bad quoted-pair in a chunk extension"),
            },
            b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff => j += 1,
            _ => return Err("bad character in a chunk extension"),
        }
    }
    Ok(Scan::More)
}

/// RFC 9112 §7.1: `chunk-size *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] ) CRLF`, the
/// size as 1 to 16 hex digits. `Ok(None)`: a valid beginning, more bytes needed. A bare LF,
/// a bare CR, whitespace that leads to no extension, or an empty line is refused.
pub fn chunk_line(buf: &[u8]) -> Result<Option<ChunkLine>, Refusal> {
    let digits = buf.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits > 16 {
        return Err("chunk size too long");
    }
    if digits == buf.len() {
        return Ok(None);
    }
    if digits == 0 {
        return Err("bad chunk size");
    }
    let size = buf[..digits].iter().fold(0u64, |n, &d| {
        // Hex digits only (checked above).
        n << 4 | u64::from((d as char).to_digit(16).unwrap_or(0))
    });
    let mut i = digits;
    let mut ext_start = None;
    loop {
        let after_ws = skip_ws(buf, i);
        let Some(&c) = buf.get(after_ws) else {
            return Ok(None);
        };
        match c {
            b'\r' if after_ws == i => {
                return match buf.get(i + 1) {
                    None => Ok(None),
                    Some(b'\n') => Ok(Some(ChunkLine {
                        used: i + 2,
                        size,
                        extensions: ext_start.map_or(0, |s| i - s),
                    })),
                    Some(_) => Err("bare CR in a chunk line"),
                };
            }
            b';' => {
                ext_start.get_or_insert(after_ws);
                let name = skip_ws(buf, after_ws + 1);
                i = match token(buf, name)? {
                    Scan::More => return Ok(None),
                    Scan::At(j) => j,
                };
                let eq = skip_ws(buf, i);
                match buf.get(eq) {
                    None => return Ok(None),
                    Some(b'=') => {
                        let v = skip_ws(buf, eq + 1);
                        let value = match buf.get(v) {
                            None => return Ok(None),
                            Some(b'"') => quoted(buf, v)?,
                            Some(_) => token(buf, v)?,
                        };
                        i = match value {
                            Scan::More => return Ok(None),
                            Scan::At(j) => j,
                        };
                    }
                    Some(_) => {}
                }
            }
            b'\n' => return Err("bare LF in a chunk line"),
            _ => return Err("bad chunk line"),
        }
    }
}

/// One line of a trailer section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrailerLine {
    /// A field line of this many bytes (CRLF included), read and dropped.
    Field(usize),
    /// The blank line that ends the section (2 bytes).
    End,
}

/// RFC 9112 §7.1.2 / §5: `field-name ":" OWS field-value OWS CRLF`, or the final CRLF.
/// `Ok(None)`: a valid beginning, more bytes needed. A line without a colon, a name with a
/// character outside the token set (spaces before the colon included), obs-fold, a bare CR
/// or LF, or a control character in the value is refused.
pub fn trailer_line(buf: &[u8]) -> Result<Option<TrailerLine>, Refusal> {
    match buf {
        [] | [b'\r'] => return Ok(None),
        [b'\r', b'\n', ..] => return Ok(Some(TrailerLine::End)),
        [b'\r', ..] => return Err("bare CR in a trailer"),
        [b'\n', ..] => return Err("bare LF in a trailer"),
        _ => {}
    }
    let name = buf.iter().take_while(|&&b| is_tchar(b)).count();
    match buf.get(name) {
        None => return Ok(None),
        Some(b':') if name > 0 => {}
        Some(_) => return Err("bad trailer field"),
    }
    let mut i = name + 1;
    while i < buf.len() {
        match buf[i] {
            b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff => i += 1,
            b'\r' => {
                return match buf.get(i + 1) {
                    None => Ok(None),
                    Some(b'\n') => Ok(Some(TrailerLine::Field(i + 2))),
                    Some(_) => Err("bare CR in a trailer"),
                }
            }
            b'\n' => return Err("bare LF in a trailer"),
            _ => return Err("control character in a trailer"),
        }
    }
    Ok(None)
}

/// Whether a field may cross to a backend: not hop-by-hop (RFC 9110 §7.6.1), not a client
/// credential or a field the gateway sets itself ([`Name::never_upstream`]), and not a name
/// with an underscore (`Transfer_Encoding`, `Api_Key`: servers that map names to variables
/// would read them as the real ones; dropped as nginx does by default).
pub fn forward_upstream(kind: Name, name: &[u8]) -> bool {
    let underscored = kind == Name::Other && memchr::memchr(b'_', name).is_some();
    !(kind.never_upstream() || underscored)
}

/// Whether a backend's response field may cross to the client.
pub fn forward_downstream(kind: Name) -> bool {
    !kind.never_downstream()
}

/// Whether a message's `Connection` field lines name any field that is not dropped anyway:
/// an option other than `close` or the name of a hop-by-hop field (`keep-alive`, `upgrade`…).
/// Almost every message says only `keep-alive` or `close`, and then no field needs checking.
pub fn nominates_fields<'a>(connection: impl Iterator<Item = &'a [u8]>) -> bool {
    connection
        .filter(|v| !(v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close")))
        .flat_map(|v| v.split(|&b| b == b','))
        .map(trim_ows)
        .any(|o| !o.is_empty() && !o.eq_ignore_ascii_case(b"close") && !Name::of(o).hop_by_hop())
}

/// Whether `name` is one of the connection options listed in a message's `Connection`
/// field lines (RFC 9110 §7.6.1: a proxy removes the fields they name).
pub fn nominated<'a>(name: &[u8], mut connection: impl Iterator<Item = &'a [u8]>) -> bool {
    connection.any(|v| {
        v.split(|&b| b == b',')
            .any(|o| trim_ows(o).eq_ignore_ascii_case(name))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(minor: u8, te: &[&str], cl: &[&str]) -> Result<Framing, Refusal> {
        request_framing(
            minor,
            te.iter().map(|s| s.as_bytes()),
            cl.iter().map(|s| s.as_bytes()),
        )
    }

    #[test]
    fn request_framing_table() {
        use Framing::*;
        let ok: &[(u8, &[&str], &[&str], Framing)] = &[
            (1, &[], &[], Length(0)),
            (0, &[], &[], Length(0)),
            (1, &[], &["5"], Length(5)),
            (1, &[], &["5", "5"], Length(5)),
            (1, &[], &["5, 5"], Length(5)),
            (1, &[], &["007"], Length(7)),
            (1, &[], &["\t5 "], Length(5)),
            (1, &["chunked"], &[], Chunked),
            (1, &["Chunked"], &[], Chunked),
            (1, &[" chunked\t"], &[], Chunked),
            (0, &[], &["3"], Length(3)),
        ];
        for (minor, te, cl, want) in ok {
            assert_eq!(req(*minor, te, cl), Ok(*want), "{minor} {te:?} {cl:?}");
        }
        let refused: &[(u8, &[&str], &[&str])] = &[
            // Issue cases: an empty TE or a lone comma beside a length is still a TE.
            (1, &[""], &["3"]),
            (1, &[","], &["3"]),
            (1, &[""], &[]),
            (1, &[","], &[]),
            (1, &["chunked,"], &[]),
            (1, &[",chunked"], &[]),
            (1, &["chunked"], &["3"]),
            (1, &["chunked", "chunked"], &[]),
            (1, &["chunked, chunked"], &[]),
            (1, &["gzip, chunked"], &[]),
            (1, &["chunked, gzip"], &[]),
            (1, &["identity"], &[]),
            (1, &["chunkedx"], &[]),
            (1, &["\"chunked\""], &[]),
            // HTTP/1.0 with a TE: faulty framing.
            (0, &["chunked"], &[]),
            (0, &["chunked"], &["3"]),
            (1, &[], &["3", "4"]),
            (1, &[], &["3, 4"]),
            (1, &[], &["3,"]),
            (1, &[], &[""]),
            (1, &[], &["-3"]),
            (1, &[], &["+3"]),
            (1, &[], &["0x3"]),
            (1, &[], &["3 3"]),
            (1, &[], &["1234567890123456789"]),
        ];
        for (minor, te, cl) in refused {
            assert!(req(*minor, te, cl).is_err(), "{minor} {te:?} {cl:?}");
        }
    }

    #[test]
    fn response_framing_table() {
        use Framing::*;
        let resp = |status, minor, head, te: &[&str], cl: &[&str]| {
            response_framing(
                status,
                minor,
                head,
                te.iter().map(|s| s.as_bytes()),
                cl.iter().map(|s| s.as_bytes()),
            )
        };
        assert_eq!(resp(200, 1, false, &[], &[]), Ok(Close));
        assert_eq!(resp(200, 1, false, &[], &["12"]), Ok(Length(12)));
        assert_eq!(resp(200, 1, false, &["chunked"], &[]), Ok(Chunked));
        assert_eq!(resp(200, 1, true, &["chunked"], &[]), Ok(Length(0)));
        assert_eq!(resp(204, 1, false, &[], &["5"]), Ok(Length(0)));
        assert_eq!(resp(304, 1, false, &[], &["5"]), Ok(Length(0)));
        assert_eq!(resp(100, 1, false, &[], &[]), Ok(Length(0)));
        assert_eq!(resp(200, 0, false, &[], &["5"]), Ok(Length(5)));
        assert!(resp(200, 1, false, &["chunked"], &["5"]).is_err());
        assert!(resp(200, 1, false, &[""], &["5"]).is_err());
        assert!(resp(200, 1, false, &["gzip"], &[]).is_err());
        assert!(resp(200, 0, false, &["chunked"], &[]).is_err());
        assert!(resp(200, 1, false, &[], &["5", "6"]).is_err());
    }

    #[test]
    fn chunk_lines_table() {
        fn line(used: usize, size: u64, extensions: usize) -> Result<Option<ChunkLine>, ()> {
            Ok(Some(ChunkLine {
                used,
                size,
                extensions,
            }))
        }
        type Want = Result<Option<ChunkLine>, ()>;
        let cases: &[(&[u8], Want)] = &[
            (b"5\r\nhello", line(3, 5, 0)),
            (b"A\r\n", line(3, 10, 0)),
            (b"ffffffffffffffff\r\n", line(18, u64::MAX, 0)),
            (b"0000000000000001\r\n", line(18, 1, 0)),
            (b"4;ext=1\r\n", line(9, 4, 6)),
            (b"4 ; a ; b = \"x\\\"y\"\r\n", line(20, 4, 16)),
            (b"4;a;b\r\n", line(7, 4, 4)),
            // Partial: a valid beginning.
            (b"", Ok(None)),
            (b"5", Ok(None)),
            (b"5\r", Ok(None)),
            (b"5;", Ok(None)),
            (b"5;a", Ok(None)),
            (b"5;a=", Ok(None)),
            (b"5;a=\"x", Ok(None)),
            (b"5;a=\"x\\", Ok(None)),
            (b"5 ", Ok(None)),
            // Refused.
            (b"\r\n", Err(())),
            (b"\n", Err(())),
            (b"5\n", Err(())),
            (b"2;\nxx\r\n", Err(())),
            (b"2;a\nxx\r\n", Err(())),
            (b"2;a=\"\n\"\r\n", Err(())),
            (b"5\rx", Err(())),
            (b"5 \r\n", Err(())),
            (b"5;a \r\n", Err(())),
            (b"5;\r\n", Err(())),
            (b"5;=x\r\n", Err(())),
            (b"5;a=\r\n", Err(())),
            (b"5;a=b c\r\n", Err(())),
            (b"-5\r\n", Err(())),
            (b"0x5\r\n", Err(())),
            (b"+5\r\n", Err(())),
            (b"5\0\r\n", Err(())),
            (b"10000000000000000\r\n", Err(())),
            (b"00000000000000000\r\n", Err(())),
        ];
        for (input, want) in cases {
            let got = chunk_line(input).map_err(|_| ());
            assert_eq!(&got, want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn trailer_lines_table() {
        use TrailerLine::*;
        type Want = Result<Option<TrailerLine>, ()>;
        let cases: &[(&[u8], Want)] = &[
            (b"\r\n", Ok(Some(End))),
            (b"\r\nGET / HTTP/1.1", Ok(Some(End))),
            (b"x-t: 1\r\n", Ok(Some(Field(8)))),
            (b"x-t:\r\n", Ok(Some(Field(6)))),
            (b"x-t: a\tb \xff\r\n", Ok(Some(Field(12)))),
            (b"", Ok(None)),
            (b"\r", Ok(None)),
            (b"x-t", Ok(None)),
            (b"x-t: 1", Ok(None)),
            (b"x-t: 1\r", Ok(None)),
            (b"\n", Err(())),
            (b"\rx", Err(())),
            (b"no colon\r\n", Err(())),
            (b"nocolon\r\n", Err(())),
            (b"x-t : 1\r\n", Err(())),
            (b": 1\r\n", Err(())),
            (b" folded\r\n", Err(())),
            (b"x-t: 1\nGET", Err(())),
            (b"x-t: 1\rx", Err(())),
            (b"x-t: \0\r\n", Err(())),
            (b"x-t: \x7f\r\n", Err(())),
        ];
        for (input, want) in cases {
            let got = trailer_line(input).map_err(|_| ());
            assert_eq!(&got, want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn forwarding_decisions() {
        assert!(forward_upstream(Name::Other, b"x-custom"));
        assert!(forward_upstream(Name::ContentType, b"content-type"));
        for (kind, name) in [
            (Name::Other, &b"Transfer_Encoding"[..]),
            (Name::Other, b"api_key"),
            (Name::Other, b"x_forwarded_for"),
            (Name::Http2Settings, b"http2-settings"),
            (Name::SecWebSocket, b"sec-websocket-key"),
            (Name::TransferEncoding, b"transfer-encoding"),
            (Name::ApiKey, b"api-key"),
            (Name::Connection, b"connection"),
        ] {
            assert!(
                !forward_upstream(kind, name),
                "{}",
                String::from_utf8_lossy(name)
            );
        }
        assert!(!forward_downstream(Name::SetCookie));
        assert!(!forward_downstream(Name::Http2Settings));
        assert!(forward_downstream(Name::Other));
        let conn: [&[u8]; 2] = [b"keep-alive, X-Hop", b"\tother "];
        assert!(nominated(b"x-hop", conn.iter().copied()));
        assert!(nominated(b"OTHER", conn.iter().copied()));
        assert!(!nominated(b"x-hop2", conn.iter().copied()));
        assert!(!nominated(b"x-hop", std::iter::empty()));
        for (values, want) in [
            (&[&b"keep-alive"[..]][..], false),
            (&[b"Keep-Alive, close", b" upgrade , TE"], false),
            (&[b"", b","], false),
            (&[b"keep-alive, X-Hop"], true),
            (&[b"close", b"x-secret"], true),
        ] {
            assert_eq!(nominates_fields(values.iter().copied()), want, "{values:?}");
        }
    }
}
