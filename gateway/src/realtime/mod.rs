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
        WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_) => {
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
/// why), each side drained until it ends, within [`CLOSE_WAIT`].
async fn close_both<C, U>(
    client: &mut WebSocketStream<C>,
    upstream: &mut WebSocketStream<U>,
    end: End,
) where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let frame = |code: CloseCode, reason: &'static str| {
        Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }))
    };
    let (to_client, to_upstream) = match end {
        End::Idle => (
            Some(frame(CloseCode::Normal, "idle timeout")),
            Some(frame(CloseCode::Normal, "idle timeout")),
        ),
        End::SessionLimit => (
            Some(frame(CloseCode::Normal, "session time limit")),
            Some(frame(CloseCode::Normal, "session time limit")),
        ),
        End::Error { from_client: true } => (
            Some(frame(CloseCode::Size, "message too big or malformed")),
            Some(frame(CloseCode::Away, "client error")),
        ),
        End::Error { from_client: false } => (
            Some(frame(CloseCode::Error, "backend error")),
            Some(frame(CloseCode::Size, "message too big or malformed")),
        ),
        End::ClientGone => (None, Some(frame(CloseCode::Away, "client went away"))),
        End::BackendGone => (Some(frame(CloseCode::Error, "backend went away")), None),
        // The close was relayed already (or the side is gone).
        End::ClientClosed | End::BackendClosed => (None, None),
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        if let Some(m) = to_client {
            let _ = client.send(m).await;
        }
        if let Some(m) = to_upstream {
            let _ = upstream.send(m).await;
        }
        // Draining flushes the automatic close reply and waits for the other's.
        let drain_client = async { while let Some(Ok(_)) = client.next().await {} };
        let drain_upstream = async { while let Some(Ok(_)) = upstream.next().await {} };
        futures::join!(drain_client, drain_upstream);
    })
    .await;
}

/// A `response.create` is admitted as one request with nothing reserved: it fits unless the
/// client is over a request limit or already in debt on a token limit. `Some`: refused.
async fn admit_response(gov: &Governor<'_>) -> Option<FilterError> {
    gov.session?;
    gov.limiter
        .admit(
            gov.client_id,
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
