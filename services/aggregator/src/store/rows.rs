//! Row decoding shared by the backends: both store the same columns with the same meaning, so one generic decoder
//! serves SQLite and PostgreSQL rows.

use futures::{Stream, TryStreamExt};
use license_sync_core::accounts::Accounts;
use license_sync_core::cloud::CloudDirectory;
use license_sync_core::model::CloudMember;
use sqlx::{ColumnIndex, Decode, Row, Type};
use uuid::Uuid;

use super::{
    AgentPresence, ApiToken, Arrival, Instance, SyncRequest, TokenScope, UsageDay, unix_ms_to_time,
    unix_to_time,
};
use super::{StoreError, StoreResult};

pub(super) const INSTANCE_COLUMNS: &str = "id, enterprise_id, server_id, hostname, ghes_version, \
     credential_sha256 IS NOT NULL AS has_credential, retired_at, generated_at_ms, user_count, \
     last_success_at, last_success_via, last_attempt_at, last_attempt_ok, last_attempt_via, last_error, \
     rows_skipped, agent_session_id IS NOT NULL AS agent_session_open, agent_last_seen_at_ms, \
     agent_sync_enabled, agent_version, agent_pending_deliveries";

pub(super) fn instance_from_row<R>(row: &R) -> Result<Instance, sqlx::Error>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
{
    let server_id: String = row.try_get("server_id")?;
    let arrival = |column: &str| -> Result<Option<Arrival>, sqlx::Error> {
        Ok(row
            .try_get::<Option<String>, _>(column)?
            .as_deref()
            .and_then(Arrival::parse))
    };
    Ok(Instance {
        id: row.try_get("id")?,
        enterprise_id: row.try_get("enterprise_id")?,
        server_id: Uuid::parse_str(&server_id).map_err(|err| sqlx::Error::Decode(Box::new(err)))?,
        hostname: row.try_get("hostname")?,
        ghes_version: row.try_get("ghes_version")?,
        has_credential: row.try_get("has_credential")?,
        retired_at: row
            .try_get::<Option<i64>, _>("retired_at")?
            .map(unix_to_time),
        generated_at: row
            .try_get::<Option<i64>, _>("generated_at_ms")?
            .map(unix_ms_to_time),
        user_count: row.try_get("user_count")?,
        last_success_at: row
            .try_get::<Option<i64>, _>("last_success_at")?
            .map(unix_to_time),
        last_success_via: arrival("last_success_via")?,
        last_attempt_at: row
            .try_get::<Option<i64>, _>("last_attempt_at")?
            .map(unix_to_time),
        last_attempt_ok: row.try_get("last_attempt_ok")?,
        last_attempt_via: arrival("last_attempt_via")?,
        last_error: row.try_get("last_error")?,
        rows_skipped: row.try_get("rows_skipped")?,
        agent: AgentPresence {
            last_seen_at: row
                .try_get::<Option<i64>, _>("agent_last_seen_at_ms")?
                .map(unix_ms_to_time),
            session_open: row.try_get("agent_session_open")?,
            sync_enabled: row.try_get("agent_sync_enabled")?,
            version: row.try_get("agent_version")?,
            pending_deliveries: row.try_get("agent_pending_deliveries")?,
        },
    })
}

/// Columns of `server_users` in the order [`push_account_from_row`] reads them by index: only what the merged view
/// keeps in memory (see [`Accounts`]).
pub(super) const ACCOUNT_COLUMNS: &str = "u.user_id, u.login, u.email, u.suspended, u.dormant";

/// Appends one stored account to an instance's table, borrowing its text from the row. Columns by index: this runs
/// once per stored account.
pub(super) fn push_account_from_row<R>(row: &R, accounts: &mut Accounts) -> StoreResult<()>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'r> &'r str: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
{
    accounts
        .push(
            row.try_get(0)?,
            row.try_get(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
            row.try_get(4)?,
        )
        .map_err(|error| StoreError::corrupt("loading an instance's accounts", error))
}

/// Streams an instance's stored accounts (rows of [`ACCOUNT_COLUMNS`]) into the view's compact table.
pub(super) async fn collect_accounts<R>(
    mut rows: impl Stream<Item = Result<R, sqlx::Error>> + Unpin,
) -> StoreResult<Accounts>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'r> &'r str: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
{
    let mut accounts = Accounts::new();
    while let Some(row) = rows.try_next().await? {
        push_account_from_row(&row, &mut accounts)?;
    }
    accounts.shrink_to_fit();
    Ok(accounts)
}

/// Streams stored cloud members (rows with `attributes_json`) into the view's compact directory: 200k members as
/// full `CloudMember`s would be a transient several times the size of what the view keeps.
pub(super) async fn collect_cloud_directory<R>(
    mut rows: impl Stream<Item = Result<R, sqlx::Error>> + Unpin,
) -> StoreResult<CloudDirectory>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
{
    let mut directory = CloudDirectory::builder();
    while let Some(row) = rows.try_next().await? {
        directory.push(&cloud_member_from_row(&row)?);
    }
    Ok(directory.finish())
}

pub(super) fn cloud_member_from_row<R>(row: &R) -> StoreResult<CloudMember>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
{
    let json: String = row.try_get("attributes_json")?;
    serde_json::from_str(&json)
        .map_err(|err| StoreError::corrupt("decoding a stored cloud member", err))
}

pub(super) fn usage_day_from_row<R>(row: &R) -> StoreResult<UsageDay>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let instances: String = row.try_get("instances_json")?;
    Ok(UsageDay {
        date: row.try_get("day")?,
        consumed: row.try_get("consumed")?,
        max_consumed: row.try_get("max_consumed")?,
        purchased: row.try_get("purchased")?,
        instances: serde_json::from_str(&instances)
            .map_err(|err| StoreError::corrupt("decoding stored instance usage", err))?,
    })
}

pub(super) const SYNC_REQUEST_COLUMNS: &str = "request_id, instance_id, requested_at_ms, delivered_at_ms, \
     acked_at_ms, accepted, job_id, reason";

pub(super) fn sync_request_from_row<R>(row: &R) -> Result<SyncRequest, sqlx::Error>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
{
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

/// Decodes the columns of `api_token_columns!` (in `shared.rs`).
pub(super) fn api_token_from_row<R>(row: &R) -> Result<ApiToken, sqlx::Error>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let scope: String = row.try_get("scope")?;
    Ok(ApiToken {
        id: row.try_get("id")?,
        enterprise_id: row.try_get("enterprise_id")?,
        name: row.try_get("name")?,
        // The column's CHECK allows only the two words.
        scope: TokenScope::parse(&scope)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown token scope {scope:?}").into()))?,
        created_at: unix_to_time(row.try_get("created_at")?),
        expires_at: row
            .try_get::<Option<i64>, _>("expires_at_ms")?
            .map(unix_ms_to_time),
        last_used_at: row
            .try_get::<Option<i64>, _>("last_used_at_ms")?
            .map(unix_ms_to_time),
        revoked_at: row
            .try_get::<Option<i64>, _>("revoked_at")?
            .map(unix_to_time),
    })
}

pub(super) fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}
