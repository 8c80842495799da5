//! Shared service state: configuration, the store, the per-review wake-up
//! channels of long-polling waiters, the live event feed of the reviewer UI,
//! the sign-in rate limiter, and (on PostgreSQL) the exchange of review
//! changes with other replicas (see [`crate::replicas`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::time::Duration;

use countersign_core::wire::{ReviewState, ReviewStatus};
use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::approvals::Approver;
use crate::config::{Config, ReviewerConfig};
use crate::db::checkpoint::Checkpointer;
use crate::db::{Backend, DbError, DbResult, Location, OpenError};
use crate::metrics::Metrics;
use crate::records::{RecordError, RecordStore};
use crate::replicas::{Change, Replica};
use crate::session::{LoginLimiter, Session, SignedInWith};
use crate::store::Store;
use crate::token::TokenHash;
use crate::watchers::{Begun, Taken, Watchers};

/// How often the background sweeper expires overdue reviews.
pub const SWEEP_PERIOD: Duration = Duration::from_secs(1);

/// How often record retention runs (it also runs at start).
pub const RETENTION_PERIOD: Duration = Duration::from_secs(3600);

const MS_PER_DAY: u64 = 86_400_000;

/// How many events a slow live-feed subscriber may fall behind before it
/// is told to re-fetch (`resync`).
const EVENT_BUFFER: usize = 256;

/// How often the sweeper deletes expired browser sessions.
const SESSION_PURGE_PERIOD: Duration = Duration::from_secs(600);

/// Failed sign-ins allowed in a burst, and refilled per second.
const LOGIN_BURST: u32 = 10;
const LOGIN_REFILL_PER_S: f64 = 0.5;
/// Company sign-ins one client may start in a burst, and refilled per
/// second: each start stores a pending sign-in (kept 10 minutes) before
/// anyone is known, so starts are counted like failures, more generously.
const OIDC_START_BURST: u32 = 30;
const OIDC_START_REFILL_PER_S: f64 = 1.0;

/// A change to a review, pushed to the reviewer UI's live feed
/// (`GET /api/events`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReviewEvent {
    /// `created`, `approval` (a partial approval: more are needed),
    /// `decided`, `expired`, `cancelled` or `abandoned`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Review id.
    pub id: String,
    /// Status after the change.
    pub status: ReviewStatus,
    /// The change was made by this replica (not applied from another's
    /// notification): what acts once per change (webhooks, the Slack
    /// message) acts on these only.
    #[serde(skip)]
    pub local: bool,
}

impl ReviewEvent {
    /// The event for `id` having reached `status`.
    pub fn new(id: &str, status: ReviewStatus) -> ReviewEvent {
        let kind = match status {
            ReviewStatus::Pending => "created",
            ReviewStatus::Approved | ReviewStatus::Rejected => "decided",
            ReviewStatus::Expired => "expired",
            ReviewStatus::Cancelled => "cancelled",
            ReviewStatus::Abandoned => "abandoned",
        };
        ReviewEvent {
            kind,
            id: id.to_string(),
            status,
            local: true,
        }
    }
}

/// A database call made from async code that failed: the database refused,
/// or the blocking task that ran the call failed. Its text may name tables
/// and values: log it, never show it to a client.
#[derive(Debug)]
pub enum StorageError {
    /// The database refused.
    Db(DbError),
    /// The blocking task panicked or was cancelled.
    Task(tokio::task::JoinError),
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageError::Db(e) => write!(f, "database: {e}"),
            StorageError::Task(e) => write!(f, "blocking task failed: {e}"),
        }
    }
}

impl std::error::Error for StorageError {}

impl From<DbError> for StorageError {
    fn from(e: DbError) -> Self {
        StorageError::Db(e)
    }
}

impl From<tokio::task::JoinError> for StorageError {
    fn from(e: tokio::task::JoinError) -> Self {
        StorageError::Task(e)
    }
}

