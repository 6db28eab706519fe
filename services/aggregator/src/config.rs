//! The aggregator's configuration: one typed struct, loaded from an optional TOML file and `LICENSE_SYNC_AGGREGATOR_*`
//! environment variables (the environment wins), validated before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AggregatorConfig {
    /// `sqlite://PATH` (the embedded default) or, later, `postgres://…`.
    pub database_url: String,
    /// Where agents stream snapshots (gRPC, HTTP/2).
    pub grpc_listen: SocketAddr,
    /// REST API, health and metrics.
    pub http_listen: SocketAddr,
    /// Base URL clients use to reach the REST API, for `Link` headers (e.g. `https://licenses.example.com`).
    /// When unset, it is taken from the request's `Host` header.
    pub public_url: Option<String>,
    /// An instance with no successful sync for longer than this is reported stale.
    pub stale_after_days: u32,
    /// Largest gRPC message accepted (one batch of users).
    pub max_message_bytes: usize,
    /// Most users one snapshot may carry.
    pub max_snapshot_users: usize,
    /// A snapshot stream that sends nothing for this long is abandoned (nothing is stored).
    pub stream_idle_timeout_secs: u64,
    /// Largest usage-file upload or members import accepted over REST.
    pub max_upload_bytes: usize,
    /// Profile links of cloud members: `<cloud_web_url>/<login>`.
    pub cloud_web_url: String,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// How often agents send a heartbeat on their control stream (told to them in `welcome`). A stream silent for
    /// three intervals is closed; an agent not heard from for two intervals and 5 s is shown disconnected.
    pub agent_heartbeat_interval_secs: u32,
    /// How often each control stream looks in the database for "Sync now" requests created by another aggregator
    /// replica (requests created on the same process are delivered at once).
    pub control_poll_interval_ms: u64,
    /// How long REST readers reuse a check of the store's generation. Changes made through this process show at
    /// once; changes made by another process (another replica, the admin CLI) show after at most this long.
    /// 0 checks the store on every request.
    pub view_check_interval_ms: u64,
    /// How long a REST API token, once checked, is trusted without asking the store again.
    pub api_token_cache_secs: u64,
    /// Most connections this process opens to PostgreSQL (ignored for SQLite). Replicas share one database, whose
    /// cores serve all of their connections: more connections than that makes commits wait for each other longer.
    pub database_max_connections: u32,
    /// Most memory each enterprise's cache of serialised `consumed-licenses` pages may hold, in MiB (0 disables
    /// it). Pages of the current generation are served from it; a page of 100 users is 60–80 KB.
    pub page_cache_mib: u32,
    /// Most REST connections open at once. At the cap a new client takes the place of the connection idle the
    /// longest (one with no request in flight); when every connection is busy it waits in the listen queue. The
    /// default keeps both ports and the database pool under the common 1024 open-file limit.
    pub http_max_connections: usize,
    /// How long a REST client may take to send a request's headers (slowloris), from the connection's start or the
    /// end of its previous request (HTTP/1).
    pub http_header_read_timeout_ms: u64,
    /// A REST connection with no request in flight for this long is closed (kept-alive or never used).
    pub http_idle_timeout_secs: u64,
    /// Longest a REST request may take, body and answer included, except the body uploads (below).
    pub http_request_timeout_secs: u64,
    /// Longest a usage upload or members import may take (`max_upload_bytes` over a slow link).
    pub http_upload_timeout_secs: u64,
    /// Most gRPC connections open at once, with the same room-making rule as `http_max_connections`.
    pub grpc_max_connections: usize,
    /// A gRPC connection with no call (stream) open for this long is closed; agents reconnect when they next call.
    pub grpc_idle_timeout_secs: u64,
    /// Most calls one gRPC connection may have open at once (an agent needs two: its control stream and an upload).
    pub grpc_max_concurrent_streams: u32,

    // Ingest stream limits (issue 11): what one instance credential can make the aggregator hold.
    /// Most snapshot streams open at once per instance credential (an agent sends one snapshot at a time).
    pub ingest_max_streams_per_instance: usize,
    /// Most snapshot streams open at once in this process, all instances together.
    pub ingest_max_streams: usize,
    /// Most bytes (encoded messages) one snapshot stream may carry. Unset: enough for `max_snapshot_users` users of
    /// the largest fields ([`AggregatorConfig::max_stream_bytes`]).
    pub ingest_max_stream_bytes: Option<u64>,
    /// Most messages (header, batches, trailer) one snapshot stream may carry. Unset: batches averaging at least
    /// [`MIN_USERS_PER_BATCH`] users ([`AggregatorConfig::max_stream_messages`]).
    pub ingest_max_stream_messages: Option<u64>,
    /// Longest a snapshot stream may stay open, first message to trailer, whatever it sends (the idle timeout alone
    /// is reset by every message).
    pub ingest_stream_max_secs: u64,
    // TLS and mTLS (issue 11). Unset: both ports speak plain text, for a TLS-terminating ingress in front.
    /// PEM certificate chain (leaf first) served on both ports; set together with `tls_key_path`.
    pub tls_cert_path: Option<PathBuf>,
    /// PEM private key of `tls_cert_path` (PKCS#8, PKCS#1 or SEC1).
    pub tls_key_path: Option<PathBuf>,
    /// PEM CA certificate(s) that issue the agents' client certificates: mTLS on the gRPC port, each certificate
    /// bound to one instance by the SAN URI `license-sync://instance/<server_id>`. Needs `tls_cert_path`.
    pub tls_client_ca_path: Option<PathBuf>,
    /// With `tls_client_ca_path`: `required` refuses a TLS handshake without a client certificate from the CA;
    /// `optional` lets agents without one connect to enroll, while every call with an instance credential still
    /// needs the instance's certificate.
    pub tls_client_auth: TlsClientAuth,
    /// A TLS handshake not finished within this long is closed (a client stalling it holds a connection).
    pub tls_handshake_timeout_ms: u64,
    /// How often the certificate, key and client CA files are re-read; a change is served from the next handshake.
    pub tls_reload_interval_secs: u64,
    // Token lifecycle and failed-authentication limits (`tokens`).
    /// A bearer token `GET /metrics` requires (`Authorization: Bearer …`); unset, `/metrics` is open (restrict it
    /// at the network level then).
    pub metrics_token: Option<MetricsToken>,
    /// Refused credentials (REST token, enrollment token, instance credential, metrics token) one client address may
    /// have per minute before its further refusals are answered 429 / `RESOURCE_EXHAUSTED` until the minute ends.
    pub auth_failures_per_minute: u32,
    /// Most client addresses whose failures are counted at once (about 100 bytes each).
    pub auth_failure_tracked_addresses: u64,
    /// How long a web console session lasts from its sign-in, in hours (1 to 720); signing out ends it sooner.
    pub console_session_hours: u32,
}

