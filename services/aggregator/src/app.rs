//! The application core shared by the gRPC and REST front ends: the one commit path every snapshot takes, and
//! the merged view of an enterprise, cached per store generation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use license_sync_core::merge::{InstanceUsers, Merged, merge};
use license_sync_core::model::CloudMember;
use license_sync_core::snapshot::{Snapshot, SnapshotLimits};
use time::OffsetDateTime;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::config::AggregatorConfig;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::store::{
    Arrival, CommitOutcome, DynStore, Enterprise, Instance, InstanceUsage, SnapshotCommit,
    SyncRequest, UsageDay, no_active_instance,
};
use crate::tokens;

/// What the sender of a snapshot is told once it is committed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Receipt {
    pub sync_id: Uuid,
    pub server_id: Uuid,
    pub users_accepted: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub committed_at: OffsetDateTime,
    /// This sync id had been applied before; nothing was applied again.
    pub duplicate: bool,
}

/// An enterprise's accounts merged into people, for one store generation.
pub struct MergedView {
    pub generation: i64,
    pub seats_purchased: i64,
    pub instances: Vec<InstanceUsers>,
    pub cloud_members: Vec<CloudMember>,
    pub merged: Merged,
}

type ViewSlot = Arc<tokio::sync::Mutex<Option<Arc<MergedView>>>>;

pub struct App {
    pub store: DynStore,
    pub config: Arc<AggregatorConfig>,
    /// One slot per enterprise; its async lock makes concurrent readers of a stale view wait for one rebuild.
    views: Mutex<HashMap<i64, ViewSlot>>,
    /// The instance id of each "Sync now" request created by this process, so that a control stream held here
    /// delivers it at once (streams on other replicas find it by polling the database).
    sync_wakeups: tokio::sync::broadcast::Sender<i64>,
}

