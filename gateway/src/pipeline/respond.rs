//! The client's response head: protocol-neutral (a status and its fields, which the HTTP/1
//! codec writes as text and the HTTP/2 adapter hands to Pingora as they are), and the pure
//! decisions of what it holds.

use filters::limits::RateLimitHeaders;

use crate::http1::framing::forward_downstream;
use crate::http1::{Head, Name};
use crate::observe::request_id::RequestId;

/// A response head: the status and its fields in order, as (name, value) pairs
/// ([`ResponseHead::fields`]). They are kept back to back in one buffer as `name: value\r\n`
/// — values never hold CR or LF, so each splits one way — which the HTTP/1 encoder copies in
/// one go ([`ResponseHead::field_lines`]); measured, a length-prefixed list cost ~300
/// instructions more per request for the same fields.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: u16,
    buf: Vec<u8>,
}

impl ResponseHead {
    pub fn new(status: u16) -> Self {
        ResponseHead {
            status,
            buf: Vec::with_capacity(512),
        }
    }

    /// Adds a field. A value with CR or LF is dropped (it would split an HTTP/1 head).
    pub fn add(&mut self, name: &str, value: impl AsRef<[u8]>) {
        let value = value.as_ref();
        if memchr::memchr2(b'\r', b'\n', value).is_none() {
            self.push(name.as_bytes(), value);
        }
    }

    pub fn add_u64(&mut self, name: &str, value: u64) {
        self.add(name, itoa::Buffer::new().format(value));
    }

    /// Adds a field from a parsed head (a token name; a value without CR or LF).
    fn push(&mut self, name: &[u8], value: &[u8]) {
        self.buf.extend_from_slice(name);
        self.buf.extend_from_slice(b": ");
        self.buf.extend_from_slice(value);
        self.buf.extend_from_slice(b"\r\n");
    }

    /// Adds `x-request-id` (hex digits and dashes: nothing to refuse), as one piece.
    fn push_request_id(&mut self, id: RequestId) {
        const NAME: &[u8] = b"x-request-id: ";
        let mut line = [0u8; NAME.len() + 36 + 2];
        line[..NAME.len()].copy_from_slice(NAME);
        line[NAME.len()..NAME.len() + 36].copy_from_slice(&id.text());
        line[NAME.len() + 36..].copy_from_slice(b"\r\n");
        self.buf.extend_from_slice(&line);
    }

    /// The fields as (name, value), in the order they were added.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        split_fields(&self.buf)
    }

    /// The fields as HTTP/1 field lines (`name: value\r\n` each).
    pub fn field_lines(&self) -> &[u8] {
        &self.buf
    }
}

/// The (name, value) pairs of field lines as [`ResponseHead::field_lines`] gives them (borrowed
/// from `lines`, so that a copy of the lines can share them).
pub fn split_fields(lines: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let mut rest = Some(lines);
    std::iter::from_fn(move || loop {
        let text = rest?;
        let line = match memchr::memchr(b'\n', text) {
            Some(end) => {
                rest = Some(&text[end + 1..]);
                &text[..end]
            }
            None => rest.take()?,
        };
        // Names are tokens (no colon): the first ": " ends the name.
        if let Some(line) = line.strip_suffix(b"\r") {
            if let Some(at) = memchr::memchr(b':', line) {
                return Some((&line[..at], line.get(at + 2..).unwrap_or_default()));
            }
        }
    })
}

/// The head of an answer the gateway writes itself (JSON).
pub fn json_head(status: u16, request_id: RequestId) -> ResponseHead {
    let mut resp = ResponseHead::new(status);
    resp.add("content-type", "application/json");
    resp.push_request_id(request_id);
    resp
}

