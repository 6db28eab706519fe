//! Writing the usage file for manual upload (SPEC §6).
//!
//! The file holds every user's email, so it is created with mode 0600, and it is written atomically (temporary file
//! in the same directory, fsync, rename, fsync of the directory) so that an owner never uploads half a file.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write as _};
use std::path::{Path, PathBuf};

use license_sync_core::snapshot::{Snapshot, UsageFile};

use crate::error::AgentError;

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedFile {
    pub path: PathBuf,
    pub users: u64,
    pub bytes: u64,
}

/// Writes `snapshot` as a pretty-printed [`UsageFile`] at `path`, replacing any previous file atomically.
pub fn write_usage_file(path: &Path, snapshot: Snapshot) -> Result<ExportedFile, AgentError> {
    let output_error = |source| AgentError::Output {
        path: path.to_owned(),
        source,
    };
    let file_name = path.file_name().ok_or_else(|| {
        output_error(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the output path has no file name",
        ))
    })?;
    let mut temp_name = file_name.to_owned();
    temp_name.push(".tmp");
    let temp_path = path.with_file_name(temp_name);
    let usage = UsageFile::from_snapshot(snapshot);
    let users = usage.user_count;

    let result = write_new_file(&temp_path, &usage).and_then(|bytes| {
        std::fs::rename(&temp_path, path)?;
        sync_parent_directory(path)?;
        Ok(bytes)
    });
    match result {
        Ok(bytes) => Ok(ExportedFile {
            path: path.to_owned(),
            users,
            bytes,
        }),
        Err(source) => {
            // Best effort: the temporary file is useless once the export failed.
            let _ = std::fs::remove_file(&temp_path);
            Err(output_error(source))
        }
    }
}

fn write_new_file(path: &Path, usage: &UsageFile) -> std::io::Result<u64> {
    // A stale temporary file may have other permissions; `create_new` below must create ours.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let file = options.open(path)?;
    let mut writer = BufWriter::new(file);
    serde_json::to_writer_pretty(&mut writer, usage).map_err(std::io::Error::other)?;
    writer.write_all(b"\n")?;
    let file = writer.into_inner().map_err(|error| error.into_error())?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
}

/// Makes the rename durable. Directories cannot be opened for fsync on every platform; elsewhere it is skipped.
fn sync_parent_directory(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        std::fs::File::open(parent)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}
