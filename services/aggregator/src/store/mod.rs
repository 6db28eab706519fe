//! Storage behind one trait, so that backends (SQLite, PostgreSQL) can be swapped without touching the services.
//! Every method is one transaction: a failure leaves nothing half-written.

mod error;
#[cfg(feature = "postgres")]
mod postgres;
mod rows;
mod shared;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use license_sync_core::accounts::Accounts;
use license_sync_core::cloud::CloudDirectory;
use license_sync_core::merge::InstanceUsers;
use license_sync_core::model::CloudMember;
use license_sync_core::snapshot::Snapshot;
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

pub use error::{StoreError, StoreResult};
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use crate::error::{ServiceError, ServiceResult};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Enterprise {
    pub id: i64,
    pub slug: String,
    pub name: String,
    pub seats_purchased: i64,
    /// Bumped by every change of the enterprise's accounts or members.
    pub generation: i64,
}

/// What a REST token may do: `Read` answers every GET (reports, dashboards); `Admin` also every change (PUT, POST,
/// DELETE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenScope {
    Read,
    Admin,
}

impl TokenScope {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenScope::Read => "read",
            TokenScope::Admin => "admin",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "read" => Some(TokenScope::Read),
            "admin" => Some(TokenScope::Admin),
            _ => None,
        }
    }
}

/// A REST token as stored, without its secret (only the secret's SHA-256 is stored, and it is never read back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub id: i64,
    pub enterprise_id: i64,
    pub name: String,
    pub scope: TokenScope,
    pub created_at: OffsetDateTime,
    pub expires_at: Option<OffsetDateTime>,
    /// Recorded at most once per [`TOKEN_LAST_USE_RESOLUTION`], so up to that much older than the real last use.
    pub last_used_at: Option<OffsetDateTime>,
    pub revoked_at: Option<OffsetDateTime>,
}

impl ApiToken {
    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.expires_at.is_some_and(|expires_at| expires_at <= now)
    }
}

/// What `create_api_token` stores besides the hash.
#[derive(Debug, Clone)]
pub struct NewApiToken<'a> {
    pub name: &'a str,
    pub scope: TokenScope,
    pub expires_at: Option<OffsetDateTime>,
}

/// Which live token of an enterprise to revoke.
#[derive(Debug, Clone, Copy)]
pub enum TokenSelector<'a> {
    Id(i64),
    Name(&'a str),
}

/// A live session of the owner's web console (`crate::console`), as the store answers it for the SHA-256 of its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSession {
    pub enterprise: Enterprise,
    /// The scope of the REST token signed in with (`Admin` for a sign-in link, which only an operator can print).
    pub scope: TokenScope,
    pub expires_at: OffsetDateTime,
}

/// What `create_console_session` stores: never the session id itself, only its hash.
#[derive(Debug, Clone)]
pub struct NewConsoleSession<'a> {
    pub id_sha256: &'a str,
    pub enterprise_id: i64,
    /// The REST token signed in with; `None` for a sign-in link. A revoked or expired token ends its sessions.
    pub api_token_id: Option<i64>,
    pub scope: TokenScope,
    pub expires_at: OffsetDateTime,
}

/// A token's last use is written at most once per this interval: a write per request would make every REST read
/// a database write.
pub const TOKEN_LAST_USE_RESOLUTION: time::Duration = time::Duration::minutes(1);

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
    /// What the instance's agent last said on its control stream.
    pub agent: AgentPresence,
}

/// An agent's presence as recorded from its control stream (hello and heartbeats), in the database so that every
/// aggregator replica sees the same answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentPresence {
    /// When the agent last sent anything on a control stream; `None` before its first stream.
    pub last_seen_at: Option<OffsetDateTime>,
    /// A control stream is open (or was, until its replica stopped without closing it: see
    /// [`AgentPresence::connected`]).
    pub session_open: bool,
    pub sync_enabled: Option<bool>,
    pub version: Option<String>,
    pub pending_deliveries: Option<i64>,
}

