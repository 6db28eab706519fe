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
    #[error("a live REST token named {name:?} exists already in the enterprise")]
    TokenNameTaken { name: String },
    #[error("no live REST token matches in the enterprise")]
    TokenNotFound,
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
    /// Unknown, or another enterprise's: deliberately one answer for the two, so that an upload learns nothing
    /// about other enterprises' server ids.
    #[error("no instance {server_id} in the uploader's enterprise")]
    UploadForUnknownInstance { server_id: Uuid },
    #[error("instance {server_id} is enrolled in another enterprise")]
    EnrolledElsewhere { server_id: Uuid },
    /// Another live instance of the same enterprise has this hostname (person ids and metrics are keyed by it).
    #[error("hostname {hostname:?} is used by live instance {other_server_id} of the enterprise")]
    HostnameTaken {
        hostname: String,
        other_server_id: String,
    },
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
    /// SQLITE_FULL, or PostgreSQL's class 53 (insufficient resources: disk full, out of memory, too many
    /// connections).
    #[error("the database cannot grow: {0}")]
    DiskFull(sqlx::Error),
    /// A transient conflict (SQLITE_BUSY/LOCKED, serialization failure, deadlock, lock not available).
    #[error("the database is busy: {0}")]
    Busy(sqlx::Error),
    /// The connection or the server went away (I/O, pool timeout, PostgreSQL class 08 and 57P0x).
    #[error("the database is unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// The database refused a value of the request (PostgreSQL classes 22 and 23, SQLite's constraint, mismatch and
    /// too-big codes). `code` is the SQLSTATE or SQLite code; the database's own message is not kept, since it can
    /// quote the value (an email, in a unique violation's detail).
    #[error("the database refused a value (code {code}{})", constraint.as_deref().map(|c| format!(", constraint {c}")).unwrap_or_default())]
    Refused {
        code: String,
        constraint: Option<String>,
    },
    #[error(transparent)]
    Database(sqlx::Error),
}

/// Classifies a database failure by what the caller can do about it, from each backend's own codes: SQLite's
/// primary result codes (the low byte of the extended code) and PostgreSQL's SQLSTATE classes. (PostgreSQL's codes
/// are not numbers with a low byte: 22021 read as SQLite's code is 5, "busy", and an agent retried a NUL byte in a
/// login for ever.)
impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        let class = match &error {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::WorkerCrashed => Class::Unavailable,
            sqlx::Error::Database(db) => classify(db.as_ref()),
            _ => Class::Other,
        };
        match class {
            Class::DiskFull => StoreError::DiskFull(error),
            Class::Busy => StoreError::Busy(error),
            Class::Unavailable => StoreError::Unavailable(error),
            Class::Refused => {
                let (code, constraint) = match &error {
                    sqlx::Error::Database(db) => (
                        db.code().map(|code| code.into_owned()).unwrap_or_default(),
                        db.constraint().map(str::to_owned),
                    ),
                    _ => (String::new(), None),
                };
                StoreError::Refused { code, constraint }
            }
            Class::Other => StoreError::Database(error),
        }
    }
}

enum Class {
    DiskFull,
    Busy,
    Unavailable,
    Refused,
    Other,
}

fn classify(error: &dyn sqlx::error::DatabaseError) -> Class {
    let Some(code) = error.code() else {
        return Class::Other;
    };
    if error
        .try_downcast_ref::<sqlx::sqlite::SqliteError>()
        .is_some()
    {
        // Primary result codes: https://www.sqlite.org/rescode.html
        return match code.parse::<i32>().map(|code| code & 0xff) {
            Ok(5 | 6) => Class::Busy,          // SQLITE_BUSY, SQLITE_LOCKED
            Ok(13) => Class::DiskFull,         // SQLITE_FULL
            Ok(10 | 14) => Class::Unavailable, // SQLITE_IOERR, SQLITE_CANTOPEN
            Ok(18..=20) => Class::Refused,     // SQLITE_TOOBIG, SQLITE_CONSTRAINT, SQLITE_MISMATCH
            _ => Class::Other,
        };
    }
    // SQLSTATE: https://www.postgresql.org/docs/current/errcodes-appendix.html
    match code.as_ref() {
        "40001" | "40P01" | "55P03" => Class::Busy,
        "57P01" | "57P02" | "57P03" => Class::Unavailable,
        sqlstate if sqlstate.starts_with("08") => Class::Unavailable,
        sqlstate if sqlstate.starts_with("53") => Class::DiskFull,
        sqlstate if sqlstate.starts_with("22") || sqlstate.starts_with("23") => Class::Refused,
        _ => Class::Other,
    }
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
            StoreError::TokenNameTaken { name } => ServiceError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "the enterprise has a live REST token named {name:?} already: choose another name, or revoke \
                     that one first (`license-sync-aggregator token revoke --name`)"
                ),
            ),
            StoreError::TokenNotFound => ServiceError::not_found(
                "no live REST token of this enterprise has that id or name (it may be revoked already): \
                 `license-sync-aggregator token list --enterprise SLUG` shows them",
            ),
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
            StoreError::UploadForUnknownInstance { server_id } => ServiceError::not_found(format!(
                "no instance {server_id} in this enterprise: add it first (`license-sync-aggregator instance add \
                 --enterprise SLUG --server-id {server_id} --hostname HOST`, or enroll its agent with an enrollment \
                 token), then upload the file again"
            )),
            StoreError::HostnameTaken {
                hostname,
                other_server_id,
            } => ServiceError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "hostname {hostname:?} is already used by instance {other_server_id} of this enterprise: retire \
                     that instance if it was replaced (`license-sync-aggregator instance retire --enterprise SLUG \
                     --server-id {other_server_id}`), or fix `instance.hostname` in this agent's configuration"
                ),
            ),
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
            StoreError::DiskFull(source) => {
                tracing::error!(error = %source, "the database cannot grow");
                ServiceError::new(
                    ErrorKind::StorageFull,
                    "the aggregator's database disk is full: free space on the aggregator's volume (or raise the \
                     database's quota); nothing was stored, and the agent will send the snapshot again",
                )
            }
            StoreError::Busy(source) => {
                tracing::warn!(error = %source, "database busy");
                ServiceError::new(ErrorKind::Unavailable, "the database is busy; retry later")
            }
            StoreError::Unavailable(source) => {
                tracing::warn!(error = %source, "database unavailable");
                ServiceError::new(
                    ErrorKind::Unavailable,
                    "the database is unavailable; retry later",
                )
            }
            StoreError::Refused { code, constraint } => {
                let what = match code.as_str() {
                    "22021" => {
                        "a text field (a login, email, name or hostname) holds a NUL byte or invalid UTF-8"
                    }
                    "22001" => "a text field is longer than the database allows",
                    "22003" => "a number is out of the database's range",
                    _ if code.starts_with("23")
                        || code.parse::<i32>().is_ok_and(|c| c & 0xff == 19) =>
                    {
                        "a value conflicts with a stored one or breaks a constraint"
                    }
                    _ => "a value is not one the database can store",
                };
                let constraint = constraint
                    .map(|constraint| format!(", constraint {constraint}"))
                    .unwrap_or_default();
                ServiceError::invalid(format!(
                    "the database refused this request: {what} (code {code}{constraint}); correct the input, \
                     sending the same data again will not help"
                ))
            }
            StoreError::Database(source) => {
                ServiceError::internal("accessing the database", source)
            }
        }
    }
}

/// For gRPC handlers that use `?` on the store directly.
impl From<StoreError> for tonic::Status {
    fn from(error: StoreError) -> Self {
        ServiceError::from(error).into()
    }
}
