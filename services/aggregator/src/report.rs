//! The CSV license report (`GET /enterprises/{enterprise}/consumed-licenses.csv`, `license-sync-aggregator report`):
//! one row per consuming person, in the order of `consumed-licenses`, under GitHub's license report columns (see
//! "The CSV license report" in ARCHITECTURE.md for the page they come from), then ours.
//!
//! The invariant: memory does not grow with the enterprise and the view's lock is never held while a client reads.
//! The report is written in parts of [`ROWS_PER_PART`] people; each part takes the view's read guard, writes its
//! rows and lets the guard go before the part is sent, and the next part resumes after the sort key of the last
//! person written ([`ConsumingCursor`]), so a commit applied between two parts neither repeats nor skips anyone who
//! is in both generations. The writer ([`write_next_part`]) is a pure function over the view, shared by the route
//! and the command line, so both give the same bytes.

use std::borrow::Cow;
use std::fmt::{Display, Write as _};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use license_sync_core::incremental::ConsumingCursor;
use license_sync_core::merge::Person;
use time::OffsetDateTime;

use crate::app::App;
use crate::consumed_user::{ConsumedUser, consumed_user, server_emails};
use crate::error::{ServiceError, ServiceResult};
use crate::store::Enterprise;
use crate::time_format::utc_date;
use crate::view::MergedView;

/// GitHub's "GitHub Enterprise Cloud license report" columns, with GitHub's names in GitHub's order.
pub const GITHUB_COLUMNS: [&str; 28] = [
    "GitHub com login",
    "GitHub com name",
    "Enterprise server user ids",
    "GitHub com user",
    "Enterprise server user",
    "Visual studio subscription user",
    "License type",
    "GitHub com profile",
    "GitHub com member roles",
    "GitHub com enterprise roles",
    "GitHub com verified domain emails",
    "GitHub com saml name",
    "GitHub com orgs with pending invites",
    "GitHub com two factor auth",
    "GitHub com two factor auth required by date",
    "GitHub com cost center",
    "GitHub com code security license user",
    "GitHub com secret protection license user",
    "Ghe license active",
    "Ghe license start date",
    "Ghe license end date",
    "Enterprise server primary emails",
    "Enterprise server advanced security user ids",
    "Enterprise server code security user ids",
    "Enterprise server secret protection user ids",
    "Visual studio license status",
    "Visual studio subscription email",
    "Total user accounts",
];

/// Ours, after GitHub's: the person's id (for `license-explanations?person=`) and whether a tie rule decided.
pub const OUR_COLUMNS: [&str; 2] = ["Person id", "Ambiguous"];

/// How many people one part of a streamed report holds, which bounds both a download's memory and how long a part
/// holds the view's read guard. 123 bytes a row at 100,000 GHES-only people (a 12.3 MB report), a few hundred with
/// cloud data: a part is 60–150 KB.
pub const ROWS_PER_PART: usize = 500;

/// How GitHub's report separates the values of a multi-valued cell: its reference says "Organizations are delimited
/// by commas", and published samples of the export put a space after each comma.
const JOIN: &str = ", ";

/// Where a report being written stands: header written or not, and after which person.
#[derive(Debug, Default)]
pub struct ReportCursor {
    header_written: bool,
    after: Option<ConsumingCursor>,
    finished: bool,
}

impl ReportCursor {
    /// Every row has been written.
    pub fn is_finished(&self) -> bool {
        self.finished
    }
}

/// A cell a spreadsheet would run as a formula (it begins with `=`, `+`, `-`, `@`, a tab or a carriage return) gets
/// a leading `'`, OWASP's rule against CSV injection: the report holds names and logins that anyone can choose.
fn neutralised(cell: &str) -> Cow<'_, str> {
    match cell.as_bytes().first() {
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r') => Cow::Owned(format!("'{cell}")),
        _ => Cow::Borrowed(cell),
    }
}

fn joined(values: impl Iterator<Item = impl Display>) -> Cow<'static, str> {
    let mut cell = String::new();
    for (position, value) in values.enumerate() {
        if position > 0 {
            cell.push_str(JOIN);
        }
        // Writing into a String cannot fail.
        let _ = write!(cell, "{value}");
    }
    Cow::Owned(cell)
}

