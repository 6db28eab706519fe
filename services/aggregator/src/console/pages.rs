//! The console's pages. Each reads what its REST counterpart reads, through the same code: the merged view
//! (`crate::view`), the sync status (`rest::status`), "Sync now" (`App::request_sync_now`), the upload path
//! (`rest::upload::apply_usage_file`), explanations (`license_sync_core::merge::explain`). Lists are paginated on
//! the server over the in-memory view, so no page holds more than one page of people, whatever the enterprise's size.

use std::sync::Arc;

use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Redirect, Response};
use license_sync_core::merge::{Explanation, MatchRule, Person, explain, explain_separation};
use maud::{Markup, html};
use serde::Deserialize;
use time::OffsetDateTime;
use uuid::Uuid;

use super::session::{CsrfForm, Signed, csrf_refusal};
use super::{
    ConsoleResult, Nav, csrf_field, enterprise_path, html_response, layout, positive_parameter,
    query_string,
};
use crate::app::App;
use crate::enrollment::issue_enrollment_token;
use crate::error::{ServiceError, ServiceResult};
use crate::people_search::{PeopleSearch, normalise_query};
use crate::rest::explanations::find_person;
use crate::rest::history::peak_day;
use crate::rest::instances::parse_uuid_segment;
use crate::rest::read_body_up_to;
use crate::rest::status::{InstanceStatus, LastSync, active_instances, statuses};
use crate::rest::upload::{NotAUsageFile, UploadRefusal, apply_usage_file};
use crate::store::SyncRequestState;
use crate::time_format::{rfc3339, utc_date};
use crate::view::{MergedView, ViewGuard};

/// People per page of the people list and of the likely duplicates.
pub const PEOPLE_PER_PAGE: usize = 50;
/// The overview's default history, and the longest (as `usage-history` allows).
const DEFAULT_DAYS: usize = 90;
const MAX_DAYS: usize = 3660;
/// Accounts shown in a people row; the explanation lists them all.
const ACCOUNTS_PER_ROW: usize = 5;

fn page(signed: &Signed, nav: Nav, title: &str, body: Markup) -> Response {
    html_response(
        StatusCode::OK,
        layout(title, Some((signed, Some(nav))), body),
    )
}

/// `noun` after `count`, in the singular for exactly one.
pub(super) fn counted(count: impl Into<i128>, one: &str, many: &str) -> String {
    let count = count.into();
    format!("{count} {}", if count == 1 { one } else { many })
}

/// A moment as people read it (`2026-12-03 12:34 UTC`), with the exact RFC 3339 time in `datetime`.
pub(super) fn moment(time: OffsetDateTime) -> Markup {
    let utc = time.to_offset(time::UtcOffset::UTC);
    html! {
        time.moment datetime=(rfc3339(time)) {
            (utc_date(utc)) " " (format!("{:02}:{:02}", utc.hour(), utc.minute())) " UTC"
        }
    }
}

fn moment_or_dash(time: Option<OffsetDateTime>) -> Markup {
    match time {
        Some(time) => moment(time),
        None => html! { "—" },
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct OverviewQuery {
    days: Option<String>,
}

/// `/console/{enterprise}/`: seats, the period's peak, the usage chart and each instance's accounts.
pub(super) async fn overview(
    State(app): State<Arc<App>>,
    signed: Signed,
    Query(query): Query<OverviewQuery>,
) -> ConsoleResult<Response> {
    let days = positive_parameter("days", query.days.as_deref(), DEFAULT_DAYS, MAX_DAYS)?;
    let enterprise = &signed.enterprise;
    // Reading the view records today's usage if it is not recorded yet, so the history includes today.
    let view = app.views.merged_view(enterprise.id).await?;
    let consumed = view.people.total_seats_consumed();
    let purchased = view.seats_purchased;
    let overage = crate::rest::overage(consumed, purchased);
    let instance_usage: Vec<(String, usize, u64)> = view
        .people
        .instances()
        .map(|(_, instance, consuming)| {
            (instance.hostname.clone(), instance.users.len(), consuming)
        })
        .collect();
    drop(view);
    let now = OffsetDateTime::now_utc();
    let until = utc_date(now);
    let since = utc_date(now - time::Duration::days(days as i64 - 1));
    let history = app
        .store
        .usage_history(enterprise.id, &since, &until)
        .await
        .map_err(ServiceError::from)?;
    let peak = peak_day(&history);
    let body = html! {
        h1 { "Overview" }
        section aria-labelledby="seats-heading" {
            h2 #seats-heading { "Seats" }
            dl.figures {
                div { dt { "Consumed" } dd #consumed { (consumed) } }
                div { dt { "Purchased" } dd #purchased { (purchased) } }
                div {
                    dt { "Overage" }
                    dd #overage class=[(overage > 0).then_some("over")] { (overage) }
                }
                div {
                    dt { "Highest in the period" }
                    dd #peak {
                        @match peak {
                            Some(day) => { span.count { (day.max_consumed) } " on " time datetime=(day.date) { (day.date) } }
                            None => { "no usage recorded yet" }
                        }
                    }
                }
            }
        }
        section aria-labelledby="history-heading" {
            h2 #history-heading { "Usage history, last " (days) " days" }
            form #history-range method="get" {
                label for="days" { "Days shown" }
                input #days type="number" name="days" min="1" max=(MAX_DAYS) value=(days);
                button type="submit" { "Show" }
            }
            (super::chart::usage_chart(&history))
            details {
                summary { "The chart's figures" }
                table #usage-history {
                    caption { "Seats per day" }
                    thead {
                        tr {
                            th scope="col" { "Day" }
                            th scope="col" { "Consumed" }
                            th scope="col" { "Highest" }
                            th scope="col" { "Purchased" }
                        }
                    }
                    tbody {
                        @for day in history.iter().rev() {
                            tr { td { (day.date) } td { (day.consumed) } td { (day.max_consumed) } td { (day.purchased) } }
                        }
                    }
                }
            }
        }
        section aria-labelledby="instances-heading" {
            h2 #instances-heading { "Accounts per instance" }
            table #instance-usage {
                thead { tr { th scope="col" { "Instance" } th scope="col" { "Accounts" } th scope="col" { "Consuming accounts" } } }
                tbody {
                    @for (hostname, accounts, consuming) in &instance_usage {
                        tr { th scope="row" { (hostname) } td { (accounts) } td { (consuming) } }
                    }
                }
            }
        }
    };
    Ok(page(&signed, Nav::Overview, "Overview", body))
}

