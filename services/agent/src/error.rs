//! The agent's one error type.
//!
//! Each variant says what went wrong and what to do about it; the underlying cause stays in
//! [`std::error::Error::source`] so that the CLI can print the whole chain. The same variant maps to a process exit
//! code (CLI), an HTTP status (the agent's local API, later) and a gRPC code, so that every surface reports a failure
//! the same way:
//!
//! | variant                    | exit | HTTP | gRPC               | retryable |
//! |----------------------------|------|------|--------------------|-----------|
//! | `Config`                   | 2    | 422  | InvalidArgument    | no        |
//! | `SourceFile`               | 3    | 500  | FailedPrecondition | no        |
//! | `SourceCredentials`        | 3    | 502  | Unauthenticated    | no        |
//! | `SourceUnavailable`        | 3    | 502  | Unavailable        | yes       |
//! | `ReportTimeout`            | 3    | 504  | DeadlineExceeded   | yes       |
//! | `SourceUnexpected`         | 3    | 502  | Internal           | no        |
//! | `Report`                   | 3    | 502  | FailedPrecondition | no        |
//! | `InvalidSnapshot`          | 3    | 422  | FailedPrecondition | no        |
//! | `AggregatorUnavailable`    | 4    | 503  | Unavailable        | yes       |
//! | `AggregatorTimeout`        | 4    | 504  | DeadlineExceeded   | yes       |
//! | `AggregatorCredentials`    | 5    | 502  | Unauthenticated    | no        |
//! | `AggregatorPermission`     | 5    | 502  | PermissionDenied   | no        |
//! | `SnapshotRejected`         | 5    | 422  | InvalidArgument    | no        |
//! | `StaleSnapshot`            | 5    | 409  | FailedPrecondition | no        |
//! | `SyncIdConflict`           | 5    | 409  | AlreadyExists      | no        |
//! | `SnapshotTooLarge`         | 5    | 413  | ResourceExhausted  | no        |
//! | `AggregatorFailed`         | 4    | 502  | Unknown            | yes       |
//! | `Protocol`                 | 5    | 502  | Internal           | no        |
//! | `Output`                   | 6    | 500  | Internal           | no        |
//! | `State`                    | 6    | 500  | Internal           | no        |
//! | `StateLocked`              | 2    | 409  | FailedPrecondition | no        |
//! | `NotEnrolled`              | 2    | 409  | FailedPrecondition | no        |
//! | `SyncDisabled`             | 2    | 409  | FailedPrecondition | no        |
//! | `NotConnected`             | 2    | 409  | FailedPrecondition | no        |
//! | `ShuttingDown`             | 1    | 503  | Unavailable        | no        |
//! | `EnrollmentRefused`        | 5    | 422  | InvalidArgument    | no        |
//! | `LocalApi`                 | 7    | 502  | Unknown            | no        |
//! | `LocalApiUnreachable`      | 7    | 503  | Unavailable        | no        |
//! | `Internal`                 | 1    | 500  | Internal           | no        |
//!
//! Exit codes group by what the operator fixes: 2 the configuration (or the agent's own settings: not enrolled,
//! license sync disabled), 3 the GHES side (or the report file), 4 a transient aggregator problem (try again later),
//! 5 the aggregator refused the snapshot, the credential or the enrollment token (fix something first), 6 a local
//! file (output or state directory), 7 the running agent's local API (unreachable or refused the request). Upstream credential failures are 502, not 401, on the local API:
//! the caller's own credentials were fine, the agent's were not.

use std::path::PathBuf;

use http::StatusCode;
use license_sync_core::all_users_csv::ReportError;
use license_sync_core::snapshot::SnapshotError;

