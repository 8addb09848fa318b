//! Streamed uploads (SPEC §11 files, §13 multipart media): the decisions over a form read
//! piece by piece ([`crate::multipart::Scanner`]), as pure functions over plain data.
//!
//! - [`Checker`] sees every piece once, in order: it applies the form's rules (one `model`;
//!   one `purpose` and one `file`, `purpose` first) and finds what routing needs — the
//!   `model` field, or the deployment of a `purpose=batch` file's first line.
//! - [`Renderer`] turns pieces into what goes to one member: the `model` field's value
//!   replaced by the member's deployment name, every batch line checked (one deployment per
//!   file) and its `body.model` rewritten; everything else byte for byte. A fresh renderer
//!   renders the held prefix again for another member, as long as no byte after it was read.

use bytes::Bytes;

use crate::batchfile;
use crate::multipart::{watched, Piece};

/// A form body at least this long (and whose fields are known) is streamed to the backend;
/// a shorter one is read whole, as before.
pub const STREAM_FROM: usize = 64 * 1024;
/// The longest `model` or `purpose` value.
const MAX_FIELD: usize = 1024;

/// Which form: a media upload (`model` field) or a file upload (`purpose`, `file`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormKind {
    /// `/openai/v1/audio/transcriptions` …: the `model` field names the deployment.
    Media,
    /// `/openai/deployments/{d}/audio/transcriptions` …: the path names it; the `model`
    /// field keeps the form's rules but routes nothing.
    MediaInPath,
    Upload,
}

/// What a piece belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Framing between parts.
    Between,
    Model,
    Purpose,
    File,
    Other,
}

