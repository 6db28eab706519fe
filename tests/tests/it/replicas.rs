//! Several aggregator processes sharing one PostgreSQL database: they start together on a fresh database (so their
//! migrations race), then take 100 concurrent syncs aimed at different replicas, including the same snapshot sent to
//! two replicas at once and older snapshots racing newer ones. The newest snapshot of each instance must win, each
//! sync id must be applied once, and every replica must give the same REST answers.
//!
//! Needs `LICENSE_SYNC_TEST_POSTGRES_URL` (e.g. `postgres://postgres@127.0.0.1:5432/test`); the test creates and drops
//! its own database next to the one named there.

use std::collections::HashMap;
use std::time::Duration;

use license_sync_e2e::grpc::{self, chunks};
use license_sync_e2e::postgres::TestDatabase;
use license_sync_e2e::{Aggregator, admin_with_url};
use serde_json::Value;
use time::OffsetDateTime;
use tonic::Code;
use uuid::Uuid;

/// How long each replica reuses a check of the database's generation (`view_check_interval_ms`): the bound on how
/// late one replica sees another's change.
const VIEW_CHECK_INTERVAL: Duration = Duration::from_millis(200);

fn postgres_url() -> Option<String> {
    match std::env::var("LICENSE_SYNC_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("LICENSE_SYNC_REQUIRE_ALL_TESTS").is_some() => {
            panic!(
                "LICENSE_SYNC_REQUIRE_ALL_TESTS is set but LICENSE_SYNC_TEST_POSTGRES_URL is not"
            )
        }
        _ => {
            eprintln!(
                "SKIPPED (postgres replicas): set LICENSE_SYNC_TEST_POSTGRES_URL=postgres://USER@HOST/DB"
            );
            None
        }
    }
}

fn admin(database_url: &str, args: &[&str]) -> String {
    admin_with_url(database_url, args).expect("admin command")
}

async fn get(url: &str, token: &str) -> Value {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_on_one_database_agree_and_apply_each_snapshot_once() {
    let Some(admin_url) = postgres_url() else {
        return;
    };
    let database = TestDatabase::create(&admin_url)
        .await
        .expect("create a database");

    // Three replicas start together on an empty database: their migrations race.
    let starters: Vec<_> = (0..3)
        .map(|_| {
            let url = database.url.clone();
            std::thread::spawn(move || {
                Aggregator::start_with_env(&[
                    ("LICENSE_SYNC_AGGREGATOR_DATABASE_URL", &url),
                    (
                        "LICENSE_SYNC_AGGREGATOR_VIEW_CHECK_INTERVAL_MS",
                        &VIEW_CHECK_INTERVAL.as_millis().to_string(),
                    ),
                    // Each instance's snapshots race ten at a time below, which no agent does (it sends one at a
                    // time): the per-instance stream limit would refuse them before the replicas could.
                    (
                        "LICENSE_SYNC_AGGREGATOR_INGEST_MAX_STREAMS_PER_INSTANCE",
                        "10",
                    ),
                ])
                .expect("replica starts")
            })
        })
        .collect();
    let replicas: Vec<Aggregator> = starters
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();

    admin(
        &database.url,
        &["enterprise", "create", "--slug", "acme", "--seats", "10"],
    );
    let token = admin(
        &database.url,
        &["token", "create", "--enterprise", "acme", "--name", "owner"],
    );
    let instances: Vec<(Uuid, String)> = (0..10)
        .map(|i| {
            let server_id = Uuid::new_v4();
            let credential = admin(
                &database.url,
                &[
                    "instance",
                    "add",
                    "--enterprise",
                    "acme",
                    "--server-id",
                    &server_id.to_string(),
                    "--hostname",
                    &format!("ghes-{i}.test"),
                ],
            );
            (server_id, credential)
        })
        .collect();

    // Per instance, five snapshots generated one second apart with 10..=14 users; each is sent to two different
    // replicas at the same time. 10 × 5 × 2 = 100 concurrent syncs.
    let base = OffsetDateTime::now_utc() - time::Duration::minutes(10);
    let mut tasks = Vec::new();
    for (i, (server_id, credential)) in instances.iter().enumerate() {
        for version in 0..5usize {
            let mut snapshot = grpc::snapshot(*server_id, &format!("ghes-{i}.test"), 10 + version);
            snapshot.meta.generated_at = base + time::Duration::seconds(version as i64);
            for copy in 0..2 {
                let grpc_url = replicas[(i + version + copy) % 3].grpc_url.clone();
                let (credential, stream) = (credential.clone(), chunks(&snapshot));
                let sync_id = snapshot.meta.sync_id;
                tasks.push(tokio::spawn(async move {
                    (sync_id, grpc::send(&grpc_url, &credential, stream).await)
                }));
            }
        }
    }
    let mut applied: HashMap<Uuid, usize> = HashMap::new();
    let mut refused_as_older = 0;
    for task in tasks {
        let (sync_id, result) = task.await.expect("task");
        match result {
            Ok(receipt) => {
                if !receipt.duplicate {
                    *applied.entry(sync_id).or_default() += 1;
                }
            }
            Err(status) if status.code() == Code::FailedPrecondition => refused_as_older += 1,
            Err(status) => panic!("unexpected error from a replica: {status:?}"),
        }
    }
    assert!(
        applied.values().all(|&count| count == 1),
        "a sync id was applied twice: {applied:?}"
    );
    eprintln!(
        "{} snapshots applied, {refused_as_older} refused as older",
        applied.len()
    );

    // The newest snapshot (14 users) won everywhere, and every replica says the same once its last check of the
    // database's generation is older than the documented bound.
    tokio::time::sleep(VIEW_CHECK_INTERVAL + Duration::from_millis(100)).await;
    let mut answers = Vec::new();
    for replica in &replicas {
        let status = get(
            &format!("{}/enterprises/acme/license-sync-status", replica.http_url),
            &token,
        )
        .await;
        let instances = status["server_instances"].as_array().expect("instances");
        assert_eq!(instances.len(), 10);
        for instance in instances {
            assert_eq!(instance["user_count"], 14, "{instance}");
            assert!(instance["last_success_date"].is_string(), "{instance}");
        }
        let consumed = get(
            &format!(
                "{}/enterprises/acme/consumed-licenses?per_page=100",
                replica.http_url
            ),
            &token,
        )
        .await;
        assert_eq!(consumed["total_seats_consumed"], 14, "{consumed}");
        answers.push(consumed);
    }
    assert!(
        answers.windows(2).all(|pair| pair[0] == pair[1]),
        "replicas disagree"
    );

    // A change through one replica is seen by the others (their cached views follow the database's generation).
    let (server_id, credential) = &instances[0];
    let mut newer = grpc::snapshot(*server_id, "ghes-0.test", 20);
    newer.meta.generated_at = base + time::Duration::seconds(60);
    grpc::send(&replicas[0].grpc_url, credential, chunks(&newer))
        .await
        .expect("applied");
    for replica in &replicas {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let consumed = get(
                &format!(
                    "{}/enterprises/acme/consumed-licenses?per_page=1",
                    replica.http_url
                ),
                &token,
            )
            .await;
            if consumed["total_seats_consumed"] == 20 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "replica did not see the change: {consumed}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    drop(replicas);
}
