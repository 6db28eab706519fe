//! The agent's local HTTP API.
//!
//! | method and path | who | what |
//! |---|---|---|
//! | `GET /healthz` | anyone | liveness |
//! | `GET /readyz` | anyone | readiness (running, state directory accessible) |
//! | `GET /metrics` | anyone | Prometheus metrics (OpenMetrics text), see [`crate::metrics`] |
//! | `GET /api/v1/status` | anyone | enabled, connected, last sync, next scheduled sync, pending deliveries, current job, counters |
//! | `GET /api/v1/settings` | anyone | `{"license_sync_enabled", "enabled_at", "updated_at"}` |
//! | `PUT /api/v1/settings` | owner | `{"license_sync_enabled": true\|false}`; enabling needs a working connection (409 otherwise) |
//! | `GET /api/v1/connection` | anyone | runs `CheckConnection` now: connected or why not |
//! | `POST /api/v1/connection` | owner | `{"enrollment_token": "lse_…"}`: enrolls and stores the credential |
//! | `POST /api/v1/sync-now` | owner | 202 `{"job_id", "state", "joined"}`; joins the running job; 409 when disabled |
//! | `GET /api/v1/jobs` | anyone | the last 50 jobs, newest first |
//! | `GET /api/v1/jobs/{id}` | anyone | one job |
//!
//! Owner-only requests carry `Authorization: Bearer <owner token>`; anything else is 401. Errors are JSON
//! `{"message", "kind"}`. Bodies built from the request report positions, never values (a body may hold a token).

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use uuid::Uuid;

use super::Sidecar;
use super::jobs::Trigger;
use crate::config::Secret;
use crate::error::{AgentError, error_chain};

/// Largest accepted request body: the API takes small JSON objects only.
const MAX_BODY_BYTES: usize = 16 * 1024;

type AppState = Arc<Sidecar>;

pub fn router(sidecar: Arc<Sidecar>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .route("/api/v1/settings", get(get_settings).put(put_settings))
        .route(
            "/api/v1/connection",
            get(get_connection).post(post_connection),
        )
        .route("/api/v1/sync-now", post(sync_now))
        .route("/api/v1/jobs", get(jobs))
        .route("/api/v1/jobs/{id}", get(job))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(sidecar)
}

/// An error answer: `{"message", "kind"}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }
}

impl From<AgentError> for ApiError {
    fn from(error: AgentError) -> Self {
        ApiError {
            status: error.http_status(),
            kind: error.kind(),
            message: error_chain(&error),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            axum::Json(json!({"message": self.message, "kind": self.kind})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"license-sync-agent\""),
            );
        }
        response
    }
}

/// Proof that the request carries the owner token.
pub struct Owner;

impl FromRequestParts<AppState> for Owner {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, sidecar: &AppState) -> Result<Self, ApiError> {
        let unauthorized = || {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this action is for the owner: send the agent's owner token (`agent.owner_token_file`) as \
                 `Authorization: Bearer <token>`",
            )
        };
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(unauthorized)?;
        match sidecar.is_owner(presented) {
            Ok(true) => Ok(Owner),
            Ok(false) => {
                tracing::warn!("refused an owner-only request with a wrong owner token");
                Err(unauthorized())
            }
            Err(error) => {
                tracing::error!(error = %error, "cannot read the owner token");
                Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "owner_token_unreadable",
                    format!("the agent cannot read its owner token: {error}"),
                ))
            }
        }
    }
}

/// Parses a JSON body, reporting where it is wrong and what is expected, never the values it holds.
fn parse_body<T: DeserializeOwned>(body: &Bytes, expected: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| {
        let what = match error.classify() {
            serde_json::error::Category::Data => "has a missing, unknown or mistyped field",
            serde_json::error::Category::Eof => "ends too early",
            serde_json::error::Category::Syntax | serde_json::error::Category::Io => {
                "is not valid JSON"
            }
        };
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            format!(
                "the request body {what} (line {}, column {}): expected {expected}",
                error.line(),
                error.column()
            ),
        )
    })
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

async fn readyz(State(sidecar): State<AppState>) -> Response {
    match sidecar.ready() {
        Ok(()) => axum::Json(json!({"status": "ready"})).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "not_ready", "message": reason})),
        )
            .into_response(),
    }
}

async fn metrics(State(sidecar): State<AppState>) -> Response {
    match sidecar.metrics_text() {
        Ok(text) => {
            let mut response = text.into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            response
        }
        Err(error) => {
            tracing::error!(%error, "cannot encode the metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn status(State(sidecar): State<AppState>) -> impl IntoResponse {
    axum::Json(sidecar.status())
}

async fn get_settings(State(sidecar): State<AppState>) -> impl IntoResponse {
    axum::Json(sidecar.settings())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsBody {
    license_sync_enabled: bool,
}

async fn put_settings(
    State(sidecar): State<AppState>,
    _owner: Owner,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: SettingsBody = parse_body(&body, r#"{"license_sync_enabled": true|false}"#)?;
    let settings = sidecar.set_enabled(body.license_sync_enabled).await?;
    Ok(axum::Json(settings).into_response())
}

async fn get_connection(State(sidecar): State<AppState>) -> impl IntoResponse {
    axum::Json(sidecar.check_connection().await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionBody {
    enrollment_token: Secret,
}

async fn post_connection(
    State(sidecar): State<AppState>,
    _owner: Owner,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: ConnectionBody = parse_body(&body, r#"{"enrollment_token": "lse_…"}"#)?;
    let enrollment = sidecar.enroll(&body.enrollment_token).await?;
    let connection = sidecar.check_connection().await;
    Ok(axum::Json(json!({
        "enrolled": enrollment,
        "connection": connection,
    }))
    .into_response())
}

async fn sync_now(State(sidecar): State<AppState>, _owner: Owner) -> Result<Response, ApiError> {
    let ticket = sidecar.start_or_join(Trigger::Local)?;
    let location = format!("/api/v1/jobs/{}", ticket.job.id);
    let mut response = (
        StatusCode::ACCEPTED,
        axum::Json(json!({
            "job_id": ticket.job.id,
            "state": ticket.job.state,
            "joined": ticket.joined,
            "job": ticket.job,
        })),
    )
        .into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

async fn jobs(State(sidecar): State<AppState>) -> impl IntoResponse {
    axum::Json(json!({
        "jobs": sidecar.jobs(),
        "kept": super::jobs::MAX_JOBS,
    }))
}

async fn job(
    State(sidecar): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no job {id:?}: the agent keeps its last {} jobs in memory, since its last start",
                super::jobs::MAX_JOBS
            ),
        )
    };
    let id = Uuid::parse_str(&id).map_err(|_| not_found())?;
    let job = sidecar.job(id).ok_or_else(not_found)?;
    Ok(axum::Json(job).into_response())
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint: the local API is under /api/v1/ (status, settings, connection, sync-now, jobs)",
    )
}
