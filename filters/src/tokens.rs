//! Token accounting: reading the backend's reported usage from plain JSON responses and
//! from SSE streams, and hiding the usage chunk the gateway asked for on the client's behalf.

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;
use serde::Deserialize;

/// Token usage of one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
    /// The parts of them the backend itemized (SPEC §13).
    pub details: Details,
}

/// The itemized parts of a usage, where the backend reported them: `cached_tokens` and
/// `audio_tokens` of `prompt_tokens_details` (`input_tokens_details`), `reasoning_tokens`
/// and `audio_tokens` of `completion_tokens_details` (`output_tokens_details`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Details {
    pub cached_prompt: Option<u64>,
    pub reasoning: Option<u64>,
    pub audio_prompt: Option<u64>,
    pub audio_completion: Option<u64>,
}

impl Details {
    /// Each detail with its `aoai_gateway_token_details_total` type.
    pub fn by_type(&self) -> [(&'static str, Option<u64>); 4] {
        [
            ("cached_prompt", self.cached_prompt),
            ("reasoning", self.reasoning),
            ("audio_prompt", self.audio_prompt),
            ("audio_completion", self.audio_completion),
        ]
    }

    /// Whether any detail is more than zero.
    pub fn any(&self) -> bool {
        self.by_type().iter().any(|(_, n)| n.unwrap_or(0) > 0)
    }
}

#[derive(Deserialize, Debug, Default, PartialEq, Eq)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    prompt_tokens_details: Option<RawDetails>,
    completion_tokens_details: Option<RawDetails>,
    input_tokens_details: Option<RawDetails>,
    output_tokens_details: Option<RawDetails>,
}

/// One `*_tokens_details` object (other members, e.g. `accepted_prediction_tokens`, are
/// ignored).
#[derive(Deserialize, Debug, Default, PartialEq, Eq, Clone, Copy)]
struct RawDetails {
    cached_tokens: Option<u64>,
    audio_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

impl RawUsage {
    fn details(&self) -> Details {
        let prompt = self.prompt_tokens_details.or(self.input_tokens_details);
        let completion = self
            .completion_tokens_details
            .or(self.output_tokens_details);
        Details {
            cached_prompt: prompt.and_then(|d| d.cached_tokens),
            reasoning: completion.and_then(|d| d.reasoning_tokens),
            audio_prompt: prompt.and_then(|d| d.audio_tokens),
            audio_completion: completion.and_then(|d| d.audio_tokens),
        }
    }

