//! The TLS stream under an HTTP/2 connection, as the `h2` codec should see it: one that does
//! not offer vectored writes, so that small DATA frames of many streams are coalesced into one
//! TLS record and one write.
//!
//! `h2`'s frame writer copies a DATA frame's payload into its 16 KiB write buffer only below a
//! "chain threshold"; above it, it keeps the payload aside and must write the buffer out before
//! it can take the next frame. The threshold is 256 bytes when the stream says it writes
//! vectored and 1 KiB when it does not. Pingora's TLS stream says it does, although its TLS
//! layer writes one buffer per call (each one a TLS record): so every answer of 256 bytes or
//! more — a chat completion's JSON — cost a flush of its own, i.e. a TLS record, a
//! `write(2)` and the record's per-call cost in OpenSSL, even when 32 streams of the same
//! connection answered in the same pass of the event loop. Reporting no vectored writes moves
//! the threshold to 1 KiB: such answers are buffered with their HEADERS frames and written
//! together, one record and one write for all the streams that answered before the
//! connection's task ran. Larger payloads are written as before (the buffer, then the payload);
//! the codec still flushes at the end of every pass, so no frame waits for a later one.
//! Everything else is passed through.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection's stream that writes one buffer per call (see the module's doc): `Stream` on
/// the listeners, any byte stream in the tests.
#[derive(Debug)]
pub struct Unvectored<S = Stream>(pub S);

impl<S: AsyncRead + Unpin> AsyncRead for Unvectored<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Unvectored<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    /// Writes stay one buffer per call (`poll_write_vectored`'s default writes the first
    /// non-empty one), as the TLS layer below does anyway; what changes is what `h2` makes of it.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[async_trait]
impl Shutdown for Unvectored {
    async fn shutdown(&mut self) {
        self.0.shutdown().await
    }
}

impl UniqueID for Unvectored {
    fn id(&self) -> UniqueIDType {
        self.0.id()
    }
}

impl Ssl for Unvectored {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.0.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.0.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.0.selected_alpn_proto()
    }
}

impl GetTimingDigest for Unvectored {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.0.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.0.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.0.get_write_pending_time()
    }
}

impl GetProxyDigest for Unvectored {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.0.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.0.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Unvectored {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.0.get_socket_digest()
    }

    fn set_socket_digest(&mut self, socket_digest: SocketDigest) {
        self.0.set_socket_digest(socket_digest)
    }
}

#[async_trait]
impl Peek for Unvectored {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.0.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use tokio::io::DuplexStream;

    /// The TLS layer as `h2` sees it under Pingora: it claims vectored writes but takes one
    /// buffer per call (each would be a TLS record and, flushed, a `write(2)`). Counts the
    /// calls that carry bytes.
    struct OneBufferPerCall {
        inner: DuplexStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for OneBufferPerCall {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for OneBufferPerCall {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let r = Pin::new(&mut self.inner).poll_write(cx, buf);
            if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            r
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
    }

    const STREAMS: usize = 32;
    /// A chat completion's JSON is ~400 bytes: above h2's 256-byte vectored chain threshold,
    /// below the 1 KiB one.
    const ANSWER: usize = 400;

    /// Serves `STREAMS` requests of one HTTP/2 connection whose answers are all ready in the
    /// same pass (as when the backend's answers arrive together), over `wrap(stream)`; returns
    /// the writes that carried those answers, after checking every answer arrived whole.
    async fn writes_for_answers<S>(wrap: impl FnOnce(OneBufferPerCall) -> S) -> usize
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let writes = Arc::new(AtomicUsize::new(0));
        let io = wrap(OneBufferPerCall {
            inner: server_io,
            writes: writes.clone(),
        });
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(io).await.unwrap();
            while let Some(Ok((_req, respond))) = conn.accept().await {
                let _ = tx.send(respond);
            }
        });
        let (client, conn) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut client = client.ready().await.unwrap();
        let mut answers = Vec::new();
        for _ in 0..STREAMS {
            let req = http::Request::post("https://gw/chat").body(()).unwrap();
            let (answer, _) = client.send_request(req, true).unwrap();
            answers.push(answer);
            client = client.ready().await.unwrap();
        }
        let mut responders = Vec::new();
        while responders.len() < STREAMS {
            responders.push(rx.recv().await.unwrap());
        }
        let before = writes.load(Ordering::Relaxed);
        for mut respond in responders {
            let resp = http::Response::builder().status(200).body(()).unwrap();
            let mut body = respond.send_response(resp, false).unwrap();
            body.send_data(Bytes::from(vec![b'x'; ANSWER]), true)
                .unwrap();
        }
        for answer in answers {
            let mut body = answer.await.unwrap().into_body();
            let mut got = 0;
            while let Some(piece) = body.data().await {
                let piece = piece.unwrap();
                got += piece.len();
                let _ = body.flow_control().release_capacity(piece.len());
            }
            assert_eq!(got, ANSWER);
        }
        writes.load(Ordering::Relaxed) - before
    }

    #[tokio::test(flavor = "current_thread")]
    async fn answers_ready_together_leave_in_one_write_not_one_each() {
        let plain = writes_for_answers(|s| s).await;
        let unvectored = writes_for_answers(Unvectored).await;
        eprintln!("writes for {STREAMS} answers: {plain} as before, {unvectored} unvectored");
        // The control: as Pingora's TLS stream, a flush per answer (and its payload apart).
        assert!(plain >= STREAMS, "{plain} writes for {STREAMS} answers");
        // Coalesced: 32 × ~420 bytes fit the codec's 16 KiB buffer once or twice.
        assert!(unvectored <= 2, "{unvectored} writes for {STREAMS} answers");
    }
}
