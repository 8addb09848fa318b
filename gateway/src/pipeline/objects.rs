//! Stored objects (SPEC §11) as pure decisions: which objects a request names ([`refs`]),
//! where their records pin it ([`pin`]), and what to record from a new one ([`record_for`]).
//! The stage that looks the records up (`Gateway::lookup` in `mod.rs`) runs only for a
//! request whose route or body names an object; every other request skips it.

use std::sync::Arc;

use filters::objects::{visible, ObjectRecord, Owner};

use crate::body::RequestBody;
use crate::config::runtime::Deployment;
use crate::errors::{ErrorCode, GatewayError};
use crate::pipeline::route::{ObjectAction, Route};

/// The stored objects a request names: in its path (a follow-up on a response), and in its
/// body (`previous_response_id`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refs<'a> {
    pub path: Option<(&'a str, ObjectAction)>,
    pub previous: Option<&'a str>,
    /// A new batch's `input_file_id`.
    pub input_file: Option<&'a str>,
    /// The `file_id`s of a Responses body.
    pub files: &'a [String],
}

impl<'a> Refs<'a> {
    pub fn is_empty(&self) -> bool {
        self.path.is_none()
            && self.previous.is_none()
            && self.input_file.is_none()
            && self.files.is_empty()
    }

    /// Every id named, path first.
    pub fn ids(&self) -> impl Iterator<Item = &'a str> {
        self.path
            .map(|(id, _)| id)
            .into_iter()
            .chain(self.previous)
            .chain(self.input_file)
            .chain(self.files.iter().map(String::as_str))
    }
}

/// What `route` and `body` name.
pub fn refs<'a>(route: &Route<'a>, body: Option<&'a RequestBody>) -> Refs<'a> {
    Refs {
        path: match *route {
            Route::Stored { id, action, .. } => Some((id, action)),
            _ => None,
        },
        previous: body.and_then(|b| b.previous_response_id()),
        input_file: body.and_then(|b| b.input_file_id()),
        files: body.map_or(&[], |b| b.file_ids()),
    }
}

/// The files a batch's answer names (`output_file_id`, `error_file_id`): they belong to the
/// batch's owner, on the batch's backend.
pub fn batch_files(answer: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(answer) else {
        return Vec::new();
    };
    ["output_file_id", "error_file_id"]
        .iter()
        .filter_map(|k| v.get(*k).and_then(|i| i.as_str()))
        .filter_map(|id| usable_id(id.as_bytes()))
        .collect()
}

/// `limit` and `after` of a list request's query (`limit` 1 to 10,000; default 20 for
/// batches, 10,000 for files, as the backends).
pub fn list_params(
    query: Option<&str>,
    default_limit: usize,
) -> Result<(usize, Option<&str>), GatewayError> {
    let mut limit = default_limit;
    let mut after = None;
    for pair in query.unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("limit", v)) => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| {
                        GatewayError::with_message(
                            ErrorCode::InvalidRequestBody,
                            "`limit` must be a number from 1 to 10000.",
                        )
                    })?;
            }
            Some(("after", v)) if !v.is_empty() => after = Some(v),
            _ => {}
        }
    }
    Ok((limit, after))
}

/// A list answer from the caller's own entries (`kept`, from every backend): newest first
/// (`created_at`, then id), those after the entry `after` (none when it is not among
/// them), at most `limit`.
pub fn merge_list(
    mut kept: Vec<serde_json::Value>,
    limit: usize,
    after: Option<&str>,
) -> serde_json::Value {
    let key = |v: &serde_json::Value| {
        (
            v.get("created_at").and_then(|c| c.as_i64()).unwrap_or(0),
            v.get("id")
                .and_then(|i| i.as_str())
                .unwrap_or("")
                .to_string(),
        )
    };
    kept.sort_by_key(|v| std::cmp::Reverse(key(v)));
    let start = match after {
        Some(a) => kept
            .iter()
            .position(|v| v.get("id").and_then(|i| i.as_str()) == Some(a))
            .map_or(kept.len(), |i| i + 1),
        None => 0,
    };
    let rest: Vec<_> = kept.into_iter().skip(start).collect();
    let has_more = rest.len() > limit;
    let data: Vec<_> = rest.into_iter().take(limit).collect();
    let id = |v: Option<&serde_json::Value>| v.and_then(|v| v.get("id")).cloned();
    serde_json::json!({
        "object": "list",
        "data": data,
        "first_id": id(data.first()),
        "last_id": id(data.last()),
        "has_more": has_more,
    })
}

