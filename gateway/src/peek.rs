//! The few top-level fields of a JSON request body the gateway routes on (`model`,
//! `stream`, `stream_options.include_usage`), read in one validating pass.
//!
//! serde's generic path (field identification, `IgnoredAny` over the messages) cost more
//! instructions than any other step of a request (measured with callgrind). This reader
//! accepts a strict subset of JSON — everything it accepts serde accepts too, with the same
//! fields — and answers `None` ("not sure") for anything outside it: a key written with
//! escapes, a repeated routing field, an escaped `model`, numbers with exponents or many
//! digits, `\u` escapes of surrogates, control characters, invalid UTF-8, deep nesting,
//! trailing bytes. The caller then asks serde, which decides (and words the error).

/// What the reader found at the top level of a body that is a JSON object.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Peeked<'a> {
    /// `model`, when it is a string (written without escapes).
    pub model: Option<&'a str>,
    /// `stream`, when it is `true` or `false`.
    pub stream: Option<bool>,
    /// `stream_options.include_usage`, when it is `true` or `false`.
    pub include_usage: Option<bool>,
}

/// Deeper than this is left to serde (its own limit is 128).
const MAX_DEPTH: usize = 100;
/// Numbers with more digits than this are left to serde (it checks their range).
const MAX_DIGITS: usize = 15;

/// Reads `body`; `None`: not sure, ask serde.
pub fn top_level(body: &[u8]) -> Option<Peeked<'_>> {
    let mut r = Reader {
        b: body,
        i: 0,
        non_ascii: false,
    };
    r.ws();
    if r.next()? != b'{' {
        return None;
    }
    let mut out = Peeked::default();
    let (mut model, mut stream, mut options) = (false, false, false);
    r.ws();
    if r.peek()? == b'}' {
        r.i += 1;
    } else {
        loop {
            let key = r.plain_string()?;
            r.ws();
            if r.next()? != b':' {
                return None;
            }
            r.ws();
            match key {
                b"model" => {
                    if std::mem::replace(&mut model, true) {
                        return None;
                    }
                    if r.peek()? == b'"' {
                        let s = r.plain_string()?;
                        out.model = Some(std::str::from_utf8(s).ok()?);
                    } else {
                        r.value(1)?;
                    }
                }
                b"stream" => {
                    if std::mem::replace(&mut stream, true) {
                        return None;
                    }
                    out.stream = r.value(1)?;
                }
                b"stream_options" => {
                    if std::mem::replace(&mut options, true) {
                        return None;
                    }
                    if r.peek()? == b'{' {
                        out.include_usage = r.options()?;
                    } else {
                        r.value(1)?;
                    }
                }
                _ => {
                    r.value(1)?;
                }
            }
            r.ws();
            match r.next()? {
                b',' => r.ws(),
                b'}' => break,
                _ => return None,
            }
        }
    }
    r.ws();
    if r.i != r.b.len() {
        return None;
    }
    // Bytes above ASCII only ever sit inside strings (the grammar has no other place for
    // them); when there were any, the whole body must be UTF-8.
    if r.non_ascii && std::str::from_utf8(body).is_err() {
        return None;
    }
    Some(out)
}

