//! The delivery loop: the one sender of pending snapshots.
//!
//! Oldest first (the aggregator refuses a snapshot older than the one it holds, so order matters), one at a time.
//! A snapshot leaves `pending/` only after the aggregator's receipt (removed) or a refusal that retrying cannot fix
//! (moved to `failed/`, reported once). Everything else is retried with exponential backoff and full jitter, capped
//! at `retry_max_ms`. Nothing is sent while license sync is disabled, and an upload in flight when it is disabled
//! is cancelled (a cut stream changes nothing on the aggregator).

use std::sync::Arc;
use std::time::Duration;

use license_sync_core::snapshot::Snapshot;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::jobs::{JobReceipt, JobState};
use super::{DeliveryState, Sidecar, wait_until};
use crate::enrollment_client::ResolvedCredential;
use crate::error::{AgentError, error_chain};
use crate::retry::Backoff;
use crate::state::{DeliveryResult, ErrorReport, FailedReason, LastResult, PendingEntry};
use crate::upload_client::{UploadClient, UploadReceipt};

/// How often to look for a credential again while there is none (an enrollment from the CLI writes it directly).
const CREDENTIAL_POLL: Duration = Duration::from_secs(2);

enum Attempt {
    Done(Result<UploadReceipt, AgentError>),
    /// License sync was disabled during the upload.
    Cancelled,
    /// The agent is stopping and the grace period ran out.
    Abandoned,
}

