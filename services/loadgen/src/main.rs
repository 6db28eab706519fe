//! `license-sync-loadgen`: syncs a deterministic synthetic enterprise into real aggregator processes and prints what
//! it measured, next to a floor measured in the same run (the same CSV decoded and bulk-inserted into the same kind of
//! store, with no protocol in between), so figures read as ratios on a noisy machine.
//!
//! Stores: by default a temporary SQLite file per store. With `--database-url postgres://…` every store (the floor's,
//! and the aggregators' for each configuration) is a fresh PostgreSQL database `loadgen_<label>_<uuid>` created
//! through that URL and dropped with `WITH (FORCE)` at the end, also when the run fails or is interrupted with Ctrl-C.
//! The URL's own database is only used to create and drop them, so runs never collide or leave state behind.
//!
//! Phases of the default run:
//! 1. floor: parse one instance's CSV and commit it straight into a fresh store of the same backend, in process;
//! 2. one instance through the real path: CSV parse → gRPC stream → validation → commit, then the first
//!    `consumed-licenses` answer (the merge);
//! 3. every instance, `--sync-concurrency` at a time in total (users/s, per-sync p50/p99), then the merge;
//! 4. one instance changes and re-syncs: time until the REST answer reflects it (re-merge);
//! 5. REST: `--rest-connections` clients read random `consumed-licenses` pages for `--rest-seconds`;
//! 6. the aggregator's peak RSS;
//! 7. with `--console-pages`: the web console's pages timed over HTTP, next to the REST page 1 (`console_pages`),
//!    and the peak RSS after them.
//!
//! `--replicas N` (PostgreSQL only) starts N aggregator processes on the one database: the syncs of phase 3 go to
//! their gRPC addresses round-robin (instance i to replica i mod N), the REST clients of phase 5 likewise to their
//! HTTP addresses; phases 2 and 4 sync through the first replica and wait for every replica to show the result. The
//! run also checks that the replicas agree (same total, same first page) and prints each one's peak RSS.
//!
//! `--compare-replicas N` (PostgreSQL only) answers "is N replicas' sync throughput at least one replica's, and
//! correct?" in one run: after the floor, it runs the sync phase alone (phase 3) with 1 replica and then, on a fresh
//! database, with N replicas, `--compare-rounds` times (default 3). Its defaults keep 100 syncs in flight: 500
//! instances × 1000 users with `--sync-concurrency 100` (in total, spread over the replicas), so five waves of small
//! snapshots: the figure is about sustained concurrent commits rather than one large instance or the ramp-up of a
//! single burst, and the printed mean in flight (Little's law) shows the concurrency reached. Each configuration
//! must answer the in-process merge's consumed count on every replica, with identical first pages; it prints users/s
//! and syncs/s of both and the ratio N-replica / 1-replica per round, and their median.

mod console_pages;
mod database;
mod dataset;
mod memory;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use database::{Backend, FreshDatabase};
use hdrhistogram::Histogram;
use license_sync_aggregator::admin;
use license_sync_aggregator::store::{self, Arrival, DynStore, SnapshotCommit};
use license_sync_core::accounts::Accounts;
use license_sync_core::all_users_csv::read_all_users_csv;
use license_sync_core::merge::{InstanceUsers, merge};
use license_sync_core::model::InstanceIdentity;
use license_sync_core::snapshot::{Snapshot, SnapshotMeta};
use license_sync_proto::convert::{server_user, snapshot_header};
use license_sync_proto::v1::snapshot_chunk::Chunk;
use license_sync_proto::v1::snapshot_ingest_client::SnapshotIngestClient;
use license_sync_proto::v1::{SnapshotChunk, SnapshotTrailer, UserBatch};
use rand::{Rng, SeedableRng};
use time::OffsetDateTime;
use tokio::io::AsyncBufReadExt;
use tokio::sync::Semaphore;
use uuid::Uuid;

/// The system allocator, counting live bytes for `--memory-breakdown` (an atomic add per allocation; what the load
/// generator times happens in the aggregator processes).
#[global_allocator]
static ALLOCATOR: cap::Cap<std::alloc::System> = cap::Cap::new(std::alloc::System, usize::MAX);

