//! `GET /enterprises/{enterprise}/license-explanations`: why an account is one license, or why two are two.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use license_sync_core::merge::{Explanation, Person, explain, explain_separation};
use serde::{Deserialize, Serialize};

use super::GitHubQuery;
use crate::app::App;
use crate::auth::AuthorizedEnterprise;
use crate::error::{ServiceError, ServiceResult};
use crate::view::MergedView;

/// Who to explain: `account` or `person` (one of them), and `other` to compare with.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ExplainQuery {
    /// `<hostname>:<user id>` of a GHES account, or `github.com:<login>` of a cloud member.
    account: Option<String>,
    /// A person id (`person_id` of `consumed-licenses`).
    person: Option<String>,
    /// A second account or person id: why are these two licenses?
    other: Option<String>,
}

/// Why one account is one license; with `other`, why the two are (or are not) two licenses.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct LicenseExplanation {
    explanation: Explanation,
    /// With `other` only, as are the fields below.
    #[serde(skip_serializing_if = "Option::is_none")]
    other_explanation: Option<Explanation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    same_person: Option<bool>,
    /// Licenses the two consume together: 0, 1 or 2.
    #[serde(skip_serializing_if = "Option::is_none")]
    licenses: Option<u8>,
    /// Why they were not merged into one person (or that they were).
    #[serde(skip_serializing_if = "Option::is_none")]
    reasons: Option<Vec<String>>,
}

/// Finds the person holding an account reference or with a person id.
pub(crate) fn find_person<'v>(view: &'v MergedView, reference: &str) -> ServiceResult<&'v Person> {
    if let Some(person) = view.people.person_by_id(reference) {
        return Ok(person);
    }
    let not_found = || {
        ServiceError::not_found(format!(
            "no account or person {reference:?}: use `<hostname>:<user id>`, `github.com:<login>` or a person_id"
        ))
    };
    let (prefix, rest) = reference.rsplit_once(':').ok_or_else(not_found)?;
    let person = if prefix.eq_ignore_ascii_case("github.com") {
        view.people
            .find_cloud_member(rest)
            .and_then(|index| view.people.person_of_cloud_member(index))
    } else {
        let user_id: i64 = rest.parse().map_err(|_| not_found())?;
        view.people
            .find_account(prefix, user_id)
            .and_then(|account| view.people.person_of_account(account))
    };
    person.ok_or_else(not_found)
}

/// "Why is this one license?" and, with `other`, "why are these two licenses?".
#[utoipa::path(
    get,
    path = "/enterprises/{enterprise}/license-explanations",
    tag = "people",
    params(super::openapi::EnterprisePath, ExplainQuery),
    responses(
        (status = 200, description = "The explanation", body = LicenseExplanation),
        (status = 404, description = "No such enterprise, or no such account or person in it", body = super::GitHubError),
        (status = 422, description = "Neither `account` nor `person` was given", body = super::GitHubError),
    ),
)]
pub(super) async fn license_explanation(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
    GitHubQuery(query): GitHubQuery<ExplainQuery>,
) -> ServiceResult<Json<LicenseExplanation>> {
    let reference = query.account.or(query.person).ok_or_else(|| {
        ServiceError::invalid(
            "give `account=<hostname>:<user id>` (or `github.com:<login>`) or `person=<person_id>`",
        )
    })?;
    let view = app.views.merged_view(enterprise.id).await?;
    let person = find_person(&view, &reference)?;
    let (instances, cloud) = (view.people.instance_slots(), view.people.cloud_members());
    let ties = view.people.ties();
    let explanation = explain(person, instances, cloud, ties);
    let Some(other_reference) = query.other else {
        return Ok(Json(LicenseExplanation {
            explanation,
            other_explanation: None,
            same_person: None,
            licenses: None,
            reasons: None,
        }));
    };
    let other = find_person(&view, &other_reference)?;
    let reasons = explain_separation(
        (person, &reference),
        (other, &other_reference),
        instances,
        cloud,
    );
    let same_person = view.people.person_id(person) == view.people.person_id(other);
    Ok(Json(LicenseExplanation {
        explanation,
        other_explanation: Some(explain(other, instances, cloud, ties)),
        same_person: Some(same_person),
        licenses: Some(if same_person {
            u8::from(person.consumes_license)
        } else {
            u8::from(person.consumes_license) + u8::from(other.consumes_license)
        }),
        reasons: Some(reasons),
    }))
}