pub(super) async fn run(sidecar: Arc<Sidecar>) {
    let config = &sidecar.settings_config;
    let mut backoff = Backoff::full_jitter(config.retry_initial, config.retry_max);
    let mut next_attempt: Option<Instant> = None;
    let mut settings = sidecar.settings.subscribe();
    let mut shutdown = sidecar.shutdown.subscribe();
    let mut credentials = sidecar.credential_generation.subscribe();

    loop {
        if sidecar.shutting_down() {
            return;
        }
        if !sidecar.enabled() {
            set_state(&sidecar, DeliveryState::Paused, None);
            tokio::select! {
                _ = wait_until(&mut settings, |settings| settings.license_sync_enabled) => {}
                _ = wait_until(&mut shutdown, |stopping| *stopping) => return,
            }
            continue;
        }
        // Read before listing: a job is `sending` only once its file is written, so a listing taken after this
        // that lacks the file means the file is gone (removed by hand), and the job would otherwise wait forever.
        let sending = sidecar
            .inner()
            .jobs
            .active()
            .filter(|job| job.state == JobState::Sending)
            .and_then(|job| job.sync_id.map(|sync_id| (job.id, sync_id)));
        let pending = match list_pending(&sidecar).await {
            Ok(pending) => pending,
            Err(error) => {
                tracing::error!(error = %error_chain(&error), "cannot list the pending snapshots; retrying");
                sidecar.inner().delivery.last_error = Some(ErrorReport::from(&error));
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = wait_until(&mut shutdown, |stopping| *stopping) => return,
                }
                continue;
            }
        };
        sidecar.inner().pending = pending.len() as u64;
        if let Some((id, sync_id)) = sending {
            let name_part = sync_id.to_string();
            if !pending.iter().any(|entry| entry.name.contains(&name_part)) {
                tracing::error!(job_id = %id, %sync_id, "the job's pending snapshot disappeared from the state directory");
                sidecar.finish_sync_span(sync_id, "failed", Some("snapshot_missing"));
                sidecar.fail_job(
                    id,
                    ErrorReport::new(
                        "snapshot_missing",
                        "the job's pending snapshot was removed from the state directory before the aggregator \
                         acknowledged it; nothing more is sent for this job (start a new sync)",
                    ),
                    false,
                );
            }
        }
        let Some(entry) = pending.into_iter().next() else {
            set_state(&sidecar, DeliveryState::Idle, None);
            backoff.reset();
            next_attempt = None;
            tokio::select! {
                _ = sidecar.delivery_wake.notified() => {}
                _ = settings.changed() => {}
                _ = wait_until(&mut shutdown, |stopping| *stopping) => return,
            }
            continue;
        };

        if let Some(at) = next_attempt
            && at > Instant::now()
        {
            set_state(&sidecar, DeliveryState::WaitingRetry, None);
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                // A new credential deserves an attempt at once.
                _ = credentials.changed() => next_attempt = None,
                _ = settings.changed() => {}
                _ = wait_until(&mut shutdown, |stopping| *stopping) => return,
            }
            continue;
        }

        let credential = match sidecar.credential() {
            Ok(credential) => credential,
            Err(error) => {
                set_state(&sidecar, DeliveryState::WaitingCredential, None);
                sidecar.inner().delivery.last_error = Some(ErrorReport::from(&error));
                tokio::select! {
                    _ = tokio::time::sleep(CREDENTIAL_POLL) => {}
                    _ = credentials.changed() => {}
                    _ = wait_until(&mut shutdown, |stopping| *stopping) => return,
                }
                continue;
            }
        };

        let snapshot = match read_pending(&sidecar, &entry).await {
            Ok(Ok(snapshot)) => snapshot,
            Ok(Err(reason)) => {
                let error = ErrorReport::new("damaged_snapshot", reason);
                give_up(&sidecar, &entry, None, error, 0).await;
                continue;
            }
            Err(error) => {
                tracing::error!(pending = %entry.name, error = %error_chain(&error), "cannot read a pending snapshot; retrying");
                sidecar.inner().delivery.last_error = Some(ErrorReport::from(&error));
                next_attempt = Some(Instant::now() + backoff.next_delay());
                continue;
            }
        };

        let sync_id = snapshot.meta.sync_id;
        let job_id = sidecar.inner().jobs.id_for_sync(sync_id);
        set_state(&sidecar, DeliveryState::Sending, Some(sync_id));
        if let Some(id) = job_id {
            sidecar.update_job(id, |job| {
                job.attempts += 1;
                job.next_attempt_at = None;
            });
        }
        let generated_at = snapshot.meta.generated_at;
        // Every attempt (its `agent.snapshot_stream` span) is a child of the sync's span: retries show in one trace.
        let sync_span = sidecar.sync_span(sync_id, snapshot.users.len() as u64);
        let attempt = attempt(&sidecar, credential, snapshot)
            .instrument(sync_span)
            .await;

        match attempt {
            Attempt::Abandoned => {
                tracing::warn!(%sync_id, "the upload did not finish within the shutdown grace period; abandoned, the snapshot stays pending and is sent after the restart");
                sidecar.inner().counters.delivery_attempts.interrupted += 1;
                sidecar.finish_sync_span(sync_id, "interrupted", None);
                return;
            }
            Attempt::Cancelled => {
                tracing::info!(%sync_id, "license sync was disabled during the upload: cancelled, the snapshot stays pending");
                let mut inner = sidecar.inner();
                inner.counters.delivery_attempts.interrupted += 1;
                drop(inner);
                // It may stay pending for days: this trace ends here, a later delivery starts its own.
                sidecar.finish_sync_span(sync_id, "interrupted", None);
                if let Some(id) = job_id {
                    sidecar.update_job(id, |job| {
                        job.last_error = Some(ErrorReport::from(&AgentError::SyncDisabled));
                    });
                }
            }
            Attempt::Done(Ok(receipt)) => {
                tracing::info!(
                    %sync_id,
                    users_accepted = receipt.users_accepted,
                    duplicate = receipt.duplicate,
                    "the aggregator committed the snapshot"
                );
                sidecar.metrics.succeeded(sidecar.now());
                sidecar.finish_sync_span(
                    sync_id,
                    crate::commands::outcome(receipt.duplicate),
                    None,
                );
                // Removed first, so that whoever sees the job committed also sees the snapshot gone.
                let removed = remove_pending(&sidecar, &entry).await;
                {
                    let mut inner = sidecar.inner();
                    if receipt.duplicate {
                        inner.counters.delivery_attempts.duplicate += 1;
                    } else {
                        inner.counters.delivery_attempts.committed += 1;
                    }
                    inner.delivery.failed_attempts = 0;
                    inner.delivery.last_error = None;
                    inner.delivery.next_attempt_at = None;
                }
                backoff.reset();
                next_attempt = None;
                if let Err(error) = removed {
                    // It would be sent again, and acknowledged as a duplicate; keep that from looping fast.
                    tracing::error!(pending = %entry.name, error = %error_chain(&error), "cannot remove the delivered snapshot; it will be sent again and acknowledged as a duplicate");
                    next_attempt = Some(Instant::now() + backoff.next_delay());
                }
                if let Some(id) = job_id {
                    sidecar.update_job(id, |job| {
                        job.state = JobState::Committed;
                        job.last_error = None;
                        job.receipt = Some(JobReceipt {
                            users_accepted: receipt.users_accepted,
                            duplicate: receipt.duplicate,
                            committed_at: receipt.committed_at,
                        });
                    });
                }
                let result = LastResult {
                    result: DeliveryResult::Committed,
                    sync_id,
                    job_id,
                    at: sidecar.now(),
                    generated_at: Some(generated_at),
                    users_accepted: Some(receipt.users_accepted),
                    duplicate: Some(receipt.duplicate),
                    error: None,
                };
                record_result(&sidecar, result).await;
            }
            Attempt::Done(Err(error)) if error.is_retryable() => {
                let delay = backoff.next_delay();
                let at = sidecar.now() + delay;
                next_attempt = Some(Instant::now() + delay);
                let report = ErrorReport::from(&error);
                tracing::warn!(
                    %sync_id,
                    kind = error.kind(),
                    error = %report.message,
                    attempts = backoff.attempts(),
                    retry_in_ms = delay.as_millis() as u64,
                    "the snapshot could not be delivered; it stays pending and is retried"
                );
                {
                    let mut inner = sidecar.inner();
                    inner.counters.delivery_attempts.retryable_error += 1;
                    inner.delivery.failed_attempts = backoff.attempts();
                    inner.delivery.next_attempt_at = Some(at);
                    inner.delivery.last_error = Some(report.clone());
                }
                if let Some(id) = job_id {
                    sidecar.update_job(id, |job| {
                        job.last_error = Some(report);
                        job.next_attempt_at = Some(at);
                    });
                }
            }
            Attempt::Done(Err(error)) => {
                if matches!(error, AgentError::AggregatorCredentials { .. }) {
                    sidecar.credential_refused(&error);
                }
                let attempts = job_id
                    .and_then(|id| sidecar.job(id))
                    .map_or(1, |job| job.attempts);
                sidecar.inner().counters.delivery_attempts.refused += 1;
                give_up(
                    &sidecar,
                    &entry,
                    Some((sync_id, generated_at)),
                    ErrorReport::from(&error),
                    attempts,
                )
                .await;
                backoff.reset();
                next_attempt = None;
            }
        }
    }
}

