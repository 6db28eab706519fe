//! The agent's state directory (`agent.state_dir`): what must survive a restart.
//!
//! ```text
//! state_dir/                      (0700)
//!   lock                          held (flock) by the running `license-sync-agent run`: one agent per directory
//!   credential.json               (0600) the enrolled instance credential, its enterprise and server id
//!   settings.json                 (0600) license sync enabled or not, and since when (disabled when missing)
//!   schedule.json                 (0600) the last scheduled slot that ran, so a restart neither repeats nor skips one
//!   last_result.json              (0600) the last delivery's result, shown in the status after a restart
//!   pending/<generated_at>-<sync_id>.json   (0600) snapshots not yet acknowledged (usage-file JSON); names sort
//!                                 by generation time, then by the time-ordered sync id
//!   failed/<same name>.json       snapshots the aggregator refused for good, with <name>.reason.json beside them;
//!                                 the newest [`MAX_FAILED`] are kept
//! ```
//!
//! **Durability (fsync policy).** Every file is written by [`crate::fsutil::write_atomically`]: a temporary file in
//! the same directory (mode 0600), fsynced, renamed over its final name, and the directory is fsynced: after a crash a file is either the old or
//! the new version, never half of one. A pending snapshot is durable before the first byte of it is sent. Removing
//! a pending snapshot after the aggregator's receipt is also followed by a directory fsync; if that removal is lost
//! in a crash, the snapshot is sent again and the aggregator's sync-id idempotency answers `duplicate` without
//! applying it twice.
//!
//! **Disk full.** A write that fails (no space, quota, permissions) removes its temporary file and returns
//! [`AgentError::State`], which says what to do. A job whose snapshot cannot be persisted fails and sends nothing:
//! at-least-once delivery is never silently weakened to at-most-once. Settings that cannot be saved are not
//! changed. Only `last_result.json` is best effort (the in-memory status stays right).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use license_sync_core::snapshot::{Snapshot, UsageFile};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use uuid::Uuid;

use crate::config::Secret;
use crate::error::AgentError;
use crate::fsutil;

/// Failed snapshots kept in `failed/` for inspection; older ones are deleted (they may be large and hold emails).
pub const MAX_FAILED: usize = 20;

const CREDENTIAL_FILE: &str = "credential.json";
const SETTINGS_FILE: &str = "settings.json";
const SCHEDULE_FILE: &str = "schedule.json";
const LAST_RESULT_FILE: &str = "last_result.json";
const LOCK_FILE: &str = "lock";
const PENDING_DIR: &str = "pending";
const FAILED_DIR: &str = "failed";
const REASON_SUFFIX: &str = ".reason.json";

const NAME_TIME: &[BorrowedFormatItem<'static>] =
    format_description!("[year][month][day]T[hour][minute][second]Z");

/// The owner's settings. License sync is disabled until an owner enables it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub license_sync_enabled: bool,
    /// When it was last enabled: the anchor of the schedule.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub enabled_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub updated_at: Option<OffsetDateTime>,
}

/// Which scheduled slot ran last, for the schedule anchored at `anchor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleRecord {
    #[serde(with = "time::serde::rfc3339")]
    pub anchor: OffsetDateTime,
    pub last_slot: u64,
}

/// The enrolled instance credential and what it is bound to.
#[derive(Debug, Clone)]
pub struct EnrolledCredential {
    pub credential: Secret,
    pub enterprise: String,
    pub server_id: Uuid,
    pub enrolled_at: OffsetDateTime,
    /// The enterprise's usage-file public key (`age1…`) the aggregator gave at enrollment; `export` encrypts to it
    /// unless `export.recipient` is set. `None` from aggregators without one (or files written before it existed).
    pub usage_file_recipient: Option<String>,
}

/// `credential.json` on disk. Private: [`Secret`] deliberately has no `Serialize`.
#[derive(Serialize, Deserialize)]
struct CredentialFile {
    credential: String,
    enterprise: String,
    server_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    enrolled_at: OffsetDateTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    usage_file_recipient: Option<String>,
}

