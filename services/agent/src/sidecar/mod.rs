//! `license-sync-agent run`: the agent as a long-running sidecar next to a GHES instance.
//!
//! Four tasks share one [`Sidecar`]:
//!
//! - the **local API** ([`local_api_server`]): status, settings, connection, Sync now, jobs, health;
//! - the **scheduler** ([`schedule_runner`]): starts a job at every slot of the schedule while license sync is enabled;
//! - the **delivery loop** ([`delivery`]): sends the snapshots of `pending/`, oldest first, with backoff; it is the
//!   only sender, so a snapshot is never sent twice at the same time;
//! - the **control stream** ([`control`]): holds `AgentControl.OpenSession` open, heartbeats, and starts jobs when
//!   the aggregator asks for a sync.
//!
//! A job ([`jobs`]) reads the source, builds the snapshot and writes it durably to `pending/`; from there the
//! delivery loop owns it until the aggregator's receipt. Delivery invariants: see ARCHITECTURE.md.

mod control;
mod delivery;
pub mod jobs;
pub mod local_api_server;
mod schedule_runner;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use subtle::ConstantTimeEq as _;
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::Instrument as _;
use tracing::field::Empty;
use uuid::Uuid;

use crate::commands::prepare_snapshot;
use crate::config::{AgentConfig, ConfigError, ConfigProblem, SidecarConfig};
use crate::enrollment_client::{
    CredentialSource, ResolvedCredential, check_connection, resolve_credential,
};
use crate::error::{AgentError, error_chain};
use crate::metrics::{AgentMetrics, ScrapeState, failure_label};
use crate::schedule::{Clock, SystemClock};
use crate::state::{DeliveryResult, ErrorReport, FailedReason, LastResult, Settings, StateDir};
use jobs::{Job, JobRegistry, JobState, JobTicket, Trigger, TriggerKind};

/// Failed snapshots listed in the status (all of them stay in `failed/`, up to `state::MAX_FAILED`).
const STATUS_FAILURES: usize = 5;

/// The shared state of a running agent.
pub struct Sidecar {
    config: Arc<AgentConfig>,
    settings_config: SidecarConfig,
    state: StateDir,
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner>,
    settings: watch::Sender<Settings>,
    /// Serialises settings changes (each one may run a connection check).
    settings_change: tokio::sync::Mutex<()>,
    /// A new snapshot is pending.
    delivery_wake: Notify,
    /// Bumped at every enrollment, so that the delivery loop and the control stream use the new credential at once.
    credential_generation: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    current_job_task: Mutex<Option<JoinHandle<()>>>,
    started_at: OffsetDateTime,
    metrics: AgentMetrics,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: JobRegistry,
    control: ControlStatus,
    delivery: DeliveryStatus,
    last_result: Option<LastResult>,
    next_sync: Option<NextSync>,
    pending: u64,
    failed: u64,
    recent_failures: Vec<FailedReason>,
    counters: Counters,
    /// The open `agent.sync` span of each snapshot between its job and its final delivery outcome, so that every
    /// delivery attempt joins the sync's trace. Removing a span ends it (and exports it).
    sync_spans: HashMap<Uuid, tracing::Span>,
}

/// Where the control stream is, as the status shows it (`connection.state`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(into = "&'static str")]
pub enum ControlState {
    #[default]
    Starting,
    /// No instance credential (enrolled or configured).
    NotEnrolled,
    Connecting,
    /// The session is open and the aggregator said `welcome`.
    Connected,
    /// The session ended or could not be opened; a reconnect is due (`next_attempt_at`).
    Disconnected,
    /// The aggregator refused the credential: shown until a new one works ("credential refused, re-enroll").
    CredentialRefused,
}

impl ControlState {
    pub const ALL: [ControlState; 6] = [
        ControlState::Starting,
        ControlState::NotEnrolled,
        ControlState::Connecting,
        ControlState::Connected,
        ControlState::Disconnected,
        ControlState::CredentialRefused,
    ];

    /// The word the local API and the CLI show.
    pub fn as_str(self) -> &'static str {
        match self {
            ControlState::Starting => "starting",
            ControlState::NotEnrolled => "not_enrolled",
            ControlState::Connecting => "connecting",
            ControlState::Connected => "connected",
            ControlState::Disconnected => "disconnected",
            ControlState::CredentialRefused => "credential_refused",
        }
    }
}

