//! The control stream: a long-lived `AgentControl.OpenSession` over which the aggregator asks for a sync.
//!
//! The agent says `hello`, then sends a `heartbeat` (license sync enabled, pending deliveries) at the interval the
//! aggregator's `welcome` gives, and at once whenever the settings change. A `sync_now` starts or joins a job
//! exactly like the local Sync now and is answered with `sync_ack` (the job id, or why not). When the stream ends
//! the agent reconnects with exponential backoff and full jitter; when the aggregator refuses the credential
//! (UNAUTHENTICATED) the status says "credential refused, re-enroll" and the agent waits long
//! ([`AUTH_RETRY`]) — or until a new credential is enrolled — instead of retrying in a loop.

use std::sync::Arc;
use std::time::Duration;

use license_sync_proto::v1::agent_control_client::AgentControlClient;
use license_sync_proto::v1::{
    AgentHeartbeat, AgentHello, AgentMessage, SyncAck, agent_message, control_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::jobs::Trigger;
use super::{ControlState, Sidecar, wait_until};
use crate::config::Secret;
use crate::enrollment_client::ResolvedCredential;
use crate::error::{AgentError, error_chain};
use crate::retry::Backoff;
use crate::state::ErrorReport;
use crate::upload_client::{ChannelKind, authorization, connect_channel, status_error};

/// Wait after the aggregator refused the credential: retrying sooner cannot help, a new enrollment can (and ends
/// the wait at once).
pub const AUTH_RETRY: Duration = Duration::from_secs(15 * 60);

/// How often to look at the state directory for a new credential while waiting (the CLI's `enroll` writes it
/// without telling the running agent).
const CREDENTIAL_POLL: Duration = Duration::from_secs(2);

/// How long the aggregator has to say `welcome` after the session opened.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);

/// Heartbeat interval when the aggregator gives none, and the bounds of the one it gives.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);
const MAX_HEARTBEAT: Duration = Duration::from_secs(300);

enum SessionEnd {
    Shutdown,
    CredentialChanged,
    Failed {
        established: bool,
        error: AgentError,
    },
}

pub(super) async fn run(sidecar: Arc<Sidecar>) {
    let config = &sidecar.settings_config;
    let mut backoff = Backoff::full_jitter(config.retry_initial, config.retry_max);
    let mut shutdown = sidecar.shutdown.subscribe();
    let mut credentials = sidecar.credential_generation.subscribe();

    loop {
        if sidecar.shutting_down() {
            return;
        }
        // The credential is read just below: an enrollment before this point needs no reconnect of its own.
        credentials.borrow_and_update();
        let credential = match sidecar.credential() {
            Ok(credential) => credential,
            Err(error) => {
                let state = if matches!(error, AgentError::NotEnrolled) {
                    ControlState::NotEnrolled
                } else {
                    ControlState::Disconnected
                };
                set_control(&sidecar, state, None, Some(ErrorReport::from(&error)));
                if wait_for_new_credential(&sidecar, None, config.retry_max.max(CREDENTIAL_POLL))
                    .await
                    .is_none()
                {
                    return;
                }
                continue;
            }
        };
        set_control(&sidecar, ControlState::Connecting, Some(&credential), None);
        let end = session(&sidecar, &credential, &mut shutdown, &mut credentials).await;
        match end {
            SessionEnd::Shutdown => return,
            SessionEnd::CredentialChanged => {
                tracing::info!(
                    "a new credential was enrolled: reconnecting the control stream with it"
                );
                backoff.reset();
            }
            SessionEnd::Failed { established, error } => {
                sidecar.inner().counters.control_failures += 1;
                if established {
                    backoff.reset();
                }
                if matches!(error, AgentError::AggregatorCredentials { .. }) {
                    let first = sidecar.inner().control.state != ControlState::CredentialRefused;
                    sidecar.credential_refused(&error);
                    let retry_at = sidecar.now() + AUTH_RETRY;
                    sidecar.inner().control.next_attempt_at = Some(retry_at);
                    if first {
                        tracing::error!(
                            error = %error_chain(&error),
                            "the aggregator refused the instance credential (credential refused, re-enroll); \
                             not retrying before a new enrollment or {} minutes",
                            AUTH_RETRY.as_secs() / 60
                        );
                    }
                    if wait_for_new_credential(&sidecar, Some(&credential.secret), AUTH_RETRY)
                        .await
                        .is_none()
                    {
                        return;
                    }
                } else {
                    let delay = backoff.next_delay();
                    let retry_at = sidecar.now() + delay;
                    tracing::warn!(
                        kind = error.kind(),
                        error = %error_chain(&error),
                        retry_in_ms = delay.as_millis() as u64,
                        "the control stream to the aggregator ended; reconnecting"
                    );
                    set_control(
                        &sidecar,
                        ControlState::Disconnected,
                        Some(&credential),
                        Some(ErrorReport::from(&error)),
                    );
                    sidecar.inner().control.next_attempt_at = Some(retry_at);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = credentials.changed() => backoff.reset(),
                        _ = wait_until(&mut shutdown, |stopping| *stopping) => return,
                    }
                }
            }
        }
    }
}

