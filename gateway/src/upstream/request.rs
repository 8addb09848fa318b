//! The upstream request: encoded once into one buffer (line, the client's end-to-end
//! fields, host, length, the backend's credential, and a small body), written once to one
//! member over a pooled or new connection, and the answer's head read back.

use std::time::{Duration, Instant};

use pingora::upstreams::peer::HttpPeer;
use tokio::io::AsyncWriteExt;

use super::pool::{Upstream, Upstreams};
use crate::deadline::timeout_at;
use crate::http1::framing::{forward_upstream, MAX_INTERIM};
use crate::http1::{Framing, H1Error, Head};

/// Bodies up to this size are copied behind the request head and sent with it in one write.
pub const ONE_WRITE_MAX_BODY: usize = 64 * 1024;

/// The path of the upstream request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// The client's path (`/openai/v1/...`: the deployment is in the body).
    AsSent(&'a str),
    /// `/openai/deployments/{name}{rest}`, with the member's own deployment name.
    Deployment { name: &'a str, rest: &'a str },
}

/// The credential the upstream request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth<'a> {
    ApiKey(&'a str),
    /// A whole `authorization` value (the managed-identity token: `Bearer …`).
    Authorization(&'a str),
    /// The caller's own JWT (`credential: forward`).
    BearerJwt(&'a str),
    None,
}

/// One upstream request, before it is encoded.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The client's head: its method and end-to-end fields are forwarded.
    pub head: &'a Head,
    pub target: Target<'a>,
    pub query: Option<&'a str>,
    pub host: &'a str,
    pub body: &'a [u8],
    pub auth: Auth<'a>,
}

impl Request<'_> {
    /// The request line, the client's fields without hop-by-hop ones, credentials or what
    /// the gateway sets itself, then host, length and the backend's credential — and the body
    /// when it is small, so that all of it leaves in one `send`.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_with(Length::Body)
    }

    /// The head alone, for a body streamed after it: `Some(n)` bytes (`content-length`), or
    /// `None` for `transfer-encoding: chunked`. (`self.body` is not sent.)
    pub fn encode_head(&self, length: Option<u64>) -> Vec<u8> {
        self.encode_with(match length {
            Some(n) => Length::Streamed(n),
            None => Length::Chunked,
        })
    }

    fn encode_with(&self, length: Length) -> Vec<u8> {
        let with_body = length == Length::Body && self.body.len() <= ONE_WRITE_MAX_BODY;
        // Room for what is forwarded of the client's head (at most all of it) and what is
        // added, so that it is allocated once and no larger than needed.
        let added = match self.target {
            Target::Deployment { name, .. } => name.len(),
            Target::AsSent(_) => 0,
        } + self.host.len()
            + match self.auth {
                Auth::ApiKey(v) | Auth::Authorization(v) | Auth::BearerJwt(v) => v.len(),
                Auth::None => 0,
            };
        let mut out = Vec::with_capacity(
            self.head.wire_len() + added + 128 + if with_body { self.body.len() } else { 0 },
        );
        out.extend_from_slice(self.head.method().as_bytes());
        out.push(b' ');
        match self.target {
            Target::AsSent(p) => out.extend_from_slice(p.as_bytes()),
            Target::Deployment { name, rest } => {
                out.extend_from_slice(b"/openai/deployments/");
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(rest.as_bytes());
            }
        }
        if let Some(q) = self.query {
            out.push(b'?');
            out.extend_from_slice(q.as_bytes());
        }
        out.extend_from_slice(b" HTTP/1.1\r\n");
        self.head
            .write_end_to_end_fields(forward_upstream, &mut out);
        // Then `host`, the length and the credential: each line's end and the next name
        // written as one piece.
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(self.host.as_bytes());
        match length {
            Length::Body | Length::Streamed(_) => {
                let n = match length {
                    Length::Streamed(n) => n,
                    _ => self.body.len() as u64,
                };
                out.extend_from_slice(b"\r\ncontent-length: ");
                out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            }
            Length::Chunked => out.extend_from_slice(b"\r\ntransfer-encoding: chunked"),
        }
        match self.auth {
            Auth::ApiKey(k) => {
                out.extend_from_slice(b"\r\napi-key: ");
                out.extend_from_slice(k.as_bytes());
            }
            Auth::Authorization(v) => {
                out.extend_from_slice(b"\r\nauthorization: ");
                out.extend_from_slice(v.as_bytes());
            }
            Auth::BearerJwt(j) => {
                out.extend_from_slice(b"\r\nauthorization: Bearer ");
                out.extend_from_slice(j.as_bytes());
            }
            Auth::None => {}
        }
        out.extend_from_slice(b"\r\n\r\n");
        if with_body {
            out.extend_from_slice(self.body);
        }
        out
    }
}

/// How the upstream request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Length {
    /// `self.body`, whole.
    Body,
    /// Streamed after the head, this many bytes.
    Streamed(u64),
    /// Streamed after the head, in chunks.
    Chunked,
}

/// Where and when one attempt sends.
pub struct Send<'a> {
    pub peer: &'a HttpPeer,
    /// The peer's pool key ([`Upstreams::key`]).
    pub key: u64,
    /// The encoded request, and the body when it did not fit in it.
    pub wire: &'a [u8],
    pub body: &'a [u8],
    pub started: Instant,
    pub deadline: Instant,
    /// Pooled connections idle this long are not reused.
    pub max_idle: Duration,
}