#[derive(Debug, Deserialize)]
pub(super) struct InstancesQuery {
    /// The instance and request of a "Sync now" just made, whose state the page shows.
    server_id: Option<String>,
    request_id: Option<String>,
}

/// `/console/{enterprise}/instances`: the sync status of each active instance, with Sync now and retire.
pub(super) async fn instances(
    State(app): State<Arc<App>>,
    signed: Signed,
    Query(query): Query<InstancesQuery>,
) -> ConsoleResult<Response> {
    let enterprise = &signed.enterprise;
    let now = OffsetDateTime::now_utc();
    let active = active_instances(&app, enterprise).await?;
    let statuses = statuses(&app, &active, now);
    // A request id that does not parse is simply not shown: it is only the page's own redirect that sets it.
    let requested = match (
        query.server_id.as_deref().map(Uuid::parse_str),
        query.request_id.as_deref().map(Uuid::parse_str),
    ) {
        (Some(Ok(server_id)), Some(Ok(request_id))) => app
            .store
            .sync_request(enterprise.id, server_id, request_id)
            .await
            .map_err(ServiceError::from)?
            .map(|request| (server_id, request)),
        _ => None,
    };
    let body = html! {
        h1 { "Instances" }
        p { "Each active GitHub Enterprise Server instance, its last sync and its agent." }
        div.table-scroll {
            table #instances {
                thead {
                    tr {
                        th scope="col" { "Instance" }
                        th scope="col" { "State" }
                        th scope="col" { "Last sync" }
                        th scope="col" { "Agent" }
                        th scope="col" { "Users" }
                        th scope="col" { "Actions" }
                    }
                }
                tbody {
                    @for status in &statuses {
                        (instance_row(&signed, status, requested.as_ref(), now))
                    }
                }
            }
        }
        @if statuses.is_empty() {
            p #no-instances { "No instance yet: create an enrollment token below and enroll an agent with it." }
        }
        section aria-labelledby="enroll-heading" {
            h2 #enroll-heading { "Enroll an agent" }
            form #create-enrollment-token method="post" action=(enterprise_path(&signed, "enrollment-tokens")) {
                (csrf_field(&signed))
                label for="expires-in-hours" { "Token lifetime (hours)" }
                input #expires-in-hours type="number" name="expires_in_hours" min="1" max="720" value="24";
                button type="submit" { "Create an enrollment token" }
            }
        }
    };
    Ok(page(&signed, Nav::Instances, "Instances", body))
}

fn instance_row(
    signed: &Signed,
    status: &InstanceStatus<'_>,
    requested: Option<&(Uuid, crate::store::SyncRequest)>,
    now: OffsetDateTime,
) -> Markup {
    let instance = status.instance;
    let server_id = instance.server_id.to_string();
    let request = requested.filter(|(server, _)| *server == instance.server_id);
    let last_sync_class = match status.last_sync {
        LastSync::Success => "ok",
        LastSync::Failed => "error",
        LastSync::Pending => "pending",
    };
    html! {
        tr id=(format!("instance-{server_id}")) data-server-id=(server_id) {
            th scope="row" {
                span.hostname { (instance.hostname) }
                br;
                span.server-id { (server_id) }
                @if !instance.ghes_version.is_empty() { br; span.version { "GHES " (instance.ghes_version) } }
            }
            td {
                span.sync-state { (status.github_state()) }
                @if status.stale { br; span.stale { "stale: no successful sync recently" } }
            }
            td {
                span.last-sync-date { (moment_or_dash(instance.last_attempt_at)) }
                br;
                span class=(format!("last-sync-status {last_sync_class}")) { (status.last_sync.as_str()) }
                @if !instance.last_error.is_empty() { br; span.last-sync-error { (instance.last_error) } }
                br;
                span.last-success { "last success: " (moment_or_dash(instance.last_success_at)) }
            }
            td {
                span.agent-connected { @if status.agent_connected { "connected" } @else { "not connected" } }
                br; span.agent-last-seen { "last seen: " (moment_or_dash(instance.agent.last_seen_at)) }
                @if let Some(version) = &instance.agent.version { br; span.agent-version { "version " (version) } }
                @if let Some(pending) = instance.agent.pending_deliveries {
                    br;
                    span.pending-deliveries { (counted(pending, "pending delivery", "pending deliveries")) }
                }
            }
            td.users {
                span.user-count { (instance.user_count) } @if instance.user_count == 1 { " user" } @else { " users" }
                @if instance.rows_skipped > 0 {
                    br; span.rows-skipped { (counted(instance.rows_skipped, "row skipped", "rows skipped")) }
                }
            }
            td.actions {
                @if instance.has_credential {
                    form.sync-now method="post"
                        action=(enterprise_path(signed, &format!("instances/{server_id}/sync-now"))) {
                        (csrf_field(signed))
                        button type="submit" aria-label=(format!("Sync now: {}", instance.hostname)) { "Sync now" }
                    }
                } @else {
                    p.no-agent { "No agent enrolled: Sync now needs one (usage arrives by upload)." }
                }
                @if let Some((_, request)) = request {
                    @let state = request.state(now);
                    p.sync-request {
                        "Sync request: "
                        span.sync-request-state role="status" aria-live="polite"
                            data-state=(state.as_str())
                            data-poll-url=[is_waiting(state).then(|| enterprise_path(signed, &format!(
                                "instances/{server_id}/sync-requests/{}", request.request_id)))] {
                            (state.as_str())
                        }
                        @if !request.reason.is_empty() { " (" (request.reason) ")" }
                    }
                }
                form.retire method="get"
                    action=(enterprise_path(signed, &format!("instances/{server_id}/retire"))) {
                    button type="submit" aria-label=(format!("Retire {}", instance.hostname)) { "Retire…" }
                }
            }
        }
    }
}

