//! The aggregator's one error type, and how it maps to gRPC and HTTP.
//!
//! | kind                 | gRPC code            | HTTP | typical cause                                     |
//! |----------------------|----------------------|------|---------------------------------------------------|
//! | `InvalidArgument`    | `INVALID_ARGUMENT`   | 422  | malformed snapshot, bad query parameter           |
//! | `Unauthenticated`    | `UNAUTHENTICATED`    | 401  | missing or unknown credential                     |
//! | `PermissionDenied`   | `PERMISSION_DENIED`  | 403  | instance writing to another instance/enterprise   |
//! | `NotFound`           | `NOT_FOUND`          | 404  | unknown enterprise, or one the caller may not see |
//! | `FailedPrecondition` | `FAILED_PRECONDITION`| 409  | snapshot older than the stored one                |
//! | `AlreadyExists`      | `ALREADY_EXISTS`     | 409  | sync id reused with different content             |
//! | `ResourceExhausted`  | `RESOURCE_EXHAUSTED` | 413  | snapshot or upload over the configured limits     |
//! | `Throttled`          | `RESOURCE_EXHAUSTED` | 429  | too many failed authentications from one address  |
//! | `StorageFull`        | `UNAVAILABLE`        | 507  | the database's disk is full; the agent retries    |
//! | `Unavailable`        | `UNAVAILABLE`        | 503  | database unreachable; the caller should retry     |
//! | `Cancelled`          | `CANCELLED`          | 499  | the client cut its stream (crash, reset)          |
//! | `Busy`               | `RESOURCE_EXHAUSTED` | 429  | too many snapshot streams open; retry later       |
//! | `Internal`           | `INTERNAL`           | 500  | a bug; the message is logged, not returned        |

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Where GitHub-style error bodies point.
pub const DOCUMENTATION_URL: &str =
    "https://github.com/license-sync/license-sync/blob/main/README.md#rest-api";

/// 499, nginx's "client closed request" (not in the `http` crate's list).
const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => StatusCode::BAD_REQUEST,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    Unauthenticated,
    PermissionDenied,
    NotFound,
    FailedPrecondition,
    AlreadyExists,
    ResourceExhausted,
    /// Too many failed authentications from the caller's address; answered with `Retry-After` (HTTP header, gRPC
    /// metadata `retry-after`), in seconds.
    Throttled,
    /// The aggregator's own disk is full: not the caller's fault and not final. gRPC `UNAVAILABLE`, because the
    /// agent reads `RESOURCE_EXHAUSTED` as "this snapshot is too large" and gives up, while it retries
    /// `UNAVAILABLE` with backoff and keeps the delivery; HTTP 507 Insufficient Storage says what it is.
    StorageFull,
    Unavailable,
    /// The client went away mid-call (a crashed agent, a reset stream): not a refusal of what it sent, so not
    /// counted as a client error. HTTP 499 is nginx's "client closed request"; no client is left to read it.
    Cancelled,
    /// Too many snapshot streams open (`ingest_max_streams*`): nothing is wrong with the snapshot. gRPC
    /// `RESOURCE_EXHAUSTED` with `grpc-retry-pushback-ms` metadata (gRPC's retry-throttling key), which tells the
    /// agent to retry with backoff instead of giving up as it does for a snapshot that is too large.
    Busy,
    Internal,
}

/// The `grpc-retry-pushback-ms` of a [`ErrorKind::Busy`] answer: a sync ends in seconds to minutes.
pub const BUSY_RETRY_PUSHBACK_MS: &str = "5000";

impl ErrorKind {
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorKind::Unauthenticated => tonic::Code::Unauthenticated,
            ErrorKind::PermissionDenied => tonic::Code::PermissionDenied,
            ErrorKind::NotFound => tonic::Code::NotFound,
            ErrorKind::FailedPrecondition => tonic::Code::FailedPrecondition,
            ErrorKind::AlreadyExists => tonic::Code::AlreadyExists,
            ErrorKind::ResourceExhausted | ErrorKind::Throttled => tonic::Code::ResourceExhausted,
            ErrorKind::StorageFull | ErrorKind::Unavailable => tonic::Code::Unavailable,
            ErrorKind::Cancelled => tonic::Code::Cancelled,
            ErrorKind::Busy => tonic::Code::ResourceExhausted,
            ErrorKind::Internal => tonic::Code::Internal,
        }
    }

    pub fn http_status(self) -> StatusCode {
        match self {
            ErrorKind::InvalidArgument => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::FailedPrecondition | ErrorKind::AlreadyExists => StatusCode::CONFLICT,
            ErrorKind::ResourceExhausted => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Throttled => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Cancelled => CLIENT_CLOSED_REQUEST,
            ErrorKind::Busy => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Short label for logs and the sync status.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::NotFound => "not_found",
            ErrorKind::FailedPrecondition => "failed_precondition",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::ResourceExhausted => "resource_exhausted",
            ErrorKind::Throttled => "throttled",
            ErrorKind::StorageFull => "storage_full",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Busy => "busy",
            ErrorKind::Internal => "internal",
        }
    }
}

