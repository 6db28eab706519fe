//! The REST API: GitHub-compatible licensing endpoints, plus what GitHub does not have (usage upload, members
//! import, instance retirement, explanations). Errors are GitHub-shaped: `{"message", "documentation_url"}` (the
//! `IntoResponse` of [`ServiceError`]). One module per resource; pagination (`per_page`/`page`, the `Link` header)
//! and body reading are here, shared by all of them.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post, put};
use serde::Deserialize;
use tower_http::catch_panic::CatchPanicLayer;

use crate::app::App;
use crate::error::{ErrorKind, ServiceError, ServiceResult};

mod api_tokens;
mod duplicates;
pub(crate) mod explanations;
pub(crate) mod history;
pub(crate) mod instances;
mod licenses;
mod members;
pub(crate) mod page_json;
pub(crate) mod status;
pub(crate) mod upload;

pub const MAX_PER_PAGE: usize = 100;
pub const DEFAULT_PER_PAGE: usize = 30;

/// Every route of the REST API with its handlers, in one table that both the router and the tests read (the scope
/// test walks every path and method of it, so no route can be left out of it).
fn routes(upload_timeout: (Duration, &'static str)) -> Vec<(&'static str, MethodRouter<Arc<App>>)> {
    vec![
        ("/healthz", get(healthz)),
        ("/readyz", get(readyz)),
        // Behind `metrics_token` when it is set; otherwise open, like the health checks (restrict it at the
        // network level then).
        ("/metrics", get(crate::scrape::serve)),
        (
            "/enterprises/{enterprise}/consumed-licenses",
            get(licenses::consumed_licenses),
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

/// The path templates of every REST route (`/enterprises/{enterprise}/…`), for tests that must cover them all.
pub fn route_paths() -> Vec<&'static str> {
    routes((Duration::from_secs(1), "http_upload_timeout_secs"))
        .into_iter()
        .map(|(path, _)| path)
        .collect()
}

pub fn router(app: Arc<App>) -> Router {
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
        .chain(crate::console::routes(&app.config, upload_timeout))
        .fold(Router::new(), |router, (path, methods)| {
            router.route(path, methods)
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

async fn healthz() -> &'static str {
    "ok"
}

/// Ready means the store can read and write: a store that can no longer write (full disk) answers 503, so that
/// a load balancer sends agents elsewhere and an operator sees why, and 200 again once a write goes through,
/// without a restart.
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

#[derive(Debug, Deserialize)]
pub(super) struct PageQuery {
    pub per_page: Option<String>,
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

/// Base URL for `Link` headers: the configured public URL, else the request's `Host`.
pub(super) fn base_url(app: &App, headers: &HeaderMap) -> String {
    if let Some(url) = &app.config.public_url {
        return url.trim_end_matches('/').to_owned();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("localhost");
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|value| value.to_str().ok())
        .filter(|proto| *proto == "https")
        .unwrap_or("http");
    format!("{scheme}://{host}")
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
/// Adds the `Link` header of page `page` of the paginated resource at `path` (from the site root).
fn add_link_header(
    response: &mut Response,
    app: &App,
    headers: &HeaderMap,
    path: &str,
    (per_page, page): (usize, usize),
    last_page: usize,
) {
    let url = format!("{}{path}", base_url(app, headers));
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
