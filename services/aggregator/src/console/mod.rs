//! The owner's web console at `/console/` on the HTTP port: server-rendered HTML (maud, checked at compile time),
//! one CSS and one small JS file embedded in the binary, no CDN; every page reads without JS. It is a front end of
//! the same code the REST API runs (the merged view, the sync status, "Sync now", the upload path, explanations),
//! never a copy of it. Invariants: a session is opaque and server-side, stored only as a hash (`session`); every
//! state-changing request (POST) carries the session's CSRF token, checked in constant time; a session of one
//! enterprise gets 404 on another's pages, as the API answers; errors are HTML pages with the status of
//! [`ServiceError`]'s table. The routes sit in the REST router, so they share its metrics (labelled by route
//! template), timeouts and request log (path only, never a query string).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{MethodRouter, get, post};
use maud::{DOCTYPE, Markup, html};

use crate::app::App;
use crate::config::AggregatorConfig;
use crate::error::{ServiceError, ServiceResult};

mod chart;
mod pages;
mod session;

use session::Signed;
pub use session::{
    DEFAULT_LINK_MINUTES, IssuedConsoleLink, MAX_LINK_MINUTES, SESSION_COOKIE, issue_console_link,
};

const CSS: &str = include_str!("console.css");
const JS: &str = include_str!("console.js");

/// Largest body of a console form other than the upload: a CSRF token and a few fields.
const FORM_BODY_BYTES: usize = 64 * 1024;
/// Room for the multipart framing and the CSRF field around an upload of `max_upload_bytes`.
const MULTIPART_OVERHEAD_BYTES: usize = 64 * 1024;

/// The console's routes, for the REST router to serve (see `rest::router`). `upload_timeout` is the REST upload's.
pub(crate) fn routes(
    app: &Arc<App>,
    upload_timeout: (Duration, &'static str),
) -> Vec<(&'static str, MethodRouter<Arc<App>>)> {
    let config: &AggregatorConfig = &app.config;
    let form_limit = || DefaultBodyLimit::max(FORM_BODY_BYTES);
    let pages = vec![
        ("/console", get(|| async { Redirect::to("/console/") })),
        ("/console/", get(session::home)),
        ("/console/assets/console.css", get(css)),
        ("/console/assets/console.js", get(js)),
        (
            "/console/sign-in",
            get(session::sign_in_page)
                .post(session::sign_in)
                .layer(form_limit()),
        ),
        ("/console/sign-in/link", get(session::sign_in_with_link)),
        (
            "/console/sign-out",
            post(session::sign_out).layer(form_limit()),
        ),
        ("/console/{enterprise}/", get(pages::overview)),
        ("/console/{enterprise}/instances", get(pages::instances)),
        (
            "/console/{enterprise}/instances/{server_id}/sync-now",
            post(pages::sync_now).layer(form_limit()),
        ),
        (
            "/console/{enterprise}/instances/{server_id}/sync-requests/{request_id}",
            get(pages::sync_request_state),
        ),
        (
            "/console/{enterprise}/instances/{server_id}/retire",
            get(pages::retire_page)
                .post(pages::retire)
                .layer(form_limit()),
        ),
        (
            "/console/{enterprise}/enrollment-tokens",
            post(pages::create_enrollment_token).layer(form_limit()),
        ),
        ("/console/{enterprise}/people", get(pages::people)),
        (
            "/console/{enterprise}/people/{person_id}",
            get(pages::person),
        ),
        ("/console/{enterprise}/compare", get(pages::compare)),
        ("/console/{enterprise}/duplicates", get(pages::duplicates)),
        (
            "/console/{enterprise}/upload",
            get(pages::upload_page)
                .post(pages::upload)
                .layer(DefaultBodyLimit::max(
                    config
                        .max_upload_bytes
                        .saturating_add(MULTIPART_OVERHEAD_BYTES),
                ))
                .layer(crate::rest::timeout_layer(upload_timeout)),
        ),
        ("/console/{enterprise}/downloads", get(pages::downloads)),
        (
            "/console/{enterprise}/downloads/consumed-licenses.csv",
            get(pages::consumed_licenses_csv),
        ),
    ];
    pages
        .into_iter()
        .map(|(path, methods)| {
            let navigation = axum::middleware::from_fn_with_state(Arc::clone(app), with_navigation);
            (path, methods.layer(navigation))
        })
        .collect()
}

/// Marks a response as a console error page, with its error, so that [`with_navigation`] can draw it again with
/// the navigation.
#[derive(Debug, Clone)]
struct ErrorPage(ServiceError);

/// Gives a console error page the navigation bar when its request has a live session, so that a refusal (403) or a
/// missing page (404) is not a dead end. Errors are answered where the session is not at hand (an extractor's
/// rejection, a handler's `?`), hence here, after the fact; the session is looked up again only for error pages.
async fn with_navigation(
    State(app): State<Arc<App>>,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    let mut cookies = HeaderMap::new();
    for value in request.headers().get_all(header::COOKIE) {
        cookies.append(header::COOKIE, value.clone());
    }
    let response = next.run(request).await;
    signed_error_page(&app, &cookies, response).await
}

async fn signed_error_page(app: &App, cookies: &HeaderMap, response: Response) -> Response {
    let Some(ErrorPage(error)) = response.extensions().get::<ErrorPage>().cloned() else {
        return response;
    };
    // No session (or the store failing to say): the page as it was, without the navigation.
    let Ok(signed) = session::current_session(app, cookies).await else {
        return response;
    };
    let (parts, _) = response.into_parts();
    let markup = error_markup(parts.status, &error, Some(&signed));
    Response::from_parts(parts, axum::body::Body::from(markup.into_string()))
}

/// `message` as a sentence: a capital first letter and a full stop, as GitHub's "Bad credentials" has neither.
pub(crate) fn sentence(message: &str) -> String {
    let message = message.trim();
    let mut chars = message.chars();
    let mut shown: String = match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    };
    if !shown.is_empty() && !shown.ends_with(['.', '!', '?']) {
        shown.push('.');
    }
    shown
}