fn boolean(value: bool) -> Cow<'static, str> {
    Cow::Borrowed(if value { "true" } else { "false" })
}

/// No data in license-sync for this column (Visual Studio, GHE.com, security products, cost centers): empty.
const NO_DATA: Cow<'static, str> = Cow::Borrowed("");

/// One person's cells, from the same [`ConsumedUser`] the JSON page is written from.
fn cells<'a>(
    user: &'a ConsumedUser<'a>,
) -> [Cow<'a, str>; GITHUB_COLUMNS.len() + OUR_COLUMNS.len()] {
    let text = |value: Option<&'a str>| Cow::Borrowed(value.unwrap_or_default());
    [
        Cow::Borrowed(user.github_com_login),
        text(user.github_com_name),
        joined(user.enterprise_server_user_ids.each()),
        boolean(user.github_com_user),
        user.enterprise_server_user.map_or(NO_DATA, boolean),
        boolean(user.visual_studio_subscription_user),
        // GitHub's report capitalises what its JSON writes in lower case (`enterprise`).
        Cow::Borrowed(match user.license_type {
            "enterprise" => "Enterprise",
            other => other,
        }),
        user.github_com_profile
            .as_ref()
            .map_or(NO_DATA, |profile| Cow::Owned(profile.to_string())),
        joined(user.github_com_member_roles.iter()),
        joined(user.github_com_enterprise_roles.iter()),
        joined(user.github_com_verified_domain_emails.iter()),
        text(user.github_com_saml_name_id),
        joined(user.github_com_orgs_with_pending_invites.iter()),
        user.github_com_two_factor_auth.map_or(NO_DATA, boolean),
        NO_DATA,
        NO_DATA,
        NO_DATA,
        NO_DATA,
        NO_DATA,
        NO_DATA,
        NO_DATA,
        joined(user.enterprise_server_primary_emails.iter()),
        NO_DATA,
        NO_DATA,
        NO_DATA,
        text(user.visual_studio_license_status),
        text(user.visual_studio_subscription_email),
        Cow::Owned(user.total_user_accounts.to_string()),
        Cow::Owned(user.person_id.to_string()),
        boolean(user.ambiguous),
    ]
}

fn write_record<'c, W: std::io::Write>(
    writer: &mut csv::Writer<W>,
    cells: impl IntoIterator<Item = &'c str>,
) -> csv::Result<()> {
    for cell in cells {
        writer.write_field(neutralised(cell).as_bytes())?;
    }
    writer.write_record(std::iter::empty::<&[u8]>())
}

fn write_person<W: std::io::Write>(
    writer: &mut csv::Writer<W>,
    view: &MergedView,
    person: &Person,
    cloud_web_url: &str,
) -> csv::Result<()> {
    let emails = server_emails(view, person);
    let user = consumed_user(view, person, &emails, cloud_web_url);
    write_record(writer, cells(&user).iter().map(|cell| cell.as_ref()))
}

/// Appends the report's next part to `out`: the header first, then up to `rows` people after the cursor, in the
/// order of `consumed-licenses`. Marks the cursor finished after the last person.
pub fn write_next_part(
    view: &MergedView,
    cloud_web_url: &str,
    cursor: &mut ReportCursor,
    rows: usize,
    out: &mut Vec<u8>,
) -> csv::Result<()> {
    if cursor.finished {
        return Ok(());
    }
    let mut writer = csv::WriterBuilder::new().from_writer(&mut *out);
    if !cursor.header_written {
        write_record(
            &mut writer,
            GITHUB_COLUMNS.iter().chain(&OUR_COLUMNS).copied(),
        )?;
        cursor.header_written = true;
    }
    let consuming = view.people.consuming();
    let start = cursor
        .after
        .as_ref()
        .map_or(0, |after| view.people.consuming_after(after));
    let end = start.saturating_add(rows).min(consuming.len());
    let mut last = None;
    for person in consuming[start..end]
        .iter()
        .filter_map(|&slot| view.people.person(slot))
    {
        write_person(&mut writer, view, person, cloud_web_url)?;
        last = Some(person);
    }
    writer.flush()?;
    if let Some(person) = last {
        cursor.after = Some(view.people.consuming_cursor(person));
    }
    cursor.finished = end == consuming.len();
    Ok(())
}

