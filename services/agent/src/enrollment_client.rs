//! The connection to the aggregator (the GitHub Connect equivalent): enrollment, the connection check, and which
//! instance credential the agent uses.
//!
//! An owner creates a one-time enrollment token (`lse_…`) on the aggregator; the agent exchanges it once over gRPC
//! (`Enrollment.Enroll`) for a long-lived instance credential bound to (enterprise, server id) and stores it in the
//! state directory (`credential.json`, mode 0600). Enrolling again rotates the credential: the old one stops working.

use std::time::Duration;

use license_sync_proto::convert;
use license_sync_proto::v1::enrollment_client::EnrollmentClient;
use license_sync_proto::v1::{CheckConnectionRequest, EnrollRequest};
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::config::{AgentConfig, ConfigError, ConfigProblem, Secret};
use crate::error::AgentError;
use crate::state::{EnrolledCredential, StateDir};
use crate::upload_client::{ChannelKind, authorization, connect_channel, status_error};

/// Deadline of an enrollment or a connection check: they are small calls, and an owner is waiting for them.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Where the credential in use comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialSource {
    /// `credential.json` in the state directory (enrollment). Wins over the configuration.
    Enrolled,
    /// `aggregator.credential` / `credential_file`.
    Config,
}

/// The credential the agent uses now.
#[derive(Debug, Clone)]
pub struct ResolvedCredential {
    pub secret: Secret,
    pub source: CredentialSource,
    /// Known for enrolled credentials.
    pub enterprise: Option<String>,
    pub enrolled_at: Option<OffsetDateTime>,
}

/// The enrolled credential when the state directory holds one, else the configured one, else
/// [`AgentError::NotEnrolled`]. Read at every call, so that a new enrollment (CLI or API) is picked up at once.
pub fn resolve_credential(
    config: &AgentConfig,
    state: Option<&StateDir>,
) -> Result<ResolvedCredential, AgentError> {
    if let Some(state) = state
        && let Some(enrolled) = state.load_credential()?
    {
        if enrolled.server_id != config.instance.server_id {
            return Err(AgentError::Config(ConfigError::Invalid(vec![
                ConfigProblem {
                    key: "instance.server_id".into(),
                    message: format!(
                        "= {} but the enrolled credential in {} belongs to server id {}: enroll again with a new \
                     enrollment token, or fix `instance.server_id`",
                        config.instance.server_id,
                        state.credential_path().display(),
                        enrolled.server_id
                    ),
                },
            ])));
        }
        return Ok(ResolvedCredential {
            secret: enrolled.credential,
            source: CredentialSource::Enrolled,
            enterprise: Some(enrolled.enterprise),
            enrolled_at: Some(enrolled.enrolled_at),
        });
    }
    match &config.aggregator {
        Some(aggregator) if aggregator.has_credential() => Ok(ResolvedCredential {
            secret: aggregator.credential()?,
            source: CredentialSource::Config,
            enterprise: None,
            enrolled_at: None,
        }),
        _ => Err(AgentError::NotEnrolled),
    }
}

/// What enrolling produced (no secret in it: this is printed and returned by the API).
#[derive(Debug, Clone, Serialize)]
pub struct Enrollment {
    pub enterprise: String,
    pub server_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub enrolled_at: OffsetDateTime,
    pub credential_file: std::path::PathBuf,
}

