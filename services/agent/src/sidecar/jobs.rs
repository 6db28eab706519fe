//! Sync jobs: one read of the source, its snapshot and the delivery of that snapshot.
//!
//! At most one job is active (queued, reading or sending) at a time: a request while one is active joins it
//! instead of starting another, whether it comes from the local API, the schedule or the aggregator. The last
//! [`MAX_JOBS`] jobs are kept in memory for `GET /api/v1/jobs`.

use std::collections::VecDeque;

use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::watch;
use uuid::Uuid;

use crate::state::ErrorReport;

pub use crate::trigger::TriggerKind;

/// Jobs kept in memory (the active one is never evicted).
pub const MAX_JOBS: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Accepted, not started yet.
    Queued,
    /// Reading the source (GHES report or file) and building the snapshot.
    Reading,
    /// The snapshot is durable in `pending/` and being delivered (with retries) until the aggregator's receipt.
    Sending,
    /// The aggregator committed the snapshot (or had already applied it: `receipt.duplicate`).
    Committed,
    /// Nothing more will happen; `error` says why.
    Failed,
}

impl JobState {
    pub fn is_active(self) -> bool {
        matches!(
            self,
            JobState::Queued | JobState::Reading | JobState::Sending
        )
    }
}

/// Who asked for the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// `POST /api/v1/sync-now` (or the CLI's `sync-now`).
    Local,
    /// The weekly (configurable) schedule; the slot number of the schedule.
    Schedule { slot: u64 },
    /// A "Sync now" from the aggregator over the control stream.
    Cloud { request_id: String },
}

impl Trigger {
    pub fn kind(&self) -> TriggerKind {
        match self {
            Trigger::Local => TriggerKind::Local,
            Trigger::Schedule { .. } => TriggerKind::Schedule,
            Trigger::Cloud { .. } => TriggerKind::Cloud,
        }
    }
}

/// What the aggregator acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobReceipt {
    pub users_accepted: u64,
    pub duplicate: bool,
    #[serde(with = "time::serde::rfc3339::option")]
    pub committed_at: Option<OffsetDateTime>,
}

/// One job, as the local API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: Uuid,
    pub state: JobState,
    /// Who started it.
    pub trigger: TriggerKind,
    /// The schedule slot, for scheduled jobs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<u64>,
    /// The aggregator's request ids that started or joined this job.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cloud_request_ids: Vec<String>,
    /// Requests that joined this job instead of starting another.
    pub joined: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    pub sync_id: Option<Uuid>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub generated_at: Option<OffsetDateTime>,
    pub users: Option<u64>,
    pub rows_skipped: Option<u64>,
    /// Delivery attempts of this job's snapshot.
    pub attempts: u32,
    /// While sending: when the next attempt is due after a failed one.
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    /// While sending: why the last attempt failed (it is retried).
    pub last_error: Option<ErrorReport>,
    /// When failed: why.
    pub error: Option<ErrorReport>,
    /// Whether running the job again later may succeed (a failure of the source that may pass).
    #[serde(skip)]
    pub retryable: bool,
    pub receipt: Option<JobReceipt>,
}

/// A job handed to a requester.
#[derive(Debug, Clone)]
pub struct JobTicket {
    pub job: Job,
    /// True when the request joined the active job.
    pub joined: bool,
    /// Follows the job's updates.
    pub updates: watch::Receiver<Job>,
}

#[derive(Debug, Default)]
pub struct JobRegistry {
    /// Oldest first.
    jobs: VecDeque<Job>,
    /// Senders of the active job's updates.
    watchers: Vec<(Uuid, watch::Sender<Job>)>,
}

impl JobRegistry {
    /// The active job, if any.
    pub fn active(&self) -> Option<&Job> {
        self.jobs.iter().rev().find(|job| job.state.is_active())
    }

    /// Joins the active job, or creates a queued one. Returns the ticket and whether a new job must be run.
    pub fn start_or_join(&mut self, trigger: Trigger, now: OffsetDateTime) -> (JobTicket, bool) {
        if let Some(job) = self.jobs.iter_mut().rev().find(|job| job.state.is_active()) {
            job.joined += 1;
            job.updated_at = now;
            if let Trigger::Cloud { request_id } = trigger {
                job.cloud_request_ids.push(request_id);
            }
            let job = job.clone();
            let updates = self.subscribe(&job);
            return (
                JobTicket {
                    job,
                    joined: true,
                    updates,
                },
                false,
            );
        }
        let job = Job {
            id: Uuid::now_v7(),
            state: JobState::Queued,
            trigger: trigger.kind(),
            slot: match trigger {
                Trigger::Schedule { slot } => Some(slot),
                _ => None,
            },
            cloud_request_ids: match trigger {
                Trigger::Cloud { request_id } => vec![request_id],
                _ => Vec::new(),
            },
            joined: 0,
            created_at: now,
            updated_at: now,
            finished_at: None,
            sync_id: None,
            generated_at: None,
            users: None,
            rows_skipped: None,
            attempts: 0,
            next_attempt_at: None,
            last_error: None,
            error: None,
            retryable: false,
            receipt: None,
        };
        self.jobs.push_back(job.clone());
        self.evict();
        let updates = self.subscribe(&job);
        (
            JobTicket {
                job,
                joined: false,
                updates,
            },
            true,
        )
    }