/// The outcome of the last delivery attempt that ended (committed, or refused for good).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastResult {
    pub result: DeliveryResult,
    pub sync_id: Uuid,
    #[serde(default)]
    pub job_id: Option<Uuid>,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// When the snapshot was read from the source.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub generated_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub users_accepted: Option<u64>,
    #[serde(default)]
    pub duplicate: Option<bool>,
    #[serde(default)]
    pub error: Option<ErrorReport>,
}

/// How a delivery ended, in `last_result.json` and the status (`committed` or `failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryResult {
    /// The aggregator committed the snapshot (or had already applied it).
    Committed,
    /// The aggregator refused it for good; it moved to `failed/`.
    Failed,
}

/// An error as the status and the job list report it: a stable kind and a message that says what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReport {
    pub kind: String,
    pub message: String,
}

impl ErrorReport {
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorReport {
            kind: kind.into(),
            message: message.into(),
        }
    }
}

impl From<&AgentError> for ErrorReport {
    fn from(error: &AgentError) -> Self {
        ErrorReport {
            kind: error.kind().to_owned(),
            message: crate::error::error_chain(error),
        }
    }
}

/// One snapshot in `pending/` (or `failed/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingEntry {
    /// The file name, `<generated_at>-<sync_id>.json`.
    pub name: String,
    pub path: PathBuf,
}

/// Why a snapshot was moved to `failed/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailedReason {
    pub name: String,
    #[serde(default)]
    pub sync_id: Option<Uuid>,
    #[serde(with = "time::serde::rfc3339")]
    pub failed_at: OffsetDateTime,
    pub attempts: u32,
    pub error: ErrorReport,
}

/// The state directory. Cheap to clone; its methods do blocking I/O (call them from `spawn_blocking` on the async
/// paths that may write large files).
#[derive(Debug, Clone)]
pub struct StateDir {
    root: Arc<PathBuf>,
    lock: Option<Arc<File>>,
}

impl StateDir {
    /// Opens the directory, creating it and its subdirectories (mode 0700) when missing. Does not lock it.
    pub fn open(root: &Path) -> Result<Self, AgentError> {
        for dir in [
            root.to_path_buf(),
            root.join(PENDING_DIR),
            root.join(FAILED_DIR),
        ] {
            create_private_dir(&dir).map_err(|source| AgentError::State {
                action: "create the state directory",
                path: dir.clone(),
                source,
            })?;
        }
        Ok(StateDir {
            root: Arc::new(root.to_path_buf()),
            lock: None,
        })
    }

