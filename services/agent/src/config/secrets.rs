//! Secrets (tokens, credentials): a wrapper that never prints its value, and reading them from their files.

use std::fmt;
use std::path::PathBuf;

use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Deserializer};

use super::types::lenient_string;
use super::{
    AggregatorConfig, ConfigError, GhesSourceConfig, MIN_OWNER_TOKEN_CHARS, SidecarConfig,
};

/// A secret (token or credential), held in a [`secrecy::SecretString`] (zeroed on drop). Its `Debug` prints `***`
/// so that a logged config never leaks it, and it has neither `Display` nor `Serialize`, so `{}` or a JSON dump does
/// not compile: the only way to the value is [`Secret::expose_secret`], easy to find in review.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(SecretString::from(value.into()))
    }

    /// The value itself, for the one place that sends it (a header, a request, the credential file).
    pub fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }
}

/// Equal values, for telling a rotated credential from the refused one; not for checking a caller's token (the
/// local API compares those in constant time).
impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.expose_secret() == other.expose_secret()
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        lenient_string(deserializer).map(Secret::new)
    }
}

impl GhesSourceConfig {
    /// The token, read from `token_file` (trimmed) at every call so that a rotated secret is picked up.
    pub fn token(&self) -> Result<Secret, ConfigError> {
        read_secret(
            &self.token,
            &self.token_file,
            "source.token_file",
            "the GHES token file",
        )
    }
}

impl SidecarConfig {
    /// The owner token, read from `owner_token_file` (trimmed) at every call so that a rotated token is picked up
    /// without a restart.
    pub fn owner_token(&self) -> Result<Secret, ConfigError> {
        let token = read_secret(
            &self.owner_token,
            &self.owner_token_file,
            "agent.owner_token_file",
            "the owner token file",
        )?;
        if token.expose_secret().chars().count() < MIN_OWNER_TOKEN_CHARS {
            return Err(ConfigError::one(
                "agent.owner_token_file",
                format!(
                    "holds a token shorter than {MIN_OWNER_TOKEN_CHARS} characters: use a long random value"
                ),
            ));
        }
        Ok(token)
    }
}

impl AggregatorConfig {
    /// Whether a credential is configured here (it may also come from enrollment, see the module docs).
    pub fn has_credential(&self) -> bool {
        self.credential.is_some() || self.credential_file.is_some()
    }

    /// The credential, read from `credential_file` (trimmed) at every call so that a reissued one is picked up.
    pub fn credential(&self) -> Result<Secret, ConfigError> {
        read_secret(
            &self.credential,
            &self.credential_file,
            "aggregator.credential_file",
            "the instance credential file",
        )
    }
}

fn read_secret(
    inline: &Option<Secret>,
    file: &Option<PathBuf>,
    file_key: &'static str,
    what: &'static str,
) -> Result<Secret, ConfigError> {
    let secret = match (inline, file) {
        (Some(secret), None) => secret.expose_secret().trim().to_owned(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Unreadable {
                what,
                key: file_key,
                path: path.clone(),
                source,
            })?
            .trim()
            .to_owned(),
        _ => {
            return Err(ConfigError::one(
                file_key,
                "must be set, or the inline secret, but not both",
            ));
        }
    };
    if secret.is_empty() {
        return Err(ConfigError::one(file_key, "holds an empty secret"));
    }
    Ok(Secret::new(secret))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::Url;

    #[test]
    fn secrets_never_show_in_debug() {
        let secret = Secret::new("ghp_verysecret");
        assert_eq!(format!("{secret:?}"), "\"***\"");
        let config = AggregatorConfig {
            endpoint: Url::parse("http://127.0.0.1:50051").expect("url"),
            credential: Some(secret),
            credential_file: None,
            ca_cert: None,
            client_cert: None,
            client_key: None,
            batch_size: 10,
            timeout: std::time::Duration::from_secs(1),
        };
        let debug = format!("{config:?}");
        assert!(!debug.contains("verysecret"), "{debug}");
        assert!(debug.contains("***"));
    }

    #[test]
    fn a_whole_config_in_debug_shows_no_secret() {
        use figment::Figment;
        use figment::providers::Serialized;

        let figment = Figment::from(Serialized::defaults(serde_json::json!({
            "instance": { "server_id": "6f1c8a38-5b2e-4a4f-9d44-8d4a4f1b6c01", "hostname": "ghes" },
            "source": {
                "kind": "ghes", "url": "https://ghes.example.com", "username": "site-admin",
                "token": "ghp_ghes_token_value",
            },
            "aggregator": { "endpoint": "http://127.0.0.1:50051", "credential": "lsi_credential_value" },
            "agent": { "state_dir": "state", "owner_token": "owner_token_value_0123456789" },
        })));
        let config = crate::config::AgentConfig::from_figment(&figment).expect("extract");
        let debug = format!("{config:?}");
        for secret in [
            "ghp_ghes_token_value",
            "lsi_credential_value",
            "owner_token_value_0123456789",
        ] {
            assert!(!debug.contains(secret), "{secret} leaked: {debug}");
        }
        assert_eq!(debug.matches("\"***\"").count(), 3, "{debug}");
        let alternate = format!("{config:#?}");
        assert!(!alternate.contains("value"), "{alternate}");
    }
}
