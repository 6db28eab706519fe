//! The aggregator's configuration: one typed struct, loaded from an optional TOML file and `LICENSE_SYNC_AGGREGATOR_*`
//! environment variables (the environment wins), validated before anything starts.

use std::net::SocketAddr;
use std::path::Path;

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
}

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
        }
    }
}

impl AggregatorConfig {
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
        let config: AggregatorConfig = figment
            // `LICENSE_SYNC_AGGREGATOR_CONFIG` names the file itself (the CLI's `--config`), not a setting.
            .merge(Env::prefixed("LICENSE_SYNC_AGGREGATOR_").ignore(&["config"]))
            .extract()
            .map_err(|err| anyhow::anyhow!("invalid configuration: {err}"))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let scheme_ok = ["sqlite:", "postgres:", "postgresql:"]
            .iter()
            .any(|scheme| self.database_url.starts_with(scheme));
        if !scheme_ok {
            anyhow::bail!(
                "database_url must start with `sqlite:` (e.g. `sqlite://license-sync.db`) or `postgres:` \
                 (e.g. `postgres://license_sync@db.example.com/license_sync`); got a URL with another scheme"
            );
        }
        if self.stale_after_days == 0 {
            anyhow::bail!("stale_after_days must be at least 1");
        }
        if self.max_message_bytes < 64 * 1024 {
            anyhow::bail!(
                "max_message_bytes must be at least 65536 so that one batch of users fits"
            );
        }
        if self.stream_idle_timeout_secs == 0 {
            anyhow::bail!("stream_idle_timeout_secs must be at least 1");
        }
        if self.max_snapshot_users == 0 {
            anyhow::bail!("max_snapshot_users must be at least 1");
        }
        if !(1..=300).contains(&self.agent_heartbeat_interval_secs) {
            anyhow::bail!(
                "agent_heartbeat_interval_secs must be between 1 and 300 (agents never wait longer than 300 s \
                 between heartbeats), got {}",
                self.agent_heartbeat_interval_secs
            );
        }
        if self.view_check_interval_ms > 60_000 {
            anyhow::bail!(
                "view_check_interval_ms must be at most 60000: readers would see other replicas' changes too late"
            );
        }
        if !(1..=1000).contains(&self.database_max_connections) {
            anyhow::bail!(
                "database_max_connections must be between 1 and 1000, got {}",
                self.database_max_connections
            );
        }
        if self.page_cache_mib > 4096 {
            anyhow::bail!(
                "page_cache_mib must be at most 4096 (it is per enterprise), got {}",
                self.page_cache_mib
            );
        }
        if self.api_token_cache_secs > 300 {
            anyhow::bail!("api_token_cache_secs must be at most 300");
        }
        if !(100..=60_000).contains(&self.control_poll_interval_ms) {
            anyhow::bail!(
                "control_poll_interval_ms must be between 100 and 60000, got {}",
                self.control_poll_interval_ms
            );
        }
        if let Some(url) = &self.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            anyhow::bail!("public_url must start with http:// or https://, got {url:?}");
        }
        Ok(())
    }
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
}
