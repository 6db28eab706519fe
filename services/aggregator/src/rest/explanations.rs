//! `GET /enterprises/{enterprise}/license-explanations`: why an account is one license, or why two are two.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use license_sync_core::merge::{Person, explain, explain_separation};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::App;
use crate::auth::AuthorizedEnterprise;
use crate::error::{ServiceError, ServiceResult};
use crate::view::MergedView;

#[derive(Debug, Deserialize)]
pub(super) struct ExplainQuery {
    /// `<hostname>:<user id>`, `github.com:<login>`, or a person id.
    account: Option<String>,
    person: Option<String>,
    /// A second account or person id: why are these two licenses?
    other: Option<String>,
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
pub(super) async fn license_explanation(
    State(app): State<Arc<App>>,
    Query(query): Query<ExplainQuery>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
) -> ServiceResult<Json<Value>> {
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
        return Ok(Json(json!({ "explanation": explanation })));
    };
    let other = find_person(&view, &other_reference)?;
    let reasons = explain_separation(
        (person, &reference),
        (other, &other_reference),
        instances,
        cloud,
    );
    let same_person = view.people.person_id(person) == view.people.person_id(other);
    Ok(Json(json!({
        "explanation": explanation,
        "other_explanation": explain(other, instances, cloud, ties),
        "same_person": same_person,
        "licenses": if same_person {
            u8::from(person.consumes_license)
        } else {
            u8::from(person.consumes_license) + u8::from(other.consumes_license)
        },
        "reasons": reasons,
    })))
}
