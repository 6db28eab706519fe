//! The one-shot operations behind the CLI: `check`, `export` and `sync`. Each returns a serialisable summary, printed
//! by the CLI as one JSON line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use license_sync_core::model::InstanceLicense;
use license_sync_tracing::record_failure;
use serde::Serialize;
use time::OffsetDateTime;
use tracing::Instrument as _;
use tracing::field::Empty;
use uuid::Uuid;

use crate::config::{AgentConfig, Secret, SourceConfig};
use crate::enrollment_client::{Enrollment, resolve_credential};
use crate::error::AgentError;
use crate::export::{Protection, RecipientSource, resolve_protection, write_usage_file};
use crate::snapshot::{
    BuiltSnapshot, SkippedLine, build_snapshot, log_diagnostics, validate_snapshot,
};
use crate::source::{SourceData, read_source};
use crate::state::StateDir;
use crate::upload_client::UploadClient;

/// Reads the source and builds a snapshot that passes the aggregator's validation: the spans `agent.source_fetch`
/// and `agent.snapshot_build`, children of the caller's span. Records the sync id and user count on the caller's
/// span (`agent.sync`), which declares them.
pub async fn prepare_snapshot(config: &AgentConfig) -> Result<BuiltSnapshot, AgentError> {
    let data = fetch_source(config).await?;
    let caller = tracing::Span::current();
    let span = tracing::info_span!(
        "agent.snapshot_build",
        sync_id = Empty,
        users = Empty,
        rows_skipped = Empty
    );
    span.in_scope(|| {
        let built = build_snapshot(&config.instance, data);
        let meta = &built.snapshot.meta;
        for span in [&span, &caller] {
            span.record("sync_id", tracing::field::display(meta.sync_id));
            span.record("users", built.snapshot.users.len() as u64);
        }
        span.record("rows_skipped", meta.source_report.rows_skipped);
        log_diagnostics(&built);
        validate_snapshot(&built.snapshot)
            .inspect_err(|error| record_failure(&span, error.kind()))?;
        Ok(built)
    })
}

/// Reads the source inside the span `agent.source_fetch` (GHES report or file; counts only).
async fn fetch_source(config: &AgentConfig) -> Result<SourceData, AgentError> {
    let span = tracing::info_span!(
        "agent.source_fetch",
        source = match &config.source {
            SourceConfig::File(_) => "file",
            SourceConfig::Ghes(_) => "ghes",
        },
        rows_read = Empty,
        rows_skipped = Empty
    );
    let data = read_source(config).instrument(span.clone()).await;
    match &data {
        Ok(data) => {
            let report = data.report.source_report();
            span.record("rows_read", report.rows_read);
            span.record("rows_skipped", report.rows_skipped);
        }
        Err(error) => record_failure(&span, error.kind()),
    }
    data
}

/// What `check` saw, without sending anything.
#[derive(Debug, Clone, Serialize)]
pub struct CheckSummary {
    pub server_id: Uuid,
    pub hostname: String,
    pub ghes_version: String,
    pub users: u64,
    pub rows_read: u64,
    pub rows_skipped: u64,
    pub skipped: Vec<SkippedLine>,
    pub license: Option<InstanceLicense>,
}

#[tracing::instrument(name = "agent.check", skip_all, fields(server_id = %config.instance.server_id, hostname = %config.instance.hostname, sync_id = Empty, users = Empty))]
pub async fn check(config: &AgentConfig) -> Result<CheckSummary, AgentError> {
    let built = prepare_snapshot(config).await?;
    let skipped = built.skipped_lines();
    let meta = built.snapshot.meta;
    Ok(CheckSummary {
        server_id: meta.instance.server_id,
        hostname: meta.instance.hostname,
        ghes_version: meta.instance.ghes_version,
        users: built.snapshot.users.len() as u64,
        rows_read: meta.source_report.rows_read,
        rows_skipped: meta.source_report.rows_skipped,
        skipped,
        license: meta.license,
    })
}

/// What `export` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportSummary {
    pub path: PathBuf,
    pub sync_id: Uuid,
    pub server_id: Uuid,
    pub hostname: String,
    pub users: u64,
    pub rows_read: u64,
    pub rows_skipped: u64,
    pub skipped: Vec<SkippedLine>,
    /// Whether the file is encrypted (age), and to which public key, from where.
    pub encrypted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipient_source: Option<RecipientSource>,
}

