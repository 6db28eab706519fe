//! `export`: the usage file for manual upload.

use crate::common::*;
use license_sync_agent::AgentError;
use license_sync_agent::commands;
use license_sync_core::snapshot::UsageFile;

#[tokio::test]
async fn an_unencrypted_export_writes_a_plain_usage_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = dir.path().join("ghes-1.usage.json");
    let summary = commands::export(&file_config(fixture_csv()), &output, true)
        .await
        .expect("export");

    assert_eq!(summary.path, output);
    assert!(!summary.encrypted);
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
    let first = commands::export(&file_config(fixture_csv()), &output, true)
        .await
        .expect("export");
    let file: UsageFile =
        serde_json::from_slice(&std::fs::read(&output).expect("read")).expect("replaced");
    assert_eq!(file.meta.sync_id, first.sync_id);

    let error = commands::export(
        &file_config(fixture_csv()),
        &dir.path().join("missing-dir/usage.json"),
        true,
    )
    .await
    .expect_err("no such directory");
    assert!(matches!(error, AgentError::Output { .. }), "{error:?}");
    assert_eq!(error.exit_code(), 6);
}

/// The users' logins and emails of the fixture report, as the CSV spells them.
const FIXTURE_SECRETS: [&str; 10] = [
    "mona",
    "hubot",
    "octocat",
    "ghost",
    "mona@example.com",
    "hubot@example.com",
    "Octo.Cat@Example.com",
    "octo.cat@example.com",
    "ghost@example.com",
    "example.com",
];

fn config_with_recipient(recipient: &str) -> license_sync_agent::config::AgentConfig {
    let mut config = file_config(fixture_csv());
    config.export = Some(license_sync_agent::config::ExportConfig {
        recipient: Some(recipient.to_owned()),
    });
    config
}

#[tokio::test]
async fn an_export_is_encrypted_to_the_configured_key_and_holds_no_login_or_email() {
    let key = age::x25519::Identity::generate();
    let dir = tempfile::tempdir().expect("temp dir");
    let output = dir.path().join("ghes-1.usage.json.age");
    let summary = commands::export(
        &config_with_recipient(&key.to_public().to_string()),
        &output,
        false,
    )
    .await
    .expect("export");
    assert!(summary.encrypted);
    assert_eq!(summary.recipient, Some(key.to_public().to_string()));

    let bytes = std::fs::read(&output).expect("read back");
    assert!(
        bytes.starts_with(b"age-encryption.org/v1\n"),
        "age binary format"
    );
    for needle in FIXTURE_SECRETS {
        assert!(
            !bytes
                .windows(needle.len())
                .any(|window| window.eq_ignore_ascii_case(needle.as_bytes())),
            "{needle:?} is readable in the exported file"
        );
    }
    let file = license_sync_core::encrypted_usage_file::read_encrypted(&bytes, &[key])
        .expect("decrypts with the enterprise's key");
    let snapshot = file.into_snapshot().expect("count and digest match");
    assert_eq!(snapshot.meta.sync_id, summary.sync_id);
    assert_eq!(snapshot.users.len(), 4);
    assert!(snapshot.users.iter().any(|user| user.login == "mona"));
}

#[tokio::test]
async fn an_export_without_a_key_is_refused_before_writing_anything() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = dir.path().join("usage.json.age");
    let error = commands::export(&file_config(fixture_csv()), &output, false)
        .await
        .expect_err("no key to encrypt to");
    let message = error.to_string();
    assert!(message.contains("export.recipient"), "{message}");
    assert!(message.contains("--unencrypted"), "{message}");
    assert_eq!(error.exit_code(), 2);
    assert!(!output.exists());

    let error = commands::export(&config_with_recipient("age1nope"), &output, false)
        .await
        .expect_err("not a key");
    assert!(error.to_string().contains("export.recipient"), "{error}");
    assert!(!output.exists());
}

#[tokio::test]
async fn the_configured_key_wins_over_the_enrolled_one() {
    use license_sync_agent::state::{EnrolledCredential, StateDir};
    let enrolled_key = age::x25519::Identity::generate();
    let configured_key = age::x25519::Identity::generate();
    let state_dir = tempfile::tempdir().expect("state dir");
    StateDir::open(state_dir.path())
        .expect("state")
        .store_credential(&EnrolledCredential {
            credential: license_sync_agent::config::Secret::new("lsi_x"),
            enterprise: "acme".into(),
            server_id: SERVER_ID,
            enrolled_at: time::OffsetDateTime::UNIX_EPOCH,
            usage_file_recipient: Some(enrolled_key.to_public().to_string()),
        })
        .expect("store credential");
    let mut config = file_config(fixture_csv());
    config.agent = Some(sidecar_config(state_dir.path()));
    let dir = tempfile::tempdir().expect("temp dir");
    let output = dir.path().join("usage.json.age");

    let summary = commands::export(&config, &output, false)
        .await
        .expect("export");
    assert_eq!(
        summary.recipient,
        Some(enrolled_key.to_public().to_string())
    );
    let bytes = std::fs::read(&output).expect("read");
    license_sync_core::encrypted_usage_file::read_encrypted(&bytes, &[enrolled_key])
        .expect("encrypted to the enrolled key");

    config.export = Some(license_sync_agent::config::ExportConfig {
        recipient: Some(configured_key.to_public().to_string()),
    });
    let summary = commands::export(&config, &output, false)
        .await
        .expect("export");
    assert_eq!(
        summary.recipient,
        Some(configured_key.to_public().to_string())
    );
    let bytes = std::fs::read(&output).expect("read");
    license_sync_core::encrypted_usage_file::read_encrypted(&bytes, &[configured_key])
        .expect("encrypted to the configured key");
}
