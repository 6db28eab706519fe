//! What a GitHub client asks a host before anything else: the API root (`GET /`, `GET /api/v3/`), who the token
//! is (`GET /user`) and GraphQL's `viewer { login }`, which `gh auth status` sends after the root. An aggregator
//! token is an enterprise's token, not a person's: it is answered as a GitHub user whose login is the token's name
//! (so `gh` reports "Logged in to HOST as NAME"), with the enterprise and scope beside it. These answers describe
//! only the token itself, so any live token of any enterprise may read them; a bad one gets GitHub's 401.

use axum::Json;
use axum::body::Body;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{RequestBase, parse_json, read_body_up_to};
use crate::auth::{Authorized, TokenHolder};
use crate::error::ServiceResult;
use crate::time_format::rfc3339;

/// A GraphQL request is one short query: this bounds what is read before it is refused.
const MAX_GRAPHQL_BODY_BYTES: usize = 64 * 1024;

/// GitHub's API root: URL templates of what this host serves, under the scheme, host and prefix the client used.
/// Without a token it answers too, as GitHub does; with a bad one it is GitHub's 401, which is how `gh auth status`
/// tells a bad token from a good one.
pub(super) async fn api_root(_token: TokenHolder, RequestBase(base): RequestBase) -> Json<Value> {
    let enterprise = format!("{base}/enterprises/{{enterprise}}");
    Json(json!({
        "current_user_url": format!("{base}/user"),
        "enterprise_consumed_licenses_url": format!("{enterprise}/consumed-licenses{{?per_page,page}}"),
        "enterprise_license_sync_status_url": format!("{enterprise}/license-sync-status"),
        "enterprise_server_usage_url": format!("{enterprise}/server-usage"),
        "enterprise_usage_history_url": format!("{enterprise}/usage-history{{?per_page,page}}"),
        "enterprise_license_explanations_url": format!("{enterprise}/license-explanations{{?account}}"),
        "enterprise_likely_duplicates_url": format!("{enterprise}/likely-duplicates"),
        "enterprise_api_tokens_url": format!("{enterprise}/api-tokens"),
    }))
}

/// `GET /user`: the token as a GitHub user (see the module docs for why its name is the login).
pub(super) async fn current_user(
    token: TokenHolder,
    RequestBase(base): RequestBase,
) -> ServiceResult<Json<Value>> {
    let authorized = token.required()?;
    Ok(Json(user_json(&authorized, &base)))
}

fn user_json(authorized: &Authorized, base: &str) -> Value {
    let token = &authorized.token;
    json!({
        "login": token.name,
        "id": token.id,
        "type": "User",
        "site_admin": false,
        "name": token.name,
        "url": format!("{base}/user"),
        "created_at": rfc3339(token.created_at),
        // Not GitHub's: what the token is here, for whoever reads `gh api /user`.
        "license_sync": {
            "enterprise": authorized.enterprise.slug,
            "scope": token.scope.as_str(),
            "expires_at": token.expires_at.map(rfc3339),
        },
    })
}

#[derive(Debug, Deserialize)]
struct GraphqlRequest {
    query: String,
}

/// GraphQL at `/graphql` and `/api/graphql`: only the query for the viewer's login (`query { viewer { login } }`,
/// with any operation name and spacing), which `gh` sends to learn the user name; anything else gets a GraphQL
/// error naming what is served, with status 200 as GitHub answers query errors.
pub(super) async fn graphql(token: TokenHolder, body: Body) -> ServiceResult<Json<Value>> {
    let authorized = token.required()?;
    let body = read_body_up_to(body, MAX_GRAPHQL_BODY_BYTES, "the GraphQL request limit").await?;
    let request: GraphqlRequest = parse_json(&body, "a GraphQL request {\"query\": \"…\"}")?;
    if is_viewer_login_query(&request.query) {
        return Ok(Json(
            json!({ "data": { "viewer": { "login": authorized.token.name } } }),
        ));
    }
    Ok(Json(json!({
        "errors": [{
            "message": "this license-sync aggregator answers only the GraphQL query `query { viewer { login } }`; \
                        read licensing data from the REST API (GET /api/v3/enterprises/ENTERPRISE/consumed-licenses)",
        }],
    })))
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
