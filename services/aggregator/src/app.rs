//! The application core shared by the gRPC and REST front ends: the one commit path every snapshot takes, which
//! hands each committed snapshot to the merged views ([`crate::view`]).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use license_sync_core::snapshot::{Snapshot, SnapshotLimits};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::auth::ApiTokens;
use crate::auth_limit::FailedAuthLimiter;
use crate::body_pool::BodyPool;
use crate::config::AggregatorConfig;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::metrics::{AuthSurface, Metrics, Rejection};
use crate::store::{
    Arrival, CommitOutcome, DynStore, Enterprise, Instance, SnapshotCommit, SyncRequest,
    no_active_instance,
};
use crate::tokens;
use crate::view::{Committed, Views};

/// What the sender of a snapshot is told once it is committed.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Receipt {
    pub sync_id: Uuid,
    pub server_id: Uuid,
    pub users_accepted: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub committed_at: OffsetDateTime,
    /// This sync id had been applied before; nothing was applied again.
    pub duplicate: bool,
}

pub struct App {
    pub store: DynStore,
    pub config: Arc<AggregatorConfig>,
    pub metrics: Arc<Metrics>,
    /// The merged view of each enterprise, which every commit of this process is handed to.
    pub views: Arc<Views>,
    /// The REST API token check and its cache.
    pub api_tokens: ApiTokens,
    /// Counts refused credentials per client address and throttles the addresses over the limit.
    pub auth_limiter: FailedAuthLimiter,
    /// The instance id of each "Sync now" request created by this process, so that a control stream held here
    /// delivers it at once (streams on other replicas find it by polling the database).
    sync_wakeups: tokio::sync::broadcast::Sender<i64>,
    /// Buffers for `consumed-licenses` pages, reused from one request to the next.
    pub body_pool: Arc<BodyPool>,
}

/// What [`crate::auth::AuthorizedEnterprise`] needs of the state, so that `auth` does not depend on `App`.
impl axum::extract::FromRef<Arc<App>> for ApiTokens {
    fn from_ref(app: &Arc<App>) -> Self {
        app.api_tokens.clone()
    }
}

