//! `aggregator-kill`: 20 instances stream snapshots of random sizes without pause; at a random point the aggregator
//! gets SIGKILL. It restarts on the same database, and every acknowledged sync must be stored (or superseded) and
//! no instance may hold a mix of two snapshots. Recovery: restart → `/readyz` 200 and → the first acknowledged sync.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use license_sync_e2e::Aggregator;
use license_sync_e2e::postgres::TestDatabase;
use rand::Rng;
use tokio::sync::Mutex;

use crate::common::{
    self, Backend, Sent, StoreReader, TrialOutcome, first_successful_sync, generated_at, sizes,
    snapshot, trial_base, upload, verify, wait_readyz,
};

const INSTANCES: usize = 20;
/// Snapshots drawn per instance; more than a trial's few seconds can send.
const VERSIONS: usize = 400;
const RECOVERY_DEADLINE: Duration = Duration::from_secs(60);

pub async fn trial(
    backend: Backend,
    postgres_url: &str,
    rng: &mut impl Rng,
) -> Result<TrialOutcome> {
    let database = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(TestDatabase::create(postgres_url).await?),
    };
    let mut env = Vec::new();
    if let Some(database) = &database {
        env.push((
            "LICENSE_SYNC_AGGREGATOR_DATABASE_URL",
            database.url.as_str(),
        ));
    }
    let mut aggregator = Aggregator::start_with_env(&env)?;
    let database_url = match &database {
        Some(database) => database.url.clone(),
        None => Aggregator::database_url(aggregator.dir.path()),
    };
    // One more instance than the load: the probe whose first sync after the restart measures recovery.
    let mut instances = common::enroll(&database_url, INSTANCES + 1)?;
    let probe = instances.pop().context("the probe instance")?;
    let instances = Arc::new(instances);

    let sizes: Vec<Vec<usize>> = (0..INSTANCES)
        .map(|_| sizes(rng, VERSIONS, 1..=1500))
        .collect();
    let kill_after = Duration::from_millis(rng.random_range(500..=4000));

    let killed = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(Mutex::new(Vec::new()));
    let base = trial_base();
    let grpc_url = aggregator.grpc_url.clone();
    let mut load = Vec::new();
    for (index, sizes) in sizes.into_iter().enumerate() {
        let (instances, killed, sent, grpc_url) = (
            instances.clone(),
            killed.clone(),
            sent.clone(),
            grpc_url.clone(),
        );
        load.push(tokio::spawn(async move {
            let instance = &instances[index];
            for (version, users) in sizes.into_iter().enumerate() {
                if killed.load(Ordering::SeqCst) {
                    break;
                }
                let version = version as u32;
                let snapshot = Arc::new(snapshot(
                    instance,
                    version,
                    users,
                    generated_at(base, version),
                ));
                let mut record = Sent::new(index, version, &snapshot);
                let result = upload(&grpc_url, &instance.credential, snapshot).await;
                record.acknowledged = result.is_ok();
                sent.lock().await.push((record, result.err()));
            }
        }));
    }
    // The random point of the kill: the load runs undisturbed until then.
    tokio::time::sleep(kill_after).await;
    aggregator.stop();
    killed.store(true, Ordering::SeqCst);
    for task in load {
        task.await.context("a sync task panicked")?;
    }

    let restarted = Instant::now();
    aggregator.restart()?;
    let http = reqwest::Client::new();
    let ready = wait_readyz(&http, &aggregator.http_url, 200, RECOVERY_DEADLINE).await?;
    let synced = first_successful_sync(&aggregator.grpc_url, &probe, RECOVERY_DEADLINE).await?;

    let mut outcome = TrialOutcome {
        recovery: vec![synced - restarted],
        ready: vec![ready - restarted],
        ..TrialOutcome::default()
    };
    let sent = std::mem::take(&mut *sent.lock().await);
    let mut records = Vec::with_capacity(sent.len());
    for (record, error) in sent {
        if let Some(error) = error {
            outcome.note(common::failure_note(&error));
        }
        records.push(record);
    }
    let reader = StoreReader::connect(&database_url).await?;
    verify(&reader, &instances, &records, &mut outcome).await?;
    reader.close().await;
    drop(aggregator);
    drop(database);
    Ok(outcome)
}
