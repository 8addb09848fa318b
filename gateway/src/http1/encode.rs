//! Response heads and chunks as they leave for a client.

/// Writes a response head into `out`: the status line, `field_lines` (`name: value\r\n`
/// each, values without CR or LF — the response head type refuses them when they are
/// added), then the framing fields and the blank line.
pub fn encode_head(
    status: u16,
    field_lines: &[u8],
    out: &mut Vec<u8>,
    framing: OutFraming,
    close: bool,
) {
    // The usual status line as one piece.
    if status == 200 {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
        out.push(b' ');
        out.extend_from_slice(reason(status).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(field_lines);
    match framing {
        OutFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        OutFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        OutFraming::Close | OutFraming::None => {}
    }
    // The last field and the blank line as one piece.
    if close {
        out.extend_from_slice(b"connection: close\r\n\r\n");
    } else {
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
