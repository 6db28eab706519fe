//! The simulator's integration tests in one test binary (each binary links axum, reqwest and tokio again).

mod bin;
mod http;
