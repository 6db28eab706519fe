//! The storage test suite. Every test takes a `DynStore`, so each backend runs the same assertions: the
//! `store_suite!` macro at the bottom instantiates the suite per backend.

use license_sync_aggregator::error::ErrorKind;
use license_sync_aggregator::store::{Arrival, CommitOutcome, DynStore, SnapshotCommit};
use license_sync_core::model::{CloudMember, InstanceIdentity, ServerUser, SourceReport, UserRole};
use license_sync_core::snapshot::{Snapshot, SnapshotMeta};
use time::OffsetDateTime;
use uuid::Uuid;

fn user(id: i64, login: &str) -> ServerUser {
    ServerUser {
        id,
        login: login.to_owned(),
        email: format!("{login}@example.com"),
        role: UserRole::User,
        suspended: false,
        dormant: false,
        created_at: Some(OffsetDateTime::from_unix_timestamp(1_600_000_000).expect("valid")),
        last_active: None,
        two_factor_enabled: Some(true),
    }
}

fn snapshot(server_id: Uuid, generated_at: i64, users: Vec<ServerUser>) -> Snapshot {
    Snapshot {
        meta: SnapshotMeta {
            sync_id: Uuid::new_v4(),
            instance: InstanceIdentity {
                server_id,
                hostname: "ghes-1.example.com".into(),
                ghes_version: "3.14.2".into(),
            },
            generated_at: OffsetDateTime::from_unix_timestamp(generated_at).expect("valid"),
            license: None,
            source_report: SourceReport::default(),
        },
        users,
    }
}

async fn commit(
    store: &DynStore,
    instance_id: i64,
    snapshot: &Snapshot,
) -> Result<CommitOutcome, ErrorKind> {
    let sha = hex::encode(snapshot.digest());
    store
        .commit_snapshot(SnapshotCommit {
            instance_id,
            snapshot,
            users_sha256: &sha,
            via: Arrival::Connect,
            now: OffsetDateTime::now_utc(),
        })
        .await
        .map_err(|err| err.kind)
}

async fn stored_logins(store: &DynStore, enterprise_id: i64) -> Vec<String> {
    let input = store.load_merge_input(enterprise_id).await.expect("load");
    let mut logins: Vec<String> = input
        .instances
        .iter()
        .flat_map(|instance| instance.users.iter().map(|u| u.login.clone()))
        .collect();
    logins.sort();
    logins
}

pub async fn enterprises_and_tokens(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10)
        .await
        .expect("create");
    assert_eq!(acme.seats_purchased, 10);
    let again = store
        .create_enterprise("acme", "Acme 2", 1)
        .await
        .expect_err("duplicate slug");
    assert_eq!(again.kind, ErrorKind::AlreadyExists);
    store
        .create_api_token(acme.id, "hash-1", "ci")
        .await
        .expect("token");
    let found = store
        .enterprise_for_api_token("hash-1")
        .await
        .expect("lookup");
    assert_eq!(found.map(|e| e.slug), Some("acme".to_owned()));
    assert!(
        store
            .enterprise_for_api_token("other")
            .await
            .expect("lookup")
            .is_none()
    );
    store.set_seats_purchased(acme.id, 25).await.expect("seats");
    let reloaded = store
        .enterprise_by_slug("acme")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(reloaded.seats_purchased, 25);
    assert!(
        reloaded.generation > acme.generation,
        "seat changes bump the generation"
    );
}

pub async fn enrollment_binds_and_rotates_credentials(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10)
        .await
        .expect("create");
    let other = store
        .create_enterprise("other", "Other", 10)
        .await
        .expect("create");
    let server_id = Uuid::new_v4();
    let instance = store
        .enroll_instance(acme.id, server_id, "ghes-1", "cred-1")
        .await
        .expect("enroll");
    assert!(instance.has_credential);
    assert_eq!(
        store
            .instance_for_credential("cred-1")
            .await
            .expect("lookup")
            .map(|i| i.server_id),
        Some(server_id)
    );
    store
        .enroll_instance(acme.id, server_id, "ghes-1", "cred-2")
        .await
        .expect("re-enroll");
    assert!(
        store
            .instance_for_credential("cred-1")
            .await
            .expect("lookup")
            .is_none(),
        "old credential revoked"
    );
    assert!(
        store
            .instance_for_credential("cred-2")
            .await
            .expect("lookup")
            .is_some()
    );
    let stolen = store
        .enroll_instance(other.id, server_id, "ghes-1", "cred-3")
        .await
        .expect_err("belongs to acme");
    assert_eq!(stolen.kind, ErrorKind::PermissionDenied);
    let upload = store
        .instance_for_upload(other.id, server_id, "ghes-1")
        .await
        .expect_err("belongs to acme");
    assert_eq!(upload.kind, ErrorKind::PermissionDenied);
}

