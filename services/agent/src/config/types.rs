//! The typed configuration: one struct per section, with serde's defaults and the lenient field parsers.
//!
//! Durations are `std::time::Duration` fields read from the documented integer keys: `*_secs` keys hold whole
//! seconds, `*_ms` keys milliseconds (serde_with's `DurationSeconds`/`DurationMilliSeconds`). Strings such as
//! `"15m"` are refused as before: the key already names its unit, and one spelling per key keeps configs greppable.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;
use serde::{Deserialize, Deserializer};
use serde_with::{DeserializeAs, DurationMilliSeconds, DurationSeconds};
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
    /// `export`: the key the usage file is encrypted to.
    #[serde(default)]
    pub export: Option<ExportConfig>,
}

/// The `[export]` section (issue 11, encrypted usage files).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// The enterprise's usage-file public key (`age1…`, printed by `license-sync-aggregator enterprise keygen`).
    /// Wins over the key the agent got at enrollment; needed for an air-gapped agent, which never enrolls.
    #[serde(default, deserialize_with = "lenient_optional_string")]
    pub recipient: Option<String>,
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
    #[serde(
        rename = "sync_interval_secs",
        default = "defaults::sync_interval",
        with = "secs"
    )]
    pub sync_interval: Duration,
    /// Upper bound of the random delay added to each scheduled time, so that a fleet does not sync at once. Must be
    /// below `sync_interval_secs`.
    #[serde(
        rename = "sync_jitter_secs",
        default = "defaults::sync_jitter",
        with = "secs"
    )]
    pub sync_jitter: Duration,
    /// First delay before re-sending a snapshot that could not be delivered; doubles per attempt (full jitter).
    #[serde(
        rename = "retry_initial_ms",
        default = "defaults::retry_initial",
        with = "millis"
    )]
    pub retry_initial: Duration,
    /// Cap of the delivery retry delay (and of the control stream's reconnect delay).
    #[serde(
        rename = "retry_max_ms",
        default = "defaults::retry_max",
        with = "millis"
    )]
    pub retry_max: Duration,
    /// How long a SIGTERM waits for an in-flight upload before abandoning it (the snapshot stays pending).
    #[serde(
        rename = "shutdown_grace_secs",
        default = "defaults::shutdown_grace",
        with = "secs"
    )]
    pub shutdown_grace: Duration,

    // --- the local API's connection limits (issue 11), as the aggregator's REST port has them ---
    /// Most connections the local API holds open; at the cap a new one takes the place of the longest-idle one.
    #[serde(default = "defaults::api_max_connections")]
    pub api_max_connections: usize,
    /// A local API connection with no request in flight for this long is closed.
    #[serde(
        rename = "api_idle_timeout_secs",
        default = "defaults::api_idle_timeout",
        with = "secs"
    )]
    pub api_idle_timeout: Duration,
    /// HTTP/1 request headers must arrive within this time (slowloris).
    #[serde(
        rename = "api_header_read_timeout_ms",
        default = "defaults::api_header_read_timeout",
        with = "millis"
    )]
    pub api_header_read_timeout: Duration,
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
// Built once per process and never moved in a hot path: boxing the GHES variant would buy nothing.
#[allow(clippy::large_enum_variant)]
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
    #[serde(
        rename = "request_timeout_secs",
        default = "defaults::request_timeout",
        with = "secs"
    )]
    pub request_timeout: Duration,
    /// How long to wait for GHES to build the report (polling its 202 answers), retries included.
    #[serde(
        rename = "report_deadline_secs",
        default = "defaults::report_deadline",
        with = "secs"
    )]
    pub report_deadline: Duration,
    #[serde(
        rename = "poll_initial_ms",
        default = "defaults::poll_initial",
        with = "millis"
    )]
    pub poll_initial: Duration,
    #[serde(
        rename = "poll_max_ms",
        default = "defaults::poll_max",
        with = "millis"
    )]
    pub poll_max: Duration,
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
    /// PEM client certificate presented to an `https` endpoint that requires mTLS (issued by the aggregator's
    /// client CA with the SAN URI `license-sync://instance/<server_id>`); set with `client_key`.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Users per gRPC message.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// Deadline of one whole upload.
    #[serde(rename = "timeout_secs", default = "defaults::timeout", with = "secs")]
    pub timeout: Duration,
}

/// `*_secs` keys: whole seconds. Only deserialized: the configuration is never written back.
mod secs {
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        input: D,
    ) -> Result<super::Duration, D::Error> {
        <super::DurationSeconds<u64> as super::DeserializeAs<'de, _>>::deserialize_as(input)
    }
}

/// `*_ms` keys: whole milliseconds.
mod millis {
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        input: D,
    ) -> Result<super::Duration, D::Error> {
        <super::DurationMilliSeconds<u64> as super::DeserializeAs<'de, _>>::deserialize_as(input)
    }
}

mod defaults {
    use std::time::Duration;

    pub fn request_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn report_deadline() -> Duration {
        Duration::from_secs(600)
    }
    pub fn poll_initial() -> Duration {
        Duration::from_millis(1_000)
    }
    pub fn poll_max() -> Duration {
        Duration::from_millis(30_000)
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
    pub fn timeout() -> Duration {
        Duration::from_secs(300)
    }
    pub fn listen() -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], 8091))
    }
    pub fn sync_interval() -> Duration {
        Duration::from_secs(7 * 24 * 3600)
    }
    pub fn sync_jitter() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn retry_initial() -> Duration {
        Duration::from_millis(1_000)
    }
    pub fn retry_max() -> Duration {
        Duration::from_millis(300_000)
    }
    pub fn shutdown_grace() -> Duration {
        Duration::from_secs(20)
    }
    /// The local API serves a few operators and probes: 64 sockets is plenty and far below any file limit.
    pub fn api_max_connections() -> usize {
        64
    }
    pub fn api_idle_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn api_header_read_timeout() -> Duration {
        Duration::from_millis(10_000)
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
