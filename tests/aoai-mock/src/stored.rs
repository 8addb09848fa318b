//! Stored responses, as one Azure OpenAI resource keeps them: each mock process is one
//! resource, and knows only the responses it created (another mock answers 404 for them, as
//! another Azure resource would). `store` defaults to true; `previous_response_id` must name
//! a response of this resource; `background: true` responses are `queued`, then
//! `in_progress`, then `completed` (with usage) after `--background-delay-ms`, unless
//! cancelled first.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::body::SseBuilder;
use crate::builders::{self, Meta, Reply};

/// What a request on a stored response does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Retrieve,
    Delete,
    Cancel,
    InputItems,
}

/// `/openai/v1/responses/{id}[/action]` and `/openai/responses/{id}[/action]`.
pub fn parse(method: &http::Method, path: &str) -> Option<(Action, String)> {
    let rest = path
        .strip_prefix("/openai/v1/responses/")
        .or_else(|| path.strip_prefix("/openai/responses/"))?;
    let (id, tail) = match rest.split_once('/') {
        Some((id, t)) => (id, Some(t)),
        None => (rest, None),
    };
    if id.is_empty() {
        return None;
    }
    let action = match (method.as_str(), tail) {
        ("GET", None) => Action::Retrieve,
        ("DELETE", None) => Action::Delete,
        ("POST", Some("cancel")) => Action::Cancel,
        ("GET", Some("input_items")) => Action::InputItems,
        _ => return None,
    };
    Some((action, id.to_string()))
}

#[derive(Debug, Clone)]
struct Stored {
    model_json: String,
    msg_id: String,
    input_tokens: u64,
    input: Value,
    created: u64,
    since: Instant,
    background: bool,
    cancelled: bool,
    previous: Option<String>,
}

/// The status of a response at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Queued,
    InProgress,
    Completed,
    Cancelled,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Cancelled => "cancelled",
        }
    }
}

/// A background response's status after `elapsed` (pure: tested below).
pub fn status(background: bool, cancelled: bool, elapsed: Duration, delay: Duration) -> Status {
    if !background {
        Status::Completed
    } else if cancelled {
        Status::Cancelled
    } else if elapsed >= delay {
        Status::Completed
    } else if elapsed < delay / 2 {
        Status::Queued
    } else {
        Status::InProgress
    }
}

/// An answer: status and JSON body, or an SSE stream.
pub enum Answer {
    Json(u16, String),
    Sse(SseBuilder),
}

fn not_found(id: &str) -> Answer {
    Answer::Json(
        404,
        json!({"error": {"message": format!("Response with id '{id}' not found."), "type": "invalid_request_error", "param": null, "code": null}})
            .to_string(),
    )
}

