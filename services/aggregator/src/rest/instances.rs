//! An enterprise's instances: enrollment tokens for their agents, "Sync now" and its requests, retirement.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{RequestBase, parse_json, read_body_up_to};
use crate::app::App;
use crate::auth::AuthorizedEnterprise;
use crate::enrollment::issue_enrollment_token;
use crate::error::{ServiceError, ServiceResult};
use crate::store::{SyncRequest, SyncRequestState};
use crate::time_format::rfc3339;

pub(crate) fn parse_uuid_segment(text: &str, what: &str) -> ServiceResult<Uuid> {
    Uuid::parse_str(text)
        .map_err(|_| ServiceError::invalid(format!("{text:?} is not a {what} (UUID)")))
}

/// Largest body of the small JSON endpoints (enrollment tokens).
const SMALL_BODY_BYTES: usize = 64 * 1024;

/// The `{enterprise}` and `{server_id}` path segments.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(
    dead_code,
    reason = "describes path segments for the OpenAPI document; the handlers read them"
)]
pub(super) struct InstancePath {
    /// The enterprise's slug, or its numeric id.
    enterprise: String,
    /// The instance's server id (a UUID, as `license-sync-status` lists it).
    server_id: Uuid,
}

/// An instance's sync request.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(
    dead_code,
    reason = "describes path segments for the OpenAPI document; the handlers read them"
)]
pub(super) struct SyncRequestPath {
    /// The enterprise's slug, or its numeric id.
    enterprise: String,
    /// The instance's server id.
    server_id: Uuid,
    /// The `request_id` of the "Sync now" answer.
    request_id: Uuid,
}

/// The optional body of an enrollment token request; an empty body takes the default lifetime.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct EnrollmentTokenBody {
    /// Hours until the token expires; 24 by default, at most `MAX_ENROLLMENT_TOKEN_HOURS`.
    #[schema(minimum = 1, maximum = 720)]
    expires_in_hours: Option<i64>,
}

/// A one-time enrollment token; the token is in this answer only.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct EnrollmentToken {
    /// For the agent's `enroll --token`.
    token: String,
    /// RFC 3339 UTC.
    expires_at: String,
    /// The enterprise's slug.
    enterprise: String,
}

/// A one-time enrollment token for an agent; the token is in this answer only.
#[utoipa::path(
    post,
    path = "/enterprises/{enterprise}/enrollment-tokens",
    tag = "instances",
    params(super::openapi::EnterprisePath),
    request_body(content = Option<EnrollmentTokenBody>, content_type = "application/json",
                 description = "Empty, or the token's lifetime"),
    responses(
        (status = 201, description = "The token; it is shown only here", body = EnrollmentToken),
        (status = 413, description = "The body is over 64 KiB", body = super::GitHubError),
        (status = 422, description = "The body is not empty nor `{\"expires_in_hours\": N}`, or N is out of range", body = super::GitHubError),
    ),
)]
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
    let body = EnrollmentToken {
        token: issued.token,
        expires_at: rfc3339(issued.expires_at),
        enterprise: enterprise.slug,
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// A "Sync now" request and how far it got.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct SyncRequestStatus {
    request_id: Uuid,
    server_id: Uuid,
    state: SyncRequestState,
    /// The agent's job for it, once acknowledged.
    job_id: Option<String>,
    /// Why the agent refused it or why it expired.
    reason: Option<String>,
    /// RFC 3339 UTC, as the other times.
    requested_at: String,
    delivered_at: Option<String>,
    acked_at: Option<String>,
}

/// The answer to "Sync now": the request, whether its agent is connected now, and where to follow it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct SyncNowAccepted {
    #[serde(flatten)]
    request: SyncRequestStatus,
    /// Its agent has a control stream open now (delivery is at once); otherwise when it connects.
    agent_connected: bool,
    /// The request's URL (also the `Location` header).
    url: String,
}

fn sync_request_status(
    request: &SyncRequest,
    server_id: Uuid,
    now: OffsetDateTime,
) -> SyncRequestStatus {
    let non_empty = |text: &str| (!text.is_empty()).then(|| text.to_owned());
    SyncRequestStatus {
        request_id: request.request_id,
        server_id,
        state: request.state(now),
        job_id: non_empty(&request.job_id),
        reason: non_empty(&request.reason),
        requested_at: rfc3339(request.requested_at),
        delivered_at: request.delivered_at.map(rfc3339),
        acked_at: request.acked_at.map(rfc3339),
    }
}

/// "Sync now" from the cloud side: queued for the instance's agent, delivered over its control stream.
#[utoipa::path(
    post,
    path = "/enterprises/{enterprise}/instances/{server_id}/sync-now",
    tag = "instances",
    params(InstancePath),
    responses(
        (status = 202, description = "Queued for the instance's agent", body = SyncNowAccepted,
         headers(("Location" = String, description = "The request's URL, the same as `url`"))),
        (status = 404, description = "No such enterprise, or no active instance with this server id in it", body = super::GitHubError),
        (status = 409, description = "The instance has no enrolled agent (its usage arrives by upload)", body = super::GitHubError),
        (status = 422, description = "The server id is not a UUID", body = super::GitHubError),
    ),
)]
pub(super) async fn sync_now(
    State(app): State<Arc<App>>,
    Path((_, server_id)): Path<(String, String)>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
    base: RequestBase,
) -> ServiceResult<Response> {
    let server_id = parse_uuid_segment(&server_id, "server id")?;
    let (request, instance) = app.request_sync_now(&enterprise, server_id).await?;
    let now = OffsetDateTime::now_utc();
    let path = format!(
        "/enterprises/{}/instances/{server_id}/sync-requests/{}",
        enterprise.slug, request.request_id
    );
    let url = format!("{}{path}", base.0);
    let body = SyncNowAccepted {
        request: sync_request_status(&request, server_id, now),
        agent_connected: instance.agent.connected(now, app.agent_presence_window()),
        url: url.clone(),
    };
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    // The same URL as `url`: a relative one would drop the `/api/v3` prefix a client used.
    if let Ok(location) = HeaderValue::from_str(&url) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// A "Sync now" request: delivered, acknowledged, refused or expired.
#[utoipa::path(
    get,
    path = "/enterprises/{enterprise}/instances/{server_id}/sync-requests/{request_id}",
    tag = "instances",
    params(SyncRequestPath),
    responses(
        (status = 200, description = "The request", body = SyncRequestStatus),
        (status = 404, description = "No such enterprise, instance or request (requests are kept 30 days)", body = super::GitHubError),
        (status = 422, description = "The server id or request id is not a UUID", body = super::GitHubError),
    ),
)]
pub(super) async fn sync_request(
    State(app): State<Arc<App>>,
    Path((_, server_id, request_id)): Path<(String, String, String)>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
) -> ServiceResult<Json<SyncRequestStatus>> {
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
    Ok(Json(sync_request_status(
        &request,
        server_id,
        OffsetDateTime::now_utc(),
    )))
}

/// Retires an instance: its users stop counting, its agent's credential stops working.
#[utoipa::path(
    delete,
    path = "/enterprises/{enterprise}/instances/{server_id}",
    tag = "instances",
    params(InstancePath),
    responses(
        (status = 204, description = "Retired"),
        (status = 404, description = "No such enterprise, or no active instance with this server id in it", body = super::GitHubError),
        (status = 422, description = "The server id is not a UUID", body = super::GitHubError),
    ),
)]
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
