//! Body types. Bodies stream frame by frame (data and trailers, so gRPC's trailers pass);
//! the only buffering is the bounded replay copy in `retry`. The response body is wrapped in
//! [`Tracked`], which holds what a request took (limit guards, the endpoint's in-flight
//! count) until the last byte is written or the client goes away, and then finishes the
//! request's access log line and metrics.
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the engine hands to hyper, in either direction.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

#[derive(Debug, thiserror::Error)]
#[error("request timeout ({0:?}) reached while streaming the response")]
pub struct DeadlineExceeded(std::time::Duration);

/// A response body that keeps `held` alive until it ends, enforces the request deadline on
/// a streaming body, and calls `on_finish` exactly once with whether the body reached its end.
/// Generic rather than boxed: one per request, and each box was an allocation.
pub struct Tracked<B: Body + Unpin, H, F: FnOnce(bool)> {
    inner: B,
    held: Option<H>,
    deadline: Option<(Pin<Box<Sleep>>, std::time::Duration)>,
    on_finish: Option<F>,
    complete: bool,
}

impl<B: Body + Unpin, H, F: FnOnce(bool)> Tracked<B, H, F> {
    pub fn new(inner: B, held: H, on_finish: F) -> Self {
        Tracked { inner, held: Some(held), deadline: None, on_finish: Some(on_finish), complete: false }
    }

    /// The body fails (the stream is reset) if it is still streaming at `at`.
    pub fn with_deadline(mut self, at: Instant, timeout: std::time::Duration) -> Self {
        self.deadline = Some((Box::pin(tokio::time::sleep_until(at)), timeout));
        self
    }

    fn finish(&mut self) {
        // A body with nothing to send (HEAD, 204) may be dropped unpolled: it is complete.
        self.complete |= self.inner.is_end_stream();
        self.held = None;
        if let Some(f) = self.on_finish.take() {
            f(self.complete);
        }
    }
}

impl<B, H, F> Body for Tracked<B, H, F>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    H: Unpin,
    F: FnOnce(bool) + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some((sleep, timeout)) = &mut this.deadline
            && sleep.as_mut().poll(cx).is_ready()
        {
            let timeout = *timeout;
            this.finish();
            return Poll::Ready(Some(Err(Box::new(DeadlineExceeded(timeout)))));
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx).map(|frame| frame.map(|r| r.map_err(Into::into)));
        match &polled {
            Poll::Ready(None) => {
                this.complete = true;
                this.finish();
            }
            Poll::Ready(Some(Err(_))) => this.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body + Unpin, H, F: FnOnce(bool)> Drop for Tracked<B, H, F> {
    fn drop(&mut self) {
        self.finish();
    }
}
