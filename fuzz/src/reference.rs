//! Independent, deliberately plain readings of the same grammars, written from the RFCs and
//! not from the gateway's code: the fuzz targets compare the gateway with these.

use gateway::http1::framing::{
    MAX_CHUNK_EXTENSIONS, MAX_CHUNK_LINE, MAX_TRAILER_BYTES, MAX_TRAILER_LINES,
};
use gateway::http1::{Framing, Head};

/// What a chunked body (RFC 9112 §7.1) at the start of a buffer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunked {
    /// The whole body: its data, how many bytes it took (last chunk, trailers and the final
    /// CRLF included), and the sizes the gateway puts limits on.
    Complete {
        body: Vec<u8>,
        used: usize,
        stats: Stats,
    },
    /// Valid so far; the buffer ends before the body does.
    Incomplete,
    /// Not the grammar, at this offset.
    Invalid(usize),
}

/// The sizes of a valid chunked body that the gateway bounds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// The most hex digits of one chunk size.
    pub max_digits: usize,
    /// The longest chunk-size line, CRLF included.
    pub max_line: usize,
    /// Extension bytes of the whole body (each line's, from its first `;` to its CR).
    pub extensions: usize,
    /// Trailer field lines and their bytes (CRLF included).
    pub trailer_lines: usize,
    pub trailer_bytes: usize,
}

impl Stats {
    /// Within every documented limit of the gateway, with room to spare where a limit is
    /// checked on a partial line (a trailer section that fills its budget exactly is refused
    /// when its final CRLF arrives in two pieces).
    pub fn within_gateway_limits(&self) -> bool {
        self.max_digits <= 16
            && self.max_line <= MAX_CHUNK_LINE
            && self.extensions <= MAX_CHUNK_EXTENSIONS
            && self.trailer_lines <= MAX_TRAILER_LINES
            && self.trailer_bytes + 2 <= MAX_TRAILER_BYTES
    }
}

