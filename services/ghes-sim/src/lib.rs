//! A small GitHub Enterprise Server simulator.
//!
//! No real GHES can run in tests, so this serves exactly the documented interface the agent uses (SPEC §2):
//!
//! - `GET /stafftools/reports/all_users.csv` with HTTP basic auth. Like GHES, it answers `202 Accepted` while the
//!   report is being "built" ([`SimConfig::pending_polls`] times), then `200` with the CSV file, re-read from disk
//!   on every `200` so that tests can change users between syncs.
//! - `GET /api/v3/enterprise/settings/license` (basic auth, `token T` or `Bearer T`).
//! - `GET /api/v3/meta`.
//!
//! Test hooks (no auth): `POST /_sim/invalidate` drops the cached report so the next requests get `202` again, and
//! `GET /_sim/stats` returns request counters ([`SimStats`]) so tests can assert that polling and retries happened.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde::Serialize;
use serde_json::json;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How the simulator behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The `all_users.csv` served by the report endpoint; re-read at every `200`.
    pub csv_path: PathBuf,
    /// The site admin's login for basic auth.
    pub username: String,
    /// The site admin's token (password of basic auth, or `token`/`Bearer` on the API).
    pub token: String,
    /// How many `202 Accepted` answers precede the first `200` after start or `POST /_sim/invalidate`.
    pub pending_polls: u32,
    /// `installed_version` of `GET /api/v3/meta`.
    pub version: String,
    /// Purchased seats of the license; `None` answers `"unlimited"`.
    pub license_seats: Option<i64>,
    /// `seats_used` of the license; `None` counts the CSV's non-suspended rows, as GHES does.
    pub license_seats_used: Option<i64>,
    /// Answer `503` to the first N report requests (fault injection for retry tests).
    pub fail_first: u32,
}

impl SimConfig {
    /// A configuration serving `csv_path` with the defaults used by the demo.
    pub fn new(csv_path: impl Into<PathBuf>) -> Self {
        SimConfig {
            csv_path: csv_path.into(),
            username: "site-admin".to_owned(),
            token: "ghes-sim-token".to_owned(),
            pending_polls: 1,
            version: "3.14.2".to_owned(),
            license_seats: Some(1000),
            license_seats_used: None,
            fail_first: 0,
        }
    }
}

/// Request counters, as `GET /_sim/stats` returns them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SimStats {
    /// Every request to the report endpoint, whatever its answer.
    pub report_requests: u64,
    pub report_202: u64,
    pub report_200: u64,
    /// `503` answers injected by [`SimConfig::fail_first`].
    pub report_503: u64,
    /// `401` answers on any endpoint.
    pub unauthorized: u64,
    pub license_requests: u64,
    pub meta_requests: u64,
}

#[derive(Default)]
struct Counters {
    report_requests: AtomicU64,
    report_202: AtomicU64,
    report_200: AtomicU64,
    report_503: AtomicU64,
    unauthorized: AtomicU64,
    license_requests: AtomicU64,
    meta_requests: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> SimStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        SimStats {
            report_requests: load(&self.report_requests),
            report_202: load(&self.report_202),
            report_200: load(&self.report_200),
            report_503: load(&self.report_503),
            unauthorized: load(&self.unauthorized),
            license_requests: load(&self.license_requests),
            meta_requests: load(&self.meta_requests),
        }
    }
}

struct SimState {
    config: SimConfig,
    /// `202` answers left before the report is "built".
    pending_left: AtomicU32,
    /// Injected `503` answers left.
    failures_left: AtomicU32,
    counters: Counters,
}

impl SimState {
    /// Decrements `counter` when it is positive; true when it was.
    fn take(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    fn invalidate(&self) {
        self.pending_left
            .store(self.config.pending_polls, Ordering::SeqCst);
    }
}

/// A running simulator. Dropping it stops the server; [`SimHandle::shutdown`] also waits for it to finish.
pub struct SimHandle {
    addr: SocketAddr,
    state: Arc<SimState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The counters, read in-process (same as `GET /_sim/stats`).
    pub fn stats(&self) -> SimStats {
        self.state.counters.snapshot()
    }