/// Exchanges the enrollment token for an instance credential and stores it in the state directory. Nothing is
/// stored unless the aggregator answered with a credential for this server id.
pub async fn enroll(
    config: &AgentConfig,
    state: &StateDir,
    token: &Secret,
) -> Result<Enrollment, AgentError> {
    let aggregator = config.aggregator()?;
    let token_text = token.expose_secret().trim();
    if token_text.is_empty() {
        return Err(AgentError::EnrollmentRefused {
            reason: "the enrollment token is empty: pass the `lse_…` token an owner created on the aggregator",
            message: "empty token".into(),
        });
    }
    let (channel, endpoint) = connect_channel(aggregator, ChannelKind::Request).await?;
    let mut request = tonic::Request::new(EnrollRequest {
        enrollment_token: token_text.to_owned(),
        server_id: config.instance.server_id.to_string(),
        hostname: config.instance.hostname.trim().to_owned(),
        ghes_version: config.instance.ghes_version.clone().unwrap_or_default(),
    });
    request.set_timeout(CALL_TIMEOUT.min(aggregator.timeout));
    let response = EnrollmentClient::new(channel)
        .enroll(request)
        .await
        .map_err(|status| enroll_error(&endpoint, status))?
        .into_inner();
    let server_id = Uuid::parse_str(&response.server_id).map_err(|_| {
        AgentError::Protocol(format!(
            "the enrollment answer's server_id {:?} is not a UUID",
            response.server_id
        ))
    })?;
    if server_id != config.instance.server_id {
        return Err(AgentError::Protocol(format!(
            "the aggregator enrolled server id {server_id}, but this agent is {}",
            config.instance.server_id
        )));
    }
    if response.credential.trim().is_empty() {
        return Err(AgentError::Protocol(
            "the enrollment answer holds no credential".into(),
        ));
    }
    let enrolled = EnrolledCredential {
        credential: Secret::new(response.credential.trim()),
        enterprise: response.enterprise.clone(),
        server_id,
        enrolled_at: crate::source::now_utc_seconds(),
        usage_file_recipient: Some(response.usage_file_recipient.trim())
            .filter(|recipient| !recipient.is_empty())
            .map(str::to_owned),
    };
    let writer = state.clone();
    let stored = enrolled.clone();
    tokio::task::spawn_blocking(move || writer.store_credential(&stored))
        .await
        .map_err(|error| AgentError::Internal(format!("the state task failed: {error}")))??;
    tracing::info!(
        enterprise = %enrolled.enterprise,
        server_id = %server_id,
        "enrolled with the aggregator; the instance credential is stored in the state directory"
    );
    Ok(Enrollment {
        enterprise: enrolled.enterprise,
        server_id,
        enrolled_at: enrolled.enrolled_at,
        credential_file: state.credential_path(),
    })
}

fn enroll_error(endpoint: &str, status: tonic::Status) -> AgentError {
    use tonic::Code;
    let message = status.message().to_owned();
    let reason = match status.code() {
        Code::Unauthenticated => {
            "the enrollment token is unknown, already used or expired: an owner creates a new one with \
             `license-sync-aggregator enrollment-token create --enterprise SLUG` (or POST \
             /enterprises/{enterprise}/enrollment-tokens)"
        }
        Code::PermissionDenied => {
            "this server id is enrolled in another enterprise: retire it there first, or check \
             `instance.server_id`"
        }
        Code::InvalidArgument => {
            "the aggregator refused the instance's identity: check `instance.server_id` and `instance.hostname`"
        }
        _ => return status_error(endpoint, status),
    };
    AgentError::EnrollmentRefused { reason, message }
}

/// What a successful connection check saw.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionCheck {
    pub enterprise: String,
    pub server_id: String,
    pub hostname: String,
    #[serde(with = "time::serde::rfc3339::option")]
    pub server_time: Option<OffsetDateTime>,
}

/// Asks the aggregator whether `credential` authenticates now (`Enrollment.CheckConnection`).
pub async fn check_connection(
    config: &AgentConfig,
    credential: &Secret,
) -> Result<ConnectionCheck, AgentError> {
    let aggregator = config.aggregator()?;
    let (channel, endpoint) = connect_channel(aggregator, ChannelKind::Request).await?;
    let mut request = tonic::Request::new(CheckConnectionRequest {});
    request
        .metadata_mut()
        .insert("authorization", authorization(credential)?);
    request.set_timeout(CALL_TIMEOUT.min(aggregator.timeout));
    let response = EnrollmentClient::new(channel)
        .check_connection(request)
        .await
        .map_err(|status| status_error(&endpoint, status))?
        .into_inner();
    Ok(ConnectionCheck {
        enterprise: response.enterprise,
        server_id: response.server_id,
        hostname: response.hostname,
        server_time: response
            .server_time
            .as_ref()
            .and_then(|time| convert::offset_date_time(time, "server_time").ok()),
    })
}
