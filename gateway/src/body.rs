//! The request body: read whole and bounded, inspected once (deployment in `model`, `stream`,
//! the token reservation), and rewritten only where the upstream request must differ (the
//! backend's deployment name in `model`, `stream_options.include_usage` for streamed usage).

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use bytestring::ByteString;
use filters::estimate::{requested_output_tokens, PromptEstimator};
use filters::tokens::StreamUsage;
use filters::Operation;
use serde_json::Value;

use crate::errors::{ErrorCode, GatewayError};

/// Whether an operation's body is a `multipart/form-data` upload (its `model` field is
/// found, and renamed for the backend; the rest passes untouched).
pub(crate) fn is_form(operation: Operation, rest: &str) -> bool {
    match operation {
        Operation::Images => rest == "/images/edits",
        Operation::Audio => rest == "/audio/transcriptions" || rest == "/audio/translations",
        _ => false,
    }
}

/// Whether an operation's body is JSON.
fn is_json(operation: Operation, rest: &str) -> bool {
    match operation {
        Operation::ChatCompletions
        | Operation::Completions
        | Operation::Embeddings
        | Operation::Responses => true,
        Operation::Images => rest == "/images/generations",
        Operation::Audio => rest == "/audio/speech",
        Operation::ModelsRead | Operation::Realtime | Operation::Files | Operation::Batches => {
            false
        }
    }
}

#[derive(Debug)]
pub struct RequestBody {
    raw: Bytes,
    is_json: bool,
    /// Shares `raw` when the name is written without escapes (no copy per request).
    model: Option<ByteString>,
    include_usage: bool,
    /// The whole document, parsed only when needed (rewrite, token estimate).
    json: std::sync::OnceLock<Option<Arc<Value>>>,
    /// The body as it goes upstream when the gateway added `stream_options`.
    rewritten: Option<Bytes>,
    /// Where the `model` field's value is in a multipart upload.
    form_model: Option<std::ops::Range<usize>>,
    pub stream: bool,
    /// A `responses` body's fields about stored objects (`None` for other operations).
    stored: Option<Box<ResponseFields>>,
    /// Files and batches (SPEC §11): where a `purpose=batch` upload's file is, and a new
    /// batch's `input_file_id` (`None` for every other body).
    objects: Option<Box<ObjectFields>>,
}

/// What an upload or a new batch says about stored objects.
#[derive(Debug, Default)]
struct ObjectFields {
    batch_file: Option<std::ops::Range<usize>>,
    input_file_id: Option<String>,
}

/// What a `responses` body says about stored objects (SPEC §11).
#[derive(Debug, Default, serde::Deserialize)]
struct ResponseFields {
    previous_response_id: Option<String>,
    store: Option<bool>,
    background: Option<bool>,
    /// Every `file_id` the body names, at any depth.
    #[serde(skip)]
    file_ids: Vec<String>,
}

/// Collects every `file_id` member in `v` (each must be a string).
fn file_ids(v: &Value, out: &mut Vec<String>) -> Result<(), ()> {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if k == "file_id" {
                    match v {
                        Value::String(id) => out.push(id.clone()),
                        Value::Null => {}
                        _ => return Err(()),
                    }
                } else {
                    file_ids(v, out)?;
                }
            }
            Ok(())
        }
        Value::Array(a) => a.iter().try_for_each(|v| file_ids(v, out)),
        _ => Ok(()),
    }
}

/// A multipart form the strict reader refused ([`crate::multipart`]).
fn form_error(why: &str) -> GatewayError {
    GatewayError::with_message(
        ErrorCode::InvalidRequestBody,
        format!("The multipart form could not be read: {why}."),
    )
}

fn invalid(message: &'static str) -> GatewayError {
    GatewayError::with_message(ErrorCode::InvalidRequestBody, message)
}