pub async fn commit_replaces_the_snapshot_whole(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10)
        .await
        .expect("create");
    let server_id = Uuid::new_v4();
    let instance = store
        .enroll_instance(acme.id, server_id, "ghes-1", "c")
        .await
        .expect("enroll");
    let first = snapshot(
        server_id,
        1_700_000_000,
        vec![user(1, "a"), user(2, "b"), user(3, "c")],
    );
    assert!(matches!(
        commit(&store, instance.id, &first).await,
        Ok(CommitOutcome::Applied { .. })
    ));
    assert_eq!(stored_logins(&store, acme.id).await, ["a", "b", "c"]);

    let second = snapshot(server_id, 1_700_000_100, vec![user(2, "b"), user(4, "d")]);
    assert!(matches!(
        commit(&store, instance.id, &second).await,
        Ok(CommitOutcome::Applied { .. })
    ));
    assert_eq!(stored_logins(&store, acme.id).await, ["b", "d"]);

    let input = store.load_merge_input(acme.id).await.expect("load");
    let stored = &input.instances[0].users;
    let b = stored.iter().find(|u| u.id == 2).expect("b stored");
    assert_eq!(b, &user(2, "b"), "every field round-trips");

    let listed = store.list_instances(acme.id).await.expect("list");
    assert_eq!(listed[0].user_count, 2);
    assert_eq!(listed[0].last_attempt_ok, Some(true));
    assert_eq!(listed[0].last_success_via, Some(Arrival::Connect));
}

pub async fn retried_sync_id_is_applied_once(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10)
        .await
        .expect("create");
    let server_id = Uuid::new_v4();
    let instance = store
        .enroll_instance(acme.id, server_id, "ghes-1", "c")
        .await
        .expect("enroll");
    let first = snapshot(server_id, 1_700_000_000, vec![user(1, "a")]);
    commit(&store, instance.id, &first).await.expect("applied");
    let generation = store
        .enterprise_generation(acme.id)
        .await
        .expect("generation");

    let retry = commit(&store, instance.id, &first)
        .await
        .expect("acknowledged");
    assert!(
        matches!(retry, CommitOutcome::Duplicate { user_count: 1, .. }),
        "{retry:?}"
    );
    assert_eq!(
        store
            .enterprise_generation(acme.id)
            .await
            .expect("generation"),
        generation
    );

    // A newer snapshot, then the old retry again: still acknowledged as applied, not refused as older.
    let newer = snapshot(server_id, 1_700_000_500, vec![user(1, "a"), user(2, "b")]);
    commit(&store, instance.id, &newer).await.expect("applied");
    assert!(matches!(
        commit(&store, instance.id, &first).await,
        Ok(CommitOutcome::Duplicate { .. })
    ));
    assert_eq!(stored_logins(&store, acme.id).await, ["a", "b"]);

    let mut reused = snapshot(server_id, 1_700_000_900, vec![user(9, "z")]);
    reused.meta.sync_id = first.meta.sync_id;
    assert_eq!(
        commit(&store, instance.id, &reused).await,
        Err(ErrorKind::AlreadyExists)
    );
    assert_eq!(stored_logins(&store, acme.id).await, ["a", "b"]);
}

pub async fn older_snapshot_is_refused_and_changes_nothing(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10)
        .await
        .expect("create");
    let server_id = Uuid::new_v4();
    let instance = store
        .enroll_instance(acme.id, server_id, "ghes-1", "c")
        .await
        .expect("enroll");
    commit(
        &store,
        instance.id,
        &snapshot(server_id, 1_700_000_000, vec![user(1, "a")]),
    )
    .await
    .expect("applied");
    let older = snapshot(server_id, 1_600_000_000, vec![user(2, "b")]);
    assert_eq!(
        commit(&store, instance.id, &older).await,
        Err(ErrorKind::FailedPrecondition)
    );
    assert_eq!(stored_logins(&store, acme.id).await, ["a"]);
}