/// Runs `f` on `store` on a blocking thread: both database clients block.
async fn blocking<S, T, E>(
    store: &Arc<S>,
    f: impl FnOnce(&S) -> Result<T, E> + Send + 'static,
) -> Result<T, E>
where
    S: Send + Sync + 'static,
    T: Send + 'static,
    E: From<tokio::task::JoinError> + Send + 'static,
{
    let store = Arc::clone(store);
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(result) => result,
        Err(e) => Err(E::from(e)),
    }
}

/// What [`AppState::reload_reviewers`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// How many reviewers are now in force.
    pub reviewers: usize,
    /// Whether settings other than `[[reviewers]]` differ from those in
    /// force (they were not applied).
    pub others_changed: bool,
}

/// Everything the handlers share; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    /// The `[[reviewers]]` in force (reloadable; `config.reviewers` is
    /// what the service started with).
    reviewers: RwLock<Arc<Vec<ReviewerConfig>>>,
    store: Arc<Store>,
    /// The session record log (its own connection; see `crate::records`).
    records: Arc<RecordStore>,
    /// One channel per review that currently has waiters. A decision wakes
    /// only that review's waiters; the entry is removed with its last waiter
    /// so the map does not grow with the number of reviews ever created.
    /// A wake carries the review's final state when the waker has it (a
    /// decision made here), so the woken polls answer without a read;
    /// otherwise `None`, and each re-reads its review.
    waiters: Mutex<HashMap<String, watch::Sender<Wake>>>,
    /// The filter workers' mailboxes (`POST /v1/watch`), and which worker
    /// watches each known pending review: every wake of a review also
    /// lands in its watcher's mailbox.
    watchers: Mutex<Watchers>,
    /// Flips to `true` when the server starts shutting down, so long polls
    /// answer at once instead of holding graceful shutdown for a minute.
    shutdown: watch::Sender<bool>,
    /// Live feed of review changes for the reviewer UI.
    events: broadcast::Sender<ReviewEvent>,
    /// Failed sign-ins.
    login_limiter: LoginLimiter,
    oidc_start_limiter: LoginLimiter,
    /// This process's id among replicas (random per start).
    replica_id: String,
    /// The Prometheus instruments of this process.
    metrics: Metrics,
    /// Other replicas share the database (PostgreSQL): changes are sent
    /// to them with `NOTIFY`.
    shared: bool,
    /// Checkpoints the SQLite file's WAL for the store and the record log
    /// (none on PostgreSQL). Declared last: dropped after them.
    _checkpointer: Option<Checkpointer>,
}