    fn normalize(self) -> Option<Usage> {
        let prompt = self.prompt_tokens.or(self.input_tokens);
        let completion = self.completion_tokens.or(self.output_tokens);
        if prompt.is_none() && completion.is_none() && self.total_tokens.is_none() {
            return None;
        }
        let prompt = prompt.unwrap_or(0);
        let completion = completion
            .or_else(|| self.total_tokens.map(|t| t.saturating_sub(prompt)))
            .unwrap_or(0);
        Some(Usage {
            prompt,
            completion,
            total: self
                .total_tokens
                .unwrap_or(prompt.saturating_add(completion)),
            details: self.details(),
        })
    }
}

/// Finds the last `"usage": { … }` object in a JSON document (or its tail) and reads it.
/// In raw JSON a `"usage"` followed by `:` can only be a key (quotes inside strings are
/// escaped), and OpenAI and Azure put the response's usage last.
pub fn usage_in_json(buf: &[u8]) -> Option<Usage> {
    usage_from(buf, last_key(buf))
}

const USAGE_KEY: &[u8] = b"\"usage\"";

/// The last `"usage"` in `buf`: from the end, by its rarer `u` (a vectorized search for one
/// byte; memmem's reverse searcher has no vectorized prefilter and cost more than the
/// forward search of the whole answer).
fn rfind_key(buf: &[u8]) -> Option<usize> {
    let mut end = buf.len();
    while let Some(u) = memchr::memrchr(b'u', &buf[..end]) {
        if u >= 1 && buf[u - 1..].starts_with(USAGE_KEY) {
            return Some(u - 1);
        }
        end = u;
    }
    None
}

/// The last `"usage"` of a forward, non-overlapping search, found from the end (the usage is
/// at the end of a response: only the tail is scanned). The two differ only where
/// occurrences overlap, `"usage"usage"…` (one quote shared, the only way `"usage"` overlaps
/// itself): a forward search takes the first of such a run, then every second one, so its
/// last is the rightmost or the one before it by the parity of the run's length.
fn last_key(buf: &[u8]) -> Option<usize> {
    const SHIFT: usize = USAGE_KEY.len() - 1;
    let last = rfind_key(buf)?;
    let mut before = 0;
    while last >= SHIFT * (before + 1) && buf[last - SHIFT * (before + 1)..].starts_with(USAGE_KEY)
    {
        before += 1;
    }
    Some(if before % 2 == 1 { last - SHIFT } else { last })
}

/// Reads the usage object after the `"usage"` at `next` (when it is a key), or after the
/// ones before it.
fn usage_from(buf: &[u8], mut next: Option<usize>) -> Option<Usage> {
    const KEY: &[u8] = USAGE_KEY;
    while let Some(pos) = next {
        let mut i = pos + KEY.len();
        while i < buf.len() && buf[i].is_ascii_whitespace() {
            i += 1;
        }
        if buf.get(i) == Some(&b':') {
            i += 1;
            while i < buf.len() && buf[i].is_ascii_whitespace() {
                i += 1;
            }
            if buf.get(i) == Some(&b'{') {
                let raw = read_usage(&buf[i..]).or_else(|| usage_by_serde(&buf[i..]));
                if let Some(raw) = raw {
                    return raw.normalize();
                }
            }
        }
        next = rfind_key(&buf[..pos]);
    }
    None
}

/// Reads a usage object (`buf` starts at its `{`) the way `RawUsage`'s serde derive does,
/// with the small reader of [`crate::json`] (it is read from every response, and serde
/// spent more on three keys than on the rest of the response). The known keys take an
/// unsigned integer or `null`; `None` leaves anything else (other number forms, a repeated
/// key, text above ASCII) to serde.
fn read_usage(buf: &[u8]) -> Option<RawUsage> {
    let mut r = crate::json::Reader::new(buf);
    let mut raw = RawUsage::default();
    let mut seen = [false; 9];
    r.members(|r, key| {
        let (i, details) = match key {
            b"prompt_tokens_details" => (5, &mut raw.prompt_tokens_details),
            b"completion_tokens_details" => (6, &mut raw.completion_tokens_details),
            b"input_tokens_details" => (7, &mut raw.input_tokens_details),
            b"output_tokens_details" => (8, &mut raw.output_tokens_details),
            _ => {
                let (i, field) = match key {
                    b"prompt_tokens" => (0, &mut raw.prompt_tokens),
                    b"completion_tokens" => (1, &mut raw.completion_tokens),
                    b"input_tokens" => (2, &mut raw.input_tokens),
                    b"output_tokens" => (3, &mut raw.output_tokens),
                    b"total_tokens" => (4, &mut raw.total_tokens),
                    _ => return r.value(1).map(drop),
                };
                crate::json::first_time(&mut seen[i])?;
                *field = r.uint_or_null()?;
                return Some(());
            }
        };
        crate::json::first_time(&mut seen[i])?;
        *details = read_details(r)?;
        Some(())
    })?;
    (!r.saw_non_ascii()).then_some(raw)
}

/// A `*_tokens_details` value: `null` or an object (as [`RawDetails`]' serde derive reads it).
fn read_details(r: &mut crate::json::Reader<'_>) -> Option<Option<RawDetails>> {
    if r.peek()? == b'n' {
        return r.uint_or_null().filter(Option::is_none).map(|_| None);
    }
    if r.peek()? != b'{' {
        return None;
    }
    let mut d = RawDetails::default();
    let mut seen = [false; 3];
    r.members(|r, key| {
        let (i, field) = match key {
            b"cached_tokens" => (0, &mut d.cached_tokens),
            b"audio_tokens" => (1, &mut d.audio_tokens),
            b"reasoning_tokens" => (2, &mut d.reasoning_tokens),
            _ => return r.value(2).map(drop),
        };
        crate::json::first_time(&mut seen[i])?;
        *field = r.uint_or_null()?;
        Some(())
    })?;
    Some(Some(d))
}

/// The usage object at the start of `buf` by serde (anything after it is ignored).
fn usage_by_serde(buf: &[u8]) -> Option<RawUsage> {
    serde_json::Deserializer::from_slice(buf)
        .into_iter::<RawUsage>()
        .next()
        .and_then(Result::ok)
}

#[cfg(test)]
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

/// Keeps the last `cap` bytes of a plain response so its usage can be read at the end.
#[derive(Debug)]
pub struct JsonTail {
    buf: Vec<u8>,
    cap: usize,
}

impl JsonTail {
    pub fn new(cap: usize) -> Self {
        JsonTail {
            buf: Vec::new(),
            cap,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        if chunk.len() >= self.cap {
            self.buf.clear();
            self.buf.extend_from_slice(&chunk[chunk.len() - self.cap..]);
            return;
        }
        let over = (self.buf.len() + chunk.len()).saturating_sub(self.cap);
        if over > 0 {
            self.buf.drain(..over);
        }
        self.buf.extend_from_slice(chunk);
    }

    pub fn usage(&self) -> Option<Usage> {
        usage_in_json(&self.buf)
    }
}

/// How the usage of a streamed response is had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamUsage {
    /// The stream is passed as the client asked for it (its usage chunk, if any, is read).
    AsSent,
    /// The gateway asked for the usage chunk on the client's behalf: it is hidden again.
    Injected,
    /// The backend's `api-version` takes no `stream_options`: the streamed completion text is
    /// collected so that the gateway can count it itself.
    Estimate,
}

/// Passes an SSE stream through event by event, reading usage on the way. With
/// [`StreamUsage::Injected`], the usage the gateway asked for on the client's behalf is
/// removed: the usage-only chunk (`"choices":[]` with a usage) is dropped and `"usage":null`
/// members are cut from the other chunks, so the client sees exactly the stream it asked
/// for. With [`StreamUsage::Estimate`], the completion's text (content, refusal, tool-call
/// arguments, completions' `text`) is kept for [`SseTracker::completion_text`].
#[derive(Debug)]
pub struct SseTracker {
    pending: BytesMut,
    strip: bool,
    usage: Option<Usage>,
    /// The streamed completion text, in `Estimate` mode.
    text: Option<String>,
}

impl SseTracker {
    pub fn new(mode: StreamUsage) -> Self {
        SseTracker {
            pending: BytesMut::new(),
            strip: mode == StreamUsage::Injected,
            usage: None,
            text: (mode == StreamUsage::Estimate).then(String::new),
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// The completion text streamed so far (`Estimate` mode only).
    pub fn completion_text(&self) -> Option<&str> {
        self.text.as_deref()
    }

    /// Takes a chunk from the backend; returns what to send to the client now (whole events;
    /// a partial event waits for its end).
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        self.pending.extend_from_slice(chunk);
        let Some(cut) = last_event_end(&self.pending) else {
            return Bytes::new();
        };
        let complete = self.pending.split_to(cut);
        // Nothing to read or change: passed on as it came, without going event by event.
        if !self.strip && self.text.is_none() && usage_members(&complete) != UsageMembers::Other {
            return complete.freeze();
        }
        let mut out = BytesMut::with_capacity(complete.len());
        let mut rest: &[u8] = &complete;
        loop {
            // Line ends before an event (a longer blank run, `\n\n\n`) belong to no event:
            // passed on as they came, so the output does not depend on how the stream was
            // chunked, and a dropped event takes none of them with it.
            rest = pass_blank_lines(rest, &mut out);
            let Some(end) = first_event_end(rest) else {
                break;
            };
            let (event, tail) = rest.split_at(end);
            self.event(event, &mut out);
            rest = tail;
        }
        out.extend_from_slice(rest);
        out.freeze()
    }

    /// The end of the stream: whatever is left (an unterminated last event) is passed on.
    pub fn finish(&mut self) -> Bytes {
        let rest = self.pending.split();
        if rest.is_empty() {
            return Bytes::new();
        }
        let mut out = BytesMut::new();
        let event = pass_blank_lines(&rest, &mut out);
        if !event.is_empty() {
            self.event(event, &mut out);
        }
        out.freeze()
    }

    fn event(&mut self, event: &[u8], out: &mut BytesMut) {
        if let Some(text) = &mut self.text {
            collect_text(&event_data(event), text);
        }
        match usage_members(event) {
            UsageMembers::None => out.extend_from_slice(event),
            // What reading the event as JSON would come to, without building the document
            // (Azure's every chunk of a stream with `include_usage` carries `"usage":null`).
            UsageMembers::OnlyNull if self.strip => strip_null_usage_into(event, out),
            UsageMembers::OnlyNull => out.extend_from_slice(event),
            UsageMembers::Other => self.event_by_json(event, out),
        }
    }

    /// An event that may carry a usage object: read as JSON.
    fn event_by_json(&mut self, event: &[u8], out: &mut BytesMut) {
        let data = event_data(event);
        let mut usage_only = false;
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&data) {
            let u = v.get("usage").filter(|u| u.is_object()).or_else(|| {
                v.get("response")
                    .and_then(|r| r.get("usage"))
                    .filter(|u| u.is_object())
            });
            if let Some(u) = u {
                if let Some(n) = RawUsage::deserialize(u).ok().and_then(RawUsage::normalize) {
                    self.usage = Some(n);
                }
                usage_only = v
                    .get("choices")
                    .and_then(|c| c.as_array())
                    .is_some_and(|c| c.is_empty());
            }
        }
        if !self.strip {
            out.extend_from_slice(event);
            return;
        }
        if usage_only {
            return;
        }
        strip_null_usage_into(event, out);
    }
}

/// Appends the completion text of one chunk: each choice's `delta.content`,
/// `delta.refusal` and `delta.tool_calls[].function.arguments` (chat), or `text`
/// (completions).
fn collect_text(data: &[u8], out: &mut String) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Some(choices) = v.get("choices").and_then(|c| c.as_array()) else {
        return;
    };
    let mut push = |s: Option<&serde_json::Value>| {
        if let Some(s) = s.and_then(|s| s.as_str()) {
            out.push_str(s);
        }
    };
    for c in choices {
        push(c.get("text"));
        let Some(delta) = c.get("delta") else {
            continue;
        };
        push(delta.get("content"));
        push(delta.get("refusal"));
        if let Some(calls) = delta.get("tool_calls").and_then(|t| t.as_array()) {
            for call in calls {
                push(call.get("function").and_then(|f| f.get("name")));
                push(call.get("function").and_then(|f| f.get("arguments")));
            }
        }
    }
}

