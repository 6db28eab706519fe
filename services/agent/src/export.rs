//! Writing the usage file for manual upload (SPEC §6).
//!
//! The file holds every user's email, so by default it is encrypted (age, X25519) to the enterprise's usage-file
//! public key: the one in `export.recipient`, else the one the aggregator gave at enrollment. Only the aggregator,
//! which holds the enterprise's secret keys, can read it. A plain file is written only when asked for explicitly
//! (`--unencrypted`). Either way it is created with mode 0600 and written atomically
//! ([`crate::fsutil::write_atomically`]) so that an owner never uploads half a file.

use std::path::{Path, PathBuf};

use age::x25519::Recipient;
use license_sync_core::encrypted_usage_file::{self, ENCRYPTED_EXTENSION};
use license_sync_core::snapshot::{Snapshot, UsageFile};
use serde::Serialize;

use crate::config::{AgentConfig, ConfigError, ConfigProblem};
use crate::error::AgentError;
use crate::fsutil;
use crate::state::StateDir;

/// Where the key an export is encrypted to came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecipientSource {
    /// `export.recipient`. Wins over enrollment.
    Config,
    /// `credential.json` in the state directory, from the enrollment answer.
    Enrolled,
}

/// How the usage file is written.
#[derive(Debug, Clone)]
pub enum Protection {
    Encrypted {
        recipient: Recipient,
        source: RecipientSource,
    },
    /// `--unencrypted`: the plain JSON, as agents before encrypted files wrote it.
    Unencrypted,
}

/// The key to encrypt to: `export.recipient`, else the enrolled one, else a refusal that says how to get one. With
/// `unencrypted`, no key is looked for.
pub fn resolve_protection(
    config: &AgentConfig,
    unencrypted: bool,
) -> Result<Protection, AgentError> {
    if unencrypted {
        return Ok(Protection::Unencrypted);
    }
    let invalid = |key: &str, message: String| {
        AgentError::Config(ConfigError::Invalid(vec![ConfigProblem {
            key: key.into(),
            message,
        }]))
    };
    if let Some(text) = config.export.as_ref().and_then(|e| e.recipient.as_deref()) {
        let recipient = encrypted_usage_file::parse_recipient(text)
            .map_err(|message| invalid("export.recipient", message))?;
        return Ok(Protection::Encrypted {
            recipient,
            source: RecipientSource::Config,
        });
    }
    if let Some(agent) = &config.agent {
        let state = StateDir::open(&agent.state_dir)?;
        if let Some(enrolled) = state.load_credential()?
            && let Some(text) = enrolled.usage_file_recipient.as_deref()
        {
            let recipient = encrypted_usage_file::parse_recipient(text).map_err(|message| {
                invalid(
                    "export.recipient",
                    format!(
                        "is not set, and the key from enrollment in {} is unusable: {message}; set \
                         `export.recipient` or enroll again",
                        state.credential_path().display()
                    ),
                )
            })?;
            return Ok(Protection::Encrypted {
                recipient,
                source: RecipientSource::Enrolled,
            });
        }
    }
    Err(invalid(
        "export.recipient",
        "is not set and the agent has no usage-file key from enrollment, so the usage file (which holds every \
         user's email) cannot be encrypted: set `export.recipient` to the enterprise's public key (`age1…`, from \
         `license-sync-aggregator enterprise keygen` or GET /enterprises/{enterprise}/usage-file-key), enroll the \
         agent after the key exists, or pass --unencrypted to write a plain file on purpose"
            .into(),
    ))
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedFile {
    pub path: PathBuf,
    pub users: u64,
    pub bytes: u64,
}

/// Writes `snapshot` as a [`UsageFile`] at `path`, encrypted or plain as `protection` says, replacing any previous
/// file atomically. The plain form is pretty-printed JSON; the encrypted form is the same JSON inside age's binary
/// format (see `license_sync_core::encrypted_usage_file`).
pub fn write_usage_file(
    path: &Path,
    snapshot: Snapshot,
    protection: &Protection,
) -> Result<ExportedFile, AgentError> {
    let usage = UsageFile::from_snapshot(snapshot);
    let users = usage.user_count;
    if matches!(protection, Protection::Encrypted { .. })
        && path
            .extension()
            .is_none_or(|ext| ext != ENCRYPTED_EXTENSION)
    {
        tracing::warn!(path = %path.display(), "the encrypted usage file's name does not end in .{ENCRYPTED_EXTENSION}; .json.{ENCRYPTED_EXTENSION} tells readers what it is");
    }
    let bytes = fsutil::write_atomically(path, |writer| match protection {
        Protection::Encrypted { recipient, .. } => {
            encrypted_usage_file::write_encrypted(&usage, recipient, &mut *writer).map(drop)
        }
        Protection::Unencrypted => {
            serde_json::to_writer_pretty(&mut *writer, &usage).map_err(std::io::Error::other)?;
            writer.write_all(b"\n")
        }
    })
    .map_err(|source| AgentError::Output {
        path: path.to_owned(),
        source,
    })?;
    Ok(ExportedFile {
        path: path.to_owned(),
        users,
        bytes,
    })
}
