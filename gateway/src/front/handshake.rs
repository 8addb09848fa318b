//! TLS handshakes of the listeners, run by the gateway rather than by Pingora's listener loop,
//! so that each one is counted (`aoai_gateway_downstream_handshakes_total{result}`,
//! `…_in_progress`), bounded in time (`server.header_timeout_seconds`) and in number
//! (`server.tls_handshakes_per_thread` at once per worker thread: a storm of new connections
//! cannot take a worker away from the connections it already serves), and so that a client
//! that gives up in the middle of one — normal traffic — is counted as
//! `downstream_errors_total{kind="handshake"}` and logged at debug, not as an error.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use log::debug;
use openssl::ssl::SslAcceptor;
use pingora::listeners::TlsAccept;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::server::{handshake, handshake_with_callback};
use pingora::protocols::Stream;
use tokio::sync::Semaphore;

use crate::observe::metrics::Metrics;

/// The TLS side of one listener ([`crate::tls::tls_listener`]).
pub struct TlsListener {
    pub acceptor: SslAcceptor,
    pub callbacks: Option<Box<dyn TlsAccept + Send + Sync>>,
}

/// Every TLS listener, by the address it listens on.
pub struct Handshakes {
    /// The listeners' addresses, in the order of `listeners` (looked up per connection).
    addrs: Vec<SocketAddr>,
    listeners: Vec<TlsListener>,
    /// `tls_handshakes_per_thread × threads` turns.
    turns: Semaphore,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

/// The listener whose configured address accepted a connection to `local`: the same port,
/// and the same IP unless the listener is on the unspecified address (`0.0.0.0`, `[::]`).
pub fn listener_for(local: SocketAddr, listeners: &[SocketAddr]) -> Option<usize> {
    listeners
        .iter()
        .position(|l| l.port() == local.port() && (l.ip().is_unspecified() || l.ip() == local.ip()))
}

impl Handshakes {
    pub fn new(
        listeners: Vec<(SocketAddr, TlsListener)>,
        turns: usize,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Handshakes {
        let (addrs, listeners) = listeners.into_iter().unzip();
        Handshakes {
            addrs,
            listeners,
            turns: Semaphore::new(turns.clamp(1, Semaphore::MAX_PERMITS)),
            timeout,
            metrics,
        }
    }

    /// The TLS listener a new connection arrived on, if any.
    fn tls_for(&self, stream: &Stream) -> Option<&TlsListener> {
        if self.listeners.is_empty() || stream.get_ssl().is_some() {
            return None;
        }
        let local = stream
            .get_socket_digest()?
            .local_addr()?
            .as_inet()
            .copied()?;
        listener_for(local, &self.addrs).map(|i| &self.listeners[i])
    }

    /// A plain connection is passed as it is; a connection to a TLS listener comes back after
    /// its handshake, or not at all (counted and logged here).
    pub async fn accept(&self, stream: Stream) -> Option<Stream> {
        let Some(tls) = self.tls_for(&stream) else {
            return Some(stream);
        };
        let m = &self.metrics;
        m.downstream_handshakes_in_progress.inc();
        let result = tokio::time::timeout(self.timeout, async {
            let _turn = self.turns.acquire().await;
            let l4: Box<L4Stream> = stream.into_any().downcast().map_err(|_| "not a socket")?;
            let done = match &tls.callbacks {
                Some(cb) => handshake_with_callback(&tls.acceptor, *l4, cb.as_ref()).await,
                None => handshake(&tls.acceptor, *l4).await,
            };
            done.map_err(|e| {
                debug!("TLS handshake failed: {e}");
                "failed"
            })
        })
        .await;
        m.downstream_handshakes_in_progress.dec();
        match result {
            Ok(Ok(tls_stream)) => {
                m.downstream_handshakes
                    .with_label_values(&["success"])
                    .inc();
                Some(Box::new(tls_stream))
            }
            Ok(Err(_)) => {
                m.downstream_handshakes
                    .with_label_values(&["failure"])
                    .inc();
                m.downstream_errors.with_label_values(&["handshake"]).inc();
                None
            }
            Err(_) => {
                debug!("TLS handshake timed out after {:?}", self.timeout);
                m.downstream_handshakes
                    .with_label_values(&["failure"])
                    .inc();
                m.downstream_errors.with_label_values(&["timeout"]).inc();
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_belongs_to_the_listener_of_its_port_and_address() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let listeners = [a("127.0.0.1:8443"), a("0.0.0.0:9443"), a("[::]:7443")];
        for (local, want) in [
            ("127.0.0.1:8443", Some(0)),
            ("127.0.0.2:8443", None),
            ("10.1.2.3:9443", Some(1)),
            ("127.0.0.1:9443", Some(1)),
            ("[::1]:7443", Some(2)),
            ("127.0.0.1:8080", None),
        ] {
            assert_eq!(listener_for(a(local), &listeners), want, "{local}");
        }
    }
}
