//! Prompt token estimate for admission (SPEC §6: the reservation is `estimated prompt tokens +
//! requested max output tokens`).
//!
//! `limits.prompt_estimate: tokenizer` counts with the model's BPE (o200k_base or cl100k_base),
//! `bytes` takes text bytes / 4. Either way the estimate is only a reservation: the backend's
//! reported usage replaces it after the response.
//!
//! # Tokenizer: [`crate::bpe`]
//!
//! `bpe-openai` was used first (1.5–3× faster than `tiktoken-rs`, linear on pathological
//! input), but its tables hold ≈ 115 MiB for the two encodings. [`crate::bpe`] counts exactly
//! as tiktoken does with ≈ 4 + 2 MiB of tables, read only for the encodings in use; its oracle
//! test compares it with `bpe-openai`. Measured with `estimate::tests::tokenizer_timings`
//! (release, this 2-core machine while other builds ran; `cargo test -p filters --release
//! --lib -- --ignored --nocapture tokenizer_timings`), one count of a 100 KiB prompt:
//!
//! | | filters::bpe | bpe-openai 0.3.2 |
//! |---|---|---|
//! | o200k_base, mixed text (prose, code, numbers, accents, CJK) | 6.0 ms | 9.6 ms |
//! | cl100k_base, mixed text | 2.3 ms | 7.3 ms |
//! | o200k_base, 100 KiB of letters without a space (one piece) | 72 ms | 4.0 ms |
//! | reading both encodings | 155–180 ms | 226 ms |
//!
//! Long unbroken runs are where the compact form pays (a heap merge, n log n): hence
//! [`LONG_PIECES_MAX_BYTES`] per request.
//!
//! Exact counting is capped at [`TOKENIZE_MAX_BYTES`] of text per request (≈ 60 ms of CPU):
//! text beyond that (far larger than any model's context) is estimated as bytes / 4.

use serde_json::Value;

use crate::Operation;

/// How prompts are estimated (`limits.prompt_estimate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EstimateMode {
    /// Exact BPE count with the model's encoding.
    Tokenizer,
    /// Text bytes / 4, rounded up.
    Bytes,
}

/// The BPE encoding of a model family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o1, o3, o4, gpt-oss.
    O200k,
    /// gpt-4, gpt-4-turbo, gpt-35-turbo, text-embedding-*.
    Cl100k,
}

/// Text beyond this many bytes in one request is estimated as bytes / 4 even in tokenizer mode.
pub const TOKENIZE_MAX_BYTES: usize = 2 * 1024 * 1024;

/// Bytes of long pieces (runs of over 64 bytes without a break: base64, hex) counted exactly in
/// one request; those beyond are estimated as bytes / 4 ([`crate::bpe::Bpe::count_within`]).
pub const LONG_PIECES_MAX_BYTES: usize = 128 * 1024;

/// Per-message overhead of chat formats (OpenAI cookbook, gpt-4o and later: 3 tokens per
/// message, 1 more when it has a `name`, 3 to prime the reply).
const TOKENS_PER_MESSAGE: u64 = 3;
const TOKENS_PER_NAME: u64 = 1;
const REPLY_PRIMING: u64 = 3;
/// Image inputs: `detail: low` costs 85 tokens; otherwise a 1024×1024 image at high detail
/// (85 + 4 tiles × 170). The backend's usage corrects it.
const IMAGE_LOW_TOKENS: u64 = 85;
const IMAGE_TOKENS: u64 = 765;

/// Picks the encoding from a deployment or model name. Names often carry a prefix or suffix
/// (`contoso-gpt-4o-ptu`), so every `-`/`_`/`/`/`.`-separated tail of the name is tried. Unknown
/// names get o200k (every current model family uses it).
pub fn encoding_for_model(hint: &str) -> Encoding {
    const O200K: [&str; 9] = [
        "gpt-4o", "gpt-4.1", "gpt-41", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "gpt-oss",
    ];
    const CL100K: [&str; 6] = [
        "gpt-4",
        "gpt-35",
        "gpt-3.5",
        "text-embedding",
        "davinci",
        "babbage",
    ];
    let hint = hint.to_ascii_lowercase();
    let tails = || {
        std::iter::once(0)
            .chain(
                hint.match_indices(['-', '_', '/', '.', ':'])
                    .map(|(i, _)| i + 1),
            )
            .map(|i| &hint[i..])
    };
    let starts = |prefixes: &[&str]| tails().any(|t| prefixes.iter().any(|p| t.starts_with(p)));
    if starts(&O200K) || hint.contains("chatgpt") {
        Encoding::O200k
    } else if starts(&CL100K) {
        Encoding::Cl100k
    } else {
        Encoding::O200k
    }
}