/// One upload, cancelled when license sync is disabled, and bounded by the grace period once the agent stops.
async fn attempt(
    sidecar: &Arc<Sidecar>,
    credential: ResolvedCredential,
    snapshot: Snapshot,
) -> Attempt {
    let aggregator = match sidecar.config.aggregator() {
        Ok(aggregator) => aggregator.clone(),
        Err(error) => return Attempt::Done(Err(error.into())),
    };
    let upload = async move {
        let mut client = UploadClient::connect_with(&aggregator, &credential.secret)
            .instrument(tracing::info_span!("agent.aggregator_connect"))
            .await?;
        client.upload(Arc::new(snapshot)).await
    };
    tokio::pin!(upload);
    let mut settings = sidecar.settings.subscribe();
    let mut shutdown = sidecar.shutdown.subscribe();
    tokio::select! {
        result = &mut upload => Attempt::Done(result),
        _ = wait_until(&mut settings, |settings| !settings.license_sync_enabled) => Attempt::Cancelled,
        _ = wait_until(&mut shutdown, |stopping| *stopping) => {
            let grace = sidecar.settings_config.shutdown_grace;
            tracing::info!(grace_secs = grace.as_secs(), "waiting for the upload in flight to finish");
            match tokio::time::timeout(grace, &mut upload).await {
                Ok(result) => Attempt::Done(result),
                Err(_) => Attempt::Abandoned,
            }
        }
    }
}