/// The `metrics_token` secret: `Debug` and `Serialize` print `"***"`, so neither a log line nor a dump of the
/// configuration shows it; read only through [`MetricsToken::expose`].
#[derive(Clone)]
pub struct MetricsToken(secrecy::SecretString);

impl<'de> Deserialize<'de> for MetricsToken {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(|token| MetricsToken(token.into()))
    }
}

impl MetricsToken {
    pub fn new(token: &str) -> Self {
        MetricsToken(secrecy::SecretString::from(token.to_owned()))
    }

    pub fn expose(&self) -> &str {
        secrecy::ExposeSecret::expose_secret(&self.0)
    }
}

impl std::fmt::Debug for MetricsToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Only the defaults (where it is unset) are ever serialised, to seed figment.
impl Serialize for MetricsToken {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("***")
    }
}

impl PartialEq for MetricsToken {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

/// Whether agents must present a client certificate in the TLS handshake of the gRPC port.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsClientAuth {
    #[default]
    Required,
    Optional,
}

/// Largest encoded size of one user row on the wire: a login of [`MAX_LOGIN_CHARS`] and an email of
/// [`MAX_EMAIL_CHARS`] characters of 4 UTF-8 bytes each (1,680 bytes), every other field at its largest, and the
/// row's share of the batch framing; a unit test encodes such a row to hold this bound.
///
/// [`MAX_LOGIN_CHARS`]: license_sync_core::snapshot::MAX_LOGIN_CHARS
/// [`MAX_EMAIL_CHARS`]: license_sync_core::snapshot::MAX_EMAIL_CHARS
pub const MAX_WIRE_USER_BYTES: u64 = 1_800;
/// Room for a stream's header, trailer and message framing in the default byte budget.
pub const STREAM_FRAMING_BYTES: u64 = 1024 * 1024;
/// The batch size the default message budget assumes at least on average (the agent's default is 1000).
pub const MIN_USERS_PER_BATCH: u64 = 10;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig {
            database_url: "sqlite://license-sync.db".to_owned(),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: None,
            stale_after_days: 8,
            max_message_bytes: 8 * 1024 * 1024,
            max_snapshot_users: 2_000_000,
            stream_idle_timeout_secs: 120,
            max_upload_bytes: 512 * 1024 * 1024,
            cloud_web_url: "https://github.com".to_owned(),
            log_format: LogFormat::Text,
            agent_heartbeat_interval_secs: 30,
            control_poll_interval_ms: 1000,
            view_check_interval_ms: 200,
            api_token_cache_secs: 10,
            database_max_connections: crate::store::DEFAULT_MAX_CONNECTIONS,
            page_cache_mib: 8,
            http_max_connections: 512,
            http_header_read_timeout_ms: 10_000,
            http_idle_timeout_secs: 60,
            http_request_timeout_secs: 60,
            http_upload_timeout_secs: 900,
            grpc_max_connections: 512,
            grpc_idle_timeout_secs: 60,
            grpc_max_concurrent_streams: 32,
            ingest_max_streams_per_instance: 2,
            ingest_max_streams: 64,
            ingest_max_stream_bytes: None,
            ingest_max_stream_messages: None,
            ingest_stream_max_secs: 600,
            tls_cert_path: None,
            console_session_hours: 12,
            tls_key_path: None,
            tls_client_ca_path: None,
            tls_client_auth: TlsClientAuth::Required,
            tls_handshake_timeout_ms: 10_000,
            tls_reload_interval_secs: 5,
            metrics_token: None,
            auth_failures_per_minute: 20,
            auth_failure_tracked_addresses: 100_000,
        }
    }
}