impl AppState {
    /// Opens the database named in `config` (creating a SQLite file when
    /// missing; creating the schema in either database). On PostgreSQL it
    /// also starts listening for other replicas' changes. Blocks briefly;
    /// call it at start-up.
    pub fn open(config: Config) -> Result<AppState, OpenError> {
        // The PostgreSQL client blocks on a runtime of its own, which tokio
        // forbids on a runtime thread: open it on a plain thread, so this
        // works from async code too (later calls go through `db`).
        let location = config.database.clone();
        let sync = config.sqlite_synchronous;
        let grace_ms = config.hold_grace_ms;
        let (store, records, checkpointer) = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let store = Store::open(&location, sync)?;
                    store.set_hold_grace_ms(grace_ms);
                    let records = RecordStore::open(&location, sync)?;
                    // The two writers' checkpoints run on a thread of their
                    // own, not inside a group's commit.
                    let checkpointer = match &location {
                        Location::Sqlite(path) => {
                            let checkpointer = Checkpointer::start(path, sync.pragma_value())
                                .map_err(OpenError::Io)?;
                            store.checkpoint_with(&checkpointer)?;
                            records.checkpoint_with(&checkpointer)?;
                            Some(checkpointer)
                        }
                        Location::Postgres(_) => None,
                    };
                    Ok::<_, OpenError>((store, records, checkpointer))
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(OpenError::Io(std::io::Error::other(
                        "opening the database panicked",
                    )))
                })
        })?;
        let shared = store.backend() == Backend::Postgres;
        // Reviewers' names stay off metrics anyone may read.
        let public_metrics = config.metrics_public && config.metrics_listen.is_none();
        let metrics =
            Metrics::new(!public_metrics).map_err(|e| OpenError::Io(std::io::Error::other(e)))?;
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| OpenError::Io(std::io::Error::other(e)))?;
        let state = AppState {
            inner: Arc::new(Inner {
                reviewers: RwLock::new(Arc::new(config.reviewers.clone())),
                config,
                store: Arc::new(store),
                records: Arc::new(records),
                waiters: Mutex::new(HashMap::new()),
                watchers: Mutex::new(Watchers::default()),
                shutdown: watch::Sender::new(false),
                events: broadcast::Sender::new(EVENT_BUFFER),
                login_limiter: LoginLimiter::new(LOGIN_BURST, LOGIN_REFILL_PER_S),
                oidc_start_limiter: LoginLimiter::new(OIDC_START_BURST, OIDC_START_REFILL_PER_S),
                replica_id: id.iter().map(|b| format!("{b:02x}")).collect(),
                shared,
                metrics,
                _checkpointer: checkpointer,
            }),
        };
        if let Location::Postgres(url) = location {
            let listener = Listener {
                inner: Arc::downgrade(&state.inner),
                origin: state.inner.replica_id.clone(),
            };
            crate::replicas::spawn_listener(url, listener).map_err(OpenError::Io)?;
        }
        Ok(state)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The Prometheus instruments of this process.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The session record log.
    pub fn records(&self) -> &Arc<RecordStore> {
        &self.inner.records
    }

    /// Makes every current and future long poll return immediately.
    pub fn begin_shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// Runs a blocking review-store call off the async runtime.
    pub async fn db<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> DbResult<T> + Send + 'static,
    {
        blocking(&self.inner.store, move |s| f(s).map_err(StorageError::Db)).await
    }

    /// Runs a blocking record-log read off the async runtime.
    pub async fn records_db<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&RecordStore) -> DbResult<T> + Send + 'static,
    {
        blocking(&self.inner.records, move |s| f(s).map_err(StorageError::Db)).await
    }

    /// Awaits a record write (see [`RecordStore::submit_request`]), timed
    /// as an append of `kind` (`request`, `response`) until it is durable.
    pub async fn write_record<T>(
        &self,
        kind: &str,
        write: impl std::future::Future<Output = Result<T, RecordError>>,
    ) -> Result<T, RecordError> {
        let started = std::time::Instant::now();
        let written = write.await;
        self.metrics().observe_record_append(
            kind,
            written.is_ok(),
            started.elapsed().as_secs_f64(),
        );
        written
    }

    /// Finds the reviewer whose token hashes to `presented`. Every configured
    /// hash is compared (constant time each, no early exit), so timing does
    /// not reveal which reviewer, if any, matched.
    pub fn reviewer_for(&self, presented: &TokenHash) -> Option<ReviewerConfig> {
        let mut found = None;
        for r in self.reviewers().iter() {
            if r.token_sha256.ct_eq(presented) && found.is_none() {
                found = Some(r.clone());
            }
        }
        found
    }

    /// The reviewer with this name whose configured token hash is `token`.
    pub fn reviewer_named(&self, name: &str, token: &TokenHash) -> Option<ReviewerConfig> {
        self.reviewers()
            .iter()
            .find(|r| r.name == name && r.token_sha256.ct_eq(token))
            .cloned()
    }

    /// A person named by the OpenID provider or the authenticating proxy,
    /// with the groups it gave. A `[[reviewers]]` entry of the same person
    /// (its `name` or one of its `sign_in_names`, compared by
    /// [`crate::approvals::person_key`]: the provider may spell
    /// `Dana@Example.com` what the entry spells `dana@example.com`) makes
    /// them that reviewer: recorded under the entry's `name`, so that a
    /// token and this sign-in are one person in a quorum, with the caller
    /// identities it lists. The groups stay the provider's.
    ///
    /// Anyone else is a reviewer only where a required group admitted them
    /// (`admitted_by_group`: `[oidc]` or `[trusted_proxy]` has a
    /// `required_group`, whose membership the caller checked); otherwise
    /// `None`: every account the provider signs in (a whole company, or
    /// the requester's own) would decide reviews.
    pub fn approver_named(
        &self,
        name: String,
        groups: Vec<String>,
        admitted_by_group: bool,
    ) -> Option<Approver> {
        let reviewers = self.reviewers();
        match crate::approvals::entry_of(&reviewers, &name) {
            Some(r) => Some(Approver {
                groups,
                ..Approver::from(r)
            }),
            None if admitted_by_group => Some(Approver {
                name,
                groups,
                callers: Vec::new(),
                assessor: false,
            }),
            None => None,
        }
    }

    /// The `[[reviewers]]` in force: those of the configuration at start,
    /// or of the last successful [`AppState::reload_reviewers`].
    pub fn reviewers(&self) -> Arc<Vec<ReviewerConfig>> {
        let guard = self
            .inner
            .reviewers
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(&guard)
    }

    /// Puts the `[[reviewers]]` of `new` (a configuration read and
    /// validated again, e.g. on SIGHUP) in force: tokens added or revoked
    /// without a restart; sessions and live feeds of a revoked token end at
    /// their next request. Other settings are not applied: the answer says
    /// whether they differ from those in force (a restart applies them).
    pub fn reload_reviewers(&self, new: Config) -> Reloaded {
        let others_changed = Config {
            reviewers: Vec::new(),
            ..new.clone()
        } != Config {
            reviewers: Vec::new(),
            ..self.config().clone()
        };
        let count = new.reviewers.len();
        *self
            .inner
            .reviewers
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(new.reviewers);
        Reloaded {
            reviewers: count,
            others_changed,
        }
    }

    /// The sign-in rate limiter.
    pub fn login_limiter(&self) -> &LoginLimiter {
        &self.inner.login_limiter
    }

    /// Whether `client` may start another company sign-in now (each start
    /// counts): unauthenticated, each would otherwise add a stored pending
    /// sign-in without limit.
    pub fn may_start_oidc_sign_in(&self, client: std::net::IpAddr) -> bool {
        self.inner
            .oidc_start_limiter
            .attempt(client, || None::<()>)
            .is_some()
    }

    /// The live session with cookie value `id` and who it is: a token
    /// session while its reviewer still has the same token configured; an
    /// OpenID Connect session while sign-in with the provider is configured
    /// and the person has its required group (if any).
    pub async fn session(&self, id: &str) -> Result<Option<(Session, Approver)>, StorageError> {
        self.session_by_hash(TokenHash::of_token(id)).await
    }

    /// [`AppState::session`] by the hash of the cookie value.
    pub async fn session_by_hash(
        &self,
        hash: TokenHash,
    ) -> Result<Option<(Session, Approver)>, StorageError> {
        let now = crate::now_ms();
        let found = self.db(move |s| s.session(&hash, now)).await?;
        Ok(found.and_then(|session| {
            let approver = self.session_approver(&session)?;
            Some((session, approver))
        }))
    }

    /// Whether `session` must be re-checked with the OpenID provider before
    /// it is used: an OIDC session whose groups the provider confirmed more
    /// than `[oidc] recheck_seconds` ago. (Without `[oidc]` an OIDC session
    /// is void anyway.)
    pub fn oidc_recheck_due(&self, session: &Session, now_ms: u64) -> bool {
        match (&session.with, &self.config().oidc) {
            (SignedInWith::Oidc { checked_at_ms, .. }, Some(oidc)) => {
                now_ms.saturating_sub(*checked_at_ms) >= oidc.recheck_seconds * 1000
            }
            _ => false,
        }
    }

    fn session_approver(&self, session: &Session) -> Option<Approver> {
        match &session.with {
            SignedInWith::Token(token) => self
                .reviewer_named(&session.reviewer, token)
                .map(|r| Approver::from(&r)),
            SignedInWith::Oidc { groups, .. } => {
                let oidc = self.config().oidc.as_ref()?;
                if let Some(required) = &oidc.required_group {
                    if !groups.contains(required) {
                        return None;
                    }
                }
                self.approver_named(
                    session.reviewer.clone(),
                    groups.clone(),
                    oidc.required_group.is_some(),
                )
            }
        }
    }

    /// Pushes a review change to live-feed subscribers (if any), here and
    /// on the other replicas.
    pub fn publish(&self, id: &str, status: ReviewStatus) {
        self.send_event(ReviewEvent::new(id, status));
        // No change of a final review is to come: its watcher is not
        // needed here any more (a decision through a path that woke it
        // without its state, a standing approval, would otherwise leave it
        // for as long as the watcher's mailbox lives).
        if status.is_final() {
            self.forget_watched(id);
        }
    }

    /// Tells live-feed subscribers that the assessors' report on `id` is in.
    pub fn publish_assessment(&self, id: &str) {
        self.send_event(ReviewEvent {
            kind: "assessment",
            id: id.to_string(),
            status: ReviewStatus::Pending,
            local: true,
        });
    }

    /// Tells live-feed subscribers that `id` got an approval but still needs more.
    pub fn publish_approval(&self, id: &str) {
        self.send_event(ReviewEvent {
            kind: "approval",
            id: id.to_string(),
            status: ReviewStatus::Pending,
            local: true,
        });
    }

    /// Tells live-feed subscribers, here and on the other replicas, that
    /// review `id` was created, held by filter worker `watcher` (if any):
    /// every replica learns whose watch its changes go to.
    pub fn publish_created(&self, id: &str, watcher: Option<&str>) {
        self.send_event_of(ReviewEvent::new(id, ReviewStatus::Pending), watcher);
    }

    fn send_event(&self, event: ReviewEvent) {
        self.send_event_of(event, None);
    }

    fn send_event_of(&self, event: ReviewEvent, watcher: Option<&str>) {
        if self.inner.shared {
            self.notify_replicas(&event, watcher);
        }
        // An error only means nobody is listening.
        let _ = self.inner.events.send(event);
    }

    /// Sends `event` to the other replicas, off the async runtime. A lost
    /// notification only delays the other replicas' long polls until their
    /// next re-read; the change itself is already committed.
    fn notify_replicas(&self, event: &ReviewEvent, watcher: Option<&str>) {
        let change = Change {
            origin: self.inner.replica_id.clone(),
            kind: event.kind.to_string(),
            id: event.id.clone(),
            status: event.status,
            watcher: watcher.map(str::to_string),
        };
        let Ok(payload) = serde_json::to_string(&change) else {
            return;
        };
        let store = Arc::clone(&self.inner.store);
        let send = move || {
            if let Err(e) = store.notify(crate::replicas::CHANNEL, &payload) {
                tracing::warn!(error = %e, "cannot notify the other replicas");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(send)),
            Err(_) => send(),
        }
    }

    /// Wakes every long poll of this replica (each re-reads its review),
    /// and starts a new epoch in every mailbox (its filter re-checks every
    /// review it waits for).
    fn wake_all(&self) {
        for tx in self.waiters().values() {
            tx.send_replace(None);
        }
        self.watchers().new_epochs();
    }

    fn watchers(&self) -> MutexGuard<'_, Watchers> {
        // Like `waiters`: no invariant a panic could break halfway.
        self.inner
            .watchers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers that pending review `id` is watched by `watcher`: its
    /// changes go to that watcher's mailbox (when it has one here).
    pub fn remember_watcher(&self, id: &str, watcher: &str) {
        self.watchers().remember(id, watcher);
    }

    /// [`AppState::remember_watcher`] for each of `ids`, under one lock.
    pub fn remember_watched(&self, ids: &[String], watcher: &str) {
        let mut watchers = self.watchers();
        for id in ids {
            watchers.remember(id, watcher);
        }
    }

    /// Forgets the watcher of review `id` (seen final, or unknown).
    pub fn forget_watched(&self, id: &str) {
        self.watchers().forget(id);
    }

    /// A watch of `watcher` begins (see [`crate::watchers`]);
    /// `alive_until_ms` is when its holds stop counting as alive.
    pub fn watch_begin(&self, watcher: &str, alive_until_ms: u64) -> Begun {
        let grace_ms = self.config().hold_grace_ms;
        self.watchers()
            .begin(watcher, alive_until_ms, grace_ms, self.inner.shared)
    }

    /// Storing the liveness [`AppState::watch_begin`] asked for failed.
    pub fn watch_write_failed(&self, watcher: &str) {
        self.watchers().write_failed(watcher);
    }

    /// The entries of `watcher`'s mailbox after `after`, if its epoch is
    /// still `epoch`.
    pub fn watch_take(&self, watcher: &str, epoch: &str, after: u64) -> Taken {
        self.watchers().take(watcher, epoch, after)
    }

    /// A watch of `watcher` ended; for one cut off, the liveness write to
    /// make (`(stored, alive until)`, see [`Store::watcher_cut_off`]).
    pub fn watch_end(
        &self,
        watcher: &str,
        answered: bool,
        alive_until_ms: u64,
    ) -> Option<(u64, u64)> {
        self.watchers().end(watcher, answered, alive_until_ms)
    }

    /// Number of watchers with a mailbox here (for tests and diagnostics).
    pub fn watcher_mailboxes(&self) -> usize {
        self.watchers().mailboxes()
    }

    /// Drops the mailboxes no watch used for longer than a watch lasts
    /// plus the grace plus a minute (the filter is gone, or watches
    /// another replica).
    fn drop_idle_mailboxes(&self) {
        let config = self.config();
        let idle = Duration::from_millis(
            config
                .max_long_poll_ms
                .saturating_add(config.hold_grace_ms)
                .saturating_add(60_000),
        );
        self.watchers().drop_idle(idle);
    }

    /// Subscribes to the live feed.
    pub fn subscribe_events(&self) -> broadcast::Receiver<ReviewEvent> {
        self.inner.events.subscribe()
    }

    fn waiters(&self) -> MutexGuard<'_, HashMap<String, watch::Sender<Wake>>> {
        // The map holds no invariant a panic could break halfway.
        self.inner
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers interest in `id`. Subscribe *before* reading the review, so
    /// a decision committed between the read and the wait is not missed.
    pub fn subscribe(&self, id: &str) -> WaitGuard {
        let rx = self
            .waiters()
            .entry(id.to_string())
            .or_insert_with(|| watch::Sender::new(None))
            .subscribe();
        WaitGuard {
            state: self.clone(),
            id: id.to_string(),
            rx: Some(rx),
        }
    }

    /// Wakes the waiters of `id`, if any; each re-reads the review. Its
    /// watcher's watch, if any, is told too (and reads it).
    pub fn wake(&self, id: &str) {
        if let Some(tx) = self.waiters().get(id) {
            tx.send_replace(None);
        }
        self.watchers().push(id, None);
    }

    /// Wakes the waiters of `id` with its final state, committed by the
    /// caller: they answer with it instead of each reading it again (after
    /// a bulk approval, those reads queued behind the decisions on the
    /// database connection).
    pub fn wake_final(&self, state: ReviewState) {
        let state = Arc::new(state);
        if let Some(tx) = self.waiters().get(&state.id) {
            tx.send_replace(Some(Arc::clone(&state)));
        }
        let mut watchers = self.watchers();
        watchers.push(&state.id, Some(Arc::clone(&state)));
        watchers.forget(&state.id);
    }

    /// Wakes the waiters of `id` and tells live pages its status changed.
    pub fn announce(&self, id: &str, status: ReviewStatus) {
        self.wake(id);
        if status.is_final() {
            self.forget_watched(id);
        }
        self.publish(id, status);
    }

    /// [`AppState::announce`]s (and logs) a review a read found overdue.
    pub fn announce_expiry(&self, id: &str) {
        tracing::info!(review_id = %id, status = "expired", "review expired (hold timeout)");
        self.announce(id, ReviewStatus::Expired);
    }

    /// Number of reviews with waiters (for tests and diagnostics).
    pub fn waiting_reviews(&self) -> usize {
        self.waiters().len()
    }

    /// Turns `true` when the service begins shutting down.
    pub fn shutdown_receiver(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.subscribe()
    }

    /// Marks every overdue pending review expired and wakes its waiters.
    /// Returns how many were expired.
    pub async fn sweep_once(&self) -> Result<usize, StorageError> {
        let now = crate::now_ms();
        let ids = self.db(move |s| s.expire_overdue(now)).await?;
        for id in &ids {
            self.announce_expiry(id);
        }
        Ok(ids.len())
    }

    /// Starts the background task that expires overdue reviews every
    /// `period`. The task ends on its own once every `AppState` clone is
    /// dropped (it holds only a weak reference), or when aborted.
    pub fn spawn_sweeper(&self, period: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_purge: Option<tokio::time::Instant> = None;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let state = AppState { inner };
                if let Err(e) = state.sweep_once().await {
                    tracing::error!(error = %e, "expiry sweep failed");
                }
                state.drop_idle_mailboxes();
                if last_purge.is_none_or(|t| t.elapsed() >= SESSION_PURGE_PERIOD) {
                    last_purge = Some(tokio::time::Instant::now());
                    let now = crate::now_ms();
                    if let Err(e) = state.db(move |s| s.purge_sessions(now)).await {
                        tracing::error!(error = %e, "session purge failed");
                    }
                    // Watchers a day past their time: their reviews have
                    // expired (a hold lasts at most a day); a pending one's
                    // own time is judged then, which has passed as well.
                    let cutoff = now.saturating_sub(MS_PER_DAY);
                    if let Err(e) = state.db(move |s| s.purge_watchers(cutoff)).await {
                        tracing::error!(error = %e, "watcher purge failed");
                    }
                }
            }
        })
    }

    /// Starts following this replica's review changes for the decision
    /// metrics ([`Metrics::observe_decision`]): each review that leaves
    /// `pending` here is read once, off the path of the decision. Abort it
    /// on shutdown. Subscribes before returning, so no later decision is
    /// missed (unless the feed falls behind, which is counted).
    pub fn spawn_decision_metrics(&self) -> tokio::task::JoinHandle<()> {
        let mut events = self.subscribe_events();
        let state = self.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) if event.local && event.status != ReviewStatus::Pending => {
                        let state = state.clone();
                        tokio::spawn(async move { state.observe_decision(&event.id).await });
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "decision metrics fell behind the review events");
                        state.metrics().missed_decisions(missed);
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        })
    }

    async fn observe_decision(&self, id: &str) {
        let lookup = id.to_string();
        match self.db(move |s| s.summary(&lookup)).await {
            Ok(Some(review)) => self.metrics().observe_decision(&review),
            Ok(None) => self.metrics().missed_decisions(1),
            Err(e) => {
                tracing::warn!(review_id = %id, error = %e,
                    "decision not counted in the metrics: the review could not be read");
                self.metrics().missed_decisions(1);
            }
        }
    }

    /// Applies `record_retention_days` once to records and to reviews (whose
    /// prompt and bodies it drops, noting that in the chain); returns how
    /// many record entries were deleted (0 when retention is off).
    pub async fn retention_once(&self) -> Result<usize, StorageError> {
        let days = self.config().record_retention_days;
        if days == 0 {
            return Ok(0);
        }
        let now = crate::now_ms();
        let cutoff = now.saturating_sub(days.saturating_mul(MS_PER_DAY));
        let deleted = self
            .records_db(move |s| s.apply_retention(cutoff, now))
            .await?;
        if deleted > 0 {
            tracing::info!(deleted, cutoff_ms = cutoff, "record retention applied");
        }
        let purged = self.db(move |s| s.purge_review_bodies(cutoff, now)).await?;
        if purged > 0 {
            self.records_db(move |s| s.note_review_retention(purged, cutoff, now))
                .await?;
            tracing::info!(purged, cutoff_ms = cutoff, "review retention applied");
        }
        Ok(deleted)
    }

    /// Starts the task applying retention at start and every `period` (does
    /// nothing when `record_retention_days = 0`). Abort it on shutdown.
    pub fn spawn_retention(&self, period: Duration) -> tokio::task::JoinHandle<()> {
        let state = self.clone();
        tokio::spawn(async move {
            if state.config().record_retention_days == 0 {
                return;
            }
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = state.retention_once().await {
                    tracing::error!(error = %e, "record retention failed");
                }
            }
        })
    }
}

