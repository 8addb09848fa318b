//! The usual head, read without `httparse`: a request or status line and header lines in the
//! strictest form of RFC 9112 — CRLF line ends, single spaces in the first line, token names
//! directly followed by `:`, an ASCII request target, no line folding. Anything else
//! (a bare LF, an empty line first, a byte outside the subset, a head not yet complete,
//! more than [`MAX_HEADERS`] fields) is "not sure" and [`super::conn`] asks `httparse`, which
//! decides and refuses. So this path accepts a subset of what `httparse` accepts, with the
//! same parts (the oracle test below checks it on every head it reads and on mutations of
//! them at every byte); it only costs less: one pass over each value and the target a word
//! at a time, the names through one table, and the header names recognized ([`Name::of`])
//! as they are read.

use super::head::{Field, Name, Span};
use super::MAX_HEADERS;

/// A head read by the fast path.
#[derive(Debug)]
pub(super) struct Parsed {
    /// The bytes of the head, up to and including its empty line.
    pub used: usize,
    pub method: Span,
    pub target: Span,
    /// 0 for requests.
    pub status: u16,
    pub minor: u8,
    pub fields: Vec<Field>,
}

/// `tchar` of RFC 9110 §5.6.2: the bytes of a method or a field name.
const TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        t[i] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        i += 1;
    }
    t
};

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The bytes of `w` (little-endian) below `n` as their high bits; exact up to the first one
/// (a borrow only runs towards later bytes), for `n` <= 0x80.
fn below(w: u64, n: u8) -> u64 {
    w.wrapping_sub(ONES * u64::from(n)) & !w & HIGH
}

/// Bytes that end a run of a field value or reason phrase: controls (CR, LF, HTAB among
/// them) and DEL. Bytes above ASCII (obs-text) are part of the run.
fn ctl_bits(w: u64) -> u64 {
    below(w, 0x20) | below(w ^ (ONES * 0x7f), 1)
}

fn is_ctl(c: u8) -> bool {
    c < 0x20 || c == 0x7f
}

/// Bytes that end a request target here: space and controls, DEL, and bytes above ASCII
/// (a target that has one is left to `httparse`, which checks its UTF-8).
fn target_bits(w: u64) -> u64 {
    w & HIGH | below(w, 0x21) | below(w ^ (ONES * 0x7f), 1)
}

fn is_target_stop(c: u8) -> bool {
    c <= 0x20 || c >= 0x7f
}

/// The position of the first byte at or after `i` that `bits` / `stop` flags; `None` when
/// the buffer ends first.
#[inline(always)]
fn scan(
    b: &[u8],
    mut i: usize,
    bits: impl Fn(u64) -> u64,
    stop: impl Fn(u8) -> bool,
) -> Option<usize> {
    while let Some(word) = b.get(i..i + 8) {
        let w = u64::from_le_bytes(word.try_into().ok()?);
        let hit = bits(w);
        if hit != 0 {
            return Some(i + hit.trailing_zeros() as usize / 8);
        }
        i += 8;
    }
    while !stop(*b.get(i)?) {
        i += 1;
    }
    Some(i)
}

/// The bytes of `w` in `lo..=hi`, as their high bits, for a word without bytes above ASCII
/// (no sum carries out of its byte).
fn in_range(w: u64, lo: u8, hi: u8) -> u64 {
    let at_least = w + ONES * u64::from(0x80 - lo);
    let above = w + ONES * u64::from(0x7f - hi);
    at_least & !above & HIGH
}

/// The bytes of `w` that are not a letter, a digit or `-` (the bytes of nearly every field
/// name), as their high bits, exact for every byte; `HIGH` when a byte is above ASCII.
fn not_name_bits(w: u64) -> u64 {
    if w & HIGH != 0 {
        return HIGH;
    }
    let ok =
        in_range(w | (ONES * 0x20), b'a', b'z') | in_range(w, b'0', b'9') | in_range(w, b'-', b'-');
    !ok & HIGH
}

