//! The one place the aggregator turns times into text and stored integers back into times.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// RFC 3339 as GitHub writes it. A time that cannot be formatted (outside years 0–9999) falls back to its Unix
/// seconds rather than to an empty string, so that a message or answer never silently loses the value.
pub fn rfc3339(time: OffsetDateTime) -> String {
    time.format(&Rfc3339)
        .unwrap_or_else(|_| time.unix_timestamp().to_string())
}

pub(crate) fn unix_to_time(seconds: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(seconds).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

pub(crate) fn unix_ms_to_time(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

pub(crate) fn time_to_unix_ms(time: OffsetDateTime) -> i64 {
    (time.unix_timestamp_nanos() / 1_000_000) as i64
}

/// `YYYY-MM-DD` of a UTC time.
pub fn utc_date(time: OffsetDateTime) -> String {
    let date = time.to_offset(time::UtcOffset::UTC).date();
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}
