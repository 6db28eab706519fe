//! The gRPC client against a tiny in-process `SnapshotIngest` server that records what it receives.

use std::sync::{Arc, Mutex};

use crate::common::*;
use futures::StreamExt as _;
use license_sync_agent::AgentError;
use license_sync_agent::commands;
use license_sync_agent::upload_client::UploadClient;
use license_sync_core::model::{InstanceIdentity, ServerUser, SourceReport, UserRole};
use license_sync_core::snapshot::{Snapshot, SnapshotDigest, SnapshotMeta};
use license_sync_proto::convert;
use license_sync_proto::v1::snapshot_chunk::Chunk;
use license_sync_proto::v1::snapshot_ingest_server::{SnapshotIngest, SnapshotIngestServer};
use license_sync_proto::v1::{SnapshotChunk, SyncReceipt};
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use uuid::Uuid;

/// What one call delivered.
#[derive(Debug, Default, Clone)]
struct Received {
    authorization: Option<String>,
    /// `h`, `u<n>` (a batch of n users), `t`: the shape of the stream.
    shape: Vec<String>,
    meta: Option<SnapshotMeta>,
    users: Vec<ServerUser>,
    trailer_count: Option<u64>,
    trailer_digest: Vec<u8>,
}

#[derive(Clone)]
struct Recorder {
    calls: Arc<Mutex<Vec<Received>>>,
    /// Answer with this status instead of a receipt.
    refuse_with: Option<tonic::Status>,
}

#[tonic::async_trait]
impl SnapshotIngest for Recorder {
    async fn upload_snapshot(
        &self,
        request: tonic::Request<tonic::Streaming<SnapshotChunk>>,
    ) -> Result<tonic::Response<SyncReceipt>, tonic::Status> {
        let mut received = Received {
            authorization: request
                .metadata()
                .get("authorization")
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned),
            ..Received::default()
        };
        let mut stream = request.into_inner();
        while let Some(chunk) = stream.next().await {
            match chunk?.chunk {
                Some(Chunk::Header(header)) => {
                    received.shape.push("h".into());
                    received.meta = Some(
                        convert::snapshot_meta_from_proto(header)
                            .map_err(|error| tonic::Status::invalid_argument(error.to_string()))?,
                    );
                }
                Some(Chunk::Users(batch)) => {
                    received.shape.push(format!("u{}", batch.users.len()));
                    for user in batch.users {
                        received.users.push(
                            convert::server_user_from_proto(user).map_err(|error| {
                                tonic::Status::invalid_argument(error.to_string())
                            })?,
                        );
                    }
                }
                Some(Chunk::Trailer(trailer)) => {
                    received.shape.push("t".into());
                    received.trailer_count = Some(trailer.user_count);
                    received.trailer_digest = trailer.users_sha256;
                }
                None => return Err(tonic::Status::invalid_argument("empty chunk")),
            }
        }
        let meta = received.meta.clone();
        let users_accepted = received.users.len() as u64;
        self.calls.lock().expect("lock").push(received);
        if let Some(status) = &self.refuse_with {
            return Err(status.clone());
        }
        let meta = meta.ok_or_else(|| tonic::Status::invalid_argument("no header"))?;
        Ok(tonic::Response::new(SyncReceipt {
            sync_id: meta.sync_id.to_string(),
            server_id: meta.instance.server_id.to_string(),
            users_accepted,
            committed_at: Some(convert::timestamp(time::OffsetDateTime::now_utc())),
            duplicate: false,
        }))
    }
}

struct TestServer {
    endpoint: String,
    calls: Arc<Mutex<Vec<Received>>>,
    _shutdown: oneshot::Sender<()>,
}

async fn start_server(refuse_with: Option<tonic::Status>) -> TestServer {
    start_server_with(refuse_with, false).await
}

fn tls_fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

