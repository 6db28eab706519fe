//! Storage behind one trait, so that backends (SQLite now, PostgreSQL next) can be swapped without touching the
//! services. Every method is one transaction: a failure leaves nothing half-written.

#[cfg(feature = "postgres")]
mod postgres;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use license_sync_core::merge::InstanceUsers;
use license_sync_core::model::CloudMember;
use license_sync_core::snapshot::Snapshot;
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use crate::error::{ServiceError, ServiceResult};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Enterprise {
    pub id: i64,
    pub slug: String,
    pub name: String,
    pub seats_purchased: i64,
    /// Bumped by every change of the enterprise's accounts or members.
    pub generation: i64,
}

/// How a snapshot reached the aggregator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Arrival {
    /// Streamed by an agent over gRPC (GitHub's "GitHub Connect" sync).
    Connect,
    /// Uploaded as a usage file by an owner.
    Upload,
}

impl Arrival {
    pub fn as_str(self) -> &'static str {
        match self {
            Arrival::Connect => "connect",
            Arrival::Upload => "upload",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "connect" => Some(Arrival::Connect),
            "upload" => Some(Arrival::Upload),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: i64,
    pub enterprise_id: i64,
    pub server_id: Uuid,
    pub hostname: String,
    pub ghes_version: String,
    pub has_credential: bool,
    pub retired_at: Option<OffsetDateTime>,
    /// `generated_at` of the stored snapshot.
    pub generated_at: Option<OffsetDateTime>,
    pub user_count: i64,
    pub last_success_at: Option<OffsetDateTime>,
    pub last_success_via: Option<Arrival>,
    pub last_attempt_at: Option<OffsetDateTime>,
    pub last_attempt_ok: Option<bool>,
    pub last_attempt_via: Option<Arrival>,
    pub last_error: String,
    pub rows_skipped: i64,
}

/// A validated snapshot to store for an instance.
pub struct SnapshotCommit<'a> {
    pub instance_id: i64,
    pub snapshot: &'a Snapshot,
    /// Hex SHA-256 of the users, to tell a retry from a reused sync id.
    pub users_sha256: &'a str,
    pub via: Arrival,
    pub now: OffsetDateTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The snapshot replaced the instance's previous one.
    Applied { committed_at: OffsetDateTime },
    /// This sync id was applied before; nothing changed.
    Duplicate {
        committed_at: OffsetDateTime,
        user_count: u64,
    },
}

/// Everything the merge needs, read in one consistent transaction.
pub struct MergeInput {
    pub generation: i64,
    pub seats_purchased: i64,
    pub instances: Vec<InstanceUsers>,
    pub cloud_members: Vec<CloudMember>,
}

pub type DynStore = Arc<dyn Store>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Cheap round trip, for readiness.
    async fn ping(&self) -> ServiceResult<()>;

    /// Fails with `AlreadyExists` when the slug is taken.
    async fn create_enterprise(
        &self,
        slug: &str,
        name: &str,
        seats: i64,
    ) -> ServiceResult<Enterprise>;
    async fn set_seats_purchased(&self, enterprise_id: i64, seats: i64) -> ServiceResult<()>;
    async fn enterprise_by_slug(&self, slug: &str) -> ServiceResult<Option<Enterprise>>;
    async fn enterprise_generation(&self, enterprise_id: i64) -> ServiceResult<i64>;

    async fn create_api_token(
        &self,
        enterprise_id: i64,
        token_sha256: &str,
        description: &str,
    ) -> ServiceResult<()>;
    /// The enterprise a live (not revoked) REST token belongs to.
    async fn enterprise_for_api_token(
        &self,
        token_sha256: &str,
    ) -> ServiceResult<Option<Enterprise>>;

    /// Creates the instance in the enterprise, or rotates its credential (the old one stops working) and un-retires
    /// it. Fails with `PermissionDenied` when the server id belongs to another enterprise.
    async fn enroll_instance(
        &self,
        enterprise_id: i64,
        server_id: Uuid,
        hostname: &str,
        credential_sha256: &str,
    ) -> ServiceResult<Instance>;
    /// Finds or creates (without a credential) the instance a manual upload is for.
    async fn instance_for_upload(
        &self,
        enterprise_id: i64,
        server_id: Uuid,
        hostname: &str,
    ) -> ServiceResult<Instance>;
    async fn instance_for_credential(
        &self,
        credential_sha256: &str,
    ) -> ServiceResult<Option<Instance>>;
    async fn list_instances(&self, enterprise_id: i64) -> ServiceResult<Vec<Instance>>;
    /// A retired instance's users stop counting; its credential stops working.
    async fn retire_instance(&self, enterprise_id: i64, server_id: Uuid) -> ServiceResult<()>;

    /// Atomically replaces the instance's users with the snapshot's, unless this sync id was applied already
    /// (`Duplicate`) or the stored snapshot is newer (`FailedPrecondition`).
    async fn commit_snapshot(&self, commit: SnapshotCommit<'_>) -> ServiceResult<CommitOutcome>;
    /// Records a failed attempt for the status page; the stored snapshot is untouched.
    async fn record_failed_sync(
        &self,
        instance_id: i64,
        via: Arrival,
        error: &str,
        now: OffsetDateTime,
    ) -> ServiceResult<()>;

    /// Replaces the enterprise's cloud members whole.
    async fn replace_cloud_members(
        &self,
        enterprise_id: i64,
        members: &[CloudMember],
    ) -> ServiceResult<()>;
    async fn load_merge_input(&self, enterprise_id: i64) -> ServiceResult<MergeInput>;
}

/// Opens the store named by the URL and applies pending migrations.
pub async fn open(database_url: &str) -> ServiceResult<DynStore> {
    if database_url.starts_with("sqlite:") {
        return Ok(Arc::new(SqliteStore::open(database_url).await?));
    }
    #[cfg(feature = "postgres")]
    if database_url.starts_with("postgres:") || database_url.starts_with("postgresql:") {
        return Ok(Arc::new(PostgresStore::open(database_url).await?));
    }
    {
        Err(ServiceError::invalid(
            "unsupported database_url scheme: use sqlite://PATH or postgres://USER@HOST/DATABASE",
        ))
    }
}

pub(crate) fn unix_to_time(seconds: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(seconds).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

pub(crate) fn unix_ms_to_time(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

pub(crate) fn time_to_unix_ms(time: OffsetDateTime) -> i64 {
    (time.unix_timestamp_nanos() / 1_000_000) as i64
}
