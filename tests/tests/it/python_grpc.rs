//! A client written from the `.proto` alone: a Python script (tests/compat/grpc_snapshot_digest.py) generates its
//! stubs from proto/ with `grpcio-tools`, computes the snapshot digest from the comment on
//! `SnapshotTrailer.users_sha256`, and streams a snapshot with `grpcio`; the aggregator commits it (REST shows the
//! people) and refuses the same snapshot with one bit of the digest flipped. Skipped without a Python that has
//! grpcio and grpcio-tools (`scripts/test.sh` makes one), failed instead under `LICENSE_SYNC_REQUIRE_ALL_TESTS=1`.

use std::path::Path;

use license_sync_e2e::Aggregator;
use serde_json::Value;

use crate::traces::enterprise_with_instance;

#[test]
fn a_python_client_written_from_the_proto_streams_a_snapshot_with_its_digest() {
    let Some(python) = license_sync_serve::testing::python_with(
        "a_python_client_written_from_the_proto_streams_a_snapshot_with_its_digest",
        &["grpc", "grpc_tools.protoc"],
    ) else {
        return;
    };
    let aggregator = Aggregator::start().expect("aggregator");
    let (server_id, credential) = enterprise_with_instance(&aggregator, "python.ghes.test");
    let token = aggregator
        .admin(&["token", "create", "--enterprise", "acme", "--name", "owner"])
        .expect("token");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let stubs = tempfile::tempdir().expect("stubs dir");
    let target = aggregator.grpc_url.trim_start_matches("http://").to_owned();
    let output = std::process::Command::new(python)
        .arg(root.join("tests/compat/grpc_snapshot_digest.py"))
        .arg(root.join("proto"))
        .arg(stubs.path())
        .args([&target, &server_id])
        .env("LICENSE_SYNC_TEST_CREDENTIAL", &credential)
        .output()
        .expect("run the Python client");
    assert!(
        output.status.success(),
        "the Python client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("JSON from the script");
    assert_eq!(report["users_accepted"], 5, "{report}");
    assert_eq!(report["duplicate"], false, "{report}");
    assert_eq!(report["server_id"], server_id.as_str(), "{report}");
    // The same users with a damaged digest: refused, so the accepted digest above was checked, not ignored.
    assert_eq!(
        report["damaged_digest"]["code"], "INVALID_ARGUMENT",
        "{report}"
    );
    let details = report["damaged_digest"]["details"]
        .as_str()
        .unwrap_or_default();
    assert!(details.contains("digest"), "{report}");

    let consumed: Value = reqwest::blocking::Client::new()
        .get(format!(
            "{}/enterprises/acme/consumed-licenses",
            aggregator.http_url
        ))
        .bearer_auth(&token)
        .send()
        .expect("GET consumed-licenses")
        .json()
        .expect("JSON");
    // Five accounts, of which the suspended one does not consume a license.
    assert_eq!(consumed["total_seats_consumed"], 4, "{consumed}");
    let mut ids: Vec<&str> = consumed["users"]
        .as_array()
        .expect("users")
        .iter()
        .flat_map(|user| {
            user["enterprise_server_user_ids"]
                .as_array()
                .into_iter()
                .flatten()
        })
        .filter_map(Value::as_str)
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        [
            "python.ghes.test:1",
            "python.ghes.test:2",
            "python.ghes.test:3",
            "python.ghes.test:5"
        ],
        "{consumed}"
    );
}