impl App {
    pub fn new(store: DynStore, config: AggregatorConfig) -> Arc<Self> {
        Arc::new(App {
            store,
            config: Arc::new(config),
            views: Mutex::new(HashMap::new()),
            sync_wakeups: tokio::sync::broadcast::channel(256).0,
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

    /// The instance a credential belongs to.
    pub async fn authenticate_instance(&self, credential: &str) -> ServiceResult<Instance> {
        self.store
            .instance_for_credential(&tokens::sha256_hex(credential))
            .await?
            .ok_or_else(|| {
                ServiceError::unauthenticated(
                    "unknown or revoked instance credential (the instance was enrolled again or retired): enroll \
                     the agent again with a new enrollment token (`license-sync-aggregator enrollment-token create`), \
                     or issue a credential with `license-sync-aggregator instance add` and configure the agent with it",
                )
            })
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
        let result = self
            .validate_and_commit(instance, &snapshot, via, received_digest)
            .await;
        let meta = &snapshot.meta;
        match &result {
            Ok(receipt) => tracing::info!(
                server_id = %meta.instance.server_id,
                hostname = %meta.instance.hostname,
                sync_id = %meta.sync_id,
                users = receipt.users_accepted,
                duplicate = receipt.duplicate,
                via = via.as_str(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "snapshot committed"
            ),
            Err(error) => self.record_failure(instance, via, error).await,
        }
        result
    }

    async fn validate_and_commit(
        self: &Arc<Self>,
        instance: &Instance,
        snapshot: &Snapshot,
        via: Arrival,
        received_digest: Option<[u8; 32]>,
    ) -> ServiceResult<Receipt> {
        let meta = &snapshot.meta;
        if meta.instance.server_id != instance.server_id {
            return Err(ServiceError::permission_denied(format!(
                "this credential belongs to instance {}, not {}: use the instance's own credential",
                instance.server_id, meta.instance.server_id
            )));
        }
        let now = OffsetDateTime::now_utc();
        tracing::info_span!("aggregator.validate", users = snapshot.users.len() as u64)
            .in_scope(|| snapshot.validate(&self.snapshot_limits(), now))?;
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
            .inspect_err(|error| {
                license_sync_tracing::record_failure(&committing, error.kind.as_str())
            })?;
        drop(committing);
        let receipt = match outcome {
            CommitOutcome::Applied { committed_at } => {
                self.warm_view(instance.enterprise_id);
                Receipt {
                    sync_id: meta.sync_id,
                    server_id: meta.instance.server_id,
                    users_accepted: snapshot.users.len() as u64,
                    committed_at,
                    duplicate: false,
                }
            }
            CommitOutcome::Duplicate {
                committed_at,
                user_count,
            } => Receipt {
                sync_id: meta.sync_id,
                server_id: meta.instance.server_id,
                users_accepted: user_count,
                committed_at,
                duplicate: true,
            },
        };
        Ok(receipt)
    }

    /// Shows a failed attempt on the status page. The stored snapshot is untouched.
    pub async fn record_failure(&self, instance: &Instance, via: Arrival, error: &ServiceError) {
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
        {
            tracing::warn!(error = %record_error.message, "could not record the failed sync");
        }
    }

    /// Rebuilds the merged view in the background so the next reader finds it ready.
    ///
    /// The rebuild is the span `aggregator.merge`, a child of the current span (the sync or upload whose commit
    /// made it necessary) although it ends after the receipt: the sync's trace then shows when the REST view
    /// caught up with it.
    fn warm_view(self: &Arc<Self>, enterprise_id: i64) {
        let app = Arc::clone(self);
        let span = tracing::info_span!("aggregator.merge", enterprise_id);
        tokio::spawn(async move {
            if let Err(error) = app.merged_view(enterprise_id).instrument(span).await {
                tracing::warn!(error = %error.message, "could not rebuild the merged view");
            }
        });
    }

    /// The enterprise's merged view, rebuilt when the store's generation moved on.
    pub async fn merged_view(&self, enterprise_id: i64) -> ServiceResult<Arc<MergedView>> {
        let generation = self.store.enterprise_generation(enterprise_id).await?;
        let slot = {
            let mut views = self
                .views
                .lock()
                .map_err(|_| ServiceError::internal("reading the view cache", "poisoned lock"))?;
            Arc::clone(views.entry(enterprise_id).or_default())
        };
        let mut cached = slot.lock().await;
        if let Some(view) = cached.as_ref()
            && view.generation >= generation
        {
            return Ok(Arc::clone(view));
        }
        let started = Instant::now();
        let input = self.store.load_merge_input(enterprise_id).await?;
        let loaded = started.elapsed();
        let view = tokio::task::spawn_blocking(move || {
            let merged = merge(&input.instances, &input.cloud_members);
            MergedView {
                generation: input.generation,
                seats_purchased: input.seats_purchased,
                instances: input.instances,
                cloud_members: input.cloud_members,
                merged,
            }
        })
        .await
        .map_err(|err| ServiceError::internal("merging accounts", err))?;
        tracing::info!(
            enterprise_id,
            generation = view.generation,
            accounts = view.merged.stats.server_accounts,
            people = view.merged.stats.people,
            consumed = view.merged.total_seats_consumed(),
            load_ms = loaded.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "merged view rebuilt"
        );
        let view = Arc::new(view);
        *cached = Some(Arc::clone(&view));
        self.record_usage(enterprise_id, &view).await;
        Ok(view)
    }

    /// Records today's usage from a freshly built view. A failure is logged: the history is a report, and a
    /// REST answer must not fail because of it.
    async fn record_usage(&self, enterprise_id: i64, view: &MergedView) {
        let now = OffsetDateTime::now_utc();
        let instances = view
            .instances
            .iter()
            .map(|instance| InstanceUsage {
                hostname: instance.hostname.clone(),
                accounts: instance.users.len() as i64,
                consuming: instance
                    .users
                    .iter()
                    .filter(|user| user.consumption().consumes())
                    .count() as i64,
            })
            .collect();
        let consumed = view.merged.total_seats_consumed() as i64;
        let usage = UsageDay {
            date: utc_date(now),
            consumed,
            max_consumed: consumed,
            purchased: view.seats_purchased,
            instances,
        };
        if let Err(error) = self.store.record_usage(enterprise_id, &usage, now).await {
            tracing::warn!(enterprise_id, error = %error.message, "could not record usage history");
        }
    }

    /// Resolves a REST token for an enterprise path segment (slug or numeric id). A token of another enterprise
    /// gets the same answer as an unknown enterprise, so that enterprises cannot be discovered.
    pub async fn authorize_enterprise(
        &self,
        token: &str,
        enterprise: &str,
    ) -> ServiceResult<Enterprise> {
        let owned = self
            .store
            .enterprise_for_api_token(&tokens::sha256_hex(token))
            .await?
            .ok_or_else(|| ServiceError::unauthenticated("Bad credentials"))?;
        if owned.slug == enterprise || owned.id.to_string() == enterprise {
            Ok(owned)
        } else {
            Err(ServiceError::not_found("Not Found"))
        }
    }
}

/// `YYYY-MM-DD` of a UTC time.
pub fn utc_date(time: OffsetDateTime) -> String {
    let date = time.to_offset(time::UtcOffset::UTC).date();
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}