/// Estimates prompt tokens. The BPE tables ([`crate::bpe`]) are process-wide, each read on
/// its first use; [`PromptEstimator::warm`] reads those that configured names need in the
/// background, so that no request waits for them.
#[derive(Clone, Debug)]
pub struct PromptEstimator {
    mode: EstimateMode,
}

impl PromptEstimator {
    pub fn new(mode: EstimateMode) -> Self {
        PromptEstimator { mode }
    }

    /// The encodings that these deployment or model names use, in tokenizer mode: read in a
    /// background thread now (o200k_base ≈ 4 MiB and 50–100 ms; cl100k_base ≈ 2 MiB), none
    /// other. An encoding that no name announced is read by the first request that needs it.
    pub fn warm<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        if self.mode != EstimateMode::Tokenizer {
            return;
        }
        let mut encodings: Vec<Encoding> = names.into_iter().map(encoding_for_model).collect();
        encodings.sort_by_key(|e| *e as u8);
        encodings.dedup();
        if encodings.is_empty() {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("bpe-tables".into())
            .spawn(move || {
                for e in encodings {
                    crate::bpe::get(e);
                }
            });
        if let Err(e) = spawned {
            log::warn!("cannot read the BPE tables ahead of the first request: {e}");
        }
    }

    pub fn mode(&self) -> EstimateMode {
        self.mode
    }

    /// Tokens of one text in `encoding` (bytes / 4 in bytes mode).
    pub fn count_text(&self, text: &str, encoding: Encoding) -> u64 {
        let mut c = Counter::new(self.mode, encoding);
        c.text(text);
        c.total()
    }

    /// Estimates the prompt tokens of a JSON request body for `operation`:
    /// * chat: every message's string values (role, content, name, tool call names and
    ///   arguments), content parts with text (images at a fixed cost), 3 tokens per message,
    ///   1 per name, 3 for the reply; plus `tools`/`functions`/`response_format` as JSON text;
    /// * completions: `prompt` (string, strings, token arrays) and `suffix`;
    /// * embeddings: `input` (string, strings, token arrays);
    /// * responses: `instructions` and `input` (string or items: messages with text parts,
    ///   function calls and outputs) with chat's per-message overhead, plus `tools`;
    /// * images: `prompt`; audio and models: 0 (not JSON text prompts).
    ///
    /// `model_hint` (backend deployment name or body `model`) picks the encoding. Bytes mode:
    /// the same texts' bytes / 4 rounded up, plus the fixed costs (message overhead, images,
    /// pre-tokenized inputs).
    pub fn estimate(&self, operation: Operation, body: &Value, model_hint: &str) -> u64 {
        let mut c = Counter::new(self.mode, encoding_for_model(model_hint));
        match operation {
            Operation::ChatCompletions => chat(&mut c, body),
            Operation::Completions => {
                prompt_like(&mut c, body.get("prompt"));
                if let Some(s) = body.get("suffix").and_then(Value::as_str) {
                    c.text(s);
                }
            }
            Operation::Embeddings => prompt_like(&mut c, body.get("input")),
            Operation::Responses => responses(&mut c, body),
            Operation::Images => {
                if let Some(s) = body.get("prompt").and_then(Value::as_str) {
                    c.text(s);
                }
            }
            Operation::Audio
            | Operation::ModelsRead
            | Operation::Realtime
            | Operation::Files
            | Operation::Batches => {}
        }
        c.total()
    }
}

/// `max_tokens`, `max_completion_tokens` or `max_output_tokens` (the largest given), times the
/// number of completions asked for (`n`, or `best_of` for completions, which the backend also
/// generates and bills). `None` when the body names no maximum.
pub fn requested_output_tokens(body: &Value) -> Option<u64> {
    let max = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
        .iter()
        .filter_map(|k| body.get(*k).and_then(Value::as_u64))
        .max()?;
    let choices = ["n", "best_of"]
        .iter()
        .filter_map(|k| body.get(*k).and_then(Value::as_u64))
        .max()
        .unwrap_or(1)
        .max(1);
    Some(max.saturating_mul(choices))
}

