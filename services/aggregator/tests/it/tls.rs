//! TLS served by the aggregator, over real connections on `127.0.0.1:0` with certificates made by the test (rcgen):
//! HTTPS answers through reqwest trusting the test CA, on HTTP/2 and HTTP/1.1; a handshake that never finishes is
//! closed; mTLS on the gRPC port binds a client certificate to its instance (right one accepted, none refused,
//! another instance's refused, one from another CA refused); replaced files are served without a restart, and a
//! broken replacement keeps the old certificate, counted in the metrics.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use license_sync_aggregator::config::{AggregatorConfig, TlsClientAuth};
use license_sync_aggregator::server::{self, RunningServer};
use license_sync_proto::v1::enrollment_client::EnrollmentClient;
use license_sync_proto::v1::{CheckConnectionRequest, EnrollRequest};
use license_sync_serve::test_pki::{Issued, TestCa};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use uuid::Uuid;

use crate::control::PATIENCE;
use license_sync_serve::testing::closed_within;

/// An aggregator serving TLS from files in its own directory, with enterprise `acme`.
struct TlsServer {
    server: RunningServer,
    dir: tempfile::TempDir,
    ca: TestCa,
}

fn write(path: &Path, text: &str) {
    // Replaced through a rename, as a deployment tool (or Kubernetes) replaces a mounted file: never half-written.
    let temporary = path.with_extension("new");
    std::fs::write(&temporary, text).expect("write");
    std::fs::rename(&temporary, path).expect("rename");
}

impl TlsServer {
    fn cert_path(&self) -> PathBuf {
        self.dir.path().join("server.crt")
    }

    fn key_path(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// With mTLS on the gRPC port: the clients' CA is returned, to issue agents' certificates.
    async fn start_with_client_ca(auth: TlsClientAuth) -> (TlsServer, TestCa) {
        let clients_ca = TestCa::new("agents CA");
        let clients_ca_pem = clients_ca.cert_pem();
        let server = TlsServer::start(move |config, dir| {
            write(&dir.join("clients-ca.pem"), &clients_ca_pem);
            config.tls_client_ca_path = Some(dir.join("clients-ca.pem"));
            config.tls_client_auth = auth;
        })
        .await;
        (server, clients_ca)
    }

    async fn start(configure: impl FnOnce(&mut AggregatorConfig, &Path)) -> TlsServer {
        let ca = TestCa::new("license-sync test CA");
        let dir = tempfile::tempdir().expect("tempdir");
        let server_cert = ca.server(None);
        write(&dir.path().join("server.crt"), &server_cert.cert_pem);
        write(&dir.path().join("server.key"), &server_cert.key_pem);
        let mut config = AggregatorConfig {
            database_url: format!("sqlite://{}", dir.path().join("aggregator.db").display()),
            grpc_listen: "127.0.0.1:0".parse().expect("address"),
            http_listen: "127.0.0.1:0".parse().expect("address"),
            tls_cert_path: Some(dir.path().join("server.crt")),
            tls_key_path: Some(dir.path().join("server.key")),
            ..AggregatorConfig::default()
        };
        configure(&mut config, dir.path());
        config.validate().expect("valid configuration");
        let server = server::start(config).await.expect("server starts");
        license_sync_aggregator::admin::create_enterprise(&server.app.store, "acme", "Acme", 10)
            .await
            .expect("enterprise");
        TlsServer { server, dir, ca }
    }

    fn https(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.server.http_addr.port())
    }

