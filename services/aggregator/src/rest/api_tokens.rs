//! `GET /enterprises/{enterprise}/api-tokens`: the enterprise's REST tokens (id, name, scope, created, expires, last
//! used, revoked), as `license-sync-aggregator token list` prints them; never a token or its hash. Tokens are made
//! and revoked with the CLI only, so that a leaked token cannot mint others.

use std::sync::Arc;

use crate::admin::{ApiTokenRecord, api_token_json};
use crate::app::App;
use crate::auth::AuthorizedEnterprise;
use crate::error::ServiceResult;
use axum::Json;
use axum::extract::State;

#[utoipa::path(
    get,
    path = "/enterprises/{enterprise}/api-tokens",
    tag = "tokens",
    params(super::openapi::EnterprisePath),
    responses((status = 200, description = "The enterprise's REST tokens, revoked ones included", body = Vec<ApiTokenRecord>)),
)]
pub(super) async fn list_api_tokens(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
) -> ServiceResult<Json<Vec<ApiTokenRecord>>> {
    let tokens = app.store.list_api_tokens(enterprise.id).await?;
    Ok(Json(tokens.iter().map(api_token_json).collect()))
}