/// Moves a snapshot that can never be delivered to `failed/`, fails its job and logs it once.
async fn give_up(
    sidecar: &Arc<Sidecar>,
    entry: &PendingEntry,
    snapshot: Option<(uuid::Uuid, time::OffsetDateTime)>,
    error: ErrorReport,
    attempts: u32,
) {
    let sync_id = snapshot.map(|(sync_id, _)| sync_id);
    tracing::error!(
        pending = %entry.name,
        kind = %error.kind,
        error = %error.message,
        "the snapshot cannot be delivered; it is moved to failed/ and not retried"
    );
    let reason = FailedReason {
        name: entry.name.clone(),
        sync_id,
        failed_at: sidecar.now(),
        attempts,
        error: error.clone(),
    };
    let state = sidecar.state.clone();
    let moved_entry = entry.clone();
    let moved = tokio::task::spawn_blocking(move || state.move_to_failed(&moved_entry, &reason))
        .await
        .map_err(|join| AgentError::Internal(format!("the state task failed: {join}")))
        .and_then(|moved| moved);
    if let Err(move_error) = moved {
        // Without the move the loop would pick the same file again; remove it instead of retrying forever.
        tracing::error!(pending = %entry.name, error = %error_chain(&move_error), "cannot move the refused snapshot to failed/; deleting it");
        let _ = std::fs::remove_file(&entry.path);
    }
    if let Some(sync_id) = sync_id {
        sidecar.finish_sync_span(sync_id, "failed", Some(&error.kind));
    }
    let job_id = sync_id.and_then(|sync_id| sidecar.inner().jobs.id_for_sync(sync_id));
    if let Some(id) = job_id {
        sidecar.fail_job(id, error.clone(), false);
    }
    {
        let mut inner = sidecar.inner();
        inner.delivery.last_error = Some(error.clone());
        inner.delivery.failed_attempts = 0;
        inner.delivery.next_attempt_at = None;
        inner.pending = inner.pending.saturating_sub(1);
    }
    sidecar.refresh_failed();
    if let Some((sync_id, generated_at)) = snapshot {
        let result = LastResult {
            result: DeliveryResult::Failed,
            sync_id,
            job_id,
            at: sidecar.now(),
            generated_at: Some(generated_at),
            users_accepted: None,
            duplicate: None,
            error: Some(error),
        };
        record_result(sidecar, result).await;
    }
}

/// Keeps the last result in memory and, best effort, on disk.
async fn record_result(sidecar: &Arc<Sidecar>, result: LastResult) {
    sidecar.inner().last_result = Some(result.clone());
    let state = sidecar.state.clone();
    let stored = tokio::task::spawn_blocking(move || state.store_last_result(&result)).await;
    match stored {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(error = %error_chain(&error), "cannot save the last result; the status keeps it until a restart")
        }
        Err(error) => tracing::warn!(error = %error, "the state task failed"),
    }
}

fn set_state(sidecar: &Sidecar, state: DeliveryState, sync_id: Option<uuid::Uuid>) {
    let mut inner = sidecar.inner();
    inner.delivery.state = state;
    inner.delivery.sync_id = sync_id;
}

async fn list_pending(sidecar: &Sidecar) -> Result<Vec<PendingEntry>, AgentError> {
    let state = sidecar.state.clone();
    tokio::task::spawn_blocking(move || state.list_pending())
        .await
        .map_err(|error| AgentError::Internal(format!("the state task failed: {error}")))?
}

async fn read_pending(
    sidecar: &Sidecar,
    entry: &PendingEntry,
) -> Result<Result<Snapshot, String>, AgentError> {
    let state = sidecar.state.clone();
    let entry = entry.clone();
    tokio::task::spawn_blocking(move || state.read_pending(&entry))
        .await
        .map_err(|error| AgentError::Internal(format!("the state task failed: {error}")))?
}

async fn remove_pending(sidecar: &Sidecar, entry: &PendingEntry) -> Result<(), AgentError> {
    let state = sidecar.state.clone();
    let entry = entry.clone();
    let removed = tokio::task::spawn_blocking(move || state.remove_pending(&entry))
        .await
        .map_err(|error| AgentError::Internal(format!("the state task failed: {error}")))?;
    if removed.is_ok() {
        let mut inner = sidecar.inner();
        inner.pending = inner.pending.saturating_sub(1);
    }
    removed
}
