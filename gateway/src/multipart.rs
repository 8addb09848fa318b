//! The `model` field of a `multipart/form-data` upload (`/openai/v1/audio/transcriptions`,
//! `…/translations`, `…/images/edits`, SPEC §13): found, so that the gateway can route on it
//! and rewrite it to the member's deployment name, and nothing else read.
//!
//! Strict: the body is `--boundary CRLF` part … `--boundary--` with no preamble and at most a
//! CRLF after the close; every part's headers are parsed (httparse, as `multer` does) and
//! must carry exactly one `Content-Disposition: form-data; name=…` in the plain grammar
//! (`token` or a quoted string without `\`; no `name*`/`filename*`, no repeated parameter);
//! no part has a `Content-Transfer-Encoding`. A part whose name is `model` in any letter case
//! must be the only one, named exactly `model`, and no file. Anything else is refused (400):
//! a body that a more lenient reader (the backend's) could read with another `model` would let
//! a caller reach a deployment it was not authorized for. The oracle test below and the fuzz
//! target `multipart_model` hold it against `multer`: what is accepted here, `multer` reads
//! with the same fields and the same `model`.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

/// The `boundary` of a `multipart/form-data` content type.
pub fn boundary(content_type: &str) -> Option<&str> {
    let mut params = content_type.split(';');
    let media = params.next()?.trim();
    if !media.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    let mut found = None;
    for p in params {
        let (k, v) = p.trim().split_once('=')?;
        if !k.trim_end().eq_ignore_ascii_case("boundary") {
            continue;
        }
        if found.is_some() {
            return None;
        }
        let v = v.trim_start();
        let v = match v.strip_prefix('"') {
            Some(q) => q.strip_suffix('"')?,
            None => v,
        };
        found = Some(v);
    }
    let b = found?;
    // RFC 2046 §5.1.1: 1 to 70 of these, not ending with a space.
    let ok = (1..=70).contains(&b.len())
        && !b.ends_with(' ')
        && b.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&c));
    ok.then_some(b)
}

/// Where the (single) `model` field's value is in `body`, `None` when there is none.
pub fn find_model(body: &[u8], boundary: &str) -> Result<Option<Range<usize>>, &'static str> {
    find_field(body, boundary, b"model", false)
}

/// Where the value of the field named `field` is in `body` (`None` when there is none), read
/// with the same rules as `model`: a part whose name is `field` in any letter case must be the
/// only one, named exactly `field`, and a file exactly when `file` is true. The whole body
/// goes through the same [`Scanner`] that reads a streamed form.
pub fn find_field(
    body: &[u8],
    boundary: &str,
    field: &[u8],
    file: bool,
) -> Result<Option<Range<usize>>, &'static str> {
    let mut scanner = Scanner::new(boundary);
    scanner.push(body);
    let (mut pos, mut found, mut start) = (0, None, None);
    while let Some(piece) = scanner.next(true)? {
        let is_field = match &piece {
            Piece::Head { name, file: f, .. } => watched(name, *f, field, file, found.is_some())?,
            _ => false,
        };
        if is_field {
            start = Some(pos + piece.len());
        }
        if let (Piece::PartEnd(_), Some(s)) = (&piece, start) {
            found = Some(s..pos);
            start = None;
        }
        pos += piece.len();
    }
    Ok(found)
}

/// Whether a part named `name` is the watched field `field`: a part whose name is `field` in
/// any letter case must be the only one (`seen`: one was found before), named exactly
/// `field`, and a file exactly when `want_file` is true.
pub fn watched(
    name: &[u8],
    is_file: bool,
    field: &[u8],
    want_file: bool,
    seen: bool,
) -> Result<bool, &'static str> {
    if !name.eq_ignore_ascii_case(field) {
        return Ok(false);
    }
    if name != field || is_file != want_file || seen {
        return Err(if field == b"model" {
            "the form must have one `model` field"
        } else {
            "a form field is repeated, or a file where text was expected (or the reverse)"
        });
    }
    Ok(true)
}

/// A part's header block larger than this is refused.
pub const MAX_PART_HEAD: usize = 16 * 1024;