/// Accumulates an estimate.
struct Counter {
    mode: EstimateMode,
    encoding: Encoding,
    tokens: u64,
    /// Text bytes not tokenized (bytes mode, or beyond the caps).
    loose_bytes: u64,
    tokenized_bytes: usize,
    /// What is left of [`LONG_PIECES_MAX_BYTES`].
    long_budget: usize,
}

impl Counter {
    fn new(mode: EstimateMode, encoding: Encoding) -> Self {
        Counter {
            mode,
            encoding,
            tokens: 0,
            loose_bytes: 0,
            tokenized_bytes: 0,
            long_budget: LONG_PIECES_MAX_BYTES,
        }
    }

    fn fixed(&mut self, n: u64) {
        self.tokens = self.tokens.saturating_add(n);
    }

    fn text(&mut self, s: &str) {
        if s.is_empty() {
            return;
        }
        if self.mode == EstimateMode::Bytes || self.tokenized_bytes + s.len() > TOKENIZE_MAX_BYTES {
            self.loose_bytes += s.len() as u64;
            return;
        }
        self.tokenized_bytes += s.len();
        let (tokens, loose) = crate::bpe::get(self.encoding).count_within(s, &mut self.long_budget);
        self.fixed(tokens as u64);
        self.loose_bytes += loose as u64;
    }

    /// Every string leaf of a JSON value (object keys excluded).
    fn strings(&mut self, v: &Value) {
        match v {
            Value::String(s) => self.text(s),
            Value::Array(a) => a.iter().for_each(|v| self.strings(v)),
            Value::Object(o) => o.values().for_each(|v| self.strings(v)),
            _ => {}
        }
    }

    /// A JSON value as its serialized text (tool definitions, schemas).
    fn json(&mut self, v: &Value) {
        if !v.is_null() {
            self.text(&v.to_string());
        }
    }

    fn total(&self) -> u64 {
        self.tokens.saturating_add(self.loose_bytes.div_ceil(4))
    }
}

fn chat(c: &mut Counter, body: &Value) {
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        for m in messages {
            c.fixed(TOKENS_PER_MESSAGE);
            let Some(m) = m.as_object() else { continue };
            for (k, v) in m {
                match k.as_str() {
                    "content" => content(c, v),
                    "name" => {
                        c.fixed(TOKENS_PER_NAME);
                        c.strings(v);
                    }
                    _ => c.strings(v),
                }
            }
        }
        c.fixed(REPLY_PRIMING);
    }
    for k in ["tools", "functions", "response_format"] {
        if let Some(v) = body.get(k) {
            c.json(v);
        }
    }
}

