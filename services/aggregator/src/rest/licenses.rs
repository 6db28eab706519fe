//! `GET /enterprises/{enterprise}/consumed-licenses`: GitHub's "consumed licenses", paginated, each page serialised
//! once per view generation; and `GET /enterprises/{enterprise}/consumed-licenses.csv`, the same people as GitHub's
//! CSV license report ([`crate::report`]).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use license_sync_core::merge::Person;

use super::{GitHubQuery, PageQuery, RequestBase, add_link_header, overage, parse_page};
use crate::app::App;
use crate::auth::AuthorizedEnterprise;
use crate::consumed_user::{
    ConsumedLicenses, ConsumedUser, consumed_user, server_emails, write_consumed_user,
};
use crate::error::{ServiceError, ServiceResult};
use crate::view::MergedView;

/// GitHub's "List enterprise consumed licenses": every person consuming a license, one page of them, with the
/// enterprise's totals and GitHub's `Link` header.
#[utoipa::path(
    get,
    path = "/enterprises/{enterprise}/consumed-licenses",
    tag = "licensing",
    params(super::openapi::EnterprisePath, PageQuery),
    responses(
        (status = 200, description = "One page of the people consuming a license", body = ConsumedLicenses,
         headers(("Link" = String, description = "GitHub's pagination links (`prev`, `next`, `last`, `first`), when there is more than one page"))),
        (status = 422, description = "`per_page` or `page` is not a positive integer", body = super::GitHubError),
    ),
)]
pub(super) async fn consumed_licenses(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
    GitHubQuery(query): GitHubQuery<PageQuery>,
    base: RequestBase,
) -> ServiceResult<Response> {
    let (per_page, page) = parse_page(&query)?;
    let view = app.views.merged_view(enterprise.id).await?;
    let total = view.people.consuming().len();
    let last_page = total.div_ceil(per_page).max(1);
    // Pages of one view generation are identical for every reader: serialise each once.
    let body = match app
        .views
        .cached_page(enterprise.id, view.generation, (per_page, page))
    {
        Some(body) => body,
        None => {
            let body = app
                .body_pool
                .into_bytes(consumed_licenses_body(&app, &view, per_page, page)?);
            app.views.cache_page(
                enterprise.id,
                view.generation,
                (per_page, page),
                body.clone(),
            );
            body
        }
    };
    drop(view);
    let mut response = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    let path = format!("/enterprises/{}/consumed-licenses", enterprise.slug);
    add_link_header(&mut response, &base, &path, (per_page, page), last_page);
    Ok(response)
}

/// The whole report as CSV, streamed: GitHub's license report columns, then ours (see README).
#[utoipa::path(
    get,
    path = "/enterprises/{enterprise}/consumed-licenses.csv",
    tag = "licensing",
    params(super::openapi::EnterprisePath),
    responses(
        (status = 200, description = "One row per person consuming a license, in the order of `consumed-licenses`",
         content_type = "text/csv", body = String,
         headers(("Content-Disposition" = String, description = "`attachment; filename=\"<enterprise>-consumed-licenses-<date>.csv\"`"))),
    ),
)]
pub(super) async fn consumed_licenses_csv(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
) -> ServiceResult<Response> {
    crate::report::consumed_licenses_csv(&app, &enterprise).await
}

/// One `consumed-licenses` page as JSON.
fn consumed_licenses_body(
    app: &App,
    view: &MergedView,
    per_page: usize,
    page: usize,
) -> ServiceResult<Vec<u8>> {
    let consuming = view.people.consuming();
    let total = consuming.len();
    let start = (page - 1).saturating_mul(per_page).min(total);
    let end = start.saturating_add(per_page).min(total);
    let people: Vec<&Person> = consuming[start..end]
        .iter()
        .filter_map(|&slot| view.people.person(slot))
        .collect();
    let emails: Vec<Vec<&str>> = people
        .iter()
        .map(|person| server_emails(view, person))
        .collect();
    let users: Vec<ConsumedUser> = people
        .iter()
        .zip(&emails)
        .map(|(person, emails)| consumed_user(view, person, emails, &app.config.cloud_web_url))
        .collect();
    let consumed = view.people.total_seats_consumed();
    // About 600 bytes per user in practice: sized up front, the body is written without regrowing.
    let mut body = app.body_pool.take(256 + users.len() * 768);
    let totals = format!(
        "{{\"total_seats_consumed\":{consumed},\"total_seats_purchased\":{},\"total_seats_overage\":{},\"users\":[",
        view.seats_purchased,
        overage(consumed, view.seats_purchased)
    );
    body.extend_from_slice(totals.as_bytes());
    for (position, user) in users.iter().enumerate() {
        if position > 0 {
            body.push(b',');
        }
        write_consumed_user(&mut body, user)
            .map_err(|err| ServiceError::internal("encoding consumed licenses", err))?;
    }
    body.extend_from_slice(b"]}");
    Ok(body)
}
