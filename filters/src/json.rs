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

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The bytes of `w` (little-endian) that JSON requires escaped in a string — below 0x20,
/// `"`, `\` — as their high bits. Bits above the first such byte may be set wrongly; the
/// lowest set bit is always the first one ("some byte is below `n`" is exact up to the first
/// one that is, for `n` <= 0x80). Bytes above ASCII are never marked.
fn escape_bits(w: u64) -> u64 {
    let below = |w: u64, n: u64| w.wrapping_sub(ONES * n) & !w & HIGH;
    below(w, 0x20) | below(w ^ (ONES * 0x22), 1) | below(w ^ (ONES * 0x5c), 1)
}

/// The eight bytes at `i` as a little-endian word, when there are eight.
#[inline(always)]
fn word_at(b: &[u8], i: usize) -> Option<u64> {
    let w: [u8; 8] = b.get(i..i.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(w))
}

/// Whether any byte of a string needs an escape in JSON (`"`, `\`, below 0x20), eight
/// bytes at a time.
pub fn needs_escape(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        if escape_bits(u64::from_le_bytes(w)) != 0 {
            return true;
        }
    }
    words
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// JSON's whitespace (RFC 8259 §2).
#[inline(always)]
fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

/// The first position at or after `i` that is not whitespace (`i` itself in compact text:
/// one compare, every byte of a token being above the space).
#[inline(always)]
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(&c) = b.get(i) {
        if c > b' ' || !is_ws(c) {
            break;
        }
        i += 1;
    }
    i
}

/// A string's characters from `i` (after its opening quote or an escape) up to the first
/// `"`, `\` or control character: its position and the byte. Plain text, ASCII or not, is
/// passed eight bytes at a time; `non_ascii` is set when a byte above ASCII was passed.
/// `None`: the text ended first.
#[inline(always)]
fn run(b: &[u8], mut i: usize, non_ascii: &mut bool) -> Option<(usize, u8)> {
    let mut high = 0u64;
    while let Some(w) = word_at(b, i) {
        let stops = escape_bits(w);
        if stops != 0 {
            // The bytes before the first stop byte are the string's.
            let at = stops.trailing_zeros() / 8;
            high |= w & ((1u64 << (at * 8)) - 1);
            *non_ascii |= high & HIGH != 0;
            return Some((i + at as usize, (w >> (at * 8)) as u8));
        }
        high |= w;
        i += 8;
    }
    *non_ascii |= high & HIGH != 0;
    // Fewer than eight bytes left.
    while let Some(&c) = b.get(i) {
        if c >= 0x80 {
            *non_ascii = true;
        } else if c < 0x20 || c == b'"' || c == b'\\' {
            return Some((i, c));
        }
        i += 1;
    }
    None
}

/// The rest of a string from `i` (after its opening quote): escapes are checked (`\u` of a
/// surrogate is left to serde); the position after its closing quote.
#[inline(always)]
fn string(b: &[u8], mut i: usize, non_ascii: &mut bool) -> Option<usize> {
    loop {
        let (at, c) = run(b, i, non_ascii)?;
        match c {
            b'"' => return Some(at + 1),
            b'\\' => i = escape(b, at + 1)?,
            // A control character.
            _ => return None,
        }
    }
}

/// The escape after a backslash at `i - 1`; the position after it.
fn escape(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(i + 1),
        b'u' => {
            let hex = b.get(i + 1..i + 5)?;
            let mut unit = 0u32;
            for &h in hex {
                unit = unit * 16 + (h as char).to_digit(16)?;
            }
            if (0xd800..=0xdfff).contains(&unit) {
                return None;
            }
            Some(i + 5)
        }
        _ => None,
    }
}

/// A key at `i` — a string without escapes, whitespace, `:`, whitespace: where the key's
/// text is and the position of the value.
#[inline(always)]
fn key(b: &[u8], i: usize, non_ascii: &mut bool) -> Option<(std::ops::Range<usize>, usize)> {
    if *b.get(i)? != b'"' {
        return None;
    }
    let (end, c) = run(b, i + 1, non_ascii)?;
    if c != b'"' {
        return None;
    }
    let colon = skip_ws(b, end + 1);
    if *b.get(colon)? != b':' {
        return None;
    }
    Some((i + 1..end, skip_ws(b, colon + 1)))
}

