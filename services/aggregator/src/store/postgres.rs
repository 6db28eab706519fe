//! The scale-out store: PostgreSQL, shared by several aggregator replicas.
//!
//! Concurrency comes from the database, not from the process: every commit of a snapshot locks its instance row
//! (`SELECT … FOR UPDATE`) before anything else, so two replicas committing snapshots of the same instance run one
//! after the other and the second sees the first's `generated_at` and sync id (newest wins, applied once).
//! Migrations take sqlx's advisory lock, so replicas starting together apply them once.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use license_sync_core::accounts::Accounts;
use license_sync_core::model::CloudMember;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use super::rows::{
    ACCOUNT_COLUMNS, INSTANCE_COLUMNS, collect_accounts, collect_cloud_directory,
    enterprise_from_row, instance_from_row, instance_version_from_row, usage_day_from_row,
};
use super::{
    AckOutcome, AgentReport, Arrival, CONNECTION_RECORD_RETENTION, CommitOutcome, Enterprise,
    Instance, MergeChanges, SYNC_REQUEST_TTL, SnapshotCommit, Store, SyncAckRecord, SyncRequest,
    UsageDay, credential_revoked, enrollment_token_refused, no_active_instance, no_agent, refusal,
    time_to_unix_ms, unix_ms_to_time,
};
use crate::error::{ErrorKind, ServiceError, ServiceResult};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Rows per `INSERT … SELECT FROM UNNEST(…)`: bounds the size of one statement's arrays.
const USER_ROWS_PER_INSERT: usize = 50_000;

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects with `options` (e.g. a `search_path` for tests) and applies pending migrations.
    pub async fn open_with(options: PgConnectOptions) -> ServiceResult<Self> {
        Self::open_pool(options, super::DEFAULT_MAX_CONNECTIONS).await
    }

    async fn open_pool(options: PgConnectOptions, max_connections: u32) -> ServiceResult<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|err| {
                ServiceError::new(
                    ErrorKind::Unavailable,
                    format!("cannot connect to PostgreSQL: {err}"),
                )
            })?;
        MIGRATOR.run(&pool).await.map_err(|err| {
            ServiceError::new(
                ErrorKind::Internal,
                format!("cannot apply database migrations: {err}"),
            )
        })?;
        Ok(PostgresStore { pool })
    }

    pub async fn open(database_url: &str) -> ServiceResult<Self> {
        Self::open_with_max_connections(database_url, super::DEFAULT_MAX_CONNECTIONS).await
    }

    /// Connects with at most `max_connections` connections (`database_max_connections`).
    pub async fn open_with_max_connections(
        database_url: &str,
        max_connections: u32,
    ) -> ServiceResult<Self> {
        let options = PgConnectOptions::from_str(database_url).map_err(|err| {
            ServiceError::invalid(format!("invalid PostgreSQL database_url: {err}"))
        })?;
        Self::open_pool(options, max_connections).await
    }
}

fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

const SYNC_REQUEST_COLUMNS: &str = "request_id, instance_id, requested_at_ms, delivered_at_ms, acked_at_ms, \
     accepted, job_id, reason";

fn sync_request_from_row(row: &PgRow) -> Result<SyncRequest, sqlx::Error> {
    let request_id: String = row.try_get("request_id")?;
    Ok(SyncRequest {
        request_id: Uuid::parse_str(&request_id)
            .map_err(|err| sqlx::Error::Decode(Box::new(err)))?,
        instance_id: row.try_get("instance_id")?,
        requested_at: unix_ms_to_time(row.try_get("requested_at_ms")?),
        delivered_at: row
            .try_get::<Option<i64>, _>("delivered_at_ms")?
            .map(unix_ms_to_time),
        acked_at: row
            .try_get::<Option<i64>, _>("acked_at_ms")?
            .map(unix_ms_to_time),
        accepted: row.try_get("accepted")?,
        job_id: row.try_get("job_id")?,
        reason: row.try_get("reason")?,
    })
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}

async fn bump_generation(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    enterprise_id: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE enterprises SET generation = generation + 1 WHERE id = $1 RETURNING generation",
    )
    .bind(enterprise_id)
    .fetch_one(&mut **tx)
    .await
}