#[derive(Parser, Debug)]
#[command(name = "license-sync-loadgen", version, about)]
struct Args {
    /// GHES instances in the synthetic enterprise [default: 4; 500 with --compare-replicas].
    #[arg(long)]
    instances: Option<usize>,
    /// Accounts per instance [default: 25000; 1000 with --compare-replicas].
    #[arg(long)]
    users_per_instance: Option<usize>,
    /// Share of each instance's accounts whose person is on every instance.
    #[arg(long, default_value_t = 0.3)]
    overlap: f64,
    #[arg(long, default_value_t = 10_000)]
    cloud_members: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Instance syncs in flight at once, in total over all replicas [default: 4; 100 with --compare-replicas].
    #[arg(long)]
    sync_concurrency: Option<usize>,
    /// Users per gRPC message.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// REST clients reading `consumed-licenses` pages (spread over the replicas); not used by --compare-replicas.
    #[arg(long, default_value_t = 64)]
    rest_connections: usize,
    /// How long the REST clients read.
    #[arg(long, default_value_t = 5)]
    rest_seconds: u64,
    /// The aggregator binary; defaults to the one next to this binary.
    #[arg(long)]
    aggregator_bin: Option<PathBuf>,
    /// Run against PostgreSQL instead of temporary SQLite files. The URL's user must be allowed to create
    /// databases: every store of the run (the floor's included) is a fresh database created next to the one named
    /// here and dropped at the end, also on error or Ctrl-C.
    #[arg(long, value_name = "postgres://USER@HOST:PORT/DATABASE")]
    database_url: Option<String>,
    /// Aggregator processes sharing the one database (more than 1 needs --database-url). Syncs and REST clients are
    /// spread over them round-robin; each replica's peak RSS is printed.
    #[arg(long, value_name = "N", default_value_t = 1)]
    replicas: usize,
    /// Instead of the default phases: the sync phase with 1 replica, then on a fresh database with N replicas
    /// (needs --database-url), checked for correctness (consumed count equals the in-process merge on every
    /// replica, identical first pages); prints both throughputs and their ratio.
    #[arg(long, value_name = "N", conflicts_with = "replicas")]
    compare_replicas: Option<usize>,
    /// How many times --compare-replicas runs the pair (1 replica, then N), each on fresh databases; the median
    /// ratio is printed too.
    #[arg(
        long,
        value_name = "R",
        default_value_t = 3,
        requires = "compare_replicas"
    )]
    compare_rounds: usize,
    /// Instead of the phases: build the merged view of the data in this process and print the heap bytes of its
    /// parts (accounts, cloud members and their index, people), measured by a counting allocator.
    #[arg(long, conflicts_with_all = ["replicas", "compare_replicas"])]
    memory_breakdown: bool,
    /// After the REST phase: sign in to the (first) aggregator's web console and time each page over HTTP, next to
    /// the REST `consumed-licenses` page 1 as a baseline (`console_pages`).
    #[arg(long, conflicts_with_all = ["compare_replicas", "memory_breakdown"])]
    console_pages: bool,
    /// Requests per page of --console-pages; the first is reported apart as cold.
    #[arg(long, value_name = "N", default_value_t = 20, requires = "console_pages", value_parser = clap::value_parser!(u64).range(2..))]
    console_requests: u64,
}

fn micros(duration: Duration) -> u64 {
    duration.as_micros().try_into().unwrap_or(u64::MAX)
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant histogram bounds are valid")
}

fn ms(value: u64) -> String {
    format!("{:.1} ms", value as f64 / 1000.0)
}

fn secs(duration: Duration) -> String {
    format!("{:.3} s", duration.as_secs_f64())
}

fn snapshot_of(
    server_id: Uuid,
    hostname: &str,
    csv: &str,
    generated_at: OffsetDateTime,
) -> Result<Snapshot> {
    let report = read_all_users_csv(csv.as_bytes())?;
    Ok(Snapshot {
        meta: SnapshotMeta {
            sync_id: Uuid::now_v7(),
            instance: InstanceIdentity {
                server_id,
                hostname: hostname.to_owned(),
                ghes_version: "3.14.2".to_owned(),
            },
            generated_at,
            license: None,
            source_report: report.source_report(),
        },
        users: report.users,
    })
}

/// Streams a snapshot like the agent does: header, batches built lazily, trailer.
async fn upload(
    grpc_url: &str,
    credential: &str,
    snapshot: Arc<Snapshot>,
    batch_size: usize,
) -> Result<u64> {
    let mut client = SnapshotIngestClient::connect(grpc_url.to_owned())
        .await?
        .max_encoding_message_size(64 * 1024 * 1024);
    let header = SnapshotChunk {
        chunk: Some(Chunk::Header(snapshot_header(&snapshot.meta))),
    };
    let trailer = SnapshotChunk {
        chunk: Some(Chunk::Trailer(SnapshotTrailer {
            user_count: snapshot.users.len() as u64,
            users_sha256: snapshot.digest().to_vec(),
        })),
    };
    let batches = snapshot.users.len().div_ceil(batch_size);
    let body = Arc::clone(&snapshot);
    let stream = futures::stream::iter(
        std::iter::once(header)
            .chain((0..batches).map(move |batch| {
                let start = batch * batch_size;
                let end = (start + batch_size).min(body.users.len());
                SnapshotChunk {
                    chunk: Some(Chunk::Users(UserBatch {
                        users: body.users[start..end].iter().map(server_user).collect(),
                    })),
                }
            }))
            .chain(std::iter::once(trailer)),
    );
    let mut request = tonic::Request::new(stream);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {credential}").parse()?);
    let receipt = client.upload_snapshot(request).await?.into_inner();
    Ok(receipt.users_accepted)
}