/// Where a request that names objects goes: the backend that holds them, and the deployment
/// it is served as there.
#[derive(Debug, Clone)]
pub struct Pinned {
    /// Index into the configured backends.
    pub backend: usize,
    pub deployment: Arc<Deployment>,
}

/// Decides where a request that names objects goes, from their records (`looked_up`: each
/// id with its record, if any):
///
/// * an id without a record, expired, or not the caller's: 404 `ObjectNotFound` (the same
///   answer whatever the reason, so ids cannot be probed);
/// * records on two backends, on a backend that is no longer configured, or on a backend
///   where the deployment (`requested`, from the body; else the record's) has no member: 409
///   `ObjectConflict`.
pub fn pin(
    looked_up: &[(&str, Option<&ObjectRecord>)],
    caller: &Owner,
    now: i64,
    requested: Option<&Arc<Deployment>>,
    deployments: impl Fn(&str) -> Option<Arc<Deployment>>,
    backend_index: impl Fn(&str) -> Option<usize>,
) -> Result<Pinned, GatewayError> {
    let conflict = |why: &'static str| GatewayError::with_message(ErrorCode::ObjectConflict, why);
    let mut holder: Option<&ObjectRecord> = None;
    for (_, record) in looked_up {
        let record = match record {
            Some(r) if visible(r, caller, now) => *r,
            _ => return Err(GatewayError::new(ErrorCode::ObjectNotFound)),
        };
        match holder {
            Some(h) if h.backend != record.backend => {
                return Err(conflict(
                    "The objects this request names are held by different resources.",
                ))
            }
            _ => holder = Some(record),
        }
    }
    let Some(holder) = holder else {
        return Err(GatewayError::new(ErrorCode::ObjectNotFound));
    };
    let backend = backend_index(&holder.backend)
        .ok_or_else(|| conflict("The resource that holds this object is no longer configured."))?;
    let deployment = match requested {
        Some(d) => d.clone(),
        None => holder
            .deployment
            .as_deref()
            .and_then(deployments)
            .ok_or_else(|| conflict("The deployment of this object is no longer configured."))?,
    };
    if !deployment.members.iter().any(|m| m.backend == backend) {
        return Err(conflict(
            "The deployment has no member on the resource that holds this object.",
        ));
    }
    Ok(Pinned {
        backend,
        deployment,
    })
}

/// The record of a response the gateway saw created.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub owner: Owner,
    pub deployment: Arc<str>,
    pub background: bool,
    pub reserved: u64,
    /// Unix seconds.
    pub created: i64,
    pub retention_secs: i64,
}

/// What to record for a `POST …/responses` that the backend answered (`status`): nothing
/// unless it succeeded and was stored (`store` not false).
pub fn record_for(status: u16, stores: bool) -> bool {
    stores && (200..300).contains(&status)
}

impl NewRecord {
    pub fn record(&self, backend: &str) -> ObjectRecord {
        ObjectRecord {
            backend: backend.to_string(),
            deployment: Some(self.deployment.to_string()),
            owner: self.owner.clone(),
            created: self.created,
            expires: self.created.saturating_add(self.retention_secs),
            background: self.background,
            reserved: self.reserved,
            settled: false,
        }
    }
}

/// What a delivered follow-up on a response means for the limits: its reported usage is
/// charged only for a background response seen completed for the first time (it then
/// replaces the reservation charged at creation); any other follow-up reports usage that was
/// charged already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowUpUsage {
    /// Try to settle (the store says whether this gateway is the first).
    Settle,
    /// Not charged.
    Ignore,
}

pub fn follow_up_usage(record: &ObjectRecord, status: u16, has_usage: bool) -> FollowUpUsage {
    if record.background && !record.settled && has_usage && (200..300).contains(&status) {
        FollowUpUsage::Settle
    } else {
        FollowUpUsage::Ignore
    }
}

/// An id the gateway can record and route (as the routes accept them).
fn usable_id(id: &[u8]) -> Option<String> {
    let id = std::str::from_utf8(id).ok()?;
    crate::pipeline::route::object_id(id).then(|| id.to_string())
}

/// The top-level `id` of a JSON object, read from its start (`buf` may be only the first
/// part of a long answer: the members before `id` must be in it).
pub fn response_id_in_json(buf: &[u8]) -> Option<String> {
    let mut r = filters::json::Reader::new(buf);
    r.ws();
    let mut id = None;
    let _ = r.members(|r, key| {
        if key == b"id" {
            id = Some(r.plain_string()?);
            // Found: stop reading.
            return None;
        }
        r.value(1).map(drop)
    });
    id.and_then(usable_id)
}

