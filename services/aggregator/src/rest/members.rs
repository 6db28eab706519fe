//! `PUT /enterprises/{enterprise}/cloud-members`: replaces the enterprise's cloud members whole.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use license_sync_core::members::validate_members;
use license_sync_core::model::{CloudMember, MembersImport};

use super::{parse_json, read_body};
use crate::app::App;
use crate::auth::AuthorizedEnterprise;
use crate::error::{ServiceError, ServiceResult};

/// Replaces the enterprise's cloud members whole.
#[utoipa::path(
    put,
    path = "/enterprises/{enterprise}/cloud-members",
    tag = "usage",
    params(super::openapi::EnterprisePath),
    request_body(content = MembersImportBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The members replace the enterprise's previous ones", body = MembersImported),
        (status = 413, description = "The body is over `max_upload_bytes`", body = super::GitHubError),
        (status = 422, description = "Not JSON of that shape (the message says where), or a member breaks a rule (duplicate id or login, …)", body = super::GitHubError),
    ),
)]
pub(super) async fn import_cloud_members(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
    body: Body,
) -> ServiceResult<Json<MembersImported>> {
    let bytes = read_body(&app, body).await?;
    // One pass straight into the members (`MembersImport`), and the body freed before the store's write.
    let MembersImport(members) = parse_json(
        &bytes,
        "a JSON array of cloud members (or {\"members\": [...]})",
    )?;
    drop(bytes);
    validate_members(&members).map_err(|error| ServiceError::invalid(error.to_string()))?;
    app.store
        .replace_cloud_members(enterprise.id, &members)
        .await?;
    app.views.note_change(enterprise.id);
    tracing::info!(enterprise = %enterprise.slug, members = members.len(), "cloud members imported");
    Ok(Json(MembersImported {
        members_imported: members.len(),
    }))
}

/// The body of an import, as [`MembersImport`] reads it: an array of members, or an object holding one (its other
/// keys are ignored). Only its schema is used; [`MembersImport`] reads it in one pass.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[allow(
    dead_code,
    reason = "a schema for the OpenAPI document only; never built"
)]
#[serde(untagged)]
pub(super) enum MembersImportBody {
    Members(Vec<CloudMember>),
    Wrapped { members: Vec<CloudMember> },
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(super) struct MembersImported {
    members_imported: usize,
}
