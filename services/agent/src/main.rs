//! `license-sync-agent`: the long-running sidecar (`run`), its one-shot commands, and a CLI for its local API.
//!
//! Results go to stdout as one JSON line each, so that scripts can read them; logs and errors go to stderr. The
//! process exits with [`AgentError::exit_code`]. `run` prints one line when it listens
//! (`{"listening":"127.0.0.1:8091",…}`) and runs until SIGTERM or Ctrl-C.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use license_sync_agent::config::Secret;
use license_sync_agent::local_api_client::{LocalApiClient, owner_token};
use license_sync_agent::{AgentConfig, AgentError, commands, sidecar};
use reqwest::Method;
use serde::Serialize;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "license-sync-agent",
    version,
    about = "Reads a GHES instance's users and sends license usage snapshots to the license-sync aggregator"
)]
struct Cli {
    /// Log format on stderr. The level comes from RUST_LOG (default: info).
    #[arg(long, global = true, env = "LICENSE_SYNC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// Configuration file (TOML). LICENSE_SYNC_AGENT_* variables override it (nested keys with `__`).
    #[arg(long, env = "LICENSE_SYNC_AGENT_CONFIG")]
    config: PathBuf,
}

/// How the CLI reaches a running agent's local API.
#[derive(Debug, clap::Args)]
struct ApiArgs {
    /// Base URL of the running agent's local API (its `agent.listen`).
    #[arg(
        long,
        env = "LICENSE_SYNC_AGENT_API",
        default_value = "http://127.0.0.1:8091"
    )]
    api: String,
    /// File holding the owner token, for owner-only actions. Or LICENSE_SYNC_AGENT_OWNER_TOKEN.
    #[arg(long)]
    owner_token_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run as a long-running sidecar: local API, schedule, Sync now, durable delivery, control stream.
    Run(ConfigArg),
    /// Connect the agent to the aggregator: exchange an enrollment token for the instance credential.
    #[command(group(clap::ArgGroup::new("enrollment").required(true).args(["token", "token_file"])))]
    Enroll {
        #[command(flatten)]
        config: ConfigArg,
        /// The enrollment token (`lse_…`). Prefer --token-file or the variable: arguments show in `ps`.
        #[arg(
            long,
            env = "LICENSE_SYNC_AGENT_ENROLLMENT_TOKEN",
            hide_env_values = true
        )]
        token: Option<String>,
        /// File holding the enrollment token.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Ask the running agent for a sync now; prints the job id (joins the running job, if any).
    SyncNow(ApiArgs),
    /// Print the running agent's status.
    Status(ApiArgs),
    /// Enable license sync on the running agent (it must be connected).
    Enable(ApiArgs),
    /// Disable license sync on the running agent: nothing is sent any more.
    Disable(ApiArgs),
    /// Print the running agent's recent jobs, or one job.
    Jobs {
        #[command(flatten)]
        api: ApiArgs,
        /// A job id (from `sync-now`).
        #[arg(long)]
        id: Option<uuid::Uuid>,
    },
    /// Check the running agent's connection to the aggregator now.
    Connection(ApiArgs),
    /// Read the users, stream the snapshot to the aggregator and print its receipt.
    Sync(ConfigArg),
    /// Read the users and write the usage file for manual upload ("Add server usage").
    Export {
        #[command(flatten)]
        config: ConfigArg,
        /// Where to write the usage file (created with mode 0600). Encrypted (age) to the enterprise's key from
        /// `export.recipient` or enrollment; name it `….json.age`.
        #[arg(long)]
        output: PathBuf,
        /// Write the plain JSON instead, readable by anyone who gets the file (it holds every user's email).
        #[arg(long)]
        unencrypted: bool,
    },
    /// Read the users only and print what would be sent.
    Check(ConfigArg),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = cli.log_format;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("license-sync-agent: error: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    // The OTLP exporter's gRPC channel is created on the runtime.
    let mut telemetry = {
        let _runtime = runtime.enter();
        init_telemetry(log_format, cli.command.traced())
    };
    let code = match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            report(&error, log_format);
            ExitCode::from(error.exit_code())
        }
    };
    // A one-shot sync exits right after its receipt: its spans are exported now, from this thread, while the
    // runtime (still alive, its workers running) carries the export.
    telemetry.shutdown();
    code
}

impl Command {
    /// Commands that read a source or send a snapshot; the CLI of the local API has nothing worth tracing.
    fn traced(&self) -> bool {
        matches!(
            self,
            Command::Run(_) | Command::Sync(_) | Command::Export { .. } | Command::Check(_)
        )
    }
}

