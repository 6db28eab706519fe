//! The REST API: GitHub-compatible licensing endpoints, plus what GitHub does not have (usage upload, members
//! import, instance retirement, explanations). Errors are GitHub-shaped: `{"message", "documentation_url"}`.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use license_sync_core::cloud::StrList;
use license_sync_core::merge::{Person, PersonId, explain, explain_separation};
use license_sync_core::model::CloudMember;
use license_sync_core::snapshot::UsageFile;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;

use uuid::Uuid;

mod page_json;

use crate::app::App;
use crate::auth::AuthorizedEnterprise;
use crate::control::issue_enrollment_token;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::metrics::Rejection;
use crate::store::{Arrival, Instance, SyncRequest};
use crate::time_format::rfc3339;
use crate::view::MergedView;

pub const MAX_PER_PAGE: usize = 100;
pub const DEFAULT_PER_PAGE: usize = 30;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        // Unauthenticated, like the health checks: restrict it at the network level.
        .route("/metrics", get(crate::metrics::serve))
        .route(
            "/enterprises/{enterprise}/consumed-licenses",
            get(consumed_licenses),
        )
        .route(
            "/enterprises/{enterprise}/license-sync-status",
            get(license_sync_status),
        )
        .route("/enterprises/{enterprise}/server-usage", post(upload_usage))
        .route(
            "/enterprises/{enterprise}/cloud-members",
            put(import_cloud_members),
        )
        .route(
            "/enterprises/{enterprise}/instances/{server_id}",
            delete(retire_instance),
        )
        .route(
            "/enterprises/{enterprise}/enrollment-tokens",
            post(create_enrollment_token),
        )
        .route(
            "/enterprises/{enterprise}/instances/{server_id}/sync-now",
            post(sync_now),
        )
        .route(
            "/enterprises/{enterprise}/instances/{server_id}/sync-requests/{request_id}",
            get(sync_request),
        )
        .route(
            "/enterprises/{enterprise}/license-explanations",
            get(license_explanation),
        )
        .route(
            "/enterprises/{enterprise}/usage-history",
            get(usage_history),
        )
        .route(
            "/enterprises/{enterprise}/likely-duplicates",
            get(likely_duplicates),
        )
        // Bodies are read with our own limit so that an oversized upload gets a GitHub-style error.
        .layer(DefaultBodyLimit::disable())
        .fallback(|| async { ServiceError::not_found("Not Found") })
        // Last, so that it sees every route and the fallback (whose requests are labelled `unmatched`).
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&app.metrics),
            crate::metrics::track_http,
        ))
        .with_state(app)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(app): State<Arc<App>>) -> ServiceResult<&'static str> {
    app.store.ping().await?;
    Ok("ready")
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    per_page: Option<String>,
    page: Option<String>,
}

/// Page size and number, validated as GitHub does: `per_page` above 100 is served as 100.
fn parse_page(query: &PageQuery) -> ServiceResult<(usize, usize)> {
    let parse = |name: &str, value: &Option<String>, default: usize| -> ServiceResult<usize> {
        match value.as_deref() {
            None | Some("") => Ok(default),
            Some(text) => match text.parse::<usize>() {
                Ok(number) if number >= 1 => Ok(number),
                _ => Err(ServiceError::invalid(format!(
                    "`{name}` must be a positive integer, got {text:?}"
                ))),
            },
        }
    };
    let per_page = parse("per_page", &query.per_page, DEFAULT_PER_PAGE)?.min(MAX_PER_PAGE);
    let page = parse("page", &query.page, 1)?;
    Ok((per_page, page))
}

/// Base URL for `Link` headers: the configured public URL, else the request's `Host`.
fn base_url(app: &App, headers: &HeaderMap) -> String {
    if let Some(url) = &app.config.public_url {
        return url.trim_end_matches('/').to_owned();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("localhost");
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|value| value.to_str().ok())
        .filter(|proto| *proto == "https")
        .unwrap_or("http");
    format!("{scheme}://{host}")
}

/// RFC 8288 `Link` header with the relations GitHub sends: `prev`/`first` after page 1, `next`/`last` before the
/// last page.
fn link_header(url: &str, per_page: usize, page: usize, last_page: usize) -> Option<String> {
    let link =
        |page: usize, rel: &str| format!("<{url}?per_page={per_page}&page={page}>; rel=\"{rel}\"");
    let mut links = Vec::new();
    if page > 1 {
        links.push(link(page.saturating_sub(1).clamp(1, last_page), "prev"));
    }
    if page < last_page {
        links.push(link(page + 1, "next"));
        links.push(link(last_page, "last"));
    }
    if page > 1 {
        links.push(link(1, "first"));
    }
    (!links.is_empty()).then(|| links.join(", "))
}

