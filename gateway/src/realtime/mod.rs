//! Realtime sessions (SPEC §12): a client's WebSocket relayed to a member's, message by
//! message, under the client's limits.
//!
//! The pipeline's realtime stage (`pipeline/realtime.rs`) authenticates and authorizes the
//! upgrade, admits the session against the limits, opens the member's WebSocket (failing
//! over only before that upgrade completes) and answers `101`; then [`relay`] runs the
//! session. The decisions are pure functions in [`protocol`]; this module is the I/O:
//!
//! - every message is forwarded as it arrives (never a whole session buffered; a message is
//!   held only until it is complete, up to `server.realtime_max_message_bytes`);
//! - a client `response.create` is admitted first (one request, nothing reserved): while the
//!   client is over a request or token limit it is answered with an `error` event
//!   (`rate_limit_exceeded`) instead, and the session goes on;
//! - a server `response.done`'s usage is charged to the client's token windows and counted
//!   in `aoai_gateway_tokens_total` as it arrives;
//! - pings, pongs and close frames are relayed; an idle session
//!   (`server.realtime_idle_seconds`) or one older than `server.realtime_max_session_seconds`
//!   is closed on both sides.

pub mod protocol;

use std::time::{Duration, SystemTime};

use filters::limits::{Admission, ClientLimits, Limiter};
use filters::FilterError;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::config::runtime::Realtime;
use crate::observe::metrics::TokenSeries;
use protocol::{kind_of, Kind, RealtimeUsage};

/// How long the closing handshake may take once one side closed.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The codec settings of both sides: small eager read buffers (an idle session costs a few
/// KiB), messages written at once, and the message size cap.
pub fn ws_config(r: &Realtime) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(r.max_message_bytes))
        .max_frame_size(Some(r.max_message_bytes))
}

/// Whose limits the session runs under.
pub struct Governor<'a> {
    pub limiter: &'a Limiter,
    pub client_id: &'a str,
    /// The caller's `user_claim` value (its `limits.per_user` windows).
    pub user: Option<&'a str>,
    pub deployment: &'a str,
    pub limits: &'a ClientLimits,
    /// The session's own admission (`None`: no limit applies): usage is charged to it.
    pub session: Option<&'a Admission>,
    pub tokens: TokenSeries,
    /// Called with the rejection reason of each refused `response.create`.
    pub refused: &'a (dyn Fn(&'static str) + Sync),
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client closed (its close frame was relayed), or a send to it failed.
    ClientClosed,
    /// The backend closed (its close frame was relayed), or a send to it failed.
    BackendClosed,
    /// The client's connection ended without a close frame.
    ClientGone,
    /// The backend's connection ended without a close frame.
    BackendGone,
    Idle,
    SessionLimit,
    /// A message over the size cap, or a protocol error (`from_client`: whose).
    Error {
        from_client: bool,
    },
}

/// What a session came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub usage: RealtimeUsage,
    /// `response.done` events that reported usage.
    pub responses: u32,
    /// `response.create` events refused by a limit.
    pub refused: u32,
    pub end: End,
}