/// Bytes that end a run of plain string characters: `"`, `\`, control characters, and
/// (to note them) bytes above ASCII.
const STOP: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = i < 0x20 || i == b'"' as usize || i == b'\\' as usize || i >= 0x80;
        i += 1;
    }
    t
};

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
    /// A byte above ASCII was seen (inside a string).
    non_ascii: bool,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Some(())
        } else {
            None
        }
    }

    /// Reads a string's characters up to the first `"`, `\\` or control character (the
    /// opening quote already read); returns that byte.
    fn run(&mut self) -> Option<u8> {
        loop {
            let c = *self.b.get(self.i)?;
            self.i += 1;
            if STOP[usize::from(c)] {
                if c >= 0x80 {
                    self.non_ascii = true;
                    continue;
                }
                return Some(c);
            }
        }
    }

    /// A string without escapes or control characters; its contents.
    fn plain_string(&mut self) -> Option<&'a [u8]> {
        if self.next()? != b'"' {
            return None;
        }
        let start = self.i;
        match self.run()? {
            b'"' => Some(&self.b[start..self.i - 1]),
            _ => None,
        }
    }

    /// Any string: escapes are checked (`\u` of a surrogate is left to serde).
    fn string(&mut self) -> Option<()> {
        if self.next()? != b'"' {
            return None;
        }
        loop {
            match self.run()? {
                b'"' => return Some(()),
                b'\\' => match self.next()? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                    b'u' => {
                        let hex = self.b.get(self.i..self.i + 4)?;
                        if !hex.iter().all(u8::is_ascii_hexdigit) {
                            return None;
                        }
                        let unit = hex
                            .iter()
                            .fold(0u32, |n, &h| n * 16 + (h as char).to_digit(16).unwrap_or(0));
                        if (0xd800..=0xdfff).contains(&unit) {
                            return None;
                        }
                        self.i += 4;
                    }
                    _ => return None,
                },
                // A control character.
                _ => return None,
            }
        }
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)?`, at most [`MAX_DIGITS`] digits, no exponent.
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        let digits = |r: &mut Self| {
            let n = r.b[r.i..].iter().take_while(|c| c.is_ascii_digit()).count();
            r.i += n;
            n
        };
        let first = self.peek()?;
        let int = digits(self);
        if int == 0 || (first == b'0' && int > 1) {
            return None;
        }
        let mut total = int;
        if self.peek() == Some(b'.') {
            self.i += 1;
            let frac = digits(self);
            if frac == 0 {
                return None;
            }
            total += frac;
        }
        if total > MAX_DIGITS || matches!(self.peek(), Some(b'e' | b'E')) {
            return None;
        }
        Some(())
    }

    /// Any value; `Some(Some(b))` for `true`/`false`.
    fn value(&mut self, depth: usize) -> Option<Option<bool>> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => self.string()?,
            b't' => {
                self.literal(b"true")?;
                return Some(Some(true));
            }
            b'f' => {
                self.literal(b"false")?;
                return Some(Some(false));
            }
            b'n' => self.literal(b"null")?,
            b'-' | b'0'..=b'9' => self.number()?,
            b'[' => {
                self.i += 1;
                self.ws();
                if self.peek()? == b']' {
                    self.i += 1;
                } else {
                    loop {
                        self.value(depth + 1)?;
                        self.ws();
                        match self.next()? {
                            b',' => self.ws(),
                            b']' => break,
                            _ => return None,
                        }
                    }
                }
            }
            b'{' => {
                self.i += 1;
                self.ws();
                if self.peek()? == b'}' {
                    self.i += 1;
                } else {
                    loop {
                        self.string()?;
                        self.ws();
                        if self.next()? != b':' {
                            return None;
                        }
                        self.ws();
                        self.value(depth + 1)?;
                        self.ws();
                        match self.next()? {
                            b',' => self.ws(),
                            b'}' => break,
                            _ => return None,
                        }
                    }
                }
            }
            _ => return None,
        }
        Some(None)
    }

    /// The `stream_options` object; its `include_usage` when that is `true` or `false`.
    /// (serde keeps the last of repeated keys here; a repeat is left to it.)
    fn options(&mut self) -> Option<Option<bool>> {
        self.i += 1;
        self.ws();
        let mut include_usage = None;
        let mut seen = false;
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(None);
        }
        loop {
            let key = self.plain_string()?;
            self.ws();
            if self.next()? != b':' {
                return None;
            }
            self.ws();
            let v = self.value(2)?;
            if key == b"include_usage" {
                if std::mem::replace(&mut seen, true) {
                    return None;
                }
                include_usage = v;
            }
            self.ws();
            match self.next()? {
                b',' => self.ws(),
                b'}' => return Some(include_usage),
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// What serde makes of a body, the way `RequestBody::inspect` reads it.
    fn serde_view(body: &[u8]) -> Option<(Option<String>, Option<bool>, Option<bool>)> {
        #[derive(serde::Deserialize)]
        struct Peek {
            #[serde(default)]
            model: Option<Value>,
            #[serde(default)]
            stream: Option<Value>,
            #[serde(default)]
            stream_options: Option<Value>,
        }
        let p: Peek = serde_json::from_slice(body).ok()?;
        Some((
            p.model.and_then(|m| match m {
                Value::String(s) => Some(s),
                _ => None,
            }),
            p.stream.and_then(|v| v.as_bool()),
            p.stream_options
                .as_ref()
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool),
        ))
    }

    /// Whatever the reader accepts, serde accepts with the same fields.
    fn agrees(body: &[u8]) -> bool {
        let Some(p) = top_level(body) else {
            return true;
        };
        let ours = (p.model.map(str::to_string), p.stream, p.include_usage);
        assert_eq!(
            serde_view(body),
            Some(ours),
            "{}",
            String::from_utf8_lossy(body)
        );
        true
    }

    const READ: &[&str] = &[
        r#"{"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello in five words."}],"max_tokens":32}"#,
        r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}"#,
        r#" { "model" : "x" , "stream" : false , "stream_options" : { } } "#,
        r#"{"stream":true,"stream_options":{"include_usage":false,"other":[1,2]}}"#,
        "{\"messages\":[{\"role\":\"user\",\"content\":\"line one\\nline \\\"two\\\" \\u00e9 \\/ \\t\"}]}",
        r#"{"messages":[{"content":"日本語のテキスト, émojis 🙂"}],"temperature":0.7,"top_p":1,"n":-1,"x":null}"#,
        r#"{"a":{"b":{"c":[[],{},[{}],"",0,-0,0.5,-12.25]}},"stream":"yes","model":5}"#,
        r#"{"input":"text","model":"","stream":null,"stream_options":null}"#,
        "{}",
        " {\t}\r\n",
    ];

    #[test]
    fn usual_bodies_are_read_without_serde_and_agree_with_it() {
        for body in READ {
            assert!(top_level(body.as_bytes()).is_some(), "{body}");
            assert!(agrees(body.as_bytes()));
        }
        let p = top_level(READ[1].as_bytes()).unwrap();
        assert_eq!(
            p,
            Peeked {
                model: Some("gpt-4o"),
                stream: Some(true),
                include_usage: Some(true)
            }
        );
    }

    #[test]
    fn anything_unusual_is_left_to_serde() {
        for body in [
            r#"{"model":"a","model":"b"}"#,
            r#"{"stream":true,"stream":false}"#,
            r#"{"stream_options":{"include_usage":true,"include_usage":false}}"#,
            r#"{"mod\u0065l":"x"}"#,
            r#"{"model":"gpt\u002d4o"}"#,
            r#"{"n":1e5}"#,
            r#"{"n":12345678901234567890}"#,
            r#"{"s":"\ud83d\ude00"}"#,
            r#"{"s":"\ud83d"}"#,
            "{\"s\":\"tab\there\"}",
            r#"{"a":1,}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":01}"#,
            r#"{"a":.5}"#,
            r#"{"a":1.}"#,
            r#"{"a":+1}"#,
            r#"{"a":"\x"}"#,
            r#"{"a":"\u12g4"}"#,
            r#"{"a":"\u+123"}"#,
            r#"{"a":tru}"#,
            r#"{"a":1} x"#,
            r#"{"a":1}{}"#,
            r#"{"a" 1}"#,
            r#"{a:1}"#,
            r#"{"a":"unterminated}"#,
            r#"["not","an","object"]"#,
            "",
            "{",
        ] {
            assert_eq!(top_level(body.as_bytes()), None, "{body}");
        }
        assert_eq!(top_level(b"{\"a\":\"\xff\"}"), None, "invalid UTF-8");
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(150), "]".repeat(150));
        assert_eq!(top_level(deep.as_bytes()), None);
        let fine = format!("{{\"a\":{}1{}}}", "[".repeat(50), "]".repeat(50));
        assert!(top_level(fine.as_bytes()).is_some());
    }

    #[test]
    fn mutated_bodies_are_never_accepted_when_serde_refuses_them() {
        // Every single-byte change of the usual bodies (to a set of JSON-significant bytes):
        // what the reader accepts, serde accepts with the same fields.
        let alphabet = b"{}[]\",:\\ -0123456789.eE+tfnul\n\x01x";
        let mut accepted = 0;
        for body in READ {
            let body = body.as_bytes();
            for i in 0..body.len() {
                for &c in alphabet {
                    let mut m = body.to_vec();
                    m[i] = c;
                    if top_level(&m).is_some() {
                        accepted += 1;
                    }
                    assert!(agrees(&m));
                    // And with the byte removed.
                    let mut d = body.to_vec();
                    d.remove(i);
                    assert!(agrees(&d));
                }
            }
        }
        assert!(accepted > 1000, "the mutations exercise the accepting path");
    }
}