/// Bumps the generation and stamps an instance's users with it, so that merged views reload that instance. The
/// enterprise row's lock, held until COMMIT, keeps generations in commit order: a snapshot commit makes this its last
/// statement before COMMIT (after the rows), and it is one statement (one round trip), so that the other commits of
/// the enterprise wait for that lock as briefly as possible.
async fn bump_users_generation(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    enterprise_id: i64,
    instance_id: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "WITH bumped AS (UPDATE enterprises SET generation = generation + 1 WHERE id = $1 RETURNING generation) \
         UPDATE instances SET users_generation = bumped.generation FROM bumped WHERE instances.id = $2 \
         RETURNING instances.users_generation",
    )
    .bind(enterprise_id)
    .bind(instance_id)
    .fetch_one(&mut **tx)
    .await
}

/// Bumps the generation and stamps the cloud members with it, so that merged views reload them.
async fn bump_members_generation(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    enterprise_id: i64,
) -> Result<(), sqlx::Error> {
    // Both right-hand sides read the row as it was, so both columns get the new value.
    sqlx::query(
        "UPDATE enterprises SET generation = generation + 1, members_generation = generation + 1 WHERE id = $1",
    )
    .bind(enterprise_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn instance_by_server_id(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    server_id: Uuid,
) -> Result<Option<Instance>, sqlx::Error> {
    let row = sqlx::query(&format!(
        "SELECT {INSTANCE_COLUMNS} FROM instances WHERE server_id = $1"
    ))
    .bind(server_id.to_string())
    .fetch_optional(&mut **tx)
    .await?;
    row.as_ref().map(instance_from_row).transpose()
}

/// Outcome of the part of a commit that can be retried as a whole.
enum Attempt {
    Done(CommitOutcome),
    /// Another replica applied the same sync id between our check and our insert.
    RacedOnSyncId,
}

impl PostgresStore {
    async fn try_commit(&self, commit: &SnapshotCommit<'_>) -> ServiceResult<Attempt> {
        let meta = &commit.snapshot.meta;
        let sync_id = meta.sync_id.to_string();
        let mut tx = self.pool.begin().await?;

        // The instance row lock serialises commits of one instance across replicas.
        let stored = sqlx::query(
            "SELECT enterprise_id, generated_at_ms, retired_at FROM instances WHERE id = $1 FOR UPDATE",
        )
        .bind(commit.instance_id)
        .fetch_optional(&mut *tx)
        .await
        ?
        .ok_or_else(|| ServiceError::not_found("the instance no longer exists; enroll it again"))?;

        let applied = sqlx::query(
            "SELECT instance_id, users_sha256, user_count, committed_at_ms FROM applied_syncs WHERE sync_id = $1",
        )
        .bind(&sync_id)
        .fetch_optional(&mut *tx)
        .await
        ?;
        if let Some(applied) = applied {
            let instance_id: i64 = applied.try_get("instance_id")?;
            let sha: String = applied.try_get("users_sha256")?;
            if instance_id != commit.instance_id || sha != commit.users_sha256 {
                return Err(refusal::sync_id_reused(&sync_id));
            }
            let user_count: i64 = applied.try_get("user_count")?;
            return Ok(Attempt::Done(CommitOutcome::Duplicate {
                committed_at: unix_ms_to_time(applied.try_get("committed_at_ms")?),
                user_count: user_count as u64,
            }));
        }

        let enterprise_id: i64 = stored.try_get("enterprise_id")?;
        if stored.try_get::<Option<i64>, _>("retired_at")?.is_some() {
            return Err(refusal::instance_retired());
        }
        let new_generated_ms = time_to_unix_ms(meta.generated_at);
        if let Some(stored_ms) = stored.try_get::<Option<i64>, _>("generated_at_ms")?
            && stored_ms > new_generated_ms
        {
            return Err(refusal::older_snapshot(
                meta.generated_at,
                unix_ms_to_time(stored_ms),
            ));
        }

        sqlx::query("DELETE FROM server_users WHERE instance_id = $1")
            .bind(commit.instance_id)
            .execute(&mut *tx)
            .await?;
        for chunk in commit.snapshot.users.chunks(USER_ROWS_PER_INSERT) {
            let ids: Vec<i64> = chunk.iter().map(|u| u.id).collect();
            let logins: Vec<&str> = chunk.iter().map(|u| u.login.as_str()).collect();
            let emails: Vec<&str> = chunk.iter().map(|u| u.email.as_str()).collect();
            let roles: Vec<&str> = chunk.iter().map(|u| u.role.as_str()).collect();
            let suspended: Vec<bool> = chunk.iter().map(|u| u.suspended).collect();
            let dormant: Vec<bool> = chunk.iter().map(|u| u.dormant).collect();
            let created: Vec<Option<i64>> = chunk
                .iter()
                .map(|u| u.created_at.map(OffsetDateTime::unix_timestamp))
                .collect();
            let active: Vec<Option<i64>> = chunk
                .iter()
                .map(|u| u.last_active.map(OffsetDateTime::unix_timestamp))
                .collect();
            let two_factor: Vec<Option<bool>> =
                chunk.iter().map(|u| u.two_factor_enabled).collect();
            sqlx::query(
                "INSERT INTO server_users (instance_id, user_id, login, email, role, suspended, dormant, \
                 created_at, last_active, two_factor_enabled) \
                 SELECT $1, * FROM UNNEST($2::bigint[], $3::text[], $4::text[], $5::text[], $6::bool[], \
                 $7::bool[], $8::bigint[], $9::bigint[], $10::bool[])",
            )
            .bind(commit.instance_id)
            .bind(ids)
            .bind(logins)
            .bind(emails)
            .bind(roles)
            .bind(suspended)
            .bind(dormant)
            .bind(created)
            .bind(active)
            .bind(two_factor)
            .execute(&mut *tx)
            .await?;
        }

        let now = commit.now.unix_timestamp();
        let via = commit.via.as_str();
        sqlx::query(
            "UPDATE instances SET hostname = $1, ghes_version = $2, generated_at_ms = $3, user_count = $4, \
             last_success_at = $5, last_success_via = $6, last_attempt_at = $5, last_attempt_ok = TRUE, \
             last_attempt_via = $6, last_error = '', rows_skipped = $7, license_seats = $8, \
             license_seats_used = $9 WHERE id = $10",
        )
        .bind(&meta.instance.hostname)
        .bind(&meta.instance.ghes_version)
        .bind(new_generated_ms)
        .bind(commit.snapshot.users.len() as i64)
        .bind(now)
        .bind(via)
        .bind(meta.source_report.rows_skipped as i64)
        .bind(meta.license.as_ref().and_then(|l| l.seats))
        .bind(meta.license.as_ref().map(|l| l.seats_used))
        .bind(commit.instance_id)
        .execute(&mut *tx)
        .await
        ?;
        let inserted = sqlx::query(
            "INSERT INTO applied_syncs (sync_id, instance_id, users_sha256, user_count, via, committed_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&sync_id)
        .bind(commit.instance_id)
        .bind(commit.users_sha256)
        .bind(commit.snapshot.users.len() as i64)
        .bind(via)
        .bind(time_to_unix_ms(commit.now))
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(err) if is_unique_violation(&err) => return Ok(Attempt::RacedOnSyncId),
            Err(err) => return Err(err.into()),
        }
        let generation = bump_users_generation(&mut tx, enterprise_id, commit.instance_id).await?;
        tx.commit().await?;
        Ok(Attempt::Done(CommitOutcome::Applied {
            committed_at: commit.now,
            generation,
        }))
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn record_usage(
        &self,
        enterprise_id: i64,
        usage: &UsageDay,
        now: OffsetDateTime,
    ) -> ServiceResult<()> {
        let instances = serde_json::to_string(&usage.instances)
            .map_err(|err| ServiceError::internal("encoding instance usage", err))?;
        sqlx::query(
            "INSERT INTO usage_history (enterprise_id, day, consumed, max_consumed, purchased, instances_json, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (enterprise_id, day) DO UPDATE SET consumed = excluded.consumed, \
             max_consumed = GREATEST(usage_history.max_consumed, excluded.max_consumed), purchased = excluded.purchased, \
             instances_json = excluded.instances_json, updated_at = excluded.updated_at",
        )
        .bind(enterprise_id)
        .bind(&usage.date)
        .bind(usage.consumed)
        .bind(usage.max_consumed)
        .bind(usage.purchased)
        .bind(instances)
        .bind(now.unix_timestamp())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn usage_history(
        &self,
        enterprise_id: i64,
        since: &str,
        until: &str,
    ) -> ServiceResult<Vec<UsageDay>> {
        let rows = sqlx::query(
            "SELECT day, consumed, max_consumed, purchased, instances_json FROM usage_history \
             WHERE enterprise_id = $1 AND day >= $2 AND day <= $3 ORDER BY day",
        )
        .bind(enterprise_id)
        .bind(since)
        .bind(until)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(usage_day_from_row).collect()
    }

    async fn ping(&self) -> ServiceResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_enterprise(
        &self,
        slug: &str,
        name: &str,
        seats: i64,
    ) -> ServiceResult<Enterprise> {
        let result = sqlx::query(
            "INSERT INTO enterprises (slug, name, seats_purchased, created_at) VALUES ($1, $2, $3, $4) \
             RETURNING id, slug, name, seats_purchased, generation",
        )
        .bind(slug)
        .bind(name)
        .bind(seats)
        .bind(now_unix())
        .fetch_one(&self.pool)
        .await;
        match result {
            Ok(row) => Ok(enterprise_from_row(&row)?),
            Err(err) if is_unique_violation(&err) => Err(ServiceError::new(
                ErrorKind::AlreadyExists,
                format!("enterprise {slug:?} already exists; choose another slug"),
            )),
            Err(err) => Err(err.into()),
        }
    }

    async fn set_seats_purchased(&self, enterprise_id: i64, seats: i64) -> ServiceResult<()> {
        sqlx::query(
            "UPDATE enterprises SET seats_purchased = $1, generation = generation + 1 WHERE id = $2",
        )
        .bind(seats)
        .bind(enterprise_id)
        .execute(&self.pool)
        .await
        ?;
        Ok(())
    }

    async fn enterprise_by_slug(&self, slug: &str) -> ServiceResult<Option<Enterprise>> {
        let row = sqlx::query(
            "SELECT id, slug, name, seats_purchased, generation FROM enterprises WHERE slug = $1",
        )
        .bind(slug)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(enterprise_from_row).transpose()?)
    }

    async fn enterprise_by_id(&self, enterprise_id: i64) -> ServiceResult<Option<Enterprise>> {
        let row = sqlx::query(
            "SELECT id, slug, name, seats_purchased, generation FROM enterprises WHERE id = $1",
        )
        .bind(enterprise_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(enterprise_from_row).transpose()?)
    }

    async fn list_enterprises(&self) -> ServiceResult<Vec<Enterprise>> {
        let rows = sqlx::query(
            "SELECT id, slug, name, seats_purchased, generation FROM enterprises ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(enterprise_from_row)
            .collect::<Result<_, _>>()?)
    }

    async fn enterprise_generation(&self, enterprise_id: i64) -> ServiceResult<i64> {
        let generation: Option<i64> =
            sqlx::query_scalar("SELECT generation FROM enterprises WHERE id = $1")
                .bind(enterprise_id)
                .fetch_optional(&self.pool)
                .await?;
        generation.ok_or_else(|| ServiceError::not_found("enterprise not found"))
    }

    async fn create_api_token(
        &self,
        enterprise_id: i64,
        token_sha256: &str,
        description: &str,
    ) -> ServiceResult<()> {
        sqlx::query(
            "INSERT INTO api_tokens (enterprise_id, token_sha256, description, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(enterprise_id)
        .bind(token_sha256)
        .bind(description)
        .bind(now_unix())
        .execute(&self.pool)
        .await
        ?;
        Ok(())
    }

    async fn enterprise_for_api_token(
        &self,
        token_sha256: &str,
    ) -> ServiceResult<Option<Enterprise>> {
        let row = sqlx::query(
            "SELECT e.id, e.slug, e.name, e.seats_purchased, e.generation FROM api_tokens t \
             JOIN enterprises e ON e.id = t.enterprise_id \
             WHERE t.token_sha256 = $1 AND t.revoked_at IS NULL",
        )
        .bind(token_sha256)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(enterprise_from_row).transpose()?)
    }

    async fn enroll_instance(
        &self,
        enterprise_id: i64,
        server_id: Uuid,
        hostname: &str,
        credential_sha256: &str,
    ) -> ServiceResult<Instance> {
        let mut tx = self.pool.begin().await?;
        let instance = enroll_in(
            &mut tx,
            enterprise_id,
            server_id,
            hostname,
            None,
            credential_sha256,
        )
        .await?;
        tx.commit().await?;
        Ok(instance)
    }

    async fn instance_for_upload(
        &self,
        enterprise_id: i64,
        server_id: Uuid,
        hostname: &str,
    ) -> ServiceResult<Instance> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO instances (enterprise_id, server_id, hostname, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (server_id) DO NOTHING",
        )
        .bind(enterprise_id)
        .bind(server_id.to_string())
        .bind(hostname)
        .bind(now_unix())
        .execute(&mut *tx)
        .await
        ?;
        let instance = instance_by_server_id(&mut tx, server_id)
            .await?
            .ok_or_else(|| {
                ServiceError::internal("registering an uploaded instance", "row vanished")
            })?;
        if instance.enterprise_id != enterprise_id {
            return Err(refusal::upload_for_other_enterprise(server_id));
        }
        tx.commit().await?;
        Ok(instance)
    }

    async fn instance_for_credential(
        &self,
        credential_sha256: &str,
    ) -> ServiceResult<Option<Instance>> {
        let row = sqlx::query(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE credential_sha256 = $1 AND retired_at IS NULL"
        ))
        .bind(credential_sha256)
        .fetch_optional(&self.pool)
        .await
        ?;
        Ok(row.as_ref().map(instance_from_row).transpose()?)
    }

    async fn list_instances(&self, enterprise_id: i64) -> ServiceResult<Vec<Instance>> {
        let rows = sqlx::query(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE enterprise_id = $1 ORDER BY hostname, server_id"
        ))
        .bind(enterprise_id)
        .fetch_all(&self.pool)
        .await
        ?;
        Ok(rows
            .iter()
            .map(instance_from_row)
            .collect::<Result<_, _>>()?)
    }

    async fn instance_by_server_id(
        &self,
        enterprise_id: i64,
        server_id: Uuid,
    ) -> ServiceResult<Option<Instance>> {
        let row = sqlx::query(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE enterprise_id = $1 AND server_id = $2"
        ))
        .bind(enterprise_id)
        .bind(server_id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(instance_from_row).transpose()?)
    }

    async fn retire_instance(&self, enterprise_id: i64, server_id: Uuid) -> ServiceResult<()> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE instances SET retired_at = $1, credential_sha256 = NULL \
             WHERE enterprise_id = $2 AND server_id = $3 AND retired_at IS NULL",
        )
        .bind(now_unix())
        .bind(enterprise_id)
        .bind(server_id.to_string())
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(ServiceError::not_found(format!(
                "no active instance {server_id} in this enterprise"
            )));
        }
        bump_generation(&mut tx, enterprise_id).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn commit_snapshot(&self, commit: SnapshotCommit<'_>) -> ServiceResult<CommitOutcome> {
        // A race on the sync id means another replica applied this very snapshot: run again to return its receipt.
        for _ in 0..3 {
            match self.try_commit(&commit).await? {
                Attempt::Done(outcome) => return Ok(outcome),
                Attempt::RacedOnSyncId => continue,
            }
        }
        Err(ServiceError::new(
            ErrorKind::Unavailable,
            "the snapshot is being applied by another aggregator replica; retry",
        ))
    }

    async fn record_failed_sync(
        &self,
        instance_id: i64,
        via: Arrival,
        error: &str,
        now: OffsetDateTime,
    ) -> ServiceResult<()> {
        sqlx::query(
            "UPDATE instances SET last_attempt_at = $1, last_attempt_ok = FALSE, last_attempt_via = $2, \
             last_error = $3 WHERE id = $4",
        )
        .bind(now.unix_timestamp())
        .bind(via.as_str())
        .bind(error)
        .bind(instance_id)
        .execute(&self.pool)
        .await
        ?;
        Ok(())
    }

    async fn replace_cloud_members(
        &self,
        enterprise_id: i64,
        members: &[CloudMember],
    ) -> ServiceResult<()> {
        let mut ids = Vec::with_capacity(members.len());
        let mut logins = Vec::with_capacity(members.len());
        let mut attributes = Vec::with_capacity(members.len());
        for member in members {
            ids.push(member.id);
            logins.push(member.login.as_str());
            attributes.push(
                serde_json::to_string(member)
                    .map_err(|err| ServiceError::internal("encoding a cloud member", err))?,
            );
        }
        let mut tx = self.pool.begin().await?;
        // Serialises concurrent imports of one enterprise.
        sqlx::query("SELECT id FROM enterprises WHERE id = $1 FOR UPDATE")
            .bind(enterprise_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM cloud_members WHERE enterprise_id = $1")
            .bind(enterprise_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO cloud_members (enterprise_id, member_id, login, attributes_json) \
             SELECT $1, * FROM UNNEST($2::bigint[], $3::text[], $4::text[])",
        )
        .bind(enterprise_id)
        .bind(ids)
        .bind(logins)
        .bind(attributes)
        .execute(&mut *tx)
        .await?;
        bump_members_generation(&mut tx, enterprise_id).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn load_merge_changes(
        &self,
        enterprise_id: i64,
        since: Option<i64>,
    ) -> ServiceResult<MergeChanges> {
        // REPEATABLE READ: accounts, members and generation from one snapshot of the database.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let enterprise = sqlx::query(
            "SELECT generation, seats_purchased, members_generation FROM enterprises WHERE id = $1",
        )
        .bind(enterprise_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| ServiceError::not_found("enterprise not found"))?;
        let changed_after = |generation: i64| since.is_none_or(|since| generation > since);

        let instances = sqlx::query(
            "SELECT id, hostname, users_generation FROM instances \
             WHERE enterprise_id = $1 AND retired_at IS NULL ORDER BY id",
        )
        .bind(enterprise_id)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(instance_version_from_row)
        .collect::<ServiceResult<Vec<_>>>()?;
        let mut changed_users: Vec<(i64, Accounts)> = instances
            .iter()
            .filter(|instance| changed_after(instance.users_generation))
            .map(|instance| (instance.id, Accounts::new()))
            .collect();
        for (instance_id, users) in &mut changed_users {
            let sql =
                format!("SELECT {ACCOUNT_COLUMNS} FROM server_users u WHERE u.instance_id = $1");
            *users = collect_accounts(sqlx::query(&sql).bind(*instance_id).fetch(&mut *tx)).await?;
        }

        let cloud_members = if changed_after(enterprise.try_get("members_generation")?) {
            let rows = sqlx::query(
                "SELECT attributes_json FROM cloud_members WHERE enterprise_id = $1 ORDER BY member_id",
            )
            .bind(enterprise_id)
            .fetch(&mut *tx);
            Some(collect_cloud_directory(rows).await?)
        } else {
            None
        };
        tx.commit().await?;
        Ok(MergeChanges {
            generation: enterprise.try_get("generation")?,
            seats_purchased: enterprise.try_get("seats_purchased")?,
            instances,
            changed_users,
            cloud_members,
        })
    }

    async fn create_enrollment_token(
        &self,
        enterprise_id: i64,
        token_sha256: &str,
        expires_at: OffsetDateTime,
    ) -> ServiceResult<()> {
        let mut tx = self.pool.begin().await?;
        let now = OffsetDateTime::now_utc();
        let forget_before = time_to_unix_ms(now - CONNECTION_RECORD_RETENTION);
        sqlx::query(
            "DELETE FROM enrollment_tokens WHERE enterprise_id = $1 \
             AND (expires_at_ms < $2 OR used_at_ms < $2)",
        )
        .bind(enterprise_id)
        .bind(forget_before)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO enrollment_tokens (enterprise_id, token_sha256, created_at_ms, expires_at_ms) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(enterprise_id)
        .bind(token_sha256)
        .bind(time_to_unix_ms(now))
        .bind(time_to_unix_ms(expires_at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn redeem_enrollment_token(
        &self,
        token_sha256: &str,
        server_id: Uuid,
        hostname: &str,
        ghes_version: &str,
        credential_sha256: &str,
        now: OffsetDateTime,
    ) -> ServiceResult<(Enterprise, Instance)> {
        let mut tx = self.pool.begin().await?;
        let now_ms = time_to_unix_ms(now);
        // The row lock makes a concurrent redemption of the same token wait, then see it used.
        let token = sqlx::query(
            "SELECT id, enterprise_id FROM enrollment_tokens \
             WHERE token_sha256 = $1 AND used_at_ms IS NULL AND expires_at_ms > $2 FOR UPDATE",
        )
        .bind(token_sha256)
        .bind(now_ms)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(enrollment_token_refused)?;
        let token_id: i64 = token.try_get("id")?;
        let enterprise_id: i64 = token.try_get("enterprise_id")?;
        let instance = enroll_in(
            &mut tx,
            enterprise_id,
            server_id,
            hostname,
            Some(ghes_version),
            credential_sha256,
        )
        .await?;
        let spent = sqlx::query(
            "UPDATE enrollment_tokens SET used_at_ms = $1, used_by_server_id = $2 \
             WHERE id = $3 AND used_at_ms IS NULL",
        )
        .bind(now_ms)
        .bind(server_id.to_string())
        .bind(token_id)
        .execute(&mut *tx)
        .await?;
        if spent.rows_affected() != 1 {
            return Err(enrollment_token_refused());
        }
        let enterprise = sqlx::query(
            "SELECT id, slug, name, seats_purchased, generation FROM enterprises WHERE id = $1",
        )
        .bind(enterprise_id)
        .fetch_one(&mut *tx)
        .await?;
        let enterprise = enterprise_from_row(&enterprise)?;
        tx.commit().await?;
        Ok((enterprise, instance))
    }

    async fn record_agent_presence(
        &self,
        instance_id: i64,
        credential_sha256: &str,
        report: AgentReport<'_>,
    ) -> ServiceResult<()> {
        let updated = sqlx::query(
            "UPDATE instances SET agent_session_id = $1, agent_last_seen_at_ms = $2, agent_sync_enabled = $3, \
             agent_version = COALESCE($4, agent_version), \
             agent_pending_deliveries = COALESCE($5, agent_pending_deliveries) \
             WHERE id = $6 AND credential_sha256 = $7 AND retired_at IS NULL",
        )
        .bind(report.session_id.to_string())
        .bind(time_to_unix_ms(report.seen_at))
        .bind(report.sync_enabled)
        .bind(report.version)
        .bind(report.pending_deliveries.map(i64::from))
        .bind(instance_id)
        .bind(credential_sha256)
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(credential_revoked());
        }
        Ok(())
    }

    async fn end_agent_session(
        &self,
        instance_id: i64,
        session_id: Uuid,
        now: OffsetDateTime,
    ) -> ServiceResult<()> {
        sqlx::query(
            "UPDATE instances SET agent_session_id = NULL, \
             agent_last_seen_at_ms = CASE WHEN agent_last_seen_at_ms IS NULL OR agent_last_seen_at_ms < $1 \
             THEN $1 ELSE agent_last_seen_at_ms END \
             WHERE id = $2 AND agent_session_id = $3",
        )
        .bind(time_to_unix_ms(now))
        .bind(instance_id)
        .bind(session_id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn create_sync_request(
        &self,
        enterprise_id: i64,
        server_id: Uuid,
        request_id: Uuid,
        now: OffsetDateTime,
    ) -> ServiceResult<SyncRequest> {
        let mut tx = self.pool.begin().await?;
        // FOR SHARE: a concurrent retirement waits for this request to be queued (and then stops its delivery).
        let instance = sqlx::query(
            "SELECT id, credential_sha256 IS NOT NULL AS has_credential FROM instances \
             WHERE enterprise_id = $1 AND server_id = $2 AND retired_at IS NULL FOR SHARE",
        )
        .bind(enterprise_id)
        .bind(server_id.to_string())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| no_active_instance(server_id))?;
        let instance_id: i64 = instance.try_get("id")?;
        if !instance.try_get::<bool, _>("has_credential")? {
            return Err(no_agent(server_id));
        }
        sqlx::query("DELETE FROM sync_requests WHERE instance_id = $1 AND requested_at_ms < $2")
            .bind(instance_id)
            .bind(time_to_unix_ms(now - CONNECTION_RECORD_RETENTION))
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query(&format!(
            "INSERT INTO sync_requests (request_id, instance_id, requested_at_ms) VALUES ($1, $2, $3) \
             RETURNING {SYNC_REQUEST_COLUMNS}"
        ))
        .bind(request_id.to_string())
        .bind(instance_id)
        .bind(time_to_unix_ms(now))
        .fetch_one(&mut *tx)
        .await?;
        let request = sync_request_from_row(&row)?;
        tx.commit().await?;
        Ok(request)
    }

    async fn claim_sync_requests(
        &self,
        instance_id: i64,
        credential_sha256: &str,
        now: OffsetDateTime,
    ) -> ServiceResult<Vec<SyncRequest>> {
        let not_before = time_to_unix_ms(now - SYNC_REQUEST_TTL);
        // The poll every stream runs every second: one read on the partial index, no row locks.
        let probe = sqlx::query(
            "SELECT credential_sha256 = $1 AND retired_at IS NULL AS live, \
             EXISTS (SELECT 1 FROM sync_requests r WHERE r.instance_id = i.id \
                     AND r.delivered_at_ms IS NULL AND r.requested_at_ms >= $2) AS pending \
             FROM instances i WHERE i.id = $3",
        )
        .bind(credential_sha256)
        .bind(not_before)
        .bind(instance_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(probe) = probe else {
            return Err(credential_revoked());
        };
        if probe.try_get::<Option<bool>, _>("live")? != Some(true) {
            return Err(credential_revoked());
        }
        if !probe.try_get::<bool, _>("pending")? {
            return Ok(Vec::new());
        }
        // A replica racing us for the same rows waits on their locks, then re-checks `delivered_at_ms IS NULL`
        // (READ COMMITTED) and skips them: each request is returned once.
        let rows = sqlx::query(&format!(
            "UPDATE sync_requests SET delivered_at_ms = $1 \
             WHERE instance_id = $2 AND delivered_at_ms IS NULL AND requested_at_ms >= $3 \
             AND EXISTS (SELECT 1 FROM instances i WHERE i.id = $2 AND i.credential_sha256 = $4 \
                         AND i.retired_at IS NULL) \
             RETURNING {SYNC_REQUEST_COLUMNS}"
        ))
        .bind(time_to_unix_ms(now))
        .bind(instance_id)
        .bind(not_before)
        .bind(credential_sha256)
        .fetch_all(&self.pool)
        .await?;
        let mut claimed = rows
            .iter()
            .map(sync_request_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        claimed.sort_by_key(|request| (request.requested_at, request.request_id));
        Ok(claimed)
    }

    async fn release_sync_request(&self, instance_id: i64, request_id: Uuid) -> ServiceResult<()> {
        sqlx::query(
            "UPDATE sync_requests SET delivered_at_ms = NULL \
             WHERE request_id = $1 AND instance_id = $2 AND acked_at_ms IS NULL",
        )
        .bind(request_id.to_string())
        .bind(instance_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn record_sync_ack(
        &self,
        instance_id: i64,
        ack: SyncAckRecord<'_>,
    ) -> ServiceResult<AckOutcome> {
        let mut tx = self.pool.begin().await?;
        let acked: Option<Option<i64>> = sqlx::query_scalar(
            "SELECT acked_at_ms FROM sync_requests \
             WHERE request_id = $1 AND instance_id = $2 AND delivered_at_ms IS NOT NULL FOR UPDATE",
        )
        .bind(ack.request_id.to_string())
        .bind(instance_id)
        .fetch_optional(&mut *tx)
        .await?;
        let outcome = match acked {
            None => AckOutcome::Unknown,
            Some(Some(_)) => AckOutcome::AlreadyAcked,
            Some(None) => {
                sqlx::query(
                    "UPDATE sync_requests SET acked_at_ms = $1, accepted = $2, job_id = $3, reason = $4 \
                     WHERE request_id = $5 AND instance_id = $6",
                )
                .bind(time_to_unix_ms(ack.acked_at))
                .bind(ack.accepted)
                .bind(ack.job_id)
                .bind(ack.reason)
                .bind(ack.request_id.to_string())
                .bind(instance_id)
                .execute(&mut *tx)
                .await?;
                AckOutcome::Recorded
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn sync_request(
        &self,
        enterprise_id: i64,
        server_id: Uuid,
        request_id: Uuid,
    ) -> ServiceResult<Option<SyncRequest>> {
        let row = sqlx::query(
            "SELECT r.request_id, r.instance_id, r.requested_at_ms, r.delivered_at_ms, r.acked_at_ms, \
             r.accepted, r.job_id, r.reason FROM sync_requests r JOIN instances i ON i.id = r.instance_id \
             WHERE r.request_id = $1 AND i.enterprise_id = $2 AND i.server_id = $3",
        )
        .bind(request_id.to_string())
        .bind(enterprise_id)
        .bind(server_id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(sync_request_from_row).transpose()?)
    }
}

/// Enrolls or re-enrolls an instance inside the caller's transaction (see [`Store::enroll_instance`]).
async fn enroll_in(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    enterprise_id: i64,
    server_id: Uuid,
    hostname: &str,
    ghes_version: Option<&str>,
    credential_sha256: &str,
) -> ServiceResult<Instance> {
    let ghes_version = ghes_version.filter(|version| !version.is_empty());
    // Inserting first (or doing nothing) makes concurrent enrollments of one server id race on the unique key
    // instead of both inserting.
    sqlx::query(
        "INSERT INTO instances (enterprise_id, server_id, hostname, ghes_version, created_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (server_id) DO NOTHING",
    )
    .bind(enterprise_id)
    .bind(server_id.to_string())
    .bind(hostname)
    .bind(ghes_version.unwrap_or_default())
    .bind(now_unix())
    .execute(&mut **tx)
    .await?;
    let existing = sqlx::query(
        "SELECT id, enterprise_id, retired_at, hostname FROM instances WHERE server_id = $1 FOR UPDATE",
    )
    .bind(server_id.to_string())
    .fetch_one(&mut **tx)
    .await?;
    let owner: i64 = existing.try_get("enterprise_id")?;
    if owner != enterprise_id {
        return Err(refusal::enrolled_elsewhere(server_id));
    }
    let was_retired = existing.try_get::<Option<i64>, _>("retired_at")?.is_some();
    sqlx::query(
        "UPDATE instances SET credential_sha256 = $1, hostname = $2, ghes_version = COALESCE($3, ghes_version), \
         retired_at = NULL WHERE server_id = $4",
    )
    .bind(credential_sha256)
    .bind(hostname)
    .bind(ghes_version)
    .bind(server_id.to_string())
    .execute(&mut **tx)
    .await?;
    let previous_hostname: String = existing.try_get("hostname")?;
    if was_retired || previous_hostname != hostname {
        // Its stored users count again, or under another hostname.
        bump_users_generation(tx, enterprise_id, existing.try_get("id")?).await?;
    }
    instance_by_server_id(tx, server_id)
        .await?
        .ok_or_else(|| ServiceError::internal("enrolling an instance", "row vanished"))
}