/// One piece of a form as it is read; the pieces, concatenated, are the body byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Framing: the first boundary, the CRLF after a boundary, the closing `--` and CRLF.
    Frame(Bytes),
    /// A part's header block (to its empty line), with the part's name and whether it is a
    /// file.
    Head { raw: Bytes, name: Bytes, file: bool },
    /// Some of the current part's content.
    Content(Bytes),
    /// The delimiter (`CRLF --boundary`) that ends the current part.
    PartEnd(Bytes),
}

impl Piece {
    pub fn len(&self) -> usize {
        self.raw().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The piece's bytes as they were in the body.
    pub fn raw(&self) -> &Bytes {
        match self {
            Piece::Frame(b) | Piece::Content(b) | Piece::PartEnd(b) => b,
            Piece::Head { raw, .. } => raw,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    Start,
    AfterBoundary,
    Headers,
    Content,
    Closing,
    Done,
}

/// Reads a form as it arrives, strictly (the rules of this module), in [`Piece`]s: bytes are
/// [`Scanner::push`]ed in any split, pieces taken with [`Scanner::next`]. What it holds is at
/// most one part's header block or a delimiter's length of content.
#[derive(Debug)]
pub struct Scanner {
    dash: Vec<u8>,
    delimiter: Vec<u8>,
    finder: memchr::memmem::Finder<'static>,
    buf: BytesMut,
    at: At,
}

impl Scanner {
    pub fn new(boundary: &str) -> Scanner {
        let dash = [b"--", boundary.as_bytes()].concat();
        let delimiter = [b"\r\n", &dash[..]].concat();
        let finder = memchr::memmem::Finder::new(&delimiter).into_owned();
        Scanner {
            dash,
            delimiter,
            finder,
            buf: BytesMut::new(),
            at: At::Start,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Whether the form was read to its close.
    pub fn is_done(&self) -> bool {
        self.at == At::Done
    }

    /// Bytes pushed and not yet given out as pieces (taken: the scanner is not used after).
    pub fn take_buffered(&mut self) -> Bytes {
        self.buf.split().freeze()
    }

    /// The next piece; `None` when more bytes are needed (or, with `eof`, when the form was
    /// read to its close). `eof`: nothing more will be pushed.
    pub fn next(&mut self, eof: bool) -> Result<Option<Piece>, &'static str> {
        let b = &self.buf;
        match self.at {
            At::Start => {
                let n = b.len().min(self.dash.len());
                if b[..n] != self.dash[..n] {
                    return Err("the body does not start with the boundary");
                }
                if n < self.dash.len() {
                    return if eof {
                        Err("the body does not start with the boundary")
                    } else {
                        Ok(None)
                    };
                }
                self.at = At::AfterBoundary;
                Ok(Some(Piece::Frame(self.buf.split_to(n).freeze())))
            }
            At::AfterBoundary => {
                if b.len() < 2 {
                    let partial = b.is_empty() || b[0] == b'-' || b[0] == b'\r';
                    return if eof || !partial {
                        Err("a boundary is not followed by CRLF")
                    } else {
                        Ok(None)
                    };
                }
                self.at = match &b[..2] {
                    b"--" => At::Closing,
                    b"\r\n" => At::Headers,
                    _ => return Err("a boundary is not followed by CRLF"),
                };
                Ok(Some(Piece::Frame(self.buf.split_to(2).freeze())))
            }
            At::Closing => {
                let ok = b[..] == b"\r\n"[..b.len().min(2)] && b.len() <= 2;
                if !ok {
                    return Err("data after the closing boundary");
                }
                if !eof {
                    return Ok(None);
                }
                self.at = At::Done;
                if b.is_empty() {
                    return Ok(None);
                }
                if b.len() != 2 {
                    return Err("data after the closing boundary");
                }
                Ok(Some(Piece::Frame(self.buf.split().freeze())))
            }
            At::Headers => {
                let mut headers = [httparse::EMPTY_HEADER; 16];
                match httparse::parse_headers(b, &mut headers) {
                    // Refused whole as in pieces: a block longer than the limit is refused
                    // however it arrives.
                    Ok(httparse::Status::Complete((n, _))) if n > MAX_PART_HEAD => {
                        Err("a part's headers are too large")
                    }
                    Ok(httparse::Status::Complete((n, hs))) => {
                        // httparse takes a bare LF for a line end; multipart readers that look
                        // for CRLF CRLF (multer) would read the part otherwise: CRLF only.
                        let block = &b[..n];
                        let bare_lf = memchr::memchr_iter(b'\n', block)
                            .any(|i| i == 0 || block[i - 1] != b'\r');
                        if bare_lf {
                            return Err("a part's header lines do not end with CRLF");
                        }
                        let (name, file) = part_name(hs)?;
                        let name = name.to_vec();
                        let raw = self.buf.split_to(n).freeze();
                        self.at = At::Content;
                        Ok(Some(Piece::Head {
                            raw,
                            name: Bytes::from(name),
                            file,
                        }))
                    }
                    Ok(httparse::Status::Partial) => {
                        if b.len() > MAX_PART_HEAD {
                            Err("a part's headers are too large")
                        } else if eof {
                            Err("a part's headers do not end")
                        } else {
                            Ok(None)
                        }
                    }
                    Err(_) => Err("a part's headers are malformed"),
                }
            }
            At::Content => match self.finder.find(b) {
                Some(0) => {
                    self.at = At::AfterBoundary;
                    let n = self.delimiter.len();
                    Ok(Some(Piece::PartEnd(self.buf.split_to(n).freeze())))
                }
                Some(i) => Ok(Some(Piece::Content(self.buf.split_to(i).freeze()))),
                None => {
                    // Whatever cannot be the start of the delimiter is content.
                    let keep = self.delimiter.len() - 1;
                    if b.len() > keep {
                        let n = b.len() - keep;
                        Ok(Some(Piece::Content(self.buf.split_to(n).freeze())))
                    } else if eof {
                        Err("a part does not end with the boundary")
                    } else {
                        Ok(None)
                    }
                }
            },
            At::Done => {
                if b.is_empty() {
                    Ok(None)
                } else {
                    Err("data after the closing boundary")
                }
            }
        }
    }
}

/// The `name` of a part and whether it is a file, from its headers.
fn part_name<'h>(headers: &[httparse::Header<'h>]) -> Result<(&'h [u8], bool), &'static str> {
    let mut disposition = None;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-disposition") {
            if disposition.is_some() {
                return Err("a part has two Content-Disposition headers");
            }
            disposition = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("content-transfer-encoding") {
            return Err("a part has a Content-Transfer-Encoding");
        }
    }
    let value = disposition.ok_or("a part has no Content-Disposition")?;
    let (name, is_file) =
        disposition_name(value).ok_or("a part's Content-Disposition is not plain form-data")?;
    // What a lenient reader (multer) takes for the name must be the same.
    if loose_name(value) != Some(name) {
        return Err("a part's Content-Disposition is ambiguous");
    }
    Ok((name, is_file))
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$&'*+-.^_`|~".contains(&c)
}

fn skip_ows(v: &[u8], mut i: usize) -> usize {
    while i < v.len() && (v[i] == b' ' || v[i] == b'\t') {
        i += 1;
    }
    i
}

/// `form-data` then `; param=value` pairs (token or quoted string without `\`), every
/// parameter once, no extended (`*`) ones: the `name` and whether there is a `filename`.
fn disposition_name(v: &[u8]) -> Option<(&[u8], bool)> {
    let kind = b"form-data";
    if v.len() < kind.len() || !v[..kind.len()].eq_ignore_ascii_case(kind) {
        return None;
    }
    let mut i = kind.len();
    let mut seen: Vec<&[u8]> = Vec::new();
    let (mut name, mut file) = (None, false);
    loop {
        i = skip_ows(v, i);
        if i == v.len() {
            break;
        }
        if v[i] != b';' {
            return None;
        }
        i = skip_ows(v, i + 1);
        let k0 = i;
        while i < v.len() && is_tchar(v[i]) {
            i += 1;
        }
        let key = &v[k0..i];
        if key.is_empty() || key.contains(&b'*') || v.get(i) != Some(&b'=') {
            return None;
        }
        if seen.iter().any(|s| s.eq_ignore_ascii_case(key)) {
            return None;
        }
        seen.push(key);
        i += 1;
        let value = if v.get(i) == Some(&b'"') {
            let from = i + 1;
            let len = v[from..].iter().position(|&c| c == b'"')?;
            let q = &v[from..from + len];
            if q.iter().any(|&c| c == b'\\' || c < 0x20 || c == 0x7f) {
                return None;
            }
            i = from + len + 1;
            q
        } else {
            let from = i;
            while i < v.len() && is_tchar(v[i]) {
                i += 1;
            }
            if from == i {
                return None;
            }
            &v[from..i]
        };
        if key.eq_ignore_ascii_case(b"name") {
            name = Some(value);
        } else if key.eq_ignore_ascii_case(b"filename") {
            file = true;
        }
    }
    Some((name?, file))
}

/// The name as `multer` 3 finds it: the first `name` preceded by whitespace or `;`, then
/// `=` and a quoted string (to the next unescaped quote) or a bare word.
fn loose_name(mut h: &[u8]) -> Option<&[u8]> {
    let trim = |b: &[u8]| -> usize {
        b.iter()
            .position(|c| !c.is_ascii_whitespace())
            .unwrap_or(b.len())
    };
    let full = h;
    let mut offset = 0;
    while let Some(i) = memchr::memmem::find(h, b"name") {
        let at = offset + i;
        let suffix = &h[i + 4..];
        if at > 0 && !(full[at - 1].is_ascii_whitespace() || full[at - 1] == b';') {
            offset = at + 4;
            h = suffix;
            continue;
        }
        let rest = &suffix[trim(suffix)..];
        let rest = rest.strip_prefix(b"=")?;
        let rest = &rest[trim(rest)..];
        return Some(match rest.strip_prefix(b"\"") {
            Some(q) => {
                let k = memchr::memchr(b'"', q)?;
                if k > 0 && q[k - 1] == b'\\' {
                    // Escaped quotes: never accepted by the strict grammar anyway.
                    return None;
                }
                &q[..k]
            }
            None => {
                let j = memchr::memchr2(b';', b' ', rest).unwrap_or(rest.len());
                &rest[..j]
            }
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: &str = "xYzZY";

    fn part(disposition: &str, extra: &str, content: &[u8]) -> Vec<u8> {
        let mut p =
            format!("--{B}\r\nContent-Disposition: {disposition}\r\n{extra}\r\n").into_bytes();
        p.extend_from_slice(content);
        p.extend_from_slice(b"\r\n");
        p
    }

    fn form(parts: &[Vec<u8>]) -> Vec<u8> {
        let mut b = parts.concat();
        b.extend_from_slice(format!("--{B}--\r\n").as_bytes());
        b
    }

    fn model_of(body: &[u8]) -> Result<Option<String>, &'static str> {
        find_model(body, B).map(|r| r.map(|r| String::from_utf8_lossy(&body[r]).into_owned()))
    }

    #[test]
    fn boundaries() {
        for (ct, want) in [
            ("multipart/form-data; boundary=abc", Some("abc")),
            ("Multipart/Form-Data;boundary=\"a b:c\"", Some("a b:c")),
            (
                "multipart/form-data; charset=utf-8; boundary=x-1",
                Some("x-1"),
            ),
            ("multipart/form-data", None),
            ("multipart/form-data; boundary=", None),
            ("multipart/form-data; boundary=\"\"", None),
            ("multipart/form-data; boundary=a; boundary=b", None),
            ("multipart/form-data; boundary=\"a", None),
            ("multipart/form-data; boundary=a\"b", None),
            ("multipart/form-data; boundary=ab ", Some("ab")),
            ("multipart/mixed; boundary=abc", None),
            ("application/json", None),
        ] {
            assert_eq!(boundary(ct), want, "{ct}");
        }
        let long = format!("multipart/form-data; boundary={}", "a".repeat(71));
        assert_eq!(boundary(&long), None);
    }

    #[test]
    fn finds_the_model_field() {
        let file = part(
            r#"form-data; name="file"; filename="a.wav""#,
            "Content-Type: audio/wav\r\n",
            b"RIFF\x00\x01\r\n--not-the-boundary\r\n",
        );
        let model = part(r#"form-data; name="model""#, "", b"whisper");
        let fmt = part("form-data; name=response_format", "", b"json");
        assert_eq!(
            model_of(&form(&[model.clone(), file.clone()])),
            Ok(Some("whisper".into()))
        );
        assert_eq!(
            model_of(&form(&[file.clone(), fmt.clone(), model.clone()])),
            Ok(Some("whisper".into()))
        );
        assert_eq!(model_of(&form(&[file.clone(), fmt.clone()])), Ok(None));
        // Without the trailing CRLF after the close.
        let mut b = form(std::slice::from_ref(&model));
        b.truncate(b.len() - 2);
        assert_eq!(model_of(&b), Ok(Some("whisper".into())));
        // An empty value is found (the caller refuses it).
        assert_eq!(
            model_of(&form(&[part(r#"form-data; name="model""#, "", b"")])),
            Ok(Some(String::new()))
        );
    }

    #[test]
    fn refuses_what_could_be_read_otherwise() {
        let model = part(r#"form-data; name="model""#, "", b"whisper");
        let file = part(r#"form-data; name="file"; filename="a.wav""#, "", b"data");
        let bad: Vec<(&str, Vec<u8>)> = vec![
            (
                "two models",
                form(&[model.clone(), file.clone(), model.clone()]),
            ),
            (
                "a Model",
                form(&[part(r#"form-data; name="Model""#, "", b"x"), file.clone()]),
            ),
            (
                "a model file",
                form(&[part(r#"form-data; name="model"; filename="m""#, "", b"x")]),
            ),
            (
                "extended name",
                form(&[part(r#"form-data; name*=UTF-8''model"#, "", b"x")]),
            ),
            (
                "name inside filename",
                form(&[part(
                    r#"form-data; filename="a; name=model"; name="file""#,
                    "",
                    b"x",
                )]),
            ),
            (
                "escaped quote",
                form(&[part(r#"form-data; name="mo\"del""#, "", b"x")]),
            ),
            (
                "repeated name",
                form(&[part(r#"form-data; name="file"; name="model""#, "", b"x")]),
            ),
            (
                "not form-data",
                form(&[part(r#"attachment; name="model""#, "", b"x")]),
            ),
            (
                "no disposition",
                [format!("--{B}\r\nContent-Type: text/plain\r\n\r\nx\r\n--{B}--").as_bytes()]
                    .concat(),
            ),
            (
                "two dispositions",
                form(&[part(
                    r#"form-data; name="a""#,
                    "Content-Disposition: form-data; name=\"model\"\r\n",
                    b"x",
                )]),
            ),
            (
                "transfer encoding",
                form(&[part(
                    r#"form-data; name="model""#,
                    "Content-Transfer-Encoding: base64\r\n",
                    b"d2hpc3Blcg==",
                )]),
            ),
            (
                "preamble",
                [b"preamble\r\n".to_vec(), form(std::slice::from_ref(&model))].concat(),
            ),
            ("no close", [model.clone()].concat()),
            (
                "epilogue",
                [form(std::slice::from_ref(&model)), b"more".to_vec()].concat(),
            ),
            (
                "padding after boundary",
                format!(
                    "--{B} \r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nx\r\n--{B}--"
                )
                .into_bytes(),
            ),
            (
                "unterminated headers",
                format!("--{B}\r\nContent-Disposition: form-data; name=\"model\"\r\n").into_bytes(),
            ),
            (
                "folded header",
                form(&[part("form-data;\r\n name=\"model\"", "", b"x")]),
            ),
            // Found by the fuzz target: httparse ends the headers at a bare LF, multer does not.
            (
                "bare LF after the headers",
                format!("--{B}\r\nContent-Disposition: form-data; name=\"model\"\r\n\nx\r\n--{B}--")
                    .into_bytes(),
            ),
            (
                "bare LF between headers",
                format!("--{B}\r\nContent-Type: a/b\nContent-Disposition: form-data; name=\"model\"\r\n\r\nx\r\n--{B}--")
                    .into_bytes(),
            ),
            (
                "boundary in content",
                [model.clone(), format!("--{B}x\r\n").into_bytes()].concat(),
            ),
            ("empty", Vec::new()),
        ];
        for (why, body) in bad {
            assert!(
                find_model(&body, B).is_err(),
                "{why}: {:?}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    /// Runs `multer` over `body`: every field's name, and the `model` field's text.
    fn multer_fields(body: &[u8]) -> Result<(Vec<Option<String>>, Option<String>), String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let body = bytes::Bytes::copy_from_slice(body);
        rt.block_on(async move {
            let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(body) });
            let mut m = multer::Multipart::new(stream, B);
            let (mut names, mut model) = (Vec::new(), None);
            while let Some(f) = m.next_field().await.map_err(|e| e.to_string())? {
                let name = f.name().map(str::to_string);
                let text = f.bytes().await.map_err(|e| e.to_string())?;
                if name.as_deref() == Some("model") {
                    model = Some(String::from_utf8_lossy(&text).into_owned());
                }
                names.push(name);
            }
            Ok((names, model))
        })
    }

    /// Bodies built from pieces that a lenient or strict reader may take differently.
    fn generated() -> Vec<Vec<u8>> {
        let dispositions = [
            r#"form-data; name="model""#,
            "form-data; name=model",
            r#"form-data; name="model"; filename="x.wav""#,
            r#"form-data; name="file"; filename="a.wav""#,
            r#"form-data; filename="a name=model"; name="file""#,
            r#"form-data; filename="a;name=model"; name="file""#,
            r#"form-data;name="model""#,
            r#"form-data ; name = "model""#,
            r#"FORM-DATA; NAME="model""#,
            r#"form-data; name="MODEL""#,
            r#"form-data; xname="model"; name="a""#,
            r#"form-data; name="a b""#,
            r#"form-data; name="""#,
        ];
        let contents: [&[u8]; 4] = [b"whisper", b"", b"a\r\nb", b"\r\n--xYzZ"];
        let mut out = Vec::new();
        for d1 in dispositions {
            for d2 in dispositions {
                for c in contents {
                    out.push(form(&[
                        part(d1, "", c),
                        part(d2, "Content-Type: x/y\r\n", c),
                    ]));
                }
            }
        }
        out
    }

    /// Scans `body` pushed in pieces of `split` bytes: the pieces, or the first refusal.
    fn scan_split(body: &[u8], split: usize) -> Result<Vec<Piece>, &'static str> {
        let mut s = Scanner::new(B);
        let mut out = Vec::new();
        for chunk in body.chunks(split.max(1)) {
            s.push(chunk);
            while let Some(p) = s.next(false)? {
                out.push(p);
            }
        }
        while let Some(p) = s.next(true)? {
            out.push(p);
        }
        assert!(s.is_done());
        Ok(out)
    }

    #[test]
    fn a_form_read_in_pieces_reads_as_a_whole() {
        let mut bodies = generated();
        bodies.push(form(&[part(
            r#"form-data; name="file"; filename="a""#,
            "",
            &[b'\r'; 40],
        )]));
        bodies.push(b"--xYzZY--".to_vec());
        let long = format!("X-Pad: {}\r\n", "p".repeat(MAX_PART_HEAD));
        bodies.push(form(&[part(r#"form-data; name="model""#, &long, b"m")]));
        bodies.push(b"--xYzZY--\r".to_vec());
        bodies.push(b"--xYzZY-".to_vec());
        for body in bodies {
            let whole = scan_split(&body, body.len());
            for split in [1, 2, 3, 11] {
                let pieces = scan_split(&body, split);
                assert_eq!(
                    whole.is_ok(),
                    pieces.is_ok(),
                    "{split} {:?}",
                    String::from_utf8_lossy(&body)
                );
                if let Ok(pieces) = pieces {
                    let joined: Vec<u8> = pieces.iter().flat_map(|p| p.raw().to_vec()).collect();
                    assert_eq!(joined, body);
                }
            }
        }
    }

    #[test]
    fn what_is_accepted_multer_reads_the_same() {
        let mut accepted = 0;
        for body in generated() {
            let Ok(ours) = model_of(&body) else {
                continue;
            };
            accepted += 1;
            let (names, theirs) = multer_fields(&body).unwrap_or_else(|e| {
                panic!("multer refused {:?}: {e}", String::from_utf8_lossy(&body))
            });
            assert_eq!(ours, theirs, "{:?}", String::from_utf8_lossy(&body));
            let models = names
                .iter()
                .filter(|n| {
                    n.as_deref()
                        .is_some_and(|n| n.eq_ignore_ascii_case("model"))
                })
                .count();
            assert!(models <= 1, "{:?}", String::from_utf8_lossy(&body));
        }
        assert!(accepted > 50, "{accepted}");
    }
}
