//! Azure OpenAI response bodies, built as text from small precomputed pieces.

use crate::body::SseBuilder;
use crate::util::{json_str, push_json_str};
use base64::Engine as _;
use serde_json::Value;
use std::fmt::Write as _;

/// The reply text of a backend, precomputed once: "Hello from {name}."
/// split into the chunks it is streamed in.
pub struct Reply {
    /// The whole reply as a JSON string literal.
    pub content_json: String,
    /// The streamed pieces as JSON string literals.
    pub chunks_json: Vec<String>,
    /// `completion_tokens` / `output_tokens`: the number of chunks.
    pub completion_tokens: u64,
}

impl Reply {
    #[cfg(test)]
    pub fn new(name: &str) -> Self {
        Self::with_pieces(name, 4)
    }

    /// "Hello from {name}." in `pieces` streamed chunks (at least 4): past 4, " again" is
    /// repeated before the final "." (the benchmarks' long streams: `--stream-chunks`).
    pub fn with_pieces(name: &str, pieces: usize) -> Self {
        let mut chunks = vec!["Hello".to_string(), " from".to_string(), format!(" {name}")];
        chunks.extend(std::iter::repeat_n(
            " again".to_string(),
            pieces.saturating_sub(4),
        ));
        chunks.push(".".to_string());
        let content: String = chunks.concat();
        Reply {
            content_json: json_str(&content),
            chunks_json: chunks.iter().map(|c| json_str(c)).collect(),
            completion_tokens: chunks.len() as u64,
        }
    }
}

/// The identity of one answer.
pub struct Meta<'a> {
    /// The object id, e.g. `chatcmpl-…`.
    pub id: &'a str,
    pub created: u64,
    /// The model (= deployment) as a JSON string literal.
    pub model_json: &'a str,
}

const CFR: &str = r#"{"hate":{"filtered":false,"severity":"safe"},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}"#;
const PROMPT_FILTER: &str = r#"[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"},"jailbreak":{"filtered":false,"detected":false},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}}]"#;
pub const FINGERPRINT: &str = "fp_aoai_mock";

/// Bytes of text in a request value: strings count their UTF-8 length, numbers
/// (token ids) 4 bytes each, arrays their elements, objects their `text` or
/// else their `content`.
pub fn text_bytes(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Number(_) => 4,
        Value::Array(a) => a.iter().map(text_bytes).sum(),
        Value::Object(o) => match o.get("text") {
            Some(t) => text_bytes(t),
            None => o.get("content").map(text_bytes).unwrap_or(0),
        },
        _ => 0,
    }
}

/// `max(1, bytes / 4)`.
pub fn tokens_of(bytes: usize) -> u64 {
    ((bytes / 4) as u64).max(1)
}

/// Prompt tokens of a chat request: all message contents.
pub fn chat_prompt_tokens(body: &Value) -> u64 {
    tokens_of(body.get("messages").map(text_bytes).unwrap_or(0))
}

/// Like Azure's prompt caching: a prompt of 1,024 tokens or more is reported cached in
/// 128-token steps from 1,024 (as if it had been sent before), a shorter one not at all.
pub fn cached_tokens(prompt: u64) -> u64 {
    if prompt < 1024 {
        0
    } else {
        1024 + (prompt - 1024) / 128 * 128
    }
}

/// Reasoning models (deployments named `o1…`, `o3…`, `o4…`, `gpt-5…`) think for 64 tokens,
/// counted in the completion as Azure does; others for none.
pub fn reasoning_tokens(model_json: &str) -> u64 {
    let m = model_json.trim_matches('"');
    let reasons = ["o1", "o3", "o4", "gpt-5"].iter().any(|p| m.starts_with(p));
    if reasons {
        64
    } else {
        0
    }
}

fn push_chat_usage(out: &mut String, model_json: &str, prompt: u64, completion: u64) {
    let (cached, reasoning) = (cached_tokens(prompt), reasoning_tokens(model_json));
    let completion = completion + reasoning;
    let _ = write!(
        out,
        r#"{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":{cached},"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":{reasoning},"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}}"#,
        prompt + completion
    );
}