/// The whole report of one view into `out` (the command line's file), in the same parts as the route's.
pub fn write_report(
    view: &MergedView,
    cloud_web_url: &str,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    let mut cursor = ReportCursor::default();
    let mut part = Vec::new();
    while !cursor.is_finished() {
        part.clear();
        write_next_part(view, cloud_web_url, &mut cursor, ROWS_PER_PART, &mut part)
            .map_err(std::io::Error::other)?;
        out.write_all(&part)?;
    }
    Ok(())
}

/// The file name GitHub-style downloads get: `<enterprise>-consumed-licenses-<UTC date>.csv`.
pub fn file_name(enterprise: &Enterprise, now: OffsetDateTime) -> String {
    format!(
        "{}-consumed-licenses-{}.csv",
        enterprise.slug,
        utc_date(now)
    )
}

fn part_error(error: csv::Error) -> ServiceError {
    ServiceError::internal("writing the CSV license report", error)
}

/// The CSV license report of an enterprise as a streamed response: the first part is written before the head is
/// sent (so that a store error is still an HTTP error), the rest as the client reads. The REST route and the
/// console's download both answer with it; the caller has authorised the enterprise.
pub async fn consumed_licenses_csv(
    app: &Arc<App>,
    enterprise: &Enterprise,
) -> ServiceResult<Response> {
    let mut cursor = ReportCursor::default();
    let mut first = Vec::new();
    {
        let view = app.views.merged_view(enterprise.id).await?;
        write_next_part(
            &view,
            &app.config.cloud_web_url,
            &mut cursor,
            ROWS_PER_PART,
            &mut first,
        )
        .map_err(part_error)?;
    }
    let rest = futures::stream::unfold(
        (Arc::clone(app), enterprise.id, cursor),
        |(app, enterprise_id, mut cursor)| async move {
            if cursor.is_finished() {
                return None;
            }
            let part = next_part(&app, enterprise_id, &mut cursor).await;
            if let Err(error) = &part {
                // The head is sent: all that is left is to cut the body short, which the client sees as an error.
                tracing::warn!(enterprise_id, error = %error.message, "the CSV license report was cut short");
                cursor.finished = true;
            }
            Some((
                part.map_err(|error| std::io::Error::other(error.message)),
                (app, enterprise_id, cursor),
            ))
        },
    );
    let body = futures::stream::once(async move { Ok(Bytes::from(first)) }).chain(rest);
    let disposition = format!(
        "attachment; filename=\"{}\"",
        file_name(enterprise, OffsetDateTime::now_utc())
    );
    let disposition = HeaderValue::from_str(&disposition)
        .map_err(|err| ServiceError::internal("naming the CSV license report", err))?;
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/csv; charset=utf-8"),
            ),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

/// One more part, from the view as it is now: the first part already brought it up to date, and asking the store
/// again for each part would cost a query per 500 rows for nothing.
async fn next_part(
    app: &App,
    enterprise_id: i64,
    cursor: &mut ReportCursor,
) -> ServiceResult<Bytes> {
    let mut part = Vec::new();
    let view = app.views.view_as_is(enterprise_id).await?;
    write_next_part(
        &view,
        &app.config.cloud_web_url,
        cursor,
        ROWS_PER_PART,
        &mut part,
    )
    .map_err(part_error)?;
    drop(view);
    Ok(Bytes::from(part))
}

#[cfg(test)]
mod tests {
    use license_sync_core::accounts::Accounts;
    use license_sync_core::cloud::CloudDirectory;
    use license_sync_core::incremental::{InstanceChange, PeopleIndex};
    use license_sync_core::model::{CloudMember, ServerUser, UserRole};

    use super::*;

    const CLOUD_URL: &str = "https://github.com/";

    fn server_user(id: i64, login: &str, email: &str) -> ServerUser {
        ServerUser {
            id,
            login: login.to_owned(),
            email: email.to_owned(),
            role: UserRole::User,
            suspended: false,
            dormant: false,
            created_at: None,
            last_active: None,
            two_factor_enabled: None,
        }
    }

