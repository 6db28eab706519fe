//! `export`: the usage file for manual upload.

use crate::common::*;
use license_sync_agent::AgentError;
use license_sync_agent::commands;
use license_sync_core::snapshot::UsageFile;

#[tokio::test]
async fn export_writes_a_usage_file_the_aggregator_accepts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = dir.path().join("ghes-1.usage.json");
    let summary = commands::export(&file_config(fixture_csv()), &output)
        .await
        .expect("export");

    assert_eq!(summary.path, output);
    assert_eq!(summary.users, 4);
    assert_eq!(summary.rows_skipped, 1);
    assert_eq!(summary.skipped[0].line, 5);

    let text = std::fs::read_to_string(&output).expect("read back");
    assert!(text.starts_with("{\n"), "pretty JSON expected");
    let file: UsageFile = serde_json::from_str(&text).expect("usage file JSON");
    assert_eq!(file.format, UsageFile::FORMAT);
    let snapshot = file.into_snapshot().expect("count and digest match");
    assert_eq!(snapshot.users.len(), 4);
    assert_eq!(snapshot.meta.sync_id, summary.sync_id);
    assert_eq!(snapshot.meta.instance.server_id, SERVER_ID);
    assert_eq!(snapshot.meta.source_report.rows_skipped, 1);

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&output)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the file holds emails");
    }
    assert!(!dir.path().join("ghes-1.usage.json.tmp").exists());
}

#[tokio::test]
async fn export_replaces_a_previous_file_and_reports_unwritable_paths() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = dir.path().join("usage.json");
    std::fs::write(&output, "old").expect("old file");
    std::fs::write(dir.path().join("usage.json.tmp"), "stale").expect("stale temp");
    let first = commands::export(&file_config(fixture_csv()), &output)
        .await
        .expect("export");
    let file: UsageFile =
        serde_json::from_slice(&std::fs::read(&output).expect("read")).expect("replaced");
    assert_eq!(file.meta.sync_id, first.sync_id);

    let error = commands::export(
        &file_config(fixture_csv()),
        &dir.path().join("missing-dir/usage.json"),
    )
    .await
    .expect_err("no such directory");
    assert!(matches!(error, AgentError::Output { .. }), "{error:?}");
    assert_eq!(error.exit_code(), 6);
}