/// Why a streamed form is refused (400 `InvalidRequestBody`, see `crate::errors`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadError {
    /// The form itself (the rules of [`crate::multipart`]).
    Form(&'static str),
    /// A line of a `purpose=batch` file.
    Batch(&'static str),
    /// The fields that routing needs did not come before the file.
    FieldsFirst,
}

/// Applies the form's rules to every piece, and finds what routing needs.
#[derive(Debug)]
pub struct Checker {
    kind: FormKind,
    part: Part,
    seen: [bool; 3],
    value: Vec<u8>,
    model_done: bool,
    /// The `model` field (media), or the deployment of a batch file's first line (upload).
    model: Option<String>,
    purpose: Option<Vec<u8>>,
    /// A batch file's content up to its first non-blank line.
    first_line: Vec<u8>,
    max_line: usize,
}

impl Checker {
    /// `max_line`: the longest line of a batch file.
    pub fn new(kind: FormKind, max_line: usize) -> Checker {
        Checker {
            kind,
            part: Part::Between,
            seen: [false; 3],
            value: Vec::new(),
            model_done: false,
            model: None,
            purpose: None,
            first_line: Vec::new(),
            max_line,
        }
    }

    /// Whether the upload is a `purpose=batch` file.
    pub fn is_batch(&self) -> bool {
        self.purpose.as_deref() == Some(b"batch")
    }

    /// The deployment the form names (`model`, or the batch file's lines).
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Whether what routing needs is known: the `model` field has ended (media); `purpose`
    /// has ended and, for a batch file, its first line was read (upload).
    pub fn ready(&self) -> bool {
        match self.kind {
            FormKind::Media => self.model_done,
            FormKind::MediaInPath => true,
            FormKind::Upload => match &self.purpose {
                None => false,
                Some(_) if self.is_batch() => self.model.is_some(),
                Some(_) => true,
            },
        }
    }

    /// Sees the next piece: which part it belongs to (for a [`Piece::PartEnd`], the part it
    /// ends).
    pub fn see(&mut self, piece: &Piece) -> Result<Part, UploadError> {
        match piece {
            Piece::Frame(_) => Ok(Part::Between),
            Piece::Head { name, file, .. } => {
                self.part = self.head(name, *file)?;
                self.value.clear();
                Ok(self.part)
            }
            Piece::Content(b) => {
                match self.part {
                    Part::Model | Part::Purpose => {
                        self.value.extend_from_slice(b);
                        if self.value.len() > MAX_FIELD {
                            return Err(UploadError::Form("a form field is too long"));
                        }
                    }
                    Part::File if self.is_batch() && self.model.is_none() => {
                        self.first_line.extend_from_slice(b);
                        self.find_first_line(false)?;
                    }
                    _ => {}
                }
                Ok(self.part)
            }
            Piece::PartEnd(_) => {
                let part = std::mem::replace(&mut self.part, Part::Between);
                match part {
                    Part::Model => {
                        self.model_done = true;
                        self.model = String::from_utf8(std::mem::take(&mut self.value))
                            .map_err(|_| UploadError::Form("the `model` field is not UTF-8 text"))?
                            .into();
                        self.model = self.model.take().filter(|m| !m.is_empty());
                    }
                    Part::Purpose => self.purpose = Some(std::mem::take(&mut self.value)),
                    Part::File if self.is_batch() && self.model.is_none() => {
                        self.find_first_line(true)?;
                        if self.model.is_none() {
                            return Err(UploadError::Batch("the file has no lines"));
                        }
                    }
                    _ => {}
                }
                Ok(part)
            }
        }
    }

    fn head(&mut self, name: &[u8], file: bool) -> Result<Part, UploadError> {
        let watch = |field: &[u8], want_file: bool, seen: bool| {
            watched(name, file, field, want_file, seen).map_err(UploadError::Form)
        };
        match self.kind {
            FormKind::Media | FormKind::MediaInPath => {
                if watch(b"model", false, self.seen[0])? {
                    self.seen[0] = true;
                    return Ok(Part::Model);
                }
            }
            FormKind::Upload => {
                if watch(b"purpose", false, self.seen[1])? {
                    self.seen[1] = true;
                    return Ok(Part::Purpose);
                }
                if watch(b"file", true, self.seen[2])? {
                    if self.purpose.is_none() {
                        return Err(UploadError::FieldsFirst);
                    }
                    self.seen[2] = true;
                    return Ok(Part::File);
                }
            }
        }
        Ok(Part::Other)
    }

    /// The deployment of the first non-blank line of the batch file read so far (`end`: the
    /// file ended, a last line without a newline counts).
    fn find_first_line(&mut self, end: bool) -> Result<(), UploadError> {
        let mut from = 0;
        loop {
            let rest = &self.first_line[from..];
            let (line, next) = match memchr::memchr(b'\n', rest) {
                Some(i) => (&rest[..i], from + i + 1),
                None if end => (rest, self.first_line.len()),
                None => break,
            };
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() > self.max_line {
                return Err(UploadError::Batch("a line is too long"));
            }
            if !batchfile::is_blank(line) {
                let (_, m) = batchfile::parse_line(line).map_err(UploadError::Batch)?;
                self.model = Some(m);
                self.first_line = Vec::new();
                return Ok(());
            }
            from = next;
            if next >= self.first_line.len() {
                break;
            }
        }
        self.first_line.drain(..from.min(self.first_line.len()));
        if self.first_line.len() > self.max_line {
            return Err(UploadError::Batch("a line is too long"));
        }
        Ok(())
    }
}

/// Renders pieces for one member (see the module's documentation).
#[derive(Debug)]
pub struct Renderer<'a> {
    upstream: &'a str,
    /// A batch file's deployment: its lines are checked and rewritten.
    batch: Option<&'a str>,
    line: Vec<u8>,
    lines: usize,
    max_line: usize,
}