use crate::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),

    #[error("cannot read the report file {}", path.display())]
    SourceFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "GHES at {url} refused the site-admin credentials (HTTP {status}): check `source.username` and that the token \
         is valid and has the `site_admin` scope"
    )]
    SourceCredentials { url: String, status: u16 },

    #[error("GHES at {url} is unreachable after {attempts} attempt(s): {reason}")]
    SourceUnavailable {
        url: String,
        attempts: u32,
        reason: String,
    },

    #[error(
        "GHES at {url} did not finish building the all_users.csv report within {deadline_secs}s ({polls} answers \
         were 202 Accepted): try again later, or raise `source.report_deadline_secs` on a large instance"
    )]
    ReportTimeout {
        url: String,
        deadline_secs: u64,
        polls: u32,
    },

    #[error("GHES at {url} answered HTTP {status}: {detail}")]
    SourceUnexpected {
        url: String,
        status: u16,
        detail: String,
    },

    #[error("the all_users.csv report cannot be used")]
    Report(#[source] ReportError),

    #[error("the snapshot read from the source is not valid")]
    InvalidSnapshot(#[source] SnapshotError),

    #[error("the aggregator at {endpoint} is unavailable; the sync can be retried later: {reason}")]
    AggregatorUnavailable { endpoint: String, reason: String },

    #[error(
        "the aggregator at {endpoint} did not answer in time; the sync can be retried later (a retry with the same \
         sync id is applied once): {reason}"
    )]
    AggregatorTimeout { endpoint: String, reason: String },

    #[error(
        "the aggregator does not accept this instance credential (credential refused, re-enroll): it was revoked, \
         rotated by another enrollment, or the instance was retired; enroll again with a new enrollment token \
         (`license-sync-agent enroll --token lse_…` or POST /api/v1/connection), or store a credential from \
         `license-sync-aggregator instance add …` in `aggregator.credential_file` ({message})"
    )]
    AggregatorCredentials { message: String },

    #[error(
        "the aggregator refused this instance credential for this snapshot: the credential belongs to another \
         instance or enterprise, check `instance.server_id` ({message})"
    )]
    AggregatorPermission { message: String },

    #[error("the aggregator rejected the snapshot as invalid: {message}")]
    SnapshotRejected { message: String },

    #[error(
        "the aggregator already holds a newer snapshot of this instance: {message} (check the agent host's clock, \
         and that no other agent sends with this server id)"
    )]
    StaleSnapshot { message: String },

    #[error(
        "the aggregator already applied this sync id with different content: {message} (read the source again to \
         get a new sync id)"
    )]
    SyncIdConflict { message: String },

    #[error(
        "the snapshot is over the aggregator's limits: {message} (lower `aggregator.batch_size`, or raise the \
         aggregator's limits if the instance really has this many users)"
    )]
    SnapshotTooLarge { message: String },

    #[error("the aggregator failed with gRPC status {code:?}: {message}")]
    AggregatorFailed { code: tonic::Code, message: String },

    #[error("the aggregator's answer is not what the protocol expects: {0}")]
    Protocol(String),

    #[error("cannot write {}", path.display())]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot {action} {}: {}", path.display(), state_hint(source))]
    State {
        /// What the agent was doing, e.g. "write the pending snapshot".
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "the state directory {} is in use by another license-sync-agent process: run one agent per state \
         directory (stop the other one, or give this one its own `agent.state_dir`)",
        path.display()
    )]
    StateLocked { path: PathBuf },

    #[error(
        "the agent is not connected to an aggregator (no instance credential): connect it first with an \
         enrollment token (`license-sync-agent enroll --token lse_…`, or POST /api/v1/connection), or set \
         `aggregator.credential_file`"
    )]
    NotEnrolled,

    #[error(
        "license sync is disabled on this agent: an owner enables it with `license-sync-agent enable` (PUT \
         /api/v1/settings) once the agent is connected; nothing was sent"
    )]
    SyncDisabled,

    #[error(
        "license sync cannot be enabled before the agent is connected to the aggregator: connect first (POST \
         /api/v1/connection with an enrollment token, or `license-sync-agent enroll --token lse_…`), then enable \
         license sync; the connection check said: {reason}"
    )]
    NotConnected { reason: String },

    #[error("the agent is shutting down: try again once it has restarted")]
    ShuttingDown,

    #[error("the aggregator refused the enrollment: {reason} ({message})")]
    EnrollmentRefused {
        reason: &'static str,
        message: String,
    },

    #[error("the agent's local API at {url} answered HTTP {status}: {message}")]
    LocalApi {
        url: String,
        status: u16,
        message: String,
    },

    #[error(
        "cannot reach the agent's local API at {url}: {reason} (is `license-sync-agent run` running, and does \
         --api match its `agent.listen`?)"
    )]
    LocalApiUnreachable { url: String, reason: String },

    #[error("internal error: {0}")]
    Internal(String),
}

