//! The gRPC ingest against one hostile instance credential, in process over real gRPC: concurrent streams are
//! limited per instance and in all (a cut stream frees its slot), each stream has a byte, message and time budget,
//! rows are checked for their field lengths as their batch arrives, an oversized message is `RESOURCE_EXHAUSTED`,
//! a cut stream counts as cancelled, and a hostname is unique among an enterprise's live instances.

use std::time::Instant;

use license_sync_core::model::ServerUser;
use license_sync_core::snapshot::Snapshot;
use license_sync_proto::convert::server_user;
use license_sync_proto::v1::snapshot_chunk::Chunk;
use license_sync_proto::v1::snapshot_ingest_client::SnapshotIngestClient;
use license_sync_proto::v1::{SnapshotChunk, SyncReceipt, UserBatch};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use uuid::Uuid;

use crate::control::{Harness, PATIENCE, bearer, chunks, snapshot};
use crate::store_suite::user;

const UPLOAD_METHOD: &str = "/licensesync.v1.SnapshotIngest/UploadSnapshot";

/// A snapshot stream held open by the test: send chunks through `sender`, read the answer from `call`.
struct OpenStream {
    sender: mpsc::Sender<SnapshotChunk>,
    call: JoinHandle<Result<SyncReceipt, tonic::Status>>,
}

impl OpenStream {
    async fn open(harness: &Harness, credential: &str) -> OpenStream {
        let (sender, receiver) = mpsc::channel(64);
        let mut client = SnapshotIngestClient::connect(harness.grpc_url().to_owned())
            .await
            .expect("connect");
        let mut request = tonic::Request::new(ReceiverStream::new(receiver));
        request
            .metadata_mut()
            .insert("authorization", bearer(credential));
        let call = tokio::spawn(async move {
            client
                .upload_snapshot(request)
                .await
                .map(tonic::Response::into_inner)
        });
        OpenStream { sender, call }
    }

    async fn send(&self, chunk: SnapshotChunk) {
        // A refused stream stops reading; its answer is what the test looks at.
        let _ = self.sender.send(chunk).await;
    }

    /// Sends the rest of `snapshot` (everything after its header) and returns the answer.
    async fn finish(self, snapshot: &Snapshot) -> Result<SyncReceipt, tonic::Status> {
        for chunk in chunks(snapshot).into_iter().skip(1) {
            self.send(chunk).await;
        }
        let OpenStream { sender, call } = self;
        drop(sender);
        answer_of(call).await
    }

    async fn answer(self) -> Result<SyncReceipt, tonic::Status> {
        answer_of(self.call).await
    }
}

async fn answer_of(
    call: JoinHandle<Result<SyncReceipt, tonic::Status>>,
) -> Result<SyncReceipt, tonic::Status> {
    tokio::time::timeout(PATIENCE, call)
        .await
        .expect("answered in time")
        .expect("call task")
}

fn header(snapshot: &Snapshot) -> SnapshotChunk {
    chunks(snapshot).remove(0)
}

fn batch(users: &[ServerUser]) -> SnapshotChunk {
    SnapshotChunk {
        chunk: Some(Chunk::Users(UserBatch {
            users: users.iter().map(server_user).collect(),
        })),
    }
}

fn users(count: i64) -> Vec<ServerUser> {
    (1..=count)
        .map(|id| user(id, &format!("user{id}")))
        .collect()
}

/// The value of the sample of `name` whose labels include every one of `labels` (`key="value"`).
fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
        (series_name == name && labels.iter().all(|label| series_labels.contains(label)))
            .then(|| value.parse().ok())
            .flatten()
    })
}

/// Waits until the aggregator shows `open` snapshot streams open.
async fn wait_for_open_streams(harness: &Harness, open: f64) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let metrics = harness.metrics().await;
        if sample(&metrics, "license_sync_ingest_streams_open", &[]) == Some(open) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never {open} streams open:\n{metrics}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

pub(crate) async fn instance(harness: &Harness, hostname: &str) -> (Uuid, String) {
    let server_id = Uuid::new_v4();
    let (_, credential) = license_sync_aggregator::admin::add_instance(
        &harness.server().app.store,
        "acme",
        server_id,
        hostname,
    )
    .await
    .expect("instance");
    (server_id, credential)
}

