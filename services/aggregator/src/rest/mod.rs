//! The REST API: GitHub-compatible licensing endpoints, plus what GitHub does not have (usage upload, members
//! import, instance retirement, explanations). Errors are GitHub-shaped: `{"message", "documentation_url"}` (the
//! `IntoResponse` of [`ServiceError`]). One module per resource; pagination (`per_page`/`page`, the `Link` header)
//! and body reading are here, shared by all of them. Every GitHub-shaped route is served twice: at the site root, as
//! api.github.com lays it out, and under [`API_V3_PREFIX`], as GitHub Enterprise Server does and as `gh` and other
//! GHES clients expect; links in answers keep the prefix, scheme and host the client used ([`RequestBase`]).

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::extract::{DefaultBodyLimit, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post, put};
use serde::Deserialize;
use tower_http::catch_panic::CatchPanicLayer;

use crate::app::App;
use crate::error::{ErrorKind, ServiceError, ServiceResult};

mod api_root;
mod api_tokens;
mod duplicates;
pub(crate) mod explanations;
pub(crate) mod history;
pub(crate) mod instances;
mod licenses;
mod members;
mod openapi;
pub(crate) mod status;
pub(crate) mod upload;

pub const MAX_PER_PAGE: usize = 100;
/// Where GitHub Enterprise Server serves its REST API, and where `gh` looks for it on any host but github.com.
pub const API_V3_PREFIX: &str = "/api/v3";
pub const DEFAULT_PER_PAGE: usize = 30;