impl App {
    pub fn new(store: DynStore, config: AggregatorConfig) -> Arc<Self> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::for_served_services());
        let auth_limiter = FailedAuthLimiter::new(
            config.auth_failures_per_minute,
            config.auth_failure_tracked_addresses,
            Arc::clone(&metrics),
        );
        Arc::new(App {
            api_tokens: ApiTokens::new(
                store.clone(),
                std::time::Duration::from_secs(config.api_token_cache_secs),
                auth_limiter.clone(),
            ),
            auth_limiter,
            views: Arc::new(Views::new(
                store.clone(),
                Arc::clone(&config),
                Arc::clone(&metrics),
            )),
            store,
            config,
            metrics,
            sync_wakeups: tokio::sync::broadcast::channel(256).0,
            body_pool: Arc::new(BodyPool::default()),
        })
    }

    /// How long an agent may stay silent and still be shown connected: two heartbeat intervals and 5 s.
    pub fn agent_presence_window(&self) -> time::Duration {
        time::Duration::seconds(2 * i64::from(self.config.agent_heartbeat_interval_secs) + 5)
    }

    /// Wake-ups of the control streams held by this process: the instance id of each new "Sync now" request.
    pub fn subscribe_sync_wakeups(&self) -> tokio::sync::broadcast::Receiver<i64> {
        self.sync_wakeups.subscribe()
    }

    /// Queues a "Sync now" for an instance of the enterprise and wakes its control stream if this process holds
    /// it. Returns the request and the instance as it is now (for its agent's presence).
    pub async fn request_sync_now(
        &self,
        enterprise: &Enterprise,
        server_id: Uuid,
    ) -> ServiceResult<(SyncRequest, Instance)> {
        let now = OffsetDateTime::now_utc();
        let request = self
            .store
            .create_sync_request(enterprise.id, server_id, Uuid::now_v7(), now)
            .await?;
        // No receiver (no stream on this process) is fine: the streams elsewhere poll.
        let _ = self.sync_wakeups.send(request.instance_id);
        let instance = self
            .store
            .instance_by_server_id(enterprise.id, server_id)
            .await?
            .ok_or_else(|| no_active_instance(server_id))?;
        tracing::info!(
            enterprise = %enterprise.slug,
            %server_id,
            hostname = %instance.hostname,
            request_id = %request.request_id,
            agent_connected = instance.agent.connected(now, self.agent_presence_window()),
            "sync now requested"
        );
        Ok((request, instance))
    }

    pub fn snapshot_limits(&self) -> SnapshotLimits {
        SnapshotLimits {
            max_users: self.config.max_snapshot_users,
        }
    }

    /// The instance of a live credential. A refused credential counts against `client`'s failed-authentication
    /// limit (see `auth_limit`). With a client CA configured (mTLS), the call's client certificate
    /// (`client_certificates`, from [`crate::tls::client_certificates`]) must be bound to that instance too.
    pub async fn authenticate_instance(
        &self,
        credential: &str,
        client_certificates: Option<&[CertificateDer<'static>]>,
        client: Option<IpAddr>,
    ) -> ServiceResult<Instance> {
        let instance = self
            .store
            .instance_for_credential(&tokens::sha256_hex(credential))
            .await?;
        let instance = instance.ok_or_else(|| {
            let refusal = ServiceError::unauthenticated(
                    "unknown or revoked instance credential (the instance was enrolled again or retired): enroll \
                     the agent again with a new enrollment token (`license-sync-aggregator enrollment-token create`), \
                     or issue a credential with `license-sync-aggregator instance add` and configure the agent with it",
            );
            self.auth_limiter
                .refused(client, AuthSurface::InstanceCredential, refusal)
        })?;
        if self.config.tls_client_ca_path.is_some() {
            crate::tls::check_instance_certificate(client_certificates, instance.server_id)?;
        }
        Ok(instance)
    }

    /// Validates and commits a snapshot for an instance; the one path for streamed and uploaded snapshots.
    /// `received_digest` is the digest computed while receiving, to avoid hashing the users twice.
    pub async fn commit_snapshot(
        self: &Arc<Self>,
        instance: &Instance,
        snapshot: Snapshot,
        via: Arrival,
        received_digest: Option<[u8; 32]>,
    ) -> ServiceResult<Receipt> {
        let started = Instant::now();
        let (receipt, applied_generation) = match self
            .validate_and_commit(instance, &snapshot, via, received_digest)
            .await
        {
            Ok(committed) => committed,
            Err(error) => {
                self.record_failure(instance, via, &error).await;
                return Err(error);
            }
        };
        self.metrics
            .sync_committed(via, receipt.duplicate, started.elapsed());
        let meta = &snapshot.meta;
        tracing::info!(
            server_id = %meta.instance.server_id,
            hostname = %meta.instance.hostname,
            sync_id = %meta.sync_id,
            users = receipt.users_accepted,
            duplicate = receipt.duplicate,
            via = via.as_str(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot committed"
        );
        if let Some(generation) = applied_generation {
            self.views.note_change(instance.enterprise_id);
            self.views.apply_commit_in_background(
                instance.enterprise_id,
                Committed {
                    generation,
                    instance_id: instance.id,
                    hostname: snapshot.meta.instance.hostname,
                    users: snapshot.users,
                },
            );
        }
        Ok(receipt)
    }

    async fn validate_and_commit(
        self: &Arc<Self>,
        instance: &Instance,
        snapshot: &Snapshot,
        via: Arrival,
        received_digest: Option<[u8; 32]>,
    ) -> ServiceResult<(Receipt, Option<i64>)> {
        let meta = &snapshot.meta;
        if meta.instance.server_id != instance.server_id {
            self.metrics.rejected(Rejection::WrongInstance);
            return Err(ServiceError::permission_denied(format!(
                "this credential belongs to instance {}, not {}: use the instance's own credential",
                instance.server_id, meta.instance.server_id
            )));
        }
        let now = OffsetDateTime::now_utc();
        tracing::info_span!("aggregator.validate", users = snapshot.users.len() as u64)
            .in_scope(|| snapshot.validate(&self.snapshot_limits(), now))
            .inspect_err(|error| self.metrics.rejected(Rejection::of(error)))?;
        let digest = received_digest.unwrap_or_else(|| snapshot.digest());
        let users_sha256 = hex::encode(digest);
        let committing = tracing::info_span!(
            "aggregator.commit",
            instance_id = instance.id,
            users = snapshot.users.len() as u64
        );
        let outcome = self
            .store
            .commit_snapshot(SnapshotCommit {
                instance_id: instance.id,
                snapshot,
                users_sha256: &users_sha256,
                via,
                now,
            })
            .instrument(committing.clone())
            .await
            .map_err(ServiceError::from)
            .inspect_err(|error| {
                license_sync_tracing::record_failure(&committing, error.kind.as_str())
            })?;
        drop(committing);
        Ok(match outcome {
            CommitOutcome::Applied {
                committed_at,
                generation,
            } => (
                Receipt {
                    sync_id: meta.sync_id,
                    server_id: meta.instance.server_id,
                    users_accepted: snapshot.users.len() as u64,
                    committed_at,
                    duplicate: false,
                },
                Some(generation),
            ),
            CommitOutcome::Duplicate {
                committed_at,
                user_count,
            } => (
                Receipt {
                    sync_id: meta.sync_id,
                    server_id: meta.instance.server_id,
                    users_accepted: user_count,
                    committed_at,
                    duplicate: true,
                },
                None,
            ),
        })
    }

    /// Shows a failed attempt on the status page. The stored snapshot is untouched.
    pub async fn record_failure(&self, instance: &Instance, via: Arrival, error: &ServiceError) {
        self.metrics.sync_failed(via, error.kind);
        tracing::warn!(
            server_id = %instance.server_id,
            hostname = %instance.hostname,
            via = via.as_str(),
            kind = error.kind.as_str(),
            error = %error.message,
            "snapshot refused"
        );
        if matches!(error.kind, ErrorKind::Unauthenticated | ErrorKind::Internal) {
            return;
        }
        if let Err(record_error) = self
            .store
            .record_failed_sync(instance.id, via, &error.message, OffsetDateTime::now_utc())
            .await
            .map_err(ServiceError::from)
        {
            tracing::warn!(error = %record_error.message, "could not record the failed sync");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicBool, Ordering};

    use license_sync_core::model::{InstanceIdentity, ServerUser, SourceReport, UserRole};
    use license_sync_core::snapshot::SnapshotMeta;

    use super::*;
    use crate::admin;

    /// `view_check_interval_ms` of both replicas: also how long commits must pause before a catch-up.
    const QUIET_MS: u64 = 1000;

    async fn replica(database_url: &str) -> Arc<App> {
        let store = crate::store::open(database_url).await.expect("store");
        App::new(
            store,
            AggregatorConfig {
                database_url: database_url.to_owned(),
                view_check_interval_ms: QUIET_MS,
                ..AggregatorConfig::default()
            },
        )
    }

    fn snapshot(instance: &Instance, version: i64, users: i64) -> Snapshot {
        let base = OffsetDateTime::now_utc() - time::Duration::hours(1);
        Snapshot {
            meta: SnapshotMeta {
                sync_id: Uuid::new_v4(),
                instance: InstanceIdentity {
                    server_id: instance.server_id,
                    hostname: instance.hostname.clone(),
                    ghes_version: "3.14.2".into(),
                },
                generated_at: base + time::Duration::seconds(version),
                license: None,
                source_report: SourceReport::default(),
            },
            users: (0..users)
                .map(|id| ServerUser {
                    id,
                    login: format!("user{id}"),
                    // Shared across instances, so the same people are met on several of them.
                    email: format!("user{id}@example.com"),
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

    /// The view's generation as it is, without bringing it up to date.
    async fn view_generation(app: &App, enterprise_id: i64) -> Option<i64> {
        app.views.generation_as_is(enterprise_id).await
    }

    /// What a reader is told: generation, consumed seats and the consuming people in order.
    async fn answer(app: &App, enterprise_id: i64) -> (i64, u64, Vec<String>) {
        let view = app.views.merged_view(enterprise_id).await.expect("view");
        let people = view
            .people
            .consuming()
            .iter()
            .map(|slot| {
                let person = view.people.person(*slot).expect("person");
                view.people.person_id(person).to_string()
            })
            .collect();
        (view.generation, view.people.total_seats_consumed(), people)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_commits_is_read_back_once_after_it_and_replicas_answer_alike() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("shared.db").display());
        // Two replicas' worth of state on one database.
        let (a, b) = (replica(&url).await, replica(&url).await);
        let enterprise = admin::create_enterprise(&a.store, "acme", "Acme", 100)
            .await
            .expect("enterprise");
        let mut instances = Vec::new();
        for i in 0..4 {
            let (instance, _) =
                admin::add_instance(&a.store, "acme", Uuid::new_v4(), &format!("ghes-{i}.test"))
                    .await
                    .expect("instance");
            instances.push(instance);
        }
        let id = enterprise.id;
        let before = answer(&a, id).await.0;
        assert_eq!(answer(&b, id).await.0, before);

        // Record every generation each view passes through during the burst.
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (a, b, stop) = (Arc::clone(&a), Arc::clone(&b), Arc::clone(&stop));
            tokio::spawn(async move {
                let (mut seen_a, mut seen_b) = (BTreeSet::new(), BTreeSet::new());
                while !stop.load(Ordering::Relaxed) {
                    seen_a.extend(view_generation(&a, id).await);
                    seen_b.extend(view_generation(&b, id).await);
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
                (seen_a, seen_b)
            })
        };
        // Commits alternate between the replicas, B first: from the second on, each finds its replica's view
        // behind by the other's commit, so none can be applied directly and all join one catch-up per replica.
        for version in 0..4 {
            for (i, instance) in instances.iter().enumerate() {
                let app = if i % 2 == 0 { &b } else { &a };
                app.commit_snapshot(
                    instance,
                    snapshot(instance, version, 5 + version + i as i64),
                    Arrival::Connect,
                    None,
                )
                .await
                .expect("commit");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        let last = a.store.enterprise_generation(id).await.expect("generation");
        assert_eq!(last, before + 16);
        // Both views catch up in the background, once commits have paused, without a reader asking.
        let deadline = Instant::now() + std::time::Duration::from_secs(20);
        while view_generation(&a, id).await != Some(last)
            || view_generation(&b, id).await != Some(last)
        {
            assert!(Instant::now() < deadline, "the views did not catch up");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let (seen_a, seen_b) = sampler.await.expect("sampler");
        // A never applied one of its commits directly and B only its first: one read-back each, at the end.
        assert!(
            seen_a.is_subset(&BTreeSet::from([before, last])),
            "A's view went through {seen_a:?}"
        );
        assert!(
            seen_b.is_subset(&BTreeSet::from([before, before + 1, last])),
            "B's view went through {seen_b:?}"
        );

        // Both answer what a view built from scratch answers.
        let fresh = replica(&url).await;
        let expected = answer(&fresh, id).await;
        assert_eq!(expected.0, last);
        assert_eq!(answer(&a, id).await, expected);
        assert_eq!(answer(&b, id).await, expected);

        // A reader sees its own process's commit at once, even with a catch-up waiting (the view was behind: a
        // commit of B came between), and the other replica's within `view_check_interval_ms`.
        let instance = &instances[0];
        b.commit_snapshot(instance, snapshot(instance, 10, 40), Arrival::Connect, None)
            .await
            .expect("commit");
        a.commit_snapshot(instance, snapshot(instance, 11, 50), Arrival::Connect, None)
            .await
            .expect("commit");
        let own = answer(&a, id).await;
        assert_eq!(own.0, last + 2);
        assert_eq!(own.1, 50);
        tokio::time::sleep(std::time::Duration::from_millis(QUIET_MS + 100)).await;
        assert_eq!(answer(&b, id).await, own);
    }
}
