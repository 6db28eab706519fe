//! Harness for the end-to-end tests: starts the workspace's binaries as real processes on
//! `127.0.0.1:0`, learns their ports from the JSON line each prints on stdout, and kills them on drop.

pub mod grpc;
pub mod metrics;
pub mod otlp;
pub mod postgres;

use std::io::{BufRead, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The directory holding the binaries of the profile the tests (or the fault-trial tool) were built with.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // A test is target/<profile>/deps/<test>-<hash>; a binary of this crate is target/<profile>/<name>.
    let dir = exe
        .parent()
        .expect("executable lives in target/<profile>")
        .to_path_buf();
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent()
            .expect("test executable lives in target/<profile>/deps")
            .to_path_buf()
    } else {
        dir
    }
}

/// The `target/` directory the tests were built in (its profile directory's parent): where tests leave files for a
/// person to look at, such as the console's screenshots.
pub fn target_root() -> PathBuf {
    let dir = target_dir();
    dir.parent().map(Path::to_path_buf).unwrap_or(dir)
}

/// Reports a missing prerequisite (a browser, a database, a tool): prints `SKIPPED <test>: <reason>` so that the test
/// can return, or panics under `LICENSE_SYNC_REQUIRE_ALL_TESTS` (CI), where nothing may be skipped.
pub fn skip_unless_required(test: &str, reason: &str) {
    if std::env::var_os("LICENSE_SYNC_REQUIRE_ALL_TESTS").is_some() {
        panic!("LICENSE_SYNC_REQUIRE_ALL_TESTS is set but {test} cannot run: {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
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

/// A child process killed when dropped; its stderr goes to a log file kept for inspection, and its stdout (the
/// ready line and anything after it) to the same path with the extension `stdout`.
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
        let mut copy = std::fs::File::create(log_path.with_extension("stdout"))?;
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            if let Some(Ok(line)) = &first {
                let _ = writeln!(copy, "{line}");
            }
            let _ = sender.send(first);
            // Keep draining so the child never blocks on a full pipe; kept for tests that read all output.
            for line in lines.map_while(Result::ok) {
                let _ = writeln!(copy, "{line}");
            }
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

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits up to `timeout` for the exit; `None` if it did not exit (it is then killed).
    pub fn terminate(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .context("run kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM {} failed: {status}", self.child.id());
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                self.kill();
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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

    /// Starts (again) the server on the same database, on new ports.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn("127.0.0.1:0", "127.0.0.1:0")
    }

    /// Stops the server (SIGKILL) and keeps its database and addresses: agents see it as down.
    pub fn stop(&mut self) {
        if let Some(mut old) = self.process.take() {
            old.kill();
        }
    }

    /// Starts the server again on the gRPC and HTTP ports it had before, so that agents configured with its
    /// address find it again. The first start binds `127.0.0.1:0`; this one binds the ports it got then. Retries
    /// for a few seconds while the old ports are not free yet.
    pub fn restart_on_same_ports(&mut self) -> Result<()> {
        self.stop();
        let grpc = self.grpc_url.trim_start_matches("http://").to_owned();
        let http = self.http_url.trim_start_matches("http://").to_owned();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn(&grpc, &http) {
                Ok(()) => return Ok(()),
                Err(error) if Instant::now() < deadline => {
                    let _ = error;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(error) => return Err(error.context(format!("restart on {grpc} and {http}"))),
            }
        }
    }

    fn spawn(&mut self, grpc_listen: &str, http_listen: &str) -> Result<()> {
        let mut command = Command::new(binary("license-sync-aggregator"));
        command
            .arg("serve")
            .env(
                "LICENSE_SYNC_AGGREGATOR_DATABASE_URL",
                Self::database_url(self.dir.path()),
            )
            .env("LICENSE_SYNC_AGGREGATOR_GRPC_LISTEN", grpc_listen)
            .env("LICENSE_SYNC_AGGREGATOR_HTTP_LISTEN", http_listen)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let log = self.dir.path().join(format!("aggregator-{}.log", now_ms()));
        let (process, ready) = Process::spawn(command, log)?;
        self.grpc_url = format!("http://{}", ready["grpc"].as_str().context("grpc address")?);
        self.http_url = format!("http://{}", ready["http"].as_str().context("http address")?);
        self.process = Some(process);
        Ok(())
    }

    /// The gRPC address (`127.0.0.1:PORT`).
    pub fn grpc_addr(&self) -> Result<SocketAddr> {
        self.grpc_url
            .trim_start_matches("http://")
            .parse()
            .context("gRPC address")
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
    admin_with_url(&Aggregator::database_url(dir), args)
}

/// Runs `license-sync-aggregator <args>` on the database at `database_url`; returns stdout trimmed.
pub fn admin_with_url(database_url: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(binary("license-sync-aggregator"))
        .args(args)
        .env("LICENSE_SYNC_AGGREGATOR_DATABASE_URL", database_url)
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
    agent_with_env(args, &[])
}

/// Runs `license-sync-agent <args>` with extra environment variables (e.g. `RUST_LOG`, `OTEL_*`).
pub fn agent_with_env(args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
    Ok(Command::new(binary("license-sync-agent"))
        .args(args)
        .envs(env.iter().copied())
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

/// A TCP forwarder that counts connections: put between an agent and the aggregator, it shows how often the agent
/// really tried to reach the aggregator (every upload attempt and every control-stream reconnect opens a
/// connection).
pub struct TcpProxy {
    pub addr: SocketAddr,
    connections: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl TcpProxy {
    pub fn start(target: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopping) = (connections.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let Ok(upstream) = TcpStream::connect(target) else {
                    continue;
                };
                pipe(&client, &upstream);
                pipe(&upstream, &client);
            }
        });
        Ok(TcpProxy {
            addr,
            connections,
            stop,
        })
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

fn pipe(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    });
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Where a sidecar agent reads its users.
pub enum AgentSource {
    /// A local CSV with this content.
    Csv(String),
    /// The GHES simulator at this URL, with this site-admin token.
    Ghes { url: String, token: String },
}

/// How to run a sidecar agent (`license-sync-agent run`).
pub struct SidecarOptions {
    /// The aggregator's gRPC endpoint (`http://…`).
    pub endpoint: String,
    pub hostname: String,
    pub source: AgentSource,
    pub sync_interval_secs: u64,
    pub sync_jitter_secs: u64,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    pub shutdown_grace_secs: u64,
    /// Extra environment of the agent process, applied last (e.g. `RUST_LOG`, `OTEL_*`).
    pub env: Vec<(String, String)>,
}

impl SidecarOptions {
    /// Weekly schedule, fast retries: a sidecar whose only scheduled sync in a test is the one right after enabling.
    pub fn new(endpoint: &str, hostname: &str, csv: &str) -> Self {
        SidecarOptions {
            endpoint: endpoint.to_owned(),
            hostname: hostname.to_owned(),
            source: AgentSource::Csv(csv.to_owned()),
            sync_interval_secs: 604_800,
            sync_jitter_secs: 0,
            retry_initial_ms: 100,
            retry_max_ms: 500,
            shutdown_grace_secs: 5,
            env: Vec::new(),
        }
    }
}

/// A running `license-sync-agent run` with its own state directory, and a client of its local API.
pub struct SidecarAgent {
    pub dir: tempfile::TempDir,
    pub process: Option<Process>,
    /// `http://127.0.0.1:PORT` of its local API.
    pub api: String,
    pub server_id: String,
    pub hostname: String,
    pub config: PathBuf,
    owner_token: String,
    env: Vec<(String, String)>,
    http: reqwest::blocking::Client,
}

impl SidecarAgent {
    /// Writes the configuration (a new server id, a CSV or GHES source, `[agent]` with a state directory and an
    /// owner token file) and starts the agent.
    pub fn start(options: SidecarOptions) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let server_id = uuid::Uuid::new_v4().to_string();
        let owner_token = format!("owner-{}", uuid::Uuid::new_v4().simple());
        std::fs::write(dir.path().join("owner-token"), &owner_token)?;
        let source = match &options.source {
            AgentSource::Csv(csv) => {
                std::fs::write(dir.path().join("users.csv"), csv)?;
                "kind = \"file\"\npath = \"users.csv\"\n".to_owned()
            }
            AgentSource::Ghes { url, token } => format!(
                "kind = \"ghes\"\nurl = {url:?}\nusername = \"site-admin\"\ntoken = {token:?}\n\
                 poll_initial_ms = 200\npoll_max_ms = 200\nreport_deadline_secs = 30\n"
            ),
        };
        let config = format!(
            "[instance]\nserver_id = {server_id:?}\nhostname = {:?}\nghes_version = \"3.14.2\"\n\n[source]\n{source}\n\
             [aggregator]\nendpoint = {:?}\ntimeout_secs = 10\nbatch_size = 2\n\n\
             [agent]\nstate_dir = \"state\"\nlisten = \"127.0.0.1:0\"\nowner_token_file = \"owner-token\"\n\
             sync_interval_secs = {}\nsync_jitter_secs = {}\nretry_initial_ms = {}\nretry_max_ms = {}\n\
             shutdown_grace_secs = {}\n",
            options.hostname,
            options.endpoint,
            options.sync_interval_secs,
            options.sync_jitter_secs,
            options.retry_initial_ms,
            options.retry_max_ms,
            options.shutdown_grace_secs,
        );
        let config_path = dir.path().join("agent.toml");
        std::fs::write(&config_path, config)?;
        let mut agent = SidecarAgent {
            dir,
            process: None,
            api: String::new(),
            server_id,
            hostname: options.hostname,
            config: config_path,
            owner_token,
            env: options.env,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
        };
        agent.restart()?;
        Ok(agent)
    }

    /// Starts the agent (again) on the same state directory; its API gets a new port.
    pub fn restart(&mut self) -> Result<()> {
        if let Some(mut old) = self.process.take() {
            old.kill();
        }
        let mut command = Command::new(binary("license-sync-agent"));
        command
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info,license_sync_agent=debug")
            .env_remove("LICENSE_SYNC_LOG_FORMAT")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let log = self.dir.path().join(format!("agent-{}.log", now_ms()));
        let (process, ready) = Process::spawn(command, log)?;
        self.api = format!(
            "http://{}",
            ready["listening"].as_str().context("listening address")?
        );
        self.process = Some(process);
        Ok(())
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn owner_token(&self) -> &str {
        &self.owner_token
    }

    /// Snapshot files in `state/<sub>` (`pending` or `failed`), without temporaries and reasons.
    pub fn snapshot_files(&self, sub: &str) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.state_dir().join(sub))
            .map(|entries| {
                entries
                    .flatten()
                    .map(|entry| entry.path())
                    .filter(|path| {
                        let name = path
                            .file_name()
                            .map(|name| name.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        !name.starts_with('.')
                            && name.ends_with(".json")
                            && !name.ends_with(".reason.json")
                    })
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }

    /// A request to the local API; the owner token is sent when `owner` is true. Returns the status and the body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        owner: bool,
        body: Option<&Value>,
    ) -> Result<(u16, Value)> {
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut request = self.http.request(method, format!("{}{path}", self.api));
        if owner {
            request = request.bearer_auth(&self.owner_token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send()?;
        let status = response.status().as_u16();
        let text = response.text()?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// GET that must answer 200.
    pub fn get(&self, path: &str) -> Result<Value> {
        let (status, body) = self.request("GET", path, false, None)?;
        if status != 200 {
            bail!("GET {path} answered {status}: {body}");
        }
        Ok(body)
    }

    pub fn status(&self) -> Result<Value> {
        self.get("/api/v1/status")
    }

    /// Connects the agent with an enrollment token through its local API.
    pub fn connect(&self, enrollment_token: &str) -> Result<Value> {
        let (status, body) = self.request(
            "POST",
            "/api/v1/connection",
            true,
            Some(&serde_json::json!({"enrollment_token": enrollment_token})),
        )?;
        if status != 200 {
            bail!("connecting answered {status}: {body}");
        }
        Ok(body)
    }

    pub fn set_enabled(&self, enabled: bool) -> Result<(u16, Value)> {
        self.request(
            "PUT",
            "/api/v1/settings",
            true,
            Some(&serde_json::json!({"license_sync_enabled": enabled})),
        )
    }

    pub fn sync_now(&self) -> Result<(u16, Value)> {
        self.request("POST", "/api/v1/sync-now", true, None)
    }

    /// Polls the status until `done` holds, for at most `timeout`.
    pub fn wait_status(&self, timeout: Duration, done: impl Fn(&Value) -> bool) -> Result<Value> {
        let mut last = Value::Null;
        let found = eventually(timeout, || {
            last = self.status().ok()?;
            done(&last).then(|| last.clone())
        });
        found.with_context(|| {
            format!("the agent's status did not get there in {timeout:?}: {last:#}")
        })
    }

    /// Polls a job until `done` holds, for at most `timeout`.
    pub fn wait_job(
        &self,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let mut last = Value::Null;
        let found = eventually(timeout, || {
            last = self.get(&format!("/api/v1/jobs/{id}")).ok()?;
            done(&last).then(|| last.clone())
        });
        found.with_context(|| format!("job {id} did not get there in {timeout:?}: {last:#}"))
    }

    /// Runs a CLI command of the agent against this agent's API, with the owner token in the environment.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(binary("license-sync-agent"))
            .args(args)
            .args(["--api", &self.api])
            .env("LICENSE_SYNC_AGENT_OWNER_TOKEN", &self.owner_token)
            .output()?)
    }

    /// All of the agent's logs so far.
    pub fn log(&self) -> String {
        let mut all = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            let mut paths: Vec<PathBuf> = entries
                .flatten()
                .map(|entry| entry.path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
                .collect();
            paths.sort();
            for path in paths {
                all.push_str(&std::fs::read_to_string(path).unwrap_or_default());
            }
        }
        all
    }
}
