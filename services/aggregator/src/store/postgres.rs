//! The scale-out store: PostgreSQL, shared by several aggregator replicas.
//!
//! Concurrency comes from the database, not from the process: every commit of a snapshot locks its instance row
//! (`SELECT … FOR UPDATE`) before anything else, so two replicas committing snapshots of the same instance run one
//! after the other and the second sees the first's `generated_at` and sync id (newest wins, applied once).
//! Migrations take sqlx's advisory lock, so replicas starting together apply them once.
//!
//! The queries are shared with SQLite (`store::shared`); this file holds only what PostgreSQL does differently.

use std::str::FromStr;
use std::time::Duration;

use license_sync_core::model::ServerUser;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use time::OffsetDateTime;

use super::StoreError;
use super::shared::sql_store;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Rows per `INSERT … SELECT FROM UNNEST(…)`: bounds the size of one statement's arrays.
const USER_ROWS_PER_INSERT: usize = 50_000;

pub struct PostgresStore {
    pool: PgPool,
}

sql_store! {
    store: PostgresStore,
    database: ::sqlx::Postgres,
    for_update: " FOR UPDATE",
    for_share: " FOR SHARE",
    greatest: "GREATEST",
}

/// PostgreSQL serialises writers with row locks, not in the process: nothing to hold.
struct NoProcessLock;

impl PostgresStore {
    /// Connects with `options` (e.g. a `search_path` for tests) and applies pending migrations.
    pub async fn open_with(options: PgConnectOptions) -> Result<Self, StoreError> {
        Self::open_pool(options, super::DEFAULT_MAX_CONNECTIONS).await
    }

    async fn open_pool(
        options: PgConnectOptions,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .before_acquire(super::discard_if_in_transaction)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Unreachable {
                action: "connect to PostgreSQL",
                source,
            })?;
        MIGRATOR.run(&pool).await?;
        Ok(PostgresStore { pool })
    }

    pub async fn open(database_url: &str) -> Result<Self, StoreError> {
        Self::open_with_max_connections(database_url, super::DEFAULT_MAX_CONNECTIONS).await
    }

    /// Connects with at most `max_connections` connections (`database_max_connections`).
    pub async fn open_with_max_connections(
        database_url: &str,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        let options =
            PgConnectOptions::from_str(database_url).map_err(|source| StoreError::InvalidUrl {
                backend: "PostgreSQL",
                source,
            })?;
        Self::open_pool(options, max_connections).await
    }

    async fn write_guard(&self) -> NoProcessLock {
        NoProcessLock
    }

    async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.pool.begin().await
    }

    /// REPEATABLE READ: accounts, members and generation from one snapshot of the database.
    async fn begin_snapshot_read(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// Serialises concurrent imports of one enterprise.
    async fn lock_enterprise(
        tx: &mut Transaction<'_, Postgres>,
        enterprise_id: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT id FROM enterprises WHERE id = $1 FOR UPDATE")
            .bind(enterprise_id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn insert_users(
        tx: &mut Transaction<'_, Postgres>,
        instance_id: i64,
        users: &[ServerUser],
    ) -> Result<(), sqlx::Error> {
        for chunk in users.chunks(USER_ROWS_PER_INSERT) {
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
            .bind(instance_id)
            .bind(ids)
            .bind(logins)
            .bind(emails)
            .bind(roles)
            .bind(suspended)
            .bind(dormant)
            .bind(created)
            .bind(active)
            .bind(two_factor)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    /// `members`: (member id, login, attributes JSON), in one statement of three arrays.
    async fn insert_cloud_members(
        tx: &mut Transaction<'_, Postgres>,
        enterprise_id: i64,
        members: &[(i64, &str, String)],
    ) -> Result<(), sqlx::Error> {
        let ids: Vec<i64> = members.iter().map(|(id, _, _)| *id).collect();
        let logins: Vec<&str> = members.iter().map(|(_, login, _)| *login).collect();
        let attributes: Vec<&str> = members.iter().map(|(_, _, json)| json.as_str()).collect();
        sqlx::query(
            "INSERT INTO cloud_members (enterprise_id, member_id, login, attributes_json) \
             SELECT $1, * FROM UNNEST($2::bigint[], $3::text[], $4::text[])",
        )
        .bind(enterprise_id)
        .bind(ids)
        .bind(logins)
        .bind(attributes)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Bumps the generation and stamps an instance's users with it, so that merged views reload that instance. The
    /// enterprise row's lock, held until COMMIT, keeps generations in commit order: a snapshot commit makes this its
    /// last statement before COMMIT (after the rows), and it is one statement (one round trip), so that the other
    /// commits of the enterprise wait for that lock as briefly as possible.
    async fn bump_users_generation(
        tx: &mut Transaction<'_, Postgres>,
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
}
