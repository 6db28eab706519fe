//! The one atomic file writer of the workspace: the agent's state directory and usage-file export, and the
//! aggregator's `report` command.
//!
//! A temporary file in the same directory (mode 0600: every file written through it holds a credential or emails)
//! is filled, fsynced, renamed over the final name (`tempfile`'s `persist`), and the directory is fsynced: after a
//! crash the file is either the old or the new version, never half of one. A write that fails removes its temporary
//! file and leaves the previous file untouched.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Temporary files are `.<final name>.<random>.tmp`: hidden, and recognisable after a crash ([`is_temporary`]).
const TEMP_PREFIX: &str = ".";
const TEMP_SUFFIX: &str = ".tmp";

/// Writes `path` atomically and durably with what `write` produces; returns the file's size.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<u64> {
    let file_name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the path has no file name",
        )
    })?;
    let dir = parent_dir(path);
    let mut prefix = OsString::from(TEMP_PREFIX);
    prefix.push(file_name);
    prefix.push(".");
    // Created with mode 0600 on Unix; removed when dropped, so every early return below cleans up.
    let mut temp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(TEMP_SUFFIX)
        .tempfile_in(&dir)?;
    {
        let mut writer = BufWriter::new(temp.as_file_mut());
        write(&mut writer)?;
        writer.flush()?;
    }
    temp.as_file().sync_all()?;
    let bytes = temp.as_file().metadata()?.len();
    temp.persist(path).map_err(|error| error.error)?;
    sync_dir(&dir)?;
    Ok(bytes)
}

/// Whether `name` is a temporary file of [`write_atomically`] (left behind only by a crash).
pub fn is_temporary(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX)
}

/// Makes renames and removals in `dir` durable. Directories cannot be opened for fsync on every platform;
/// elsewhere it is skipped.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_file_privately_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("x.json");
        std::fs::write(&path, "old").expect("old file");
        let bytes = write_atomically(&path, |writer| writer.write_all(b"new")).expect("write");
        assert_eq!(bytes, 3);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let metadata = std::fs::metadata(&path).expect("metadata");
            assert_eq!(metadata.permissions().mode() & 0o777, 0o600, "private");
        }
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_removes_the_temporary() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("x.json");
        std::fs::write(&path, "old").expect("old file");
        let error = write_atomically(&path, |writer| {
            writer.write_all(b"half")?;
            Err(std::io::Error::other("broken"))
        })
        .expect_err("fails");
        assert_eq!(error.to_string(), "broken");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "old");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(Result::ok)
            .map(|entry| entry.file_name())
            .collect();
        assert_eq!(names, ["x.json"]);
        assert!(is_temporary(".x.json.a1b2c3.tmp"));
        assert!(!is_temporary("x.json"));
    }
}
