//! The connection between agents and the aggregator beyond snapshots (the GitHub Connect equivalent):
//!
//! - `Enrollment.Enroll` exchanges a one-time enrollment token (`lse_…`, created by an owner) for a long-lived
//!   instance credential (`lsi_…`); `Enrollment.CheckConnection` answers whether a credential works now.
//! - `AgentControl.OpenSession` is the long-lived control stream: the agent says `hello` and sends heartbeats; the
//!   aggregator answers `welcome`, records the agent's presence in the database (so every replica sees it), and
//!   delivers the owners' "Sync now" requests for that instance only, each at most once across replicas.
//!
//! Each stream runs in its own task, so the end of a stream (a client reset included) always runs its cleanup.
//! Logs carry server ids, hostnames, session and request ids; never a token or credential.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use license_sync_proto::convert::timestamp;
use license_sync_proto::v1::agent_control_server::AgentControl;
use license_sync_proto::v1::enrollment_server::Enrollment;
use license_sync_proto::v1::{
    AgentMessage, CheckConnectionRequest, CheckConnectionResponse, ControlMessage, ControlWelcome,
    EnrollRequest, EnrollResponse, SyncAck, SyncNowRequest, agent_message, control_message,
};
use time::OffsetDateTime;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use crate::app::App;
use crate::tls;
// Re-exported where callers (the control tests) have always found it; `enrollment` does not import `control`.
pub use crate::enrollment::issue_enrollment_token;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::ingest::Caller;
use crate::metrics::AuthSurface;
use crate::store::{AckOutcome, AgentReport, Instance, StoreError, SyncAckRecord};
use crate::tokens;

/// A control stream silent for this many heartbeat intervals is closed.
const IDLE_HEARTBEATS: u32 = 3;
/// Messages the aggregator may queue to a stream before it is considered stuck.
const OUTBOUND_QUEUE: usize = 16;
/// Longest wait for room in a stream's queue; an agent that reads nothing for this long is disconnected.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds on what an agent may make us store.
const MAX_AGENT_VERSION_CHARS: usize = 64;
const MAX_JOB_ID_CHARS: usize = 128;
const MAX_REASON_CHARS: usize = 1000;

/// A server id sent by an agent: a UUID, not the nil one.
fn parse_server_id(text: &str) -> ServiceResult<Uuid> {
    let text = text.trim();
    let server_id = Uuid::parse_str(text).map_err(|_| {
        ServiceError::invalid(format!(
            "server_id {text:?} is not a UUID: set `instance.server_id` in the agent's configuration to the GHES \
             instance's server id"
        ))
    })?;
    if server_id.is_nil() {
        return Err(ServiceError::invalid(
            "server_id is the nil UUID: set `instance.server_id` to the GHES instance's real server id",
        ));
    }
    Ok(server_id)
}

/// Enrollment accepts surrounding spaces; otherwise the hostname follows the snapshots' one rule.
fn validate_hostname(hostname: &str) -> ServiceResult<&str> {
    license_sync_core::snapshot::validate_hostname(hostname.trim()).map_err(ServiceError::from)
}

fn validate_ghes_version(version: &str) -> ServiceResult<&str> {
    let version = version.trim();
    if version.chars().count() > MAX_AGENT_VERSION_CHARS || version.chars().any(char::is_control) {
        return Err(ServiceError::invalid(format!(
            "ghes_version must be at most {MAX_AGENT_VERSION_CHARS} printable characters: fix \
             `instance.ghes_version` in the agent's configuration"
        )));
    }
    Ok(version)
}

/// `text` without control characters, cut to `max` characters: what an agent sends is stored and shown.
fn bounded(text: &str, max: usize) -> String {
    text.trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(max)
        .collect()
}

pub struct EnrollmentService {
    app: Arc<App>,
}

impl EnrollmentService {
    pub fn new(app: Arc<App>) -> Self {
        EnrollmentService { app }
    }
}