    fn subscribe(&mut self, job: &Job) -> watch::Receiver<Job> {
        if let Some((_, sender)) = self.watchers.iter().find(|(id, _)| *id == job.id) {
            return sender.subscribe();
        }
        let (sender, receiver) = watch::channel(job.clone());
        self.watchers.push((job.id, sender));
        receiver
    }

    /// Applies `change` to job `id` (if still kept) and tells its watchers; returns the updated job.
    pub fn update(
        &mut self,
        id: Uuid,
        now: OffsetDateTime,
        change: impl FnOnce(&mut Job),
    ) -> Option<Job> {
        let job = self.jobs.iter_mut().find(|job| job.id == id)?;
        change(job);
        job.updated_at = now;
        if !job.state.is_active() && job.finished_at.is_none() {
            job.finished_at = Some(now);
        }
        let job = job.clone();
        if let Some(index) = self.watchers.iter().position(|(watched, _)| *watched == id) {
            self.watchers[index].1.send_replace(job.clone());
            if !job.state.is_active() {
                self.watchers.swap_remove(index);
            }
        }
        Some(job)
    }

    /// The id of the active job that carries `sync_id`, if any.
    pub fn id_for_sync(&self, sync_id: Uuid) -> Option<Uuid> {
        self.jobs
            .iter()
            .rev()
            .find(|job| job.sync_id == Some(sync_id))
            .map(|job| job.id)
    }

    pub fn get(&self, id: Uuid) -> Option<&Job> {
        self.jobs.iter().find(|job| job.id == id)
    }

    /// Newest first.
    pub fn list(&self) -> Vec<Job> {
        self.jobs.iter().rev().cloned().collect()
    }

    fn evict(&mut self) {
        while self.jobs.len() > MAX_JOBS {
            match self.jobs.iter().position(|job| !job.state.is_active()) {
                Some(index) => {
                    self.jobs.remove(index);
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers_show_as_their_words() {
        for kind in TriggerKind::ALL {
            assert_eq!(serde_json::to_value(kind).expect("JSON"), kind.as_str());
        }
        assert_eq!(TriggerKind::Local.metric_label(), "sync_now");
    }

    #[test]
    fn requests_while_a_job_is_active_join_it() {
        let mut registry = JobRegistry::default();
        let now = OffsetDateTime::UNIX_EPOCH;
        let (first, run) = registry.start_or_join(Trigger::Local, now);
        assert!(run && !first.joined);
        let (second, run) = registry.start_or_join(
            Trigger::Cloud {
                request_id: "r1".into(),
            },
            now,
        );
        assert!(!run && second.joined);
        assert_eq!(second.job.id, first.job.id);
        assert_eq!(second.job.cloud_request_ids, ["r1"]);
        registry.update(first.job.id, now, |job| job.state = JobState::Sending);
        let (third, run) = registry.start_or_join(Trigger::Schedule { slot: 3 }, now);
        assert!(!run);
        assert_eq!(third.job.id, first.job.id);
        assert_eq!(third.job.joined, 2);

        let finished = registry
            .update(first.job.id, now, |job| job.state = JobState::Committed)
            .expect("kept");
        assert_eq!(finished.finished_at, Some(now));
        assert_eq!(third.updates.borrow().state, JobState::Committed);
        let (fourth, run) = registry.start_or_join(Trigger::Schedule { slot: 4 }, now);
        assert!(run);
        assert_ne!(fourth.job.id, first.job.id);
        assert_eq!(fourth.job.slot, Some(4));
    }

    #[test]
    fn only_the_last_jobs_are_kept_and_never_the_active_one() {
        let mut registry = JobRegistry::default();
        let now = OffsetDateTime::UNIX_EPOCH;
        let (oldest, _) = registry.start_or_join(Trigger::Local, now);
        // Make the oldest stay active while the others come and go: impossible through start_or_join (they would
        // join it), so mark it active again after creating the others.
        registry.update(oldest.job.id, now, |job| job.state = JobState::Failed);
        for _ in 0..(MAX_JOBS + 10) {
            let (ticket, _) = registry.start_or_join(Trigger::Local, now);
            registry.update(ticket.job.id, now, |job| job.state = JobState::Committed);
        }
        assert_eq!(registry.list().len(), MAX_JOBS);
        assert!(registry.get(oldest.job.id).is_none());
        let (active, _) = registry.start_or_join(Trigger::Local, now);
        assert_eq!(registry.list().len(), MAX_JOBS);
        assert_eq!(registry.active().map(|job| job.id), Some(active.job.id));
        assert_eq!(registry.list()[0].id, active.job.id, "newest first");
    }
}
