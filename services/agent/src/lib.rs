//! The license-sync agent: reads one GHES instance's users and sends full usage snapshots to the aggregator.
//!
//! The CLI's one-shot commands are thin wrappers over [`commands`]; the modules below are the building blocks that a
//! long-running mode and the end-to-end tests reuse:
//!
//! - [`config`]: the one typed configuration (TOML file + `LICENSE_SYNC_AGENT_*` environment) and its validation.
//! - [`source`]: reading `all_users.csv` from a file or from GHES (202 polling, retries, custom CA), plus the license.
//! - [`snapshot`]: turning what was read into a [`license_sync_core::snapshot::Snapshot`].
//! - [`upload_client`]: streaming a snapshot to the aggregator over gRPC (and the gRPC channel, credential header
//!   and status mapping that the enrollment client and the control stream share).
//! - [`export`]: writing the usage file for manual upload.
//! - [`fsutil`]: the one atomic, durable file writer (temporary file, fsync, rename, directory fsync).
//! - [`error`]: the one error type and its one table (kind, exit code, HTTP status, gRPC code, retryable).
//!
//! The long-running sidecar (`run`) adds:
//!
//! - [`enrollment_client`]: enrollment, the connection check, and which instance credential is used.
//! - [`state`]: the state directory (credential, settings, pending and failed snapshots) and its fsync policy.
//! - [`schedule`]: the schedule's time arithmetic (anchor, interval, jitter) behind a [`schedule::Clock`]; the task
//!   that runs it is `sidecar::schedule_runner`.
//! - [`retry`]: the one exponential backoff (full jitter for retries, ±20% for the GHES report polling).
//! - [`sidecar`]: the running agent: jobs, scheduler, delivery loop, control stream and the local HTTP API.
//! - [`local_api_client`]: the CLI's client of that local API (served by `sidecar::local_api_server`).
//! - [`metrics`]: the Prometheus metrics the local API serves at `/metrics`.

pub mod commands;
pub mod config;
pub mod enrollment_client;
pub mod error;
pub mod export;
/// Shared with the aggregator's `report` command: it lives in `license-sync-serve`.
pub use license_sync_serve::fsutil;
pub mod local_api_client;
pub mod metrics;
pub mod retry;
pub mod schedule;
pub mod sidecar;
pub mod snapshot;
pub mod source;
pub mod state;
pub mod trigger;
pub mod upload_client;

pub use config::AgentConfig;
pub use error::AgentError;
