//! Connections to backends. Pingora's `TransportConnector` makes the TLS ones (SNI, a
//! private CA, connect timeouts); plain TCP ones are tokio sockets with `TCP_NODELAY`, read
//! and written without Pingora's stream layers (they read the clock around every read that
//! waits, and add two layers of calls per read and write). Idle ones wait in a pool per
//! worker thread. A request
//! runs on one thread from start to end (per-thread runtimes, no work stealing), so taking
//! and returning a connection is a `Vec` push and pop: no lock, no watcher task per
//! connection, no `getpeername` per reuse, which is what a shared pool costs per request.
//!
//! A connection idle for more than [`CHECK_AFTER`] is probed (a non-blocking read must find
//! nothing) before it is reused; one idle for longer than the idle timeout is closed. A
//! reused connection that fails before any response byte is retried on a new one by the
//! caller (the backend may have closed it in the meantime).

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
/// Idle longer than this, a connection is checked for a close or stray bytes before reuse.
const CHECK_AFTER: Duration = Duration::from_secs(1);

pub type Upstream = Conn<Io>;

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
    idle_timeout: Duration,
}

impl Upstreams {
    pub fn new(idle_timeout: Duration) -> Self {
        Upstreams {
            connector: TransportConnector::new(None),
            idle_timeout,
        }
    }

    /// The pool key of a peer (address, TLS, SNI, CA).
    pub fn key(peer: &HttpPeer) -> u64 {
        peer.reuse_hash()
    }

    /// An idle connection to this peer, if one is usable (`now`: the caller's clock).
    pub fn take(&self, key: u64, now: Instant) -> Option<Upstream> {
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            let list = idle.get_mut(&key)?;
            while let Some(mut c) = list.pop() {
                let quiet = now.saturating_duration_since(c.since);
                if quiet > self.idle_timeout {
                    // Everything below it is older still.
                    list.clear();
                    return None;
                }
                if quiet <= CHECK_AFTER || still_open(&mut c.conn) {
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
            return Ok(Conn::new(Either::Left(tcp)));
        }
        let stream = self
            .connector
            .new_stream(peer)
            .await
            .map_err(io::Error::other)?;
        Ok(Conn::new(Either::Right(stream)))
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

/// An idle connection is usable when a read would block: no close, no unexpected bytes.
fn still_open(conn: &mut Upstream) -> bool {
    let mut byte = [0u8; 1];
    conn.io.read(&mut byte).now_or_never().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn plain_backends_get_tokio_sockets_without_nagle() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstreams = Upstreams::new(Duration::from_secs(60));
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
}