impl RequestBody {
    pub fn inspect(
        raw: Bytes,
        operation: Operation,
        rest: &str,
        content_type: &str,
    ) -> Result<RequestBody, GatewayError> {
        let mut body = RequestBody::passthrough(raw);
        if is_form(operation, rest) {
            body.inspect_form(content_type)?;
            return Ok(body);
        }
        if !is_json(operation, rest) {
            return Ok(body);
        }
        let ct = content_type.trim().as_bytes();
        let starts = |p: &[u8]| ct.len() >= p.len() && ct[..p.len()].eq_ignore_ascii_case(p);
        let ends =
            |p: &[u8]| ct.len() >= p.len() && ct[ct.len() - p.len()..].eq_ignore_ascii_case(p);
        if !ct.is_empty() && !starts(b"application/json") && !ends(b"+json") {
            return Err(invalid(
                "The request body must be JSON (content-type: application/json).",
            ));
        }
        let first = body.raw.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            // (serde skips ignored strings without checking their UTF-8: checked first.)
            let is_json = std::str::from_utf8(&body.raw)
                .is_ok_and(|t| serde_json::from_str::<serde::de::IgnoredAny>(t).is_ok());
            return Err(if is_json {
                invalid("The request body must be a JSON object.")
            } else {
                invalid("The request body is not valid JSON.")
            });
        }
        let not_json = || invalid("The request body is not valid JSON.");
        let p = match crate::peek::top_level(&body.raw) {
            Some(p) => p,
            None => {
                let p = crate::peek::by_serde(&body.raw).ok_or_else(not_json)?;
                // Outside the fast reader's subset serde ignored most of the document (a
                // number out of `f64` range in an ignored field, say): it is parsed whole
                // now, so that what is accepted is what the rewrite and the token estimate
                // parse later (kept for them).
                let v: Value = serde_json::from_slice(&body.raw).map_err(|_| not_json())?;
                let _ = body.json.set(Some(Arc::new(v)));
                p
            }
        };
        body.is_json = true;
        body.model = match p.model {
            Some(Cow::Borrowed(m)) if !m.is_empty() => {
                ByteString::try_from(body.raw.slice_ref(m.as_bytes())).ok()
            }
            Some(Cow::Owned(m)) if !m.is_empty() => Some(m.into()),
            _ => None,
        };
        body.stream = p.stream.unwrap_or(false);
        body.include_usage = p.include_usage.unwrap_or(false);
        if operation == Operation::Responses {
            // Strictly typed: a reference the gateway cannot read must not pass unchecked.
            let f: ResponseFields = serde_json::from_slice(&body.raw).map_err(|_| {
                invalid("`previous_response_id` must be a string, `store` and `background` true or false.")
            })?;
            let mut f = f;
            // A file named anywhere in the body (`input_file`, `input_image`, …) pins the
            // request to the file's holder. Looked for only when the body can name one (the
            // key spelled out, or escapes that could spell it).
            let raw = &body.raw;
            if memchr::memmem::find(raw, b"file_id").is_some()
                || memchr::memmem::find(raw, b"\\u").is_some()
            {
                let v: Value = serde_json::from_slice(raw).map_err(|_| not_json())?;
                file_ids(&v, &mut f.file_ids)
                    .map_err(|_| invalid("Every `file_id` must be a string."))?;
            }
            body.stored = Some(Box::new(f));
        }
        Ok(body)
    }

    /// A multipart upload: its `model` field, strictly (see [`crate::multipart`]).
    fn inspect_form(&mut self, content_type: &str) -> Result<(), GatewayError> {
        let boundary = crate::multipart::boundary(content_type).ok_or_else(|| {
            invalid("The request body must be multipart/form-data with a boundary.")
        })?;
        let range = crate::multipart::find_model(&self.raw, boundary).map_err(form_error)?;
        if let Some(r) = range {
            let name = ByteString::try_from(self.raw.slice(r.clone()))
                .map_err(|_| invalid("The form's `model` field is not UTF-8 text."))?;
            if !name.is_empty() {
                self.model = Some(name);
                self.form_model = Some(r);
            }
        }
        Ok(())
    }

    /// A body passed on as it is (a follow-up on a stored object: empty, or not looked at).
    pub fn passthrough(raw: Bytes) -> RequestBody {
        RequestBody {
            raw,
            is_json: false,
            model: None,
            include_usage: false,
            json: std::sync::OnceLock::new(),
            rewritten: None,
            form_model: None,
            stream: false,
            stored: None,
            objects: None,
        }
    }

    /// A file upload (`POST /openai/files`, multipart with `purpose` and `file`). A
    /// `purpose=batch` file is read: every line's `body.model` must name the same deployment
    /// (it becomes the body's `model`), rewritten per member by [`Self::for_upstream`].
    pub fn inspect_upload(raw: Bytes, content_type: &str) -> Result<RequestBody, GatewayError> {
        let boundary = crate::multipart::boundary(content_type).ok_or_else(|| {
            invalid("The request body must be multipart/form-data with a boundary.")
        })?;
        let purpose =
            crate::multipart::find_field(&raw, boundary, b"purpose", false).map_err(form_error)?;
        let file =
            crate::multipart::find_field(&raw, boundary, b"file", true).map_err(form_error)?;
        let mut body = RequestBody::passthrough(raw);
        if purpose.is_some_and(|p| &body.raw[p] == b"batch") {
            let Some(file) = file else {
                return Err(invalid("The upload has no `file`."));
            };
            let model = crate::batchfile::model_of(&body.raw[file.clone()]).map_err(|why| {
                GatewayError::with_message(
                    ErrorCode::InvalidRequestBody,
                    format!("The batch file is refused: {why}; every line must be JSON naming one deployment in `body.model`."),
                )
            })?;
            body.model = Some(model.into());
            body.objects = Some(Box::new(ObjectFields {
                batch_file: Some(file),
                input_file_id: None,
            }));
        }
        Ok(body)
    }

    /// A new batch (`POST /openai/batches`): its `input_file_id`, which must be a string.
    pub fn inspect_batch(raw: Bytes) -> Result<RequestBody, GatewayError> {
        #[derive(serde::Deserialize)]
        struct Fields {
            input_file_id: String,
        }
        let f: Fields = serde_json::from_slice(&raw)
            .map_err(|_| invalid("The request body must be JSON with `input_file_id` a string."))?;
        let mut body = RequestBody::passthrough(raw);
        body.objects = Some(Box::new(ObjectFields {
            batch_file: None,
            input_file_id: Some(f.input_file_id),
        }));
        Ok(body)
    }

    /// The files a `responses` body names (`file_id`, at any depth).
    pub fn file_ids(&self) -> &[String] {
        self.stored.as_ref().map_or(&[], |f| &f.file_ids)
    }

    /// A new batch's `input_file_id`.
    pub fn input_file_id(&self) -> Option<&str> {
        self.objects.as_ref()?.input_file_id.as_deref()
    }

    /// Sets the deployment an upload goes to (chosen by the gateway, not named in the body).
    pub fn set_model(&mut self, name: &str) {
        self.model = Some(name.to_string().into());
    }

    /// A `responses` body's `previous_response_id`.
    pub fn previous_response_id(&self) -> Option<&str> {
        self.stored.as_ref()?.previous_response_id.as_deref()
    }

    /// Whether a `responses` body asks the backend to store the response (`store` defaults
    /// to true); false for every other body.
    pub fn stores_response(&self) -> bool {
        self.stored.as_ref().is_some_and(|f| f.store != Some(false))
    }

    /// A `responses` body with `background: true`.
    pub fn background(&self) -> bool {
        self.stored
            .as_ref()
            .is_some_and(|f| f.background == Some(true))
    }

    /// The whole document (parsed once, on first use).
    fn json(&self) -> Option<&Arc<Value>> {
        if !self.is_json {
            return None;
        }
        // Validated in `inspect`: a document that still does not parse is treated as none.
        // The body as it goes upstream: with the `stream_options` the gateway added.
        let text = self.rewritten.as_ref().unwrap_or(&self.raw);
        self.json
            .get_or_init(|| serde_json::from_slice(text).ok().map(Arc::new))
            .as_ref()
    }

    /// The body's size in bytes (an upper bound of its prompt's tokens).
    pub fn byte_len(&self) -> usize {
        self.raw.len()
    }

    /// The body's `model`, if it is a non-empty string.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// For streamed chat and completions without `stream_options.include_usage`, asks the
    /// backend for usage where its `api-version` takes `stream_options` (`accepts`, asked only
    /// for such a stream): [`StreamUsage::Injected`] (the gateway must hide it again); where
    /// it does not, [`StreamUsage::Estimate`]: the body goes as sent and the gateway counts
    /// the completion itself. Otherwise [`StreamUsage::AsSent`].
    pub fn ensure_stream_usage(
        &mut self,
        operation: Operation,
        accepts: impl FnOnce() -> bool,
    ) -> StreamUsage {
        if !self.stream
            || self.include_usage
            || !matches!(
                operation,
                Operation::ChatCompletions | Operation::Completions
            )
        {
            return StreamUsage::AsSent;
        }
        if !accepts() {
            return StreamUsage::Estimate;
        }
        if self.add_include_usage() {
            StreamUsage::Injected
        } else {
            StreamUsage::AsSent
        }
    }

    /// Sets `stream_options.include_usage` in the upstream body.
    fn add_include_usage(&mut self) -> bool {
        if self.json().is_none() {
            return false;
        }
        // Take the parsed document rather than copy it: it is replaced below.
        let Some(json) = self.json.take().flatten() else {
            return false;
        };
        let mut v = Arc::unwrap_or_clone(json);
        let Value::Object(map) = &mut v else {
            return false;
        };
        match map.get_mut("stream_options") {
            Some(Value::Object(o)) => {
                o.insert("include_usage".into(), Value::Bool(true));
            }
            _ => {
                map.insert(
                    "stream_options".into(),
                    serde_json::json!({"include_usage": true}),
                );
            }
        }
        self.rewritten = serde_json::to_vec(&v).ok().map(Bytes::from);
        // Not kept: an open stream would hold the whole document for nothing (issue 18:
        // memory per stream). A later reader (a rename for another member, a token estimate)
        // parses `rewritten` again, which is this document.
        if self.rewritten.is_none() {
            self.json = std::sync::OnceLock::from(Some(Arc::new(v)));
        }
        true
    }

    /// The body for a member whose deployment is named `upstream` (client-facing `client`):
    /// a `model` naming the client-facing deployment is replaced by the backend's name.
    pub fn for_upstream(&self, client: &str, upstream: &str) -> Bytes {
        let base = self.rewritten.clone().unwrap_or_else(|| self.raw.clone());
        if client == upstream || self.model() != Some(client) {
            return base;
        }
        if let Some(r) = self.objects.as_ref().and_then(|o| o.batch_file.clone()) {
            // The file's lines with the member's deployment; the parts around it as they are.
            let lines = crate::batchfile::rewrite(&self.raw[r.clone()], upstream);
            let mut out = Vec::with_capacity(self.raw.len() - r.len() + lines.len());
            out.extend_from_slice(&self.raw[..r.start]);
            out.extend_from_slice(&lines);
            out.extend_from_slice(&self.raw[r.end..]);
            return Bytes::from(out);
        }
        if let Some(r) = &self.form_model {
            // The field's value replaced; the parts around it (the file) copied as they are.
            let mut out = Vec::with_capacity(self.raw.len() - r.len() + upstream.len());
            out.extend_from_slice(&self.raw[..r.start]);
            out.extend_from_slice(upstream.as_bytes());
            out.extend_from_slice(&self.raw[r.end..]);
            return Bytes::from(out);
        }
        let Some(v) = self.json() else {
            return base;
        };
        let mut v = Value::clone(v);
        v["model"] = Value::String(upstream.to_string());
        serde_json::to_vec(&v).map(Bytes::from).unwrap_or(base)
    }

    /// Tokens to reserve: the prompt estimate plus the requested output (or the default).
    /// Large bodies are tokenized on the blocking pool, off the request threads.
    pub async fn reservation(
        &self,
        estimator: &Arc<PromptEstimator>,
        operation: Operation,
        model_hint: &str,
        default_output: u64,
    ) -> u64 {
        let Some(v) = self.json() else {
            return default_output;
        };
        let output = requested_output_tokens(v).unwrap_or(default_output);
        let prompt = if self.raw.len() > INLINE_ESTIMATE_BYTES {
            let (e, v, hint) = (estimator.clone(), v.clone(), model_hint.to_string());
            tokio::task::spawn_blocking(move || e.estimate(operation, &v, &hint))
                .await
                .unwrap_or((self.raw.len() / 4) as u64)
        } else {
            estimator.estimate(operation, v, model_hint)
        };
        prompt + output
    }
}