/// Every route of the REST API with its handlers, in one table that both the router and the tests read (the scope
/// test walks every path and method of it, so no route can be left out of it; so does the OpenAPI document's
/// drift test, so a new route's handler needs its `#[utoipa::path]` and a line in `openapi::ApiDoc`).
fn routes(upload_timeout: (Duration, &'static str)) -> Vec<(&'static str, MethodRouter<Arc<App>>)> {
    vec![
        ("/healthz", get(healthz)),
        ("/readyz", get(readyz)),
        // Behind `metrics_token` when it is set; otherwise open, like the health checks (restrict it at the
        // network level then).
        ("/metrics", get(crate::scrape::serve)),
        // What a GitHub client asks before anything else (`gh auth status`): the API root and who the token is.
        ("/", get(api_root::api_root)),
        ("/user", get(api_root::current_user)),
        // GraphQL at api.github.com's and at GHES's path; only `viewer { login }` is answered (see `api_root`).
        ("/graphql", post(api_root::graphql)),
        ("/api/graphql", post(api_root::graphql)),
        ("/openapi.json", get(openapi::serve)),
        (
            "/enterprises/{enterprise}/consumed-licenses",
            get(licenses::consumed_licenses),
        ),
        (
            "/enterprises/{enterprise}/consumed-licenses.csv",
            get(licenses::consumed_licenses_csv),
        ),
        (
            "/enterprises/{enterprise}/license-sync-status",
            get(status::license_sync_status),
        ),
        (
            "/enterprises/{enterprise}/server-usage",
            post(upload::upload_usage).layer(timeout_layer(upload_timeout)),
        ),
        (
            "/enterprises/{enterprise}/usage-file-key",
            get(upload::usage_file_key),
        ),
        (
            "/enterprises/{enterprise}/cloud-members",
            put(members::import_cloud_members).layer(timeout_layer(upload_timeout)),
        ),
        (
            "/enterprises/{enterprise}/instances/{server_id}",
            delete(instances::retire_instance),
        ),
        (
            "/enterprises/{enterprise}/enrollment-tokens",
            post(instances::create_enrollment_token),
        ),
        (
            "/enterprises/{enterprise}/instances/{server_id}/sync-now",
            post(instances::sync_now),
        ),
        (
            "/enterprises/{enterprise}/instances/{server_id}/sync-requests/{request_id}",
            get(instances::sync_request),
        ),
        (
            "/enterprises/{enterprise}/license-explanations",
            get(explanations::license_explanation),
        ),
        (
            "/enterprises/{enterprise}/usage-history",
            get(history::usage_history),
        ),
        (
            "/enterprises/{enterprise}/likely-duplicates",
            get(duplicates::likely_duplicates),
        ),
        (
            "/enterprises/{enterprise}/api-tokens",
            get(api_tokens::list_api_tokens),
        ),
    ]
}

/// The paths a route of [`routes`] is served at: its own, and its alias under [`API_V3_PREFIX`] for the GitHub API
/// routes. Probes, metrics and GraphQL (which GHES serves at `/api/graphql`, not under `/api/v3`) have no alias.
fn served_paths(path: &'static str) -> Vec<String> {
    match path {
        "/healthz" | "/readyz" | "/metrics" | "/graphql" | "/api/graphql" => vec![path.to_owned()],
        // GHES answers its API root with and without the final slash.
        "/" => vec![
            path.to_owned(),
            API_V3_PREFIX.to_owned(),
            format!("{API_V3_PREFIX}/"),
        ],
        _ => vec![path.to_owned(), format!("{API_V3_PREFIX}{path}")],
    }
}

/// The route template a metric is labelled with: the unprefixed one for a route served under [`API_V3_PREFIX`] or
/// GHES's GraphQL path, so that the label set stays that of [`routes`] and dashboards and alerts written for a
/// route count its traffic whichever path a client used.
pub fn metric_route(template: &str) -> &str {
    if template == "/api/graphql" {
        return "/graphql";
    }
    match template.strip_prefix(API_V3_PREFIX) {
        Some("") => "/",
        Some(rest) if rest.starts_with('/') => rest,
        _ => template,
    }
}

/// Every path template the router serves (`/enterprises/{enterprise}/…` and its `/api/v3` alias, …), for tests
/// that must cover them all.
pub fn route_paths() -> Vec<String> {
    routes((Duration::from_secs(1), "http_upload_timeout_secs"))
        .into_iter()
        .flat_map(|(path, _)| served_paths(path))
        .collect()
}

pub use openapi::{ApiDoc, GitHubError, document as openapi_document};

pub fn router(app: Arc<App>) -> Router {
    // Built now rather than at the first request: a start that succeeds serves the document.
    std::sync::LazyLock::force(&openapi::DOCUMENT);
    let request_timeout = (
        Duration::from_secs(app.config.http_request_timeout_secs),
        "http_request_timeout_secs",
    );
    let upload_timeout = (
        Duration::from_secs(app.config.http_upload_timeout_secs),
        "http_upload_timeout_secs",
    );
    // The web console's pages ride on the same router, so they share its metrics, timeouts and request log.
    routes(upload_timeout)
        .into_iter()
        .chain(crate::console::routes(&app, upload_timeout))
        .fold(Router::new(), |router, (path, methods)| {
            served_paths(path)
                .iter()
                .fold(router, |router, path| router.route(path, methods.clone()))
        })
        // Every other route: the body uploads above keep their own, longer limit.
        .route_layer(timeout_layer(request_timeout))
        // Bodies are read with our own limit so that an oversized upload gets a GitHub-style error.
        .layer(DefaultBodyLimit::disable())
        // The API's JSON 404, or an HTML page under `/console/`.
        .fallback(crate::console::fallback)
        // Inside the metrics layer, so that a panic is counted as the 500 it answers.
        .layer(catch_panic_layer())
        // Last, so that it sees every route and the fallback (whose requests are labelled `unmatched`).
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&app.metrics),
            crate::metrics::track_http,
        ))
        .with_state(app)
}

/// Ends a request that takes longer than `limit` with a GitHub-style 503 naming the setting; dropping the handler
/// rolls back what it had not committed.
pub(crate) fn timeout_layer(
    (limit, key): (Duration, &'static str),
) -> axum::middleware::FromFnLayer<
    impl Fn(Request, Next) -> futures::future::BoxFuture<'static, Response> + Clone,
    (),
    (Request,),
> {
    axum::middleware::from_fn(move |request: Request, next: Next| {
        Box::pin(async move {
            match tokio::time::timeout(limit, next.run(request)).await {
                Ok(response) => response,
                Err(_) => ServiceError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "the request took longer than {} s ({key}); retry later, or ask for less",
                        limit.as_secs()
                    ),
                )
                .into_response(),
            }
        }) as futures::future::BoxFuture<'static, Response>
    })
}

