//! The database gauges of `GET /metrics`, filled at every scrape from the shared database (see `crate::metrics` for
//! why): lists the enterprises, takes each one's merged view through `App::merged_view`, reads its instance rows, and
//! hands the values to the gauges registered in [`Metrics`] before encoding every metric.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use time::OffsetDateTime;

use crate::app::App;
use crate::error::{ServiceError, ServiceResult};
use crate::metrics::{
    AuthSurface, CONTENT_TYPE, EnterpriseValues, InstanceStates, Metrics, STATES,
};
use crate::store::{Enterprise, Instance};
use crate::view::{MergedView, ViewGuard};

/// Compares SHA-256 digests in constant time: the time taken says nothing of the token, its length included.
fn same_secret(given: &str, expected: &str) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    Sha256::digest(given.as_bytes())
        .ct_eq(&Sha256::digest(expected.as_bytes()))
        .into()
}

/// Refreshes the database gauges and encodes every metric.
pub async fn render(app: &Arc<App>) -> Result<String, std::fmt::Error> {
    let _scrape = app.metrics.scrape.lock().await;
    refresh(app).await;
    app.metrics.encode()
}

async fn refresh(app: &Arc<App>) {
    let (sender, mut reads) = tokio::sync::mpsc::unbounded_channel();
    // Its own task, one enterprise at a time: a view rebuild that outlasts this scrape's budget still completes
    // and is cached for the next scrape, and a fresh replica does not rebuild every view at once.
    tokio::spawn(read_database(Arc::clone(app), sender));
    let deadline = tokio::time::Instant::now() + REFRESH_BUDGET;
    let now = OffsetDateTime::now_utc();
    let stale_after = time::Duration::days(i64::from(app.config.stale_after_days));
    let mut listed = None;
    let mut values = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, reads.recv()).await {
            Ok(Some(Read::Listed(ids))) => listed = Some(ids),
            Ok(Some(Read::Enterprise(enterprise, Ok((view, instances))))) => {
                values.push(enterprise_values(
                    &app.metrics,
                    &enterprise,
                    &view,
                    instances,
                    now,
                    stale_after,
                ))
            }
            Ok(Some(Read::Enterprise(enterprise, Err(error)))) => tracing::warn!(
                enterprise = %enterprise.slug,
                error = %error.message,
                "metrics: cannot read the enterprise; its gauges are left out of this scrape"
            ),
            Ok(Some(Read::ListFailed(error))) => {
                tracing::warn!(error = %error.message, "metrics: cannot list the enterprises; their gauges are left out of this scrape");
                break;
            }
            Ok(None) => break,
            Err(_) => {
                tracing::warn!(
                    budget_secs = REFRESH_BUDGET.as_secs(),
                    "metrics: reading the database took longer than the budget; the enterprises not read yet are \
                     left out of this scrape (their views are still being rebuilt for the next one)"
                );
                break;
            }
        }
    }
    app.metrics.set_database_gauges(values);
    // Forget the counts of enterprises that are gone.
    if let Some(known) = listed
        && let Ok(mut cache) = app.metrics.states_cache.lock()
    {
        cache.retain(|id, _| known.contains(id));
    }
}

fn enterprise_values(
    metrics: &Metrics,
    enterprise: &Enterprise,
    view: &MergedView,
    instances: Vec<Instance>,
    now: OffsetDateTime,
    stale_after: time::Duration,
) -> EnterpriseValues {
    let active: Vec<_> = instances
        .into_iter()
        .filter(|instance| instance.retired_at.is_none())
        .collect();
    let stale = active
        .iter()
        .filter(|instance| {
            instance
                .last_success_at
                .is_none_or(|success| now - success > stale_after)
        })
        .count() as i64;
    EnterpriseValues {
        slug: enterprise.slug.clone(),
        consumed: i64::try_from(view.people.total_seats_consumed()).unwrap_or(i64::MAX),
        purchased: view.seats_purchased,
        last_success: active
            .into_iter()
            .map(|instance| (instance.hostname, instance.last_success_at))
            .collect(),
        stale,
        states: instance_states(metrics, enterprise.id, view),
    }
}

