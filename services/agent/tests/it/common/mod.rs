//! Helpers shared by the agent's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use license_sync_agent::config::{
    AgentConfig, AggregatorConfig, FileSourceConfig, GhesSourceConfig, InstanceConfig, Secret,
    SidecarConfig, SourceConfig,
};
use license_sync_ghes_sim::{SimConfig, SimHandle};
use reqwest::Url;
use uuid::Uuid;

pub const SERVER_ID: Uuid = Uuid::from_u128(0x6f1c8a38_5b2e_4a4f_9d44_8d4a4f1b6c01);
pub const TOKEN: &str = "ghes-sim-token";
/// The owner token of the sidecars the tests run.
pub const OWNER: &str = "owner-token-0123456789abcdef";

/// The fixture report: 5 data rows, one of which (line 5, id `abc`) is skipped.
pub fn fixture_csv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/all_users.csv")
}

pub async fn start_sim(configure: impl FnOnce(&mut SimConfig)) -> SimHandle {
    let mut config = SimConfig::new(fixture_csv());
    config.token = TOKEN.to_owned();
    configure(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the simulator");
    license_sync_ghes_sim::start(listener, config)
        .await
        .expect("start the simulator")
}

pub fn instance() -> InstanceConfig {
    InstanceConfig {
        server_id: SERVER_ID,
        hostname: "ghes-1.example.com".to_owned(),
        ghes_version: None,
    }
}

/// A GHES source for `sim` with fast polling, so that tests take milliseconds.
pub fn ghes_source(sim: &SimHandle) -> GhesSourceConfig {
    GhesSourceConfig {
        url: Url::parse(&sim.base_url()).expect("url"),
        username: "site-admin".to_owned(),
        token: Some(Secret::new(TOKEN)),
        token_file: None,
        ca_cert: None,
        request_timeout: Duration::from_secs(5),
        report_deadline: Duration::from_secs(10),
        poll_initial: Duration::from_millis(10),
        poll_max: Duration::from_millis(40),
        max_attempts: 5,
        read_license: true,
    }
}

pub fn ghes_config(source: GhesSourceConfig) -> AgentConfig {
    AgentConfig {
        instance: instance(),
        source: SourceConfig::Ghes(source),
        aggregator: None,
        agent: None,
        export: None,
    }
}

pub fn file_config(path: PathBuf) -> AgentConfig {
    AgentConfig {
        instance: instance(),
        source: SourceConfig::File(FileSourceConfig { path }),
        aggregator: None,
        agent: None,
        export: None,
    }
}

pub fn aggregator_config(endpoint: &str, batch_size: usize) -> AggregatorConfig {
    AggregatorConfig {
        endpoint: Url::parse(endpoint).expect("url"),
        credential: Some(Secret::new("lsi_test_credential")),
        credential_file: None,
        ca_cert: None,
        client_cert: None,
        client_key: None,
        batch_size,
        timeout: Duration::from_secs(10),
    }
}

/// An `[agent]` section for tests: fast retries, no jitter, the local API on a free port.
pub fn sidecar_config(state_dir: &std::path::Path) -> SidecarConfig {
    SidecarConfig {
        state_dir: state_dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("address"),
        owner_token: Some(Secret::new(OWNER)),
        owner_token_file: None,
        sync_interval: Duration::from_secs(3600),
        sync_jitter: Duration::ZERO,
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        shutdown_grace: Duration::from_secs(1),
        api_max_connections: 64,
        api_idle_timeout: Duration::from_secs(60),
        api_header_read_timeout: Duration::from_secs(10),
    }
}