async fn run(command: Command) -> Result<(), AgentError> {
    match command {
        Command::Run(args) => {
            let config = AgentConfig::load(&args.config)?;
            let agent = sidecar::start(config).await?;
            let status = agent.sidecar().status();
            print_line(&json!({
                "listening": agent.local_addr().to_string(),
                "state_dir": status.state_dir,
                "license_sync_enabled": status.license_sync_enabled,
                "pending_deliveries": status.pending_deliveries,
            }))?;
            shutdown_signal().await;
            agent.shutdown().await;
            Ok(())
        }
        Command::Enroll {
            config,
            token,
            token_file,
        } => {
            let config = AgentConfig::load(&config.config)?;
            let token = match (token, token_file) {
                (Some(token), _) => Secret::new(token),
                (None, Some(path)) => Secret::new(
                    std::fs::read_to_string(&path)
                        .map_err(
                            |source| license_sync_agent::config::ConfigError::Unreadable {
                                what: "the enrollment token file",
                                key: "--token-file",
                                path: path.clone(),
                                source,
                            },
                        )?
                        .trim(),
                ),
                (None, None) => {
                    return Err(AgentError::Internal(
                        "clap guarantees --token or --token-file".into(),
                    ));
                }
            };
            print_line(&commands::enroll(&config, &token).await?)
        }
        Command::SyncNow(args) => {
            let api = local_api(&args)?;
            print_line(&api.owner(Method::POST, "api/v1/sync-now", None).await?)
        }
        Command::Status(args) => print_line(&local_api(&args)?.get("api/v1/status").await?),
        Command::Enable(args) => print_line(
            &local_api(&args)?
                .owner(
                    Method::PUT,
                    "api/v1/settings",
                    Some(json!({"license_sync_enabled": true})),
                )
                .await?,
        ),
        Command::Disable(args) => print_line(
            &local_api(&args)?
                .owner(
                    Method::PUT,
                    "api/v1/settings",
                    Some(json!({"license_sync_enabled": false})),
                )
                .await?,
        ),
        Command::Jobs { api, id } => {
            let path = match id {
                Some(id) => format!("api/v1/jobs/{id}"),
                None => "api/v1/jobs".to_owned(),
            };
            print_line(&local_api(&api)?.get(&path).await?)
        }
        Command::Connection(args) => print_line(&local_api(&args)?.get("api/v1/connection").await?),
        Command::Sync(args) => {
            let config = AgentConfig::load(&args.config)?;
            print_line(&commands::sync(&config).await?)
        }
        Command::Export {
            config,
            output,
            unencrypted,
        } => {
            let config = AgentConfig::load(&config.config)?;
            print_line(&commands::export(&config, &output, unencrypted).await?)
        }
        Command::Check(args) => {
            let config = AgentConfig::load(&args.config)?;
            print_line(&commands::check(&config).await?)
        }
    }
}

fn local_api(args: &ApiArgs) -> Result<LocalApiClient, AgentError> {
    LocalApiClient::new(&args.api, owner_token(args.owner_token_file.as_deref())?)
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the agent");
                interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    interrupt.await;
}

fn print_line(value: &impl Serialize) -> Result<(), AgentError> {
    let line = serde_json::to_string(value)
        .map_err(|error| AgentError::Internal(format!("cannot encode the result: {error}")))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .map_err(|source| AgentError::Output {
            path: PathBuf::from("<stdout>"),
            source,
        })
}

/// The error and its causes on stderr: one line each in text mode, one JSON event (with the chain joined) in JSON
/// mode, so that a log collector never sees a line that is not JSON.
fn report(error: &AgentError, format: LogFormat) {
    match format {
        LogFormat::Json => tracing::error!(
            kind = error.kind(),
            exit_code = error.exit_code(),
            error = %license_sync_agent::error::error_chain(error),
            "command failed"
        ),
        LogFormat::Text => {
            let mut text = format!("license-sync-agent: error: {error}");
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                text.push_str(&format!("\n  caused by: {cause}"));
                source = cause.source();
            }
            eprintln!("{text}");
        }
    }
}

/// Logs on stderr and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, trace spans over OTLP.
fn init_telemetry(format: LogFormat, traces: bool) -> license_sync_tracing::Telemetry {
    license_sync_tracing::init(&license_sync_tracing::Options {
        service_name: "license-sync-agent",
        service_version: env!("CARGO_PKG_VERSION"),
        format: match format {
            LogFormat::Text => license_sync_tracing::LogFormat::Text,
            LogFormat::Json => license_sync_tracing::LogFormat::Json,
        },
        flatten_json: true,
        // Colours only on a terminal: a sidecar's stderr usually goes to a log collector.
        ansi: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        traces,
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