/// Accounts by state of each instance of the view, counted once per generation.
fn instance_states(
    metrics: &Metrics,
    enterprise_id: i64,
    view: &MergedView,
) -> Arc<Vec<InstanceStates>> {
    if let Ok(cache) = metrics.states_cache.lock()
        && let Some((generation, states)) = cache.get(&enterprise_id)
        && *generation == view.generation
    {
        return Arc::clone(states);
    }
    let states: Arc<Vec<InstanceStates>> = Arc::new(
        view.people
            .instances()
            .map(|(_, instance, _)| {
                let mut counts = [0i64; 4];
                for user in instance.users.iter() {
                    let state = user.consumption();
                    if let Some(index) = STATES.iter().position(|known| *known == state) {
                        counts[index] += 1;
                    }
                }
                InstanceStates {
                    hostname: instance.hostname.clone(),
                    counts,
                }
            })
            .collect(),
    );
    if let Ok(mut cache) = metrics.states_cache.lock() {
        cache.insert(enterprise_id, (view.generation, Arc::clone(&states)));
    }
    states
}

/// The longest a scrape waits for the database before answering with what it has: below Prometheus' default
/// `scrape_timeout` (10 s), so that the event counters stay visible while the database is slow or down.
const REFRESH_BUDGET: Duration = Duration::from_secs(5);

/// What [`read_database`] hands to the scrape, as it goes.
enum Read {
    Listed(HashSet<i64>),
    ListFailed(ServiceError),
    Enterprise(Enterprise, ServiceResult<(ViewGuard, Vec<Instance>)>),
}

/// Reads every enterprise's merged view (cached per generation: a re-merge only when the database changed since this
/// process last looked) and instance rows, one enterprise at a time. Stops when the scrape is gone.
async fn read_database(app: Arc<App>, sender: tokio::sync::mpsc::UnboundedSender<Read>) {
    let enterprises = match app.store.list_enterprises().await {
        Ok(enterprises) => enterprises,
        Err(error) => {
            let _ = sender.send(Read::ListFailed(error.into()));
            return;
        }
    };
    if sender
        .send(Read::Listed(enterprises.iter().map(|e| e.id).collect()))
        .is_err()
    {
        return;
    }
    for enterprise in enterprises {
        let read = async {
            let view = app.views.merged_view(enterprise.id).await?;
            let instances = app.store.list_instances(enterprise.id).await?;
            Ok((view, instances))
        }
        .await;
        if sender.send(Read::Enterprise(enterprise, read)).is_err() {
            return;
        }
    }
}

/// `GET /metrics`. With `metrics_token` set, only for `Authorization: Bearer <metrics_token>` (compared in constant
/// time); a wrong token counts against the caller's failed-authentication limit.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "operations",
    security((), ("metrics_token" = [])),
    responses(
        (status = 200, description = "The metrics, in the OpenMetrics text format", content_type = "application/openmetrics-text", body = String),
        (status = 401, description = "`metrics_token` is set and the request lacks it or has another token", body = crate::rest::GitHubError),
        (status = 429, description = "Too many refused tokens from this address: retry after `Retry-After` seconds", body = crate::rest::GitHubError),
    ),
)]
pub async fn serve(
    State(app): State<Arc<App>>,
    client: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
) -> Response {
    if let Some(expected) = &app.config.metrics_token {
        let refusal = match crate::auth::request_token(&headers) {
            Ok(Some(given)) if same_secret(given, expected.expose()) => None,
            Ok(None) => Some(ServiceError::unauthenticated(
                "GET /metrics requires `Authorization: Bearer <metrics_token>` (the aggregator's `metrics_token` \
                 setting); give it to the scraper (Prometheus: `authorization.credentials_file`)",
            )),
            Ok(Some(_)) | Err(_) => Some(app.auth_limiter.refused(
                client.map(|Extension(ConnectInfo(peer))| peer.ip()),
                AuthSurface::Metrics,
                ServiceError::unauthenticated(
                    "Bad credentials: the bearer token is not the aggregator's `metrics_token`",
                ),
            )),
        };
        if let Some(refusal) = refusal {
            let mut response = refusal.into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    match render(&app).await {
        Ok(text) => {
            let mut response = text.into_response();
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
            response
        }
        Err(error) => {
            tracing::error!(%error, "metrics: cannot encode");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
