//! gRPC ingest: receives a snapshot stream (header, user batches, trailer), checks it whole, then hands it to the
//! one commit path. Nothing is written before the trailer has been checked, so a cut or invalid stream changes
//! nothing stored.

use std::sync::Arc;
use std::time::Duration;

use license_sync_core::snapshot::{Snapshot, SnapshotDigest, SnapshotError};
use license_sync_proto::convert::{server_user_from_proto, snapshot_meta_from_proto, timestamp};
use license_sync_proto::v1::snapshot_chunk::Chunk;
use license_sync_proto::v1::snapshot_ingest_server::SnapshotIngest;
use license_sync_proto::v1::{SnapshotChunk, SyncReceipt};
use time::OffsetDateTime;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;
use tracing::field::Empty;

use crate::app::App;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::metrics::{Metrics, Rejection};
use crate::store::{Arrival, Instance};

pub struct IngestService {
    app: Arc<App>,
}

impl IngestService {
    pub fn new(app: Arc<App>) -> Self {
        IngestService { app }
    }
}

/// The credential from `authorization: Bearer <credential>` metadata.
pub(crate) fn bearer_credential<T>(request: &Request<T>) -> ServiceResult<String> {
    let value = request
        .metadata()
        .get("authorization")
        .ok_or_else(|| {
            ServiceError::unauthenticated(
                "missing `authorization` metadata: the agent must send its instance credential",
            )
        })?
        .to_str()
        .map_err(|_| ServiceError::unauthenticated("the `authorization` metadata is not ASCII"))?;
    let credential = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| {
            ServiceError::unauthenticated(
                "the `authorization` metadata must be `Bearer <credential>`",
            )
        })?;
    Ok(credential.trim().to_owned())
}

#[tonic::async_trait]
impl SnapshotIngest for IngestService {
    async fn upload_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<SyncReceipt>, Status> {
        // The span `aggregator.ingest` continues the agent's trace: a child of its `agent.snapshot_stream` span,
        // named by the `traceparent` metadata.
        let span = tracing::info_span!(
            "aggregator.ingest",
            otel.kind = "server",
            enterprise_id = Empty,
            server_id = Empty,
            hostname = Empty,
            sync_id = Empty,
            users = Empty,
            duplicate = Empty
        );
        license_sync_tracing::set_remote_parent(&span, request.metadata());
        let receipt = self.upload(request).instrument(span.clone()).await;
        match &receipt {
            Ok(receipt) => {
                span.record("duplicate", receipt.duplicate);
            }
            Err(error) => license_sync_tracing::record_failure(&span, error.kind.as_str()),
        }
        let receipt = receipt?;
        Ok(Response::new(SyncReceipt {
            sync_id: receipt.sync_id.to_string(),
            server_id: receipt.server_id.to_string(),
            users_accepted: receipt.users_accepted,
            committed_at: Some(timestamp(receipt.committed_at)),
            duplicate: receipt.duplicate,
        }))
    }
}