/// A request still waiting for its agent: the page's script polls its state.
fn is_waiting(state: SyncRequestState) -> bool {
    matches!(
        state,
        SyncRequestState::Queued | SyncRequestState::Delivered
    )
}

/// The form of the instance actions: its CSRF token only.
type ActionForm = Result<Form<CsrfForm>, FormRejection>;

fn checked_change(signed: &Signed, form: ActionForm) -> ConsoleResult<()> {
    let presented = form.ok().and_then(|Form(form)| form.csrf_token);
    signed.check_csrf(presented.as_deref())?;
    signed.require_admin()
}

/// `POST …/instances/{server_id}/sync-now`: queues a "Sync now" and shows its state on the instances page.
pub(super) async fn sync_now(
    State(app): State<Arc<App>>,
    Path((_, server_id)): Path<(String, String)>,
    signed: Signed,
    form: ActionForm,
) -> ConsoleResult<Response> {
    checked_change(&signed, form)?;
    let server_id = parse_uuid_segment(&server_id, "server id")?;
    let (request, _) = app.request_sync_now(&signed.enterprise, server_id).await?;
    let query = query_string([
        ("server_id", server_id.to_string().as_str()),
        ("request_id", request.request_id.to_string().as_str()),
    ]);
    Ok(Redirect::to(&format!(
        "{}?{query}#instance-{server_id}",
        enterprise_path(&signed, "instances")
    ))
    .into_response())
}

/// `GET …/instances/{server_id}/sync-requests/{request_id}`: the request's state as JSON, for the page's poll.
pub(super) async fn sync_request_state(
    State(app): State<Arc<App>>,
    Path((_, server_id, request_id)): Path<(String, String, String)>,
    signed: Signed,
) -> ConsoleResult<Response> {
    let server_id = parse_uuid_segment(&server_id, "server id")?;
    let request_id = parse_uuid_segment(&request_id, "sync request id")?;
    let request = app
        .store
        .sync_request(signed.enterprise.id, server_id, request_id)
        .await
        .map_err(ServiceError::from)?
        .ok_or_else(|| ServiceError::not_found(format!("no sync request {request_id}")))?;
    let state = request.state(OffsetDateTime::now_utc());
    let mut response = Json(serde_json::json!({
        "state": state.as_str(),
        "waiting": is_waiting(state),
        "reason": request.reason,
    }))
    .into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    Ok(response)
}

/// `GET …/instances/{server_id}/retire`: the confirmation step.
pub(super) async fn retire_page(
    State(app): State<Arc<App>>,
    Path((_, server_id)): Path<(String, String)>,
    signed: Signed,
) -> ConsoleResult<Response> {
    let server_id = parse_uuid_segment(&server_id, "server id")?;
    let instance = app
        .store
        .instance_by_server_id(signed.enterprise.id, server_id)
        .await
        .map_err(ServiceError::from)?
        .filter(|instance| instance.retired_at.is_none())
        .ok_or_else(|| crate::store::no_active_instance(server_id))?;
    let body = html! {
        h1 { "Retire " (instance.hostname) "?" }
        p { "Its " (counted(instance.user_count, "user stops", "users stop")) " counting at once and its agent's \
             credential stops working. Enrolling the agent again brings it back." }
        form #retire-form method="post" action=(enterprise_path(&signed, &format!("instances/{server_id}/retire"))) {
            (csrf_field(&signed))
            button #confirm-retire type="submit" { "Retire " (instance.hostname) }
            " "
            a href=(enterprise_path(&signed, "instances")) { "Cancel" }
        }
    };
    Ok(page(&signed, Nav::Instances, "Retire an instance", body))
}

/// `POST …/instances/{server_id}/retire`.
pub(super) async fn retire(
    State(app): State<Arc<App>>,
    Path((_, server_id)): Path<(String, String)>,
    signed: Signed,
    form: ActionForm,
) -> ConsoleResult<Response> {
    checked_change(&signed, form)?;
    let server_id = parse_uuid_segment(&server_id, "server id")?;
    app.store
        .retire_instance(signed.enterprise.id, server_id, OffsetDateTime::now_utc())
        .await
        .map_err(ServiceError::from)?;
    app.views.note_change(signed.enterprise.id);
    tracing::info!(enterprise = %signed.enterprise.slug, %server_id, "instance retired from the console");
    Ok(Redirect::to(&enterprise_path(&signed, "instances")).into_response())
}

