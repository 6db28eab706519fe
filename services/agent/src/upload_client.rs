//! Sending a snapshot to the aggregator: one client-streaming `UploadSnapshot` call.
//!
//! The stream is one header, the users in batches of `aggregator.batch_size`, then a trailer with the user count
//! and [`Snapshot::digest`], so that the aggregator can tell a complete transfer from a cut one. Protobuf batches are
//! built lazily while the stream is polled: only one batch is ever encoded in memory, whatever the instance size.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt as _, stream};
use license_sync_core::snapshot::Snapshot;
use license_sync_proto::convert;
use license_sync_proto::v1::snapshot_chunk::Chunk;
use license_sync_proto::v1::snapshot_ingest_client::SnapshotIngestClient;
use license_sync_proto::v1::{SnapshotChunk, SnapshotTrailer, SyncReceipt, UserBatch};
use serde::Serialize;
use time::OffsetDateTime;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::config::{AggregatorConfig, ConfigError, ConfigProblem, Secret};
use crate::error::{AgentError, error_chain};

/// Room for one encoded user. GHES logins are at most 39 characters and emails a few dozen: a user encodes to well
/// under 400 bytes, so 1 KiB per user leaves room for unusual rows.
const BYTES_PER_USER: usize = 1024;

/// Floor of the message limits: tonic's own default decoding limit.
const MIN_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// What the aggregator acknowledged, after its commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UploadReceipt {
    pub sync_id: Uuid,
    pub server_id: Uuid,
    pub users_accepted: u64,
    /// True when this sync id had already been applied: nothing was applied again.
    pub duplicate: bool,
    #[serde(with = "time::serde::rfc3339::option")]
    pub committed_at: Option<OffsetDateTime>,
}

/// A connected client of the aggregator's `SnapshotIngest` service.
#[derive(Debug, Clone)]
pub struct UploadClient {
    client: SnapshotIngestClient<Channel>,
    authorization: AsciiMetadataValue,
    endpoint: String,
    batch_size: usize,
}

impl UploadClient {
    /// Connects to `aggregator.endpoint` (TLS for `https`, with `aggregator.ca_cert` as an extra root) with the
    /// credential configured in `[aggregator]`.
    pub async fn connect(config: &AggregatorConfig) -> Result<Self, AgentError> {
        let credential = config.credential()?;
        Self::connect_with(config, &credential).await
    }

    /// Connects with the given instance credential (the enrolled one, see [`crate::config`]).
    pub async fn connect_with(
        config: &AggregatorConfig,
        credential: &Secret,
    ) -> Result<Self, AgentError> {
        let authorization = authorization(credential)?;
        let (channel, endpoint) = connect_channel(config, ChannelKind::Request).await?;
        Ok(Self::from_channel(
            channel,
            endpoint,
            authorization,
            config.batch_size,
        ))
    }

    /// A client over an existing channel (tests, or a caller that manages its own channel).
    pub fn from_channel(
        channel: Channel,
        endpoint: String,
        authorization: AsciiMetadataValue,
        batch_size: usize,
    ) -> Self {
        let batch_size = batch_size.max(1);
        let limit = batch_size
            .saturating_mul(BYTES_PER_USER)
            .max(MIN_MESSAGE_BYTES);
        UploadClient {
            client: SnapshotIngestClient::new(channel)
                .max_encoding_message_size(limit)
                .max_decoding_message_size(MIN_MESSAGE_BYTES),
            authorization,
            endpoint,
            batch_size,
        }
    }

    /// Streams the snapshot and returns the aggregator's receipt, which it sends only after its commit.
    ///
    /// The call is the span `agent.snapshot_stream` (a child of the caller's span), and its W3C trace context goes
    /// with the request's metadata, so that the aggregator's `aggregator.ingest` span is its child.
    pub async fn upload(&mut self, snapshot: Arc<Snapshot>) -> Result<UploadReceipt, AgentError> {
        let span = tracing::info_span!(
            "agent.snapshot_stream",
            otel.kind = "client",
            sync_id = %snapshot.meta.sync_id,
            users = snapshot.users.len() as u64,
            batch_size = self.batch_size as u64,
            duplicate = tracing::field::Empty
        );
        let receipt = self
            .upload_in_span(snapshot, &span)
            .instrument(span.clone())
            .await;
        match &receipt {
            Ok(receipt) => {
                span.record("duplicate", receipt.duplicate);
            }
            Err(error) => license_sync_tracing::record_failure(&span, error.kind()),
        }
        receipt
    }