#[tonic::async_trait]
impl Enrollment for EnrollmentService {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let client_certificates = tls::client_certificates(&request);
        let client = crate::auth_limit::grpc_client_address(&request);
        let request = request.into_inner();
        let token = request.enrollment_token.trim();
        if token.is_empty() {
            return Err(ServiceError::unauthenticated(
                "the enrollment token is empty: pass the `lse_…` token an enterprise owner created",
            )
            .into());
        }
        let server_id = parse_server_id(&request.server_id)?;
        // With mTLS, enrolling needs no certificate (an agent may get its certificate after its server id is known,
        // and `tls_client_auth = "required"` refuses it at the handshake anyway), but one presented must be bound to
        // the instance enrolled: one instance's certificate cannot enroll another.
        if self.app.config.tls_client_ca_path.is_some() && client_certificates.is_some() {
            tls::check_instance_certificate(client_certificates.as_deref(), server_id)?;
        }
        let hostname = validate_hostname(&request.hostname)?;
        let ghes_version = validate_ghes_version(&request.ghes_version)?;
        let credential = tokens::generate(tokens::INSTANCE_CREDENTIAL_PREFIX);
        let redeemed = self
            .app
            .store
            .redeem_enrollment_token(
                &tokens::sha256_hex(token),
                server_id,
                hostname,
                ghes_version,
                &tokens::sha256_hex(&credential),
                OffsetDateTime::now_utc(),
            )
            .await;
        let (enterprise, instance) = match redeemed {
            Ok(redeemed) => redeemed,
            Err(error) => {
                // The log keeps the reason for the operator; the caller of another enterprise's server id gets the
                // refused token's answer, so that enrollment cannot probe which server ids exist elsewhere.
                let reason = error.to_string();
                let answer = match error {
                    StoreError::EnrolledElsewhere { .. } => {
                        ServiceError::from(StoreError::EnrollmentTokenRefused)
                    }
                    error => ServiceError::from(error),
                };
                tracing::warn!(
                    %server_id,
                    %hostname,
                    kind = answer.kind.as_str(),
                    error = %reason,
                    "enrollment refused"
                );
                let answer = if answer.kind == ErrorKind::Unauthenticated {
                    self.app
                        .auth_limiter
                        .refused(client, AuthSurface::Enroll, answer)
                } else {
                    answer
                };
                return Err(answer.into());
            }
        };
        tracing::info!(
            enterprise = %enterprise.slug,
            server_id = %instance.server_id,
            hostname = %instance.hostname,
            "instance enrolled with an enrollment token; any earlier credential of it no longer works"
        );
        // Read after the enrollment committed: a key lookup that fails must not leave a credential the agent never got.
        let usage_file_recipient = match crate::usage_keys::current_public_key(
            &self.app.store,
            enterprise.id,
        )
        .await
        {
            Ok(key) => key.map(|key| key.public_key).unwrap_or_default(),
            Err(error) => {
                tracing::warn!(enterprise = %enterprise.slug, error = %error, "could not read the usage-file key for the enrollment answer");
                String::new()
            }
        };
        Ok(Response::new(EnrollResponse {
            credential,
            enterprise: enterprise.slug,
            server_id: instance.server_id.to_string(),
            usage_file_recipient,
        }))
    }

    async fn check_connection(
        &self,
        request: Request<CheckConnectionRequest>,
    ) -> Result<Response<CheckConnectionResponse>, Status> {
        let instance = Caller::of(&request)?.authenticate(&self.app).await?;
        let enterprise = self
            .app
            .store
            .enterprise_by_id(instance.enterprise_id)
            .await?
            .ok_or_else(|| {
                ServiceError::unauthenticated(
                    "the instance's enterprise no longer exists: enroll the agent in another enterprise",
                )
            })?;
        tracing::debug!(server_id = %instance.server_id, hostname = %instance.hostname, "connection checked");
        Ok(Response::new(CheckConnectionResponse {
            enterprise: enterprise.slug,
            server_id: instance.server_id.to_string(),
            hostname: instance.hostname,
            server_time: Some(timestamp(OffsetDateTime::now_utc())),
        }))
    }
}

pub struct ControlService {
    app: Arc<App>,
    stop: watch::Receiver<bool>,
}

impl ControlService {
    /// `stop` turning `true` ends every open stream (with UNAVAILABLE, so agents reconnect elsewhere), which lets
    /// the server's graceful shutdown finish.
    pub fn new(app: Arc<App>, stop: watch::Receiver<bool>) -> Self {
        ControlService { app, stop }
    }
}

type ControlStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ControlMessage, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AgentControl for ControlService {
    type OpenSessionStream = ControlStream;

    async fn open_session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::OpenSessionStream>, Status> {
        let caller = Caller::of(&request)?;
        let instance = caller.authenticate(&self.app).await?;
        let (outbound, receiver) = mpsc::channel(OUTBOUND_QUEUE);
        let session = Session {
            app: Arc::clone(&self.app),
            credential_sha256: tokens::sha256_hex(caller.credential()),
            instance,
            session_id: Uuid::now_v7(),
            outbound,
            store_failing: false,
        };
        // Its own task: it outlives this handler, notices when the agent goes away, and always cleans up.
        tokio::spawn(session.run(request.into_inner(), self.stop.clone()));
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

/// Why a control stream ended without an error to send.
enum SessionEnd {
    /// The agent closed its side.
    ClosedByAgent,
    /// The agent reset the stream or its connection dropped.
    Broken(String),
}

struct Session {
    app: Arc<App>,
    instance: Instance,
    credential_sha256: String,
    session_id: Uuid,
    outbound: mpsc::Sender<Result<ControlMessage, Status>>,
    /// The store failed on the last poll or presence write (logged once until it recovers).
    store_failing: bool,
}

impl Session {
    async fn run(mut self, mut inbound: Streaming<AgentMessage>, stop: watch::Receiver<bool>) {
        let started = Instant::now();
        let result = self.serve(&mut inbound, stop).await;
        let (reason, level_warn) = match &result {
            Ok(SessionEnd::ClosedByAgent) => ("closed by the agent".to_owned(), false),
            Ok(SessionEnd::Broken(reason)) => (reason.clone(), false),
            Err(error) => (error.message.clone(), error.kind != ErrorKind::Unavailable),
        };
        if let Err(error) = result {
            // The agent learns why; it is gone when this fails.
            let _ = tokio::time::timeout(SEND_TIMEOUT, self.outbound.send(Err(error.into()))).await;
        }
        if let Err(error) = self
            .app
            .store
            .end_agent_session(self.instance.id, self.session_id, OffsetDateTime::now_utc())
            .await
            .map_err(ServiceError::from)
        {
            tracing::warn!(
                server_id = %self.instance.server_id,
                session_id = %self.session_id,
                error = %error.message,
                "could not record the end of a control stream; the agent shows disconnected once its presence ages"
            );
        }
        let elapsed_secs = started.elapsed().as_secs();
        if level_warn {
            tracing::warn!(
                server_id = %self.instance.server_id,
                hostname = %self.instance.hostname,
                session_id = %self.session_id,
                elapsed_secs,
                %reason,
                "control stream ended"
            );
        } else {
            tracing::info!(
                server_id = %self.instance.server_id,
                hostname = %self.instance.hostname,
                session_id = %self.session_id,
                elapsed_secs,
                %reason,
                "control stream ended"
            );
        }
    }

    async fn serve(
        &mut self,
        inbound: &mut Streaming<AgentMessage>,
        mut stop: watch::Receiver<bool>,
    ) -> ServiceResult<SessionEnd> {
        let heartbeat_secs = self.app.config.agent_heartbeat_interval_secs;
        let idle = Duration::from_secs(u64::from(heartbeat_secs * IDLE_HEARTBEATS));
        // Subscribed before the first poll, so that a request created in between is not missed.
        let mut wakeups = self.app.subscribe_sync_wakeups();

        let hello = tokio::select! {
            received = tokio::time::timeout(idle, inbound.message()) => received,
            () = stopped(&mut stop) => return Err(shutting_down()),
        };
        let hello = match hello {
            Err(_) => {
                return Err(ServiceError::new(
                    ErrorKind::FailedPrecondition,
                    format!(
                        "no `hello` within {} s of opening the control stream: send `hello` first",
                        idle.as_secs()
                    ),
                ));
            }
            Ok(Ok(Some(AgentMessage {
                message: Some(agent_message::Message::Hello(hello)),
            }))) => hello,
            Ok(Ok(Some(_))) => {
                return Err(ServiceError::new(
                    ErrorKind::FailedPrecondition,
                    "the first message on the control stream must be `hello`",
                ));
            }
            Ok(Ok(None)) => return Ok(SessionEnd::ClosedByAgent),
            Ok(Err(status)) => return Ok(SessionEnd::Broken(broken(&status))),
        };
        let version = bounded(&hello.agent_version, MAX_AGENT_VERSION_CHARS);
        self.record_presence(hello.sync_enabled, Some(&version), None)
            .await?;
        self.send(control_message::Message::Welcome(ControlWelcome {
            heartbeat_interval_secs: heartbeat_secs,
        }))
        .await?;
        tracing::info!(
            server_id = %self.instance.server_id,
            hostname = %self.instance.hostname,
            session_id = %self.session_id,
            agent_version = %version,
            sync_enabled = hello.sync_enabled,
            "control stream open"
        );

        self.deliver().await?;
        let mut poll = tokio::time::interval(Duration::from_millis(
            self.app.config.control_poll_interval_ms,
        ));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        let mut deadline = Instant::now() + idle;
        loop {
            tokio::select! {
                () = stopped(&mut stop) => return Err(shutting_down()),
                received = tokio::time::timeout_at(deadline, inbound.message()) => match received {
                    Err(_) => {
                        return Err(ServiceError::new(
                            ErrorKind::Unavailable,
                            format!(
                                "the agent sent nothing for {} s ({IDLE_HEARTBEATS} heartbeat intervals) and the \
                                 control stream was closed: reconnect",
                                idle.as_secs()
                            ),
                        ));
                    }
                    Ok(Ok(Some(message))) => {
                        deadline = Instant::now() + idle;
                        self.handle(message).await?;
                    }
                    Ok(Ok(None)) => return Ok(SessionEnd::ClosedByAgent),
                    Ok(Err(status)) => return Ok(SessionEnd::Broken(broken(&status))),
                },
                _ = poll.tick() => self.deliver().await?,
                () = next_wakeup(&mut wakeups, self.instance.id) => self.deliver().await?,
                () = self.outbound.closed() => {
                    return Ok(SessionEnd::Broken("the agent went away".into()));
                }
            }
        }
    }

    async fn handle(&mut self, message: AgentMessage) -> ServiceResult<()> {
        match message.message {
            Some(agent_message::Message::Hello(hello)) => {
                let version = bounded(&hello.agent_version, MAX_AGENT_VERSION_CHARS);
                self.record_presence(hello.sync_enabled, Some(&version), None)
                    .await
            }
            Some(agent_message::Message::Heartbeat(heartbeat)) => {
                self.record_presence(
                    heartbeat.sync_enabled,
                    None,
                    Some(heartbeat.pending_deliveries),
                )
                .await
            }
            Some(agent_message::Message::SyncAck(ack)) => self.record_ack(ack).await,
            None => {
                tracing::debug!(
                    session_id = %self.session_id,
                    "ignored an empty or unknown agent message (from a newer agent?)"
                );
                Ok(())
            }
        }
    }

    /// Records presence; ends the stream only when the credential stopped working. A store failure is logged and
    /// the stream goes on (the next heartbeat writes again).
    async fn record_presence(
        &mut self,
        sync_enabled: bool,
        version: Option<&str>,
        pending_deliveries: Option<u32>,
    ) -> ServiceResult<()> {
        let report = AgentReport {
            session_id: self.session_id,
            seen_at: OffsetDateTime::now_utc(),
            sync_enabled,
            version,
            pending_deliveries,
        };
        let result = self
            .app
            .store
            .record_agent_presence(self.instance.id, &self.credential_sha256, report)
            .await;
        self.store_result(result, "recording the agent's presence")
            .map(|_| ())
    }

    async fn record_ack(&mut self, ack: SyncAck) -> ServiceResult<()> {
        let Ok(request_id) = Uuid::parse_str(ack.request_id.trim()) else {
            tracing::warn!(
                server_id = %self.instance.server_id,
                session_id = %self.session_id,
                "ignored a sync_ack whose request_id is not a UUID"
            );
            return Ok(());
        };
        let job_id = bounded(&ack.job_id, MAX_JOB_ID_CHARS);
        let reason = bounded(&ack.reason, MAX_REASON_CHARS);
        let record = SyncAckRecord {
            request_id,
            accepted: ack.accepted,
            job_id: &job_id,
            reason: &reason,
            acked_at: OffsetDateTime::now_utc(),
        };
        let result = self
            .app
            .store
            .record_sync_ack(self.instance.id, record)
            .await;
        match self.store_result(result, "recording a sync acknowledgement")? {
            Some(AckOutcome::Recorded) => tracing::info!(
                server_id = %self.instance.server_id,
                hostname = %self.instance.hostname,
                %request_id,
                accepted = ack.accepted,
                %job_id,
                "agent answered a sync request"
            ),
            Some(AckOutcome::AlreadyAcked) => tracing::debug!(
                server_id = %self.instance.server_id,
                %request_id,
                "ignored a repeated sync_ack; the first answer stands"
            ),
            Some(AckOutcome::Unknown) => tracing::warn!(
                server_id = %self.instance.server_id,
                session_id = %self.session_id,
                %request_id,
                "ignored a sync_ack for a request this instance was never sent"
            ),
            None => {}
        }
        Ok(())
    }

    /// Sends this instance's queued requests. Each is claimed in the database first, so that no other stream (on
    /// this or another replica) sends it too; one that cannot be sent goes back in the queue.
    async fn deliver(&mut self) -> ServiceResult<()> {
        let result = self
            .app
            .store
            .claim_sync_requests(
                self.instance.id,
                &self.credential_sha256,
                OffsetDateTime::now_utc(),
            )
            .await;
        let Some(claimed) = self.store_result(result, "polling for sync requests")? else {
            return Ok(());
        };
        for (position, request) in claimed.iter().enumerate() {
            let message = control_message::Message::SyncNow(SyncNowRequest {
                request_id: request.request_id.to_string(),
                requested_at: Some(timestamp(request.requested_at)),
            });
            if let Err(error) = self.send(message).await {
                for unsent in &claimed[position..] {
                    if let Err(release_error) = self
                        .app
                        .store
                        .release_sync_request(self.instance.id, unsent.request_id)
                        .await
                        .map_err(ServiceError::from)
                    {
                        tracing::warn!(
                            request_id = %unsent.request_id,
                            error = %release_error.message,
                            "could not put an unsent sync request back in the queue"
                        );
                    }
                }
                return Err(error);
            }
            tracing::info!(
                server_id = %self.instance.server_id,
                hostname = %self.instance.hostname,
                session_id = %self.session_id,
                request_id = %request.request_id,
                "sync request delivered to the agent"
            );
        }
        Ok(())
    }

    /// Lets a revoked credential end the stream; logs any other store failure once until the store recovers.
    fn store_result<T>(
        &mut self,
        result: Result<T, impl Into<ServiceError>>,
        what: &str,
    ) -> ServiceResult<Option<T>> {
        match result.map_err(Into::into) {
            Ok(value) => {
                if self.store_failing {
                    self.store_failing = false;
                    tracing::info!(session_id = %self.session_id, "the store answers again");
                }
                Ok(Some(value))
            }
            Err(error) if error.kind == ErrorKind::Unauthenticated => Err(error),
            Err(error) => {
                if !self.store_failing {
                    self.store_failing = true;
                    tracing::warn!(
                        server_id = %self.instance.server_id,
                        session_id = %self.session_id,
                        error = %error.message,
                        "{what} failed; the control stream stays open and tries again"
                    );
                }
                Ok(None)
            }
        }
    }

    async fn send(&self, message: control_message::Message) -> ServiceResult<()> {
        let message = ControlMessage {
            message: Some(message),
        };
        match tokio::time::timeout(SEND_TIMEOUT, self.outbound.send(Ok(message))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(ServiceError::new(
                ErrorKind::Unavailable,
                "the agent closed the control stream",
            )),
            Err(_) => Err(ServiceError::new(
                ErrorKind::Unavailable,
                format!(
                    "the agent read nothing from the control stream for {} s: reconnect",
                    SEND_TIMEOUT.as_secs()
                ),
            )),
        }
    }
}

/// Resolves when a "Sync now" for `instance_id` was created on this process (or wake-ups were lost, which may
/// have included one); never when the channel is closed.
async fn next_wakeup(wakeups: &mut broadcast::Receiver<i64>, instance_id: i64) {
    loop {
        match wakeups.recv().await {
            Ok(id) if id == instance_id => return,
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => return,
            Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

/// Resolves once `stop` is `true` or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopping| *stopping).await;
}

fn shutting_down() -> ServiceError {
    ServiceError::new(
        ErrorKind::Unavailable,
        "the aggregator is shutting down: reconnect",
    )
}

fn broken(status: &Status) -> String {
    format!("the stream broke ({}: {})", status.code(), status.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_ids_and_hostnames_are_validated() {
        assert!(parse_server_id("6f1c8a38-5b2e-4a4f-9d44-8d4a4f1b6c01").is_ok());
        for bad in ["", "not-a-uuid", "00000000-0000-0000-0000-000000000000"] {
            let error = parse_server_id(bad).expect_err("refused");
            assert_eq!(error.kind, ErrorKind::InvalidArgument, "{bad:?}");
            assert!(
                error.message.contains("instance.server_id"),
                "{}",
                error.message
            );
        }
        assert_eq!(
            validate_hostname(" ghes.example.com ").ok(),
            Some("ghes.example.com")
        );
        for bad in ["", "   ", "ghes 1", "ghes\u{7}", &"h".repeat(254)] {
            let error = validate_hostname(bad).expect_err("refused");
            assert_eq!(error.kind, ErrorKind::InvalidArgument, "{bad:?}");
            assert!(error.message.contains("hostname"), "{}", error.message);
        }
        assert!(validate_ghes_version("3.14.2").is_ok());
        assert!(validate_ghes_version(&"9".repeat(65)).is_err());
    }

    #[test]
    fn agent_text_is_bounded_and_stripped_of_control_characters() {
        assert_eq!(bounded(" 1.2.3\n ", 64), "1.2.3");
        assert_eq!(bounded("a\u{0}b", 64), "ab");
        assert_eq!(bounded(&"x".repeat(200), 10).len(), 10);
    }
}
