//! The sidecar (`run`) in process, against a small fake aggregator that serves the three gRPC services the agent
//! uses (`Enrollment`, `AgentControl`, `SnapshotIngest`) and records every call. The fake can be stopped and started
//! again on the same port, made slow, or made to refuse, so that each delivery rule is checked exactly. The same
//! behaviours are tested against the real aggregator in `tests/tests/it/sidecar.rs` (end to end).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use futures::StreamExt as _;
use license_sync_agent::config::{AggregatorConfig, SidecarConfig};
use license_sync_agent::sidecar::{self, RunningAgent};
use license_sync_proto::v1::agent_control_server::{AgentControl, AgentControlServer};
use license_sync_proto::v1::enrollment_server::{Enrollment, EnrollmentServer};
use license_sync_proto::v1::snapshot_chunk::Chunk;
use license_sync_proto::v1::snapshot_ingest_server::{SnapshotIngest, SnapshotIngestServer};
use license_sync_proto::v1::{
    AgentMessage, CheckConnectionRequest, CheckConnectionResponse, ControlMessage, ControlWelcome,
    EnrollRequest, EnrollResponse, SnapshotChunk, SyncAck, SyncNowRequest, SyncReceipt,
    agent_message, control_message,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

const ENROLLMENT_TOKEN: &str = "lse_test_enrollment_token";

/// What the fake aggregator saw and how it behaves.
#[derive(Default)]
struct Fake {
    valid_tokens: HashSet<String>,
    valid_credentials: HashSet<String>,
    /// Sync ids applied, in order.
    applied: Vec<String>,
    upload_attempts: u32,
    unauthenticated_uploads: u32,
    duplicates: u32,
    control_opens: u32,
    unauthenticated_control: u32,
    checks: u32,
    heartbeats: Vec<(bool, u32)>,
    acks: Vec<SyncAck>,
    sessions: Vec<mpsc::Sender<Result<ControlMessage, tonic::Status>>>,
    upload_delay: Duration,
    issued: u32,
}

#[derive(Clone)]
struct FakeService(Arc<Mutex<Fake>>);

impl FakeService {
    fn lock(&self) -> std::sync::MutexGuard<'_, Fake> {
        self.0.lock().expect("fake state")
    }

    fn authenticate<T>(&self, request: &tonic::Request<T>) -> Result<(), tonic::Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_default()
            .to_owned();
        if self.lock().valid_credentials.contains(&presented) {
            Ok(())
        } else {
            Err(tonic::Status::unauthenticated(
                "unknown instance credential",
            ))
        }
    }
}

#[tonic::async_trait]
impl Enrollment for FakeService {
    async fn enroll(
        &self,
        request: tonic::Request<EnrollRequest>,
    ) -> Result<tonic::Response<EnrollResponse>, tonic::Status> {
        let request = request.into_inner();
        let mut fake = self.lock();
        if !fake.valid_tokens.remove(&request.enrollment_token) {
            return Err(tonic::Status::unauthenticated(
                "unknown, used or expired enrollment token",
            ));
        }
        fake.issued += 1;
        let credential = format!("lsi_fake_{}", fake.issued);
        // Re-enrolling rotates: only the newest credential works.
        fake.valid_credentials.clear();
        fake.valid_credentials.insert(credential.clone());
        Ok(tonic::Response::new(EnrollResponse {
            credential,
            enterprise: "acme".into(),
            server_id: request.server_id,
            usage_file_recipient: String::new(),
        }))
    }

    async fn check_connection(
        &self,
        request: tonic::Request<CheckConnectionRequest>,
    ) -> Result<tonic::Response<CheckConnectionResponse>, tonic::Status> {
        self.lock().checks += 1;
        self.authenticate(&request)?;
        Ok(tonic::Response::new(CheckConnectionResponse {
            enterprise: "acme".into(),
            server_id: SERVER_ID.to_string(),
            hostname: "ghes-1.example.com".into(),
            server_time: None,
        }))
    }
}

#[tonic::async_trait]
impl AgentControl for FakeService {
    type OpenSessionStream = ReceiverStream<Result<ControlMessage, tonic::Status>>;