    async fn upload_in_span(
        &mut self,
        snapshot: Arc<Snapshot>,
        span: &tracing::Span,
    ) -> Result<UploadReceipt, AgentError> {
        let sync_id = snapshot.meta.sync_id;
        let users = snapshot.users.len();
        let mut request = tonic::Request::new(snapshot_chunks(snapshot, self.batch_size));
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        license_sync_tracing::inject_context(span, request.metadata_mut());
        tracing::info!(%sync_id, users, batch_size = self.batch_size, endpoint = %self.endpoint, "uploading the snapshot");
        let receipt = self
            .client
            .upload_snapshot(request)
            .await
            .map_err(|status| status_error(&self.endpoint, status))?
            .into_inner();
        let receipt = receipt_from_proto(receipt)?;
        if receipt.sync_id != sync_id {
            return Err(AgentError::Protocol(format!(
                "the receipt is for sync id {} but sync id {sync_id} was sent",
                receipt.sync_id
            )));
        }
        Ok(receipt)
    }
}

/// What a channel is for: ordinary calls get `aggregator.timeout_secs` as their deadline; the long-lived control
/// session gets none (it lives for days) and HTTP/2 keep-alive pings instead, to notice a dead peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    Request,
    Session,
}

/// The `authorization` metadata value for an instance credential.
pub fn authorization(credential: &Secret) -> Result<AsciiMetadataValue, AgentError> {
    MetadataValue::try_from(format!("Bearer {}", credential.expose_secret())).map_err(|_| {
        invalid_config(
            "aggregator.credential",
            "contains characters that cannot be sent in a header: check the credential (or enroll again)",
        )
    })
}

/// Opens a channel to `aggregator.endpoint`; returns it with the endpoint's text for messages.
pub async fn connect_channel(
    config: &AggregatorConfig,
    kind: ChannelKind,
) -> Result<(Channel, String), AgentError> {
    let endpoint_text = config.endpoint.as_str().trim_end_matches('/').to_owned();
    let mut endpoint = Endpoint::from_shared(endpoint_text.clone())
        .map_err(|error| {
            invalid_config(
                "aggregator.endpoint",
                &format!(
                    "= {endpoint_text:?} is not a valid gRPC endpoint: {}",
                    error_chain(&error)
                ),
            )
        })?
        .user_agent(concat!("license-sync-agent/", env!("CARGO_PKG_VERSION")))
        .map_err(|error| AgentError::Internal(error_chain(&error)))?
        .connect_timeout(config.timeout.min(Duration::from_secs(30)))
        .tcp_keepalive(Some(Duration::from_secs(60)));
    endpoint = match kind {
        ChannelKind::Request => endpoint.timeout(config.timeout),
        ChannelKind::Session => endpoint
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true),
    };
    if config.endpoint.scheme() == "https" {
        let mut tls = ClientTlsConfig::new().with_webpki_roots();
        if let Some(path) = &config.ca_cert {
            let pem = std::fs::read(path).map_err(|source| ConfigError::Unreadable {
                what: "the aggregator CA certificate",
                key: "aggregator.ca_cert",
                path: path.clone(),
                source,
            })?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        // Read at every connect: a renewed certificate is used from the next connection on.
        if let (Some(cert_path), Some(key_path)) = (&config.client_cert, &config.client_key) {
            let read = |key, path: &std::path::PathBuf, what| {
                std::fs::read(path).map_err(|source| ConfigError::Unreadable {
                    what,
                    key,
                    path: path.clone(),
                    source,
                })
            };
            let cert = read(
                "aggregator.client_cert",
                cert_path,
                "the client certificate",
            )?;
            let key = read("aggregator.client_key", key_path, "the client key")?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint.tls_config(tls).map_err(|error| {
            invalid_config(
                "aggregator.ca_cert",
                &format!(
                    "(or aggregator.client_cert/client_key) cannot be used for TLS: {}",
                    error_chain(&error)
                ),
            )
        })?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|error| AgentError::AggregatorUnavailable {
            endpoint: endpoint_text.clone(),
            reason: format!("cannot connect: {}", error_chain(&error)),
        })?;
    Ok((channel, endpoint_text))
}

fn invalid_config(key: &str, message: &str) -> AgentError {
    AgentError::Config(ConfigError::Invalid(vec![ConfigProblem {
        key: key.to_owned(),
        message: message.to_owned(),
    }]))
}

/// The stream of one snapshot: header, user batches of `batch_size`, trailer. Batches are converted when polled.
pub fn snapshot_chunks(
    snapshot: Arc<Snapshot>,
    batch_size: usize,
) -> impl Stream<Item = SnapshotChunk> + Send + 'static {
    let batch_size = batch_size.max(1);
    let batches = snapshot.users.len().div_ceil(batch_size);
    let header = SnapshotChunk {
        chunk: Some(Chunk::Header(convert::snapshot_header(&snapshot.meta))),
    };
    let trailer = SnapshotChunk {
        chunk: Some(Chunk::Trailer(SnapshotTrailer {
            user_count: snapshot.users.len() as u64,
            users_sha256: snapshot.digest().to_vec(),
        })),
    };
    let body = stream::iter(0..batches).map(move |index| {
        let start = index * batch_size;
        let end = (start + batch_size).min(snapshot.users.len());
        SnapshotChunk {
            chunk: Some(Chunk::Users(UserBatch {
                users: snapshot.users[start..end]
                    .iter()
                    .map(convert::server_user)
                    .collect(),
            })),
        }
    });
    stream::once(async { header })
        .chain(body)
        .chain(stream::once(async { trailer }))
}

