//! `GET /enterprises/{enterprise}/license-sync-status`: the last sync of each active instance, and its agent.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::app::App;
use crate::auth::AuthorizedEnterprise;
use crate::error::ServiceResult;
use crate::store::{Arrival, Instance};
use crate::time_format::rfc3339;

fn instance_status(
    instance: &Instance,
    stale_after: time::Duration,
    agent_window: time::Duration,
    now: OffsetDateTime,
) -> Value {
    let (date, status) = match (instance.last_attempt_at, instance.last_attempt_ok) {
        (Some(at), Some(true)) => (rfc3339(at), "success"),
        (Some(at), _) => (rfc3339(at), "failed"),
        (None, _) => (String::new(), "pending"),
    };
    let stale = instance
        .last_success_at
        .is_none_or(|success| now - success > stale_after);
    json!({
        "server_id": instance.server_id.to_string(),
        "hostname": instance.hostname,
        "last_sync": {
            "date": date,
            "status": status,
            "error": instance.last_error,
        },
        "arrival": instance.last_success_via.map(Arrival::as_str),
        "last_success_date": instance.last_success_at.map(rfc3339),
        "generated_at": instance.generated_at.map(rfc3339),
        "ghes_version": instance.ghes_version,
        "user_count": instance.user_count,
        "rows_skipped": instance.rows_skipped,
        "stale": stale,
        "enrolled": instance.has_credential,
        "agent_connected": instance.agent.connected(now, agent_window),
        "agent_last_seen_date": instance.agent.last_seen_at.map(rfc3339),
        "agent_sync_enabled": instance.agent.sync_enabled,
        "agent_version": instance.agent.version,
        "pending_deliveries": instance.agent.pending_deliveries,
    })
}
pub(super) async fn license_sync_status(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
) -> ServiceResult<Json<Value>> {
    let instances = app.store.list_instances(enterprise.id).await?;
    let now = OffsetDateTime::now_utc();
    let stale_after = time::Duration::days(i64::from(app.config.stale_after_days));
    let agent_window = app.agent_presence_window();
    let server_instances: Vec<Value> = instances
        .iter()
        .filter(|instance| instance.retired_at.is_none())
        .map(|instance| instance_status(instance, stale_after, agent_window, now))
        .collect();
    Ok(Json(json!({ "server_instances": server_instances })))
}
