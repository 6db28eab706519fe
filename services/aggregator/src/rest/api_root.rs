//! What a GitHub client asks a host before anything else: the API root (`GET /`, `GET /api/v3/`), who the token
//! is (`GET /user`) and GraphQL's `viewer { login }`, which `gh auth status` sends after the root. An aggregator
//! token is an enterprise's token, not a person's: it is answered as a GitHub user whose login is the token's name
//! (so `gh` reports "Logged in to HOST as NAME"), with the enterprise and scope beside it. These answers describe
//! only the token itself, so any live token of any enterprise may read them; a bad one gets GitHub's 401.

use axum::Json;
use axum::body::Body;
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{RequestBase, parse_json, read_body_up_to};
use crate::auth::{Authorized, TokenHolder};
use crate::error::ServiceResult;
use crate::time_format::rfc3339;

/// A GraphQL request is one short query: this bounds what is read before it is refused.
const MAX_GRAPHQL_BODY_BYTES: usize = 64 * 1024;

/// GitHub's API root: URL templates of what this host serves (GitHub's keys where GitHub has the endpoint).
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ApiRoot {
    current_user_url: String,
    enterprise_consumed_licenses_url: String,
    enterprise_license_sync_status_url: String,
    enterprise_server_usage_url: String,
    enterprise_usage_history_url: String,
    enterprise_license_explanations_url: String,
    enterprise_likely_duplicates_url: String,
    enterprise_api_tokens_url: String,
}

/// GitHub's API root: URL templates of what this host serves, under the scheme, host and prefix the client used.
/// Without a token it answers too, as GitHub does; with a bad one it is GitHub's 401, which is how `gh auth status`
/// tells a bad token from a good one. A browser (`Accept: text/html`) at `/` is sent to the web console (303);
/// GitHub clients ask for JSON, and `/api/v3/` always answers JSON.
#[utoipa::path(
    get,
    path = "/",
    tag = "github-clients",
    responses(
        (status = 200, description = "URL templates of this host's API (also at `/api/v3/`)", body = ApiRoot),
        (status = 401, description = "The token given is unknown, revoked or expired", body = super::GitHubError),
    ),
)]
pub(super) async fn api_root(
    uri: Uri,
    headers: HeaderMap,
    _token: TokenHolder,
    RequestBase(base): RequestBase,
) -> Response {
    if uri.path() == "/" && crate::console::wants_html(&headers) {
        return Redirect::to("/console/").into_response();
    }
    let enterprise = format!("{base}/enterprises/{{enterprise}}");
    Json(ApiRoot {
        current_user_url: format!("{base}/user"),
        enterprise_consumed_licenses_url: format!(
            "{enterprise}/consumed-licenses{{?per_page,page}}"
        ),
        enterprise_license_sync_status_url: format!("{enterprise}/license-sync-status"),
        enterprise_server_usage_url: format!("{enterprise}/server-usage"),
        enterprise_usage_history_url: format!("{enterprise}/usage-history{{?per_page,page}}"),
        enterprise_license_explanations_url: format!(
            "{enterprise}/license-explanations{{?account}}"
        ),
        enterprise_likely_duplicates_url: format!("{enterprise}/likely-duplicates"),
        enterprise_api_tokens_url: format!("{enterprise}/api-tokens"),
    })
    .into_response()
}

/// The token as a GitHub user: GitHub's user fields, plus what the token is here.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct CurrentUser {
    /// The token's name.
    login: String,
    /// The token's id.
    id: i64,
    #[serde(rename = "type")]
    kind: &'static str,
    site_admin: bool,
    name: String,
    url: String,
    created_at: String,
    /// Not GitHub's: what the token is here, for whoever reads `gh api /user`.
    license_sync: TokenIdentity,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct TokenIdentity {
    /// The slug of the enterprise the token belongs to.
    enterprise: String,
    /// `read` or `admin`.
    scope: &'static str,
    expires_at: Option<String>,
}

/// `GET /user`: the token as a GitHub user (see the module docs for why its name is the login).
#[utoipa::path(
    get,
    path = "/user",
    tag = "github-clients",
    responses(
        (status = 200, description = "The token, answered as a GitHub user whose login is its name", body = CurrentUser),
        (status = 401, description = "No token, or an unknown, revoked or expired one", body = super::GitHubError),
    ),
)]
pub(super) async fn current_user(
    token: TokenHolder,
    RequestBase(base): RequestBase,
) -> ServiceResult<Json<CurrentUser>> {
    let authorized = token.required()?;
    Ok(Json(current_user_of(&authorized, &base)))
}