/// The end of a token starting at `i` (`i` itself when there is none): letters, digits and
/// `-` a word at a time, the other token bytes one by one.
#[inline(always)]
fn token_end(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        while let Some(word) = b.get(i..i + 8) {
            let hit = not_name_bits(u64::from_le_bytes(word.try_into().ok()?));
            if hit != 0 {
                i += hit.trailing_zeros() as usize / 8;
                break;
            }
            i += 8;
        }
        if !TOKEN[usize::from(*b.get(i)?)] {
            return Some(i);
        }
        i += 1;
    }
}

/// The end of a field value or reason phrase that starts at `i`: the position of its CR,
/// which is followed by LF. HTAB is part of it; any other control is not sure.
#[inline(always)]
fn line_end(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        i = scan(b, i, ctl_bits, is_ctl)?;
        match b[i] {
            b'\t' => i += 1,
            b'\r' if *b.get(i + 1)? == b'\n' => return Some(i),
            _ => return None,
        }
    }
}

/// The first `:` in the 24 bytes from `i`, a word at a time (the longest known name has
/// 19 bytes); `None` when there is none there, or fewer bytes than a word are left.
#[inline(always)]
fn colon_near(b: &[u8], i: usize) -> Option<usize> {
    for at in [i, i + 8, i + 16] {
        let word: [u8; 8] = b.get(at..at + 8)?.try_into().ok()?;
        let hit = below(u64::from_le_bytes(word) ^ (ONES * u64::from(b':')), 1);
        if hit != 0 {
            return Some(at + hit.trailing_zeros() as usize / 8);
        }
    }
    None
}

fn span(a: usize, b: usize) -> Span {
    (a as u32, b as u32)
}

/// The header lines from `i` to the empty line.
fn fields(b: &[u8], mut i: usize) -> Option<(usize, Vec<Field>)> {
    // Room for the usual heads (a chat request has 4–8 fields, an answer 7–12).
    let mut fields = Vec::with_capacity(12);
    loop {
        if *b.get(i)? == b'\r' {
            return (*b.get(i + 1)? == b'\n').then_some((i + 2, fields));
        }
        let n0 = i;
        // A known name (nearly every field): found by its colon, then recognized and proven a
        // token by one comparison with its literal. Any other: its token bytes read first.
        let colon = colon_near(b, n0);
        let kind = match colon.and_then(|c| Name::known(&b[n0..c])) {
            Some(kind) => {
                i = colon?;
                kind
            }
            None => {
                i = token_end(b, i)?;
                if i == n0 || b[i] != b':' {
                    return None;
                }
                // A token whose colon was found above is none of the literals (`known`
                // compares them exactly, and for token bytes that is what `Name::of`'s
                // comparison ignoring case finds): only the families are left to look for.
                if colon == Some(i) {
                    Name::unlisted(&b[n0..i])
                } else {
                    Name::of(&b[n0..i])
                }
            }
        };
        if fields.len() == MAX_HEADERS {
            return None;
        }
        let name = &b[n0..i];
        i += 1;
        while matches!(*b.get(i)?, b' ' | b'\t') {
            i += 1;
        }
        let v0 = i;
        i = line_end(b, i)?;
        // Trailing whitespace is not part of the value (RFC 9112 §5.1), as `httparse` trims it.
        let mut v1 = i;
        while v1 > v0 && matches!(b[v1 - 1], b' ' | b'\t') {
            v1 -= 1;
        }
        fields.push(Field {
            name: span(n0, n0 + name.len()),
            value: span(v0, v1),
            kind,
        });
        i += 2;
    }
}

/// `HTTP/1.1` or `HTTP/1.0` at `i`: its minor version.
fn version(b: &[u8], i: usize) -> Option<u8> {
    match b.get(i..i + 8)? {
        b"HTTP/1.1" => Some(1),
        b"HTTP/1.0" => Some(0),
        _ => None,
    }
}