impl AgentPresence {
    /// Connected: a stream is open and the agent was heard from within `window` (a replica that died holding the
    /// stream cannot close it, so the age decides).
    pub fn connected(&self, now: OffsetDateTime, window: time::Duration) -> bool {
        self.session_open && self.last_seen_at.is_some_and(|seen| now - seen <= window)
    }
}

/// What one message on a control stream says about the agent.
#[derive(Debug, Clone)]
pub struct AgentReport<'a> {
    /// The control stream that heard it.
    pub session_id: Uuid,
    pub seen_at: OffsetDateTime,
    pub sync_enabled: bool,
    /// Sent in `hello` only; `None` keeps the stored value.
    pub version: Option<&'a str>,
    /// Sent in heartbeats only; `None` keeps the stored value.
    pub pending_deliveries: Option<u32>,
}

/// A request never delivered within this time is expired, and never delivered.
pub const SYNC_REQUEST_TTL: time::Duration = time::Duration::hours(24);

/// Sync requests and spent enrollment tokens are kept this long for owners to read, then deleted (by the next
/// creation of one for the same instance or enterprise).
pub const CONNECTION_RECORD_RETENTION: time::Duration = time::Duration::days(30);

/// An owner's request that an instance's agent sync now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRequest {
    pub request_id: Uuid,
    pub instance_id: i64,
    pub requested_at: OffsetDateTime,
    /// Handed to a control stream of the instance (at most once).
    pub delivered_at: Option<OffsetDateTime>,
    /// The agent's `sync_ack`.
    pub acked_at: Option<OffsetDateTime>,
    pub accepted: Option<bool>,
    pub job_id: String,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncRequestState {
    /// Waiting for the agent's control stream.
    Queued,
    /// Sent to the agent, no answer yet.
    Delivered,
    /// The agent started (or joined) a sync job: `job_id`.
    Accepted,
    /// The agent refused: `reason`.
    Refused,
    /// Not delivered within [`SYNC_REQUEST_TTL`]; it never will be.
    Expired,
}

impl SyncRequestState {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncRequestState::Queued => "queued",
            SyncRequestState::Delivered => "delivered",
            SyncRequestState::Accepted => "accepted",
            SyncRequestState::Refused => "refused",
            SyncRequestState::Expired => "expired",
        }
    }
}

impl SyncRequest {
    pub fn state(&self, now: OffsetDateTime) -> SyncRequestState {
        match (self.acked_at, self.accepted, self.delivered_at) {
            (Some(_), Some(true), _) => SyncRequestState::Accepted,
            (Some(_), _, _) => SyncRequestState::Refused,
            (None, _, Some(_)) => SyncRequestState::Delivered,
            (None, _, None) if now - self.requested_at >= SYNC_REQUEST_TTL => {
                SyncRequestState::Expired
            }
            (None, _, None) => SyncRequestState::Queued,
        }
    }
}

/// An agent's answer to a sync request.
#[derive(Debug, Clone)]
pub struct SyncAckRecord<'a> {
    pub request_id: Uuid,
    pub accepted: bool,
    pub job_id: &'a str,
    pub reason: &'a str,
    pub acked_at: OffsetDateTime,
}

/// Which answer a recorded ack got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    Recorded,
    /// The request had been answered before; the first answer stands.
    AlreadyAcked,
    /// No delivered request with this id for this instance.
    Unknown,
}

/// One of an enterprise's age key pairs for encrypted usage files (`license-sync-aggregator enterprise keygen`).
#[derive(Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UsageFileKey {
    pub id: i64,
    /// `age1…`: what agents encrypt to.
    pub public_key: String,
    /// `AGE-SECRET-KEY-1…`. Never logged, printed or sent (the `Debug` below leaves it out).
    pub secret_key: String,
    pub created_at_ms: i64,
}

impl std::fmt::Debug for UsageFileKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("UsageFileKey")
            .field("id", &self.id)
            .field("public_key", &self.public_key)
            .field("secret_key", &"***")
            .field("created_at_ms", &self.created_at_ms)
            .finish()
    }
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
    /// The snapshot replaced the instance's previous one; `generation` is the enterprise's generation it made.
    Applied {
        committed_at: OffsetDateTime,
        generation: i64,
    },
    /// This sync id was applied before; nothing changed.
    Duplicate {
        committed_at: OffsetDateTime,
        user_count: u64,
    },
}

