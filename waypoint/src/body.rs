//! Body types. Bodies stream frame by frame (data and trailers, so gRPC's trailers pass);
//! the only buffering is the bounded replay copy in `retry`. The response body is wrapped in
//! [`Tracked`], which holds what a request took (limit guards, the endpoint's in-flight
//! count) until the last byte is written or the client goes away, and then finishes the
//! request's access log line and metrics.
use std::any::Any;
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

/// Called once when the response body is finished or dropped; `complete` says whether the
/// body reached its end.
pub type OnFinish = Box<dyn FnOnce(bool) + Send>;

/// A response body that keeps `held` alive until it ends, enforces the request deadline on
/// a streaming body, and calls `on_finish` exactly once.
pub struct Tracked {
    inner: ProxyBody,
    held: Vec<Box<dyn Any + Send>>,
    deadline: Option<(Pin<Box<Sleep>>, std::time::Duration)>,
    on_finish: Option<OnFinish>,
    complete: bool,
}

impl Tracked {
    pub fn new(inner: ProxyBody, held: Vec<Box<dyn Any + Send>>, on_finish: OnFinish) -> Self {
        Tracked { inner, held, deadline: None, on_finish: Some(on_finish), complete: false }
    }

    /// The body fails (the stream is reset) if it is still streaming at `at`.
    pub fn with_deadline(mut self, at: Instant, timeout: std::time::Duration) -> Self {
        self.deadline = Some((Box::pin(tokio::time::sleep_until(at)), timeout));
        self
    }

    fn finish(&mut self) {
        // A body with nothing to send (HEAD, 204) may be dropped unpolled: it is complete.
        self.complete |= self.inner.is_end_stream();
        self.held.clear();
        if let Some(f) = self.on_finish.take() {
            f(self.complete);
        }
    }
}

impl Body for Tracked {
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
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
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

impl Drop for Tracked {
    fn drop(&mut self) {
        self.finish();
    }
}