/// Waits until the credential differs from `refused` (a new enrollment), `max` passed, or the agent stops
/// (`None`).
async fn wait_for_new_credential(
    sidecar: &Arc<Sidecar>,
    refused: Option<&Secret>,
    max: Duration,
) -> Option<()> {
    let mut shutdown = sidecar.shutdown.subscribe();
    let mut credentials = sidecar.credential_generation.subscribe();
    let deadline = tokio::time::Instant::now() + max;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Some(()),
            _ = credentials.changed() => return Some(()),
            _ = tokio::time::sleep(CREDENTIAL_POLL) => {
                match (sidecar.credential(), refused) {
                    (Ok(now), Some(refused)) if now.secret != *refused => return Some(()),
                    (Ok(_), None) => return Some(()),
                    _ => {}
                }
            }
            _ = wait_until(&mut shutdown, |stopping| *stopping) => return None,
        }
    }
}

fn set_control(
    sidecar: &Sidecar,
    state: ControlState,
    credential: Option<&ResolvedCredential>,
    error: Option<ErrorReport>,
) {
    let now = sidecar.now();
    let mut inner = sidecar.inner();
    let control = &mut inner.control;
    // Keep "credential refused" visible while reconnecting with the same credential.
    if control.state == ControlState::CredentialRefused && state == ControlState::Connecting {
        return;
    }
    if control.state != state {
        control.since = Some(now);
    }
    control.state = state;
    control.error = error;
    control.next_attempt_at = None;
    if let Some(credential) = credential {
        control.credential_source = Some(credential.source);
        if credential.enterprise.is_some() {
            control.enterprise = credential.enterprise.clone();
        }
    }
    if state != ControlState::Connected {
        control.heartbeat_interval_secs = None;
    }
}

fn message(message: agent_message::Message) -> AgentMessage {
    AgentMessage {
        message: Some(message),
    }
}

fn heartbeat(sidecar: &Sidecar) -> AgentMessage {
    let pending = sidecar.inner().pending;
    message(agent_message::Message::Heartbeat(AgentHeartbeat {
        sync_enabled: sidecar.enabled(),
        pending_deliveries: u32::try_from(pending).unwrap_or(u32::MAX),
    }))
}

