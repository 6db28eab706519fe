//! The embedded store: one SQLite file in WAL mode.
//!
//! Durability: `synchronous = FULL`, so a snapshot acknowledged to an agent survives a power loss.
//! Concurrency: SQLite has one writer; writes are serialised by `write_lock` inside the process and start with
//! `BEGIN IMMEDIATE`, so they wait for the write lock (busy timeout) instead of failing to upgrade a read lock.
//! Readers run in parallel on WAL snapshots.
//!
//! The queries are shared with PostgreSQL (`store::shared`); this file holds only what SQLite does differently.

use std::str::FromStr;
use std::time::Duration;

use license_sync_core::model::ServerUser;
use sqlx::query_builder::Separated;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite, Transaction};
use time::OffsetDateTime;
use tokio::sync::{Mutex, MutexGuard};

use super::StoreError;
use super::shared::sql_store;

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

sql_store! {
    store: SqliteStore,
    database: ::sqlx::Sqlite,
    // Writers hold the database's one write lock (and `write_lock`): no row locks, which SQLite has not.
    for_update: "",
    for_share: "",
    greatest: "MAX",
}

impl SqliteStore {
    pub async fn open(database_url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(database_url).map_err(|source| {
            StoreError::InvalidUrl {
                backend: "SQLite",
                source,
            }
        })?;
        Self::open_with(options).await
    }

    /// Opens with `options` plus the store's own settings (journal, durability, busy timeout); tests add pragmas
    /// (`max_page_count`, to fill the disk).
    pub async fn open_with(options: SqliteConnectOptions) -> Result<Self, StoreError> {
        let options = options
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
            .before_acquire(super::discard_if_in_transaction)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Unreachable {
                action: "open the SQLite database",
                source,
            })?;
        MIGRATOR.run(&pool).await?;
        Ok(SqliteStore {
            pool,
            write_lock: Mutex::new(()),
        })
    }

    /// SQLite has one writer: the process queues its writers here rather than on the busy timeout.
    async fn write_guard(&self) -> MutexGuard<'_, ()> {
        self.write_lock.lock().await
    }

    /// Writes start with `BEGIN IMMEDIATE`: the transaction takes the write lock up front and waits for it (busy
    /// timeout). A deferred transaction that reads first cannot upgrade while another connection still holds the
    /// lock (e.g. a rollback the pool has not flushed yet) and SQLite answers SQLITE_BUSY at once instead of waiting.
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    /// One read transaction: a consistent WAL snapshot of accounts, members and generation.
    async fn begin_snapshot_read(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.pool.begin().await
    }

    /// Imports are serialised by the write lock already.
    async fn lock_enterprise(
        _tx: &mut Transaction<'_, Sqlite>,
        _enterprise_id: i64,
    ) -> Result<(), sqlx::Error> {
        Ok(())
    }

    async fn insert_users(
        tx: &mut Transaction<'_, Sqlite>,
        instance_id: i64,
        users: &[ServerUser],
    ) -> Result<(), sqlx::Error> {
        let insert_into = "INSERT INTO server_users (instance_id, user_id, login, email, role, suspended, dormant, \
             created_at, last_active, two_factor_enabled) ";
        insert_in_chunks(tx, insert_into, users, |mut row, user| {
            row.push_bind(instance_id)
                .push_bind(user.id)
                .push_bind(&user.login)
                .push_bind(&user.email)
                .push_bind(user.role.as_str())
                .push_bind(user.suspended)
                .push_bind(user.dormant)
                .push_bind(user.created_at.map(OffsetDateTime::unix_timestamp))
                .push_bind(user.last_active.map(OffsetDateTime::unix_timestamp))
                .push_bind(user.two_factor_enabled);
        })
        .await
    }

    /// `members`: (member id, login, attributes JSON).
    async fn insert_cloud_members(
        tx: &mut Transaction<'_, Sqlite>,
        enterprise_id: i64,
        members: &[(i64, &str, String)],
    ) -> Result<(), sqlx::Error> {
        let insert_into =
            "INSERT INTO cloud_members (enterprise_id, member_id, login, attributes_json) ";
        insert_in_chunks(tx, insert_into, members, |mut row, (id, login, json)| {
            row.push_bind(enterprise_id)
                .push_bind(*id)
                .push_bind(*login)
                .push_bind(json.as_str());
        })
        .await
    }

    /// Bumps the generation and stamps an instance's users with it, so that merged views reload that instance.
    async fn bump_users_generation(
        tx: &mut Transaction<'_, Sqlite>,
        enterprise_id: i64,
        instance_id: i64,
    ) -> Result<i64, sqlx::Error> {
        let generation = shared_queries::bump_generation(tx, enterprise_id).await?;
        sqlx::query("UPDATE instances SET users_generation = $1 WHERE id = $2")
            .bind(generation)
            .bind(instance_id)
            .execute(&mut **tx)
            .await?;
        Ok(generation)
    }
}

/// Inserts `rows` with multi-row INSERTs of [`USER_ROWS_PER_INSERT`] rows each; `push_row` binds one row's values.
async fn insert_in_chunks<'r, T: Sync>(
    tx: &mut Transaction<'_, Sqlite>,
    insert_into: &'static str,
    rows: &'r [T],
    push_row: impl Fn(Separated<'_, 'r, Sqlite, &'static str>, &'r T) + Send,
) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(USER_ROWS_PER_INSERT) {
        let mut insert: QueryBuilder<'r, Sqlite> = QueryBuilder::new(insert_into);
        insert.push_values(chunk, &push_row);
        insert
            .build()
            // Only the full chunk's statement is worth caching (see USER_ROWS_PER_INSERT).
            .persistent(chunk.len() == USER_ROWS_PER_INSERT)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}