/// `word` at `i`; the position after it.
#[inline(always)]
fn literal(b: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    b.get(i..)?.starts_with(word).then_some(i + word.len())
}

/// The end of the run of ASCII digits at `i`.
#[inline(always)]
fn digits(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    i
}

/// `-? (0 | [1-9][0-9]*) (. [0-9]+)?` at `i`, at most [`MAX_DIGITS`] digits, no exponent;
/// the position after it.
fn number(b: &[u8], mut i: usize) -> Option<usize> {
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    let start = i;
    i = digits(b, i);
    let int = i - start;
    if int == 0 || (b[start] == b'0' && int > 1) {
        return None;
    }
    let mut total = int;
    if b.get(i) == Some(&b'.') {
        let frac = i + 1;
        i = digits(b, frac);
        if i == frac {
            return None;
        }
        total += i - frac;
    }
    if total > MAX_DIGITS || matches!(b.get(i), Some(b'e' | b'E')) {
        return None;
    }
    Some(i)
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

    pub fn ws(&mut self) {
        self.i = skip_ws(self.b, self.i);
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

    /// A string without escapes or control characters; its contents.
    pub fn plain_string(&mut self) -> Option<&'a [u8]> {
        let b = self.b;
        if *b.get(self.i)? != b'"' {
            return None;
        }
        let start = self.i + 1;
        match run(b, start, &mut self.non_ascii)? {
            (end, b'"') => {
                self.i = end + 1;
                b.get(start..end)
            }
            _ => None,
        }
    }

    /// An unsigned integer (at most 19 digits, so it fits a `u64`) or `null`.
    pub fn uint_or_null(&mut self) -> Option<Option<u64>> {
        let b = self.b;
        if *b.get(self.i)? == b'n' {
            self.i = literal(b, self.i, b"null")?;
            return Some(None);
        }
        // The digits and their value in one pass (wrapping: a value is only kept with at
        // most 19 digits, which fit).
        let start = self.i;
        let mut i = start;
        let mut v = 0u64;
        while let Some(&c) = b.get(i) {
            let d = c.wrapping_sub(b'0');
            if d > 9 {
                break;
            }
            v = v.wrapping_mul(10).wrapping_add(u64::from(d));
            i += 1;
        }
        let n = i - start;
        if n == 0 || n > 19 || (n > 1 && b[start] == b'0') {
            return None;
        }
        if matches!(b.get(i), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        self.i = i;
        Some(Some(v))
    }

    /// Any value, at nesting depth `depth`; `Some(Some(b))` for `true`/`false`.
    ///
    /// One loop over the value's tokens, whatever its nesting (no recursion): the containers
    /// open inside it are a stack of bits, one per level (set: an object).
    pub fn value(&mut self, depth: usize) -> Option<Option<bool>> {
        let b = self.b;
        let mut i = self.i;
        let mut non_ascii = false;
        // Containers open inside the value; bit k of `objects`: the k-th innermost is an
        // object. At most MAX_DEPTH of them (the depth check), fewer than 128.
        let mut open = 0usize;
        let mut objects = 0u128;
        let mut boolean = None;
        'value: loop {
            if depth + open > MAX_DEPTH {
                return None;
            }
            match *b.get(i)? {
                b'"' => i = string(b, i + 1, &mut non_ascii)?,
                b'{' => {
                    i = skip_ws(b, i + 1);
                    if *b.get(i)? == b'}' {
                        i += 1;
                    } else {
                        open += 1;
                        objects = objects << 1 | 1;
                        i = key(b, i, &mut non_ascii)?.1;
                        continue 'value;
                    }
                }
                b'[' => {
                    i = skip_ws(b, i + 1);
                    if *b.get(i)? == b']' {
                        i += 1;
                    } else {
                        open += 1;
                        objects <<= 1;
                        continue 'value;
                    }
                }
                b't' => {
                    i = literal(b, i, b"true")?;
                    boolean = Some(true);
                }
                b'f' => {
                    i = literal(b, i, b"false")?;
                    boolean = Some(false);
                }
                b'n' => i = literal(b, i, b"null")?,
                b'-' | b'0'..=b'9' => i = number(b, i)?,
                _ => return None,
            }
            // After a value: a separator, or the end of the containers it closes.
            loop {
                if open == 0 {
                    self.i = i;
                    self.non_ascii |= non_ascii;
                    return Some(boolean);
                }
                boolean = None;
                i = skip_ws(b, i);
                let in_object = objects & 1 == 1;
                match *b.get(i)? {
                    b',' => {
                        i = skip_ws(b, i + 1);
                        if in_object {
                            i = key(b, i, &mut non_ascii)?.1;
                        }
                        continue 'value;
                    }
                    b'}' if in_object => {}
                    b']' if !in_object => {}
                    _ => return None,
                }
                i += 1;
                open -= 1;
                objects >>= 1;
            }
        }
    }

    /// The object at this position, member by member: `member` reads the value of each key
    /// (written without escapes; an escaped key is left to serde).
    pub fn members(
        &mut self,
        mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>,
    ) -> Option<()> {
        let b = self.b;
        if *b.get(self.i)? != b'{' {
            return None;
        }
        let mut i = skip_ws(b, self.i + 1);
        if *b.get(i)? == b'}' {
            self.i = i + 1;
            return Some(());
        }
        loop {
            let (name, at) = key(b, i, &mut self.non_ascii)?;
            self.i = at;
            member(self, b.get(name)?)?;
            i = skip_ws(b, self.i);
            match *b.get(i)? {
                b',' => i = skip_ws(b, i + 1),
                b'}' => {
                    self.i = i + 1;
                    return Some(());
                }
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

    /// What [`run`] must find, a byte at a time: the first `"`, `\` or control character and
    /// whether a byte above ASCII comes before it.
    fn run_naive(b: &[u8], i: usize) -> (Option<(usize, u8)>, bool) {
        let mut high = false;
        for (at, &c) in b.iter().enumerate().skip(i) {
            if c < 0x20 || c == b'"' || c == b'\\' {
                return (Some((at, c)), high);
            }
            high |= c >= 0x80;
        }
        (None, high)
    }

    #[test]
    fn the_word_at_a_time_scan_finds_the_first_stop_byte_and_notes_bytes_above_ascii() {
        // Every byte value at every position of texts of 0..=20 bytes after a start offset
        // of 0..=2, in backgrounds of plain ASCII and of bytes above it, with a second byte
        // of every kind after the first (the word loop may mark bytes wrongly above the
        // first stop byte).
        let seconds = [b'a', b'"', b'\\', 0x00, 0x1f, 0x80, 0xff, 0x7f, b' '];
        for background in [b'a', 0x80, 0xc3, 0xff, b'!', b'#', b']', 0x7f] {
            for len in 0..=20 {
                for start in 0..=2.min(len) {
                    for pos in 0..len {
                        for c in 0..=255u8 {
                            for (k, &second) in seconds.iter().enumerate() {
                                let mut v = vec![background; len];
                                v[pos] = c;
                                let after = pos + 1 + k % 7;
                                if after < len {
                                    v[after] = second;
                                }
                                let mut high = false;
                                let got = run(&v, start, &mut high);
                                assert_eq!((got, high), run_naive(&v, start), "{v:?} from {start}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// The recursive reader the one-loop [`Reader::value`] replaced (a method per token,
    /// a call per nested value), kept as its oracle: both must accept the same texts, stop
    /// at the same position and note the same bytes above ASCII.
    mod recursive {
        use super::super::MAX_DEPTH;

        pub struct Reader<'a> {
            pub b: &'a [u8],
            pub i: usize,
            pub non_ascii: bool,
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
                self.b[self.i..]
                    .starts_with(word)
                    .then(|| self.i += word.len())
            }
            /// Up to the first `"`, `\` or control character, a byte at a time.
            fn run(&mut self) -> Option<u8> {
                loop {
                    let c = self.next()?;
                    if c >= 0x80 {
                        self.non_ascii = true;
                    } else if c < 0x20 || c == b'"' || c == b'\\' {
                        return Some(c);
                    }
                }
            }
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
                                let unit =
                                    u32::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
                                if (0xd800..=0xdfff).contains(&unit) {
                                    return None;
                                }
                                self.i += 4;
                            }
                            _ => return None,
                        },
                        _ => return None,
                    }
                }
            }
            fn digits(&mut self) -> usize {
                let n = self.b[self.i..]
                    .iter()
                    .take_while(|c| c.is_ascii_digit())
                    .count();
                self.i += n;
                n
            }
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
                (total <= super::super::MAX_DIGITS && !matches!(self.peek(), Some(b'e' | b'E')))
                    .then_some(())
            }
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
    }

    /// The one-loop reader and the recursive one agree on `text` from its first
    /// non-whitespace byte, at nesting `depth`: accepted or not, where they stop, what they
    /// noted; and the keys `members` visits.
    fn same_as_recursive(text: &[u8], depth: usize) -> bool {
        let at = skip_ws(text, 0);
        let mut fast = Reader::new(text);
        fast.i = at;
        let mut slow = recursive::Reader {
            b: text,
            i: at,
            non_ascii: false,
        };
        let got = fast.value(depth);
        assert_eq!(
            got,
            slow.value(depth),
            "{:?} at depth {depth}",
            String::from_utf8_lossy(text)
        );
        if got.is_some() {
            assert_eq!(fast.i, slow.i, "{:?}", String::from_utf8_lossy(text));
            assert_eq!(
                fast.non_ascii,
                slow.non_ascii,
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
        let (mut fk, mut sk) = (Vec::new(), Vec::new());
        let mut fast = Reader::new(text);
        fast.i = at;
        let mut slow = recursive::Reader {
            b: text,
            i: at,
            non_ascii: false,
        };
        let f = fast.members(|r, k| {
            fk.push(k);
            r.value(depth + 1).map(drop)
        });
        let s = slow.members(|r, k| {
            sk.push(k);
            r.value(depth + 1).map(drop)
        });
        assert_eq!(f, s, "members of {:?}", String::from_utf8_lossy(text));
        assert_eq!(fk, sk);
        if f.is_some() {
            assert_eq!((fast.i, fast.non_ascii), (slow.i, slow.non_ascii));
        }
        got.is_some()
    }

    #[test]
    fn the_one_loop_reader_agrees_with_the_recursive_one() {
        let docs = [
            r#"{"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello in five words."}],"max_tokens":32}"#,
            r#"{"messages":[{"role":"user","content":"Grüße, 日本 🙂 \n\u00e9"}],"n":-1.5,"x":[true,false,null]}"#,
            r#" { "a" : [ 1 , { "b" : [ ] , "c" : { } } , "x\"y" , -0.25 ] , "t" : true } "#,
            r#"["é",{"日本":"語"},"🙂",0,[[],[{}]],{"k":[null]}]"#,
            r#"{"usage":{"prompt_tokens":12,"completion_tokens":4,"total_tokens":16},"s":"\ud83d"}"#,
            "[1,2.5,\"a\\tb\\u00E9\\/\",{\"k\":false}]\t",
            "true",
            "\"plain text, and more than eight bytes of it\"",
        ];
        // Single-byte changes, removals and insertions of JSON-significant bytes, whitespace,
        // bytes above ASCII and control characters, at every position.
        let alphabet = b"{}[]\",:\\ \t\n-0123456789.eEtfnul\x01\x1fxu\x80\xbf\xc3\xe6\xf0\xff";
        let mut accepted = 0;
        for doc in docs {
            let doc = doc.as_bytes();
            for depth in [1, 2] {
                accepted += usize::from(same_as_recursive(doc, depth));
                for i in 0..doc.len() {
                    let mut d = doc.to_vec();
                    d.remove(i);
                    same_as_recursive(&d, depth);
                    for &c in alphabet {
                        let mut m = doc.to_vec();
                        m[i] = c;
                        accepted += usize::from(same_as_recursive(&m, depth));
                        let mut n = doc.to_vec();
                        n.insert(i, c);
                        accepted += usize::from(same_as_recursive(&n, depth));
                    }
                }
            }
            // Every prefix (texts that end early).
            for end in 0..doc.len() {
                same_as_recursive(&doc[..end], 1);
            }
        }
        assert!(
            accepted > 5000,
            "the changes exercise the accepting path: {accepted}"
        );
        // Nesting around the depth limit, from both readers' depths, arrays and objects.
        for n in [1, 48, 49, 50, 98, 99, 100, 101, 127, 130] {
            for depth in [1, 2, 50, 100, 101] {
                let arrays = format!("{}1{}", "[".repeat(n), "]".repeat(n));
                let empties = format!("{}{}", "[".repeat(n), "]".repeat(n));
                let objects = format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n));
                let mixed = format!("{}\"x\"{}", "[{\"k\":".repeat(n), "}]".repeat(n));
                for text in [arrays, empties, objects, mixed] {
                    same_as_recursive(text.as_bytes(), depth);
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
