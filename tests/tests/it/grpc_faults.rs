//! Faults on the gRPC ingest, driven by a raw client so that each stream can be cut or bent exactly:
//! nothing stored may change unless a whole, valid snapshot was committed.

use std::time::Duration;

use license_sync_core::snapshot::Snapshot;
use license_sync_e2e::Aggregator;
use license_sync_e2e::grpc::{self, chunks};
use license_sync_proto::convert::server_user;
use license_sync_proto::v1::snapshot_chunk::Chunk;
use license_sync_proto::v1::snapshot_ingest_client::SnapshotIngestClient;
use license_sync_proto::v1::{SnapshotChunk, UserBatch};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::metadata::MetadataValue;
use uuid::Uuid;

struct Fixture {
    aggregator: Aggregator,
    token: String,
    credential: String,
    server_id: Uuid,
}

fn fixture() -> Fixture {
    fixture_with_env(&[])
}

fn fixture_with_env(env: &[(&str, &str)]) -> Fixture {
    let aggregator = Aggregator::start_with_env(env).expect("aggregator starts");
    aggregator
        .admin(&["enterprise", "create", "--slug", "acme", "--seats", "10"])
        .expect("enterprise");
    let token = aggregator
        .admin(&["token", "create", "--enterprise", "acme", "--name", "owner"])
        .expect("token");
    let server_id = Uuid::new_v4();
    let credential = aggregator
        .admin(&[
            "instance",
            "add",
            "--enterprise",
            "acme",
            "--server-id",
            &server_id.to_string(),
            "--hostname",
            "ghes.test",
        ])
        .expect("credential");
    Fixture {
        aggregator,
        token,
        credential,
        server_id,
    }
}

fn snapshot(server_id: Uuid, users: usize) -> Snapshot {
    grpc::snapshot(server_id, "ghes.test", users)
}

async fn send(
    fixture: &Fixture,
    credential: &str,
    chunks: Vec<SnapshotChunk>,
) -> Result<Value, tonic::Status> {
    let receipt = grpc::send(&fixture.aggregator.grpc_url, credential, chunks).await?;
    Ok(serde_json::json!({
        "users_accepted": receipt.users_accepted,
        "duplicate": receipt.duplicate,
        "sync_id": receipt.sync_id,
    }))
}

async fn consumed(fixture: &Fixture) -> u64 {
    let body: Value = reqwest::Client::new()
        .get(format!(
            "{}/enterprises/acme/consumed-licenses",
            fixture.aggregator.http_url
        ))
        .bearer_auth(&fixture.token)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    body["total_seats_consumed"].as_u64().expect("count")
}