/// One entry of `users` in GitHub's "Enterprise Consumed Licenses" schema. Borrows from the merged view: a page is
/// serialised straight from it, without copying every string first.
#[derive(Debug, Serialize)]
struct ConsumedUser<'a> {
    github_com_login: &'a str,
    github_com_name: Option<&'a str>,
    enterprise_server_user_ids: ServerUserIds<'a>,
    github_com_user: bool,
    enterprise_server_user: Option<bool>,
    visual_studio_subscription_user: bool,
    license_type: &'static str,
    github_com_profile: Option<Profile<'a>>,
    github_com_member_roles: Strings<'a>,
    github_com_enterprise_roles: Strings<'a>,
    github_com_verified_domain_emails: Strings<'a>,
    github_com_saml_name_id: Option<&'a str>,
    github_com_orgs_with_pending_invites: Strings<'a>,
    github_com_two_factor_auth: Option<bool>,
    enterprise_server_emails: &'a [&'a str],
    /// The name PyGithub's `NamedEnterpriseUser` reads; same content as `enterprise_server_emails`.
    enterprise_server_primary_emails: &'a [&'a str],
    visual_studio_license_status: Option<&'static str>,
    visual_studio_subscription_email: Option<&'static str>,
    total_user_accounts: usize,
    /// Ours: the person's stable id, for `license-explanations?person=`.
    person_id: PersonId<'a>,
    /// Ours: a tie rule decided which cloud member this person's GHES account joined.
    ambiguous: bool,
}

/// `<hostname>:<user id>` of each of a person's GHES accounts, written straight into the page.
struct ServerUserIds<'a> {
    view: &'a MergedView,
    person: &'a Person,
}

impl std::fmt::Debug for ServerUserIds<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerUserIds")
            .field("person", self.person)
            .finish_non_exhaustive()
    }
}

impl Serialize for ServerUserIds<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let instances = self.view.people.instance_slots();
        serializer.collect_seq(self.person.server_accounts.iter().map(|link| {
            let instance = &instances[link.account.instance as usize];
            AccountId {
                hostname: &instance.hostname,
                user_id: instance.users.id(link.account.user as usize),
            }
        }))
    }
}

struct AccountId<'a> {
    hostname: &'a str,
    user_id: i64,
}

impl Serialize for AccountId<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{}:{}", self.hostname, self.user_id))
    }
}

/// `<cloud web URL>/<login>`, or an empty string for a person without a cloud account (GitHub's example).
#[derive(Debug)]
struct Profile<'a> {
    base_url: &'a str,
    login: Option<&'a str>,
}

impl Serialize for Profile<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.login {
            Some(login) => serializer.collect_str(&format_args!("{}/{login}", self.base_url)),
            None => serializer.serialize_str(""),
        }
    }
}

/// A cloud member's list, or an empty one for a person without a cloud account: always a JSON array.
#[derive(Debug)]
struct Strings<'a>(Option<StrList<'a>>);

impl Serialize for Strings<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(list) => list.serialize(serializer),
            None => serializer.collect_seq(std::iter::empty::<&str>()),
        }
    }
}

/// The distinct primary emails of a person's GHES accounts (case-insensitive), as GHES reports them.
fn server_emails<'v>(view: &'v MergedView, person: &Person) -> Vec<&'v str> {
    let mut emails: Vec<&str> = Vec::new();
    for link in &person.server_accounts {
        let instance = &view.people.instance_slots()[link.account.instance as usize];
        let email = instance.users.email(link.account.user as usize).trim();
        if !email.is_empty() && !emails.iter().any(|known| known.eq_ignore_ascii_case(email)) {
            emails.push(email);
        }
    }
    emails
}

