//! A small validating JSON reader for the few fields read from every request and response
//! (the request body's routing fields, a response's usage object).
//!
//! serde's generic path (field identification, `IgnoredAny`) cost more instructions than
//! any other step of a request (measured with callgrind). This reader accepts a strict
//! subset of JSON — everything it accepts serde accepts too — and answers `None` ("not
//! sure") for anything outside it: numbers with exponents or many digits, `\u` escapes of
//! surrogates, control characters in strings, deep nesting. Its callers then ask serde,
//! which decides (and words the error).

/// Deeper than this is left to serde (its own limit is 128).
const MAX_DEPTH: usize = 100;
/// Numbers with more digits than this are left to serde (it checks their range).
const MAX_DIGITS: usize = 15;

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

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The bytes of `w` (little-endian) that JSON requires escaped in a string — below 0x20,
/// `"`, `\` — as their high bits. Bits above the first such byte may be set wrongly; the
/// lowest set bit is always the first one ("some byte is below `n`" is exact up to the first
/// one that is, for `n` <= 0x80).
fn escape_bits(w: u64) -> u64 {
    let below = |w: u64, n: u64| w.wrapping_sub(ONES * n) & !w & HIGH;
    below(w, 0x20) | below(w ^ (ONES * 0x22), 1) | below(w ^ (ONES * 0x5c), 1)
}

/// [`escape_bits`] and the bytes above ASCII: the bytes of `w` that are in [`STOP`].
fn stop_bits(w: u64) -> u64 {
    w & HIGH | escape_bits(w)
}

