//! Console sessions: sign-in with a REST token or a one-time sign-in link, the session cookie, the CSRF token and
//! sign-out. A session id is random (`lsc_…`, 40 alphanumerics), sent only in an HttpOnly, SameSite=Strict cookie
//! on `Path=/console` (Secure under TLS or behind an HTTPS ingress), and stored only as its SHA-256, with the
//! enterprise, the scope of the token signed in with and its expiry: every replica accepts it, and sign-out deletes
//! it everywhere at once. The CSRF token is the SHA-256 of a domain tag and the session id: bound to the session,
//! derivable by every replica, and unlike the stored hash (a different digest), so a leaked database gives neither.

use std::sync::Arc;

use axum::extract::rejection::FormRejection;
use axum::extract::{FromRequestParts, RawPathParams, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Form, RequestPartsExt};
use maud::html;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use super::{ConsoleError, html_response, layout};
use crate::app::App;
use crate::auth::client_address;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::metrics::AuthSurface;
use crate::store::{DynStore, Enterprise, NewConsoleSession, TokenScope};
use crate::time_format::rfc3339;
use crate::tokens;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "license_sync_console";
/// Prefix of console session ids.
const SESSION_PREFIX: &str = "lsc_";
/// Prefix of one-time sign-in link tokens.
const LINK_PREFIX: &str = "lsl_";
/// Lifetime of a sign-in link when the operator gives none, and the longest allowed: it travels in a URL.
pub const DEFAULT_LINK_MINUTES: i64 = 15;
pub const MAX_LINK_MINUTES: i64 = 60;

/// A signed-in request: the session's enterprise, its scope and its CSRF token.
#[derive(Debug, Clone)]
pub struct Signed {
    pub enterprise: Enterprise,
    pub scope: TokenScope,
    pub csrf_token: String,
    session_sha256: String,
}

impl Signed {
    /// Refuses a change with a session whose token had the `read` scope.
    pub(crate) fn require_admin(&self) -> Result<(), ConsoleError> {
        if self.scope == TokenScope::Admin {
            return Ok(());
        }
        Err(ConsoleError(ServiceError::permission_denied(
            "you signed in with a `read` token, which may look but not change anything: sign out and sign in \
             with an `admin` token (`license-sync-aggregator token create --scope admin`)",
        )))
    }

    /// Checks a form's CSRF token against the session's, in constant time: 403 when it is missing or wrong.
    pub(crate) fn check_csrf(&self, presented: Option<&str>) -> Result<(), ConsoleError> {
        let matches = presented.is_some_and(|presented| {
            bool::from(presented.as_bytes().ct_eq(self.csrf_token.as_bytes()))
        });
        if matches { Ok(()) } else { Err(csrf_refusal()) }
    }
}

pub(crate) fn csrf_refusal() -> ConsoleError {
    ConsoleError(ServiceError::permission_denied(
        "this form's security token is missing or does not belong to your session (the page may be older than \
         your last sign-in): nothing was changed; reload the page and submit the form again",
    ))
}

fn csrf_token_of(session_id: &str) -> String {
    let mut digest = Sha256::new();
    digest.update(b"license-sync console csrf\0");
    digest.update(session_id.as_bytes());
    hex::encode(digest.finalize())
}

/// The session id of the request's cookie, if any.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|cookies| cookies.split(';'))
        .filter_map(|cookie| cookie.trim().split_once('='))
        .find_map(|(name, value)| (name == SESSION_COOKIE).then_some(value))
}

/// Whether the browser reached us over HTTPS: the aggregator's own TLS, or an ingress that says so.
fn served_over_https(app: &App, headers: &HeaderMap) -> bool {
    app.config.tls_cert_path.is_some()
        || headers
            .get("x-forwarded-proto")
            .and_then(|value| value.to_str().ok())
            .is_some_and(|proto| proto.eq_ignore_ascii_case("https"))
}

fn session_cookie_header(app: &App, headers: &HeaderMap, value: &str, max_age_secs: i64) -> String {
    let secure = if served_over_https(app, headers) {
        "; Secure"
    } else {
        ""
    };
    format!(
        "{SESSION_COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/console; Max-Age={max_age_secs}{secure}"
    )
}