#[derive(Debug, Deserialize)]
pub(super) struct EnrollmentForm {
    csrf_token: Option<String>,
    expires_in_hours: Option<String>,
}

/// `POST …/enrollment-tokens`: a one-time enrollment token, shown on this page only.
pub(super) async fn create_enrollment_token(
    State(app): State<Arc<App>>,
    signed: Signed,
    form: Result<Form<EnrollmentForm>, FormRejection>,
) -> ConsoleResult<Response> {
    let Ok(Form(form)) = form else {
        return Err(csrf_refusal());
    };
    signed.check_csrf(form.csrf_token.as_deref())?;
    signed.require_admin()?;
    let hours = match form.expires_in_hours.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(text.parse::<i64>().map_err(|_| {
            ServiceError::invalid(
                "the token lifetime must be a whole number of hours, from 1 to 720",
            )
        })?),
    };
    let issued = issue_enrollment_token(&app.store, &signed.enterprise, hours).await?;
    let body = html! {
        h1 { "Enrollment token created" }
        p { "Copy it now: it is shown only once, and works once, until " (moment(issued.expires_at)) "." }
        p { label for="enrollment-token" { "Enrollment token" } }
        p { input #enrollment-token type="text" readonly value=(issued.token) size="50"; }
        p { "On the GHES side, save it to a file and run " code { "license-sync-agent enroll --token-file FILE" } "." }
        p { a href=(enterprise_path(&signed, "instances")) { "Back to the instances" } }
    };
    let mut response = page(&signed, Nav::Instances, "Enrollment token", body);
    *response.status_mut() = StatusCode::CREATED;
    Ok(response)
}

/// Which consuming people the people list shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeopleFilter {
    All,
    /// Only GHES accounts, no cloud account.
    Server,
    /// Only a cloud account.
    Cloud,
    /// A cloud account and GHES accounts.
    Both,
    /// A tie rule decided which cloud member an account joined.
    Ambiguous,
}

impl PeopleFilter {
    const ALL: [PeopleFilter; 5] = [
        PeopleFilter::All,
        PeopleFilter::Server,
        PeopleFilter::Cloud,
        PeopleFilter::Both,
        PeopleFilter::Ambiguous,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PeopleFilter::All => "all",
            PeopleFilter::Server => "server",
            PeopleFilter::Cloud => "cloud",
            PeopleFilter::Both => "both",
            PeopleFilter::Ambiguous => "ambiguous",
        }
    }

    fn label(self) -> &'static str {
        match self {
            PeopleFilter::All => "Everyone",
            PeopleFilter::Server => "Server accounts only",
            PeopleFilter::Cloud => "Cloud account only",
            PeopleFilter::Both => "Cloud and server accounts",
            PeopleFilter::Ambiguous => "Ambiguous matches",
        }
    }

    fn parse(value: Option<&str>) -> ServiceResult<Self> {
        match value {
            None | Some("") => Ok(PeopleFilter::All),
            Some(text) => PeopleFilter::ALL
                .into_iter()
                .find(|filter| filter.as_str() == text)
                .ok_or_else(|| {
                    ServiceError::invalid(
                        "`filter` must be one of all, server, cloud, both, ambiguous",
                    )
                }),
        }
    }

    fn keeps(self, person: &Person) -> bool {
        let cloud = person.cloud_member.is_some();
        let server = !person.server_accounts.is_empty();
        match self {
            PeopleFilter::All => true,
            PeopleFilter::Server => server && !cloud,
            PeopleFilter::Cloud => cloud && !server,
            PeopleFilter::Both => cloud && server,
            PeopleFilter::Ambiguous => person.ambiguous(),
        }
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct PeopleQuery {
    q: Option<String>,
    filter: Option<String>,
    page: Option<String>,
}

/// The view's people search, built off the async threads when this generation has none yet (a pass over every
/// consuming person: about 0.1 s per million accounts in release); the view comes back with it.
async fn people_search(
    app: &App,
    enterprise_id: i64,
    view: ViewGuard,
) -> ServiceResult<(ViewGuard, Arc<PeopleSearch>)> {
    if let Some(search) = app
        .views
        .cached_people_search(enterprise_id, view.generation)
    {
        return Ok((view, search));
    }
    let (view, search) = tokio::task::spawn_blocking(move || {
        let search = Arc::new(PeopleSearch::build(&view));
        (view, search)
    })
    .await
    .map_err(|error| ServiceError::internal("building the people search", error))?;
    app.views
        .cache_people_search(enterprise_id, Arc::clone(&search));
    Ok((view, search))
}

/// The positions (in the consuming order) of the people a query (matched by `search`) and filter select; `None`
/// for everyone (no query, no filter), which needs no list.
fn selected_people(
    view: &MergedView,
    search: Option<&PeopleSearch>,
    query: &str,
    filter: PeopleFilter,
) -> Option<Vec<u32>> {
    let consuming = view.people.consuming();
    let keeps = |position: &u32| {
        consuming
            .get(*position as usize)
            .and_then(|&slot| view.people.person(slot))
            .is_some_and(|person| filter.keeps(person))
    };
    if let Some(search) = search.filter(|_| !query.is_empty()) {
        let mut found = search.matching(query);
        found.retain(keeps);
        return Some(found);
    }
    if filter == PeopleFilter::All {
        return None;
    }
    Some((0..consuming.len() as u32).filter(keeps).collect())
}

/// A person's name and login as listed: its cloud member's, or its first GHES account's login.
fn person_names<'v>(view: &'v MergedView, person: &Person) -> (&'v str, Option<&'v str>) {
    if let Some(member) = person
        .cloud_member
        .and_then(|index| view.people.cloud_members().get(index as usize))
    {
        return (member.login, member.name);
    }
    let login = person
        .server_accounts
        .first()
        .and_then(|link| {
            view.people
                .instance_slots()
                .get(link.account.instance as usize)
                .map(|instance| instance.users.login(link.account.user as usize))
        })
        .unwrap_or("");
    (login, None)
}

