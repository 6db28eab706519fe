//! `disk-full`: the aggregator's SQLite database lives on a real 16 MiB filesystem, a tmpfs the tool mounts in the
//! user and mount namespace it runs in for this kind (see `main`: no root needed where unprivileged user namespaces
//! are allowed, and nothing is mounted outside it). During syncs of 4 instances the tool fills the filesystem, then
//! frees it. Every failed sync must tell the agent the disk is full (never "internal"), `/readyz` must be 200 again
//! after the space is freed, and syncs must land again without a restart (how often `/readyz` went 503 is noted). Recovery: space freed → the
//! first acknowledged sync, and → `/readyz` 200.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use license_sync_e2e::Aggregator;
use rand::Rng;
use tokio::sync::Mutex;

use crate::common::{
    self, Instance, Sent, StoreReader, TrialOutcome, generated_at, readyz, sizes, snapshot,
    trial_base, upload, verify, wait_readyz,
};

const INSTANCES: usize = 4;
const DISK_SIZE: &str = "16m";
const VERSIONS: usize = 2000;
/// How long the full disk may take to show (a failed sync and `/readyz` 503), and the recovery to happen.
const DEADLINE: Duration = Duration::from_secs(30);

pub struct Setup {
    /// Always `Some` until dropped: stopped before the filesystem under it is unmounted.
    aggregator: Option<Aggregator>,
    instances: Arc<Vec<Instance>>,
    database_url: String,
    /// The mounted filesystem (its mount point).
    disk: tempfile::TempDir,
    http: reqwest::Client,
}

/// A sync that failed, and when.
struct Failure {
    at: Instant,
    kind: &'static str,
    message: String,
}

#[derive(Default)]
struct Log {
    sent: Vec<Sent>,
    acknowledged: Vec<(usize, Instant)>,
    failures: Vec<Failure>,
}

