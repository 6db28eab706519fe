//! `GET /enterprises/{enterprise}/likely-duplicates`: consuming people who are probably one person.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use crate::app::App;
use crate::auth::AuthorizedEnterprise;
use crate::error::ServiceResult;

pub(super) async fn likely_duplicates(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
) -> ServiceResult<Json<Value>> {
    let view = app.views.merged_view(enterprise.id).await?;
    Ok(Json(json!({
        "likely_duplicates": *app.views.likely_duplicates(enterprise.id, &view),
        "stats": view.people.stats(),
    })))
}