/// `<hostname>:<user id>` of a person's GHES accounts.
fn account_references(view: &MergedView, person: &Person) -> Vec<String> {
    let instances = view.people.instance_slots();
    person
        .server_accounts
        .iter()
        .filter_map(|link| {
            let instance = instances.get(link.account.instance as usize)?;
            Some(format!(
                "{}:{}",
                instance.hostname,
                instance.users.id(link.account.user as usize)
            ))
        })
        .collect()
}

fn kind_of(person: &Person) -> PeopleFilter {
    match (
        person.cloud_member.is_some(),
        person.server_accounts.is_empty(),
    ) {
        (true, false) => PeopleFilter::Both,
        (true, true) => PeopleFilter::Cloud,
        _ => PeopleFilter::Server,
    }
}

/// `/console/{enterprise}/people?q=&filter=&page=`: the consuming people, searched, filtered and paginated.
pub(super) async fn people(
    State(app): State<Arc<App>>,
    signed: Signed,
    Query(query): Query<PeopleQuery>,
) -> ConsoleResult<Response> {
    let filter = PeopleFilter::parse(query.filter.as_deref())?;
    let page_number = positive_parameter("page", query.page.as_deref(), 1, usize::MAX)?;
    let raw_query: String = query.q.as_deref().unwrap_or("").chars().take(200).collect();
    let search = normalise_query(&raw_query);
    let mut view = app.views.merged_view(signed.enterprise.id).await?;
    let mut people_search_index = None;
    if !search.is_empty() {
        let (returned, index) = people_search(&app, signed.enterprise.id, view).await?;
        view = returned;
        people_search_index = Some(index);
    }
    let selected = selected_people(&view, people_search_index.as_deref(), &search, filter);
    let consuming = view.people.consuming();
    let total = selected.as_ref().map_or(consuming.len(), Vec::len);
    let last_page = total.div_ceil(PEOPLE_PER_PAGE).max(1);
    let start = (page_number - 1).saturating_mul(PEOPLE_PER_PAGE).min(total);
    let end = start.saturating_add(PEOPLE_PER_PAGE).min(total);
    let positions: Vec<u32> = match &selected {
        Some(selected) => selected[start..end].to_vec(),
        None => (start as u32..end as u32).collect(),
    };
    let people: Vec<(String, &Person)> = positions
        .iter()
        .filter_map(|&position| {
            let person = view.people.person(*consuming.get(position as usize)?)?;
            Some((view.people.person_id(person).to_string(), person))
        })
        .collect();
    let link_to = |page: usize| {
        let page = page.to_string();
        let mut pairs = vec![];
        if !raw_query.is_empty() {
            pairs.push(("q", raw_query.as_str()));
        }
        if filter != PeopleFilter::All {
            pairs.push(("filter", filter.as_str()));
        }
        pairs.push(("page", page.as_str()));
        format!(
            "{}?{}",
            enterprise_path(&signed, "people"),
            query_string(pairs)
        )
    };
    let body = html! {
        h1 { "People" }
        p { "The people who consume a license, in GitHub's order. Open one to see why its accounts are one license." }
        form #people-search method="get" role="search" {
            label for="q" { "Search by login, name, email or host:id" }
            input #q type="search" name="q" value=(raw_query);
            label for="filter" { "Show" }
            select #filter name="filter" {
                @for option in PeopleFilter::ALL {
                    option value=(option.as_str()) selected[option == filter] { (option.label()) }
                }
            }
            button type="submit" { "Search" }
        }
        p #people-summary {
            span #people-total { (total) } @if total == 1 { " person matches" } @else { " people match" } " · page " (page_number.min(last_page)) " of " (last_page)
        }
        form #compare-form method="get" action=(enterprise_path(&signed, "compare")) {
            div.table-scroll {
                table #people {
                    thead {
                        tr {
                            th scope="col" { span.visually-hidden { "Compare" } }
                            th scope="col" { "Login" }
                            th scope="col" { "Name" }
                            th scope="col" { "Accounts" }
                            th scope="col" { "Emails" }
                            th scope="col" { "Kind" }
                            th scope="col" { "Why one license" }
                        }
                    }
                    tbody {
                        @for (person_id, person) in &people {
                            @let (login, name) = person_names(&view, person);
                            @let accounts = account_references(&view, person);
                            @let checkbox = format!("compare-{person_id}");
                            tr data-person-id=(person_id) {
                                td {
                                    input type="checkbox" name="compare" value=(person_id) id=(checkbox);
                                    label.visually-hidden for=(checkbox) { "Compare " (login) }
                                }
                                th scope="row" { (login) }
                                td { (name.unwrap_or("")) }
                                td.accounts {
                                    @for account in accounts.iter().take(ACCOUNTS_PER_ROW) { span.account { (account) } " " }
                                    @if accounts.len() > ACCOUNTS_PER_ROW { "and " (accounts.len() - ACCOUNTS_PER_ROW) " more" }
                                }
                                td.emails {
                                    @for email in crate::consumed_user::server_emails(&view, person).iter().take(ACCOUNTS_PER_ROW) {
                                        span.email { (email) } " "
                                    }
                                }
                                td {
                                    (kind_of(person).as_str())
                                    @if person.ambiguous() { " " span.ambiguous { "(ambiguous)" } }
                                }
                                td {
                                    a.explain href=(enterprise_path(&signed, &format!("people/{person_id}"))) {
                                        "Explain " span.visually-hidden { (login) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            @if people.is_empty() { p #no-people { "Nobody matches." } }
            button #compare-submit type="submit" { "Compare the two selected (why two licenses?)" }
        }
        nav.pagination aria-label="Pages" {
            @if page_number > 1 { a rel="prev" href=(link_to((page_number - 1).min(last_page))) { "Previous page" } " " }
            @if page_number < last_page { a rel="next" href=(link_to(page_number + 1)) { "Next page" } }
        }
    };
    Ok(page(&signed, Nav::People, "People", body))
}

fn rule_words(rule: Option<&MatchRule>) -> &'static str {
    match rule {
        None => "the cloud account itself",
        Some(MatchRule::Identity { .. }) => "identity attribute",
        Some(MatchRule::VerifiedEmail) => "verified email",
        Some(MatchRule::SamePrimaryEmail) => "same primary email",
        Some(MatchRule::Unmatched) => "unmatched",
        Some(MatchRule::InvalidEmail { .. }) => "invalid email",
    }
}

fn explanation_markup(explanation: &Explanation, heading: &str) -> Markup {
    html! {
        h2 { (heading) }
        p.summary {
            (explanation.summary)
            @if explanation.ambiguous { " A tie rule decided one of its matches." }
        }
        ul.accounts {
            @for account in &explanation.accounts {
                li.account data-account=(account.account)
                    data-consumes=(account.consumes_license) {
                    strong { (account.account) } " (" (account.login) "): "
                    span.rule { (rule_words(account.rule.as_ref())) }
                    " — " (account.detail) ". "
                    span.consumes class=[account.consumes_license.then_some("yes")] {
                        @if account.consumes_license { "Consumes a license" } @else { "Does not consume a license" }
                        " (" (account.consumption) ")."
                    }
                    @if !account.tied_with.is_empty() { " Also matched: " (account.tied_with.join(", ")) "." }
                }
            }
        }
    }
}

/// `/console/{enterprise}/people/{person_id}`: "why one license".
pub(super) async fn person(
    State(app): State<Arc<App>>,
    Path((_, person_id)): Path<(String, String)>,
    signed: Signed,
) -> ConsoleResult<Response> {
    let view = app.views.merged_view(signed.enterprise.id).await?;
    let person = find_person(&view, &person_id)?;
    let people = &view.people;
    let explanation = explain(
        person,
        people.instance_slots(),
        people.cloud_members(),
        people.ties(),
    );
    let (login, _) = person_names(&view, person);
    let body = html! {
        h1 { "Why one license: " (login) }
        section #explanation data-person-id=(explanation.person_id) {
            (explanation_markup(&explanation, "Accounts of this person"))
            p { "Person id: " code { (explanation.person_id) } ". Total accounts: " (explanation.total_user_accounts) "." }
        }
        p { a href=(enterprise_path(&signed, "people")) { "Back to the people" } }
    };
    Ok(page(&signed, Nav::People, "Why one license", body))
}

/// `/console/{enterprise}/compare?a=ID&b=ID` (or `?compare=ID&compare=ID` from the people list's checkboxes):
/// "why two licenses?".
pub(super) async fn compare(
    State(app): State<Arc<App>>,
    signed: Signed,
    Query(pairs): Query<Vec<(String, String)>>,
) -> ConsoleResult<Response> {
    let chosen: Vec<&str> = pairs
        .iter()
        .filter(|(name, value)| matches!(name.as_str(), "a" | "b" | "compare") && !value.is_empty())
        .map(|(_, value)| value.as_str())
        .collect();
    let [first, second] = chosen.as_slice() else {
        return Err(ServiceError::invalid(format!(
            "choose exactly two people to compare ({} chosen): tick two in the people list, or give `a=` and `b=`",
            chosen.len()
        ))
        .into());
    };
    let view = app.views.merged_view(signed.enterprise.id).await?;
    let people = &view.people;
    let (instances, cloud, ties) = (
        people.instance_slots(),
        people.cloud_members(),
        people.ties(),
    );
    let person_a = find_person(&view, first)?;
    let person_b = find_person(&view, second)?;
    let reasons = explain_separation((person_a, first), (person_b, second), instances, cloud);
    let same_person = people.person_id(person_a) == people.person_id(person_b);
    let licenses = if same_person {
        u8::from(person_a.consumes_license)
    } else {
        u8::from(person_a.consumes_license) + u8::from(person_b.consumes_license)
    };
    let (login_a, _) = person_names(&view, person_a);
    let (login_b, _) = person_names(&view, person_b);
    let body = html! {
        h1 { "Why two licenses? " (login_a) " and " (login_b) }
        section #comparison data-licenses=(licenses) data-same-person=(same_person) {
            p.verdict {
                @if same_person { "These are the same person: one license at most." }
                @else { "These are two people: " (counted(licenses, "license", "licenses")) " between them." }
            }
            h2 { "Why they were not merged" }
            ul.reasons { @for reason in &reasons { li { (reason) } } }
            div.side-by-side {
                section.person-a { (explanation_markup(&explain(person_a, instances, cloud, ties), &format!("First: {login_a}"))) }
                section.person-b { (explanation_markup(&explain(person_b, instances, cloud, ties), &format!("Second: {login_b}"))) }
            }
        }
        p { a href=(enterprise_path(&signed, "people")) { "Back to the people" } }
    };
    Ok(page(&signed, Nav::People, "Why two licenses", body))
}

#[derive(Debug, Deserialize)]
pub(super) struct PageOnlyQuery {
    page: Option<String>,
}

/// `/console/{enterprise}/duplicates`: the likely duplicates with their reasons, each pair linked to a comparison.
pub(super) async fn duplicates(
    State(app): State<Arc<App>>,
    signed: Signed,
    Query(query): Query<PageOnlyQuery>,
) -> ConsoleResult<Response> {
    let page_number = positive_parameter("page", query.page.as_deref(), 1, usize::MAX)?;
    let view = app.views.merged_view(signed.enterprise.id).await?;
    let duplicates = app.views.likely_duplicates(signed.enterprise.id, &view);
    drop(view);
    let total = duplicates.len();
    let last_page = total.div_ceil(PEOPLE_PER_PAGE).max(1);
    let start = (page_number - 1).saturating_mul(PEOPLE_PER_PAGE).min(total);
    let end = start.saturating_add(PEOPLE_PER_PAGE).min(total);
    let link_to = |page: usize| {
        format!(
            "{}?{}",
            enterprise_path(&signed, "duplicates"),
            query_string([("page", page.to_string().as_str())])
        )
    };
    let compare_link = |a: &str, b: &str| {
        format!(
            "{}?{}",
            enterprise_path(&signed, "compare"),
            query_string([("a", a), ("b", b)])
        )
    };
    let body = html! {
        h1 { "Likely duplicates" }
        p { "People who consume a license each and share a login or a display name: perhaps one human. Compare a pair to see why they were not merged." }
        p #duplicates-total { (counted(total as u64, "group", "groups")) }
        div.table-scroll {
            table #duplicates {
                thead { tr { th scope="col" { "Reason" } th scope="col" { "People" } th scope="col" { "Compare" } } }
                tbody {
                    @for duplicate in &duplicates[start..end] {
                        tr {
                            td.reason {
                                @match &duplicate.reason {
                                    license_sync_core::merge::DuplicateReason::SameLogin(login) => { "same login: " strong { (login) } }
                                    license_sync_core::merge::DuplicateReason::SameName(name) => { "same name: " strong { (name) } }
                                }
                            }
                            td {
                                @for person_id in &duplicate.people {
                                    a href=(enterprise_path(&signed, &format!("people/{person_id}"))) { (person_id) } " "
                                }
                            }
                            td {
                                @if let Some((first, others)) = duplicate.people.split_first() {
                                    @for other in others.iter().take(ACCOUNTS_PER_ROW) {
                                        a.compare href=(compare_link(first, other)) { "Compare " (first) " and " (other) } " "
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        nav.pagination aria-label="Pages" {
            @if page_number > 1 { a rel="prev" href=(link_to((page_number - 1).min(last_page))) { "Previous page" } " " }
            @if page_number < last_page { a rel="next" href=(link_to(page_number + 1)) { "Next page" } }
        }
    };
    Ok(page(&signed, Nav::Duplicates, "Likely duplicates", body))
}

/// What an upload came to, for `#upload-result`.
enum UploadResult {
    Applied(crate::app::Receipt),
    AlreadyApplied(crate::app::Receipt),
    Error(UploadRefusal),
}

/// What the upload page says of a refusal. REST's message speaks of a request body; a person chose a file, so a
/// file that is not a usage file at all is described as a file, with what to do. Every other refusal (a wrong
/// instance, a newer snapshot, a key that does not decrypt) already names the file's problem and keeps its words.
fn upload_refusal_message(refusal: &UploadRefusal) -> String {
    let export = "a usage file exported by `license-sync-agent export`";
    let again =
        "choose the file exactly as the export wrote it (encrypted or not) and upload it again";
    match refusal.not_a_usage_file {
        Some(NotAUsageFile::NotJson { line, column }) => format!(
            "This file is not {export}: it is not even JSON (it goes wrong at line {line}, column {column}). Perhaps \
             another file was chosen, or this one was cut short or edited; {again}."
        ),
        Some(NotAUsageFile::WrongFields { line, column }) => format!(
            "This file is JSON but not {export}: its contents are not a usage file's fields (line {line}, column \
             {column}). Perhaps another JSON file was chosen, or this one was edited; {again}."
        ),
        Some(NotAUsageFile::NoFormat) => format!(
            "This file is not {export}: it has no \"format\" field, which every usage file starts with; {again}."
        ),
        None => refusal.error.message.clone(),
    }
}

fn upload_markup(signed: &Signed, result: Option<&UploadResult>) -> Markup {
    html! {
        h1 { "Add server usage" }
        p { "Upload a usage file exported by " code { "license-sync-agent export" } " (encrypted or not) for an instance \
             whose agent cannot reach the aggregator." }
        @if let Some(result) = result {
            @match result {
                UploadResult::Applied(receipt) => {
                    section #upload-result.applied role="status" {
                        h2 { "Applied" }
                        p { (counted(receipt.users_accepted, "user", "users")) " of instance " code { (receipt.server_id) }
                            @if receipt.users_accepted == 1 { " was" } @else { " were" }
                            " applied (sync " code { (receipt.sync_id) } ", at " (moment(receipt.committed_at)) ")." }
                    }
                }
                UploadResult::AlreadyApplied(receipt) => {
                    section #upload-result.already-applied role="status" {
                        h2 { "Already applied" }
                        p { "This file (sync " code { (receipt.sync_id) } ") was applied before, at " (moment(receipt.committed_at))
                            "; nothing changed." }
                    }
                }
                UploadResult::Error(refusal) => {
                    section #upload-result.error role="alert" {
                        h2 { "Not applied" }
                        p #upload-error-message { (upload_refusal_message(refusal)) }
                    }
                }
            }
        }
        form #upload method="post" enctype="multipart/form-data" action=(enterprise_path(signed, "upload")) {
            (csrf_field(signed))
            p {
                label for="usage-file" { "Usage file" }
                input #usage-file type="file" name="file" required;
            }
            button #upload-submit type="submit" { "Upload" }
        }
    }
}

pub(super) async fn upload_page(signed: Signed) -> Response {
    let markup = upload_markup(&signed, None);
    page(&signed, Nav::Upload, "Add server usage", markup)
}

/// The file and CSRF token of an upload: a multipart form (`file`, `csrf_token`), or the raw file as the body
/// with the token in `X-CSRF-Token` (scripts).
async fn upload_parts(
    app: &App,
    request: Request,
) -> ServiceResult<(Option<String>, Option<axum::body::Bytes>)> {
    let is_multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("multipart/form-data"));
    if !is_multipart {
        let token = request
            .headers()
            .get("x-csrf-token")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let bytes = read_body_up_to(
            request.into_body(),
            app.config.max_upload_bytes,
            "max_upload_bytes",
        )
        .await?;
        return Ok((token, Some(bytes)));
    }
    let unreadable = |error: axum::extract::multipart::MultipartError| {
        ServiceError::invalid(format!(
            "the upload form could not be read ({}): choose the file again and resubmit",
            error.body_text()
        ))
    };
    let mut multipart = Multipart::from_request(request, &())
        .await
        .map_err(|error| {
            ServiceError::invalid(format!("the upload is not a form: {}", error.body_text()))
        })?;
    let (mut token, mut file) = (None, None);
    while let Some(field) = multipart.next_field().await.map_err(unreadable)? {
        match field.name() {
            Some("csrf_token") => token = Some(field.text().await.map_err(unreadable)?),
            Some("file") => file = Some(field.bytes().await.map_err(unreadable)?),
            _ => {}
        }
    }
    Ok((token, file))
}

/// `POST /console/{enterprise}/upload`: the REST upload's path into the app, with its result on the page. Its span
/// is the root of the upload's trace, as the REST upload's is.
#[tracing::instrument(name = "aggregator.upload", skip_all, fields(otel.kind = "server"))]
pub(super) async fn upload(
    State(app): State<Arc<App>>,
    signed: Signed,
    request: Request,
) -> ConsoleResult<Response> {
    // A form that cannot be read is refused as it is: its token cannot be checked, so nothing is applied.
    let (token, file) = upload_parts(&app, request).await?;
    signed.check_csrf(token.as_deref())?;
    signed.require_admin()?;
    let result = match file.filter(|bytes| !bytes.is_empty()) {
        None => UploadResult::Error(
            ServiceError::invalid(
                "No file was chosen, or it is empty: choose the usage file the agent exported and upload it.",
            )
            .into(),
        ),
        Some(bytes) => match apply_usage_file(&app, &signed.enterprise, bytes).await {
            Ok(receipt) if receipt.duplicate => UploadResult::AlreadyApplied(receipt),
            Ok(receipt) => UploadResult::Applied(receipt),
            Err(error) => UploadResult::Error(error),
        },
    };
    let status = match &result {
        UploadResult::Applied(_) => StatusCode::CREATED,
        UploadResult::AlreadyApplied(_) => StatusCode::OK,
        UploadResult::Error(refusal) => refusal.error.kind.http_status(),
    };
    let markup = upload_markup(&signed, Some(&result));
    let mut response = page(&signed, Nav::Upload, "Add server usage", markup);
    *response.status_mut() = status;
    Ok(response)
}

/// `/console/{enterprise}/downloads`.
pub(super) async fn downloads(signed: Signed) -> Response {
    let body = html! {
        h1 { "Downloads" }
        ul {
            li {
                a #download-csv href=(enterprise_path(&signed, "downloads/consumed-licenses.csv")) download {
                    "Consumed licenses (CSV)"
                }
                " — every consuming person, in GitHub's report format."
            }
        }
    };
    page(&signed, Nav::Downloads, "Downloads", body)
}

/// `/console/{enterprise}/downloads/consumed-licenses.csv`: the REST report's bytes (`crate::report`), with the
/// session instead of a token.
pub(super) async fn consumed_licenses_csv(
    State(app): State<Arc<App>>,
    signed: Signed,
) -> ConsoleResult<Response> {
    Ok(crate::report::consumed_licenses_csv(&app, &signed.enterprise).await?)
}