fn bad(message: &str, param: &str) -> Answer {
    Answer::Json(
        400,
        json!({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": null}})
            .to_string(),
    )
}

pub struct Responses {
    map: Mutex<HashMap<String, Stored>>,
    delay: Duration,
}

impl Responses {
    pub fn new(delay: Duration) -> Self {
        Responses {
            map: Mutex::new(HashMap::new()),
            delay,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Stored>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks a create request's references (`None`: go ahead).
    pub fn check_create(&self, body: &Value) -> Option<Answer> {
        if let Some(prev) = body.get("previous_response_id").and_then(Value::as_str) {
            if !self.map().contains_key(prev) {
                return Some(Answer::Json(
                    404,
                    json!({"error": {"message": format!("Previous response with id '{prev}' not found."), "type": "invalid_request_error", "param": "previous_response_id", "code": "previous_response_not_found"}})
                        .to_string(),
                ));
            }
        }
        let store = body.get("store").and_then(Value::as_bool).unwrap_or(true);
        let background = body
            .get("background")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if background && !store {
            return Some(bad(
                "Background responses must be stored (store cannot be false).",
                "background",
            ));
        }
        None
    }

    /// A new response (checked by [`Responses::check_create`]): its answer, stored when asked.
    pub fn create(
        &self,
        m: &Meta,
        msg_id: &str,
        r: &Reply,
        body: &Value,
        input_tokens: u64,
    ) -> Answer {
        let store = body.get("store").and_then(Value::as_bool).unwrap_or(true);
        let background = body
            .get("background")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let s = Stored {
            model_json: m.model_json.to_string(),
            msg_id: msg_id.to_string(),
            input_tokens,
            input: body.get("input").cloned().unwrap_or(Value::Null),
            created: m.created,
            since: Instant::now(),
            background,
            cancelled: false,
            previous: body
                .get("previous_response_id")
                .and_then(Value::as_str)
                .map(str::to_string),
        };
        let answer = if stream && !background {
            Answer::Sse(fields_in_stream(
                builders::response_stream(m, msg_id, r, input_tokens),
                &s,
                store,
            ))
        } else {
            let st = status(background, false, Duration::ZERO, self.delay);
            Answer::Json(200, object(m.id, &s, r, st, store))
        };
        if store {
            self.map().insert(m.id.to_string(), s);
        }
        answer
    }

    /// A request on a stored response (`query`: `stream`, `starting_after`).
    pub fn follow_up(
        &self,
        action: Action,
        id: &str,
        r: &Reply,
        query: &[(String, String)],
    ) -> Answer {
        let mut map = self.map();
        let Some(s) = map.get_mut(id) else {
            return not_found(id);
        };
        let elapsed = s.since.elapsed();
        match action {
            Action::Retrieve => {
                let stream = query.iter().any(|(k, v)| k == "stream" && v == "true");
                if !stream {
                    let st = status(s.background, s.cancelled, elapsed, self.delay);
                    return Answer::Json(200, object(id, s, r, st, true));
                }
                let after = query
                    .iter()
                    .find(|(k, _)| k == "starting_after")
                    .and_then(|(_, v)| v.parse::<u64>().ok());
                // A resumed stream replays the events after `starting_after`, to completion.
                let m = Meta {
                    id,
                    created: s.created,
                    model_json: &s.model_json,
                };
                let all = fields_in_stream(
                    builders::response_stream(&m, &s.msg_id, r, s.input_tokens),
                    s,
                    true,
                );
                Answer::Sse(match after {
                    Some(n) => all.retain_after(n),
                    None => all,
                })
            }
            Action::Delete => {
                map.remove(id);
                Answer::Json(
                    200,
                    json!({"id": id, "object": "response", "deleted": true}).to_string(),
                )
            }
            Action::Cancel => {
                if !s.background {
                    return bad("Cannot cancel a synchronous response.", "response_id");
                }
                if status(true, s.cancelled, elapsed, self.delay) != Status::Completed {
                    s.cancelled = true;
                }
                let st = status(true, s.cancelled, elapsed, self.delay);
                Answer::Json(200, object(id, s, r, st, true))
            }
            Action::InputItems => {
                let items: Vec<Value> = match &s.input {
                    Value::String(t) => vec![json!({
                        "type": "message", "id": format!("msg_in_{id}"), "role": "user", "status": "completed",
                        "content": [{"type": "input_text", "text": t}],
                    })],
                    Value::Array(a) => a
                        .iter()
                        .enumerate()
                        .map(|(i, item)| {
                            let mut item = item.clone();
                            if let Value::Object(o) = &mut item {
                                o.entry("id").or_insert(json!(format!("msg_in_{id}_{i}")));
                                o.entry("type").or_insert(json!("message"));
                            }
                            item
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                let first = items.first().and_then(|i| i.get("id")).cloned();
                let last = items.last().and_then(|i| i.get("id")).cloned();
                Answer::Json(
                    200,
                    json!({"object": "list", "data": items, "first_id": first, "last_id": last, "has_more": false})
                        .to_string(),
                )
            }
        }
    }
}

/// A response object in status `st`, with the request's `store`, `background` and
/// `previous_response_id`.
fn object(id: &str, s: &Stored, r: &Reply, st: Status, store: bool) -> String {
    let m = Meta {
        id,
        created: s.created,
        model_json: &s.model_json,
    };
    let text = builders::response_object(&m, &s.msg_id, r, s.input_tokens, st == Status::Completed);
    let mut v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if let Value::Object(o) = &mut v {
        o.insert("status".into(), json!(st.as_str()));
        o.insert("store".into(), json!(store));
        o.insert("background".into(), json!(s.background));
        o.insert("previous_response_id".into(), json!(s.previous));
    }
    v.to_string()
}

/// The request's `store`, `background` and `previous_response_id` in a stream's response
/// objects.
fn fields_in_stream(b: SseBuilder, s: &Stored, store: bool) -> SseBuilder {
    let prev = match &s.previous {
        Some(p) => format!(r#""previous_response_id":"{p}""#),
        None => r#""previous_response_id":null"#.to_string(),
    };
    b.map_text(|t| {
        t.replace(r#""previous_response_id":null"#, &prev)
            .replace(r#""store":false"#, &format!(r#""store":{store}"#))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_status_table() {
        let d = Duration::from_millis(400);
        let ms = Duration::from_millis;
        for (bg, cancelled, elapsed, want) in [
            (false, false, ms(0), Status::Completed),
            (true, false, ms(0), Status::Queued),
            (true, false, ms(199), Status::Queued),
            (true, false, ms(200), Status::InProgress),
            (true, false, ms(400), Status::Completed),
            (true, true, ms(100), Status::Cancelled),
            (true, true, ms(900), Status::Cancelled),
        ] {
            assert_eq!(
                status(bg, cancelled, elapsed, d),
                want,
                "{bg} {cancelled} {elapsed:?}"
            );
        }
    }

    #[test]
    fn paths() {
        let g = http::Method::GET;
        assert_eq!(
            parse(&g, "/openai/v1/responses/resp_1"),
            Some((Action::Retrieve, "resp_1".into()))
        );
        assert_eq!(
            parse(&http::Method::POST, "/openai/responses/r/cancel"),
            Some((Action::Cancel, "r".into()))
        );
        assert_eq!(
            parse(&g, "/openai/responses/r/input_items"),
            Some((Action::InputItems, "r".into()))
        );
        assert_eq!(
            parse(&http::Method::DELETE, "/openai/v1/responses/r"),
            Some((Action::Delete, "r".into()))
        );
        assert_eq!(parse(&http::Method::POST, "/openai/v1/responses/r"), None);
        assert_eq!(parse(&g, "/openai/v1/responses/"), None);
    }

    #[test]
    fn a_resource_knows_only_its_own_responses() {
        let r = Reply::new("a");
        let res = Responses::new(Duration::from_millis(50));
        let m = Meta {
            id: "resp_a1",
            created: 1,
            model_json: "\"gpt-4o\"",
        };
        let body = json!({"model": "gpt-4o", "input": "hi"});
        assert!(res.check_create(&body).is_none());
        res.create(&m, "msg_1", &r, &body, 3);
        let chained =
            json!({"model": "gpt-4o", "input": "more", "previous_response_id": "resp_a1"});
        assert!(res.check_create(&chained).is_none());
        let elsewhere = json!({"model": "gpt-4o", "previous_response_id": "resp_b1"});
        assert!(matches!(
            res.check_create(&elsewhere),
            Some(Answer::Json(404, _))
        ));
        let Answer::Json(200, got) = res.follow_up(Action::Retrieve, "resp_a1", &r, &[]) else {
            panic!("retrieve");
        };
        let v: Value = serde_json::from_str(&got).unwrap();
        assert_eq!(v["status"], "completed");
        assert_eq!(v["store"], true);
        assert!(matches!(
            res.follow_up(Action::Delete, "resp_a1", &r, &[]),
            Answer::Json(200, _)
        ));
        assert!(matches!(
            res.follow_up(Action::Retrieve, "resp_a1", &r, &[]),
            Answer::Json(404, _)
        ));
        // store: false is not kept.
        let m2 = Meta {
            id: "resp_a2",
            created: 1,
            model_json: "\"gpt-4o\"",
        };
        res.create(
            &m2,
            "msg_2",
            &r,
            &json!({"model": "gpt-4o", "store": false}),
            1,
        );
        assert!(matches!(
            res.follow_up(Action::Retrieve, "resp_a2", &r, &[]),
            Answer::Json(404, _)
        ));
    }

    #[test]
    fn background_responses_complete_with_usage_and_resume_after_a_sequence_number() {
        let r = Reply::new("a");
        let res = Responses::new(Duration::from_millis(30));
        let m = Meta {
            id: "resp_bg",
            created: 1,
            model_json: "\"gpt-4o\"",
        };
        let Answer::Json(200, first) = res.create(
            &m,
            "msg_b",
            &r,
            &json!({"model": "gpt-4o", "background": true, "input": "x"}),
            5,
        ) else {
            panic!("create");
        };
        let v: Value = serde_json::from_str(&first).unwrap();
        assert_eq!(v["status"], "queued");
        assert!(v["usage"].is_null());
        std::thread::sleep(Duration::from_millis(40));
        let Answer::Json(200, done) = res.follow_up(Action::Retrieve, "resp_bg", &r, &[]) else {
            panic!("retrieve");
        };
        let v: Value = serde_json::from_str(&done).unwrap();
        assert_eq!(v["status"], "completed");
        assert_eq!(v["usage"]["input_tokens"], 5);
        let q = vec![
            ("stream".to_string(), "true".to_string()),
            ("starting_after".to_string(), "3".to_string()),
        ];
        let Answer::Sse(b) = res.follow_up(Action::Retrieve, "resp_bg", &r, &q) else {
            panic!("stream");
        };
        let seqs: Vec<u64> = b
            .text()
            .split("\n\n")
            .filter_map(|e| e.split("\"sequence_number\":").nth(1))
            .filter_map(|t| t.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .collect();
        assert_eq!(seqs.first(), Some(&4));
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    }
}