/// Turns a panic in a handler into a GitHub-style 500. The panic's message is logged (bounded: it may quote
/// input), never sent.
fn catch_panic_layer() -> CatchPanicLayer<fn(Box<dyn Any + Send + 'static>) -> Response> {
    fn answer(panic: Box<dyn Any + Send + 'static>) -> Response {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        let message: String = message.chars().take(200).collect();
        tracing::error!(panic = %message, "a REST handler panicked; answered 500");
        ServiceError::new(
            ErrorKind::Internal,
            "internal error while answering this request; see the aggregator's log",
        )
        .into_response()
    }
    CatchPanicLayer::custom(answer)
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "The process answers", content_type = "text/plain", body = String, example = "ok")),
)]
async fn healthz() -> &'static str {
    "ok"
}

/// Ready means the store can read and write: a store that can no longer write (full disk) answers 503, so that
/// a load balancer sends agents elsewhere and an operator sees why, and 200 again once a write goes through,
/// without a restart.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "The store reads and writes", content_type = "text/plain", body = String, example = "ready"),
        (status = 503, description = "Not ready: the store cannot read or write (unreachable, disk full); the message says which", body = openapi::GitHubError),
    ),
)]
async fn readyz(State(app): State<Arc<App>>) -> ServiceResult<&'static str> {
    let not_ready = |error: crate::store::StoreError| {
        let error = ServiceError::from(error);
        ServiceError::new(
            ErrorKind::Unavailable,
            format!("not ready: {}", error.message),
        )
    };
    app.store.ping().await.map_err(not_ready)?;
    app.store.probe_write().await.map_err(not_ready)?;
    Ok("ready")
}

/// `Query`, refused as the rest of the API refuses bad input: a GitHub-shaped 422, where axum's own rejection (a
/// parameter given twice, say) is a plain-text 400 that no client of this API expects (found by schemathesis
/// against the OpenAPI document). Extract it after `AuthorizedEnterprise`, so that a caller without a token gets the
/// 401 first.
pub(super) struct GitHubQuery<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for GitHubQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ServiceError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(GitHubQuery(value)),
            Err(rejection) => {
                // serde_urlencoded names the parameter (ours), not its value; bounded all the same.
                let problem: String = rejection.body_text().chars().take(120).collect();
                Err(ServiceError::invalid(format!(
                    "the query string cannot be read ({problem}): give each parameter at most once"
                )))
            }
        }
    }
}

/// GitHub's pagination parameters. Read as text so that a bad value gets a GitHub-style 422 naming it (see
/// [`parse_page`]), described as the integers they must be.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct PageQuery {
    /// Results per page; above 100 is served as 100.
    #[param(value_type = Option<u64>, minimum = 1, default = json!(DEFAULT_PER_PAGE))]
    pub per_page: Option<String>,
    /// The page number; past the last page, an empty page.
    #[param(value_type = Option<u64>, minimum = 1, default = 1)]
    pub page: Option<String>,
}

/// Page size and number, validated as GitHub does: `per_page` above 100 is served as 100.
pub(super) fn parse_page(query: &PageQuery) -> ServiceResult<(usize, usize)> {
    let parse = |name: &str, value: &Option<String>, default: usize| -> ServiceResult<usize> {
        match value.as_deref() {
            None | Some("") => Ok(default),
            Some(text) => match text.parse::<usize>() {
                Ok(number) if number >= 1 => Ok(number),
                _ => Err(ServiceError::invalid(format!(
                    "`{name}` must be a positive integer, got {text:?}"
                ))),
            },
        }
    };
    let per_page = parse("per_page", &query.per_page, DEFAULT_PER_PAGE)?.min(MAX_PER_PAGE);
    let page = parse("page", &query.page, 1)?;
    Ok((per_page, page))
}

/// Where the client reached the API, for the URLs of an answer (`Link` headers, `url` fields): scheme, host and
/// the [`API_V3_PREFIX`] when the request used it, without a final `/` (`https://licenses.example.com/api/v3`).
/// See [`base_url`] for the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RequestBase(pub String);