impl<'a> Renderer<'a> {
    /// `upstream`: the member's deployment name; `batch`: the deployment a `purpose=batch`
    /// file's lines must name (`None` for any other form).
    pub fn new(upstream: &'a str, batch: Option<&'a str>, max_line: usize) -> Renderer<'a> {
        Renderer {
            upstream,
            batch,
            line: Vec::new(),
            lines: 0,
            max_line,
        }
    }

    /// Appends what `piece` (of `part`, as [`Checker::see`] said) becomes to `out`.
    pub fn render(
        &mut self,
        part: Part,
        piece: &Piece,
        out: &mut Vec<u8>,
    ) -> Result<(), UploadError> {
        match (piece, part) {
            (Piece::Content(_), Part::Model) => {}
            (Piece::Content(b), Part::File) if self.batch.is_some() => self.lines(b, out)?,
            (Piece::PartEnd(raw), Part::Model) => {
                out.extend_from_slice(self.upstream.as_bytes());
                out.extend_from_slice(raw);
            }
            (Piece::PartEnd(raw), Part::File) if self.batch.is_some() => {
                let last = std::mem::take(&mut self.line);
                self.line_done(&last, out)?;
                if self.lines == 0 {
                    return Err(UploadError::Batch("the file has no lines"));
                }
                out.extend_from_slice(raw);
            }
            (p, _) => out.extend_from_slice(p.raw()),
        }
        Ok(())
    }

    fn lines(&mut self, mut b: &[u8], out: &mut Vec<u8>) -> Result<(), UploadError> {
        while let Some(i) = memchr::memchr(b'\n', b) {
            if self.line.is_empty() {
                self.line_done(&b[..i], out)?;
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&b[..i]);
                self.line_done(&line, out)?;
            }
            b = &b[i + 1..];
        }
        self.line.extend_from_slice(b);
        if self.line.len() > self.max_line {
            return Err(UploadError::Batch("a line is too long"));
        }
        Ok(())
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<u8>) -> Result<(), UploadError> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > self.max_line {
            return Err(UploadError::Batch("a line is too long"));
        }
        if batchfile::is_blank(line) {
            return Ok(());
        }
        let model = self.batch.unwrap_or_default();
        batchfile::rewrite_line(line, model, self.upstream, out).map_err(UploadError::Batch)?;
        self.lines += 1;
        Ok(())
    }
}

/// The length of the body that goes to the member, where it is known before sending: the
/// client's length with the `model` value renamed (media), or as sent (a file of another
/// purpose). A batch file's lines change length as they are rewritten: `None` (chunked).
pub fn upstream_length(
    declared: Option<u64>,
    kind: FormKind,
    batch: bool,
    model: &str,
    upstream: &str,
) -> Option<u64> {
    let n = declared?;
    match kind {
        FormKind::Media | FormKind::MediaInPath => {
            (n + upstream.len() as u64).checked_sub(model.len() as u64)
        }
        FormKind::Upload if batch => None,
        FormKind::Upload => Some(n),
    }
}

