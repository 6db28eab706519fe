//! Validation: every check that needs no network, collecting every problem so that one error lists them all.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;

use super::load::env_var_for;
use super::{
    AgentConfig, AggregatorConfig, GhesSourceConfig, InstanceConfig, Secret, SidecarConfig,
    SourceConfig,
};

/// Largest accepted `aggregator.batch_size`: keeps one gRPC message well under a few MiB.
pub const MAX_BATCH_SIZE: usize = 10_000;

/// One thing wrong with the configuration: the key and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key, e.g. `source.token_file`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` {}", self.key, self.message)
    }
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration:{}", join_problems(.0))]
    Invalid(Vec<ConfigProblem>),
    #[error("cannot read {what} {} (config key `{key}`)", path.display())]
    Unreadable {
        what: &'static str,
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ConfigError {
    /// The problems found, empty for [`ConfigError::Unreadable`].
    pub fn problems(&self) -> &[ConfigProblem] {
        match self {
            ConfigError::Invalid(problems) => problems,
            ConfigError::Unreadable { .. } => &[],
        }
    }

    pub(super) fn one(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid(vec![ConfigProblem {
            key: key.into(),
            message: message.into(),
        }])
    }
}

/// One problem on the same line; several as a list, one per line.
fn join_problems(problems: &[ConfigProblem]) -> String {
    match problems {
        [one] => format!(" {one}"),
        several => several
            .iter()
            .map(|problem| format!("\n  - {problem}"))
            .collect(),
    }
}

impl AgentConfig {
    /// Checks everything that can be checked before talking to anything, and reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Problems::default();
        self.instance.validate(&mut problems);
        match &self.source {
            SourceConfig::File(file) => {
                if file.path.as_os_str().is_empty() {
                    problems.add(
                        "source.path",
                        "is empty: set the path of the all_users.csv file to read",
                    );
                }
            }
            SourceConfig::Ghes(ghes) => ghes.validate(&mut problems),
        }
        if let Some(aggregator) = &self.aggregator {
            // With a state directory the credential may come from enrollment instead of the file.
            aggregator.validate(&mut problems, self.agent.is_none());
        }
        if let Some(agent) = &self.agent {
            agent.validate(&mut problems);
        }
        if let Some(recipient) = self.export.as_ref().and_then(|e| e.recipient.as_deref())
            && let Err(message) =
                license_sync_core::encrypted_usage_file::parse_recipient(recipient)
        {
            problems.add("export.recipient", message);
        }
        problems.into_result()
    }
}

#[derive(Default)]
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn add(&mut self, key: &str, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            key: key.to_owned(),
            message: message.into(),
        });
    }

    fn into_result(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(self.0))
        }
    }

    /// A file the agent will read later must exist now, so that a typo fails at start rather than at the first sync.
    fn check_file(&mut self, key: &str, path: &Path) {
        match std::fs::metadata(path) {
            Ok(metadata) if metadata.is_file() => {}
            Ok(_) => self.add(key, format!("= {:?} is not a regular file", path.display())),
            Err(error) => self.add(
                key,
                format!("= {:?} cannot be read: {error}", path.display()),
            ),
        }
    }

    /// A backoff whose cap is below its first delay could never grow. Both keys are `*_ms` keys.
    fn check_backoff(
        &mut self,
        (initial_key, initial): (&str, Duration),
        (max_key, max): (&str, Duration),
    ) {
        if max < initial {
            self.add(
                max_key,
                format!(
                    "= {} is below `{initial_key}` = {}: the backoff must be able to grow",
                    max.as_millis(),
                    initial.as_millis()
                ),
            );
        }
    }

    /// Exactly one of an inline secret and a secret file.
    fn check_secret(
        &mut self,
        section: &str,
        inline: &Option<Secret>,
        file: &Option<PathBuf>,
        (inline_name, file_name): (&str, &str),
        what: &str,
        required: bool,
    ) {
        let inline_key = format!("{section}.{inline_name}");
        let file_key = format!("{section}.{file_name}");
        match (inline, file) {
            (Some(_), Some(_)) => self.add(
                &inline_key,
                format!(
                    "and `{file_key}` are both set: keep only one (prefer `{file_key}` and unset {})",
                    env_var_for(&inline_key)
                ),
            ),
            (None, None) if !required => {}
            (None, None) => self.add(
                &file_key,
                format!(
                    "is not set: point it at a file holding {what}, or set {}",
                    env_var_for(&inline_key)
                ),
            ),
            (Some(secret), None) => {
                if secret.expose_secret().trim().is_empty() {
                    self.add(&inline_key, format!("is empty: set it to {what}"));
                }
            }
            (None, Some(path)) => self.check_file(&file_key, path),
        }
    }
}

