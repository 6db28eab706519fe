//! Prometheus metrics of the running agent (`run`), served unauthenticated at `GET /metrics` on the local API in the
//! OpenMetrics text format (encoded by `prometheus-client`).
//!
//! Counters and the histogram are updated as things happen; the gauges that mirror the sidecar's state (next sync,
//! pending snapshots, enabled, connected) are set from that state at each scrape, so they cannot drift from the
//! status the local API reports. Label values are fixed sets of words, never a user id, login or email address.

use std::time::Duration;

use license_sync_core::all_users_csv::SkipReason;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use time::OffsetDateTime;

use crate::trigger::TriggerKind;

/// What `prometheus_client::encoding::text::encode` produces.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Failure kinds of the sidecar's own that may label a sync attempt, besides every [`crate::AgentError::kind`]
/// (see `sidecar::delivery`). Anything else is `other`, so that the label stays bounded whatever a future error
/// reports.
const SIDECAR_FAILURE_KINDS: [&str; 3] = ["snapshot_missing", "damaged_snapshot", "unknown"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    trigger: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

/// The `result` label of a failed attempt: its error kind, if it is a known one.
pub fn failure_label(kind: &str) -> &'static str {
    crate::AgentError::KINDS
        .iter()
        .chain(&SIDECAR_FAILURE_KINDS)
        .find(|known| **known == kind)
        .copied()
        .unwrap_or("other")
}

/// The sidecar's state as a scrape sees it.
#[derive(Debug, Clone, Copy)]
pub struct ScrapeState {
    /// The scheduler's next run; `None` while license sync is disabled.
    pub next_sync: Option<OffsetDateTime>,
    pub pending: u64,
    pub sync_enabled: bool,
    pub connected: bool,
}

