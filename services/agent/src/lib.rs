//! The license-sync agent: reads one GHES instance's users and sends full usage snapshots to the aggregator.
//!
//! The CLI's one-shot commands are thin wrappers over [`commands`]; the modules below are the building blocks that a
//! long-running mode and the end-to-end tests reuse:
//!
//! - [`config`]: the one typed configuration (TOML file + `LICENSE_SYNC_AGENT_*` environment) and its validation.
//! - [`source`]: reading `all_users.csv` from a file or from GHES (202 polling, retries, custom CA), plus the license.
//! - [`snapshot`]: turning what was read into a [`license_sync_core::snapshot::Snapshot`].
//! - [`client`]: streaming a snapshot to the aggregator over gRPC.
//! - [`export`]: writing the usage file for manual upload.
//! - [`error`]: the one error type, with its exit code, HTTP status and gRPC code.

pub mod client;
pub mod commands;
pub mod config;
pub mod error;
pub mod export;
pub mod snapshot;
pub mod source;

pub use config::AgentConfig;
pub use error::AgentError;