/// Searchers built once: building one costs more than a search through an SSE event.
static USAGE_FINDER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));
static COMMA_NULL_USAGE: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b",\"usage\":null"));
static NULL_USAGE_COMMA: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"usage\":null,"));

/// What the `"usage"` strings of an SSE event (or run of events) are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UsageMembers {
    /// There are none.
    None,
    /// Each is the member `"usage":null`: no usage object is anywhere in it.
    OnlyNull,
    /// Some other: possibly a usage object, read as JSON.
    Other,
}

/// The pure decision that spares an event its JSON reading. A usage object's key appears as
/// the bytes `"usage"` (inside a JSON string its quotes would be escaped); when every such
/// occurrence is followed by `:null`, the document has no usage object at any depth.
fn usage_members(buf: &[u8]) -> UsageMembers {
    let mut seen = UsageMembers::None;
    for at in USAGE_FINDER.find_iter(buf) {
        if !buf[at + b"\"usage\"".len()..].starts_with(b":null") {
            return UsageMembers::Other;
        }
        seen = UsageMembers::OnlyNull;
    }
    seen
}

/// Appends `event` to `out` without its `,"usage":null` members, then without its
/// `"usage":null,` members (each pattern removed until none is left, as a search from the
/// start would: a removal can only join a new match across its own place).
fn strip_null_usage_into(event: &[u8], out: &mut BytesMut) {
    let start = out.len();
    out.extend_from_slice(event);
    for pat in [&*COMMA_NULL_USAGE, &*NULL_USAGE_COMMA] {
        let n = pat.needle().len();
        let mut from = start;
        while let Some(i) = pat.find(&out[from..]) {
            let at = from + i;
            out.copy_within(at + n.., at);
            out.truncate(out.len() - n);
            // No match lies wholly before `at`; a new one must cross the join.
            from = at.saturating_sub(n - 1).max(start);
        }
    }
}

