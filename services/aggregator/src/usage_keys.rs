//! The enterprises' usage-file keys (issue 11): age X25519 key pairs that agents encrypt exported usage files to,
//! so that a file carried by hand holds no readable email or login. Shared by the CLI (`enterprise keygen`), REST
//! (`GET …/usage-file-key`, the upload) and enrollment (`EnrollResponse.usage_file_recipient`).
//!
//! Rotation rule: `keygen` adds a key and never removes one. The newest key is the one handed out (to agents at
//! enrollment, and over REST); an upload is decrypted with any of the enterprise's keys, so files encrypted before a
//! rotation still upload. The secret keys never leave the store except into the decryption.

use age::secrecy::ExposeSecret as _;
use age::x25519::Identity;
use license_sync_core::encrypted_usage_file::EncryptedUsageFileError;
use time::OffsetDateTime;

use crate::error::{ServiceError, ServiceResult};
use crate::store::{DynStore, Enterprise, UsageFileKey};

/// Makes a new key pair for the enterprise and stores it as its newest key; earlier keys stay usable for
/// decryption. Returns the stored key (its public half is what agents encrypt to).
pub async fn generate(store: &DynStore, enterprise: &Enterprise) -> ServiceResult<UsageFileKey> {
    let identity = Identity::generate();
    let public_key = identity.to_public().to_string();
    let key = store
        .add_usage_file_key(
            enterprise.id,
            &public_key,
            identity.to_string().expose_secret(),
            OffsetDateTime::now_utc(),
        )
        .await?;
    tracing::info!(enterprise = %enterprise.slug, public_key = %key.public_key, "usage-file key generated");
    Ok(key)
}

/// The public key agents of the enterprise encrypt to now (the newest), if it has one.
pub async fn current_public_key(
    store: &DynStore,
    enterprise_id: i64,
) -> ServiceResult<Option<UsageFileKey>> {
    Ok(store
        .usage_file_keys(enterprise_id)
        .await?
        .into_iter()
        .next())
}

/// The enterprise's keys to decrypt an uploaded encrypted usage file with, newest first. An enterprise without keys
/// cannot have had a file encrypted to it: a 422 that says what to do.
pub async fn identities(store: &DynStore, enterprise: &Enterprise) -> ServiceResult<Vec<Identity>> {
    let keys = store.usage_file_keys(enterprise.id).await?;
    if keys.is_empty() {
        return Err(ServiceError::invalid(format!(
            "this usage file is encrypted, but enterprise {slug} has no usage-file key, so it was not encrypted to \
             it: upload it to the enterprise it was exported for, or run `license-sync-aggregator enterprise keygen \
             --enterprise {slug}`, give the agent the new public key (`export.recipient`, or enroll it again) and \
             export again",
            slug = enterprise.slug
        )));
    }
    keys.iter()
        .map(|key| {
            key.secret_key.parse::<Identity>().map_err(|reason| {
                ServiceError::internal(
                    "reading the enterprise's usage-file keys",
                    format_args!("key {} of enterprise {}: {reason}", key.id, enterprise.slug),
                )
            })
        })
        .collect()
}

/// The 422 for an encrypted upload that could not be decrypted. A file that decrypted but holds no usage file
/// (`Content`) is worded by the caller like a plain body; here it gets a generic message.
pub fn decryption_refusal(
    enterprise: &Enterprise,
    error: &EncryptedUsageFileError,
) -> ServiceError {
    let slug = &enterprise.slug;
    match error {
        EncryptedUsageFileError::NotForTheseKeys => ServiceError::invalid(format!(
            "this usage file is encrypted to a key that is not one of enterprise {slug}'s usage-file keys: upload it \
             to the enterprise it was exported for, or export it again with the enterprise's current public key \
             (GET /enterprises/{slug}/usage-file-key; set it as `export.recipient`, or enroll the agent again)"
        )),
        EncryptedUsageFileError::Damaged(reason) => ServiceError::invalid(format!(
            "the encrypted usage file is damaged or truncated ({reason}): upload the file exactly as \
             `license-sync-agent export` wrote it, or export it again"
        )),
        EncryptedUsageFileError::Content(_) => ServiceError::invalid(format!(
            "the encrypted file decrypted, but {error}: expected a usage file written by `license-sync-agent export`"
        )),
    }
}