/// The I/O error of a state-directory operation, with what to do for the usual causes.
fn state_hint(error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => format!(
            "{error}: the state directory's file system is full; free space there (nothing was sent, and \
             snapshots already pending are kept)"
        ),
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => format!(
            "{error}: the agent's user must own `agent.state_dir` and be able to write there"
        ),
        _ => error.to_string(),
    }
}

impl AgentError {
    /// The process exit code of the CLI (see the table in the module docs).
    pub fn exit_code(&self) -> u8 {
        use AgentError::*;
        match self {
            Internal(_) | ShuttingDown => 1,
            Config(_) | StateLocked { .. } | NotEnrolled | SyncDisabled | NotConnected { .. } => 2,
            SourceFile { .. }
            | SourceCredentials { .. }
            | SourceUnavailable { .. }
            | ReportTimeout { .. }
            | SourceUnexpected { .. }
            | Report(_)
            | InvalidSnapshot(_) => 3,
            AggregatorUnavailable { .. } | AggregatorTimeout { .. } | AggregatorFailed { .. } => 4,
            AggregatorCredentials { .. }
            | AggregatorPermission { .. }
            | SnapshotRejected { .. }
            | StaleSnapshot { .. }
            | SyncIdConflict { .. }
            | SnapshotTooLarge { .. }
            | EnrollmentRefused { .. }
            | Protocol(_) => 5,
            Output { .. } | State { .. } => 6,
            LocalApi { .. } | LocalApiUnreachable { .. } => 7,
        }
    }

    /// The status of the agent's local HTTP API for this failure.
    pub fn http_status(&self) -> StatusCode {
        use AgentError::*;
        match self {
            Config(_) | InvalidSnapshot(_) | SnapshotRejected { .. } | EnrollmentRefused { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            SourceFile { .. } | Output { .. } | State { .. } | Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            StateLocked { .. } | NotEnrolled | SyncDisabled | NotConnected { .. } => {
                StatusCode::CONFLICT
            }
            LocalApi { .. } => StatusCode::BAD_GATEWAY,
            LocalApiUnreachable { .. } | ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            SourceCredentials { .. }
            | SourceUnavailable { .. }
            | SourceUnexpected { .. }
            | Report(_)
            | AggregatorCredentials { .. }
            | AggregatorPermission { .. }
            | AggregatorFailed { .. }
            | Protocol(_) => StatusCode::BAD_GATEWAY,
            ReportTimeout { .. } | AggregatorTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            AggregatorUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            StaleSnapshot { .. } | SyncIdConflict { .. } => StatusCode::CONFLICT,
            SnapshotTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// The gRPC code for this failure, when the agent reports it over gRPC.
    pub fn grpc_code(&self) -> tonic::Code {
        use AgentError::*;
        use tonic::Code;
        match self {
            Config(_) | SnapshotRejected { .. } | EnrollmentRefused { .. } => Code::InvalidArgument,
            SourceFile { .. }
            | Report(_)
            | InvalidSnapshot(_)
            | StaleSnapshot { .. }
            | StateLocked { .. }
            | NotEnrolled
            | SyncDisabled
            | NotConnected { .. } => Code::FailedPrecondition,
            LocalApi { .. } => Code::Unknown,
            LocalApiUnreachable { .. } | ShuttingDown => Code::Unavailable,
            SourceCredentials { .. } | AggregatorCredentials { .. } => Code::Unauthenticated,
            AggregatorPermission { .. } => Code::PermissionDenied,
            SourceUnavailable { .. } | AggregatorUnavailable { .. } => Code::Unavailable,
            ReportTimeout { .. } | AggregatorTimeout { .. } => Code::DeadlineExceeded,
            SyncIdConflict { .. } => Code::AlreadyExists,
            SnapshotTooLarge { .. } => Code::ResourceExhausted,
            AggregatorFailed { .. } => Code::Unknown,
            SourceUnexpected { .. } | Protocol(_) | Output { .. } | State { .. } | Internal(_) => {
                Code::Internal
            }
        }
    }

    /// Whether trying the same operation again later may succeed without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            AgentError::SourceUnavailable { .. }
                | AgentError::ReportTimeout { .. }
                | AgentError::AggregatorUnavailable { .. }
                | AgentError::AggregatorTimeout { .. }
                | AgentError::AggregatorFailed { .. }
        )
    }

    /// A stable, low-cardinality name of the variant, for metrics labels and structured logs.
    pub fn kind(&self) -> &'static str {
        use AgentError::*;
        match self {
            Config(_) => "config",
            SourceFile { .. } => "source_file",
            SourceCredentials { .. } => "source_credentials",
            SourceUnavailable { .. } => "source_unavailable",
            ReportTimeout { .. } => "report_timeout",
            SourceUnexpected { .. } => "source_unexpected",
            Report(_) => "report",
            InvalidSnapshot(_) => "invalid_snapshot",
            AggregatorUnavailable { .. } => "aggregator_unavailable",
            AggregatorTimeout { .. } => "aggregator_timeout",
            AggregatorCredentials { .. } => "aggregator_credentials",
            AggregatorPermission { .. } => "aggregator_permission",
            SnapshotRejected { .. } => "snapshot_rejected",
            StaleSnapshot { .. } => "stale_snapshot",
            SyncIdConflict { .. } => "sync_id_conflict",
            SnapshotTooLarge { .. } => "snapshot_too_large",
            AggregatorFailed { .. } => "aggregator_failed",
            Protocol(_) => "protocol",
            Output { .. } => "output",
            State { .. } => "state",
            StateLocked { .. } => "state_locked",
            NotEnrolled => "not_enrolled",
            SyncDisabled => "sync_disabled",
            NotConnected { .. } => "not_connected",
            ShuttingDown => "shutting_down",
            EnrollmentRefused { .. } => "enrollment_refused",
            LocalApi { .. } => "local_api",
            LocalApiUnreachable { .. } => "local_api_unreachable",
            Internal(_) => "internal",
        }
    }
}

