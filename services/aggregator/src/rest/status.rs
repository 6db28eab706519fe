//! `GET /enterprises/{enterprise}/license-sync-status`: the last sync of each active instance, and its agent.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::app::App;
use crate::auth::AuthorizedEnterprise;
use crate::error::ServiceResult;
use crate::store::{Arrival, Instance};
use crate::time_format::rfc3339;

/// GitHub's "License Sync Status", each instance with our fields after GitHub's three.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct LicenseSyncStatus {
    server_instances: Vec<InstanceStatus>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct InstanceStatus {
    server_id: Uuid,
    hostname: String,
    last_sync: LastSync,
    /// How the last committed snapshot arrived; null before the first.
    arrival: Option<Arrival>,
    /// RFC 3339 UTC.
    last_success_date: Option<String>,
    /// When the agent read the users of the stored snapshot (RFC 3339 UTC).
    generated_at: Option<String>,
    ghes_version: String,
    user_count: i64,
    rows_skipped: i64,
    /// No successful sync within `stale_after_days`.
    stale: bool,
    /// The instance has a live agent credential.
    enrolled: bool,
    agent_connected: bool,
    agent_last_seen_date: Option<String>,
    agent_sync_enabled: Option<bool>,
    agent_version: Option<String>,
    pending_deliveries: Option<i64>,
}

/// GitHub's `last_sync`: `date` is empty and `status` `pending` before the first attempt; `error` is empty after a
/// success.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct LastSync {
    date: String,
    status: SyncResult,
    error: String,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(super) enum SyncResult {
    Success,
    Failed,
    Pending,
}

fn instance_status(
    instance: &Instance,
    stale_after: time::Duration,
    agent_window: time::Duration,
    now: OffsetDateTime,
) -> InstanceStatus {
    let (date, status) = match (instance.last_attempt_at, instance.last_attempt_ok) {
        (Some(at), Some(true)) => (rfc3339(at), SyncResult::Success),
        (Some(at), _) => (rfc3339(at), SyncResult::Failed),
        (None, _) => (String::new(), SyncResult::Pending),
    };
    let stale = instance
        .last_success_at
        .is_none_or(|success| now - success > stale_after);
    InstanceStatus {
        server_id: instance.server_id,
        hostname: instance.hostname.clone(),
        last_sync: LastSync {
            date,
            status,
            error: instance.last_error.clone(),
        },
        arrival: instance.last_success_via,
        last_success_date: instance.last_success_at.map(rfc3339),
        generated_at: instance.generated_at.map(rfc3339),
        ghes_version: instance.ghes_version.clone(),
        user_count: instance.user_count,
        rows_skipped: instance.rows_skipped,
        stale,
        enrolled: instance.has_credential,
        agent_connected: instance.agent.connected(now, agent_window),
        agent_last_seen_date: instance.agent.last_seen_at.map(rfc3339),
        agent_sync_enabled: instance.agent.sync_enabled,
        agent_version: instance.agent.version.clone(),
        pending_deliveries: instance.agent.pending_deliveries,
    }
}

/// GitHub's "Get a license sync status": the last sync of each active (not retired) instance, and its agent.
#[utoipa::path(
    get,
    path = "/enterprises/{enterprise}/license-sync-status",
    tag = "licensing",
    params(super::openapi::EnterprisePath),
    responses((status = 200, description = "The active instances' last syncs", body = LicenseSyncStatus)),
)]
pub(super) async fn license_sync_status(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
) -> ServiceResult<Json<LicenseSyncStatus>> {
    let instances = app.store.list_instances(enterprise.id).await?;
    let now = OffsetDateTime::now_utc();
    let stale_after = time::Duration::days(i64::from(app.config.stale_after_days));
    let agent_window = app.agent_presence_window();
    let server_instances = instances
        .iter()
        .filter(|instance| instance.retired_at.is_none())
        .map(|instance| instance_status(instance, stale_after, agent_window, now))
        .collect();
    Ok(Json(LicenseSyncStatus { server_instances }))
}