/// Relays a session until one side closes, a clock runs out, or a side fails.
pub async fn relay<C, U>(
    client: &mut WebSocketStream<C>,
    upstream: &mut WebSocketStream<U>,
    gov: &Governor<'_>,
    settings: &Realtime,
) -> Summary
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut summary = Summary {
        usage: RealtimeUsage::default(),
        responses: 0,
        refused: 0,
        end: End::ClientClosed,
    };
    let session_end = tokio::time::sleep(settings.max_session);
    tokio::pin!(session_end);
    let idle = tokio::time::sleep(settings.idle);
    tokio::pin!(idle);
    let end = loop {
        tokio::select! {
            m = client.next() => {
                idle.as_mut().reset(tokio::time::Instant::now() + settings.idle);
                match m {
                    Some(Ok(Message::Close(frame))) => {
                        let _ = upstream.send(Message::Close(frame)).await;
                        break End::ClientClosed;
                    }
                    Some(Ok(Message::Text(t))) => {
                        if kind_of(&t, true) == Kind::ResponseCreate {
                            if let Some(refusal) = admit_response(gov).await {
                                summary.refused += 1;
                                let event = refusal_event(&t, refusal, gov);
                                if client.send(Message::text(event)).await.is_err() {
                                    break End::ClientClosed;
                                }
                                continue;
                            }
                        }
                        if upstream.send(Message::Text(t)).await.is_err() {
                            break End::BackendClosed;
                        }
                    }
                    Some(Ok(Message::Frame(_))) => {}
                    Some(Ok(m)) => {
                        if upstream.send(m).await.is_err() {
                            break End::BackendClosed;
                        }
                    }
                    None => break End::ClientGone,
                    Some(Err(e)) => break side_error(e, true),
                }
            }
            m = upstream.next() => {
                idle.as_mut().reset(tokio::time::Instant::now() + settings.idle);
                match m {
                    Some(Ok(Message::Close(frame))) => {
                        let _ = client.send(Message::Close(frame)).await;
                        break End::BackendClosed;
                    }
                    Some(Ok(Message::Text(t))) => {
                        if kind_of(&t, false) == Kind::ResponseDone {
                            if let Some(u) = protocol::done_usage(&t) {
                                charge(gov, &u).await;
                                summary.usage.add(&u);
                                summary.responses += 1;
                            }
                        }
                        if client.send(Message::Text(t)).await.is_err() {
                            break End::ClientClosed;
                        }
                    }
                    Some(Ok(Message::Frame(_))) => {}
                    Some(Ok(m)) => {
                        if client.send(m).await.is_err() {
                            break End::ClientClosed;
                        }
                    }
                    None => break End::BackendGone,
                    Some(Err(e)) => break side_error(e, false),
                }
            }
            _ = &mut idle => break End::Idle,
            _ = &mut session_end => break End::SessionLimit,
        }
    };
    summary.end = end;
    close_both(client, upstream, end).await;
    summary
}

/// A failed side: a message over the cap or a protocol error, or a closed connection.
fn side_error(e: WsError, from_client: bool) -> End {
    match e {
        WsError::ConnectionClosed
        | WsError::AlreadyClosed
        | WsError::Io(_)
        | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            if from_client {
                End::ClientGone
            } else {
                End::BackendGone
            }
        }
        _ => End::Error { from_client },
    }
}

/// Ends both sides: the closing handshake where one is still owed (its close frame says
/// why), within [`CLOSE_WAIT`]. A side whose close frame came is sent the automatic reply; a
/// side that was sent one is read until its reply (or its end) and then let go.
async fn close_both<C, U>(
    client: &mut WebSocketStream<C>,
    upstream: &mut WebSocketStream<U>,
    end: End,
) where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let frame = |code: CloseCode, reason: &'static str| {
        Some(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
    };
    // (to the client, to the backend, whether each side's own close frame came already)
    let (to_client, to_upstream) = match end {
        End::Idle => (
            frame(CloseCode::Normal, "idle timeout"),
            frame(CloseCode::Normal, "idle timeout"),
        ),
        End::SessionLimit => (
            frame(CloseCode::Normal, "session time limit"),
            frame(CloseCode::Normal, "session time limit"),
        ),
        End::Error { from_client: true } => (
            frame(CloseCode::Size, "message too big or malformed"),
            frame(CloseCode::Away, "client error"),
        ),
        End::Error { from_client: false } => (
            frame(CloseCode::Error, "backend error"),
            frame(CloseCode::Size, "message too big or malformed"),
        ),
        End::ClientGone => (None, frame(CloseCode::Away, "client went away")),
        End::BackendGone => (frame(CloseCode::Error, "backend went away"), None),
        // The close frame was relayed in the loop (or a send failed).
        End::ClientClosed | End::BackendClosed => (None, None),
    };
    // Which side was sent a close frame (here or in the loop) and owes a reply.
    let client_owes = to_client.is_some() || end == End::BackendClosed;
    let upstream_owes = to_upstream.is_some() || end == End::ClientClosed;
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        if let Some(m) = to_client {
            let _ = client.send(m).await;
        }
        if let Some(m) = to_upstream {
            let _ = upstream.send(m).await;
        }
        futures::join!(
            finish_side(client, client_owes),
            finish_side(upstream, upstream_owes)
        );
    })
    .await;
}

