//! `license-sync-loadgen`: syncs a deterministic synthetic enterprise into a real aggregator process and prints
//! what it measured, next to a floor measured in the same run (the same CSV decoded and bulk-inserted into the same
//! kind of store, with no protocol in between), so figures read as ratios on a noisy machine.
//!
//! Phases:
//! 1. floor: parse one instance's CSV and commit it straight into a fresh store, in process;
//! 2. one instance through the real path: CSV parse → gRPC stream → validation → commit, then the first
//!    `consumed-licenses` answer (the merge);
//! 3. every instance, `--sync-concurrency` at a time (users/s, per-sync p50/p99), then the merge;
//! 4. one instance changes and re-syncs: time until the REST answer reflects it (re-merge);
//! 5. REST: `--rest-connections` clients read random `consumed-licenses` pages for `--rest-seconds`;
//! 6. the aggregator's peak RSS.

mod dataset;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use license_sync_aggregator::admin;
use license_sync_aggregator::store::{self, Arrival, SnapshotCommit};
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

#[derive(Parser, Debug)]
#[command(name = "license-sync-loadgen", version, about)]
struct Args {
    /// GHES instances in the synthetic enterprise.
    #[arg(long, default_value_t = 4)]
    instances: usize,
    /// Accounts per instance.
    #[arg(long, default_value_t = 25_000)]
    users_per_instance: usize,
    /// Share of each instance's accounts whose person is on every instance.
    #[arg(long, default_value_t = 0.3)]
    overlap: f64,
    #[arg(long, default_value_t = 10_000)]
    cloud_members: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Instance syncs in flight at once.
    #[arg(long, default_value_t = 4)]
    sync_concurrency: usize,
    /// Users per gRPC message.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    #[arg(long, default_value_t = 64)]
    rest_connections: usize,
    #[arg(long, default_value_t = 5)]
    rest_seconds: u64,
    /// The aggregator binary; defaults to the one next to this binary.
    #[arg(long)]
    aggregator_bin: Option<PathBuf>,
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

struct Running {
    child: tokio::process::Child,
    grpc_url: String,
    http_url: String,
}

async fn start_aggregator(binary: &PathBuf, database_url: &str) -> Result<Running> {
    let mut child = tokio::process::Command::new(binary)
        .arg("serve")
        .env("LICENSE_SYNC_AGGREGATOR_DATABASE_URL", database_url)
        .env("LICENSE_SYNC_AGGREGATOR_GRPC_LISTEN", "127.0.0.1:0")
        .env("LICENSE_SYNC_AGGREGATOR_HTTP_LISTEN", "127.0.0.1:0")
        // Quiet unless asked: `RUST_LOG=license_sync_aggregator=info` shows each view refresh's load and apply times.
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
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

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.instances == 0 || args.users_per_instance == 0 {
        bail!("--instances and --users-per-instance must be at least 1");
    }
    let binary = match &args.aggregator_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .join("license-sync-aggregator"),
    };
    let shape = dataset::Shape {
        instances: args.instances,
        users_per_instance: args.users_per_instance,
        overlap: args.overlap,
        cloud_members: args.cloud_members,
        seed: args.seed,
    };
    let total_accounts = args.instances * args.users_per_instance;
    println!(
        "license-sync-loadgen: {} instances × {} users ({} accounts, {:.0}% overlap), {} cloud members, seed {}",
        args.instances,
        args.users_per_instance,
        total_accounts,
        args.overlap * 100.0,
        args.cloud_members,
        args.seed
    );
    let generated = Instant::now();
    let data = dataset::generate(&shape);
    println!(
        "  data generated in {:.2} s: {} distinct people behind the server accounts",
        generated.elapsed().as_secs_f64(),
        data.distinct_server_people
    );

    let dir = tempfile::tempdir()?;
    let server_ids: Vec<Uuid> = (0..args.instances)
        .map(|i| Uuid::from_u128(0x1000 + i as u128))
        .collect();
    let hostname = |i: usize| format!("ghes-{i}.loadgen.test");