/// One thing wrong with the configuration: the key and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key: String,
    pub message: String,
}

/// Every problem found, so that one start-up tells them all. Shown like the agent's: one problem on the same line,
/// several as a list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:{}", list_problems(.0))]
pub struct InvalidConfig(pub Vec<ConfigProblem>);

fn list_problems(problems: &[ConfigProblem]) -> String {
    let line = |problem: &ConfigProblem| format!("`{}` {}", problem.key, problem.message);
    match problems {
        [only] => format!(" {}", line(only)),
        several => several
            .iter()
            .map(|problem| format!("\n  - {}", line(problem)))
            .collect(),
    }
}

impl AggregatorConfig {
    /// `ingest_max_stream_bytes`, or when unset `max_snapshot_users` × [`MAX_WIRE_USER_BYTES`] +
    /// [`STREAM_FRAMING_BYTES`] (about 3.4 GiB for 2,000,000 users): an honest snapshot never reaches it.
    pub fn max_stream_bytes(&self) -> u64 {
        self.ingest_max_stream_bytes.unwrap_or_else(|| {
            (self.max_snapshot_users as u64)
                .saturating_mul(MAX_WIRE_USER_BYTES)
                .saturating_add(STREAM_FRAMING_BYTES)
        })
    }

    /// `ingest_max_stream_messages`, or when unset ⌈`max_snapshot_users` / [`MIN_USERS_PER_BATCH`]⌉ + 2 (header
    /// and trailer): 200,002 by default, which bounds a stream of empty batches.
    pub fn max_stream_messages(&self) -> u64 {
        self.ingest_max_stream_messages.unwrap_or_else(|| {
            (self.max_snapshot_users as u64)
                .div_ceil(MIN_USERS_PER_BATCH)
                .saturating_add(2)
        })
    }