/// The end of one side's closing handshake: read until its close reply when it owes one,
/// else send what is queued (the automatic reply to its own close frame).
async fn finish_side<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, owes: bool) {
    if owes {
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }
    }
    let _ = ws.flush().await;
}

/// A `response.create` is admitted as one request with nothing reserved: it fits unless the
/// client is over a request limit or already in debt on a token limit. `Some`: refused.
async fn admit_response(gov: &Governor<'_>) -> Option<FilterError> {
    gov.session?;
    gov.limiter
        .admit_user(
            gov.client_id,
            gov.user,
            gov.deployment,
            gov.limits,
            0,
            SystemTime::now(),
        )
        .await
        .err()
}

fn refusal_event(text: &str, e: FilterError, gov: &Governor<'_>) -> String {
    let event_id = protocol::event_id(text);
    let (wait, quota, reason) = match e {
        FilterError::RateLimitExceeded {
            retry_after_ms,
            tokens,
        } => (
            Some(retry_after_ms),
            false,
            if tokens {
                "token_limited"
            } else {
                "rate_limited"
            },
        ),
        FilterError::QuotaExceeded { retry_after_ms } => {
            (Some(retry_after_ms), true, "quota_exceeded")
        }
        _ => (None, false, "rate_limited"),
    };
    (gov.refused)(reason);
    protocol::rate_limit_event(event_id.as_deref(), wait, quota)
}