    fn member(id: i64, login: &str, name: &str, email: &str) -> CloudMember {
        CloudMember {
            id,
            login: login.to_owned(),
            name: Some(name.to_owned()),
            verified_emails: vec![email.to_owned()],
            identity: None,
            consumes_license: true,
            member_roles: Vec::new(),
            enterprise_roles: Vec::new(),
            orgs_with_pending_invites: Vec::new(),
            two_factor_auth: None,
            visual_studio_subscription_user: false,
        }
    }

    fn view(members: Vec<CloudMember>, instances: Vec<(&str, Vec<ServerUser>)>) -> MergedView {
        let mut people = PeopleIndex::new(CloudDirectory::from_members(&members));
        people.apply(
            instances
                .into_iter()
                .enumerate()
                .map(|(key, (hostname, users))| InstanceChange::Upsert {
                    key: key as i64 + 1,
                    hostname: hostname.to_owned(),
                    users: Accounts::from_users(&users).expect("small"),
                }),
        );
        MergedView {
            generation: 1,
            seats_purchased: 10,
            people,
        }
    }

    fn report(view: &MergedView) -> Vec<u8> {
        let mut out = Vec::new();
        write_report(view, CLOUD_URL, &mut out).expect("written");
        out
    }

    fn records(bytes: &[u8]) -> Vec<Vec<String>> {
        csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(bytes)
            .records()
            .map(|record| {
                record
                    .expect("a CSV record")
                    .iter()
                    .map(str::to_owned)
                    .collect()
            })
            .collect()
    }

    fn column(name: &str) -> usize {
        GITHUB_COLUMNS
            .iter()
            .chain(&OUR_COLUMNS)
            .position(|column| *column == name)
            .expect("a column")
    }

    #[test]
    fn the_header_is_githubs_columns_in_githubs_order_then_ours() {
        let rows = records(&report(&view(Vec::new(), Vec::new())));
        assert_eq!(rows.len(), 1, "the header alone for an empty enterprise");
        let header = &rows[0];
        assert_eq!(header.len(), 30);
        assert_eq!(header[0], "GitHub com login");
        assert_eq!(header[2], "Enterprise server user ids");
        assert_eq!(header[21], "Enterprise server primary emails");
        assert_eq!(header[27], "Total user accounts");
        assert_eq!(header[28..], ["Person id", "Ambiguous"]);
    }

    #[test]
    fn a_merged_person_fills_githubs_cells_and_joins_multiple_values_with_a_comma() {
        let mut mona = member(7, "mona", "Mona Lisa", "mona@example.com");
        mona.member_roles = vec!["acme:Owner".to_owned(), "acme-labs:Member".to_owned()];
        mona.enterprise_roles = vec!["Member".to_owned()];
        mona.verified_emails
            .push("mona@labs.example.com".to_owned());
        mona.two_factor_auth = Some(true);
        let view = view(
            vec![mona],
            vec![
                (
                    "ghes-a.example",
                    vec![server_user(3, "mona-a", "mona@example.com")],
                ),
                (
                    "ghes-b.example",
                    vec![server_user(11, "mona-b", "MONA@example.com")],
                ),
            ],
        );
        let rows = records(&report(&view));
        assert_eq!(rows.len(), 2);
        let row = &rows[1];
        assert_eq!(row.len(), 30);
        let cell = |name: &str| row[column(name)].as_str();
        assert_eq!(cell("GitHub com login"), "mona");
        assert_eq!(cell("GitHub com name"), "Mona Lisa");
        assert_eq!(
            cell("Enterprise server user ids"),
            "ghes-a.example:3, ghes-b.example:11"
        );
        assert_eq!(cell("GitHub com user"), "true");
        assert_eq!(cell("Enterprise server user"), "true");
        assert_eq!(cell("Visual studio subscription user"), "false");
        assert_eq!(cell("License type"), "Enterprise");
        assert_eq!(cell("GitHub com profile"), "https://github.com/mona");
        assert_eq!(
            cell("GitHub com member roles"),
            "acme:Owner, acme-labs:Member"
        );
        assert_eq!(cell("GitHub com enterprise roles"), "Member");
        assert_eq!(
            cell("GitHub com verified domain emails"),
            "mona@example.com, mona@labs.example.com"
        );
        assert_eq!(cell("GitHub com two factor auth"), "true");
        assert_eq!(cell("GitHub com cost center"), "");
        assert_eq!(cell("Visual studio license status"), "");
        // GHES emails are distinct case-insensitively, as in the JSON.
        assert_eq!(cell("Enterprise server primary emails"), "mona@example.com");
        assert_eq!(cell("Total user accounts"), "3");
        assert_eq!(cell("Person id"), "cloud:7");
        assert_eq!(cell("Ambiguous"), "false");
    }