    /// Defaults, then the file (if any), then `LICENSE_SYNC_AGGREGATOR_*` variables (e.g. `LICENSE_SYNC_AGGREGATOR_DATABASE_URL`).
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(AggregatorConfig::default()));
        if let Some(file) = file {
            if !file.exists() {
                anyhow::bail!(
                    "configuration file {} does not exist: pass an existing file to --config or omit it",
                    file.display()
                );
            }
            figment = figment.merge(Toml::file(file));
        }
        // `LICENSE_SYNC_AGGREGATOR_CONFIG` names the file itself (the CLI's `--config`), not a setting.
        let figment = figment.merge(Env::prefixed("LICENSE_SYNC_AGGREGATOR_").ignore(&["config"]));
        Ok(Self::from_figment(&figment)?)
    }

    /// Extracts and validates. serde stops at the first bad value, so when extraction fails each key is tried alone
    /// on top of the defaults, and the keys that pass are validated together: every problem is reported at once.
    pub fn from_figment(figment: &Figment) -> Result<Self, InvalidConfig> {
        let first_error = match figment.extract::<AggregatorConfig>() {
            Ok(config) => return config.validate().map(|()| config),
            Err(error) => error,
        };
        let Ok(given) = figment.extract::<figment::value::Dict>() else {
            // Not even a table (e.g. a TOML syntax error): figment's message says where.
            return Err(InvalidConfig(vec![ConfigProblem {
                key: "(file)".to_owned(),
                message: format!("cannot be read: {first_error}"),
            }]));
        };
        let defaults = || Figment::from(Serialized::defaults(AggregatorConfig::default()));
        let mut problems = Vec::new();
        let mut accepted = defaults();
        for (key, value) in given {
            let alone = defaults().merge(Serialized::default(&key, &value));
            match alone.extract::<AggregatorConfig>() {
                Ok(_) => accepted = accepted.merge(Serialized::default(&key, value)),
                Err(error) => problems.push(key_problem(figment, key, &error)),
            }
        }
        if let Err(InvalidConfig(more)) = accepted
            .extract::<AggregatorConfig>()
            .map_err(|error| InvalidConfig(vec![key_problem(figment, "(file)".to_owned(), &error)]))
            .and_then(|config| config.validate())
        {
            problems.extend(more);
        }
        Err(InvalidConfig(problems))
    }

    /// Checks every setting and reports all the problems found.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let mut problems = Vec::new();
        let mut refuse = |key: &str, message: String| {
            problems.push(ConfigProblem {
                key: key.to_owned(),
                message,
            })
        };
        let scheme_ok = ["sqlite:", "postgres:", "postgresql:"]
            .iter()
            .any(|scheme| self.database_url.starts_with(scheme));
        if !scheme_ok {
            refuse(
                "database_url",
                "must start with `sqlite:` (e.g. `sqlite://license-sync.db`) or `postgres:` \
                 (e.g. `postgres://license_sync@db.example.com/license_sync`); got a URL with another scheme"
                    .to_owned(),
            );
        }
        if self.stale_after_days == 0 {
            refuse("stale_after_days", "must be at least 1".to_owned());
        }
        if self.max_message_bytes < 64 * 1024 {
            refuse(
                "max_message_bytes",
                "must be at least 65536 so that one batch of users fits".to_owned(),
            );
        }
        if self.stream_idle_timeout_secs == 0 {
            refuse("stream_idle_timeout_secs", "must be at least 1".to_owned());
        }
        if self.max_snapshot_users == 0 {
            refuse("max_snapshot_users", "must be at least 1".to_owned());
        }
        if !(1..=300).contains(&self.agent_heartbeat_interval_secs) {
            refuse(
                "agent_heartbeat_interval_secs",
                format!(
                    "must be between 1 and 300 (agents never wait longer than 300 s between heartbeats), got {}",
                    self.agent_heartbeat_interval_secs
                ),
            );
        }
        if self.view_check_interval_ms > 60_000 {
            refuse(
                "view_check_interval_ms",
                "must be at most 60000: readers would see other replicas' changes too late"
                    .to_owned(),
            );
        }
        if !(1..=1000).contains(&self.database_max_connections) {
            refuse(
                "database_max_connections",
                format!(
                    "must be between 1 and 1000, got {}",
                    self.database_max_connections
                ),
            );
        }
        if self.page_cache_mib > 4096 {
            refuse(
                "page_cache_mib",
                format!(
                    "must be at most 4096 (it is per enterprise), got {}",
                    self.page_cache_mib
                ),
            );
        }
        if !(1..=720).contains(&self.console_session_hours) {
            refuse(
                "console_session_hours",
                format!(
                    "must be from 1 to 720 (30 days), got {}",
                    self.console_session_hours
                ),
            );
        }
        if self.api_token_cache_secs > 300 {
            refuse("api_token_cache_secs", "must be at most 300".to_owned());
        }
        if !(100..=60_000).contains(&self.control_poll_interval_ms) {
            refuse(
                "control_poll_interval_ms",
                format!(
                    "must be between 100 and 60000, got {}",
                    self.control_poll_interval_ms
                ),
            );
        }
        let mut within =
            |key: &str, value: u64, range: std::ops::RangeInclusive<u64>, why: &str| {
                if !range.contains(&value) {
                    refuse(
                        key,
                        format!(
                            "must be between {} and {}{why}, got {value}",
                            range.start(),
                            range.end()
                        ),
                    );
                }
            };
        within(
            "http_max_connections",
            self.http_max_connections as u64,
            1..=65_536,
            " (and below the process's open-file limit)",
        );
        within(
            "grpc_max_connections",
            self.grpc_max_connections as u64,
            1..=65_536,
            " (and below the process's open-file limit)",
        );
        within(
            "http_header_read_timeout_ms",
            self.http_header_read_timeout_ms,
            100..=300_000,
            "",
        );
        within(
            "http_idle_timeout_secs",
            self.http_idle_timeout_secs,
            1..=3600,
            "",
        );
        within(
            "http_request_timeout_secs",
            self.http_request_timeout_secs,
            1..=3600,
            "",
        );
        within(
            "http_upload_timeout_secs",
            self.http_upload_timeout_secs,
            1..=86_400,
            "",
        );
        within(
            "grpc_idle_timeout_secs",
            self.grpc_idle_timeout_secs,
            1..=3600,
            "",
        );
        within(
            "grpc_max_concurrent_streams",
            u64::from(self.grpc_max_concurrent_streams),
            2..=10_000,
            " (an agent holds its control stream while it uploads)",
        );
        within(
            "ingest_max_streams",
            self.ingest_max_streams as u64,
            1..=100_000,
            "",
        );
        within(
            "ingest_max_streams_per_instance",
            self.ingest_max_streams_per_instance as u64,
            1..=(self.ingest_max_streams.max(1) as u64),
            " (at most `ingest_max_streams`)",
        );
        within(
            "ingest_stream_max_secs",
            self.ingest_stream_max_secs,
            1..=86_400,
            "",
        );
        if let Some(bytes) = self.ingest_max_stream_bytes {
            within(
                "ingest_max_stream_bytes",
                bytes,
                (self.max_message_bytes as u64)..=u64::MAX,
                " (at least `max_message_bytes`, so that one full batch fits; unset derives it from \
                 `max_snapshot_users`)",
            );
        }
        if let Some(messages) = self.ingest_max_stream_messages {
            within(
                "ingest_max_stream_messages",
                messages,
                3..=u64::MAX,
                " (a header, one batch and a trailer; unset derives it from `max_snapshot_users`)",
            );
        }
        within(
            "tls_handshake_timeout_ms",
            self.tls_handshake_timeout_ms,
            100..=300_000,
            "",
        );
        within(
            "tls_reload_interval_secs",
            self.tls_reload_interval_secs,
            1..=3600,
            "",
        );
        within(
            "auth_failures_per_minute",
            u64::from(self.auth_failures_per_minute),
            1..=100_000,
            "",
        );
        within(
            "auth_failure_tracked_addresses",
            self.auth_failure_tracked_addresses,
            100..=10_000_000,
            "",
        );
        match (&self.tls_cert_path, &self.tls_key_path) {
            (Some(_), None) => refuse(
                "tls_key_path",
                "must be set with `tls_cert_path`: give the PEM private key of the certificate"
                    .to_owned(),
            ),
            (None, Some(_)) => refuse(
                "tls_cert_path",
                "must be set with `tls_key_path`: give the PEM certificate chain of the key"
                    .to_owned(),
            ),
            _ => {}
        }
        if self.tls_client_ca_path.is_some() && self.tls_cert_path.is_none() {
            refuse(
                "tls_client_ca_path",
                "needs TLS: set `tls_cert_path` and `tls_key_path` too (client certificates exist only in TLS)"
                    .to_owned(),
            );
        }
        if let Some(token) = &self.metrics_token
            && (token.expose().trim().len() < 16 || token.expose().chars().any(char::is_whitespace))
        {
            refuse(
                "metrics_token",
                "must be at least 16 characters without spaces (e.g. `openssl rand -hex 24`)"
                    .to_owned(),
            );
        }
        if let Some(url) = &self.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            refuse(
                "public_url",
                format!("must start with http:// or https://, got {url:?}"),
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(InvalidConfig(problems))
        }
    }
}

