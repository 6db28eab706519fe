//! gRPC ingest: receives a snapshot stream (header, user batches, trailer), checks it whole, then hands it to the
//! one commit path. Nothing is written before the trailer has been checked, so a cut or invalid stream changes
//! nothing stored.
//!
//! One instance credential cannot make the aggregator hold more than its share: each stream takes a slot (at most
//! `ingest_max_streams_per_instance` per instance, `ingest_max_streams` in all, released when the stream's task
//! ends, however it ends), and each stream has a budget of bytes, messages and time; rows are checked for their
//! field lengths as their batch arrives.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use license_sync_core::snapshot::{Snapshot, SnapshotDigest, SnapshotError, validate_user_fields};
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
use crate::tls;

pub struct IngestService {
    app: Arc<App>,
    slots: Arc<StreamSlots>,
}

impl IngestService {
    pub fn new(app: Arc<App>) -> Self {
        let slots = Arc::new(StreamSlots {
            per_instance: app.config.ingest_max_streams_per_instance,
            total: app.config.ingest_max_streams,
            open: Mutex::default(),
            metrics: Arc::clone(&app.metrics),
        });
        IngestService { app, slots }
    }
}

/// The snapshot streams open in this process: how many in all and per instance.
struct StreamSlots {
    per_instance: usize,
    total: usize,
    open: Mutex<OpenStreams>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct OpenStreams {
    total: usize,
    by_instance: HashMap<i64, usize>,
}

impl StreamSlots {
    /// A slot for a new stream of `instance`, or `Busy` saying which limit is reached.
    fn take(self: &Arc<Self>, instance: &Instance) -> ServiceResult<StreamSlot> {
        // Held for a few integer updates, never across an await; no input can poison it.
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let of_instance = open.by_instance.get(&instance.id).copied().unwrap_or(0);
        if of_instance >= self.per_instance {
            return Err(ServiceError::new(
                ErrorKind::Busy,
                format!(
                    "instance {} already has {of_instance} snapshot streams open, the limit of \
                     `ingest_max_streams_per_instance`: wait for the running sync to finish (the agent retries \
                     with backoff)",
                    instance.server_id
                ),
            ));
        }
        if open.total >= self.total {
            return Err(ServiceError::new(
                ErrorKind::Busy,
                format!(
                    "the aggregator has {} snapshot streams open, the limit of `ingest_max_streams`: try again \
                     later (the agent retries with backoff)",
                    open.total
                ),
            ));
        }
        open.total += 1;
        *open.by_instance.entry(instance.id).or_default() += 1;
        self.metrics.set_ingest_streams_open(open.total);
        Ok(StreamSlot {
            slots: Arc::clone(self),
            instance_id: instance.id,
        })
    }
}

/// One open stream's slot, given back when dropped: a stream cut at any point frees it with its task.
struct StreamSlot {
    slots: Arc<StreamSlots>,
    instance_id: i64,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self
            .slots
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.total = open.total.saturating_sub(1);
        if let Some(count) = open.by_instance.get_mut(&self.instance_id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.by_instance.remove(&self.instance_id);
            }
        }
        self.slots.metrics.set_ingest_streams_open(open.total);
    }
}

/// Set when a call's request body failed in transport (the client reset the stream, or its connection broke).
/// tonic reads a client's `RST_STREAM(CANCEL)` as the end of the stream, so without this a crashed agent's cut
/// stream would look like one that ended before its trailer, a client error.
#[derive(Clone, Debug, Default)]
pub struct TransportCut(Arc<AtomicBool>);

