//! What every kind of trial shares: the fleet of instances, the snapshots sent and their outcomes, the agent's
//! upload client, the store read back directly, and the verdict (torn, lost).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use license_sync_agent::error::AgentError;
use license_sync_agent::upload_client::{UploadClient, UploadReceipt};
use license_sync_core::model::{InstanceIdentity, ServerUser, SourceReport, UserRole};
use license_sync_core::snapshot::{Snapshot, SnapshotDigest, SnapshotMeta};
use license_sync_e2e::admin_with_url;
use time::OffsetDateTime;
use uuid::Uuid;

/// Users per gRPC message, as the agent's default batch size.
const BATCH_SIZE: usize = 500;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// What one trial found.
#[derive(Default)]
pub struct TrialOutcome {
    pub torn: usize,
    pub lost: usize,
    /// Each torn or lost snapshot, said in a sentence.
    pub details: Vec<String>,
    /// Broken promises other than torn or lost, each said in a sentence.
    pub problems: Vec<String>,
    /// From the fault's end (restart, space freed, …) to the first acknowledged sync.
    pub recovery: Vec<Duration>,
    /// From the fault's end to `/readyz` 200, where the kind measures it.
    pub ready: Vec<Duration>,
    /// Counts worth printing (where kills landed, errors seen), summed over the trials.
    pub notes: Vec<(String, usize)>,
}

impl TrialOutcome {
    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push((note.into(), 1));
    }
}

/// One enrolled instance and its credential.
pub struct Instance {
    pub server_id: Uuid,
    pub hostname: String,
    pub credential: String,
}