impl RequestBody {
    /// The prompt's token estimate alone (for a completion the gateway counts itself).
    pub async fn prompt_estimate(
        &self,
        estimator: &Arc<PromptEstimator>,
        operation: Operation,
        model_hint: &str,
    ) -> u64 {
        let Some(v) = self.json() else {
            return 0;
        };
        if self.raw.len() > INLINE_ESTIMATE_BYTES {
            let (e, v, hint) = (estimator.clone(), v.clone(), model_hint.to_string());
            tokio::task::spawn_blocking(move || e.estimate(operation, &v, &hint))
                .await
                .unwrap_or((self.raw.len() / 4) as u64)
        } else {
            estimator.estimate(operation, v, model_hint)
        }
    }
}

/// Bodies larger than this are tokenized with `spawn_blocking` (about 1 ms of BPE work).
const INLINE_ESTIMATE_BYTES: usize = 32 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> RequestBody {
        RequestBody::inspect(
            Bytes::from(body.to_string()),
            Operation::ChatCompletions,
            "/chat/completions",
            "application/json",
        )
        .unwrap()
    }

    #[test]
    fn rejects_non_json_and_non_objects() {
        for b in ["not json", "[1,2]", "\"x\""] {
            let e = RequestBody::inspect(
                Bytes::from(b),
                Operation::ChatCompletions,
                "",
                "application/json",
            )
            .unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequestBody, "{b}");
        }
        let e = RequestBody::inspect(Bytes::from("{}"), Operation::Embeddings, "", "text/plain")
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequestBody);
    }

    fn inspect(body: &[u8], operation: Operation, rest: &str) -> Result<RequestBody, GatewayError> {
        RequestBody::inspect(
            Bytes::copy_from_slice(body),
            operation,
            rest,
            "application/json",
        )
    }

    #[test]
    fn invalid_utf8_in_a_string_is_not_json_for_every_json_operation() {
        let ops = [
            (Operation::ChatCompletions, "/chat/completions"),
            (Operation::Completions, "/completions"),
            (Operation::Embeddings, "/embeddings"),
            (Operation::Responses, ""),
            (Operation::Images, "/images/generations"),
            (Operation::Audio, "/audio/speech"),
        ];
        for (op, rest) in ops {
            for body in [
                &b"{\"model\":\"gpt-4o\",\"messages\":\"\xff\xfe\"}"[..],
                b"{\"messages\":[{\"role\":\"user\",\"content\":\"\xff\"}]}",
                b"{\"model\":\"gpt-4o\",\"input\":[\"\xc3\",1e5]}",
                b"{\"mod\\u0065l\":\"gpt-4o\",\"input\":\"\xed\xa0\x80\"}",
                b"{\"model\":\"gpt\xff\"}",
                b"[\"\xff\"]",
            ] {
                let e = inspect(body, op, rest).unwrap_err();
                assert_eq!(e.code, ErrorCode::InvalidRequestBody, "{body:?}");
            }
            // Characters above ASCII are fine, and go upstream byte for byte.
            let fine = "{\"model\":\"gpt-4o\",\"input\":\"Grüße, 日本\",\"n\":1e5}";
            let b = inspect(fine.as_bytes(), op, rest).unwrap();
            assert_eq!(b.for_upstream("gpt-4o", "gpt-4o"), Bytes::from(fine));
        }
    }

    #[test]
    fn what_is_accepted_can_be_parsed_whole_later() {
        // Outside the fast reader's subset, serde skips ignored values unchecked: a number
        // out of range there was accepted, then the rename or the token estimate (which
        // parse the whole document) panicked.
        for body in [
            r#"{"model":"gpt-4o","n":1e400}"#,
            r#"{"model":"gpt-4o","n":[-1e999]}"#,
        ] {
            let e = inspect(body.as_bytes(), Operation::ChatCompletions, "").unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequestBody, "{body}");
        }
        // Within range, the document parsed on that path is the one used later.
        let b = inspect(
            br#"{"model":"gpt-4o","n":1e5,"stream":true}"#,
            Operation::ChatCompletions,
            "",
        )
        .unwrap();
        assert!(b.stream);
        let v: Value = serde_json::from_slice(&b.for_upstream("gpt-4o", "ptu")).unwrap();
        assert_eq!(v["model"], "ptu");
        assert_eq!(v["n"], 1e5);
    }

    #[test]
    fn model_is_read_plain_or_escaped_and_empty_is_none() {
        assert_eq!(chat(r#"{"model":"gpt-4o"}"#).model(), Some("gpt-4o"));
        // Escaped: read by serde, the same name.
        assert_eq!(chat(r#"{"model":"gpt\u002d4o"}"#).model(), Some("gpt-4o"));
        assert_eq!(
            chat(r#"{"model":"d\u00e9ploiement"}"#).model(),
            Some("d\u{e9}ploiement")
        );
        for no_name in [r#"{"model":""}"#, r#"{"model":5}"#, r#"{"messages":[]}"#] {
            assert_eq!(chat(no_name).model(), None, "{no_name}");
        }
    }

    #[test]
    fn multipart_model_is_found_and_renamed_and_the_rest_untouched() {
        let body = "--x\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\x00\x7f\r\n--x--\r\n";
        for rest in [
            "/audio/transcriptions",
            "/audio/translations",
            "/images/edits",
        ] {
            let op = if rest.starts_with("/images") {
                Operation::Images
            } else {
                Operation::Audio
            };
            let b = RequestBody::inspect(
                Bytes::from(body),
                op,
                rest,
                "multipart/form-data; boundary=x",
            )
            .unwrap();
            assert_eq!(b.model(), Some("whisper"));
            assert_eq!(
                b.for_upstream("whisper", "whisper-eastus-2"),
                Bytes::from(body.replace("\r\nwhisper\r\n", "\r\nwhisper-eastus-2\r\n"))
            );
            assert_eq!(b.for_upstream("whisper", "whisper"), Bytes::from(body));
            assert_eq!(b.for_upstream("other", "x"), Bytes::from(body));
        }
        // Not a form, or not one to trust: 400.
        for (ct, body) in [
            ("application/json", body),
            ("multipart/form-data", body),
            ("multipart/form-data; boundary=x", "--x\r\n"),
            ("multipart/form-data; boundary=y", body),
        ] {
            let e = RequestBody::inspect(
                Bytes::from(body),
                Operation::Audio,
                "/audio/transcriptions",
                ct,
            )
            .unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequestBody, "{ct} {body:?}");
        }
    }

    #[test]
    fn adds_include_usage_only_when_missing_and_accepted() {
        use StreamUsage::*;
        let yes = || true;
        let mut b = chat(r#"{"model":"m","stream":true,"messages":[]}"#);
        assert_eq!(
            b.ensure_stream_usage(Operation::ChatCompletions, yes),
            Injected
        );
        let v: Value = serde_json::from_slice(&b.for_upstream("m", "m")).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        // The parsed document is not kept after the rewrite; a member with another
        // deployment name still gets the rewritten body, renamed.
        assert!(b.json.get().is_none());
        let v: Value = serde_json::from_slice(&b.for_upstream("m", "m-ptu")).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m-ptu");

        let mut b = chat(r#"{"stream":true,"stream_options":{"include_usage":true}}"#);
        assert_eq!(
            b.ensure_stream_usage(Operation::ChatCompletions, yes),
            AsSent
        );

        let mut b = chat(r#"{"stream":true,"stream_options":{"include_usage":false,"x":1}}"#);
        assert_eq!(
            b.ensure_stream_usage(Operation::ChatCompletions, yes),
            Injected
        );
        let v: Value = serde_json::from_slice(&b.for_upstream("m", "m")).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );

        let mut b = chat(r#"{"stream":false}"#);
        assert_eq!(
            b.ensure_stream_usage(Operation::ChatCompletions, yes),
            AsSent
        );
        let mut b = chat(r#"{"stream":true}"#);
        assert_eq!(b.ensure_stream_usage(Operation::Responses, yes), AsSent);

        // A version that takes no `stream_options`: the body goes as sent, the gateway counts.
        let sent = r#"{"model":"m","stream":true,"messages":[]}"#;
        let mut b = chat(sent);
        assert_eq!(
            b.ensure_stream_usage(Operation::Completions, || false),
            Estimate
        );
        assert_eq!(b.for_upstream("m", "m"), Bytes::from(sent));
        // …unless the client asked for usage itself: forwarded as is (Azure's 400 is its answer).
        let mut b = chat(r#"{"stream":true,"stream_options":{"include_usage":true}}"#);
        assert_eq!(
            b.ensure_stream_usage(Operation::ChatCompletions, || false),
            AsSent
        );
        // The version is only looked at for a stream that would need it.
        let mut b = chat(r#"{"stream":false}"#);
        b.ensure_stream_usage(Operation::ChatCompletions, || unreachable!());
    }

    #[test]
    fn responses_fields_about_stored_objects() {
        let r = |b: &str| inspect(b.as_bytes(), Operation::Responses, "");
        let b = r(r#"{"model":"m","previous_response_id":"resp_1","background":true}"#).unwrap();
        assert_eq!(b.previous_response_id(), Some("resp_1"));
        assert!(b.stores_response() && b.background());
        let b = r(r#"{"model":"m","store":false}"#).unwrap();
        assert_eq!(b.previous_response_id(), None);
        assert!(!b.stores_response() && !b.background());
        let b = r(r#"{"model":"m","previous_response_id":null,"store":true}"#).unwrap();
        assert!(b.stores_response() && b.previous_response_id().is_none());
        // Escaped keys are read as what they are.
        let b = r(r#"{"model":"m","previous_respon\u0073e_id":"resp_2"}"#).unwrap();
        assert_eq!(b.previous_response_id(), Some("resp_2"));
        // A reference that cannot be read is refused, not passed unchecked.
        for bad in [
            r#"{"model":"m","previous_response_id":5}"#,
            r#"{"model":"m","previous_response_id":"resp_1","store":"no"}"#,
            r#"{"model":"m","previous_response_id":"a","previous_response_id":"b"}"#,
        ] {
            assert_eq!(
                r(bad).unwrap_err().code,
                ErrorCode::InvalidRequestBody,
                "{bad}"
            );
        }
        // Other operations never have them.
        assert!(!chat(r#"{"previous_response_id":"resp_1"}"#).stores_response());
        assert_eq!(
            chat(r#"{"previous_response_id":"resp_1"}"#).previous_response_id(),
            None
        );
    }

    #[test]
    fn model_is_renamed_for_the_backend() {
        let b = chat(r#"{"model":"gpt-4o","messages":[]}"#);
        let v: Value = serde_json::from_slice(&b.for_upstream("gpt-4o", "gpt-4o-ptu")).unwrap();
        assert_eq!(v["model"], "gpt-4o-ptu");
        let same = b.for_upstream("gpt-4o", "gpt-4o");
        assert_eq!(same, Bytes::from(r#"{"model":"gpt-4o","messages":[]}"#));
        assert_eq!(b.model(), Some("gpt-4o"));
    }
}