/// `tchar` (RFC 9110 §5.6.2), spelled out.
pub fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn ws(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// A step of the grammar: the offset after it, or why it cannot go on.
type Step = Result<usize, Chunked>;

fn need(buf: &[u8], i: usize) -> Result<u8, Chunked> {
    buf.get(i).copied().ok_or(Chunked::Incomplete)
}

fn skip_bws(buf: &[u8], mut i: usize) -> usize {
    while i < buf.len() && ws(buf[i]) {
        i += 1;
    }
    i
}

/// `token = 1*tchar`; it must be followed by something (else more may come).
fn token(buf: &[u8], i: usize) -> Step {
    let mut j = i;
    while j < buf.len() && tchar(buf[j]) {
        j += 1;
    }
    if j == buf.len() {
        return Err(Chunked::Incomplete);
    }
    if j == i {
        return Err(Chunked::Invalid(i));
    }
    Ok(j)
}

/// `quoted-string = DQUOTE *( qdtext / quoted-pair ) DQUOTE` from its opening quote.
fn quoted_string(buf: &[u8], i: usize) -> Step {
    let qdtext = |b: u8| {
        b == b'\t'
            || b == b' '
            || b == 0x21
            || (0x23..=0x5b).contains(&b)
            || (0x5d..=0x7e).contains(&b)
            || b >= 0x80
    };
    let mut j = i + 1;
    loop {
        let b = need(buf, j)?;
        if b == b'"' {
            return Ok(j + 1);
        } else if b == b'\\' {
            let c = need(buf, j + 1)?;
            // quoted-pair = "\" ( HTAB / SP / VCHAR / obs-text )
            if !(c == b'\t' || c == b' ' || (0x21..=0x7e).contains(&c) || c >= 0x80) {
                return Err(Chunked::Invalid(j + 1));
            }
            j += 2;
        } else if qdtext(b) {
            j += 1;
        } else {
            return Err(Chunked::Invalid(j));
        }
    }
}

/// `CRLF`.
fn crlf(buf: &[u8], i: usize) -> Step {
    if need(buf, i)? != b'\r' {
        return Err(Chunked::Invalid(i));
    }
    if need(buf, i + 1)? != b'\n' {
        return Err(Chunked::Invalid(i + 1));
    }
    Ok(i + 2)
}

/// ```text
/// chunked-body   = *chunk last-chunk trailer-section CRLF
/// chunk          = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
/// chunk-size     = 1*HEXDIG
/// last-chunk     = 1*("0") [ chunk-ext ] CRLF
/// chunk-ext      = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
/// chunk-ext-name = token
/// chunk-ext-val  = token / quoted-string
/// trailer-section = *( field-line CRLF )
/// field-line     = field-name ":" OWS field-value OWS
/// ```
/// No limits: the gateway's are reported in [`Stats`].
pub fn chunked(buf: &[u8]) -> Chunked {
    match chunked_inner(buf) {
        Ok(c) | Err(c) => c,
    }
}

fn chunked_inner(buf: &[u8]) -> Result<Chunked, Chunked> {
    let mut body = Vec::new();
    let mut stats = Stats::default();
    let mut i = 0usize;
    loop {
        let line_start = i;
        let digits = buf[i..]
            .iter()
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        if digits == 0 {
            need(buf, i)?;
            return Err(Chunked::Invalid(i));
        }
        stats.max_digits = stats.max_digits.max(digits);
        // A size beyond u64 cannot be followed by its data in any buffer: saturate.
        let size = buf[i..i + digits].iter().fold(0u128, |n, &d| {
            (n * 16 + u128::from((d as char).to_digit(16).unwrap())).min(u128::from(u64::MAX) + 1)
        });
        i += digits;
        let mut ext_start = None;
        loop {
            let j = skip_bws(buf, i);
            let c = need(buf, j)?;
            if c == b';' {
                ext_start.get_or_insert(j);
                let name = skip_bws(buf, j + 1);
                i = token(buf, name)?;
                let eq = skip_bws(buf, i);
                if need(buf, eq)? == b'=' {
                    let v = skip_bws(buf, eq + 1);
                    i = if need(buf, v)? == b'"' {
                        quoted_string(buf, v)?
                    } else {
                        token(buf, v)?
                    };
                }
            } else if c == b'\r' && j == i {
                break;
            } else {
                return Err(Chunked::Invalid(j));
            }
        }
        stats.extensions += ext_start.map_or(0, |s| i - s);
        i = crlf(buf, i)?;
        stats.max_line = stats.max_line.max(i - line_start);
        if size == 0 {
            break;
        }
        let left = (buf.len() - i) as u128;
        if left < size {
            return Err(Chunked::Incomplete);
        }
        let size = size as usize;
        body.extend_from_slice(&buf[i..i + size]);
        i = crlf(buf, i + size)?;
    }
    // trailer-section CRLF
    loop {
        if need(buf, i)? == b'\r' {
            i = crlf(buf, i)?;
            return Ok(Chunked::Complete {
                body,
                used: i,
                stats,
            });
        }
        let start = i;
        let name = buf[i..].iter().take_while(|&&b| tchar(b)).count();
        if need(buf, i + name)? != b':' || name == 0 {
            return Err(Chunked::Invalid(i + name));
        }
        i += name + 1;
        // OWS field-value OWS: any run of SP, HTAB, VCHAR and obs-text.
        while let Some(&b) = buf.get(i) {
            if b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80 {
                i += 1;
            } else {
                break;
            }
        }
        i = crlf(buf, i)?;
        stats.trailer_lines += 1;
        stats.trailer_bytes += i - start;
    }
}

/// The path and query of a request target (RFC 9112 §3.2, RFC 3986 §3): origin form
/// `/p?q`; absolute form `http(s)://authority/p?q`, the authority ending at the first `/`,
/// `?` or `#`, an empty path being `/`; any other form (`*`, authority form) is all path.
/// A target that starts with `?` (no path at all: not a request target RFC 9112 allows, but
/// httparse takes it) has the path `/` as in the gateway.
pub fn target_path_query(target: &str) -> (String, Option<&str>) {
    let lower = target.to_ascii_lowercase();
    let mut rest = target;
    for scheme in ["http://", "https://"] {
        if lower.starts_with(scheme) {
            let after = &target[scheme.len()..];
            let end = after.find(['/', '?', '#']).unwrap_or(after.len());
            rest = &after[end..];
            if !rest.starts_with('/') {
                // No path: `/`, then the query if there is one.
                let query = rest.strip_prefix('?');
                return ("/".to_string(), query);
            }
            break;
        }
    }
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let path = if path.is_empty() { "/" } else { path };
    (path.to_string(), query)
}

/// The values of every field named `name` (any case), in order.
fn values<'h>(head: &'h Head, name: &'static str) -> impl Iterator<Item = &'h [u8]> {
    head.fields()
        .filter(move |(_, n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, _, v)| v)
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Every list element of every value (RFC 9110 §5.6.1), trimmed, empty ones included.
fn elements<'h>(vals: impl Iterator<Item = &'h [u8]>) -> Vec<&'h [u8]> {
    vals.flat_map(|v| v.split(|&b| b == b','))
        .map(trim)
        .collect()
}