async fn session(
    sidecar: &Arc<Sidecar>,
    credential: &ResolvedCredential,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    credentials: &mut tokio::sync::watch::Receiver<u64>,
) -> SessionEnd {
    let failed = |error| SessionEnd::Failed {
        established: false,
        error,
    };
    let aggregator = match sidecar.config.aggregator() {
        Ok(aggregator) => aggregator,
        Err(error) => return failed(error.into()),
    };
    let authorization = match authorization(&credential.secret) {
        Ok(value) => value,
        Err(error) => return failed(error),
    };
    let connected = tokio::select! {
        connected = connect_channel(aggregator, ChannelKind::Session) => connected,
        _ = wait_until(shutdown, |stopping| *stopping) => return SessionEnd::Shutdown,
    };
    let (channel, endpoint) = match connected {
        Ok(connected) => connected,
        Err(error) => return failed(error),
    };
    let (outbound, receiver) = mpsc::channel::<AgentMessage>(16);
    let hello = message(agent_message::Message::Hello(AgentHello {
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        sync_enabled: sidecar.enabled(),
    }));
    if outbound.send(hello).await.is_err() {
        return failed(AgentError::Internal(
            "the control stream's queue closed".into(),
        ));
    }
    let mut request = tonic::Request::new(ReceiverStream::new(receiver));
    request
        .metadata_mut()
        .insert("authorization", authorization);
    let mut client = AgentControlClient::new(channel);
    let opened = tokio::select! {
        opened = client.open_session(request) => opened,
        _ = wait_until(shutdown, |stopping| *stopping) => return SessionEnd::Shutdown,
        _ = credentials.changed() => return SessionEnd::CredentialChanged,
    };
    let mut inbound = match opened {
        Ok(response) => response.into_inner(),
        Err(status) => return failed(status_error(&endpoint, status)),
    };
    let welcome = tokio::select! {
        welcome = tokio::time::timeout(WELCOME_TIMEOUT, inbound.message()) => welcome,
        _ = wait_until(shutdown, |stopping| *stopping) => return SessionEnd::Shutdown,
    };
    let interval = match welcome {
        Ok(Ok(Some(control))) => match control.message {
            Some(control_message::Message::Welcome(welcome)) => {
                heartbeat_interval(welcome.heartbeat_interval_secs)
            }
            _ => {
                return failed(AgentError::Protocol(
                    "the aggregator's first control message is not `welcome`".into(),
                ));
            }
        },
        Ok(Ok(None)) => {
            return failed(AgentError::AggregatorUnavailable {
                endpoint,
                reason: "the aggregator closed the control stream before its welcome".into(),
            });
        }
        Ok(Err(status)) => return failed(status_error(&endpoint, status)),
        Err(_) => {
            return failed(AgentError::AggregatorTimeout {
                endpoint,
                reason: format!(
                    "no welcome on the control stream within {}s",
                    WELCOME_TIMEOUT.as_secs()
                ),
            });
        }
    };
    {
        let now = sidecar.now();
        let mut inner = sidecar.inner();
        inner.counters.control_sessions += 1;
        let control = &mut inner.control;
        control.state = ControlState::Connected;
        control.since = Some(now);
        control.error = None;
        control.next_attempt_at = None;
        control.credential_source = Some(credential.source);
        control.heartbeat_interval_secs = Some(interval.as_secs() as u32);
        if credential.enterprise.is_some() {
            control.enterprise = credential.enterprise.clone();
        }
    }
    tracing::info!(
        heartbeat_secs = interval.as_secs(),
        "the control stream to the aggregator is open"
    );

    let established = |error| SessionEnd::Failed {
        established: true,
        error,
    };
    let mut settings = sidecar.settings.subscribe();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if outbound.send(heartbeat(sidecar)).await.is_err() {
                    return established(closed(&endpoint));
                }
            }
            changed = settings.changed() => {
                if changed.is_ok() && outbound.send(heartbeat(sidecar)).await.is_err() {
                    return established(closed(&endpoint));
                }
            }
            received = inbound.message() => match received {
                Ok(Some(control)) => match control.message {
                    Some(control_message::Message::SyncNow(request)) => {
                        let ack = sync_now(sidecar, request.request_id);
                        if outbound.send(message(agent_message::Message::SyncAck(ack))).await.is_err() {
                            return established(closed(&endpoint));
                        }
                    }
                    Some(control_message::Message::Welcome(welcome)) => {
                        let interval = heartbeat_interval(welcome.heartbeat_interval_secs);
                        ticker = tokio::time::interval(interval);
                        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        ticker.tick().await;
                        sidecar.inner().control.heartbeat_interval_secs = Some(interval.as_secs() as u32);
                    }
                    None => tracing::debug!("ignored an empty control message (from a newer aggregator?)"),
                },
                Ok(None) => return established(closed(&endpoint)),
                Err(status) => return established(status_error(&endpoint, status)),
            },
            _ = credentials.changed() => return SessionEnd::CredentialChanged,
            _ = wait_until(shutdown, |stopping| *stopping) => return SessionEnd::Shutdown,
        }
    }
}

fn closed(endpoint: &str) -> AgentError {
    AgentError::AggregatorUnavailable {
        endpoint: endpoint.to_owned(),
        reason: "the aggregator closed the control stream".into(),
    }
}

fn heartbeat_interval(secs: u32) -> Duration {
    if secs == 0 {
        DEFAULT_HEARTBEAT
    } else {
        Duration::from_secs(u64::from(secs)).min(MAX_HEARTBEAT)
    }
}

/// A sync requested by the aggregator: start or join a job like the local Sync now.
fn sync_now(sidecar: &Arc<Sidecar>, request_id: String) -> SyncAck {
    match sidecar.start_or_join(Trigger::Cloud {
        request_id: request_id.clone(),
    }) {
        Ok(ticket) => {
            tracing::info!(%request_id, job_id = %ticket.job.id, joined = ticket.joined, "the aggregator asked for a sync");
            SyncAck {
                request_id,
                accepted: true,
                job_id: ticket.job.id.to_string(),
                reason: String::new(),
            }
        }
        Err(error) => {
            tracing::info!(%request_id, kind = error.kind(), "refused the aggregator's sync request");
            SyncAck {
                request_id,
                accepted: false,
                job_id: String::new(),
                reason: error.to_string(),
            }
        }
    }
}