/// Everything the merge needs, read in one consistent transaction.
/// Usage of one instance on one day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct InstanceUsage {
    pub hostname: String,
    pub accounts: i64,
    /// Accounts of this instance that consume a license (active or dormant, not built-in).
    pub consuming: i64,
}

/// One enterprise's license usage on one UTC day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageDay {
    /// `YYYY-MM-DD` (UTC).
    pub date: String,
    /// The latest count recorded that day.
    pub consumed: i64,
    /// The highest count recorded that day.
    pub max_consumed: i64,
    pub purchased: i64,
    pub instances: Vec<InstanceUsage>,
}

pub struct MergeInput {
    pub generation: i64,
    pub seats_purchased: i64,
    pub instances: Vec<InstanceUsers>,
    pub cloud_members: CloudDirectory,
}

/// An active instance, and the generation that last changed its users (or its hostname).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct InstanceVersion {
    pub id: i64,
    pub hostname: String,
    pub users_generation: i64,
}

/// What changed in an enterprise's merge input after a generation, read from one consistent snapshot.
pub struct MergeChanges {
    pub generation: i64,
    pub seats_purchased: i64,
    /// Every active instance, by ascending id.
    pub instances: Vec<InstanceVersion>,
    /// The users of each active instance changed after the generation asked for (every instance when none was),
    /// by instance id.
    pub changed_users: Vec<(i64, Accounts)>,
    /// The cloud members, when they changed after the generation asked for (always when none was).
    pub cloud_members: Option<CloudDirectory>,
}

impl MergeChanges {
    /// The whole input, from a load with no `since`.
    fn into_input(self) -> MergeInput {
        let mut users: std::collections::HashMap<i64, Accounts> =
            self.changed_users.into_iter().collect();
        MergeInput {
            generation: self.generation,
            seats_purchased: self.seats_purchased,
            instances: self
                .instances
                .into_iter()
                .map(|instance| InstanceUsers {
                    users: users.remove(&instance.id).unwrap_or_default(),
                    hostname: instance.hostname,
                })
                .collect(),
            cloud_members: self.cloud_members.unwrap_or_default(),
        }
    }
}