/// What figment said about one key, with where the value came from (the file or the environment).
fn key_problem(figment: &Figment, key: String, error: &figment::Error) -> ConfigProblem {
    let origin = figment
        .find_metadata(&key)
        .map(|metadata| match &metadata.source {
            Some(source) => format!(" (from {source})"),
            None => format!(" (from {})", metadata.name),
        })
        .unwrap_or_default();
    let message = match &error.kind {
        figment::error::Kind::UnknownField(_, expected) => {
            format!(
                "is not a known setting{origin}; expected one of: {}",
                expected.join(", ")
            )
        }
        kind => format!("is invalid{origin}: {kind}"),
    };
    ConfigProblem { key, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_embedded() {
        let config = AggregatorConfig::default();
        config.validate().expect("defaults validate");
        assert!(config.database_url.starts_with("sqlite:"));
        assert_eq!(config.stale_after_days, 8);
        assert_eq!(config.agent_heartbeat_interval_secs, 30);
        assert_eq!(config.control_poll_interval_ms, 1000);
    }

    #[test]
    // figment's test jail fixes the closure's error type.
    #[allow(clippy::result_large_err)]
    fn variables_override_and_the_config_file_variable_is_not_a_setting() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("aggregator.toml", "stale_after_days = 3\n")?;
            jail.set_env("LICENSE_SYNC_AGGREGATOR_CONFIG", "aggregator.toml");
            jail.set_env("LICENSE_SYNC_AGGREGATOR_VIEW_CHECK_INTERVAL_MS", "0");
            let config = AggregatorConfig::load(Some(Path::new("aggregator.toml")))
                .map_err(|err| err.to_string())?;
            assert_eq!(config.stale_after_days, 3);
            assert_eq!(config.view_check_interval_ms, 0);
            Ok(())
        });
    }

    #[test]
    fn file_values_load_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("aggregator.toml");
        std::fs::write(
            &path,
            "stale_after_days = 3\nhttp_listen = \"127.0.0.1:0\"\n",
        )
        .expect("write");
        let config = AggregatorConfig::load(Some(&path)).expect("loads");
        assert_eq!(config.stale_after_days, 3);

        std::fs::write(&path, "stale_after_days = 0\n").expect("write");
        let err = AggregatorConfig::load(Some(&path)).expect_err("refused");
        assert!(err.to_string().contains("stale_after_days"), "{err}");

        for bad in [
            "agent_heartbeat_interval_secs = 0\n",
            "agent_heartbeat_interval_secs = 301\n",
            "control_poll_interval_ms = 10\n",
            "database_max_connections = 0\n",
            "page_cache_mib = 5000\n",
            "http_max_connections = 0\n",
            "http_header_read_timeout_ms = 10\n",
            "http_idle_timeout_secs = 0\n",
            "grpc_max_concurrent_streams = 1\n",
            "ingest_max_streams = 0\n",
            "ingest_max_streams_per_instance = 65\n",
            "ingest_stream_max_secs = 0\n",
            "ingest_max_stream_bytes = 1000\n",
            "ingest_max_stream_messages = 2\n",
            "metrics_token = \"short\"\n",
            "auth_failures_per_minute = 0\n",
            "auth_failure_tracked_addresses = 1\n",
        ] {
            std::fs::write(&path, bad).expect("write");
            let err = AggregatorConfig::load(Some(&path)).expect_err("refused");
            let key = bad.split(' ').next().unwrap_or_default();
            assert!(err.to_string().contains(key), "{err}");
        }

        std::fs::write(&path, "no_such_key = 1\n").expect("write");
        let err = AggregatorConfig::load(Some(&path)).expect_err("refused");
        assert!(err.to_string().contains("no_such_key"), "{err}");
    }

    #[test]
    fn stream_budgets_default_to_what_the_largest_honest_snapshot_needs() {
        use license_sync_core::model::{ServerUser, UserRole};
        use license_sync_core::snapshot::{MAX_EMAIL_CHARS, MAX_LOGIN_CHARS};
        use license_sync_proto::v1::{SnapshotChunk, UserBatch, snapshot_chunk::Chunk};
        use prost::Message as _;
        let time = time::OffsetDateTime::now_utc();
        let largest = ServerUser {
            id: i64::MIN,
            login: "😀".repeat(MAX_LOGIN_CHARS),
            email: "😀".repeat(MAX_EMAIL_CHARS),
            role: UserRole::SiteAdmin,
            suspended: true,
            dormant: true,
            created_at: Some(time),
            last_active: Some(time),
            two_factor_enabled: Some(true),
        };
        let batch = |users: usize| SnapshotChunk {
            chunk: Some(Chunk::Users(UserBatch {
                users: vec![license_sync_proto::convert::server_user(&largest); users],
            })),
        };
        for users in [1, 1000] {
            let bytes = batch(users).encoded_len() as u64;
            assert!(
                bytes <= users as u64 * MAX_WIRE_USER_BYTES,
                "{users} users: {bytes} bytes"
            );
        }
        let config = AggregatorConfig::default();
        assert_eq!(
            config.max_stream_bytes(),
            2_000_000 * MAX_WIRE_USER_BYTES + STREAM_FRAMING_BYTES
        );
        assert_eq!(config.max_stream_messages(), 200_002);
        let small = AggregatorConfig {
            max_snapshot_users: 25,
            ingest_max_stream_messages: Some(7),
            ..AggregatorConfig::default()
        };
        assert_eq!(
            small.max_stream_bytes(),
            25 * MAX_WIRE_USER_BYTES + STREAM_FRAMING_BYTES
        );
        assert_eq!(small.max_stream_messages(), 7);
    }

    #[test]
    fn the_metrics_token_loads_from_the_file_and_never_prints() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("aggregator.toml");
        let secret = "metrics-secret-0123456789";
        std::fs::write(&path, format!("metrics_token = \"{secret}\"\n")).expect("write");
        let config = AggregatorConfig::load(Some(&path)).expect("loads");
        assert_eq!(
            config.metrics_token.as_ref().map(MetricsToken::expose),
            Some(secret)
        );
        let debug = format!("{config:?}");
        assert!(!debug.contains(secret) && debug.contains("***"), "{debug}");
        let serialized = serde_json::to_string(&config).expect("serialises");
        assert!(!serialized.contains(secret), "{serialized}");
    }

    #[test]
    // figment's test jail fixes the closure's error type.
    #[allow(clippy::result_large_err)]
    fn every_problem_is_reported_at_once() {
        let config = AggregatorConfig {
            stale_after_days: 0,
            page_cache_mib: 5000,
            ..AggregatorConfig::default()
        };
        let InvalidConfig(problems) = config.validate().expect_err("two problems");
        let keys: Vec<&str> = problems
            .iter()
            .map(|problem| problem.key.as_str())
            .collect();
        assert_eq!(keys, ["stale_after_days", "page_cache_mib"], "{problems:?}");

        // A value that cannot be read, an unknown key and a value out of range, from the file and elsewhere.
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "aggregator.toml",
                "stale_after_days = \"soon\"\nno_such_key = 1\nhttp_listen = \"127.0.0.1:0\"\n",
            )?;
            let figment = Figment::from(Serialized::defaults(AggregatorConfig::default()))
                .merge(Toml::file("aggregator.toml"))
                .merge(Serialized::default("control_poll_interval_ms", 10));
            let error = AggregatorConfig::from_figment(&figment).expect_err("three problems");
            let keys: Vec<&str> = error.0.iter().map(|problem| problem.key.as_str()).collect();
            for expected in [
                "stale_after_days",
                "no_such_key",
                "control_poll_interval_ms",
            ] {
                assert!(keys.contains(&expected), "{expected} missing: {error}");
            }
            assert_eq!(keys.len(), 3, "{error}");
            let text = error.to_string();
            assert!(
                text.contains("aggregator.toml"),
                "the origin is named: {text}"
            );
            assert!(
                text.contains("\n  - `no_such_key` is not a known setting"),
                "{text}"
            );
            Ok(())
        });
    }
}
