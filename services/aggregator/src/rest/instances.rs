//! An enterprise's instances: enrollment tokens for their agents, "Sync now" and its requests, retirement.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{base_url, parse_json, read_body_up_to};
use crate::app::App;
use crate::auth::AuthorizedEnterprise;
use crate::enrollment::issue_enrollment_token;
use crate::error::{ServiceError, ServiceResult};
use crate::store::SyncRequest;
use crate::time_format::rfc3339;

pub(crate) fn parse_uuid_segment(text: &str, what: &str) -> ServiceResult<Uuid> {
    Uuid::parse_str(text)
        .map_err(|_| ServiceError::invalid(format!("{text:?} is not a {what} (UUID)")))
}

/// Largest body of the small JSON endpoints (enrollment tokens).
const SMALL_BODY_BYTES: usize = 64 * 1024;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollmentTokenBody {
    expires_in_hours: Option<i64>,
}

/// A one-time enrollment token for an agent; the token is in this answer only.
pub(super) async fn create_enrollment_token(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
    body: Body,
) -> ServiceResult<Response> {
    let bytes = read_body_up_to(body, SMALL_BODY_BYTES, "of this endpoint").await?;
    let request: EnrollmentTokenBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        EnrollmentTokenBody::default()
    } else {
        parse_json(&bytes, "an empty body or {\"expires_in_hours\": N}")?
    };
    let issued = issue_enrollment_token(&app.store, &enterprise, request.expires_in_hours).await?;
    let body = json!({
        "token": issued.token,
        "expires_at": rfc3339(issued.expires_at),
        "enterprise": enterprise.slug,
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

fn sync_request_json(request: &SyncRequest, server_id: Uuid, now: OffsetDateTime) -> Value {
    let non_empty = |text: &str| (!text.is_empty()).then(|| text.to_owned());
    json!({
        "request_id": request.request_id.to_string(),
        "server_id": server_id.to_string(),
        "state": request.state(now).as_str(),
        "job_id": non_empty(&request.job_id),
        "reason": non_empty(&request.reason),
        "requested_at": rfc3339(request.requested_at),
        "delivered_at": request.delivered_at.map(rfc3339),
        "acked_at": request.acked_at.map(rfc3339),
    })
}
/// "Sync now" from the cloud side: queued for the instance's agent, delivered over its control stream.
pub(super) async fn sync_now(
    State(app): State<Arc<App>>,
    Path((_, server_id)): Path<(String, String)>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
    headers: HeaderMap,
) -> ServiceResult<Response> {
    let server_id = parse_uuid_segment(&server_id, "server id")?;
    let (request, instance) = app.request_sync_now(&enterprise, server_id).await?;
    let now = OffsetDateTime::now_utc();
    let path = format!(
        "/enterprises/{}/instances/{server_id}/sync-requests/{}",
        enterprise.slug, request.request_id
    );
    let mut body = sync_request_json(&request, server_id, now);
    body["agent_connected"] = json!(instance.agent.connected(now, app.agent_presence_window()));
    body["url"] = json!(format!("{}{path}", base_url(&app, &headers)));
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(location) = HeaderValue::from_str(&path) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}
pub(super) async fn sync_request(
    State(app): State<Arc<App>>,
    Path((_, server_id, request_id)): Path<(String, String, String)>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
) -> ServiceResult<Json<Value>> {
    let server_id = parse_uuid_segment(&server_id, "server id")?;
    let request_id = parse_uuid_segment(&request_id, "sync request id")?;
    let request = app
        .store
        .sync_request(enterprise.id, server_id, request_id)
        .await?
        .ok_or_else(|| {
            ServiceError::not_found(format!(
                "no sync request {request_id} for instance {server_id} (requests are kept 30 days)"
            ))
        })?;
    Ok(Json(sync_request_json(
        &request,
        server_id,
        OffsetDateTime::now_utc(),
    )))
}
pub(super) async fn retire_instance(
    State(app): State<Arc<App>>,
    Path((_, server_id)): Path<(String, String)>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
) -> ServiceResult<StatusCode> {
    let server_id = parse_uuid_segment(&server_id, "server id")?;
    app.store
        .retire_instance(enterprise.id, server_id, OffsetDateTime::now_utc())
        .await?;
    app.views.note_change(enterprise.id);
    tracing::info!(enterprise = %enterprise.slug, %server_id, "instance retired");
    Ok(StatusCode::NO_CONTENT)
}
