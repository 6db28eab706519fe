//! The agent's configuration: one TOML file merged with `LICENSE_SYNC_AGENT_*` environment variables.
//!
//! ```toml
//! [instance]
//! server_id = "6f1c…"                 # the GHES server id (UUID)
//! hostname = "ghes-1.example.com"
//! ghes_version = "3.14.2"             # optional; read from GET /api/v3/meta for a GHES source
//!
//! [source]
//! kind = "file"                       # or "ghes"
//! path = "ghes-1.all_users.csv"
//!
//! [aggregator]                        # needed by `sync`, `enroll` and `run`
//! endpoint = "https://aggregator.example.com:50051"
//! # credential_file = "…"             # optional when the agent is enrolled (see below)
//!
//! [agent]                             # the long-running sidecar (`run`) and its local API
//! state_dir = "/var/lib/license-sync-agent"
//! owner_token_file = "/run/secrets/license-sync-owner-token"
//! ```
//!
//! **Which instance credential is used.** When `[agent]` is configured and its state directory holds an enrolled
//! credential (written by `license-sync-agent enroll` or `POST /api/v1/connection`), that credential is used and
//! `aggregator.credential`/`credential_file` are ignored: enrolling again rotates the credential (the old one stops
//! working), so the state directory always holds the newest one, while a configured secret would go stale. The
//! configured credential is the fallback for agents that are not enrolled (credentials issued with
//! `license-sync-aggregator instance add`).
//!
//! Environment variables override the file, nested with `__`: `LICENSE_SYNC_AGENT_AGGREGATOR__ENDPOINT`. Secrets are
//! best given as files (`token_file`, `credential_file`); the inline forms exist for environments that inject
//! secrets as variables (`LICENSE_SYNC_AGENT_SOURCE__TOKEN`). Relative paths in the file are resolved against the
//! file's directory, so a config and its data can move together; relative paths from the environment are resolved
//! against the working directory.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format as _, Toml};
use reqwest::Url;
use serde::{Deserialize, Deserializer};
use uuid::Uuid;

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "LICENSE_SYNC_AGENT_";

/// Largest accepted `aggregator.batch_size`: keeps one gRPC message well under a few MiB.
pub const MAX_BATCH_SIZE: usize = 10_000;

/// A secret (token or credential). Its `Debug` prints `***` so that a logged config never leaks it, and it has no
/// `Display` or `Serialize`: the only way to the value is [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        lenient_string(deserializer).map(Secret)
    }
}

/// The whole configuration. Build it with [`AgentConfig::load`], which also validates it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub instance: InstanceConfig,
    pub source: SourceConfig,
    /// Needed by `sync`, `enroll` and `run`: `check` and `export` work without an aggregator (air-gapped instances).
    #[serde(default)]
    pub aggregator: Option<AggregatorConfig>,
    /// The long-running sidecar (`run`): state directory, local API, schedule and retries.
    #[serde(default)]
    pub agent: Option<SidecarConfig>,
}

/// The `[agent]` section: how the long-running sidecar keeps its state, serves its local API, schedules syncs and
/// retries deliveries.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    /// Where the enrolled credential, the settings and the snapshots not yet acknowledged live. Created (mode 0700)
    /// when missing. Must be on a local file system: the agent relies on `rename` and `fsync` there.
    pub state_dir: PathBuf,
    /// Address of the local HTTP API (`/healthz`, `/readyz`, `/api/v1/…`). Port 0 picks a free port.
    #[serde(default = "defaults::listen", deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// The owner credential for owner-only local actions (enable, disable, connect, Sync now). Exactly one of
    /// `owner_token` and `owner_token_file`.
    #[serde(default)]
    pub owner_token: Option<Secret>,
    #[serde(default)]
    pub owner_token_file: Option<PathBuf>,
    /// Time between scheduled syncs (default: one week).
    #[serde(default = "defaults::sync_interval_secs")]
    pub sync_interval_secs: u64,
    /// Upper bound of the random delay added to each scheduled time, so that a fleet does not sync at once. Must be
    /// below `sync_interval_secs`.
    #[serde(default = "defaults::sync_jitter_secs")]
    pub sync_jitter_secs: u64,
    /// First delay before re-sending a snapshot that could not be delivered; doubles per attempt (full jitter).
    #[serde(default = "defaults::retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Cap of the delivery retry delay (and of the control stream's reconnect delay).
    #[serde(default = "defaults::retry_max_ms")]
    pub retry_max_ms: u64,
    /// How long a SIGTERM waits for an in-flight upload before abandoning it (the snapshot stays pending).
    #[serde(default = "defaults::shutdown_grace_secs")]
    pub shutdown_grace_secs: u64,
}