/// Creates the enterprise `acme` and `count` instances in the database at `database_url` with the admin CLI.
pub fn enroll(database_url: &str, count: usize) -> Result<Vec<Instance>> {
    admin_with_url(
        database_url,
        &["enterprise", "create", "--slug", "acme", "--seats", "100"],
    )?;
    // Four at a time: each is a process that opens the database; the machine may have two cores.
    let mut instances = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(4) {
        let enrolled: Vec<Result<Instance>> = std::thread::scope(|scope| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&index| {
                    scope.spawn(move || {
                        let server_id = Uuid::new_v4();
                        let hostname = format!("ghes-{index}.fault.test");
                        let credential = admin_with_url(
                            database_url,
                            &[
                                "instance",
                                "add",
                                "--enterprise",
                                "acme",
                                "--server-id",
                                &server_id.to_string(),
                                "--hostname",
                                &hostname,
                            ],
                        )?;
                        Ok(Instance {
                            server_id,
                            hostname,
                            credential,
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| {
                    handle
                        .join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("enrolling panicked")))
                })
                .collect()
        });
        for instance in enrolled {
            instances.push(instance?);
        }
    }
    Ok(instances)
}

/// Snapshot `version` of an instance: `users` accounts whose logins and emails carry the version, so that two
/// snapshots of one instance never share a row and a mix of them cannot match either digest.
pub fn snapshot(
    instance: &Instance,
    version: u32,
    users: usize,
    generated_at: OffsetDateTime,
) -> Snapshot {
    Snapshot {
        meta: SnapshotMeta {
            sync_id: Uuid::now_v7(),
            instance: InstanceIdentity {
                server_id: instance.server_id,
                hostname: instance.hostname.clone(),
                ghes_version: "3.14.2".into(),
            },
            generated_at,
            license: None,
            source_report: SourceReport::default(),
        },
        users: (1..=users as i64)
            .map(|id| ServerUser {
                id,
                login: format!("v{version}-user{id}"),
                email: format!("v{version}-user{id}@{}", instance.hostname),
                role: UserRole::User,
                suspended: id % 7 == 0,
                dormant: false,
                created_at: None,
                last_active: None,
                two_factor_enabled: None,
            })
            .collect(),
    }
}

/// When snapshot `version` of a trial was generated: a millisecond apart (the precision the aggregator keeps), so
/// that a later trial's base, taken seconds later, is newer than every version of an earlier one.
pub fn generated_at(base: OffsetDateTime, version: u32) -> OffsetDateTime {
    base + time::Duration::milliseconds(i64::from(version))
}

/// The base time of a trial's snapshots: an hour ago, so that every version is in the past.
pub fn trial_base() -> OffsetDateTime {
    OffsetDateTime::now_utc() - time::Duration::hours(1)
}

/// Streams the snapshot with the agent's own upload client, on a new connection (as the agent's delivery does).
pub async fn upload(
    grpc_url: &str,
    credential: &str,
    snapshot: Arc<Snapshot>,
) -> Result<UploadReceipt, AgentError> {
    let unavailable = |reason: String| AgentError::AggregatorUnavailable {
        endpoint: grpc_url.to_owned(),
        reason,
    };
    let endpoint = tonic::transport::Endpoint::from_shared(grpc_url.to_owned())
        .map_err(|error| unavailable(error.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(60));
    let channel = endpoint
        .connect()
        .await
        .map_err(|error| unavailable(error.to_string()))?;
    let authorization = format!("Bearer {credential}")
        .parse()
        .map_err(|_| unavailable("the credential is not valid metadata".into()))?;
    UploadClient::from_channel(channel, grpc_url.to_owned(), authorization, BATCH_SIZE)
        .upload(snapshot)
        .await
}

/// A snapshot sent during a trial and what the aggregator answered.
pub struct Sent {
    pub instance: usize,
    pub version: u32,
    pub sync_id: Uuid,
    pub users: usize,
    pub digest: String,
    /// The aggregator acknowledged it (its receipt): it must be stored or superseded.
    pub acknowledged: bool,
}

impl Sent {
    pub fn new(instance: usize, version: u32, snapshot: &Snapshot) -> Self {
        Sent {
            instance,
            version,
            sync_id: snapshot.meta.sync_id,
            users: snapshot.users.len(),
            digest: hex_digest(&snapshot.users),
            acknowledged: false,
        }
    }
}

/// The snapshot digest (as the aggregator stores it, lower-case hex) of users in id order.
pub fn hex_digest(users: &[ServerUser]) -> String {
    let mut sorted: Vec<&ServerUser> = users.iter().collect();
    sorted.sort_by_key(|user| user.id);
    let mut digest = SnapshotDigest::default();
    for user in sorted {
        digest.update(user);
    }
    hex::encode(digest.finish())
}

/// What one instance holds in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub users: usize,
    pub digest: String,
}

/// The store read directly (not through the aggregator): SQLite or PostgreSQL.
pub enum StoreReader {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

type UserRow = (String, i64, String, String, String, bool, bool);

const USERS_QUERY: &str = "SELECT i.server_id, u.user_id, u.login, u.email, u.role, u.suspended, u.dormant \
                           FROM server_users u JOIN instances i ON i.id = u.instance_id \
                           ORDER BY i.server_id, u.user_id";

impl StoreReader {
    pub async fn connect(database_url: &str) -> Result<Self> {
        if database_url.starts_with("sqlite:") {
            let options = sqlx::sqlite::SqliteConnectOptions::from_str(database_url)?;
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await
                .with_context(|| format!("open {database_url}"))?;
            Ok(StoreReader::Sqlite(pool))
        } else {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(database_url)
                .await
                .context("connect to the trial's PostgreSQL database")?;
            Ok(StoreReader::Postgres(pool))
        }
    }

    /// Each instance's stored users (count and digest), by server id; instances without users are absent.
    pub async fn stored(&self) -> Result<HashMap<Uuid, Stored>> {
        let rows: Vec<UserRow> = match self {
            StoreReader::Sqlite(pool) => sqlx::query_as(USERS_QUERY).fetch_all(pool).await?,
            StoreReader::Postgres(pool) => sqlx::query_as(USERS_QUERY).fetch_all(pool).await?,
        };
        let mut users: HashMap<Uuid, Vec<ServerUser>> = HashMap::new();
        for (server_id, id, login, email, role, suspended, dormant) in rows {
            let role = UserRole::parse(&role)
                .with_context(|| format!("stored role {role:?} is not a role"))?;
            users
                .entry(Uuid::parse_str(&server_id)?)
                .or_default()
                .push(ServerUser {
                    id,
                    login,
                    email,
                    role,
                    suspended,
                    dormant,
                    created_at: None,
                    last_active: None,
                    two_factor_enabled: None,
                });
        }
        Ok(users
            .into_iter()
            .map(|(server_id, users)| {
                (
                    server_id,
                    Stored {
                        users: users.len(),
                        digest: hex_digest(&users),
                    },
                )
            })
            .collect())
    }

    /// Every applied sync id with the digest it was applied with.
    pub async fn applied(&self) -> Result<HashMap<Uuid, String>> {
        const QUERY: &str = "SELECT sync_id, users_sha256 FROM applied_syncs";
        let rows: Vec<(String, String)> = match self {
            StoreReader::Sqlite(pool) => sqlx::query_as(QUERY).fetch_all(pool).await?,
            StoreReader::Postgres(pool) => sqlx::query_as(QUERY).fetch_all(pool).await?,
        };
        rows.into_iter()
            .map(|(sync_id, digest)| Ok((Uuid::parse_str(&sync_id)?, digest)))
            .collect()
    }

    pub async fn close(self) {
        match self {
            StoreReader::Sqlite(pool) => pool.close().await,
            StoreReader::Postgres(pool) => pool.close().await,
        }
    }
}

/// Torn and lost, from what was sent to each of `instances` and what the store holds.
///
/// Torn: an instance holds users that are not exactly one snapshot sent to it (a mix, a part, or something never
/// sent). Lost: an acknowledged sync id is missing from the applied syncs, or the instance holds an older snapshot
/// than the newest one acknowledged (versions are generated in time order, and the aggregator never goes back).
pub async fn verify(
    reader: &StoreReader,
    instances: &[Instance],
    sent: &[Sent],
    outcome: &mut TrialOutcome,
) -> Result<()> {
    let stored = reader.stored().await?;
    let applied = reader.applied().await?;
    for (index, instance) in instances.iter().enumerate() {
        let mine: Vec<&Sent> = sent.iter().filter(|sent| sent.instance == index).collect();
        let holds = stored.get(&instance.server_id);
        // `None`: the instance holds no users, as before its first commit.
        let held_version = match holds {
            None => None,
            Some(holds) => match mine
                .iter()
                .find(|sent| sent.users == holds.users && sent.digest == holds.digest)
            {
                Some(sent) => Some(sent.version),
                None => {
                    outcome.torn += 1;
                    outcome.details.push(format!(
                        "{} holds {} users that are no snapshot sent to it (torn)",
                        instance.hostname, holds.users
                    ));
                    continue;
                }
            },
        };
        let newest_acknowledged = mine
            .iter()
            .filter(|sent| sent.acknowledged)
            .map(|sent| sent.version)
            .max();
        if let Some(newest) = newest_acknowledged
            && held_version.is_none_or(|held| held < newest)
        {
            outcome.lost += 1;
            outcome.details.push(format!(
                "{} holds version {held_version:?} but version {newest} was acknowledged (lost)",
                instance.hostname
            ));
            continue;
        }
        for sent in mine.iter().filter(|sent| sent.acknowledged) {
            if applied.get(&sent.sync_id) != Some(&sent.digest) {
                outcome.lost += 1;
                outcome.details.push(format!(
                    "{}: acknowledged sync {} is not among the applied syncs (lost)",
                    instance.hostname, sent.sync_id
                ));
            }
        }
    }
    outcome.notes.push((
        "acknowledged syncs checked".into(),
        sent.iter().filter(|sent| sent.acknowledged).count(),
    ));
    Ok(())
}

/// GET `/readyz`: its status, or `None` while nothing answers.
pub async fn readyz(http: &reqwest::Client, http_url: &str) -> Option<u16> {
    let response = http
        .get(format!("{http_url}/readyz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    Some(response.status().as_u16())
}

/// Polls `/readyz` until it answers `status`, for at most `timeout`; returns when it did.
pub async fn wait_readyz(
    http: &reqwest::Client,
    http_url: &str,
    status: u16,
    timeout: Duration,
) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        last = readyz(http, http_url).await.or(last);
        if last == Some(status) {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("/readyz did not answer {status} within {timeout:?} (last: {last:?})");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends fresh snapshots of `instance` until one is acknowledged, for at most `timeout`; returns when.
pub async fn first_successful_sync(
    grpc_url: &str,
    instance: &Instance,
    timeout: Duration,
) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    let base = trial_base();
    let mut version = 0;
    loop {
        let sent = Arc::new(snapshot(instance, version, 3, generated_at(base, version)));
        match upload(grpc_url, &instance.credential, sent).await {
            Ok(_) => return Ok(Instant::now()),
            Err(error) if Instant::now() > deadline => {
                bail!("no sync succeeded within {timeout:?}; the last error: {error}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
        version += 1;
    }
}

/// Snapshot sizes drawn up front from the trial's random stream, so that the seed decides them.
pub fn sizes(
    rng: &mut impl rand::Rng,
    count: usize,
    range: std::ops::RangeInclusive<usize>,
) -> Vec<usize> {
    (0..count)
        .map(|_| rng.random_range(range.clone()))
        .collect()
}

/// How a failed sync is counted in the notes: the agent's error kind, and the gRPC code when it is not one the
/// agent knows.
pub fn failure_note(error: &AgentError) -> String {
    match error {
        AgentError::AggregatorFailed { code, .. } => format!("failed: {} ({code:?})", error.kind()),
        _ => format!("failed: {}", error.kind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tables `verify` reads, as the aggregator's migrations define their columns.
    async fn store_with(
        rows: &[(&Instance, &Snapshot)],
        applied: &[&Snapshot],
    ) -> (tempfile::TempDir, StoreReader) {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/t.db?mode=rwc", dir.path().display());
        let reader = StoreReader::connect(&url).await.expect("open");
        let StoreReader::Sqlite(pool) = &reader else {
            unreachable!("a sqlite URL")
        };
        for statement in [
            "CREATE TABLE instances (id INTEGER PRIMARY KEY, server_id TEXT NOT NULL)",
            "CREATE TABLE server_users (instance_id INTEGER, user_id INTEGER, login TEXT, email TEXT, role TEXT, \
             suspended INTEGER, dormant INTEGER)",
            "CREATE TABLE applied_syncs (sync_id TEXT, users_sha256 TEXT)",
        ] {
            sqlx::query(statement).execute(pool).await.expect("schema");
        }
        for (index, (instance, snapshot)) in rows.iter().enumerate() {
            sqlx::query("INSERT OR IGNORE INTO instances (id, server_id) VALUES ($1, $2)")
                .bind(index as i64)
                .bind(instance.server_id.to_string())
                .execute(pool)
                .await
                .expect("instance");
            for user in &snapshot.users {
                sqlx::query("INSERT INTO server_users VALUES ($1, $2, $3, $4, $5, $6, $7)")
                    .bind(index as i64)
                    .bind(user.id)
                    .bind(&user.login)
                    .bind(&user.email)
                    .bind(user.role.as_str())
                    .bind(user.suspended)
                    .bind(user.dormant)
                    .execute(pool)
                    .await
                    .expect("user");
            }
        }
        for snapshot in applied {
            sqlx::query("INSERT INTO applied_syncs VALUES ($1, $2)")
                .bind(snapshot.meta.sync_id.to_string())
                .bind(hex_digest(&snapshot.users))
                .execute(pool)
                .await
                .expect("applied");
        }
        (dir, reader)
    }

    fn instance() -> Instance {
        Instance {
            server_id: Uuid::new_v4(),
            hostname: "ghes-0.fault.test".into(),
            credential: String::new(),
        }
    }

    /// Versions 0 and 1 of one instance, both acknowledged; the store holds what `stored` makes of them and has
    /// applied the versions `applied` names. Returns (torn, lost).
    async fn verdict(
        stored: impl FnOnce(&Snapshot, &Snapshot) -> Snapshot,
        applied: &[usize],
    ) -> (usize, usize) {
        let instance = instance();
        let base = trial_base();
        let versions = [
            snapshot(&instance, 0, 30, generated_at(base, 0)),
            snapshot(&instance, 1, 30, generated_at(base, 1)),
        ];
        let held = stored(&versions[0], &versions[1]);
        let applied: Vec<&Snapshot> = applied.iter().map(|&version| &versions[version]).collect();
        let (_dir, reader) = store_with(&[(&instance, &held)], &applied).await;
        let sent: Vec<Sent> = versions
            .iter()
            .enumerate()
            .map(|(version, snapshot)| {
                let mut sent = Sent::new(0, version as u32, snapshot);
                sent.acknowledged = true;
                sent
            })
            .collect();
        let mut outcome = TrialOutcome::default();
        verify(&reader, &[instance], &sent, &mut outcome)
            .await
            .expect("verify");
        (outcome.torn, outcome.lost)
    }

    #[tokio::test]
    async fn the_newest_acknowledged_snapshot_stored_whole_passes() {
        assert_eq!(verdict(|_, v1| v1.clone(), &[0, 1]).await, (0, 0));
    }

    #[tokio::test]
    async fn a_mix_of_two_snapshots_is_torn() {
        let mix = |v0: &Snapshot, v1: &Snapshot| {
            let mut mixed = v1.clone();
            mixed.users[29] = v0.users[29].clone();
            mixed
        };
        assert_eq!(verdict(mix, &[0, 1]).await, (1, 0));
    }

    #[tokio::test]
    async fn an_acknowledged_snapshot_that_is_not_stored_is_lost() {
        // The store kept version 0 and never applied version 1, which was acknowledged.
        assert_eq!(verdict(|v0, _| v0.clone(), &[0]).await, (0, 1));
    }
}
