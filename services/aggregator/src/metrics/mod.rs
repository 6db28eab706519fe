//! Prometheus metrics of the aggregator, served at `GET /metrics` (behind `metrics_token` when it is set) in the
//! OpenMetrics text format (encoded by `prometheus-client`).
//!
//! Two kinds of metrics:
//!
//! - **Events** (syncs, rejected snapshots, merges, gRPC and HTTP requests) are counted by the process that saw
//!   them. Each replica reports its own; Prometheus sums them.
//! - **State of the shared database** (seats, users by state, last successful sync, stale instances) is refreshed
//!   from the store and the cached merged view at every scrape, so every replica reports the same values whichever
//!   one committed. The refresh is cheap when nothing changed: one generation read per enterprise (the merged view
//!   is cached per generation) and one read of the instance rows. The gauges are registered here; the code that
//!   reads the store and the merged views to fill them is `crate::scrape`, so that this module knows nothing of
//!   `App`.
//!
//! The modules: `registry` (the [`Metrics`] struct: families, labels, buckets and the event recorders) and `layers`
//! (the HTTP middleware and the gRPC layer that count requests).
//!
//! Label values are bounded: enterprise slugs, hostnames, fixed sets of words, route templates and the gRPC methods
//! this server serves. Never a user id, login or email address.

mod layers;
mod registry;

pub use layers::{GrpcMetricsLayer, UNMATCHED_ROUTE, grpc_code_name, track_http};
pub use registry::{AuthSurface, Metrics, Rejection, UNKNOWN_GRPC_METHOD};
pub(crate) use registry::{EnterpriseValues, InstanceStates, STATES};

/// What `prometheus_client::encoding::text::encode` produces.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::layers::GrpcCall;
    use super::*;
    use crate::error::ErrorKind;
    use crate::store::Arrival;

    #[test]
    fn names_follow_the_documented_list() {
        let metrics = Arc::new(Metrics::new(&[]));
        metrics.sync_committed(Arrival::Connect, false, Duration::from_millis(5));
        metrics.sync_failed(Arrival::Upload, ErrorKind::FailedPrecondition);
        metrics.rejected(Rejection::EmptyLogin);
        metrics.merge_finished(Duration::from_millis(5));
        metrics.http_finished("/healthz".into(), "GET", 200, Duration::from_millis(1));
        let call = GrpcCall::start(
            Arc::clone(&metrics),
            "/licensesync.v1.SnapshotIngest/UploadSnapshot".into(),
        );
        call.finish("OK");
        let text = metrics.encode().expect("encode");
        for line in [
            "license_sync_syncs_total{via=\"stream\",result=\"applied\"} 1",
            "license_sync_syncs_total{via=\"upload\",result=\"failed_precondition\"} 1",
            "license_sync_syncs_total{via=\"upload\",result=\"applied\"} 0",
            "license_sync_rows_rejected_total{reason=\"empty_login\"} 1",
            "license_sync_rows_rejected_total{reason=\"clock_skew\"} 0",
            "license_sync_sync_duration_seconds_count{via=\"stream\"} 1",
            "license_sync_merge_duration_seconds_count 1",
            "license_sync_http_requests_total{route=\"/healthz\",method=\"GET\",status=\"200\"} 1",
            "license_sync_http_request_duration_seconds_count{route=\"/healthz\",method=\"GET\"} 1",
            "license_sync_build_info{version=\"",
            "license_sync_grpc_requests_total{method=\"/licensesync.v1.SnapshotIngest/UploadSnapshot\",code=\"OK\"} 1",
            "# TYPE license_sync_grpc_requests counter",
            "# TYPE license_sync_grpc_request_duration_seconds histogram",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