/// Whether any byte of a string needs an escape in JSON (`"`, `\`, below 0x20), eight
/// bytes at a time.
pub fn needs_escape(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        if escape_bits(u64::from_le_bytes(word.try_into().expect("eight bytes"))) != 0 {
            return true;
        }
    }
    words
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// A position in a JSON text. Every method answers `None` for "not sure".
pub struct Reader<'a> {
    b: &'a [u8],
    i: usize,
    /// A byte above ASCII was seen (only strings can hold one).
    non_ascii: bool,
}

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Reader {
            b,
            i: 0,
            non_ascii: false,
        }
    }

    pub fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    pub fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// Whether a byte above ASCII was read so far.
    pub fn saw_non_ascii(&self) -> bool {
        self.non_ascii
    }

    /// Only whitespace is left, and the whole text is UTF-8 (checked only when a byte above
    /// ASCII was seen: the grammar has no other place for one than inside strings).
    pub fn end(mut self) -> Option<()> {
        self.ws();
        if self.i != self.b.len() || (self.non_ascii && std::str::from_utf8(self.b).is_err()) {
            return None;
        }
        Some(())
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Some(())
        } else {
            None
        }
    }

    /// Reads a string's characters up to the first `"`, `\` or control character (the
    /// opening quote already read); returns that byte. Plain ASCII is skipped eight bytes at
    /// a time, up to the first byte of a word that may stop the run.
    fn run(&mut self) -> Option<u8> {
        loop {
            while let Some(word) = self.b.get(self.i..self.i + 8) {
                let stops = stop_bits(u64::from_le_bytes(word.try_into().expect("eight bytes")));
                if stops != 0 {
                    self.i += stops.trailing_zeros() as usize / 8;
                    break;
                }
                self.i += 8;
            }
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
    pub fn plain_string(&mut self) -> Option<&'a [u8]> {
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
        let first = self.peek()?;
        let int = self.digits();
        if int == 0 || (first == b'0' && int > 1) {
            return None;
        }
        let mut total = int;
        if self.peek() == Some(b'.') {
            self.i += 1;
            let frac = self.digits();
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

    fn digits(&mut self) -> usize {
        let n = self.b[self.i..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        self.i += n;
        n
    }

    /// An unsigned integer (at most 19 digits, so it fits a `u64`) or `null`.
    pub fn uint_or_null(&mut self) -> Option<Option<u64>> {
        if self.peek()? == b'n' {
            self.literal(b"null")?;
            return Some(None);
        }
        // The digits and their value in one pass (wrapping: a value is only kept with at
        // most 19 digits, which fit).
        let start = self.i;
        let mut v = 0u64;
        while let Some(&c) = self.b.get(self.i) {
            let d = c.wrapping_sub(b'0');
            if d > 9 {
                break;
            }
            v = v.wrapping_mul(10).wrapping_add(u64::from(d));
            self.i += 1;
        }
        let n = self.i - start;
        if n == 0 || n > 19 || (n > 1 && self.b[start] == b'0') {
            return None;
        }
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        Some(Some(v))
    }

    /// Any value; `Some(Some(b))` for `true`/`false`.
    pub fn value(&mut self, depth: usize) -> Option<Option<bool>> {
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
            b'{' => self.members(|r, _| r.value(depth + 1).map(drop))?,
            _ => return None,
        }
        Some(None)
    }

    /// The object at this position, member by member: `member` reads the value of each key
    /// (written without escapes; an escaped key is left to serde).
    pub fn members(
        &mut self,
        mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>,
    ) -> Option<()> {
        if self.next()? != b'{' {
            return None;
        }
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            let key = self.plain_string()?;
            self.ws();
            if self.next()? != b':' {
                return None;
            }
            self.ws();
            member(self, key)?;
            self.ws();
            match self.next()? {
                b',' => self.ws(),
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }
}

/// Marks a key as seen; `None` when it was already (serde's derive refuses a repeated
/// field, and maps keep the last: either way, left to serde).
pub fn first_time(seen: &mut bool) -> Option<()> {
    (!std::mem::replace(seen, true)).then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_word_at_a_time_check_finds_the_first_stop_byte() {
        let first = |word: [u8; 8]| match stop_bits(u64::from_le_bytes(word)) {
            0 => None,
            bits => Some(bits.trailing_zeros() as usize / 8),
        };
        for b in 0..=255u8 {
            for at in 0..8 {
                let mut word = *b"abcdefgh";
                word[at] = b;
                let want = STOP[usize::from(b)].then_some(at);
                assert_eq!(first(word), want, "byte {b:#04x} at {at}");
                // Whatever follows it, the first stop byte is where it is.
                for later in 0..=255u8 {
                    for after in at + 1..8 {
                        let mut w = word;
                        w[after] = later;
                        let want = want.or(STOP[usize::from(later)].then_some(after));
                        assert_eq!(first(w), want, "{b:#04x} at {at}, {later:#04x} at {after}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_word_at_a_time_check_finds_every_byte_that_needs_an_escape() {
        let naive = |b: &[u8]| b.iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\');
        // Every byte value at every position of strings of 1..=24 bytes, in a background of
        // plain ASCII or of bytes above 0x7f (which never need an escape).
        for background in [b'a', 0x80, 0xff, b'!', b'#', b'[', b']', b' '] {
            for len in 1..=24 {
                for pos in 0..len {
                    for c in 0..=255u8 {
                        let mut v = vec![background; len];
                        v[pos] = c;
                        assert_eq!(needs_escape(&v), naive(&v), "{v:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn strings_end_where_their_first_stop_byte_is_at_any_position() {
        for len in 0..40 {
            let text = "x".repeat(len);
            // The closing quote after `len` plain bytes, and more text after it.
            let s = format!("\"{text}\"rest");
            let mut r = Reader::new(s.as_bytes());
            assert_eq!(r.plain_string(), Some(text.as_bytes()), "len {len}");
            assert_eq!(r.peek(), Some(b'r'));
            // A control character or a backslash there ends a plain string.
            for stop in ["\n", "\u{1}", "\\n"] {
                let s = format!("\"{text}{stop}\"");
                assert_eq!(Reader::new(s.as_bytes()).plain_string(), None, "{s:?}");
            }
            // A byte above ASCII there is part of the string, and noted.
            let s = format!("\"{text}é{text}\"");
            let mut r = Reader::new(s.as_bytes());
            assert_eq!(r.plain_string(), Some(format!("{text}é{text}").as_bytes()));
            assert!(r.saw_non_ascii());
            // Unterminated: not sure.
            let s = format!("\"{text}");
            assert_eq!(Reader::new(s.as_bytes()).plain_string(), None);
        }
    }

    fn value(s: &str) -> Option<Option<bool>> {
        let mut r = Reader::new(s.as_bytes());
        r.ws();
        let v = r.value(1)?;
        r.end()?;
        Some(v)
    }

    #[test]
    fn values_in_the_subset_are_read_and_the_rest_is_left_alone() {
        for ok in [
            "0",
            "-0",
            "12.5",
            "-1.25",
            "\"\"",
            "\"a \\\"b\\\" \\u00e9 \\/\"",
            "null",
            "[]",
            "{}",
            "[1,{\"a\":[null,\"x\"]}]",
            " [ 1 , 2 ] ",
            "\"日本\"",
        ] {
            assert_eq!(value(ok), Some(None), "{ok}");
        }
        assert_eq!(value("true"), Some(Some(true)));
        assert_eq!(value("false"), Some(Some(false)));
        for unsure in [
            "1e5",
            "01",
            ".5",
            "1.",
            "+1",
            "1234567890123456",
            "\"\\ud83d\"",
            "\"\\x\"",
            "\"\\u12g4\"",
            "\"tab\there\"",
            "tru",
            "[1,]",
            "{\"a\":1,}",
            "{a:1}",
            "1 2",
            "",
            "\"open",
            "[",
        ] {
            assert_eq!(value(unsure), None, "{unsure}");
        }
        assert_eq!(value("\"\u{e9}\""), Some(None));
        assert_eq!(Reader::new(b"\"\xff\"").end(), None);
        let mut r = Reader::new(b"\"\xff\"");
        assert_eq!(r.value(1), Some(None));
        assert!(r.saw_non_ascii());
        assert_eq!(r.end(), None, "invalid UTF-8");
        let deep = format!("{}1{}", "[".repeat(150), "]".repeat(150));
        assert_eq!(value(&deep), None);
        let fine = format!("{}1{}", "[".repeat(50), "]".repeat(50));
        assert_eq!(value(&fine), Some(None));
    }

    /// Whether the reader accepts a whole document; whatever it accepts, serde accepts (as a
    /// `Value`: every string's UTF-8 checked, unlike serde's `IgnoredAny`).
    fn reader_accepts(b: &[u8]) -> bool {
        let mut r = Reader::new(b);
        r.ws();
        let ours = r.value(1).is_some() && r.end().is_some();
        if ours {
            assert!(
                serde_json::from_slice::<serde_json::Value>(b).is_ok(),
                "accepted what serde refuses: {}",
                String::from_utf8_lossy(b)
            );
        }
        ours
    }

    #[test]
    fn text_that_is_not_utf8_is_refused_wherever_it_is() {
        let bad: [&[u8]; 9] = [
            b"\xff",
            b"\xfe\xff",
            b"\x80",
            b"\xc3",
            b"\xe6\x97",
            b"\xed\xa0\x80",
            b"\xf4\x90\x80\x80",
            b"\xc0\xaf",
            b"\xf0\x9f\x99",
        ];
        let good = ["é", "日本", "🙂", "Grüße"];
        // At every offset from the word-at-a-time boundaries, in a value and in a key.
        for pad in 0..17 {
            let p = "x".repeat(pad);
            for (open, close) in [
                (format!("[\"{p}"), format!("{p}\"]")),
                (format!("{{\"k\":\"{p}"), format!("\\n{p}\"}}")),
                (format!("{{\"{p}"), "\":[1,{}]}".to_string()),
                (format!("\"{p}"), format!("\\u00e9{p}\"")),
            ] {
                for b in bad {
                    let text = [open.as_bytes(), b, close.as_bytes()].concat();
                    let mut r = Reader::new(&text);
                    // The grammar is read (not sure of nothing yet) ...
                    assert_eq!(r.value(1), Some(None), "{text:?}");
                    assert!(r.saw_non_ascii());
                    // ... and the end refuses it.
                    assert_eq!(r.end(), None, "{text:?}");
                    assert!(serde_json::from_slice::<serde_json::Value>(&text).is_err());
                }
                for g in good {
                    let text = format!("{open}{g}{close}");
                    assert_eq!(value(&text), Some(None), "{text}");
                    assert!(reader_accepts(text.as_bytes()));
                }
            }
        }
    }

    #[test]
    fn mutated_values_are_never_accepted_when_serde_refuses_them() {
        let docs = [
            r#"{"messages":[{"role":"user","content":"Grüße, 日本 🙂 \n\u00e9"}],"n":-1.5,"x":[true,false,null]}"#,
            r#"["é",{"日本":"語"},"🙂",0]"#,
        ];
        let alphabet = b"{}[]\",:\\ -0123456789.eEtfnul\n\x01x\x80\xbf\xc3\xe6\xf0\xff";
        let mut accepted = 0;
        for doc in docs {
            let doc = doc.as_bytes();
            for i in 0..doc.len() {
                for &c in alphabet {
                    let mut m = doc.to_vec();
                    m[i] = c;
                    accepted += usize::from(reader_accepts(&m));
                    let mut d = doc.to_vec();
                    d.remove(i);
                    reader_accepts(&d);
                }
            }
        }
        assert!(accepted > 100, "the mutations exercise the accepting path");
    }

    #[test]
    fn unsigned_integers_fit_a_u64_or_are_left_alone() {
        let read = |s: &str| Reader::new(s.as_bytes()).uint_or_null();
        assert_eq!(read("0"), Some(Some(0)));
        assert_eq!(read("16,"), Some(Some(16)));
        assert_eq!(
            read("9999999999999999999"),
            Some(Some(9_999_999_999_999_999_999))
        );
        assert_eq!(read("null"), Some(None));
        for unsure in [
            "18446744073709551615",
            "01",
            "1.0",
            "1e2",
            "-1",
            "\"1\"",
            "x",
            "",
        ] {
            assert_eq!(read(unsure), None, "{unsure}");
        }
    }

    #[test]
    fn members_are_visited_in_order_and_malformed_objects_refused() {
        let mut keys = Vec::new();
        let mut r = Reader::new(br#"{ "a" : 1 , "b":[true], "c":{} }"#);
        r.members(|r, k| {
            keys.push(String::from_utf8(k.to_vec()).unwrap());
            r.value(1).map(drop)
        })
        .unwrap();
        assert_eq!(keys, ["a", "b", "c"]);
        for bad in [
            r#"{"a":1,}"#,
            r#"{"a" 1}"#,
            r#"{"a\u0062":1}"#,
            r#"{"a":1"#,
            "[]",
        ] {
            let mut r = Reader::new(bad.as_bytes());
            assert_eq!(r.members(|r, _| r.value(1).map(drop)), None, "{bad}");
        }
        let mut seen = false;
        assert_eq!(first_time(&mut seen), Some(()));
        assert_eq!(first_time(&mut seen), None);
    }
}
