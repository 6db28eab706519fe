//! The domain of license-sync, free of I/O so that every rule can be unit-tested on its own.
//!
//! - [`accounts`]: an instance's accounts in the compact form the merged view keeps in memory.
//! - [`cloud`]: the cloud members in the compact form the merged view keeps in memory, and their match index.
//! - [`members`]: validation of an import of cloud members.
//! - [`model`]: server users, instance identity, cloud members.
//! - [`email`]: the email normalisation every match uses.
//! - [`all_users_csv`]: tolerant reader of GHES's `all_users.csv` site-admin report.
//! - [`snapshot`]: a full snapshot of one instance, its digest, validation and the usage-file format.
//! - [`encrypted_usage_file`]: the usage file encrypted with age to an enterprise's public key.
//! - [`merge`]: the unique-user engine that turns accounts into people (SPEC §3–4).
//! - [`incremental`]: the same merge kept up to date one instance snapshot at a time.

pub mod accounts;
pub mod all_users_csv;
pub mod cloud;
pub mod email;
pub mod encrypted_usage_file;
pub mod incremental;
pub mod members;
pub mod merge;
pub mod model;
pub mod snapshot;