fn consumed_user<'a>(
    view: &'a MergedView,
    person: &'a Person,
    server_emails: &'a [&'a str],
    cloud_web_url: &'a str,
) -> ConsumedUser<'a> {
    let member = person
        .cloud_member
        .and_then(|index| view.people.cloud_members().get(index as usize));
    // GitHub's own example gives empty strings, not nulls, for a server-only person; clients expect that.
    let text = |value: Option<&'a str>| Some(value.unwrap_or_default());
    ConsumedUser {
        github_com_login: member.map(|m| m.login).unwrap_or_default(),
        github_com_name: text(member.and_then(|m| m.name)),
        enterprise_server_user_ids: ServerUserIds { view, person },
        github_com_user: member.is_some(),
        enterprise_server_user: Some(!person.server_accounts.is_empty()),
        visual_studio_subscription_user: member.is_some_and(|m| m.visual_studio_subscription_user),
        license_type: "enterprise",
        github_com_profile: Some(Profile {
            base_url: cloud_web_url.trim_end_matches('/'),
            login: member.map(|m| m.login),
        }),
        github_com_member_roles: Strings(member.map(|m| m.member_roles)),
        github_com_enterprise_roles: Strings(member.map(|m| m.enterprise_roles)),
        github_com_verified_domain_emails: Strings(member.map(|m| m.verified_emails)),
        github_com_saml_name_id: text(member.and_then(|m| m.saml_name_id)),
        github_com_orgs_with_pending_invites: Strings(member.map(|m| m.orgs_with_pending_invites)),
        github_com_two_factor_auth: member.and_then(|m| m.two_factor_auth),
        enterprise_server_primary_emails: server_emails,
        enterprise_server_emails: server_emails,
        visual_studio_license_status: Some(""),
        visual_studio_subscription_email: Some(""),
        total_user_accounts: person.total_user_accounts(),
        person_id: view.people.person_id(person),
        ambiguous: person.ambiguous(),
    }
}

fn overage(consumed: u64, purchased: i64) -> u64 {
    consumed.saturating_sub(u64::try_from(purchased).unwrap_or(0))
}

async fn consumed_licenses(
    State(app): State<Arc<App>>,
    Query(query): Query<PageQuery>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
    headers: HeaderMap,
) -> ServiceResult<Response> {
    let (per_page, page) = parse_page(&query)?;
    let view = app.views.merged_view(enterprise.id).await?;
    let total = view.people.consuming().len();
    let last_page = total.div_ceil(per_page).max(1);
    // Pages of one view generation are identical for every reader: serialise each once.
    let body = match app
        .views
        .cached_page(enterprise.id, view.generation, (per_page, page))
    {
        Some(body) => body,
        None => {
            let body = app
                .body_pool
                .into_bytes(consumed_licenses_body(&app, &view, per_page, page)?);
            app.views.cache_page(
                enterprise.id,
                view.generation,
                (per_page, page),
                body.clone(),
            );
            body
        }
    };
    drop(view);
    let mut response = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    let url = format!(
        "{}/enterprises/{}/consumed-licenses",
        base_url(&app, &headers),
        enterprise.slug
    );
    if let Some(link) = link_header(&url, per_page, page, last_page)
        && let Ok(value) = HeaderValue::from_str(&link)
    {
        response.headers_mut().insert(header::LINK, value);
    }
    Ok(response)
}

/// One `consumed-licenses` page as JSON.
fn consumed_licenses_body(
    app: &App,
    view: &MergedView,
    per_page: usize,
    page: usize,
) -> ServiceResult<Vec<u8>> {
    let consuming = view.people.consuming();
    let total = consuming.len();
    let start = (page - 1).saturating_mul(per_page).min(total);
    let end = start.saturating_add(per_page).min(total);
    let people: Vec<&Person> = consuming[start..end]
        .iter()
        .filter_map(|&slot| view.people.person(slot))
        .collect();
    let emails: Vec<Vec<&str>> = people
        .iter()
        .map(|person| server_emails(view, person))
        .collect();
    let users: Vec<ConsumedUser> = people
        .iter()
        .zip(&emails)
        .map(|(person, emails)| consumed_user(view, person, emails, &app.config.cloud_web_url))
        .collect();
    let consumed = view.people.total_seats_consumed();
    // About 600 bytes per user in practice: sized up front, the body is written without regrowing.
    let mut body = app.body_pool.take(256 + users.len() * 768);
    let totals = format!(
        "{{\"total_seats_consumed\":{consumed},\"total_seats_purchased\":{},\"total_seats_overage\":{},\"users\":[",
        view.seats_purchased,
        overage(consumed, view.seats_purchased)
    );
    body.extend_from_slice(totals.as_bytes());
    for (position, user) in users.iter().enumerate() {
        if position > 0 {
            body.push(b',');
        }
        page_json::write_consumed_user(&mut body, user)
            .map_err(|err| ServiceError::internal("encoding consumed licenses", err))?;
    }
    body.extend_from_slice(b"]}");
    Ok(body)
}

