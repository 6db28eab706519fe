//! The merged view of each enterprise: its accounts merged into people, cached per store generation and kept up
//! to date in place (a commit of this process applied directly, other changes read back by a catch-up), plus the
//! caches that live and die with a view generation (`consumed-licenses` pages, likely duplicates) and the daily
//! usage row recorded when a view changes. See "Data flow of a sync", step 6, and "Bounded staleness" in
//! ARCHITECTURE.md.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use license_sync_core::accounts::Accounts;
use license_sync_core::incremental::{InstanceChange, PeopleIndex};
use license_sync_core::merge::LikelyDuplicate;
use license_sync_core::model::ServerUser;
use time::OffsetDateTime;
use tracing::Instrument as _;

use crate::config::AggregatorConfig;
use crate::error::{ServiceError, ServiceResult};
use crate::metrics::Metrics;
use crate::people_search::PeopleSearch;
use crate::store::{DynStore, InstanceUsage, MergeChanges, UsageDay};
use crate::time_format::utc_date;

/// An enterprise's accounts merged into people, as of one store generation. Kept up to date in place: a newer
/// generation reloads only the instances whose users changed and applies them to the [`PeopleIndex`].
pub struct MergedView {
    pub generation: i64,
    pub seats_purchased: i64,
    /// Instances are keyed by their store id.
    pub people: PeopleIndex,
}

impl MergedView {
    /// An enterprise's view read whole from the store, as a server builds it on its first read, but without the
    /// server's cache and its usage-history row: for the command line.
    pub async fn load(store: &DynStore, enterprise_id: i64) -> ServiceResult<MergedView> {
        let changes = store.load_merge_changes(enterprise_id, None).await?;
        let mut view = None;
        apply_changes(&mut view, changes);
        view.ok_or_else(|| ServiceError::internal("merging accounts", "no view after a load"))
    }
}

