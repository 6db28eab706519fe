//! `GET /openapi.json`: the OpenAPI 3.1 document of the REST API, derived from the handlers' `#[utoipa::path]`
//! annotations and the `ToSchema` of the types they answer with, so that it changes with the code. The errors every
//! authenticated operation can answer are added here from [`ErrorKind`]'s table, by the rule `auth.rs` applies (a
//! token on every `{enterprise}` route, the `admin` scope for every method but GET), not repeated on each handler.
//! The document is built once, when the router is built, and served as the same bytes to every request.
//!
//! A new route goes into `rest::routes()` and its handler into [`ApiDoc`]'s `paths(...)`: the test
//! `every_route_is_in_the_document` fails until both are done.

use std::sync::LazyLock;

use axum::body::Bytes;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::path::{HttpMethod, Operation};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, HeaderBuilder, ObjectBuilder, Ref, RefOr, ResponseBuilder, Type,
};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

use crate::error::{DOCUMENTATION_URL, ErrorKind, ServiceError, ServiceResult};

/// The document. Each handler of `rest::routes()` (but `/metrics`, whose body is Prometheus text) is listed in
/// `paths`; the types they name are collected from the annotations.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "license-sync aggregator REST API",
        description = "GitHub-compatible licensing endpoints (consumed licenses, license sync status) and what \
                       GitHub does not have: usage upload, cloud members import, instances, explanations, usage \
                       history. Errors are GitHub-shaped: {\"message\", \"documentation_url\"}. Authenticate with \
                       an enterprise owner's REST token: `Authorization: Bearer TOKEN` (or `token TOKEN`, as GitHub \
                       accepts).",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        super::healthz,
        super::readyz,
        crate::scrape::serve,
        serve,
        super::licenses::consumed_licenses,
        super::status::license_sync_status,
        super::upload::upload_usage,
        super::upload::usage_file_key,
        super::members::import_cloud_members,
        super::instances::retire_instance,
        super::instances::create_enrollment_token,
        super::instances::sync_now,
        super::instances::sync_request,
        super::explanations::license_explanation,
        super::history::usage_history,
        super::duplicates::likely_duplicates,
        super::api_tokens::list_api_tokens,
        super::licenses::consumed_licenses_csv,
        super::api_root::api_root,
        super::api_root::current_user,
        super::api_root::graphql,
    ),
    components(schemas(GitHubError)),
    modifiers(&Aliases, &SecuritySchemes, &ErrorResponses),
    tags(
        (name = "licensing", description = "GitHub's licensing endpoints, in GitHub's shape"),
        (name = "usage", description = "Usage uploads, cloud members and the usage history"),
        (name = "instances", description = "GHES instances: enrollment, Sync now, retirement"),
        (name = "people", description = "How accounts were merged into people"),
        (name = "tokens", description = "The enterprise's REST tokens"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
    ),
)]
pub struct ApiDoc;

/// GitHub's error body, which every error of the REST API has ([`ServiceError`]'s `IntoResponse`).
#[derive(Debug, Serialize, ToSchema)]
pub struct GitHubError {
    /// What was wrong and what to do.
    message: String,
    /// A link to the REST API's documentation.
    #[schema(example = json!(DOCUMENTATION_URL))]
    documentation_url: String,
}

/// The `{enterprise}` path segment every enterprise route has; read by `AuthorizedEnterprise`, so only described
/// here.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(
    dead_code,
    reason = "describes path segments for the OpenAPI document; the handlers read them"
)]
pub(super) struct EnterprisePath {
    /// The enterprise's slug, or its numeric id (as GitHub accepts).
    enterprise: String,
}

/// Routes of `rest::routes()` that serve a documented path under a prefix (GitHub's `/api/v3` base path, say) are
/// the same handlers, so they get the same operations, each operation id prefixed so that ids stay unique.
struct Aliases;

impl Modify for Aliases {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        add_aliases(openapi, &super::route_paths());
    }
}

fn add_aliases(openapi: &mut utoipa::openapi::OpenApi, routed: &[String]) {
    for route in routed.iter().map(String::as_str) {
        if openapi.paths.paths.contains_key(route) {
            continue;
        }
        let original = openapi.paths.paths.iter().find_map(|(documented, item)| {
            // `/api/v3` without its final slash is the API root too (`gh` asks for both).
            let prefix = if documented == "/" && route == super::API_V3_PREFIX {
                route
            } else {
                route.strip_suffix(documented.as_str())?
            };
            (prefix.starts_with('/') && !prefix.ends_with('/')).then(|| (prefix, item.clone()))
        });
        let Some((prefix, mut item)) = original else {
            continue;
        };
        let mut id_prefix = prefix.trim_matches('/').replace(['/', '.', '-'], "_");
        if !route.ends_with('/') && item.get.is_some() && prefix == route {
            // The slashless root beside `/api/v3/`: operation ids must be unique.
            id_prefix.push_str("_without_slash");
        }
        let operations = [
            item.get.as_mut(),
            item.put.as_mut(),
            item.post.as_mut(),
            item.delete.as_mut(),
            item.patch.as_mut(),
        ];
        for operation in operations.into_iter().flatten() {
            operation.operation_id = operation
                .operation_id
                .take()
                .map(|id| format!("{id_prefix}_{id}"));
        }
        openapi.paths.paths.insert(route.to_owned(), item);
    }
}

