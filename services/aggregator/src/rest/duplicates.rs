//! `GET /enterprises/{enterprise}/likely-duplicates`: consuming people who are probably one person.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use license_sync_core::merge::{LikelyDuplicate, MergeStats};
use serde::Serialize;

use crate::app::App;
use crate::auth::AuthorizedEnterprise;
use crate::error::ServiceResult;

/// Groups of consuming people who share a login or a display name, and the merge's counts.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct LikelyDuplicates {
    #[schema(value_type = Vec<LikelyDuplicate>)]
    likely_duplicates: Arc<Vec<LikelyDuplicate>>,
    stats: MergeStats,
}

/// Consuming people who are probably one person: the same login on several instances, or the same name.
#[utoipa::path(
    get,
    path = "/enterprises/{enterprise}/likely-duplicates",
    tag = "people",
    params(super::openapi::EnterprisePath),
    responses((status = 200, description = "The likely duplicates", body = LikelyDuplicates)),
)]
pub(super) async fn likely_duplicates(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
) -> ServiceResult<Json<LikelyDuplicates>> {
    let view = app.views.merged_view(enterprise.id).await?;
    Ok(Json(LikelyDuplicates {
        likely_duplicates: app.views.likely_duplicates(enterprise.id, &view),
        stats: view.people.stats(),
    }))
}
