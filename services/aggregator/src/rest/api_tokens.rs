//! `GET /enterprises/{enterprise}/api-tokens`: the enterprise's REST tokens (id, name, scope, created, expires, last
//! used, revoked), as `license-sync-aggregator token list` prints them; never a token or its hash. Tokens are made
//! and revoked with the CLI only, so that a leaked token cannot mint others.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::Value;

use crate::admin::api_token_json;
use crate::app::App;
use crate::auth::AuthorizedEnterprise;
use crate::error::ServiceResult;

pub(super) async fn list_api_tokens(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
) -> ServiceResult<Json<Vec<Value>>> {
    let tokens = app.store.list_api_tokens(enterprise.id).await?;
    Ok(Json(tokens.iter().map(api_token_json).collect()))
}