/// A request head at the start of `b`, or `None`: not sure (ask `httparse`).
pub(super) fn request(b: &[u8]) -> Option<Parsed> {
    let m = token_end(b, 0)?;
    if m == 0 || b[m] != b' ' {
        return None;
    }
    let t0 = m + 1;
    let t1 = scan(b, t0, target_bits, is_target_stop)?;
    if t1 == t0 || b[t1] != b' ' {
        return None;
    }
    let minor = version(b, t1 + 1)?;
    if b.get(t1 + 9..t1 + 11)? != b"\r\n" {
        return None;
    }
    let (used, fields) = fields(b, t1 + 11)?;
    Some(Parsed {
        used,
        method: span(0, m),
        target: span(t0, t1),
        status: 0,
        minor,
        fields,
    })
}

/// A response head at the start of `b` with a status of 100 or more and a reason phrase
/// (possibly empty) after its space, or `None`: not sure (ask `httparse`).
pub(super) fn response(b: &[u8]) -> Option<Parsed> {
    let minor = version(b, 0)?;
    let code = b.get(8..13)?;
    if code[0] != b' ' || code[4] != b' ' || !code[1..4].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let status = code[1..4]
        .iter()
        .fold(0u16, |n, &d| n * 10 + u16::from(d - b'0'));
    if status < 100 {
        return None;
    }
    let reason_end = line_end(b, 13)?;
    let (used, fields) = fields(b, reason_end + 2)?;
    Some(Parsed {
        used,
        method: (0, 0),
        target: (0, 0),
        status,
        minor,
        fields,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `httparse` makes of a head: (used, method, target, status, minor, fields as
    /// (name, value) byte strings), or `None` when it is partial or refused.
    type Parts = (usize, Vec<u8>, Vec<u8>, u16, u8, Vec<(Vec<u8>, Vec<u8>)>);

    fn by_httparse(b: &[u8], response: bool) -> Option<Parts> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let fields = |h: &[httparse::Header<'_>]| {
            h.iter()
                .map(|h| (h.name.as_bytes().to_vec(), h.value.to_vec()))
                .collect::<Vec<_>>()
        };
        if response {
            let mut r = httparse::Response::new(&mut headers);
            match r.parse(b) {
                Ok(httparse::Status::Complete(n)) => Some((
                    n,
                    Vec::new(),
                    Vec::new(),
                    r.code?,
                    r.version?,
                    fields(r.headers),
                )),
                _ => None,
            }
        } else {
            let mut r = httparse::Request::new(&mut headers);
            match r.parse(b) {
                Ok(httparse::Status::Complete(n)) => Some((
                    n,
                    r.method?.as_bytes().to_vec(),
                    r.path?.as_bytes().to_vec(),
                    0,
                    r.version?,
                    fields(r.headers),
                )),
                _ => None,
            }
        }
    }

    fn parts(b: &[u8], p: &Parsed) -> Parts {
        let at = |s: Span| b[s.0 as usize..s.1 as usize].to_vec();
        (
            p.used,
            at(p.method),
            at(p.target),
            p.status,
            p.minor,
            p.fields.iter().map(|f| (at(f.name), at(f.value))).collect(),
        )
    }

    /// The oracle: whatever the fast path reads, `httparse` reads the same way, and the
    /// names are recognized as [`Name::of`] recognizes them. Returns whether it read it.
    fn agrees(b: &[u8], response: bool) -> bool {
        let fast = if response {
            super::response(b)
        } else {
            request(b)
        };
        let Some(p) = fast else {
            return false;
        };
        let want = by_httparse(b, response);
        assert_eq!(
            Some(parts(b, &p)),
            want,
            "{response} {:?}",
            String::from_utf8_lossy(b)
        );
        for f in &p.fields {
            assert_eq!(f.kind, Name::of(&b[f.name.0 as usize..f.name.1 as usize]));
            // Non-empty values sit where httparse found them.
            assert!(f.value.0 <= f.value.1 && f.value.1 as usize <= p.used);
        }
        true
    }

    const REQUESTS: &[&[u8]] = &[
        b"POST /openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21 HTTP/1.1\r\n\
         Host: 127.0.0.1:18091\r\nContent-Length: 140\r\ncontent-type: application/json\r\n\
         api-key: agw_bench-key-000000000000000000000000000000000\r\n\r\n{\"body\":1}",
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET http://h.example/x?y HTTP/1.1\r\nX-Empty:\r\nX-Sp:   \r\nX-Tab:\tv\t \r\nA: b c\r\n\r\n",
        b"DELETE /openai/files/f-1 HTTP/1.1\r\nx-ratelimit-remaining-tokens: 1\r\nTE: trailers\r\n\r\n",
        b"M!#$%&'*+-.^_`|~9 /%20~!$&'()*+,;=:@ HTTP/1.1\r\nn!#$%&'*+-.^_`|~0z: \x80\xff obs\r\n\r\n",
        b"PUT /x HTTP/1.1\r\nConnection: keep-alive, close\r\nTransfer-Encoding: chunked\r\n\r\n",
    ];

    const RESPONSES: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 15:40:00 GMT\r\n\
         Content-Type: application/json\r\nContent-Length: 327\r\nConnection: keep-alive\r\n\
         apim-request-id: mock-0000\r\nx-ratelimit-remaining-requests: 999\r\n\r\n{}",
        b"HTTP/1.0 404 Not Found\r\n\r\n",
        b"HTTP/1.1 100 \r\n\r\n",
        b"HTTP/1.1 429 Too\tMany \x80Requests\r\nretry-after-ms: 10\r\nretry-after: 1\r\n\r\n",
        b"HTTP/1.1 999 x\r\nSet-Cookie: a=b; c\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    ];

    #[test]
    fn the_usual_heads_are_read_as_httparse_reads_them() {
        for r in REQUESTS {
            assert!(agrees(r, false), "{}", String::from_utf8_lossy(r));
        }
        for r in RESPONSES {
            assert!(agrees(r, true), "{}", String::from_utf8_lossy(r));
        }
        let p = request(REQUESTS[0]).unwrap();
        assert_eq!(p.fields.len(), 4);
        assert_eq!(p.fields[3].kind, Name::ApiKey);
        assert_eq!(p.used, REQUESTS[0].len() - b"{\"body\":1}".len());
        let p = super::response(RESPONSES[0]).unwrap();
        assert_eq!((p.status, p.minor, p.fields.len()), (200, 1, 7));
        assert_eq!(p.fields[6].kind, Name::RateLimit);
    }

    #[test]
    fn anything_outside_the_subset_is_left_to_httparse() {
        for r in [
            "GET / HTTP/1.1\n\n",
            "GET / HTTP/1.1\r\nA: b\n\r\n",
            "GET / HTTP/1.1\r\nA: b\r\n\n",
            "\r\nGET / HTTP/1.1\r\n\r\n",
            "GET  / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1 \r\n\r\n",
            "GET /é HTTP/1.1\r\n\r\n",
            "GET /\x7f HTTP/1.1\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "GET / HTTP/1.1\r\nA : b\r\n\r\n",
            "GET / HTTP/1.1\r\n A: b\r\n\r\n",
            "GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n",
            "GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n",
            "GET / HTTP/1.1\r\nA: b\x7fc\r\n\r\n",
            "GET / HTTP/1.1\r\nA: b\rc\r\n\r\n",
            "GET / HTTP/1.1\r\n: b\r\n\r\n",
            "GET / HTTP/1.1\r\nA(: b\r\n\r\n",
            "GET / HTTP/1.1\r\nA: b\r\n",
            "GET / HTTP/1.1\r\n\r",
            "GE",
            "",
        ] {
            assert!(request(r.as_bytes()).is_none(), "{r:?}");
        }
        for r in [
            "HTTP/1.1 200\r\n\r\n",
            "HTTP/1.1 099 x\r\n\r\n",
            "HTTP/1.1 20x x\r\n\r\n",
            "HTTP/1.1  200 x\r\n\r\n",
            "HTTP/1.1 200 x\n\r\n",
            "HTTP/1.1 200 a\x01b\r\n\r\n",
            "HTTP/1.2 200 x\r\n\r\n",
            "HTTP/1.1 200 x\r\nA: b\r\n",
        ] {
            assert!(super::response(r.as_bytes()).is_none(), "{r:?}");
        }
        // More fields than a head may have.
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(request(many.as_bytes()).is_none());
        let most = format!("GET / HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(MAX_HEADERS));
        assert!(agrees(most.as_bytes(), false));
    }

    /// Every byte value at every position of every head, and every prefix: what the fast
    /// path reads, `httparse` reads the same (or refuses nothing the fast path reads).
    #[test]
    fn mutations_at_every_byte_agree_with_httparse() {
        let mut read = 0;
        for (heads, response) in [(REQUESTS, false), (RESPONSES, true)] {
            for &h in heads {
                for len in 0..=h.len() {
                    agrees(&h[..len], response);
                }
                for at in 0..h.len() {
                    for c in 0..=255u8 {
                        let mut m = h.to_vec();
                        m[at] = c;
                        read += usize::from(agrees(&m, response));
                        // And the byte inserted rather than replaced.
                        let mut m = h.to_vec();
                        m.insert(at, c);
                        read += usize::from(agrees(&m, response));
                    }
                }
            }
        }
        // Most mutations stay in the subset (a letter for a letter); the test means something.
        assert!(read > 100_000, "{read}");
    }

    #[test]
    fn the_colon_is_found_where_it_first_is_within_three_words() {
        // Word by word, a byte at a time: what `colon_near` must find.
        let naive = |b: &[u8], i: usize| {
            for at in [i, i + 8, i + 16] {
                let word = b.get(at..at + 8)?;
                if let Some(k) = word.iter().position(|&c| c == b':') {
                    return Some(at + k);
                }
            }
            None
        };
        for background in [b'a', b';', b'9', 0x00, 0xff, 0xba, 0x3b, 0x1a] {
            for len in 0..=30 {
                for pos in 0..len {
                    for c in 0..=255u8 {
                        let mut v = vec![background; len];
                        v[pos] = c;
                        // And a colon after it (the first one must still be found).
                        for second in [pos + 1, pos + 7] {
                            let mut w = v.clone();
                            if second < len {
                                w[second] = b':';
                            }
                            for i in [0, 1] {
                                assert_eq!(colon_near(&w, i), naive(&w, i), "{w:?} from {i}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_name_word_check_flags_exactly_the_other_bytes() {
        let name_byte = |c: u8| c.is_ascii_alphanumeric() || c == b'-';
        for b in 0..=255u8 {
            for at in 0..8 {
                for other in [
                    b'a', b'Z', b'0', b'-', b':', b' ', b'\r', 0x80, b'@', b'`', b'_',
                ] {
                    let mut word = [other; 8];
                    word[at] = b;
                    let bits = not_name_bits(u64::from_le_bytes(word));
                    if word.iter().any(|&c| c >= 0x80) {
                        assert_eq!(bits, HIGH);
                        continue;
                    }
                    for (k, &c) in word.iter().enumerate() {
                        let flagged = bits & (0x80 << (8 * k)) != 0;
                        assert_eq!(flagged, !name_byte(c), "{word:?} byte {k}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_word_checks_find_the_first_stop_byte() {
        for (bits, stop) in [
            (ctl_bits as fn(u64) -> u64, is_ctl as fn(u8) -> bool),
            (target_bits, is_target_stop),
        ] {
            for b in 0..=255u8 {
                for at in 0..8 {
                    for later in [0u8, b'\r', b' ', 0x7f, 0x80, 0xff, b'a', b] {
                        let mut word = *b"abcdefgh";
                        word[at] = b;
                        if at < 7 {
                            word[7] = later;
                        }
                        let want = word.iter().position(|&c| stop(c));
                        let got = match bits(u64::from_le_bytes(word)) {
                            0 => None,
                            w => Some(w.trailing_zeros() as usize / 8),
                        };
                        assert_eq!(got, want, "{word:?}");
                    }
                }
            }
        }
    }
}
