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
#[utoipa::path(
    post,
    path = "/enterprises/{enterprise}/server-usage",
    tag = "usage",
    params(super::openapi::EnterprisePath),
    request_body(
        description = "A usage file written by `license-sync-agent export`: plain JSON, or encrypted with age (binary \
                       or armored) to one of the enterprise's usage-file keys",
        content((UsageFile = "application/json"), (String = "application/octet-stream")),
    ),
    responses(
        (status = 201, description = "Committed", body = Receipt),
        (status = 200, description = "This sync id was committed before; nothing was applied again", body = Receipt),
        (status = 404, description = "No such enterprise, or the file's instance is not one of its instances", body = super::GitHubError),
        (status = 403, description = "A `read` token, or the file's instance is enrolled in another enterprise", body = super::GitHubError),
        (status = 409, description = "The stored snapshot is newer, the sync id was used for other content, or the instance is retired", body = super::GitHubError),
        (status = 413, description = "The body is over `max_upload_bytes`, or the file over `max_snapshot_users`", body = super::GitHubError),
        (status = 422, description = "Not a usage file (the message says where), or a file no key of the enterprise decrypts", body = super::GitHubError),
    ),
)]
#[tracing::instrument(name = "aggregator.upload", skip_all, fields(otel.kind = "server"))]
pub(super) async fn upload_usage(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
    body: Body,
) -> ServiceResult<Response> {
    let bytes = read_body(&app, body).await?;
    let receipt = apply_usage_file(&app, &enterprise, bytes)
        .await
        .map_err(|refusal| refusal.error)?;
    let status = if receipt.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(receipt)).into_response())
}

/// An upload refused: the service error (REST answers it as it is), and, when the file is not a usage file at all,
/// how, so that the console can word it for a person holding a file rather than a request body.
#[derive(Debug)]
pub(crate) struct UploadRefusal {
    pub error: ServiceError,
    pub not_a_usage_file: Option<NotAUsageFile>,
}

impl From<ServiceError> for UploadRefusal {
    fn from(error: ServiceError) -> Self {
        UploadRefusal {
            error,
            not_a_usage_file: None,
        }
    }
}

/// How a file (or an encrypted file's plaintext) is not a usage file; positions are 1-based, as serde_json's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotAUsageFile {
    NotJson { line: usize, column: usize },
    WrongFields { line: usize, column: usize },
    NoFormat,
}

/// Parses (decrypting it if it is encrypted) and commits one usage file for an instance of the enterprise: the one
/// path of "Add server usage", for REST and the console.
pub(crate) async fn apply_usage_file(
    app: &Arc<App>,
    enterprise: &Enterprise,
    bytes: Bytes,
) -> Result<Receipt, UploadRefusal> {
    let malformed = |refusal: UploadRefusal| {
        app.metrics.rejected(Rejection::MalformedFile);
        refusal
    };
    // An encrypted file (age, told by its first bytes) is decrypted as it is parsed, with any of the enterprise's
    // keys; a plain file, as older agents and `export --unencrypted` write it, is parsed as before. Either way in one
    // pass straight into the struct (`UsageFile::from_json`, `encrypted_usage_file::read_encrypted`).
    let file = if encrypted_usage_file::is_encrypted(&bytes) {
        let identities = usage_keys::identities(&app.store, enterprise)
            .await
            .map_err(|error| match error.kind {
                // No key to decrypt with: the file's fault, not the store's.
                ErrorKind::InvalidArgument => malformed(error.into()),
                _ => error.into(),
            })?;
        encrypted_usage_file::read_encrypted(&bytes, &identities).map_err(|error| {
            malformed(match error {
                EncryptedUsageFileError::Content(error) => usage_file_error(error),
                undecryptable => usage_keys::decryption_refusal(enterprise, &undecryptable).into(),
            })
        })?
    } else {
        UsageFile::from_json(&bytes).map_err(|error| malformed(usage_file_error(error)))?
    };
    drop(bytes);
    let instance = app
        .store
        .instance_for_upload(enterprise.id, file.meta.instance.server_id)
        .await
        .map_err(ServiceError::from)?;
    let snapshot = match file.into_snapshot() {
        Ok(snapshot) => snapshot,
        Err(error) => {
            app.metrics.rejected(Rejection::of(&error));
            let error = ServiceError::from(error);
            app.record_failure(&instance, Arrival::Upload, &error).await;
            return Err(error.into());
        }
    };
    Ok(app
        .commit_snapshot(&instance, snapshot, Arrival::Upload, None)
        .await?)
}

/// The 422 for a body (or an encrypted file's plaintext) that is not a usage file: what it is instead, with a
/// position, never a value.
fn usage_file_error(error: UsageFileParseError) -> UploadRefusal {
    let what = "a usage file written by `license-sync-agent export`";
    let (error, not_a_usage_file) = match error {
        UsageFileParseError::Json(error) => {
            let (line, column) = (error.line(), error.column());
            let how = match error.classify() {
                serde_json::error::Category::Data => NotAUsageFile::WrongFields { line, column },
                _ => NotAUsageFile::NotJson { line, column },
            };
            (json_error(&error, what), Some(how))
        }
        UsageFileParseError::NoFormat => (
            ServiceError::invalid(format!("the body has no \"format\" field: expected {what}")),
            Some(NotAUsageFile::NoFormat),
        ),
        // Its message already names the formats, in words that suit a file as well as a body.
        unsupported @ UsageFileParseError::UnsupportedFormat(_) => {
            (ServiceError::invalid(unsupported.to_string()), None)
        }
    };
    UploadRefusal {
        error,
        not_a_usage_file,
    }
}

/// `GET /enterprises/{enterprise}/usage-file-key`: the public key agents encrypt usage files to (the newest of the
/// enterprise's keys), for `export.recipient`. 404 while the enterprise has none.
#[utoipa::path(
    get,
    path = "/enterprises/{enterprise}/usage-file-key",
    tag = "usage",
    params(super::openapi::EnterprisePath),
    responses(
        (status = 200, description = "The newest usage-file key", body = UsageFileKey),
        (status = 404, description = "No such enterprise, or it has no usage-file key yet (`enterprise keygen`)", body = super::GitHubError),
    ),
)]
pub(super) async fn usage_file_key(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
) -> ServiceResult<Json<UsageFileKey>> {
    let key = usage_keys::current_public_key(&app.store, enterprise.id)
        .await?
        .ok_or_else(|| {
            ServiceError::not_found(format!(
                "enterprise {slug} has no usage-file key: create one with `license-sync-aggregator enterprise \
                 keygen --enterprise {slug}`",
                slug = enterprise.slug
            ))
        })?;
    Ok(Json(UsageFileKey {
        public_key: key.public_key,
        created_at: crate::time_format::rfc3339(crate::time_format::unix_ms_to_time(
            key.created_at_ms,
        )),
    }))
}

/// An enterprise's usage-file key, as agents read it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(super) struct UsageFileKey {
    /// The age X25519 recipient (`age1…`).
    public_key: String,
    /// RFC 3339 UTC.
    created_at: String,
}
