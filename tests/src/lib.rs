//! Harness for the end-to-end tests: builds the workspace's binaries once, starts them as real processes on
//! `127.0.0.1:0`, learns their ports from the JSON line each prints on stdout, and kills them on drop.

pub mod grpc;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The directory holding the binaries of the profile the tests were built with.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// A binary of the workspace. `cargo test --workspace` / `cargo nextest run --workspace` (what `scripts/test.sh`
/// runs) build them, because their packages have integration tests. Building them here instead would use another
/// feature set (dev-dependencies are not unified into plain builds) and rebuild half the graph on every run.
pub fn binary(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run the whole workspace's tests (./scripts/test.sh) or `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// A child process killed when dropped; its stderr goes to a log file kept for inspection.
pub struct Process {
    child: Child,
    pub log_path: PathBuf,
}

impl Process {
    /// Spawns the command and waits for its first stdout line, which must be JSON.
    pub fn spawn(mut command: Command, log_path: PathBuf) -> Result<(Self, Value)> {
        let log = std::fs::File::create(&log_path)?;
        command
            .stdout(Stdio::piped())
            .stderr(log)
            .stdin(Stdio::null());
        let mut child = command.spawn().context("spawn")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = sender.send(first);
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let process = Process { child, log_path };
        let line = match receiver.recv_timeout(Duration::from_secs(60)) {
            Ok(Some(Ok(line))) => line,
            _ => bail!(
                "process printed no ready line; its log:\n{}",
                std::fs::read_to_string(&process.log_path).unwrap_or_default()
            ),
        };
        let ready: Value =
            serde_json::from_str(&line).with_context(|| format!("ready line {line:?}"))?;
        Ok((process, ready))
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running aggregator with a SQLite database in a temporary directory.
pub struct Aggregator {
    pub dir: tempfile::TempDir,
    pub process: Option<Process>,
    pub grpc_url: String,
    pub http_url: String,
    env: Vec<(String, String)>,
}

impl Aggregator {
    pub fn database_url(dir: &Path) -> String {
        format!("sqlite://{}", dir.join("aggregator.db").display())
    }

    /// Runs an administration command against this aggregator's database; returns stdout trimmed.
    pub fn admin(&self, args: &[&str]) -> Result<String> {
        admin(self.dir.path(), args)
    }

    pub fn start() -> Result<Self> {
        Self::start_with_env(&[])
    }

    /// Starts with extra `LICENSE_SYNC_AGGREGATOR_*` settings, e.g. small limits.
    pub fn start_with_env(env: &[(&str, &str)]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut aggregator = Aggregator {
            dir,
            process: None,
            grpc_url: String::new(),
            http_url: String::new(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        aggregator.restart()?;
        Ok(aggregator)
    }

    /// Starts (again) the server on the same database.
    pub fn restart(&mut self) -> Result<()> {
        if let Some(mut old) = self.process.take() {
            old.kill();
        }
        let mut command = Command::new(binary("license-sync-aggregator"));
        command
            .arg("serve")
            .env(
                "LICENSE_SYNC_AGGREGATOR_DATABASE_URL",
                Self::database_url(self.dir.path()),
            )
            .env("LICENSE_SYNC_AGGREGATOR_GRPC_LISTEN", "127.0.0.1:0")
            .env("LICENSE_SYNC_AGGREGATOR_HTTP_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let log = self.dir.path().join(format!("aggregator-{}.log", now_ms()));
        let (process, ready) = Process::spawn(command, log)?;
        self.grpc_url = format!("http://{}", ready["grpc"].as_str().context("grpc address")?);
        self.http_url = format!("http://{}", ready["http"].as_str().context("http address")?);
        self.process = Some(process);
        Ok(())
    }

    pub fn log(&self) -> String {
        let mut all = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().ends_with(".log") {
                    all.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
                }
            }
        }
        all
    }
}

/// Runs `license-sync-aggregator <args>` on the database in `dir`.
pub fn admin(dir: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new(binary("license-sync-aggregator"))
        .args(args)
        .env(
            "LICENSE_SYNC_AGGREGATOR_DATABASE_URL",
            Aggregator::database_url(dir),
        )
        .output()?;
    if !output.status.success() {
        bail!(
            "license-sync-aggregator {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

/// A running GHES simulator.
pub struct GhesSim {
    pub process: Process,
    pub url: String,
}

impl GhesSim {
    pub fn start(csv: &Path, token: &str, pending_polls: u32, log_dir: &Path) -> Result<Self> {
        let mut command = Command::new(binary("ghes-sim"));
        command
            .args([
                "--listen",
                "127.0.0.1:0",
                "--username",
                "site-admin",
                "--token",
                token,
            ])
            .arg("--csv")
            .arg(csv)
            .args([
                "--pending-polls",
                &pending_polls.to_string(),
                "--version",
                "3.14.2",
            ]);
        let log = log_dir.join(format!("ghes-sim-{}.log", now_ms()));
        let (process, ready) = Process::spawn(command, log)?;
        let url = format!(
            "http://{}",
            ready["listening"].as_str().context("listening address")?
        );
        Ok(GhesSim { process, url })
    }
}

/// Runs `license-sync-agent <args>` and returns its output whatever the exit status.
pub fn agent(args: &[&str]) -> Result<Output> {
    Ok(Command::new(binary("license-sync-agent"))
        .args(args)
        .output()?)
}

/// The single JSON line an agent command prints on success.
pub fn agent_json(args: &[&str]) -> Result<Value> {
    let output = agent(args)?;
    if !output.status.success() {
        bail!(
            "license-sync-agent {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8(output.stdout)?;
    let line = stdout.lines().last().context("agent printed nothing")?;
    Ok(serde_json::from_str(line)?)
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

/// Polls `check` until it returns `Some` or the deadline passes.
pub fn eventually<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