fn receipt_from_proto(receipt: SyncReceipt) -> Result<UploadReceipt, AgentError> {
    let uuid = |value: &str, field: &str| {
        Uuid::parse_str(value).map_err(|_| {
            AgentError::Protocol(format!("the receipt's {field} {value:?} is not a UUID"))
        })
    };
    Ok(UploadReceipt {
        sync_id: uuid(&receipt.sync_id, "sync_id")?,
        server_id: uuid(&receipt.server_id, "server_id")?,
        users_accepted: receipt.users_accepted,
        duplicate: receipt.duplicate,
        committed_at: convert::optional_offset_date_time(
            receipt.committed_at.as_ref(),
            "receipt.committed_at",
        )
        .map_err(|error| AgentError::Protocol(error.to_string()))?,
    })
}

/// Maps the aggregator's answer to an error that says what to do (the codes are the ones `ingest.proto` documents).
pub fn status_error(endpoint: &str, status: tonic::Status) -> AgentError {
    use tonic::Code;
    let message = status.message().to_owned();
    let endpoint = endpoint.to_owned();
    match status.code() {
        Code::Unauthenticated => AgentError::AggregatorCredentials { message },
        Code::PermissionDenied => AgentError::AggregatorPermission { message },
        Code::InvalidArgument | Code::OutOfRange => AgentError::SnapshotRejected { message },
        Code::FailedPrecondition => AgentError::StaleSnapshot { message },
        Code::AlreadyExists => AgentError::SyncIdConflict { message },
        // The aggregator is busy (too many streams open), not refusing the snapshot: gRPC's retry-throttling key.
        Code::ResourceExhausted if status.metadata().contains_key("grpc-retry-pushback-ms") => {
            AgentError::AggregatorUnavailable {
                endpoint,
                reason: message,
            }
        }
        // With `retry-after`, the aggregator throttles refused credentials from this address (only refusals are
        // throttled): the credential is what is wrong, not the snapshot.
        Code::ResourceExhausted if status.metadata().contains_key("retry-after") => {
            AgentError::AggregatorCredentials { message }
        }
        Code::ResourceExhausted => AgentError::SnapshotTooLarge { message },
        Code::DeadlineExceeded => AgentError::AggregatorTimeout {
            endpoint,
            reason: message,
        },
        Code::Unavailable | Code::Cancelled | Code::Aborted => AgentError::AggregatorUnavailable {
            endpoint,
            reason: if message.is_empty() {
                error_chain(&status)
            } else {
                message
            },
        },
        code => AgentError::AggregatorFailed { code, message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_codes_map_to_actionable_errors() {
        let error = status_error(
            "http://a",
            tonic::Status::unauthenticated("unknown credential"),
        );
        assert!(
            error
                .to_string()
                .contains("license-sync-aggregator instance add")
        );
        let error = status_error(
            "http://a",
            tonic::Status::failed_precondition("stored snapshot is from 2025-11-28T12:00:00Z"),
        );
        assert!(matches!(error, AgentError::StaleSnapshot { .. }));
        assert!(error.to_string().contains("2025-11-28T12:00:00Z"));
        let error = status_error("http://a", tonic::Status::unavailable("restarting"));
        assert!(error.is_retryable());
        assert!(error.to_string().contains("unavailable"));
        assert!(matches!(
            status_error(
                "http://a",
                tonic::Status::resource_exhausted("too many users")
            ),
            AgentError::SnapshotTooLarge { .. }
        ));
        let mut busy = tonic::Status::resource_exhausted("too many snapshot streams open");
        busy.metadata_mut().insert(
            "grpc-retry-pushback-ms",
            tonic::metadata::MetadataValue::from_static("5000"),
        );
        let error = status_error("http://a", busy);
        assert!(error.is_retryable(), "{error}");
        assert!(
            error.to_string().contains("too many snapshot streams"),
            "{error}"
        );
        let mut throttled = tonic::Status::resource_exhausted("too many failed authentications");
        throttled
            .metadata_mut()
            .insert("retry-after", tonic::metadata::MetadataValue::from(42_u64));
        assert!(matches!(
            status_error("http://a", throttled),
            AgentError::AggregatorCredentials { .. }
        ));
    }
}
