//! `GET /enterprises/{enterprise}/usage-history`: daily consumed and purchased counts and the period's peak.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::overage;
use crate::app::App;
use crate::auth::AuthorizedEnterprise;
use crate::error::{ServiceError, ServiceResult};
use crate::store::UsageDay;

#[derive(Debug, Deserialize)]
pub(super) struct HistoryQuery {
    since: Option<String>,
    until: Option<String>,
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
pub(crate) fn peak_day(days: &[UsageDay]) -> Option<&UsageDay> {
    days.iter()
        .max_by_key(|d| (d.max_consumed, std::cmp::Reverse(d.date.as_str())))
}

/// Daily consumed, purchased and per-instance counts, and the highest count in the period ("max historical
/// users"). `since`/`until` are inclusive UTC dates; the default is the last 90 days.
pub(super) async fn usage_history(
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