#[tracing::instrument(name = "agent.export", skip_all, fields(server_id = %config.instance.server_id, hostname = %config.instance.hostname, sync_id = Empty, users = Empty))]
pub async fn export(
    config: &AgentConfig,
    output: &Path,
    unencrypted: bool,
) -> Result<ExportSummary, AgentError> {
    // Before the read: a missing key fails at once, not after a long report build on GHES.
    let protection = resolve_protection(config, unencrypted)?;
    let built = prepare_snapshot(config).await?;
    let skipped = built.skipped_lines();
    let meta = built.snapshot.meta.clone();
    let output = output.to_owned();
    let (recipient, recipient_source) = match &protection {
        Protection::Encrypted { recipient, source } => (Some(recipient.to_string()), Some(*source)),
        Protection::Unencrypted => (None, None),
    };
    let exported =
        tokio::task::spawn_blocking(move || write_usage_file(&output, built.snapshot, &protection))
            .await
            .map_err(|error| AgentError::Internal(format!("the export task failed: {error}")))??;
    tracing::info!(path = %exported.path.display(), users = exported.users, bytes = exported.bytes, "wrote the usage file");
    Ok(ExportSummary {
        path: exported.path,
        sync_id: meta.sync_id,
        server_id: meta.instance.server_id,
        hostname: meta.instance.hostname,
        users: exported.users,
        rows_read: meta.source_report.rows_read,
        rows_skipped: meta.source_report.rows_skipped,
        skipped,
        encrypted: recipient.is_some(),
        recipient,
        recipient_source,
    })
}

/// The receipt of a `sync`, as the CLI prints it.
#[derive(Debug, Clone, Serialize)]
pub struct SyncSummary {
    pub sync_id: Uuid,
    pub server_id: Uuid,
    pub hostname: String,
    pub users_sent: u64,
    pub users_accepted: u64,
    pub duplicate: bool,
    #[serde(with = "time::serde::rfc3339::option")]
    pub committed_at: Option<OffsetDateTime>,
    pub rows_read: u64,
    pub rows_skipped: u64,
    pub skipped: Vec<SkippedLine>,
}

/// Reads the source and streams the snapshot to the aggregator. The aggregator is contacted first, so that an
/// unreachable or misconfigured aggregator fails before a possibly long report build on GHES.
///
/// With an `[agent]` section the owner's settings apply (nothing is sent while license sync is disabled) and the
/// enrolled credential is used; without one, the configured credential (the cron-style deployment).
///
/// The whole command is the root span `agent.sync` of the sync's trace (`trigger = "cli"`); the aggregator's spans
/// join it through the trace context sent with the stream.
pub async fn sync(config: &AgentConfig) -> Result<SyncSummary, AgentError> {
    let span = tracing::info_span!(
        "agent.sync",
        trigger = "cli",
        server_id = %config.instance.server_id,
        hostname = %config.instance.hostname,
        sync_id = Empty,
        users = Empty,
        outcome = Empty
    );
    let summary = sync_in_span(config).instrument(span.clone()).await;
    match &summary {
        Ok(summary) => {
            span.record("outcome", outcome(summary.duplicate));
        }
        Err(error) => {
            span.record("outcome", "failed");
            record_failure(&span, error.kind());
        }
    }
    summary
}

/// The `outcome` of an `agent.sync` span that reached the aggregator's receipt.
pub fn outcome(duplicate: bool) -> &'static str {
    if duplicate { "duplicate" } else { "committed" }
}

async fn sync_in_span(config: &AgentConfig) -> Result<SyncSummary, AgentError> {
    let aggregator = config.aggregator()?;
    let state = match &config.agent {
        Some(agent) => {
            let state = StateDir::open(&agent.state_dir)?;
            if !state.load_settings()?.license_sync_enabled {
                return Err(AgentError::SyncDisabled);
            }
            Some(state)
        }
        None => None,
    };
    let credential = resolve_credential(config, state.as_ref())?;
    let mut client = UploadClient::connect_with(aggregator, &credential.secret)
        .instrument(tracing::info_span!("agent.aggregator_connect"))
        .await?;
    let built = prepare_snapshot(config).await?;
    let skipped = built.skipped_lines();
    let snapshot = Arc::new(built.snapshot);
    let receipt = client.upload(snapshot.clone()).await?;
    let meta = &snapshot.meta;
    tracing::info!(
        sync_id = %receipt.sync_id,
        users_accepted = receipt.users_accepted,
        duplicate = receipt.duplicate,
        "the aggregator committed the snapshot"
    );
    Ok(SyncSummary {
        sync_id: receipt.sync_id,
        server_id: meta.instance.server_id,
        hostname: meta.instance.hostname.clone(),
        users_sent: snapshot.users.len() as u64,
        users_accepted: receipt.users_accepted,
        duplicate: receipt.duplicate,
        committed_at: receipt.committed_at,
        rows_read: meta.source_report.rows_read,
        rows_skipped: meta.source_report.rows_skipped,
        skipped,
    })
}

/// Exchanges an enrollment token for the instance credential and stores it in `agent.state_dir`. A running agent
/// on the same state directory picks the new credential up within seconds.
pub async fn enroll(config: &AgentConfig, token: &Secret) -> Result<Enrollment, AgentError> {
    let agent = config.sidecar()?;
    let state = StateDir::open(&agent.state_dir)?;
    crate::enrollment_client::enroll(config, &state, token).await
}