/// A message's content: a string, or parts (`text`, `image_url`, `refusal`, …).
fn content(c: &mut Counter, v: &Value) {
    match v {
        Value::String(s) => c.text(s),
        Value::Array(parts) => {
            for p in parts {
                match p {
                    Value::String(s) => c.text(s),
                    Value::Object(o) => {
                        for k in ["text", "refusal"] {
                            if let Some(s) = o.get(k).and_then(Value::as_str) {
                                c.text(s);
                            }
                        }
                        let ty = o.get("type").and_then(Value::as_str).unwrap_or("");
                        if ty == "image_url" || ty == "input_image" {
                            let detail = o
                                .get("detail")
                                .or_else(|| o.get("image_url").and_then(|i| i.get("detail")))
                                .and_then(Value::as_str);
                            c.fixed(if detail == Some("low") {
                                IMAGE_LOW_TOKENS
                            } else {
                                IMAGE_TOKENS
                            });
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

/// `prompt` of completions, `input` of embeddings: a string, strings, a token array, or
/// token arrays.
fn prompt_like(c: &mut Counter, v: Option<&Value>) {
    match v {
        Some(Value::String(s)) => c.text(s),
        Some(Value::Array(items)) => {
            for item in items {
                match item {
                    Value::String(s) => c.text(s),
                    Value::Number(_) => c.fixed(1),
                    Value::Array(tokens) => c.fixed(tokens.len() as u64),
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fn responses(c: &mut Counter, body: &Value) {
    if let Some(s) = body.get("instructions").and_then(Value::as_str) {
        c.fixed(TOKENS_PER_MESSAGE);
        c.text(s);
    }
    match body.get("input") {
        Some(Value::String(s)) => {
            c.fixed(TOKENS_PER_MESSAGE);
            c.text(s);
        }
        Some(Value::Array(items)) => {
            for item in items {
                let ty = item.get("type").and_then(Value::as_str);
                match ty {
                    Some("function_call") => {
                        for k in ["name", "arguments"] {
                            if let Some(s) = item.get(k).and_then(Value::as_str) {
                                c.text(s);
                            }
                        }
                    }
                    Some("function_call_output") => {
                        if let Some(o) = item.get("output") {
                            content(c, o);
                        }
                    }
                    Some("message") | None => {
                        c.fixed(TOKENS_PER_MESSAGE);
                        if let Some(r) = item.get("role").and_then(Value::as_str) {
                            c.text(r);
                        }
                        if let Some(v) = item.get("content") {
                            content(c, v);
                        }
                    }
                    // Reasoning items, tool results of built-in tools, references: no text
                    // the caller wrote.
                    Some(_) => {}
                }
            }
        }
        _ => {}
    }
    c.fixed(REPLY_PRIMING);
    if let Some(v) = body.get("tools") {
        c.json(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tok() -> PromptEstimator {
        PromptEstimator::new(EstimateMode::Tokenizer)
    }

    #[test]
    fn known_token_counts() {
        let e = tok();
        for enc in [Encoding::O200k, Encoding::Cl100k] {
            assert_eq!(e.count_text("hello world", enc), 2, "{enc:?}");
            assert_eq!(e.count_text("", enc), 0);
            assert_eq!(e.count_text("Hello, world!", enc), 4, "{enc:?}");
        }
        // (The encodings differ on the chat example below: 124 vs 129.)
        let s = "The quick brown fox jumps over the lazy dog.";
        assert_eq!(e.count_text(s, Encoding::O200k), 10);
        assert_eq!(e.count_text(s, Encoding::Cl100k), 10);
        // The tiktoken cookbook's example.
        assert_eq!(e.count_text("tiktoken is great!", Encoding::Cl100k), 6);
    }

    #[test]
    fn model_names_pick_the_encoding() {
        use Encoding::*;
        for (m, enc) in [
            ("gpt-4o", O200k),
            ("gpt-4o-mini", O200k),
            ("contoso-gpt-4o-ptu", O200k),
            ("gpt-4.1-nano", O200k),
            ("gpt-5", O200k),
            ("o1-mini", O200k),
            ("o3", O200k),
            ("o4-mini", O200k),
            ("gpt-4", Cl100k),
            ("gpt-4-32k", Cl100k),
            ("gpt-4-turbo", Cl100k),
            ("gpt-35-turbo", Cl100k),
            ("prod-gpt-35-turbo-16k", Cl100k),
            ("text-embedding-3-large", Cl100k),
            ("text-embedding-ada-002", Cl100k),
            ("my-chat-model", O200k),
            ("demo1", O200k),
        ] {
            assert_eq!(encoding_for_model(m), enc, "{m}");
        }
    }

    #[test]
    fn chat_overhead_follows_the_cookbook() {
        let e = tok();
        // 3 + (user: 1, hello world: 2) + 3 = 9
        let body = json!({"messages": [{"role": "user", "content": "hello world"}]});
        assert_eq!(e.estimate(Operation::ChatCompletions, &body, "gpt-4o"), 9);
        // Two messages, one with a name: 3+1+2 + 3+1+2+(1 name "bob" + 1) + 3 = 17
        let body = json!({"messages": [
            {"role": "system", "content": "hello world"},
            {"role": "user", "name": "bob", "content": [{"type": "text", "text": "hello world"}]}
        ]});
        assert_eq!(e.estimate(Operation::ChatCompletions, &body, "gpt-4o"), 17);
        // An image part at a fixed cost.
        let body = json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}
        ]}]});
        assert_eq!(
            e.estimate(Operation::ChatCompletions, &body, "gpt-4o"),
            3 + 1 + 85 + 3
        );
        // Empty or odd bodies do not panic.
        assert_eq!(
            e.estimate(Operation::ChatCompletions, &json!({}), "gpt-4o"),
            0
        );
        assert_eq!(
            e.estimate(Operation::ChatCompletions, &json!({"messages": [1]}), "x"),
            6
        );
    }

    #[test]
    fn matches_the_cookbook_example() {
        // OpenAI cookbook "How to count tokens with tiktoken": this conversation is 129
        // prompt tokens for gpt-4o (and gpt-4 / cl100k).
        let body = json!({"messages": [
            {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
            {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
            {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
            {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
            {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
            {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."}
        ]});
        let e = tok();
        assert_eq!(e.estimate(Operation::ChatCompletions, &body, "gpt-4o"), 124);
        assert_eq!(e.estimate(Operation::ChatCompletions, &body, "gpt-4"), 129);
    }

    #[test]
    fn completions_embeddings_responses() {
        let e = tok();
        let m = "text-embedding-3-large";
        assert_eq!(
            e.estimate(Operation::Embeddings, &json!({"input": "hello world"}), m),
            2
        );
        assert_eq!(
            e.estimate(
                Operation::Embeddings,
                &json!({"input": ["hello world", "hello"]}),
                m
            ),
            3
        );
        assert_eq!(
            e.estimate(Operation::Embeddings, &json!({"input": [1, 2, 3]}), m),
            3
        );
        assert_eq!(
            e.estimate(Operation::Embeddings, &json!({"input": [[1, 2], [3]]}), m),
            3
        );
        assert_eq!(
            e.estimate(
                Operation::Completions,
                &json!({"prompt": "hello world"}),
                "gpt-35-turbo-instruct"
            ),
            2
        );
        // responses: input string as one message + priming; instructions as another.
        let body = json!({"input": "hello world", "instructions": "hello world"});
        assert_eq!(
            e.estimate(Operation::Responses, &body, "gpt-4o"),
            3 + 2 + 3 + 2 + 3
        );
        let body = json!({"input": [
            {"role": "user", "content": [{"type": "input_text", "text": "hello world"}]},
            {"type": "function_call", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": "hello world"},
            {"type": "reasoning", "encrypted_content": "zzzz"}
        ]});
        let n = e.estimate(Operation::Responses, &body, "gpt-4o");
        assert_eq!(n, 3 + 1 + 2 + (1 + 1) + 2 + 3);
        assert_eq!(
            e.estimate(Operation::Audio, &json!({"x": "y"}), "whisper"),
            0
        );
        assert_eq!(
            e.estimate(
                Operation::Images,
                &json!({"prompt": "hello world"}),
                "dall-e-3"
            ),
            2
        );
    }

    #[test]
    fn bytes_mode_is_bytes_over_four() {
        let e = PromptEstimator::new(EstimateMode::Bytes);
        assert_eq!(e.count_text("hello world", Encoding::O200k), 3); // 11 bytes
        assert_eq!(e.count_text("abcd", Encoding::O200k), 1);
        assert_eq!(e.count_text("東京", Encoding::O200k), 2); // 6 bytes
        assert_eq!(
            e.estimate(
                Operation::Embeddings,
                &json!({"input": ["abcd", "abcde"]}),
                "m"
            ),
            3 // 9 bytes
        );
        // Chat: texts "user" + "hello world" = 15 bytes → 4, plus 3 + 3 fixed.
        let body = json!({"messages": [{"role": "user", "content": "hello world"}]});
        assert_eq!(e.estimate(Operation::ChatCompletions, &body, "gpt-4o"), 10);
        assert_eq!(e.mode(), EstimateMode::Bytes);
    }

    #[test]
    fn huge_text_falls_back_to_bytes_beyond_the_cap() {
        let e = tok();
        let big = "a ".repeat(TOKENIZE_MAX_BYTES); // 4 MiB
        let body = json!({"input": [big.clone(), "hello world"]});
        let n = e.estimate(Operation::Embeddings, &body, "text-embedding-3-small");
        // The first piece alone exceeds the cap: bytes / 4; the second is still counted.
        assert_eq!(n, big.len() as u64 / 4 + 2);
    }

    #[test]
    fn long_pieces_are_exact_up_to_their_budget_then_bytes() {
        let e = tok();
        let blob = "qwertyuiopasdfg".repeat(1000); // one 15,000-byte piece
        let exact = crate::bpe::get(Encoding::O200k).count(&blob) as u64;
        assert_eq!(e.count_text(&blob, Encoding::O200k), exact);
        // Eight such pieces fit the budget (120,000 bytes); the ninth is bytes / 4.
        let body = json!({"input": vec![blob.clone(); 9]});
        let n = e.estimate(Operation::Embeddings, &body, "text-embedding-3-small");
        let c = crate::bpe::get(Encoding::Cl100k).count(&blob) as u64;
        assert_eq!(n, 8 * c + (blob.len() as u64).div_ceil(4));
    }

    #[test]
    fn requested_output() {
        assert_eq!(requested_output_tokens(&json!({})), None);
        assert_eq!(
            requested_output_tokens(&json!({"max_tokens": 100})),
            Some(100)
        );
        assert_eq!(
            requested_output_tokens(&json!({"max_completion_tokens": 50})),
            Some(50)
        );
        assert_eq!(
            requested_output_tokens(&json!({"max_output_tokens": 70})),
            Some(70)
        );
        assert_eq!(
            requested_output_tokens(&json!({"max_tokens": 100, "max_completion_tokens": 300})),
            Some(300)
        );
        assert_eq!(
            requested_output_tokens(&json!({"max_tokens": 100, "n": 3})),
            Some(300)
        );
        assert_eq!(
            requested_output_tokens(&json!({"max_tokens": 10, "n": 2, "best_of": 5})),
            Some(50)
        );
        assert_eq!(requested_output_tokens(&json!({"max_tokens": -1})), None);
        assert_eq!(requested_output_tokens(&json!({"max_tokens": "100"})), None);
    }

    fn bench_prompt() -> String {
        let para = "The quick brown fox jumps over the lazy dog. Azure OpenAI gateways route \
            requests to regional deployments; fn main() { let x = vec![1, 2, 3]; \
            println!(\"{:?}\", x); } 12345 67890 — café naïve résumé 東京 αβγ\n";
        let mut s = String::new();
        let mut i = 0u64;
        while s.len() < 100 * 1024 {
            s.push_str(para);
            s.push_str(&i.to_string());
            s.push(' ');
            i += 1;
        }
        s
    }

    /// Tokenizer timings on a ~100 KiB prompt; see the module documentation. Run in release:
    /// `cargo test -p filters --release --features bench-tiktoken -- --ignored --nocapture tokenizer_timings`
    #[test]
    #[ignore]
    fn tokenizer_timings() {
        use std::hint::black_box;
        use std::time::{Duration, Instant};
        const RUNS: u32 = 20;
        fn time(f: impl Fn() -> usize) -> (usize, Duration) {
            let n = f();
            let t = Instant::now();
            for _ in 0..RUNS {
                black_box(f());
            }
            (n, t.elapsed() / RUNS)
        }
        let prompt = bench_prompt();
        let letters = "abcdefghijklmnopqrstuvwxyz".repeat(4000);
        let t = Instant::now();
        let (o, c) = (
            crate::bpe::get(Encoding::O200k),
            crate::bpe::get(Encoding::Cl100k),
        );
        println!("filters::bpe: tables read in {:?}", t.elapsed());
        for (name, text) in [("mixed", prompt.as_str()), ("letters", letters.as_str())] {
            let (n, d) = time(|| o.count(black_box(text)));
            println!("filters::bpe o200k_base , {name}: {n} tokens, {d:?} per count");
            let (n, d) = time(|| c.count(black_box(text)));
            println!("filters::bpe cl100k_base, {name}: {n} tokens, {d:?} per count");
        }
        let t = Instant::now();
        let o200k = bpe_openai::o200k_base();
        let cl100k = bpe_openai::cl100k_base();
        println!("bpe-openai: tables loaded in {:?}", t.elapsed());
        println!("prompt: {} bytes", prompt.len());
        let (n, d) = time(|| o200k.count(black_box(prompt.as_str())));
        println!("bpe-openai  o200k_base : {n} tokens, {d:?} per count");
        let (n, d) = time(|| cl100k.count(black_box(prompt.as_str())));
        println!("bpe-openai  cl100k_base: {n} tokens, {d:?} per count");
        let (n, d) = time(|| o200k.count(black_box(letters.as_str())));
        println!("bpe-openai  o200k_base , letters: {n} tokens, {d:?} per count");
        #[cfg(feature = "bench-tiktoken")]
        {
            let t = Instant::now();
            let o = tiktoken_rs::o200k_base_singleton();
            let c = tiktoken_rs::cl100k_base_singleton();
            println!("tiktoken-rs: tables loaded in {:?}", t.elapsed());
            let (n, d) = time(|| o.encode_ordinary(black_box(&prompt)).len());
            println!("tiktoken-rs o200k_base : {n} tokens, {d:?} per count");
            let (n, d) = time(|| c.encode_ordinary(black_box(&prompt)).len());
            println!("tiktoken-rs cl100k_base: {n} tokens, {d:?} per count");
        }
        #[cfg(not(feature = "bench-tiktoken"))]
        println!("(add --features bench-tiktoken to compare with tiktoken-rs)");
    }
}