/// What a wake-up of a review's long polls carries: its final state when
/// the waker had it, else nothing (read it again).
pub type Wake = Option<Arc<ReviewState>>;

/// A long-poll waiter's registration; unregisters on drop.
pub struct WaitGuard {
    state: AppState,
    id: String,
    rx: Option<watch::Receiver<Wake>>,
}

impl WaitGuard {
    /// Resolves on the next wake-up of this review, with what it carries.
    pub async fn changed(&mut self) -> Wake {
        match self.rx.as_mut() {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    // Cannot happen while we hold a receiver (the sender stays
                    // in the map); never spin if it somehow does.
                    std::future::pending::<()>().await;
                }
                rx.borrow_and_update().clone()
            }
            None => std::future::pending::<Wake>().await,
        }
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        let mut map = self.state.waiters();
        // Drop our receiver under the lock: subscriptions also happen under
        // it, so the count below cannot race with a new waiter.
        drop(self.rx.take());
        if map.get(&self.id).is_some_and(|tx| tx.receiver_count() == 0) {
            map.remove(&self.id);
        }
    }
}

/// The listener thread's view of the service: a weak reference, so the
/// thread ends when the service is dropped.
struct Listener {
    inner: Weak<Inner>,
    origin: String,
}

impl Listener {
    fn state(&self) -> Option<AppState> {
        let inner = self.inner.upgrade()?;
        let down = *inner.shutdown.borrow();
        (!down).then_some(AppState { inner })
    }
}

