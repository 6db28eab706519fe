//! `GET /enterprises/{enterprise}/license-sync-status`: the last sync of each active instance, and its agent. The
//! status of one instance ([`InstanceStatus`]) is computed here once, for this answer and the console's instances
//! page alike.

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
use crate::store::{Arrival, Enterprise, Instance};
use crate::time_format::rfc3339;

/// GitHub's "License Sync Status", each instance with our fields after GitHub's three.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct LicenseSyncStatus {
    server_instances: Vec<ServerInstance>,
}

/// One instance of the answer.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ServerInstance {
    server_id: Uuid,
    hostname: String,
    last_sync: LastSyncReport,
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
pub(super) struct LastSyncReport {
    date: String,
    status: LastSync,
    error: String,
}

/// How the last sync attempt went, as `last_sync.status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LastSync {
    Success,
    Failed,
    /// No attempt yet.
    Pending,
}

impl LastSync {
    /// The word the JSON answer uses (its serde name), for the console.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LastSync::Success => "success",
            LastSync::Failed => "failed",
            LastSync::Pending => "pending",
        }
    }
}

/// One active instance's sync and agent status at `now`.
pub(crate) struct InstanceStatus<'a> {
    pub instance: &'a Instance,
    pub last_sync: LastSync,
    /// No successful sync within `stale_after_days`.
    pub stale: bool,
    pub agent_connected: bool,
}

impl<'a> InstanceStatus<'a> {
    pub(crate) fn of(
        instance: &'a Instance,
        stale_after: time::Duration,
        agent_window: time::Duration,
        now: OffsetDateTime,
    ) -> Self {
        let last_sync = match (instance.last_attempt_at, instance.last_attempt_ok) {
            (Some(_), Some(true)) => LastSync::Success,
            (Some(_), _) => LastSync::Failed,
            (None, _) => LastSync::Pending,
        };
        InstanceStatus {
            instance,
            last_sync,
            stale: instance
                .last_success_at
                .is_none_or(|success| now - success > stale_after),
            agent_connected: instance.agent.connected(now, agent_window),
        }
    }

    /// GitHub's words for how the instance's usage last arrived (its "Server instances" list).
    pub(crate) fn github_state(&self) -> &'static str {
        match self.instance.last_success_via {
            Some(Arrival::Upload) => "Server usage uploaded",
            Some(Arrival::Connect) => "GitHub Connect server usage synced",
            None => "never synced",
        }
    }

    fn to_answer(&self) -> ServerInstance {
        let instance = self.instance;
        ServerInstance {
            server_id: instance.server_id,
            hostname: instance.hostname.clone(),
            last_sync: LastSyncReport {
                date: instance.last_attempt_at.map(rfc3339).unwrap_or_default(),
                status: self.last_sync,
                error: instance.last_error.clone(),
            },
            arrival: instance.last_success_via,
            last_success_date: instance.last_success_at.map(rfc3339),
            generated_at: instance.generated_at.map(rfc3339),
            ghes_version: instance.ghes_version.clone(),
            user_count: instance.user_count,
            rows_skipped: instance.rows_skipped,
            stale: self.stale,
            enrolled: instance.has_credential,
            agent_connected: self.agent_connected,
            agent_last_seen_date: instance.agent.last_seen_at.map(rfc3339),
            agent_sync_enabled: instance.agent.sync_enabled,
            agent_version: instance.agent.version.clone(),
            pending_deliveries: instance.agent.pending_deliveries,
        }
    }
}

/// The enterprise's active (not retired) instances, in the store's order.
pub(crate) async fn active_instances(
    app: &App,
    enterprise: &Enterprise,
) -> ServiceResult<Vec<Instance>> {
    let mut instances = app.store.list_instances(enterprise.id).await?;
    instances.retain(|instance| instance.retired_at.is_none());
    Ok(instances)
}

/// The status of each of `instances` at `now`, with the enterprise's staleness and agent-presence rules.
pub(crate) fn statuses<'a>(
    app: &App,
    instances: &'a [Instance],
    now: OffsetDateTime,
) -> Vec<InstanceStatus<'a>> {
    let stale_after = time::Duration::days(i64::from(app.config.stale_after_days));
    let agent_window = app.agent_presence_window();
    instances
        .iter()
        .map(|instance| InstanceStatus::of(instance, stale_after, agent_window, now))
        .collect()
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
    let instances = active_instances(&app, &enterprise).await?;
    let server_instances = statuses(&app, &instances, OffsetDateTime::now_utc())
        .iter()
        .map(InstanceStatus::to_answer)
        .collect();
    Ok(Json(LicenseSyncStatus { server_instances }))
}
