//! The agent's one error type.
//!
//! Each variant says what went wrong and what to do about it; the underlying cause stays in
//! [`std::error::Error::source`] so that the CLI can print the whole chain. The same variant maps to a process exit
//! code (CLI), an HTTP status (the agent's local API), a gRPC code, a retryable flag and a kind (also the metrics
//! label), all from one `match` ([`AgentError::class`]), so that every surface reports a failure the same way:
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

/// What a failure means on every surface: one row of the table above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorClass {
    /// A stable, low-cardinality name of the variant: the `kind` of the local API's errors and of structured logs,
    /// and the `result` label of the sync metrics (see [`crate::metrics::failure_label`]).
    pub kind: &'static str,
    /// The CLI's process exit code.
    pub exit_code: u8,
    /// The local HTTP API's status.
    pub http_status: StatusCode,
    /// The gRPC code, when the failure is reported over gRPC.
    pub grpc_code: tonic::Code,
    /// Whether trying the same operation again later may succeed without anyone changing anything.
    pub retryable: bool,
}

impl AgentError {
    /// Every kind ([`ErrorClass::kind`]), in the order of the variants: the metrics accept these as labels.
    pub const KINDS: [&'static str; 29] = [
        "config",
        "source_file",
        "source_credentials",
        "source_unavailable",
        "report_timeout",
        "source_unexpected",
        "report",
        "invalid_snapshot",
        "aggregator_unavailable",
        "aggregator_timeout",
        "aggregator_credentials",
        "aggregator_permission",
        "snapshot_rejected",
        "stale_snapshot",
        "sync_id_conflict",
        "snapshot_too_large",
        "aggregator_failed",
        "protocol",
        "output",
        "state",
        "state_locked",
        "not_enrolled",
        "sync_disabled",
        "not_connected",
        "shutting_down",
        "enrollment_refused",
        "local_api",
        "local_api_unreachable",
        "internal",
    ];

    /// The one table: kind, exit code, HTTP status, gRPC code and retryable, per variant (see the module docs).
    pub fn class(&self) -> ErrorClass {
        use AgentError::*;
        use tonic::Code;
        const RETRY: bool = true;
        const FINAL: bool = false;
        #[rustfmt::skip]
        let (kind, exit_code, http, grpc_code, retryable) = match self {
            Config(_) =>                     ("config",                  2, 422, Code::InvalidArgument,     FINAL),
            SourceFile { .. } =>             ("source_file",             3, 500, Code::FailedPrecondition,  FINAL),
            SourceCredentials { .. } =>      ("source_credentials",      3, 502, Code::Unauthenticated,     FINAL),
            SourceUnavailable { .. } =>      ("source_unavailable",      3, 502, Code::Unavailable,         RETRY),
            ReportTimeout { .. } =>          ("report_timeout",          3, 504, Code::DeadlineExceeded,    RETRY),
            SourceUnexpected { .. } =>       ("source_unexpected",       3, 502, Code::Internal,            FINAL),
            Report(_) =>                     ("report",                  3, 502, Code::FailedPrecondition,  FINAL),
            InvalidSnapshot(_) =>            ("invalid_snapshot",        3, 422, Code::FailedPrecondition,  FINAL),
            AggregatorUnavailable { .. } =>  ("aggregator_unavailable",  4, 503, Code::Unavailable,         RETRY),
            AggregatorTimeout { .. } =>      ("aggregator_timeout",      4, 504, Code::DeadlineExceeded,    RETRY),
            AggregatorCredentials { .. } =>  ("aggregator_credentials",  5, 502, Code::Unauthenticated,     FINAL),
            AggregatorPermission { .. } =>   ("aggregator_permission",   5, 502, Code::PermissionDenied,    FINAL),
            SnapshotRejected { .. } =>       ("snapshot_rejected",       5, 422, Code::InvalidArgument,     FINAL),
            StaleSnapshot { .. } =>          ("stale_snapshot",          5, 409, Code::FailedPrecondition,  FINAL),
            SyncIdConflict { .. } =>         ("sync_id_conflict",        5, 409, Code::AlreadyExists,       FINAL),
            SnapshotTooLarge { .. } =>       ("snapshot_too_large",      5, 413, Code::ResourceExhausted,   FINAL),
            AggregatorFailed { .. } =>       ("aggregator_failed",       4, 502, Code::Unknown,             RETRY),
            Protocol(_) =>                   ("protocol",                5, 502, Code::Internal,            FINAL),
            Output { .. } =>                 ("output",                  6, 500, Code::Internal,            FINAL),
            State { .. } =>                  ("state",                   6, 500, Code::Internal,            FINAL),
            StateLocked { .. } =>            ("state_locked",            2, 409, Code::FailedPrecondition,  FINAL),
            NotEnrolled =>                   ("not_enrolled",            2, 409, Code::FailedPrecondition,  FINAL),
            SyncDisabled =>                  ("sync_disabled",           2, 409, Code::FailedPrecondition,  FINAL),
            NotConnected { .. } =>           ("not_connected",           2, 409, Code::FailedPrecondition,  FINAL),
            ShuttingDown =>                  ("shutting_down",           1, 503, Code::Unavailable,         FINAL),
            EnrollmentRefused { .. } =>      ("enrollment_refused",      5, 422, Code::InvalidArgument,     FINAL),
            LocalApi { .. } =>               ("local_api",               7, 502, Code::Unknown,             FINAL),
            LocalApiUnreachable { .. } =>    ("local_api_unreachable",   7, 503, Code::Unavailable,         FINAL),
            Internal(_) =>                   ("internal",                1, 500, Code::Internal,            FINAL),
        };
        ErrorClass {
            kind,
            exit_code,
            // Every status in the table is a valid one (the test below checks each row).
            http_status: StatusCode::from_u16(http).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            grpc_code,
            retryable,
        }
    }

