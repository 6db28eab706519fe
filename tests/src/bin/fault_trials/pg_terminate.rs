//! `pg-terminate`: 20 instances each send three snapshots in turn while, at two random points, every PostgreSQL
//! backend of the aggregator's database is ended with `pg_terminate_backend`. A sync must fail with an error the
//! agent retries (or succeed), the retry of the same sync id must land, and nothing may be torn. Recovery: the last
//! termination → the first acknowledged sync after it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use license_sync_e2e::Aggregator;
use license_sync_e2e::postgres::TestDatabase;
use rand::Rng;
use sqlx::Connection;
use tokio::sync::Mutex;

use crate::common::{
    self, Sent, StoreReader, TrialOutcome, generated_at, sizes, snapshot, trial_base, upload,
    verify,
};

const INSTANCES: usize = 20;
const VERSIONS: usize = 3;
const TERMINATIONS: usize = 2;
/// How long one snapshot may take to land, retries included.
const LAND_DEADLINE: Duration = Duration::from_secs(60);

/// What the sync tasks report: each snapshot's record, the errors seen, and when acknowledgements came.
#[derive(Default)]
struct Log {
    sent: Vec<Sent>,
    acknowledged_at: Vec<Instant>,
    errors: Vec<String>,
    unclean: Vec<String>,
    not_landed: Vec<String>,
}

pub async fn trial(postgres_url: &str, rng: &mut impl Rng) -> Result<TrialOutcome> {
    let database = TestDatabase::create(postgres_url).await?;
    let aggregator =
        Aggregator::start_with_env(&[("LICENSE_SYNC_AGGREGATOR_DATABASE_URL", &database.url)])?;
    let instances = Arc::new(common::enroll(&database.url, INSTANCES)?);
    let sizes: Vec<Vec<usize>> = (0..INSTANCES)
        .map(|_| sizes(rng, VERSIONS, 500..=4000))
        .collect();
    let mut terminate_at: Vec<Duration> = (0..TERMINATIONS)
        .map(|_| Duration::from_millis(rng.random_range(50..=1500)))
        .collect();
    terminate_at.sort();

    let log = Arc::new(Mutex::new(Log::default()));
    let base = trial_base();
    let started = Instant::now();
    let mut load = Vec::new();
    for (index, sizes) in sizes.into_iter().enumerate() {
        let (instances, log, grpc_url) =
            (instances.clone(), log.clone(), aggregator.grpc_url.clone());
        load.push(tokio::spawn(async move {
            let instance = &instances[index];
            for (version, users) in sizes.into_iter().enumerate() {
                let version = version as u32;
                let snapshot = Arc::new(snapshot(
                    instance,
                    version,
                    users,
                    generated_at(base, version),
                ));
                let mut record = Sent::new(index, version, &snapshot);
                let deadline = Instant::now() + LAND_DEADLINE;
                // The same snapshot (and sync id) again after each failure, as the agent's delivery retries.
                loop {
                    match upload(&grpc_url, &instance.credential, snapshot.clone()).await {
                        Ok(_) => {
                            record.acknowledged = true;
                            log.lock().await.acknowledged_at.push(Instant::now());
                            break;
                        }
                        Err(error) => {
                            let mut log = log.lock().await;
                            log.errors.push(common::failure_note(&error));
                            if !error.is_retryable() {
                                log.unclean.push(format!(
                                    "{}: a sync failed with an error the agent does not retry ({}): {error}",
                                    instance.hostname,
                                    error.kind()
                                ));
                                break;
                            }
                            if Instant::now() > deadline {
                                log.not_landed.push(format!(
                                    "{}: version {version} did not land within {LAND_DEADLINE:?}: {error}",
                                    instance.hostname
                                ));
                                break;
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                log.lock().await.sent.push(record);
            }
        }));
    }

    let mut terminations = Vec::new();
    let mut admin = sqlx::PgConnection::connect(postgres_url)
        .await
        .context("connect to PostgreSQL to terminate backends")?;
    for at in terminate_at {
        // The random points of the faults: the syncs run undisturbed until then.
        tokio::time::sleep_until((started + at).into()).await;
        let ended: Vec<(bool,)> = sqlx::query_as(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&database.name)
        .fetch_all(&mut admin)
        .await
        .context("pg_terminate_backend")?;
        terminations.push((Instant::now(), ended.len()));
    }
    admin.close().await.ok();
    for task in load {
        task.await.context("a sync task panicked")?;
    }

    let log = std::mem::take(&mut *log.lock().await);
    let mut outcome = TrialOutcome::default();
    for (_, ended) in &terminations {
        outcome.notes.push(("backends terminated".into(), *ended));
    }
    if let Some((last, _)) = terminations.last() {
        match log.acknowledged_at.iter().filter(|at| *at > last).min() {
            Some(first) => outcome.recovery.push(*first - *last),
            None => outcome.note("terminated after the last sync"),
        }
    }
    for note in &log.errors {
        outcome.note(note.clone());
    }
    outcome.problems.extend(log.unclean);
    outcome.problems.extend(log.not_landed);
    let reader = StoreReader::connect(&database.url).await?;
    verify(&reader, &instances, &log.sent, &mut outcome).await?;
    reader.close().await;
    drop(aggregator);
    drop(database);
    Ok(outcome)
}