/// One aggregator process.
struct Running {
    child: tokio::process::Child,
    grpc_url: String,
    http_url: String,
}

impl Running {
    fn consumed_url(&self) -> String {
        format!("{}/enterprises/loadgen/consumed-licenses", self.http_url)
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

async fn start_aggregator(binary: &Path, database_url: &str) -> Result<Running> {
    let mut child = tokio::process::Command::new(binary)
        .arg("serve")
        .env("LICENSE_SYNC_AGGREGATOR_DATABASE_URL", database_url)
        .env("LICENSE_SYNC_AGGREGATOR_GRPC_LISTEN", "127.0.0.1:0")
        .env("LICENSE_SYNC_AGGREGATOR_HTTP_LISTEN", "127.0.0.1:0")
        // Quiet unless asked: `RUST_LOG=license_sync_aggregator=info` shows each view refresh's load and apply times,
        // `RUST_LOG=warn` also sqlx's slow-statement warnings (many under 100 concurrent syncs on PostgreSQL).
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,sqlx::query=error".to_owned()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stdout = child.stdout.take().context("aggregator stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("the aggregator did not start within 30 s")??
        .context("the aggregator exited before listening")?;
    let ready: serde_json::Value = serde_json::from_str(&line)?;
    let address = |key: &str| -> Result<String> {
        Ok(format!(
            "http://{}",
            ready[key]
                .as_str()
                .with_context(|| format!("no {key} address"))?
        ))
    };
    Ok(Running {
        grpc_url: address("grpc")?,
        http_url: address("http")?,
        child,
    })
}

fn peak_rss_mib(pid: Option<u32>) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`; `None` off Linux.
fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'; utime and stime are the
    // 14th and 15th fields of the line, so the 12th and 13th after it.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let ticks: f64 = fields.next()?.parse::<f64>().ok()? + fields.next()?.parse::<f64>().ok()?;
    // The kernel's USER_HZ is 100 on every Linux this runs on.
    Some(ticks / 100.0)
}

/// CPU seconds used by the aggregator processes together, and by this process.
fn cpu_split(replicas: &[Running]) -> Option<(f64, f64)> {
    let servers = replicas
        .iter()
        .map(|replica| cpu_seconds(replica.child.id()))
        .sum::<Option<f64>>()?;
    Some((servers, cpu_seconds(None)?))
}

/// Reads `consumed-licenses` until `accept` says yes; returns the elapsed time and the total.
async fn wait_for_total(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    accept: impl Fn(u64) -> bool,
) -> Result<(Duration, u64)> {
    let started = Instant::now();
    loop {
        let body: serde_json::Value = http
            .get(url)
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let total = body["total_seats_consumed"]
            .as_u64()
            .context("total_seats_consumed")?;
        if accept(total) {
            return Ok((started.elapsed(), total));
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "consumed-licenses did not reach the expected state within 120 s (last total {total})"
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Starts `count` aggregator processes on one database, together.
async fn start_replicas(binary: &Path, database_url: &str, count: usize) -> Result<Vec<Running>> {
    futures::future::try_join_all((0..count).map(|_| start_aggregator(binary, database_url))).await
}

async fn stop_all(replicas: Vec<Running>) {
    futures::future::join_all(replicas.into_iter().map(Running::stop)).await;
}

/// Waits until every replica's `consumed-licenses` total passes `accept`; the time each took from the same start,
/// and the first replica's total.
async fn wait_on_every_replica(
    http: &reqwest::Client,
    replicas: &[Running],
    token: &str,
    accept: impl Fn(u64) -> bool + Copy,
) -> Result<(Vec<Duration>, u64)> {
    let waits = replicas.iter().map(|replica| async move {
        wait_for_total(http, &replica.consumed_url(), token, accept).await
    });
    let answers = futures::future::try_join_all(waits).await?;
    let total = answers.first().map(|(_, total)| *total).unwrap_or(0);
    Ok((answers.into_iter().map(|(took, _)| took).collect(), total))
}

/// Every replica must answer the same first `consumed-licenses` page (100 people).
async fn check_page_one_agrees(
    http: &reqwest::Client,
    replicas: &[Running],
    token: &str,
) -> Result<()> {
    let mut first: Option<serde_json::Value> = None;
    for (n, replica) in replicas.iter().enumerate() {
        let page: serde_json::Value = http
            .get(format!("{}?per_page=100&page=1", replica.consumed_url()))
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        match &first {
            None => first = Some(page),
            Some(expected) if *expected == page => {}
            Some(_) => bail!(
                "replica {} answers consumed-licenses page 1 differently from replica 1",
                n + 1
            ),
        }
    }
    Ok(())
}

/// Each replica's peak RSS, "a + b + c = sum MiB" for several.
fn rss_report(replicas: &[Running]) -> String {
    let each: Vec<Option<f64>> = replicas
        .iter()
        .map(|replica| peak_rss_mib(replica.child.id()))
        .collect();
    match each.as_slice() {
        [Some(mib)] => format!("{mib:.1} MiB"),
        _ if each.iter().all(Option::is_some) => {
            let values: Vec<f64> = each.into_iter().flatten().collect();
            format!(
                "{} = {:.1} MiB",
                values
                    .iter()
                    .map(|mib| format!("{mib:.1}"))
                    .collect::<Vec<_>>()
                    .join(" + "),
                values.iter().sum::<f64>()
            )
        }
        _ => "unavailable".to_owned(),
    }
}

async fn open_store(database_url: &str) -> Result<DynStore> {
    store::open(database_url)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// What every phase needs: the options, the store backend, the aggregator binary, an HTTP client and the data.
struct Run<'a> {
    args: &'a Args,
    backend: &'a Backend,
    binary: &'a Path,
    http: &'a reqwest::Client,
    enterprise: &'a Enterprise,
    /// `--sync-concurrency`, or its default for the mode.
    sync_concurrency: usize,
}

/// The synthetic enterprise and its instances' identities.
struct Enterprise {
    data: dataset::Dataset,
    server_ids: Vec<Uuid>,
    hostnames: Vec<String>,
    users_per_instance: usize,
    total_accounts: usize,
}

/// Phase 1: the first instance's CSV decoded and committed straight into a fresh store of the run's backend.
async fn measure_floor(backend: &Backend, enterprise: &Enterprise) -> Result<Duration> {
    let database = backend.fresh("floor").await?;
    let floor = {
        let store = open_store(&database.url).await?;
        admin::create_enterprise(&store, "floor", "floor", 0).await?;
        let (instance, _) = admin::add_instance(
            &store,
            "floor",
            enterprise.server_ids[0],
            &enterprise.hostnames[0],
        )
        .await?;
        let started = Instant::now();
        let snapshot = snapshot_of(
            enterprise.server_ids[0],
            &enterprise.hostnames[0],
            &enterprise.data.reports[0],
            OffsetDateTime::now_utc(),
        )?;
        let sha = hex_digest(&snapshot);
        store
            .commit_snapshot(SnapshotCommit {
                instance_id: instance.id,
                snapshot: &snapshot,
                users_sha256: &sha,
                via: Arrival::Upload,
                now: OffsetDateTime::now_utc(),
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        started.elapsed()
    };
    database.drop_database().await?;
    Ok(floor)
}

/// The aggregator's database: enterprise, token, members and credentials (applies the migrations too).
async fn seed(database_url: &str, enterprise: &Enterprise) -> Result<(String, Vec<String>)> {
    let store = open_store(database_url).await?;
    admin::create_enterprise(
        &store,
        "loadgen",
        "loadgen",
        enterprise.total_accounts as i64,
    )
    .await?;
    let token = admin::create_api_token(&store, "loadgen", "loadgen").await?;
    let stored = admin::enterprise(&store, "loadgen").await?;
    store
        .replace_cloud_members(stored.id, &enterprise.data.cloud_members)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut credentials = Vec::new();
    for (server_id, hostname) in enterprise.server_ids.iter().zip(&enterprise.hostnames) {
        credentials.push(
            admin::add_instance(&store, "loadgen", *server_id, hostname)
                .await?
                .1,
        );
    }
    Ok((token, credentials))
}

/// Phase 3: every instance, `concurrency` at a time in total, instance i to `grpc_urls[i % len]`. Returns the
/// wall time and the per-sync times.
async fn sync_all(
    enterprise: &Enterprise,
    credentials: &[String],
    grpc_urls: &[String],
    concurrency: usize,
    batch_size: usize,
) -> Result<(Duration, Histogram<u64>)> {
    let semaphore = Arc::new(Semaphore::new(concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..enterprise.server_ids.len() {
        let semaphore = Arc::clone(&semaphore);
        let grpc_url = grpc_urls[i % grpc_urls.len()].clone();
        let credential = credentials[i].clone();
        let csv = enterprise.data.reports[i].clone();
        let (server_id, host) = (enterprise.server_ids[i], enterprise.hostnames[i].clone());
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore.acquire_owned().await?;
            let started = Instant::now();
            let snapshot = Arc::new(snapshot_of(
                server_id,
                &host,
                &csv,
                OffsetDateTime::now_utc(),
            )?);
            upload(&grpc_url, &credential, snapshot, batch_size).await?;
            anyhow::Ok(started.elapsed())
        }));
    }
    let mut per_sync = histogram();
    for task in tasks {
        per_sync.record(micros(task.await??))?;
    }
    Ok((started.elapsed(), per_sync))
}

/// The consumed count of an in-process merge of the same data, and how long the merge took.
fn in_process_merge(enterprise: &Enterprise) -> Result<(u64, Duration)> {
    let instances: Vec<InstanceUsers> = enterprise
        .data
        .reports
        .iter()
        .zip(&enterprise.hostnames)
        .map(|(csv, hostname)| -> Result<InstanceUsers> {
            Ok(InstanceUsers {
                hostname: hostname.clone(),
                users: Accounts::from_users(&read_all_users_csv(csv.as_bytes())?.users)?,
            })
        })
        .collect::<Result<_>>()?;
    let started = Instant::now();
    let merged = merge(&instances, &enterprise.data.cloud_members);
    Ok((merged.total_seats_consumed(), started.elapsed()))
}

fn replicas_word(count: usize) -> &'static str {
    if count == 1 { "replica" } else { "replicas" }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    // On Ctrl-C the run is dropped: its aggregators are killed and its PostgreSQL databases dropped.
    tokio::select! {
        result = run(args) => result,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }
}

async fn run(args: Args) -> Result<()> {
    let compare = args.compare_replicas;
    let instances = args
        .instances
        .unwrap_or(if compare.is_some() { 500 } else { 4 });
    let users_per_instance =
        args.users_per_instance
            .unwrap_or(if compare.is_some() { 1000 } else { 25_000 });
    let sync_concurrency = args
        .sync_concurrency
        .unwrap_or(if compare.is_some() { 100 } else { 4 });
    if instances == 0 || users_per_instance == 0 {
        bail!("--instances and --users-per-instance must be at least 1");
    }
    if args.replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    let backend = Backend::new(args.database_url.as_deref())?;
    if args.replicas > 1 && !backend.is_postgres() {
        bail!(
            "--replicas {} needs --database-url postgres://…: replicas share one PostgreSQL database, and SQLite \
             (the default without --database-url) is a file for one aggregator process",
            args.replicas
        );
    }
    if let Some(count) = compare {
        if count < 2 {
            bail!("--compare-replicas N compares 1 replica with N: N must be at least 2");
        }
        if !backend.is_postgres() {
            bail!(
                "--compare-replicas needs --database-url postgres://…: replicas share one PostgreSQL database, \
                 and SQLite (the default without --database-url) is a file for one aggregator process"
            );
        }
        if args.compare_rounds == 0 {
            bail!("--compare-rounds must be at least 1");
        }
    }
    let binary = match &args.aggregator_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .join("license-sync-aggregator"),
    };
    let shape = dataset::Shape {
        instances,
        users_per_instance,
        overlap: args.overlap,
        cloud_members: args.cloud_members,
        seed: args.seed,
    };
    let total_accounts = instances * users_per_instance;
    println!(
        "license-sync-loadgen: {} instances × {} users ({} accounts, {:.0}% overlap), {} cloud members, seed {}",
        instances,
        users_per_instance,
        total_accounts,
        args.overlap * 100.0,
        args.cloud_members,
        args.seed
    );
    if backend.is_postgres() {
        println!("  store: {}", backend.describe());
    }
    let generated = Instant::now();
    let data = dataset::generate(&shape);
    println!(
        "  data generated in {:.2} s: {} distinct people behind the server accounts",
        generated.elapsed().as_secs_f64(),
        data.distinct_server_people
    );
    let enterprise = Enterprise {
        data,
        server_ids: (0..instances)
            .map(|i| Uuid::from_u128(0x1000 + i as u128))
            .collect(),
        hostnames: (0..instances)
            .map(|i| format!("ghes-{i}.loadgen.test"))
            .collect(),
        users_per_instance,
        total_accounts,
    };
    if args.memory_breakdown {
        return memory::breakdown(&enterprise);
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.rest_connections)
        .build()?;
    let cx = Run {
        args: &args,
        backend: &backend,
        binary: &binary,
        http: &http,
        enterprise: &enterprise,
        sync_concurrency,
    };
    match compare {
        Some(count) => compare_replicas(&cx, count).await,
        None => default_run(&cx).await,
    }
}

/// The default phases (module docs), with `--replicas` aggregator processes.
async fn default_run(cx: &Run<'_>) -> Result<()> {
    let Run {
        args,
        backend,
        binary,
        http,
        enterprise,
        sync_concurrency,
    } = *cx;
    let replica_count = args.replicas;
    if replica_count > 1 {
        println!(
            "  {replica_count} aggregator replicas on one database: syncs and REST clients spread round-robin"
        );
    }
    let (server_ids, hostnames) = (&enterprise.server_ids, &enterprise.hostnames);
    let total_accounts = enterprise.total_accounts;

    // 1. Floor.
    let floor = measure_floor(backend, enterprise).await?;

    // The aggregators' database, then the server processes. Declared in this order so that, on an early return, the
    // processes are killed before the database is dropped.
    let database: FreshDatabase = backend.fresh("run").await?;
    let (token, credentials) = seed(&database.url, enterprise).await?;
    let replicas = start_replicas(binary, &database.url, replica_count).await?;
    let first = &replicas[0];
    let grpc_urls: Vec<String> = replicas.iter().map(|r| r.grpc_url.clone()).collect();

    // 2. One instance through the whole path, then the merge.
    let started = Instant::now();
    let snapshot = Arc::new(snapshot_of(
        server_ids[0],
        &hostnames[0],
        &enterprise.data.reports[0],
        OffsetDateTime::now_utc(),
    )?);
    upload(&first.grpc_url, &credentials[0], snapshot, args.batch_size).await?;
    let one_sync = started.elapsed();
    let (one_merge, _) =
        wait_for_total(http, &first.consumed_url(), &token, |total| total > 0).await?;

    // 3. Every instance (the first again, as a replace), `sync_concurrency` at a time, spread over the replicas.
    let (all_syncs, per_sync) = sync_all(
        enterprise,
        &credentials,
        &grpc_urls,
        sync_concurrency,
        args.batch_size,
    )
    .await?;
    let (expected_total, pure_merge) = in_process_merge(enterprise)?;
    let (merge_times, total) =
        wait_on_every_replica(http, &replicas, &token, |t| t == expected_total).await?;
    let all_merge = merge_times.iter().max().copied().unwrap_or_default();
    if replica_count > 1 {
        check_page_one_agrees(http, &replicas, &token).await?;
    }

    // 4. One instance changes (its last 1% of accounts suspended) and re-syncs through the first replica: time until
    // the answer shows it (on every replica).
    let changed_csv = {
        let report = &enterprise.data.reports[0];
        let lines: Vec<&str> = report.lines().collect();
        let change_from = lines.len() - (lines.len() / 100).max(1);
        let mut csv = String::with_capacity(report.len());
        for (n, line) in lines.iter().enumerate() {
            if n >= change_from && n > 0 {
                csv.push_str(&line.replacen(",false,10.0.0.1", ",true,10.0.0.1", 1));
            } else {
                csv.push_str(line);
            }
            csv.push('\n');
        }
        csv
    };
    let started = Instant::now();
    let snapshot = Arc::new(snapshot_of(
        server_ids[0],
        &hostnames[0],
        &changed_csv,
        OffsetDateTime::now_utc(),
    )?);
    upload(&first.grpc_url, &credentials[0], snapshot, args.batch_size).await?;
    let resync = started.elapsed();
    let (remerge_times, total_after_change) =
        wait_on_every_replica(http, &replicas, &token, |t| t != total).await?;
    let remerge = remerge_times[0];
    let remerge_slowest = remerge_times.iter().max().copied().unwrap_or_default();

    // 5. REST throughput on random pages, client w on replica w mod N.
    let pages = (total as usize).div_ceil(100).max(1);
    let cpu_before = cpu_split(&replicas);
    let deadline = Instant::now() + Duration::from_secs(args.rest_seconds);
    let mut clients = Vec::new();
    for worker in 0..args.rest_connections {
        let http = http.clone();
        let (url, token) = (
            replicas[worker % replica_count].consumed_url(),
            token.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(worker as u64);
            let mut latencies = histogram();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let page = rng.random_range(1..=pages);
                let started = Instant::now();
                let ok = http
                    .get(format!("{url}?per_page=100&page={page}"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .and_then(|r| r.error_for_status());
                match ok {
                    Ok(response) => {
                        let _ = response.bytes().await;
                        latencies.record(micros(started.elapsed())).ok();
                    }
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let mut rest = histogram();
    let mut rest_errors = 0;
    for client in clients {
        let (latencies, errors) = client.await?;
        rest.add(&latencies).ok();
        rest_errors += errors;
    }
    let cpu_after = cpu_split(&replicas);
    let rss = rss_report(&replicas);

    // 7. The console's pages, after everything above (their caches, e.g. the people search, add to the peak RSS).
    let console = if args.console_pages {
        let table = console_pages::run(
            &replicas[0].http_url,
            "loadgen",
            &token,
            args.console_requests as usize,
            total_after_change,
        )
        .await?;
        Some((table, rss_report(&replicas)))
    } else {
        None
    };
    stop_all(replicas).await;
    database.drop_database().await?;

    println!("\nresults");
    println!(
        "  floor: 1 instance CSV decode + store commit   {}",
        secs(floor)
    );
    println!(
        "  1 instance CSV → gRPC → committed             {}  ({:.2}× floor)",
        secs(one_sync),
        one_sync.as_secs_f64() / floor.as_secs_f64()
    );
    println!(
        "  … then merged (first REST answer)            +{}  (total {})",
        secs(one_merge),
        secs(one_sync + one_merge)
    );
    println!(
        "  all {} instances synced ({} at a time)       {}  ({:.0} users/s)",
        server_ids.len(),
        sync_concurrency,
        secs(all_syncs),
        total_accounts as f64 / all_syncs.as_secs_f64()
    );
    println!(
        "  per-sync p50 / p99                            {} / {}",
        ms(per_sync.value_at_quantile(0.5)),
        ms(per_sync.value_at_quantile(0.99))
    );
    if replica_count == 1 {
        println!(
            "  merge after all syncs (REST answer)           {}",
            secs(all_merge)
        );
    } else {
        println!(
            "  merge after all syncs (REST answer)           {}  (slowest of {replica_count} replicas)",
            secs(all_merge)
        );
    }
    println!(
        "  pure in-process merge of the same data        {}",
        secs(pure_merge)
    );
    if replica_count == 1 {
        println!(
            "  consumed seats                                {total} (expected {expected_total})"
        );
    } else {
        println!(
            "  consumed seats                                {total} on all {replica_count} replicas (expected \
             {expected_total}); page 1 identical on all"
        );
    }
    println!(
        "  re-sync of one changed instance               {}",
        secs(resync)
    );
    if replica_count == 1 {
        println!(
            "  … then re-merged (REST shows the change)     +{}",
            secs(remerge)
        );
    } else {
        println!(
            "  … then re-merged (REST shows the change)     +{} on the committing replica, +{} on the slowest",
            secs(remerge),
            secs(remerge_slowest)
        );
    }
    println!(
        "  REST consumed-licenses, {} connections        {:.0} req/s, p50 {}, p99 {}, {} errors",
        args.rest_connections,
        rest.len() as f64 / args.rest_seconds as f64,
        ms(rest.value_at_quantile(0.5)),
        ms(rest.value_at_quantile(0.99)),
        rest_errors
    );
    // Both sides share this machine's cores: what each costs per request says what bounds the latency.
    if let (Some((servers_before, client_before)), Some((servers_after, client_after))) =
        (cpu_before, cpu_after)
        && !rest.is_empty()
    {
        let per_request = |seconds: f64| seconds / rest.len() as f64 * 1e6;
        println!(
            "  … CPU per request: aggregator {:.0} µs, load generator {:.0} µs",
            per_request(servers_after - servers_before),
            per_request(client_after - client_before)
        );
    }
    if replica_count == 1 {
        println!("  aggregator peak RSS                           {rss}");
    } else {
        println!("  aggregator peak RSS, per replica              {rss}");
    }
    if let Some((table, rss_after)) = console {
        print!("{table}");
        println!("  aggregator peak RSS after the console pages   {rss_after}");
    }
    if total != expected_total {
        bail!(
            "the aggregator's consumed seats ({total}) differ from an in-process merge ({expected_total})"
        );
    }
    Ok(())
}

/// What one configuration of `--compare-replicas` measured.
struct SyncPhase {
    replicas: usize,
    wall: Duration,
    per_sync: Histogram<u64>,
    /// From the last acknowledged sync until the slowest replica answers the expected total.
    settle: Duration,
    rss: String,
}

/// The sync phase alone, on a fresh database with `replica_count` aggregators, checked for correctness.
async fn sync_phase(cx: &Run<'_>, replica_count: usize, expected_total: u64) -> Result<SyncPhase> {
    let Run {
        args,
        backend,
        binary,
        http,
        enterprise,
        sync_concurrency,
    } = *cx;
    // Declared before the replicas: on an early return they are killed before the database is dropped.
    let database = backend.fresh(&format!("r{replica_count}")).await?;
    let (token, credentials) = seed(&database.url, enterprise).await?;
    let replicas = start_replicas(binary, &database.url, replica_count).await?;
    let grpc_urls: Vec<String> = replicas.iter().map(|r| r.grpc_url.clone()).collect();
    let (wall, per_sync) = sync_all(
        enterprise,
        &credentials,
        &grpc_urls,
        sync_concurrency,
        args.batch_size,
    )
    .await?;
    let (settle_times, _) =
        wait_on_every_replica(http, &replicas, &token, |t| t == expected_total).await?;
    check_page_one_agrees(http, &replicas, &token).await?;
    let rss = rss_report(&replicas);
    stop_all(replicas).await;
    database.drop_database().await?;
    Ok(SyncPhase {
        replicas: replica_count,
        wall,
        per_sync,
        settle: settle_times.into_iter().max().unwrap_or_default(),
        rss,
    })
}

/// `--compare-replicas N`: the sync phase with 1 replica, then with N, `--compare-rounds` times.
async fn compare_replicas(cx: &Run<'_>, count: usize) -> Result<()> {
    let Run {
        args,
        backend,
        enterprise,
        sync_concurrency,
        ..
    } = *cx;
    let instances = enterprise.server_ids.len();
    println!(
        "  comparing 1 and {count} replicas: {instances} instance syncs, {} in flight in total, {} round(s), a fresh \
         database per configuration",
        sync_concurrency.min(instances),
        args.compare_rounds
    );
    let floor = measure_floor(backend, enterprise).await?;
    let (expected_total, pure_merge) = in_process_merge(enterprise)?;
    let floor_users_per_sec = enterprise.users_per_instance as f64 / floor.as_secs_f64();

    println!("\nresults");
    println!(
        "  floor: 1 instance CSV decode + store commit   {}  ({:.0} users/s one at a time)",
        secs(floor),
        floor_users_per_sec
    );
    println!(
        "  pure in-process merge of the same data        {}  ({expected_total} consumed seats)",
        secs(pure_merge)
    );
    let mut ratios = Vec::new();
    for round in 1..=args.compare_rounds {
        let mut phases = Vec::new();
        for replica_count in [1, count] {
            let phase = sync_phase(cx, replica_count, expected_total).await?;
            let wall = phase.wall.as_secs_f64();
            let users_per_sec = enterprise.total_accounts as f64 / wall;
            // Little's law: the syncs' summed durations over the wall time.
            let in_flight = phase.per_sync.mean() * phase.per_sync.len() as f64 / 1e6 / wall;
            println!(
                "  round {round}, {} {}:",
                phase.replicas,
                replicas_word(phase.replicas)
            );
            println!(
                "    {:<44}{}  ({:.0} users/s, {:.1} syncs/s; {:.2}× the floor's users/s)",
                format!(
                    "{instances} syncs, {} at a time",
                    sync_concurrency.min(instances)
                ),
                secs(phase.wall),
                users_per_sec,
                instances as f64 / wall,
                users_per_sec / floor_users_per_sec
            );
            println!(
                "    per-sync p50 / p99, mean in flight          {} / {}, {in_flight:.1}",
                ms(phase.per_sync.value_at_quantile(0.5)),
                ms(phase.per_sync.value_at_quantile(0.99))
            );
            if phase.replicas == 1 {
                println!(
                    "    then the replica answers                    +{}  ({expected_total} consumed seats = the in-process merge)",
                    secs(phase.settle)
                );
            } else {
                println!(
                    "    then every replica answers                  +{}  ({expected_total} consumed seats = the in-process merge on all {}; page 1 identical)",
                    secs(phase.settle),
                    phase.replicas
                );
            }
            println!(
                "    peak RSS                                    {}",
                phase.rss
            );
            phases.push(phase);
        }
        let ratio = phases[0].wall.as_secs_f64() / phases[1].wall.as_secs_f64();
        println!(
            "  round {round}: {count} replicas / 1 replica throughput (users/s and syncs/s alike)  {ratio:.2}×"
        );
        ratios.push(ratio);
    }
    if ratios.len() > 1 {
        let mut sorted = ratios.clone();
        sorted.sort_by(f64::total_cmp);
        let median = if sorted.len() % 2 == 1 {
            sorted[sorted.len() / 2]
        } else {
            (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
        };
        println!(
            "  {count} replicas / 1 replica throughput, median of {} rounds                    {median:.2}×  (each: {})",
            ratios.len(),
            ratios
                .iter()
                .map(|r| format!("{r:.2}×"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

fn hex_digest(snapshot: &Snapshot) -> String {
    snapshot
        .digest()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}