async fn consumed(harness: &Harness) -> u64 {
    let (status, body) = harness
        .owner_get("/enterprises/acme/consumed-licenses")
        .await;
    assert_eq!(status, 200, "{body}");
    body["total_seats_consumed"].as_u64().expect("count")
}

/// Ends a test of refusals: `count` were counted under `reason`, and nothing was stored.
async fn refused_and_nothing_stored(harness: Harness, reason: &str, count: f64) {
    let metrics = harness.metrics().await;
    let label = format!("reason=\"{reason}\"");
    assert_eq!(
        sample(&metrics, "license_sync_rows_rejected_total", &[&label]),
        Some(count),
        "{metrics}"
    );
    assert_eq!(consumed(&harness).await, 0);
    harness.shutdown().await;
}

#[tokio::test]
async fn concurrent_streams_are_limited_per_instance_and_in_all() {
    let harness = Harness::start(|config| {
        config.ingest_max_streams_per_instance = 2;
        config.ingest_max_streams = 3;
    })
    .await;
    let (a, credential_a) = instance(&harness, "ghes-a.test").await;
    let (b, credential_b) = instance(&harness, "ghes-b.test").await;

    let first_snapshot = snapshot(a, "ghes-a.test");
    let first = OpenStream::open(&harness, &credential_a).await;
    first.send(header(&first_snapshot)).await;
    let second = OpenStream::open(&harness, &credential_a).await;
    second.send(header(&snapshot(a, "ghes-a.test"))).await;
    wait_for_open_streams(&harness, 2.0).await;

    // A third stream of the same credential is refused at once, saying what to do, with gRPC's retry pushback.
    let third = OpenStream::open(&harness, &credential_a).await;
    let refused = third.answer().await.expect_err("over the instance's limit");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .contains("ingest_max_streams_per_instance")
            && refused.message().contains("wait for the running sync"),
        "{}",
        refused.message()
    );
    assert!(refused.metadata().get("grpc-retry-pushback-ms").is_some());

    // Another instance takes the last slot of the process; then the process is full.
    let other = OpenStream::open(&harness, &credential_b).await;
    other.send(header(&snapshot(b, "ghes-b.test"))).await;
    wait_for_open_streams(&harness, 3.0).await;
    let full = OpenStream::open(&harness, &credential_b)
        .await
        .answer()
        .await
        .expect_err("over the process's limit");
    assert_eq!(full.code(), Code::ResourceExhausted);
    assert!(
        full.message().contains("ingest_max_streams`"),
        "{}",
        full.message()
    );

    // A stream that ends frees its slot: the next one of the same instance is accepted and committed.
    first
        .finish(&first_snapshot)
        .await
        .expect("first committed");
    wait_for_open_streams(&harness, 2.0).await;
    let next_snapshot = snapshot(a, "ghes-a.test");
    let next = OpenStream::open(&harness, &credential_a).await;
    next.send(header(&next_snapshot)).await;
    let receipt = next
        .finish(&next_snapshot)
        .await
        .expect("accepted after one ended");
    assert_eq!(receipt.users_accepted, 1);

    // So does a stream the client cuts.
    second.call.abort();
    drop(second.sender);
    wait_for_open_streams(&harness, 1.0).await;
    drop(other);
    wait_for_open_streams(&harness, 0.0).await;
    harness.shutdown().await;
}

