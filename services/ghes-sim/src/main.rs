//! `ghes-sim`: runs the GHES simulator until SIGINT/SIGTERM.
//!
//! Prints exactly one JSON line `{"listening":"ADDR"}` on stdout once it accepts connections, so that scripts and
//! tests started with `--listen 127.0.0.1:0` can find the port. Logs go to stderr.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use license_sync_ghes_sim::{SimConfig, start};

#[derive(Debug, Parser)]
// No version flag: `--version` is the simulated GHES version.
#[command(
    name = "ghes-sim",
    disable_version_flag = true,
    about = "GitHub Enterprise Server simulator for license-sync tests and demos"
)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The all_users.csv served by the report endpoint (re-read at every 200 answer).
    #[arg(long)]
    csv: PathBuf,
    /// Site admin login accepted by basic auth.
    #[arg(long, default_value = "site-admin")]
    username: String,
    /// Site admin token accepted by basic auth and by `Authorization: token …` on the API.
    #[arg(long, env = "GHES_SIM_TOKEN", hide_env_values = true)]
    token: String,
    /// Number of 202 answers before the report is served (again after POST /_sim/invalidate).
    #[arg(long, default_value_t = 1)]
    pending_polls: u32,
    /// `installed_version` reported by GET /api/v3/meta.
    #[arg(long, default_value = "3.14.2")]
    version: String,
    /// Purchased seats of the license; omit for "unlimited".
    #[arg(long)]
    seats: Option<i64>,
    /// `seats_used` of the license; default counts the CSV's non-suspended rows.
    #[arg(long)]
    seats_used: Option<i64>,
    /// Answer 503 to the first N report requests.
    #[arg(long, default_value_t = 0)]
    fail_first: u32,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ghes-sim: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let config = SimConfig {
        csv_path: args.csv,
        username: args.username,
        token: args.token,
        pending_polls: args.pending_polls,
        version: args.version,
        license_seats: args.seats,
        license_seats_used: args.seats_used,
        fail_first: args.fail_first,
    };
    let handle = start(listener, config).await?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(
            stdout,
            "{}",
            serde_json::json!({ "listening": handle.addr().to_string() })
        )?;
        stdout.flush()?;
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    handle.shutdown().await
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn cli_definition_is_consistent() {
        super::Args::command().debug_assert();
    }
}