/// `error: cause: cause…`, for errors whose own `Display` stops at the first level (reqwest, tonic transport).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some libraries repeat their cause in their own message; do not print it twice.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_surface_agrees_on_retryable_aggregator_failures() {
        let error = AgentError::AggregatorUnavailable {
            endpoint: "http://127.0.0.1:1".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(error.exit_code(), 4);
        assert_eq!(error.http_status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error.grpc_code(), tonic::Code::Unavailable);
        assert!(error.is_retryable());
        assert_eq!(error.kind(), "aggregator_unavailable");
    }

    #[test]
    fn refusals_are_not_retryable_and_say_what_to_do() {
        let error = AgentError::AggregatorCredentials {
            message: "unknown credential".into(),
        };
        assert_eq!(error.exit_code(), 5);
        assert!(!error.is_retryable());
        assert!(
            error
                .to_string()
                .contains("license-sync-aggregator instance add")
        );
        assert!(error.to_string().contains("re-enroll"));

        let stale = AgentError::StaleSnapshot {
            message: "stored snapshot generated at 2025-01-02T00:00:00Z".into(),
        };
        assert_eq!(stale.grpc_code(), tonic::Code::FailedPrecondition);
        assert_eq!(stale.http_status(), StatusCode::CONFLICT);
        assert!(stale.to_string().contains("newer snapshot"));
        assert!(stale.to_string().contains("2025-01-02T00:00:00Z"));
    }

    #[test]
    fn a_full_disk_says_what_to_do_and_that_nothing_was_sent() {
        let error = AgentError::State {
            action: "write the pending snapshot",
            path: "/var/lib/agent/pending/x.json".into(),
            source: std::io::Error::from(std::io::ErrorKind::StorageFull),
        };
        let text = error.to_string();
        assert!(text.contains("pending/x.json"), "{text}");
        assert!(text.contains("free space"), "{text}");
        assert!(text.contains("nothing was sent"), "{text}");
        assert_eq!(error.exit_code(), 6);
        assert!(!error.is_retryable());
    }

    #[test]
    fn error_chain_joins_causes_once() {
        let inner = std::io::Error::other("connection refused");
        let outer = AgentError::SourceFile {
            path: "/tmp/x.csv".into(),
            source: inner,
        };
        assert_eq!(
            error_chain(&outer),
            "cannot read the report file /tmp/x.csv: connection refused"
        );
    }
}