async fn start_server_with(refuse_with: Option<tonic::Status>, tls: bool) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let scheme = if tls { "https" } else { "http" };
    let endpoint = format!("{scheme}://{}", listener.local_addr().expect("addr"));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let recorder = Recorder {
        calls: calls.clone(),
        refuse_with,
    };
    let (shutdown, signal) = oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder();
    if tls {
        let identity = tonic::transport::Identity::from_pem(
            std::fs::read(tls_fixture("server.pem")).expect("server certificate"),
            std::fs::read(tls_fixture("server.key")).expect("server key"),
        );
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .expect("server TLS");
    }
    tokio::spawn(
        builder
            .add_service(SnapshotIngestServer::new(recorder))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = signal.await;
            }),
    );
    TestServer {
        endpoint,
        calls,
        _shutdown: shutdown,
    }
}

fn user(id: i64) -> ServerUser {
    ServerUser {
        id,
        login: format!("user{id}"),
        email: format!("user{id}@example.com"),
        role: if id == 1 {
            UserRole::SiteAdmin
        } else {
            UserRole::User
        },
        suspended: id % 7 == 0,
        dormant: id % 5 == 0,
        created_at: Some(time::macros::datetime!(2020-01-01 00:00:00 UTC)),
        last_active: None,
        two_factor_enabled: Some(id % 2 == 0),
    }
}

fn snapshot(users: usize) -> Snapshot {
    Snapshot {
        meta: SnapshotMeta {
            sync_id: Uuid::now_v7(),
            instance: InstanceIdentity {
                server_id: SERVER_ID,
                hostname: "ghes-1.example.com".into(),
                ghes_version: "3.14.2".into(),
            },
            generated_at: time::macros::datetime!(2025-11-28 12:00:00 UTC),
            license: None,
            source_report: SourceReport {
                rows_read: users as u64 + 1,
                rows_skipped: 1,
            },
        },
        users: (1..=users as i64).map(user).collect(),
    }
}

#[tokio::test]
async fn streams_header_batches_and_trailer_with_digest_and_credential() {
    let server = start_server(None).await;
    let mut client = UploadClient::connect(&aggregator_config(&server.endpoint, 10))
        .await
        .expect("connect");
    let snapshot = Arc::new(snapshot(25));
    let receipt = client.upload(snapshot.clone()).await.expect("upload");

    assert_eq!(receipt.sync_id, snapshot.meta.sync_id);
    assert_eq!(receipt.server_id, SERVER_ID);
    assert_eq!(receipt.users_accepted, 25);
    assert!(!receipt.duplicate);
    assert!(receipt.committed_at.is_some());

    let calls = server.calls.lock().expect("lock").clone();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(
        call.authorization.as_deref(),
        Some("Bearer lsi_test_credential")
    );
    assert_eq!(call.shape, ["h", "u10", "u10", "u5", "t"]);
    assert_eq!(call.meta.as_ref(), Some(&snapshot.meta));
    assert_eq!(call.users, snapshot.users);
    assert_eq!(call.trailer_count, Some(25));
    assert_eq!(call.trailer_digest, snapshot.digest().to_vec());
    // The digest the server can recompute from what it received matches the trailer.
    let mut digest = SnapshotDigest::default();
    call.users.iter().for_each(|user| digest.update(user));
    assert_eq!(digest.finish().to_vec(), call.trailer_digest);
}

#[tokio::test]
async fn an_empty_snapshot_is_a_header_and_a_trailer() {
    let server = start_server(None).await;
    let mut client = UploadClient::connect(&aggregator_config(&server.endpoint, 1000))
        .await
        .expect("connect");
    let receipt = client.upload(Arc::new(snapshot(0))).await.expect("upload");
    assert_eq!(receipt.users_accepted, 0);
    let calls = server.calls.lock().expect("lock").clone();
    assert_eq!(calls[0].shape, ["h", "t"]);
    assert_eq!(calls[0].trailer_count, Some(0));
}