fn decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// RFC 9112 §6.3 (a request): a framing the gateway accepted must be the one the RFC gives.
/// `Chunked`: HTTP/1.1, a `Transfer-Encoding` whose final coding is `chunked` (applied once)
/// and no `Content-Length`. `Length(n)`: no `Transfer-Encoding`, and every `Content-Length`
/// element is `n` (or there is none and `n` is 0).
pub fn assert_request_framing_sound(head: &Head, framing: Framing) {
    let te = elements(values(head, "transfer-encoding"));
    let cl = elements(values(head, "content-length"));
    let has_te = values(head, "transfer-encoding").next().is_some();
    match framing {
        Framing::Chunked => {
            assert_eq!(head.minor, 1, "chunked in HTTP/1.0");
            let codings: Vec<_> = te.iter().filter(|c| !c.is_empty()).collect();
            assert!(
                codings
                    .last()
                    .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")),
                "chunked without chunked as the final coding: {te:?}"
            );
            assert_eq!(
                codings
                    .iter()
                    .filter(|c| c.eq_ignore_ascii_case(b"chunked"))
                    .count(),
                1,
                "chunked applied twice"
            );
            assert!(cl.is_empty(), "chunked beside a Content-Length");
        }
        Framing::Length(n) => {
            assert!(!has_te, "a length beside a Transfer-Encoding: {te:?}");
            if cl.is_empty() {
                assert_eq!(n, 0, "a length without a Content-Length");
            }
            for e in &cl {
                assert_eq!(
                    decimal(e),
                    Some(n),
                    "Content-Length element {e:?} is not {n}"
                );
            }
        }
        Framing::Close => panic!("a request delimited by the close"),
    }
}

/// RFC 9112 §6.3 (a response to a request that was not HEAD).
pub fn assert_response_framing_sound(head: &Head, framing: Framing) {
    let status = head.status;
    if status < 200 || status == 204 || status == 304 {
        assert_eq!(framing, Framing::Length(0), "status {status} has no body");
        return;
    }
    let te = elements(values(head, "transfer-encoding"));
    let cl = elements(values(head, "content-length"));
    let has_te = values(head, "transfer-encoding").next().is_some();
    match framing {
        Framing::Chunked => {
            assert_eq!(head.minor, 1, "chunked in HTTP/1.0");
            assert!(
                te.last()
                    .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")),
                "chunked without chunked as the final coding: {te:?}"
            );
            assert!(cl.is_empty(), "chunked beside a Content-Length");
        }
        Framing::Length(n) => {
            assert!(!has_te, "a length beside a Transfer-Encoding");
            assert!(!cl.is_empty(), "a length without a Content-Length");
            for e in &cl {
                assert_eq!(
                    decimal(e),
                    Some(n),
                    "Content-Length element {e:?} is not {n}"
                );
            }
        }
        Framing::Close => {
            // Close-delimited: no Content-Length, and no chunked final coding.
            assert!(cl.is_empty(), "read to the close despite a Content-Length");
            assert!(
                !te.last()
                    .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")),
                "read to the close despite chunked"
            );
        }
    }
}