fn instance_status(
    instance: &Instance,
    stale_after: time::Duration,
    agent_window: time::Duration,
    now: OffsetDateTime,
) -> Value {
    let (date, status) = match (instance.last_attempt_at, instance.last_attempt_ok) {
        (Some(at), Some(true)) => (rfc3339(at), "success"),
        (Some(at), _) => (rfc3339(at), "failed"),
        (None, _) => (String::new(), "pending"),
    };
    let stale = instance
        .last_success_at
        .is_none_or(|success| now - success > stale_after);
    json!({
        "server_id": instance.server_id.to_string(),
        "hostname": instance.hostname,
        "last_sync": {
            "date": date,
            "status": status,
            "error": instance.last_error,
        },
        "arrival": instance.last_success_via.map(Arrival::as_str),
        "last_success_date": instance.last_success_at.map(rfc3339),
        "generated_at": instance.generated_at.map(rfc3339),
        "ghes_version": instance.ghes_version,
        "user_count": instance.user_count,
        "rows_skipped": instance.rows_skipped,
        "stale": stale,
        "enrolled": instance.has_credential,
        "agent_connected": instance.agent.connected(now, agent_window),
        "agent_last_seen_date": instance.agent.last_seen_at.map(rfc3339),
        "agent_sync_enabled": instance.agent.sync_enabled,
        "agent_version": instance.agent.version,
        "pending_deliveries": instance.agent.pending_deliveries,
    })
}

async fn license_sync_status(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
) -> ServiceResult<Json<Value>> {
    let instances = app.store.list_instances(enterprise.id).await?;
    let now = OffsetDateTime::now_utc();
    let stale_after = time::Duration::days(i64::from(app.config.stale_after_days));
    let agent_window = app.agent_presence_window();
    let server_instances: Vec<Value> = instances
        .iter()
        .filter(|instance| instance.retired_at.is_none())
        .map(|instance| instance_status(instance, stale_after, agent_window, now))
        .collect();
    Ok(Json(json!({ "server_instances": server_instances })))
}

/// Reads a request body up to the configured limit.
async fn read_body(app: &App, body: Body) -> ServiceResult<Bytes> {
    read_body_up_to(body, app.config.max_upload_bytes, "max_upload_bytes").await
}

/// Reads a request body up to `limit` bytes; `limit_name` says which limit in the error.
async fn read_body_up_to(body: Body, limit: usize, limit_name: &str) -> ServiceResult<Bytes> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ServiceError::new(
            ErrorKind::ResourceExhausted,
            format!("the request body is over the {limit}-byte limit ({limit_name})"),
        )
    })
}

/// Parses JSON without echoing input values in the error (they may hold email addresses).
fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> ServiceResult<T> {
    serde_json::from_slice(bytes).map_err(|err| {
        let problem = match err.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                "is not valid JSON"
            }
            serde_json::error::Category::Data => "does not have the expected fields and types",
            serde_json::error::Category::Io => "could not be read",
        };
        ServiceError::invalid(format!(
            "the body {problem} (line {}, column {}): expected {what}",
            err.line(),
            err.column()
        ))
    })
}

