//! Raw gRPC helpers: build a snapshot and its stream chunks exactly, and send them, so tests can bend or cut a
//! stream where the agent never would.

use license_sync_core::model::{InstanceIdentity, ServerUser, SourceReport, UserRole};
use license_sync_core::snapshot::{Snapshot, SnapshotMeta};
use license_sync_proto::convert::{server_user, snapshot_header};
use license_sync_proto::v1::snapshot_chunk::Chunk;
use license_sync_proto::v1::snapshot_ingest_client::SnapshotIngestClient;
use license_sync_proto::v1::{SnapshotChunk, SnapshotTrailer, SyncReceipt, UserBatch};
use time::OffsetDateTime;
use tonic::metadata::MetadataValue;
use uuid::Uuid;

/// `users` accounts `user1..userN` with emails `userN@example.com`, generated a minute ago.
pub fn snapshot(server_id: Uuid, hostname: &str, users: usize) -> Snapshot {
    Snapshot {
        meta: SnapshotMeta {
            sync_id: Uuid::new_v4(),
            instance: InstanceIdentity {
                server_id,
                hostname: hostname.to_owned(),
                ghes_version: "3.14.2".into(),
            },
            generated_at: OffsetDateTime::now_utc() - time::Duration::minutes(1),
            license: None,
            source_report: SourceReport::default(),
        },
        users: (1..=users as i64)
            .map(|id| ServerUser {
                id,
                login: format!("user{id}"),
                email: format!("user{id}@example.com"),
                role: UserRole::User,
                suspended: false,
                dormant: false,
                created_at: None,
                last_active: None,
                two_factor_enabled: None,
            })
            .collect(),
    }
}

/// Header, batches of 10 users, trailer with the right count and digest.
pub fn chunks(snapshot: &Snapshot) -> Vec<SnapshotChunk> {
    let mut chunks = vec![SnapshotChunk {
        chunk: Some(Chunk::Header(snapshot_header(&snapshot.meta))),
    }];
    for batch in snapshot.users.chunks(10) {
        chunks.push(SnapshotChunk {
            chunk: Some(Chunk::Users(UserBatch {
                users: batch.iter().map(server_user).collect(),
            })),
        });
    }
    chunks.push(SnapshotChunk {
        chunk: Some(Chunk::Trailer(SnapshotTrailer {
            user_count: snapshot.users.len() as u64,
            users_sha256: snapshot.digest().to_vec(),
        })),
    });
    chunks
}

/// Streams `chunks` to the aggregator at `grpc_url` with the instance credential.
pub async fn send(
    grpc_url: &str,
    credential: &str,
    chunks: Vec<SnapshotChunk>,
) -> Result<SyncReceipt, tonic::Status> {
    let mut client = SnapshotIngestClient::connect(grpc_url.to_owned())
        .await
        .map_err(|err| tonic::Status::unavailable(err.to_string()))?;
    let mut request = tonic::Request::new(futures::stream::iter(chunks));
    let value: MetadataValue<_> = format!("Bearer {credential}")
        .parse()
        .map_err(|_| tonic::Status::invalid_argument("credential is not valid metadata"))?;
    request.metadata_mut().insert("authorization", value);
    Ok(client.upload_snapshot(request).await?.into_inner())
}