/// A `response.done`'s usage: the client's token windows and `tokens_total`.
async fn charge(gov: &Governor<'_>, u: &RealtimeUsage) {
    if let Some(a) = gov.session {
        gov.limiter.charge(a, u.total).await;
    }
    gov.tokens.prompt.inc_by(u.input);
    gov.tokens.completion.inc_by(u.output);
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Duration;

    use filters::limits::{LimitSpec, OnStoreFailure, StoreKind};
    use prometheus::IntCounter;
    use tokio::io::{duplex, DuplexStream};

    use super::*;

    type Ws = WebSocketStream<DuplexStream>;

    /// The gateway's end (in `role`) and the peer's end of one WebSocket.
    async fn socket(role: Role) -> (Ws, Ws) {
        let (a, b) = duplex(256 * 1024);
        let peer_role = match role {
            Role::Server => Role::Client,
            Role::Client => Role::Server,
        };
        (
            WebSocketStream::from_raw_socket(a, role, Some(ws_config(&settings(60_000)))).await,
            WebSocketStream::from_raw_socket(b, peer_role, None).await,
        )
    }

    use tokio_tungstenite::tungstenite::protocol::Role;

    fn settings(idle_ms: u64) -> Realtime {
        Realtime {
            idle: Duration::from_millis(idle_ms),
            max_session: Duration::from_secs(60),
            max_message_bytes: 1024,
        }
    }

    fn limits(tpm: Option<u64>) -> ClientLimits {
        ClientLimits {
            client: LimitSpec {
                tokens_per_minute: tpm,
                ..Default::default()
            },
            per_deployment: HashMap::new(),
            per_user: None,
        }
    }

    fn limiter() -> Limiter {
        Limiter::new(StoreKind::Memory, OnStoreFailure::Reject, Arc::new(|| {})).unwrap()
    }

    fn series() -> TokenSeries {
        TokenSeries {
            prompt: IntCounter::new("p", "p").unwrap(),
            completion: IntCounter::new("c", "c").unwrap(),
        }
    }

    async fn text(ws: &mut Ws) -> String {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return t.to_string(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    async fn close_code(ws: &mut Ws) -> (CloseCode, String) {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => {
                    // Sends the automatic close reply.
                    let _ = ws.flush().await;
                    return (f.code, f.reason.to_string());
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    const DONE: &str = r#"{"type":"response.done","response":{"usage":{"total_tokens":200,"input_tokens":120,"output_tokens":80,"input_token_details":{"cached_tokens":64,"audio_tokens":40},"output_token_details":{"audio_tokens":50}}}}"#;

    #[tokio::test]
    async fn usage_is_charged_and_an_over_limit_response_create_is_answered_locally() {
        let (mut gw_client, mut client) = socket(Role::Server).await;
        let (mut gw_upstream, mut backend) = socket(Role::Client).await;
        let limiter = limiter();
        let lim = limits(Some(150));
        let session = limiter
            .admit("c", "d", &lim, 0, SystemTime::now())
            .await
            .unwrap();
        let refusals = std::sync::Mutex::new(Vec::new());
        let refused = |r: &'static str| refusals.lock().unwrap().push(r);
        let gov = Governor {
            limiter: &limiter,
            client_id: "c",
            user: None,
            deployment: "d",
            limits: &lim,
            session: Some(&session),
            tokens: series(),
            refused: &refused,
        };
        let script = async {
            client
                .send(Message::text(r#"{"type":"response.create"}"#))
                .await
                .unwrap();
            assert_eq!(text(&mut backend).await, r#"{"type":"response.create"}"#);
            backend.send(Message::text(DONE)).await.unwrap();
            assert_eq!(text(&mut client).await, DONE);
            // 200 of 150 tokens a minute: the next response waits.
            client
                .send(Message::text(
                    r#"{"type":"response.create","event_id":"e2"}"#,
                ))
                .await
                .unwrap();
            let err: serde_json::Value = serde_json::from_str(&text(&mut client).await).unwrap();
            assert_eq!(err["error"]["code"], "rate_limit_exceeded");
            assert_eq!(err["error"]["event_id"], "e2");
            // Not forwarded, and the session goes on: the backend's next message is this one.
            client
                .send(Message::text(r#"{"type":"session.update"}"#))
                .await
                .unwrap();
            assert_eq!(text(&mut backend).await, r#"{"type":"session.update"}"#);
            client.send(Message::Ping("p".into())).await.unwrap();
            assert!(matches!(backend.next().await, Some(Ok(Message::Ping(_)))));
            client.close(None).await.unwrap();
            assert!(matches!(backend.next().await, Some(Ok(Message::Close(_)))));
            backend.flush().await.unwrap();
            // The gateway's automatic reply ends the client's closing handshake.
            loop {
                match client.next().await {
                    Some(Ok(Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_))) => break,
                    other => panic!("expected the close reply, got {other:?}"),
                }
            }
        };
        let s = settings(60_000);
        let t0 = std::time::Instant::now();
        let (summary, ()) = tokio::join!(relay(&mut gw_client, &mut gw_upstream, &gov, &s), script);
        assert!(t0.elapsed() < CLOSE_WAIT, "the closing handshake hung");
        assert_eq!(summary.end, End::ClientClosed);
        assert_eq!((summary.responses, summary.refused), (1, 1));
        assert_eq!(
            (
                summary.usage.input,
                summary.usage.output,
                summary.usage.total
            ),
            (120, 80, 200)
        );
        assert_eq!(
            (
                summary.usage.cached_input,
                summary.usage.audio_input,
                summary.usage.audio_output
            ),
            (64, 40, 50)
        );
        assert_eq!(
            (gov.tokens.prompt.get(), gov.tokens.completion.get()),
            (120, 80)
        );
        assert_eq!(*refusals.lock().unwrap(), ["token_limited"]);
    }

    #[tokio::test]
    async fn without_limits_nothing_is_refused_and_usage_is_still_counted() {
        let (mut gw_client, mut client) = socket(Role::Server).await;
        let (mut gw_upstream, mut backend) = socket(Role::Client).await;
        let limiter = limiter();
        let lim = limits(None);
        let gov = Governor {
            limiter: &limiter,
            client_id: "c",
            user: None,
            deployment: "d",
            limits: &lim,
            session: None,
            tokens: series(),
            refused: &|_| panic!("refused without a limit"),
        };
        let script = async {
            for _ in 0..3 {
                client
                    .send(Message::text(r#"{"type":"response.create"}"#))
                    .await
                    .unwrap();
                text(&mut backend).await;
                backend.send(Message::text(DONE)).await.unwrap();
                text(&mut client).await;
            }
            // The backend closes: the client gets its close frame.
            backend.close(None).await.unwrap();
            assert!(matches!(
                client.next().await,
                Some(Ok(Message::Close(None)))
            ));
            client.flush().await.unwrap();
        };
        let s = settings(60_000);
        let t0 = std::time::Instant::now();
        let (summary, ()) = tokio::join!(relay(&mut gw_client, &mut gw_upstream, &gov, &s), script);
        assert!(t0.elapsed() < CLOSE_WAIT, "the closing handshake hung");
        assert_eq!(summary.end, End::BackendClosed);
        assert_eq!((summary.responses, summary.usage.total), (3, 600));
        assert_eq!(gov.tokens.prompt.get(), 360);
    }

    #[tokio::test]
    async fn clocks_sizes_and_vanishing_sides_close_the_other_side_with_a_reason() {
        type Expect = Option<(CloseCode, &'static str)>;
        let cases: [(&str, u64, End, Expect, Expect); 3] = [
            (
                "idle",
                50,
                End::Idle,
                Some((CloseCode::Normal, "idle timeout")),
                Some((CloseCode::Normal, "idle timeout")),
            ),
            (
                "too big",
                60_000,
                End::Error { from_client: true },
                Some((CloseCode::Size, "message too big or malformed")),
                Some((CloseCode::Away, "client error")),
            ),
            (
                "client gone",
                60_000,
                End::ClientGone,
                None,
                Some((CloseCode::Away, "client went away")),
            ),
        ];
        for (name, idle_ms, want_end, to_client, to_backend) in cases {
            let (mut gw_client, mut client) = socket(Role::Server).await;
            let (mut gw_upstream, mut backend) = socket(Role::Client).await;
            let limiter = limiter();
            let lim = limits(None);
            let gov = Governor {
                limiter: &limiter,
                client_id: "c",
                user: None,
                deployment: "d",
                limits: &lim,
                session: None,
                tokens: series(),
                refused: &|_| {},
            };
            let script = async {
                match name {
                    "too big" => {
                        let big = format!(r#"{{"type":"x","audio":"{}"}}"#, "A".repeat(2000));
                        client.send(Message::text(big)).await.unwrap();
                    }
                    "client gone" => {
                        drop(std::mem::replace(&mut client, socket(Role::Client).await.1))
                    }
                    _ => {}
                }
                if let Some((code, reason)) = to_client {
                    assert_eq!(
                        close_code(&mut client).await,
                        (code, reason.to_string()),
                        "{name}"
                    );
                }
                if let Some((code, reason)) = to_backend {
                    assert_eq!(
                        close_code(&mut backend).await,
                        (code, reason.to_string()),
                        "{name}"
                    );
                }
            };
            let s = settings(idle_ms);
            let t0 = std::time::Instant::now();
            let (summary, ()) =
                tokio::join!(relay(&mut gw_client, &mut gw_upstream, &gov, &s), script);
            assert_eq!(summary.end, want_end, "{name}");
            assert!(
                t0.elapsed() < CLOSE_WAIT,
                "{name}: the closing handshake hung"
            );
        }
    }
}