/// The TCP peer's address (see [`client_address`]), for the failed-authentication limit.
pub(super) struct ClientAddress(Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddress(client_address(parts)))
    }
}

/// Why a request has no session, for its answer.
pub(super) enum NoSession {
    /// No cookie, or one the store does not know (expired, signed out, its token revoked).
    Missing,
    Error(ServiceError),
}

/// The request's live session, if any.
pub(super) async fn current_session(app: &App, headers: &HeaderMap) -> Result<Signed, NoSession> {
    let session_id = session_cookie(headers).ok_or(NoSession::Missing)?;
    let session_sha256 = tokens::sha256_hex(session_id);
    let session = app
        .store
        .console_session(&session_sha256, OffsetDateTime::now_utc())
        .await
        .map_err(|error| NoSession::Error(error.into()))?
        .ok_or(NoSession::Missing)?;
    Ok(Signed {
        enterprise: session.enterprise,
        scope: session.scope,
        csrf_token: csrf_token_of(session_id),
        session_sha256,
    })
}

/// A signed-in request whose `{enterprise}` path segment (when the route has one) is the session's enterprise.
/// Without a session a GET is sent to the sign-in page and anything else is refused (401); another enterprise's
/// page is 404, as the API answers, so that a session cannot discover enterprises.
impl FromRequestParts<Arc<App>> for Signed {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        let signed = match current_session(app, &parts.headers).await {
            Ok(signed) => signed,
            Err(NoSession::Error(error)) => return Err(ConsoleError(error).into_response()),
            Err(NoSession::Missing)
                if parts.method == Method::GET || parts.method == Method::HEAD =>
            {
                return Err(Redirect::to("/console/sign-in").into_response());
            }
            Err(NoSession::Missing) => {
                return Err(ConsoleError(ServiceError::unauthenticated(
                    "your console session has ended (signed out, expired, or its token was revoked): nothing \
                     was changed; sign in again",
                ))
                .into_response());
            }
        };
        let params = parts
            .extract::<RawPathParams>()
            .await
            .map_err(IntoResponse::into_response)?;
        let segment = params
            .iter()
            .find_map(|(name, value)| (name == "enterprise").then_some(value));
        if let Some(segment) = segment
            && segment != signed.enterprise.slug
            && segment != signed.enterprise.id.to_string()
        {
            return Err(ConsoleError(ServiceError::not_found(
                "there is no such enterprise in your session: the console shows the enterprise you signed in to",
            ))
            .into_response());
        }
        Ok(signed)
    }
}

/// `GET /console/`: the overview when signed in, else the sign-in page.
pub(super) async fn home(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    match current_session(&app, &headers).await {
        Ok(signed) => {
            Redirect::to(&format!("/console/{}/", signed.enterprise.slug)).into_response()
        }
        Err(NoSession::Missing) => Redirect::to("/console/sign-in").into_response(),
        Err(NoSession::Error(error)) => ConsoleError(error).into_response(),
    }
}

/// Why a sign-in was refused (`message`, a sentence), and what to do about it when the message does not say.
struct SignInRefusal<'m> {
    message: &'m str,
    hint: Option<&'static str>,
}

fn sign_in_markup(refusal: Option<SignInRefusal<'_>>) -> maud::Markup {
    layout(
        "Sign in",
        None,
        html! {
            h1 { "Sign in to the license-sync console" }
            @if let Some(refusal) = refusal {
                div #sign-in-refusal role="alert" {
                    h2 { "Not signed in" }
                    p #sign-in-error.error { (super::sentence(refusal.message)) }
                    @if let Some(hint) = refusal.hint { p #sign-in-hint { (hint) } }
                }
            }
            form #sign-in method="post" action="/console/sign-in" {
                p {
                    label for="token" { "Your enterprise's REST token" }
                    input #token type="password" name="token" autocomplete="off" required
                        aria-describedby="token-help";
                }
                p #token-help.help {
                    "A token from " code { "license-sync-aggregator token create" } ". An operator can also print a \
                     one-time sign-in link with " code { "license-sync-aggregator console-link --enterprise SLUG" } "."
                }
                button #sign-in-submit type="submit" { "Sign in" }
            }
        },
    )
}

