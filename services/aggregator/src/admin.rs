//! Owner administration from the command line: enterprises, REST tokens, instance credentials, members import.
//! Works directly on the database, like a Rails `rake` task, so it needs no running server.

use std::path::Path;

use anyhow::Context;
use license_sync_core::model::CloudMember;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::ServiceError;
use crate::store::{ApiToken, DynStore, Enterprise, Instance, NewApiToken, TokenScope};
use crate::tokens;
use license_sync_core::members::validate_members;

pub async fn enterprise(store: &DynStore, slug: &str) -> anyhow::Result<Enterprise> {
    store
        .enterprise_by_slug(slug)
        .await
        .map_err(ServiceError::from)?
        .with_context(|| {
            format!(
                "no enterprise {slug:?}: create it with `license-sync-aggregator enterprise create`"
            )
        })
}

pub fn validate_slug(slug: &str) -> anyhow::Result<()> {
    let ok = !slug.is_empty()
        && slug.len() <= 64
        && slug
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !slug.starts_with('-');
    if !ok {
        anyhow::bail!(
            "enterprise slug {slug:?} is invalid: use 1-64 lower-case letters, digits and '-', not starting with '-'"
        );
    }
    if slug.chars().all(|c| c.is_ascii_digit()) {
        anyhow::bail!(
            "enterprise slug {slug:?} is all digits, which would be confused with an enterprise id"
        );
    }
    Ok(())
}

pub async fn create_enterprise(
    store: &DynStore,
    slug: &str,
    name: &str,
    seats: i64,
) -> anyhow::Result<Enterprise> {
    validate_slug(slug)?;
    if seats < 0 {
        anyhow::bail!("--seats must be zero or more");
    }
    Ok(store
        .create_enterprise(slug, name, seats, OffsetDateTime::now_utc())
        .await
        .map_err(ServiceError::from)?)
}

/// Most characters of a token's name: it is shown in `token list`, and names one token for `token revoke`.
pub const MAX_TOKEN_NAME_CHARS: usize = 100;

/// An `admin` token without expiry (tests, the load generator); returns the token, of which only the hash is stored.
pub async fn create_api_token(store: &DynStore, slug: &str, name: &str) -> anyhow::Result<String> {
    let new = NewApiToken {
        name,
        scope: TokenScope::Admin,
        expires_at: None,
    };
    Ok(
        issue_api_token(store, slug, &new, OffsetDateTime::now_utc())
            .await?
            .1,
    )
}

/// Creates a REST token; returns its record and the token itself, shown once (only its hash is stored).
pub async fn issue_api_token(
    store: &DynStore,
    slug: &str,
    new: &NewApiToken<'_>,
    now: OffsetDateTime,
) -> anyhow::Result<(ApiToken, String)> {
    let name = new.name.trim();
    if name.is_empty()
        || name.chars().count() > MAX_TOKEN_NAME_CHARS
        || name.chars().any(char::is_control)
    {
        anyhow::bail!(
            "--name must be 1 to {MAX_TOKEN_NAME_CHARS} characters without control characters (e.g. \"ci reports\")"
        );
    }
    if let Some(expires_at) = new.expires_at
        && expires_at <= now
    {
        anyhow::bail!(
            "the expiry {} is not in the future: pass a later --expires-at or a positive --expires-in-days",
            crate::time_format::rfc3339(expires_at)
        );
    }
    let enterprise = enterprise(store, slug).await?;
    let token = tokens::generate(tokens::API_TOKEN_PREFIX);
    let record = store
        .create_api_token(
            enterprise.id,
            &tokens::sha256_hex(&token),
            &NewApiToken {
                name,
                ..new.clone()
            },
            now,
        )
        .await
        .map_err(ServiceError::from)?;
    Ok((record, token))
}

/// A token's record as `token list` prints it and REST shows it: never the secret or its hash. Times are RFC 3339
/// UTC.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ApiTokenRecord {
    pub id: i64,
    pub name: String,
    pub scope: TokenScope,
    pub created_at: String,
    /// Null for a token that does not expire.
    pub expires_at: Option<String>,
    /// Within a minute; null before the first use.
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
}

pub fn api_token_json(token: &ApiToken) -> ApiTokenRecord {
    let time = |time: Option<OffsetDateTime>| time.map(crate::time_format::rfc3339);
    ApiTokenRecord {
        id: token.id,
        name: token.name.clone(),
        scope: token.scope,
        created_at: crate::time_format::rfc3339(token.created_at),
        expires_at: time(token.expires_at),
        last_used_at: time(token.last_used_at),
        revoked_at: time(token.revoked_at),
    }
}

/// Enrolls (or re-enrolls, rotating the credential) an instance; returns the new credential.
pub async fn add_instance(
    store: &DynStore,
    slug: &str,
    server_id: Uuid,
    hostname: &str,
) -> anyhow::Result<(Instance, String)> {
    let enterprise = enterprise(store, slug).await?;
    // The snapshots' one hostname rule.
    let hostname = license_sync_core::snapshot::validate_hostname(hostname)
        .map_err(|error| anyhow::anyhow!("--hostname: {error}"))?;
    let credential = tokens::generate(tokens::INSTANCE_CREDENTIAL_PREFIX);
    let instance = store
        .enroll_instance(
            enterprise.id,
            server_id,
            hostname,
            &tokens::sha256_hex(&credential),
            OffsetDateTime::now_utc(),
        )
        .await
        .map_err(ServiceError::from)?;
    Ok((instance, credential))
}

pub async fn import_members(store: &DynStore, slug: &str, file: &Path) -> anyhow::Result<usize> {
    let enterprise = enterprise(store, slug).await?;
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read members file {}", file.display()))?;
    let members: Vec<CloudMember> = serde_json::from_str(&text).map_err(|err| {
        anyhow::anyhow!(
            "{} is not a JSON array of cloud members (line {}, column {})",
            file.display(),
            err.line(),
            err.column()
        )
    })?;
    validate_members(&members)?;
    store
        .replace_cloud_members(enterprise.id, &members)
        .await
        .map_err(ServiceError::from)?;
    Ok(members.len())
}