    /// A reqwest client that trusts only the test CA and opens a new connection (a new handshake) each time.
    fn rest_client(&self, http1_only: bool) -> reqwest::Client {
        let mut builder = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.ca.cert_pem().as_bytes()).expect("CA"),
            )
            .tls_info(true)
            .pool_max_idle_per_host(0);
        if http1_only {
            builder = builder.http1_only();
        }
        builder.build().expect("client")
    }

    /// `GET /healthz` over a new HTTPS connection.
    async fn healthz(&self) -> reqwest::Response {
        self.rest_client(false)
            .get(self.https("/healthz"))
            .send()
            .await
            .expect("HTTPS request")
    }

    /// The DER of the certificate the HTTPS port presents to a new connection.
    async fn served_certificate(&self) -> Vec<u8> {
        self.healthz()
            .await
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|info| info.peer_certificate())
            .expect("the server presented a certificate")
            .to_vec()
    }

    async fn metrics(&self) -> String {
        self.rest_client(false)
            .get(self.https("/metrics"))
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body")
    }

    /// A gRPC channel over TLS trusting the test CA, presenting `identity` if given.
    async fn grpc_channel(
        &self,
        identity: Option<&Issued>,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.ca.cert_pem()))
            .domain_name("localhost");
        if let Some(identity) = identity {
            tls = tls.identity(Identity::from_pem(&identity.cert_pem, &identity.key_pem));
        }
        Endpoint::from_shared(format!(
            "https://127.0.0.1:{}",
            self.server.grpc_addr.port()
        ))
        .expect("endpoint")
        .tls_config(tls)?
        .connect()
        .await
    }

    async fn enrollment_token(&self) -> String {
        let store = &self.server.app.store;
        let enterprise = license_sync_aggregator::admin::enterprise(store, "acme")
            .await
            .expect("enterprise");
        license_sync_aggregator::control::issue_enrollment_token(store, &enterprise, None)
            .await
            .expect("token")
            .token
    }

    async fn enroll(&self, channel: Channel, server_id: Uuid) -> Result<String, tonic::Status> {
        let token = self.enrollment_token().await;
        let response = EnrollmentClient::new(channel)
            .enroll(EnrollRequest {
                enrollment_token: token,
                server_id: server_id.to_string(),
                hostname: format!("ghes-{}.example.com", &server_id.to_string()[..8]),
                ghes_version: "3.14.2".into(),
            })
            .await?;
        Ok(response.into_inner().credential)
    }

    /// An enrollment over a channel presenting `identity` fails in the TLS layer, before the service answers. With
    /// TLS 1.3 the server checks the client's certificate after the client considers the handshake done, so the
    /// refusal may come at the first call rather than at the connect.
    async fn assert_refused_by_tls(&self, identity: Option<&Issued>, server_id: Uuid) {
        let channel = match self.grpc_channel(identity).await {
            Err(_) => return,
            Ok(channel) => channel,
        };
        let status = self
            .enroll(channel, server_id)
            .await
            .expect_err("a client refused by TLS was served");
        assert!(
            !matches!(
                status.code(),
                Code::Unauthenticated | Code::PermissionDenied
            ),
            "refused by the service, not by TLS: {status:?}"
        );
    }

    async fn shutdown(self) {
        tokio::time::timeout(PATIENCE, self.server.shutdown())
            .await
            .expect("shutdown finishes")
            .expect("clean shutdown");
    }
}

async fn check_connection(channel: Channel, credential: &str) -> Result<String, tonic::Status> {
    let mut request = tonic::Request::new(CheckConnectionRequest {});
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {credential}")).expect("header"),
    );
    let response = EnrollmentClient::new(channel)
        .check_connection(request)
        .await?;
    Ok(response.into_inner().server_id)
}

/// The call was refused with `code`, saying `says`.
fn assert_refused<T: std::fmt::Debug>(answer: Result<T, tonic::Status>, code: Code, says: &str) {
    let status = answer.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(says), "{status:?}");
}

fn reload_failures(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("license_sync_tls_reload_failures_total "))
        .and_then(|value| value.trim().parse().ok())
        .expect("the reload failures counter is exported")
}

fn instance_uri(server_id: Uuid) -> String {
    format!("license-sync://instance/{server_id}")
}

