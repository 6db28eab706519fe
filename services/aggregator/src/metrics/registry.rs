//! The `Metrics` registry: every metric family, its labels and buckets, and the recorders the services call when
//! something happens. The database gauges are registered here but filled at scrape time by `crate::scrape`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use license_sync_core::model::ServerConsumption;
use license_sync_core::snapshot::SnapshotError;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use time::OffsetDateTime;

use crate::error::ErrorKind;
use crate::store::Arrival;

/// The `method` label of a gRPC call to a method this server does not serve.
pub const UNKNOWN_GRPC_METHOD: &str = "unknown";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EnterpriseLabels {
    enterprise: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    enterprise: String,
    hostname: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceStateLabels {
    enterprise: String,
    hostname: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SyncLabels {
    via: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ViaLabels {
    via: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    method: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcMethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpRouteLabels {
    route: String,
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SurfaceLabels {
    surface: &'static str,
}

/// Where a credential was refused: the `surface` of `license_sync_auth_failures_total` and
/// `license_sync_auth_throttled_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthSurface {
    /// A REST API token (bad, expired or malformed).
    Rest,
    /// An enrollment token (`Enrollment.Enroll`).
    Enroll,
    /// An instance credential (ingest, control stream, connection check).
    InstanceCredential,
    /// The `metrics_token` of `GET /metrics`.
    Metrics,
    /// A REST token or a sign-in link offered to the web console's sign-in.
    Console,
}

impl AuthSurface {
    pub const ALL: [AuthSurface; 5] = [
        AuthSurface::Rest,
        AuthSurface::Enroll,
        AuthSurface::InstanceCredential,
        AuthSurface::Metrics,
        AuthSurface::Console,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuthSurface::Rest => "rest",
            AuthSurface::Enroll => "enroll",
            AuthSurface::InstanceCredential => "instance_credential",
            AuthSurface::Metrics => "metrics",
            AuthSurface::Console => "console",
        }
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Why a snapshot was refused by validation: a small fixed set, the `reason` of
/// `license_sync_rows_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Empty or malformed hostname, nil server id, unreadable header.
    InvalidIdentity,
    /// `generated_at` in the future.
    ClockSkew,
    DuplicateUserId,
    EmptyLogin,
    /// A user row that cannot be decoded.
    InvalidRow,
    TooManyUsers,
    /// One gRPC message over `max_message_bytes`.
    MessageTooLarge,
    CountMismatch,
    DigestMismatch,
    /// A stream without a header, with two headers, an empty message or no trailer.
    MalformedStream,
    /// An uploaded body that is not a usage file.
    MalformedFile,
    /// A snapshot of another instance than the credential's.
    WrongInstance,
    /// A login, email, version or other text field over its length limit.
    FieldTooLong,
    /// A stream over its byte, message or time budget (`ingest_max_stream_*`, `ingest_stream_max_secs`).
    StreamBudget,
}

impl Rejection {
    pub const ALL: [Rejection; 14] = [
        Rejection::InvalidIdentity,
        Rejection::ClockSkew,
        Rejection::DuplicateUserId,
        Rejection::EmptyLogin,
        Rejection::InvalidRow,
        Rejection::TooManyUsers,
        Rejection::MessageTooLarge,
        Rejection::CountMismatch,
        Rejection::DigestMismatch,
        Rejection::MalformedStream,
        Rejection::MalformedFile,
        Rejection::WrongInstance,
        Rejection::FieldTooLong,
        Rejection::StreamBudget,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::InvalidIdentity => "invalid_identity",
            Rejection::ClockSkew => "clock_skew",
            Rejection::DuplicateUserId => "duplicate_user_id",
            Rejection::EmptyLogin => "empty_login",
            Rejection::InvalidRow => "invalid_row",
            Rejection::TooManyUsers => "too_many_users",
            Rejection::MessageTooLarge => "message_too_large",
            Rejection::CountMismatch => "count_mismatch",
            Rejection::DigestMismatch => "digest_mismatch",
            Rejection::MalformedStream => "malformed_stream",
            Rejection::MalformedFile => "malformed_file",
            Rejection::WrongInstance => "wrong_instance",
            Rejection::FieldTooLong => "field_too_long",
            Rejection::StreamBudget => "stream_budget",
        }
    }

    pub fn of(error: &SnapshotError) -> Self {
        match error {
            SnapshotError::EmptyHostname
            | SnapshotError::InvalidHostname(_)
            | SnapshotError::NilServerId => Rejection::InvalidIdentity,
            SnapshotError::GeneratedInFuture { .. } => Rejection::ClockSkew,
            SnapshotError::DuplicateUserId { .. } => Rejection::DuplicateUserId,
            SnapshotError::EmptyLogin { .. } => Rejection::EmptyLogin,
            SnapshotError::FieldTooLong { .. } => Rejection::FieldTooLong,
            SnapshotError::TooManyUsers { .. } => Rejection::TooManyUsers,
            SnapshotError::CountMismatch { .. } => Rejection::CountMismatch,
            SnapshotError::DigestMismatch => Rejection::DigestMismatch,
        }
    }
}

/// The `via` label: how a snapshot arrived.
fn via_label(via: Arrival) -> &'static str {
    match via {
        Arrival::Connect => "stream",
        Arrival::Upload => "upload",
    }
}

/// The `state` label of an account, as SPEC §3 classifies it.
fn state_label(state: ServerConsumption) -> &'static str {
    match state {
        ServerConsumption::Active => "active",
        ServerConsumption::Dormant => "dormant",
        ServerConsumption::Suspended => "suspended",
        ServerConsumption::BuiltIn => "built_in",
    }
}

pub(crate) const STATES: [ServerConsumption; 4] = [
    ServerConsumption::Active,
    ServerConsumption::Dormant,
    ServerConsumption::Suspended,
    ServerConsumption::BuiltIn,
];

/// Accounts of one instance's latest snapshot by state, in the order of [`STATES`].
pub(crate) struct InstanceStates {
    pub(crate) hostname: String,
    pub(crate) counts: [i64; 4],
}

/// The generation counted and its accounts by state.
pub(crate) type CountedStates = (i64, Arc<Vec<InstanceStates>>);

/// The values of one enterprise's gauges, read before any gauge is touched.
pub(crate) struct EnterpriseValues {
    pub(crate) slug: String,
    pub(crate) consumed: i64,
    pub(crate) purchased: i64,
    /// Active instances: hostname and last successful commit.
    pub(crate) last_success: Vec<(String, Option<OffsetDateTime>)>,
    pub(crate) stale: i64,
    pub(crate) states: Arc<Vec<InstanceStates>>,
}

pub struct Metrics {
    registry: Registry,
    seats_consumed: Family<EnterpriseLabels, Gauge>,
    seats_purchased: Family<EnterpriseLabels, Gauge>,
    seats_overage: Family<EnterpriseLabels, Gauge>,
    instance_users: Family<InstanceStateLabels, Gauge>,
    instance_last_sync: Family<InstanceLabels, Gauge>,
    instances_stale: Family<EnterpriseLabels, Gauge>,
    syncs: Family<SyncLabels, Counter>,
    sync_duration: HistogramFamily<ViaLabels>,
    rows_rejected: Family<ReasonLabels, Counter>,
    merge_duration: Histogram,
    grpc_requests: Family<GrpcLabels, Counter>,
    grpc_duration: HistogramFamily<GrpcMethodLabels>,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: HistogramFamily<HttpRouteLabels>,
    ingest_streams_open: Gauge,
    /// TLS (issue 11): reloads of the certificate files that failed (the old certificate stays), and the served
    /// certificate's not-after (0 without TLS: an unlabelled gauge, so that the family is always declared).
    tls_reload_failures: Counter,
    tls_certificate_expiry: Gauge,
    auth_failures: Family<SurfaceLabels, Counter>,
    auth_throttled: Family<SurfaceLabels, Counter>,
    /// `/package.Service/Method` of every method served, so that a client cannot create label values.
    grpc_methods: HashSet<String>,
    /// Serialises scrapes: each one clears and refills the database gauges before encoding them.
    pub(crate) scrape: tokio::sync::Mutex<()>,
    /// Per enterprise: the generation counted and its accounts by state, so that a scrape counts only after a change.
    pub(crate) states_cache: Mutex<HashMap<i64, CountedStates>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn sync_buckets() -> Histogram {
    // 10 ms to ~80 s: a commit of a few users to one of a million.
    Histogram::new(exponential_buckets(0.01, 2.0, 14))
}

fn grpc_buckets() -> Histogram {
    // 1 ms to ~70 min: unary calls and snapshot streams, up to long-lived control streams.
    Histogram::new(exponential_buckets(0.001, 4.0, 12))
}

fn http_buckets() -> Histogram {
    // 1 ms to ~60 s.
    Histogram::new(exponential_buckets(0.001, 2.5, 12))
}

impl Metrics {
    /// The metrics of a server serving the licensesync services, health and reflection (`server::start`).
    pub fn for_served_services() -> Self {
        Self::new(&[
            license_sync_proto::v1::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        ])
    }

    /// Registers every metric. `grpc_descriptor_sets` are the encoded `FileDescriptorSet`s of the services served,
    /// whose methods are the only `method` label values.
    pub fn new(grpc_descriptor_sets: &[&[u8]]) -> Self {
        let mut registry = Registry::default();
        let seats_consumed = Family::<EnterpriseLabels, Gauge>::default();
        registry.register(
            "license_sync_seats_consumed",
            "People consuming a license (total_seats_consumed of consumed-licenses)",
            seats_consumed.clone(),
        );
        let seats_purchased = Family::<EnterpriseLabels, Gauge>::default();
        registry.register(
            "license_sync_seats_purchased",
            "Seats purchased by the enterprise",
            seats_purchased.clone(),
        );
        let seats_overage = Family::<EnterpriseLabels, Gauge>::default();
        registry.register(
            "license_sync_seats_overage",
            "Seats consumed beyond those purchased: max(consumed - purchased, 0)",
            seats_overage.clone(),
        );
        let instance_users = Family::<InstanceStateLabels, Gauge>::default();
        registry.register(
            "license_sync_instance_users",
            "Accounts of the instance's latest snapshot by state (active, dormant, suspended, built_in)",
            instance_users.clone(),
        );
        let instance_last_sync = Family::<InstanceLabels, Gauge>::default();
        registry.register_with_unit(
            "license_sync_instance_last_sync_timestamp",
            "Unix time of the instance's last successful commit (absent before its first)",
            Unit::Seconds,
            instance_last_sync.clone(),
        );
        let instances_stale = Family::<EnterpriseLabels, Gauge>::default();
        registry.register(
            "license_sync_instances_stale",
            "Active instances without a successful sync for longer than stale_after_days",
            instances_stale.clone(),
        );
        let syncs = Family::<SyncLabels, Counter>::default();
        registry.register(
            "license_sync_syncs",
            "Snapshots received for an instance, by arrival (stream, upload) and result (applied, duplicate, or the error kind)",
            syncs.clone(),
        );
        let sync_duration: HistogramFamily<ViaLabels> =
            Family::new_with_constructor(sync_buckets as fn() -> Histogram);
        registry.register_with_unit(
            "license_sync_sync_duration",
            "Time from a snapshot received whole (trailer checked, or upload parsed) to its commit",
            Unit::Seconds,
            sync_duration.clone(),
        );
        let rows_rejected = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "license_sync_rows_rejected",
            "Snapshots refused by validation, by reason",
            rows_rejected.clone(),
        );
        let merge_duration = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register_with_unit(
            "license_sync_merge_duration",
            "Rebuilds of an enterprise's merged view (load and merge)",
            Unit::Seconds,
            merge_duration.clone(),
        );
        let grpc_requests = Family::<GrpcLabels, Counter>::default();
        registry.register(
            "license_sync_grpc_requests",
            "gRPC calls by method and status code",
            grpc_requests.clone(),
        );
        let grpc_duration: HistogramFamily<GrpcMethodLabels> =
            Family::new_with_constructor(grpc_buckets as fn() -> Histogram);
        registry.register_with_unit(
            "license_sync_grpc_request_duration",
            "gRPC calls from request to final status (streams: their whole life)",
            Unit::Seconds,
            grpc_duration.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "license_sync_http_requests",
            "HTTP requests by route template, method and status",
            http_requests.clone(),
        );
        let http_duration: HistogramFamily<HttpRouteLabels> =
            Family::new_with_constructor(http_buckets as fn() -> Histogram);
        registry.register_with_unit(
            "license_sync_http_request_duration",
            "HTTP requests from receipt to response headers",
            Unit::Seconds,
            http_duration.clone(),
        );
        let ingest_streams_open = Gauge::default();
        registry.register(
            "license_sync_ingest_streams_open",
            "Snapshot streams open now (each holds a slot of ingest_max_streams and of its instance's \
             ingest_max_streams_per_instance)",
            ingest_streams_open.clone(),
        );
        let tls_reload_failures = Counter::default();
        registry.register(
            "license_sync_tls_reload_failures",
            "Reloads of changed TLS certificate, key or client CA files that failed; the previous certificate stays served",
            tls_reload_failures.clone(),
        );
        let tls_certificate_expiry = Gauge::default();
        registry.register_with_unit(
            "license_sync_tls_certificate_expiry_timestamp",
            "Unix time at which the served TLS certificate expires (its not-after); 0 without TLS",
            Unit::Seconds,
            tls_certificate_expiry.clone(),
        );
        let auth_failures = Family::<SurfaceLabels, Counter>::default();
        registry.register(
            "license_sync_auth_failures",
            "Refused credentials (bad or expired token, enrollment token or instance credential), by surface",
            auth_failures.clone(),
        );
        let auth_throttled = Family::<SurfaceLabels, Counter>::default();
        registry.register(
            "license_sync_auth_throttled",
            "Refused credentials answered 429 / RESOURCE_EXHAUSTED because their address failed too often, by surface",
            auth_throttled.clone(),
        );
        for surface in AuthSurface::ALL {
            let labels = SurfaceLabels {
                surface: surface.as_str(),
            };
            auth_failures.get_or_create(&labels).get();
            auth_throttled.get_or_create(&labels).get();
        }
        let build_info = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "license_sync_build_info",
            "Always 1; the aggregator's version",
            build_info.clone(),
        );
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        // Present from the start, so that rate() and alerts see the first increment.
        for reason in Rejection::ALL {
            rows_rejected
                .get_or_create(&ReasonLabels {
                    reason: reason.as_str(),
                })
                .get();
        }
        for via in [Arrival::Connect, Arrival::Upload] {
            for result in ["applied", "duplicate"] {
                syncs
                    .get_or_create(&SyncLabels {
                        via: via_label(via),
                        result,
                    })
                    .get();
            }
        }
        Metrics {
            registry,
            seats_consumed,
            seats_purchased,
            seats_overage,
            instance_users,
            instance_last_sync,
            instances_stale,
            syncs,
            sync_duration,
            rows_rejected,
            merge_duration,
            grpc_requests,
            grpc_duration,
            http_requests,
            http_duration,
            ingest_streams_open,
            tls_reload_failures,
            tls_certificate_expiry,
            auth_failures,
            auth_throttled,
            grpc_methods: grpc_methods(grpc_descriptor_sets),
            scrape: tokio::sync::Mutex::new(()),
            states_cache: Mutex::new(HashMap::new()),
        }
    }

    /// A snapshot was committed (or found applied before) `elapsed` after it was received whole.
    pub fn sync_committed(&self, via: Arrival, duplicate: bool, elapsed: Duration) {
        let result = if duplicate { "duplicate" } else { "applied" };
        let via = via_label(via);
        self.syncs.get_or_create(&SyncLabels { via, result }).inc();
        self.sync_duration
            .get_or_create(&ViaLabels { via })
            .observe(elapsed.as_secs_f64());
    }

    /// A snapshot for an instance was refused or failed.
    pub fn sync_failed(&self, via: Arrival, kind: ErrorKind) {
        self.syncs
            .get_or_create(&SyncLabels {
                via: via_label(via),
                result: kind.as_str(),
            })
            .inc();
    }

    /// How many snapshot streams are open now.
    pub fn set_ingest_streams_open(&self, open: usize) {
        self.ingest_streams_open
            .set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    pub fn rejected(&self, reason: Rejection) {
        self.rows_rejected
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Changed TLS files could not be loaded.
    pub fn tls_reload_failed(&self) {
        self.tls_reload_failures.inc();
    }

    /// The served TLS certificate's not-after, in Unix seconds.
    pub fn set_tls_certificate_expiry(&self, not_after_unix_secs: i64) {
        self.tls_certificate_expiry.set(not_after_unix_secs);
    }

    /// A credential was refused; `throttled` when the answer was 429 / `RESOURCE_EXHAUSTED`.
    pub fn auth_failed(&self, surface: AuthSurface, throttled: bool) {
        let labels = SurfaceLabels {
            surface: surface.as_str(),
        };
        self.auth_failures.get_or_create(&labels).inc();
        if throttled {
            self.auth_throttled.get_or_create(&labels).inc();
        }
    }

    pub fn merge_finished(&self, elapsed: Duration) {
        self.merge_duration.observe(elapsed.as_secs_f64());
    }

    pub(super) fn grpc_method_label(&self, path: &str) -> String {
        if self.grpc_methods.contains(path) {
            path.to_owned()
        } else {
            UNKNOWN_GRPC_METHOD.to_owned()
        }
    }

    /// Encodes every metric.
    pub(crate) fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// Replaces the database gauges with `values`: an enterprise left out has no series rather than old values
    /// presented as current.
    pub(crate) fn set_database_gauges(&self, values: Vec<EnterpriseValues>) {
        self.clear_database_gauges();
        for value in values {
            self.set_enterprise(value);
        }
    }

    fn clear_database_gauges(&self) {
        self.seats_consumed.clear();
        self.seats_purchased.clear();
        self.seats_overage.clear();
        self.instance_users.clear();
        self.instance_last_sync.clear();
        self.instances_stale.clear();
    }

    fn set_enterprise(&self, value: EnterpriseValues) {
        let enterprise = EnterpriseLabels {
            enterprise: value.slug.clone(),
        };
        self.seats_consumed
            .get_or_create(&enterprise)
            .set(value.consumed);
        self.seats_purchased
            .get_or_create(&enterprise)
            .set(value.purchased);
        self.seats_overage
            .get_or_create(&enterprise)
            .set(value.consumed.saturating_sub(value.purchased).max(0));
        self.instances_stale
            .get_or_create(&enterprise)
            .set(value.stale);
        for (hostname, last_success) in value.last_success {
            let Some(at) = last_success else { continue };
            let gauge = self.instance_last_sync.get_or_create(&InstanceLabels {
                enterprise: value.slug.clone(),
                hostname,
            });
            // Two instances with one hostname share a series: keep the newer.
            if at.unix_timestamp() > gauge.get() {
                gauge.set(at.unix_timestamp());
            }
        }
        for instance in value.states.iter() {
            for (state, count) in STATES.iter().zip(instance.counts) {
                // Summed: two instances with one hostname share a series.
                self.instance_users
                    .get_or_create(&InstanceStateLabels {
                        enterprise: value.slug.clone(),
                        hostname: instance.hostname.clone(),
                        state: state_label(*state),
                    })
                    .inc_by(count);
            }
        }
    }

    pub(super) fn http_finished(
        &self,
        route: String,
        method: &'static str,
        status: u16,
        elapsed: Duration,
    ) {
        self.http_duration
            .get_or_create(&HttpRouteLabels {
                route: route.clone(),
                method,
            })
            .observe(elapsed.as_secs_f64());
        self.http_requests
            .get_or_create(&HttpLabels {
                route,
                method,
                status,
            })
            .inc();
    }

    pub(super) fn grpc_finished(&self, method: String, code: &'static str, elapsed: Duration) {
        self.grpc_duration
            .get_or_create(&GrpcMethodLabels {
                method: method.clone(),
            })
            .observe(elapsed.as_secs_f64());
        self.grpc_requests
            .get_or_create(&GrpcLabels { method, code })
            .inc();
    }
}

/// `/package.Service/Method` of every method in the descriptor sets.
fn grpc_methods(descriptor_sets: &[&[u8]]) -> HashSet<String> {
    use prost::Message;
    let mut methods = HashSet::new();
    for encoded in descriptor_sets {
        let set = match license_sync_proto::prost_types::FileDescriptorSet::decode(*encoded) {
            Ok(set) => set,
            Err(error) => {
                tracing::warn!(%error, "metrics: a gRPC descriptor set cannot be decoded; its methods are labelled unknown");
                continue;
            }
        };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let service_name = service.name.unwrap_or_default();
                for method in service.method {
                    let full = if package.is_empty() {
                        format!("/{service_name}/{}", method.name.unwrap_or_default())
                    } else {
                        format!(
                            "/{package}.{service_name}/{}",
                            method.name.unwrap_or_default()
                        )
                    };
                    methods.insert(full);
                }
            }
        }
    }
    methods
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rejection_has_its_own_label() {
        let labels: HashSet<&str> = Rejection::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), Rejection::ALL.len());
        assert_eq!(
            Rejection::of(&SnapshotError::DigestMismatch).as_str(),
            "digest_mismatch"
        );
        assert_eq!(
            Rejection::of(&SnapshotError::InvalidHostname("a b".into())),
            Rejection::InvalidIdentity
        );
    }

    #[test]
    fn grpc_methods_come_from_the_descriptor_sets_only() {
        let metrics = Metrics::new(&[
            license_sync_proto::v1::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ]);
        assert_eq!(
            metrics.grpc_method_label("/licensesync.v1.SnapshotIngest/UploadSnapshot"),
            "/licensesync.v1.SnapshotIngest/UploadSnapshot"
        );
        assert_eq!(
            metrics.grpc_method_label("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check"
        );
        assert_eq!(
            metrics.grpc_method_label("/licensesync.v1.SnapshotIngest/mona@example.com"),
            UNKNOWN_GRPC_METHOD
        );
    }
}
