//! `agent-kill`: the sidecar agent (`license-sync-agent run`, CSV source) gets SIGKILL while it writes a new
//! snapshot into its delivery spool (`state/pending/`, even trials) or at a random point of the send (odd trials).
//! No spool file may be corrupt, the restarted agent must deliver the pending snapshot, the aggregator must end with
//! the snapshot of the current CSV applied exactly once. Recovery: restart → the aggregator holds that snapshot.
//!
//! The sidecar harness talks to the agent's local API with a blocking HTTP client, so this kind runs on the main
//! thread, with a runtime of its own only for reading the store.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use license_sync_agent::fsutil::is_temporary;
use license_sync_core::all_users_csv::read_all_users_csv;
use license_sync_core::snapshot::UsageFile;
use license_sync_e2e::{Aggregator, SidecarAgent, SidecarOptions};
use rand::Rng;
use uuid::Uuid;

use crate::common::{StoreReader, TrialOutcome, hex_digest};

const DEADLINE: Duration = Duration::from_secs(60);
/// The span of the random kill point once the snapshot is being sent: about the time a send of these sizes takes.
const SEND_WINDOW_MS: u64 = 1500;

pub struct Setup {
    // The agent first: dropped (killed) before the aggregator it talks to.
    agent: SidecarAgent,
    _aggregator: Aggregator,
    database_url: String,
    server_id: Uuid,
    runtime: tokio::runtime::Runtime,
}

/// Where the kill landed, from what the state directory and the store show right after it.
enum Landed {
    BeforeSpool,
    SpoolWrite,
    Send,
    AfterDelivery,
}

impl Landed {
    fn as_str(&self) -> &'static str {
        match self {
            Landed::BeforeSpool => "before the spool write",
            Landed::SpoolWrite => "during the spool write",
            Landed::Send => "during the send",
            Landed::AfterDelivery => "after the delivery",
        }
    }
}