pub(super) async fn sign_in_page() -> Response {
    html_response(StatusCode::OK, sign_in_markup(None))
}

#[derive(Debug, Deserialize)]
pub(super) struct SignInForm {
    token: Option<String>,
}

/// `POST /console/sign-in`: a REST token opens a session of its enterprise with its scope.
pub(super) async fn sign_in(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    ClientAddress(client): ClientAddress,
    form: Result<Form<SignInForm>, FormRejection>,
) -> Response {
    // A sign-in posted from another site (login CSRF) would sign the browser in to someone else's enterprise.
    if headers
        .get("sec-fetch-site")
        .and_then(|value| value.to_str().ok())
        == Some("cross-site")
    {
        return ConsoleError(ServiceError::permission_denied(
            "a sign-in must come from the console's own sign-in page: open /console/sign-in and sign in there",
        ))
        .into_response();
    }
    let token = form
        .ok()
        .and_then(|Form(form)| form.token)
        .map(|token| token.trim().to_owned())
        .unwrap_or_default();
    let refused = |error: ServiceError| {
        let status = error.kind.http_status();
        let hint = (error.kind == ErrorKind::Unauthenticated).then_some(
            "The token must be a live REST token of your enterprise (not revoked, not expired): paste it again, or \
             ask an operator for a new one.",
        );
        html_response(
            status,
            sign_in_markup(Some(SignInRefusal {
                message: &error.message,
                hint,
            })),
        )
    };
    if token.is_empty() {
        // An empty form is not a guess at a token: not counted.
        return refused(ServiceError::unauthenticated(
            "Give a token: paste your enterprise's REST token (`lst_…`).",
        ));
    }
    let authorized = match app.api_tokens.sign_in(&token, client).await {
        Ok(authorized) => authorized,
        Err(error) => return refused(error),
    };
    let opened = open_session(
        &app,
        &headers,
        &authorized.enterprise,
        Some(authorized.token.id),
        authorized.token.scope,
    )
    .await;
    match opened {
        Ok(response) => response,
        Err(error) => ConsoleError(error).into_response(),
    }
}

/// Stores a new session and answers with its cookie and a redirect to the overview.
async fn open_session(
    app: &App,
    headers: &HeaderMap,
    enterprise: &Enterprise,
    api_token_id: Option<i64>,
    scope: TokenScope,
) -> ServiceResult<Response> {
    let session_id = tokens::generate(SESSION_PREFIX);
    let now = OffsetDateTime::now_utc();
    let lifetime = time::Duration::hours(i64::from(app.config.console_session_hours));
    app.store
        .create_console_session(
            &NewConsoleSession {
                id_sha256: &tokens::sha256_hex(&session_id),
                enterprise_id: enterprise.id,
                api_token_id,
                scope,
                expires_at: now + lifetime,
            },
            now,
        )
        .await?;
    tracing::info!(
        enterprise = %enterprise.slug,
        scope = scope.as_str(),
        via = if api_token_id.is_some() { "token" } else { "link" },
        "console session opened"
    );
    let cookie = session_cookie_header(app, headers, &session_id, lifetime.whole_seconds());
    let mut response = Redirect::to(&format!("/console/{}/", enterprise.slug)).into_response();
    let cookie = HeaderValue::from_str(&cookie)
        .map_err(|error| ServiceError::internal("writing the session cookie", error))?;
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response.headers_mut().insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    Ok(response)
}

#[derive(Debug, Deserialize)]
pub(super) struct LinkQuery {
    token: Option<String>,
}

