//! Small pure helpers: JSON string escaping, ids, query/form decoding, time.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Appends `s` as a quoted JSON string literal.
pub fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: Option<&str> = match b {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0..=0x1f => None,
            _ => continue,
        };
        out.push_str(&s[start..i]);
        match esc {
            Some(e) => out.push_str(e),
            None => {
                let _ = write!(out, "\\u{:04x}", b);
            }
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// `s` as a quoted JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    push_json_str(&mut out, s);
    out
}

/// Generator of unique ids: a random per-process prefix plus a counter.
pub struct IdGen {
    a: u32,
    b: u16,
    c: u16,
    d: u16,
    counter: AtomicU64,
}

impl IdGen {
    pub fn new() -> Self {
        let r: u64 = rand::random();
        let r2: u64 = rand::random();
        IdGen {
            a: (r >> 32) as u32,
            b: (r >> 16) as u16,
            c: (r as u16) & 0x0fff,
            d: ((r2 as u16) & 0x3fff) | 0x8000,
            counter: AtomicU64::new(r2 >> 40),
        }
    }

    /// A fresh number (unique within the process).
    pub fn next(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    /// A UUID-like string (version-4 layout) built from the prefix and `n`.
    pub fn uuid(&self, n: u64) -> String {
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            self.a,
            self.b,
            self.c,
            self.d,
            n & 0xffff_ffff_ffff
        )
    }

    /// An OpenAI-like object id, e.g. `chatcmpl-…`.
    pub fn object_id(&self, prefix: &str, n: u64) -> String {
        format!(
            "{prefix}{:08x}{:04x}{:012x}",
            self.a,
            self.b,
            n & 0xffff_ffff_ffff
        )
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes one `application/x-www-form-urlencoded` component (`+` is a space).
pub fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex_val(bytes[i + 1]), hex_val(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a query string or a form body into decoded pairs.
pub fn form_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (form_decode(k), form_decode(v)),
            None => (form_decode(p), String::new()),
        })
        .collect()
}

/// The first value of `key` in decoded pairs.
pub fn pair<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escaping_matches_serde() {
        for s in [
            "",
            "plain",
            "quote \" and \\ backslash",
            "new\nline\ttab\rcr",
            "ctl \u{1} \u{1f} end",
            "unicode é 漢字 🚀",
        ] {
            let ours = json_str(s);
            let back: String = serde_json::from_str(&ours).unwrap();
            assert_eq!(back, s);
        }
        assert_eq!(json_str("a\"b"), r#""a\"b""#);
    }

    #[test]
    fn ids_are_unique_and_uuid_like() {
        let g = IdGen::new();
        let a = g.uuid(g.next());
        let b = g.uuid(g.next());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'));
        assert!(g.object_id("chatcmpl-", 1).starts_with("chatcmpl-"));
    }

    #[test]
    fn form_decoding() {
        let p = form_pairs(
            "grant_type=client_credentials&scope=api%3A%2F%2Fx%2F.default&a=b+c&bad=%zz&t=%4",
        );
        assert_eq!(pair(&p, "grant_type"), Some("client_credentials"));
        assert_eq!(pair(&p, "scope"), Some("api://x/.default"));
        assert_eq!(pair(&p, "a"), Some("b c"));
        assert_eq!(pair(&p, "bad"), Some("%zz"));
        assert_eq!(pair(&p, "t"), Some("%4"));
        assert_eq!(pair(&p, "missing"), None);
        assert_eq!(hex(&[0, 255, 16]), "00ff10");
    }
}
