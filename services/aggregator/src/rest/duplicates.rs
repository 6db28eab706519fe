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
    #[schema(value_type = Vec<LikelyDuplicateGroup>)]
    likely_duplicates: Arc<Vec<LikelyDuplicate>>,
    stats: MergeStats,
}

/// [`LikelyDuplicate`] as it is serialised: its reason flattened into the object. Described flat here because the
/// derived schema of a flattened tagged enum is an `allOf` over a `oneOf`, which client generators drop
/// (openapi-python-client: "Cannot take allOf a non-object"); the schema test of the answers keeps the two the same.
#[derive(utoipa::ToSchema)]
#[allow(
    dead_code,
    reason = "a schema for the OpenAPI document only; never built"
)]
pub(super) struct LikelyDuplicateGroup {
    reason: DuplicateKind,
    /// The shared login (case-insensitive) or display name (normalised).
    value: String,
    /// Person ids, sorted.
    people: Vec<String>,
}

/// `DuplicateReason`'s tags.
#[derive(utoipa::ToSchema)]
#[allow(
    dead_code,
    reason = "a schema for the OpenAPI document only; never built"
)]
#[schema(rename_all = "snake_case")]
pub(super) enum DuplicateKind {
    /// The same login on several instances or in the cloud.
    SameLogin,
    /// The same display name on several cloud accounts.
    SameName,
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

#[cfg(test)]
mod tests {
    use license_sync_core::merge::DuplicateReason;
    use utoipa::PartialSchema;

    use super::*;

    /// Every reason the merge can give serialises to a documented tag, with the documented fields only.
    #[test]
    fn every_duplicate_reason_is_in_the_flat_schema() {
        let group = serde_json::to_value(LikelyDuplicateGroup::schema()).expect("schema");
        let tags = serde_json::to_value(DuplicateKind::schema()).expect("schema");
        let fields: Vec<&String> = group["properties"]
            .as_object()
            .expect("properties")
            .keys()
            .collect();
        for reason in [
            DuplicateReason::SameLogin("mona".into()),
            DuplicateReason::SameName("Mona Lisa".into()),
        ] {
            let answer = serde_json::to_value(LikelyDuplicate {
                reason,
                people: vec!["cloud:1".into()],
            })
            .expect("serialises");
            let answer = answer.as_object().expect("object");
            assert!(
                answer.keys().all(|key| fields.contains(&key)),
                "{answer:?} against {fields:?}"
            );
            let tag = &answer["reason"];
            assert!(
                tags["enum"]
                    .as_array()
                    .is_some_and(|names| names.contains(tag)),
                "{tag} is not in {tags}"
            );
        }
    }
}