/// An error page: the status, the error's message and the way on (the navigation when `signed`).
fn error_markup(status: StatusCode, error: &ServiceError, signed: Option<&Signed>) -> Markup {
    let title = status.canonical_reason().unwrap_or("Error");
    layout(
        title,
        signed.map(|signed| (signed, None)),
        html! {
            h1 { (status.as_u16()) " " (title) }
            p #error-message role="alert" { (sentence(&error.message)) }
            @match signed {
                Some(signed) => p { a href=(enterprise_path(signed, "")) { "Back to the overview" } },
                None => p { a href="/console/" { "Back to the console" } },
            }
        },
    )
}

/// `GET /`: browsers (an `Accept` with `text/html`) go to the console; API clients keep the JSON 404.
/// Whether the client is a browser (it accepts HTML): at `/`, an owner looking for the console.
pub(crate) fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|accept| accept.contains("text/html"))
}

/// The answer to a path no route matched: an HTML page under `/console`, the API's JSON 404 elsewhere.
pub(crate) async fn fallback(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let path = uri.path();
    // `/console/acme` is the overview without its slash: typed by hand, so sent on.
    if let Some(enterprise) = path.strip_prefix("/console/")
        && !enterprise.is_empty()
        && enterprise
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Redirect::to(&format!("/console/{enterprise}/")).into_response();
    }
    if path.starts_with("/console/") {
        let page = ConsoleError(ServiceError::not_found(
            "there is no console page here; start from the overview (/console/)",
        ))
        .into_response();
        signed_error_page(&app, &headers, page).await
    } else {
        ServiceError::not_found("Not Found").into_response()
    }
}

async fn css() -> Response {
    asset(CSS, "text/css; charset=utf-8")
}

