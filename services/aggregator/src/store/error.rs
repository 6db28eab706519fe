//! What can go wrong in the store, said in storage terms; [`ServiceError`] words it for the caller, here and only
//! here.

use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::{ErrorKind, ServiceError};
use crate::time_format::rfc3339;

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("an enterprise with slug {slug:?} exists already")]
    SlugTaken { slug: String },
    #[error("no such enterprise")]
    EnterpriseNotFound,
    #[error("no active instance {server_id} in the enterprise to retire")]
    NothingToRetire { server_id: Uuid },
    #[error("the instance row no longer exists")]
    InstanceGone,
    #[error("sync id {sync_id} was applied with other content or to another instance")]
    SyncIdReused { sync_id: String },
    #[error("the instance is retired")]
    InstanceRetired,
    #[error("the stored snapshot ({stored}) is newer than this one ({generated_at})")]
    OlderSnapshot {
        generated_at: OffsetDateTime,
        stored: OffsetDateTime,
    },
    #[error("instance {server_id} of an upload belongs to another enterprise")]
    UploadForOtherEnterprise { server_id: Uuid },
    #[error("instance {server_id} is enrolled in another enterprise")]
    EnrolledElsewhere { server_id: Uuid },
    /// Unknown, used or expired: deliberately one answer for the three.
    #[error("no unused, unexpired enrollment token with this hash")]
    EnrollmentTokenRefused,
    #[error("the credential is no longer the instance's live credential")]
    CredentialRevoked,
    #[error("no active instance {server_id} in the enterprise")]
    NoActiveInstance { server_id: Uuid },
    #[error("instance {server_id} has no agent credential")]
    NoAgent { server_id: Uuid },
    /// Commits of the same sync id kept racing (another replica is applying it).
    #[error("the sync id kept being applied concurrently")]
    CommitContended,
    #[error("unsupported database URL scheme")]
    UnsupportedUrl,
    #[error("invalid {backend} database URL: {source}")]
    InvalidUrl {
        backend: &'static str,
        source: sqlx::Error,
    },
    /// `action`: what could not be done, e.g. "connect to PostgreSQL".
    #[error("cannot {action}: {source}")]
    Unreachable {
        action: &'static str,
        source: sqlx::Error,
    },
    #[error("cannot apply database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// `context`: what the store was doing, e.g. "encoding a cloud member".
    #[error("{context}: {source}")]
    Encode {
        context: &'static str,
        source: serde_json::Error,
    },
    /// A stored row the store cannot read back (or that vanished inside its own transaction).
    #[error("{context}: {detail}")]
    Corrupt {
        context: &'static str,
        detail: String,
    },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    pub(crate) fn corrupt(context: &'static str, detail: impl std::fmt::Display) -> Self {
        StoreError::Corrupt {
            context,
            detail: detail.to_string(),
        }
    }
}

/// The one place where storage failures become what a caller reads.
impl From<StoreError> for ServiceError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::SlugTaken { slug } => ServiceError::new(
                ErrorKind::AlreadyExists,
                format!("enterprise {slug:?} already exists; choose another slug"),
            ),
            StoreError::EnterpriseNotFound => ServiceError::not_found("enterprise not found"),
            StoreError::NothingToRetire { server_id } => ServiceError::not_found(format!(
                "no active instance {server_id} in this enterprise"
            )),
            StoreError::InstanceGone => {
                ServiceError::not_found("the instance no longer exists; enroll it again")
            }
            StoreError::SyncIdReused { sync_id } => ServiceError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "sync id {sync_id} was already used for a different snapshot; a new snapshot needs a new sync id"
                ),
            ),
            StoreError::InstanceRetired => ServiceError::new(
                ErrorKind::FailedPrecondition,
                "the instance is retired; enroll it again before syncing",
            ),
            StoreError::OlderSnapshot {
                generated_at,
                stored,
            } => ServiceError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "this snapshot was generated at {} but the stored one is newer ({}); read the users again and send a new snapshot",
                    rfc3339(generated_at),
                    rfc3339(stored),
                ),
            ),
            StoreError::UploadForOtherEnterprise { server_id } => {
                ServiceError::permission_denied(format!(
                    "instance {server_id} belongs to another enterprise; upload its usage there"
                ))
            }
            StoreError::EnrolledElsewhere { server_id } => {
                ServiceError::permission_denied(format!(
                    "instance {server_id} is enrolled in another enterprise; retire it there first"
                ))
            }
            // One message for unknown, used and expired tokens, so that a caller learns nothing about which exist.
            StoreError::EnrollmentTokenRefused => ServiceError::unauthenticated(
                "unknown, already used or expired enrollment token: ask an enterprise owner for a new one \
                 (`license-sync-aggregator enrollment-token create --enterprise SLUG` or \
                 POST /enterprises/{enterprise}/enrollment-tokens)",
            ),
            StoreError::CredentialRevoked => ServiceError::unauthenticated(
                "the instance credential was rotated or revoked (the instance was enrolled again or retired): \
                 enroll the agent again with a new enrollment token",
            ),
            StoreError::NoActiveInstance { server_id } => ServiceError::not_found(format!(
                "no active instance {server_id} in this enterprise: check the server id (GET license-sync-status lists them)"
            )),
            StoreError::NoAgent { server_id } => ServiceError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "instance {server_id} has no enrolled agent (its usage arrives by manual upload), so nothing can ask it \
                     to sync: enroll its agent with an enrollment token first"
                ),
            ),
            StoreError::CommitContended => ServiceError::new(
                ErrorKind::Unavailable,
                "the snapshot is being applied by another aggregator replica; retry",
            ),
            StoreError::UnsupportedUrl => ServiceError::invalid(
                "unsupported database_url scheme: use sqlite://PATH or postgres://USER@HOST/DATABASE",
            ),
            StoreError::InvalidUrl { backend, source } => {
                ServiceError::invalid(format!("invalid {backend} database_url: {source}"))
            }
            StoreError::Unreachable { action, source } => {
                ServiceError::new(ErrorKind::Unavailable, format!("cannot {action}: {source}"))
            }
            StoreError::Migrate(source) => ServiceError::new(
                ErrorKind::Internal,
                format!("cannot apply database migrations: {source}"),
            ),
            StoreError::Encode { context, source } => ServiceError::internal(context, source),
            StoreError::Corrupt { context, detail } => ServiceError::internal(context, detail),
            StoreError::Database(source) => source.into(),
        }
    }
}

/// For gRPC handlers that use `?` on the store directly.
impl From<StoreError> for tonic::Status {
    fn from(error: StoreError) -> Self {
        ServiceError::from(error).into()
    }
}
