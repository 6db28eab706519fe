//! The connection between agents and the aggregator, in process: the real server (`server::start`) on a temporary
//! SQLite file and `127.0.0.1:0`, driven with the generated tonic clients and the REST API. Covers enrollment
//! (single use, rotation), the connection check, and the control stream (welcome, presence, "Sync now" delivered
//! to the right agent only, acks, requests queued while disconnected, revoked credentials, idle streams).

use std::time::Duration;

use license_sync_aggregator::config::AggregatorConfig;
use license_sync_aggregator::server::{self, RunningServer};
use license_sync_core::model::{InstanceIdentity, ServerUser, SourceReport, UserRole};
use license_sync_core::snapshot::{Snapshot, SnapshotMeta, UsageFile};
use license_sync_proto::convert::{server_user, snapshot_header};
use license_sync_proto::v1::agent_control_client::AgentControlClient;
use license_sync_proto::v1::enrollment_client::EnrollmentClient;
use license_sync_proto::v1::snapshot_chunk::Chunk;
use license_sync_proto::v1::snapshot_ingest_client::SnapshotIngestClient;
use license_sync_proto::v1::{
    AgentHeartbeat, AgentHello, AgentMessage, CheckConnectionRequest, CheckConnectionResponse,
    ControlMessage, EnrollRequest, SnapshotChunk, SnapshotTrailer, SyncAck, UserBatch,
    agent_message, control_message,
};
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::metadata::MetadataValue;
use uuid::Uuid;

/// Long enough for anything that should happen; tests wait for events, never for this.
pub(crate) const PATIENCE: Duration = Duration::from_secs(10);

/// An aggregator on `127.0.0.1:0` with enterprise `acme`; also the harness of the `servers` tests.
pub(crate) struct Harness {
    server: Option<RunningServer>,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
    pub(crate) base: String,
    pub(crate) grpc: String,
    pub(crate) owner_token: String,
}