    // 1. Floor: the first instance's CSV decoded and committed straight into a fresh store.
    let floor = {
        let url = format!("sqlite://{}", dir.path().join("floor.db").display());
        let store = store::open(&url)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        admin::create_enterprise(&store, "floor", "floor", 0).await?;
        let (instance, _) =
            admin::add_instance(&store, "floor", server_ids[0], &hostname(0)).await?;
        let started = Instant::now();
        let snapshot = snapshot_of(
            server_ids[0],
            &hostname(0),
            &data.reports[0],
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

    // The aggregator's database: enterprise, token, members and credentials, then the server process.
    let database_url = format!("sqlite://{}", dir.path().join("aggregator.db").display());
    let (token, credentials) = {
        let store = store::open(&database_url)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        admin::create_enterprise(&store, "loadgen", "loadgen", total_accounts as i64).await?;
        let token = admin::create_api_token(&store, "loadgen", "loadgen").await?;
        let enterprise = admin::enterprise(&store, "loadgen").await?;
        store
            .replace_cloud_members(enterprise.id, &data.cloud_members)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut credentials = Vec::new();
        for (i, server_id) in server_ids.iter().enumerate() {
            credentials.push(
                admin::add_instance(&store, "loadgen", *server_id, &hostname(i))
                    .await?
                    .1,
            );
        }
        (token, credentials)
    };
    let mut aggregator = start_aggregator(&binary, &database_url).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.rest_connections)
        .build()?;
    let consumed_url = format!(
        "{}/enterprises/loadgen/consumed-licenses",
        aggregator.http_url
    );

    // 2. One instance through the whole path, then the merge.
    let started = Instant::now();
    let snapshot = Arc::new(snapshot_of(
        server_ids[0],
        &hostname(0),
        &data.reports[0],
        OffsetDateTime::now_utc(),
    )?);
    upload(
        &aggregator.grpc_url,
        &credentials[0],
        snapshot,
        args.batch_size,
    )
    .await?;
    let one_sync = started.elapsed();
    let (one_merge, _) = wait_for_total(&http, &consumed_url, &token, |total| total > 0).await?;

    // 3. Every instance (the first again, as a replace), `sync_concurrency` at a time.
    let semaphore = Arc::new(Semaphore::new(args.sync_concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.instances {
        let semaphore = Arc::clone(&semaphore);
        let grpc_url = aggregator.grpc_url.clone();
        let credential = credentials[i].clone();
        let csv = data.reports[i].clone();
        let (server_id, host, batch_size) = (server_ids[i], hostname(i), args.batch_size);
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
    let all_syncs = started.elapsed();
    let expected = {
        let instances: Vec<InstanceUsers> = data
            .reports
            .iter()
            .enumerate()
            .map(|(i, csv)| -> Result<InstanceUsers> {
                Ok(InstanceUsers {
                    hostname: hostname(i),
                    users: read_all_users_csv(csv.as_bytes())?.users,
                })
            })
            .collect::<Result<_>>()?;
        let started = Instant::now();
        let merged = merge(&instances, &data.cloud_members);
        (merged.total_seats_consumed(), started.elapsed())
    };
    let (expected_total, pure_merge) = expected;
    let (all_merge, total) =
        wait_for_total(&http, &consumed_url, &token, |t| t == expected_total).await?;

    // 4. One instance changes (its last 1% of accounts suspended) and re-syncs: time until the answer shows it.
    let changed_csv = {
        let lines: Vec<&str> = data.reports[0].lines().collect();
        let change_from = lines.len() - (lines.len() / 100).max(1);
        let mut csv = String::with_capacity(data.reports[0].len());
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
        &hostname(0),
        &changed_csv,
        OffsetDateTime::now_utc(),
    )?);
    upload(
        &aggregator.grpc_url,
        &credentials[0],
        snapshot,
        args.batch_size,
    )
    .await?;
    let resync = started.elapsed();
    let (remerge, _) = wait_for_total(&http, &consumed_url, &token, |t| t != total).await?;

    // 5. REST throughput on random pages.
    let pages = (total as usize).div_ceil(100).max(1);
    let deadline = Instant::now() + Duration::from_secs(args.rest_seconds);
    let mut clients = Vec::new();
    for worker in 0..args.rest_connections {
        let http = http.clone();
        let (url, token) = (consumed_url.clone(), token.clone());
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
    let rss = peak_rss_mib(aggregator.child.id());
    let _ = aggregator.child.kill().await;

    let secs = |d: Duration| format!("{:.3} s", d.as_secs_f64());
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
        args.instances,
        args.sync_concurrency,
        secs(all_syncs),
        total_accounts as f64 / all_syncs.as_secs_f64()
    );
    println!(
        "  per-sync p50 / p99                            {} / {}",
        ms(per_sync.value_at_quantile(0.5)),
        ms(per_sync.value_at_quantile(0.99))
    );
    println!(
        "  merge after all syncs (REST answer)           {}",
        secs(all_merge)
    );
    println!(
        "  pure in-process merge of the same data        {}",
        secs(pure_merge)
    );
    println!("  consumed seats                                {total} (expected {expected_total})");
    println!(
        "  re-sync of one changed instance               {}",
        secs(resync)
    );
    println!(
        "  … then re-merged (REST shows the change)     +{}",
        secs(remerge)
    );
    println!(
        "  REST consumed-licenses, {} connections        {:.0} req/s, p50 {}, p99 {}, {} errors",
        args.rest_connections,
        rest.len() as f64 / args.rest_seconds as f64,
        ms(rest.value_at_quantile(0.5)),
        ms(rest.value_at_quantile(0.99)),
        rest_errors
    );
    match rss {
        Some(mib) => println!("  aggregator peak RSS                           {mib:.1} MiB"),
        None => println!("  aggregator peak RSS                           unavailable"),
    }
    if total != expected_total {
        bail!(
            "the aggregator's consumed seats ({total}) differ from an in-process merge ({expected_total})"
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
