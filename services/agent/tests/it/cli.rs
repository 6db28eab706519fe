//! The `license-sync-agent` binary: JSON lines on stdout, errors and logs on stderr, exit codes.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::*;

fn agent(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_license-sync-agent"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "debug")
        .env_remove("LICENSE_SYNC_LOG_FORMAT")
        .output()
        .expect("run the agent")
}

fn write_config(dir: &Path, extra: &str) {
    std::fs::copy(fixture_csv(), dir.join("all_users.csv")).expect("copy fixture");
    std::fs::write(
        dir.join("agent.toml"),
        format!(
            "[instance]\nserver_id = \"{SERVER_ID}\"\nhostname = \"ghes-1.example.com\"\nghes_version = \"3.14.2\"\n\
             [source]\nkind = \"file\"\npath = \"all_users.csv\"\n{extra}"
        ),
    )
    .expect("write config");
}

fn json_line(output: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line expected, got {stdout:?}");
    serde_json::from_str(lines[0]).expect("stdout is JSON")
}

#[test]
fn check_prints_one_json_summary_and_logs_no_email() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_config(dir.path(), "");
    let output = agent(&["check", "--config", "agent.toml"], dir.path());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");

    let summary = json_line(&output);
    assert_eq!(summary["users"], 4);
    assert_eq!(summary["rows_read"], 5);
    assert_eq!(summary["rows_skipped"], 1);
    assert_eq!(summary["skipped"][0]["line"], 5);
    assert_eq!(summary["skipped"][0]["kind"], "invalid_id");
    assert!(
        summary["skipped"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("id"))
    );
    assert_eq!(summary["ghes_version"], "3.14.2");

    // Even at debug level, the skipped row is logged without any email address.
    assert!(stderr.contains("skipped a row"), "{stderr}");
    assert!(
        !stderr.contains('@'),
        "an email leaked into the logs: {stderr}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_config(dir.path(), "");
    let output = agent(
        &["--log-format", "json", "check", "--config", "agent.toml"],
        dir.path(),
    );
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for line in stderr.lines() {
        let event: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
        assert!(event.get("level").is_some(), "{line}");
    }
}

#[test]
fn export_writes_the_file_and_prints_its_summary() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_config(dir.path(), "");
    let output = agent(
        &[
            "export",
            "--config",
            "agent.toml",
            "--output",
            "usage.json",
            "--unencrypted",
        ],
        dir.path(),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = json_line(&output);
    assert_eq!(summary["path"], "usage.json");
    assert_eq!(summary["users"], 4);
    assert_eq!(summary["rows_skipped"], 1);
    assert!(dir.path().join("usage.json").exists());
}

#[test]
fn a_config_error_exits_2_and_names_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("agent.toml"),
        "[instance]\nhostname = \"ghes-1\"\n[source]\nkind = \"file\"\npath = \"x.csv\"\n",
    )
    .expect("write config");
    let output = agent(&["check", "--config", "agent.toml"], dir.path());
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("`instance.server_id` is missing"),
        "{stderr}"
    );
}

#[test]
fn sync_to_an_unreachable_aggregator_exits_4_with_the_cause() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let dir = tempfile::tempdir().expect("temp dir");
    write_config(
        dir.path(),
        &format!(
            "[aggregator]\nendpoint = \"http://127.0.0.1:{port}\"\ncredential = \"lsi_secret_value\"\ntimeout_secs = 5\n"
        ),
    );
    let output = agent(&["sync", "--config", "agent.toml"], dir.path());
    assert_eq!(output.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unavailable"), "{stderr}");
    assert!(
        !stderr.contains("lsi_secret_value"),
        "the credential leaked: {stderr}"
    );
}

#[test]
fn in_json_mode_errors_are_json_events_too() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("agent.toml"),
        "[instance]\nhostname = \"ghes-1\"\n[source]\nkind = \"file\"\npath = \"x.csv\"\n",
    )
    .expect("write config");
    let output = agent(
        &["--log-format", "json", "check", "--config", "agent.toml"],
        dir.path(),
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON log line"))
        .collect();
    let failure = events
        .iter()
        .find(|event| event["message"] == "command failed")
        .expect("failure event");
    assert_eq!(failure["kind"], "config");
    assert!(
        failure["error"]
            .as_str()
            .is_some_and(|error| error.contains("instance.server_id")),
        "{failure}"
    );
}

#[test]
fn with_an_agent_section_sync_follows_the_owners_setting_and_sends_nothing_while_disabled() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let dir = tempfile::tempdir().expect("temp dir");
    write_config(
        dir.path(),
        &format!(
            "[aggregator]\nendpoint = \"http://127.0.0.1:{port}\"\ntimeout_secs = 5\n\
             [agent]\nstate_dir = \"state\"\nowner_token = \"owner-token-0123456789abcdef\"\n"
        ),
    );
    let output = agent(&["sync", "--config", "agent.toml"], dir.path());
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("license sync is disabled"), "{stderr}");
    assert!(!stderr.contains("owner-token-0123456789abcdef"), "{stderr}");

    // The local API commands say clearly when no agent is running there.
    let output = agent(
        &["status", "--api", &format!("http://127.0.0.1:{port}")],
        dir.path(),
    );
    assert_eq!(output.status.code(), Some(7));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("license-sync-agent run"), "{stderr}");
    // Owner-only commands need the owner token before anything is sent.
    let output = Command::new(env!("CARGO_BIN_EXE_license-sync-agent"))
        .args(["enable", "--api", &format!("http://127.0.0.1:{port}")])
        .current_dir(dir.path())
        .env_remove("LICENSE_SYNC_AGENT_OWNER_TOKEN")
        .output()
        .expect("run the agent");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("LICENSE_SYNC_AGENT_OWNER_TOKEN"),
        "{stderr}"
    );
}