    /// The process exit code of the CLI.
    pub fn exit_code(&self) -> u8 {
        self.class().exit_code
    }

    /// The status of the agent's local HTTP API for this failure.
    pub fn http_status(&self) -> StatusCode {
        self.class().http_status
    }

    /// The gRPC code for this failure.
    pub fn grpc_code(&self) -> tonic::Code {
        self.class().grpc_code
    }

    /// Whether trying the same operation again later may succeed without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        self.class().retryable
    }

    /// A stable, low-cardinality name of the variant, for the local API, metrics labels and structured logs.
    pub fn kind(&self) -> &'static str {
        self.class().kind
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
    use std::collections::BTreeSet;

    use super::*;

    /// One value of every variant, in the order of the variants (and of the table in the module docs).
    fn one_of_each() -> Vec<AgentError> {
        let io = || std::io::Error::other("x");
        let text = || String::from("x");
        vec![
            AgentError::Config(ConfigError::Invalid(Vec::new())),
            AgentError::SourceFile {
                path: "x".into(),
                source: io(),
            },
            AgentError::SourceCredentials {
                url: text(),
                status: 401,
            },
            AgentError::SourceUnavailable {
                url: text(),
                attempts: 1,
                reason: text(),
            },
            AgentError::ReportTimeout {
                url: text(),
                deadline_secs: 1,
                polls: 1,
            },
            AgentError::SourceUnexpected {
                url: text(),
                status: 404,
                detail: text(),
            },
            AgentError::Report(ReportError::Empty),
            AgentError::InvalidSnapshot(SnapshotError::EmptyHostname),
            AgentError::AggregatorUnavailable {
                endpoint: text(),
                reason: text(),
            },
            AgentError::AggregatorTimeout {
                endpoint: text(),
                reason: text(),
            },
            AgentError::AggregatorCredentials { message: text() },
            AgentError::AggregatorPermission { message: text() },
            AgentError::SnapshotRejected { message: text() },
            AgentError::StaleSnapshot { message: text() },
            AgentError::SyncIdConflict { message: text() },
            AgentError::SnapshotTooLarge { message: text() },
            AgentError::AggregatorFailed {
                code: tonic::Code::Aborted,
                message: text(),
            },
            AgentError::Protocol(text()),
            AgentError::Output {
                path: "x".into(),
                source: io(),
            },
            AgentError::State {
                action: "x",
                path: "x".into(),
                source: io(),
            },
            AgentError::StateLocked { path: "x".into() },
            AgentError::NotEnrolled,
            AgentError::SyncDisabled,
            AgentError::NotConnected { reason: text() },
            AgentError::ShuttingDown,
            AgentError::EnrollmentRefused {
                reason: "x",
                message: text(),
            },
            AgentError::LocalApi {
                url: text(),
                status: 500,
                message: text(),
            },
            AgentError::LocalApiUnreachable {
                url: text(),
                reason: text(),
            },
            AgentError::Internal(text()),
        ]
    }

    /// The position of a variant. Exhaustive on purpose: a new variant does not compile until it is listed here,
    /// and the test below then wants a value of it in [`one_of_each`].
    fn position(error: &AgentError) -> usize {
        use AgentError::*;
        match error {
            Config(_) => 0,
            SourceFile { .. } => 1,
            SourceCredentials { .. } => 2,
            SourceUnavailable { .. } => 3,
            ReportTimeout { .. } => 4,
            SourceUnexpected { .. } => 5,
            Report(_) => 6,
            InvalidSnapshot(_) => 7,
            AggregatorUnavailable { .. } => 8,
            AggregatorTimeout { .. } => 9,
            AggregatorCredentials { .. } => 10,
            AggregatorPermission { .. } => 11,
            SnapshotRejected { .. } => 12,
            StaleSnapshot { .. } => 13,
            SyncIdConflict { .. } => 14,
            SnapshotTooLarge { .. } => 15,
            AggregatorFailed { .. } => 16,
            Protocol(_) => 17,
            Output { .. } => 18,
            State { .. } => 19,
            StateLocked { .. } => 20,
            NotEnrolled => 21,
            SyncDisabled => 22,
            NotConnected { .. } => 23,
            ShuttingDown => 24,
            EnrollmentRefused { .. } => 25,
            LocalApi { .. } => 26,
            LocalApiUnreachable { .. } => 27,
            Internal(_) => 28,
        }
    }

    #[test]
    fn every_variant_has_its_own_kind_and_the_docs_table_is_the_code() {
        let samples = one_of_each();
        let positions: Vec<usize> = samples.iter().map(position).collect();
        assert_eq!(positions, (0..AgentError::KINDS.len()).collect::<Vec<_>>());

        let kinds: Vec<&str> = samples.iter().map(AgentError::kind).collect();
        assert_eq!(kinds, AgentError::KINDS);
        assert_eq!(
            kinds.iter().collect::<BTreeSet<_>>().len(),
            kinds.len(),
            "two variants share a kind"
        );
        for kind in &kinds {
            assert_eq!(
                crate::metrics::failure_label(kind),
                *kind,
                "not a metrics label"
            );
        }

        // The table in the module docs, row by row: variant, exit, HTTP, gRPC, retryable.
        let documented: Vec<String> = include_str!("error.rs")
            .lines()
            .filter(|line| line.starts_with("//! | `"))
            .map(|line| {
                line.trim_start_matches("//!")
                    .split('|')
                    .map(|cell| cell.trim().trim_matches('`'))
                    .filter(|cell| !cell.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        let coded: Vec<String> = samples
            .iter()
            .map(|error| {
                let class = error.class();
                let debug = format!("{error:?}");
                let variant: String = debug
                    .chars()
                    .take_while(char::is_ascii_alphanumeric)
                    .collect();
                format!(
                    "{variant} {} {} {:?} {}",
                    class.exit_code,
                    class.http_status.as_u16(),
                    class.grpc_code,
                    if class.retryable { "yes" } else { "no" }
                )
            })
            .collect();
        assert_eq!(coded, documented);
    }

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