/// `GET /console/sign-in/link?token=…`: spends a one-time sign-in link and opens an `admin` session (only an
/// operator with the database can print one). The token is in the query string, which is never logged.
pub(super) async fn sign_in_with_link(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    ClientAddress(client): ClientAddress,
    axum::extract::Query(query): axum::extract::Query<LinkQuery>,
) -> Response {
    let refusal = || {
        app.auth_limiter.refused(
            client,
            AuthSurface::Console,
            ServiceError::unauthenticated(
                "This sign-in link is unknown, was used already, or has expired (links work once, for a few \
                 minutes). Ask for a new one (`license-sync-aggregator console-link --enterprise SLUG`) or sign in \
                 with a REST token.",
            ),
        )
    };
    let token = query.token.unwrap_or_default();
    let redeemed = if token.starts_with(LINK_PREFIX) {
        app.store
            .redeem_console_link(&tokens::sha256_hex(&token), OffsetDateTime::now_utc())
            .await
            .map_err(ServiceError::from)
    } else {
        Ok(None)
    };
    let enterprise = match redeemed {
        Ok(Some(enterprise)) => enterprise,
        Ok(None) => {
            let error = refusal();
            return html_response(
                error.kind.http_status(),
                sign_in_markup(Some(SignInRefusal {
                    message: &error.message,
                    hint: None,
                })),
            );
        }
        Err(error) => return ConsoleError(error).into_response(),
    };
    match open_session(&app, &headers, &enterprise, None, TokenScope::Admin).await {
        Ok(response) => response,
        Err(error) => ConsoleError(error).into_response(),
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct CsrfForm {
    pub csrf_token: Option<String>,
}

/// `POST /console/sign-out`: deletes the session (on every replica at once) and clears the cookie.
pub(super) async fn sign_out(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    signed: Signed,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    let presented = form.ok().and_then(|Form(form)| form.csrf_token);
    if let Err(refusal) = signed.check_csrf(presented.as_deref()) {
        return refusal.into_response();
    }
    if let Err(error) = app
        .store
        .delete_console_session(&signed.session_sha256)
        .await
    {
        return ConsoleError(error.into()).into_response();
    }
    tracing::info!(enterprise = %signed.enterprise.slug, "console session closed");
    let mut response = Redirect::to("/console/sign-in").into_response();
    if let Ok(cookie) = HeaderValue::from_str(&session_cookie_header(&app, &headers, "", 0)) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

/// A new sign-in link token: shown once, spent by its first use.
#[derive(Debug, Clone)]
pub struct IssuedConsoleLink {
    pub token: String,
    pub expires_at: OffsetDateTime,
}

impl IssuedConsoleLink {
    /// The link to open, under `base_url` (the aggregator's public URL, without a trailing `/`).
    pub fn url(&self, base_url: &str) -> String {
        format!(
            "{}/console/sign-in/link?token={}",
            base_url.trim_end_matches('/'),
            self.token
        )
    }
}

/// Creates a one-time sign-in link of the enterprise, valid `minutes` (default 15, at most 60). Only its hash is
/// stored. For `license-sync-aggregator console-link`.
pub async fn issue_console_link(
    store: &DynStore,
    enterprise: &Enterprise,
    minutes: Option<i64>,
) -> ServiceResult<IssuedConsoleLink> {
    let minutes = minutes.unwrap_or(DEFAULT_LINK_MINUTES);
    if !(1..=MAX_LINK_MINUTES).contains(&minutes) {
        return Err(ServiceError::invalid(format!(
            "a sign-in link lives from 1 to {MAX_LINK_MINUTES} minutes; {minutes} is out of range (leave it out \
             for the default, {DEFAULT_LINK_MINUTES})"
        )));
    }
    let now = OffsetDateTime::now_utc();
    let expires_at = now + time::Duration::minutes(minutes);
    let token = tokens::generate(LINK_PREFIX);
    store
        .create_console_link(enterprise.id, &tokens::sha256_hex(&token), expires_at, now)
        .await?;
    tracing::info!(
        enterprise = %enterprise.slug,
        expires_at = %rfc3339(expires_at),
        "console sign-in link created"
    );
    Ok(IssuedConsoleLink { token, expires_at })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others_and_the_csrf_token_is_bound_to_the_session() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; license_sync_console=lsc_x"),
        );
        assert_eq!(session_cookie(&headers), Some("lsc_x"));
        headers.clear();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("license_sync_consolex=no"),
        );
        assert_eq!(session_cookie(&headers), None);
        let csrf = csrf_token_of("lsc_one");
        assert_eq!(csrf, csrf_token_of("lsc_one"));
        assert_ne!(csrf, csrf_token_of("lsc_two"));
        // Not the stored hash of the session id.
        assert_ne!(csrf, tokens::sha256_hex("lsc_one"));
    }
}
