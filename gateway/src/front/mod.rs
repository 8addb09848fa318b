//! How requests arrive: ALPN dispatch ([`Front`]), the HTTP/1 connection loop ([`h1`]), the
//! HTTP/2 adapter ([`h2`]), and the [`downstream::Downstream`] trait both answer through.

pub mod downstream;
pub mod h1;
pub mod h2;
pub mod h2_io;
pub mod handshake;

use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;

use crate::pipeline::Gateway;
use h2::H2App;
use handshake::Handshakes;

/// The listeners' application: TLS handshakes ([`handshake`]), then HTTP/1.x on the
/// gateway's codec or HTTP/2 through Pingora.
pub struct Front {
    gateway: Arc<Gateway>,
    h2: Arc<H2App>,
    handshakes: Handshakes,
}

impl Front {
    pub fn new(gateway: Arc<Gateway>, handshakes: Handshakes) -> Self {
        let h2 = Arc::new(H2App(gateway.clone()));
        Front {
            gateway,
            h2,
            handshakes,
        }
    }
}

#[async_trait]
impl ServerApp for Front {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let stream = self.handshakes.accept(stream).await?;
        if stream.selected_alpn_proto() == Some(ALPN::H2) {
            // Small frames of many streams coalesced into one TLS record and write (h2_io).
            let stream: Stream = Box::new(h2_io::Unvectored(stream));
            return self.h2.process_new(stream, shutdown).await;
        }
        // Awaited where it is made: bound to a name first, the connection's state would be
        // kept twice (the named future and the one polled), 2 × its size per connection.
        sized(h1::serve_connection(&self.gateway, stream, shutdown)).await;
        None
    }
}

/// Logs the size of one HTTP/1 connection's state (its future, before any buffer) once, at
/// debug: memory per connection (issue 18).
fn sized<F: std::future::Future>(serving: F) -> F {
    static SIZE_LOGGED: std::sync::Once = std::sync::Once::new();
    SIZE_LOGGED.call_once(|| {
        log::debug!(
            "an HTTP/1 connection's state: {} bytes",
            std::mem::size_of_val(&serving)
        )
    });
    serving
}
