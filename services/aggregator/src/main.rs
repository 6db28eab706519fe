//! `license-sync-aggregator`: the server (`serve`) and owner administration commands.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use license_sync_aggregator::config::{AggregatorConfig, LogFormat};
use license_sync_aggregator::error::ServiceError;
use license_sync_aggregator::store::{NewApiToken, TokenScope, TokenSelector};
use license_sync_aggregator::{admin, console, enrollment, server, store, usage_keys};
use time::OffsetDateTime;
use uuid::Uuid;

/// mimalloc instead of glibc's malloc: the merged view is millions of small allocations that live long and change
/// a few at a time, where glibc's per-thread arenas fragment and hold on to freed memory. Tuned at the start of
/// `main` to give freed memory back at once (see `license_sync_alloc`).
#[global_allocator]
static ALLOCATOR: license_sync_alloc::MiMalloc = license_sync_alloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "license-sync-aggregator",
    version,
    about = "Stores GHES usage snapshots, merges accounts into people, serves GitHub-compatible licensing endpoints"
)]
struct Cli {
    /// TOML configuration file; `LICENSE_SYNC_AGGREGATOR_*` variables override it.
    #[arg(long, global = true, env = "LICENSE_SYNC_AGGREGATOR_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC ingest and the REST API until SIGTERM or Ctrl-C.
    Serve,
    /// Manage enterprises.
    #[command(subcommand)]
    Enterprise(EnterpriseCommand),
    /// Manage owners' REST tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Manage GHES instances and their credentials.
    #[command(subcommand)]
    Instance(InstanceCommand),
    /// Manage the enterprise's cloud members.
    #[command(subcommand)]
    Members(MembersCommand),
    /// Manage one-time enrollment tokens, which agents exchange for their instance credential.
    #[command(subcommand)]
    EnrollmentToken(EnrollmentTokenCommand),
    /// Print a one-time sign-in link to the web console (`/console/`) of an enterprise: it opens an `admin`
    /// session once, within its lifetime. Uses `public_url` when set, else the HTTP listen address.
    ConsoleLink {
        /// The enterprise's slug.
        #[arg(long)]
        enterprise: String,
        /// How long the link stays usable: 1 to 60 minutes.
        #[arg(long, default_value_t = license_sync_aggregator::console::DEFAULT_LINK_MINUTES)]
        expires_in_minutes: i64,
    },
}

#[derive(Subcommand)]
enum EnrollmentTokenCommand {
    /// Create a one-time enrollment token; prints it once on stdout. The agent runs
    /// `license-sync-agent enroll --token-file FILE` with it.
    Create {
        /// The enterprise's slug.
        #[arg(long)]
        enterprise: String,
        /// How long the token stays usable: 1 to 720 hours.
        #[arg(long, default_value_t = license_sync_aggregator::enrollment::DEFAULT_ENROLLMENT_TOKEN_HOURS)]
        expires_in_hours: i64,
    },
}

#[derive(Subcommand)]
enum EnterpriseCommand {
    /// Create an enterprise with its purchased seats.
    Create {
        #[arg(long)]
        slug: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        seats: i64,
    },
    /// Change the number of purchased seats.
    SetSeats {
        #[arg(long)]
        slug: String,
        #[arg(long)]
        seats: i64,
    },
    /// Make a new usage-file key pair (age X25519) for the enterprise and print its public key (`age1…`), which
    /// agents encrypt exported usage files to. Earlier keys are kept: files encrypted to them still upload.
    Keygen {
        /// The enterprise's slug.
        #[arg(long)]
        enterprise: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a REST token for an enterprise's owner; prints the token once (only its hash is stored).
    Create {
        #[arg(long)]
        enterprise: String,
        /// What the token is for, unique among the enterprise's live tokens (e.g. "grafana", "ci reports").
        #[arg(long)]
        name: String,
        /// `read`: every GET (reports, dashboards); `admin`: also every change (PUT, POST, DELETE).
        #[arg(long, value_parser = parse_scope, default_value = "admin")]
        scope: TokenScope,
        /// The token stops working this many days from now.
        #[arg(long, conflicts_with = "expires_at", value_parser = clap::value_parser!(u32).range(1..=3650))]
        expires_in_days: Option<u32>,
        /// The token stops working at this time: `YYYY-MM-DD` (the start of that day, UTC) or RFC 3339.
        #[arg(long, value_parser = parse_expiry)]
        expires_at: Option<OffsetDateTime>,
    },
    /// List an enterprise's REST tokens as JSON lines: id, name, scope, created, expires, last used, revoked.
    /// Never the token or its hash.
    List {
        #[arg(long)]
        enterprise: String,
    },
    /// Revoke a REST token: every replica refuses it within `api_token_cache_secs`.
    #[command(group(clap::ArgGroup::new("token").required(true).args(["id", "name"])))]
    Revoke {
        #[arg(long)]
        enterprise: String,
        /// The token's id (`token list`).
        #[arg(long)]
        id: Option<i64>,
        /// The live token's name.
        #[arg(long)]
        name: Option<String>,
    },
}

fn parse_scope(value: &str) -> Result<TokenScope, String> {
    TokenScope::parse(value)
        .ok_or_else(|| format!("{value:?} is not a scope: use `read` or `admin`"))
}

fn parse_expiry(value: &str) -> Result<OffsetDateTime, String> {
    let date_format = time::macros::format_description!("[year]-[month]-[day]");
    if let Ok(date) = time::Date::parse(value, &date_format) {
        return Ok(date.midnight().assume_utc());
    }
    OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339).map_err(|_| {
        format!(
            "{value:?} is not a date: use YYYY-MM-DD or an RFC 3339 time (2027-01-31T12:00:00Z)"
        )
    })
}