    #[test]
    fn a_server_only_person_has_empty_cloud_cells() {
        let view = view(
            Vec::new(),
            vec![(
                "ghes-a.example",
                vec![server_user(5, "solo", "solo@example.com")],
            )],
        );
        let rows = records(&report(&view));
        let row = &rows[1];
        let cell = |name: &str| row[column(name)].as_str();
        assert_eq!(cell("GitHub com login"), "");
        assert_eq!(cell("GitHub com user"), "false");
        assert_eq!(cell("GitHub com profile"), "");
        assert_eq!(cell("GitHub com member roles"), "");
        assert_eq!(cell("GitHub com two factor auth"), "");
        assert_eq!(cell("Enterprise server user ids"), "ghes-a.example:5");
        assert_eq!(cell("Person id"), "server:ghes-a.example:5");
    }

    #[test]
    fn every_formula_starting_character_is_neutralised_with_a_quote() {
        let names = [
            "=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "a=b", "", "'quoted",
        ];
        let members: Vec<CloudMember> = names
            .iter()
            .enumerate()
            .map(|(index, name)| {
                let login = format!("user{index}");
                member(
                    index as i64 + 1,
                    &login,
                    name,
                    &format!("{login}@example.com"),
                )
            })
            .collect();
        let rows = records(&report(&view(members, Vec::new())));
        let written: Vec<&str> = rows[1..]
            .iter()
            .map(|row| row[column("GitHub com name")].as_str())
            .collect();
        assert_eq!(
            written,
            [
                "'=1+1",
                "'+1",
                "'-1",
                "'@SUM(A1)",
                "'\tx",
                "'\rx",
                "a=b",
                "",
                "'quoted"
            ]
        );
    }

    #[test]
    fn commas_quotes_and_newlines_in_a_cell_survive_a_csv_reader() {
        let awkward = "Lisa, \"Mona\"\nda Vinci";
        let view = view(
            vec![member(1, "mona,\"x\"", awkward, "mona@example.com")],
            Vec::new(),
        );
        let bytes = report(&view);
        let rows = records(&bytes);
        assert_eq!(rows.len(), 2, "{}", String::from_utf8_lossy(&bytes));
        assert_eq!(rows[1][column("GitHub com login")], "mona,\"x\"");
        assert_eq!(rows[1][column("GitHub com name")], awkward);
    }

    #[test]
    fn rows_follow_the_consumed_licenses_order_and_parts_add_up_to_the_whole_report() {
        let users: Vec<ServerUser> = ["eve", "Bob", "alice", "dave", "carol"]
            .iter()
            .enumerate()
            .map(|(id, login)| server_user(id as i64 + 1, login, &format!("{login}@example.com")))
            .collect();
        let view = view(Vec::new(), vec![("ghes.example", users)]);
        let whole = report(&view);
        let mut cursor = ReportCursor::default();
        let mut parts = Vec::new();
        while !cursor.is_finished() {
            let mut part = Vec::new();
            write_next_part(&view, CLOUD_URL, &mut cursor, 2, &mut part).expect("written");
            parts.push(part);
        }
        assert_eq!(
            parts.len(),
            3,
            "2 + 2 + 1 people, the header with the first"
        );
        assert_eq!(records(&parts[0]).len(), 3);
        assert_eq!(records(&parts[2]).len(), 1);
        assert_eq!(parts.concat(), whole);
        let logins: Vec<String> = records(&whole)[1..]
            .iter()
            .map(|row| row[column("Person id")].clone())
            .collect();
        // GitHub's order: login, case-insensitively.
        assert_eq!(
            logins,
            [
                "server:ghes.example:3",
                "server:ghes.example:2",
                "server:ghes.example:5",
                "server:ghes.example:4",
                "server:ghes.example:1"
            ]
        );
    }
}