impl From<ControlState> for &'static str {
    fn from(state: ControlState) -> Self {
        state.as_str()
    }
}

/// What the delivery loop is doing, as the status shows it (`delivery.state`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(into = "&'static str")]
pub enum DeliveryState {
    /// Nothing pending.
    #[default]
    Idle,
    Sending,
    /// A failed attempt is retried at `next_attempt_at`.
    WaitingRetry,
    /// License sync is disabled: nothing is sent, pending snapshots stay.
    Paused,
    /// No instance credential to send with.
    WaitingCredential,
}

impl DeliveryState {
    pub const ALL: [DeliveryState; 5] = [
        DeliveryState::Idle,
        DeliveryState::Sending,
        DeliveryState::WaitingRetry,
        DeliveryState::Paused,
        DeliveryState::WaitingCredential,
    ];

    /// The word the local API and the CLI show.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Idle => "idle",
            DeliveryState::Sending => "sending",
            DeliveryState::WaitingRetry => "waiting_retry",
            DeliveryState::Paused => "paused",
            DeliveryState::WaitingCredential => "waiting_credential",
        }
    }
}

impl From<DeliveryState> for &'static str {
    fn from(state: DeliveryState) -> Self {
        state.as_str()
    }
}

/// The control stream as the status shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ControlStatus {
    pub state: ControlState,
    #[serde(with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
    pub credential_source: Option<CredentialSource>,
    pub enterprise: Option<String>,
    pub heartbeat_interval_secs: Option<u32>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    pub error: Option<ErrorReport>,
}

/// The delivery loop as the status shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeliveryStatus {
    pub state: DeliveryState,
    pub sync_id: Option<Uuid>,
    /// Failed attempts since the last delivery.
    pub failed_attempts: u32,
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    pub last_error: Option<ErrorReport>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct NextSync {
    pub slot: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// Counters shown in the status (`/metrics` has its own, see [`crate::metrics`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counters {
    pub jobs_started: JobsByTrigger,
    pub jobs_joined: u64,
    pub jobs_committed: u64,
    pub jobs_failed: u64,
    pub delivery_attempts: DeliveryAttempts,
    pub control_sessions: u64,
    pub control_failures: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct JobsByTrigger {
    pub local: u64,
    pub schedule: u64,
    pub cloud: u64,
}

/// Delivery attempts by result.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeliveryAttempts {
    /// Committed now.
    pub committed: u64,
    /// Acknowledged as already applied (a re-send after a lost receipt or a crash).
    pub duplicate: u64,
    /// Failed in a way a retry may fix; retried with backoff.
    pub retryable_error: u64,
    /// Refused for good; the snapshot moved to `failed/`.
    pub refused: u64,
    /// Cancelled because license sync was disabled, or abandoned at shutdown; the snapshot stays pending.
    pub interrupted: u64,
}

/// `GET /api/v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub agent_version: &'static str,
    pub server_id: Uuid,
    pub hostname: String,
    pub state_dir: String,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    pub license_sync_enabled: bool,
    #[serde(with = "time::serde::rfc3339::option")]
    pub enabled_at: Option<OffsetDateTime>,
    /// Whether the control stream to the aggregator is open and authenticated now.
    pub connected: bool,
    pub connection: ControlStatus,
    pub last_sync: Option<LastResult>,
    /// The next scheduled sync; absent while license sync is disabled.
    pub next_sync: Option<NextSync>,
    pub schedule: ScheduleView,
    pub pending_deliveries: u64,
    pub delivery: DeliveryStatus,
    pub failed_deliveries: u64,
    pub recent_failures: Vec<FailedReason>,
    pub current_job: Option<Job>,
    pub counters: Counters,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScheduleView {
    pub interval_secs: u64,
    pub jitter_secs: u64,
}

/// `GET /api/v1/connection`: the result of a connection check made now.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionReport {
    pub connected: bool,
    pub credential_source: Option<CredentialSource>,
    pub enterprise: Option<String>,
    pub server_id: Uuid,
    pub hostname: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub enrolled_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub server_time: Option<OffsetDateTime>,
    /// Why not, when not connected.
    pub error: Option<ErrorReport>,
    /// The long-lived control stream, for comparison.
    pub control: ControlStatus,
}

