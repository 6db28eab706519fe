//! The typed configuration: one struct per section, with serde's defaults and the lenient field parsers.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;
use serde::{Deserialize, Deserializer};
use uuid::Uuid;

use super::{ConfigError, Secret};

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

impl AgentConfig {
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

impl GhesSourceConfig {
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

impl SidecarConfig {
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
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

/// Accepts strings, and numbers or booleans as their text: an environment variable like `…__GHES_VERSION=3.14`
/// reaches serde as a float, and a numeric token as an integer.
pub(super) fn lenient_string<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<String, D::Error> {
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
