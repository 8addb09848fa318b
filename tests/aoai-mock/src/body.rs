//! Response bodies: a fixed body, or a paced server-sent-events stream built up front.

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::time::Sleep;

/// Builds an SSE stream as one buffer plus event boundaries.
///
/// Each event records whether the stream pauses (`--chunk-delay-ms`) before it.
#[derive(Default)]
pub struct SseBuilder {
    buf: String,
    /// (end offset, pause before this event)
    segs: Vec<(usize, bool)>,
}

impl SseBuilder {
    pub fn new() -> Self {
        SseBuilder {
            buf: String::with_capacity(2048),
            segs: Vec::with_capacity(16),
        }
    }

    /// `data: {json}\n\n`; `json` writes the payload.
    pub fn data(&mut self, pause: bool, json: impl FnOnce(&mut String)) {
        self.buf.push_str("data: ");
        json(&mut self.buf);
        self.buf.push_str("\n\n");
        self.segs.push((self.buf.len(), pause));
    }

    /// `event: {name}\ndata: {json}\n\n`.
    pub fn event(&mut self, pause: bool, name: &str, json: impl FnOnce(&mut String)) {
        self.buf.push_str("event: ");
        self.buf.push_str(name);
        self.buf.push_str("\ndata: ");
        json(&mut self.buf);
        self.buf.push_str("\n\n");
        self.segs.push((self.buf.len(), pause));
    }

    /// `data: [DONE]\n\n`.
    pub fn done(&mut self) {
        self.buf.push_str("data: [DONE]\n\n");
        self.segs.push((self.buf.len(), false));
    }

    /// Each event rewritten by `f` (its pause kept).
    pub fn map_text(self, f: impl Fn(&str) -> String) -> SseBuilder {
        let mut out = SseBuilder::new();
        let mut start = 0;
        for (end, pause) in self.segs {
            out.buf.push_str(&f(&self.buf[start..end]));
            out.segs.push((out.buf.len(), pause));
            start = end;
        }
        out
    }

    /// Only the events whose `sequence_number` is above `after` (a resumed stream).
    pub fn retain_after(self, after: u64) -> SseBuilder {
        let mut out = SseBuilder::new();
        let mut start = 0;
        for (end, pause) in self.segs {
            let event = &self.buf[start..end];
            let seq = event
                .split("\"sequence_number\":")
                .nth(1)
                .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse::<u64>().ok());
            if seq.is_none_or(|n| n > after) {
                out.buf.push_str(event);
                out.segs.push((out.buf.len(), pause));
            }
            start = end;
        }
        out
    }

    /// The whole stream as text (for tests).
    #[cfg(test)]
    pub fn text(&self) -> &str {
        &self.buf
    }

    /// Turns the events into frames: with a delay, a new frame starts at every
    /// event that pauses; without one, the whole stream is one frame.
    pub fn into_body(self, delay: Duration) -> SseBody {
        let data = Bytes::from(self.buf);
        let mut frames: Vec<(usize, usize, bool)> = Vec::new();
        if delay.is_zero() {
            if !data.is_empty() {
                frames.push((0, data.len(), false));
            }
        } else {
            let mut start = 0;
            for (end, pause) in self.segs {
                match frames.last_mut() {
                    Some(last) if !pause => last.1 = end,
                    _ => frames.push((start, end, pause)),
                }
                start = end;
            }
        }
        SseBody {
            data,
            frames,
            idx: 0,
            delay,
            sleep: None,
        }
    }
}

/// A paced SSE body: each frame is sent as soon as its pause is over.
pub struct SseBody {
    data: Bytes,
    frames: Vec<(usize, usize, bool)>,
    idx: usize,
    delay: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl SseBody {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let Some(&(start, end, pause)) = self.frames.get(self.idx) else {
            return Poll::Ready(None);
        };
        if pause {
            let delay = self.delay;
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
            ready!(sleep.as_mut().poll(cx));
            self.sleep = None;
        }
        self.idx += 1;
        Poll::Ready(Some(self.data.slice(start..end)))
    }

    /// The frames' sizes and pauses (for tests).
    #[cfg(test)]
    pub fn frames(&self) -> Vec<(usize, bool)> {
        self.frames.iter().map(|&(s, e, p)| (e - s, p)).collect()
    }
}

/// Every response body of the mock.
pub enum MockBody {
    Full(Option<Bytes>),
    Sse(SseBody),
}

impl MockBody {
    pub fn full(b: impl Into<Bytes>) -> Self {
        MockBody::Full(Some(b.into()))
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            MockBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Sse(s) => s.poll_next(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MockBody::Full(b) => b.is_none(),
            MockBody::Sse(s) => s.idx >= s.frames.len(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            MockBody::Full(None) => SizeHint::with_exact(0),
            MockBody::Sse(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn sample() -> SseBuilder {
        let mut b = SseBuilder::new();
        b.data(false, |o| o.push_str(r#"{"a":1}"#));
        b.data(true, |o| o.push_str(r#"{"a":2}"#));
        b.event(true, "x.y", |o| o.push_str("{}"));
        b.data(false, |o| o.push_str(r#"{"a":3}"#));
        b.done();
        b
    }

    #[test]
    fn sse_framing() {
        let b = sample();
        assert_eq!(
            b.text(),
            "data: {\"a\":1}\n\ndata: {\"a\":2}\n\nevent: x.y\ndata: {}\n\ndata: {\"a\":3}\n\ndata: [DONE]\n\n"
        );
        let total = b.text().len();
        let body = b.into_body(Duration::ZERO);
        assert_eq!(body.frames(), vec![(total, false)]);
    }

    #[test]
    fn sse_frames_split_at_pauses() {
        let body = sample().into_body(Duration::from_millis(5));
        let f = body.frames();
        assert_eq!(f.len(), 3);
        assert_eq!(f[0], ("data: {\"a\":1}\n\n".len(), false));
        assert_eq!(f[1], ("data: {\"a\":2}\n\n".len(), true));
        assert_eq!(
            f[2],
            (
                "event: x.y\ndata: {}\n\ndata: {\"a\":3}\n\ndata: [DONE]\n\n".len(),
                true
            )
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sse_body_yields_everything_in_order() {
        let text = sample().text().to_string();
        let start = tokio::time::Instant::now();
        let body = MockBody::Sse(sample().into_body(Duration::from_millis(50)));
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(got, text.as_bytes());
        assert!(start.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn full_body() {
        let body = MockBody::full("abc");
        assert_eq!(body.size_hint().exact(), Some(3));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abc");
    }
}