/// The client's head from a backend's answer: its end-to-end fields (no hop-by-hop ones,
/// none that its `Connection` names, no cookies, length or request id); where the gateway
/// limits this client (`limits`), its own `x-ratelimit-*` instead of the backend's fleet-wide
/// ones; and the gateway's request id.
pub fn client_head(
    backend: &Head,
    limits: Option<&RateLimitHeaders>,
    request_id: RequestId,
) -> ResponseHead {
    let mut out = ResponseHead::new(backend.status);
    let keep = |kind: Name, _: &[u8]| {
        forward_downstream(kind) && !(limits.is_some() && kind == Name::RateLimit)
    };
    backend.write_end_to_end_fields(keep, &mut out.buf);
    if let Some(h) = limits {
        for (k, v) in [
            ("x-ratelimit-limit-requests", h.limit_requests),
            ("x-ratelimit-remaining-requests", h.remaining_requests),
            ("x-ratelimit-limit-tokens", h.limit_tokens),
            ("x-ratelimit-remaining-tokens", h.remaining_tokens),
        ] {
            if let Some(v) = v {
                out.add_u64(k, v);
            }
        }
    }
    out.push_request_id(request_id);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(h: &ResponseHead) -> Vec<(String, String)> {
        h.fields()
            .map(|(n, v)| {
                (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn fields_keep_their_order_and_refuse_header_injection() {
        let mut r = ResponseHead::new(429);
        r.add("retry-after", "3");
        r.add("x-evil", "a\r\nset-cookie: b");
        r.add_u64("x-n", 42);
        r.add("x-empty", "");
        r.add("x-colon", "a: b:c");
        assert_eq!(
            pairs(&r),
            [
                ("retry-after", "3"),
                ("x-n", "42"),
                ("x-empty", ""),
                ("x-colon", "a: b:c")
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        assert_eq!(
            r.field_lines(),
            b"retry-after: 3\r\nx-n: 42\r\nx-empty: \r\nx-colon: a: b:c\r\n"
        );
    }

    #[test]
    fn split_fields_reads_what_the_byte_split_read() {
        // The former reading (a split on every byte), the oracle on lines it could read.
        fn oracle(buf: &[u8]) -> Vec<(&[u8], &[u8])> {
            buf.split(|&b| b == b'\n')
                .filter_map(|line| line.strip_suffix(b"\r"))
                .filter_map(|line| {
                    let at = memchr::memchr(b':', line)?;
                    Some((&line[..at], &line[at + 2..]))
                })
                .collect()
        }
        for buf in [
            &b""[..],
            b"a: 1\r\n",
            b"a: 1\r\nb: \r\nc: x: y\r\n",
            b"a: 1\r\nno colon\r\nb: 2\r\n",
            b"a: 1\nb: 2\r\n",
            b"a: 1\r\nb: 2",
            b"a: 1\r\nb: 2\r",
            b"\r\n\r\nx-y: z\r\n",
        ] {
            assert_eq!(
                split_fields(buf).collect::<Vec<_>>(),
                oracle(buf),
                "{buf:?}"
            );
        }
        // A colon at the end of a line (never written by `push`): an empty value, not a panic.
        assert_eq!(
            split_fields(b"a:\r\n").collect::<Vec<_>>(),
            [(&b"a"[..], &b""[..])]
        );
    }

    fn backend() -> Head {
        Head::request(
            "GET",
            "/",
            [
                ("content-type", &b"application/json"[..]),
                ("connection", b"keep-alive, x-back"),
                ("x-back", b"1"),
                ("keep-alive", b"timeout=5"),
                ("set-cookie", b"a=b"),
                ("content-length", b"9"),
                ("x-request-id", b"backend-id"),
                ("apim-request-id", b"apim-1"),
                ("x-ratelimit-remaining-tokens", b"999"),
                ("x-other", b"2"),
            ],
        )
    }

    #[test]
    fn client_head_table() {
        let id = RequestId::new();
        let got = pairs(&client_head(&backend(), None, id));
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "content-type",
                "apim-request-id",
                "x-ratelimit-remaining-tokens",
                "x-other",
                "x-request-id"
            ]
        );
        assert_eq!(got.last().unwrap().1.as_bytes(), &id.text()[..]);
        // Where the gateway limits the client, its own rate-limit fields replace the backend's.
        let own = RateLimitHeaders {
            limit_requests: Some(10),
            remaining_requests: Some(9),
            limit_tokens: None,
            remaining_tokens: Some(100),
        };
        let got = pairs(&client_head(&backend(), Some(&own), id));
        let rl: Vec<_> = got
            .iter()
            .filter(|(n, _)| n.starts_with("x-ratelimit-"))
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            rl,
            [
                ("x-ratelimit-limit-requests", "10"),
                ("x-ratelimit-remaining-requests", "9"),
                ("x-ratelimit-remaining-tokens", "100")
            ]
        );
    }
}
