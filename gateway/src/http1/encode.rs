//! Response heads and chunks as they leave for a client.

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
