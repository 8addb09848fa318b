//! The Realtime API over WebSocket: `GET /openai/realtime?deployment=D` and
//! `GET /openai/v1/realtime?model=D` with `Upgrade: websocket`. Credentials are checked like
//! the other data-plane requests (a refusal is a plain 401 answer); the upgrade is recorded
//! in `/_mock/requests` with its headers and query. In the session:
//!
//! - `session.created` first, its `session.model` the deployment the mock was asked for;
//! - `session.update` → `session.updated`;
//! - `conversation.item.create` → `conversation.item.created`;
//! - `response.create` → `response.created`, two `response.output_text.delta`, one
//!   `response.output_audio_transcript.delta`, `response.output_text.done` and
//!   `response.done` with usage: 120 input tokens (64 cached, 40 audio), 80 output tokens
//!   (50 audio), 200 in all — and `response.metadata.deployment`, the deployment again;
//! - pings are answered, a close is answered and ends the session.

use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use http::header::{CONNECTION, UPGRADE};
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::body::MockBody;
use crate::state::{Record, Stats};
use crate::util::{form_pairs, pair};
use crate::{unauthorized, Conn, State};

/// Whether the request asks for a realtime session.
pub fn is_realtime(req: &Request<Incoming>) -> bool {
    matches!(req.uri().path(), "/openai/realtime" | "/openai/v1/realtime")
        && req
            .headers()
            .get(UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

/// Answers the upgrade (101, or 401/400) and runs the session on its own task.
pub fn upgrade(conn: &Conn, mut req: Request<Incoming>) -> Response<MockBody> {
    let st = conn.st.clone();
    Stats::inc(&st.stats.requests);
    let v1 = req.uri().path() == "/openai/v1/realtime";
    let query = req.uri().query().map(str::to_string);
    let pairs = query.as_deref().map(form_pairs).unwrap_or_default();
    let deployment = pair(&pairs, if v1 { "model" } else { "deployment" }).map(str::to_string);
    let key = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| derive_accept_key(k.as_bytes()));
    let response = if !st.authorized(req.headers()) {
        unauthorized(&st)
    } else if let (Some(accept), Some(deployment)) = (key, deployment) {
        let on_upgrade = hyper::upgrade::on(&mut req);
        let st = st.clone();
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                session(ws, &st, &deployment).await;
            }
        });
        let mut r = Response::new(MockBody::Full(None));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        if let Ok(v) = HeaderValue::from_str(&accept) {
            h.insert("sec-websocket-accept", v);
        }
        r
    } else {
        st.error(
            400,
            "A realtime session needs Sec-WebSocket-Key and its deployment.",
        )
    };
    let (parts, _) = req.into_parts();
    st.recorder.push(Record {
        seq: 0,
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        query,
        body_len: 0,
        body_sha256: [0; 32],
        model: Value::Null,
        stream: Value::Null,
        stream_options: Value::Null,
        status: response.status().as_u16(),
        headers: parts.headers,
    });
    response
}

async fn session<S>(mut ws: WebSocketStream<S>, st: &Arc<State>, deployment: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut n = 0u64;
    let mut next_id = || {
        n += 1;
        format!("event_mock_{n}")
    };
    let name = st.name_hv.to_str().unwrap_or("mock").to_string();
    let session_obj = json!({
        "id": format!("sess_{}", st.ids.next()),
        "object": "realtime.session",
        "type": "realtime",
        "model": deployment,
        "output_modalities": ["text", "audio"],
    });
    let created = json!({"type": "session.created", "event_id": next_id(), "session": session_obj});
    if ws.send(Message::text(created.to_string())).await.is_err() {
        return;
    }
    while let Some(Ok(m)) = ws.next().await {
        let text = match m {
            Message::Text(t) => t,
            Message::Close(_) => break,
            _ => continue,
        };
        let Ok(event) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let mut out: Vec<Value> = Vec::new();
        match event.get("type").and_then(Value::as_str).unwrap_or("") {
            "session.update" => {
                let mut s = session_obj.clone();
                if let (Some(obj), Some(upd)) = (
                    s.as_object_mut(),
                    event.get("session").and_then(Value::as_object),
                ) {
                    for (k, v) in upd {
                        if k != "model" {
                            obj.insert(k.clone(), v.clone());
                        }
                    }
                }
                out.push(json!({"type": "session.updated", "event_id": next_id(), "session": s}));
            }
            "conversation.item.create" => {
                out.push(json!({
                    "type": "conversation.item.created",
                    "event_id": next_id(),
                    "previous_item_id": null,
                    "item": event.get("item").cloned().unwrap_or(Value::Null),
                }));
            }
            "response.create" => {
                let id = format!("resp_{}", st.ids.next());
                let item = format!("item_{}", st.ids.next());
                let resp = |status: &str, usage: Value| {
                    json!({
                        "id": id, "object": "realtime.response", "status": status,
                        "output": [], "metadata": {"deployment": deployment}, "usage": usage,
                    })
                };
                out.push(json!({"type": "response.created", "event_id": next_id(), "response": resp("in_progress", Value::Null)}));
                for delta in ["Hello ", "from ", name.as_str(), "."] {
                    out.push(json!({
                        "type": "response.output_text.delta", "event_id": next_id(),
                        "response_id": id, "item_id": item, "output_index": 0,
                        "content_index": 0, "delta": delta,
                    }));
                }
                out.push(json!({
                    "type": "response.output_audio_transcript.delta", "event_id": next_id(),
                    "response_id": id, "item_id": item, "output_index": 0,
                    "content_index": 1, "delta": format!("Hello from {name}."),
                }));
                out.push(json!({
                    "type": "response.output_text.done", "event_id": next_id(),
                    "response_id": id, "item_id": item, "output_index": 0,
                    "content_index": 0, "text": format!("Hello from {name}."),
                }));
                let usage = json!({
                    "total_tokens": 200, "input_tokens": 120, "output_tokens": 80,
                    "input_token_details": {
                        "cached_tokens": 64, "text_tokens": 80, "audio_tokens": 40,
                        "cached_tokens_details": {"text_tokens": 64, "audio_tokens": 0},
                    },
                    "output_token_details": {"text_tokens": 30, "audio_tokens": 50},
                });
                out.push(json!({"type": "response.done", "event_id": next_id(), "response": resp("completed", usage)}));
            }
            _ => {}
        }
        for e in out {
            if ws.send(Message::text(e.to_string())).await.is_err() {
                return;
            }
        }
    }
    let _ = ws.close(None).await;
}