pub type DynStore = Arc<dyn Store>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Cheap round trip, for readiness.
    async fn ping(&self) -> StoreResult<()>;
    /// Proves the store can write: one committed write transaction that stores [`WRITE_PROBE_BYTES`] in a probe
    /// row and deletes it again, so it needs fresh pages (a one-row UPDATE fits in pages the database already has,
    /// and a rolled-back transaction may never reach the disk). For readiness.
    async fn probe_write(&self) -> StoreResult<()>;

    /// Fails with `AlreadyExists` when the slug is taken.
    async fn create_enterprise(
        &self,
        slug: &str,
        name: &str,
        seats: i64,
        now: OffsetDateTime,
    ) -> StoreResult<Enterprise>;
    async fn set_seats_purchased(&self, enterprise_id: i64, seats: i64) -> StoreResult<()>;
    async fn enterprise_by_slug(&self, slug: &str) -> StoreResult<Option<Enterprise>>;
    async fn enterprise_by_id(&self, enterprise_id: i64) -> StoreResult<Option<Enterprise>>;
    /// Every enterprise, by id (for the per-enterprise metrics).
    async fn list_enterprises(&self) -> StoreResult<Vec<Enterprise>>;
    async fn enterprise_generation(&self, enterprise_id: i64) -> StoreResult<i64>;

    /// Stores a REST token of the enterprise. Fails with `TokenNameTaken` when a live token of the enterprise has
    /// the name already.
    async fn create_api_token(
        &self,
        enterprise_id: i64,
        token_sha256: &str,
        token: &NewApiToken<'_>,
        now: OffsetDateTime,
    ) -> StoreResult<ApiToken>;
    /// A live (not revoked) REST token and its enterprise; an expired token is returned too (with its expiry), so
    /// that the caller can say it expired.
    async fn api_token_by_hash(
        &self,
        token_sha256: &str,
    ) -> StoreResult<Option<(Enterprise, ApiToken)>>;
    /// The enterprise's REST tokens, revoked ones included, by id.
    async fn list_api_tokens(&self, enterprise_id: i64) -> StoreResult<Vec<ApiToken>>;
    /// Revokes a live token of the enterprise at `now` and returns it; `TokenNotFound` when no live token matches.
    async fn revoke_api_token(
        &self,
        enterprise_id: i64,
        token: TokenSelector<'_>,
        now: OffsetDateTime,
    ) -> StoreResult<ApiToken>;
    /// Records that the token was used at `now`, unless a use within [`TOKEN_LAST_USE_RESOLUTION`] before `now` is
    /// recorded already (so replicas write it at most once a minute each, whatever the request rate).
    async fn record_api_token_use(&self, token_id: i64, now: OffsetDateTime) -> StoreResult<()>;

    /// Creates the instance in the enterprise, or rotates its credential (the old one stops working) and un-retires
    /// it. Fails with `PermissionDenied` when the server id belongs to another enterprise.
    async fn enroll_instance(
        &self,
        enterprise_id: i64,
        server_id: Uuid,
        hostname: &str,
        credential_sha256: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Instance>;
    /// The enterprise's instance (retired or not) a manual upload is for. An upload never creates one (an instance
    /// is created by `instance add` or enrollment); an unknown server id and another enterprise's are one answer,
    /// `UploadForUnknownInstance`, so that an upload cannot probe other enterprises' server ids.
    async fn instance_for_upload(
        &self,
        enterprise_id: i64,
        server_id: Uuid,
    ) -> StoreResult<Instance>;
    async fn instance_for_credential(
        &self,
        credential_sha256: &str,
    ) -> StoreResult<Option<Instance>>;
    async fn list_instances(&self, enterprise_id: i64) -> StoreResult<Vec<Instance>>;
    /// The enterprise's instance with this server id, retired or not.
    async fn instance_by_server_id(
        &self,
        enterprise_id: i64,
        server_id: Uuid,
    ) -> StoreResult<Option<Instance>>;
    /// A retired instance's users stop counting; its credential stops working.
    async fn retire_instance(
        &self,
        enterprise_id: i64,
        server_id: Uuid,
        now: OffsetDateTime,
    ) -> StoreResult<()>;

    /// Atomically replaces the instance's users with the snapshot's, unless this sync id was applied already
    /// (`Duplicate`) or the stored snapshot is newer ([`StoreError::OlderSnapshot`]).
    async fn commit_snapshot(&self, commit: SnapshotCommit<'_>) -> StoreResult<CommitOutcome>;
    /// Records a failed attempt for the status page; the stored snapshot is untouched.
    async fn record_failed_sync(
        &self,
        instance_id: i64,
        via: Arrival,
        error: &str,
        now: OffsetDateTime,
    ) -> StoreResult<()>;

    /// Replaces the enterprise's cloud members whole.
    async fn replace_cloud_members(
        &self,
        enterprise_id: i64,
        members: &[CloudMember],
    ) -> StoreResult<()>;

    /// The enterprise's merge input that changed after generation `since` (all of it when `since` is `None`), so
    /// that a merged view built at `since` can catch up by reloading only the instances that changed.
    async fn load_merge_changes(
        &self,
        enterprise_id: i64,
        since: Option<i64>,
    ) -> StoreResult<MergeChanges>;

    /// The whole merge input.
    async fn load_merge_input(&self, enterprise_id: i64) -> StoreResult<MergeInput> {
        Ok(self
            .load_merge_changes(enterprise_id, None)
            .await?
            .into_input())
    }

    /// Records today's usage: the latest count replaces the day's, the day's maximum only grows.
    async fn record_usage(
        &self,
        enterprise_id: i64,
        usage: &UsageDay,
        now: OffsetDateTime,
    ) -> StoreResult<()>;
    /// Days from `since` to `until` inclusive (`YYYY-MM-DD`), oldest first.
    async fn usage_history(
        &self,
        enterprise_id: i64,
        since: &str,
        until: &str,
    ) -> StoreResult<Vec<UsageDay>>;

    /// Stores a one-time enrollment token of the enterprise, valid until `expires_at`. Deletes the enterprise's
    /// tokens spent or expired longer than [`CONNECTION_RECORD_RETENTION`] ago.
    async fn create_enrollment_token(
        &self,
        enterprise_id: i64,
        token_sha256: &str,
        expires_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> StoreResult<()>;
    /// Redeems an enrollment token, atomically: it must exist, be unused and be unexpired at `now` (else
    /// `Unauthenticated`); the instance is enrolled or re-enrolled exactly as [`Store::enroll_instance`]
    /// does (rotation revokes the old credential; a server id of another enterprise is `PermissionDenied`, and the
    /// token stays unused); the token is marked used by this server id. A non-empty `ghes_version` is stored.
    async fn redeem_enrollment_token(
        &self,
        token_sha256: &str,
        server_id: Uuid,
        hostname: &str,
        ghes_version: &str,
        credential_sha256: &str,
        now: OffsetDateTime,
    ) -> StoreResult<(Enterprise, Instance)>;

    /// Records what an agent said on its control stream, if `credential_sha256` is still the live credential of
    /// the instance; `Unauthenticated` when it was rotated or the instance retired.
    async fn record_agent_presence(
        &self,
        instance_id: i64,
        credential_sha256: &str,
        report: AgentReport<'_>,
    ) -> StoreResult<()>;
    /// The control stream `session_id` ended: the instance shows disconnected, unless another stream of it wrote
    /// since.
    async fn end_agent_session(
        &self,
        instance_id: i64,
        session_id: Uuid,
        now: OffsetDateTime,
    ) -> StoreResult<()>;

    /// Queues a "Sync now" for an active instance of the enterprise: `NotFound` for an unknown or retired instance,
    /// `FailedPrecondition` for one without an agent credential (known only from uploads). Deletes the instance's
    /// requests older than [`CONNECTION_RECORD_RETENTION`].
    async fn create_sync_request(
        &self,
        enterprise_id: i64,
        server_id: Uuid,
        request_id: Uuid,
        now: OffsetDateTime,
    ) -> StoreResult<SyncRequest>;
    /// Marks the instance's queued requests (undelivered, not expired at `now`) delivered and returns them,
    /// oldest first. Each request is returned by one call only, across all replicas. Only for the instance's live
    /// credential: `Unauthenticated` when it was rotated or the instance retired.
    async fn claim_sync_requests(
        &self,
        instance_id: i64,
        credential_sha256: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Vec<SyncRequest>>;
    /// Puts a claimed request back in the queue, because the stream it was claimed for closed before it was sent.
    async fn release_sync_request(&self, instance_id: i64, request_id: Uuid) -> StoreResult<()>;
    /// Records the agent's answer to a request delivered to this instance; the first answer stands.
    async fn record_sync_ack(
        &self,
        instance_id: i64,
        ack: SyncAckRecord<'_>,
    ) -> StoreResult<AckOutcome>;
    /// A request of the enterprise's instance with this server id.
    async fn sync_request(
        &self,
        enterprise_id: i64,
        server_id: Uuid,
        request_id: Uuid,
    ) -> StoreResult<Option<SyncRequest>>;

    // --- encrypted usage files (issue 11) ---

    /// Adds a key pair to the enterprise's usage-file keys; it becomes the newest. Earlier keys are kept.
    async fn add_usage_file_key(
        &self,
        enterprise_id: i64,
        public_key: &str,
        secret_key: &str,
        now: OffsetDateTime,
    ) -> StoreResult<UsageFileKey>;
    /// Every usage-file key of the enterprise, newest first.
    async fn usage_file_keys(&self, enterprise_id: i64) -> StoreResult<Vec<UsageFileKey>>;

    // --- the owner's web console (issue 12) ---

    /// Stores a console session; deletes the enterprise's sessions that expired before `now`.
    async fn create_console_session(
        &self,
        session: &NewConsoleSession<'_>,
        now: OffsetDateTime,
    ) -> StoreResult<()>;
    /// The session with this id hash, if it is unexpired at `now` and the REST token it was opened with (if any)
    /// is neither revoked nor expired.
    async fn console_session(
        &self,
        id_sha256: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Option<ConsoleSession>>;
    /// Deletes a session (sign-out); false when there was none.
    async fn delete_console_session(&self, id_sha256: &str) -> StoreResult<bool>;
    /// Stores a one-time sign-in link token of the enterprise, valid until `expires_at`. Deletes the enterprise's
    /// links spent or expired longer than [`CONNECTION_RECORD_RETENTION`] ago.
    async fn create_console_link(
        &self,
        enterprise_id: i64,
        token_sha256: &str,
        expires_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> StoreResult<()>;
    /// Spends a sign-in link token, atomically (one redemption across all replicas): its enterprise when it exists,
    /// is unused and is unexpired at `now`; `None` otherwise.
    async fn redeem_console_link(
        &self,
        token_sha256: &str,
        now: OffsetDateTime,
    ) -> StoreResult<Option<Enterprise>>;
}

/// Opens the store named by the URL and applies pending migrations.
pub async fn open(database_url: &str) -> ServiceResult<DynStore> {
    open_with_max_connections(database_url, DEFAULT_MAX_CONNECTIONS).await
}

/// The default of `database_max_connections`: the most connections one process opens to PostgreSQL. Commits of one
/// enterprise queue on its row, so more sessions add waiting, not throughput: measured with `--compare-replicas 3`,
/// one replica syncs no faster with 16 than with 6, and three replicas of 8 each come within noise of one.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 8;

/// What [`Store::probe_write`] stores and deletes: 16 pages of 4 KiB, enough that the probe needs pages the
/// database does not have free when its disk is full.
pub const WRITE_PROBE_BYTES: usize = 64 * 1024;

/// The pools' `before_acquire` check: a connection still inside a transaction is closed, never handed out. A write
/// that failed (SQLITE_FULL during a statement or at COMMIT) can leave SQLite having rolled the transaction back
/// itself while sqlx still counts it open; the rollback sqlx queues on drop then fails, and a reused connection
/// refused every later `BEGIN` ("attempted to call begin_with at non-zero transaction depth") until a restart.
fn discard_if_in_transaction<C: sqlx::Connection>(
    connection: &mut C,
    _meta: sqlx::pool::PoolConnectionMetadata,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, sqlx::Error>> + Send + '_>> {
    let reusable = !connection.is_in_transaction();
    if !reusable {
        tracing::warn!("closing a database connection left inside a failed transaction");
    }
    Box::pin(std::future::ready(Ok(reusable)))
}

/// Like [`open`], with at most `max_connections` connections to PostgreSQL (SQLite ignores it).
pub async fn open_with_max_connections(
    database_url: &str,
    max_connections: u32,
) -> ServiceResult<DynStore> {
    if database_url.starts_with("sqlite:") {
        return Ok(Arc::new(SqliteStore::open(database_url).await?));
    }
    #[cfg(feature = "postgres")]
    if database_url.starts_with("postgres:") || database_url.starts_with("postgresql:") {
        return Ok(Arc::new(
            PostgresStore::open_with_max_connections(database_url, max_connections).await?,
        ));
    }
    #[cfg(not(feature = "postgres"))]
    let _ = max_connections;
    Err(StoreError::UnsupportedUrl.into())
}

/// The refusal of a server id that is no active instance of the enterprise, as the store words it.
pub(crate) fn no_active_instance(server_id: Uuid) -> ServiceError {
    StoreError::NoActiveInstance { server_id }.into()
}

pub(crate) use crate::time_format::{time_to_unix_ms, unix_ms_to_time, unix_to_time};
