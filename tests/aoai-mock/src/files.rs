//! Files and batches, as one Azure OpenAI resource keeps them: each mock process knows only
//! the files it was sent and the batches it runs (another mock answers 404 for their ids).
//! A batch completes `--background-delay-ms` after it was created (unless cancelled first)
//! with an output file holding one answer per input line; each answer's `model` is the
//! `body.model` its line had, so tests can see what the backend was sent.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};

/// A request on files or batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Req {
    Upload,
    List,
    Get(String),
    Content(String),
    Delete(String),
    CreateBatch,
    ListBatches,
    GetBatch(String),
    CancelBatch(String),
}

/// `/openai/files…` and `/openai/batches…` (also under `/openai/v1/`).
pub fn parse(method: &http::Method, path: &str) -> Option<Req> {
    let rest = path
        .strip_prefix("/openai/v1/")
        .or_else(|| path.strip_prefix("/openai/"))?;
    let segs: Vec<&str> = rest.split('/').collect();
    let m = method.as_str();
    Some(match (m, segs.as_slice()) {
        ("POST", ["files"]) => Req::Upload,
        ("GET", ["files"]) => Req::List,
        ("GET", ["files", id]) => Req::Get(id.to_string()),
        ("GET", ["files", id, "content"]) => Req::Content(id.to_string()),
        ("DELETE", ["files", id]) => Req::Delete(id.to_string()),
        ("POST", ["batches"]) => Req::CreateBatch,
        ("GET", ["batches"]) => Req::ListBatches,
        ("GET", ["batches", id]) => Req::GetBatch(id.to_string()),
        ("POST", ["batches", id, "cancel"]) => Req::CancelBatch(id.to_string()),
        _ => return None,
    })
}

struct File {
    purpose: String,
    filename: String,
    data: Bytes,
    created: u64,
}

struct Batch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    created: u64,
    since: Instant,
    cancelled: bool,
    output_file_id: Option<String>,
    total: usize,
}

#[derive(Default)]
struct Inner {
    files: HashMap<String, File>,
    batches: HashMap<String, Batch>,
    n: u64,
}

/// One resource's files and batches.
pub struct Files {
    inner: Mutex<Inner>,
    delay: Duration,
    tag: u32,
}

/// An answer: status, content type, body.
pub type Answer = (u16, &'static str, Bytes);

fn json_answer(status: u16, v: Value) -> Answer {
    (status, "application/json", Bytes::from(v.to_string()))
}

fn not_found(what: &str) -> Answer {
    json_answer(
        404,
        json!({"error": {"code": "404", "message": format!("{what} not found (aoai-mock).")}}),
    )
}

fn bad(message: &str) -> Answer {
    json_answer(
        400,
        json!({"error": {"code": "invalidPayload", "message": message}}),
    )
}

fn file_json(id: &str, f: &File) -> Value {
    json!({
        "id": id, "object": "file", "bytes": f.data.len(), "created_at": f.created,
        "filename": f.filename, "purpose": f.purpose, "status": "processed",
    })
}

fn list_json(mut data: Vec<(u64, String, Value)>) -> Value {
    data.sort_by(|a, b| (b.0, &b.1).cmp(&(a.0, &a.1)));
    let data: Vec<Value> = data.into_iter().map(|(_, _, v)| v).collect();
    json!({"object": "list", "data": data, "has_more": false})
}

/// The output file of a batch: one answer per input line, echoing the line's `body.model`.
pub fn batch_output(input: &[u8], batch_id: &str) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut n = 0;
    for (i, line) in input.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let v: Value = serde_json::from_slice(line).unwrap_or(Value::Null);
        let model = v
            .get("body")
            .and_then(|b| b.get("model"))
            .cloned()
            .unwrap_or(Value::Null);
        let answer = json!({
            "id": format!("batch_req_{i}"),
            "custom_id": v.get("custom_id").cloned().unwrap_or(Value::Null),
            "response": {"status_code": 200, "request_id": format!("{batch_id}-{i}"), "body": {
                "id": format!("chatcmpl-{batch_id}-{i}"), "object": "chat.completion",
                "created": 0, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "This is a batch answer from aoai-mock."}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18},
            }},
            "error": null,
        });
        out.extend_from_slice(answer.to_string().as_bytes());
        out.push(b'\n');
        n += 1;
    }
    (out, n)
}