impl Replica for Listener {
    fn apply(&self, change: Change) -> bool {
        let Some(state) = self.state() else {
            return false;
        };
        let kind = match change.kind.as_str() {
            "created" => "created",
            "approval" => "approval",
            "decided" => "decided",
            "expired" => "expired",
            "cancelled" => "cancelled",
            // Its watcher's watch here is told (the filter's hold ends).
            "abandoned" => "abandoned",
            other => {
                tracing::warn!(kind = other, "ignored a change of unknown kind");
                return true;
            }
        };
        if let Some(watcher) = change
            .watcher
            .as_deref()
            .filter(|w| kind == "created" && countersign_core::wire::valid_watcher_id(w))
        {
            state.remember_watcher(&change.id, watcher);
        }
        state.wake(&change.id);
        if change.status.is_final() {
            state.forget_watched(&change.id);
        }
        let _ = state.inner.events.send(ReviewEvent {
            kind,
            id: change.id,
            status: change.status,
            local: false,
        });
        true
    }

    fn wake_all(&self) -> bool {
        match self.state() {
            Some(state) => {
                state.wake_all();
                true
            }
            None => false,
        }
    }

    fn alive(&self) -> bool {
        self.state().is_some()
    }

    fn origin(&self) -> &str {
        &self.origin
    }
}