/// The created response's id in an SSE stream: the `response.id` of its first event
/// (`response.created`), read as chunks arrive; gives up after [`SSE_ID_WINDOW`] bytes.
#[derive(Debug, Default)]
pub struct SseIdCapture {
    buf: Vec<u8>,
    seen: usize,
    done: bool,
}

/// Bytes of a stream searched for the id.
const SSE_ID_WINDOW: usize = 256 * 1024;

impl SseIdCapture {
    /// Whether the capture is over (found, or given up).
    pub fn done(&self) -> bool {
        self.done
    }

    /// Takes the next chunk; the id once it is found (then never again).
    pub fn push(&mut self, chunk: &[u8]) -> Option<String> {
        if self.done {
            return None;
        }
        self.buf.extend_from_slice(chunk);
        let mut rest: &[u8] = &self.buf;
        while let Some(end) = memchr::memmem::find(rest, b"\n\n") {
            let (event, tail) = rest.split_at(end + 2);
            rest = tail;
            let data: Vec<u8> = event
                .split(|b| *b == b'\n')
                .filter_map(|l| l.strip_prefix(b"data:"))
                .flat_map(|d| d.strip_prefix(b" ").unwrap_or(d).iter().copied())
                .collect();
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&data) else {
                continue;
            };
            if let Some(id) = v
                .get("response")
                .and_then(|r| r.get("id"))
                .and_then(|i| i.as_str())
            {
                self.done = true;
                self.buf = Vec::new();
                return usable_id(id.as_bytes());
            }
        }
        // Events read are not read again.
        let consumed = self.buf.len() - rest.len();
        self.buf.drain(..consumed);
        self.seen += chunk.len();
        if self.seen > SSE_ID_WINDOW {
            self.done = true;
            self.buf = Vec::new();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::runtime::Member;
    use crate::pipeline::route::classify;
    use bytes::Bytes;
    use filters::Operation;

    fn dep(name: &str, backends: &[usize]) -> Arc<Deployment> {
        Arc::new(Deployment {
            name: Arc::from(name),
            members: backends
                .iter()
                .map(|&b| Member {
                    backend: b,
                    upstream_deployment: Arc::from(name),
                    priority: 1,
                    weight: 1,
                })
                .collect(),
        })
    }

    fn deployments(name: &str) -> Option<Arc<Deployment>> {
        match name {
            "both" => Some(dep("both", &[0, 1])),
            "east" => Some(dep("east", &[0])),
            "west" => Some(dep("west", &[1])),
            _ => None,
        }
    }

    fn backend_index(name: &str) -> Option<usize> {
        ["eastus", "westus"].iter().position(|b| *b == name)
    }

    fn owner(client: &str, user: Option<&str>) -> Owner {
        Owner {
            client: client.into(),
            user: user.map(Into::into),
        }
    }

    fn rec(backend: &str, deployment: &str, client: &str, user: Option<&str>) -> ObjectRecord {
        ObjectRecord {
            backend: backend.into(),
            deployment: Some(deployment.into()),
            owner: owner(client, user),
            created: 100,
            expires: 1_000,
            background: false,
            reserved: 0,
            settled: false,
        }
    }

    #[test]
    fn pin_table() {
        use ErrorCode::*;
        let mine = rec("eastus", "both", "app", Some("alice"));
        let mine_west = rec("westus", "both", "app", Some("alice"));
        let bobs = rec("eastus", "both", "app", Some("bob"));
        let gone = rec("nowhere", "both", "app", Some("alice"));
        let orphan = rec("eastus", "removed", "app", Some("alice"));
        let alice = owner("app", Some("alice"));
        let both = dep("both", &[0, 1]);
        let west = dep("west", &[1]);
        type Case<'a> = (
            Vec<(&'a str, Option<&'a ObjectRecord>)>,
            i64,
            Option<&'a Arc<Deployment>>,
            Result<(usize, &'a str), ErrorCode>,
        );
        let cases: Vec<Case> = vec![
            // A path follow-up: the record's deployment, on the holder.
            (vec![("r1", Some(&mine))], 500, None, Ok((0, "both"))),
            (vec![("r1", Some(&mine_west))], 500, None, Ok((1, "both"))),
            // A body reference with the body's deployment.
            (
                vec![("r1", Some(&mine_west))],
                500,
                Some(&west),
                Ok((1, "west")),
            ),
            // Path and body on the same holder.
            (
                vec![("r1", Some(&mine)), ("r2", Some(&mine))],
                500,
                Some(&both),
                Ok((0, "both")),
            ),
            // Unknown, someone else's, expired: one answer.
            (vec![("r1", None)], 500, None, Err(ObjectNotFound)),
            (vec![("r1", Some(&bobs))], 500, None, Err(ObjectNotFound)),
            (vec![("r1", Some(&mine))], 1_000, None, Err(ObjectNotFound)),
            (
                vec![("r1", Some(&mine)), ("r2", Some(&bobs))],
                500,
                None,
                Err(ObjectNotFound),
            ),
            // Two resources.
            (
                vec![("r1", Some(&mine)), ("r2", Some(&mine_west))],
                500,
                Some(&both),
                Err(ObjectConflict),
            ),
            // The requested deployment has no member on the holder.
            (
                vec![("r1", Some(&mine))],
                500,
                Some(&west),
                Err(ObjectConflict),
            ),
            // The holder or the record's deployment left the configuration.
            (vec![("r1", Some(&gone))], 500, None, Err(ObjectConflict)),
            (vec![("r1", Some(&orphan))], 500, None, Err(ObjectConflict)),
            (vec![], 500, None, Err(ObjectNotFound)),
        ];
        for (looked_up, now, requested, want) in cases {
            let got = pin(
                &looked_up,
                &alice,
                now,
                requested,
                deployments,
                backend_index,
            )
            .map(|p| (p.backend, p.deployment.name.to_string()))
            .map_err(|e| e.code);
            let want = want.map(|(b, d)| (b, d.to_string()));
            assert_eq!(got, want, "{looked_up:?} at {now} for {requested:?}");
        }
    }

    #[test]
    fn not_found_is_one_answer_whatever_the_reason() {
        let alice = owner("app", Some("alice"));
        let bobs = rec("eastus", "both", "app", Some("bob"));
        let mut expired = rec("eastus", "both", "app", Some("alice"));
        expired.expires = 10;
        let bodies: Vec<Bytes> = [
            vec![("r", None)],
            vec![("r", Some(&bobs))],
            vec![("r", Some(&expired))],
        ]
        .iter()
        .map(|l| {
            pin(l, &alice, 500, None, deployments, backend_index)
                .unwrap_err()
                .body()
        })
        .collect();
        assert!(bodies.windows(2).all(|w| w[0] == w[1]), "{bodies:?}");
    }

    fn body(json: &str) -> RequestBody {
        RequestBody::inspect(
            Bytes::from(json.to_string()),
            Operation::Responses,
            "",
            "application/json",
        )
        .unwrap()
    }

    #[test]
    fn refs_table() {
        let chained = body(r#"{"model":"m","input":"hi","previous_response_id":"resp_1"}"#);
        let plain = body(r#"{"model":"m","input":"hi"}"#);
        let create = classify("POST", "/openai/v1/responses");
        let get = classify("GET", "/openai/v1/responses/resp_9");
        let chat = classify("POST", "/openai/deployments/d/chat/completions");
        assert!(refs(&create, Some(&plain)).is_empty());
        assert!(refs(&chat, None).is_empty());
        let r = refs(&create, Some(&chained));
        assert_eq!(r.ids().collect::<Vec<_>>(), ["resp_1"]);
        let with_file = body(
            r#"{"model":"m","previous_response_id":"resp_1","input":[{"role":"user","content":[{"type":"input_file","file_id":"file-1"},{"type":"input_text","text":"file_id"}]}]}"#,
        );
        let r = refs(&create, Some(&with_file));
        assert_eq!(r.ids().collect::<Vec<_>>(), ["resp_1", "file-1"]);
        // Spelled with escapes, the backend reads the same key.
        let escaped = body(r#"{"model":"m","input":[{"content":[{"file\u005fid":"file-2"}]}]}"#);
        assert_eq!(
            refs(&create, Some(&escaped)).ids().collect::<Vec<_>>(),
            ["file-2"]
        );
        assert!(RequestBody::inspect(
            Bytes::from_static(br#"{"model":"m","input":[{"file_id":5}]}"#),
            Operation::Responses,
            "",
            "application/json"
        )
        .is_err());
        let r = refs(&get, None);
        assert_eq!(r.path, Some(("resp_9", ObjectAction::Retrieve)));
        assert_eq!(r.ids().collect::<Vec<_>>(), ["resp_9"]);
    }

    #[test]
    fn lists_are_merged_newest_first_and_paged() {
        use serde_json::json;
        let e = |id: &str, t: i64| json!({"id": id, "created_at": t});
        let kept = vec![e("a", 1), e("c", 3), e("b", 2), e("d", 3)];
        let ids = |v: &serde_json::Value| -> Vec<String> {
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["id"].as_str().unwrap().to_string())
                .collect()
        };
        let all = merge_list(kept.clone(), 10, None);
        assert_eq!(ids(&all), ["d", "c", "b", "a"]);
        assert_eq!(all["has_more"], false);
        assert_eq!(all["object"], "list");
        let first = merge_list(kept.clone(), 2, None);
        assert_eq!(ids(&first), ["d", "c"]);
        assert_eq!(first["has_more"], true);
        assert_eq!(first["last_id"], "c");
        let next = merge_list(kept.clone(), 2, Some("c"));
        assert_eq!(ids(&next), ["b", "a"]);
        assert_eq!(next["has_more"], false);
        assert!(ids(&merge_list(kept, 2, Some("someone-elses"))).is_empty());
        assert_eq!(
            list_params(Some("limit=5&after=x"), 20).unwrap(),
            (5, Some("x"))
        );
        assert_eq!(list_params(None, 20).unwrap(), (20, None));
        assert!(list_params(Some("limit=0"), 20).is_err());
        assert!(list_params(Some("limit=x"), 20).is_err());
    }

    #[test]
    fn a_batchs_files() {
        assert_eq!(
            batch_files(br#"{"id":"b","output_file_id":"file-1","error_file_id":null}"#),
            ["file-1"]
        );
        assert_eq!(
            batch_files(br#"{"output_file_id":"file-1","error_file_id":"file-2"}"#),
            ["file-1", "file-2"]
        );
        assert!(batch_files(br#"{"output_file_id":"../x"}"#).is_empty());
        assert!(batch_files(b"nope").is_empty());
    }

    #[test]
    fn ids_of_answers() {
        for (json, want) in [
            (r#"{"id":"resp_1","object":"response"}"#, Some("resp_1")),
            (
                r#"{ "object":"response", "x":[1,{"id":"no"}], "id" : "resp_2" }"#,
                Some("resp_2"),
            ),
            // Only the first part of a long answer: enough when `id` comes early.
            (r#"{"id":"resp_3","output":[{"type":"mess"#, Some("resp_3")),
            (r#"{"output":[{"id":"msg_1"}],"usage":"#, None),
            (r#"{"id":"../x"}"#, None),
            (r#"{"id":5}"#, None),
            (r#"[1]"#, None),
            ("", None),
        ] {
            assert_eq!(
                response_id_in_json(json.as_bytes()).as_deref(),
                want,
                "{json}"
            );
        }
    }

    #[test]
    fn ids_of_streams_split_anywhere() {
        let stream = "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_abc\",\"status\":\"in_progress\"}}\n\nevent: response.in_progress\ndata: {\"response\":{\"id\":\"resp_abc\"}}\n\n";
        for cut in 0..stream.len() {
            let mut c = SseIdCapture::default();
            let mut found = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                found.extend(c.push(part.as_bytes()));
            }
            assert_eq!(found, ["resp_abc"], "cut at {cut}");
            assert!(c.done());
        }
        // A stream without one gives up after its window.
        let mut c = SseIdCapture::default();
        let noise = "data: {\"x\":1}\n\n".repeat(30_000);
        assert_eq!(c.push(noise.as_bytes()), None);
        assert!(c.done());
    }

    #[test]
    fn what_is_recorded_and_charged() {
        assert!(record_for(200, true));
        assert!(!record_for(200, false), "store: false is not recorded");
        assert!(!record_for(400, true));
        assert!(!record_for(429, true));
        let mut r = rec("eastus", "both", "app", None);
        assert_eq!(follow_up_usage(&r, 200, true), FollowUpUsage::Ignore);
        r.background = true;
        assert_eq!(follow_up_usage(&r, 200, true), FollowUpUsage::Settle);
        assert_eq!(follow_up_usage(&r, 200, false), FollowUpUsage::Ignore);
        assert_eq!(follow_up_usage(&r, 404, true), FollowUpUsage::Ignore);
        r.settled = true;
        assert_eq!(follow_up_usage(&r, 200, true), FollowUpUsage::Ignore);
        let n = NewRecord {
            owner: owner("app", Some("u")),
            deployment: Arc::from("both"),
            background: true,
            reserved: 70,
            created: 1_000,
            retention_secs: 86_400,
        };
        let made = n.record("westus");
        assert_eq!(made.expires, 87_400);
        assert_eq!(made.backend, "westus");
        assert!(made.background && !made.settled);
        assert_eq!(made.reserved, 70);
    }
}
