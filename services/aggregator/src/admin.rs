//! Owner administration from the command line: enterprises, REST tokens, instance credentials, members import.
//! Works directly on the database, like a Rails `rake` task, so it needs no running server.

use std::path::Path;

use anyhow::Context;
use license_sync_core::model::CloudMember;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::ServiceError;
use crate::store::{DynStore, Enterprise, Instance};
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

/// Returns the new token; only its hash is stored.
pub async fn create_api_token(
    store: &DynStore,
    slug: &str,
    description: &str,
) -> anyhow::Result<String> {
    let enterprise = enterprise(store, slug).await?;
    let token = tokens::generate(tokens::API_TOKEN_PREFIX);
    store
        .create_api_token(
            enterprise.id,
            &tokens::sha256_hex(&token),
            description,
            OffsetDateTime::now_utc(),
        )
        .await
        .map_err(ServiceError::from)?;
    Ok(token)
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
