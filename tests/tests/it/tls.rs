//! TLS end to end, with the real binaries and certificates made by the test: the aggregator serves HTTPS and gRPC
//! over TLS with mTLS required on the gRPC port; the one-shot agent syncs over `https://` trusting the private CA
//! (`aggregator.ca_cert`) and presenting its instance's client certificate (`aggregator.client_cert`,
//! `client_key`); the same agent without a certificate, or with another instance's, is refused and nothing of it
//! is stored.

use std::path::Path;

use license_sync_e2e::{Aggregator, agent, agent_json};
use license_sync_serve::test_pki::{Issued, TestCa};
use serde_json::Value;

use crate::traces::enterprise_with_instance;

const CSV: &str =
    "id,login,email,suspended?\n1,mona,mona@example.com,false\n2,hubot,hubot@example.com,false\n";

fn write_pem(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write PEM");
    path.to_string_lossy().into_owned()
}

/// The agent's configuration for `server_id`, presenting `client` if given.
fn agent_config(
    dir: &Path,
    name: &str,
    server_id: &str,
    endpoint: &str,
    credential: &str,
    ca_path: &str,
    client: Option<&Issued>,
) -> String {
    let csv = write_pem(dir, &format!("{name}.csv"), CSV);
    let credential_file = write_pem(dir, &format!("{name}.credential"), credential);
    let client = client.map_or_else(String::new, |client| {
        format!(
            "client_cert = {:?}\nclient_key = {:?}\n",
            write_pem(dir, &format!("{name}.crt"), &client.cert_pem),
            write_pem(dir, &format!("{name}.key"), &client.key_pem)
        )
    });
    let config = format!(
        "[instance]\nserver_id = {server_id:?}\nhostname = \"{name}.test\"\nghes_version = \"3.14.2\"\n\n\
         [source]\nkind = \"file\"\npath = {csv:?}\n\n\
         [aggregator]\nendpoint = {endpoint:?}\ncredential_file = {credential_file:?}\nca_cert = {ca_path:?}\n{client}"
    );
    write_pem(dir, &format!("{name}.toml"), &config)
}

#[test]
fn an_agent_syncs_over_mtls_with_its_instance_certificate_and_others_are_refused() {
    let pki = tempfile::tempdir().expect("tempdir");
    let dir = pki.path();
    let server_ca = TestCa::new("aggregator CA");
    let agents_ca = TestCa::new("agents CA");
    let server_cert = server_ca.server(None);
    let ca_path = write_pem(dir, "aggregator-ca.pem", &server_ca.cert_pem());
    let cert_path = write_pem(dir, "server.crt", &server_cert.cert_pem);
    let key_path = write_pem(dir, "server.key", &server_cert.key_pem);
    let agents_ca_path = write_pem(dir, "agents-ca.pem", &agents_ca.cert_pem());
    let aggregator = Aggregator::start_with_env(&[
        ("LICENSE_SYNC_AGGREGATOR_TLS_CERT_PATH", &cert_path),
        ("LICENSE_SYNC_AGGREGATOR_TLS_KEY_PATH", &key_path),
        (
            "LICENSE_SYNC_AGGREGATOR_TLS_CLIENT_CA_PATH",
            &agents_ca_path,
        ),
        ("LICENSE_SYNC_AGGREGATOR_TLS_CLIENT_AUTH", "required"),
    ])
    .expect("aggregator starts with TLS");
    let (server_id, credential) = enterprise_with_instance(&aggregator, "ghes.test");
    let token = aggregator
        .admin(&["token", "create", "--enterprise", "acme", "--name", "owner"])
        .expect("token");
    let other_id = uuid::Uuid::new_v4().to_string();
    let port = aggregator.grpc_addr().expect("gRPC address").port();
    let endpoint = format!("https://localhost:{port}");
    let own = agents_ca.client(&format!("license-sync://instance/{server_id}"));
    let other = agents_ca.client(&format!("license-sync://instance/{other_id}"));

    let refused = |name: &str, client: Option<&Issued>| {
        let config = agent_config(
            dir,
            name,
            &server_id,
            &endpoint,
            &credential,
            &ca_path,
            client,
        );
        let output = agent(&["sync", "--config", &config]).expect("run the agent");
        assert!(!output.status.success(), "{name}: the sync was accepted");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    // REST over HTTPS, trusting the private CA.
    let http = reqwest::blocking::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(server_ca.cert_pem().as_bytes()).expect("CA"),
        )
        .build()
        .expect("client");
    let https = aggregator
        .http_url
        .replace("http://127.0.0.1", "https://localhost");
    let consumed = || -> Value {
        http.get(format!("{https}/enterprises/acme/consumed-licenses"))
            .bearer_auth(&token)
            .send()
            .expect("HTTPS request")
            .json()
            .expect("JSON")
    };

    // TLS 1.3 refuses a missing certificate after the client considers the handshake done: the agent sees the
    // connection end (an unavailable aggregator, retried later), never an answer of the service.
    let stderr = refused("no-cert", None);
    assert!(stderr.contains("aggregator"), "no certificate: {stderr}");
    let stderr = refused("other-cert", Some(&other));
    assert!(
        stderr.contains(&other_id),
        "another instance's certificate: {stderr}"
    );
    assert_eq!(
        consumed()["total_seats_consumed"],
        0,
        "refused syncs stored nothing"
    );

    let config = agent_config(
        dir,
        "ghes",
        &server_id,
        &endpoint,
        &credential,
        &ca_path,
        Some(&own),
    );
    let receipt = agent_json(&["sync", "--config", &config]).expect("sync over mTLS");
    assert_eq!(receipt["users_accepted"], 2, "{receipt}");
    let consumed = consumed();
    assert_eq!(consumed["total_seats_consumed"], 2, "{consumed}");
}
