//! The aggregator's integration tests, in one test binary: a clean build links tonic, axum and sqlx into it once
//! instead of once per test file.

mod console;
mod control;
mod ingest;
mod servers;
mod store_faults;
mod store_suite;
mod tls;
mod tokens;