/// The data of an event: its `data:` lines joined by newlines.
fn event_data(event: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(d) = line.strip_prefix(b"data:") {
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(d.strip_prefix(b" ").unwrap_or(d));
        }
    }
    data
}

/// End (exclusive) of the first complete event, blank line included.
fn first_event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                return Some(i + 2);
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

/// Copies the CR and LF bytes at the start of `buf` to `out`; returns the rest.
fn pass_blank_lines<'b>(buf: &'b [u8], out: &mut BytesMut) -> &'b [u8] {
    let n = buf
        .iter()
        .take_while(|&&b| b == b'\n' || b == b'\r')
        .count();
    out.extend_from_slice(&buf[..n]);
    &buf[n..]
}

/// End (exclusive) of the last complete event in the buffer.
fn last_event_end(buf: &[u8]) -> Option<usize> {
    let mut i = buf.len();
    while i >= 2 {
        if buf[i - 1] == b'\n' && buf[i - 2] == b'\n' {
            return Some(i);
        }
        if i >= 3 && buf[i - 1] == b'\n' && buf[i - 2] == b'\r' && buf[i - 3] == b'\n' {
            return Some(i);
        }
        i -= 1;
    }
    None
}

#[cfg(test)]
mod tests {
    /// The search before it scanned from the end: forward, non-overlapping, the last of them
    /// (the oracle of [`last_key`]).
    fn usage_forward(buf: &[u8]) -> Option<Usage> {
        usage_from(buf, memchr::memmem::find_iter(buf, USAGE_KEY).last())
    }