impl FromRequestParts<Arc<App>> for RequestBase {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        Ok(RequestBase(base_url(
            app.config.public_url.as_deref(),
            app.config.tls_cert_path.is_some(),
            &parts.headers,
            &parts.uri,
        )))
    }
}

/// The base URL of an answer's links. The prefix is [`API_V3_PREFIX`] when the request's path is under it. Before it:
/// `public_url` when configured (it wins over anything a request says); otherwise the scheme of
/// `X-Forwarded-Proto` (`http` or `https`), else `https` when the aggregator serves TLS itself and `http` when not,
/// and the host of `X-Forwarded-Host`, else `Host`, else the HTTP/2 `:authority`, else `localhost`. Forwarded
/// values are read from their first element (a proxy chain appends), and a host that is not a plain
/// `name[:port]` is ignored, so that a header cannot put anything but a host into a `Link` URL.
pub(super) fn base_url(
    public_url: Option<&str>,
    serves_tls: bool,
    headers: &HeaderMap,
    uri: &Uri,
) -> String {
    let path = uri.path();
    let prefix = if path == API_V3_PREFIX
        || path
            .strip_prefix(API_V3_PREFIX)
            .is_some_and(|rest| rest.starts_with('/'))
    {
        API_V3_PREFIX
    } else {
        ""
    };
    if let Some(url) = public_url {
        return format!("{}{prefix}", url.trim_end_matches('/'));
    }
    let first = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split(',').next())
            .map(str::trim)
    };
    let scheme = match first("x-forwarded-proto") {
        Some(proto) if proto.eq_ignore_ascii_case("https") => "https",
        Some(proto) if proto.eq_ignore_ascii_case("http") => "http",
        _ if serves_tls => "https",
        _ => "http",
    };
    let host = first("x-forwarded-host")
        .filter(|host| is_plain_host(host))
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|value| value.to_str().ok())
                .filter(|host| is_plain_host(host))
        })
        .or_else(|| {
            uri.authority()
                .map(|authority| authority.as_str())
                .filter(|host| is_plain_host(host))
        })
        .unwrap_or("localhost");
    format!("{scheme}://{host}{prefix}")
}

/// A host name or address with an optional port (`licenses.example.com`, `127.0.0.1:8443`, `[::1]:8443`): nothing
/// that could end a URL or a `Link` value early (`>`, `,`, `;`, spaces) or add a user or path to it.
fn is_plain_host(host: &str) -> bool {
    // A 253-character DNS name, `:` and a 5-digit port.
    const MAX_HOST_BYTES: usize = 253 + 6;
    !host.is_empty()
        && host.len() <= MAX_HOST_BYTES
        && host
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b".-_:[]".contains(&byte))
}

/// RFC 8288 `Link` header with the relations GitHub sends: `prev`/`first` after page 1, `next`/`last` before the
/// last page.
fn link_header(url: &str, per_page: usize, page: usize, last_page: usize) -> Option<String> {
    let link =
        |page: usize, rel: &str| format!("<{url}?per_page={per_page}&page={page}>; rel=\"{rel}\"");
    let mut links = Vec::new();
    if page > 1 {
        links.push(link(page.saturating_sub(1).clamp(1, last_page), "prev"));
    }
    if page < last_page {
        links.push(link(page + 1, "next"));
        links.push(link(last_page, "last"));
    }
    if page > 1 {
        links.push(link(1, "first"));
    }
    (!links.is_empty()).then(|| links.join(", "))
}
/// Adds the `Link` header of page `page` of the paginated resource at `path` (from the API root).
fn add_link_header(
    response: &mut Response,
    base: &RequestBase,
    path: &str,
    (per_page, page): (usize, usize),
    last_page: usize,
) {
    let url = format!("{}{path}", base.0);
    if let Some(link) = link_header(&url, per_page, page, last_page)
        && let Ok(value) = HeaderValue::from_str(&link)
    {
        response.headers_mut().insert(header::LINK, value);
    }
}

