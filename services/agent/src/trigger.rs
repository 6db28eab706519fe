//! Who started a sync job, without the details: shared by the sidecar's jobs (what the job list shows) and the
//! metrics (the `trigger` label), so that neither imports the other.

use serde::Serialize;

/// Who started a job, without the details: what the job list shows (`trigger`) and what labels its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "&'static str")]
pub enum TriggerKind {
    Local,
    Schedule,
    Cloud,
}

impl TriggerKind {
    pub const ALL: [TriggerKind; 3] = [
        TriggerKind::Local,
        TriggerKind::Schedule,
        TriggerKind::Cloud,
    ];

    /// The word the job list shows: `local`, `schedule` or `cloud`.
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerKind::Local => "local",
            TriggerKind::Schedule => "schedule",
            TriggerKind::Cloud => "cloud",
        }
    }

    /// The `trigger` label of the metrics: the local Sync now (CLI `sync-now`) is `sync_now`.
    pub fn metric_label(self) -> &'static str {
        match self {
            TriggerKind::Local => "sync_now",
            TriggerKind::Schedule => "schedule",
            TriggerKind::Cloud => "cloud",
        }
    }
}

impl From<TriggerKind> for &'static str {
    fn from(kind: TriggerKind) -> Self {
        kind.as_str()
    }
}