async fn js() -> Response {
    asset(JS, "text/javascript; charset=utf-8")
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            // Embedded in the binary: a new release may change it, so browsers keep it only a few minutes.
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("max-age=300"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

/// A console page's answer: HTML with the headers every page carries. Pages hold an enterprise's people (and a
/// shown-once token), so nothing is cached; no page may be framed, and only the console's own scripts and styles run.
pub(crate) fn html_response(status: StatusCode, markup: Markup) -> Response {
    let mut response = (status, markup).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // The sign-in link carries its token in the query: no other site may see it in a Referer.
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// A [`ServiceError`] answered as an HTML page, with the status of the error's table.
#[derive(Debug)]
pub(crate) struct ConsoleError(pub ServiceError);

impl From<ServiceError> for ConsoleError {
    fn from(error: ServiceError) -> Self {
        ConsoleError(error)
    }
}

pub(crate) type ConsoleResult<T> = Result<T, ConsoleError>;

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        let status = self.0.kind.http_status();
        let markup = error_markup(status, &self.0, None);
        let mut response = html_response(status, markup);
        if let Some(wait) = self.0.retry_after
            && let Ok(value) = HeaderValue::from_str(&wait.as_secs().max(1).to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response.extensions_mut().insert(ErrorPage(self.0));
        response
    }
}

/// The six pages of the navigation, in its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nav {
    Overview,
    Instances,
    People,
    Duplicates,
    Upload,
    Downloads,
}

impl Nav {
    const ALL: [Nav; 6] = [
        Nav::Overview,
        Nav::Instances,
        Nav::People,
        Nav::Duplicates,
        Nav::Upload,
        Nav::Downloads,
    ];

    fn label(self) -> &'static str {
        match self {
            Nav::Overview => "Overview",
            Nav::Instances => "Instances",
            Nav::People => "People",
            Nav::Duplicates => "Likely duplicates",
            Nav::Upload => "Add server usage",
            Nav::Downloads => "Downloads",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Nav::Overview => "",
            Nav::Instances => "instances",
            Nav::People => "people",
            Nav::Duplicates => "duplicates",
            Nav::Upload => "upload",
            Nav::Downloads => "downloads",
        }
    }
}

/// A whole page: the navigation (with the current page, if it is one of them) and sign-out form when signed in
/// (`signed`), then `body` as the page's `main`.
pub(crate) fn layout(title: &str, signed: Option<(&Signed, Option<Nav>)>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some((signed, _)) = signed {
                    meta name="csrf-token" content=(signed.csrf_token);
                }
                title { (title) " · license-sync console" }
                link rel="stylesheet" href="/console/assets/console.css";
                script src="/console/assets/console.js" defer {}
            }
            body {
                a.skip-link href="#main" { "Skip to content" }
                @if let Some((signed, current)) = signed {
                    header.site-header {
                        p.brand { "license-sync · " (signed.enterprise.name) }
                        nav #console-nav aria-label="Console pages" {
                            ul {
                                @for item in Nav::ALL {
                                    li {
                                        a href=(format!("/console/{}/{}", signed.enterprise.slug, item.path()))
                                            aria-current=[(Some(item) == current).then_some("page")] {
                                            (item.label())
                                        }
                                    }
                                }
                            }
                        }
                        form #sign-out method="post" action="/console/sign-out" {
                            (csrf_field(signed))
                            button #sign-out-submit type="submit" { "Sign out" }
                        }
                    }
                }
                main #main {
                    @if let Some((signed, _)) = signed
                        && signed.scope == crate::store::TokenScope::Read {
                        p #read-only-notice.notice {
                            "You signed in with a read token: you can look at everything, but changes are refused."
                        }
                    }
                    (body)
                }
            }
        }
    }
}

/// The hidden CSRF field every POST form carries.
pub(crate) fn csrf_field(signed: &Signed) -> Markup {
    html! { input type="hidden" name="csrf_token" value=(signed.csrf_token); }
}

/// `/console/{enterprise}/{rest}` of the signed-in enterprise.
pub(crate) fn enterprise_path(signed: &Signed, rest: &str) -> String {
    format!("/console/{}/{rest}", signed.enterprise.slug)
}

/// A query string of `pairs`, encoded.
pub(crate) fn query_string<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// A positive integer query parameter, or `default` when absent or empty.
pub(crate) fn positive_parameter(
    name: &str,
    value: Option<&str>,
    default: usize,
    max: usize,
) -> ServiceResult<usize> {
    match value {
        None | Some("") => Ok(default),
        Some(text) => match text.parse::<usize>() {
            Ok(number) if (1..=max).contains(&number) => Ok(number),
            _ => {
                let shown: String = text.chars().take(32).collect();
                Err(ServiceError::invalid(format!(
                    "`{name}` must be a whole number from 1 to {max}, got {shown:?}"
                )))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::sentence;

    #[test]
    fn messages_are_shown_as_sentences() {
        assert_eq!(sentence("Bad credentials"), "Bad credentials.");
        assert_eq!(
            sentence("there is no console page here; start from the overview (/console/)"),
            "There is no console page here; start from the overview (/console/)."
        );
        assert_eq!(sentence("Already one. "), "Already one.");
        assert_eq!(sentence(""), "");
    }
}