#[derive(Subcommand)]
enum InstanceCommand {
    /// Enroll a GHES instance (or rotate its credential); prints the instance credential once.
    Add {
        #[arg(long)]
        enterprise: String,
        #[arg(long)]
        server_id: Uuid,
        #[arg(long)]
        hostname: String,
    },
    /// Retire an instance: its users stop counting and its credential stops working.
    Retire {
        #[arg(long)]
        enterprise: String,
        #[arg(long)]
        server_id: Uuid,
    },
    /// List an enterprise's instances as JSON lines.
    List {
        #[arg(long)]
        enterprise: String,
    },
}

#[derive(Subcommand)]
enum MembersCommand {
    /// Replace the cloud members with those of a JSON file.
    Import {
        #[arg(long)]
        enterprise: String,
        #[arg(long)]
        file: PathBuf,
    },
}

/// Logs on stderr and, for `serve` when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, trace spans over OTLP.
fn init_telemetry(format: LogFormat, serve: bool) -> license_sync_tracing::Telemetry {
    license_sync_tracing::init(&license_sync_tracing::Options {
        service_name: "license-sync-aggregator",
        service_version: env!("CARGO_PKG_VERSION"),
        format: match format {
            LogFormat::Text => license_sync_tracing::LogFormat::Text,
            LogFormat::Json => license_sync_tracing::LogFormat::Json,
        },
        flatten_json: false,
        // Colours only on a terminal: a server's stderr usually goes to a log collector.
        ansi: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        // Administration commands act on the database directly; only the server has requests worth tracing.
        traces: serve,
    })
}

