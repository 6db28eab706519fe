//! The agent's integration tests, in one test binary (one link of tonic, axum and reqwest instead of one per file).

mod common;

mod cli;
mod client;
mod config;
mod export;
mod sidecar;
mod source;