impl Setup {
    pub fn start() -> Result<Setup> {
        let aggregator = Aggregator::start()?;
        let database_url = Aggregator::database_url(aggregator.dir.path());
        aggregator.admin(&["enterprise", "create", "--slug", "acme", "--seats", "100"])?;
        let enrollment =
            aggregator.admin(&["enrollment-token", "create", "--enterprise", "acme"])?;
        let agent = SidecarAgent::start(SidecarOptions::new(
            &aggregator.grpc_url,
            "ghes-agent.fault.test",
            &csv(0, 3),
        ))?;
        agent.connect(&enrollment)?;
        let (status, body) = agent.set_enabled(true)?;
        if status != 200 {
            bail!("enabling the agent answered {status}: {body}");
        }
        agent.wait_status(DEADLINE, |status| {
            status["current_job"].is_null() && status["last_sync"]["result"] == "committed"
        })?;
        let server_id = Uuid::parse_str(&agent.server_id)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Setup {
            agent,
            _aggregator: aggregator,
            database_url,
            server_id,
            runtime,
        })
    }

    pub fn trial(&mut self, trial: usize, rng: &mut impl Rng) -> Result<TrialOutcome> {
        let users = rng.random_range(5_000..=30_000);
        let kill_in_send = trial % 2 == 1;
        let send_delay = Duration::from_millis(rng.random_range(0..=SEND_WINDOW_MS));
        let content = csv(trial + 1, users);
        let expected = hex_digest(&read_all_users_csv(content.as_bytes())?.users);
        std::fs::write(self.agent.dir.path().join("users.csv"), &content)?;
        let pending = self.agent.state_dir().join("pending");

        let (status, body) = self.agent.sync_now()?;
        if status != 202 {
            bail!("sync now answered {status}: {body}");
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            let (temporaries, snapshots) = spool(&pending)?;
            if kill_in_send {
                if snapshots > 0 {
                    // The random point of the kill within the send.
                    std::thread::sleep(send_delay);
                    break;
                }
            } else if temporaries > 0 || snapshots > 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!("the sync wrote no snapshot into the spool within {DEADLINE:?}");
            }
            // Tight: the spool write lasts tens of milliseconds.
            std::thread::sleep(Duration::from_millis(1));
        }
        self.agent.kill();

        let mut outcome = TrialOutcome::default();
        let (temporaries, snapshots) = spool(&pending)?;
        for path in self.agent.snapshot_files("pending") {
            let bytes = std::fs::read(&path)?;
            match UsageFile::from_json(&bytes).map(UsageFile::into_snapshot) {
                Ok(Ok(snapshot)) if hex_digest(&snapshot.users) == expected => {}
                Ok(Ok(snapshot)) => {
                    outcome.torn += 1;
                    outcome.details.push(format!(
                        "the spooled snapshot holds {} users that are not the CSV's {users} (torn)",
                        snapshot.users.len()
                    ));
                }
                Ok(Err(error)) => outcome
                    .problems
                    .push(format!("a corrupt spool file {}: {error}", path.display())),
                Err(error) => outcome
                    .problems
                    .push(format!("a corrupt spool file {}: {error}", path.display())),
            }
        }
        let delivered = self.applied_times(&expected)? > 0;
        let landed = match (temporaries, snapshots, delivered) {
            (_, 0, true) => Landed::AfterDelivery,
            (0, 0, false) => Landed::BeforeSpool,
            (_, 0, false) => Landed::SpoolWrite,
            _ => Landed::Send,
        };
        outcome.note(format!("killed {}", landed.as_str()));

        let restarted = Instant::now();
        self.agent.restart()?;
        if snapshots > 0 {
            // The pending snapshot is delivered after the restart, without being asked.
            self.agent.wait_status(DEADLINE, |status| {
                status["pending_deliveries"] == 0 && status["current_job"].is_null()
            })?;
        }
        if self.applied_times(&expected)? == 0 {
            if snapshots > 0 {
                outcome.lost += 1;
                outcome
                    .details
                    .push("the pending snapshot was not applied after the restart (lost)".into());
            }
            // Killed before the snapshot was durable: the job is gone, a new sync reads the CSV again.
            let (status, body) = self.agent.sync_now()?;
            if status != 202 {
                bail!("sync now after the restart answered {status}: {body}");
            }
        }
        let deadline = Instant::now() + DEADLINE;
        while self.applied_times(&expected)? == 0 {
            if Instant::now() > deadline {
                bail!(
                    "the aggregator did not get the CSV's snapshot within {DEADLINE:?} of the restart"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        outcome.recovery.push(restarted.elapsed());
        self.agent.wait_status(DEADLINE, |status| {
            status["pending_deliveries"] == 0 && status["current_job"].is_null()
        })?;

        let applied = self.applied_times(&expected)?;
        if applied != 1 {
            outcome
                .problems
                .push(format!("the snapshot was applied {applied} times"));
        }
        let stored = self.runtime.block_on(async {
            let reader = StoreReader::connect(&self.database_url).await?;
            let stored = reader.stored().await;
            reader.close().await;
            stored
        })?;
        match stored.get(&self.server_id) {
            Some(stored) if stored.digest == expected && stored.users == users => {}
            other => {
                outcome.torn += 1;
                outcome.details.push(format!(
                    "the aggregator holds {:?} users, not the CSV's {users} (torn)",
                    other.map(|stored| stored.users)
                ));
            }
        }
        let (temporaries, _) = spool(&pending)?;
        if temporaries > 0 {
            outcome
                .problems
                .push("an interrupted spool write was left behind after the restart".into());
        }
        if !self.agent.snapshot_files("failed").is_empty() {
            outcome
                .problems
                .push("a snapshot was moved to failed/".into());
        }
        Ok(outcome)
    }

    /// How many applied syncs of this instance carry `digest`.
    fn applied_times(&self, digest: &str) -> Result<usize> {
        self.runtime.block_on(async {
            let reader = StoreReader::connect(&self.database_url).await?;
            let applied = reader.applied().await;
            reader.close().await;
            Ok(applied?.values().filter(|sha| *sha == digest).count())
        })
    }
}

/// `users` accounts whose logins and emails carry the trial number, so that each trial's snapshot is new.
fn csv(trial: usize, users: usize) -> String {
    let mut csv = String::from("id,login,email,suspended?\n");
    for id in 1..=users {
        csv.push_str(&format!(
            "{id},t{trial}-user{id},t{trial}-user{id}@agent.fault.test,{}\n",
            id % 7 == 0
        ));
    }
    csv
}

/// Temporary files (writes in progress) and snapshot files in the spool.
fn spool(pending: &Path) -> Result<(usize, usize)> {
    let mut temporaries = 0;
    let mut snapshots = 0;
    let entries = match std::fs::read_dir(pending) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(error) => return Err(error).context("list the spool"),
    };
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if is_temporary(&name) {
            temporaries += 1;
        } else if name.ends_with(".json") && !name.ends_with(".reason.json") {
            snapshots += 1;
        }
    }
    Ok((temporaries, snapshots))
}