impl Harness {
    /// An aggregator with enterprise `acme` and its owner token; `configure` adjusts the configuration.
    pub(crate) async fn start(configure: impl FnOnce(&mut AggregatorConfig)) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = AggregatorConfig {
            database_url: format!("sqlite://{}", dir.path().join("aggregator.db").display()),
            grpc_listen: "127.0.0.1:0".parse().expect("address"),
            http_listen: "127.0.0.1:0".parse().expect("address"),
            ..AggregatorConfig::default()
        };
        configure(&mut config);
        config.validate().expect("valid configuration");
        let server = server::start(config).await.expect("server starts");
        let store = &server.app.store;
        license_sync_aggregator::admin::create_enterprise(store, "acme", "Acme", 10)
            .await
            .expect("enterprise");
        let owner_token = license_sync_aggregator::admin::create_api_token(store, "acme", "test")
            .await
            .expect("owner token");
        Harness {
            base: format!("http://{}", server.http_addr),
            grpc: format!("http://{}", server.grpc_addr),
            server: Some(server),
            _dir: dir,
            http: reqwest::Client::new(),
            owner_token,
        }
    }

    pub(crate) fn grpc_url(&self) -> &str {
        &self.grpc
    }

    /// `GET /metrics` as scraped.
    pub(crate) async fn metrics(&self) -> String {
        let response = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("GET /metrics");
        response.text().await.expect("metrics body")
    }

    pub(crate) fn server(&self) -> &RunningServer {
        self.server.as_ref().expect("running")
    }

    /// Stops the server; it must finish even with control streams open.
    pub(crate) async fn shutdown(mut self) {
        let server = self.server.take().expect("running");
        tokio::time::timeout(PATIENCE, server.shutdown())
            .await
            .expect("shutdown finishes with control streams open")
            .expect("clean shutdown");
    }

    pub(crate) async fn rest(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        let response = request.send().await.expect("HTTP request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    async fn owner_post(&self, path: &str, body: Option<&str>) -> (u16, Value) {
        self.rest(reqwest::Method::POST, path, Some(&self.owner_token), body)
            .await
    }

    pub(crate) async fn owner_get(&self, path: &str) -> (u16, Value) {
        self.rest(reqwest::Method::GET, path, Some(&self.owner_token), None)
            .await
    }

    pub(crate) async fn enrollment_token(&self) -> String {
        let (status, body) = self
            .owner_post("/enterprises/acme/enrollment-tokens", None)
            .await;
        assert_eq!(status, 201, "{body}");
        body["token"].as_str().expect("token").to_owned()
    }

    pub(crate) async fn enroll(
        &self,
        token: &str,
        server_id: Uuid,
        hostname: &str,
    ) -> Result<String, tonic::Status> {
        let mut client = EnrollmentClient::connect(self.grpc.clone())
            .await
            .expect("connect");
        let response = client
            .enroll(EnrollRequest {
                enrollment_token: token.to_owned(),
                server_id: server_id.to_string(),
                hostname: hostname.to_owned(),
                ghes_version: "3.14.2".into(),
            })
            .await?
            .into_inner();
        assert_eq!(response.enterprise, "acme");
        assert_eq!(response.server_id, server_id.to_string());
        Ok(response.credential)
    }

    /// A new instance enrolled with a fresh token; returns its credential.
    pub(crate) async fn enrolled(&self, server_id: Uuid, hostname: &str) -> String {
        let token = self.enrollment_token().await;
        self.enroll(&token, server_id, hostname)
            .await
            .expect("enrolled")
    }

    pub(crate) async fn check_connection(
        &self,
        credential: &str,
    ) -> Result<CheckConnectionResponse, tonic::Status> {
        let mut client = EnrollmentClient::connect(self.grpc.clone())
            .await
            .expect("connect");
        let mut request = tonic::Request::new(CheckConnectionRequest {});
        request
            .metadata_mut()
            .insert("authorization", bearer(credential));
        Ok(client.check_connection(request).await?.into_inner())
    }

    pub(crate) async fn upload(
        &self,
        credential: &str,
        snapshot: &Snapshot,
    ) -> Result<(), tonic::Status> {
        let mut client = SnapshotIngestClient::connect(self.grpc.clone())
            .await
            .expect("connect");
        let mut request = tonic::Request::new(futures::stream::iter(chunks(snapshot)));
        request
            .metadata_mut()
            .insert("authorization", bearer(credential));
        client.upload_snapshot(request).await.map(|_| ())
    }

    /// Opens a control stream, says hello, and returns it once `welcome` arrived.
    async fn session(&self, credential: &str) -> Session {
        let (mut session, first) = self
            .open_session(credential, hello())
            .await
            .expect("opened");
        let welcome = first.expect("welcome");
        let Some(control_message::Message::Welcome(welcome)) = welcome.message else {
            panic!("the first control message is not welcome: {welcome:?}");
        };
        session.heartbeat_interval_secs = welcome.heartbeat_interval_secs;
        session
    }

    /// Opens a control stream with `first` as the agent's first message; returns it and the first answer.
    async fn open_session(
        &self,
        credential: &str,
        first: agent_message::Message,
    ) -> Result<(Session, Option<ControlMessage>), tonic::Status> {
        let mut client = AgentControlClient::connect(self.grpc.clone())
            .await
            .expect("connect");
        let (outbound, receiver) = mpsc::channel(16);
        outbound
            .send(AgentMessage {
                message: Some(first),
            })
            .await
            .expect("queue");
        let mut request = tonic::Request::new(ReceiverStream::new(receiver));
        request
            .metadata_mut()
            .insert("authorization", bearer(credential));
        let mut inbound = client.open_session(request).await?.into_inner();
        let first = tokio::time::timeout(PATIENCE, inbound.message())
            .await
            .expect("an answer in time")?;
        Ok((
            Session {
                outbound,
                inbound,
                heartbeat_interval_secs: 0,
            },
            first,
        ))
    }

    async fn status_of(&self, server_id: Uuid) -> Value {
        let (status, body) = self
            .owner_get("/enterprises/acme/license-sync-status")
            .await;
        assert_eq!(status, 200, "{body}");
        body["server_instances"]
            .as_array()
            .expect("instances")
            .iter()
            .find(|instance| instance["server_id"] == server_id.to_string())
            .cloned()
            .expect("instance listed")
    }

    /// Polls the status until `check` holds for the instance.
    async fn wait_for_status(&self, server_id: Uuid, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let status = self.status_of(server_id).await;
            if check(&status) {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "status never matched: {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn sync_request(&self, server_id: Uuid, request_id: &str) -> (u16, Value) {
        self.owner_get(&format!(
            "/enterprises/acme/instances/{server_id}/sync-requests/{request_id}"
        ))
        .await
    }

    async fn wait_for_request_state(
        &self,
        server_id: Uuid,
        request_id: &str,
        state: &str,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let (status, body) = self.sync_request(server_id, request_id).await;
            assert_eq!(status, 200, "{body}");
            if body["state"] == state {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "request never reached {state}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn sync_now(&self, server_id: Uuid) -> (u16, Value) {
        self.owner_post(
            &format!("/enterprises/acme/instances/{server_id}/sync-now"),
            None,
        )
        .await
    }
}

/// An agent's end of a control stream.
struct Session {
    outbound: mpsc::Sender<AgentMessage>,
    inbound: tonic::Streaming<ControlMessage>,
    heartbeat_interval_secs: u32,
}

impl Session {
    async fn send(&self, message: agent_message::Message) {
        self.outbound
            .send(AgentMessage {
                message: Some(message),
            })
            .await
            .expect("stream open");
    }

    /// The next control message within `wait`, `None` if there was none.
    async fn next_within(
        &mut self,
        wait: Duration,
    ) -> Option<Result<Option<ControlMessage>, tonic::Status>> {
        tokio::time::timeout(wait, self.inbound.message())
            .await
            .ok()
    }

    /// The request id of the next `sync_now`.
    async fn expect_sync_now(&mut self) -> String {
        match self.next_within(PATIENCE).await {
            Some(Ok(Some(ControlMessage {
                message: Some(control_message::Message::SyncNow(request)),
            }))) => {
                assert!(request.requested_at.is_some());
                request.request_id
            }
            other => panic!("expected a sync_now, got {other:?}"),
        }
    }

    /// The status the stream ended with.
    async fn expect_end(&mut self) -> tonic::Status {
        loop {
            match self.next_within(PATIENCE).await {
                Some(Err(status)) => return status,
                Some(Ok(None)) => return tonic::Status::ok("closed"),
                Some(Ok(Some(_))) => continue,
                None => panic!("the stream did not end"),
            }
        }
    }
}

pub(crate) fn bearer(credential: &str) -> MetadataValue<tonic::metadata::Ascii> {
    format!("Bearer {credential}").parse().expect("metadata")
}

fn hello() -> agent_message::Message {
    agent_message::Message::Hello(AgentHello {
        agent_version: "9.9.9-test".into(),
        sync_enabled: true,
    })
}

pub(crate) fn snapshot(server_id: Uuid, hostname: &str) -> Snapshot {
    Snapshot {
        meta: SnapshotMeta {
            sync_id: Uuid::new_v4(),
            instance: InstanceIdentity {
                server_id,
                hostname: hostname.to_owned(),
                ghes_version: "3.14.2".into(),
            },
            generated_at: OffsetDateTime::now_utc() - time::Duration::minutes(1),
            license: None,
            source_report: SourceReport::default(),
        },
        users: vec![ServerUser {
            id: 1,
            login: "user1".into(),
            email: "user1@example.com".into(),
            role: UserRole::User,
            suspended: false,
            dormant: false,
            created_at: None,
            last_active: None,
            two_factor_enabled: None,
        }],
    }
}

pub(crate) fn chunks(snapshot: &Snapshot) -> Vec<SnapshotChunk> {
    vec![
        SnapshotChunk {
            chunk: Some(Chunk::Header(snapshot_header(&snapshot.meta))),
        },
        SnapshotChunk {
            chunk: Some(Chunk::Users(UserBatch {
                users: snapshot.users.iter().map(server_user).collect(),
            })),
        },
        SnapshotChunk {
            chunk: Some(Chunk::Trailer(SnapshotTrailer {
                user_count: snapshot.users.len() as u64,
                users_sha256: snapshot.digest().to_vec(),
            })),
        },
    ]
}

#[tokio::test]
async fn enrollment_tokens_are_created_by_owners_with_bounded_lifetimes() {
    let harness = Harness::start(|_| {}).await;
    let path = "/enterprises/acme/enrollment-tokens";
    let (status, body) = harness.owner_post(path, None).await;
    assert_eq!(status, 201, "{body}");
    let token = body["token"].as_str().expect("token");
    assert!(token.starts_with("lse_"), "{body}");
    let expires_at = OffsetDateTime::parse(
        body["expires_at"].as_str().expect("expires_at"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("RFC 3339");
    let lifetime = expires_at - OffsetDateTime::now_utc();
    assert!(
        lifetime > time::Duration::hours(23) && lifetime <= time::Duration::hours(24),
        "default 24 h: {body}"
    );

    let (status, body) = harness
        .owner_post(path, Some(r#"{"expires_in_hours": 2}"#))
        .await;
    assert_eq!(status, 201, "{body}");
    for bad in [
        r#"{"expires_in_hours": 721}"#,
        r#"{"expires_in_hours": 0}"#,
        r#"{"expires_in_hours": "soon"}"#,
        r#"{"expires_in": 2}"#,
        "not json",
    ] {
        let (status, body) = harness.owner_post(path, Some(bad)).await;
        assert_eq!(status, 422, "{bad}: {body}");
        assert!(
            body["message"].is_string() && body["documentation_url"].is_string(),
            "{body}"
        );
    }
    let (status, _) = harness.rest(reqwest::Method::POST, path, None, None).await;
    assert_eq!(status, 401);
    let (status, _) = harness
        .rest(reqwest::Method::POST, path, Some("lst_wrong"), None)
        .await;
    assert_eq!(status, 401);
    let (status, _) = harness
        .owner_post("/enterprises/other/enrollment-tokens", None)
        .await;
    assert_eq!(status, 404, "another enterprise is not found");
    harness.shutdown().await;
}

#[tokio::test]
async fn enrollment_is_single_use_and_re_enrollment_rotates_the_credential() {
    let harness = Harness::start(|_| {}).await;
    let server_id = Uuid::new_v4();
    let token = harness.enrollment_token().await;
    let credential = harness
        .enroll(&token, server_id, "ghes-1.example.com")
        .await
        .expect("enrolled");
    assert!(credential.starts_with("lsi_"));
    let check = harness
        .check_connection(&credential)
        .await
        .expect("the credential works");
    assert_eq!(check.enterprise, "acme");
    assert_eq!(check.server_id, server_id.to_string());
    assert_eq!(check.hostname, "ghes-1.example.com");
    let server_time = check.server_time.expect("server time");
    assert!((server_time.seconds - OffsetDateTime::now_utc().unix_timestamp()).abs() < 60);
    harness
        .upload(&credential, &snapshot(server_id, "ghes-1.example.com"))
        .await
        .expect("the credential syncs");

    // The token is spent, whoever tries it.
    for other in [server_id, Uuid::new_v4()] {
        let reused = harness
            .enroll(&token, other, "ghes-2.example.com")
            .await
            .expect_err("used token");
        assert_eq!(reused.code(), Code::Unauthenticated);
        assert!(reused.message().contains("new one"), "{}", reused.message());
    }
    let unknown = harness
        .enroll("lse_never_issued", Uuid::new_v4(), "ghes-3")
        .await
        .expect_err("unknown token");
    assert_eq!(unknown.code(), Code::Unauthenticated);

    // Bad identities are refused before the token is spent.
    let fresh = harness.enrollment_token().await;
    for (bad_server, bad_host) in [
        ("not-a-uuid", "ghes-4"),
        (&*Uuid::nil().to_string(), "ghes-4"),
    ] {
        let mut client = EnrollmentClient::connect(harness.grpc.clone())
            .await
            .expect("connect");
        let refused = client
            .enroll(EnrollRequest {
                enrollment_token: fresh.clone(),
                server_id: bad_server.to_owned(),
                hostname: bad_host.to_owned(),
                ghes_version: String::new(),
            })
            .await
            .expect_err("bad server id");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    }
    let refused = harness
        .enroll(&fresh, Uuid::new_v4(), "ghes 4")
        .await
        .expect_err("bad hostname");
    assert_eq!(refused.code(), Code::InvalidArgument);

    // Re-enrolling the same server id with a new token rotates: the old credential stops working everywhere.
    let rotated = harness
        .enroll(&fresh, server_id, "ghes-1.example.com")
        .await
        .expect("re-enrolled");
    assert_ne!(rotated, credential);
    let old = harness
        .check_connection(&credential)
        .await
        .expect_err("old credential");
    assert_eq!(old.code(), Code::Unauthenticated);
    let old_upload = harness
        .upload(&credential, &snapshot(server_id, "ghes-1.example.com"))
        .await
        .expect_err("old credential");
    assert_eq!(old_upload.code(), Code::Unauthenticated);
    harness
        .check_connection(&rotated)
        .await
        .expect("new credential works");
    harness
        .upload(&rotated, &snapshot(server_id, "ghes-1.example.com"))
        .await
        .expect("new credential syncs");

    // A check without a credential is refused.
    let mut client = EnrollmentClient::connect(harness.grpc.clone())
        .await
        .expect("connect");
    let anonymous = client
        .check_connection(CheckConnectionRequest {})
        .await
        .expect_err("no credential");
    assert_eq!(anonymous.code(), Code::Unauthenticated);

    // Another enterprise's token cannot take this server id.
    let store = &harness.server().app.store;
    license_sync_aggregator::admin::create_enterprise(store, "other", "Other", 1)
        .await
        .expect("enterprise");
    let other = store
        .enterprise_by_slug("other")
        .await
        .expect("read")
        .expect("exists");
    let issued = license_sync_aggregator::control::issue_enrollment_token(store, &other, None)
        .await
        .expect("token");
    let mut client = EnrollmentClient::connect(harness.grpc.clone())
        .await
        .expect("connect");
    let stolen = client
        .enroll(EnrollRequest {
            enrollment_token: issued.token,
            server_id: server_id.to_string(),
            hostname: "ghes-1.example.com".into(),
            ghes_version: String::new(),
        })
        .await
        .expect_err("acme's instance");
    // Answered as a refused token, so that the answer does not say the server id exists in another enterprise.
    let bogus = client
        .enroll(EnrollRequest {
            enrollment_token: "lse_no-such-token".into(),
            server_id: Uuid::new_v4().to_string(),
            hostname: "ghes-9.example.com".into(),
            ghes_version: String::new(),
        })
        .await
        .expect_err("unknown token");
    assert_eq!(stolen.code(), Code::Unauthenticated, "{stolen:?}");
    assert_eq!(stolen.message(), bogus.message());
    assert!(
        !stolen.message().contains("another enterprise"),
        "{stolen:?}"
    );
    harness
        .check_connection(&rotated)
        .await
        .expect("acme's credential still works");
    harness.shutdown().await;
}

/// A usage file names its server id: the upload answers 404 alike for another enterprise's server id and for an
/// unknown one (no existence oracle), and creates no instance (no squatting a server id by uploading first).
#[tokio::test]
async fn uploads_for_unknown_or_foreign_server_ids_are_one_404_and_create_nothing() {
    let harness = Harness::start(|_| {}).await;
    let store = &harness.server().app.store;
    license_sync_aggregator::admin::create_enterprise(store, "other", "Other", 1)
        .await
        .expect("enterprise");
    let other_token = license_sync_aggregator::admin::create_api_token(store, "other", "test")
        .await
        .expect("token");
    let acme_server = Uuid::new_v4();
    harness.enrolled(acme_server, "ghes-1.example.com").await;
    let upload = |server_id: Uuid| {
        let file = UsageFile::from_snapshot(snapshot(server_id, "ghes-x.example.com"));
        let body = serde_json::to_string(&file).expect("json");
        let harness = &harness;
        let token = other_token.clone();
        async move {
            harness
                .rest(
                    reqwest::Method::POST,
                    "/enterprises/other/server-usage",
                    Some(&token),
                    Some(&body),
                )
                .await
        }
    };

    let (foreign_status, foreign) = upload(acme_server).await;
    let unknown_server = Uuid::new_v4();
    let (unknown_status, unknown) = upload(unknown_server).await;
    assert_eq!(foreign_status, 404, "{foreign}");
    assert_eq!(unknown_status, 404, "{unknown}");
    let neutral = |body: &Value, server_id: Uuid| {
        body["message"]
            .as_str()
            .expect("message")
            .replace(&server_id.to_string(), "ID")
    };
    assert_eq!(
        neutral(&foreign, acme_server),
        neutral(&unknown, unknown_server)
    );
    assert!(
        unknown["message"]
            .as_str()
            .is_some_and(|m| m.contains("instance add")),
        "{unknown}"
    );

    let (status, listed) = harness
        .rest(
            reqwest::Method::GET,
            "/enterprises/other/license-sync-status",
            Some(&other_token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{listed}");
    assert!(
        !listed.to_string().contains(&unknown_server.to_string()),
        "the upload created no instance: {listed}"
    );
    assert!(
        store
            .instance_by_server_id(
                store
                    .enterprise_by_slug("other")
                    .await
                    .expect("read")
                    .expect("exists")
                    .id,
                unknown_server
            )
            .await
            .expect("read")
            .is_none()
    );
    harness.shutdown().await;
}

#[tokio::test]
async fn sync_now_reaches_the_right_agent_only_and_its_answer_is_visible() {
    // No polling to speak of: delivery must come from the in-process wake-up.
    let harness = Harness::start(|config| config.control_poll_interval_ms = 60_000).await;
    let (server_a, server_b) = (Uuid::new_v4(), Uuid::new_v4());
    let credential_a = harness.enrolled(server_a, "ghes-a.example.com").await;
    let credential_b = harness.enrolled(server_b, "ghes-b.example.com").await;
    let mut a = harness.session(&credential_a).await;
    let mut b = harness.session(&credential_b).await;
    assert_eq!(a.heartbeat_interval_secs, 30, "the configured default");

    // Presence: hello is recorded before welcome; a heartbeat updates it.
    a.send(agent_message::Message::Heartbeat(AgentHeartbeat {
        sync_enabled: false,
        pending_deliveries: 2,
    }))
    .await;
    let status = harness
        .wait_for_status(server_a, |status| status["pending_deliveries"] == 2)
        .await;
    assert_eq!(status["agent_connected"], true, "{status}");
    assert_eq!(status["agent_sync_enabled"], false, "{status}");
    assert_eq!(status["agent_version"], "9.9.9-test", "{status}");
    assert!(status["agent_last_seen_date"].is_string(), "{status}");
    let status_b = harness.status_of(server_b).await;
    assert_eq!(status_b["agent_connected"], true, "{status_b}");
    assert_eq!(status_b["agent_sync_enabled"], true, "{status_b}");

    let (status, body) = harness.sync_now(server_a).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["state"], "queued", "{body}");
    assert_eq!(body["agent_connected"], true, "{body}");
    let request_id = body["request_id"].as_str().expect("request id").to_owned();
    assert!(
        body["url"]
            .as_str()
            .is_some_and(|url| url.ends_with(&format!("/sync-requests/{request_id}"))),
        "{body}"
    );

    assert_eq!(a.expect_sync_now().await, request_id);
    assert!(
        b.next_within(Duration::from_millis(1500)).await.is_none(),
        "B must not receive A's request"
    );
    let delivered = harness
        .wait_for_request_state(server_a, &request_id, "delivered")
        .await;
    assert!(delivered["delivered_at"].is_string(), "{delivered}");
    assert!(delivered["acked_at"].is_null(), "{delivered}");
    // The request is not visible under another instance.
    let (status, _) = harness.sync_request(server_b, &request_id).await;
    assert_eq!(status, 404);

    // B answering A's request changes nothing; A's answer is what owners see.
    b.send(agent_message::Message::SyncAck(SyncAck {
        request_id: request_id.clone(),
        accepted: false,
        job_id: String::new(),
        reason: "not mine".into(),
    }))
    .await;
    a.send(agent_message::Message::SyncAck(SyncAck {
        request_id: request_id.clone(),
        accepted: true,
        job_id: "job-1".into(),
        reason: String::new(),
    }))
    .await;
    let accepted = harness
        .wait_for_request_state(server_a, &request_id, "accepted")
        .await;
    assert_eq!(accepted["job_id"], "job-1", "{accepted}");
    assert!(accepted["reason"].is_null(), "{accepted}");
    assert!(accepted["acked_at"].is_string(), "{accepted}");
    assert_eq!(accepted["server_id"], server_a.to_string());

    // A refusal is shown with its reason.
    let (_, body) = harness.sync_now(server_b).await;
    let request_b = body["request_id"].as_str().expect("request id").to_owned();
    assert_eq!(b.expect_sync_now().await, request_b);
    b.send(agent_message::Message::SyncAck(SyncAck {
        request_id: request_b.clone(),
        accepted: false,
        job_id: String::new(),
        reason: "license sync is disabled on this agent".into(),
    }))
    .await;
    let refused = harness
        .wait_for_request_state(server_b, &request_b, "refused")
        .await;
    assert_eq!(refused["reason"], "license sync is disabled on this agent");
    assert!(
        a.next_within(Duration::from_millis(300)).await.is_none(),
        "A must not receive B's request"
    );

    // Bad and unknown targets.
    let (status, body) = harness.sync_now(Uuid::new_v4()).await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = harness
        .owner_post("/enterprises/acme/instances/not-a-uuid/sync-now", None)
        .await;
    assert_eq!(status, 422);
    let (status, _) = harness
        .sync_request(server_a, &Uuid::new_v4().to_string())
        .await;
    assert_eq!(status, 404);
    let (status, _) = harness
        .rest(
            reqwest::Method::POST,
            &format!("/enterprises/acme/instances/{server_a}/sync-now"),
            None,
            None,
        )
        .await;
    assert_eq!(status, 401);
    harness
        .server()
        .app
        .store
        .retire_instance(
            harness
                .server()
                .app
                .store
                .enterprise_by_slug("acme")
                .await
                .expect("read")
                .expect("exists")
                .id,
            server_b,
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("retire");
    let (status, _) = harness.sync_now(server_b).await;
    assert_eq!(status, 404, "a retired instance");
    // Polling is off in this test: the next heartbeat finds the credential revoked.
    b.send(agent_message::Message::Heartbeat(AgentHeartbeat::default()))
        .await;
    assert_eq!(
        b.expect_end().await.code(),
        Code::Unauthenticated,
        "a retired instance's stream is closed"
    );
    harness.shutdown().await;
}

#[tokio::test]
async fn requests_queued_while_disconnected_or_on_another_replica_are_delivered() {
    let harness = Harness::start(|config| config.control_poll_interval_ms = 200).await;
    let server_id = Uuid::new_v4();
    let credential = harness.enrolled(server_id, "ghes-1.example.com").await;
    let status = harness.status_of(server_id).await;
    assert_eq!(status["agent_connected"], false, "{status}");
    assert!(status["agent_last_seen_date"].is_null(), "{status}");
    assert!(status["agent_sync_enabled"].is_null(), "{status}");

    let (status, body) = harness.sync_now(server_id).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["agent_connected"], false, "{body}");
    let queued = body["request_id"].as_str().expect("request id").to_owned();
    let (_, body) = harness.sync_request(server_id, &queued).await;
    assert_eq!(body["state"], "queued", "{body}");

    let mut session = harness.session(&credential).await;
    assert_eq!(session.expect_sync_now().await, queued);
    harness
        .wait_for_status(server_id, |status| status["agent_connected"] == true)
        .await;

    // Created by "another replica": straight in the database, no in-process wake-up; the poll finds it.
    let store = &harness.server().app.store;
    let acme = store
        .enterprise_by_slug("acme")
        .await
        .expect("read")
        .expect("exists");
    let elsewhere = store
        .create_sync_request(
            acme.id,
            server_id,
            Uuid::now_v7(),
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("queued");
    assert_eq!(
        session.expect_sync_now().await,
        elsewhere.request_id.to_string()
    );

    // The agent goes away: the status says so at once (the stream's end is recorded).
    drop(session);
    harness
        .wait_for_status(server_id, |status| status["agent_connected"] == false)
        .await;
    harness.shutdown().await;
}

#[tokio::test]
async fn control_streams_need_a_live_credential_and_a_talking_agent() {
    let harness = Harness::start(|config| {
        config.agent_heartbeat_interval_secs = 1;
        config.control_poll_interval_ms = 100;
    })
    .await;
    let server_id = Uuid::new_v4();
    let credential = harness.enrolled(server_id, "ghes-1.example.com").await;

    let refused = harness
        .open_session("lsi_not_a_credential", hello())
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.code(), Code::Unauthenticated);

    let no_hello = harness
        .open_session(
            &credential,
            agent_message::Message::Heartbeat(AgentHeartbeat::default()),
        )
        .await
        .err()
        .expect("hello first");
    assert_eq!(no_hello.code(), Code::FailedPrecondition, "{no_hello:?}");
    assert!(no_hello.message().contains("hello"), "{no_hello:?}");

    // Silent for three heartbeat intervals: closed.
    let mut silent = harness.session(&credential).await;
    assert_eq!(silent.heartbeat_interval_secs, 1);
    let started = tokio::time::Instant::now();
    let ended = silent.expect_end().await;
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );

    // Heartbeats keep it open; re-enrolling (rotation) closes it as unauthenticated.
    let mut talking = harness.session(&credential).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        talking
            .send(agent_message::Message::Heartbeat(AgentHeartbeat {
                sync_enabled: true,
                pending_deliveries: 0,
            }))
            .await;
    }
    assert!(
        talking
            .next_within(Duration::from_millis(100))
            .await
            .is_none(),
        "still open after 3.2 s of heartbeats"
    );
    let token = harness.enrollment_token().await;
    let rotated = harness
        .enroll(&token, server_id, "ghes-1.example.com")
        .await
        .expect("re-enrolled");
    let ended = talking.expect_end().await;
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert!(ended.message().contains("enroll"), "{ended:?}");

    // The shutdown below must end this stream too.
    let _open = harness.session(&rotated).await;
    harness.shutdown().await;
}
