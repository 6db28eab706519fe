//! The end-to-end tests, one module per area, in one test binary: every test binary links the whole product's
//! dependencies (tonic, axum, sqlx, …), so one binary instead of seven keeps a clean CI build's link work to one.
//! nextest still runs each test in its own process; under `cargo test` they share this one, so no test may set
//! process-wide state (environment variables, the working directory): child processes get theirs explicitly.

mod console_browser;
mod encrypted_export;
mod gh_cli;
mod grpc_faults;
mod log_scan;
mod metrics;
mod python_grpc;
mod replicas;
mod report;
mod sidecar;
mod sync_path;
mod tls;
mod traces;
