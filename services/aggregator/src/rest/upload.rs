//! `POST /enterprises/{enterprise}/server-usage`: the manual upload of a usage file, committed like a streamed sync.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use license_sync_core::snapshot::{UsageFile, UsageFileParseError};

use super::{json_error, read_body};
use crate::app::App;
use crate::auth::AuthorizedEnterprise;
use crate::error::{ServiceError, ServiceResult};
use crate::metrics::Rejection;
use crate::store::Arrival;

/// "Add server usage": the manual upload of a usage file exported by an agent. The span `aggregator.upload` is
/// the root of the upload's trace (validation, commit and merge are its children, as for a streamed sync).
#[tracing::instrument(name = "aggregator.upload", skip_all, fields(otel.kind = "server"))]
pub(super) async fn upload_usage(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
    body: Body,
) -> ServiceResult<Response> {
    let bytes = read_body(&app, body).await?;
    let what = "a usage file written by `license-sync-agent export`";
    let malformed = |error: ServiceError| {
        app.metrics.rejected(Rejection::MalformedFile);
        error
    };
    // One pass straight into the struct; the format is looked for only when that fails (`UsageFile::from_json`).
    let file = UsageFile::from_json(&bytes).map_err(|error| {
        malformed(match error {
            UsageFileParseError::Json(error) => json_error(&error, what),
            UsageFileParseError::NoFormat => {
                ServiceError::invalid(format!("the body has no \"format\" field: expected {what}"))
            }
            unsupported @ UsageFileParseError::UnsupportedFormat(_) => {
                ServiceError::invalid(unsupported.to_string())
            }
        })
    })?;
    drop(bytes);
    let instance = app
        .store
        .instance_for_upload(enterprise.id, file.meta.instance.server_id)
        .await?;
    let snapshot = match file.into_snapshot() {
        Ok(snapshot) => snapshot,
        Err(error) => {
            app.metrics.rejected(Rejection::of(&error));
            let error = ServiceError::from(error);
            app.record_failure(&instance, Arrival::Upload, &error).await;
            return Err(error);
        }
    };
    let receipt = app
        .commit_snapshot(&instance, snapshot, Arrival::Upload, None)
        .await?;
    let status = if receipt.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(receipt)).into_response())
}