impl IngestService {
    async fn upload(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> ServiceResult<crate::app::Receipt> {
        let credential = bearer_credential(&request)?;
        let client = crate::auth_limit::grpc_client_address(&request);
        let instance = self.app.authenticate_instance(&credential, client).await?;
        let span = tracing::Span::current();
        span.record("enterprise_id", instance.enterprise_id);
        span.record("server_id", tracing::field::display(instance.server_id));
        span.record("hostname", instance.hostname.as_str());
        let stream = request.into_inner();
        // Its own task: when a client resets the stream, the server drops this handler's future, but the ingest
        // still runs to its end, so the failed attempt is recorded and a started commit completes or rolls back.
        let app = Arc::clone(&self.app);
        tokio::spawn(ingest(app, instance, stream).instrument(span))
            .await
            .map_err(|err| ServiceError::internal("receiving a snapshot", err))?
    }
}

async fn ingest(
    app: Arc<App>,
    instance: Instance,
    mut stream: Streaming<SnapshotChunk>,
) -> ServiceResult<crate::app::Receipt> {
    let received = {
        // Ends with the reception, before the commit.
        let receiving = tracing::info_span!("aggregator.receive", users = Empty);
        let received = receive_snapshot(&app, &instance, &mut stream)
            .instrument(receiving.clone())
            .await;
        match &received {
            Ok((snapshot, _)) => {
                let users = snapshot.users.len() as u64;
                receiving.record("users", users);
                let ingest = tracing::Span::current();
                ingest.record("sync_id", tracing::field::display(snapshot.meta.sync_id));
                ingest.record("users", users);
            }
            Err(error) => license_sync_tracing::record_failure(&receiving, error.kind.as_str()),
        }
        received
    };
    let (snapshot, digest) = match received {
        Ok(received) => received,
        Err(error) => {
            app.record_failure(&instance, Arrival::Connect, &error)
                .await;
            return Err(error);
        }
    };
    app.commit_snapshot(&instance, snapshot, Arrival::Connect, Some(digest))
        .await
}

/// The next message of the stream. Refusals of its shape are counted in `metrics`; a silent or broken stream is not
/// a refusal of the snapshot.
async fn next_chunk(
    stream: &mut Streaming<SnapshotChunk>,
    idle_timeout: Duration,
    metrics: &Metrics,
) -> ServiceResult<Option<Chunk>> {
    let Ok(message) = tokio::time::timeout(idle_timeout, stream.message()).await else {
        return Err(ServiceError::invalid(format!(
            "the snapshot stream sent nothing for {} s and was abandoned; nothing was changed, send the snapshot again",
            idle_timeout.as_secs()
        )));
    };
    match message {
        Ok(Some(SnapshotChunk { chunk: Some(chunk) })) => Ok(Some(chunk)),
        Ok(Some(SnapshotChunk { chunk: None })) => {
            metrics.rejected(Rejection::MalformedStream);
            Err(ServiceError::invalid(
                "received an empty stream message: every message must carry a header, users or a trailer",
            ))
        }
        Ok(None) => Ok(None),
        Err(status) if status.code() == tonic::Code::ResourceExhausted => {
            metrics.rejected(Rejection::MessageTooLarge);
            Err(ServiceError::new(
                ErrorKind::ResourceExhausted,
                format!(
                    "a stream message is over the aggregator's limit ({}); lower the agent's batch_size",
                    status.message()
                ),
            ))
        }
        Err(status) => Err(ServiceError::invalid(format!(
            "the snapshot stream was interrupted ({}: {}); nothing was changed, send the snapshot again",
            status.code(),
            status.message()
        ))),
    }
}

/// Reads the whole stream and checks its shape, count and digest.
async fn receive_snapshot(
    app: &App,
    instance: &Instance,
    stream: &mut Streaming<SnapshotChunk>,
) -> ServiceResult<(Snapshot, [u8; 32])> {
    let idle_timeout = Duration::from_secs(app.config.stream_idle_timeout_secs);
    let metrics = &*app.metrics;
    let refuse = |reason: Rejection, error: ServiceError| {
        metrics.rejected(reason);
        error
    };
    let header = match next_chunk(stream, idle_timeout, metrics).await? {
        Some(Chunk::Header(header)) => header,
        Some(_) => {
            return Err(refuse(
                Rejection::MalformedStream,
                ServiceError::invalid("the snapshot stream must start with a header"),
            ));
        }
        None => {
            return Err(refuse(
                Rejection::MalformedStream,
                ServiceError::invalid("the snapshot stream was empty"),
            ));
        }
    };
    let meta = snapshot_meta_from_proto(header).map_err(|err| {
        refuse(
            Rejection::InvalidIdentity,
            ServiceError::invalid(format!("invalid snapshot header: {err}")),
        )
    })?;
    meta.validate(OffsetDateTime::now_utc())
        .map_err(|err| refuse(Rejection::of(&err), err.into()))?;
    if meta.instance.server_id != instance.server_id {
        metrics.rejected(Rejection::WrongInstance);
        return Err(ServiceError::permission_denied(format!(
            "this credential belongs to instance {}, not {}: use the instance's own credential",
            instance.server_id, meta.instance.server_id
        )));
    }

    let max_users = app.config.max_snapshot_users;
    let mut users = Vec::new();
    let mut digest = SnapshotDigest::default();
    let trailer = loop {
        match next_chunk(stream, idle_timeout, metrics).await? {
            Some(Chunk::Users(batch)) => {
                if users.len() + batch.users.len() > max_users {
                    return Err(refuse(
                        Rejection::TooManyUsers,
                        SnapshotError::TooManyUsers {
                            count: users.len() + batch.users.len(),
                            max: max_users,
                        }
                        .into(),
                    ));
                }
                users.reserve(batch.users.len());
                for wire_user in batch.users {
                    let row = users.len() + 1;
                    let user = server_user_from_proto(wire_user).map_err(|err| {
                        refuse(
                            Rejection::InvalidRow,
                            ServiceError::invalid(format!("user row {row}: {err}")),
                        )
                    })?;
                    digest.update(&user);
                    users.push(user);
                }
            }
            Some(Chunk::Trailer(trailer)) => break trailer,
            Some(Chunk::Header(_)) => {
                return Err(refuse(
                    Rejection::MalformedStream,
                    ServiceError::invalid(
                        "the snapshot stream has a second header; send one snapshot per stream",
                    ),
                ));
            }
            None => {
                return Err(refuse(
                    Rejection::MalformedStream,
                    ServiceError::invalid(
                        "the snapshot stream ended before its trailer: the snapshot is incomplete and nothing was changed; send it again",
                    ),
                ));
            }
        }
    };
    let received = users.len() as u64;
    if trailer.user_count != received {
        return Err(refuse(
            Rejection::CountMismatch,
            SnapshotError::CountMismatch {
                declared: trailer.user_count,
                received,
            }
            .into(),
        ));
    }
    let digest = digest.finish();
    if trailer.users_sha256.as_slice() != digest.as_slice() {
        return Err(refuse(
            Rejection::DigestMismatch,
            SnapshotError::DigestMismatch.into(),
        ));
    }
    Ok((Snapshot { meta, users }, digest))
}
