//! The in-flight mark of one request, carried by its response body so that a connection stays busy until the
//! answer is fully written (a long gRPC stream included).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};

use crate::Activity;

/// A request in flight on its connection; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight {
    activity: Arc<Activity>,
}

impl InFlight {
    pub(crate) fn new(activity: Arc<Activity>) -> Self {
        InFlight { activity }
    }

    /// Wraps a response body so that the request stays in flight until the body is done or dropped.
    pub fn hold_until_sent<B>(self, body: B) -> InFlightBody<B> {
        InFlightBody {
            body,
            _in_flight: self,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.activity.end_request();
    }
}

/// A response body that keeps its request in flight.
#[derive(Debug)]
pub struct InFlightBody<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