/// The `http`/`https` URL checks shared by the GHES URL and the aggregator endpoint.
fn check_http_url(problems: &mut Problems, key: &str, url: &Url) {
    if !matches!(url.scheme(), "http" | "https") {
        problems.add(
            key,
            format!("= {:?} must be an http:// or https:// URL", url.as_str()),
        );
    } else if url.host_str().is_none_or(str::is_empty) {
        problems.add(key, format!("= {:?} has no host", url.as_str()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Credentials in a URL end up in logs and error messages.
        problems.add(
            key,
            "contains credentials: remove them from the URL and use the token or credential settings",
        );
    }
    if url.query().is_some() || url.fragment().is_some() {
        problems.add(
            key,
            format!("= {:?} must not have a query or fragment", url.as_str()),
        );
    }
}

impl InstanceConfig {
    fn validate(&self, problems: &mut Problems) {
        if self.server_id.is_nil() {
            problems.add(
                "instance.server_id",
                "is the nil UUID: set it to the GHES instance's server id",
            );
        }
        let hostname = self.hostname.trim();
        if hostname.is_empty() {
            problems.add(
                "instance.hostname",
                "is empty: set it to the instance's host name, e.g. \"ghes-1.example.com\"",
            );
        } else if hostname.contains("://") || hostname.contains('/') {
            problems.add(
                "instance.hostname",
                format!(
                    "= {:?} must be a bare host name, not a URL (e.g. \"ghes-1.example.com\")",
                    self.hostname
                ),
            );
        } else if self
            .hostname
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            problems.add(
                "instance.hostname",
                format!(
                    "= {:?} contains whitespace or control characters",
                    self.hostname
                ),
            );
        }
        if let Some(version) = &self.ghes_version
            && version.trim().is_empty()
        {
            problems.add(
                "instance.ghes_version",
                "is empty: remove it to read the version from GHES, or set it like \"3.14.2\"",
            );
        }
    }
}

impl GhesSourceConfig {
    fn validate(&self, problems: &mut Problems) {
        check_http_url(problems, "source.url", &self.url);
        if self.username.trim().is_empty() {
            problems.add(
                "source.username",
                "is empty: set it to the login of the site admin who owns the token",
            );
        }
        problems.check_secret(
            "source",
            &self.token,
            &self.token_file,
            ("token", "token_file"),
            "a GHES personal access token with the `site_admin` scope",
            true,
        );
        if let Some(path) = &self.ca_cert {
            problems.check_file("source.ca_cert", path);
        }
        for (key, is_zero) in [
            (
                "source.request_timeout_secs",
                self.request_timeout.is_zero(),
            ),
            (
                "source.report_deadline_secs",
                self.report_deadline.is_zero(),
            ),
            ("source.poll_initial_ms", self.poll_initial.is_zero()),
            ("source.max_attempts", self.max_attempts == 0),
        ] {
            if is_zero {
                problems.add(key, "must be greater than 0");
            }
        }
        problems.check_backoff(
            ("source.poll_initial_ms", self.poll_initial),
            ("source.poll_max_ms", self.poll_max),
        );
    }
}

/// Shortest accepted owner token: the local API may listen beyond loopback, so the token must not be guessable.
pub const MIN_OWNER_TOKEN_CHARS: usize = 16;

impl SidecarConfig {
    fn validate(&self, problems: &mut Problems) {
        if self.state_dir.as_os_str().is_empty() {
            problems.add(
                "agent.state_dir",
                "is empty: set it to a directory the agent owns, e.g. \"/var/lib/license-sync-agent\"",
            );
        } else if let Ok(metadata) = std::fs::metadata(&self.state_dir)
            && !metadata.is_dir()
        {
            problems.add(
                "agent.state_dir",
                format!(
                    "= {:?} exists and is not a directory",
                    self.state_dir.display()
                ),
            );
        }
        problems.check_secret(
            "agent",
            &self.owner_token,
            &self.owner_token_file,
            ("owner_token", "owner_token_file"),
            "the owner token that authorises owner-only actions on the local API",
            true,
        );
        if let Some(token) = &self.owner_token
            && !token.expose_secret().trim().is_empty()
            && token.expose_secret().trim().chars().count() < MIN_OWNER_TOKEN_CHARS
        {
            problems.add(
                "agent.owner_token",
                format!(
                    "is shorter than {MIN_OWNER_TOKEN_CHARS} characters: use a long random value, e.g. \
                     `openssl rand -hex 32`"
                ),
            );
        }
        if self.sync_interval.is_zero() {
            problems.add(
                "agent.sync_interval_secs",
                "must be greater than 0 (604800 is weekly)",
            );
        } else if self.sync_jitter >= self.sync_interval {
            problems.add(
                "agent.sync_jitter_secs",
                format!(
                    "= {} must be below `agent.sync_interval_secs` = {}, so that scheduled syncs keep their order",
                    self.sync_jitter.as_secs(),
                    self.sync_interval.as_secs()
                ),
            );
        }
        if self.retry_initial.is_zero() {
            problems.add("agent.retry_initial_ms", "must be greater than 0");
        }
        problems.check_backoff(
            ("agent.retry_initial_ms", self.retry_initial),
            ("agent.retry_max_ms", self.retry_max),
        );
        if !(1..=4096).contains(&self.api_max_connections) {
            problems.add(
                "agent.api_max_connections",
                format!(
                    "= {} must be between 1 and 4096 (and below the process's open-file limit)",
                    self.api_max_connections
                ),
            );
        }
        if !(1..=3600).contains(&self.api_idle_timeout.as_secs()) {
            problems.add(
                "agent.api_idle_timeout_secs",
                format!(
                    "= {} must be between 1 and 3600",
                    self.api_idle_timeout.as_secs()
                ),
            );
        }
        if !(100..=300_000).contains(&self.api_header_read_timeout.as_millis()) {
            problems.add(
                "agent.api_header_read_timeout_ms",
                format!(
                    "= {} must be between 100 and 300000",
                    self.api_header_read_timeout.as_millis()
                ),
            );
        }
    }
}

impl AggregatorConfig {
    /// `credential_required`: without an `[agent]` state directory the configured credential is the only one.
    fn validate(&self, problems: &mut Problems, credential_required: bool) {
        check_http_url(problems, "aggregator.endpoint", &self.endpoint);
        problems.check_secret(
            "aggregator",
            &self.credential,
            &self.credential_file,
            ("credential", "credential_file"),
            "the instance credential (`lsi_…`) issued by `license-sync-aggregator instance add`",
            credential_required,
        );
        if let Some(path) = &self.ca_cert {
            if self.endpoint.scheme() != "https" {
                problems.add(
                    "aggregator.ca_cert",
                    "is set but `aggregator.endpoint` is not https://: use an https endpoint or remove ca_cert",
                );
            }
            problems.check_file("aggregator.ca_cert", path);
        }
        match (&self.client_cert, &self.client_key) {
            (Some(_), None) => problems.add(
                "aggregator.client_key",
                "must be set with `aggregator.client_cert`: give the PEM private key of the client certificate",
            ),
            (None, Some(_)) => problems.add(
                "aggregator.client_cert",
                "must be set with `aggregator.client_key`: give the PEM client certificate of the key",
            ),
            _ => {}
        }
        for (key, path) in [
            ("aggregator.client_cert", &self.client_cert),
            ("aggregator.client_key", &self.client_key),
        ] {
            if let Some(path) = path {
                if self.endpoint.scheme() != "https" {
                    problems.add(
                        key,
                        "is set but `aggregator.endpoint` is not https://: a client certificate needs TLS",
                    );
                }
                problems.check_file(key, path);
            }
        }
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            problems.add(
                "aggregator.batch_size",
                format!(
                    "= {} must be between 1 and {MAX_BATCH_SIZE}",
                    self.batch_size
                ),
            );
        }
        if self.timeout.is_zero() {
            problems.add("aggregator.timeout_secs", "must be greater than 0");
        }
    }
}