/// Who the GHES instance is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    /// The GHES server id.
    pub server_id: Uuid,
    #[serde(deserialize_with = "lenient_string")]
    pub hostname: String,
    /// When absent, a GHES source reads it from `GET /api/v3/meta`.
    #[serde(default, deserialize_with = "lenient_optional_string")]
    pub ghes_version: Option<String>,
}

/// Where the users come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceConfig {
    /// A local copy of `all_users.csv` (air-gapped use, tests).
    File(FileSourceConfig),
    /// The live report of a GHES instance.
    Ghes(GhesSourceConfig),
}

/// Keys that belong to another kind are refused by [`AgentConfig::from_figment`].
#[derive(Debug, Clone, Deserialize)]
pub struct FileSourceConfig {
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GhesSourceConfig {
    /// Base URL of the instance, e.g. `https://ghes.example.com`.
    #[serde(deserialize_with = "url")]
    pub url: Url,
    /// The site admin whose token reads the report.
    #[serde(deserialize_with = "lenient_string")]
    pub username: String,
    #[serde(default)]
    pub token: Option<Secret>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Extra PEM root(s) to trust, for instances with a private CA.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    #[serde(default = "defaults::request_timeout_secs")]
    pub request_timeout_secs: u64,
    /// How long to wait for GHES to build the report (polling its 202 answers), retries included.
    #[serde(default = "defaults::report_deadline_secs")]
    pub report_deadline_secs: u64,
    #[serde(default = "defaults::poll_initial_ms")]
    pub poll_initial_ms: u64,
    #[serde(default = "defaults::poll_max_ms")]
    pub poll_max_ms: u64,
    /// Consecutive failed requests (connection errors, timeouts, 5xx) before giving up.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// Also read the license (`GET /api/v3/enterprise/settings/license`).
    #[serde(default = "defaults::read_license")]
    pub read_license: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorConfig {
    /// gRPC endpoint, `http://` or `https://`.
    #[serde(deserialize_with = "url")]
    pub endpoint: Url,
    #[serde(default)]
    pub credential: Option<Secret>,
    #[serde(default)]
    pub credential_file: Option<PathBuf>,
    /// Extra PEM root(s) to trust for an `https` endpoint.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// Users per gRPC message.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// Deadline of one whole upload.
    #[serde(default = "defaults::timeout_secs")]
    pub timeout_secs: u64,
}

mod defaults {
    pub fn request_timeout_secs() -> u64 {
        30
    }
    pub fn report_deadline_secs() -> u64 {
        600
    }
    pub fn poll_initial_ms() -> u64 {
        1_000
    }
    pub fn poll_max_ms() -> u64 {
        30_000
    }
    pub fn max_attempts() -> u32 {
        5
    }
    pub fn read_license() -> bool {
        true
    }
    pub fn batch_size() -> usize {
        1_000
    }
    pub fn timeout_secs() -> u64 {
        300
    }
    pub fn listen() -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], 8091))
    }
    pub fn sync_interval_secs() -> u64 {
        7 * 24 * 3600
    }
    pub fn sync_jitter_secs() -> u64 {
        3600
    }
    pub fn retry_initial_ms() -> u64 {
        1_000
    }
    pub fn retry_max_ms() -> u64 {
        300_000
    }
    pub fn shutdown_grace_secs() -> u64 {
        20
    }
}

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

    fn one(key: impl Into<String>, message: impl Into<String>) -> Self {
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

/// The environment variable that sets a dotted key, for error messages.
pub fn env_var_for(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.replace('.', "__").to_ascii_uppercase()
    )
}