    async fn open_session(
        &self,
        request: tonic::Request<tonic::Streaming<AgentMessage>>,
    ) -> Result<tonic::Response<Self::OpenSessionStream>, tonic::Status> {
        self.lock().control_opens += 1;
        if let Err(status) = self.authenticate(&request) {
            self.lock().unauthenticated_control += 1;
            return Err(status);
        }
        let (sender, receiver) = mpsc::channel(16);
        let _ = sender
            .send(Ok(ControlMessage {
                message: Some(control_message::Message::Welcome(ControlWelcome {
                    heartbeat_interval_secs: 1,
                })),
            }))
            .await;
        self.lock().sessions.push(sender);
        let mut inbound = request.into_inner();
        let service = self.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = inbound.next().await {
                match message.message {
                    Some(agent_message::Message::Heartbeat(beat)) => service
                        .lock()
                        .heartbeats
                        .push((beat.sync_enabled, beat.pending_deliveries)),
                    Some(agent_message::Message::SyncAck(ack)) => service.lock().acks.push(ack),
                    _ => {}
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(receiver)))
    }
}

#[tonic::async_trait]
impl SnapshotIngest for FakeService {
    async fn upload_snapshot(
        &self,
        request: tonic::Request<tonic::Streaming<SnapshotChunk>>,
    ) -> Result<tonic::Response<SyncReceipt>, tonic::Status> {
        self.lock().upload_attempts += 1;
        if let Err(status) = self.authenticate(&request) {
            self.lock().unauthenticated_uploads += 1;
            return Err(status);
        }
        let mut stream = request.into_inner();
        let mut header = None;
        let mut users = 0u64;
        let mut complete = false;
        while let Some(chunk) = stream.next().await {
            match chunk?.chunk {
                Some(Chunk::Header(h)) => header = Some(h),
                Some(Chunk::Users(batch)) => users += batch.users.len() as u64,
                Some(Chunk::Trailer(_)) => complete = true,
                None => {}
            }
        }
        let header = header.ok_or_else(|| tonic::Status::invalid_argument("no header"))?;
        if !complete {
            return Err(tonic::Status::invalid_argument("no trailer"));
        }
        let delay = self.lock().upload_delay;
        tokio::time::sleep(delay).await;
        let mut fake = self.lock();
        let duplicate = fake.applied.contains(&header.sync_id);
        if duplicate {
            fake.duplicates += 1;
        } else {
            fake.applied.push(header.sync_id.clone());
        }
        Ok(tonic::Response::new(SyncReceipt {
            sync_id: header.sync_id,
            server_id: header.server_id,
            users_accepted: users,
            committed_at: None,
            duplicate,
        }))
    }
}

