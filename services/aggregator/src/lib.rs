//! The license-sync aggregator: stores GHES usage snapshots, merges accounts into people and serves
//! GitHub-compatible licensing endpoints. See ARCHITECTURE.md at the repository root.

pub mod admin;
pub mod app;
pub mod auth;
pub mod auth_limit;
pub mod body_pool;
pub mod config;
pub mod console;
pub mod control;
pub mod enrollment;
pub mod error;
pub mod ingest;
pub mod metrics;
pub mod people_search;
pub mod rest;
pub mod scrape;
pub mod server;
pub mod store;
pub mod time_format;
pub mod tls;
pub mod tokens;
pub mod usage_keys;
pub mod view;