/// `RawUsage` of filters::tokens, read by serde alone: the fields a usage object may have.
#[derive(serde::Deserialize, Debug, Default)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    prompt_tokens_details: Option<RawDetails>,
    completion_tokens_details: Option<RawDetails>,
    input_tokens_details: Option<RawDetails>,
    output_tokens_details: Option<RawDetails>,
}

/// One `*_tokens_details` object.
#[derive(serde::Deserialize, Debug, Default, Clone, Copy)]
struct RawDetails {
    cached_tokens: Option<u64>,
    audio_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

/// What `usage_in_json` must answer for `{"usage": <data>` with no other `"usage"` in it:
/// the usage object at the start of `data` (after whitespace) as serde reads it (anything
/// after it ignored), normalized as the gateway documents it: prompt = prompt or input
/// tokens, completion = completion or output tokens (else total - prompt), total = total
/// (else prompt + completion); nothing when none of them is given.
pub fn usage_by_serde(data: &[u8]) -> Option<filters::tokens::Usage> {
    let i = data.iter().position(|b| !b.is_ascii_whitespace())?;
    if data[i] != b'{' {
        return None;
    }
    let raw: RawUsage = serde_json::Deserializer::from_slice(&data[i..])
        .into_iter::<RawUsage>()
        .next()?
        .ok()?;
    let prompt = raw.prompt_tokens.or(raw.input_tokens);
    let completion = raw.completion_tokens.or(raw.output_tokens);
    if prompt.is_none() && completion.is_none() && raw.total_tokens.is_none() {
        return None;
    }
    let prompt = prompt.unwrap_or(0);
    let completion = completion
        .or_else(|| raw.total_tokens.map(|t| t.saturating_sub(prompt)))
        .unwrap_or(0);
    Some(filters::tokens::Usage {
        prompt,
        completion,
        total: raw
            .total_tokens
            .unwrap_or_else(|| prompt.saturating_add(completion)),
        details: {
            // Prompt details from `prompt_tokens_details`, else `input_tokens_details`;
            // completion details from `completion_tokens_details`, else `output_…`.
            let p = raw.prompt_tokens_details.or(raw.input_tokens_details);
            let c = raw.completion_tokens_details.or(raw.output_tokens_details);
            filters::tokens::Details {
                cached_prompt: p.and_then(|d| d.cached_tokens),
                reasoning: c.and_then(|d| d.reasoning_tokens),
                audio_prompt: p.and_then(|d| d.audio_tokens),
                audio_completion: c.and_then(|d| d.audio_tokens),
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_chunked_decoder() {
        let ok = |s: &[u8], body: &[u8], used: usize| match chunked(s) {
            Chunked::Complete {
                body: b, used: u, ..
            } => {
                assert_eq!(
                    (&b[..], u),
                    (body, used),
                    "{:?}",
                    String::from_utf8_lossy(s)
                )
            }
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(s)),
        };
        ok(b"0\r\n\r\n", b"", 5);
        ok(b"5\r\nhello\r\n0\r\n\r\nGET", b"hello", 15);
        ok(
            b"2;a=b;c=\"x\\\"y\"\r\nhi\r\n0\r\nx-t: 1\r\n\r\n",
            b"hi",
            33,
        );
        ok(b"2 ; a = b\r\nhi\r\n000\r\n\r\n", b"hi", 22);
        for bad in [
            &b"2;\nxx\r\n"[..],
            b"2 \r\nxx",
            b"x\r\n",
            b"2\r\nxxx",
            b"0\r\nx : 1\r\n\r\n",
            b"0\r\n\n",
        ] {
            assert!(
                matches!(chunked(bad), Chunked::Invalid(_)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        for part in [
            &b""[..],
            b"5",
            b"5\r\nhel",
            b"0\r\n",
            b"0\r\nx-t: 1\r\n",
            b"5;a=\"x",
        ] {
            assert_eq!(
                chunked(part),
                Chunked::Incomplete,
                "{:?}",
                String::from_utf8_lossy(part)
            );
        }
    }
}