/// What became of one attempt before a response head arrived.
#[derive(Debug)]
pub enum SendError {
    Timeout,
    /// Connect, write or read failed, or the answer was not one to trust.
    Failed(String),
}

/// Sends the request once — on a pooled connection that passed its reuse check, or a new
/// one — and reads the final response head and its framing. Whatever fails after this, the
/// caller never writes the request to this member again (the backend may have run it).
pub async fn exchange(
    pool: &Upstreams,
    s: &Send<'_>,
) -> Result<(Upstream, Head, Framing), SendError> {
    let key = s.key;
    let body_apart = s.body.len() > ONE_WRITE_MAX_BODY;
    let mut conn = match pool.take(key, s.started, s.max_idle) {
        Some(c) => c,
        None => match timeout_at(s.deadline, pool.connect(s.peer)).await {
            Err(_) => return Err(SendError::Timeout),
            Ok(Err(e)) => return Err(SendError::Failed(format!("connect: {e}"))),
            Ok(Ok(c)) => c,
        },
    };
    let sent = timeout_at(s.deadline, async {
        conn.io.write_all(s.wire).await?;
        if body_apart {
            conn.io.write_all(s.body).await?;
        }
        conn.io.flush().await?;
        final_head(&mut conn).await
    })
    .await;
    match sent {
        Err(_) => Err(SendError::Timeout),
        Ok(Ok((head, framing))) => Ok((conn, head, framing)),
        Ok(Err(e)) => Err(SendError::Failed(e.to_string())),
    }
}

/// The backend's final answer head and its framing, past at most [`MAX_INTERIM`] interim
/// (1xx) answers. A `101` to a request that asked for no upgrade, or framing that cannot be
/// trusted, is a bad answer: the attempt fails and the connection is dropped.
pub async fn final_head(up: &mut Upstream) -> Result<(Head, Framing), H1Error> {
    for _ in 0..=MAX_INTERIM {
        match up.read_head(true).await? {
            None => return Err(H1Error::Closed),
            Some(h) if h.status == 101 => {
                return Err(H1Error::Malformed(
                    "101 Switching Protocols to a request that asked for no upgrade",
                ))
            }
            // Interim answers (100 Continue, 103 Early Hints): the final one follows.
            Some(h) if h.status < 200 => continue,
            Some(h) => {
                let framing = h.response_framing(false)?;
                return Ok((h, framing));
            }
        }
    }
    Err(H1Error::Malformed("too many interim answers"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_head() -> Head {
        Head::request(
            "POST",
            "/openai/deployments/gpt-4o/chat/completions?api-version=1",
            [
                ("Host", &b"gw.example"[..]),
                ("api-key", b"client-secret"),
                ("Connection", b"keep-alive, X-Hop"),
                ("X-Hop", b"1"),
                ("Content-Type", b"application/json"),
                ("Content-Length", b"2"),
                ("Accept-Encoding", b"gzip"),
                ("X-Custom", b"v"),
            ],
        )
    }

    #[test]
    fn encodes_one_buffer_with_the_backend_credential_only() {
        let head = client_head();
        for (auth, line) in [
            (Auth::ApiKey("backend-key"), "api-key: backend-key\r\n"),
            (
                Auth::Authorization("Bearer mi"),
                "authorization: Bearer mi\r\n",
            ),
            (Auth::BearerJwt("jwt"), "authorization: Bearer jwt\r\n"),
            (Auth::None, ""),
        ] {
            let wire = Request {
                head: &head,
                target: Target::Deployment {
                    name: "gpt-4o-ptu",
                    rest: "/chat/completions",
                },
                query: Some("api-version=1"),
                host: "aoai.example:8443",
                body: b"{}",
                auth,
            }
            .encode();
            let text = String::from_utf8(wire).unwrap();
            assert_eq!(
                text,
                format!(
                    "POST /openai/deployments/gpt-4o-ptu/chat/completions?api-version=1 HTTP/1.1\r\n\
                     Content-Type: application/json\r\nX-Custom: v\r\nhost: aoai.example:8443\r\n\
                     content-length: 2\r\n{line}\r\n{{}}"
                )
            );
        }
    }

    #[test]
    fn large_bodies_go_apart_and_v1_paths_as_sent() {
        let head = client_head();
        let body = vec![b'x'; ONE_WRITE_MAX_BODY + 1];
        let wire = Request {
            head: &head,
            target: Target::AsSent("/openai/v1/chat/completions"),
            query: None,
            host: "h",
            body: &body,
            auth: Auth::None,
        }
        .encode();
        let text = String::from_utf8(wire).unwrap();
        assert!(text.starts_with("POST /openai/v1/chat/completions HTTP/1.1\r\n"));
        assert!(text.ends_with(&format!("content-length: {}\r\n\r\n", body.len())));
    }

    #[test]
    fn streamed_heads_carry_the_given_length_or_chunked_and_no_body() {
        let head = client_head();
        let r = Request {
            head: &head,
            target: Target::AsSent("/openai/files"),
            query: None,
            host: "h",
            body: b"not sent",
            auth: Auth::None,
        };
        let text = String::from_utf8(r.encode_head(Some(12345))).unwrap();
        assert!(
            text.ends_with("host: h\r\ncontent-length: 12345\r\n\r\n"),
            "{text}"
        );
        let text = String::from_utf8(r.encode_head(None)).unwrap();
        assert!(
            text.ends_with("host: h\r\ntransfer-encoding: chunked\r\n\r\n"),
            "{text}"
        );
        assert!(!text.contains("content-length"));
    }
}
