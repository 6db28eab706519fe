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
//! | `Internal`                 | 1    | 500  | Internal           | no        |
//!
//! Exit codes group by what the operator fixes: 2 the configuration, 3 the GHES side (or the report file),
//! 4 a transient aggregator problem (try again later), 5 the aggregator refused the snapshot or the credential
//! (fix something first), 6 the local output file. Upstream credential failures are 502, not 401, on the local API:
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
        "the aggregator does not accept this instance credential: issue a new one with \
         `license-sync-aggregator instance add …` and store it in `aggregator.credential_file` ({message})"
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

    #[error("internal error: {0}")]
    Internal(String),
}

impl AgentError {
    /// The process exit code of the CLI (see the table in the module docs).
    pub fn exit_code(&self) -> u8 {
        use AgentError::*;
        match self {
            Internal(_) => 1,
            Config(_) => 2,
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
            | Protocol(_) => 5,
            Output { .. } => 6,
        }
    }

    /// The status of the agent's local HTTP API for this failure.
    pub fn http_status(&self) -> StatusCode {
        use AgentError::*;
        match self {
            Config(_) | InvalidSnapshot(_) | SnapshotRejected { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            SourceFile { .. } | Output { .. } | Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
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
            Config(_) | SnapshotRejected { .. } => Code::InvalidArgument,
            SourceFile { .. } | Report(_) | InvalidSnapshot(_) | StaleSnapshot { .. } => {
                Code::FailedPrecondition
            }
            SourceCredentials { .. } | AggregatorCredentials { .. } => Code::Unauthenticated,
            AggregatorPermission { .. } => Code::PermissionDenied,
            SourceUnavailable { .. } | AggregatorUnavailable { .. } => Code::Unavailable,
            ReportTimeout { .. } | AggregatorTimeout { .. } => Code::DeadlineExceeded,
            SyncIdConflict { .. } => Code::AlreadyExists,
            SnapshotTooLarge { .. } => Code::ResourceExhausted,
            AggregatorFailed { .. } => Code::Unknown,
            SourceUnexpected { .. } | Protocol(_) | Output { .. } | Internal(_) => Code::Internal,
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

        let stale = AgentError::StaleSnapshot {
            message: "stored snapshot generated at 2025-01-02T00:00:00Z".into(),
        };
        assert_eq!(stale.grpc_code(), tonic::Code::FailedPrecondition);
        assert_eq!(stale.http_status(), StatusCode::CONFLICT);
        assert!(stale.to_string().contains("newer snapshot"));
        assert!(stale.to_string().contains("2025-01-02T00:00:00Z"));
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
