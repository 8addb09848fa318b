//! Connections to backends. Pingora's `TransportConnector` makes the TLS ones (SNI, a
//! private CA, connect timeouts); plain TCP ones are tokio sockets with `TCP_NODELAY`, read
//! and written without Pingora's stream layers (they read the clock around every read that
//! waits, and add two layers of calls per read and write). Idle ones wait in a pool per
//! worker thread. A request
//! runs on one thread from start to end (per-thread runtimes, no work stealing), so taking
//! and returning a connection is a `Vec` push and pop: no lock, no watcher task per
//! connection, no `getpeername` per reuse, which is what a shared pool costs per request.
//!
//! A connection goes back to the pool only when its response ended exactly at its framed end
//! with nothing read past it ([`Upstreams::put`]). Before every reuse, whatever its idle time,
//! it is probed: a non-blocking read must find nothing — bytes a backend sent unasked (a
//! stray response that would become the next client's answer) or its close mean the
//! connection is dropped. One idle for `server.backend_idle_seconds` or longer is closed. A
//! request written to a connection is never written again to the same backend: a failure
//! after writing is that attempt's error (the caller fails over to another member).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant};

use futures::FutureExt;
use pingora::connectors::TransportConnector;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::Stream;
use pingora::upstreams::peer::{HttpPeer, Peer};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_util::either::Either;

use crate::http1::Conn;

/// Idle connections kept per backend address and thread.
const MAX_IDLE: usize = 256;

/// A backend connection, boxed once when it is made: a request moves it several times (out
/// of the pool, through the attempt and its answer, back into the pool) and each move is
/// then a pointer's, not the connection's ~130 bytes.
pub type Upstream = Box<Conn<Io>>;

/// A backend connection's transport: a plain tokio socket, or Pingora's stream for TLS (and
/// anything else its connector makes).
pub type Io = Either<TcpStream, Stream>;

struct Idle {
    conn: Upstream,
    since: Instant,
}

thread_local! {
    static IDLE: RefCell<HashMap<u64, Vec<Idle>, foldhash::fast::FixedState>> =
        RefCell::new(HashMap::default());
}

pub struct Upstreams {
    connector: TransportConnector,
}

impl Default for Upstreams {
    fn default() -> Self {
        Upstreams::new()
    }
}

impl Upstreams {
    pub fn new() -> Self {
        Upstreams {
            connector: TransportConnector::new(None),
        }
    }

    /// The pool key of a peer (address, TLS, SNI, CA).
    pub fn key(peer: &HttpPeer) -> u64 {
        peer.reuse_hash()
    }

    /// An idle connection to this peer that is safe to reuse: quiet for less than
    /// `max_idle` (`now`: the caller's clock) and with nothing to read.
    pub fn take(&self, key: u64, now: Instant, max_idle: Duration) -> Option<Upstream> {
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            let list = idle.get_mut(&key)?;
            while let Some(mut c) = list.pop() {
                if !reusable(now.saturating_duration_since(c.since), max_idle) {
                    // Everything below it is older still.
                    list.clear();
                    return None;
                }
                if still_open(&mut c.conn) {
                    return Some(c.conn);
                }
            }
            None
        })
    }

    /// A new connection (the caller bounds the wait by the request's deadline).
    pub async fn connect(&self, peer: &HttpPeer) -> io::Result<Upstream> {
        if let (false, SocketAddr::Inet(addr)) = (peer.is_tls(), peer.address()) {
            let connecting = TcpStream::connect(*addr);
            let tcp = match peer.connection_timeout() {
                Some(limit) => tokio::time::timeout(limit, connecting)
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??,
                None => connecting.await?,
            };
            tcp.set_nodelay(true)?;
            return Ok(Box::new(Conn::new(Either::Left(tcp))));
        }
        // Boxed: Pingora's TLS connect is a large future, and inline it would size every
        // request's state (and every open stream's) for a step a plain backend never takes.
        let stream = Box::pin(self.connector.new_stream(peer))
            .await
            .map_err(io::Error::other)?;
        Ok(Box::new(Conn::new(Either::Right(stream))))
    }

    /// Returns a connection whose last response was read to its end, quiet since `since`.
    pub fn put(&self, key: u64, conn: Upstream, since: Instant) {
        if conn.has_buffered() {
            return;
        }
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            let list = idle.entry(key).or_default();
            if list.len() >= MAX_IDLE {
                list.remove(0);
            }
            list.push(Idle { conn, since });
        });
    }
}