impl AgentConfig {
    /// Loads `path` (TOML) merged with the `LICENSE_SYNC_AGENT_*` environment, then [validates](Self::validate).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        if let Err(source) = std::fs::metadata(path) {
            return Err(ConfigError::Unreadable {
                what: "the configuration file",
                key: "--config",
                path: path.to_owned(),
                source,
            });
        }
        // Absolute, so that file-relative paths stay right whatever the working directory is later.
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        let figment = Figment::from(Toml::file_exact(&path)).merge(
            // Keys without `__` (like LICENSE_SYNC_AGENT_CONFIG, the CLI's) are not configuration keys.
            Env::prefixed(ENV_PREFIX)
                .filter(|key| key.as_str().contains("__"))
                .split("__"),
        );
        let config = Self::from_figment(&figment)?;
        config.validate()?;
        Ok(config)
    }

    /// Extracts the configuration from any figment (tests, embedding) and resolves file-relative paths. Does not
    /// validate.
    ///
    /// Sections are extracted one by one (and the source by its `kind`) rather than with one `extract`, because
    /// serde's internally tagged enums lose the key path of errors inside `[source]`: this way every problem names
    /// its full key.
    pub fn from_figment(figment: &Figment) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let top = figment
            .extract::<figment::value::Dict>()
            .map_err(|error| ConfigError::Invalid(figment_problems(error, "")))?;
        for key in top.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                problems.push(ConfigProblem {
                    key: key.clone(),
                    message: format!(
                        "is not a known section; expected one of: {}",
                        SECTIONS.join(", ")
                    ),
                });
            }
        }
        let instance = extract_section::<InstanceConfig>(figment, "instance", &mut problems);
        let source = extract_source(figment, &mut problems);
        let aggregator = if top.contains_key("aggregator") {
            extract_section::<AggregatorConfig>(figment, "aggregator", &mut problems).map(Some)
        } else {
            Some(None)
        };
        let agent = if top.contains_key("agent") {
            extract_section::<SidecarConfig>(figment, "agent", &mut problems).map(Some)
        } else {
            Some(None)
        };
        match (instance, source, aggregator, agent) {
            (Some(instance), Some(source), Some(aggregator), Some(agent))
                if problems.is_empty() =>
            {
                let mut config = AgentConfig {
                    instance,
                    source,
                    aggregator,
                    agent,
                };
                config.resolve_relative_paths(figment);
                Ok(config)
            }
            _ => Err(ConfigError::Invalid(problems)),
        }
    }

    /// Paths given in a file are relative to that file's directory; others stay relative to the working directory.
    fn resolve_relative_paths(&mut self, figment: &Figment) {
        let resolve = |key: &str, path: &mut PathBuf| {
            if path.is_absolute() {
                return;
            }
            let base = figment
                .find_metadata(key)
                .and_then(|metadata| metadata.source.as_ref())
                .and_then(|source| source.file_path())
                .and_then(Path::parent);
            if let Some(base) = base {
                *path = base.join(&*path);
            }
        };
        match &mut self.source {
            SourceConfig::File(file) => resolve("source.path", &mut file.path),
            SourceConfig::Ghes(ghes) => {
                if let Some(path) = &mut ghes.token_file {
                    resolve("source.token_file", path);
                }
                if let Some(path) = &mut ghes.ca_cert {
                    resolve("source.ca_cert", path);
                }
            }
        }
        if let Some(aggregator) = &mut self.aggregator {
            if let Some(path) = &mut aggregator.credential_file {
                resolve("aggregator.credential_file", path);
            }
            if let Some(path) = &mut aggregator.ca_cert {
                resolve("aggregator.ca_cert", path);
            }
        }
        if let Some(agent) = &mut self.agent {
            resolve("agent.state_dir", &mut agent.state_dir);
            if let Some(path) = &mut agent.owner_token_file {
                resolve("agent.owner_token_file", path);
            }
        }
    }

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
        problems.into_result()
    }

    /// The aggregator section, required by commands that send.
    pub fn aggregator(&self) -> Result<&AggregatorConfig, ConfigError> {
        self.aggregator.as_ref().ok_or_else(|| {
            ConfigError::one(
                "aggregator",
                "is missing: `sync`, `enroll` and `run` need an [aggregator] section with `endpoint` (and \
                 `credential_file` unless the agent is enrolled), or LICENSE_SYNC_AGENT_AGGREGATOR__ENDPOINT and \
                 LICENSE_SYNC_AGENT_AGGREGATOR__CREDENTIAL",
            )
        })
    }

    /// The `[agent]` section, required by `run` and `enroll`.
    pub fn sidecar(&self) -> Result<&SidecarConfig, ConfigError> {
        self.agent.as_ref().ok_or_else(|| {
            ConfigError::one(
                "agent",
                "is missing: `run` and `enroll` need an [agent] section with at least `state_dir` and \
                 `owner_token_file` (see config/agent.example.toml)",
            )
        })
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
                if secret.expose().trim().is_empty() {
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
        for (key, value) in [
            ("source.request_timeout_secs", self.request_timeout_secs),
            ("source.report_deadline_secs", self.report_deadline_secs),
            ("source.poll_initial_ms", self.poll_initial_ms),
            ("source.max_attempts", u64::from(self.max_attempts)),
        ] {
            if value == 0 {
                problems.add(key, "must be greater than 0");
            }
        }
        if self.poll_max_ms < self.poll_initial_ms {
            problems.add(
                "source.poll_max_ms",
                format!(
                    "= {} is below `source.poll_initial_ms` = {}: the backoff must be able to grow",
                    self.poll_max_ms, self.poll_initial_ms
                ),
            );
        }
    }

    /// The token, read from `token_file` (trimmed) at every call so that a rotated secret is picked up.
    pub fn token(&self) -> Result<Secret, ConfigError> {
        read_secret(
            &self.token,
            &self.token_file,
            "source.token_file",
            "the GHES token file",
        )
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    pub fn report_deadline(&self) -> Duration {
        Duration::from_secs(self.report_deadline_secs)
    }

    pub fn poll_initial(&self) -> Duration {
        Duration::from_millis(self.poll_initial_ms)
    }

    pub fn poll_max(&self) -> Duration {
        Duration::from_millis(self.poll_max_ms)
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
            && !token.expose().trim().is_empty()
            && token.expose().trim().chars().count() < MIN_OWNER_TOKEN_CHARS
        {
            problems.add(
                "agent.owner_token",
                format!(
                    "is shorter than {MIN_OWNER_TOKEN_CHARS} characters: use a long random value, e.g. \
                     `openssl rand -hex 32`"
                ),
            );
        }
        if self.sync_interval_secs == 0 {
            problems.add(
                "agent.sync_interval_secs",
                "must be greater than 0 (604800 is weekly)",
            );
        } else if self.sync_jitter_secs >= self.sync_interval_secs {
            problems.add(
                "agent.sync_jitter_secs",
                format!(
                    "= {} must be below `agent.sync_interval_secs` = {}, so that scheduled syncs keep their order",
                    self.sync_jitter_secs, self.sync_interval_secs
                ),
            );
        }
        if self.retry_initial_ms == 0 {
            problems.add("agent.retry_initial_ms", "must be greater than 0");
        }
        if self.retry_max_ms < self.retry_initial_ms {
            problems.add(
                "agent.retry_max_ms",
                format!(
                    "= {} is below `agent.retry_initial_ms` = {}: the backoff must be able to grow",
                    self.retry_max_ms, self.retry_initial_ms
                ),
            );
        }
    }

    /// The owner token, read from `owner_token_file` (trimmed) at every call so that a rotated token is picked up
    /// without a restart.
    pub fn owner_token(&self) -> Result<Secret, ConfigError> {
        let token = read_secret(
            &self.owner_token,
            &self.owner_token_file,
            "agent.owner_token_file",
            "the owner token file",
        )?;
        if token.expose().chars().count() < MIN_OWNER_TOKEN_CHARS {
            return Err(ConfigError::one(
                "agent.owner_token_file",
                format!(
                    "holds a token shorter than {MIN_OWNER_TOKEN_CHARS} characters: use a long random value"
                ),
            ));
        }
        Ok(token)
    }

    pub fn sync_interval(&self) -> Duration {
        Duration::from_secs(self.sync_interval_secs)
    }

    pub fn sync_jitter(&self) -> Duration {
        Duration::from_secs(self.sync_jitter_secs)
    }

    pub fn retry_initial(&self) -> Duration {
        Duration::from_millis(self.retry_initial_ms)
    }

    pub fn retry_max(&self) -> Duration {
        Duration::from_millis(self.retry_max_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
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
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            problems.add(
                "aggregator.batch_size",
                format!(
                    "= {} must be between 1 and {MAX_BATCH_SIZE}",
                    self.batch_size
                ),
            );
        }
        if self.timeout_secs == 0 {
            problems.add("aggregator.timeout_secs", "must be greater than 0");
        }
    }

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

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

fn read_secret(
    inline: &Option<Secret>,
    file: &Option<PathBuf>,
    file_key: &'static str,
    what: &'static str,
) -> Result<Secret, ConfigError> {
    let secret = match (inline, file) {
        (Some(secret), None) => secret.expose().trim().to_owned(),
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
    Ok(Secret(secret))
}

const SECTIONS: [&str; 4] = ["instance", "source", "aggregator", "agent"];

fn extract_section<T: serde::de::DeserializeOwned>(
    figment: &Figment,
    section: &str,
    problems: &mut Vec<ConfigProblem>,
) -> Option<T> {
    figment
        .focus(section)
        .extract::<T>()
        .map_err(|error| problems.extend(figment_problems(error, section)))
        .ok()
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum SourceKind {
    File,
    Ghes,
}

/// `[source]` by its `kind`, refusing keys that do not belong to that kind.
fn extract_source(figment: &Figment, problems: &mut Vec<ConfigProblem>) -> Option<SourceConfig> {
    let focused = figment.focus("source");
    let kind = match focused.extract_inner::<SourceKind>("kind") {
        Ok(kind) => kind,
        Err(error) if matches!(error.kind, figment::error::Kind::MissingField(_)) => {
            problems.push(ConfigProblem {
                key: "source.kind".into(),
                message:
                    "is missing: set it to \"ghes\" (live report) or \"file\" (local all_users.csv)"
                        .into(),
            });
            return None;
        }
        Err(error) => {
            problems.extend(figment_problems(error, "source"));
            return None;
        }
    };
    let (kind_name, fields) = match kind {
        SourceKind::File => ("file", struct_fields::<FileSourceConfig>()),
        SourceKind::Ghes => ("ghes", struct_fields::<GhesSourceConfig>()),
    };
    if let Ok(dict) = focused.extract::<figment::value::Dict>() {
        for key in dict.keys() {
            if key != "kind" && !fields.contains(&key.as_str()) {
                problems.push(ConfigProblem {
                    key: format!("source.{key}"),
                    message: format!(
                        "is not a setting of kind = \"{kind_name}\"; expected one of: {}",
                        fields.join(", ")
                    ),
                });
            }
        }
    }
    let result = match kind {
        SourceKind::File => focused.extract().map(SourceConfig::File),
        SourceKind::Ghes => focused.extract().map(SourceConfig::Ghes),
    };
    result
        .map_err(|error| problems.extend(figment_problems(error, "source")))
        .ok()
}

/// The field names serde's derive knows for `T`, so that the list of accepted keys cannot drift from the struct.
fn struct_fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Probe(&'static [&'static str]);
    impl<'de> Deserializer<'de> for &mut Probe {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(
            self,
            _: V,
        ) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("field probe"))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 = fields;
            Err(serde::de::Error::custom("field probe"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut probe = Probe(&[]);
    let _ = T::deserialize(&mut probe);
    probe.0
}

/// Turns figment's errors into problems naming the dotted key (under `prefix`) and where the value came from.
fn figment_problems(error: figment::Error, prefix: &str) -> Vec<ConfigProblem> {
    use figment::error::Kind;
    let join = |parts: &[&str]| {
        parts
            .iter()
            .filter(|part| !part.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(".")
    };
    error
        .into_iter()
        .map(|error| {
            let path = error.path.join(".");
            let mut key = join(&[prefix, &path]);
            let origin = error
                .metadata
                .as_ref()
                .map(|metadata| match metadata.source.as_ref() {
                    Some(source) => format!(" (from {source})"),
                    None => format!(" (from {})", metadata.name),
                })
                .unwrap_or_default();
            let message = match &error.kind {
                Kind::MissingField(field) => {
                    key = join(&[&key, field]);
                    format!(
                        "is missing: set it in the config file or in {}",
                        env_var_for(&key)
                    )
                }
                Kind::UnknownField(field, expected) => {
                    key = join(&[&key, field]);
                    format!(
                        "is not a known setting{origin}; expected one of: {}",
                        expected.join(", ")
                    )
                }
                Kind::UnknownVariant(variant, expected) => format!(
                    "= {variant:?} is not supported{origin}; expected one of: {}",
                    expected.join(", ")
                ),
                other => format!("is invalid{origin}: {other}"),
            };
            ConfigProblem {
                key: if key.is_empty() { "(file)".into() } else { key },
                message,
            }
        })
        .collect()
}

/// Accepts strings, and numbers or booleans as their text: an environment variable like `…__GHES_VERSION=3.14`
/// reaches serde as a float, and a numeric token as an integer.
fn lenient_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = String;
        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<String, E> {
            Ok(value.to_owned())
        }
        fn visit_string<E: serde::de::Error>(self, value: String) -> Result<String, E> {
            Ok(value)
        }
        fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<String, E> {
            Ok(value.to_string())
        }
        fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<String, E> {
            Ok(value.to_string())
        }
        fn visit_i128<E: serde::de::Error>(self, value: i128) -> Result<String, E> {
            Ok(value.to_string())
        }
        fn visit_u128<E: serde::de::Error>(self, value: u128) -> Result<String, E> {
            Ok(value.to_string())
        }
        fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<String, E> {
            Ok(value.to_string())
        }
        fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<String, E> {
            Ok(value.to_string())
        }
    }
    deserializer.deserialize_any(Visitor)
}

fn lenient_optional_string<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    lenient_string(deserializer).map(Some)
}

/// A socket address such as `127.0.0.1:8091` (from the file or an environment variable).
fn socket_addr<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let text = lenient_string(deserializer)?;
    text.trim().parse().map_err(|_| {
        serde::de::Error::custom(format_args!(
            "{text:?} is not a socket address: use IP:PORT, e.g. \"127.0.0.1:8091\""
        ))
    })
}

fn url<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Url, D::Error> {
    let text = lenient_string(deserializer)?;
    Url::parse(text.trim()).map_err(|error| {
        serde::de::Error::custom(format_args!("{text:?} is not a valid URL ({error})"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    #[test]
    fn secrets_never_show_in_debug() {
        let secret = Secret::new("ghp_verysecret");
        assert_eq!(format!("{secret:?}"), "\"***\"");
        let config = AggregatorConfig {
            endpoint: Url::parse("http://127.0.0.1:50051").expect("url"),
            credential: Some(secret),
            credential_file: None,
            ca_cert: None,
            batch_size: 10,
            timeout_secs: 1,
        };
        let debug = format!("{config:?}");
        assert!(!debug.contains("verysecret"), "{debug}");
        assert!(debug.contains("***"));
    }

    #[test]
    fn env_var_names_follow_the_nesting_rule() {
        assert_eq!(
            env_var_for("aggregator.endpoint"),
            "LICENSE_SYNC_AGENT_AGGREGATOR__ENDPOINT"
        );
    }

    #[test]
    fn lenient_strings_accept_numbers_from_the_environment() {
        let figment = Figment::from(Serialized::defaults(serde_json::json!({
            "instance": { "server_id": "6f1c8a38-5b2e-4a4f-9d44-8d4a4f1b6c01", "hostname": "ghes", "ghes_version": 3.15 },
            "source": { "kind": "ghes", "url": "https://ghes.example.com", "username": 42, "token": 123456 },
        })));
        let config = AgentConfig::from_figment(&figment).expect("extract");
        assert_eq!(config.instance.ghes_version.as_deref(), Some("3.15"));
        let SourceConfig::Ghes(ghes) = &config.source else {
            panic!("ghes source expected");
        };
        assert_eq!(ghes.username, "42");
        assert_eq!(ghes.token.as_ref().map(Secret::expose), Some("123456"));
        assert_eq!(ghes.max_attempts, 5);
        assert!(ghes.read_license);
    }
}
