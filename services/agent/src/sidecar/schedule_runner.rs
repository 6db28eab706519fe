//! The scheduler: one job per slot of the schedule (see [`crate::schedule`]) while license sync is enabled.
//!
//! A slot counts as done once its job has made its snapshot durable (from then on delivery retries it) or failed in
//! a way that retrying cannot fix. A job that failed to read the source for a passing reason (GHES unreachable, the
//! report not ready in time) is run again with backoff, at the latest until the next slot starts. The last slot
//! done is saved in `schedule.json`, so that a restart neither repeats nor skips a slot.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use super::jobs::{JobState, Trigger};
use super::{NextSync, Sidecar, wait_until};
use crate::error::{AgentError, error_chain};
use crate::retry::Backoff;
use crate::schedule::{Schedule, wait_for};
use crate::state::ScheduleRecord;

/// The scheduler reads the clock again at least this often (wall-clock changes, host sleep).
const MAX_SLEEP: Duration = Duration::from_secs(30);

pub(super) async fn run(sidecar: Arc<Sidecar>) {
    let mut settings = sidecar.settings.subscribe();
    let mut shutdown = sidecar.shutdown.subscribe();
    let config = &sidecar.settings_config;
    let mut record = match sidecar.state.load_schedule() {
        Ok(record) => record,
        Err(error) => {
            tracing::warn!(error = %error_chain(&error), "cannot read the schedule record; the current slot runs if it is due");
            None
        }
    };
    // A retry of a slot whose job failed for a passing reason: (slot, when, backoff).
    let mut retry: Option<(u64, OffsetDateTime, Backoff)> = None;

    loop {
        if sidecar.shutting_down() {
            return;
        }
        let current = sidecar.settings();
        let anchor = match (current.license_sync_enabled, current.enabled_at) {
            (true, Some(anchor)) => anchor,
            _ => {
                sidecar.inner().next_sync = None;
                retry = None;
                tokio::select! {
                    _ = settings.changed() => {}
                    _ = wait_until(&mut shutdown, |stopping| *stopping) => return,
                }
                continue;
            }
        };
        let schedule = Schedule::new(
            anchor,
            config.sync_interval,
            config.sync_jitter,
            sidecar.config.instance.server_id,
        );
        let last_slot = record
            .filter(|record| record.anchor == anchor)
            .map(|record| record.last_slot);
        let now = sidecar.now();
        let planned = schedule.next(now, last_slot);
        let due = match &retry {
            Some((slot, at, _)) if *slot == planned.slot => *at,
            _ => {
                retry = None;
                planned.due
            }
        };
        sidecar.inner().next_sync = Some(NextSync {
            slot: planned.slot,
            at: due,
        });
        let wait = wait_for(now, due, MAX_SLEEP);
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = settings.changed() => {}
                _ = wait_until(&mut shutdown, |stopping| *stopping) => return,
            }
            continue;
        }

        let done = run_slot(&sidecar, planned.slot).await;
        match done {
            SlotOutcome::Done => {
                retry = None;
                let done = ScheduleRecord {
                    anchor,
                    last_slot: planned.slot,
                };
                record = Some(done);
                let state = sidecar.state.clone();
                let saved = tokio::task::spawn_blocking(move || state.store_schedule(&done)).await;
                if !matches!(saved, Ok(Ok(()))) {
                    tracing::warn!(
                        "cannot save the schedule record; after a restart this slot may run again"
                    );
                }
            }
            SlotOutcome::Retry => {
                let mut backoff = retry.take().map_or_else(
                    || Backoff::full_jitter(config.retry_initial, config.retry_max),
                    |(_, _, backoff)| backoff,
                );
                let at = sidecar.now() + backoff.next_delay();
                if at >= schedule.slot_start(planned.slot + 1) {
                    tracing::warn!(
                        slot = planned.slot,
                        "the scheduled sync kept failing until the next slot; giving up on this one"
                    );
                    record = Some(ScheduleRecord {
                        anchor,
                        last_slot: planned.slot,
                    });
                } else {
                    tracing::info!(slot = planned.slot, %at, "the scheduled sync will be tried again");
                    retry = Some((planned.slot, at, backoff));
                }
            }
            SlotOutcome::Stopped => return,
        }
    }
}

enum SlotOutcome {
    Done,
    Retry,
    Stopped,
}

/// Starts (or joins) the slot's job and waits until its snapshot is durable or it failed.
async fn run_slot(sidecar: &Arc<Sidecar>, slot: u64) -> SlotOutcome {
    let ticket = match sidecar.start_or_join(Trigger::Schedule { slot }) {
        Ok(ticket) => ticket,
        // Disabled in the meantime: the loop sees it.
        Err(AgentError::SyncDisabled) => return SlotOutcome::Retry,
        Err(AgentError::ShuttingDown) => return SlotOutcome::Stopped,
        Err(error) => {
            tracing::error!(slot, error = %error_chain(&error), "cannot start the scheduled sync");
            return SlotOutcome::Done;
        }
    };
    let mut updates = ticket.updates;
    let mut shutdown = sidecar.shutdown.subscribe();
    let job = tokio::select! {
        job = updates.wait_for(|job| !matches!(job.state, JobState::Queued | JobState::Reading)) => {
            job.map(|job| job.clone()).ok()
        }
        _ = wait_until(&mut shutdown, |stopping| *stopping) => return SlotOutcome::Stopped,
    };
    match job {
        Some(job) if job.state == JobState::Failed && job.retryable => SlotOutcome::Retry,
        Some(_) => SlotOutcome::Done,
        // The job is gone from the registry (cannot happen while active); do not loop on it.
        None => SlotOutcome::Done,
    }
}