/// Polls `check` until it holds, or fails after [`PATIENCE`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn https_and_grpc_answer_over_tls_with_the_test_ca() {
    let server = TlsServer::start(|_, _| {}).await;
    for (http1_only, version) in [
        (false, reqwest::Version::HTTP_2),
        (true, reqwest::Version::HTTP_11),
    ] {
        let response = server
            .rest_client(http1_only)
            .get(server.https("/healthz"))
            .send()
            .await
            .expect("HTTPS request");
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), version, "ALPN offers h2 and http/1.1");
    }
    // Plain HTTP to the TLS port gets no answer.
    let plain = reqwest::get(format!(
        "http://127.0.0.1:{}/healthz",
        server.server.http_addr.port()
    ))
    .await;
    assert!(
        plain.is_err(),
        "plain text was answered on the TLS port: {plain:?}"
    );

    // Without a client CA, gRPC over TLS needs no client certificate.
    let server_id = Uuid::new_v4();
    let channel = server.grpc_channel(None).await.expect("TLS channel");
    let credential = server
        .enroll(channel.clone(), server_id)
        .await
        .expect("enrolled");
    assert_eq!(
        check_connection(channel, &credential)
            .await
            .expect("checked"),
        server_id.to_string()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_tls_handshake_that_never_finishes_is_closed_after_the_handshake_timeout() {
    let server = TlsServer::start(|config, _| {
        config.tls_handshake_timeout_ms = 300;
        config.http_idle_timeout_secs = 60;
        config.grpc_idle_timeout_secs = 60;
        config.http_header_read_timeout_ms = 60_000;
    })
    .await;
    for addr in [server.server.http_addr, server.server.grpc_addr] {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        // The first bytes of a TLS record (a handshake of 512 bytes), then nothing.
        stream
            .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
            .await
            .expect("write");
        let closed = closed_within(&mut stream, Duration::from_secs(5)).await;
        let closed = closed.unwrap_or_else(|| panic!("{addr}: a stalled handshake was kept open"));
        assert!(
            closed >= Duration::from_millis(250),
            "{addr}: closed too early ({closed:?})"
        );
    }
    // The stalled clients did not keep the port from serving others.
    assert_eq!(server.healthz().await.status(), 200);
    server.shutdown().await;
}

#[tokio::test]
async fn at_the_connection_cap_stalled_handshakes_make_room_for_a_new_client() {
    let server = TlsServer::start(|config, _| {
        config.http_max_connections = 2;
        config.tls_handshake_timeout_ms = 60_000;
    })
    .await;
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(server.server.http_addr)
            .await
            .expect("connect");
        stream.write_all(&[0x16, 0x03, 0x01]).await.expect("write");
        stalled.push(stream);
    }
    let response = tokio::time::timeout(
        PATIENCE,
        server
            .rest_client(false)
            .get(server.https("/healthz"))
            .send(),
    )
    .await
    .expect("a new client got in at the cap")
    .expect("HTTPS request");
    assert_eq!(response.status(), 200);
    let evicted = closed_within(&mut stalled[0], Duration::from_secs(5)).await;
    assert!(
        evicted.is_some(),
        "the longest-idle stalled handshake was not closed"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn mtls_binds_the_client_certificate_to_its_instance() {
    let (server, clients_ca) = TlsServer::start_with_client_ca(TlsClientAuth::Optional).await;
    let server_id = Uuid::new_v4();
    let other_id = Uuid::new_v4();
    let own = clients_ca.client(&instance_uri(server_id));
    let other_instance = clients_ca.client(&instance_uri(other_id));
    let no_instance = clients_ca.client("https://agents.example.com/");

    // Enrollment needs no certificate in `optional` mode; the calls with a credential do.
    let without = server
        .grpc_channel(None)
        .await
        .expect("TLS without a client certificate");
    let credential = server
        .enroll(without.clone(), server_id)
        .await
        .expect("enrolled");
    assert_refused(
        check_connection(without, &credential).await,
        Code::Unauthenticated,
        "client certificate",
    );

    let channel = server.grpc_channel(Some(&own)).await.expect("mTLS channel");
    assert_eq!(
        check_connection(channel.clone(), &credential)
            .await
            .expect("own certificate"),
        server_id.to_string()
    );
    // Re-enrolling the same instance with its own certificate works.
    let credential = server
        .enroll(channel, server_id)
        .await
        .expect("re-enrolled");

    let channel = server
        .grpc_channel(Some(&other_instance))
        .await
        .expect("mTLS channel");
    assert_refused(
        check_connection(channel.clone(), &credential).await,
        Code::PermissionDenied,
        &other_id.to_string(),
    );
    // One instance's certificate cannot enroll another.
    assert_refused(
        server.enroll(channel, server_id).await,
        Code::PermissionDenied,
        &other_id.to_string(),
    );

    let channel = server
        .grpc_channel(Some(&no_instance))
        .await
        .expect("mTLS channel");
    assert_refused(
        check_connection(channel, &credential).await,
        Code::PermissionDenied,
        "license-sync://instance/",
    );

    // A certificate from another CA fails the handshake.
    let stranger = TestCa::new("someone else").client(&instance_uri(server_id));
    server
        .assert_refused_by_tls(Some(&stranger), server_id)
        .await;
    server.shutdown().await;
}

#[tokio::test]
async fn mtls_required_refuses_a_client_without_a_certificate_at_the_handshake() {
    let (server, clients_ca) = TlsServer::start_with_client_ca(TlsClientAuth::Required).await;
    let server_id = Uuid::new_v4();
    server.assert_refused_by_tls(None, server_id).await;
    let own = clients_ca.client(&instance_uri(server_id));
    let channel = server.grpc_channel(Some(&own)).await.expect("mTLS channel");
    let credential = server
        .enroll(channel.clone(), server_id)
        .await
        .expect("enrolled");
    check_connection(channel, &credential)
        .await
        .expect("checked");
    // The HTTPS port asks for no client certificate.
    assert_eq!(server.healthz().await.status(), 200);
    server.shutdown().await;
}

#[tokio::test]
async fn replaced_certificate_files_are_served_without_restart_and_a_broken_one_keeps_the_old() {
    let server = TlsServer::start(|config, _| {
        config.tls_reload_interval_secs = 1;
    })
    .await;
    let first = server.served_certificate().await;
    let renewed = server.ca.server(Some((2031, 1, 1)));
    write(&server.key_path(), &renewed.key_pem);
    write(&server.cert_path(), &renewed.cert_pem);
    eventually("the renewed certificate is served", || async {
        server.served_certificate().await == renewed.der
    })
    .await;
    assert_ne!(first, renewed.der);
    let expiry = "license_sync_tls_certificate_expiry_timestamp_seconds 1924992000";
    eventually("the expiry gauge shows the renewed certificate", || async {
        server.metrics().await.contains(expiry)
    })
    .await;

    // The two files are replaced one after the other: a look in between may have counted a mismatch already.
    let failures_before = reload_failures(&server.metrics().await);
    // A key that is not PEM: refused, counted, and the renewed certificate stays served.
    write(&server.key_path(), "not a key\n");
    eventually("the failed reload is counted", || async {
        reload_failures(&server.metrics().await) == failures_before + 1
    })
    .await;
    assert_eq!(server.served_certificate().await, renewed.der);
    // A key of another certificate: refused too.
    write(&server.key_path(), &server.ca.server(None).key_pem);
    eventually("the mismatched key is counted", || async {
        reload_failures(&server.metrics().await) == failures_before + 2
    })
    .await;
    assert_eq!(server.served_certificate().await, renewed.der);
    assert!(server.metrics().await.contains(expiry));
    server.shutdown().await;
}

#[tokio::test]
async fn unusable_tls_files_are_refused_at_start_naming_the_setting() {
    let ca = TestCa::new("test CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let server_cert = ca.server(None);
    let other = ca.server(None);
    write(&dir.path().join("server.crt"), &server_cert.cert_pem);
    write(&dir.path().join("server.key"), &server_cert.key_pem);
    write(&dir.path().join("other.key"), &other.key_pem);
    write(&dir.path().join("garbage.pem"), "no certificate here\n");
    let base = AggregatorConfig {
        database_url: format!("sqlite://{}", dir.path().join("aggregator.db").display()),
        grpc_listen: "127.0.0.1:0".parse().expect("address"),
        http_listen: "127.0.0.1:0".parse().expect("address"),
        tls_cert_path: Some(dir.path().join("server.crt")),
        tls_key_path: Some(dir.path().join("server.key")),
        ..AggregatorConfig::default()
    };
    let cases = [
        (
            AggregatorConfig {
                tls_cert_path: Some(dir.path().join("missing.crt")),
                ..base.clone()
            },
            "tls_cert_path",
            "cannot be read",
        ),
        (
            AggregatorConfig {
                tls_cert_path: Some(dir.path().join("garbage.pem")),
                ..base.clone()
            },
            "tls_cert_path",
            "BEGIN CERTIFICATE",
        ),
        (
            AggregatorConfig {
                tls_key_path: Some(dir.path().join("other.key")),
                ..base.clone()
            },
            "tls_key_path",
            "does not belong to the certificate",
        ),
        (
            AggregatorConfig {
                tls_client_ca_path: Some(dir.path().join("garbage.pem")),
                ..base.clone()
            },
            "tls_client_ca_path",
            "BEGIN CERTIFICATE",
        ),
    ];
    for (config, key, says) in cases {
        let error = match server::start(config).await {
            Ok(_) => panic!("started with an unusable `{key}`"),
            Err(error) => format!("{error:#}"),
        };
        assert!(
            error.contains(key) && error.contains(says),
            "{key}: {error}"
        );
    }
    let only_cert = AggregatorConfig {
        tls_key_path: None,
        ..base.clone()
    };
    let error = only_cert
        .validate()
        .expect_err("a certificate without its key");
    assert!(error.to_string().contains("tls_key_path"), "{error}");
    let ca_without_tls = AggregatorConfig {
        tls_cert_path: None,
        tls_key_path: None,
        tls_client_ca_path: Some(dir.path().join("server.crt")),
        ..base
    };
    let error = ca_without_tls
        .validate()
        .expect_err("a client CA without TLS");
    assert!(error.to_string().contains("tls_client_ca_path"), "{error}");
}

/// The console's session cookie is `Secure` when the aggregator serves TLS itself.
#[tokio::test]
async fn the_console_session_cookie_is_secure_under_tls() {
    let tls = TlsServer::start(|_, _| {}).await;
    let token =
        license_sync_aggregator::admin::create_api_token(&tls.server.app.store, "acme", "console")
            .await
            .expect("token");
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(tls.ca.cert_pem().as_bytes()).expect("CA"),
        )
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let signed = client
        .post(tls.https("/console/sign-in"))
        .form(&[("token", token.as_str())])
        .send()
        .await
        .expect("HTTPS sign-in");
    assert_eq!(signed.status(), 303);
    let cookie = signed
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .and_then(|value| value.to_str().ok())
        .expect("a session cookie")
        .to_owned();
    for flag in ["; Secure", "HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(cookie.contains(flag), "{flag} in {cookie}");
    }
    tls.server.shutdown().await.expect("clean shutdown");
}
