//! The storage test suite. Every test takes a `DynStore`, so each backend runs the same assertions: the
//! `store_suite!` macro at the bottom instantiates the suite per backend.

use license_sync_aggregator::error::{ErrorKind, ServiceError};
use license_sync_aggregator::store::{
    AckOutcome, AgentReport, Arrival, CommitOutcome, DynStore, NewApiToken, NewConsoleSession,
    SnapshotCommit, SyncAckRecord, SyncRequestState, TOKEN_LAST_USE_RESOLUTION, TokenScope,
    TokenSelector,
};
use license_sync_core::cloud::CloudMembers;
use license_sync_core::model::{CloudMember, InstanceIdentity, ServerUser, SourceReport, UserRole};
use license_sync_core::snapshot::{Snapshot, SnapshotMeta};
use time::OffsetDateTime;
use uuid::Uuid;

pub(crate) fn user(id: i64, login: &str) -> ServerUser {
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

/// `snapshot` under another hostname: instances of one enterprise never share one.
fn hosted(mut snapshot: Snapshot, hostname: &str) -> Snapshot {
    snapshot.meta.instance.hostname = hostname.to_owned();
    snapshot
}

fn member(id: i64, login: &str) -> CloudMember {
    CloudMember {
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
    }
}

/// Commits a snapshot as a streamed sync received now; the whole error, as a caller of the store sees it.
pub(crate) async fn commit_now(
    store: &DynStore,
    instance_id: i64,
    snapshot: &Snapshot,
) -> Result<CommitOutcome, ServiceError> {
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
        .map_err(ServiceError::from)
}

async fn commit(
    store: &DynStore,
    instance_id: i64,
    snapshot: &Snapshot,
) -> Result<CommitOutcome, ErrorKind> {
    commit_now(store, instance_id, snapshot)
        .await
        .map_err(|err| err.kind)
}

async fn stored_logins(store: &DynStore, enterprise_id: i64) -> Vec<String> {
    let input = store.load_merge_input(enterprise_id).await.expect("load");
    let mut logins: Vec<String> = input
        .instances
        .iter()
        .flat_map(|instance| instance.users.iter().map(|u| u.login.to_owned()))
        .collect();
    logins.sort();
    logins
}

pub async fn enterprises_and_tokens(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    assert_eq!(acme.seats_purchased, 10);
    let again = store
        .create_enterprise("acme", "Acme 2", 1, OffsetDateTime::now_utc())
        .await
        .map_err(ServiceError::from)
        .expect_err("duplicate slug");
    assert_eq!(again.kind, ErrorKind::AlreadyExists);
    let ci = NewApiToken {
        name: "ci",
        scope: TokenScope::Admin,
        expires_at: None,
    };
    store
        .create_api_token(acme.id, "hash-1", &ci, OffsetDateTime::now_utc())
        .await
        .expect("token");
    let found = store.api_token_by_hash("hash-1").await.expect("lookup");
    assert_eq!(found.map(|(e, _)| e.slug), Some("acme".to_owned()));
    assert!(
        store
            .api_token_by_hash("other")
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
    let other = store
        .create_enterprise("other", "Other", 3, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let listed = store.list_enterprises().await.expect("list");
    assert_eq!(
        listed
            .iter()
            .map(|e| (e.slug.as_str(), e.seats_purchased))
            .collect::<Vec<_>>(),
        [("acme", 25), ("other", 3)],
        "every enterprise, by id"
    );
    assert_eq!(listed[1].id, other.id);
}

/// Names are unique among an enterprise's live tokens, revocation by id or name hides a token from lookups (and
/// frees its name), the list never crosses enterprises, and a last use is written at most once a minute.
pub async fn api_tokens_have_names_scopes_expiry_revocation_and_last_use(store: DynStore) {
    let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("valid");
    let acme = store
        .create_enterprise("acme", "Acme", 10, now)
        .await
        .expect("create");
    let other = store
        .create_enterprise("other", "Other", 10, now)
        .await
        .expect("create");
    let expires_at = now + time::Duration::days(30);
    let reports = NewApiToken {
        name: "reports",
        scope: TokenScope::Read,
        expires_at: Some(expires_at),
    };
    let created = store
        .create_api_token(acme.id, "hash-reports", &reports, now)
        .await
        .expect("created");
    assert_eq!(
        (created.name.as_str(), created.scope, created.expires_at),
        ("reports", TokenScope::Read, Some(expires_at))
    );
    assert_eq!((created.last_used_at, created.revoked_at), (None, None));
    let taken = store
        .create_api_token(acme.id, "hash-reports-2", &reports, now)
        .await
        .map_err(ServiceError::from)
        .expect_err("name taken");
    assert_eq!(taken.kind, ErrorKind::AlreadyExists);
    assert!(taken.message.contains("\"reports\""), "{}", taken.message);
    // The same name in another enterprise is another token.
    store
        .create_api_token(other.id, "hash-other", &reports, now)
        .await
        .expect("other enterprise");
    let admin = NewApiToken {
        name: "admin",
        scope: TokenScope::Admin,
        expires_at: None,
    };
    let admin = store
        .create_api_token(acme.id, "hash-admin", &admin, now)
        .await
        .expect("admin");
    let (enterprise, found) = store
        .api_token_by_hash("hash-reports")
        .await
        .expect("lookup")
        .expect("found");
    assert_eq!((enterprise.id, found), (acme.id, created.clone()));
    let listed = store.list_api_tokens(acme.id).await.expect("list");
    assert_eq!(
        listed.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["reports", "admin"]
    );

    // Last use: written, then not again within the resolution, then again after it.
    store
        .record_api_token_use(created.id, now)
        .await
        .expect("use");
    let soon = now + time::Duration::seconds(30);
    store
        .record_api_token_use(created.id, soon)
        .await
        .expect("use");
    let last_used = |tokens: Vec<license_sync_aggregator::store::ApiToken>, id: i64| {
        tokens
            .into_iter()
            .find(|token| token.id == id)
            .and_then(|token| token.last_used_at)
    };
    let listed = store.list_api_tokens(acme.id).await.expect("list");
    assert_eq!(last_used(listed, created.id), Some(now));
    let later = now + TOKEN_LAST_USE_RESOLUTION;
    store
        .record_api_token_use(created.id, later)
        .await
        .expect("use");
    let listed = store.list_api_tokens(acme.id).await.expect("list");
    assert_eq!(last_used(listed, created.id), Some(later));

    // Revocation: by name, then by id; a second revocation finds nothing; another enterprise's id is not found.
    let revoked_at = now + time::Duration::hours(1);
    let by_id_elsewhere = store
        .revoke_api_token(other.id, TokenSelector::Id(admin.id), revoked_at)
        .await
        .map_err(ServiceError::from)
        .expect_err("another enterprise's token");
    assert_eq!(by_id_elsewhere.kind, ErrorKind::NotFound);
    let revoked = store
        .revoke_api_token(acme.id, TokenSelector::Name("reports"), revoked_at)
        .await
        .expect("revoked by name");
    assert_eq!(
        (revoked.id, revoked.revoked_at),
        (created.id, Some(revoked_at))
    );
    assert!(
        store
            .api_token_by_hash("hash-reports")
            .await
            .expect("lookup")
            .is_none()
    );
    let again = store
        .revoke_api_token(acme.id, TokenSelector::Name("reports"), revoked_at)
        .await
        .map_err(ServiceError::from)
        .expect_err("revoked already");
    assert_eq!(again.kind, ErrorKind::NotFound);
    store
        .revoke_api_token(acme.id, TokenSelector::Id(admin.id), revoked_at)
        .await
        .expect("revoked by id");
    // The name of a revoked token can be given to a new one; the list keeps the revoked ones.
    store
        .create_api_token(acme.id, "hash-reports-3", &reports, revoked_at)
        .await
        .expect("name free again");
    let listed = store.list_api_tokens(acme.id).await.expect("list");
    assert_eq!(listed.len(), 3);
    assert_eq!(listed.iter().filter(|t| t.revoked_at.is_some()).count(), 2);
    // The other enterprise's token is untouched.
    assert!(
        store
            .api_token_by_hash("hash-other")
            .await
            .expect("lookup")
            .is_some()
    );
}

pub async fn enrollment_binds_and_rotates_credentials(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let other = store
        .create_enterprise("other", "Other", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let server_id = Uuid::new_v4();
    let instance = store
        .enroll_instance(
            acme.id,
            server_id,
            "ghes-1",
            "cred-1",
            OffsetDateTime::now_utc(),
        )
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
        .enroll_instance(
            acme.id,
            server_id,
            "ghes-1",
            "cred-2",
            OffsetDateTime::now_utc(),
        )
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
        .enroll_instance(
            other.id,
            server_id,
            "ghes-1",
            "cred-3",
            OffsetDateTime::now_utc(),
        )
        .await
        .map_err(ServiceError::from)
        .expect_err("belongs to acme");
    assert_eq!(stolen.kind, ErrorKind::PermissionDenied);
    // An upload for another enterprise's server id is answered exactly as one for an unknown server id, and
    // creates nothing.
    let upload = store
        .instance_for_upload(other.id, server_id)
        .await
        .map_err(ServiceError::from)
        .expect_err("belongs to acme");
    assert_eq!(upload.kind, ErrorKind::NotFound);
    let unknown_id = Uuid::new_v4();
    let unknown = store
        .instance_for_upload(other.id, unknown_id)
        .await
        .map_err(ServiceError::from)
        .expect_err("unknown");
    assert_eq!(unknown.kind, ErrorKind::NotFound);
    assert_eq!(
        upload.message.replace(&server_id.to_string(), "ID"),
        unknown.message.replace(&unknown_id.to_string(), "ID")
    );
    assert!(unknown.message.contains("instance add"), "{unknown}");
    assert!(
        store
            .instance_by_server_id(other.id, unknown_id)
            .await
            .expect("read")
            .is_none(),
        "an upload creates no instance"
    );
    assert!(
        store
            .list_instances(other.id)
            .await
            .expect("list")
            .is_empty()
    );
}

pub async fn commit_replaces_the_snapshot_whole(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let server_id = Uuid::new_v4();
    let instance = store
        .enroll_instance(acme.id, server_id, "ghes-1", "c", OffsetDateTime::now_utc())
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
    let expected = user(2, "b");
    assert_eq!(
        (b.login, b.email, b.suspended, b.dormant),
        (
            expected.login.as_str(),
            expected.email.as_str(),
            expected.suspended,
            expected.dormant
        ),
        "every field the merged view reads round-trips"
    );

    let listed = store.list_instances(acme.id).await.expect("list");
    assert_eq!(listed[0].user_count, 2);
    assert_eq!(listed[0].last_attempt_ok, Some(true));
    assert_eq!(listed[0].last_success_via, Some(Arrival::Connect));
}

pub async fn retried_sync_id_is_applied_once(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let server_id = Uuid::new_v4();
    let instance = store
        .enroll_instance(acme.id, server_id, "ghes-1", "c", OffsetDateTime::now_utc())
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
        .create_enterprise("acme", "Acme", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let server_id = Uuid::new_v4();
    let instance = store
        .enroll_instance(acme.id, server_id, "ghes-1", "c", OffsetDateTime::now_utc())
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
        .create_enterprise("acme", "Acme", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let server_id = Uuid::new_v4();
    let instance = store
        .enroll_instance(acme.id, server_id, "ghes-1", "c", OffsetDateTime::now_utc())
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
        .create_enterprise("acme", "Acme", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let server_id = Uuid::new_v4();
    let instance = store
        .enroll_instance(acme.id, server_id, "ghes-1", "c", OffsetDateTime::now_utc())
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
        .create_enterprise("acme", "Acme", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let (one, two) = (Uuid::new_v4(), Uuid::new_v4());
    let first = store
        .enroll_instance(acme.id, one, "ghes-1", "c1", OffsetDateTime::now_utc())
        .await
        .expect("enroll");
    let second = store
        .enroll_instance(acme.id, two, "ghes-2", "c2", OffsetDateTime::now_utc())
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
        &hosted(snapshot(two, 1_700_000_000, vec![user(1, "b")]), "ghes-2"),
    )
    .await
    .expect("applied");
    store
        .retire_instance(acme.id, two, OffsetDateTime::now_utc())
        .await
        .expect("retire");
    assert_eq!(stored_logins(&store, acme.id).await, ["a"]);
    assert!(
        store
            .instance_for_credential("c2")
            .await
            .expect("lookup")
            .is_none()
    );
    let again = store
        .retire_instance(acme.id, two, OffsetDateTime::now_utc())
        .await
        .map_err(ServiceError::from)
        .expect_err("already retired");
    assert_eq!(again.kind, ErrorKind::NotFound);
    // Re-enrolling brings its stored users back.
    store
        .enroll_instance(acme.id, two, "ghes-2", "c3", OffsetDateTime::now_utc())
        .await
        .expect("re-enroll");
    assert_eq!(stored_logins(&store, acme.id).await, ["a", "b"]);
}

fn snapshot_of(server_id: Uuid, hostname: &str, generated_at: i64) -> Snapshot {
    hosted(
        snapshot(server_id, generated_at, vec![user(1, hostname)]),
        hostname,
    )
}

/// Enrollments of many new instances of one enterprise at once all land. On PostgreSQL each takes the enterprise row
/// lock; taking it after the instance insert (whose foreign key holds a share lock on that row) deadlocked them.
pub async fn concurrent_enrollments_of_one_enterprise_all_land(store: DynStore) {
    let now = OffsetDateTime::now_utc();
    let acme = store
        .create_enterprise("acme", "Acme", 10, now)
        .await
        .expect("create");
    let enrollments = (0..8).map(|index| {
        let store = store.clone();
        async move {
            store
                .enroll_instance(
                    acme.id,
                    Uuid::new_v4(),
                    &format!("ghes-{index}"),
                    &format!("credential-{index}"),
                    now,
                )
                .await
        }
    });
    for result in futures::future::join_all(enrollments).await {
        result.expect("every concurrent enrollment lands");
    }
    for index in 0..8 {
        assert!(
            store
                .instance_for_credential(&format!("credential-{index}"))
                .await
                .expect("lookup")
                .is_some(),
            "instance {index}"
        );
    }
}

pub async fn hostnames_are_unique_among_live_instances_of_an_enterprise(store: DynStore) {
    let now = OffsetDateTime::now_utc();
    let acme = store
        .create_enterprise("acme", "Acme", 10, now)
        .await
        .expect("create");
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let first = store
        .enroll_instance(acme.id, a, "ghes-a", "ca", now)
        .await
        .expect("enroll a");
    let second = store
        .enroll_instance(acme.id, b, "ghes-b", "cb", now)
        .await
        .expect("enroll b");
    // A snapshot renaming B to A's hostname is refused, naming A and what to do; nothing of it is stored.
    let taken = commit_now(&store, second.id, &snapshot_of(b, "ghes-a", 1_700_000_000))
        .await
        .expect_err("hostname taken");
    assert_eq!(taken.kind, ErrorKind::FailedPrecondition);
    assert!(taken.message.contains(&a.to_string()), "{}", taken.message);
    assert!(
        taken.message.contains("instance.hostname"),
        "{}",
        taken.message
    );
    assert!(stored_logins(&store, acme.id).await.is_empty());
    // So is an enrollment of another instance under it, and re-enrolling B under it.
    for (server_id, credential) in [(c, "cc"), (b, "cb2")] {
        let error = store
            .enroll_instance(acme.id, server_id, "ghes-a", credential, now)
            .await
            .map_err(ServiceError::from)
            .expect_err("enrollment under a taken hostname");
        assert_eq!(error.kind, ErrorKind::FailedPrecondition);
        assert!(error.message.contains(&a.to_string()), "{}", error.message);
    }
    // The refused enrollment created nothing and left B's credential as it was.
    assert!(
        store
            .instance_by_server_id(acme.id, c)
            .await
            .expect("lookup")
            .is_none()
    );
    assert!(
        store
            .instance_for_credential("cb")
            .await
            .expect("lookup")
            .is_some()
    );
    // The same instance keeps its hostname; another enterprise may use it.
    commit(&store, first.id, &snapshot_of(a, "ghes-a", 1_700_000_000))
        .await
        .expect("own hostname");
    let beta = store
        .create_enterprise("beta", "Beta", 10, now)
        .await
        .expect("create");
    store
        .enroll_instance(beta.id, Uuid::new_v4(), "ghes-a", "cx", now)
        .await
        .expect("another enterprise");
    // Once A is retired its hostname is free.
    store
        .retire_instance(acme.id, a, now)
        .await
        .expect("retire");
    commit(&store, second.id, &snapshot_of(b, "ghes-a", 1_700_000_001))
        .await
        .expect("free after retirement");
    let revived = store
        .enroll_instance(acme.id, a, "ghes-a", "ca2", now)
        .await
        .map_err(ServiceError::from)
        .expect_err("coming back under a hostname taken since");
    assert!(
        revived.message.contains(&b.to_string()),
        "{}",
        revived.message
    );

    // Two instances taking one new hostname at once: exactly one gets it.
    let (d, e) = (Uuid::new_v4(), Uuid::new_v4());
    let dee = store
        .enroll_instance(acme.id, d, "ghes-d", "cd", now)
        .await
        .expect("enroll d");
    let eee = store
        .enroll_instance(acme.id, e, "ghes-e", "ce", now)
        .await
        .expect("enroll e");
    let (snap_d, snap_e) = (
        snapshot_of(d, "ghes-shared", 1_700_000_000),
        snapshot_of(e, "ghes-shared", 1_700_000_000),
    );
    let (from_d, from_e) = tokio::join!(
        commit(&store, dee.id, &snap_d),
        commit(&store, eee.id, &snap_e)
    );
    let refused: Vec<ErrorKind> = [from_d, from_e]
        .into_iter()
        .filter_map(Result::err)
        .collect();
    assert_eq!(
        refused,
        [ErrorKind::FailedPrecondition],
        "exactly one of the two is refused"
    );
}

pub async fn cloud_members_are_replaced_whole(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    store
        .replace_cloud_members(acme.id, &[member(1, "a"), member(2, "b")])
        .await
        .expect("import");
    store
        .replace_cloud_members(acme.id, &[member(3, "c")])
        .await
        .expect("import");
    let input = store.load_merge_input(acme.id).await.expect("load");
    // Read back as the view keeps them: the compact table must equal one built from the imported list.
    assert_eq!(
        input.cloud_members.members(),
        &CloudMembers::from_members(&[member(3, "c")])
    );
}

fn at(seconds: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(seconds).expect("valid")
}

/// A fixed "now" for the connection cases, so that expiry is exact.
const NOW: i64 = 1_750_000_000;

pub async fn enrollment_tokens_are_single_use(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let now = OffsetDateTime::now_utc();
    store
        .create_enrollment_token(
            acme.id,
            "token-1",
            now + time::Duration::hours(24),
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("token");
    let server_id = Uuid::new_v4();
    let (enterprise, instance) = store
        .redeem_enrollment_token("token-1", server_id, "ghes-1", "3.14.2", "cred-1", now)
        .await
        .expect("redeem");
    assert_eq!(enterprise.slug, "acme");
    assert_eq!(instance.server_id, server_id);
    assert_eq!(instance.enterprise_id, acme.id);
    assert_eq!(instance.hostname, "ghes-1");
    assert_eq!(instance.ghes_version, "3.14.2");
    assert!(instance.has_credential);
    assert_eq!(
        store
            .instance_for_credential("cred-1")
            .await
            .expect("lookup")
            .map(|i| i.server_id),
        Some(server_id)
    );

    // Used: refused, for the same and for another server id; nothing changes.
    for other_server in [server_id, Uuid::new_v4()] {
        let again = store
            .redeem_enrollment_token("token-1", other_server, "ghes-2", "", "cred-2", now)
            .await
            .map_err(ServiceError::from)
            .expect_err("used");
        assert_eq!(again.kind, ErrorKind::Unauthenticated);
        assert!(
            again
                .message
                .contains("ask an enterprise owner for a new one"),
            "{}",
            again.message
        );
    }
    assert!(
        store
            .instance_for_credential("cred-2")
            .await
            .expect("lookup")
            .is_none()
    );
    assert!(
        store
            .instance_for_credential("cred-1")
            .await
            .expect("lookup")
            .is_some()
    );
    assert_eq!(store.list_instances(acme.id).await.expect("list").len(), 1);

    let unknown = store
        .redeem_enrollment_token("no-such-token", Uuid::new_v4(), "ghes-3", "", "cred-3", now)
        .await
        .map_err(ServiceError::from)
        .expect_err("unknown");
    assert_eq!(unknown.kind, ErrorKind::Unauthenticated);
    assert_eq!(unknown.message, again_message(&store, now).await);
}

/// The refusal message of a used token, to check that unknown and used tokens are refused alike.
async fn again_message(store: &DynStore, now: OffsetDateTime) -> String {
    store
        .redeem_enrollment_token("token-1", Uuid::new_v4(), "h", "", "c", now)
        .await
        .map_err(ServiceError::from)
        .expect_err("used")
        .message
}

pub async fn enrollment_tokens_expire(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let expires = at(NOW + 3600);
    store
        .create_enrollment_token(acme.id, "token-1", expires, OffsetDateTime::now_utc())
        .await
        .expect("token");
    for late in [expires, expires + time::Duration::seconds(1)] {
        let error = store
            .redeem_enrollment_token("token-1", Uuid::new_v4(), "ghes-1", "", "cred-1", late)
            .await
            .map_err(ServiceError::from)
            .expect_err("expired");
        assert_eq!(error.kind, ErrorKind::Unauthenticated);
    }
    assert!(
        store
            .list_instances(acme.id)
            .await
            .expect("list")
            .is_empty()
    );
    // A refused late attempt does not spend it: still usable before it expires.
    store
        .redeem_enrollment_token(
            "token-1",
            Uuid::new_v4(),
            "ghes-1",
            "",
            "cred-1",
            at(NOW + 3599),
        )
        .await
        .expect("in time");
}

pub async fn redeeming_a_token_rotates_the_credential(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let server_id = Uuid::new_v4();
    let instance = store
        .enroll_instance(
            acme.id,
            server_id,
            "ghes-1",
            "cred-old",
            OffsetDateTime::now_utc(),
        )
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
        .retire_instance(acme.id, server_id, OffsetDateTime::now_utc())
        .await
        .expect("retire");
    assert!(stored_logins(&store, acme.id).await.is_empty());

    let now = OffsetDateTime::now_utc();
    store
        .create_enrollment_token(
            acme.id,
            "token-1",
            now + time::Duration::hours(1),
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("token");
    let (_, rotated) = store
        .redeem_enrollment_token(
            "token-1",
            server_id,
            "ghes-1.example.com",
            "3.15.0",
            "cred-new",
            now,
        )
        .await
        .expect("re-enroll");
    assert_eq!(rotated.id, instance.id, "the same instance, not a new one");
    assert!(rotated.retired_at.is_none(), "re-enrolling un-retires");
    assert_eq!(rotated.hostname, "ghes-1.example.com");
    assert_eq!(rotated.ghes_version, "3.15.0");
    assert!(
        store
            .instance_for_credential("cred-old")
            .await
            .expect("lookup")
            .is_none()
    );
    assert_eq!(
        store
            .instance_for_credential("cred-new")
            .await
            .expect("lookup")
            .map(|i| i.id),
        Some(instance.id)
    );
    assert_eq!(
        stored_logins(&store, acme.id).await,
        ["a"],
        "its users count again"
    );

    // An empty GHES version keeps the stored one.
    store
        .create_enrollment_token(
            acme.id,
            "token-2",
            now + time::Duration::hours(1),
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("token");
    let (_, again) = store
        .redeem_enrollment_token(
            "token-2",
            server_id,
            "ghes-1.example.com",
            "",
            "cred-newer",
            now,
        )
        .await
        .expect("re-enroll");
    assert_eq!(again.ghes_version, "3.15.0");
    assert!(
        store
            .instance_for_credential("cred-new")
            .await
            .expect("lookup")
            .is_none()
    );
}

pub async fn enrollment_tokens_never_cross_enterprises(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let other = store
        .create_enterprise("other", "Other", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let acme_server = Uuid::new_v4();
    store
        .enroll_instance(
            acme.id,
            acme_server,
            "ghes-1",
            "cred-acme",
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("enroll");
    let now = OffsetDateTime::now_utc();
    store
        .create_enrollment_token(
            other.id,
            "token-other",
            now + time::Duration::hours(1),
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("token");
    let stolen = store
        .redeem_enrollment_token("token-other", acme_server, "ghes-1", "", "cred-thief", now)
        .await
        .map_err(ServiceError::from)
        .expect_err("belongs to acme");
    assert_eq!(stolen.kind, ErrorKind::PermissionDenied);
    assert!(
        store
            .instance_for_credential("cred-thief")
            .await
            .expect("lookup")
            .is_none()
    );
    assert_eq!(
        store
            .instance_for_credential("cred-acme")
            .await
            .expect("lookup")
            .map(|i| i.enterprise_id),
        Some(acme.id),
        "acme's instance and credential are untouched"
    );
    // The refused redemption did not spend the token: it still enrolls an instance of its own enterprise.
    let (enterprise, instance) = store
        .redeem_enrollment_token(
            "token-other",
            Uuid::new_v4(),
            "ghes-9",
            "",
            "cred-other",
            now,
        )
        .await
        .expect("own instance");
    assert_eq!(enterprise.id, other.id);
    assert_eq!(instance.enterprise_id, other.id);
}

fn report(session_id: Uuid, seen_at: OffsetDateTime) -> AgentReport<'static> {
    AgentReport {
        session_id,
        seen_at,
        sync_enabled: true,
        version: Some("0.1.0"),
        pending_deliveries: None,
    }
}

pub async fn agent_presence_follows_the_control_stream(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let server_id = Uuid::new_v4();
    let instance = store
        .enroll_instance(
            acme.id,
            server_id,
            "ghes-1",
            "cred-1",
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("enroll");
    assert_eq!(instance.agent, Default::default(), "never seen");

    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    store
        .record_agent_presence(instance.id, "cred-1", report(first, at(NOW)))
        .await
        .expect("hello");
    store
        .record_agent_presence(
            instance.id,
            "cred-1",
            AgentReport {
                sync_enabled: false,
                version: None,
                pending_deliveries: Some(3),
                ..report(first, at(NOW + 30))
            },
        )
        .await
        .expect("heartbeat");
    let listed = store.list_instances(acme.id).await.expect("list");
    let agent = &listed[0].agent;
    assert!(agent.session_open);
    assert_eq!(agent.last_seen_at, Some(at(NOW + 30)));
    assert_eq!(agent.sync_enabled, Some(false));
    assert_eq!(
        agent.version.as_deref(),
        Some("0.1.0"),
        "a heartbeat keeps the version"
    );
    assert_eq!(agent.pending_deliveries, Some(3));
    let window = time::Duration::seconds(65);
    assert!(agent.connected(at(NOW + 90), window));
    assert!(
        !agent.connected(at(NOW + 96), window),
        "silent for too long"
    );

    // A newer stream took over: the old one ending does not show the agent disconnected.
    store
        .record_agent_presence(instance.id, "cred-1", report(second, at(NOW + 40)))
        .await
        .expect("second stream");
    store
        .end_agent_session(instance.id, first, at(NOW + 41))
        .await
        .expect("end old");
    let agent = store
        .instance_by_server_id(acme.id, server_id)
        .await
        .expect("get")
        .expect("exists")
        .agent;
    assert!(agent.session_open);
    store
        .end_agent_session(instance.id, second, at(NOW + 50))
        .await
        .expect("end");
    let agent = store
        .instance_by_server_id(acme.id, server_id)
        .await
        .expect("get")
        .expect("exists")
        .agent;
    assert!(!agent.session_open);
    assert!(!agent.connected(at(NOW + 50), window));
    assert_eq!(agent.last_seen_at, Some(at(NOW + 50)));

    // A rotated credential cannot report presence.
    store
        .enroll_instance(
            acme.id,
            server_id,
            "ghes-1",
            "cred-2",
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("rotate");
    let refused = store
        .record_agent_presence(instance.id, "cred-1", report(first, at(NOW + 60)))
        .await
        .map_err(ServiceError::from)
        .expect_err("rotated");
    assert_eq!(refused.kind, ErrorKind::Unauthenticated);
}

pub async fn sync_requests_need_an_active_enrolled_instance(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let other = store
        .create_enterprise("other", "Other", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let now = OffsetDateTime::now_utc();
    let enrolled = Uuid::new_v4();
    store
        .enroll_instance(
            acme.id,
            enrolled,
            "ghes-1",
            "cred-1",
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("enroll");
    let kind = |result: Result<_, license_sync_aggregator::store::StoreError>| {
        result
            .map(|_| ())
            .map_err(|err| ServiceError::from(err).kind)
    };
    assert_eq!(
        kind(
            store
                .create_sync_request(acme.id, Uuid::new_v4(), Uuid::new_v4(), now)
                .await
        ),
        Err(ErrorKind::NotFound),
        "unknown instance"
    );
    assert_eq!(
        kind(
            store
                .create_sync_request(other.id, enrolled, Uuid::new_v4(), now)
                .await
        ),
        Err(ErrorKind::NotFound),
        "another enterprise's instance"
    );
    let request_id = Uuid::new_v4();
    let request = store
        .create_sync_request(acme.id, enrolled, request_id, now)
        .await
        .expect("queued");
    assert_eq!(request.request_id, request_id);
    assert_eq!(request.state(now), SyncRequestState::Queued);
    assert!(
        store
            .sync_request(other.id, enrolled, request_id)
            .await
            .expect("read")
            .is_none()
    );
    assert!(
        store
            .sync_request(acme.id, Uuid::new_v4(), request_id)
            .await
            .expect("read")
            .is_none()
    );
    assert_eq!(
        store
            .sync_request(acme.id, enrolled, request_id)
            .await
            .expect("read"),
        Some(request)
    );
    store
        .retire_instance(acme.id, enrolled, OffsetDateTime::now_utc())
        .await
        .expect("retire");
    assert_eq!(
        kind(
            store
                .create_sync_request(acme.id, enrolled, Uuid::new_v4(), now)
                .await
        ),
        Err(ErrorKind::NotFound),
        "retired instance"
    );
}

pub async fn sync_requests_are_claimed_once(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let (server_a, server_b) = (Uuid::new_v4(), Uuid::new_v4());
    let a = store
        .enroll_instance(
            acme.id,
            server_a,
            "ghes-a",
            "cred-a",
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("enroll");
    let b = store
        .enroll_instance(
            acme.id,
            server_b,
            "ghes-b",
            "cred-b",
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("enroll");
    let now = OffsetDateTime::now_utc();
    let mut queued = Vec::new();
    for offset in 0..5 {
        let request = store
            .create_sync_request(
                acme.id,
                server_a,
                Uuid::new_v4(),
                now + time::Duration::milliseconds(offset),
            )
            .await
            .expect("queued");
        queued.push(request.request_id);
    }

    // Another instance, or a credential that is not the instance's, gets nothing.
    assert!(
        store
            .claim_sync_requests(b.id, "cred-b", now)
            .await
            .expect("claim")
            .is_empty()
    );
    let wrong = store
        .claim_sync_requests(a.id, "cred-b", now)
        .await
        .map_err(ServiceError::from)
        .expect_err("not a's credential");
    assert_eq!(wrong.kind, ErrorKind::Unauthenticated);

    // Eight concurrent claimers: every request is handed out exactly once, oldest first within a claim.
    let claimers = (0..8).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.claim_sync_requests(a.id, "cred-a", now).await })
    });
    let mut claimed = Vec::new();
    for claimer in claimers {
        let batch = claimer.await.expect("task").expect("claim");
        let times: Vec<_> = batch.iter().map(|r| r.requested_at).collect();
        let mut sorted = times.clone();
        sorted.sort();
        assert_eq!(times, sorted, "oldest first");
        claimed.extend(batch.into_iter().map(|r| r.request_id));
    }
    claimed.sort();
    let mut expected = queued.clone();
    expected.sort();
    assert_eq!(claimed, expected, "each request claimed once");
    assert!(
        store
            .claim_sync_requests(a.id, "cred-a", now)
            .await
            .expect("claim")
            .is_empty()
    );
    let delivered = store
        .sync_request(acme.id, server_a, queued[0])
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(delivered.state(now), SyncRequestState::Delivered);
    assert!(delivered.delivered_at.is_some());

    // Released (its stream closed before sending): claimable again, once.
    store
        .release_sync_request(a.id, queued[1])
        .await
        .expect("release");
    let again = store
        .claim_sync_requests(a.id, "cred-a", now)
        .await
        .expect("claim");
    assert_eq!(
        again.iter().map(|r| r.request_id).collect::<Vec<_>>(),
        [queued[1]]
    );

    // Acks: the first answer stands; another instance cannot answer a's request.
    let ack = |request_id, accepted, job_id: &'static str, reason: &'static str| SyncAckRecord {
        request_id,
        accepted,
        job_id,
        reason,
        acked_at: now,
    };
    assert_eq!(
        store
            .record_sync_ack(b.id, ack(queued[0], true, "job-b", ""))
            .await
            .expect("ack"),
        AckOutcome::Unknown
    );
    assert_eq!(
        store
            .record_sync_ack(a.id, ack(queued[0], true, "job-1", ""))
            .await
            .expect("ack"),
        AckOutcome::Recorded
    );
    assert_eq!(
        store
            .record_sync_ack(a.id, ack(queued[0], false, "", "late"))
            .await
            .expect("ack"),
        AckOutcome::AlreadyAcked
    );
    assert_eq!(
        store
            .record_sync_ack(a.id, ack(queued[2], false, "", "license sync is disabled"))
            .await
            .expect("ack"),
        AckOutcome::Recorded
    );
    assert_eq!(
        store
            .record_sync_ack(a.id, ack(Uuid::new_v4(), true, "job", ""))
            .await
            .expect("ack"),
        AckOutcome::Unknown
    );
    let accepted = store
        .sync_request(acme.id, server_a, queued[0])
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(accepted.state(now), SyncRequestState::Accepted);
    assert_eq!(accepted.job_id, "job-1");
    assert_eq!(accepted.accepted, Some(true));
    assert!(accepted.acked_at.is_some());
    let refused = store
        .sync_request(acme.id, server_a, queued[2])
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(refused.state(now), SyncRequestState::Refused);
    assert_eq!(refused.reason, "license sync is disabled");
    // An answered request is never put back in the queue.
    store
        .release_sync_request(a.id, queued[0])
        .await
        .expect("release");
    assert!(
        store
            .claim_sync_requests(a.id, "cred-a", now)
            .await
            .expect("claim")
            .is_empty()
    );

    // Retiring the instance stops delivery to its (now revoked) credential.
    store
        .create_sync_request(acme.id, server_a, Uuid::new_v4(), now)
        .await
        .expect("queued");
    store
        .retire_instance(acme.id, server_a, OffsetDateTime::now_utc())
        .await
        .expect("retire");
    let retired = store
        .claim_sync_requests(a.id, "cred-a", now)
        .await
        .map_err(ServiceError::from)
        .expect_err("revoked");
    assert_eq!(retired.kind, ErrorKind::Unauthenticated);
}

pub async fn undelivered_sync_requests_expire(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let server_id = Uuid::new_v4();
    let instance = store
        .enroll_instance(
            acme.id,
            server_id,
            "ghes-1",
            "cred-1",
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("enroll");
    let now = at(NOW);
    let old = store
        .create_sync_request(
            acme.id,
            server_id,
            Uuid::new_v4(),
            now - time::Duration::hours(25),
        )
        .await
        .expect("queued");
    let recent = store
        .create_sync_request(
            acme.id,
            server_id,
            Uuid::new_v4(),
            now - time::Duration::hours(23),
        )
        .await
        .expect("queued");
    assert_eq!(old.state(now), SyncRequestState::Expired);
    assert_eq!(recent.state(now), SyncRequestState::Queued);
    let claimed = store
        .claim_sync_requests(instance.id, "cred-1", now)
        .await
        .expect("claim");
    assert_eq!(
        claimed.iter().map(|r| r.request_id).collect::<Vec<_>>(),
        [recent.request_id],
        "an expired request is never delivered"
    );
    let stored = store
        .sync_request(acme.id, server_id, old.request_id)
        .await
        .expect("read")
        .expect("kept for owners to read");
    assert_eq!(stored.state(now), SyncRequestState::Expired);
    assert!(stored.delivered_at.is_none());
    // A delivered request does not expire, whatever its age.
    let delivered = store
        .sync_request(acme.id, server_id, recent.request_id)
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(
        delivered.state(now + time::Duration::days(3)),
        SyncRequestState::Delivered
    );

    // Requests older than the retention are deleted by the next request for the instance.
    store
        .create_sync_request(
            acme.id,
            server_id,
            Uuid::new_v4(),
            now + time::Duration::days(31),
        )
        .await
        .expect("queued");
    assert!(
        store
            .sync_request(acme.id, server_id, old.request_id)
            .await
            .expect("read")
            .is_none()
    );
}

pub async fn usage_history_keeps_the_latest_count_and_the_daily_maximum(store: DynStore) {
    use license_sync_aggregator::store::{InstanceUsage, UsageDay};
    let acme = store
        .create_enterprise("acme", "Acme", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let day = |date: &str, consumed: i64| UsageDay {
        date: date.to_owned(),
        consumed,
        max_consumed: consumed,
        purchased: 10,
        instances: vec![InstanceUsage {
            hostname: "ghes-1".into(),
            accounts: consumed + 1,
            consuming: consumed,
        }],
    };
    let now = OffsetDateTime::now_utc();
    for (date, consumed) in [
        ("2026-11-01", 5),
        ("2026-11-01", 9),
        ("2026-11-01", 7),
        ("2026-11-02", 3),
    ] {
        store
            .record_usage(acme.id, &day(date, consumed), now)
            .await
            .expect("record");
    }
    let history = store
        .usage_history(acme.id, "2026-10-01", "2026-11-30")
        .await
        .expect("history");
    assert_eq!(history.len(), 2);
    assert_eq!((history[0].consumed, history[0].max_consumed), (7, 9));
    assert_eq!(history[0].instances[0].accounts, 8);
    assert_eq!(
        (history[1].date.as_str(), history[1].max_consumed),
        ("2026-11-02", 3)
    );
    let one_day = store
        .usage_history(acme.id, "2026-11-02", "2026-11-02")
        .await
        .expect("history");
    assert_eq!(one_day.len(), 1);
}

/// A view built at one generation catches up by reloading only what changed after it.
pub async fn merge_changes_name_only_what_changed_after_a_generation(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let (server_a, server_b) = (Uuid::new_v4(), Uuid::new_v4());
    let a = store
        .enroll_instance(acme.id, server_a, "ghes-a", "ca", OffsetDateTime::now_utc())
        .await
        .expect("enroll a");
    let b = store
        .enroll_instance(acme.id, server_b, "ghes-b", "cb", OffsetDateTime::now_utc())
        .await
        .expect("enroll b");
    commit(
        &store,
        a.id,
        &snapshot(server_a, 1_700_000_000, vec![user(1, "a1")]),
    )
    .await
    .expect("a");
    commit(
        &store,
        b.id,
        &hosted(
            snapshot(server_b, 1_700_000_000, vec![user(1, "b1")]),
            "ghes-b",
        ),
    )
    .await
    .expect("b");

    let all = store
        .load_merge_changes(acme.id, None)
        .await
        .expect("load all");
    assert_eq!(all.instances.len(), 2);
    assert_eq!(
        all.changed_users.len(),
        2,
        "everything is new to a view built from nothing"
    );
    assert!(all.cloud_members.is_some());
    let built_at = all.generation;

    let nothing = store
        .load_merge_changes(acme.id, Some(built_at))
        .await
        .expect("load nothing");
    assert_eq!(nothing.generation, built_at);
    assert!(nothing.changed_users.is_empty());
    assert!(nothing.cloud_members.is_none());

    commit(
        &store,
        b.id,
        &hosted(
            snapshot(server_b, 1_700_000_100, vec![user(1, "b1"), user(2, "b2")]),
            "ghes-b",
        ),
    )
    .await
    .expect("b again");
    let only_b = store
        .load_merge_changes(acme.id, Some(built_at))
        .await
        .expect("load b");
    assert!(only_b.generation > built_at);
    assert_eq!(
        only_b.changed_users.len(),
        1,
        "only the instance that synced"
    );
    let (changed_id, users) = &only_b.changed_users[0];
    assert_eq!(*changed_id, b.id);
    let logins: Vec<&str> = users.iter().map(|u| u.login).collect();
    assert_eq!(logins.len(), 2);
    assert!(logins.contains(&"b1") && logins.contains(&"b2"));
    assert!(only_b.cloud_members.is_none());

    store
        .replace_cloud_members(acme.id, &[member(7, "mona")])
        .await
        .expect("members");
    store
        .retire_instance(acme.id, server_a, OffsetDateTime::now_utc())
        .await
        .expect("retire");
    let later = store
        .load_merge_changes(acme.id, Some(only_b.generation))
        .await
        .expect("load later");
    assert!(
        later.changed_users.is_empty(),
        "a retired instance has no users to load"
    );
    assert_eq!(
        later.instances.iter().map(|i| i.id).collect::<Vec<_>>(),
        [b.id],
        "the retired instance is gone from the active list"
    );
    assert_eq!(later.cloud_members.map(|m| m.members().len()), Some(1));

    // Enrolling again under a new hostname changes what the view shows for that instance's users.
    store
        .enroll_instance(
            acme.id,
            server_b,
            "ghes-b-renamed",
            "cb2",
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("re-enroll");
    let renamed = store
        .load_merge_changes(acme.id, Some(later.generation))
        .await
        .expect("load renamed");
    assert_eq!(renamed.changed_users.len(), 1);
    assert_eq!(renamed.instances[0].hostname, "ghes-b-renamed");
}

/// A NUL byte in a login: SQLite stores it, PostgreSQL refuses it (SQLSTATE 22021). Either way the answer is final
/// (stored, or INVALID_ARGUMENT naming the kind of bad value), never "busy, retry", which an agent retried for ever.
pub async fn a_value_the_database_refuses_is_bad_input_not_busy(store: DynStore) {
    let acme = store
        .create_enterprise("acme", "Acme", 10, OffsetDateTime::now_utc())
        .await
        .expect("create");
    let server_id = Uuid::new_v4();
    let instance = store
        .enroll_instance(acme.id, server_id, "ghes-1", "c", OffsetDateTime::now_utc())
        .await
        .expect("enroll");
    let nul = snapshot(server_id, 1_700_000_000, vec![user(1, "mo\0na")]);
    let sha = hex::encode(nul.digest());
    let outcome = store
        .commit_snapshot(SnapshotCommit {
            instance_id: instance.id,
            snapshot: &nul,
            users_sha256: &sha,
            via: Arrival::Connect,
            now: OffsetDateTime::now_utc(),
        })
        .await
        .map_err(ServiceError::from);
    match outcome {
        Ok(CommitOutcome::Applied { .. }) => {}
        Err(error) => {
            assert_eq!(error.kind, ErrorKind::InvalidArgument, "{error}");
            assert!(error.message.contains("NUL byte"), "{error}");
            assert!(error.message.contains("will not help"), "{error}");
            assert!(
                !error.message.contains("mo\0na"),
                "the value is not echoed: {error}"
            );
        }
        other => panic!("{other:?}"),
    }
}

pub async fn usage_file_keys_are_kept_newest_first_per_enterprise(store: DynStore) {
    let now = OffsetDateTime::now_utc();
    let acme = store
        .create_enterprise("acme", "Acme", 10, now)
        .await
        .expect("create");
    let globex = store
        .create_enterprise("globex", "Globex", 10, now)
        .await
        .expect("create");
    assert!(
        store
            .usage_file_keys(acme.id)
            .await
            .expect("keys")
            .is_empty()
    );
    let first = store
        .add_usage_file_key(acme.id, "age1first", "AGE-SECRET-KEY-1FIRST", now)
        .await
        .expect("add");
    let second = store
        .add_usage_file_key(acme.id, "age1second", "AGE-SECRET-KEY-1SECOND", now)
        .await
        .expect("add");
    store
        .add_usage_file_key(globex.id, "age1globex", "AGE-SECRET-KEY-1GLOBEX", now)
        .await
        .expect("add");
    let keys = store.usage_file_keys(acme.id).await.expect("keys");
    assert_eq!(
        keys,
        vec![second.clone(), first],
        "every key kept, the newest first"
    );
    assert_eq!(keys[0].secret_key, "AGE-SECRET-KEY-1SECOND");
    assert!(
        !format!("{second:?}").contains("SECRET"),
        "Debug hides the secret key"
    );
    let globex_keys = store.usage_file_keys(globex.id).await.expect("keys");
    assert_eq!(globex_keys.len(), 1);
    assert_eq!(globex_keys[0].public_key, "age1globex");
}

pub async fn console_sessions_expire_end_with_their_token_and_sign_out(store: DynStore) {
    let now = at(NOW);
    let acme = store
        .create_enterprise("acme", "Acme", 10, now)
        .await
        .expect("create");
    let token = store
        .create_api_token(
            acme.id,
            "hash-console",
            &NewApiToken {
                name: "console",
                scope: TokenScope::Read,
                expires_at: None,
            },
            now,
        )
        .await
        .expect("token");
    let session =
        |id_sha256: &'static str, api_token_id: Option<i64>, hours: i64| NewConsoleSession {
            id_sha256,
            enterprise_id: acme.id,
            api_token_id,
            scope: if api_token_id.is_some() {
                TokenScope::Read
            } else {
                TokenScope::Admin
            },
            expires_at: now + time::Duration::hours(hours),
        };
    store
        .create_console_session(&session("s-token", Some(token.id), 12), now)
        .await
        .expect("session");
    store
        .create_console_session(&session("s-link", None, 1), now)
        .await
        .expect("session");
    let found = store
        .console_session("s-token", now)
        .await
        .expect("read")
        .expect("live");
    assert_eq!(found.enterprise, acme);
    assert_eq!(found.scope, TokenScope::Read);
    assert_eq!(found.expires_at, now + time::Duration::hours(12));
    let link = store
        .console_session("s-link", now)
        .await
        .expect("read")
        .expect("live");
    assert_eq!(link.scope, TokenScope::Admin);
    assert!(
        store
            .console_session("unknown", now)
            .await
            .expect("read")
            .is_none()
    );
    // Expired at its expiry.
    let later = now + time::Duration::hours(1);
    assert!(
        store
            .console_session("s-link", later)
            .await
            .expect("read")
            .is_none()
    );
    assert!(
        store
            .console_session("s-token", later)
            .await
            .expect("read")
            .is_some()
    );
    // A new session sweeps the enterprise's expired ones: the link session is gone even for an earlier "now".
    store
        .create_console_session(&session("s-other", None, 12), later)
        .await
        .expect("session");
    assert!(
        store
            .console_session("s-link", now)
            .await
            .expect("read")
            .is_none()
    );
    // Revoking the token ends the sessions opened with it, and only those.
    store
        .revoke_api_token(acme.id, TokenSelector::Id(token.id), later)
        .await
        .expect("revoke");
    assert!(
        store
            .console_session("s-token", later)
            .await
            .expect("read")
            .is_none()
    );
    assert!(
        store
            .console_session("s-other", later)
            .await
            .expect("read")
            .is_some()
    );
    // Sign-out deletes it; a second sign-out finds nothing.
    assert!(
        store
            .delete_console_session("s-other")
            .await
            .expect("delete")
    );
    assert!(
        !store
            .delete_console_session("s-other")
            .await
            .expect("delete")
    );
    assert!(
        store
            .console_session("s-other", later)
            .await
            .expect("read")
            .is_none()
    );
}

pub async fn console_links_are_single_use_and_expire(store: DynStore) {
    let now = at(NOW);
    let acme = store
        .create_enterprise("acme", "Acme", 10, now)
        .await
        .expect("create");
    let minutes = |m: i64| now + time::Duration::minutes(m);
    store
        .create_console_link(acme.id, "link-1", minutes(15), now)
        .await
        .expect("link");
    store
        .create_console_link(acme.id, "link-2", minutes(15), now)
        .await
        .expect("link");
    assert!(
        store
            .redeem_console_link("unknown", now)
            .await
            .expect("redeem")
            .is_none()
    );
    let redeemed = store
        .redeem_console_link("link-1", minutes(1))
        .await
        .expect("redeem");
    assert_eq!(redeemed, Some(acme.clone()));
    // Once only.
    assert!(
        store
            .redeem_console_link("link-1", minutes(2))
            .await
            .expect("redeem")
            .is_none()
    );
    // Expired at its expiry, never redeemed after.
    assert!(
        store
            .redeem_console_link("link-2", minutes(15))
            .await
            .expect("redeem")
            .is_none()
    );
    assert!(
        store
            .redeem_console_link("link-2", minutes(14))
            .await
            .expect("redeem")
            .is_some()
    );
    // Concurrent redemptions of one link: exactly one wins.
    store
        .create_console_link(acme.id, "link-3", minutes(15), now)
        .await
        .expect("link");
    let attempts = (0..6).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.redeem_console_link("link-3", now).await })
    });
    let mut winners = 0;
    for attempt in attempts {
        if attempt.await.expect("joined").expect("redeem").is_some() {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
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
            case!(api_tokens_have_names_scopes_expiry_revocation_and_last_use);
            case!(enrollment_binds_and_rotates_credentials);
            case!(commit_replaces_the_snapshot_whole);
            case!(retried_sync_id_is_applied_once);
            case!(older_snapshot_is_refused_and_changes_nothing);
            case!(a_commit_failing_midway_leaves_the_previous_snapshot);
            case!(failed_attempts_are_recorded_without_touching_users);
            case!(retired_instances_stop_counting);
            case!(hostnames_are_unique_among_live_instances_of_an_enterprise);
            case!(concurrent_enrollments_of_one_enterprise_all_land);
            case!(cloud_members_are_replaced_whole);
            case!(usage_history_keeps_the_latest_count_and_the_daily_maximum);
            case!(enrollment_tokens_are_single_use);
            case!(enrollment_tokens_expire);
            case!(redeeming_a_token_rotates_the_credential);
            case!(enrollment_tokens_never_cross_enterprises);
            case!(agent_presence_follows_the_control_stream);
            case!(sync_requests_need_an_active_enrolled_instance);
            case!(sync_requests_are_claimed_once);
            case!(undelivered_sync_requests_expire);
            case!(merge_changes_name_only_what_changed_after_a_generation);
            case!(a_value_the_database_refuses_is_bad_input_not_busy);
            case!(usage_file_keys_are_kept_newest_first_per_enterprise);
            case!(console_sessions_expire_end_with_their_token_and_sign_out);
            case!(console_links_are_single_use_and_expire);
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