pub struct AgentMetrics {
    registry: Registry,
    last_success: Gauge,
    next_sync: Gauge,
    sync_attempts: Family<AttemptLabels, Counter>,
    pending: Gauge,
    source_fetch: Histogram,
    rows_skipped: Family<ReasonLabels, Counter>,
    sync_enabled: Gauge,
    connected: Gauge,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").finish_non_exhaustive()
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let last_success = Gauge::default();
        registry.register_with_unit(
            "license_sync_agent_last_success_timestamp",
            "Unix time of the last snapshot the aggregator acknowledged (0: none known since the start)",
            Unit::Seconds,
            last_success.clone(),
        );
        let next_sync = Gauge::default();
        registry.register_with_unit(
            "license_sync_agent_next_sync_timestamp",
            "Unix time of the scheduler's next run (0 while license sync is disabled)",
            Unit::Seconds,
            next_sync.clone(),
        );
        let sync_attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "license_sync_agent_sync_attempts",
            "Sync jobs finished, by what started them (schedule, sync_now, cloud) and result (success, duplicate, or the failure kind)",
            sync_attempts.clone(),
        );
        let pending = Gauge::default();
        registry.register(
            "license_sync_agent_pending_snapshots",
            "Snapshots in the state directory waiting for the aggregator's receipt",
            pending.clone(),
        );
        // 50 ms to ~7 min: a local file to a large GHES report built on demand.
        let source_fetch = Histogram::new(exponential_buckets(0.05, 2.0, 14));
        registry.register_with_unit(
            "license_sync_agent_source_fetch_duration",
            "Reading the source (GHES report or file) and building the snapshot",
            Unit::Seconds,
            source_fetch.clone(),
        );
        let rows_skipped = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "license_sync_agent_rows_skipped",
            "Rows of all_users.csv the reader skipped, by reason",
            rows_skipped.clone(),
        );
        let sync_enabled = Gauge::default();
        registry.register(
            "license_sync_agent_sync_enabled",
            "1 while license sync is enabled",
            sync_enabled.clone(),
        );
        let connected = Gauge::default();
        registry.register(
            "license_sync_agent_connected",
            "1 while the control stream to the aggregator is open and authenticated",
            connected.clone(),
        );
        let build_info = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "license_sync_agent_build_info",
            "Always 1; the agent's version",
            build_info.clone(),
        );
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        // Present from the start, so that rate() and alerts see the first increment.
        for reason in SkipReason::KINDS {
            rows_skipped.get_or_create(&ReasonLabels { reason }).get();
        }
        for kind in [
            TriggerKind::Schedule,
            TriggerKind::Local,
            TriggerKind::Cloud,
        ] {
            sync_attempts
                .get_or_create(&AttemptLabels {
                    trigger: kind.metric_label(),
                    result: "success",
                })
                .get();
        }
        AgentMetrics {
            registry,
            last_success,
            next_sync,
            sync_attempts,
            pending,
            source_fetch,
            rows_skipped,
            sync_enabled,
            connected,
        }
    }

    /// A job started by `trigger` ended with `result` (`success`, `duplicate` or a [`failure_label`]).
    pub fn job_finished(&self, trigger: TriggerKind, result: &'static str) {
        self.sync_attempts
            .get_or_create(&AttemptLabels {
                trigger: trigger.metric_label(),
                result,
            })
            .inc();
    }

    pub fn source_read(&self, elapsed: Duration) {
        self.source_fetch.observe(elapsed.as_secs_f64());
    }

    pub fn row_skipped(&self, reason: &SkipReason) {
        self.rows_skipped
            .get_or_create(&ReasonLabels {
                reason: reason.kind(),
            })
            .inc();
    }

    /// The aggregator acknowledged a snapshot at `at`.
    pub fn succeeded(&self, at: OffsetDateTime) {
        self.last_success.set(at.unix_timestamp());
    }

    /// Sets the state gauges and encodes every metric.
    pub fn render(&self, state: ScrapeState) -> Result<String, std::fmt::Error> {
        self.next_sync
            .set(state.next_sync.map_or(0, OffsetDateTime::unix_timestamp));
        self.pending
            .set(i64::try_from(state.pending).unwrap_or(i64::MAX));
        self.sync_enabled.set(i64::from(state.sync_enabled));
        self.connected.set(i64::from(state.connected));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(TriggerKind::Local.metric_label(), "sync_now");
        assert_eq!(TriggerKind::Schedule.metric_label(), "schedule");
        assert_eq!(TriggerKind::Cloud.metric_label(), "cloud");
        assert_eq!(
            failure_label("aggregator_unavailable"),
            "aggregator_unavailable"
        );
        assert_eq!(failure_label("snapshot_missing"), "snapshot_missing");
        assert_eq!(failure_label("mona@example.com"), "other");
        let error = crate::AgentError::SyncDisabled;
        assert_eq!(failure_label(error.kind()), "sync_disabled");
    }

    #[test]
    fn the_exposition_has_the_documented_names() {
        let metrics = AgentMetrics::new();
        metrics.job_finished(TriggerKind::Schedule, "success");
        metrics.job_finished(TriggerKind::Local, failure_label("source_unavailable"));
        metrics.source_read(Duration::from_millis(70));
        metrics.row_skipped(&SkipReason::MissingLogin);
        metrics.succeeded(OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("valid"));
        let text = metrics
            .render(ScrapeState {
                next_sync: Some(OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("valid")),
                pending: 2,
                sync_enabled: true,
                connected: false,
            })
            .expect("encode");
        for line in [
            "license_sync_agent_last_success_timestamp_seconds 1700000000",
            "license_sync_agent_next_sync_timestamp_seconds 1800000000",
            "license_sync_agent_sync_attempts_total{trigger=\"schedule\",result=\"success\"} 1",
            "license_sync_agent_sync_attempts_total{trigger=\"sync_now\",result=\"source_unavailable\"} 1",
            "license_sync_agent_sync_attempts_total{trigger=\"cloud\",result=\"success\"} 0",
            "license_sync_agent_pending_snapshots 2",
            "license_sync_agent_source_fetch_duration_seconds_count 1",
            "license_sync_agent_rows_skipped_total{reason=\"missing_login\"} 1",
            "license_sync_agent_rows_skipped_total{reason=\"duplicate_id\"} 0",
            "license_sync_agent_sync_enabled 1",
            "license_sync_agent_connected 0",
            "license_sync_agent_build_info{version=\"",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        let disabled = metrics
            .render(ScrapeState {
                next_sync: None,
                pending: 0,
                sync_enabled: false,
                connected: true,
            })
            .expect("encode");
        assert!(disabled.contains("license_sync_agent_next_sync_timestamp_seconds 0"));
        assert!(disabled.contains("license_sync_agent_connected 1"));
    }
}