    /// Drops the cached report, as `POST /_sim/invalidate` does.
    pub fn invalidate(&self) {
        self.state.invalidate();
    }

    /// Stops accepting connections, lets in-flight requests finish and waits for the server task.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(std::io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// Serves the simulator on `listener` in a spawned task.
pub async fn start(listener: TcpListener, config: SimConfig) -> std::io::Result<SimHandle> {
    let addr = listener.local_addr()?;
    let state = Arc::new(SimState {
        pending_left: AtomicU32::new(config.pending_polls),
        failures_left: AtomicU32::new(config.fail_first),
        config,
        counters: Counters::default(),
    });
    let app = router(state.clone());
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown_rx.await;
            })
            .await
    });
    tracing::info!(%addr, "GHES simulator listening");
    Ok(SimHandle {
        addr,
        state,
        shutdown: Some(shutdown_tx),
        task: Some(task),
    })
}

fn router(state: Arc<SimState>) -> Router {
    Router::new()
        .route("/stafftools/reports/all_users.csv", get(all_users_report))
        .route("/api/v3/enterprise/settings/license", get(license))
        .route("/api/v3/meta", get(meta))
        .route("/_sim/invalidate", post(invalidate))
        .route("/_sim/stats", get(stats))
        .with_state(state)
}

const DOCUMENTATION_URL: &str = "https://docs.github.com/enterprise-server/rest";

fn github_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(json!({ "message": message, "documentation_url": DOCUMENTATION_URL })),
    )
        .into_response()
}

fn unauthorized(state: &SimState) -> Response {
    state.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
    let mut response = github_error(StatusCode::UNAUTHORIZED, "Bad credentials");
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"GitHub\""),
    );
    response
}

/// Which credential schemes an endpoint accepts: the report takes basic auth only, the REST API also tokens.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AuthSchemes {
    BasicOnly,
    BasicOrToken,
}

fn authorized(headers: &HeaderMap, config: &SimConfig, schemes: AuthSchemes) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
    else {
        return false;
    };
    let (scheme, credentials) = value.trim().split_once(' ').unwrap_or((value, ""));
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(credentials) else {
            return false;
        };
        let Ok(decoded) = String::from_utf8(decoded) else {
            return false;
        };
        return decoded
            .split_once(':')
            .is_some_and(|(user, token)| user == config.username && token == config.token);
    }
    schemes == AuthSchemes::BasicOrToken
        && (scheme.eq_ignore_ascii_case("token") || scheme.eq_ignore_ascii_case("bearer"))
        && credentials == config.token
}

async fn all_users_report(State(state): State<Arc<SimState>>, headers: HeaderMap) -> Response {
    let counters = &state.counters;
    counters.report_requests.fetch_add(1, Ordering::Relaxed);
    if !authorized(&headers, &state.config, AuthSchemes::BasicOnly) {
        return unauthorized(&state);
    }
    if SimState::take(&state.failures_left) {
        counters.report_503.fetch_add(1, Ordering::Relaxed);
        return github_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service unavailable (injected by ghes-sim fail_first)",
        );
    }
    if SimState::take(&state.pending_left) {
        counters.report_202.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::ACCEPTED,
            "Report is being generated. Check back in a few moments.\n",
        )
            .into_response();
    }
    match tokio::fs::read(&state.config.csv_path).await {
        Ok(body) => {
            counters.report_200.fetch_add(1, Ordering::Relaxed);
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, HeaderValue::from_static("text/csv"))],
                body,
            )
                .into_response()
        }
        Err(error) => {
            tracing::error!(path = %state.config.csv_path.display(), %error, "cannot read the CSV file");
            github_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ghes-sim cannot read its CSV file",
            )
        }
    }
}