async fn last_error(fixture: &Fixture) -> String {
    let body: Value = reqwest::Client::new()
        .get(format!(
            "{}/enterprises/acme/license-sync-status",
            fixture.aggregator.http_url
        ))
        .bearer_auth(&fixture.token)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    body["server_instances"][0]["last_sync"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_snapshot_is_applied_once_per_sync_id() {
    let fixture = fixture();
    let snap = snapshot(fixture.server_id, 25);
    let first = send(&fixture, &fixture.credential, chunks(&snap))
        .await
        .expect("applied");
    assert_eq!(first["duplicate"], false);
    assert_eq!(first["users_accepted"], 25);
    let retry = send(&fixture, &fixture.credential, chunks(&snap))
        .await
        .expect("acknowledged");
    assert_eq!(retry["duplicate"], true);
    assert_eq!(consumed(&fixture).await, 25);
}

#[tokio::test]
async fn a_stream_cut_halfway_changes_nothing() {
    let fixture = fixture();
    send(
        &fixture,
        &fixture.credential,
        chunks(&snapshot(fixture.server_id, 5)),
    )
    .await
    .expect("baseline");
    assert_eq!(consumed(&fixture).await, 5);

    // Send the header and half the batches, then drop the call mid-stream.
    let bigger = snapshot(fixture.server_id, 40);
    let all = chunks(&bigger);
    let (sender, receiver) = mpsc::channel(16);
    let mut client = SnapshotIngestClient::connect(fixture.aggregator.grpc_url.clone())
        .await
        .expect("connect");
    let mut request = tonic::Request::new(ReceiverStream::new(receiver));
    let value: MetadataValue<_> = format!("Bearer {}", fixture.credential)
        .parse()
        .expect("metadata");
    request.metadata_mut().insert("authorization", value);
    let call = tokio::spawn(async move { client.upload_snapshot(request).await });
    for chunk in all.iter().take(3).cloned() {
        sender.send(chunk).await.expect("send");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    call.abort();
    drop(sender);
    let _ = call.await;

    // The failure is recorded once the server notices the reset; the stored snapshot is intact.
    let mut error = String::new();
    for _ in 0..50 {
        error = last_error(&fixture).await;
        if !error.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        error.contains("interrupted") || error.contains("ended before"),
        "{error}"
    );
    assert_eq!(consumed(&fixture).await, 5);
}

#[tokio::test]
async fn a_stream_without_trailer_or_with_a_bad_digest_changes_nothing() {
    let fixture = fixture();
    send(
        &fixture,
        &fixture.credential,
        chunks(&snapshot(fixture.server_id, 5)),
    )
    .await
    .expect("baseline");

    let snap = snapshot(fixture.server_id, 30);
    let mut no_trailer = chunks(&snap);
    no_trailer.pop();
    let status = send(&fixture, &fixture.credential, no_trailer)
        .await
        .expect_err("incomplete");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("trailer"), "{}", status.message());

    let mut bad_digest = chunks(&snap);
    if let Some(SnapshotChunk {
        chunk: Some(Chunk::Trailer(trailer)),
    }) = bad_digest.last_mut()
    {
        trailer.users_sha256[0] ^= 0xff;
    }
    let status = send(&fixture, &fixture.credential, bad_digest)
        .await
        .expect_err("digest");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("digest"), "{}", status.message());

    let mut bad_count = chunks(&snap);
    if let Some(SnapshotChunk {
        chunk: Some(Chunk::Trailer(trailer)),
    }) = bad_count.last_mut()
    {
        trailer.user_count += 1;
    }
    let status = send(&fixture, &fixture.credential, bad_count)
        .await
        .expect_err("count");
    assert_eq!(status.code(), Code::InvalidArgument);

    let mut duplicated = snap.clone();
    duplicated.users[7].id = 3;
    let status = send(&fixture, &fixture.credential, chunks(&duplicated))
        .await
        .expect_err("duplicate ids");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("more than once"),
        "{}",
        status.message()
    );

    assert_eq!(consumed(&fixture).await, 5);
}

#[tokio::test]
async fn credentials_are_checked_against_the_instance() {
    let fixture = fixture();
    let snap = snapshot(fixture.server_id, 3);
    let status = send(&fixture, "lsi_unknown", chunks(&snap))
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), Code::Unauthenticated);

    // A valid credential of another instance cannot write this instance's snapshot.
    let other_id = Uuid::new_v4();
    let other_credential = fixture
        .aggregator
        .admin(&[
            "instance",
            "add",
            "--enterprise",
            "acme",
            "--server-id",
            &other_id.to_string(),
            "--hostname",
            "other.test",
        ])
        .expect("credential");
    let status = send(&fixture, &other_credential, chunks(&snap))
        .await
        .expect_err("foreign");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(consumed(&fixture).await, 0);
}

#[tokio::test]
async fn an_older_snapshot_is_refused_with_failed_precondition() {
    let fixture = fixture();
    let newer = snapshot(fixture.server_id, 4);
    let mut older = snapshot(fixture.server_id, 9);
    older.meta.generated_at = newer.meta.generated_at - time::Duration::hours(1);
    send(&fixture, &fixture.credential, chunks(&newer))
        .await
        .expect("applied");
    let status = send(&fixture, &fixture.credential, chunks(&older))
        .await
        .expect_err("older");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(consumed(&fixture).await, 4);
}

