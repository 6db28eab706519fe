//! `GET /enterprises/{enterprise}/usage-history`: daily consumed and purchased counts and the period's peak.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{GitHubQuery, overage};
use crate::app::App;
use crate::auth::AuthorizedEnterprise;
use crate::error::{ServiceError, ServiceResult};
use crate::store::{InstanceUsage, UsageDay as StoredUsageDay};

/// The period, inclusive UTC days; the last 90 days by default.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct HistoryQuery {
    /// First day (`YYYY-MM-DD`); 89 days before `until` by default.
    #[param(format = Date)]
    since: Option<String>,
    /// Last day (`YYYY-MM-DD`); today by default.
    #[param(format = Date)]
    until: Option<String>,
}

/// Daily counts of the period and its peak ("max historical users").
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct UsageHistory {
    since: String,
    until: String,
    /// The recorded days, oldest first; a day without a record is absent.
    days: Vec<UsageDay>,
    /// The highest count in the period; null without a recorded day.
    max_consumed: Option<i64>,
    /// The first day it was reached.
    max_consumed_date: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct UsageDay {
    /// `YYYY-MM-DD`, UTC.
    date: String,
    /// The day's last count of consuming people.
    consumed: i64,
    /// The day's highest count.
    max_consumed: i64,
    purchased: i64,
    overage: u64,
    /// Each active instance's accounts that day.
    instances: Vec<InstanceUsage>,
}

/// The most days one history request may span (ten years).
const MAX_HISTORY_DAYS: i64 = 3660;

/// The days a request may name. Stored days are `YYYY-MM-DD` text compared as text, which orders only four-digit
/// years; and no usage is older than 1970. Inside it, the default period's arithmetic cannot leave `time`'s range.
const FIRST_DAY: time::Date = time::macros::date!(1970 - 01 - 01);
const LAST_DAY: time::Date = time::macros::date!(9999 - 12 - 31);

fn out_of_range(name: &str) -> ServiceError {
    ServiceError::invalid(format!(
        "`{name}` must be a day from {FIRST_DAY} to {LAST_DAY} (YYYY-MM-DD)"
    ))
}

fn parse_day(name: &str, value: &str) -> ServiceResult<time::Date> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    // The value is echoed only as a bounded prefix: it is the caller's input.
    let shown: String = value.chars().take(32).collect();
    let date = time::Date::parse(value, &format).map_err(|_| {
        ServiceError::invalid(format!(
            "`{name}` must be a date as YYYY-MM-DD from {FIRST_DAY} to {LAST_DAY}, got {shown:?}"
        ))
    })?;
    if !(FIRST_DAY..=LAST_DAY).contains(&date) {
        return Err(out_of_range(name));
    }
    Ok(date)
}

/// The day of the period's highest count ("max historical users"), the earliest of equal ones.
pub(crate) fn peak_day(days: &[StoredUsageDay]) -> Option<&StoredUsageDay> {
    days.iter()
        .max_by_key(|d| (d.max_consumed, std::cmp::Reverse(d.date.as_str())))
}

/// Daily consumed, purchased and per-instance counts, and the highest count in the period ("max historical
/// users"). `since`/`until` are inclusive UTC dates; the default is the last 90 days.
#[utoipa::path(
    get,
    path = "/enterprises/{enterprise}/usage-history",
    tag = "usage",
    params(super::openapi::EnterprisePath, HistoryQuery),
    responses(
        (status = 200, description = "The period's daily counts", body = UsageHistory),
        (status = 422, description = "A day is not `YYYY-MM-DD` from 1970-01-01 to 9999-12-31, `since` is after `until`, or the period is over 3660 days", body = super::GitHubError),
    ),
)]
pub(super) async fn usage_history(
    State(app): State<Arc<App>>,
    AuthorizedEnterprise(enterprise): AuthorizedEnterprise,
    GitHubQuery(query): GitHubQuery<HistoryQuery>,
) -> ServiceResult<Json<UsageHistory>> {
    let today = OffsetDateTime::now_utc().date();
    let until = match query.until.as_deref() {
        Some(value) => parse_day("until", value)?,
        None => today,
    };
    let since = match query.since.as_deref() {
        Some(value) => parse_day("since", value)?,
        // Never before `FIRST_DAY`: the default period of an early `until` is shorter rather than out of range.
        None => until
            .checked_sub(time::Duration::days(89))
            .map_or(FIRST_DAY, |since| since.max(FIRST_DAY)),
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
    let peak = peak_day(&days);
    let max_consumed = peak.map(|d| d.max_consumed);
    let max_consumed_date = peak.map(|d| d.date.clone());
    let entries = days
        .iter()
        .map(|d| UsageDay {
            date: d.date.clone(),
            consumed: d.consumed,
            max_consumed: d.max_consumed,
            purchased: d.purchased,
            overage: overage(d.consumed.max(0) as u64, d.purchased),
            instances: d.instances.clone(),
        })
        .collect();
    Ok(Json(UsageHistory {
        since: day(since),
        until: day(until),
        days: entries,
        max_consumed,
        max_consumed_date,
    }))
}