fn current_user_of(authorized: &Authorized, base: &str) -> CurrentUser {
    let token = &authorized.token;
    CurrentUser {
        login: token.name.clone(),
        id: token.id,
        kind: "User",
        site_admin: false,
        name: token.name.clone(),
        url: format!("{base}/user"),
        created_at: rfc3339(token.created_at),
        license_sync: TokenIdentity {
            enterprise: authorized.enterprise.slug.clone(),
            scope: token.scope.as_str(),
            expires_at: token.expires_at.map(rfc3339),
        },
    }
}

#[derive(Debug, Deserialize)]
struct GraphqlRequest {
    query: String,
}

/// A GraphQL answer: `data` for the one query served, `errors` for any other (status 200, as GitHub answers
/// query errors).
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct GraphqlAnswer {
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<GraphqlData>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<GraphqlError>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct GraphqlData {
    viewer: GraphqlViewer,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct GraphqlViewer {
    /// The token's name.
    login: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub(super) struct GraphqlError {
    message: &'static str,
}

/// GraphQL at `/graphql` and `/api/graphql`: only the query for the viewer's login (`query { viewer { login } }`,
/// with any operation name and spacing), which `gh` sends to learn the user name; anything else gets a GraphQL
/// error naming what is served, with status 200 as GitHub answers query errors.
#[utoipa::path(
    post,
    path = "/graphql",
    tag = "github-clients",
    request_body(content = String, description = "`{\"query\": \"query { viewer { login } }\"}`", content_type = "application/json"),
    responses(
        (status = 200, description = "The viewer's login, or a GraphQL error for any other query", body = GraphqlAnswer),
        (status = 401, description = "No token, or an unknown, revoked or expired one", body = super::GitHubError),
        (status = 413, description = "The request is larger than 64 KiB", body = super::GitHubError),
        (status = 422, description = "The body is not a JSON GraphQL request", body = super::GitHubError),
    ),
)]
pub(super) async fn graphql(token: TokenHolder, body: Body) -> ServiceResult<Json<GraphqlAnswer>> {
    let authorized = token.required()?;
    let body = read_body_up_to(body, MAX_GRAPHQL_BODY_BYTES, "the GraphQL request limit").await?;
    let request: GraphqlRequest = parse_json(&body, "a GraphQL request {\"query\": \"…\"}")?;
    if is_viewer_login_query(&request.query) {
        return Ok(Json(GraphqlAnswer {
            data: Some(GraphqlData {
                viewer: GraphqlViewer {
                    login: authorized.token.name,
                },
            }),
            errors: Vec::new(),
        }));
    }
    Ok(Json(GraphqlAnswer {
        data: None,
        errors: vec![GraphqlError {
            message: "this license-sync aggregator answers only the GraphQL query `query { viewer { login } }`; \
                      read licensing data from the REST API (GET /api/v3/enterprises/ENTERPRISE/consumed-licenses)",
        }],
    }))
}

/// `query { viewer { login } }`, `{viewer{login}}`, `query UserCurrent{viewer{login}}`: the operation name and
/// white space (and GraphQL's insignificant commas) do not matter.
fn is_viewer_login_query(query: &str) -> bool {
    let compact: String = query
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ',')
        .collect();
    let selection = match compact.strip_prefix("query") {
        // An operation name is letters, digits and `_`; the selection starts at the first `{`.
        Some(rest) => match rest.find('{') {
            Some(start)
                if rest[..start]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                &rest[start..]
            }
            _ => return false,
        },
        None => compact.as_str(),
    };
    selection == "{viewer{login}}"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_viewer_login_query_is_recognised() {
        for query in [
            "query UserCurrent{viewer{login}}",
            "query { viewer { login } }",
            "{viewer{login}}",
            "query\n{\n  viewer {\n    login,\n  }\n}",
        ] {
            assert!(is_viewer_login_query(query), "{query:?}");
        }
        for query in [
            "query { viewer { login email } }",
            "mutation { viewer { login } }",
            "query X($a: Int) { viewer { login } }",
            "{ viewer { login } } { repository { name } }",
            "",
        ] {
            assert!(!is_viewer_login_query(query), "{query:?}");
        }
    }
}