#[tokio::test]
async fn stream_budgets_refuse_what_is_over_them_and_store_nothing() {
    let harness = Harness::start(|config| {
        config.max_message_bytes = 64 * 1024;
        config.ingest_max_stream_bytes = Some(64 * 1024);
        config.ingest_max_stream_messages = Some(6);
        config.ingest_stream_max_secs = 2;
        config.stream_idle_timeout_secs = 1;
    })
    .await;
    let (server_id, credential) = instance(&harness, "ghes.test").await;
    let snap = snapshot(server_id, "ghes.test");

    // Empty batches: the 7th message is over `ingest_max_stream_messages`.
    let stream = OpenStream::open(&harness, &credential).await;
    stream.send(header(&snap)).await;
    for _ in 0..6 {
        stream.send(batch(&[])).await;
    }
    let refused = stream.answer().await.expect_err("too many messages");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("more than 6 messages"),
        "{}",
        refused.message()
    );
    assert!(
        refused.message().contains("ingest_max_stream_messages"),
        "{}",
        refused.message()
    );

    // Two batches of 100 users of about 400 bytes, each under `max_message_bytes`, together over
    // `ingest_max_stream_bytes`.
    let mut many = users(200);
    for user in &mut many {
        user.login = format!("{}{}", user.login, "l".repeat(90));
        user.email = format!("{}{}", "e".repeat(290), user.email);
    }
    let stream = OpenStream::open(&harness, &credential).await;
    stream.send(header(&snap)).await;
    stream.send(batch(&many[..100])).await;
    stream.send(batch(&many[100..])).await;
    let refused = stream.answer().await.expect_err("too many bytes");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("ingest_max_stream_bytes"),
        "{}",
        refused.message()
    );

    // An empty batch every 600 ms keeps the idle timeout (1 s) from firing; the total deadline (2 s) still does.
    let stream = OpenStream::open(&harness, &credential).await;
    stream.send(header(&snap)).await;
    let sender = stream.sender.clone();
    let trickle = tokio::spawn(async move {
        // The waits between sends are the trickle itself, not synchronisation: the stream must never be idle.
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(600)).await;
            if sender.send(batch(&[])).await.is_err() {
                return;
            }
        }
    });
    let started = Instant::now();
    let refused = stream.answer().await.expect_err("past the deadline");
    trickle.abort();
    assert_eq!(
        refused.code(),
        Code::ResourceExhausted,
        "{}",
        refused.message()
    );
    assert!(
        refused.message().contains("ingest_stream_max_secs"),
        "{}",
        refused.message()
    );
    assert!(started.elapsed() < PATIENCE);

    refused_and_nothing_stored(harness, "stream_budget", 3.0).await;
}

#[tokio::test]
async fn oversized_fields_are_refused_as_their_batch_arrives_without_echoing_them() {
    let harness = Harness::start(|_| {}).await;
    let (server_id, credential) = instance(&harness, "ghes.test").await;
    let snap = snapshot(server_id, "ghes.test");

    // Row 2's login is over 100 characters: refused while the stream is still open (no trailer was sent).
    let mut rows = users(2);
    rows[1].login = "x".repeat(5000);
    let stream = OpenStream::open(&harness, &credential).await;
    stream.send(header(&snap)).await;
    stream.send(batch(&rows)).await;
    let sender = stream.sender.clone();
    let refused = stream.answer().await.expect_err("login too long");
    // Answered while the client still held the stream open.
    drop(sender);
    assert_eq!(refused.code(), Code::InvalidArgument);
    let message = refused.message();
    assert!(
        message.contains("user row 2: `login` has 5000 characters, over the limit of 100"),
        "{message}"
    );
    assert!(message.len() < 400, "a bounded prefix only: {message}");

    // An email over 320 characters: named, never shown.
    let mut rows = users(1);
    rows[0].email = format!("{}@example.com", "e".repeat(400));
    let stream = OpenStream::open(&harness, &credential).await;
    stream.send(header(&snap)).await;
    stream.send(batch(&rows)).await;
    let refused = stream.answer().await.expect_err("email too long");
    assert!(
        refused.message().contains("user row 1: `email`"),
        "{}",
        refused.message()
    );
    assert!(
        !refused.message().contains("@example.com"),
        "{}",
        refused.message()
    );

    // A header hostname of 100,000 characters: the one hostname rule, and a bounded message.
    let mut renamed = snap.clone();
    renamed.meta.instance.hostname = "h".repeat(100_000);
    let stream = OpenStream::open(&harness, &credential).await;
    stream.send(header(&renamed)).await;
    let refused = stream.answer().await.expect_err("hostname too long");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("at most 253 characters"),
        "{}",
        refused.message()
    );
    assert!(refused.message().len() < 400, "{}", refused.message());

    refused_and_nothing_stored(harness, "field_too_long", 2.0).await;
}