pub(crate) fn overage(consumed: u64, purchased: i64) -> u64 {
    consumed.saturating_sub(u64::try_from(purchased).unwrap_or(0))
}
/// Reads a request body up to the configured limit.
pub(super) async fn read_body(app: &App, body: Body) -> ServiceResult<Bytes> {
    read_body_up_to(body, app.config.max_upload_bytes, "max_upload_bytes").await
}

/// Reads a request body up to `limit` bytes; `limit_name` says which limit in the error.
pub(crate) async fn read_body_up_to(
    body: Body,
    limit: usize,
    limit_name: &str,
) -> ServiceResult<Bytes> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ServiceError::new(
            ErrorKind::ResourceExhausted,
            format!("the request body is over the {limit}-byte limit ({limit_name})"),
        )
    })
}

/// Parses JSON without echoing input values in the error (they may hold email addresses).
pub(super) fn parse_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
) -> ServiceResult<T> {
    serde_json::from_slice(bytes).map_err(|error| json_error(&error, what))
}

/// The 422 for a body that did not parse as `what`: the kind of problem and its position, never the input.
pub(super) fn json_error(error: &serde_json::Error, what: &str) -> ServiceError {
    let problem = match error.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            "is not valid JSON"
        }
        serde_json::error::Category::Data => "does not have the expected fields and types",
        serde_json::error::Category::Io => "could not be read",
    };
    ServiceError::invalid(format!(
        "the body {problem} (line {}, column {}): expected {what}",
        error.line(),
        error.column()
    ))
}
#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_answers_a_github_style_500_without_the_panic_message() {
        use tower::ServiceExt;
        let router: Router = Router::new()
            .route(
                "/boom",
                get(|| async {
                    let secret = "someone@example.com";
                    panic!("handler failed for {secret}");
                    #[allow(unreachable_code)]
                    "never"
                }),
            )
            .layer(catch_panic_layer());
        let request = axum::http::Request::get("/boom")
            .body(Body::empty())
            .expect("request");
        let response = router.oneshot(request).await.expect("answered");
        assert_eq!(response.status(), 500);
        let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
            .await
            .expect("body");
        let body: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        let message = body["message"].as_str().expect("message");
        assert!(message.contains("internal error"), "{body}");
        assert!(!message.contains("example.com"), "no panic message: {body}");
        assert!(body["documentation_url"].is_string(), "{body}");
    }

    #[test]
    fn link_header_has_github_relations() {
        let url = "http://h/enterprises/e/consumed-licenses";
        assert_eq!(link_header(url, 10, 1, 1), None);
        let first = link_header(url, 10, 1, 3).expect("links");
        assert_eq!(
            first,
            "<http://h/enterprises/e/consumed-licenses?per_page=10&page=2>; rel=\"next\", \
             <http://h/enterprises/e/consumed-licenses?per_page=10&page=3>; rel=\"last\""
        );
        let middle = link_header(url, 10, 2, 3).expect("links");
        for rel in ["prev", "next", "last", "first"] {
            assert!(middle.contains(&format!("rel=\"{rel}\"")), "{middle}");
        }
        let last = link_header(url, 10, 3, 3).expect("links");
        assert!(
            last.contains("page=2>; rel=\"prev\"") && !last.contains("next"),
            "{last}"
        );
        // Past the end: prev points at the last page.
        let beyond = link_header(url, 10, 9, 3).expect("links");
        assert!(beyond.contains("page=3>; rel=\"prev\""), "{beyond}");
    }

    /// `base_url` of a request for `path` with `headers`, without `public_url`, on a plain-text port.
    fn base(path: &str, headers: &[(&str, &str)], public_url: Option<&str>, tls: bool) -> String {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(
                header::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        let uri: Uri = path.parse().expect("uri");
        base_url(public_url, tls, &map, &uri)
    }

    #[test]
    fn links_keep_the_request_prefix_and_host() {
        let host = [("host", "agg.test:8080")];
        assert_eq!(
            base("/enterprises/e/consumed-licenses", &host, None, false),
            "http://agg.test:8080"
        );
        assert_eq!(
            base(
                "/api/v3/enterprises/e/consumed-licenses?page=2",
                &host,
                None,
                false
            ),
            "http://agg.test:8080/api/v3"
        );
        assert_eq!(
            base("/api/v3", &host, None, false),
            "http://agg.test:8080/api/v3"
        );
        // Only the whole segment is the prefix.
        assert_eq!(
            base("/api/v30/x", &host, None, false),
            "http://agg.test:8080"
        );
        // The aggregator's own TLS makes the links https.
        assert_eq!(
            base("/api/v3/x", &host, None, true),
            "https://agg.test:8080/api/v3"
        );
        // No Host header (HTTP/2): the request's authority.
        assert_eq!(
            base("https://[::1]:8443/api/v3/x", &[], None, true),
            "https://[::1]:8443/api/v3"
        );
        assert_eq!(base("/x", &[], None, false), "http://localhost");
    }

    #[test]
    fn links_behind_a_proxy_use_its_forwarded_scheme_and_host() {
        let forwarded = [
            ("host", "10.0.0.5:8080"),
            ("x-forwarded-proto", "https, http"),
            ("x-forwarded-host", "licenses.example.com, 10.0.0.5:8080"),
        ];
        assert_eq!(
            base("/api/v3/x", &forwarded, None, false),
            "https://licenses.example.com/api/v3"
        );
        // A proxy terminating TLS in front of a TLS port may still say http.
        let plain = [("host", "h"), ("x-forwarded-proto", "HTTP")];
        assert_eq!(base("/x", &plain, None, true), "http://h");
        // Anything else in the scheme header is ignored.
        let odd = [("host", "h"), ("x-forwarded-proto", "gopher")];
        assert_eq!(base("/x", &odd, None, false), "http://h");
        // A forwarded host that could break out of the URL falls back to Host.
        for bad in ["a>; rel=\"next\"", "user@evil", "evil/path", " "] {
            let headers = [("host", "h"), ("x-forwarded-host", bad)];
            assert_eq!(base("/x", &headers, None, false), "http://h", "{bad:?}");
        }
    }

    #[test]
    fn public_url_wins_and_keeps_the_request_prefix() {
        let forwarded = [
            ("host", "h"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "proxy.test"),
        ];
        let public = Some("https://licenses.example.com/");
        assert_eq!(
            base("/x", &forwarded, public, false),
            "https://licenses.example.com"
        );
        assert_eq!(
            base("/api/v3/x", &forwarded, public, false),
            "https://licenses.example.com/api/v3"
        );
        // A public URL with a path (a path-routing proxy) keeps it.
        assert_eq!(
            base(
                "/api/v3/x",
                &[],
                Some("https://example.com/licenses"),
                false
            ),
            "https://example.com/licenses/api/v3"
        );
    }

    #[test]
    fn aliases_are_labelled_with_their_routes_own_template() {
        assert_eq!(
            metric_route("/api/v3/enterprises/{enterprise}/consumed-licenses"),
            "/enterprises/{enterprise}/consumed-licenses"
        );
        assert_eq!(metric_route("/api/v3"), "/");
        assert_eq!(metric_route("/api/v3/"), "/");
        assert_eq!(metric_route("/api/graphql"), "/graphql");
        assert_eq!(metric_route("/healthz"), "/healthz");
        // Every served path maps onto a template of the route table: the label set does not grow.
        let templates: Vec<&str> = routes((Duration::from_secs(1), "t"))
            .into_iter()
            .map(|(path, _)| path)
            .collect();
        for path in route_paths() {
            assert!(templates.contains(&metric_route(&path)), "{path}");
        }
    }

    #[test]
    fn page_parameters_are_validated_and_clamped() {
        let query = |per_page: Option<&str>, page: Option<&str>| PageQuery {
            per_page: per_page.map(str::to_owned),
            page: page.map(str::to_owned),
        };
        assert_eq!(parse_page(&query(None, None)).ok(), Some((30, 1)));
        assert_eq!(
            parse_page(&query(Some("500"), Some("2"))).ok(),
            Some((100, 2))
        );
        for bad in [
            query(Some("0"), None),
            query(Some("x"), None),
            query(None, Some("-1")),
        ] {
            let err = parse_page(&bad).expect_err("invalid");
            assert_eq!(err.kind, ErrorKind::InvalidArgument);
        }
    }
}