impl Sidecar {
    fn new(
        config: AgentConfig,
        settings_config: SidecarConfig,
        state: StateDir,
        settings: Settings,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let now = clock.now();
        Sidecar {
            config: Arc::new(config),
            settings_config,
            state,
            inner: Mutex::new(Inner {
                control: ControlStatus {
                    state: ControlState::Starting,
                    since: Some(now),
                    ..ControlStatus::default()
                },
                delivery: DeliveryStatus::default(),
                ..Inner::default()
            }),
            settings: watch::Sender::new(settings),
            settings_change: tokio::sync::Mutex::new(()),
            delivery_wake: Notify::new(),
            credential_generation: watch::Sender::new(0),
            shutdown: watch::Sender::new(false),
            current_job_task: Mutex::new(None),
            started_at: now,
            metrics: AgentMetrics::new(),
            clock,
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    pub fn settings(&self) -> Settings {
        self.settings.borrow().clone()
    }

    fn enabled(&self) -> bool {
        self.settings.borrow().license_sync_enabled
    }

    fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// The credential in use now (enrolled, else configured).
    fn credential(&self) -> Result<ResolvedCredential, AgentError> {
        resolve_credential(&self.config, Some(&self.state))
    }

    /// Starts a job, or joins the active one. Refused while license sync is disabled or the agent stops.
    pub fn start_or_join(self: &Arc<Self>, trigger: Trigger) -> Result<JobTicket, AgentError> {
        if !self.enabled() {
            return Err(AgentError::SyncDisabled);
        }
        if self.shutting_down() {
            return Err(AgentError::ShuttingDown);
        }
        let kind = trigger.kind();
        let (ticket, run) = {
            let mut inner = self.inner();
            let now = self.now();
            let (ticket, run) = inner.jobs.start_or_join(trigger, now);
            if run {
                match kind {
                    TriggerKind::Local => inner.counters.jobs_started.local += 1,
                    TriggerKind::Schedule => inner.counters.jobs_started.schedule += 1,
                    TriggerKind::Cloud => inner.counters.jobs_started.cloud += 1,
                }
            } else {
                inner.counters.jobs_joined += 1;
            }
            (ticket, run)
        };
        if run {
            tracing::info!(job_id = %ticket.job.id, trigger = kind.as_str(), "starting a sync job");
            let sidecar = self.clone();
            let id = ticket.job.id;
            // Each job is the root span of its sync's trace; the delivery loop's attempts join it.
            let span = tracing::info_span!(
                parent: None,
                "agent.sync",
                trigger = kind.as_str(),
                job_id = %id,
                server_id = %self.config.instance.server_id,
                hostname = %self.config.instance.hostname,
                sync_id = Empty,
                users = Empty,
                outcome = Empty
            );
            let handle = tokio::spawn(async move { sidecar.run_job(id).await }.instrument(span));
            *self
                .current_job_task
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(handle);
        } else {
            tracing::info!(job_id = %ticket.job.id, trigger = kind.as_str(), "joined the sync job already running");
            // Lets the delivery loop look at the job's snapshot again (e.g. notice that it was removed by hand).
            self.delivery_wake.notify_one();
        }
        Ok(ticket)
    }

    fn update_job(&self, id: Uuid, change: impl FnOnce(&mut Job)) -> Option<Job> {
        let now = self.now();
        let mut inner = self.inner();
        let was_active = inner.jobs.get(id)?.state.is_active();
        let job = inner.jobs.update(id, now, change)?;
        if was_active {
            match job.state {
                JobState::Committed => {
                    inner.counters.jobs_committed += 1;
                    let duplicate = job
                        .receipt
                        .as_ref()
                        .is_some_and(|receipt| receipt.duplicate);
                    self.metrics
                        .job_finished(job.trigger, if duplicate { "duplicate" } else { "success" });
                }
                JobState::Failed => {
                    inner.counters.jobs_failed += 1;
                    let kind = job
                        .error
                        .as_ref()
                        .map_or("unknown", |error| error.kind.as_str());
                    self.metrics.job_finished(job.trigger, failure_label(kind));
                }
                _ => {}
            }
        }
        Some(job)
    }

    /// The `agent.sync` span of a pending snapshot: its job's, or a new root for a snapshot left pending by a
    /// previous run (`trigger = "pending"`), kept until [`Sidecar::finish_sync_span`].
    fn sync_span(&self, sync_id: Uuid, users: u64) -> tracing::Span {
        self.inner()
            .sync_spans
            .entry(sync_id)
            .or_insert_with(|| {
                tracing::info_span!(
                    parent: None,
                    "agent.sync",
                    trigger = "pending",
                    server_id = %self.config.instance.server_id,
                    hostname = %self.config.instance.hostname,
                    sync_id = %sync_id,
                    users,
                    outcome = Empty
                )
            })
            .clone()
    }

    /// Ends the `agent.sync` span of a snapshot with its outcome (`committed`, `duplicate`, `failed`,
    /// `interrupted`); `failure` is the error kind of a failed sync.
    fn finish_sync_span(&self, sync_id: Uuid, outcome: &'static str, failure: Option<&str>) {
        let span = self.inner().sync_spans.remove(&sync_id);
        // Dropped outside the lock: ending a span hands it to the exporter.
        if let Some(span) = span {
            span.record("outcome", outcome);
            if let Some(kind) = failure {
                license_sync_tracing::record_failure(&span, kind);
            }
        }
    }

    fn fail_job(&self, id: Uuid, error: ErrorReport, retryable: bool) {
        self.update_job(id, |job| {
            job.state = JobState::Failed;
            job.error = Some(error);
            job.retryable = retryable;
        });
    }

    /// One job up to the point where its snapshot is durable in `pending/`; the delivery loop does the rest.
    async fn run_job(self: Arc<Self>, id: Uuid) {
        self.update_job(id, |job| job.state = JobState::Reading);
        let mut shutdown = self.shutdown.subscribe();
        let reading = std::time::Instant::now();
        let built = tokio::select! {
            built = prepare_snapshot(&self.config) => {
                self.metrics.source_read(reading.elapsed());
                built
            }
            _ = shutdown.wait_for(|stopping| *stopping) => {
                tracing::Span::current().record("outcome", "interrupted");
                self.fail_job(id, ErrorReport::new(
                    "shutting_down",
                    "the agent stopped while reading the source; nothing was sent",
                ), true);
                return;
            }
        };
        let built = match built {
            Ok(built) => {
                for row in &built.skipped {
                    self.metrics.row_skipped(&row.reason);
                }
                built
            }
            Err(error) => {
                tracing::warn!(job_id = %id, kind = error.kind(), error = %error_chain(&error), "the sync job could not read the source");
                let span = tracing::Span::current();
                span.record("outcome", "failed");
                license_sync_tracing::record_failure(&span, error.kind());
                self.fail_job(id, ErrorReport::from(&error), error.is_retryable());
                return;
            }
        };
        if !self.enabled() {
            tracing::Span::current().record("outcome", "interrupted");
            self.fail_job(id, ErrorReport::from(&AgentError::SyncDisabled), false);
            return;
        }
        let snapshot = built.snapshot;
        let sync_id = snapshot.meta.sync_id;
        let generated_at = snapshot.meta.generated_at;
        let users = snapshot.users.len() as u64;
        let rows_skipped = snapshot.meta.source_report.rows_skipped;
        // The job carries its sync id before the file exists, so that the delivery loop, which may pick the file up
        // at once, can always attribute its attempts to this job.
        self.update_job(id, |job| {
            job.sync_id = Some(sync_id);
            job.generated_at = Some(generated_at);
            job.users = Some(users);
            job.rows_skipped = Some(rows_skipped);
        });
        // Likewise the job's span, so that the first delivery attempt already joins this trace.
        self.inner()
            .sync_spans
            .insert(sync_id, tracing::Span::current());
        let state = self.state.clone();
        let written = tokio::task::spawn_blocking(move || {
            let entry = state.write_pending(snapshot)?;
            let pending = state
                .list_pending()
                .map(|pending| pending.len() as u64)
                .ok();
            Ok::<_, AgentError>((entry, pending))
        })
        .await
        .map_err(|error| AgentError::Internal(format!("the state task failed: {error}")))
        .and_then(|written| written);
        match written {
            Ok((entry, pending)) => {
                tracing::info!(job_id = %id, %sync_id, users, pending = %entry.name, "the snapshot is pending delivery");
                // Unless the delivery loop was quicker and already finished it.
                self.update_job(id, |job| {
                    if job.state == JobState::Reading {
                        job.state = JobState::Sending;
                    }
                });
                if let Some(pending) = pending {
                    self.inner().pending = pending;
                }
                self.delivery_wake.notify_one();
            }
            Err(error) => {
                tracing::error!(job_id = %id, %sync_id, error = %error_chain(&error), "cannot persist the snapshot; nothing was sent");
                self.finish_sync_span(sync_id, "failed", Some(error.kind()));
                let mut report = ErrorReport::from(&error);
                if !report.message.contains("nothing was sent") {
                    report.message.push_str(
                        " (nothing was sent: a snapshot is sent only once it is safely in the state directory)",
                    );
                }
                self.fail_job(id, report, false);
            }
        }
    }

    /// Runs the connection check now with the credential in use.
    pub async fn check_connection(&self) -> ConnectionReport {
        let control = self.inner().control.clone();
        let server_id = self.config.instance.server_id;
        let credential = match self.credential() {
            Ok(credential) => credential,
            Err(error) => {
                return ConnectionReport {
                    connected: false,
                    credential_source: None,
                    enterprise: None,
                    server_id,
                    hostname: None,
                    enrolled_at: None,
                    server_time: None,
                    error: Some(ErrorReport::from(&error)),
                    control,
                };
            }
        };
        let result = check_connection(&self.config, &credential.secret).await;
        let mut report = ConnectionReport {
            connected: result.is_ok(),
            credential_source: Some(credential.source),
            enterprise: credential.enterprise,
            server_id,
            hostname: None,
            enrolled_at: credential.enrolled_at,
            server_time: None,
            error: None,
            control,
        };
        match result {
            Ok(check) => {
                report.enterprise = Some(check.enterprise);
                report.hostname = Some(check.hostname);
                report.server_time = check.server_time;
            }
            Err(error) => report.error = Some(ErrorReport::from(&error)),
        }
        report
    }

    /// Enables or disables license sync. Enabling needs a connection check that succeeds now.
    pub async fn set_enabled(&self, enabled: bool) -> Result<Settings, AgentError> {
        let _serialised = self.settings_change.lock().await;
        let current = self.settings();
        if current.license_sync_enabled == enabled {
            return Ok(current);
        }
        if enabled {
            let report = self.check_connection().await;
            if !report.connected {
                let reason = report
                    .error
                    .map(|error| error.message)
                    .unwrap_or_else(|| "the connection check failed".into());
                return Err(AgentError::NotConnected { reason });
            }
        }
        let now = self.now();
        let settings = Settings {
            license_sync_enabled: enabled,
            enabled_at: enabled.then_some(now),
            updated_at: Some(now),
        };
        let state = self.state.clone();
        let stored = settings.clone();
        tokio::task::spawn_blocking(move || state.store_settings(&stored))
            .await
            .map_err(|error| AgentError::Internal(format!("the state task failed: {error}")))??;
        tracing::info!(
            license_sync_enabled = enabled,
            "license sync {}",
            if enabled { "enabled" } else { "disabled" }
        );
        self.settings.send_replace(settings.clone());
        Ok(settings)
    }

    /// Enrolls with the token and switches to the new credential at once.
    pub async fn enroll(
        &self,
        token: &crate::config::Secret,
    ) -> Result<crate::enrollment_client::Enrollment, AgentError> {
        let enrollment = crate::enrollment_client::enroll(&self.config, &self.state, token).await?;
        self.credential_generation
            .send_modify(|generation| *generation += 1);
        Ok(enrollment)
    }

    pub fn job(&self, id: Uuid) -> Option<Job> {
        self.inner().jobs.get(id).cloned()
    }

    pub fn jobs(&self) -> Vec<Job> {
        self.inner().jobs.list()
    }

    pub fn status(&self) -> Status {
        let settings = self.settings();
        let inner = self.inner();
        Status {
            agent_version: env!("CARGO_PKG_VERSION"),
            server_id: self.config.instance.server_id,
            hostname: self.config.instance.hostname.clone(),
            state_dir: self.state.root().display().to_string(),
            started_at: self.started_at,
            license_sync_enabled: settings.license_sync_enabled,
            enabled_at: settings.enabled_at,
            connected: inner.control.state == ControlState::Connected,
            connection: inner.control.clone(),
            last_sync: inner.last_result.clone(),
            next_sync: if settings.license_sync_enabled {
                inner.next_sync
            } else {
                None
            },
            schedule: ScheduleView {
                interval_secs: self.settings_config.sync_interval.as_secs(),
                jitter_secs: self.settings_config.sync_jitter.as_secs(),
            },
            pending_deliveries: inner.pending,
            delivery: inner.delivery.clone(),
            failed_deliveries: inner.failed,
            recent_failures: inner.recent_failures.clone(),
            current_job: inner.jobs.active().cloned(),
            counters: inner.counters.clone(),
        }
    }

    /// `GET /metrics`: the state gauges as the status reports them, and every counter.
    pub fn metrics_text(&self) -> Result<String, std::fmt::Error> {
        let settings = self.settings();
        let state = {
            let inner = self.inner();
            ScrapeState {
                next_sync: inner
                    .next_sync
                    .filter(|_| settings.license_sync_enabled)
                    .map(|next| next.at),
                pending: inner.pending,
                sync_enabled: settings.license_sync_enabled,
                connected: inner.control.state == ControlState::Connected,
            }
        };
        self.metrics.render(state)
    }

    /// Whether `/readyz` answers ready: running and the state directory is there.
    pub fn ready(&self) -> Result<(), String> {
        if self.shutting_down() {
            return Err("shutting down".into());
        }
        match std::fs::metadata(self.state.pending_dir()) {
            Ok(metadata) if metadata.is_dir() => Ok(()),
            Ok(_) => Err("the state directory's pending/ is not a directory".into()),
            Err(error) => Err(format!("the state directory is not accessible: {error}")),
        }
    }

    /// The aggregator refused the credential: report "credential refused, re-enroll" until a new one works.
    fn credential_refused(&self, error: &AgentError) {
        let now = self.now();
        let mut inner = self.inner();
        if inner.control.state != ControlState::CredentialRefused {
            inner.control.since = Some(now);
        }
        inner.control.state = ControlState::CredentialRefused;
        inner.control.error = Some(ErrorReport::from(error));
    }

    /// Re-reads `failed/` for the status.
    fn refresh_failed(&self) {
        match self.state.list_failed() {
            Ok(failed) => {
                let mut inner = self.inner();
                inner.failed = failed.len() as u64;
                inner.recent_failures = failed.into_iter().take(STATUS_FAILURES).collect();
            }
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "cannot list failed snapshots")
            }
        }
    }