impl TransportCut {
    fn happened(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Gives each gRPC request body a [`TransportCut`] (in the request's extensions) that the body sets when it fails:
/// `tonic::transport::Server::layer(tower::util::MapRequestLayer::new(watch_for_cuts))`.
pub fn watch_for_cuts(
    request: axum::http::Request<tonic::body::Body>,
) -> axum::http::Request<tonic::body::Body> {
    let cut = TransportCut::default();
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(cut.clone());
    axum::http::Request::from_parts(
        parts,
        tonic::body::Body::new(CutWatchingBody { inner: body, cut }),
    )
}

struct CutWatchingBody {
    inner: tonic::body::Body,
    cut: TransportCut,
}

impl http_body::Body for CutWatchingBody {
    type Data = <tonic::body::Body as http_body::Body>::Data;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            self.cut.0.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The credential from `authorization: Bearer <credential>` metadata.
fn bearer_credential<T>(request: &Request<T>) -> ServiceResult<String> {
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

/// Who a credential-bearing call says it is: its credential, its client certificate (mTLS) and its address (for the
/// failed-authentication limit). Read from the request before any await, since a request's body need not be `Sync`.
pub(crate) struct Caller {
    credential: String,
    certificates: Option<Arc<[rustls_pki_types::CertificateDer<'static>]>>,
    client: Option<std::net::IpAddr>,
}

impl Caller {
    pub(crate) fn of<T>(request: &Request<T>) -> ServiceResult<Caller> {
        Ok(Caller {
            credential: bearer_credential(request)?,
            certificates: tls::client_certificates(request),
            client: crate::auth_limit::grpc_client_address(request),
        })
    }

    pub(crate) fn credential(&self) -> &str {
        &self.credential
    }

    /// The instance of the caller's credential: the one check of every call an agent makes with it.
    pub(crate) async fn authenticate(&self, app: &App) -> ServiceResult<Instance> {
        app.authenticate_instance(&self.credential, self.certificates.as_deref(), self.client)
            .await
    }
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
        let instance = Caller::of(&request)?.authenticate(&self.app).await?;
        let span = tracing::Span::current();
        span.record("enterprise_id", instance.enterprise_id);
        span.record("server_id", tracing::field::display(instance.server_id));
        span.record("hostname", instance.hostname.as_str());
        let slot = self.slots.take(&instance)?;
        let cut = request
            .extensions()
            .get::<TransportCut>()
            .cloned()
            .unwrap_or_default();
        let stream = ChunkReader::new(&self.app, request.into_inner(), cut);
        // Its own task: when a client resets the stream, the server drops this handler's future, but the ingest
        // still runs to its end, so the failed attempt is recorded and a started commit completes or rolls back.
        // The task holds the stream's slot until then.
        let app = Arc::clone(&self.app);
        tokio::spawn(
            async move {
                let _slot = slot;
                ingest(app, instance, stream).await
            }
            .instrument(span),
        )
        .await
        .map_err(|err| ServiceError::internal("receiving a snapshot", err))?
    }
}

async fn ingest(
    app: Arc<App>,
    instance: Instance,
    mut stream: ChunkReader,
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

/// A snapshot stream with its budget: bytes, messages and a total deadline on top of the idle timeout.
struct ChunkReader {
    stream: Streaming<SnapshotChunk>,
    cut: TransportCut,
    metrics: Arc<Metrics>,
    idle_timeout: Duration,
    max_message_bytes: usize,
    max_bytes: u64,
    max_messages: u64,
    max_secs: u64,
    deadline: tokio::time::Instant,
    bytes: u64,
    messages: u64,
}

impl ChunkReader {
    fn new(app: &App, stream: Streaming<SnapshotChunk>, cut: TransportCut) -> Self {
        let config = &app.config;
        ChunkReader {
            stream,
            cut,
            metrics: Arc::clone(&app.metrics),
            idle_timeout: Duration::from_secs(config.stream_idle_timeout_secs),
            max_message_bytes: config.max_message_bytes,
            max_bytes: config.max_stream_bytes(),
            max_messages: config.max_stream_messages(),
            max_secs: config.ingest_stream_max_secs,
            deadline: tokio::time::Instant::now()
                + Duration::from_secs(config.ingest_stream_max_secs),
            bytes: 0,
            messages: 0,
        }
    }

    fn over_budget(&self, message: String) -> ServiceError {
        self.metrics.rejected(Rejection::StreamBudget);
        ServiceError::new(ErrorKind::ResourceExhausted, message)
    }

    fn interrupted(&self, detail: &str) -> ServiceError {
        ServiceError::new(
            ErrorKind::Cancelled,
            format!(
                "the snapshot stream was interrupted: the agent cut it ({detail}); nothing was changed, the agent \
                 sends the snapshot again"
            ),
        )
    }

    /// The next message of the stream. Refusals of its shape are counted in `metrics`; a silent or broken stream
    /// is not a refusal of the snapshot.
    async fn next(&mut self) -> ServiceResult<Option<Chunk>> {
        let until_deadline = self
            .deadline
            .saturating_duration_since(tokio::time::Instant::now());
        let wait = self.idle_timeout.min(until_deadline);
        let Ok(message) = tokio::time::timeout(wait, self.stream.message()).await else {
            if until_deadline <= self.idle_timeout {
                return Err(self.over_budget(format!(
                    "the snapshot stream was still open after {} s, the limit of `ingest_stream_max_secs`; nothing \
                     was changed: send the snapshot over a faster link, or raise `ingest_stream_max_secs` on the \
                     aggregator",
                    self.max_secs
                )));
            }
            return Err(ServiceError::invalid(format!(
                "the snapshot stream sent nothing for {} s and was abandoned; nothing was changed, send the snapshot again",
                self.idle_timeout.as_secs()
            )));
        };
        let message = match message {
            Ok(Some(message)) => message,
            // tonic ends the stream quietly when the client resets it: only the transport can tell a cut.
            Ok(None) if self.cut.happened() => return Err(self.interrupted("stream reset")),
            Ok(None) => return Ok(None),
            Err(status) if status.code() == tonic::Code::OutOfRange => {
                self.metrics.rejected(Rejection::MessageTooLarge);
                return Err(ServiceError::new(
                    ErrorKind::ResourceExhausted,
                    format!(
                        "a stream message is over the aggregator's limit of {} bytes (`max_message_bytes`); nothing \
                         was changed: lower the agent's `aggregator.batch_size`",
                        self.max_message_bytes
                    ),
                ));
            }
            Err(status) if self.cut.happened() => {
                return Err(self.interrupted(&format!("{}: {}", status.code(), status.message())));
            }
            Err(status) => {
                self.metrics.rejected(Rejection::MalformedStream);
                return Err(ServiceError::invalid(format!(
                    "a stream message cannot be decoded ({}: {}); nothing was changed: the agent and the \
                     aggregator must speak licensesync.v1",
                    status.code(),
                    status.message()
                )));
            }
        };
        self.messages += 1;
        if self.messages > self.max_messages {
            return Err(self.over_budget(format!(
                "the snapshot stream sent more than {} messages, the limit of `ingest_max_stream_messages`; nothing \
                 was changed: send users in batches of at least 10 (the agent's `aggregator.batch_size`), or raise \
                 `ingest_max_stream_messages` on the aggregator",
                self.max_messages
            )));
        }
        self.bytes = self
            .bytes
            .saturating_add(prost::Message::encoded_len(&message) as u64);
        if self.bytes > self.max_bytes {
            return Err(self.over_budget(format!(
                "the snapshot stream carried more than {} bytes, the limit of `ingest_max_stream_bytes`; nothing was \
                 changed: check the users' field sizes, or raise `ingest_max_stream_bytes` on the aggregator",
                self.max_bytes
            )));
        }
        match message.chunk {
            Some(chunk) => Ok(Some(chunk)),
            None => {
                self.metrics.rejected(Rejection::MalformedStream);
                Err(ServiceError::invalid(
                    "received an empty stream message: every message must carry a header, users or a trailer",
                ))
            }
        }
    }
}

/// Reads the whole stream and checks its shape, count and digest.
async fn receive_snapshot(
    app: &App,
    instance: &Instance,
    stream: &mut ChunkReader,
) -> ServiceResult<(Snapshot, [u8; 32])> {
    let metrics = &*app.metrics;
    let refuse = |reason: Rejection, error: ServiceError| {
        metrics.rejected(reason);
        error
    };
    let header = match stream.next().await? {
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
        match stream.next().await? {
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
                    // As the batch arrives: an oversized row is refused before more of the stream is held.
                    validate_user_fields(row, &user)
                        .map_err(|err| refuse(Rejection::of(&err), err.into()))?;
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