/// A `chat.completion` object.
pub fn chat_completion(m: &Meta, r: &Reply, prompt_tokens: u64) -> String {
    let mut o = String::with_capacity(1024);
    let _ = write!(
        o,
        r#"{{"id":"{}","object":"chat.completion","created":{},"model":{},"system_fingerprint":"{FINGERPRINT}","prompt_filter_results":{PROMPT_FILTER},"choices":[{{"index":0,"finish_reason":"stop","logprobs":null,"message":{{"role":"assistant","content":{},"refusal":null}},"content_filter_results":{CFR}}}],"usage":"#,
        m.id, m.created, m.model_json, r.content_json
    );
    push_chat_usage(&mut o, m.model_json, prompt_tokens, r.completion_tokens);
    o.push('}');
    o
}

fn chunk_head(o: &mut String, m: &Meta, object: &str) {
    let _ = write!(
        o,
        r#"{{"id":"{}","object":"{object}","created":{},"model":{},"system_fingerprint":"{FINGERPRINT}","choices":"#,
        m.id, m.created, m.model_json
    );
}

fn chunk_tail(o: &mut String, include_usage: bool) {
    if include_usage {
        o.push_str(r#","usage":null"#);
    }
    o.push('}');
}

/// The SSE events of a streamed chat completion.
pub fn chat_stream(m: &Meta, r: &Reply, prompt_tokens: u64, include_usage: bool) -> SseBuilder {
    let mut b = SseBuilder::new();
    let obj = "chat.completion.chunk";
    b.data(false, |o| {
        chunk_head(o, m, obj);
        o.push_str(r#"[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]"#);
        chunk_tail(o, include_usage);
    });
    for c in &r.chunks_json {
        b.data(true, |o| {
            chunk_head(o, m, obj);
            let _ = write!(
                o,
                r#"[{{"index":0,"delta":{{"content":{c}}},"logprobs":null,"finish_reason":null}}]"#
            );
            chunk_tail(o, include_usage);
        });
    }
    b.data(true, |o| {
        chunk_head(o, m, obj);
        o.push_str(r#"[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]"#);
        chunk_tail(o, include_usage);
    });
    if include_usage {
        b.data(false, |o| {
            chunk_head(o, m, obj);
            o.push_str(r#"[],"usage":"#);
            push_chat_usage(o, m.model_json, prompt_tokens, r.completion_tokens);
            o.push('}');
        });
    }
    b.done();
    b
}

/// Prompt tokens of a completions request.
pub fn completion_prompt_tokens(body: &Value) -> u64 {
    tokens_of(body.get("prompt").map(text_bytes).unwrap_or(0))
}

/// A `text_completion` object.
pub fn completion(m: &Meta, r: &Reply, prompt_tokens: u64) -> String {
    let mut o = String::with_capacity(768);
    let _ = write!(
        o,
        r#"{{"id":"{}","object":"text_completion","created":{},"model":{},"system_fingerprint":"{FINGERPRINT}","prompt_filter_results":{PROMPT_FILTER},"choices":[{{"text":{},"index":0,"logprobs":null,"finish_reason":"stop","content_filter_results":{CFR}}}],"usage":"#,
        m.id, m.created, m.model_json, r.content_json
    );
    push_chat_usage(&mut o, m.model_json, prompt_tokens, r.completion_tokens);
    o.push('}');
    o
}

/// The SSE events of a streamed completion.
pub fn completion_stream(
    m: &Meta,
    r: &Reply,
    prompt_tokens: u64,
    include_usage: bool,
) -> SseBuilder {
    let mut b = SseBuilder::new();
    let obj = "text_completion";
    for (i, c) in r.chunks_json.iter().enumerate() {
        b.data(i > 0, |o| {
            chunk_head(o, m, obj);
            let _ = write!(
                o,
                r#"[{{"text":{c},"index":0,"logprobs":null,"finish_reason":null}}]"#
            );
            chunk_tail(o, include_usage);
        });
    }
    b.data(true, |o| {
        chunk_head(o, m, obj);
        o.push_str(r#"[{"text":"","index":0,"logprobs":null,"finish_reason":"stop"}]"#);
        chunk_tail(o, include_usage);
    });
    if include_usage {
        b.data(false, |o| {
            chunk_head(o, m, obj);
            o.push_str(r#"[],"usage":"#);
            push_chat_usage(o, m.model_json, prompt_tokens, r.completion_tokens);
            o.push('}');
        });
    }
    b.done();
    b
}

/// The inputs of an embeddings request: a string, a token array, or an array of
/// either. Returns the inputs' text (token arrays rendered as their numbers)
/// or an error message.
pub fn embedding_inputs(body: &Value) -> Result<Vec<String>, &'static str> {
    let input = body.get("input").ok_or("'input' is a required property")?;
    let one = |v: &Value| -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Array(a) if a.iter().all(Value::is_number) => Some(
                a.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            _ => None,
        }
    };
    match input {
        Value::Array(a) if !a.is_empty() && !a.iter().all(Value::is_number) => a
            .iter()
            .map(|v| one(v).ok_or("'input' must be a string or an array of strings or tokens"))
            .collect(),
        v => one(v)
            .map(|s| vec![s])
            .ok_or("'input' must be a string or an array of strings or tokens"),
    }
}

/// A deterministic unit vector of `dims` values derived from `text`.
pub fn embedding_vector(text: &str, dims: usize) -> Vec<f32> {
    // FNV-1a seed, then xorshift64*.
    let mut x: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        x ^= u64::from(*b);
        x = x.wrapping_mul(0x0100_0000_01b3);
    }
    if x == 0 {
        x = 1;
    }
    let mut v: Vec<f32> = (0..dims)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
            ((r >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
    if norm > 0.0 {
        for a in &mut v {
            *a /= norm;
        }
    }
    v
}

/// An embeddings `list`. `base64`: little-endian f32 bytes, standard base64.
pub fn embeddings(
    model_json: &str,
    inputs: &[String],
    dims: usize,
    base64: bool,
    prompt_tokens: u64,
) -> String {
    let mut o = String::with_capacity(128 + inputs.len() * (dims * 12 + 64));
    o.push_str(r#"{"object":"list","data":["#);
    for (i, text) in inputs.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        let _ = write!(o, r#"{{"object":"embedding","index":{i},"embedding":"#);
        let v = embedding_vector(text, dims);
        if base64 {
            let mut bytes = Vec::with_capacity(dims * 4);
            for a in &v {
                bytes.extend_from_slice(&a.to_le_bytes());
            }
            o.push('"');
            base64::engine::general_purpose::STANDARD.encode_string(&bytes, &mut o);
            o.push('"');
        } else {
            o.push('[');
            for (j, a) in v.iter().enumerate() {
                if j > 0 {
                    o.push(',');
                }
                let _ = write!(o, "{a}");
            }
            o.push(']');
        }
        o.push('}');
    }
    let _ = write!(
        o,
        r#"],"model":{model_json},"usage":{{"prompt_tokens":{prompt_tokens},"total_tokens":{prompt_tokens}}}}}"#
    );
    o
}

/// Prompt tokens of a responses request: its `input`.
pub fn responses_input_tokens(body: &Value) -> u64 {
    tokens_of(body.get("input").map(text_bytes).unwrap_or(0))
}

fn push_response_usage(o: &mut String, model_json: &str, input: u64, output: u64) {
    let (cached, reasoning) = (cached_tokens(input), reasoning_tokens(model_json));
    let output = output + reasoning;
    let _ = write!(
        o,
        r#"{{"input_tokens":{input},"input_tokens_details":{{"cached_tokens":{cached}}},"output_tokens":{output},"output_tokens_details":{{"reasoning_tokens":{reasoning}}},"total_tokens":{}}}"#,
        input + output
    );
}

fn push_output_text(o: &mut String, text_json: &str) {
    let _ = write!(
        o,
        r#"{{"type":"output_text","text":{text_json},"annotations":[],"logprobs":[]}}"#
    );
}

fn push_message(o: &mut String, msg_id: &str, r: &Reply, completed: bool) {
    let _ = write!(
        o,
        r#"{{"type":"message","id":"{msg_id}","status":"{}","role":"assistant","content":["#,
        if completed {
            "completed"
        } else {
            "in_progress"
        }
    );
    if completed {
        push_output_text(o, &r.content_json);
    }
    o.push_str("]}");
}

/// A `response` object; `completed` false gives the in-progress shape of the
/// first streamed events (no output, no usage).
pub fn response_object(
    m: &Meta,
    msg_id: &str,
    r: &Reply,
    input_tokens: u64,
    completed: bool,
) -> String {
    let mut o = String::with_capacity(1024);
    let _ = write!(
        o,
        r#"{{"id":"{}","object":"response","created_at":{},"status":"{}","background":false,"completed_at":{},"error":null,"incomplete_details":null,"instructions":null,"max_output_tokens":null,"metadata":{{}},"model":{},"output":["#,
        m.id,
        m.created,
        if completed {
            "completed"
        } else {
            "in_progress"
        },
        if completed {
            m.created.to_string()
        } else {
            "null".to_string()
        },
        m.model_json
    );
    if completed {
        push_message(&mut o, msg_id, r, true);
    }
    o.push_str(r#"],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":null,"summary":null},"service_tier":"default","store":false,"temperature":1.0,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":"#);
    if completed {
        push_response_usage(&mut o, m.model_json, input_tokens, r.completion_tokens);
    } else {
        o.push_str("null");
    }
    o.push_str(r#","user":null}"#);
    o
}

/// The SSE events of a streamed response (`event:` lines, `sequence_number`s,
/// no `[DONE]`).
pub fn response_stream(m: &Meta, msg_id: &str, r: &Reply, input_tokens: u64) -> SseBuilder {
    let mut b = SseBuilder::new();
    let mut seq = 0u64;
    let mut next = || {
        let s = seq;
        seq += 1;
        s
    };
    let in_progress = response_object(m, msg_id, r, input_tokens, false);
    for kind in ["response.created", "response.in_progress"] {
        let n = next();
        b.event(false, kind, |o| {
            let _ = write!(
                o,
                r#"{{"type":"{kind}","sequence_number":{n},"response":{in_progress}}}"#
            );
        });
    }
    let n = next();
    b.event(false, "response.output_item.added", |o| {
        let _ = write!(
            o,
            r#"{{"type":"response.output_item.added","sequence_number":{n},"output_index":0,"item":"#
        );
        push_message(o, msg_id, r, false);
        o.push('}');
    });
    let n = next();
    b.event(false, "response.content_part.added", |o| {
        let _ = write!(
            o,
            r#"{{"type":"response.content_part.added","sequence_number":{n},"item_id":"{msg_id}","output_index":0,"content_index":0,"part":"#
        );
        push_output_text(o, r#""""#);
        o.push('}');
    });
    for c in &r.chunks_json {
        let n = next();
        b.event(true, "response.output_text.delta", |o| {
            let _ = write!(
                o,
                r#"{{"type":"response.output_text.delta","sequence_number":{n},"item_id":"{msg_id}","output_index":0,"content_index":0,"delta":{c},"logprobs":[]}}"#
            );
        });
    }
    let n = next();
    b.event(true, "response.output_text.done", |o| {
        let _ = write!(
            o,
            r#"{{"type":"response.output_text.done","sequence_number":{n},"item_id":"{msg_id}","output_index":0,"content_index":0,"text":{},"logprobs":[]}}"#,
            r.content_json
        );
    });
    let n = next();
    b.event(false, "response.content_part.done", |o| {
        let _ = write!(
            o,
            r#"{{"type":"response.content_part.done","sequence_number":{n},"item_id":"{msg_id}","output_index":0,"content_index":0,"part":"#
        );
        push_output_text(o, &r.content_json);
        o.push('}');
    });
    let n = next();
    b.event(false, "response.output_item.done", |o| {
        let _ = write!(
            o,
            r#"{{"type":"response.output_item.done","sequence_number":{n},"output_index":0,"item":"#
        );
        push_message(o, msg_id, r, true);
        o.push('}');
    });
    let n = next();
    let done = response_object(m, msg_id, r, input_tokens, true);
    b.event(false, "response.completed", |o| {
        let _ = write!(
            o,
            r#"{{"type":"response.completed","sequence_number":{n},"response":{done}}}"#
        );
    });
    b
}

/// The models / deployments list served on the health-check paths.
pub fn model_list(created: u64, deployments: bool) -> String {
    let mut o = String::from(r#"{"object":"list","data":["#);
    for (i, id) in ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]
        .iter()
        .enumerate()
    {
        if i > 0 {
            o.push(',');
        }
        if deployments {
            let _ = write!(
                o,
                r#"{{"id":"{id}","object":"deployment","model":"{id}","owner":"organization-owner","status":"succeeded","created_at":{created},"updated_at":{created}}}"#
            );
        } else {
            let _ = write!(
                o,
                r#"{{"id":"{id}","object":"model","created":{created},"owned_by":"system"}}"#
            );
        }
    }
    o.push_str("]}");
    o
}

/// A 1×1 PNG.
const PNG_1X1: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
    0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x60, 0x00, 0x02, 0x00,
    0x00, 0x05, 0x00, 0x01, 0xe9, 0xfa, 0xdc, 0xd8, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44,
    0xae, 0x42, 0x60, 0x82,
];

/// An images answer: a URL, or (`b64`) the image itself, with the deployment that drew it
/// in `revised_prompt` (and the uploaded image's sha256 for an edit).
pub fn images(created: u64, b64: bool, model: &str, body: &Value) -> String {
    let prompt = body.get("prompt").and_then(Value::as_str).unwrap_or("");
    let mut revised = format!("{prompt} (drawn by {model})");
    if let Some(image) = body.get("files").and_then(|f| f.get("image")) {
        let _ = write!(revised, " from {}", image["sha256"].as_str().unwrap_or(""));
    }
    let image = if b64 {
        format!(
            r#""b64_json":"{}""#,
            base64::engine::general_purpose::STANDARD.encode(PNG_1X1)
        )
    } else {
        r#""url":"https://example.invalid/img.png""#.to_string()
    };
    format!(
        r#"{{"created":{created},"data":[{{{image},"revised_prompt":{},"content_filter_results":{CFR}}}]}}"#,
        json_str(&revised)
    )
}

/// An Azure error body `{"error":{"code":..,"message":..}}`.
pub fn error_body(code: &str, message: &str) -> String {
    let mut o = String::with_capacity(64 + message.len());
    o.push_str(r#"{"error":{"code":"#);
    push_json_str(&mut o, code);
    o.push_str(r#","message":"#);
    push_json_str(&mut o, message);
    o.push_str("}}");
    o
}

/// Azure's answer to a body field its `api-version` does not know (400).
pub fn unrecognized_argument_body(field: &str) -> String {
    let mut o = String::from(r#"{"error":{"message":"#);
    push_json_str(
        &mut o,
        &format!("Unrecognized request argument supplied: {field}"),
    );
    o.push_str(r#","type":"invalid_request_error","param":null,"code":null}}"#);
    o
}

/// A dated `api-version` (`YYYY-MM-DD[-preview]`) before `2024-09-01-preview`, which takes
/// no `stream_options` (ISO dates compare as text).
pub fn version_refuses_stream_options(v: &str) -> bool {
    let date = v.get(..10).unwrap_or("");
    let dated = date.len() == 10
        && date.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    dated && date < "2024-09-01"
}

/// `ceil(ms / 1000)`: the `retry-after` seconds of a `retry-after-ms`.
pub fn retry_after_secs(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

/// The body of an injected 429.
pub fn too_many_body(operation: &str, api_version: &str, retry_after_ms: u64) -> String {
    let secs = retry_after_secs(retry_after_ms);
    error_body(
        "429",
        &format!(
            "Requests to the {operation} Operation under Azure OpenAI API version {api_version} have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after {secs} seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit."
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta<'a>(model_json: &'a str) -> Meta<'a> {
        Meta {
            id: "chatcmpl-1",
            created: 1700000000,
            model_json,
        }
    }

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).unwrap_or_else(|e| panic!("invalid JSON {e}: {s}"))
    }

    /// The JSON payloads of a stream's `data:` lines (without `[DONE]`).
    fn sse_payloads(text: &str) -> Vec<Value> {
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
            .filter(|d| *d != "[DONE]")
            .map(parse)
            .collect()
    }

    #[test]
    fn reply_pieces() {
        let r = Reply::new("b1 \"q\"");
        assert_eq!(r.completion_tokens, 4);
        let whole: String = r
            .chunks_json
            .iter()
            .map(|c| serde_json::from_str::<String>(c).unwrap())
            .collect();
        assert_eq!(whole, "Hello from b1 \"q\".");
        assert_eq!(
            serde_json::from_str::<String>(&r.content_json).unwrap(),
            whole
        );
    }

    #[test]
    fn reply_in_more_pieces() {
        let r = Reply::with_pieces("m", 20);
        assert_eq!(r.completion_tokens, 20);
        assert_eq!(r.chunks_json.len(), 20);
        let whole: String = r
            .chunks_json
            .iter()
            .map(|c| serde_json::from_str::<String>(c).unwrap())
            .collect();
        assert_eq!(whole, format!("Hello from m{}.", " again".repeat(16)));
        // Fewer than 4 is the plain reply.
        assert_eq!(
            Reply::with_pieces("m", 2).chunks_json,
            Reply::new("m").chunks_json
        );
    }

    #[test]
    fn token_counting() {
        let body = json!({"messages":[
            {"role":"system","content":"12345678"},
            {"role":"user","content":[{"type":"text","text":"abcd"},{"type":"image_url","image_url":{"url":"x"}}]}
        ]});
        assert_eq!(chat_prompt_tokens(&body), 3);
        assert_eq!(
            chat_prompt_tokens(&json!({"messages":[{"role":"user","content":"hi"}]})),
            1
        );
        assert_eq!(chat_prompt_tokens(&json!({})), 1);
        assert_eq!(
            completion_prompt_tokens(&json!({"prompt":["abcdabcd","abcd"]})),
            3
        );
        assert_eq!(completion_prompt_tokens(&json!({"prompt":[1,2,3]})), 3);
        assert_eq!(responses_input_tokens(&json!({"input":"abcdabcd"})), 2);
        assert_eq!(
            responses_input_tokens(
                &json!({"input":[{"role":"user","content":[{"type":"input_text","text":"abcdabcdabcd"}]}]})
            ),
            3
        );
    }

    #[test]
    fn chat_completion_shape() {
        let r = Reply::new("m1");
        let mj = json_str("dep");
        let v = parse(&chat_completion(&meta(&mj), &r, 7));
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "dep");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["message"]["content"], "Hello from m1.");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["prompt_tokens"], 7);
        assert_eq!(v["usage"]["completion_tokens"], 4);
        assert_eq!(v["usage"]["total_tokens"], 11);
        assert!(v["system_fingerprint"].is_string());
        assert!(v["prompt_filter_results"].is_array());
    }

    #[test]
    fn chat_stream_without_usage() {
        let r = Reply::new("m1");
        let mj = json_str("dep");
        let b = chat_stream(&meta(&mj), &r, 7, false);
        let text = b.text();
        assert!(!text.contains("usage"));
        assert!(text.ends_with("data: [DONE]\n\n"));
        let p = sse_payloads(text);
        assert_eq!(p.len(), 6);
        assert_eq!(p[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(p[0]["choices"][0]["delta"]["content"], "");
        let content: String = p[1..5]
            .iter()
            .map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(content, "Hello from m1.");
        assert_eq!(p[5]["choices"][0]["finish_reason"], "stop");
        assert_eq!(p[5]["choices"][0]["delta"], json!({}));
        for c in &p {
            assert_eq!(c["object"], "chat.completion.chunk");
            assert_eq!(c["model"], "dep");
        }
    }

    #[test]
    fn chat_stream_with_usage() {
        let r = Reply::new("m1");
        let mj = json_str("dep");
        let b = chat_stream(&meta(&mj), &r, 7, true);
        let text = b.text();
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 8);
        for e in &events[..6] {
            assert!(e.ends_with(r#","usage":null}"#), "{e}");
        }
        let p = sse_payloads(text);
        assert_eq!(p[6]["choices"], json!([]));
        assert_eq!(p[6]["usage"]["prompt_tokens"], 7);
        assert_eq!(p[6]["usage"]["completion_tokens"], 4);
        assert_eq!(p[6]["usage"]["total_tokens"], 11);
        assert_eq!(events[7], "data: [DONE]");
    }

    #[test]
    fn completion_shapes() {
        let r = Reply::new("m1");
        let mj = json_str("dep");
        let v = parse(&completion(&meta(&mj), &r, 2));
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], "Hello from m1.");
        assert_eq!(v["usage"]["total_tokens"], 6);
        let b = completion_stream(&meta(&mj), &r, 2, true);
        let p = sse_payloads(b.text());
        assert_eq!(p.len(), 6);
        let text: String = p[..4]
            .iter()
            .map(|c| c["choices"][0]["text"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(text, "Hello from m1.");
        assert_eq!(p[4]["choices"][0]["finish_reason"], "stop");
        assert_eq!(p[5]["usage"]["prompt_tokens"], 2);
        assert!(!completion_stream(&meta(&mj), &r, 2, false)
            .text()
            .contains("usage"));
    }

    #[test]
    fn embedding_input_forms() {
        assert_eq!(embedding_inputs(&json!({"input":"a"})).unwrap().len(), 1);
        assert_eq!(
            embedding_inputs(&json!({"input":["a","b"]})).unwrap().len(),
            2
        );
        assert_eq!(
            embedding_inputs(&json!({"input":[1,2,3]})).unwrap().len(),
            1
        );
        assert_eq!(
            embedding_inputs(&json!({"input":[[1,2],[3]]}))
                .unwrap()
                .len(),
            2
        );
        assert!(embedding_inputs(&json!({})).is_err());
        assert!(embedding_inputs(&json!({"input":{"x":1}})).is_err());
        assert!(embedding_inputs(&json!({"input":[{"x":1}]})).is_err());
    }

    #[test]
    fn embeddings_float_and_base64_agree() {
        let mj = json_str("emb");
        let inputs = vec!["hello".to_string(), "world".to_string()];
        let f = parse(&embeddings(&mj, &inputs, 8, false, 2));
        let b = parse(&embeddings(&mj, &inputs, 8, true, 2));
        assert_eq!(f["object"], "list");
        assert_eq!(f["usage"]["prompt_tokens"], 2);
        assert_eq!(f["usage"]["total_tokens"], 2);
        assert_eq!(f["data"][1]["index"], 1);
        for i in 0..2 {
            let floats: Vec<f32> = f["data"][i]["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(floats.len(), 8);
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b["data"][i]["embedding"].as_str().unwrap())
                .unwrap();
            let decoded: Vec<f32> = raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            assert_eq!(decoded, floats);
            let norm: f32 = floats.iter().map(|x| x * x).sum();
            assert!((norm - 1.0).abs() < 1e-4);
        }
        assert_ne!(f["data"][0]["embedding"], f["data"][1]["embedding"]);
        assert_eq!(embedding_vector("x", 4), embedding_vector("x", 4));
    }

    #[test]
    fn response_shapes() {
        let r = Reply::new("m1");
        let mj = json_str("gpt");
        let m = Meta {
            id: "resp_1",
            created: 5,
            model_json: &mj,
        };
        let v = parse(&response_object(&m, "msg_1", &r, 3, true));
        assert_eq!(v["object"], "response");
        assert_eq!(v["status"], "completed");
        assert_eq!(v["output"][0]["type"], "message");
        assert_eq!(v["output"][0]["content"][0]["type"], "output_text");
        assert_eq!(v["output"][0]["content"][0]["text"], "Hello from m1.");
        assert_eq!(v["output"][0]["content"][0]["annotations"], json!([]));
        assert_eq!(v["usage"]["input_tokens"], 3);
        assert_eq!(v["usage"]["output_tokens"], 4);
        assert_eq!(v["usage"]["total_tokens"], 7);
        assert_eq!(v["usage"]["input_tokens_details"]["cached_tokens"], 0);
        assert_eq!(v["usage"]["output_tokens_details"]["reasoning_tokens"], 0);
        let ip = parse(&response_object(&m, "msg_1", &r, 3, false));
        assert_eq!(ip["status"], "in_progress");
        assert_eq!(ip["usage"], Value::Null);

        let b = response_stream(&m, "msg_1", &r, 3);
        let text = b.text();
        assert!(!text.contains("[DONE]"));
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        let names: Vec<&str> = events
            .iter()
            .map(|e| e.lines().next().unwrap().strip_prefix("event: ").unwrap())
            .collect();
        assert_eq!(names.first(), Some(&"response.created"));
        assert_eq!(names.last(), Some(&"response.completed"));
        let p = sse_payloads(text);
        for (i, (e, n)) in p.iter().zip(&names).enumerate() {
            assert_eq!(e["type"], *n);
            assert_eq!(e["sequence_number"], i as u64);
        }
        let deltas: String = p
            .iter()
            .filter(|e| e["type"] == "response.output_text.delta")
            .map(|e| e["delta"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(deltas, "Hello from m1.");
        assert_eq!(p.last().unwrap()["response"]["usage"]["total_tokens"], 7);
    }

    #[test]
    fn versions_that_refuse_stream_options() {
        for (v, refuses) in [
            ("2024-02-01", true),
            ("2024-06-01", true),
            ("2023-05-15", true),
            ("2024-08-01-preview", true),
            ("2024-09-01-preview", false),
            ("2024-10-21", false),
            ("2025-04-01-preview", false),
            ("preview", false),
            ("latest", false),
            ("2024-6-01", false),
        ] {
            assert_eq!(version_refuses_stream_options(v), refuses, "{v}");
        }
    }

    #[test]
    fn usage_details_by_prompt_and_model() {
        assert_eq!(cached_tokens(1023), 0);
        assert_eq!(cached_tokens(1024), 1024);
        assert_eq!(cached_tokens(1151), 1024);
        assert_eq!(cached_tokens(1152), 1152);
        assert_eq!(reasoning_tokens("\"o3-mini\""), 64);
        assert_eq!(reasoning_tokens("\"gpt-5\""), 64);
        assert_eq!(reasoning_tokens("\"gpt-4o\""), 0);
        let m = meta("\"o1\"");
        let v = parse(&chat_completion(&m, &Reply::new("x"), 2000));
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 1920);
        assert_eq!(
            v["usage"]["completion_tokens_details"]["reasoning_tokens"],
            64
        );
        assert_eq!(v["usage"]["completion_tokens"], 4 + 64);
        assert_eq!(v["usage"]["total_tokens"], 2000 + 4 + 64);
    }

    #[test]
    fn misc_bodies() {
        let v = parse(&model_list(1, false));
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["object"], "model");
        assert_eq!(
            parse(&model_list(1, true))["data"][0]["object"],
            "deployment"
        );
        let prompt = json!({"prompt": "a cat"});
        let v = parse(&images(1, false, "dalle", &prompt));
        assert_eq!(v["data"][0]["url"], "https://example.invalid/img.png");
        assert_eq!(v["data"][0]["revised_prompt"], "a cat (drawn by dalle)");
        let v = parse(&images(1, true, "dalle", &prompt));
        let png = base64::engine::general_purpose::STANDARD
            .decode(v["data"][0]["b64_json"].as_str().unwrap())
            .unwrap();
        assert_eq!(png, PNG_1X1);
        assert_eq!(
            parse(&unrecognized_argument_body("stream_options")),
            json!({"error":{"message":"Unrecognized request argument supplied: stream_options","type":"invalid_request_error","param":null,"code":null}})
        );
        assert_eq!(
            parse(&error_body("404", "Resource not found")),
            json!({"error":{"code":"404","message":"Resource not found"}})
        );
        assert_eq!(retry_after_secs(0), 0);
        assert_eq!(retry_after_secs(1), 1);
        assert_eq!(retry_after_secs(1000), 1);
        assert_eq!(retry_after_secs(1500), 2);
        let t = parse(&too_many_body("ChatCompletions_Create", "2024-10-21", 2500));
        assert_eq!(t["error"]["code"], "429");
        assert!(t["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Please retry after 3 seconds"));
    }
}