    /// Checks the owner token of a request (constant time).
    pub fn is_owner(&self, presented: &str) -> Result<bool, AgentError> {
        let expected = self.settings_config.owner_token()?;
        Ok(constant_time_eq(
            expected.expose_secret().as_bytes(),
            presented.as_bytes(),
        ))
    }
}

/// Compares without an early exit on the first differing byte, so that the time taken does not reveal how much of
/// a guessed token is right (a length mismatch fails at once: the length is not the secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// A running agent; [`RunningAgent::shutdown`] stops it gracefully.
pub struct RunningAgent {
    sidecar: Arc<Sidecar>,
    local_addr: SocketAddr,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl RunningAgent {
    /// The address the local API listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn sidecar(&self) -> &Arc<Sidecar> {
        &self.sidecar
    }

    /// Stops the API and the scheduler, lets an in-flight upload finish within `shutdown_grace_secs` (else it is
    /// abandoned and its snapshot stays pending), and waits for the tasks.
    pub async fn shutdown(self) {
        let grace = self.sidecar.settings_config.shutdown_grace;
        tracing::info!(grace_secs = grace.as_secs(), "shutting down");
        self.sidecar.shutdown.send_replace(true);
        let job = self
            .sidecar
            .current_job_task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        // The tasks themselves bound their waits by the grace period; this is a safety net.
        let limit = grace + Duration::from_secs(5);
        let deadline = tokio::time::Instant::now() + limit;
        let tasks = self.tasks.into_iter().chain(job.map(|job| ("job", job)));
        for (name, task) in tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                tracing::warn!(task = name, "did not stop in time; abandoned");
                abort.abort();
            }
        }
        // Syncs still waiting for delivery end their spans here, so that they are exported before the exit.
        let open: Vec<Uuid> = self.sidecar.inner().sync_spans.keys().copied().collect();
        for sync_id in open {
            self.sidecar.finish_sync_span(sync_id, "interrupted", None);
        }
        tracing::info!("stopped");
    }
}

