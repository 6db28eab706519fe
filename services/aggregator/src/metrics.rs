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

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use license_sync_core::model::ServerConsumption;
use license_sync_core::snapshot::SnapshotError;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use time::OffsetDateTime;

use crate::app::{App, MergedView, ViewGuard};
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::store::{Arrival, Enterprise, Instance};

/// What `prometheus_client::encoding::text::encode` produces.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `route` label of a request that matched no route (its raw path could be anything).
pub const UNMATCHED_ROUTE: &str = "unmatched";

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
}

impl Rejection {
    pub const ALL: [Rejection; 12] = [
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

const STATES: [ServerConsumption; 4] = [
    ServerConsumption::Active,
    ServerConsumption::Dormant,
    ServerConsumption::Suspended,
    ServerConsumption::BuiltIn,
];

/// Accounts of one instance's latest snapshot by state, in the order of [`STATES`].
struct InstanceStates {
    hostname: String,
    counts: [i64; 4],
}

/// The generation counted and its accounts by state.
type CountedStates = (i64, Arc<Vec<InstanceStates>>);

/// The values of one enterprise's gauges, read before any gauge is touched.
struct EnterpriseValues {
    slug: String,
    consumed: i64,
    purchased: i64,
    /// Active instances: hostname and last successful commit.
    last_success: Vec<(String, Option<OffsetDateTime>)>,
    stale: i64,
    states: Arc<Vec<InstanceStates>>,
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
    /// `/package.Service/Method` of every method served, so that a client cannot create label values.
    grpc_methods: HashSet<String>,
    /// Serialises scrapes: each one clears and refills the database gauges before encoding them.
    scrape: tokio::sync::Mutex<()>,
    /// Per enterprise: the generation counted and its accounts by state, so that a scrape counts only after a change.
    states_cache: Mutex<HashMap<i64, CountedStates>>,
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

    pub fn rejected(&self, reason: Rejection) {
        self.rows_rejected
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    pub fn merge_finished(&self, elapsed: Duration) {
        self.merge_duration.observe(elapsed.as_secs_f64());
    }

    fn grpc_method_label(&self, path: &str) -> String {
        if self.grpc_methods.contains(path) {
            path.to_owned()
        } else {
            UNKNOWN_GRPC_METHOD.to_owned()
        }
    }

    /// The tower layer that counts gRPC calls; put it on the tonic server.
    pub fn grpc_layer(self: &Arc<Self>) -> GrpcMetricsLayer {
        GrpcMetricsLayer {
            metrics: Arc::clone(self),
        }
    }

    /// Refreshes the database gauges and encodes every metric.
    pub async fn render(&self, app: &Arc<App>) -> Result<String, std::fmt::Error> {
        let _scrape = self.scrape.lock().await;
        self.refresh(app).await;
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
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
        // Better no series than old values presented as current.
        self.clear_database_gauges();
        for value in values {
            self.set_enterprise(value);
        }
        // Forget the counts of enterprises that are gone.
        if let Some(known) = listed
            && let Ok(mut cache) = self.states_cache.lock()
        {
            cache.retain(|id, _| known.contains(id));
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

    fn http_finished(&self, route: String, method: &'static str, status: u16, elapsed: Duration) {
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
            let _ = sender.send(Read::ListFailed(error.into()));
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

/// Axum middleware counting requests by route template (never the raw path, which holds ids and is unbounded).
pub async fn track_http(
    State(metrics): State<Arc<Metrics>>,
    request: Request<Body>,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route = request.extensions().get::<MatchedPath>().map_or_else(
        || UNMATCHED_ROUTE.to_owned(),
        |path| path.as_str().to_owned(),
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

fn grpc_status_of(headers: &axum::http::HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?;
    let code = value.to_str().ok()?.trim().parse::<i32>().ok()?;
    Some(grpc_code_name(tonic::Code::from_i32(code)))
}

/// Counts gRPC calls; see [`Metrics::grpc_layer`].
#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer {
    metrics: Arc<Metrics>,
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// One gRPC call being measured; recorded once, when its status is known. Dropped unrecorded means the client went
/// away before the status was sent: `CANCELLED`.
struct GrpcCall {
    metrics: Arc<Metrics>,
    method: String,
    started: Instant,
    recorded: bool,
}

impl GrpcCall {
    fn finish(&mut self, code: &'static str) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        self.metrics
            .grpc_duration
            .get_or_create(&GrpcMethodLabels {
                method: self.method.clone(),
            })
            .observe(self.started.elapsed().as_secs_f64());
        self.metrics
            .grpc_requests
            .get_or_create(&GrpcLabels {
                method: std::mem::take(&mut self.method),
                code,
            })
            .inc();
    }
}

impl Drop for GrpcCall {
    fn drop(&mut self) {
        self.finish("CANCELLED");
    }
}

impl<S, ReqBody, ResBody> tower::Service<axum::http::Request<ReqBody>> for GrpcMetricsService<S>
where
    S: tower::Service<axum::http::Request<ReqBody>, Response = axum::http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = axum::http::Response<GrpcMetricsBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<ReqBody>) -> Self::Future {
        let mut call = GrpcCall {
            method: self.metrics.grpc_method_label(request.uri().path()),
            metrics: Arc::clone(&self.metrics),
            started: Instant::now(),
            recorded: false,
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = match response.await {
                Ok(response) => response,
                Err(error) => {
                    call.finish("UNKNOWN");
                    return Err(error);
                }
            };
            let (parts, body) = response.into_parts();
            // A trailers-only answer (every error of a handler) carries the status in its headers.
            if let Some(code) = grpc_status_of(&parts.headers) {
                call.finish(code);
            }
            Ok(axum::http::Response::from_parts(
                parts,
                GrpcMetricsBody { inner: body, call },
            ))
        })
    }
}

/// A response body that records its call when the trailers with `grpc-status` go by.
pub struct GrpcMetricsBody<B> {
    inner: B,
    call: GrpcCall,
}

impl<B> http_body::Body for GrpcMetricsBody<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.call
                        .finish(grpc_status_of(trailers).unwrap_or("UNKNOWN"));
                }
            }
            // The stream broke, or ended without a status: not a gRPC answer.
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => this.call.finish("UNKNOWN"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
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

    #[test]
    fn names_follow_the_documented_list() {
        let metrics = Arc::new(Metrics::new(&[]));
        metrics.sync_committed(Arrival::Connect, false, Duration::from_millis(5));
        metrics.sync_failed(Arrival::Upload, ErrorKind::FailedPrecondition);
        metrics.rejected(Rejection::EmptyLogin);
        metrics.merge_finished(Duration::from_millis(5));
        metrics.http_finished("/healthz".into(), "GET", 200, Duration::from_millis(1));
        let mut call = GrpcCall {
            metrics: Arc::clone(&metrics),
            method: "/licensesync.v1.SnapshotIngest/UploadSnapshot".into(),
            started: Instant::now(),
            recorded: false,
        };
        call.finish("OK");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry).expect("encode");
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

    #[test]
    fn an_unfinished_grpc_call_counts_as_cancelled() {
        let metrics = Arc::new(Metrics::new(&[]));
        drop(GrpcCall {
            metrics: Arc::clone(&metrics),
            method: "unknown".into(),
            started: Instant::now(),
            recorded: false,
        });
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry).expect("encode");
        assert!(
            text.contains(
                "license_sync_grpc_requests_total{method=\"unknown\",code=\"CANCELLED\"} 1"
            ),
            "{text}"
        );
    }
}