    /// Takes the directory's lock for this process, so that two agents never deliver from the same `pending/`.
    /// The lock is released when the process ends, however it ends.
    pub fn lock(&mut self) -> Result<(), AgentError> {
        let path = self.root.join(LOCK_FILE);
        let state_error = |source| AgentError::State {
            action: "open the lock file",
            path: path.clone(),
            source,
        };
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        set_private_mode(&mut options);
        let file = options.open(&path).map_err(state_error)?;
        #[cfg(unix)]
        {
            use rustix::fs::{FlockOperation, flock};
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    return Err(AgentError::StateLocked {
                        path: self.root.to_path_buf(),
                    });
                }
                Err(errno) => return Err(state_error(std::io::Error::from(errno))),
            }
        }
        self.lock = Some(Arc::new(file));
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn pending_dir(&self) -> PathBuf {
        self.root.join(PENDING_DIR)
    }

    pub fn failed_dir(&self) -> PathBuf {
        self.root.join(FAILED_DIR)
    }

    pub fn credential_path(&self) -> PathBuf {
        self.root.join(CREDENTIAL_FILE)
    }

    /// Removes temporary files left by writes that a crash interrupted; they were never renamed into place, so
    /// nothing refers to them. Returns how many were removed.
    pub fn remove_temporaries(&self) -> Result<usize, AgentError> {
        let mut removed = 0;
        for dir in [
            self.root.to_path_buf(),
            self.pending_dir(),
            self.failed_dir(),
        ] {
            for name in list_names(&dir, "list the state directory")? {
                if fsutil::is_temporary(&name) {
                    let path = dir.join(&name);
                    std::fs::remove_file(&path).map_err(|source| AgentError::State {
                        action: "remove the interrupted write",
                        path,
                        source,
                    })?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    // --- credential ---

    /// The enrolled credential, if any. A file that cannot be read or parsed is an error (it is never silently
    /// ignored, because the configured credential would then be used instead).
    pub fn load_credential(&self) -> Result<Option<EnrolledCredential>, AgentError> {
        let path = self.credential_path();
        let Some(file) = read_json::<CredentialFile>(&path, "read the enrolled credential")? else {
            return Ok(None);
        };
        warn_if_readable_by_others(&path);
        if file.credential.trim().is_empty() {
            return Err(AgentError::State {
                action: "use the enrolled credential",
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the credential is empty: enroll again",
                ),
            });
        }
        Ok(Some(EnrolledCredential {
            credential: Secret::new(file.credential.trim()),
            enterprise: file.enterprise,
            server_id: file.server_id,
            enrolled_at: file.enrolled_at,
            usage_file_recipient: file.usage_file_recipient,
        }))
    }

    /// Stores the credential (0600, atomically), replacing the previous one.
    pub fn store_credential(&self, credential: &EnrolledCredential) -> Result<(), AgentError> {
        let file = CredentialFile {
            credential: credential.credential.expose_secret().to_owned(),
            enterprise: credential.enterprise.clone(),
            server_id: credential.server_id,
            enrolled_at: credential.enrolled_at,
            usage_file_recipient: credential.usage_file_recipient.clone(),
        };
        write_json(
            &self.credential_path(),
            &file,
            "write the enrolled credential",
        )
    }

    // --- settings, schedule, last result ---

    /// The settings; disabled when the file does not exist yet.
    pub fn load_settings(&self) -> Result<Settings, AgentError> {
        Ok(read_json(&self.root.join(SETTINGS_FILE), "read the settings")?.unwrap_or_default())
    }

    pub fn store_settings(&self, settings: &Settings) -> Result<(), AgentError> {
        write_json(
            &self.root.join(SETTINGS_FILE),
            settings,
            "write the settings",
        )
    }

    pub fn load_schedule(&self) -> Result<Option<ScheduleRecord>, AgentError> {
        read_json(&self.root.join(SCHEDULE_FILE), "read the schedule record")
    }

    pub fn store_schedule(&self, record: &ScheduleRecord) -> Result<(), AgentError> {
        write_json(
            &self.root.join(SCHEDULE_FILE),
            record,
            "write the schedule record",
        )
    }

    pub fn load_last_result(&self) -> Result<Option<LastResult>, AgentError> {
        read_json(&self.root.join(LAST_RESULT_FILE), "read the last result")
    }

    pub fn store_last_result(&self, result: &LastResult) -> Result<(), AgentError> {
        write_json(
            &self.root.join(LAST_RESULT_FILE),
            result,
            "write the last result",
        )
    }

    // --- pending snapshots ---

    /// The file name of a snapshot: sorting names sorts by generation time, then by (time-ordered) sync id.
    pub fn pending_name(snapshot: &Snapshot) -> String {
        let meta = &snapshot.meta;
        let time = meta
            .generated_at
            .to_offset(time::UtcOffset::UTC)
            .format(NAME_TIME)
            .unwrap_or_else(|_| meta.generated_at.unix_timestamp().to_string());
        format!("{time}-{}.json", meta.sync_id)
    }

    /// Writes the snapshot to `pending/` durably (see the module docs) and returns its entry. Nothing may be sent
    /// before this returns `Ok`.
    pub fn write_pending(&self, snapshot: Snapshot) -> Result<PendingEntry, AgentError> {
        let name = Self::pending_name(&snapshot);
        let path = self.pending_dir().join(&name);
        let usage = UsageFile::from_snapshot(snapshot);
        write_atomic(&path, "write the pending snapshot", |writer| {
            serde_json::to_writer(writer, &usage).map_err(std::io::Error::other)
        })?;
        Ok(PendingEntry { name, path })
    }

    /// The pending snapshots, oldest first.
    pub fn list_pending(&self) -> Result<Vec<PendingEntry>, AgentError> {
        self.list_snapshots(&self.pending_dir())
    }

    /// Reads a pending snapshot and checks its count and digest. `Ok(Err(reason))` when the file is damaged: such a
    /// file can never be delivered and belongs in `failed/`.
    pub fn read_pending(
        &self,
        entry: &PendingEntry,
    ) -> Result<Result<Snapshot, String>, AgentError> {
        let bytes = match std::fs::read(&entry.path) {
            Ok(bytes) => bytes,
            Err(source) => {
                return Err(AgentError::State {
                    action: "read the pending snapshot",
                    path: entry.path.clone(),
                    source,
                });
            }
        };
        let usage: UsageFile = match serde_json::from_slice(&bytes) {
            Ok(usage) => usage,
            // Positions only: the file holds emails.
            Err(error) => {
                return Ok(Err(format!(
                    "the pending snapshot file is damaged (not valid usage-file JSON at line {}, column {})",
                    error.line(),
                    error.column()
                )));
            }
        };
        Ok(usage
            .into_snapshot()
            .map_err(|error| format!("the pending snapshot file is damaged: {error}")))
    }

    /// Removes a delivered snapshot (and fsyncs `pending/`).
    pub fn remove_pending(&self, entry: &PendingEntry) -> Result<(), AgentError> {
        match std::fs::remove_file(&entry.path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(AgentError::State {
                    action: "remove the delivered snapshot",
                    path: entry.path.clone(),
                    source,
                });
            }
        }
        fsutil::sync_dir(&self.pending_dir()).map_err(|source| AgentError::State {
            action: "sync the pending directory",
            path: self.pending_dir(),
            source,
        })
    }

    /// Moves a snapshot that can never be delivered to `failed/` with its reason, and keeps only the newest
    /// [`MAX_FAILED`] there.
    pub fn move_to_failed(
        &self,
        entry: &PendingEntry,
        reason: &FailedReason,
    ) -> Result<(), AgentError> {
        let failed_dir = self.failed_dir();
        write_json(
            &failed_dir.join(format!("{}{REASON_SUFFIX}", entry.name)),
            reason,
            "write the failure reason",
        )?;
        let target = failed_dir.join(&entry.name);
        std::fs::rename(&entry.path, &target).map_err(|source| AgentError::State {
            action: "move the refused snapshot to failed/",
            path: entry.path.clone(),
            source,
        })?;
        for dir in [self.pending_dir(), failed_dir.clone()] {
            fsutil::sync_dir(&dir).map_err(|source| AgentError::State {
                action: "sync the state directory",
                path: dir.clone(),
                source,
            })?;
        }
        self.prune_failed()
    }

    /// The failed snapshots' reasons, newest first.
    pub fn list_failed(&self) -> Result<Vec<FailedReason>, AgentError> {
        let mut reasons = Vec::new();
        for entry in self.list_snapshots(&self.failed_dir())?.into_iter().rev() {
            let path = self
                .failed_dir()
                .join(format!("{}{REASON_SUFFIX}", entry.name));
            match read_json::<FailedReason>(&path, "read a failure reason") {
                Ok(Some(reason)) => reasons.push(reason),
                Ok(None) | Err(_) => reasons.push(FailedReason {
                    name: entry.name.clone(),
                    sync_id: None,
                    failed_at: OffsetDateTime::UNIX_EPOCH,
                    attempts: 0,
                    error: ErrorReport::new("unknown", "the failure reason file is missing"),
                }),
            }
        }
        Ok(reasons)
    }

    fn prune_failed(&self) -> Result<(), AgentError> {
        let entries = self.list_snapshots(&self.failed_dir())?;
        let excess = entries.len().saturating_sub(MAX_FAILED);
        for entry in entries.into_iter().take(excess) {
            for path in [
                entry.path.clone(),
                self.failed_dir()
                    .join(format!("{}{REASON_SUFFIX}", entry.name)),
            ] {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(AgentError::State {
                            action: "remove an old failed snapshot",
                            path,
                            source,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Snapshot files of a directory (`*.json`, not temporaries nor reasons), sorted by name: oldest first.
    fn list_snapshots(&self, dir: &Path) -> Result<Vec<PendingEntry>, AgentError> {
        let mut names: Vec<String> = list_names(dir, "list the snapshots")?
            .into_iter()
            .filter(|name| {
                !name.starts_with('.') && name.ends_with(".json") && !name.ends_with(REASON_SUFFIX)
            })
            .collect();
        names.sort();
        Ok(names
            .into_iter()
            .map(|name| PendingEntry {
                path: dir.join(&name),
                name,
            })
            .collect())
    }
}

fn list_names(dir: &Path, action: &'static str) -> Result<Vec<String>, AgentError> {
    let state_error = |source| AgentError::State {
        action,
        path: dir.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(state_error)? {
        let entry = entry.map_err(state_error)?;
        if let Ok(name) = entry.file_name().into_string() {
            names.push(name);
        }
    }
    Ok(names)
}

fn read_json<T: DeserializeOwned>(
    path: &Path,
    action: &'static str,
) -> Result<Option<T>, AgentError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(AgentError::State {
                action,
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|error| AgentError::State {
            action,
            path: path.to_path_buf(),
            // Positions only: some of these files hold secrets.
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "not valid JSON for this file at line {}, column {}: fix or remove the file",
                    error.line(),
                    error.column()
                ),
            ),
        })
}

fn write_json<T: Serialize>(
    path: &Path,
    value: &T,
    action: &'static str,
) -> Result<(), AgentError> {
    write_atomic(path, action, |writer| {
        serde_json::to_writer_pretty(&mut *writer, value).map_err(std::io::Error::other)?;
        writer.write_all(b"\n")
    })
}

/// [`fsutil::write_atomically`] with the state directory's error: what the agent was doing, and at which path.
pub fn write_atomic(
    path: &Path,
    action: &'static str,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), AgentError> {
    fsutil::write_atomically(path, write)
        .map(|_| ())
        .map_err(|source| AgentError::State {
            action,
            path: path.to_path_buf(),
            source,
        })
}

fn set_private_mode(options: &mut OpenOptions) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = options;
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir)
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(metadata) = std::fs::metadata(path)
            && metadata.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", metadata.permissions().mode() & 0o777),
                "the credential file is readable by other users: run `chmod 600` on it"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;
    use license_sync_core::model::{InstanceIdentity, ServerUser, SourceReport, UserRole};
    use license_sync_core::snapshot::SnapshotMeta;

    fn snapshot(generated_at: OffsetDateTime) -> Snapshot {
        Snapshot {
            meta: SnapshotMeta {
                sync_id: Uuid::now_v7(),
                instance: InstanceIdentity {
                    server_id: Uuid::from_u128(7),
                    hostname: "ghes.test".into(),
                    ghes_version: "3.14.2".into(),
                },
                generated_at,
                license: None,
                source_report: SourceReport {
                    rows_read: 1,
                    rows_skipped: 0,
                },
            },
            users: vec![ServerUser {
                id: 1,
                login: "mona".into(),
                email: "mona@example.com".into(),
                role: UserRole::User,
                suspended: false,
                dormant: false,
                created_at: None,
                last_active: None,
                two_factor_enabled: None,
            }],
        }
    }

    #[test]
    fn pending_snapshots_round_trip_and_sort_oldest_first() {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = StateDir::open(dir.path()).expect("open");
        let newer = snapshot(time::macros::datetime!(2025-02-01 00:00 UTC));
        let older = snapshot(time::macros::datetime!(2025-01-01 00:00 UTC));
        let newer_id = newer.meta.sync_id;
        state.write_pending(newer).expect("write newer");
        let entry = state.write_pending(older.clone()).expect("write older");
        assert!(
            entry.name.starts_with("20250101T000000Z-"),
            "{}",
            entry.name
        );
        let pending = state.list_pending().expect("list");
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[0], entry);
        let read = state
            .read_pending(&pending[0])
            .expect("read")
            .expect("intact");
        assert_eq!(read.meta, older.meta);
        assert_eq!(read.users, older.users);
        assert!(pending[1].name.contains(&newer_id.to_string()));

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&entry.path)
                .expect("metadata")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        state.remove_pending(&pending[0]).expect("remove");
        assert_eq!(state.list_pending().expect("list").len(), 1);
    }

    #[test]
    fn a_damaged_pending_file_is_reported_without_its_content() {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = StateDir::open(dir.path()).expect("open");
        let entry = state
            .write_pending(snapshot(OffsetDateTime::now_utc()))
            .expect("write");
        let text = std::fs::read_to_string(&entry.path).expect("read");
        std::fs::write(
            &entry.path,
            text.replace("mona@example.com", "eve@example.com"),
        )
        .expect("tamper");
        let reason = state
            .read_pending(&entry)
            .expect("readable")
            .expect_err("digest mismatch");
        assert!(reason.contains("damaged"), "{reason}");
        std::fs::write(&entry.path, &text[..text.len() / 2]).expect("truncate");
        let reason = state
            .read_pending(&entry)
            .expect("readable")
            .expect_err("truncated");
        assert!(!reason.contains('@'), "{reason}");
    }

    #[test]
    fn refused_snapshots_move_to_failed_and_only_the_newest_are_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = StateDir::open(dir.path()).expect("open");
        let start = time::macros::datetime!(2025-01-01 00:00 UTC);
        for day in 0..(MAX_FAILED as i64 + 3) {
            let entry = state
                .write_pending(snapshot(start + time::Duration::days(day)))
                .expect("write");
            let reason = FailedReason {
                name: entry.name.clone(),
                sync_id: None,
                failed_at: start,
                attempts: 1,
                error: ErrorReport::new("stale_snapshot", "older"),
            };
            state.move_to_failed(&entry, &reason).expect("move");
        }
        assert!(state.list_pending().expect("list").is_empty());
        let failed = state.list_failed().expect("failed");
        assert_eq!(failed.len(), MAX_FAILED);
        // Newest first; the three oldest were pruned.
        assert!(failed[0].name.starts_with("20250123"), "{}", failed[0].name);
        assert!(
            failed[MAX_FAILED - 1].name.starts_with("20250104"),
            "{}",
            failed[MAX_FAILED - 1].name
        );
    }

    #[test]
    fn settings_default_to_disabled_and_persist() {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = StateDir::open(dir.path()).expect("open");
        assert!(!state.load_settings().expect("load").license_sync_enabled);
        let settings = Settings {
            license_sync_enabled: true,
            enabled_at: Some(time::macros::datetime!(2025-01-01 12:00 UTC)),
            updated_at: None,
        };
        state.store_settings(&settings).expect("store");
        let reopened = StateDir::open(dir.path()).expect("reopen");
        assert_eq!(reopened.load_settings().expect("load"), settings);
    }

    #[test]
    fn the_credential_is_private_and_never_in_debug() {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = StateDir::open(dir.path()).expect("open");
        assert!(state.load_credential().expect("load").is_none());
        let credential = EnrolledCredential {
            credential: Secret::new("lsi_top_secret"),
            enterprise: "acme".into(),
            server_id: Uuid::from_u128(7),
            enrolled_at: OffsetDateTime::UNIX_EPOCH,
            usage_file_recipient: Some("age1example".into()),
        };
        state.store_credential(&credential).expect("store");
        let loaded = state.load_credential().expect("load").expect("present");
        assert_eq!(loaded.credential.expose_secret(), "lsi_top_secret");
        assert!(!format!("{loaded:?}").contains("top_secret"));
        assert_eq!(loaded.usage_file_recipient.as_deref(), Some("age1example"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(state.credential_path())
                .expect("metadata")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut first = StateDir::open(dir.path()).expect("open");
        first.lock().expect("first lock");
        let mut second = StateDir::open(dir.path()).expect("open again");
        let error = second.lock().expect_err("locked");
        assert!(matches!(error, AgentError::StateLocked { .. }), "{error}");
        drop(first);
        second.lock().expect("free after the first is gone");
    }

    #[test]
    fn interrupted_writes_are_cleaned_up() {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = StateDir::open(dir.path()).expect("open");
        std::fs::write(state.pending_dir().join(".x.json.tmp"), "half").expect("write");
        assert_eq!(state.remove_temporaries().expect("clean"), 1);
        assert!(state.list_pending().expect("list").is_empty());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_full_disk_fails_the_write_and_leaves_nothing_behind() {
        // /dev/full answers every write with ENOSPC; a symlink to it stands in for a full state directory.
        if !Path::new("/dev/full").exists() {
            return;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let mut called = false;
        let target = dir.path().join("x.json");
        let error = write_atomic(&target, "write the pending snapshot", |writer| {
            called = true;
            let mut full = OpenOptions::new().write(true).open("/dev/full")?;
            full.write_all(b"data")?;
            full.flush()?;
            writer.write_all(b"never")
        })
        .expect_err("no space");
        assert!(called);
        assert!(matches!(error, AgentError::State { .. }));
        assert!(error.to_string().contains("free space"), "{error}");
        assert!(!target.exists());
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0);
    }
}
