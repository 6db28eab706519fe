//! `PUT /enterprises/{enterprise}/cloud-members`: replaces the enterprise's cloud members whole.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use license_sync_core::members::validate_members;
use license_sync_core::model::MembersImport;
use serde_json::{Value, json};

use super::{parse_json, read_body};
use crate::app::App;
use crate::auth::AuthorizedEnterprise;
use crate::error::{ServiceError, ServiceResult};

/// Replaces the enterprise's cloud members whole.
pub(super) async fn import_cloud_members(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
    body: Body,
) -> ServiceResult<Json<Value>> {
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
    Ok(Json(json!({ "members_imported": members.len() })))
}