/// Whether a connection quiet for `quiet` may still be used.
fn reusable(quiet: Duration, max_idle: Duration) -> bool {
    quiet < max_idle
}

/// An idle connection is usable when a read would block: no close, no unexpected bytes
/// (a byte read here is lost, but the connection is dropped with it). A plain socket is
/// asked with `try_read` (the same readiness check and `recv` as a polled read, without a
/// future or a waker registered with the driver).
fn still_open(conn: &mut Upstream) -> bool {
    let mut byte = [0u8; 1];
    match &mut conn.io {
        Either::Left(tcp) => would_block(tcp.try_read(&mut byte)),
        Either::Right(_) => conn.io.read(&mut byte).now_or_never().is_none(),
    }
}

/// Whether a non-blocking read found nothing to read (not a close, not bytes, not an error).
fn would_block(read: io::Result<usize>) -> bool {
    matches!(read, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn plain_backends_get_tokio_sockets_without_nagle() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstreams = Upstreams::new();
        let peer = HttpPeer::new(addr, false, "backend".to_string());
        let conn = upstreams.connect(&peer).await.unwrap();
        // Without TCP_NODELAY a keep-alive request waits ~40 ms for the delayed ACK.
        let Either::Left(tcp) = &conn.io else {
            panic!("a plain backend went through Pingora's connector");
        };
        assert!(tcp.nodelay().unwrap());
        let (_accepted, from) = listener.accept().await.unwrap();
        assert_eq!(from, tcp.local_addr().unwrap());
    }

    /// A pooled connection to a loopback listener, and the backend's end of it.
    async fn pooled(upstreams: &Upstreams, key: u64) -> tokio::net::TcpStream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = HttpPeer::new(listener.local_addr().unwrap(), false, "b".to_string());
        let conn = upstreams.connect(&peer).await.unwrap();
        let (backend, _) = listener.accept().await.unwrap();
        upstreams.put(key, conn, Instant::now());
        backend
    }

    #[tokio::test]
    async fn a_quiet_connection_is_reused_within_the_idle_limit_only() {
        let upstreams = Upstreams::new();
        let limit = Duration::from_secs(55);
        let _backend = pooled(&upstreams, 1).await;
        let now = Instant::now();
        let c = upstreams
            .take(1, now, limit)
            .expect("a quiet connection is reused");
        upstreams.put(1, c, now);
        assert!(
            upstreams.take(1, now + limit, limit).is_none(),
            "idle for the limit: closed, not reused"
        );
        assert!(
            upstreams.take(1, now, limit).is_none(),
            "and gone from the pool"
        );
    }

    #[tokio::test]
    async fn stray_bytes_or_a_close_keep_a_connection_out_of_reuse_whatever_its_idle_time() {
        use tokio::io::AsyncWriteExt;
        let limit = Duration::from_secs(55);
        for stray in [true, false] {
            let upstreams = Upstreams::new();
            let mut backend = pooled(&upstreams, 2).await;
            if stray {
                // A second, unasked-for response: it must never become the next answer.
                backend
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstray")
                    .await
                    .unwrap();
            } else {
                drop(backend);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            // Taken right away (idle for ~50 ms): checked all the same.
            assert!(
                upstreams.take(2, Instant::now(), limit).is_none(),
                "stray bytes: {stray}"
            );
        }
    }

    #[test]
    fn only_a_read_that_would_block_leaves_a_connection_usable() {
        use io::ErrorKind::*;
        assert!(would_block(Err(WouldBlock.into())));
        assert!(!would_block(Ok(0)), "closed");
        assert!(!would_block(Ok(1)), "stray bytes");
        for e in [ConnectionReset, BrokenPipe, Interrupted, Other] {
            assert!(!would_block(Err(e.into())), "{e:?}");
        }
    }

    #[test]
    fn reuse_verdicts() {
        let limit = Duration::from_secs(55);
        assert!(reusable(Duration::ZERO, limit));
        assert!(reusable(Duration::from_secs(54), limit));
        assert!(!reusable(limit, limit));
        assert!(!reusable(Duration::from_secs(600), limit));
    }
}
