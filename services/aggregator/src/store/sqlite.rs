//! The embedded store: one SQLite file in WAL mode.
//!
//! Durability: `synchronous = FULL`, so a snapshot acknowledged to an agent survives a power loss.
//! Concurrency: SQLite has one writer; writes are serialised by `write_lock` inside the process and start with
//! `BEGIN IMMEDIATE`, so they wait for the write lock (busy timeout) instead of failing to upgrade a read lock.
//! Readers run in parallel on WAL snapshots.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use license_sync_core::accounts::Accounts;
use license_sync_core::model::CloudMember;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};
use time::OffsetDateTime;
use tokio::sync::Mutex;
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

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Rows per multi-row INSERT. Each connection caches the prepared statement of a full chunk, and SQLite's compiled
/// form of a multi-row VALUES grows with its rows (megabytes at 3000 rows × 10 columns, held by each of the pool's
/// connections); past a few hundred rows a bigger statement saves no time. The last, shorter chunk is prepared
/// without caching, so odd sizes do not fill the cache with one-off statements.
const USER_ROWS_PER_INSERT: usize = 500;

pub struct SqliteStore {
    pool: SqlitePool,
    write_lock: Mutex<()>,
}

impl SqliteStore {
    /// Writes start with `BEGIN IMMEDIATE`: the transaction takes the write lock up front and waits for it (busy
    /// timeout). A deferred transaction that reads first cannot upgrade while another connection still holds the
    /// lock (e.g. a rollback the pool has not flushed yet) and SQLite answers SQLITE_BUSY at once instead of waiting.
    async fn write_transaction(&self) -> Result<sqlx::Transaction<'static, Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    pub async fn open(database_url: &str) -> ServiceResult<Self> {
        let options = SqliteConnectOptions::from_str(database_url)
            .map_err(|err| ServiceError::invalid(format!("invalid SQLite database_url: {err}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            // 512 KiB of page cache per connection instead of SQLite's 2 MiB: the pool's 8 connections otherwise
            // hold 16 MiB of pages the OS page cache keeps anyway; reads and appends here are mostly sequential.
            .pragma("cache_size", "-512");
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .map_err(|err| {
                ServiceError::new(
                    ErrorKind::Unavailable,
                    format!("cannot open the SQLite database: {err}"),
                )
            })?;
        MIGRATOR.run(&pool).await.map_err(|err| {
            ServiceError::new(
                ErrorKind::Internal,
                format!("cannot apply database migrations: {err}"),
            )
        })?;
        Ok(SqliteStore {
            pool,
            write_lock: Mutex::new(()),
        })
    }
}

fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

const SYNC_REQUEST_COLUMNS: &str = "request_id, instance_id, requested_at_ms, delivered_at_ms, acked_at_ms, \
     accepted, job_id, reason";

fn sync_request_from_row(row: &SqliteRow) -> Result<SyncRequest, sqlx::Error> {
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

#[async_trait]
impl Store for SqliteStore {
    async fn record_usage(
        &self,
        enterprise_id: i64,
        usage: &UsageDay,
        now: OffsetDateTime,
    ) -> ServiceResult<()> {
        let instances = serde_json::to_string(&usage.instances)
            .map_err(|err| ServiceError::internal("encoding instance usage", err))?;
        let _write = self.write_lock.lock().await;
        sqlx::query(
            "INSERT INTO usage_history (enterprise_id, day, consumed, max_consumed, purchased, instances_json, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (enterprise_id, day) DO UPDATE SET consumed = excluded.consumed, \
             max_consumed = MAX(usage_history.max_consumed, excluded.max_consumed), purchased = excluded.purchased, \
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
             WHERE enterprise_id = ? AND day >= ? AND day <= ? ORDER BY day",
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
        let _write = self.write_lock.lock().await;
        let result = sqlx::query(
            "INSERT INTO enterprises (slug, name, seats_purchased, created_at) VALUES (?, ?, ?, ?) \
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
        let _write = self.write_lock.lock().await;
        sqlx::query(
            "UPDATE enterprises SET seats_purchased = ?, generation = generation + 1 WHERE id = ?",
        )
        .bind(seats)
        .bind(enterprise_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn enterprise_by_slug(&self, slug: &str) -> ServiceResult<Option<Enterprise>> {
        let row = sqlx::query(
            "SELECT id, slug, name, seats_purchased, generation FROM enterprises WHERE slug = ?",
        )
        .bind(slug)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(enterprise_from_row).transpose()?)
    }

    async fn enterprise_by_id(&self, enterprise_id: i64) -> ServiceResult<Option<Enterprise>> {
        let row = sqlx::query(
            "SELECT id, slug, name, seats_purchased, generation FROM enterprises WHERE id = ?",
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
            sqlx::query_scalar("SELECT generation FROM enterprises WHERE id = ?")
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
        let _write = self.write_lock.lock().await;
        sqlx::query(
            "INSERT INTO api_tokens (enterprise_id, token_sha256, description, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(enterprise_id)
        .bind(token_sha256)
        .bind(description)
        .bind(now_unix())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn enterprise_for_api_token(
        &self,
        token_sha256: &str,
    ) -> ServiceResult<Option<Enterprise>> {
        let row = sqlx::query(
            "SELECT e.id, e.slug, e.name, e.seats_purchased, e.generation FROM api_tokens t \
             JOIN enterprises e ON e.id = t.enterprise_id \
             WHERE t.token_sha256 = ? AND t.revoked_at IS NULL",
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
        let _write = self.write_lock.lock().await;
        let mut tx = self.write_transaction().await?;
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
        let _write = self.write_lock.lock().await;
        let mut tx = self.write_transaction().await?;
        let row = sqlx::query(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE server_id = ?"
        ))
        .bind(server_id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let instance = match row {
            Some(row) => instance_from_row(&row)?,
            None => {
                sqlx::query(
                    "INSERT INTO instances (enterprise_id, server_id, hostname, created_at) VALUES (?, ?, ?, ?)",
                )
                .bind(enterprise_id)
                .bind(server_id.to_string())
                .bind(hostname)
                .bind(now_unix())
                .execute(&mut *tx)
                .await?;
                let row = sqlx::query(&format!(
                    "SELECT {INSTANCE_COLUMNS} FROM instances WHERE server_id = ?"
                ))
                .bind(server_id.to_string())
                .fetch_one(&mut *tx)
                .await?;
                instance_from_row(&row)?
            }
        };
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
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE credential_sha256 = ? AND retired_at IS NULL"
        ))
        .bind(credential_sha256)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(instance_from_row).transpose()?)
    }

    async fn list_instances(&self, enterprise_id: i64) -> ServiceResult<Vec<Instance>> {
        let rows = sqlx::query(&format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE enterprise_id = ? ORDER BY hostname, server_id"
        ))
        .bind(enterprise_id)
        .fetch_all(&self.pool)
        .await?;
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
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE enterprise_id = ? AND server_id = ?"
        ))
        .bind(enterprise_id)
        .bind(server_id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(instance_from_row).transpose()?)
    }

    async fn retire_instance(&self, enterprise_id: i64, server_id: Uuid) -> ServiceResult<()> {
        let _write = self.write_lock.lock().await;
        let mut tx = self.write_transaction().await?;
        let updated = sqlx::query(
            "UPDATE instances SET retired_at = ?, credential_sha256 = NULL \
             WHERE enterprise_id = ? AND server_id = ? AND retired_at IS NULL",
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
        let _write = self.write_lock.lock().await;
        let mut tx = self.write_transaction().await?;
        let meta = &commit.snapshot.meta;
        let sync_id = meta.sync_id.to_string();

        let applied = sqlx::query(
            "SELECT instance_id, users_sha256, user_count, committed_at_ms FROM applied_syncs WHERE sync_id = ?",
        )
        .bind(&sync_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(applied) = applied {
            let instance_id: i64 = applied.try_get("instance_id")?;
            let sha: String = applied.try_get("users_sha256")?;
            if instance_id != commit.instance_id || sha != commit.users_sha256 {
                return Err(refusal::sync_id_reused(&sync_id));
            }
            let user_count: i64 = applied.try_get("user_count")?;
            return Ok(CommitOutcome::Duplicate {
                committed_at: unix_ms_to_time(applied.try_get("committed_at_ms")?),
                user_count: user_count as u64,
            });
        }

        let stored = sqlx::query(
            "SELECT enterprise_id, generated_at_ms, retired_at FROM instances WHERE id = ?",
        )
        .bind(commit.instance_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| ServiceError::not_found("the instance no longer exists; enroll it again"))?;
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

        sqlx::query("DELETE FROM server_users WHERE instance_id = ?")
            .bind(commit.instance_id)
            .execute(&mut *tx)
            .await?;
        for chunk in commit.snapshot.users.chunks(USER_ROWS_PER_INSERT) {
            let mut insert: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO server_users (instance_id, user_id, login, email, role, suspended, dormant, \
                 created_at, last_active, two_factor_enabled) ",
            );
            let full_chunk = chunk.len() == USER_ROWS_PER_INSERT;
            insert.push_values(chunk, |mut row, user| {
                row.push_bind(commit.instance_id)
                    .push_bind(user.id)
                    .push_bind(&user.login)
                    .push_bind(&user.email)
                    .push_bind(user.role.as_str())
                    .push_bind(user.suspended)
                    .push_bind(user.dormant)
                    .push_bind(user.created_at.map(OffsetDateTime::unix_timestamp))
                    .push_bind(user.last_active.map(OffsetDateTime::unix_timestamp))
                    .push_bind(user.two_factor_enabled);
            });
            insert
                .build()
                .persistent(full_chunk)
                .execute(&mut *tx)
                .await?;
        }

        let now = commit.now.unix_timestamp();
        let via = commit.via.as_str();
        sqlx::query(
            "UPDATE instances SET hostname = ?, ghes_version = ?, generated_at_ms = ?, user_count = ?, \
             last_success_at = ?, last_success_via = ?, last_attempt_at = ?, last_attempt_ok = 1, \
             last_attempt_via = ?, last_error = '', rows_skipped = ?, license_seats = ?, license_seats_used = ? \
             WHERE id = ?",
        )
        .bind(&meta.instance.hostname)
        .bind(&meta.instance.ghes_version)
        .bind(new_generated_ms)
        .bind(commit.snapshot.users.len() as i64)
        .bind(now)
        .bind(via)
        .bind(now)
        .bind(via)
        .bind(meta.source_report.rows_skipped as i64)
        .bind(meta.license.as_ref().and_then(|l| l.seats))
        .bind(meta.license.as_ref().map(|l| l.seats_used))
        .bind(commit.instance_id)
        .execute(&mut *tx)
        .await?;
        let committed_ms = time_to_unix_ms(commit.now);
        sqlx::query(
            "INSERT INTO applied_syncs (sync_id, instance_id, users_sha256, user_count, via, committed_at_ms) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&sync_id)
        .bind(commit.instance_id)
        .bind(commit.users_sha256)
        .bind(commit.snapshot.users.len() as i64)
        .bind(via)
        .bind(committed_ms)
        .execute(&mut *tx)
        .await?;
        let generation = bump_users_generation(&mut tx, enterprise_id, commit.instance_id).await?;
        tx.commit().await?;
        Ok(CommitOutcome::Applied {
            committed_at: commit.now,
            generation,
        })
    }

    async fn record_failed_sync(
        &self,
        instance_id: i64,
        via: Arrival,
        error: &str,
        now: OffsetDateTime,
    ) -> ServiceResult<()> {
        let _write = self.write_lock.lock().await;
        sqlx::query(
            "UPDATE instances SET last_attempt_at = ?, last_attempt_ok = 0, last_attempt_via = ?, last_error = ? \
             WHERE id = ?",
        )
        .bind(now.unix_timestamp())
        .bind(via.as_str())
        .bind(error)
        .bind(instance_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn replace_cloud_members(
        &self,
        enterprise_id: i64,
        members: &[CloudMember],
    ) -> ServiceResult<()> {
        let _write = self.write_lock.lock().await;
        let mut tx = self.write_transaction().await?;
        sqlx::query("DELETE FROM cloud_members WHERE enterprise_id = ?")
            .bind(enterprise_id)
            .execute(&mut *tx)
            .await?;
        let encoded: Vec<(i64, &str, String)> = members
            .iter()
            .map(|member| {
                serde_json::to_string(member)
                    .map(|json| (member.id, member.login.as_str(), json))
                    .map_err(|err| ServiceError::internal("encoding a cloud member", err))
            })
            .collect::<Result<_, _>>()?;
        for chunk in encoded.chunks(USER_ROWS_PER_INSERT) {
            let mut insert: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO cloud_members (enterprise_id, member_id, login, attributes_json) ",
            );
            let full_chunk = chunk.len() == USER_ROWS_PER_INSERT;
            insert.push_values(chunk, |mut row, (id, login, json)| {
                row.push_bind(enterprise_id)
                    .push_bind(*id)
                    .push_bind(*login)
                    .push_bind(json.as_str());
            });
            insert
                .build()
                .persistent(full_chunk)
                .execute(&mut *tx)
                .await?;
        }
        bump_members_generation(&mut tx, enterprise_id).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn load_merge_changes(
        &self,
        enterprise_id: i64,
        since: Option<i64>,
    ) -> ServiceResult<MergeChanges> {
        // One read transaction: a consistent WAL snapshot of accounts, members and generation.
        let mut tx = self.pool.begin().await?;
        let enterprise = sqlx::query(
            "SELECT generation, seats_purchased, members_generation FROM enterprises WHERE id = ?",
        )
        .bind(enterprise_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| ServiceError::not_found("enterprise not found"))?;
        let changed_after = |generation: i64| since.is_none_or(|since| generation > since);

        let instances = sqlx::query(
            "SELECT id, hostname, users_generation FROM instances \
             WHERE enterprise_id = ? AND retired_at IS NULL ORDER BY id",
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
                format!("SELECT {ACCOUNT_COLUMNS} FROM server_users u WHERE u.instance_id = ?");
            *users = collect_accounts(sqlx::query(&sql).bind(*instance_id).fetch(&mut *tx)).await?;
        }

        let cloud_members = if changed_after(enterprise.try_get("members_generation")?) {
            let rows = sqlx::query(
                "SELECT attributes_json FROM cloud_members WHERE enterprise_id = ? ORDER BY member_id",
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
        let _write = self.write_lock.lock().await;
        let mut tx = self.write_transaction().await?;
        let now = OffsetDateTime::now_utc();
        let forget_before = time_to_unix_ms(now - CONNECTION_RECORD_RETENTION);
        sqlx::query(
            "DELETE FROM enrollment_tokens WHERE enterprise_id = ? \
             AND (expires_at_ms < ? OR used_at_ms < ?)",
        )
        .bind(enterprise_id)
        .bind(forget_before)
        .bind(forget_before)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO enrollment_tokens (enterprise_id, token_sha256, created_at_ms, expires_at_ms) \
             VALUES (?, ?, ?, ?)",
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
        let _write = self.write_lock.lock().await;
        let mut tx = self.write_transaction().await?;
        let now_ms = time_to_unix_ms(now);
        let token = sqlx::query(
            "SELECT id, enterprise_id FROM enrollment_tokens \
             WHERE token_sha256 = ? AND used_at_ms IS NULL AND expires_at_ms > ?",
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
            "UPDATE enrollment_tokens SET used_at_ms = ?, used_by_server_id = ? \
             WHERE id = ? AND used_at_ms IS NULL",
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
            "SELECT id, slug, name, seats_purchased, generation FROM enterprises WHERE id = ?",
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
        let _write = self.write_lock.lock().await;
        let updated = sqlx::query(
            "UPDATE instances SET agent_session_id = ?, agent_last_seen_at_ms = ?, agent_sync_enabled = ?, \
             agent_version = COALESCE(?, agent_version), \
             agent_pending_deliveries = COALESCE(?, agent_pending_deliveries) \
             WHERE id = ? AND credential_sha256 = ? AND retired_at IS NULL",
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
        let _write = self.write_lock.lock().await;
        sqlx::query(
            "UPDATE instances SET agent_session_id = NULL, \
             agent_last_seen_at_ms = CASE WHEN agent_last_seen_at_ms IS NULL OR agent_last_seen_at_ms < ? \
             THEN ? ELSE agent_last_seen_at_ms END \
             WHERE id = ? AND agent_session_id = ?",
        )
        .bind(time_to_unix_ms(now))
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
        let _write = self.write_lock.lock().await;
        let mut tx = self.write_transaction().await?;
        let instance = sqlx::query(
            "SELECT id, credential_sha256 IS NOT NULL AS has_credential FROM instances \
             WHERE enterprise_id = ? AND server_id = ? AND retired_at IS NULL",
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
        sqlx::query("DELETE FROM sync_requests WHERE instance_id = ? AND requested_at_ms < ?")
            .bind(instance_id)
            .bind(time_to_unix_ms(now - CONNECTION_RECORD_RETENTION))
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query(&format!(
            "INSERT INTO sync_requests (request_id, instance_id, requested_at_ms) VALUES (?, ?, ?) \
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
        // The poll every stream runs every second: a read on the partial index, without the write lock.
        let probe = sqlx::query(
            "SELECT credential_sha256 = ? AND retired_at IS NULL AS live, \
             EXISTS (SELECT 1 FROM sync_requests r WHERE r.instance_id = i.id \
                     AND r.delivered_at_ms IS NULL AND r.requested_at_ms >= ?) AS pending \
             FROM instances i WHERE i.id = ?",
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
        let _write = self.write_lock.lock().await;
        let rows = sqlx::query(&format!(
            "UPDATE sync_requests SET delivered_at_ms = ? \
             WHERE instance_id = ? AND delivered_at_ms IS NULL AND requested_at_ms >= ? \
             AND EXISTS (SELECT 1 FROM instances i WHERE i.id = ? AND i.credential_sha256 = ? \
                         AND i.retired_at IS NULL) \
             RETURNING {SYNC_REQUEST_COLUMNS}"
        ))
        .bind(time_to_unix_ms(now))
        .bind(instance_id)
        .bind(not_before)
        .bind(instance_id)
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
        let _write = self.write_lock.lock().await;
        sqlx::query(
            "UPDATE sync_requests SET delivered_at_ms = NULL \
             WHERE request_id = ? AND instance_id = ? AND acked_at_ms IS NULL",
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
        let _write = self.write_lock.lock().await;
        let mut tx = self.write_transaction().await?;
        let acked: Option<Option<i64>> = sqlx::query_scalar(
            "SELECT acked_at_ms FROM sync_requests \
             WHERE request_id = ? AND instance_id = ? AND delivered_at_ms IS NOT NULL",
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
                    "UPDATE sync_requests SET acked_at_ms = ?, accepted = ?, job_id = ?, reason = ? \
                     WHERE request_id = ? AND instance_id = ?",
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
             WHERE r.request_id = ? AND i.enterprise_id = ? AND i.server_id = ?",
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
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    enterprise_id: i64,
    server_id: Uuid,
    hostname: &str,
    ghes_version: Option<&str>,
    credential_sha256: &str,
) -> ServiceResult<Instance> {
    let existing = sqlx::query(
        "SELECT id, enterprise_id, retired_at, hostname FROM instances WHERE server_id = ?",
    )
    .bind(server_id.to_string())
    .fetch_optional(&mut **tx)
    .await?;
    let ghes_version = ghes_version.filter(|version| !version.is_empty());
    match existing {
        Some(existing) => {
            let owner: i64 = existing.try_get("enterprise_id")?;
            if owner != enterprise_id {
                return Err(refusal::enrolled_elsewhere(server_id));
            }
            let was_retired = existing.try_get::<Option<i64>, _>("retired_at")?.is_some();
            sqlx::query(
                "UPDATE instances SET credential_sha256 = ?, hostname = ?, \
                 ghes_version = COALESCE(?, ghes_version), retired_at = NULL WHERE server_id = ?",
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
        }
        None => {
            sqlx::query(
                "INSERT INTO instances (enterprise_id, server_id, hostname, ghes_version, credential_sha256, \
                 created_at) VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(enterprise_id)
            .bind(server_id.to_string())
            .bind(hostname)
            .bind(ghes_version.unwrap_or_default())
            .bind(credential_sha256)
            .bind(now_unix())
            .execute(&mut **tx)
            .await?;
        }
    }
    let row = sqlx::query(&format!(
        "SELECT {INSTANCE_COLUMNS} FROM instances WHERE server_id = ?"
    ))
    .bind(server_id.to_string())
    .fetch_one(&mut **tx)
    .await?;
    Ok(instance_from_row(&row)?)
}

async fn bump_generation(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    enterprise_id: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE enterprises SET generation = generation + 1 WHERE id = ? RETURNING generation",
    )
    .bind(enterprise_id)
    .fetch_one(&mut **tx)
    .await
}

/// Bumps the generation and stamps an instance's users with it, so that merged views reload that instance.
async fn bump_users_generation(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    enterprise_id: i64,
    instance_id: i64,
) -> Result<i64, sqlx::Error> {
    let generation = bump_generation(tx, enterprise_id).await?;
    sqlx::query("UPDATE instances SET users_generation = ? WHERE id = ?")
        .bind(generation)
        .bind(instance_id)
        .execute(&mut **tx)
        .await?;
    Ok(generation)
}

/// Bumps the generation and stamps the cloud members with it, so that merged views reload them.
async fn bump_members_generation(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    enterprise_id: i64,
) -> Result<(), sqlx::Error> {
    // Both right-hand sides read the row as it was, so both columns get the new value.
    sqlx::query(
        "UPDATE enterprises SET generation = generation + 1, members_generation = generation + 1 WHERE id = ?",
    )
    .bind(enterprise_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
