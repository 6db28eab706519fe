//! The agent's configuration: one TOML file merged with `LICENSE_SYNC_AGENT_*` environment variables.
//!
//! ```toml
//! [instance]
//! server_id = "6f1c…"                 # the GHES server id (UUID)
//! hostname = "ghes-1.example.com"
//! ghes_version = "3.14.2"             # optional; read from GET /api/v3/meta for a GHES source
//!
//! [source]
//! kind = "file"                       # or "ghes"
//! path = "ghes-1.all_users.csv"
//!
//! [aggregator]                        # needed by `sync`, `enroll` and `run`
//! endpoint = "https://aggregator.example.com:50051"
//! # credential_file = "…"             # optional when the agent is enrolled (see below)
//!
//! [agent]                             # the long-running sidecar (`run`) and its local API
//! state_dir = "/var/lib/license-sync-agent"
//! owner_token_file = "/run/secrets/license-sync-owner-token"
//!
//! [export]                            # optional: the key `export` encrypts to (else the one from enrollment)
//! recipient = "age1…"
//! ```
//!
//! **Which instance credential is used.** When `[agent]` is configured and its state directory holds an enrolled
//! credential (written by `license-sync-agent enroll` or `POST /api/v1/connection`), that credential is used and
//! `aggregator.credential`/`credential_file` are ignored: enrolling again rotates the credential (the old one stops
//! working), so the state directory always holds the newest one, while a configured secret would go stale. The
//! configured credential is the fallback for agents that are not enrolled (credentials issued with
//! `license-sync-aggregator instance add`).
//!
//! Environment variables override the file, nested with `__`: `LICENSE_SYNC_AGENT_AGGREGATOR__ENDPOINT`. Secrets are
//! best given as files (`token_file`, `credential_file`); the inline forms exist for environments that inject
//! secrets as variables (`LICENSE_SYNC_AGENT_SOURCE__TOKEN`). Relative paths in the file are resolved against the
//! file's directory, so a config and its data can move together; relative paths from the environment are resolved
//! against the working directory.
//!
//! The modules: `types` (the typed sections), `load` (file + environment, the variable names), `validate` (every
//! problem at once) and `secrets` (the redacting wrapper and reading secret files).

mod load;
mod secrets;
mod types;
mod validate;

pub use load::{ENV_PREFIX, env_var_for};
pub use secrets::Secret;
pub use types::{
    AgentConfig, AggregatorConfig, ExportConfig, FileSourceConfig, GhesSourceConfig,
    InstanceConfig, SidecarConfig, SourceConfig,
};
pub use validate::{ConfigError, ConfigProblem, MAX_BATCH_SIZE, MIN_OWNER_TOKEN_CHARS};