/// Prints one line on stdout and flushes, so that scripts and tests reading it see it at once.
fn print_line(line: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = AggregatorConfig::load(cli.config.as_deref())?;
    let serving = matches!(cli.command, Command::Serve);
    let mut telemetry = init_telemetry(config.log_format, serving);
    if serving {
        let served = serve(config).await;
        // The spans of the last requests (and of the merges they started) are exported before the exit. The flush
        // blocks, and needs the runtime's other workers for the export: off the async threads.
        if let Err(error) = tokio::task::spawn_blocking(move || telemetry.shutdown()).await {
            tracing::warn!(%error, "the trace exporter's shutdown failed");
        }
        return served;
    }

    let store =
        store::open_with_max_connections(&config.database_url, config.database_max_connections)
            .await
            .map_err(|err| anyhow::anyhow!("{err}"))?;
    match cli.command {
        Command::Serve => unreachable!("handled above"),
        Command::Enterprise(EnterpriseCommand::Create { slug, name, seats }) => {
            let name = name.unwrap_or_else(|| slug.clone());
            let enterprise = admin::create_enterprise(&store, &slug, &name, seats).await?;
            print_line(&serde_json::to_string(&enterprise)?)?;
        }
        Command::Enterprise(EnterpriseCommand::SetSeats { slug, seats }) => {
            if seats < 0 {
                anyhow::bail!("--seats must be zero or more");
            }
            let enterprise = admin::enterprise(&store, &slug).await?;
            store
                .set_seats_purchased(enterprise.id, seats)
                .await
                .map_err(ServiceError::from)?;
        }
        Command::Enterprise(EnterpriseCommand::Keygen { enterprise }) => {
            let enterprise = admin::enterprise(&store, &enterprise).await?;
            let key = usage_keys::generate(&store, &enterprise).await?;
            eprintln!(
                "usage-file public key of {} (agents get it at enrollment, or set it as `export.recipient`; earlier \
                 keys still decrypt the files made with them):",
                enterprise.slug
            );
            print_line(&key.public_key)?;
        }
        Command::Token(TokenCommand::Create {
            enterprise,
            name,
            scope,
            expires_in_days,
            expires_at,
        }) => {
            let now = OffsetDateTime::now_utc();
            let expires_at = expires_at.or_else(|| {
                expires_in_days.map(|days| now + time::Duration::days(i64::from(days)))
            });
            let new = NewApiToken {
                name: &name,
                scope,
                expires_at,
            };
            let (record, token) = admin::issue_api_token(&store, &enterprise, &new, now).await?;
            let until = record
                .expires_at
                .map(|at| {
                    format!(
                        "until {}",
                        license_sync_aggregator::time_format::rfc3339(at)
                    )
                })
                .unwrap_or_else(|| "without expiry".to_owned());
            eprintln!(
                "REST token {:?} (id {}, scope {}, {until}) for {enterprise}, shown once; only its hash is stored:",
                record.name,
                record.id,
                record.scope.as_str()
            );
            print_line(&token)?;
        }
        Command::Token(TokenCommand::List { enterprise }) => {
            let enterprise = admin::enterprise(&store, &enterprise).await?;
            for token in store
                .list_api_tokens(enterprise.id)
                .await
                .map_err(ServiceError::from)?
            {
                print_line(&admin::api_token_json(&token).to_string())?;
            }
        }
        Command::Token(TokenCommand::Revoke {
            enterprise,
            id,
            name,
        }) => {
            let enterprise = admin::enterprise(&store, &enterprise).await?;
            let selector = match (&id, &name) {
                (Some(id), _) => TokenSelector::Id(*id),
                (None, Some(name)) => TokenSelector::Name(name),
                // clap's group requires one of the two.
                (None, None) => anyhow::bail!("pass --id or --name"),
            };
            let revoked = store
                .revoke_api_token(enterprise.id, selector, OffsetDateTime::now_utc())
                .await
                .map_err(ServiceError::from)?;
            eprintln!(
                "revoked REST token {:?} (id {}); every aggregator refuses it within api_token_cache_secs ({} s)",
                revoked.name, revoked.id, config.api_token_cache_secs
            );
        }
        Command::Instance(InstanceCommand::Add {
            enterprise,
            server_id,
            hostname,
        }) => {
            let (_, credential) =
                admin::add_instance(&store, &enterprise, server_id, &hostname).await?;
            eprintln!(
                "instance credential for {hostname} ({server_id}), shown once; any earlier credential no longer works:"
            );
            print_line(&credential)?;
        }
        Command::Instance(InstanceCommand::Retire {
            enterprise,
            server_id,
        }) => {
            let enterprise = admin::enterprise(&store, &enterprise).await?;
            store
                .retire_instance(enterprise.id, server_id, OffsetDateTime::now_utc())
                .await
                .map_err(ServiceError::from)?;
        }
        Command::Instance(InstanceCommand::List { enterprise }) => {
            let enterprise = admin::enterprise(&store, &enterprise).await?;
            for instance in store
                .list_instances(enterprise.id)
                .await
                .map_err(ServiceError::from)?
            {
                print_line(
                    &serde_json::json!({
                        "server_id": instance.server_id,
                        "hostname": instance.hostname,
                        "user_count": instance.user_count,
                        "retired": instance.retired_at.is_some(),
                        "enrolled": instance.has_credential,
                    })
                    .to_string(),
                )?;
            }
        }
        Command::EnrollmentToken(EnrollmentTokenCommand::Create {
            enterprise,
            expires_in_hours,
        }) => {
            let enterprise = admin::enterprise(&store, &enterprise).await?;
            let issued =
                enrollment::issue_enrollment_token(&store, &enterprise, Some(expires_in_hours))
                    .await?;
            eprintln!(
                "enrollment token for {} (shown once; only its hash is stored), single use, valid until {}; \
                 the agent exchanges it with `license-sync-agent enroll`:",
                enterprise.slug,
                license_sync_aggregator::time_format::rfc3339(issued.expires_at)
            );
            print_line(&issued.token)?;
        }
        Command::ConsoleLink {
            enterprise,
            expires_in_minutes,
        } => {
            let enterprise = admin::enterprise(&store, &enterprise).await?;
            let issued =
                console::issue_console_link(&store, &enterprise, Some(expires_in_minutes)).await?;
            let base_url = config.public_url.clone().unwrap_or_else(|| {
                let scheme = if config.tls_cert_path.is_some() {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{}", config.http_listen)
            });
            eprintln!(
                "console sign-in link for {} (shown once; only its hash is stored), single use, valid until {}:",
                enterprise.slug,
                license_sync_aggregator::time_format::rfc3339(issued.expires_at)
            );
            print_line(&issued.url(&base_url))?;
        }
        Command::Members(MembersCommand::Import { enterprise, file }) => {
            let count = admin::import_members(&store, &enterprise, &file)
                .await
                .context("importing cloud members")?;
            eprintln!("imported {count} cloud members into {enterprise}");
        }
    }
    Ok(())
}

/// Runs the server until SIGTERM or Ctrl-C, then shuts it down gracefully.
async fn serve(config: AggregatorConfig) -> anyhow::Result<()> {
    let running = server::start(config).await?;
    tracing::info!(grpc = %running.grpc_addr, http = %running.http_addr, "aggregator listening");
    print_line(
        &serde_json::json!({
            "grpc": running.grpc_addr.to_string(),
            "http": running.http_addr.to_string(),
        })
        .to_string(),
    )?;
    let stop = running.stop_handle();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop.send(true);
    });
    running.wait().await
}

#[tokio::main]
async fn main() -> ExitCode {
    license_sync_alloc::purge_freed_memory_at_once();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
