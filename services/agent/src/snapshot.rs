//! Turning what the source produced into a [`Snapshot`] of the instance.

use license_sync_core::all_users_csv::{RowWarning, SkippedRow};
use license_sync_core::model::InstanceIdentity;
use license_sync_core::snapshot::{Snapshot, SnapshotLimits, SnapshotMeta};
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::config::InstanceConfig;
use crate::error::AgentError;
use crate::source::SourceData;

/// A snapshot and what the reader left out of it.
#[derive(Debug)]
pub struct BuiltSnapshot {
    pub snapshot: Snapshot,
    /// Rows that could not be used; they are counted in the snapshot's source report and listed to the operator.
    pub skipped: Vec<SkippedRow>,
    /// Rows that were kept, with a value the reader had to ignore.
    pub warnings: Vec<RowWarning>,
}

/// One skipped row as the CLI prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedLine {
    pub line: u64,
    /// Stable label of the reason (`SkipReason::kind`), for scripts.
    pub kind: &'static str,
    pub reason: String,
}

impl BuiltSnapshot {
    pub fn skipped_lines(&self) -> Vec<SkippedLine> {
        self.skipped
            .iter()
            .map(|row| SkippedLine {
                line: row.line,
                kind: row.reason.kind(),
                reason: row.reason.to_string(),
            })
            .collect()
    }
}

/// Builds the snapshot: a new time-ordered sync id, the configured identity (the version read from GHES when not
/// configured) and the reader's counts.
pub fn build_snapshot(instance: &InstanceConfig, source: SourceData) -> BuiltSnapshot {
    let SourceData {
        report,
        read_at,
        license,
        ghes_version,
    } = source;
    let source_report = report.source_report();
    let ghes_version = instance
        .ghes_version
        .clone()
        .or(ghes_version)
        .unwrap_or_default();
    BuiltSnapshot {
        snapshot: Snapshot {
            meta: SnapshotMeta {
                sync_id: Uuid::now_v7(),
                instance: InstanceIdentity {
                    server_id: instance.server_id,
                    hostname: instance.hostname.trim().to_owned(),
                    ghes_version: ghes_version.trim().to_owned(),
                },
                generated_at: read_at,
                license,
                source_report,
            },
            users: report.users,
        },
        skipped: report.skipped,
        warnings: report.warnings,
    }
}

/// Checks the snapshot as the aggregator will, so that a snapshot it would refuse fails here with the same message
/// instead of after an upload.
pub fn validate_snapshot(snapshot: &Snapshot) -> Result<(), AgentError> {
    snapshot
        .validate(&SnapshotLimits::default(), OffsetDateTime::now_utc())
        .map_err(AgentError::InvalidSnapshot)
}

/// At most this many skipped rows are logged one by one; all of them are in the command's output.
const MAX_LOGGED_ROWS: usize = 100;

/// Logs what the reader left out. The reader's messages never quote an email address (see
/// `license_sync_core::all_users_csv`), so they can be logged as they are.
pub fn log_diagnostics(built: &BuiltSnapshot) {
    for row in built.skipped.iter().take(MAX_LOGGED_ROWS) {
        tracing::warn!(
            line = row.line,
            kind = row.reason.kind(),
            reason = %row.reason,
            "skipped a row of all_users.csv"
        );
    }
    if built.skipped.len() > MAX_LOGGED_ROWS {
        tracing::warn!(
            more = built.skipped.len() - MAX_LOGGED_ROWS,
            "more rows of all_users.csv were skipped; the command's output lists them all"
        );
    }
    for warning in &built.warnings {
        tracing::debug!(
            line = warning.line,
            column = warning.column,
            message = %warning.message,
            "ignored a value of all_users.csv"
        );
    }
    if !built.warnings.is_empty() {
        tracing::warn!(
            warnings = built.warnings.len(),
            "some optional values of all_users.csv could not be read and were left empty (RUST_LOG=debug lists them)"
        );
    }
    let meta = &built.snapshot.meta;
    tracing::info!(
        hostname = %meta.instance.hostname,
        users = built.snapshot.users.len(),
        rows_read = meta.source_report.rows_read,
        rows_skipped = meta.source_report.rows_skipped,
        "read the instance's users"
    );
}