/// Counts the rows whose `suspended?` column is not true, as GHES counts `seats_used`.
fn count_unsuspended(csv_bytes: &[u8]) -> Result<i64, csv::Error> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(csv_bytes);
    let suspended_column = reader
        .headers()?
        .iter()
        .position(|name| name.trim().eq_ignore_ascii_case("suspended?"));
    let mut count = 0;
    for record in reader.records() {
        let record = record?;
        let suspended = suspended_column
            .and_then(|column| record.get(column))
            .map(|value| {
                matches!(
                    value.trim().to_ascii_lowercase().as_str(),
                    "true" | "yes" | "1"
                )
            })
            .unwrap_or(false);
        if !suspended {
            count += 1;
        }
    }
    Ok(count)
}

/// GHES writes `expire_at` as `2016/02/06 12:41:52 -0600`, not ISO 8601.
const GHES_TIME_FORMAT: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
    "[year]/[month]/[day] [hour]:[minute]:[second] [offset_hour sign:mandatory][offset_minute]"
);

async fn license(State(state): State<Arc<SimState>>, headers: HeaderMap) -> Response {
    state
        .counters
        .license_requests
        .fetch_add(1, Ordering::Relaxed);
    if !authorized(&headers, &state.config, AuthSchemes::BasicOrToken) {
        return unauthorized(&state);
    }
    let config = &state.config;
    let seats_used = match config.license_seats_used {
        Some(used) => used,
        None => {
            let counted = match tokio::fs::read(&config.csv_path).await {
                Ok(bytes) => count_unsuspended(&bytes).map_err(|error| error.to_string()),
                Err(error) => Err(error.to_string()),
            };
            match counted {
                Ok(count) => count,
                Err(error) => {
                    tracing::error!(%error, "cannot count seats from the CSV file");
                    return github_error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "ghes-sim cannot read its CSV file",
                    );
                }
            }
        }
    };
    let (seats, seats_available) = match config.license_seats {
        Some(seats) => (json!(seats), json!((seats - seats_used).max(0))),
        None => (json!("unlimited"), json!("unlimited")),
    };
    let days_until_expiration = 365;
    let expire_at = (OffsetDateTime::now_utc() + time::Duration::days(days_until_expiration))
        .format(GHES_TIME_FORMAT)
        .unwrap_or_default();
    axum::Json(json!({
        "seats": seats,
        "seats_used": seats_used,
        "seats_available": seats_available,
        "kind": "standard",
        "days_until_expiration": days_until_expiration,
        "expire_at": expire_at,
    }))
    .into_response()
}

async fn meta(State(state): State<Arc<SimState>>) -> Response {
    state.counters.meta_requests.fetch_add(1, Ordering::Relaxed);
    axum::Json(json!({
        "installed_version": state.config.version,
        "verifiable_password_authentication": true,
    }))
    .into_response()
}

async fn invalidate(State(state): State<Arc<SimState>>) -> StatusCode {
    state.invalidate();
    StatusCode::NO_CONTENT
}

async fn stats(State(state): State<Arc<SimState>>) -> axum::Json<SimStats> {
    axum::Json(state.counters.snapshot())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_rows_that_are_not_suspended() {
        let csv = b"login,suspended?\nmona,false\nhubot,TRUE\nocto,no\n";
        assert_eq!(count_unsuspended(csv).expect("valid CSV"), 2);
        // Without the column every row counts.
        assert_eq!(count_unsuspended(b"login\na\nb\n").expect("valid CSV"), 2);
    }

    #[test]
    fn ghes_time_format_matches_the_documented_example() {
        let parsed = OffsetDateTime::parse("2016/02/06 12:41:52 -0600", GHES_TIME_FORMAT)
            .expect("documented format");
        assert_eq!(parsed.unix_timestamp(), 1_454_784_112);
    }
}
