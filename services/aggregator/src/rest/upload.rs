//! `POST /enterprises/{enterprise}/server-usage`: the manual upload of a usage file, committed like a streamed sync.

use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use license_sync_core::encrypted_usage_file::{self, EncryptedUsageFileError};
use license_sync_core::snapshot::{UsageFile, UsageFileParseError};

use super::{json_error, read_body};
use crate::app::{App, Receipt};
use crate::auth::AuthorizedEnterprise;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::metrics::Rejection;
use crate::store::{Arrival, Enterprise};
use crate::usage_keys;

/// "Add server usage": the manual upload of a usage file exported by an agent. The span `aggregator.upload` is
/// the root of the upload's trace (validation, commit and merge are its children, as for a streamed sync).
#[tracing::instrument(name = "aggregator.upload", skip_all, fields(otel.kind = "server"))]
pub(super) async fn upload_usage(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
    body: Body,
) -> ServiceResult<Response> {
    let bytes = read_body(&app, body).await?;
    let receipt = apply_usage_file(&app, &enterprise, bytes).await?;
    let status = if receipt.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(receipt)).into_response())
}

/// Parses (decrypting it if it is encrypted) and commits one usage file for an instance of the enterprise: the one
/// path of "Add server usage", for REST and the console.
pub(crate) async fn apply_usage_file(
    app: &Arc<App>,
    enterprise: &Enterprise,
    bytes: Bytes,
) -> ServiceResult<Receipt> {
    let malformed = |error: ServiceError| {
        app.metrics.rejected(Rejection::MalformedFile);
        error
    };
    // An encrypted file (age, told by its first bytes) is decrypted as it is parsed, with any of the enterprise's
    // keys; a plain file, as older agents and `export --unencrypted` write it, is parsed as before. Either way in one
    // pass straight into the struct (`UsageFile::from_json`, `encrypted_usage_file::read_encrypted`).
    let file = if encrypted_usage_file::is_encrypted(&bytes) {
        let identities = usage_keys::identities(&app.store, enterprise)
            .await
            .map_err(|error| match error.kind {
                // No key to decrypt with: the file's fault, not the store's.
                ErrorKind::InvalidArgument => malformed(error),
                _ => error,
            })?;
        encrypted_usage_file::read_encrypted(&bytes, &identities).map_err(|error| {
            malformed(match error {
                EncryptedUsageFileError::Content(error) => usage_file_error(error),
                undecryptable => usage_keys::decryption_refusal(enterprise, &undecryptable),
            })
        })?
    } else {
        UsageFile::from_json(&bytes).map_err(|error| malformed(usage_file_error(error)))?
    };
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
    app.commit_snapshot(&instance, snapshot, Arrival::Upload, None)
        .await
}

/// The 422 for a body (or an encrypted file's plaintext) that is not a usage file: what it is instead, with a
/// position, never a value.
fn usage_file_error(error: UsageFileParseError) -> ServiceError {
    let what = "a usage file written by `license-sync-agent export`";
    match error {
        UsageFileParseError::Json(error) => json_error(&error, what),
        UsageFileParseError::NoFormat => {
            ServiceError::invalid(format!("the body has no \"format\" field: expected {what}"))
        }
        unsupported @ UsageFileParseError::UnsupportedFormat(_) => {
            ServiceError::invalid(unsupported.to_string())
        }
    }
}

/// `GET /enterprises/{enterprise}/usage-file-key`: the public key agents encrypt usage files to (the newest of the
/// enterprise's keys), for `export.recipient`. 404 while the enterprise has none.
pub(super) async fn usage_file_key(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
) -> ServiceResult<Response> {
    let key = usage_keys::current_public_key(&app.store, enterprise.id)
        .await?
        .ok_or_else(|| {
            ServiceError::not_found(format!(
                "enterprise {slug} has no usage-file key: create one with `license-sync-aggregator enterprise \
                 keygen --enterprise {slug}`",
                slug = enterprise.slug
            ))
        })?;
    Ok(Json(serde_json::json!({
        "public_key": key.public_key,
        "created_at": crate::time_format::rfc3339(crate::time_format::unix_ms_to_time(key.created_at_ms)),
    }))
    .into_response())
}