impl Setup {
    pub async fn start() -> Result<Setup> {
        let disk = tempfile::tempdir()?;
        let mounted = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={DISK_SIZE}"),
                "fault-trials-disk",
            ])
            .arg(disk.path())
            .status()
            .context("run mount")?;
        if !mounted.success() {
            bail!(
                "mount -t tmpfs failed ({mounted}): the tool runs this kind in a user and mount namespace of its \
                 own; were user namespaces refused?"
            );
        }
        let database_url = format!("sqlite://{}/aggregator.db", disk.path().display());
        let aggregator =
            Aggregator::start_with_env(&[("LICENSE_SYNC_AGGREGATOR_DATABASE_URL", &database_url)])?;
        let instances = Arc::new(common::enroll(&database_url, INSTANCES)?);
        Ok(Setup {
            aggregator: Some(aggregator),
            instances,
            database_url,
            disk,
            http: reqwest::Client::new(),
        })
    }

    fn aggregator(&self) -> Result<&Aggregator> {
        self.aggregator
            .as_ref()
            .context("the aggregator was stopped")
    }

    pub async fn trial(&self, rng: &mut impl Rng) -> Result<TrialOutcome> {
        let sizes: Vec<Vec<usize>> = (0..INSTANCES)
            .map(|_| sizes(rng, VERSIONS, 100..=3000))
            .collect();
        let fill_after = Duration::from_millis(rng.random_range(100..=1000));
        let aggregator = self.aggregator()?;
        let http_url = &aggregator.http_url;
        wait_readyz(&self.http, http_url, 200, DEADLINE).await?;

        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Log::default()));
        let base = trial_base();
        let mut load = Vec::new();
        for (index, sizes) in sizes.into_iter().enumerate() {
            let (instances, stop, log, grpc_url) = (
                self.instances.clone(),
                stop.clone(),
                log.clone(),
                aggregator.grpc_url.clone(),
            );
            load.push(tokio::spawn(async move {
                let instance = &instances[index];
                for (version, users) in sizes.into_iter().enumerate() {
                    if stop.load(Ordering::SeqCst) {
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
                    let failed = {
                        let mut log = log.lock().await;
                        let failed = match result {
                            Ok(_) => {
                                record.acknowledged = true;
                                log.acknowledged.push((index, Instant::now()));
                                false
                            }
                            Err(error) => {
                                log.failures.push(Failure {
                                    at: Instant::now(),
                                    kind: error.kind(),
                                    message: error.to_string(),
                                });
                                true
                            }
                        };
                        log.sent.push(record);
                        failed
                    };
                    if failed {
                        // Not faster than the agent's first retry.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }));
        }

        // The random point of the fault: the syncs run undisturbed until then.
        tokio::time::sleep(fill_after).await;
        let filler = self.disk.path().join("filler");
        let filled = tokio::task::spawn_blocking({
            let filler = filler.clone();
            move || fill(&filler)
        })
        .await
        .context("the filler panicked")??;
        let full_since = Instant::now();
        let mut outcome = TrialOutcome::default();
        outcome.note(format!("filled {} MiB", filled >> 20));

        // The full disk shows: a sync fails and readiness says not ready.
        let deadline = Instant::now() + DEADLINE;
        let mut saw_not_ready = false;
        loop {
            saw_not_ready |= readyz(&self.http, http_url).await == Some(503);
            let failed = log
                .lock()
                .await
                .failures
                .iter()
                .any(|failure| failure.at > full_since);
            if saw_not_ready && failed {
                outcome.note("the full disk showed: a sync failed and /readyz answered 503");
                break;
            }
            if Instant::now() > deadline {
                // Not violations: SQLite keeps committing into space it already holds (its WAL is reused after
                // each checkpoint), so a full filesystem may not reach a commit within the deadline; and
                // `/readyz`'s probe is one small row, which can still fit while a large commit does not. The
                // aggregator's store-faults tests prove the 503 on a store that cannot write at all.
                outcome.note(if failed {
                    "a commit failed but /readyz's small write still fit"
                } else {
                    "no commit reached the full disk within the deadline"
                });
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        std::fs::remove_file(&filler).context("free the space")?;
        let freed = Instant::now();
        match wait_readyz(&self.http, http_url, 200, DEADLINE).await {
            Ok(ready) => outcome.ready.push(ready - freed),
            Err(error) => outcome
                .problems
                .push(format!("after freeing space: {error:#}")),
        }
        // Syncs land again without a restart: every instance gets one acknowledged.
        let deadline = Instant::now() + DEADLINE;
        loop {
            let landed: Vec<Instant> = {
                let log = log.lock().await;
                (0..INSTANCES)
                    .filter_map(|index| {
                        log.acknowledged
                            .iter()
                            .filter(|(instance, at)| *instance == index && *at > freed)
                            .map(|(_, at)| *at)
                            .min()
                    })
                    .collect()
            };
            if landed.len() == INSTANCES {
                if let Some(first) = landed.iter().min() {
                    outcome.recovery.push(*first - freed);
                }
                break;
            }
            if Instant::now() > deadline {
                outcome.problems.push(format!(
                    "{} of {INSTANCES} instances synced within {DEADLINE:?} of freeing space",
                    landed.len()
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.store(true, Ordering::SeqCst);
        for task in load {
            task.await.context("a sync task panicked")?;
        }

        let log = std::mem::take(&mut *log.lock().await);
        for failure in &log.failures {
            // What the agent is told: retryable, and that the disk is full.
            if failure.kind == "aggregator_unavailable" && failure.message.contains("disk is full")
            {
                outcome.note("failed: disk full, said so");
            } else {
                outcome.problems.push(format!(
                    "a sync failed as {} instead of a full disk: {}",
                    failure.kind, failure.message
                ));
            }
        }
        let reader = StoreReader::connect(&self.database_url).await?;
        verify(&reader, &self.instances, &log.sent, &mut outcome).await?;
        reader.close().await;
        Ok(outcome)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        drop(self.aggregator.take());
        let _ = std::process::Command::new("umount")
            .arg(self.disk.path())
            .status();
    }
}

/// Writes `path` until the filesystem has no space left; returns the bytes written.
fn fill(path: &std::path::Path) -> Result<u64> {
    let mut file = std::fs::File::create(path).context("create the filler")?;
    let mut written = 0u64;
    // Large writes first, then small ones for the last pages.
    for chunk in [1 << 20, 4096] {
        let zeros = vec![0u8; chunk];
        loop {
            match file.write_all(&zeros) {
                Ok(()) => written += chunk as u64,
                Err(error) if error.kind() == std::io::ErrorKind::StorageFull => break,
                Err(error) => bail!("filling the disk failed otherwise: {error}"),
            }
        }
    }
    Ok(written)
}