/// The security scheme of the enterprise routes.
const TOKEN_SCHEME: &str = "github_token";

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut bearer = Http::new(HttpAuthScheme::Bearer);
        bearer.description = Some(
            "An enterprise owner's REST token (`license-sync-aggregator token create`): \
             `Authorization: Bearer TOKEN`, or `Authorization: token TOKEN` as GitHub accepts. A `read` token may \
             make every GET; every other method needs the `admin` scope."
                .to_owned(),
        );
        components.add_security_scheme(TOKEN_SCHEME, SecurityScheme::Http(bearer));
        let mut metrics = Http::new(HttpAuthScheme::Bearer);
        metrics.description =
            Some("The aggregator's `metrics_token` setting, when it is set: `Authorization: Bearer TOKEN`".to_owned());
        components.add_security_scheme("metrics_token", SecurityScheme::Http(metrics));
    }
}

/// The error answers shared by the authenticated operations, each a response in `components` named here, with
/// its status from [`ErrorKind::http_status`]; `for_writes` ones apply to every method but GET.
const SHARED_ERRORS: [(ErrorKind, &str, &str, bool); 7] = [
    (
        ErrorKind::Unauthenticated,
        "Unauthorized",
        "Requires authentication, or Bad credentials: the token is missing, unknown, expired or revoked",
        false,
    ),
    (
        ErrorKind::PermissionDenied,
        "Forbidden",
        "The token has the `read` scope and this method needs `admin`",
        true,
    ),
    (
        ErrorKind::NotFound,
        "NotFound",
        "Not Found: no such enterprise, or the token belongs to another one",
        false,
    ),
    (
        ErrorKind::Throttled,
        "TooManyRequests",
        "Too many refused tokens from this address: retry after `Retry-After` seconds",
        false,
    ),
    (
        ErrorKind::Internal,
        "InternalError",
        "An internal error; the aggregator's log has its cause",
        false,
    ),
    (
        ErrorKind::Unavailable,
        "Unavailable",
        "The database is unreachable, or the request took longer than its timeout: retry later",
        false,
    ),
    (
        ErrorKind::StorageFull,
        "InsufficientStorage",
        "The database's disk is full: retry later",
        true,
    ),
];

struct ErrorResponses;

impl Modify for ErrorResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (kind, name, description, _) in SHARED_ERRORS {
            let mut response = ResponseBuilder::new().description(description).content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("GitHubError")))
                    .build(),
            );
            if kind == ErrorKind::Throttled {
                response = response.header(
                    "Retry-After",
                    HeaderBuilder::new()
                        .schema(ObjectBuilder::new().schema_type(Type::Integer))
                        .description(Some("Seconds to wait before the next attempt"))
                        .build(),
                );
            }
            components
                .responses
                .insert(name.to_owned(), response.into());
        }
        for (path, item) in &mut openapi.paths.paths {
            if !path.contains("{enterprise}") {
                continue;
            }
            let operations = [
                (HttpMethod::Get, item.get.as_mut()),
                (HttpMethod::Put, item.put.as_mut()),
                (HttpMethod::Post, item.post.as_mut()),
                (HttpMethod::Delete, item.delete.as_mut()),
                (HttpMethod::Patch, item.patch.as_mut()),
            ];
            for (method, operation) in operations {
                if let Some(operation) = operation {
                    operation.security = Some(vec![SecurityRequirement::new(
                        TOKEN_SCHEME,
                        Vec::<String>::new(),
                    )]);
                    add_shared_errors(operation, method != HttpMethod::Get);
                }
            }
        }
    }
}

/// Adds the shared errors an operation does not describe itself (a handler's own 404 says more than the shared
/// one, and is kept).
fn add_shared_errors(operation: &mut Operation, is_write: bool) {
    for (kind, name, _, for_writes) in SHARED_ERRORS {
        if for_writes && !is_write {
            continue;
        }
        operation
            .responses
            .responses
            .entry(kind.http_status().as_u16().to_string())
            .or_insert_with(|| RefOr::Ref(Ref::from_response_name(name)));
    }
}

