//! TLS handshakes of the listeners, run by the gateway rather than by Pingora's listener loop,
//! so that each one is counted (`aoai_gateway_downstream_handshakes_total{result}`,
//! `…_in_progress`), bounded in time (`server.header_timeout_seconds`) and in number
//! (`server.tls_handshakes_per_thread` at once per worker thread: a storm of new connections
//! cannot take a worker away from the connections it already serves), and so that a client
//! that gives up in the middle of one — normal traffic — is counted as
//! `downstream_errors_total{kind="handshake"}` and logged at debug, not as an error.
//!
//! The cap on handshakes in flight does not bound the CPU they take from one pass of the
//! event loop: each one's first step (the ClientHello in, the signed server flight out) is a
//! millisecond or more of CPU, and a burst of them queues ahead of the established
//! connections' ready reads. So by default ([`HandshakePacing::PerPass`]) a [`Pacer`] lets
//! one handshake per worker thread take that step, and only after a pass of the event loop:
//! the tasks that were ready before it (keep-alive requests) run first, as under nginx's
//! `multi_accept off`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use log::debug;
use openssl::ssl::SslAcceptor;
use pingora::listeners::TlsAccept;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::server::{handshake, handshake_with_callback};
use pingora::protocols::{Peek, Stream};
use tokio::sync::Semaphore;

use crate::config::file::HandshakePacing;
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
    /// `None` with `tls_handshake_pacing: none`.
    pacer: Option<Pacer>,
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
        pacing: HandshakePacing,
        threads: usize,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Handshakes {
        let (addrs, listeners) = listeners.into_iter().unzip();
        Handshakes {
            addrs,
            listeners,
            turns: Semaphore::new(turns.clamp(1, Semaphore::MAX_PERMITS)),
            pacer: match pacing {
                HandshakePacing::PerPass => Some(Pacer::new(threads)),
                HandshakePacing::None => None,
            },
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
            let mut l4: Box<L4Stream> = stream.into_any().downcast().map_err(|_| "not a socket")?;
            if let Some(pacer) = &self.pacer {
                // Wait (holding no pass) until the ClientHello is here, so that the paced
                // first step is the one that does the work rather than a read that would block.
                l4.try_peek(&mut [0u8; 1]).await.map_err(|e| {
                    debug!("TLS handshake failed before the ClientHello: {e}");
                    "failed"
                })?;
                let mut done = pin!(shake(tls, *l4));
                match pacer.first_step(done.as_mut()).await {
                    Poll::Ready(done) => done,
                    Poll::Pending => done.await,
                }
            } else {
                shake(tls, *l4).await
            }
            .map_err(|e| {
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

async fn shake(
    tls: &TlsListener,
    l4: L4Stream,
) -> pingora::Result<pingora::protocols::tls::SslStream<L4Stream>> {
    match &tls.callbacks {
        Some(cb) => handshake_with_callback(&tls.acceptor, l4, cb.as_ref()).await,
        None => handshake(&tls.acceptor, l4).await,
    }
}

/// One CPU-heavy step at a time per worker thread (`threads` passes), each taken only after a
/// pass of the event loop.
pub struct Pacer {
    passes: Semaphore,
}

impl Pacer {
    pub fn new(threads: usize) -> Pacer {
        Pacer {
            passes: Semaphore::new(threads.clamp(1, Semaphore::MAX_PERMITS)),
        }
    }

    /// Polls `fut` once, on a pass: `yield_now` puts this task behind the IO driver's next
    /// poll and every task ready by then, so between two paced steps on a thread the tasks
    /// that were waiting run. The pass is given back after the step, whatever it returned.
    pub async fn first_step<F: Future>(&self, mut fut: Pin<&mut F>) -> Poll<F::Output> {
        // The semaphore is never closed: an error here is not reachable, and would only mean
        // running unpaced.
        let _pass = self.passes.acquire().await;
        tokio::task::yield_now().await;
        std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Eight handshakes arrive at once beside an established connection that is ready on
    /// every pass: paced, no two handshake steps run without the connection's turn between
    /// them; unpaced (the control), they run back to back.
    #[tokio::test(flavor = "current_thread")]
    async fn paced_steps_take_turns_with_the_ready_connections() {
        for paced in [true, false] {
            let log = Arc::new(Mutex::new(String::new()));
            let pacer = Arc::new(Pacer::new(1));
            let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let keep_alive = {
                let (log, done) = (log.clone(), done.clone());
                tokio::spawn(async move {
                    while done.load(std::sync::atomic::Ordering::SeqCst) < 8 {
                        log.lock().unwrap().push('k');
                        tokio::task::yield_now().await;
                    }
                })
            };
            let shakes: Vec<_> = (0..8)
                .map(|_| {
                    let (log, pacer, done) = (log.clone(), pacer.clone(), done.clone());
                    tokio::spawn(async move {
                        let step = pin!(async {
                            log.lock().unwrap().push('h');
                        });
                        if paced {
                            assert!(pacer.first_step(step).await.is_ready());
                        } else {
                            step.await;
                        }
                        done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    })
                })
                .collect();
            for s in shakes {
                s.await.unwrap();
            }
            keep_alive.await.unwrap();
            let log = log.lock().unwrap().clone();
            assert_eq!(log.matches('h').count(), 8, "{log}");
            assert_eq!(!log.contains("hh"), paced, "paced {paced}: {log}");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_step_that_is_not_done_comes_back_pending_and_gives_the_pass_back() {
        let pacer = Pacer::new(1);
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let mut waiting = pin!(rx);
        assert!(pacer.first_step(waiting.as_mut()).await.is_pending());
        assert_eq!(pacer.passes.available_permits(), 1);
        tx.send(7).unwrap();
        assert_eq!(waiting.await.unwrap(), 7);
    }

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
