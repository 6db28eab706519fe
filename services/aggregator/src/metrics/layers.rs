//! The layers that count requests as they go by: an axum middleware for HTTP, and for gRPC tower-http's
//! `TraceLayer` with a classifier of our own.
//!
//! The gRPC classifier is made per call and is the call's measurement: it takes the method from the request path
//! (only the methods of the served descriptor sets, see [`Metrics::grpc_layer`]), records the code of a
//! trailers-only answer at its headers, or else rides along in the response body until the trailers (or the end
//! of the stream) go by. `TraceLayer`'s own callbacks cannot do this alone: none of them sees the request path
//! and none runs when a call is dropped, while a classifier dropped before recording means the client went away:
//! `CANCELLED`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::Response;
use tower_http::classify::{ClassifiedResponse, ClassifyEos, ClassifyResponse, MakeClassifier};
use tower_http::trace::TraceLayer;
use tracing::Span;

use super::Metrics;

/// The `route` label of a request that matched no route (its raw path could be anything).
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// The `method` label of an HTTP request; anything else than the standard methods is `other`.
fn http_method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Axum middleware counting requests by route template (never the raw path, which holds ids and is unbounded); a
/// route's `/api/v3` alias counts under the route's own template (`crate::rest::metric_route`).
pub async fn track_http(
    State(metrics): State<Arc<Metrics>>,
    request: Request<Body>,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route = request.extensions().get::<MatchedPath>().map_or_else(
        || UNMATCHED_ROUTE.to_owned(),
        |path| crate::rest::metric_route(path.as_str()).to_owned(),
    );
    let method = http_method_label(request.method());
    let response = next.run(request).await;
    metrics.http_finished(route, method, response.status().as_u16(), started.elapsed());
    response
}

/// The canonical name of a gRPC status code (as in grpc/doc/statuscodes.md).
pub fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn grpc_status_of(headers: &HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?;
    let code = value.to_str().ok()?.trim().parse::<i32>().ok()?;
    Some(grpc_code_name(tonic::Code::from_i32(code)))
}

/// The layer counting gRPC calls ([`Metrics::grpc_layer`]). No span and no log line of its own: the services'
/// spans and logs are unchanged by it.
pub type GrpcMetricsLayer = TraceLayer<GrpcCalls, Span, (), (), (), (), ()>;

impl Metrics {
    /// The tower layer that counts gRPC calls; put it on the tonic server.
    pub fn grpc_layer(self: &Arc<Self>) -> GrpcMetricsLayer {
        TraceLayer::new(GrpcCalls {
            metrics: Arc::clone(self),
        })
        .make_span_with(Span::none())
        .on_request(())
        .on_response(())
        .on_body_chunk(())
        .on_eos(())
        .on_failure(())
    }
}

/// Starts a [`GrpcCall`] for each request.
#[derive(Clone, Debug)]
pub struct GrpcCalls {
    metrics: Arc<Metrics>,
}

impl MakeClassifier for GrpcCalls {
    type Classifier = GrpcCall;
    type FailureClass = &'static str;
    type ClassifyEos = GrpcCall;

    fn make_classifier<B>(&self, request: &axum::http::Request<B>) -> GrpcCall {
        GrpcCall::start(
            Arc::clone(&self.metrics),
            self.metrics.grpc_method_label(request.uri().path()),
        )
    }
}

/// One gRPC call being measured, recorded once, when its status is known. The classifier and then the response body
/// hold it (tower-http wants a classifier that can be cloned: clones share the call). Dropped unrecorded means the
/// client went away before the status was sent: `CANCELLED`. Its failure class is the code of a call that did not
/// end `OK`.
#[derive(Clone)]
pub struct GrpcCall(Arc<CallState>);

struct CallState {
    metrics: Arc<Metrics>,
    method: String,
    started: Instant,
    recorded: AtomicBool,
}

impl GrpcCall {
    pub(super) fn start(metrics: Arc<Metrics>, method: String) -> Self {
        GrpcCall(Arc::new(CallState {
            metrics,
            method,
            started: Instant::now(),
            recorded: AtomicBool::new(false),
        }))
    }

    /// Records the call with `code`, unless it was recorded already.
    pub(super) fn finish(&self, code: &'static str) {
        self.0.finish(code);
    }

    /// Records the call and classifies it: anything but `OK` is a failure.
    fn classify(self, code: &'static str) -> Result<(), &'static str> {
        self.finish(code);
        if code == "OK" { Ok(()) } else { Err(code) }
    }
}

impl CallState {
    fn finish(&self, code: &'static str) {
        if self.recorded.swap(true, Ordering::Relaxed) {
            return;
        }
        self.metrics
            .grpc_finished(self.method.clone(), code, self.started.elapsed());
    }
}

impl Drop for CallState {
    fn drop(&mut self) {
        self.finish("CANCELLED");
    }
}

impl ClassifyResponse for GrpcCall {
    type FailureClass = &'static str;
    type ClassifyEos = GrpcCall;