/// The document as served: [`ApiDoc`]'s JSON, with rustdoc's link brackets taken out of the descriptions (which are
/// the doc comments of the handlers and types). On the text, so that the declared order of paths and fields stays
/// (a `serde_json::Value` would sort them); backticks appear in descriptions only.
pub fn document() -> Result<String, serde_json::Error> {
    ApiDoc::openapi()
        .to_json()
        .map(|json| json.replace("[`", "`").replace("`]", "`"))
}

/// The serialised document, built on first use; [`super::router`] forces it so that it is built at start.
pub(super) static DOCUMENT: LazyLock<Result<Bytes, String>> = LazyLock::new(|| {
    document()
        .map(Bytes::from)
        .map_err(|error| error.to_string())
});

/// This document: the OpenAPI 3.1 description of the REST API, for client generators and validators.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi_document",
    tag = "operations",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object),
    ),
)]
pub(super) async fn serve() -> ServiceResult<Response> {
    match &*DOCUMENT {
        Ok(document) => Ok((
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            document.clone(),
        )
            .into_response()),
        Err(error) => Err(ServiceError::internal(
            "serialising the OpenAPI document",
            error,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A route added to `rest::routes()` without an annotated handler in [`ApiDoc`] fails here, and so does a
    /// documented path that is not routed.
    #[test]
    fn every_route_is_in_the_document() {
        let document = ApiDoc::openapi();
        let routed = super::super::route_paths();
        let routed: Vec<&str> = routed.iter().map(String::as_str).collect();
        let undocumented: Vec<&str> = routed
            .iter()
            .copied()
            .filter(|path| !document.paths.paths.contains_key(*path))
            .collect();
        assert!(
            undocumented.is_empty(),
            "routes of rest::routes() missing from the OpenAPI document: {undocumented:?}; annotate each handler \
             with #[utoipa::path] and list it in ApiDoc's `paths(...)` (rest/openapi.rs)"
        );
        let unrouted: Vec<&String> = document
            .paths
            .paths
            .keys()
            .filter(|path| !routed.contains(&path.as_str()))
            .collect();
        assert!(
            unrouted.is_empty(),
            "documented paths that rest::routes() does not serve: {unrouted:?}"
        );
    }

    #[test]
    fn a_route_serving_a_documented_path_under_a_prefix_is_documented_as_it() {
        let mut openapi = ApiDoc::openapi();
        let original = "/enterprises/{enterprise}/consumed-licenses";
        let alias = "/api/v3/enterprises/{enterprise}/consumed-licenses";
        add_aliases(
            &mut openapi,
            &[original, alias, "/api/v3/unknown", "/api/v3"].map(String::from),
        );
        let paths = &openapi.paths.paths;
        let operation = |path: &str| {
            paths
                .get(path)
                .and_then(|item| item.get.clone())
                .expect("GET")
        };
        assert_eq!(
            operation(alias).operation_id.as_deref(),
            Some("api_v3_consumed_licenses")
        );
        assert!(operation(alias).responses == operation(original).responses);
        assert!(!paths.contains_key("/api/v3/unknown"));
    }

    /// The bounds written as literals in the annotations are the code's.
    #[test]
    fn documented_bounds_are_the_codes() {
        let document: serde_json::Value =
            serde_json::from_str(&document().expect("serialises")).expect("JSON");
        let hours = &document["components"]["schemas"]["EnrollmentTokenBody"]["properties"]["expires_in_hours"];
        assert_eq!(
            hours["maximum"],
            serde_json::json!(crate::enrollment::MAX_ENROLLMENT_TOKEN_HOURS)
        );
    }

    #[test]
    fn descriptions_have_no_rustdoc_links() {
        let text = document().expect("serialises");
        assert!(
            !text.contains("[`"),
            "a rustdoc link is left in the document"
        );
    }

    #[test]
    fn enterprise_operations_need_the_token_and_list_the_shared_errors() {
        let document: serde_json::Value =
            serde_json::from_str(&document().expect("serialises")).expect("JSON");
        assert_eq!(document["openapi"], "3.1.0");
        let paths = document["paths"].as_object().expect("paths");
        for (path, item) in paths {
            for (method, operation) in item.as_object().expect("path item") {
                let responses = operation["responses"].as_object().expect("responses");
                let statuses: Vec<&str> = responses.keys().map(String::as_str).collect();
                if !path.contains("{enterprise}") {
                    assert!(
                        operation.get("security").is_none() || path == "/metrics",
                        "{method} {path}"
                    );
                    continue;
                }
                assert_eq!(
                    operation["security"],
                    serde_json::json!([{ TOKEN_SCHEME: [] }]),
                    "{method} {path}"
                );
                for status in ["401", "404", "429", "500", "503"] {
                    assert!(statuses.contains(&status), "{method} {path}: {statuses:?}");
                }
                let is_write = method != "get";
                for status in ["403", "507"] {
                    assert_eq!(
                        statuses.contains(&status),
                        is_write,
                        "{method} {path}: {statuses:?}"
                    );
                }
            }
        }
    }
}
