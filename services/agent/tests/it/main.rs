//! The agent's integration tests, in one test binary (one link of tonic, axum and reqwest instead of one per file).

mod common;

mod cli;
mod config;
mod export;
mod sidecar;
mod source;
mod upload_client;
