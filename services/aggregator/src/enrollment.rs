//! One-time enrollment tokens (`lse_…`), created by an owner through REST or the CLI and exchanged by an agent for
//! its instance credential (`Enrollment.Enroll`, served by the control module). Here so that REST and control share it
//! without depending on each other.

use time::OffsetDateTime;

use crate::error::{ServiceError, ServiceResult};
use crate::store::{DynStore, Enterprise};
use crate::tokens;

/// Lifetime of an enrollment token when the owner gives none.
pub const DEFAULT_ENROLLMENT_TOKEN_HOURS: i64 = 24;
/// Longest lifetime of an enrollment token (30 days).
pub const MAX_ENROLLMENT_TOKEN_HOURS: i64 = 720;

/// A new enrollment token: the secret, shown once, and when it stops working.
#[derive(Debug, Clone)]
pub struct IssuedEnrollmentToken {
    pub token: String,
    pub expires_at: OffsetDateTime,
}

/// Creates a one-time enrollment token for the enterprise, valid `expires_in_hours` (default 24, at most 720).
/// Only its hash is stored. Shared by the REST API and the CLI.
pub async fn issue_enrollment_token(
    store: &DynStore,
    enterprise: &Enterprise,
    expires_in_hours: Option<i64>,
) -> ServiceResult<IssuedEnrollmentToken> {
    let hours = expires_in_hours.unwrap_or(DEFAULT_ENROLLMENT_TOKEN_HOURS);
    if !(1..=MAX_ENROLLMENT_TOKEN_HOURS).contains(&hours) {
        return Err(ServiceError::invalid(format!(
            "an enrollment token lives from 1 to {MAX_ENROLLMENT_TOKEN_HOURS} hours (30 days); {hours} is out of \
             range (leave the lifetime out for the default, {DEFAULT_ENROLLMENT_TOKEN_HOURS})"
        )));
    }
    let now = OffsetDateTime::now_utc();
    let expires_at = (now + time::Duration::hours(hours))
        .replace_nanosecond(0)
        .unwrap_or(now + time::Duration::hours(hours));
    let token = tokens::generate(tokens::ENROLLMENT_TOKEN_PREFIX);
    store
        .create_enrollment_token(enterprise.id, &tokens::sha256_hex(&token), expires_at, now)
        .await?;
    tracing::info!(
        enterprise = %enterprise.slug,
        expires_at = %crate::time_format::rfc3339(expires_at),
        "enrollment token created"
    );
    Ok(IssuedEnrollmentToken { token, expires_at })
}