/// Every piece's bytes, concatenated (the body as held).
pub fn concat(pieces: &[(Part, Piece)], rest: &[u8]) -> Bytes {
    let mut out =
        Vec::with_capacity(pieces.iter().map(|(_, p)| p.len()).sum::<usize>() + rest.len());
    for (_, p) in pieces {
        out.extend_from_slice(p.raw());
    }
    out.extend_from_slice(rest);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::multipart::Scanner;

    const B: &str = "xYzZY";

    fn form(fields: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut b = Vec::new();
        for (name, filename, content) in fields {
            let disp = match filename {
                Some(f) => format!("form-data; name=\"{name}\"; filename=\"{f}\""),
                None => format!("form-data; name=\"{name}\""),
            };
            b.extend_from_slice(format!("--{B}\r\nContent-Disposition: {disp}\r\n\r\n").as_bytes());
            b.extend_from_slice(content);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(format!("--{B}--\r\n").as_bytes());
        b
    }

    /// Scans `body` in pieces of `split` bytes, checks and renders it for `upstream`.
    fn run(
        kind: FormKind,
        body: &[u8],
        split: usize,
        upstream: &str,
    ) -> Result<(Option<String>, Vec<u8>), UploadError> {
        let mut s = Scanner::new(B);
        let mut c = Checker::new(kind, 1 << 20);
        let mut parts = Vec::new();
        for chunk in body.chunks(split) {
            s.push(chunk);
            while let Some(p) = s.next(false).map_err(UploadError::Form)? {
                parts.push((c.see(&p)?, p));
            }
        }
        while let Some(p) = s.next(true).map_err(UploadError::Form)? {
            parts.push((c.see(&p)?, p));
        }
        assert!(c.ready(), "not ready at the end");
        let model = c.model().map(str::to_string);
        let batch = c.is_batch().then(|| model.clone().unwrap_or_default());
        let mut r = Renderer::new(upstream, batch.as_deref(), 1 << 20);
        let mut out = Vec::new();
        for (part, p) in &parts {
            r.render(*part, p, &mut out)?;
        }
        // The pieces are the body byte for byte.
        assert_eq!(&concat(&parts, &[])[..], body);
        Ok((model, out))
    }

    fn line(m: &str, i: usize) -> String {
        format!(
            r#"{{"custom_id":"r{i}","method":"POST","url":"/chat/completions","body":{{"model":"{m}","messages":[]}}}}"#
        )
    }

    #[test]
    fn media_model_is_renamed_in_any_split_and_the_length_follows() {
        let audio: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let body = form(&[("model", None, b"whisper"), ("file", Some("a.wav"), &audio)]);
        for split in [1, 2, 7, 100, 4096, body.len()] {
            let (model, out) = run(FormKind::Media, &body, split, "whisper-eastus").unwrap();
            assert_eq!(model.as_deref(), Some("whisper"));
            let want = form(&[
                ("model", None, b"whisper-eastus"),
                ("file", Some("a.wav"), &audio),
            ]);
            assert_eq!(out, want, "split {split}");
            let n = upstream_length(
                Some(body.len() as u64),
                FormKind::Media,
                false,
                "whisper",
                "whisper-eastus",
            );
            assert_eq!(n, Some(want.len() as u64));
        }
    }

    #[test]
    fn media_form_rules_hold_after_the_model_too() {
        let twice = form(&[
            ("model", None, b"a"),
            ("file", Some("x"), b"1"),
            ("model", None, b"b"),
        ]);
        let cased = form(&[("model", None, b"a"), ("MODEL", None, b"b")]);
        for bad in [twice, cased] {
            assert_eq!(
                run(FormKind::Media, &bad, 3, "u").unwrap_err(),
                UploadError::Form("the form must have one `model` field")
            );
        }
    }

    #[test]
    fn batch_lines_are_checked_and_rewritten_as_they_stream() {
        let file = format!(
            "\n\r\n{}\r\n\n{}\n{}",
            line("d", 0),
            line("d", 1),
            line("d", 2)
        );
        let body = form(&[
            ("purpose", None, b"batch"),
            ("file", Some("b.jsonl"), file.as_bytes()),
        ]);
        for split in [1, 5, 64, body.len()] {
            let (model, out) = run(FormKind::Upload, &body, split, "d-east").unwrap();
            assert_eq!(model.as_deref(), Some("d"));
            // The same as the whole-body rewrite.
            let want_file = batchfile::rewrite(file.as_bytes(), "d-east");
            let want = form(&[
                ("purpose", None, b"batch"),
                ("file", Some("b.jsonl"), &want_file),
            ]);
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&want),
                "split {split}"
            );
        }
        // A bad line deep in the file is found by the renderer; another deployment too.
        for bad in ["not json", &line("other", 9)] {
            let file = format!("{}\n{}\n{bad}\n", line("d", 0), line("d", 1));
            let body = form(&[
                ("purpose", None, b"batch"),
                ("file", Some("b.jsonl"), file.as_bytes()),
            ]);
            assert!(
                matches!(
                    run(FormKind::Upload, &body, 10, "e"),
                    Err(UploadError::Batch(_))
                ),
                "{bad}"
            );
        }
        // A file of another purpose passes untouched; `purpose` must come first.
        let body = form(&[
            ("purpose", None, b"assistants"),
            ("file", Some("n.txt"), b"not json"),
        ]);
        assert_eq!(run(FormKind::Upload, &body, 9, "e").unwrap().1, body);
        let late = form(&[
            ("file", Some("b.jsonl"), line("d", 0).as_bytes()),
            ("purpose", None, b"batch"),
        ]);
        assert_eq!(
            run(FormKind::Upload, &late, 9, "e").unwrap_err(),
            UploadError::FieldsFirst
        );
        let blank = form(&[
            ("purpose", None, b"batch"),
            ("file", Some("b.jsonl"), b"\n\n"),
        ]);
        assert_eq!(
            run(FormKind::Upload, &blank, 9, "e").unwrap_err(),
            UploadError::Batch("the file has no lines")
        );
    }

    #[test]
    fn lengths() {
        use FormKind::*;
        assert_eq!(
            upstream_length(Some(100), Media, false, "abc", "abcdef"),
            Some(103)
        );
        assert_eq!(
            upstream_length(Some(100), Upload, false, "", "x"),
            Some(100)
        );
        assert_eq!(upstream_length(Some(100), Upload, true, "d", "x"), None);
        assert_eq!(upstream_length(None, Media, false, "d", "x"), None);
    }
}
