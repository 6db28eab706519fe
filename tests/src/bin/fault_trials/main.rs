//! `license-sync-fault-trials`: crash and storage-fault trials against the real binaries (`scripts/fault-trials.sh`).
//!
//! Each kind starts the real aggregator (and agent) processes on `127.0.0.1:0`, drives syncs through the agent's own
//! upload client or the sidecar, injects its fault at a random point, and then reads the store directly to check the
//! two promises that matter: no instance holds anything but exactly one snapshot that was sent (else *torn*), and
//! every snapshot the aggregator acknowledged is stored or superseded by a newer one (else *lost*). Per kind it
//! prints trials, torn, lost, other violations and recovery times, and it exits non-zero when anything was torn,
//! lost or violated. The seed fixes every random choice (sizes, kill points) so that a failing run can be replayed;
//! the timing of the processes is of course not replayed.

mod agent_kill;
mod aggregator_kill;
mod common;
mod disk_full;
mod pg_terminate;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use common::{Backend, TrialOutcome};

/// Crash and storage-fault trials of license-sync (see README, "Fault trials").
#[derive(Parser)]
struct Args {
    /// Trials per kind (and per backend for `aggregator-kill`).
    #[arg(long, default_value_t = 3)]
    trials: usize,
    /// Kinds to run, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "aggregator-kill,agent-kill,pg-terminate,disk-full"
    )]
    kinds: Vec<Kind>,
    /// Seed of every random choice; printed at the start so that a failing run can be replayed.
    #[arg(long)]
    seed: Option<u64>,
    /// PostgreSQL server for the PostgreSQL trials; each trial creates (and drops) a database of its own next to
    /// the one named here.
    #[arg(
        long,
        env = "LICENSE_SYNC_TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres_url: String,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    /// kill -9 of the aggregator during 20 concurrent syncs, on SQLite and on PostgreSQL.
    AggregatorKill,
    /// kill -9 of the sidecar agent during the spool write and during the send.
    AgentKill,
    /// pg_terminate_backend of the aggregator's PostgreSQL connections mid-ingest.
    PgTerminate,
    /// SQLite on a small filesystem filled during syncs, then freed.
    DiskFull,
}

/// The figures of one kind (and backend).
struct Summary {
    name: String,
    trials: usize,
    torn: usize,
    lost: usize,
    /// Other broken promises (a misreported error, a corrupt spool file, a sync applied twice, a trial that could
    /// not finish); `problems` describes them and each torn or lost snapshot.
    violations: usize,
    recovery: Vec<Duration>,
    ready: Vec<Duration>,
    problems: Vec<String>,
    notes: std::collections::BTreeMap<String, usize>,
}

impl Summary {
    fn new(name: &str) -> Self {
        Summary {
            name: name.to_owned(),
            trials: 0,
            torn: 0,
            lost: 0,
            violations: 0,
            recovery: Vec::new(),
            ready: Vec::new(),
            problems: Vec::new(),
            notes: Default::default(),
        }
    }

    fn add(&mut self, trial: usize, outcome: anyhow::Result<TrialOutcome>) {
        self.trials += 1;
        match outcome {
            Ok(outcome) => {
                self.torn += outcome.torn;
                self.lost += outcome.lost;
                self.violations += outcome.problems.len();
                for detail in outcome.details {
                    self.problems.push(format!("trial {trial}: {detail}"));
                }
                self.recovery.extend(outcome.recovery);
                self.ready.extend(outcome.ready);
                for problem in outcome.problems {
                    self.problems.push(format!("trial {trial}: {problem}"));
                }
                for (note, count) in outcome.notes {
                    *self.notes.entry(note).or_default() += count;
                }
            }
            Err(error) => {
                self.violations += 1;
                self.problems
                    .push(format!("trial {trial}: could not finish: {error:#}"));
            }
        }
    }

    fn failed(&self) -> bool {
        self.torn + self.lost + self.violations > 0
    }
}

/// `min / median / max` in milliseconds, or `-` without any.
fn spread(times: &[Duration]) -> String {
    let mut times = times.to_vec();
    times.sort();
    match (times.first(), times.last()) {
        (Some(min), Some(max)) => format!(
            "{} / {} / {}",
            min.as_millis(),
            times[times.len() / 2].as_millis(),
            max.as_millis()
        ),
        _ => "-".to_owned(),
    }
}

/// Set in the tool's own run inside a user and mount namespace.
const IN_NAMESPACE: &str = "LICENSE_SYNC_FAULT_TRIALS_IN_NAMESPACE";

fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos() as u64)
            .unwrap_or_default()
    });
    // `disk-full` mounts a small tmpfs. Unprivileged, that needs a mount namespace, and the namespace must hold
    // the whole run: SQLite resolves `/proc/PID/root` paths to the outside's files, so neither the admin CLI nor
    // the store reads could reach a mount made only in the aggregator's namespace.
    if args.kinds.contains(&Kind::DiskFull) && std::env::var_os(IN_NAMESPACE).is_none() {
        return run_in_namespace(seed);
    }
    println!(
        "fault trials: seed {seed} (replay with --seed {seed}), {} trials per kind",
        args.trials
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let mut summaries = Vec::new();
    for kind in &args.kinds {
        // One stream of random choices per kind: running fewer kinds does not change a kind's trials.
        let kind_seed = seed.wrapping_add(*kind as u64);
        let mut rng = ChaCha8Rng::seed_from_u64(kind_seed);
        match kind {
            Kind::AggregatorKill => {
                for backend in [Backend::Sqlite, Backend::Postgres] {
                    let mut summary =
                        Summary::new(&format!("aggregator-kill ({})", backend.as_str()));
                    for trial in 0..args.trials {
                        let outcome = runtime.block_on(aggregator_kill::trial(
                            backend,
                            &args.postgres_url,
                            &mut rng,
                        ));
                        progress(&summary.name, trial, &outcome);
                        summary.add(trial, outcome);
                    }
                    summaries.push(summary);
                }
            }
            Kind::AgentKill => {
                let mut summary = Summary::new("agent-kill");
                // Blocking HTTP to the agent: not inside the runtime.
                match agent_kill::Setup::start() {
                    Ok(mut setup) => {
                        for trial in 0..args.trials {
                            let outcome = setup.trial(trial, &mut rng);
                            progress(&summary.name, trial, &outcome);
                            summary.add(trial, outcome);
                        }
                    }
                    Err(error) => summary.add(0, Err(error.context("set up the agent"))),
                }
                summaries.push(summary);
            }
            Kind::PgTerminate => {
                let mut summary = Summary::new("pg-terminate");
                for trial in 0..args.trials {
                    let outcome =
                        runtime.block_on(pg_terminate::trial(&args.postgres_url, &mut rng));
                    progress(&summary.name, trial, &outcome);
                    summary.add(trial, outcome);
                }
                summaries.push(summary);
            }
            Kind::DiskFull => {
                let mut summary = Summary::new("disk-full");
                match runtime.block_on(disk_full::Setup::start()) {
                    Ok(setup) => {
                        for trial in 0..args.trials {
                            let outcome = runtime.block_on(setup.trial(&mut rng));
                            progress(&summary.name, trial, &outcome);
                            summary.add(trial, outcome);
                        }
                    }
                    Err(error) => summary.add(0, Err(error.context("set up the small disk"))),
                }
                summaries.push(summary);
            }
        }
    }

    println!();
    println!(
        "{:<28} {:>6} {:>5} {:>5} {:>10}  {:<22} ready ms (min / median / max)",
        "kind", "trials", "torn", "lost", "violations", "recovery ms"
    );
    for summary in &summaries {
        println!(
            "{:<28} {:>6} {:>5} {:>5} {:>10}  {:<22} {}",
            summary.name,
            summary.trials,
            summary.torn,
            summary.lost,
            summary.violations,
            spread(&summary.recovery),
            spread(&summary.ready)
        );
        if !summary.notes.is_empty() {
            let notes: Vec<String> = summary
                .notes
                .iter()
                .map(|(note, count)| format!("{note} {count}"))
                .collect();
            println!("    {}", notes.join(", "));
        }
        for problem in &summary.problems {
            println!("    PROBLEM {problem}");
        }
    }
    let failed = summaries.iter().any(Summary::failed);
    println!(
        "{} in {:.0} s (seed {seed})",
        if failed { "FAILED" } else { "passed" },
        started.elapsed().as_secs_f64()
    );
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs this tool again with the same arguments (and the seed fixed) under `unshare --user --map-root-user
/// --mount`: root of its own namespace, able to mount, with the same network and files.
fn run_in_namespace(seed: u64) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(error) => {
            eprintln!("cannot find this program's path: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut arguments: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if !arguments
        .iter()
        .any(|argument| argument.to_string_lossy().starts_with("--seed"))
    {
        arguments.extend(["--seed".into(), seed.to_string().into()]);
    }
    let status = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "--"])
        .arg(exe)
        .args(arguments)
        .env(IN_NAMESPACE, "1")
        .status();
    match status {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("the fault trials failed ({status})");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!(
                "cannot run `unshare` (util-linux) for the disk-full trials' namespace: {error}; leave out \
                 disk-full with --kinds"
            );
            ExitCode::FAILURE
        }
    }
}

/// One line per trial on stderr, so that a long run shows where it is.
fn progress(name: &str, trial: usize, outcome: &anyhow::Result<TrialOutcome>) {
    match outcome {
        Ok(outcome) => eprintln!(
            "{name} trial {trial}: torn {} lost {} problems {} recovery {:?}",
            outcome.torn,
            outcome.lost,
            outcome.problems.len(),
            outcome.recovery
        ),
        Err(error) => eprintln!("{name} trial {trial}: could not finish: {error:#}"),
    }
}