#[tokio::test]
async fn an_oversized_message_is_resource_exhausted_and_counted() {
    let harness = Harness::start(|config| config.max_message_bytes = 64 * 1024).await;
    let (server_id, credential) = instance(&harness, "ghes.test").await;
    let stream = OpenStream::open(&harness, &credential).await;
    stream.send(header(&snapshot(server_id, "ghes.test"))).await;
    stream.send(batch(&users(2000))).await;
    let refused = stream.answer().await.expect_err("message too large");
    assert_eq!(
        refused.code(),
        Code::ResourceExhausted,
        "{}",
        refused.message()
    );
    assert!(
        refused.message().contains("max_message_bytes"),
        "{}",
        refused.message()
    );
    assert!(
        refused.message().contains("batch_size"),
        "{}",
        refused.message()
    );
    let metrics = harness.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "license_sync_rows_rejected_total",
            &["reason=\"message_too_large\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "license_sync_syncs_total",
            &["result=\"resource_exhausted\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    harness.shutdown().await;
}

#[tokio::test]
async fn a_stream_cut_by_the_client_is_counted_as_cancelled() {
    let harness = Harness::start(|_| {}).await;
    let (server_id, credential) = instance(&harness, "ghes.test").await;
    let stream = OpenStream::open(&harness, &credential).await;
    stream.send(header(&snapshot(server_id, "ghes.test"))).await;
    stream.send(batch(&users(10))).await;
    wait_for_open_streams(&harness, 1.0).await;
    // The agent crashes mid-stream: its call is dropped, and the client resets the stream.
    stream.call.abort();
    drop(stream.sender);
    wait_for_open_streams(&harness, 0.0).await;

    let deadline = Instant::now() + PATIENCE;
    let metrics = loop {
        let metrics = harness.metrics().await;
        let counted = sample(
            &metrics,
            "license_sync_syncs_total",
            &["result=\"cancelled\""],
        );
        if counted == Some(1.0) {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "the cut is not counted:\n{metrics}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(
        sample(
            &metrics,
            "license_sync_syncs_total",
            &["result=\"invalid_argument\""]
        ),
        None,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "license_sync_grpc_requests_total",
            &[&format!("method=\"{UPLOAD_METHOD}\""), "code=\"CANCELLED\""]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "license_sync_grpc_requests_total",
            &[
                &format!("method=\"{UPLOAD_METHOD}\""),
                "code=\"INVALID_ARGUMENT\""
            ]
        ),
        None,
        "{metrics}"
    );
    // The owner sees the interruption, and nothing was stored.
    let (_, status) = harness
        .owner_get("/enterprises/acme/license-sync-status")
        .await;
    let error = status["server_instances"][0]["last_sync"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("interrupted"), "{status}");
    assert_eq!(consumed(&harness).await, 0);
    harness.shutdown().await;
}

#[tokio::test]
async fn a_hostname_of_another_live_instance_is_refused_on_every_path() {
    let harness = Harness::start(|_| {}).await;
    let (first, _) = instance(&harness, "ghes-a.test").await;
    let (second, credential) = instance(&harness, "ghes-b.test").await;

    let refused = harness
        .upload(&credential, &snapshot(second, "ghes-a.test"))
        .await
        .expect_err("stream under a taken hostname");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains(&first.to_string()),
        "{}",
        refused.message()
    );

    let file =
        license_sync_core::snapshot::UsageFile::from_snapshot(snapshot(second, "ghes-a.test"));
    let response = reqwest::Client::new()
        .post(format!(
            "http://{}/enterprises/acme/server-usage",
            harness.server().http_addr
        ))
        .bearer_auth(&harness.owner_token)
        .json(&file)
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status(), 409);
    let body: serde_json::Value = response.json().await.expect("json");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains(&first.to_string())),
        "{body}"
    );

    let token = harness.enrollment_token().await;
    let refused = harness
        .enroll(&token, Uuid::new_v4(), "ghes-a.test")
        .await
        .expect_err("enrollment under a taken hostname");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("retire"),
        "{}",
        refused.message()
    );
    assert_eq!(consumed(&harness).await, 0);
    harness.shutdown().await;
}