pub async fn a_commit_failing_midway_leaves_the_previous_snapshot(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10)
        .await
        .expect("create");
    let server_id = Uuid::new_v4();
    let instance = store
        .enroll_instance(acme.id, server_id, "ghes-1", "c")
        .await
        .expect("enroll");
    commit(
        &store,
        instance.id,
        &snapshot(server_id, 1_700_000_000, vec![user(1, "a")]),
    )
    .await
    .expect("applied");
    // Bypasses validation: the duplicate key fails the INSERT after the DELETE ran, inside the transaction.
    let mut users: Vec<ServerUser> = (1..=5000).map(|id| user(id, &format!("u{id}"))).collect();
    users.push(user(4999, "again"));
    let broken = snapshot(server_id, 1_700_000_100, users);
    assert!(commit(&store, instance.id, &broken).await.is_err());
    assert_eq!(stored_logins(&store, acme.id).await, ["a"]);
    let listed = store.list_instances(acme.id).await.expect("list");
    assert_eq!(listed[0].user_count, 1);
    // The sync id of the failed commit is not recorded as applied.
    let mut fixed = broken.clone();
    fixed.users.pop();
    assert!(matches!(
        commit(&store, instance.id, &fixed).await,
        Ok(CommitOutcome::Applied { .. })
    ));
}

pub async fn failed_attempts_are_recorded_without_touching_users(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10)
        .await
        .expect("create");
    let server_id = Uuid::new_v4();
    let instance = store
        .enroll_instance(acme.id, server_id, "ghes-1", "c")
        .await
        .expect("enroll");
    commit(
        &store,
        instance.id,
        &snapshot(server_id, 1_700_000_000, vec![user(1, "a")]),
    )
    .await
    .expect("applied");
    store
        .record_failed_sync(
            instance.id,
            Arrival::Upload,
            "digest mismatch",
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("record");
    let listed = store.list_instances(acme.id).await.expect("list");
    assert_eq!(listed[0].last_attempt_ok, Some(false));
    assert_eq!(listed[0].last_error, "digest mismatch");
    assert_eq!(listed[0].last_success_via, Some(Arrival::Connect));
    assert_eq!(stored_logins(&store, acme.id).await, ["a"]);
}

pub async fn retired_instances_stop_counting(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10)
        .await
        .expect("create");
    let (one, two) = (Uuid::new_v4(), Uuid::new_v4());
    let first = store
        .enroll_instance(acme.id, one, "ghes-1", "c1")
        .await
        .expect("enroll");
    let second = store
        .enroll_instance(acme.id, two, "ghes-2", "c2")
        .await
        .expect("enroll");
    commit(
        &store,
        first.id,
        &snapshot(one, 1_700_000_000, vec![user(1, "a")]),
    )
    .await
    .expect("applied");
    commit(
        &store,
        second.id,
        &snapshot(two, 1_700_000_000, vec![user(1, "b")]),
    )
    .await
    .expect("applied");
    store.retire_instance(acme.id, two).await.expect("retire");
    assert_eq!(stored_logins(&store, acme.id).await, ["a"]);
    assert!(
        store
            .instance_for_credential("c2")
            .await
            .expect("lookup")
            .is_none()
    );
    let again = store
        .retire_instance(acme.id, two)
        .await
        .expect_err("already retired");
    assert_eq!(again.kind, ErrorKind::NotFound);
    // Re-enrolling brings its stored users back.
    store
        .enroll_instance(acme.id, two, "ghes-2", "c3")
        .await
        .expect("re-enroll");
    assert_eq!(stored_logins(&store, acme.id).await, ["a", "b"]);
}

