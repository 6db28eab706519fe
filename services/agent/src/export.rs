//! Writing the usage file for manual upload (SPEC §6).
//!
//! The file holds every user's email, so it is created with mode 0600, and it is written atomically
//! ([`crate::fsutil::write_atomically`]) so that an owner never uploads half a file.

use std::path::{Path, PathBuf};

use license_sync_core::snapshot::{Snapshot, UsageFile};

use crate::error::AgentError;
use crate::fsutil;

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedFile {
    pub path: PathBuf,
    pub users: u64,
    pub bytes: u64,
}

/// Writes `snapshot` as a pretty-printed [`UsageFile`] at `path`, replacing any previous file atomically.
pub fn write_usage_file(path: &Path, snapshot: Snapshot) -> Result<ExportedFile, AgentError> {
    let usage = UsageFile::from_snapshot(snapshot);
    let users = usage.user_count;
    let bytes = fsutil::write_atomically(path, |writer| {
        serde_json::to_writer_pretty(&mut *writer, &usage).map_err(std::io::Error::other)?;
        writer.write_all(b"\n")
    })
    .map_err(|source| AgentError::Output {
        path: path.to_owned(),
        source,
    })?;
    Ok(ExportedFile {
        path: path.to_owned(),
        users,
        bytes,
    })
}