/// Starts the sidecar: takes the state directory's lock, binds the local API and starts the tasks.
pub async fn start(config: AgentConfig) -> Result<RunningAgent, AgentError> {
    start_with_clock(config, Arc::new(SystemClock)).await
}

pub async fn start_with_clock(
    config: AgentConfig,
    clock: Arc<dyn Clock>,
) -> Result<RunningAgent, AgentError> {
    let settings_config = config.sidecar()?.clone();
    config.aggregator()?;
    // Fail at start, not at the first owner request.
    settings_config.owner_token()?;
    let mut state = StateDir::open(&settings_config.state_dir)?;
    state.lock()?;
    let removed = state.remove_temporaries()?;
    if removed > 0 {
        tracing::info!(
            removed,
            "removed files of writes a previous run did not finish"
        );
    }
    let settings = state.load_settings()?;
    match resolve_credential(&config, Some(&state)) {
        Ok(_) | Err(AgentError::NotEnrolled) => {}
        Err(error) => return Err(error),
    }
    let last_result = match state.load_last_result() {
        Ok(result) => result,
        Err(error) => {
            tracing::warn!(error = %error_chain(&error), "cannot read the last result; the status starts without it");
            None
        }
    };
    let listener = tokio::net::TcpListener::bind(settings_config.listen)
        .await
        .map_err(|error| {
            AgentError::Config(ConfigError::Invalid(vec![ConfigProblem {
                key: "agent.listen".into(),
                message: format!(
                    "= {} cannot be bound: {error} (choose a free address, or 127.0.0.1:0 for any free port)",
                    settings_config.listen
                ),
            }]))
        })?;
    let local_addr = listener
        .local_addr()
        .map_err(|error| AgentError::Internal(format!("the listener has no address: {error}")))?;
    if !local_addr.ip().is_loopback() {
        tracing::warn!(%local_addr, "the local API listens beyond loopback: owner-only actions are protected by the owner token only");
    }

    let sidecar = Arc::new(Sidecar::new(
        config,
        settings_config,
        state,
        settings,
        clock,
    ));
    {
        let pending = sidecar.state.list_pending()?.len() as u64;
        if let Some(result) = last_result
            .as_ref()
            .filter(|r| r.result == DeliveryResult::Committed)
        {
            sidecar.metrics.succeeded(result.at);
        }
        let mut inner = sidecar.inner();
        inner.pending = pending;
        inner.last_result = last_result;
    }
    sidecar.refresh_failed();

    let mut tasks = Vec::new();
    let api_sidecar = sidecar.clone();
    let mut api_shutdown = sidecar.shutdown.subscribe();
    tasks.push((
        "api",
        tokio::spawn(async move {
            let limits = api_limits(&api_sidecar.settings_config);
            let router = local_api_server::router(api_sidecar);
            // The aggregator's serving loop and limits: idle and slowloris connections cannot pile up.
            license_sync_serve::http::serve(listener, router, limits, async move {
                let _ = api_shutdown.wait_for(|stopping| *stopping).await;
            })
            .await;
        }),
    ));
    tasks.push(("delivery", tokio::spawn(delivery::run(sidecar.clone()))));
    tasks.push((
        "scheduler",
        tokio::spawn(schedule_runner::run(sidecar.clone())),
    ));
    tasks.push(("control", tokio::spawn(control::run(sidecar.clone()))));

    let status = sidecar.status();
    tracing::info!(
        %local_addr,
        state_dir = %status.state_dir,
        license_sync_enabled = status.license_sync_enabled,
        pending = status.pending_deliveries,
        "the agent is running"
    );
    Ok(RunningAgent {
        sidecar,
        local_addr,
        tasks,
    })
}

/// The local API's connection limits, from `[agent]`.
fn api_limits(config: &SidecarConfig) -> license_sync_serve::http::HttpLimits {
    license_sync_serve::http::HttpLimits {
        connections: license_sync_serve::ConnectionLimits {
            max_connections: config.api_max_connections,
            idle_timeout: config.api_idle_timeout,
        },
        header_read_timeout: config.api_header_read_timeout,
    }
}

/// Waits until `receiver`'s value satisfies `ready`, or forever when its sender is gone.
async fn wait_until<T>(receiver: &mut watch::Receiver<T>, ready: impl FnMut(&T) -> bool) {
    if receiver.wait_for(ready).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_show_as_their_words() {
        for state in ControlState::ALL {
            assert_eq!(serde_json::to_value(state).expect("JSON"), state.as_str());
        }
        for state in DeliveryState::ALL {
            assert_eq!(serde_json::to_value(state).expect("JSON"), state.as_str());
        }
        assert_eq!(
            ControlState::CredentialRefused.as_str(),
            "credential_refused"
        );
        assert_eq!(DeliveryState::WaitingRetry.as_str(), "waiting_retry");
    }

    #[test]
    fn owner_tokens_compare_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