    #[test]
    fn the_last_usage_from_the_end_is_the_last_of_a_forward_search() {
        let obj = |n: u32| format!(r#"{{"prompt_tokens":{n},"completion_tokens":1}}"#);
        let mut docs: Vec<String> = Vec::new();
        // Runs of overlapping `"usage"` of every length, each place followed by a usage
        // object or not, with text before and after.
        for run in 1..=6 {
            for objects in 0u32..(1 << run) {
                let mut d = String::from("{\"id\":\"x\",");
                for k in 0..run {
                    d.push_str(if k == 0 { "\"usage\"" } else { "usage\"" });
                    if objects & (1 << k) != 0 {
                        d.push_str(&format!(":{},", obj(k)));
                        // The next one starts a new run after the object.
                        d.push('"');
                        d.push_str("usage\"");
                    }
                }
                for tail in [
                    "",
                    ":",
                    ": {\"total_tokens\":9}}",
                    "\"usage\":{\"total_tokens\":7}}",
                ] {
                    docs.push(format!("{d}{tail}"));
                    docs.push(format!("\"usage\":{}{d}{tail}", obj(99)));
                }
            }
        }
        docs.extend(
            [
                r#"{"usage":{"prompt_tokens":1},"x":"usage","usage":{"prompt_tokens":2}}"#,
                r#"{"usage":{"prompt_tokens":1}}"usage""#,
                r#""usage""usage"usage"usage":{"total_tokens":3}"#,
                r#""usage"usage"usage"usage"usage":{"total_tokens":3}"#,
                r#""usage":"usage"usage":{"total_tokens":4}"#,
                r#"usage"usage":{"total_tokens":5}"#,
                r#""usage"usage"#,
                r#""usage""#,
                "",
            ]
            .map(String::from),
        );
        let mut found = 0;
        for d in &docs {
            assert_eq!(
                rfind_key(d.as_bytes()),
                memchr::memmem::rfind(d.as_bytes(), USAGE_KEY)
            );
            let want = usage_forward(d.as_bytes());
            assert_eq!(usage_in_json(d.as_bytes()), want, "{d}");
            found += usize::from(want.is_some());
        }
        assert!(found > docs.len() / 2, "{found} of {}", docs.len());
    }

    use super::*;

    #[test]
    fn the_fast_usage_reader_agrees_with_serde() {
        let samples: &[&str] = &[
            r#"{"prompt_tokens":12,"completion_tokens":4,"total_tokens":16}"#,
            r#"{ "prompt_tokens" : 12 , "completion_tokens":4,"total_tokens":16 }"#,
            "{\n  \"prompt_tokens\": 1,\n\t\"total_tokens\": 2\r\n}",
            r#"{"completion_tokens":9,"completion_tokens_details":{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":0,"rejected_prediction_tokens":0},"prompt_tokens":19,"prompt_tokens_details":{"audio_tokens":0,"cached_tokens":0},"total_tokens":28}"#,
            r#"{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123}"#,
            r#"{"prompt_tokens":5,"total_tokens":5}"#,
            r#"{"prompt_tokens":null,"completion_tokens":3}"#,
            r#"{}"#,
            r#"{ }"#,
            r#"{"note":"a \"quoted\" } value","x":[1,{"y":"]"}],"prompt_tokens":7}"#,
            r#"{"a":true,"b":false,"c":null,"d":-1.5,"prompt_tokens":1}"#,
            r#"{"a":true,"b":false,"c":null,"d":-1.5e3,"prompt_tokens":1}"#,
            r#"{"prompt_tokens":18446744073709551615}"#,
            r#"{"prompt_tokens":18446744073709551616}"#,
            r#"{"prompt_tokens":1.0}"#,
            r#"{"prompt_tokens":1e2}"#,
            r#"{"prompt_tokens":-1}"#,
            r#"{"prompt_tokens":012}"#,
            r#"{"prompt_tokens":"12"}"#,
            r#"{"prompt_tokens":1,"prompt_tokens":2}"#,
            r#"{"prompt\u005ftokens":3}"#,
            r#"{"prompt_tokens":1,}"#,
            r#"{"prompt_tokens":1"#,
            r#"{"prompt_tokens":1 "total_tokens":2}"#,
            r#"{"prompt_tokens":}"#,
            r#"{prompt_tokens:1}"#,
            r#"{"prompt_tokens":1}trailing"#,
            r#"{"prompt_tokens_details":{"cached_tokens":1,"cached_tokens":2}}"#,
            r#"{"prompt_tokens_details":{"cached_tokens":1},"prompt_tokens_details":null}"#,
            r#"{"prompt_tokens_details":5}"#,
            r#"{"prompt_tokens_details":"x"}"#,
            r#"{"prompt_tokens_details":[]}"#,
            r#"{"prompt_tokens_details":{"cached_tokens":1.5}}"#,
            r#"{"prompt_tokens_details":{"cached_tokens":"1"}}"#,
            r#"{"completion_tokens_details":{"reasoning_tokens":-1}}"#,
            r#"{"output_tokens_details":{"reasoning_tokens":3,"x":[{"y":null}]}}"#,
            r#"{"input_tokens_details":nul}"#,
        ];
        for s in samples {
            if let Some(raw) = read_usage(s.as_bytes()) {
                assert_eq!(Some(raw), usage_by_serde(s.as_bytes()), "{s}");
            }
        }
        // The usual shapes are read without serde.
        for s in &samples[..11] {
            assert!(read_usage(s.as_bytes()).is_some(), "{s}");
        }
    }

    #[test]
    fn usage_of_chat_embeddings_and_responses() {
        let chat = br#"{"choices":[{"message":{"content":"say \"usage\": {\"prompt_tokens\": 99}"}}],"usage":{"prompt_tokens":12,"completion_tokens":4,"total_tokens":16}}"#;
        assert_eq!(
            usage_in_json(chat),
            Some(Usage {
                prompt: 12,
                completion: 4,
                total: 16,
                details: Details::default(),
            })
        );
        let emb = br#"{"data":[],"usage":{"prompt_tokens":5,"total_tokens":5}}"#;
        assert_eq!(
            usage_in_json(emb),
            Some(Usage {
                prompt: 5,
                completion: 0,
                total: 5,
                details: Details::default(),
            })
        );
        let resp = br#"{"output":[],"usage": {"input_tokens":7,"output_tokens":3,"total_tokens":10,"input_tokens_details":{"cached_tokens":0}}}"#;
        assert_eq!(
            usage_in_json(resp),
            Some(Usage {
                prompt: 7,
                completion: 3,
                total: 10,
                details: Details {
                    cached_prompt: Some(0),
                    ..Details::default()
                },
            })
        );
        assert_eq!(usage_in_json(br#"{"usage":null}"#), None);
        assert_eq!(usage_in_json(b"not json"), None);
    }

    #[test]
    fn usage_details_table() {
        let d = |c, r, ap, ac| Details {
            cached_prompt: c,
            reasoning: r,
            audio_prompt: ap,
            audio_completion: ac,
        };
        for (usage, want) in [
            // Chat: prompt_tokens_details / completion_tokens_details.
            (
                r#"{"prompt_tokens":2048,"completion_tokens":300,"total_tokens":2348,"prompt_tokens_details":{"cached_tokens":1920,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":256,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}"#,
                d(Some(1920), Some(256), Some(0), Some(0)),
            ),
            // Audio models.
            (
                r#"{"prompt_tokens":90,"completion_tokens":80,"total_tokens":170,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":60},"completion_tokens_details":{"audio_tokens":70,"reasoning_tokens":0}}"#,
                d(Some(0), Some(0), Some(60), Some(70)),
            ),
            // Responses: input_tokens_details / output_tokens_details.
            (
                r#"{"input_tokens":1500,"input_tokens_details":{"cached_tokens":1024},"output_tokens":900,"output_tokens_details":{"reasoning_tokens":640},"total_tokens":2400}"#,
                d(Some(1024), Some(640), None, None),
            ),
            // None reported, null, or an empty object.
            (
                r#"{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}"#,
                d(None, None, None, None),
            ),
            (
                r#"{"prompt_tokens":1,"prompt_tokens_details":null,"completion_tokens_details":{}}"#,
                d(None, None, None, None),
            ),
            (
                r#"{"prompt_tokens":1,"prompt_tokens_details":{"cached_tokens":null,"x":{"cached_tokens":5}}}"#,
                d(None, None, None, None),
            ),
            // Nested under another member: not the usage's.
            (
                r#"{"prompt_tokens":1,"other":{"prompt_tokens_details":{"cached_tokens":5}}}"#,
                d(None, None, None, None),
            ),
        ] {
            let doc = format!(r#"{{"id":"x","usage":{usage}}}"#);
            let got = usage_in_json(doc.as_bytes()).map(|u| u.details);
            assert_eq!(got, Some(want), "{usage}");
            // The fast reader reads these shapes itself, and agrees with serde.
            assert!(read_usage(usage.as_bytes()).is_some(), "{usage}");
            assert_eq!(
                read_usage(usage.as_bytes()),
                usage_by_serde(usage.as_bytes()),
                "{usage}"
            );
        }
        assert!(d(Some(0), Some(3), None, None).any());
        assert!(!d(Some(0), None, Some(0), None).any());
    }

    #[test]
    fn the_stream_usage_chunk_carries_details() {
        let s = concat!(
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2000,\"completion_tokens\":40,\"total_tokens\":2040,",
            "\"prompt_tokens_details\":{\"cached_tokens\":1792},\"completion_tokens_details\":{\"reasoning_tokens\":32}}}\n\n",
            "data: [DONE]\n\n"
        );
        let mut t = SseTracker::new(StreamUsage::Injected);
        assert_eq!(t.push(s.as_bytes()), &b"data: [DONE]\n\n"[..]);
        let d = t.usage().unwrap().details;
        assert_eq!((d.cached_prompt, d.reasoning), (Some(1792), Some(32)));
        let s = "data: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":9,\"input_tokens_details\":{\"cached_tokens\":4},\"output_tokens\":2,\"output_tokens_details\":{\"reasoning_tokens\":1},\"total_tokens\":11}}}\n\n";
        let mut t = SseTracker::new(StreamUsage::AsSent);
        t.push(s.as_bytes());
        let d = t.usage().unwrap().details;
        assert_eq!((d.cached_prompt, d.reasoning), (Some(4), Some(1)));
    }

    #[test]
    fn tail_keeps_the_end() {
        let mut t = JsonTail::new(128);
        t.push(&[b' '; 200]);
        t.push(br#"{"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#);
        assert_eq!(t.usage().map(|u| u.total), Some(3));
        let mut t = JsonTail::new(16);
        for _ in 0..10 {
            t.push(b"0123456789");
        }
        assert_eq!(t.buf.len(), 16);
    }

    const CHUNK: &str =
        r#"data: {"id":"c","choices":[{"index":0,"delta":{"content":"Hi"}}],"usage":null}"#;
    const USAGE: &str = r#"data: {"id":"c","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":4,"total_tokens":16}}"#;

    fn stream() -> String {
        format!("{CHUNK}\n\n{USAGE}\n\ndata: [DONE]\n\n")
    }

    #[test]
    fn usage_members_table() {
        use UsageMembers::*;
        for (event, want) in [
            ("data: {\"choices\":[]}\n\n", None),
            (CHUNK, OnlyNull),
            (USAGE, Other),
            // Every occurrence is looked at, not the first only.
            (
                r#"data: {"usage":null,"response":{"usage":{"total_tokens":1}}}"#,
                Other,
            ),
            (r#"data: {"usage":null,"x":{"usage":null}}"#, OnlyNull),
            // Not the compact member: read as JSON.
            (r#"data: {"usage": null}"#, Other),
            (r#"data: {"usage" :null}"#, Other),
            (r#"data: {"type":"usage"}"#, Other),
            (r#"data: {"usage":nullx}"#, OnlyNull),
            (r#"data: {"usage""#, Other),
            // Inside a string the quotes are escaped: not a member.
            (r#"data: {"content":"say \"usage\""}"#, None),
        ] {
            assert_eq!(usage_members(event.as_bytes()), want, "{event}");
        }
    }

    /// The old strip, the reference: the whole pattern searched from the start each time.
    fn strip_by_search(event: &[u8]) -> Vec<u8> {
        let mut s = event.to_vec();
        for pat in [&b",\"usage\":null"[..], &b"\"usage\":null,"[..]] {
            while let Some(i) = find(&s, pat) {
                s.drain(i..i + pat.len());
            }
        }
        s
    }

    #[test]
    fn stripping_in_place_agrees_with_searching_from_the_start() {
        for event in [
            CHUNK,
            r#"data: {"usage":null,"id":"c"}"#,
            r#"data: {"a":1,"usage":null,"usage":null,"b":2}"#,
            r#"data: {"usage":null,"usage":null}"#,
            // Removals that join a new match across their place.
            r#"data: {,,"usage":null"usage":null}"#,
            r#"data: ,"usage":,"usage":nullnull"#,
            r#"data: "usage":null"usage":null,,"#,
            r#"data: {"usage":{"total_tokens":1}}"#,
            "",
        ] {
            let mut out = BytesMut::from(&b"kept"[..]);
            strip_null_usage_into(event.as_bytes(), &mut out);
            let mut want = b"kept".to_vec();
            want.extend_from_slice(&strip_by_search(event.as_bytes()));
            assert_eq!(&out[..], &want[..], "{event}");
        }
    }

    #[test]
    fn events_without_a_usage_object_skip_the_json_reading_with_the_same_result() {
        let events = [
            format!("{CHUNK}\n\n"),
            "data: {\"id\":\"c\",\"usage\":null,\"choices\":[]}\n\n".to_string(),
            "data: {\"usage\":null}\r\n\r\n".to_string(),
            "data: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\n".to_string(),
            "data: not json, \"usage\":null,\n\n".to_string(),
        ];
        for mode in [StreamUsage::AsSent, StreamUsage::Injected] {
            for e in &events {
                assert_eq!(usage_members(e.as_bytes()), UsageMembers::OnlyNull, "{e}");
                let (mut fast, mut slow) = (SseTracker::new(mode), SseTracker::new(mode));
                let (mut a, mut b) = (BytesMut::new(), BytesMut::new());
                fast.event(e.as_bytes(), &mut a);
                slow.event_by_json(e.as_bytes(), &mut b);
                assert_eq!(a, b, "{mode:?} {e}");
                assert_eq!(fast.usage(), slow.usage());
                assert_eq!(fast.push(e.as_bytes()), b.freeze(), "{mode:?} {e}");
            }
        }
    }

    #[test]
    fn injected_usage_is_read_and_hidden() {
        let mut t = SseTracker::new(StreamUsage::Injected);
        let out = t.push(stream().as_bytes());
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert_eq!(
            text,
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: [DONE]\n\n"
        );
        assert_eq!(t.usage().map(|u| (u.prompt, u.completion)), Some((12, 4)));
    }

    #[test]
    fn requested_usage_passes_unchanged() {
        let mut t = SseTracker::new(StreamUsage::AsSent);
        let out = t.push(stream().as_bytes());
        assert_eq!(out, stream().as_bytes());
        assert_eq!(t.usage().map(|u| u.total), Some(16));
    }

    #[test]
    fn events_split_across_chunks() {
        let s = stream();
        for cut in 1..s.len() {
            let mut t = SseTracker::new(StreamUsage::Injected);
            let mut got = Vec::new();
            got.extend_from_slice(&t.push(&s.as_bytes()[..cut]));
            got.extend_from_slice(&t.push(&s.as_bytes()[cut..]));
            got.extend_from_slice(&t.finish());
            assert!(
                !String::from_utf8_lossy(&got).contains("usage"),
                "cut at {cut}"
            );
            assert!(got.ends_with(b"data: [DONE]\n\n"));
            assert_eq!(t.usage().map(|u| u.total), Some(16), "cut at {cut}");
        }
    }

    #[test]
    fn extra_blank_lines_pass_whatever_the_chunking() {
        // A longer blank run between events (`\n\n\n`): unchanged without strip, and the
        // same bytes with strip however the stream is cut.
        let s = format!("{CHUNK}\n\n\n{USAGE}\n\n\n\ndata: [DONE]\n\n");
        let mode = |strip: bool| {
            if strip {
                StreamUsage::Injected
            } else {
                StreamUsage::AsSent
            }
        };
        let stripped = {
            let mut t = SseTracker::new(StreamUsage::Injected);
            let mut got = t.push(s.as_bytes()).to_vec();
            got.extend_from_slice(&t.finish());
            got
        };
        for cut in 1..s.len() {
            for strip in [false, true] {
                let mut t = SseTracker::new(mode(strip));
                let mut got = t.push(&s.as_bytes()[..cut]).to_vec();
                got.extend_from_slice(&t.push(&s.as_bytes()[cut..]));
                got.extend_from_slice(&t.finish());
                let want = if strip { &stripped[..] } else { s.as_bytes() };
                assert_eq!(got, want, "strip {strip}, cut at {cut}");
                assert_eq!(t.usage().map(|u| u.total), Some(16), "cut at {cut}");
            }
        }
        assert!(!String::from_utf8_lossy(&stripped).contains("usage"));
    }

    #[test]
    fn usage_sums_saturate() {
        let u: RawUsage = serde_json::from_str(
            r#"{"prompt_tokens":18446744073709551615,"completion_tokens":18446744073709551615}"#,
        )
        .unwrap();
        assert_eq!(u.normalize().map(|u| u.total), Some(u64::MAX));
    }

    #[test]
    fn crlf_events() {
        let s = format!("{CHUNK}\r\n\r\n{USAGE}\r\n\r\ndata: [DONE]\r\n\r\n");
        let mut t = SseTracker::new(StreamUsage::Injected);
        let out = t.push(s.as_bytes());
        assert!(!String::from_utf8_lossy(&out).contains("usage"));
        assert_eq!(t.usage().map(|u| u.total), Some(16));
    }

    #[test]
    fn estimate_mode_collects_the_completion_text_and_passes_the_stream() {
        let chat = concat!(
            "data: {\"choices\":[],\"prompt_filter_results\":[]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo \\\"you\\\"\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n",
        );
        for cut in [1, 40, 100, chat.len() - 3] {
            let mut t = SseTracker::new(StreamUsage::Estimate);
            let mut got = Vec::new();
            got.extend_from_slice(&t.push(&chat.as_bytes()[..cut]));
            got.extend_from_slice(&t.push(&chat.as_bytes()[cut..]));
            got.extend_from_slice(&t.finish());
            assert_eq!(got, chat.as_bytes(), "cut at {cut}");
            assert_eq!(
                t.completion_text(),
                Some("Hello \"you\"f{}"),
                "cut at {cut}"
            );
            assert_eq!(t.usage(), None);
        }
        let completions = "data: {\"choices\":[{\"text\":\"a b\",\"index\":0}]}\n\ndata: {\"choices\":[{\"text\":\" c\",\"index\":0}]}\n\n";
        let mut t = SseTracker::new(StreamUsage::Estimate);
        assert_eq!(t.push(completions.as_bytes()), completions.as_bytes());
        assert_eq!(t.completion_text(), Some("a b c"));
        // The other modes keep no text.
        for mode in [StreamUsage::AsSent, StreamUsage::Injected] {
            let mut t = SseTracker::new(mode);
            t.push(completions.as_bytes());
            assert_eq!(t.completion_text(), None);
        }
    }

    #[test]
    fn responses_stream_usage() {
        let s = "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":2,\"total_tokens\":11}}}\n\n";
        let mut t = SseTracker::new(StreamUsage::AsSent);
        assert_eq!(t.push(s.as_bytes()), s.as_bytes());
        assert_eq!(t.usage().map(|u| (u.prompt, u.completion)), Some((9, 2)));
    }
}