impl Files {
    pub fn new(delay: Duration) -> Files {
        Files {
            inner: Mutex::new(Inner::default()),
            delay,
            tag: rand::random(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_id(&self, inner: &mut Inner, prefix: &str) -> String {
        inner.n += 1;
        format!("{prefix}-{:08x}{:08}", self.tag, inner.n)
    }

    /// Completes the batches whose time has come (their output file is made then).
    fn settle(&self, inner: &mut Inner) {
        let due: Vec<String> = inner
            .batches
            .iter()
            .filter(|(_, b)| {
                !b.cancelled && b.output_file_id.is_none() && b.since.elapsed() >= self.delay
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let input = inner
                .batches
                .get(&id)
                .and_then(|b| inner.files.get(&b.input_file_id))
                .map(|f| f.data.clone())
                .unwrap_or_default();
            let (out, total) = batch_output(&input, &id);
            let file_id = self.next_id(inner, "file");
            inner.files.insert(
                file_id.clone(),
                File {
                    purpose: "batch_output".into(),
                    filename: format!("{id}_output.jsonl"),
                    data: Bytes::from(out),
                    created: crate::util::now_secs(),
                },
            );
            if let Some(b) = inner.batches.get_mut(&id) {
                b.output_file_id = Some(file_id);
                b.total = total;
            }
        }
    }

    fn batch_json(id: &str, b: &Batch) -> Value {
        let status = if b.cancelled {
            "cancelled"
        } else if b.output_file_id.is_some() {
            "completed"
        } else {
            "in_progress"
        };
        json!({
            "id": id, "object": "batch", "endpoint": b.endpoint, "errors": null,
            "input_file_id": b.input_file_id, "completion_window": b.completion_window,
            "status": status, "output_file_id": b.output_file_id, "error_file_id": null,
            "created_at": b.created, "in_progress_at": b.created,
            "expires_at": b.created + 86_400,
            "completed_at": b.output_file_id.as_ref().map(|_| crate::util::now_secs()),
            "request_counts": {"total": b.total, "completed": b.total, "failed": 0},
            "metadata": null,
        })
    }

    /// Answers one request; `form` is the upload's fields read by `multer` (text fields by
    /// name, the file's name and bytes under `file`).
    pub fn answer(&self, req: &Req, form: Option<&Upload>, body: &[u8]) -> Answer {
        let mut inner = self.lock();
        self.settle(&mut inner);
        match req {
            Req::Upload => {
                let Some(u) = form else {
                    return bad(
                        "The upload must be multipart/form-data with `purpose` and `file`.",
                    );
                };
                let Some((filename, data)) = &u.file else {
                    return bad("The upload has no `file`.");
                };
                let Some(purpose) = &u.purpose else {
                    return bad("The upload has no `purpose`.");
                };
                let id = self.next_id(&mut inner, "file");
                let f = File {
                    purpose: purpose.clone(),
                    filename: filename.clone(),
                    data: data.clone(),
                    created: crate::util::now_secs(),
                };
                let v = file_json(&id, &f);
                inner.files.insert(id, f);
                json_answer(200, v)
            }
            Req::List => {
                let data = inner
                    .files
                    .iter()
                    .map(|(id, f)| (f.created, id.clone(), file_json(id, f)))
                    .collect();
                json_answer(200, list_json(data))
            }
            Req::Get(id) => match inner.files.get(id) {
                Some(f) => json_answer(200, file_json(id, f)),
                None => not_found("File"),
            },
            Req::Content(id) => match inner.files.get(id) {
                Some(f) => (200, "application/octet-stream", f.data.clone()),
                None => not_found("File"),
            },
            Req::Delete(id) => match inner.files.remove(id) {
                Some(_) => json_answer(200, json!({"id": id, "object": "file", "deleted": true})),
                None => not_found("File"),
            },
            Req::CreateBatch => {
                let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                let field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
                let Some(input) = field("input_file_id") else {
                    return bad("`input_file_id` is required.");
                };
                if !inner.files.contains_key(&input) {
                    return not_found("Input file");
                }
                let id = self.next_id(&mut inner, "batch");
                let b = Batch {
                    input_file_id: input,
                    endpoint: field("endpoint").unwrap_or_else(|| "/chat/completions".into()),
                    completion_window: field("completion_window").unwrap_or_else(|| "24h".into()),
                    created: crate::util::now_secs(),
                    since: Instant::now(),
                    cancelled: false,
                    output_file_id: None,
                    total: 0,
                };
                let v = Self::batch_json(&id, &b);
                inner.batches.insert(id, b);
                json_answer(200, v)
            }
            Req::ListBatches => {
                let data = inner
                    .batches
                    .iter()
                    .map(|(id, b)| (b.created, id.clone(), Self::batch_json(id, b)))
                    .collect();
                json_answer(200, list_json(data))
            }
            Req::GetBatch(id) => match inner.batches.get(id) {
                Some(b) => json_answer(200, Self::batch_json(id, b)),
                None => not_found("Batch"),
            },
            Req::CancelBatch(id) => match inner.batches.get_mut(id) {
                Some(b) => {
                    if b.output_file_id.is_none() {
                        b.cancelled = true;
                    }
                    json_answer(200, Self::batch_json(id, b))
                }
                None => not_found("Batch"),
            },
        }
    }
}

/// An upload's fields.
#[derive(Debug, Default)]
pub struct Upload {
    pub purpose: Option<String>,
    pub file: Option<(String, Bytes)>,
}

/// Reads an upload like Azure does (with `multer`).
pub async fn read_upload(content_type: &str, body: Bytes) -> Result<Upload, String> {
    let boundary = multer::parse_boundary(content_type).map_err(|e| e.to_string())?;
    let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let mut m = multer::Multipart::new(stream, boundary);
    let mut u = Upload::default();
    while let Some(f) = m.next_field().await.map_err(|e| e.to_string())? {
        let name = f.name().unwrap_or("").to_string();
        let filename = f.file_name().map(str::to_string);
        let data = f.bytes().await.map_err(|e| e.to_string())?;
        match (name.as_str(), filename) {
            ("file", Some(filename)) => u.file = Some((filename, data)),
            ("purpose", None) => u.purpose = Some(String::from_utf8_lossy(&data).into_owned()),
            _ => {}
        }
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        use http::Method;
        assert_eq!(parse(&Method::POST, "/openai/files"), Some(Req::Upload));
        assert_eq!(parse(&Method::GET, "/openai/v1/files"), Some(Req::List));
        assert_eq!(
            parse(&Method::GET, "/openai/files/f1/content"),
            Some(Req::Content("f1".into()))
        );
        assert_eq!(
            parse(&Method::POST, "/openai/batches/b/cancel"),
            Some(Req::CancelBatch("b".into()))
        );
        assert_eq!(parse(&Method::PUT, "/openai/files"), None);
        assert_eq!(parse(&Method::GET, "/openai/deployments/d/files"), None);
    }

    #[test]
    fn batches_complete_with_one_answer_per_line() {
        let files = Files::new(Duration::ZERO);
        let input = b"{\"custom_id\":\"a\",\"body\":{\"model\":\"m1\"}}\n{\"custom_id\":\"b\",\"body\":{\"model\":\"m1\"}}\n";
        let up = Upload {
            purpose: Some("batch".into()),
            file: Some(("in.jsonl".into(), Bytes::from_static(input))),
        };
        let (s, _, b) = files.answer(&Req::Upload, Some(&up), b"");
        assert_eq!(s, 200);
        let fid = serde_json::from_slice::<Value>(&b).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let body = json!({"input_file_id": fid, "endpoint": "/chat/completions", "completion_window": "24h"});
        let (s, _, b) = files.answer(&Req::CreateBatch, None, body.to_string().as_bytes());
        assert_eq!(s, 200);
        let bid = serde_json::from_slice::<Value>(&b).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let (_, _, b) = files.answer(&Req::GetBatch(bid), None, b"");
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["status"], "completed");
        let out = v["output_file_id"].as_str().unwrap().to_string();
        let (_, _, content) = files.answer(&Req::Content(out), None, b"");
        let lines: Vec<Value> = content
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["custom_id"], "b");
        assert_eq!(lines[0]["response"]["body"]["model"], "m1");
        assert_eq!(
            files.answer(&Req::Get("nope".into()), None, b"").0,
            404,
            "another resource's id"
        );
    }
}