    fn classify_response<B>(
        self,
        response: &axum::http::Response<B>,
    ) -> ClassifiedResponse<&'static str, GrpcCall> {
        // A trailers-only answer (every error of a handler) carries the status in its headers.
        match grpc_status_of(response.headers()) {
            Some(code) => ClassifiedResponse::Ready(self.classify(code)),
            None => ClassifiedResponse::RequiresEos(self),
        }
    }

    fn classify_error<E>(self, _error: &E) -> &'static str {
        self.finish("UNKNOWN");
        "UNKNOWN"
    }
}

impl ClassifyEos for GrpcCall {
    type FailureClass = &'static str;

    fn classify_eos(self, trailers: Option<&HeaderMap>) -> Result<(), &'static str> {
        // Trailers without a status, or a stream ended without trailers: not a gRPC answer.
        self.classify(trailers.and_then(grpc_status_of).unwrap_or("UNKNOWN"))
    }

    fn classify_error<E>(self, _error: &E) -> &'static str {
        // The stream broke.
        self.finish("UNKNOWN");
        "UNKNOWN"
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use axum::body::Bytes;
    use http_body::Frame;
    use http_body_util::{BodyExt, Empty, StreamBody};
    use tower::{Layer, ServiceExt};

    use super::*;

    const UPLOAD: &str = "/licensesync.v1.SnapshotIngest/UploadSnapshot";

    type Frames = Vec<Result<Frame<Bytes>, Infallible>>;

    fn served() -> Arc<Metrics> {
        Arc::new(Metrics::new(&[license_sync_proto::v1::FILE_DESCRIPTOR_SET]))
    }

    fn trailers(code: &str) -> HeaderMap {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", code.parse().expect("header value"));
        trailers
    }

    /// Calls `path` through the layer around a service that answers `headers` then `frames`, and gives back the
    /// response with its body unread.
    async fn call(
        metrics: &Arc<Metrics>,
        path: &str,
        headers: HeaderMap,
        frames: Frames,
    ) -> axum::http::Response<impl http_body::Body<Data = Bytes, Error = Infallible>> {
        let mut answer = Some((headers, frames));
        let inner = tower::service_fn(move |_request: axum::http::Request<Empty<Bytes>>| {
            let (headers, frames) = answer.take().expect("one call");
            let mut response =
                axum::http::Response::new(StreamBody::new(futures::stream::iter(frames)));
            *response.headers_mut() = headers;
            async move { Ok::<_, Infallible>(response) }
        });
        let request = axum::http::Request::builder()
            .uri(path)
            .body(Empty::new())
            .expect("request");
        metrics
            .grpc_layer()
            .layer(inner)
            .oneshot(request)
            .await
            .expect("response")
    }

    fn exposition(metrics: &Metrics) -> String {
        metrics.encode().expect("encode")
    }

    fn count(method: &str, code: &str) -> String {
        format!("license_sync_grpc_requests_total{{method=\"{method}\",code=\"{code}\"}} 1")
    }

    #[test]
    fn an_unfinished_grpc_call_counts_as_cancelled() {
        let metrics = Arc::new(Metrics::new(&[]));
        drop(GrpcCall::start(Arc::clone(&metrics), "unknown".into()));
        let text = exposition(&metrics);
        assert!(
            text.contains(
                "license_sync_grpc_requests_total{method=\"unknown\",code=\"CANCELLED\"} 1"
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_trailers_only_answer_is_counted_at_its_headers() {
        let metrics = served();
        let response = call(&metrics, UPLOAD, trailers("5"), Vec::new()).await;
        assert!(exposition(&metrics).contains(&count(UPLOAD, "NOT_FOUND")));
        drop(response);
        let text = exposition(&metrics);
        assert!(!text.contains("CANCELLED"), "{text}");
    }

    #[tokio::test]
    async fn a_streamed_answer_is_counted_at_its_trailers() {
        let metrics = served();
        let frames = vec![
            Ok(Frame::data(Bytes::from_static(b"message"))),
            Ok(Frame::trailers(trailers("0"))),
        ];
        let response = call(&metrics, UPLOAD, HeaderMap::new(), frames).await;
        assert!(!exposition(&metrics).contains("license_sync_grpc_requests_total{"));
        response.into_body().collect().await.expect("body");
        let text = exposition(&metrics);
        assert!(text.contains(&count(UPLOAD, "OK")), "{text}");
        assert!(
            text.contains(&format!(
                "license_sync_grpc_request_duration_seconds_count{{method=\"{UPLOAD}\"}} 1"
            )),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_stream_without_status_is_unknown_and_a_dropped_one_cancelled() {
        let metrics = served();
        let ended = vec![Ok(Frame::data(Bytes::from_static(b"message")))];
        let response = call(&metrics, UPLOAD, HeaderMap::new(), ended).await;
        response.into_body().collect().await.expect("body");
        let unread = vec![Ok(Frame::trailers(trailers("0")))];
        drop(
            call(
                &metrics,
                "/licensesync.v1.SnapshotIngest/x",
                HeaderMap::new(),
                unread,
            )
            .await,
        );
        let text = exposition(&metrics);
        assert!(text.contains(&count(UPLOAD, "UNKNOWN")), "{text}");
        assert!(
            text.contains(&count(crate::metrics::UNKNOWN_GRPC_METHOD, "CANCELLED")),
            "{text}"
        );
    }
}