/// The users of a snapshot this process just committed, to apply to the view without reading them back.
pub struct Committed {
    pub generation: i64,
    pub instance_id: i64,
    pub hostname: String,
    /// The snapshot's rows, converted to the view's compact form only when they are applied (off the ack path).
    pub users: Vec<ServerUser>,
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
    /// The console's people search of one view generation, built when someone first searches it.
    people_search: Mutex<Option<Arc<PeopleSearch>>>,
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

/// The merged views of every enterprise this process has read.
pub struct Views {
    store: DynStore,
    config: Arc<AggregatorConfig>,
    metrics: Arc<Metrics>,
    /// One slot per enterprise; its async lock makes concurrent readers of a stale view wait for one rebuild.
    slots: Mutex<HashMap<i64, Arc<ViewSlot>>>,
}

impl Views {
    pub fn new(store: DynStore, config: Arc<AggregatorConfig>, metrics: Arc<Metrics>) -> Self {
        Views {
            store,
            config,
            metrics,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Brings the merged view to the generation of a commit this process just made, in the background, so the next
    /// reader finds it ready: its users are applied directly when the view is at the generation just before it.
    pub fn apply_commit_in_background(self: &Arc<Self>, enterprise_id: i64, committed: Committed) {
        let views = Arc::clone(self);
        let span = tracing::info_span!("aggregator.merge", enterprise_id);
        tokio::spawn(
            async move {
                if let Err(error) = views.apply_commit(enterprise_id, committed).await {
                    tracing::warn!(error = %error.message, "could not rebuild the merged view");
                    return;
                }
                views.rebuild_derived(enterprise_id).await;
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
        let mut slots = self
            .slots
            .lock()
            .map_err(|_| ServiceError::internal("reading the view cache", "poisoned lock"))?;
        Ok(Arc::clone(slots.entry(enterprise_id).or_default()))
    }

    /// The view's generation as it is, without bringing it up to date.
    #[cfg(test)]
    pub(crate) async fn generation_as_is(&self, enterprise_id: i64) -> Option<i64> {
        let slot = self.view_slot(enterprise_id).ok()?;
        let view = slot.view.read().await;
        view.as_ref().map(|view| view.generation)
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

    /// After a commit of this process: rebuilds the likely duplicates and the people search for the view's new
    /// generation, each only if it was served for an earlier one (someone reads them), so that their next reader
    /// does not pay for a pass over every consuming person (at 1M accounts 0.7–1.1 s and 0.35 s, measured by
    /// `loadgen --console-pages`). A view caught up from another replica's commit still pays on its first read.
    async fn rebuild_derived(&self, enterprise_id: i64) {
        let Ok(slot) = self.view_slot(enterprise_id) else {
            return;
        };
        let wants_duplicates = slot.duplicates.lock().is_ok_and(|cached| cached.is_some());
        let wants_search = slot
            .people_search
            .lock()
            .is_ok_and(|cached| cached.is_some());
        if !wants_duplicates && !wants_search {
            return;
        }
        let Ok(view) = self.view_as_is(enterprise_id).await else {
            return;
        };
        // Off the async threads, like a reader's build; the read guard is held as a reader's would be.
        let built = tokio::task::spawn_blocking(move || {
            let duplicates = wants_duplicates.then(|| Arc::new(view.people.likely_duplicates()));
            let search = wants_search.then(|| Arc::new(PeopleSearch::build(&view)));
            (view.generation, duplicates, search)
        })
        .await;
        let Ok((generation, duplicates, search)) = built else {
            return;
        };
        if let Some(duplicates) = duplicates
            && let Ok(mut cached) = slot.duplicates.lock()
            && cached
                .as_ref()
                .is_none_or(|(known, _)| *known <= generation)
        {
            *cached = Some((generation, duplicates));
        }
        if let Some(search) = search {
            self.cache_people_search(enterprise_id, search);
        }
    }

    /// The likely duplicates cached for `generation`, if any.
    pub fn cached_likely_duplicates(
        &self,
        enterprise_id: i64,
        generation: i64,
    ) -> Option<Arc<Vec<LikelyDuplicate>>> {
        let slot = self.view_slot(enterprise_id).ok()?;
        let cached = slot.duplicates.lock().ok()?;
        cached
            .as_ref()
            .filter(|(known, _)| *known == generation)
            .map(|(_, duplicates)| Arc::clone(duplicates))
    }

    /// The enterprise's view as it is now, without asking the store whether it is current (brought up to date when
    /// there is none): for the later parts of a long read that began with [`Self::merged_view`].
    pub async fn view_as_is(&self, enterprise_id: i64) -> ServiceResult<ViewGuard> {
        let slot = self.view_slot(enterprise_id)?;
        if let Some(view) = current_view(&slot, i64::MIN).await {
            return Ok(view);
        }
        self.merged_view(enterprise_id).await
    }

    /// The view's people search (`crate::people_search`) if one was built for this generation.
    pub fn cached_people_search(
        &self,
        enterprise_id: i64,
        generation: i64,
    ) -> Option<Arc<PeopleSearch>> {
        let slot = self.view_slot(enterprise_id).ok()?;
        let cached = slot.people_search.lock().ok()?;
        cached
            .as_ref()
            .filter(|search| search.generation == generation)
            .map(Arc::clone)
    }

    /// Keeps a people search for the readers of its generation (replacing an older one).
    pub fn cache_people_search(&self, enterprise_id: i64, search: Arc<PeopleSearch>) {
        if let Ok(slot) = self.view_slot(enterprise_id)
            && let Ok(mut cached) = slot.people_search.lock()
            && cached
                .as_ref()
                .is_none_or(|known| known.generation <= search.generation)
        {
            *cached = Some(search);
        }
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
        match self.store.record_usage(enterprise_id, &usage, now).await {
            Ok(()) => {
                if let Ok(slot) = self.view_slot(enterprise_id)
                    && let Ok(mut recorded) = slot.usage_recorded_on.lock()
                {
                    *recorded = Some(now.date());
                }
            }
            Err(error) => {
                tracing::warn!(enterprise_id, error = %ServiceError::from(error).message, "could not record usage history")
            }
        }
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
