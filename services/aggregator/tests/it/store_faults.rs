//! Faults of the database under the store: a disk that fills and is freed again, and values a backend refuses.
//! The disk is filled without root: SQLite's `max_page_count` caps the file, and a second connection fills the
//! remaining pages with a table of its own and later deletes it ("frees space").

use std::str::FromStr;
use std::sync::Arc;

use license_sync_aggregator::app::App;
use license_sync_aggregator::config::AggregatorConfig;
use license_sync_aggregator::error::ErrorKind;
use license_sync_aggregator::store::{Arrival, CommitOutcome, DynStore, SqliteStore};
use license_sync_core::model::{InstanceIdentity, ServerUser, SourceReport, UserRole};
use license_sync_core::snapshot::{Snapshot, SnapshotMeta};
use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::store_suite::commit_now;

/// Pages of 4 KiB the test database may have: room for the schema and a few small rows.
const MAX_PAGES: &str = "400";

fn snapshot(server_id: Uuid, generated_at: OffsetDateTime, users: usize) -> Snapshot {
    Snapshot {
        meta: SnapshotMeta {
            sync_id: Uuid::new_v4(),
            instance: InstanceIdentity {
                server_id,
                hostname: "ghes-full.example.com".into(),
                ghes_version: "3.14.2".into(),
            },
            generated_at,
            license: None,
            source_report: SourceReport::default(),
        },
        users: (0..users as i64)
            .map(|id| ServerUser {
                id,
                login: format!("user-{id:05}"),
                email: format!("user-{id:05}@example.com"),
                role: UserRole::User,
                suspended: false,
                dormant: false,
                created_at: None,
                last_active: None,
                two_factor_enabled: None,
            })
            .collect(),
    }
}

async fn readyz(http: &reqwest::Client, base: &str) -> u16 {
    http.get(format!("{base}/readyz"))
        .send()
        .await
        .expect("readyz")
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_full_disk_is_reported_and_writes_recover_once_space_is_freed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let options = SqliteConnectOptions::from_str(&url)
        .expect("url")
        .pragma("max_page_count", MAX_PAGES);
    let store: DynStore = Arc::new(SqliteStore::open_with(options).await.expect("open"));
    let app = App::new(
        store.clone(),
        AggregatorConfig {
            database_url: url.clone(),
            ..AggregatorConfig::default()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(
        async move { axum::serve(listener, license_sync_aggregator::rest::router(app)).await },
    );
    let http = reqwest::Client::new();

    let acme = store
        .create_enterprise("acme", "Acme", 10, OffsetDateTime::now_utc())
        .await
        .expect("enterprise");
    let server_id = Uuid::new_v4();
    let instance = store
        .enroll_instance(
            acme.id,
            server_id,
            "ghes-full.example.com",
            "c",
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("enroll");
    assert_eq!(readyz(&http, &base).await, 200);

    // Another process fills every page the database may have.
    let mut filler = SqliteConnection::connect(&url).await.expect("filler");
    sqlx::query(&format!("PRAGMA max_page_count = {MAX_PAGES}"))
        .execute(&mut filler)
        .await
        .expect("pragma");
    sqlx::query("CREATE TABLE filler (data BLOB)")
        .execute(&mut filler)
        .await
        .expect("filler table");
    while sqlx::query("INSERT INTO filler (data) VALUES (zeroblob(2000))")
        .execute(&mut filler)
        .await
        .is_ok()
    {}

    // Every write fails with a full disk, said so, and retryable for the agent; readiness says not ready.
    for attempt in 0..10 {
        let full = commit_now(
            &store,
            instance.id,
            &snapshot(server_id, OffsetDateTime::now_utc(), 300),
        )
        .await
        .expect_err("the disk is full");
        assert_eq!(
            full.kind,
            ErrorKind::StorageFull,
            "attempt {attempt}: {full}"
        );
        assert!(full.message.contains("disk is full"), "{full}");
        assert_eq!(
            tonic::Status::from(full.clone()).code(),
            tonic::Code::Unavailable
        );
    }
    assert_eq!(readyz(&http, &base).await, 503);
    assert!(store.ping().await.is_ok(), "reads still work");

    // Space is freed: without a restart, every later write goes through (on whichever pooled connection) and
    // readiness is back.
    sqlx::query("DELETE FROM filler")
        .execute(&mut filler)
        .await
        .expect("free space");
    filler.close().await.expect("close filler");
    for attempt in 0..10 {
        let outcome = commit_now(
            &store,
            instance.id,
            &snapshot(server_id, OffsetDateTime::now_utc(), 300),
        )
        .await;
        assert!(
            matches!(outcome, Ok(CommitOutcome::Applied { .. })),
            "write {attempt} after freeing space: {outcome:?}"
        );
        store
            .record_failed_sync(
                instance.id,
                Arrival::Upload,
                "test",
                OffsetDateTime::now_utc(),
            )
            .await
            .expect("plain write");
    }
    assert_eq!(readyz(&http, &base).await, 200);
}