#[tokio::test]
async fn refusals_map_to_errors_that_say_what_to_do() {
    // (answer, expected `AgentError::kind`, text the message must contain)
    let cases = [
        (
            tonic::Status::unauthenticated("unknown instance credential"),
            "aggregator_credentials",
            "license-sync-aggregator instance add",
        ),
        (
            tonic::Status::failed_precondition("stored snapshot generated at 2025-11-28T13:00:00Z"),
            "stale_snapshot",
            "2025-11-28T13:00:00Z",
        ),
        (
            tonic::Status::permission_denied("credential bound to another instance"),
            "aggregator_permission",
            "instance.server_id",
        ),
        (
            tonic::Status::invalid_argument("duplicate user id 3"),
            "snapshot_rejected",
            "duplicate user id 3",
        ),
    ];
    for (status, kind, text) in cases {
        let code = status.code();
        let server = start_server(Some(status)).await;
        let mut client = UploadClient::connect(&aggregator_config(&server.endpoint, 10))
            .await
            .expect("connect");
        let error = client
            .upload(Arc::new(snapshot(3)))
            .await
            .expect_err("refused");
        assert_eq!(error.kind(), kind, "{code:?} gave {error:?}");
        assert!(error.to_string().contains(text), "{error}");
        assert_eq!(error.grpc_code(), code);
        assert!(!error.is_retryable());
        assert_eq!(error.exit_code(), 5);
    }
}

#[tokio::test]
async fn an_unreachable_aggregator_is_a_retryable_error() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let error = UploadClient::connect(&aggregator_config(&format!("http://127.0.0.1:{port}"), 10))
        .await
        .expect_err("nothing listens");
    assert!(
        matches!(error, AgentError::AggregatorUnavailable { .. }),
        "{error:?}"
    );
    assert!(error.is_retryable());
    assert_eq!(error.exit_code(), 4);
}

#[tokio::test]
async fn sync_reads_ghes_and_streams_the_snapshot() {
    let sim = start_sim(|config| config.pending_polls = 1).await;
    let server = start_server(None).await;
    let mut config = ghes_config(ghes_source(&sim));
    config.aggregator = Some(aggregator_config(&server.endpoint, 2));
    let summary = commands::sync(&config).await.expect("sync");

    assert_eq!(summary.users_sent, 4);
    assert_eq!(summary.users_accepted, 4);
    assert_eq!((summary.rows_read, summary.rows_skipped), (5, 1));
    assert_eq!(summary.skipped.len(), 1);
    assert_eq!(summary.skipped[0].line, 5);
    assert_eq!(summary.skipped[0].kind, "invalid_id");
    assert_eq!(summary.hostname, "ghes-1.example.com");

    let calls = server.calls.lock().expect("lock").clone();
    assert_eq!(calls[0].shape, ["h", "u2", "u2", "t"]);
    let meta = calls[0].meta.clone().expect("header");
    assert_eq!(meta.sync_id, summary.sync_id);
    assert_eq!(
        meta.instance.ghes_version, "3.14.2",
        "read from /api/v3/meta"
    );
    assert_eq!(
        meta.source_report,
        SourceReport {
            rows_read: 5,
            rows_skipped: 1
        }
    );
    let license = meta.license.expect("license sent");
    assert_eq!(license.seats, Some(1000));
    assert_eq!(meta.generated_at.nanosecond(), 0);

    let json = serde_json::to_value(&summary).expect("JSON");
    for key in [
        "sync_id",
        "server_id",
        "hostname",
        "users_sent",
        "users_accepted",
        "duplicate",
        "committed_at",
        "rows_read",
        "rows_skipped",
        "skipped",
    ] {
        assert!(json.get(key).is_some(), "{key} missing in {json}");
    }
    assert!(
        json["committed_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{json}"
    );
}

#[tokio::test]
async fn https_endpoints_trust_the_configured_ca() {
    let server = start_server_with(None, true).await;
    let mut config = aggregator_config(&server.endpoint, 10);
    config.ca_cert = Some(tls_fixture("ca.pem"));
    let mut client = UploadClient::connect(&config).await.expect("TLS connect");
    let receipt = client.upload(Arc::new(snapshot(3))).await.expect("upload");
    assert_eq!(receipt.users_accepted, 3);

    // Without the private CA, the server's certificate is not trusted.
    config.ca_cert = None;
    let error = UploadClient::connect(&config)
        .await
        .expect_err("unknown issuer");
    assert!(
        matches!(error, AgentError::AggregatorUnavailable { .. }),
        "{error:?}"
    );
    let text = error.to_string().to_lowercase();
    assert!(
        text.contains("certificate") || text.contains("issuer"),
        "{text}"
    );
}
