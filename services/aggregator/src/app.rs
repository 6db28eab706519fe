//! The application core shared by the gRPC and REST front ends: the one commit path every snapshot takes, and
//! the merged view of an enterprise, cached per store generation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use license_sync_core::accounts::Accounts;
use license_sync_core::incremental::{InstanceChange, PeopleIndex};
use license_sync_core::merge::LikelyDuplicate;
use license_sync_core::snapshot::{Snapshot, SnapshotLimits};
use time::OffsetDateTime;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::body_pool::BodyPool;
use crate::config::AggregatorConfig;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::metrics::{Metrics, Rejection};
use crate::store::{
    Arrival, CommitOutcome, DynStore, Enterprise, Instance, InstanceUsage, MergeChanges,
    SnapshotCommit, SyncRequest, UsageDay, no_active_instance,
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

/// An enterprise's accounts merged into people, as of one store generation. Kept up to date in place: a newer
/// generation reloads only the instances whose users changed and applies them to the [`PeopleIndex`].
pub struct MergedView {
    pub generation: i64,
    pub seats_purchased: i64,
    /// Instances are keyed by their store id.
    pub people: PeopleIndex,
}

/// The users of a snapshot this process just committed, to apply to the view without reading them back.
struct Committed {
    generation: i64,
    instance_id: i64,
    hostname: String,
    /// The snapshot's rows, converted to the view's compact form only when they are applied (off the ack path).
    users: Vec<license_sync_core::model::ServerUser>,
}

/// How a view refresh went, for its log line and metrics.
struct Refresh {
    started: Instant,
    loaded: std::time::Duration,
    reloaded_instances: usize,
    from_commit: bool,
}

/// A reader's hold on a current merged view. Readers share it; a refresh waits for them only to apply a change.
pub type ViewGuard = tokio::sync::OwnedRwLockReadGuard<Option<MergedView>, MergedView>;

/// The cached view of one enterprise.
#[derive(Default)]
struct ViewSlot {
    view: Arc<tokio::sync::RwLock<Option<MergedView>>>,
    /// One refresh at a time: concurrent readers of a stale view wait for it instead of loading the same change.
    refresh: tokio::sync::Mutex<()>,
    /// The store's generation as last checked, and when: readers reuse it for `view_check_interval_ms`.
    checked: Mutex<Option<(i64, Instant)>>,
    /// Serialised `consumed-licenses` bodies of one view generation, by (per_page, page).
    pages: Mutex<PageCache>,
    /// The likely duplicates of one view generation: a pass over every consuming person, so computed once.
    duplicates: Mutex<Option<(i64, Arc<Vec<LikelyDuplicate>>)>>,
    /// The UTC day this process last recorded the enterprise's usage: each day gets a row even when nothing changes.
    usage_recorded_on: Mutex<Option<time::Date>>,
    /// A background catch-up from the store is waiting for commits to pause; a commit of this process that
    /// cannot be applied to the view directly joins it instead of starting another.
    catch_up: Mutex<bool>,
}

#[derive(Default)]
struct PageCache {
    generation: i64,
    bodies: HashMap<(usize, usize), axum::body::Bytes>,
    bytes: usize,
}

/// The longest a view's background catch-up waits for the enterprise's commits to pause (unless
/// `view_check_interval_ms` is longer): under a steady stream of commits the view still catches up this often.
const CATCH_UP_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct App {
    pub store: DynStore,
    pub config: Arc<AggregatorConfig>,
    pub metrics: Arc<Metrics>,
    /// One slot per enterprise; its async lock makes concurrent readers of a stale view wait for one rebuild.
    views: Mutex<HashMap<i64, Arc<ViewSlot>>>,
    /// Checked REST API tokens (by SHA-256) and when they were checked.
    api_tokens: Mutex<HashMap<String, (Enterprise, Instant)>>,
    /// The instance id of each "Sync now" request created by this process, so that a control stream held here
    /// delivers it at once (streams on other replicas find it by polling the database).
    sync_wakeups: tokio::sync::broadcast::Sender<i64>,
    /// Buffers for `consumed-licenses` pages, reused from one request to the next.
    pub body_pool: Arc<BodyPool>,
}

impl App {
    pub fn new(store: DynStore, config: AggregatorConfig) -> Arc<Self> {
        Arc::new(App {
            store,
            config: Arc::new(config),
            metrics: Arc::new(Metrics::for_served_services()),
            views: Mutex::new(HashMap::new()),
            api_tokens: Mutex::new(HashMap::new()),
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
            self.note_change(instance.enterprise_id);
            self.warm_view(
                instance.enterprise_id,
                Some(Committed {
                    generation,
                    instance_id: instance.id,
                    hostname: snapshot.meta.instance.hostname,
                    users: snapshot.users,
                }),
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

    /// Brings the merged view up to date in the background so the next reader finds it ready. Given the commit
    /// this process just made, applies its users directly when the view is at the generation just before it.
    fn warm_view(self: &Arc<Self>, enterprise_id: i64, committed: Option<Committed>) {
        let app = Arc::clone(self);
        let span = tracing::info_span!("aggregator.merge", enterprise_id);
        tokio::spawn(
            async move {
                let result = match committed {
                    Some(committed) => app.apply_commit(enterprise_id, committed).await,
                    None => app.merged_view(enterprise_id).await.map(drop),
                };
                if let Err(error) = result {
                    tracing::warn!(error = %error.message, "could not rebuild the merged view");
                }
            }
            .instrument(span),
        );
    }

    /// Applies a commit of this process to the view without reading its users back from the store. Exact only
    /// when the view is at the generation just before the commit's (every change bumps the generation once), so
    /// any other case joins the view's background catch-up from the store instead.
    async fn apply_commit(&self, enterprise_id: i64, committed: Committed) -> ServiceResult<()> {
        let slot = self.view_slot(enterprise_id)?;
        let refreshing = slot.refresh.lock().await;
        let at = slot.view.read().await.as_ref().map(|view| view.generation);
        let started = Instant::now();
        // The view keeps accounts in compact columns; the full rows go as soon as they are converted.
        let users = (at == Some(committed.generation - 1))
            .then(|| {
                Accounts::from_users(&committed.users)
                    .inspect_err(|error| {
                        tracing::warn!(%error, "the view will read this snapshot back from the store")
                    })
                    .ok()
            })
            .flatten();
        let Some(users) = users else {
            drop(refreshing);
            let committed_generation = committed.generation;
            drop(committed);
            return self
                .catch_up(enterprise_id, &slot, committed_generation)
                .await;
        };
        drop(committed.users);
        let view = apply_to_view(&slot, move |view| {
            if let Some(view) = view.as_mut() {
                view.people.apply([InstanceChange::Upsert {
                    key: committed.instance_id,
                    hostname: committed.hostname,
                    users,
                }]);
                view.generation = committed.generation;
            }
        })
        .await?;
        let refresh = Refresh {
            started,
            loaded: std::time::Duration::ZERO,
            reloaded_instances: 0,
            from_commit: true,
        };
        self.finish_refresh(enterprise_id, view, refresh)
            .await
            .map(drop)
    }

    /// Joins the view's background catch-up from the store, or becomes it when none is waiting. The catch-up
    /// waits until the enterprise's generation (in the store, so commits on every replica count) has not moved for
    /// `view_check_interval_ms`, or at most [`CATCH_UP_MAX_WAIT`], then loads every change since the view's
    /// generation at once: a burst of commits is read back once, after the burst, instead of after each commit
    /// while they still compete for the same CPUs and database. Readers do not depend on it: one that finds the
    /// view behind the store's generation brings it up to date itself.
    async fn catch_up(
        &self,
        enterprise_id: i64,
        slot: &ViewSlot,
        committed_generation: i64,
    ) -> ServiceResult<()> {
        {
            let mut catch_up = slot.catch_up.lock().map_err(|_| {
                ServiceError::internal("scheduling a view catch-up", "poisoned lock")
            })?;
            if *catch_up {
                return Ok(());
            }
            *catch_up = true;
        }
        let result = self
            .wait_for_quiet(enterprise_id, slot, committed_generation)
            .await;
        // Commits from here on schedule the next catch-up: this one may read the store before they commit.
        if let Ok(mut catch_up) = slot.catch_up.lock() {
            *catch_up = false;
        }
        result?;
        self.merged_view(enterprise_id).await.map(drop)
    }

    /// Waits until the store's generation of the enterprise stays put for `view_check_interval_ms` (from
    /// `generation`, the last one known), or for [`CATCH_UP_MAX_WAIT`]; leaves the last check for readers.
    async fn wait_for_quiet(
        &self,
        enterprise_id: i64,
        slot: &ViewSlot,
        mut generation: i64,
    ) -> ServiceResult<()> {
        let quiet = std::time::Duration::from_millis(self.config.view_check_interval_ms);
        if quiet.is_zero() {
            return Ok(());
        }
        let deadline = Instant::now() + CATCH_UP_MAX_WAIT.max(quiet);
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            tokio::time::sleep(quiet.min(deadline - now)).await;
            let latest = self.store.enterprise_generation(enterprise_id).await?;
            if let Ok(mut checked) = slot.checked.lock() {
                *checked = Some((latest, Instant::now()));
            }
            if latest == generation {
                return Ok(());
            }
            generation = latest;
        }
    }

    fn view_slot(&self, enterprise_id: i64) -> ServiceResult<Arc<ViewSlot>> {
        let mut views = self
            .views
            .lock()
            .map_err(|_| ServiceError::internal("reading the view cache", "poisoned lock"))?;
        Ok(Arc::clone(views.entry(enterprise_id).or_default()))
    }

    /// The store's generation of an enterprise, or a check of it made less than `view_check_interval_ms` ago.
    async fn store_generation(&self, slot: &ViewSlot, enterprise_id: i64) -> ServiceResult<i64> {
        let interval = std::time::Duration::from_millis(self.config.view_check_interval_ms);
        if let Ok(checked) = slot.checked.lock()
            && let Some((generation, at)) = *checked
            && at.elapsed() < interval
        {
            return Ok(generation);
        }
        let generation = self.store.enterprise_generation(enterprise_id).await?;
        if let Ok(mut checked) = slot.checked.lock() {
            *checked = Some((generation, Instant::now()));
        }
        Ok(generation)
    }

    /// Forgets the last generation check, after a change made through this process, so readers see it at once.
    pub fn note_change(&self, enterprise_id: i64) {
        if let Ok(slot) = self.view_slot(enterprise_id)
            && let Ok(mut checked) = slot.checked.lock()
        {
            *checked = None;
        }
    }

    /// A serialised `consumed-licenses` body of this view generation, if one was cached.
    pub fn cached_page(
        &self,
        enterprise_id: i64,
        generation: i64,
        key: (usize, usize),
    ) -> Option<axum::body::Bytes> {
        let slot = self.view_slot(enterprise_id).ok()?;
        let pages = slot.pages.lock().ok()?;
        (pages.generation == generation)
            .then(|| pages.bodies.get(&key).cloned())
            .flatten()
    }

    pub fn cache_page(
        &self,
        enterprise_id: i64,
        generation: i64,
        key: (usize, usize),
        body: axum::body::Bytes,
    ) {
        let Ok(slot) = self.view_slot(enterprise_id) else {
            return;
        };
        let Ok(mut pages) = slot.pages.lock() else {
            return;
        };
        if generation < pages.generation {
            return;
        }
        // `page_cache_mib` bounds it (8 MiB by default: about 130 pages of 100 users). Clients mostly read the first
        // pages or walk them in order, so a small cache serves most requests, and it is memory per enterprise.
        let max_bytes = self.config.page_cache_mib as usize * 1024 * 1024;
        if body.len() > max_bytes {
            return;
        }
        if pages.generation != generation || pages.bytes + body.len() > max_bytes {
            // A newer generation makes every cached page wrong; a full cache starts again rather than track use.
            pages.generation = generation;
            pages.bodies.clear();
            pages.bytes = 0;
        }
        pages.bytes += body.len();
        if let Some(replaced) = pages.bodies.insert(key, body) {
            pages.bytes -= replaced.len();
        }
    }

    /// The view's likely duplicates, computed once per generation.
    pub fn likely_duplicates(
        &self,
        enterprise_id: i64,
        view: &MergedView,
    ) -> Arc<Vec<LikelyDuplicate>> {
        let slot = self.view_slot(enterprise_id).ok();
        if let Some(slot) = &slot
            && let Ok(cached) = slot.duplicates.lock()
            && let Some((generation, duplicates)) = cached.as_ref()
            && *generation == view.generation
        {
            return Arc::clone(duplicates);
        }
        let duplicates = Arc::new(view.people.likely_duplicates());
        if let Some(slot) = slot
            && let Ok(mut cached) = slot.duplicates.lock()
        {
            *cached = Some((view.generation, Arc::clone(&duplicates)));
        }
        duplicates
    }

    /// The enterprise's merged view, brought up to date when the store's generation moved on.
    pub async fn merged_view(&self, enterprise_id: i64) -> ServiceResult<ViewGuard> {
        let slot = self.view_slot(enterprise_id)?;
        let generation = self.store_generation(&slot, enterprise_id).await?;
        if let Some(current) = current_view(&slot, generation).await {
            // A view unchanged since yesterday still owes today its usage row.
            let today = OffsetDateTime::now_utc().date();
            let recorded = slot.usage_recorded_on.lock().ok().and_then(|day| *day);
            if recorded != Some(today) {
                self.record_usage(enterprise_id, &current).await;
            }
            return Ok(current);
        }
        let _refreshing = slot.refresh.lock().await;
        // Another reader may have refreshed it while this one waited.
        if let Some(current) = current_view(&slot, generation).await {
            return Ok(current);
        }
        let started = Instant::now();
        let since = slot.view.read().await.as_ref().map(|view| view.generation);
        // Loaded without holding the view: readers keep being served the previous generation meanwhile.
        let changes = self.store.load_merge_changes(enterprise_id, since).await?;
        let loaded = started.elapsed();
        let reloaded_instances = changes.changed_users.len();
        let view = apply_to_view(&slot, move |view| apply_changes(view, changes)).await?;
        let refresh = Refresh {
            started,
            loaded,
            reloaded_instances,
            from_commit: false,
        };
        self.finish_refresh(enterprise_id, view, refresh).await
    }

    /// Metrics, a log line and today's usage after a view changed; hands the view on as a reader's.
    async fn finish_refresh(
        &self,
        enterprise_id: i64,
        view: tokio::sync::OwnedRwLockReadGuard<Option<MergedView>>,
        refresh: Refresh,
    ) -> ServiceResult<ViewGuard> {
        self.metrics.merge_finished(refresh.started.elapsed());
        let view = tokio::sync::OwnedRwLockReadGuard::try_map(view, Option::as_ref)
            .map_err(|_| ServiceError::internal("merging accounts", "no view after a refresh"))?;
        let stats = view.people.stats();
        tracing::info!(
            enterprise_id,
            generation = view.generation,
            from_commit = refresh.from_commit,
            reloaded_instances = refresh.reloaded_instances,
            accounts = stats.server_accounts,
            people = stats.people,
            consumed = view.people.total_seats_consumed(),
            load_ms = refresh.loaded.as_millis() as u64,
            total_ms = refresh.started.elapsed().as_millis() as u64,
            "merged view refreshed"
        );
        self.record_usage(enterprise_id, &view).await;
        Ok(view)
    }

    /// Records today's usage from the current view: after each change, and on the first read of a day otherwise. A
    /// failure is logged: the history is a report, and a REST answer must not fail because of it.
    async fn record_usage(&self, enterprise_id: i64, view: &MergedView) {
        let now = OffsetDateTime::now_utc();
        let instances = view
            .people
            .instances()
            .map(|(_, instance, consuming)| InstanceUsage {
                hostname: instance.hostname.clone(),
                accounts: instance.users.len() as i64,
                consuming: consuming as i64,
            })
            .collect();
        let consumed = view.people.total_seats_consumed() as i64;
        let usage = UsageDay {
            date: utc_date(now),
            consumed,
            max_consumed: consumed,
            purchased: view.seats_purchased,
            instances,
        };
        match self
            .store
            .record_usage(enterprise_id, &usage, now)
            .await
            .map_err(ServiceError::from)
        {
            Ok(()) => {
                if let Ok(slot) = self.view_slot(enterprise_id)
                    && let Ok(mut recorded) = slot.usage_recorded_on.lock()
                {
                    *recorded = Some(now.date());
                }
            }
            Err(error) => {
                tracing::warn!(enterprise_id, error = %error.message, "could not record usage history")
            }
        }
    }

    /// Resolves a REST token for an enterprise path segment (slug or numeric id). A token of another enterprise
    /// gets the same answer as an unknown enterprise, so that enterprises cannot be discovered.
    pub async fn authorize_enterprise(
        &self,
        token: &str,
        enterprise: &str,
    ) -> ServiceResult<Enterprise> {
        let owned = self.enterprise_for_api_token(token).await?;
        if owned.slug == enterprise || owned.id.to_string() == enterprise {
            Ok(owned)
        } else {
            Err(ServiceError::not_found("Not Found"))
        }
    }

    /// The enterprise of a REST API token. A valid token is remembered for `api_token_cache_secs`; an invalid one
    /// is asked again every time, so a new token works at once.
    async fn enterprise_for_api_token(&self, token: &str) -> ServiceResult<Enterprise> {
        let token_sha256 = tokens::sha256_hex(token);
        let ttl = std::time::Duration::from_secs(self.config.api_token_cache_secs);
        if let Ok(cache) = self.api_tokens.lock()
            && let Some((enterprise, checked_at)) = cache.get(&token_sha256)
            && checked_at.elapsed() < ttl
        {
            return Ok(enterprise.clone());
        }
        let enterprise = self
            .store
            .enterprise_for_api_token(&token_sha256)
            .await?
            .ok_or_else(|| ServiceError::unauthenticated("Bad credentials"))?;
        if !ttl.is_zero()
            && let Ok(mut cache) = self.api_tokens.lock()
        {
            // Tokens are few; a full cache (many tokens in one TTL) starts again rather than track use.
            if cache.len() >= 10_000 {
                cache.clear();
            }
            cache.insert(token_sha256, (enterprise.clone(), Instant::now()));
        }
        Ok(enterprise)
    }
}

/// Changes the slot's view on a blocking thread (readers wait only for this) and hands it back for reading. Should
/// the change panic, the view is dropped, to be rebuilt from the store by the next reader, rather than left
/// half-applied.
async fn apply_to_view(
    slot: &ViewSlot,
    change: impl FnOnce(&mut Option<MergedView>) + Send + 'static,
) -> ServiceResult<tokio::sync::OwnedRwLockReadGuard<Option<MergedView>>> {
    let mut view = Arc::clone(&slot.view).write_owned().await;
    match tokio::task::spawn_blocking(move || {
        change(&mut view);
        view
    })
    .await
    {
        Ok(view) => Ok(view.downgrade()),
        Err(error) => {
            *slot.view.write().await = None;
            Err(ServiceError::internal("merging accounts", error))
        }
    }
}

/// The slot's view when it is at least at `generation`.
async fn current_view(slot: &ViewSlot, generation: i64) -> Option<ViewGuard> {
    let view = Arc::clone(&slot.view).read_owned().await;
    tokio::sync::OwnedRwLockReadGuard::try_map(view, |view| {
        view.as_ref().filter(|view| view.generation >= generation)
    })
    .ok()
}

/// Brings a view (or none yet) to the generation of `changes`.
fn apply_changes(view: &mut Option<MergedView>, changes: MergeChanges) {
    let MergeChanges {
        generation,
        seats_purchased,
        instances,
        changed_users,
        cloud_members,
    } = changes;
    let mut changed_users: HashMap<i64, Accounts> = changed_users.into_iter().collect();
    let view = match view {
        Some(view) => {
            if let Some(cloud_members) = cloud_members {
                view.people.replace_cloud_members(cloud_members);
            }
            view
        }
        None => view.insert(MergedView {
            generation,
            seats_purchased,
            people: PeopleIndex::new(cloud_members.unwrap_or_default()),
        }),
    };
    let active: std::collections::HashSet<i64> =
        instances.iter().map(|instance| instance.id).collect();
    let mut batch: Vec<InstanceChange> = view
        .people
        .instances()
        .filter(|(key, _, _)| !active.contains(key))
        .map(|(key, _, _)| InstanceChange::Remove { key })
        .collect();
    for instance in instances {
        let users = match changed_users.remove(&instance.id) {
            Some(users) => users,
            // Unchanged since the view's generation, and already in it.
            None if view.people.has_instance(instance.id) => continue,
            // New since the view's generation but never synced: no users yet.
            None => Accounts::new(),
        };
        batch.push(InstanceChange::Upsert {
            key: instance.id,
            hostname: instance.hostname,
            users,
        });
    }
    view.people.apply(batch);
    view.generation = generation;
    view.seats_purchased = seats_purchased;
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
        let slot = app.view_slot(enterprise_id).expect("slot");
        let view = slot.view.read().await;
        view.as_ref().map(|view| view.generation)
    }

    /// What a reader is told: generation, consumed seats and the consuming people in order.
    async fn answer(app: &App, enterprise_id: i64) -> (i64, u64, Vec<String>) {
        let view = app.merged_view(enterprise_id).await.expect("view");
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