/// An error a caller sees. `message` says what was wrong and what to do; it never holds an email or a token.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ServiceError {
    pub kind: ErrorKind,
    pub message: String,
    /// When the caller may try again (sent as `Retry-After`); set for `Throttled`.
    pub retry_after: Option<std::time::Duration>,
}

pub type ServiceResult<T> = Result<T, ServiceError>;

impl ServiceError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ServiceError {
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Too many failed authentications from the caller's address; it may try again after `retry_after`.
    pub fn throttled(message: impl Into<String>, retry_after: std::time::Duration) -> Self {
        ServiceError {
            retry_after: Some(retry_after),
            ..Self::new(ErrorKind::Throttled, message)
        }
    }

    /// `Retry-After` in whole seconds, rounded up so that a client waiting that long is let in.
    fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after
            .map(|wait| wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unauthenticated, message)
    }

    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::PermissionDenied, message)
    }

    /// An unexpected failure: logged in full here, reported to the caller without internals.
    pub fn internal(context: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "{context}");
        Self::new(
            ErrorKind::Internal,
            format!("internal error while {context}; see the aggregator's log"),
        )
    }
}

/// Classified once, by the store (`StoreError`'s `From<sqlx::Error>`).
impl From<sqlx::Error> for ServiceError {
    fn from(error: sqlx::Error) -> Self {
        crate::store::StoreError::from(error).into()
    }
}

impl From<license_sync_core::snapshot::SnapshotError> for ServiceError {
    fn from(error: license_sync_core::snapshot::SnapshotError) -> Self {
        use license_sync_core::snapshot::SnapshotError;
        let kind = match error {
            SnapshotError::TooManyUsers { .. } => ErrorKind::ResourceExhausted,
            _ => ErrorKind::InvalidArgument,
        };
        ServiceError::new(kind, error.to_string())
    }
}

impl From<ServiceError> for tonic::Status {
    fn from(error: ServiceError) -> Self {
        let mut status = tonic::Status::new(error.kind.grpc_code(), error.message.clone());
        if error.kind == ErrorKind::Busy {
            status.metadata_mut().insert(
                "grpc-retry-pushback-ms",
                tonic::metadata::MetadataValue::from_static(BUSY_RETRY_PUSHBACK_MS),
            );
        }
        if let Some(secs) = error.retry_after_secs() {
            status
                .metadata_mut()
                .insert("retry-after", tonic::metadata::MetadataValue::from(secs));
        }
        status
    }
}

impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        let body = Json(json!({
            "message": self.message,
            "documentation_url": DOCUMENTATION_URL,
        }));
        let mut response = (self.kind.http_status(), body).into_response();
        if let Some(secs) = self.retry_after_secs() {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_maps_to_a_matching_grpc_and_http_status() {
        let table = [
            (
                ErrorKind::InvalidArgument,
                tonic::Code::InvalidArgument,
                422,
            ),
            (
                ErrorKind::Unauthenticated,
                tonic::Code::Unauthenticated,
                401,
            ),
            (
                ErrorKind::PermissionDenied,
                tonic::Code::PermissionDenied,
                403,
            ),
            (ErrorKind::NotFound, tonic::Code::NotFound, 404),
            (
                ErrorKind::FailedPrecondition,
                tonic::Code::FailedPrecondition,
                409,
            ),
            (ErrorKind::AlreadyExists, tonic::Code::AlreadyExists, 409),
            (
                ErrorKind::ResourceExhausted,
                tonic::Code::ResourceExhausted,
                413,
            ),
            (ErrorKind::Throttled, tonic::Code::ResourceExhausted, 429),
            (ErrorKind::StorageFull, tonic::Code::Unavailable, 507),
            (ErrorKind::Unavailable, tonic::Code::Unavailable, 503),
            (ErrorKind::Cancelled, tonic::Code::Cancelled, 499),
            (ErrorKind::Busy, tonic::Code::ResourceExhausted, 429),
            (ErrorKind::Internal, tonic::Code::Internal, 500),
        ];
        for (kind, code, status) in table {
            assert_eq!(kind.grpc_code(), code);
            assert_eq!(kind.http_status().as_u16(), status);
            let grpc: tonic::Status = ServiceError::new(kind, "boom").into();
            assert_eq!(grpc.code(), code);
            assert_eq!(grpc.message(), "boom");
            assert_eq!(
                grpc.metadata().get("grpc-retry-pushback-ms").is_some(),
                kind == ErrorKind::Busy,
                "{kind:?}"
            );
        }
    }
}
