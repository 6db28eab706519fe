//! The real `gh` CLI against the aggregator as a GitHub Enterprise host: HTTPS served by the aggregator itself with
//! a test CA that `gh` (Go) trusts through `SSL_CERT_FILE`, the API at `https://HOST/api/v3/`. `gh auth status`
//! reports a good token as logged in and a bad one as failing; `gh api --paginate` follows the `Link` headers
//! through every page of consumed-licenses. Skipped when `gh` is not installed (`.ci/run` installs it), failed
//! instead under `LICENSE_SYNC_REQUIRE_ALL_TESTS=1`.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Output};

use license_sync_e2e::Aggregator;
use license_sync_e2e::grpc::{chunks, snapshot};
use license_sync_proto::v1::snapshot_ingest_client::SnapshotIngestClient;
use license_sync_serve::test_pki::TestCa;
use serde_json::Value;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::traces::enterprise_with_instance;

/// More than eight pages of 30: `gh` must follow `next` links many times.
const PEOPLE: usize = 250;

/// Whether `gh` runs here, or why not.
fn gh_available() -> Result<(), String> {
    match Command::new("gh").arg("--version").output() {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => Err(format!(
            "`gh --version` failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )),
        Err(err) => Err(format!(
            "cannot run gh ({err}); install it (`apt-get install gh`)"
        )),
    }
}

/// `gh ARGS` for host `host` with `token`, trusting only `ca_path`, with a configuration directory of its own so
/// that the user's `gh` login is neither read nor changed.
fn gh(config_dir: &Path, host: &str, token: &str, ca_path: &Path, args: &[&str]) -> Output {
    Command::new("gh")
        .args(args)
        .env("GH_CONFIG_DIR", config_dir)
        .env("GH_HOST", host)
        .env("GH_ENTERPRISE_TOKEN", token)
        .env("SSL_CERT_FILE", ca_path)
        .env("GH_NO_UPDATE_NOTIFIER", "1")
        .env("GH_PROMPT_DISABLED", "1")
        .env("NO_COLOR", "1")
        // A token of the caller's environment would be used instead of ours.
        .env_remove("GH_TOKEN")
        .env_remove("GITHUB_TOKEN")
        .env_remove("GH_ENTERPRISE_TOKEN_OVERRIDE")
        .env_remove("GITHUB_ENTERPRISE_TOKEN")
        .output()
        .expect("run gh")
}

/// Streams a snapshot of `PEOPLE` users for the instance over the aggregator's TLS gRPC port.
fn sync_people(aggregator: &Aggregator, ca_pem: &str, server_id: &str, credential: &str) {
    let port = aggregator.grpc_addr().expect("gRPC address").port();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca_pem))
            .domain_name("localhost");
        let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
            .expect("endpoint")
            .tls_config(tls)
            .expect("TLS")
            .connect()
            .await
            .expect("connect over TLS");
        let snap = snapshot(server_id.parse().expect("uuid"), "ghes.test", PEOPLE);
        let mut request = tonic::Request::new(futures::stream::iter(chunks(&snap)));
        let value: MetadataValue<_> = format!("Bearer {credential}").parse().expect("metadata");
        request.metadata_mut().insert("authorization", value);
        let receipt = SnapshotIngestClient::new(channel)
            .upload_snapshot(request)
            .await
            .expect("synced")
            .into_inner();
        assert_eq!(receipt.users_accepted, PEOPLE as u64);
    });
}

#[test]
fn gh_logs_in_and_pages_through_every_consumed_license_over_https() {
    if let Err(reason) = gh_available() {
        if std::env::var_os("LICENSE_SYNC_REQUIRE_ALL_TESTS").is_none() {
            eprintln!(
                "SKIPPED gh_logs_in_and_pages_through_every_consumed_license_over_https: {reason}"
            );
            return;
        }
        panic!("LICENSE_SYNC_REQUIRE_ALL_TESTS is set but {reason}");
    }
    let pki = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("aggregator CA");
    let server = ca.server(None);
    let write = |name: &str, text: &str| {
        let path = pki.path().join(name);
        std::fs::write(&path, text).expect("write PEM");
        path
    };
    let ca_path = write("ca.pem", &ca.cert_pem());
    let cert_path = write("server.crt", &server.cert_pem);
    let key_path = write("server.key", &server.key_pem);
    let aggregator = Aggregator::start_with_env(&[
        (
            "LICENSE_SYNC_AGGREGATOR_TLS_CERT_PATH",
            &cert_path.to_string_lossy(),
        ),
        (
            "LICENSE_SYNC_AGGREGATOR_TLS_KEY_PATH",
            &key_path.to_string_lossy(),
        ),
    ])
    .expect("aggregator starts with TLS");
    let (server_id, credential) = enterprise_with_instance(&aggregator, "ghes.test");
    let token = aggregator
        .admin(&[
            "token",
            "create",
            "--enterprise",
            "acme",
            "--name",
            "reports",
            "--scope",
            "read",
        ])
        .expect("token");
    sync_people(&aggregator, &ca.cert_pem(), &server_id, &credential);
    let host = aggregator.http_url.trim_start_matches("http://").to_owned();
    let config_dir = tempfile::tempdir().expect("gh config dir");
    let gh = |token: &str, args: &[&str]| gh(config_dir.path(), &host, token, &ca_path, args);

    let status = gh(&token, &["auth", "status", "--hostname", &host]);
    let said = String::from_utf8_lossy(&status.stderr).into_owned()
        + &String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "gh auth status with a good token: {said}"
    );
    assert!(
        said.contains(&format!("Logged in to {host} as reports")),
        "{said}"
    );

    let status = gh("lst_not-a-token", &["auth", "status", "--hostname", &host]);
    let said = String::from_utf8_lossy(&status.stderr).into_owned()
        + &String::from_utf8_lossy(&status.stdout);
    assert!(
        !status.status.success(),
        "gh auth status with a bad token succeeded: {said}"
    );
    assert!(
        said.contains("authentication failed") || said.contains("no longer valid"),
        "{said}"
    );
    assert!(!said.contains("Logged in"), "{said}");

    // `gh api` of a path goes under /api/v3 on an Enterprise host: the token as a user.
    let user = gh(&token, &["api", "/user"]);
    assert!(
        user.status.success(),
        "gh api /user: {}",
        String::from_utf8_lossy(&user.stderr)
    );
    let user: Value = serde_json::from_slice(&user.stdout).expect("a user as JSON");
    assert_eq!(user["login"], "reports", "{user}");
    assert_eq!(user["license_sync"]["scope"], "read", "{user}");

    let paged = gh(
        &token,
        &[
            "api",
            "--paginate",
            "/enterprises/acme/consumed-licenses?per_page=30",
        ],
    );
    assert!(
        paged.status.success(),
        "gh api --paginate: {}",
        String::from_utf8_lossy(&paged.stderr)
    );
    // One JSON object per page, one after another.
    let pages: Vec<Value> = serde_json::Deserializer::from_slice(&paged.stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .expect("pages of JSON");
    assert_eq!(pages.len(), PEOPLE.div_ceil(30), "one answer per page");
    let mut ids = Vec::new();
    for page in &pages {
        assert_eq!(page["total_seats_consumed"], PEOPLE, "{page}");
        for user in page["users"].as_array().expect("users") {
            let user_ids = user["enterprise_server_user_ids"].as_array().expect("ids");
            ids.extend(user_ids.iter().map(Value::to_string));
        }
    }
    assert_eq!(ids.len(), PEOPLE, "every person once");
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), PEOPLE, "no person twice");
}
