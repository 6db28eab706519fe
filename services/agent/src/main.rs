//! `license-sync-agent`: one-shot commands of the agent.
//!
//! Results go to stdout as one JSON line each, so that scripts can read them; logs and errors go to stderr. The
//! process exits with [`AgentError::exit_code`].

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use license_sync_agent::{AgentConfig, AgentError, commands};
use serde::Serialize;

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

#[derive(Debug, Subcommand)]
enum Command {
    /// Read the users, stream the snapshot to the aggregator and print its receipt.
    Sync(ConfigArg),
    /// Read the users and write the usage file for manual upload ("Add server usage").
    Export {
        #[command(flatten)]
        config: ConfigArg,
        /// Where to write the usage file (JSON, created with mode 0600: it holds emails).
        #[arg(long)]
        output: PathBuf,
    },
    /// Read the users only and print what would be sent.
    Check(ConfigArg),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = cli.log_format;
    init_logging(log_format);
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
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            report(&error, log_format);
            ExitCode::from(error.exit_code())
        }
    }
}

async fn run(command: Command) -> Result<(), AgentError> {
    match command {
        Command::Sync(args) => {
            let config = AgentConfig::load(&args.config)?;
            print_line(&commands::sync(&config).await?)
        }
        Command::Export { config, output } => {
            let config = AgentConfig::load(&config.config)?;
            print_line(&commands::export(&config, &output).await?)
        }
        Command::Check(args) => {
            let config = AgentConfig::load(&args.config)?;
            print_line(&commands::check(&config).await?)
        }
    }
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
