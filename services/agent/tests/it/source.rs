//! The GHES and file sources against the in-process GHES simulator.

use std::time::{Duration, Instant};

use crate::common::*;
use license_sync_agent::AgentError;
use license_sync_agent::config::Secret;
use license_sync_agent::source::{GhesClient, read_source};

#[tokio::test]
async fn polls_while_ghes_builds_the_report_then_reads_it() {
    let sim = start_sim(|config| config.pending_polls = 3).await;
    let data = read_source(&ghes_config(ghes_source(&sim)))
        .await
        .expect("report read");

    let stats = sim.stats();
    assert!(stats.report_202 >= 1, "{stats:?}");
    assert_eq!((stats.report_202, stats.report_200), (3, 1));
    assert_eq!(data.report.rows_read, 5);
    assert_eq!(data.report.users.len(), 4);
    assert_eq!(data.report.rows_skipped(), 1);
    assert_eq!(data.report.skipped[0].line, 5);
    let logins: Vec<&str> = data.report.users.iter().map(|u| u.login.as_str()).collect();
    assert_eq!(logins, ["mona", "hubot", "octocat", "ghost"]);
}

#[tokio::test]
async fn refused_credentials_fail_at_once_without_retries() {
    let sim = start_sim(|_| {}).await;
    let mut source = ghes_source(&sim);
    source.token = Some(Secret::new("wrong-token"));
    let error = read_source(&ghes_config(source))
        .await
        .expect_err("401 must fail");

    assert!(
        matches!(error, AgentError::SourceCredentials { status: 401, .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("site_admin"), "{message}");
    assert!(!message.contains("wrong-token"), "{message}");
    assert_eq!(error.exit_code(), 3);
    assert!(!error.is_retryable());
    let stats = sim.stats();
    assert_eq!((stats.report_requests, stats.unauthorized), (1, 1));
}

#[tokio::test]
async fn transient_503s_are_retried_until_success() {
    let sim = start_sim(|config| {
        config.fail_first = 2;
        config.pending_polls = 1;
    })
    .await;
    let mut source = ghes_source(&sim);
    source.max_attempts = 3;
    let data = read_source(&ghes_config(source))
        .await
        .expect("third attempt succeeds");

    assert_eq!(data.report.users.len(), 4);
    let stats = sim.stats();
    assert_eq!(
        (stats.report_503, stats.report_202, stats.report_200),
        (2, 1, 1)
    );
}

#[tokio::test]
async fn persistent_failures_stop_after_max_attempts() {
    let sim = start_sim(|config| config.fail_first = 100).await;
    let mut source = ghes_source(&sim);
    source.max_attempts = 2;
    let error = read_source(&ghes_config(source))
        .await
        .expect_err("gives up");

    assert!(
        matches!(error, AgentError::SourceUnavailable { attempts: 2, .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("503"), "{error}");
    assert!(error.is_retryable());
    assert_eq!(sim.stats().report_requests, 2);
}

#[tokio::test]
async fn unreachable_ghes_is_reported_after_retries() {
    // A port that was free a moment ago: connections are refused.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let sim = start_sim(|_| {}).await;
    let mut source = ghes_source(&sim);
    source.url = format!("http://127.0.0.1:{port}").parse().expect("url");
    source.max_attempts = 2;
    let error = read_source(&ghes_config(source))
        .await
        .expect_err("nothing listens");
    assert!(
        matches!(error, AgentError::SourceUnavailable { attempts: 2, .. }),
        "{error:?}"
    );
    assert_eq!(error.grpc_code(), tonic::Code::Unavailable);
}

#[tokio::test]
async fn report_deadline_ends_the_polling_with_a_clear_error() {
    let sim = start_sim(|config| config.pending_polls = u32::MAX).await;
    let mut source = ghes_source(&sim);
    source.report_deadline = Duration::from_secs(1);
    source.poll_initial = Duration::from_millis(50);
    source.poll_max = Duration::from_millis(200);
    let started = Instant::now();
    let error = read_source(&ghes_config(source))
        .await
        .expect_err("never ready");

    assert!(started.elapsed() < Duration::from_secs(5));
    match &error {
        AgentError::ReportTimeout {
            deadline_secs,
            polls,
            ..
        } => {
            assert_eq!(*deadline_secs, 1);
            assert!(*polls >= 3, "{polls}");
        }
        other => panic!("expected a report timeout, got {other:?}"),
    }
    assert!(error.to_string().contains("report_deadline_secs"));
    assert_eq!(sim.stats().report_200, 0);
}

#[tokio::test]
async fn license_and_version_are_read_from_ghes() {
    let sim = start_sim(|config| {
        config.version = "3.16.0".into();
        config.license_seats = Some(50);
        config.pending_polls = 0;
    })
    .await;
    let data = read_source(&ghes_config(ghes_source(&sim)))
        .await
        .expect("read");

    let license = data.license.expect("license read");
    assert_eq!(license.seats, Some(50));
    // hubot is suspended; the broken row still counts for GHES.
    assert_eq!(license.seats_used, 4);
    assert_eq!(license.kind, "standard");
    let expires_at = license.expires_at.expect("expire_at parsed");
    let days = (expires_at - time::OffsetDateTime::now_utc()).whole_days();
    assert!((363..=365).contains(&days), "{days}");
    assert_eq!(data.ghes_version.as_deref(), Some("3.16.0"));
    assert_eq!(sim.stats().meta_requests, 1);
}

#[tokio::test]
async fn configured_version_and_disabled_license_skip_those_requests() {
    let sim = start_sim(|config| config.pending_polls = 0).await;
    let mut source = ghes_source(&sim);
    source.read_license = false;
    let mut config = ghes_config(source);
    config.instance.ghes_version = Some("3.14.2".into());
    let data = read_source(&config).await.expect("read");

    assert!(data.license.is_none());
    assert!(data.ghes_version.is_none());
    let stats = sim.stats();
    assert_eq!((stats.license_requests, stats.meta_requests), (0, 0));
}

#[tokio::test]
async fn unlimited_license_has_no_seat_count() {
    let sim = start_sim(|config| {
        config.license_seats = None;
        config.pending_polls = 0;
    })
    .await;
    let client = GhesClient::new(&ghes_source(&sim)).expect("client");
    let license = client.fetch_license().await.expect("license");
    assert_eq!(license.seats, None);
}

#[tokio::test]
async fn token_file_is_read_and_trimmed() {
    let sim = start_sim(|config| config.pending_polls = 0).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write token");
    let mut source = ghes_source(&sim);
    source.token = None;
    source.token_file = Some(token_file);
    let data = read_source(&ghes_config(source)).await.expect("read");
    assert_eq!(data.report.users.len(), 4);
}

#[tokio::test]
async fn file_source_reads_the_same_report() {
    let data = read_source(&file_config(fixture_csv()))
        .await
        .expect("read");
    assert_eq!(data.report.users.len(), 4);
    assert!(data.license.is_none());

    let error = read_source(&file_config("/nonexistent/all_users.csv".into()))
        .await
        .expect_err("missing file");
    assert!(matches!(error, AgentError::SourceFile { .. }), "{error:?}");
    assert!(error.to_string().contains("/nonexistent/all_users.csv"));
}

#[tokio::test]
async fn a_file_that_is_not_the_report_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("other.csv");
    std::fs::write(&path, "name,value\na,b\n").expect("write");
    let error = read_source(&file_config(path))
        .await
        .expect_err("not a report");
    assert!(matches!(error, AgentError::Report(_)), "{error:?}");
    let chain = license_sync_agent::error::error_chain(&error);
    assert!(chain.contains("`id`"), "{chain}");
}

#[tokio::test]
async fn a_private_ca_is_loaded_and_a_non_pem_file_is_a_config_error() {
    let sim = start_sim(|_| {}).await;
    let mut source = ghes_source(&sim);
    source.ca_cert =
        Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls/ca.pem"));
    GhesClient::new(&source).expect("PEM CA accepted");

    source.ca_cert = Some(fixture_csv());
    let error = GhesClient::new(&source).expect_err("not a certificate");
    assert!(matches!(error, AgentError::Config(_)), "{error:?}");
    assert!(error.to_string().contains("source.ca_cert"), "{error}");
}
