//! Prometheus metrics of the aggregator, served unauthenticated at `GET /metrics` in the OpenMetrics text format
//! (encoded by `prometheus-client`).
//!
//! Two kinds of metrics:
//!
//! - **Events** (syncs, rejected snapshots, merges, gRPC and HTTP requests) are counted by the process that saw
//!   them. Each replica reports its own; Prometheus sums them.
//! - **State of the shared database** (seats, users by state, last successful sync, stale instances) is refreshed
//!   from the store and the cached merged view at every scrape, so every replica reports the same values whichever
//!   one committed. The refresh is cheap when nothing changed: one generation read per enterprise (the merged view
//!   is cached per generation) and one read of the instance rows.
//!
//! Label values are bounded: enterprise slugs, hostnames, fixed sets of words, route templates and the gRPC methods
//! this server serves. Never a user id, login or email address.

mod layers;
mod registry;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use time::OffsetDateTime;

pub use layers::{GrpcMetricsLayer, UNMATCHED_ROUTE, grpc_code_name, track_http};
use registry::{EnterpriseValues, InstanceStates, STATES};
pub use registry::{Metrics, Rejection, UNKNOWN_GRPC_METHOD};

use crate::app::{App, MergedView, ViewGuard};
use crate::error::{ServiceError, ServiceResult};
use crate::store::{Enterprise, Instance};

/// What `prometheus_client::encoding::text::encode` produces.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Metrics {
    /// Refreshes the database gauges and encodes every metric.
    pub async fn render(&self, app: &Arc<App>) -> Result<String, std::fmt::Error> {
        let _scrape = self.scrape.lock().await;
        self.refresh(app).await;
        self.encode()
    }

    async fn refresh(&self, app: &Arc<App>) {
        let (sender, mut reads) = tokio::sync::mpsc::unbounded_channel();
        // Its own task, one enterprise at a time: a view rebuild that outlasts this scrape's budget still completes
        // and is cached for the next scrape, and a fresh replica does not rebuild every view at once.
        tokio::spawn(read_database(Arc::clone(app), sender));
        let deadline = tokio::time::Instant::now() + REFRESH_BUDGET;
        let now = OffsetDateTime::now_utc();
        let stale_after = time::Duration::days(i64::from(app.config.stale_after_days));
        let mut listed = None;
        let mut values = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, reads.recv()).await {
                Ok(Some(Read::Listed(ids))) => listed = Some(ids),
                Ok(Some(Read::Enterprise(enterprise, Ok((view, instances))))) => values
                    .push(self.enterprise_values(&enterprise, &view, instances, now, stale_after)),
                Ok(Some(Read::Enterprise(enterprise, Err(error)))) => tracing::warn!(
                    enterprise = %enterprise.slug,
                    error = %error.message,
                    "metrics: cannot read the enterprise; its gauges are left out of this scrape"
                ),
                Ok(Some(Read::ListFailed(error))) => {
                    tracing::warn!(error = %error.message, "metrics: cannot list the enterprises; their gauges are left out of this scrape");
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        budget_secs = REFRESH_BUDGET.as_secs(),
                        "metrics: reading the database took longer than the budget; the enterprises not read yet are \
                         left out of this scrape (their views are still being rebuilt for the next one)"
                    );
                    break;
                }
            }
        }
        self.set_database_gauges(values);
        // Forget the counts of enterprises that are gone.
        if let Some(known) = listed
            && let Ok(mut cache) = self.states_cache.lock()
        {
            cache.retain(|id, _| known.contains(id));
        }
    }

    fn enterprise_values(
        &self,
        enterprise: &Enterprise,
        view: &MergedView,
        instances: Vec<Instance>,
        now: OffsetDateTime,
        stale_after: time::Duration,
    ) -> EnterpriseValues {
        let active: Vec<_> = instances
            .into_iter()
            .filter(|instance| instance.retired_at.is_none())
            .collect();
        let stale = active
            .iter()
            .filter(|instance| {
                instance
                    .last_success_at
                    .is_none_or(|success| now - success > stale_after)
            })
            .count() as i64;
        EnterpriseValues {
            slug: enterprise.slug.clone(),
            consumed: i64::try_from(view.people.total_seats_consumed()).unwrap_or(i64::MAX),
            purchased: view.seats_purchased,
            last_success: active
                .into_iter()
                .map(|instance| (instance.hostname, instance.last_success_at))
                .collect(),
            stale,
            states: self.instance_states(enterprise.id, view),
        }
    }

    /// Accounts by state of each instance of the view, counted once per generation.
    fn instance_states(&self, enterprise_id: i64, view: &MergedView) -> Arc<Vec<InstanceStates>> {
        if let Ok(cache) = self.states_cache.lock()
            && let Some((generation, states)) = cache.get(&enterprise_id)
            && *generation == view.generation
        {
            return Arc::clone(states);
        }
        let states: Arc<Vec<InstanceStates>> = Arc::new(
            view.people
                .instances()
                .map(|(_, instance, _)| {
                    let mut counts = [0i64; 4];
                    for user in instance.users.iter() {
                        let state = user.consumption();
                        if let Some(index) = STATES.iter().position(|known| *known == state) {
                            counts[index] += 1;
                        }
                    }
                    InstanceStates {
                        hostname: instance.hostname.clone(),
                        counts,
                    }
                })
                .collect(),
        );
        if let Ok(mut cache) = self.states_cache.lock() {
            cache.insert(enterprise_id, (view.generation, Arc::clone(&states)));
        }
        states
    }
}

/// The longest a scrape waits for the database before answering with what it has: below Prometheus' default
/// `scrape_timeout` (10 s), so that the event counters stay visible while the database is slow or down.
const REFRESH_BUDGET: Duration = Duration::from_secs(5);

/// What [`read_database`] hands to the scrape, as it goes.
enum Read {
    Listed(HashSet<i64>),
    ListFailed(ServiceError),
    Enterprise(Enterprise, ServiceResult<(ViewGuard, Vec<Instance>)>),
}

/// Reads every enterprise's merged view (cached per generation: a re-merge only when the database changed since this
/// process last looked) and instance rows, one enterprise at a time. Stops when the scrape is gone.
async fn read_database(app: Arc<App>, sender: tokio::sync::mpsc::UnboundedSender<Read>) {
    let enterprises = match app.store.list_enterprises().await {
        Ok(enterprises) => enterprises,
        Err(error) => {
            let _ = sender.send(Read::ListFailed(error));
            return;
        }
    };
    if sender
        .send(Read::Listed(enterprises.iter().map(|e| e.id).collect()))
        .is_err()
    {
        return;
    }
    for enterprise in enterprises {
        let read = async {
            let view = app.merged_view(enterprise.id).await?;
            let instances = app.store.list_instances(enterprise.id).await?;
            Ok((view, instances))
        }
        .await;
        if sender.send(Read::Enterprise(enterprise, read)).is_err() {
            return;
        }
    }
}

/// `GET /metrics`.
pub async fn serve(State(app): State<Arc<App>>) -> Response {
    match app.metrics.render(&app).await {
        Ok(text) => {
            let mut response = text.into_response();
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
            response
        }
        Err(error) => {
            tracing::error!(%error, "metrics: cannot encode");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
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