/// "Add server usage": the manual upload of a usage file exported by an agent. The span `aggregator.upload` is
/// the root of the upload's trace (validation, commit and merge are its children, as for a streamed sync).
#[tracing::instrument(name = "aggregator.upload", skip_all, fields(otel.kind = "server"))]
async fn upload_usage(
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
    let value: Value = parse_json(&bytes, what).map_err(malformed)?;
    match value.get("format").and_then(Value::as_str) {
        Some(UsageFile::FORMAT) => {}
        Some(other) => {
            return Err(malformed(ServiceError::invalid(format!(
                "unsupported usage file format {other:?}; this aggregator reads {:?}",
                UsageFile::FORMAT
            ))));
        }
        None => {
            return Err(malformed(ServiceError::invalid(format!(
                "the body has no \"format\" field: expected {what}"
            ))));
        }
    }
    drop(value);
    let file: UsageFile = parse_json(&bytes, what).map_err(malformed)?;
    let instance = app
        .store
        .instance_for_upload(
            enterprise.id,
            file.meta.instance.server_id,
            &file.meta.instance.hostname,
        )
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

#[derive(Deserialize)]
#[serde(untagged)]
enum MembersBody {
    List(Vec<CloudMember>),
    Wrapped { members: Vec<CloudMember> },
}

/// Replaces the enterprise's cloud members whole.
async fn import_cloud_members(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
    body: Body,
) -> ServiceResult<Json<Value>> {
    let bytes = read_body(&app, body).await?;
    let members = match parse_json::<MembersBody>(
        &bytes,
        "a JSON array of cloud members (or {\"members\": [...]})",
    )? {
        MembersBody::List(members) | MembersBody::Wrapped { members } => members,
    };
    validate_members(&members)?;
    app.store
        .replace_cloud_members(enterprise.id, &members)
        .await?;
    app.views.note_change(enterprise.id);
    tracing::info!(enterprise = %enterprise.slug, members = members.len(), "cloud members imported");
    Ok(Json(json!({ "members_imported": members.len() })))
}

pub fn validate_members(members: &[CloudMember]) -> ServiceResult<()> {
    let mut ids = std::collections::HashSet::with_capacity(members.len());
    let mut logins = std::collections::HashSet::with_capacity(members.len());
    for (index, member) in members.iter().enumerate() {
        let entry = index + 1;
        if member.id <= 0 {
            return Err(ServiceError::invalid(format!(
                "member {entry}: `id` must be a positive cloud user id"
            )));
        }
        if member.login.trim().is_empty() {
            return Err(ServiceError::invalid(format!(
                "member {entry} (id {}): `login` is empty",
                member.id
            )));
        }
        if !ids.insert(member.id) {
            return Err(ServiceError::invalid(format!(
                "member {entry}: id {} appears more than once; each cloud account must appear once",
                member.id
            )));
        }
        if !logins.insert(member.login.to_lowercase()) {
            return Err(ServiceError::invalid(format!(
                "member {entry}: login {:?} appears more than once",
                member.login
            )));
        }
    }
    Ok(())
}

fn parse_uuid_segment(text: &str, what: &str) -> ServiceResult<Uuid> {
    Uuid::parse_str(text)
        .map_err(|_| ServiceError::invalid(format!("{text:?} is not a {what} (UUID)")))
}

/// Largest body of the small JSON endpoints (enrollment tokens).
const SMALL_BODY_BYTES: usize = 64 * 1024;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollmentTokenBody {
    expires_in_hours: Option<i64>,
}

/// A one-time enrollment token for an agent; the token is in this answer only.
async fn create_enrollment_token(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
    body: Body,
) -> ServiceResult<Response> {
    let bytes = read_body_up_to(body, SMALL_BODY_BYTES, "of this endpoint").await?;
    let request: EnrollmentTokenBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        EnrollmentTokenBody::default()
    } else {
        parse_json(&bytes, "an empty body or {\"expires_in_hours\": N}")?
    };
    let issued = issue_enrollment_token(&app.store, &enterprise, request.expires_in_hours).await?;
    let body = json!({
        "token": issued.token,
        "expires_at": rfc3339(issued.expires_at),
        "enterprise": enterprise.slug,
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

fn sync_request_json(request: &SyncRequest, server_id: Uuid, now: OffsetDateTime) -> Value {
    let non_empty = |text: &str| (!text.is_empty()).then(|| text.to_owned());
    json!({
        "request_id": request.request_id.to_string(),
        "server_id": server_id.to_string(),
        "state": request.state(now).as_str(),
        "job_id": non_empty(&request.job_id),
        "reason": non_empty(&request.reason),
        "requested_at": rfc3339(request.requested_at),
        "delivered_at": request.delivered_at.map(rfc3339),
        "acked_at": request.acked_at.map(rfc3339),
    })
}

/// "Sync now" from the cloud side: queued for the instance's agent, delivered over its control stream.
async fn sync_now(
    State(app): State<Arc<App>>,
    Path((_, server_id)): Path<(String, String)>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
    headers: HeaderMap,
) -> ServiceResult<Response> {
    let server_id = parse_uuid_segment(&server_id, "server id")?;
    let (request, instance) = app.request_sync_now(&enterprise, server_id).await?;
    let now = OffsetDateTime::now_utc();
    let path = format!(
        "/enterprises/{}/instances/{server_id}/sync-requests/{}",
        enterprise.slug, request.request_id
    );
    let mut body = sync_request_json(&request, server_id, now);
    body["agent_connected"] = json!(instance.agent.connected(now, app.agent_presence_window()));
    body["url"] = json!(format!("{}{path}", base_url(&app, &headers)));
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(location) = HeaderValue::from_str(&path) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

async fn sync_request(
    State(app): State<Arc<App>>,
    Path((_, server_id, request_id)): Path<(String, String, String)>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
) -> ServiceResult<Json<Value>> {
    let server_id = parse_uuid_segment(&server_id, "server id")?;
    let request_id = parse_uuid_segment(&request_id, "sync request id")?;
    let request = app
        .store
        .sync_request(enterprise.id, server_id, request_id)
        .await?
        .ok_or_else(|| {
            ServiceError::not_found(format!(
                "no sync request {request_id} for instance {server_id} (requests are kept 30 days)"
            ))
        })?;
    Ok(Json(sync_request_json(
        &request,
        server_id,
        OffsetDateTime::now_utc(),
    )))
}

async fn retire_instance(
    State(app): State<Arc<App>>,
    Path((_, server_id)): Path<(String, String)>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
) -> ServiceResult<StatusCode> {
    let server_id = Uuid::parse_str(&server_id)
        .map_err(|_| ServiceError::invalid(format!("{server_id:?} is not a server id (UUID)")))?;
    app.store.retire_instance(enterprise.id, server_id).await?;
    app.views.note_change(enterprise.id);
    tracing::info!(enterprise = %enterprise.slug, %server_id, "instance retired");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct ExplainQuery {
    /// `<hostname>:<user id>`, `github.com:<login>`, or a person id.
    account: Option<String>,
    person: Option<String>,
    /// A second account or person id: why are these two licenses?
    other: Option<String>,
}

/// Finds the person holding an account reference or with a person id.
fn find_person<'v>(view: &'v MergedView, reference: &str) -> ServiceResult<&'v Person> {
    if let Some(person) = view.people.person_by_id(reference) {
        return Ok(person);
    }
    let not_found = || {
        ServiceError::not_found(format!(
            "no account or person {reference:?}: use `<hostname>:<user id>`, `github.com:<login>` or a person_id"
        ))
    };
    let (prefix, rest) = reference.rsplit_once(':').ok_or_else(not_found)?;
    let person = if prefix.eq_ignore_ascii_case("github.com") {
        view.people
            .find_cloud_member(rest)
            .and_then(|index| view.people.person_of_cloud_member(index))
    } else {
        let user_id: i64 = rest.parse().map_err(|_| not_found())?;
        view.people
            .find_account(prefix, user_id)
            .and_then(|account| view.people.person_of_account(account))
    };
    person.ok_or_else(not_found)
}

/// "Why is this one license?" and, with `other`, "why are these two licenses?".
async fn license_explanation(
    State(app): State<Arc<App>>,
    Query(query): Query<ExplainQuery>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
) -> ServiceResult<Json<Value>> {
    let reference = query.account.or(query.person).ok_or_else(|| {
        ServiceError::invalid(
            "give `account=<hostname>:<user id>` (or `github.com:<login>`) or `person=<person_id>`",
        )
    })?;
    let view = app.views.merged_view(enterprise.id).await?;
    let person = find_person(&view, &reference)?;
    let (instances, cloud) = (view.people.instance_slots(), view.people.cloud_members());
    let ties = view.people.ties();
    let explanation = explain(person, instances, cloud, ties);
    let Some(other_reference) = query.other else {
        return Ok(Json(json!({ "explanation": explanation })));
    };
    let other = find_person(&view, &other_reference)?;
    let reasons = explain_separation(
        (person, &reference),
        (other, &other_reference),
        instances,
        cloud,
    );
    let same_person = view.people.person_id(person) == view.people.person_id(other);
    Ok(Json(json!({
        "explanation": explanation,
        "other_explanation": explain(other, instances, cloud, ties),
        "same_person": same_person,
        "licenses": if same_person {
            u8::from(person.consumes_license)
        } else {
            u8::from(person.consumes_license) + u8::from(other.consumes_license)
        },
        "reasons": reasons,
    })))
}

async fn likely_duplicates(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
) -> ServiceResult<Json<Value>> {
    let view = app.views.merged_view(enterprise.id).await?;
    Ok(Json(json!({
        "likely_duplicates": *app.views.likely_duplicates(enterprise.id, &view),
        "stats": view.people.stats(),
    })))
}

#[derive(Debug, Deserialize)]
struct HistoryQuery {
    since: Option<String>,
    until: Option<String>,
}

/// The most days one history request may span (ten years).
const MAX_HISTORY_DAYS: i64 = 3660;

fn parse_day(name: &str, value: &str) -> ServiceResult<time::Date> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(value, &format).map_err(|_| {
        ServiceError::invalid(format!(
            "`{name}` must be a date as YYYY-MM-DD, got {value:?}"
        ))
    })
}

/// Daily consumed, purchased and per-instance counts, and the highest count in the period ("max historical
/// users"). `since`/`until` are inclusive UTC dates; the default is the last 90 days.
async fn usage_history(
    State(app): State<Arc<App>>,
    Query(query): Query<HistoryQuery>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
) -> ServiceResult<Json<Value>> {
    let today = OffsetDateTime::now_utc().date();
    let until = match query.until.as_deref() {
        Some(value) => parse_day("until", value)?,
        None => today,
    };
    let since = match query.since.as_deref() {
        Some(value) => parse_day("since", value)?,
        None => until - time::Duration::days(89),
    };
    if since > until {
        return Err(ServiceError::invalid("`since` is after `until`"));
    }
    if (until - since).whole_days() >= MAX_HISTORY_DAYS {
        return Err(ServiceError::invalid(format!(
            "the period is longer than {MAX_HISTORY_DAYS} days; ask for a shorter one"
        )));
    }
    let day = |date: time::Date| crate::time_format::utc_date(date.midnight().assume_utc());
    // Reading the view records today's usage if it is not recorded yet, so the answer includes today.
    if until >= today {
        app.views.merged_view(enterprise.id).await?;
    }
    let days = app
        .store
        .usage_history(enterprise.id, &day(since), &day(until))
        .await?;
    let peak = days
        .iter()
        .max_by_key(|d| (d.max_consumed, std::cmp::Reverse(d.date.clone())));
    let entries: Vec<Value> = days
        .iter()
        .map(|d| {
            json!({
                "date": d.date,
                "consumed": d.consumed,
                "max_consumed": d.max_consumed,
                "purchased": d.purchased,
                "overage": overage(d.consumed.max(0) as u64, d.purchased),
                "instances": d.instances,
            })
        })
        .collect();
    Ok(Json(json!({
        "since": day(since),
        "until": day(until),
        "days": entries,
        "max_consumed": peak.map(|d| d.max_consumed),
        "max_consumed_date": peak.map(|d| d.date.clone()),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_header_has_github_relations() {
        let url = "http://h/enterprises/e/consumed-licenses";
        assert_eq!(link_header(url, 10, 1, 1), None);
        let first = link_header(url, 10, 1, 3).expect("links");
        assert_eq!(
            first,
            "<http://h/enterprises/e/consumed-licenses?per_page=10&page=2>; rel=\"next\", \
             <http://h/enterprises/e/consumed-licenses?per_page=10&page=3>; rel=\"last\""
        );
        let middle = link_header(url, 10, 2, 3).expect("links");
        for rel in ["prev", "next", "last", "first"] {
            assert!(middle.contains(&format!("rel=\"{rel}\"")), "{middle}");
        }
        let last = link_header(url, 10, 3, 3).expect("links");
        assert!(
            last.contains("page=2>; rel=\"prev\"") && !last.contains("next"),
            "{last}"
        );
        // Past the end: prev points at the last page.
        let beyond = link_header(url, 10, 9, 3).expect("links");
        assert!(beyond.contains("page=3>; rel=\"prev\""), "{beyond}");
    }

    #[test]
    fn page_parameters_are_validated_and_clamped() {
        let query = |per_page: Option<&str>, page: Option<&str>| PageQuery {
            per_page: per_page.map(str::to_owned),
            page: page.map(str::to_owned),
        };
        assert_eq!(parse_page(&query(None, None)).ok(), Some((30, 1)));
        assert_eq!(
            parse_page(&query(Some("500"), Some("2"))).ok(),
            Some((100, 2))
        );
        for bad in [
            query(Some("0"), None),
            query(Some("x"), None),
            query(None, Some("-1")),
        ] {
            let err = parse_page(&bad).expect_err("invalid");
            assert_eq!(err.kind, ErrorKind::InvalidArgument);
        }
    }
}