#[tokio::test]
async fn oversized_snapshots_and_uploads_are_refused_with_the_limit() {
    let fixture = fixture_with_env(&[
        ("LICENSE_SYNC_AGGREGATOR_MAX_SNAPSHOT_USERS", "20"),
        ("LICENSE_SYNC_AGGREGATOR_MAX_MESSAGE_BYTES", "65536"),
        ("LICENSE_SYNC_AGGREGATOR_MAX_UPLOAD_BYTES", "2048"),
    ]);
    let status = send(
        &fixture,
        &fixture.credential,
        chunks(&snapshot(fixture.server_id, 30)),
    )
    .await
    .expect_err("over max_snapshot_users");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("max_snapshot_users"),
        "{}",
        status.message()
    );

    // One batch larger than max_message_bytes.
    let snap = snapshot(fixture.server_id, 1000);
    let mut one_batch = vec![chunks(&snap).remove(0)];
    one_batch.push(SnapshotChunk {
        chunk: Some(Chunk::Users(UserBatch {
            users: snap.users.iter().map(server_user).collect(),
        })),
    });
    let status = send(&fixture, &fixture.credential, one_batch)
        .await
        .expect_err("message too large");
    assert_eq!(status.code(), Code::ResourceExhausted);

    let response = reqwest::Client::new()
        .post(format!(
            "{}/enterprises/acme/server-usage",
            fixture.aggregator.http_url
        ))
        .bearer_auth(&fixture.token)
        .body(vec![b' '; 4096])
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.expect("json");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_upload_bytes")),
        "{body}"
    );
    assert_eq!(consumed(&fixture).await, 0);
}

#[tokio::test]
async fn grpc_health_and_reflection_are_served() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let fixture = fixture();
    let channel = tonic::transport::Endpoint::from_shared(fixture.aggregator.grpc_url.clone())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel.clone());
    let answer = health
        .check(HealthCheckRequest {
            service: "licensesync.v1.SnapshotIngest".into(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(
        answer.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("message")
        .expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "licensesync.v1.SnapshotIngest",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            names.contains(&service.to_owned()),
            "v1 lists {service}: {names:?}"
        );
    }
}

/// Reflection v1alpha, which Python's `grpcio-reflection` and older `grpcurl` speak, lists the same services and
/// describes them.
#[tokio::test]
async fn grpc_reflection_v1alpha_is_served_beside_v1() {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let fixture = fixture();
    let channel = tonic::transport::Endpoint::from_shared(fixture.aggregator.grpc_url.clone())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut reflection = ServerReflectionClient::new(channel);
    let requests = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "licensesync.v1.SnapshotIngest".into(),
            )),
        },
    ];
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter(requests))
        .await
        .expect("reflection v1alpha")
        .into_inner();
    let listed = responses.message().await.expect("message").expect("a list");
    let Some(MessageResponse::ListServicesResponse(list)) = listed.message_response else {
        panic!("unexpected v1alpha answer: {listed:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "licensesync.v1.SnapshotIngest",
        "licensesync.v1.Enrollment",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            names.contains(&service.to_owned()),
            "v1alpha lists {service}: {names:?}"
        );
    }
    let described = responses.message().await.expect("message").expect("a file");
    let Some(MessageResponse::FileDescriptorResponse(files)) = described.message_response else {
        panic!("unexpected v1alpha answer: {described:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

#[tokio::test]
async fn a_stalled_stream_is_abandoned_after_the_idle_timeout() {
    let fixture = fixture_with_env(&[("LICENSE_SYNC_AGGREGATOR_STREAM_IDLE_TIMEOUT_SECS", "1")]);
    let snap = snapshot(fixture.server_id, 5);
    let (sender, receiver) = mpsc::channel(4);
    let mut client = SnapshotIngestClient::connect(fixture.aggregator.grpc_url.clone())
        .await
        .expect("connect");
    let mut request = tonic::Request::new(ReceiverStream::new(receiver));
    let value: MetadataValue<_> = format!("Bearer {}", fixture.credential)
        .parse()
        .expect("metadata");
    request.metadata_mut().insert("authorization", value);
    sender.send(chunks(&snap).remove(0)).await.expect("header");
    // Keep the stream open but silent: the aggregator gives up and answers.
    let status = client
        .upload_snapshot(request)
        .await
        .expect_err("abandoned");
    drop(sender);
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("sent nothing"),
        "{}",
        status.message()
    );
    assert!(last_error(&fixture).await.contains("sent nothing"));
    assert_eq!(consumed(&fixture).await, 0);
}
