//! `GET /enterprises/{enterprise}/license-sync-status`: the last sync of each active instance, and its agent. The
//! status of one instance ([`InstanceStatus`]) is computed here once, for this answer and the console's instances
//! page alike.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::app::App;
use crate::auth::AuthorizedEnterprise;
use crate::error::ServiceResult;
use crate::store::{Arrival, Enterprise, Instance};
use crate::time_format::rfc3339;

/// How the last sync attempt went, as `last_sync.status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LastSync {
    Success,
    Failed,
    /// No attempt yet.
    Pending,
}

impl LastSync {
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

    fn to_json(&self) -> Value {
        let instance = self.instance;
        json!({
            "server_id": instance.server_id.to_string(),
            "hostname": instance.hostname,
            "last_sync": {
                "date": instance.last_attempt_at.map(rfc3339).unwrap_or_default(),
                "status": self.last_sync.as_str(),
                "error": instance.last_error,
            },
            "arrival": instance.last_success_via.map(Arrival::as_str),
            "last_success_date": instance.last_success_at.map(rfc3339),
            "generated_at": instance.generated_at.map(rfc3339),
            "ghes_version": instance.ghes_version,
            "user_count": instance.user_count,
            "rows_skipped": instance.rows_skipped,
            "stale": self.stale,
            "enrolled": instance.has_credential,
            "agent_connected": self.agent_connected,
            "agent_last_seen_date": instance.agent.last_seen_at.map(rfc3339),
            "agent_sync_enabled": instance.agent.sync_enabled,
            "agent_version": instance.agent.version,
            "pending_deliveries": instance.agent.pending_deliveries,
        })
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

pub(super) async fn license_sync_status(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
) -> ServiceResult<Json<Value>> {
    let instances = active_instances(&app, &enterprise).await?;
    let server_instances: Vec<Value> = statuses(&app, &instances, OffsetDateTime::now_utc())
        .iter()
        .map(InstanceStatus::to_json)
        .collect();
    Ok(Json(json!({ "server_instances": server_instances })))
}