/// The fake aggregator's server; stop and start it again on the same port.
struct FakeAggregator {
    service: FakeService,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl FakeAggregator {
    async fn start() -> Self {
        let service = FakeService(Arc::new(Mutex::new(Fake::default())));
        service
            .lock()
            .valid_tokens
            .insert(ENROLLMENT_TOKEN.to_owned());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut fake = FakeAggregator {
            service,
            addr,
            stop: None,
        };
        fake.serve(listener);
        fake
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let (stop, stopped) = oneshot::channel::<()>();
        let service = self.service.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(EnrollmentServer::new(service.clone()))
                .add_service(AgentControlServer::new(service.clone()))
                .add_service(SnapshotIngestServer::new(service))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                }),
        );
        self.stop = Some(stop);
    }

    /// Stops serving: the port refuses connections and open control sessions end.
    async fn stop(&mut self) {
        self.service.lock().sessions.clear();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Wait until the port refuses connections.
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(self.addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the fake aggregator did not stop");
    }

    async fn restart(&mut self) {
        let mut bound = None;
        for _ in 0..100 {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(listener) => {
                    bound = Some(listener);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let listener = bound.expect("rebind the same port");
        self.serve(listener);
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Fake> {
        self.service.lock()
    }

    /// Sends a sync-now request on every open control session.
    async fn request_sync(&self, request_id: &str) -> usize {
        let sessions = self.state().sessions.clone();
        let mut sent = 0;
        for session in sessions {
            let message = ControlMessage {
                message: Some(control_message::Message::SyncNow(SyncNowRequest {
                    request_id: request_id.to_owned(),
                    requested_at: None,
                })),
            };
            if session.send(Ok(message)).await.is_ok() {
                sent += 1;
            }
        }
        sent
    }
}

struct Agent {
    running: Option<RunningAgent>,
    base: String,
    http: reqwest::Client,
    state_dir: tempfile::TempDir,
    _data: tempfile::TempDir,
}

impl Agent {
    async fn start(fake: &FakeAggregator) -> Agent {
        Self::start_with(fake, |_| {}).await
    }

    async fn start_with(
        fake: &FakeAggregator,
        configure: impl FnOnce(&mut SidecarConfig),
    ) -> Agent {
        let state_dir = tempfile::tempdir().expect("state dir");
        let data = tempfile::tempdir().expect("data dir");
        let csv = data.path().join("all_users.csv");
        std::fs::copy(fixture_csv(), &csv).expect("copy fixture");
        let mut sidecar = sidecar_config(state_dir.path());
        configure(&mut sidecar);
        let mut agent = Agent {
            running: None,
            base: String::new(),
            http: reqwest::Client::new(),
            state_dir,
            _data: data,
        };
        agent.launch(fake, csv, sidecar).await;
        agent
    }

    async fn launch(
        &mut self,
        fake: &FakeAggregator,
        csv: std::path::PathBuf,
        sidecar: SidecarConfig,
    ) {
        let mut config = file_config(csv);
        config.instance.ghes_version = Some("3.14.2".into());
        config.aggregator = Some(AggregatorConfig {
            credential: None,
            ..aggregator_config(&fake.endpoint(), 2)
        });
        config.agent = Some(sidecar);
        config.validate().expect("valid config");
        let running = sidecar::start(config).await.expect("agent starts");
        self.base = format!("http://{}", running.local_addr());
        self.running = Some(running);
    }

    async fn restart(&mut self, fake: &FakeAggregator) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
        let csv = self._data.path().join("all_users.csv");
        let sidecar = sidecar_config(self.state_dir.path());
        self.launch(fake, csv, sidecar).await;
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        owner: bool,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if owner {
            request = request.bearer_auth(OWNER);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.request(reqwest::Method::GET, path, false, None).await;
        assert_eq!(status, 200, "{path}: {body}");
        body
    }

    async fn enroll(&self) {
        let (status, body) = self
            .request(
                reqwest::Method::POST,
                "/api/v1/connection",
                true,
                Some(json!({"enrollment_token": ENROLLMENT_TOKEN})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["connection"]["connected"], true, "{body}");
    }

    async fn set_enabled(&self, enabled: bool) -> (u16, Value) {
        self.request(
            reqwest::Method::PUT,
            "/api/v1/settings",
            true,
            Some(json!({"license_sync_enabled": enabled})),
        )
        .await
    }

    /// Enables license sync and waits for the first scheduled sync (slot 0, due at once without jitter) to commit,
    /// so that the test starts from a quiet agent.
    async fn enable_and_settle(&self) {
        let (status, body) = self.set_enabled(true).await;
        assert_eq!(status, 200, "{body}");
        self.wait_status(|status| {
            status["current_job"].is_null() && status["last_sync"]["result"] == "committed"
        })
        .await;
    }

    async fn sync_now(&self) -> (u16, Value) {
        self.request(reqwest::Method::POST, "/api/v1/sync-now", true, None)
            .await
    }

    /// Polls the job until `done` holds for it.
    async fn wait_job(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        for _ in 0..200 {
            last = self.get(&format!("/api/v1/jobs/{id}")).await;
            if done(&last) {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("job {id} did not get there: {last:#}");
    }

    async fn wait_status(&self, done: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        for _ in 0..200 {
            last = self.get("/api/v1/status").await;
            if done(&last) {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the status did not get there: {last:#}");
    }

    fn pending_files(&self) -> usize {
        std::fs::read_dir(self.state_dir.path().join("pending"))
            .expect("pending dir")
            .filter(|entry| {
                entry
                    .as_ref()
                    .is_ok_and(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
            })
            .count()
    }

    async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }
}

#[tokio::test]
async fn enabling_needs_the_owner_and_a_connection_and_settings_persist() {
    let fake = FakeAggregator::start().await;
    let mut agent = Agent::start(&fake).await;

    // Disabled by default; reads need no owner token.
    let settings = agent.get("/api/v1/settings").await;
    assert_eq!(settings["license_sync_enabled"], false);

    // Owner-only without (or with a wrong) owner token: 401.
    let (status, body) = agent
        .request(
            reqwest::Method::PUT,
            "/api/v1/settings",
            false,
            Some(json!({"license_sync_enabled": true})),
        )
        .await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("owner")),
        "{body}"
    );
    let wrong = agent
        .http
        .put(format!("{}/api/v1/settings", agent.base))
        .bearer_auth("not-the-owner-token-at-all")
        .json(&json!({"license_sync_enabled": true}))
        .send()
        .await
        .expect("request");
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().contains_key("www-authenticate"));

    // Not connected yet: refused with "connect first".
    let (status, body) = agent.set_enabled(true).await;
    assert_eq!(status, 409, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("connect first"), "{message}");
    assert_eq!(body["kind"], "not_connected");
    let connection = agent.get("/api/v1/connection").await;
    assert_eq!(connection["connected"], false);
    assert_eq!(connection["error"]["kind"], "not_enrolled");

    // A bad body is a 422 that does not echo the values.
    let (status, body) = agent
        .request(
            reqwest::Method::POST,
            "/api/v1/connection",
            true,
            Some(json!({"enrollment_token": 42, "secret": "lse_do_not_echo"})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(!body.to_string().contains("lse_do_not_echo"), "{body}");

    // A wrong enrollment token: refused, says what to do, stores nothing.
    let (status, body) = agent
        .request(
            reqwest::Method::POST,
            "/api/v1/connection",
            true,
            Some(json!({"enrollment_token": "lse_wrong"})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("enrollment-token create")),
        "{body}"
    );
    assert!(!body.to_string().contains("lse_wrong"), "{body}");
    assert!(!agent.state_dir.path().join("credential.json").exists());

    agent.enroll().await;
    let credential_file = agent.state_dir.path().join("credential.json");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&credential_file)
            .expect("credential file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let (status, settings) = agent.set_enabled(true).await;
    assert_eq!(status, 200, "{settings}");
    assert_eq!(settings["license_sync_enabled"], true);
    assert!(settings["enabled_at"].is_string());

    // The control stream connects and reports the setting in its heartbeats.
    agent
        .wait_status(|status| status["connected"] == true)
        .await;
    for _ in 0..100 {
        if fake.state().heartbeats.iter().any(|(enabled, _)| *enabled) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(fake.state().heartbeats.iter().any(|(enabled, _)| *enabled));

    // Settings survive a restart.
    agent.restart(&fake).await;
    let settings = agent.get("/api/v1/settings").await;
    assert_eq!(settings["license_sync_enabled"], true, "{settings}");
    agent
        .wait_status(|status| status["next_sync"]["at"].is_string())
        .await;

    // Disabling needs the owner too, and then there is no next sync.
    let (status, _) = agent.set_enabled(false).await;
    assert_eq!(status, 200);
    let status = agent.get("/api/v1/status").await;
    assert!(status["next_sync"].is_null(), "{status}");
    agent.stop().await;
}

#[tokio::test]
async fn a_disabled_agent_sends_nothing_even_pending_snapshots() {
    let fake = FakeAggregator::start().await;
    let agent = Agent::start_with(&fake, |config| {
        config.sync_interval = Duration::from_secs(1);
    })
    .await;
    agent.enroll().await;
    let (status, body) = agent.sync_now().await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("disabled"))
    );

    // A snapshot left pending (e.g. written before the owner disabled sync) stays where it is. The aggregator is
    // slow, so that the first sync (right after enabling) is still in flight when the owner disables.
    fake.state().upload_delay = Duration::from_secs(30);
    let (status, _) = agent.set_enabled(true).await;
    assert_eq!(status, 200);
    let (status, body) = agent.sync_now().await;
    assert_eq!(status, 202, "{body}");
    let id = body["job_id"].as_str().expect("job id").to_owned();
    agent
        .wait_job(&id, |job| job["state"] == "sending" && job["attempts"] == 1)
        .await;
    let (status, _) = agent.set_enabled(false).await;
    assert_eq!(status, 200);
    fake.state().upload_delay = Duration::ZERO;
    let attempts = fake.state().upload_attempts;
    // Several schedule ticks (1 s) pass: nothing is sent, nothing is scheduled, the snapshot stays.
    // Real time on purpose, not tokio's paused clock: the agent, its local API and the fake aggregator talk over real
    // loopback sockets in this runtime. A paused clock auto-advances whenever the runtime waits for that I/O, which
    // fires HTTP and gRPC timeouts (and the fake's upload delay) spuriously; advancing it by hand in steps instead
    // compresses the timers but not the I/O they start, so a send that takes longer than a step would go unseen.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(fake.state().upload_attempts, attempts);
    assert!(fake.state().applied.is_empty());
    assert_eq!(agent.pending_files(), 1);
    let status = agent.get("/api/v1/status").await;
    assert_eq!(status["delivery"]["state"], "paused", "{status}");
    assert_eq!(status["pending_deliveries"], 1);
    let (status, _) = agent.sync_now().await;
    assert_eq!(status, 409);

    // Enabled again: the pending snapshot goes first, once.
    let (status, _) = agent.set_enabled(true).await;
    assert_eq!(status, 200);
    let job = agent.wait_job(&id, |job| job["state"] == "committed").await;
    let sync_id = job["sync_id"].as_str().expect("sync id").to_owned();
    let (first_applied, duplicates) = {
        let fake = fake.state();
        (fake.applied.first().cloned(), fake.duplicates)
    };
    assert_eq!(first_applied, Some(sync_id));
    assert_eq!(duplicates, 0);
    agent.stop().await;
}

#[tokio::test]
async fn sync_now_returns_a_job_and_concurrent_requests_coalesce() {
    let fake = FakeAggregator::start().await;
    let agent = Agent::start(&fake).await;
    agent.enroll().await;
    agent.enable_and_settle().await;
    fake.state().upload_delay = Duration::from_millis(500);

    let requests = (0..5).map(|_| agent.sync_now());
    let answers = futures::future::join_all(requests).await;
    let ids: HashSet<String> = answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 202, "{body}");
            body["job_id"].as_str().expect("job id").to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    assert_eq!(
        answers
            .iter()
            .filter(|(_, body)| body["joined"] == false)
            .count(),
        1
    );
    let id = ids.into_iter().next().expect("one id");
    let job = agent.wait_job(&id, |job| job["state"] == "committed").await;
    assert_eq!(job["joined"], 4);
    assert_eq!(job["trigger"], "local");
    assert_eq!(job["users"], 4);
    assert_eq!(job["receipt"]["duplicate"], false);
    assert_eq!(
        fake.state().applied.len(),
        2,
        "the first scheduled sync, then this one"
    );
    assert_eq!(agent.pending_files(), 0);

    // The next request starts a new job; the list has both, newest first.
    let (_, second) = agent.sync_now().await;
    assert_ne!(second["job_id"], id.as_str());
    let jobs = agent.get("/api/v1/jobs").await;
    assert_eq!(jobs["jobs"][1]["id"], id.as_str());
    let status = agent.get("/api/v1/status").await;
    assert_eq!(status["last_sync"]["result"], "committed");
    assert_eq!(status["counters"]["jobs_started"]["local"], 2);
    assert_eq!(status["counters"]["jobs_started"]["schedule"], 1);
    assert_eq!(status["counters"]["jobs_joined"], 4);
    let (status, _) = agent
        .request(reqwest::Method::GET, "/api/v1/jobs/not-a-job", false, None)
        .await;
    assert_eq!(status, 404);
    agent.stop().await;
}

#[tokio::test]
async fn the_aggregator_can_ask_for_a_sync_over_the_control_stream() {
    let fake = FakeAggregator::start().await;
    let agent = Agent::start(&fake).await;
    agent.enroll().await;
    agent
        .wait_status(|status| status["connected"] == true)
        .await;

    // Disabled: refused with a reason.
    assert_eq!(fake.request_sync("r-disabled").await, 1);
    for _ in 0..100 {
        if !fake.state().acks.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ack = fake.state().acks[0].clone();
    assert!(!ack.accepted);
    assert!(ack.reason.contains("disabled"), "{}", ack.reason);

    agent.enable_and_settle().await;
    assert_eq!(fake.request_sync("r-1").await, 1);
    for _ in 0..100 {
        if fake.state().acks.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ack = fake.state().acks[1].clone();
    assert!(ack.accepted, "{}", ack.reason);
    assert_eq!(ack.request_id, "r-1");
    let job = agent
        .wait_job(&ack.job_id, |job| job["state"] == "committed")
        .await;
    assert_eq!(job["trigger"], "cloud");
    assert_eq!(job["cloud_request_ids"], json!(["r-1"]));
    agent.stop().await;
}

#[tokio::test]
async fn an_unreachable_aggregator_keeps_the_snapshot_pending_until_it_is_back() {
    let mut fake = FakeAggregator::start().await;
    let mut agent = Agent::start(&fake).await;
    agent.enroll().await;
    agent.enable_and_settle().await;
    fake.stop().await;

    let (_, body) = agent.sync_now().await;
    let id = body["job_id"].as_str().expect("job id").to_owned();
    let job = agent
        .wait_job(&id, |job| job["attempts"].as_u64() >= Some(3))
        .await;
    assert_eq!(job["state"], "sending");
    assert_eq!(job["last_error"]["kind"], "aggregator_unavailable", "{job}");
    assert_eq!(agent.pending_files(), 1);
    let status = agent.get("/api/v1/status").await;
    assert_eq!(status["pending_deliveries"], 1);
    assert!(
        status["delivery"]["failed_attempts"].as_u64() >= Some(2),
        "{status}"
    );

    // A restart of the agent keeps it pending.
    agent.restart(&fake).await;
    assert_eq!(agent.get("/api/v1/status").await["pending_deliveries"], 1);

    fake.restart().await;
    agent
        .wait_status(|status| {
            status["pending_deliveries"] == 0 && status["last_sync"]["result"] == "committed"
        })
        .await;
    assert_eq!(
        fake.state().applied.len(),
        2,
        "the first scheduled sync, then this one"
    );
    assert_eq!(fake.state().duplicates, 0);
    assert_eq!(agent.pending_files(), 0);
    agent.stop().await;
}

#[tokio::test]
async fn a_snapshot_sent_again_after_a_lost_receipt_is_applied_once() {
    let fake = FakeAggregator::start().await;
    let agent = Agent::start(&fake).await;
    agent.enroll().await;
    agent.enable_and_settle().await;
    fake.state().upload_delay = Duration::from_millis(2000);
    let (_, body) = agent.sync_now().await;
    let id = body["job_id"].as_str().expect("job id").to_owned();
    // Copy the pending file while it is in flight: as if the agent crashed after the commit, before the removal.
    let job = agent.wait_job(&id, |job| job["state"] == "sending").await;
    let pending = agent.state_dir.path().join("pending");
    let name = std::fs::read_dir(&pending)
        .expect("pending")
        .filter_map(Result::ok)
        .map(|entry| entry.file_name())
        .find(|name| !name.to_string_lossy().starts_with('.'))
        .expect("a pending file");
    let copy = std::fs::read(pending.join(&name)).expect("read pending");
    agent.wait_job(&id, |job| job["state"] == "committed").await;
    assert!(job["sync_id"].is_string());
    std::fs::write(pending.join(&name), copy).expect("put it back");

    let mut agent = agent;
    agent.restart(&fake).await;
    let status = agent
        .wait_status(|status| {
            status["pending_deliveries"] == 0
                && status["counters"]["delivery_attempts"]["duplicate"] == 1
        })
        .await;
    assert_eq!(status["last_sync"]["duplicate"], true, "{status}");
    assert_eq!(
        fake.state().applied.len(),
        2,
        "the first scheduled sync, then the one sent twice"
    );
    assert_eq!(fake.state().duplicates, 1);
    agent.stop().await;
}

#[tokio::test]
async fn a_revoked_credential_stops_retries_and_says_to_re_enroll() {
    let fake = FakeAggregator::start().await;
    let agent = Agent::start(&fake).await;
    agent.enroll().await;
    agent.enable_and_settle().await;
    agent
        .wait_status(|status| status["connected"] == true)
        .await;

    // Revoke: no credential works any more; end the open session as a revocation would.
    fake.state().valid_credentials.clear();
    fake.state().sessions.clear();
    let (_, body) = agent.sync_now().await;
    let id = body["job_id"].as_str().expect("job id").to_owned();
    let job = agent.wait_job(&id, |job| job["state"] == "failed").await;
    assert_eq!(job["error"]["kind"], "aggregator_credentials", "{job}");
    assert!(
        job["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("re-enroll")),
        "{job}"
    );
    let status = agent
        .wait_status(|status| status["connection"]["state"] == "credential_refused")
        .await;
    assert_eq!(status["connected"], false);
    assert_eq!(status["failed_deliveries"], 1, "{status}");
    assert_eq!(status["pending_deliveries"], 0);
    assert_eq!(
        status["recent_failures"][0]["error"]["kind"],
        "aggregator_credentials"
    );
    let failed: Vec<_> = std::fs::read_dir(agent.state_dir.path().join("failed"))
        .expect("failed dir")
        .filter_map(Result::ok)
        .collect();
    assert_eq!(failed.len(), 2, "the snapshot and its reason");

    // No retry storm: over the next seconds nothing more reaches the aggregator.
    let attempts = || {
        let fake = fake.state();
        (fake.upload_attempts, fake.control_opens)
    };
    let before = attempts();
    // Real time, for the reason given in `a_disabled_agent_sends_nothing_even_pending_snapshots`: 2 s is 10 retry
    // windows (`retry_max_ms` = 200), enough for a retry storm to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = attempts();
    assert_eq!(after.0, before.0);
    assert!(after.1 <= before.1 + 1, "{before:?} → {after:?}");
    assert!(fake.state().unauthenticated_uploads <= 1);

    // Re-enrolling rotates the credential and the agent is back at once.
    fake.state()
        .valid_tokens
        .insert("lse_second_token".to_owned());
    let (status, body) = agent
        .request(
            reqwest::Method::POST,
            "/api/v1/connection",
            true,
            Some(json!({"enrollment_token": "lse_second_token"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    agent
        .wait_status(|status| status["connected"] == true)
        .await;
    let (_, body) = agent.sync_now().await;
    let id = body["job_id"].as_str().expect("job id").to_owned();
    agent.wait_job(&id, |job| job["state"] == "committed").await;
    agent.stop().await;
}

#[tokio::test]
async fn shutdown_abandons_a_slow_upload_after_the_grace_period_and_keeps_it_pending() {
    let fake = FakeAggregator::start().await;
    let mut agent = Agent::start(&fake).await;
    agent.enroll().await;
    agent.enable_and_settle().await;
    fake.state().upload_delay = Duration::from_secs(60);
    let (_, body) = agent.sync_now().await;
    let id = body["job_id"].as_str().expect("job id").to_owned();
    agent
        .wait_job(&id, |job| job["state"] == "sending" && job["attempts"] == 1)
        .await;
    let started = std::time::Instant::now();
    if let Some(running) = agent.running.take() {
        running.shutdown().await;
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(agent.pending_files(), 1);

    // After the restart it is delivered.
    fake.state().upload_delay = Duration::ZERO;
    agent.restart(&fake).await;
    agent
        .wait_status(|status| {
            status["pending_deliveries"] == 0 && status["last_sync"]["result"] == "committed"
        })
        .await;
    agent.stop().await;
}

#[tokio::test]
async fn a_second_agent_on_the_same_state_directory_is_refused() {
    let fake = FakeAggregator::start().await;
    let agent = Agent::start(&fake).await;
    let mut config = file_config(fixture_csv());
    config.aggregator = Some(AggregatorConfig {
        credential: None,
        ..aggregator_config(&fake.endpoint(), 2)
    });
    config.agent = Some(sidecar_config(agent.state_dir.path()));
    let error = match sidecar::start(config).await {
        Ok(_) => panic!("a second agent started on the same state directory"),
        Err(error) => error,
    };
    assert!(error.to_string().contains("in use"), "{error}");
    agent.stop().await;
}

#[tokio::test]
async fn health_and_readiness() {
    let fake = FakeAggregator::start().await;
    let agent = Agent::start(&fake).await;
    assert_eq!(agent.get("/healthz").await["status"], "ok");
    assert_eq!(agent.get("/readyz").await["status"], "ready");
    let (status, _) = agent
        .request(reqwest::Method::GET, "/api/v1/nope", false, None)
        .await;
    assert_eq!(status, 404);
    agent.stop().await;
}

#[tokio::test]
async fn a_snapshot_that_cannot_be_persisted_fails_its_job_and_sends_nothing() {
    let fake = FakeAggregator::start().await;
    let agent = Agent::start(&fake).await;
    agent.enroll().await;
    agent.enable_and_settle().await;
    let attempts = fake.state().upload_attempts;

    // Stand-in for a full or broken disk (the tests may run as root, which ignores permissions): `pending/` is no
    // longer a directory, so the snapshot cannot be written there.
    let pending = agent.state_dir.path().join("pending");
    std::fs::remove_dir_all(&pending).expect("remove pending/");
    std::fs::write(&pending, "not a directory").expect("block pending/");
    let (_, body) = agent.sync_now().await;
    let id = body["job_id"].as_str().expect("job id").to_owned();
    let job = agent.wait_job(&id, |job| job["state"] == "failed").await;
    assert_eq!(job["error"]["kind"], "state", "{job}");
    assert!(
        job["error"]["message"].as_str().is_some_and(
            |m| m.contains("write the pending snapshot") && m.contains("nothing was sent")
        ),
        "{job}"
    );
    assert_eq!(fake.state().upload_attempts, attempts, "nothing was sent");
    let (status, _) = agent
        .request(reqwest::Method::GET, "/readyz", false, None)
        .await;
    assert_eq!(status, 503, "not ready without a usable state directory");

    // Repaired: the next sync goes through.
    std::fs::remove_file(&pending).expect("unblock");
    std::fs::create_dir(&pending).expect("pending/ again");
    let (_, body) = agent.sync_now().await;
    let id = body["job_id"].as_str().expect("job id").to_owned();
    agent.wait_job(&id, |job| job["state"] == "committed").await;
    agent.stop().await;
}

#[tokio::test]
async fn a_job_whose_pending_snapshot_is_removed_by_hand_fails_instead_of_blocking_sync_now() {
    let mut fake = FakeAggregator::start().await;
    let agent = Agent::start(&fake).await;
    agent.enroll().await;
    agent.enable_and_settle().await;
    fake.stop().await;
    let (_, body) = agent.sync_now().await;
    let id = body["job_id"].as_str().expect("job id").to_owned();
    agent
        .wait_job(&id, |job| {
            job["state"] == "sending" && job["attempts"].as_u64() >= Some(1)
        })
        .await;
    for entry in std::fs::read_dir(agent.state_dir.path().join("pending")).expect("pending") {
        std::fs::remove_file(entry.expect("entry").path()).expect("remove by hand");
    }

    // The delivery loop notices at its next retry, or when the next request wakes it (that request joins the stuck
    // job or, if the loop was quicker, starts a new one): the job fails instead of blocking Sync now forever.
    let (_, answer) = agent.sync_now().await;
    let job = agent.wait_job(&id, |job| job["state"] == "failed").await;
    assert_eq!(job["error"]["kind"], "snapshot_missing", "{job}");
    fake.restart().await;
    let second = match answer["job_id"].as_str() {
        Some(other) if other != id => other.to_owned(),
        _ => {
            let (_, body) = agent.sync_now().await;
            body["job_id"].as_str().expect("job id").to_owned()
        }
    };
    assert_ne!(second, id);
    agent
        .wait_job(&second, |job| job["state"] == "committed")
        .await;
    agent.stop().await;
}

/// The local API's address, for raw sockets.
fn api_addr(agent: &Agent) -> SocketAddr {
    agent
        .base
        .trim_start_matches("http://")
        .parse()
        .expect("the API's address")
}

#[tokio::test]
async fn the_local_api_closes_idle_and_slowloris_connections() {
    use license_sync_serve::testing::{closed_within, slowloris};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let fake = FakeAggregator::start().await;
    // The header-read timeout also runs between requests, so it is longer than the idle one here.
    let agent = Agent::start_with(&fake, |config| {
        config.api_idle_timeout = Duration::from_secs(1);
        config.api_header_read_timeout = Duration::from_secs(30);
    })
    .await;
    let mut kept_alive = tokio::net::TcpStream::connect(api_addr(&agent))
        .await
        .expect("connect");
    kept_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .expect("request");
    let mut answer = vec![0u8; 1024];
    let read = kept_alive.read(&mut answer).await.expect("answer");
    assert!(String::from_utf8_lossy(&answer[..read]).starts_with("HTTP/1.1 200"));
    let closed = closed_within(&mut kept_alive, Duration::from_secs(10))
        .await
        .expect("the idle kept-alive connection is closed");
    assert!(
        closed >= Duration::from_millis(900),
        "not before the idle timeout: {closed:?}"
    );
    agent.stop().await;

    let agent = Agent::start_with(&fake, |config| {
        config.api_idle_timeout = Duration::from_secs(60);
        config.api_header_read_timeout = Duration::from_millis(500);
    })
    .await;
    let mut slow = tokio::net::TcpStream::connect(api_addr(&agent))
        .await
        .expect("connect");
    let cut = slowloris(&mut slow)
        .await
        .expect("the slowloris client is cut");
    assert!(
        cut < Duration::from_secs(5),
        "cut by the header-read timeout, not the idle one: {cut:?}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn at_its_connection_cap_the_local_api_makes_room_by_closing_idle_connections() {
    use license_sync_serve::testing::{count_closed, idle_then_late};

    let fake = FakeAggregator::start().await;
    let agent = Agent::start_with(&fake, |config| {
        config.api_max_connections = 3;
        config.api_idle_timeout = Duration::from_secs(60);
    })
    .await;
    let (mut idle, late) = idle_then_late(api_addr(&agent), 3, 3).await;
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        reqwest::get(format!("{}/healthz", agent.base)),
    )
    .await
    .expect("a request is answered while idle sockets fill the cap")
    .expect("HTTP request");
    assert_eq!(answer.status(), 200);
    let closed = count_closed(&mut idle).await;
    assert!(
        closed >= 2,
        "the oldest idle connections made room: {closed} of 3"
    );
    drop(late);
    agent.stop().await;
}