pub async fn cloud_members_are_replaced_whole(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10)
        .await
        .expect("create");
    let member = |id: i64, login: &str| CloudMember {
        id,
        login: login.to_owned(),
        name: Some(format!("{login} name")),
        verified_emails: vec![format!("{login}@example.com")],
        identity: None,
        consumes_license: true,
        member_roles: vec!["org1:Owner".into()],
        enterprise_roles: vec![],
        orgs_with_pending_invites: vec![],
        two_factor_auth: Some(true),
        visual_studio_subscription_user: false,
    };
    store
        .replace_cloud_members(acme.id, &[member(1, "a"), member(2, "b")])
        .await
        .expect("import");
    store
        .replace_cloud_members(acme.id, &[member(3, "c")])
        .await
        .expect("import");
    let input = store.load_merge_input(acme.id).await.expect("load");
    assert_eq!(input.cloud_members, vec![member(3, "c")]);
}

macro_rules! store_suite {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;

            macro_rules! case {
                ($name:ident) => {
                    #[tokio::test]
                    async fn $name() {
                        let Some((store, _guard)) = $open.await else {
                            return;
                        };
                        super::$name(store).await;
                    }
                };
            }

            case!(enterprises_and_tokens);
            case!(enrollment_binds_and_rotates_credentials);
            case!(commit_replaces_the_snapshot_whole);
            case!(retried_sync_id_is_applied_once);
            case!(older_snapshot_is_refused_and_changes_nothing);
            case!(a_commit_failing_midway_leaves_the_previous_snapshot);
            case!(failed_attempts_are_recorded_without_touching_users);
            case!(retired_instances_stop_counting);
            case!(cloud_members_are_replaced_whole);
        }
    };
}

/// A fresh SQLite file per test; the directory guard deletes it.
async fn open_sqlite() -> Option<(DynStore, tempfile::TempDir)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let store = license_sync_aggregator::store::open(&url)
        .await
        .expect("open sqlite");
    Some((store, dir))
}

store_suite!(sqlite, open_sqlite());

/// The PostgreSQL URL from `LICENSE_SYNC_TEST_POSTGRES_URL`; without it the PostgreSQL cases say so and skip, unless
/// `LICENSE_SYNC_REQUIRE_ALL_TESTS` is set (CI), where a missing database is a failure.
#[cfg(feature = "postgres")]
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
                "SKIPPED (postgres): set LICENSE_SYNC_TEST_POSTGRES_URL=postgres://USER@HOST/DB to run this case"
            );
            None
        }
    }
}

/// Drops the test's schema when the test ends, whatever its outcome.
#[cfg(feature = "postgres")]
struct SchemaGuard {
    url: String,
    schema: String,
}

#[cfg(feature = "postgres")]
impl Drop for SchemaGuard {
    fn drop(&mut self) {
        let (url, schema) = (self.url.clone(), self.schema.clone());
        // Drop runs inside the test's runtime: use a thread with its own runtime for the async cleanup.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async move {
                use sqlx::Connection;
                if let Ok(mut connection) = sqlx::PgConnection::connect(&url).await {
                    // The store's pool may still hold connections (the test runtime is blocked here, so it cannot
                    // close them); they are tagged with the schema's name, so end them first.
                    let _ = sqlx::query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                    )
                    .bind(&schema)
                    .execute(&mut connection)
                    .await;
                    let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .execute(&mut connection)
                        .await;
                }
            });
        })
        .join();
    }
}

/// A fresh schema per test in the configured database, so runs and tests never see each other's rows.
#[cfg(feature = "postgres")]
async fn open_postgres() -> Option<(DynStore, SchemaGuard)> {
    use sqlx::Connection;
    use std::str::FromStr;
    let url = postgres_url()?;
    let schema = format!("ls_test_{}", Uuid::new_v4().simple());
    let mut connection = sqlx::PgConnection::connect(&url)
        .await
        .expect("connect to PostgreSQL");
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut connection)
        .await
        .expect("create schema");
    let guard = SchemaGuard {
        url: url.clone(),
        schema: schema.clone(),
    };
    let options = sqlx::postgres::PgConnectOptions::from_str(&url)
        .expect("valid URL")
        .options([("search_path", schema.as_str())])
        .application_name(&schema);
    let store = license_sync_aggregator::store::PostgresStore::open_with(options)
        .await
        .expect("open PostgreSQL store");
    Some((std::sync::Arc::new(store), guard))
}

#[cfg(feature = "postgres")]
store_suite!(postgres, open_postgres());
