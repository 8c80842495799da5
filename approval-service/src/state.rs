//! Shared service state: configuration, the store, and the per-review
//! wake-up channels of long-polling waiters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{Config, ReviewerConfig};
use crate::error::ApiError;
use crate::store::{Store, StoreError};
use crate::token::TokenHash;

/// Everything the handlers share; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    store: Arc<Store>,
    /// One channel per review that currently has waiters. A decision wakes
    /// only that review's waiters; the entry is removed with its last waiter
    /// so the map does not grow with the number of reviews ever created.
    waiters: Mutex<HashMap<String, watch::Sender<()>>>,
    /// Flips to `true` when the server starts shutting down, so long polls
    /// answer at once instead of holding graceful shutdown for a minute.
    shutdown: watch::Sender<bool>,
}

impl AppState {
    /// Opens the database named in `config` (creating it when missing).
    /// Blocks briefly; call it at start-up.
    pub fn open(config: Config) -> Result<AppState, StoreError> {
        let store = Store::open(&config.database, config.sqlite_synchronous)?;
        Ok(AppState {
            inner: Arc::new(Inner {
                config,
                store: Arc::new(store),
                waiters: Mutex::new(HashMap::new()),
                shutdown: watch::Sender::new(false),
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Makes every current and future long poll return immediately.
    pub fn begin_shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// Runs a blocking store operation off the async runtime.
    pub(crate) async fn db<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> rusqlite::Result<T> + Send + 'static,
    {
        let store = Arc::clone(&self.inner.store);
        Ok(tokio::task::spawn_blocking(move || f(&store)).await??)
    }

    /// Finds the reviewer whose token hashes to `presented`. Every configured
    /// hash is compared (constant time each, no early exit), so timing does
    /// not reveal which reviewer, if any, matched.
    pub(crate) fn reviewer_for(&self, presented: &TokenHash) -> Option<&ReviewerConfig> {
        let mut found = None;
        for r in &self.inner.config.reviewers {
            if r.token_sha256.ct_eq(presented) && found.is_none() {
                found = Some(r);
            }
        }
        found
    }

    fn waiters(&self) -> MutexGuard<'_, HashMap<String, watch::Sender<()>>> {
        // The map holds no invariant a panic could break halfway.
        self.inner
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers interest in `id`. Subscribe *before* reading the review, so
    /// a decision committed between the read and the wait is not missed.
    pub(crate) fn subscribe(&self, id: &str) -> WaitGuard {
        let rx = self
            .waiters()
            .entry(id.to_string())
            .or_insert_with(|| watch::Sender::new(()))
            .subscribe();
        WaitGuard {
            state: self.clone(),
            id: id.to_string(),
            rx: Some(rx),
        }
    }

    /// Wakes the waiters of `id`, if any.
    pub(crate) fn wake(&self, id: &str) {
        if let Some(tx) = self.waiters().get(id) {
            tx.send_replace(());
        }
    }

    /// Number of reviews with waiters (for tests and diagnostics).
    pub fn waiting_reviews(&self) -> usize {
        self.waiters().len()
    }

    pub(crate) fn shutdown_receiver(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.subscribe()
    }

    /// Marks every overdue pending review expired and wakes its waiters.
    /// Returns how many were expired.
    pub async fn sweep_once(&self) -> Result<usize, ApiError> {
        let now = crate::now_ms();
        let ids = self.db(move |s| s.expire_overdue(now)).await?;
        for id in &ids {
            tracing::info!(review_id = %id, status = "expired", "review expired (hold timeout)");
            self.wake(id);
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
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let state = AppState { inner };
                if let Err(e) = state.sweep_once().await {
                    tracing::error!(error = %e, "expiry sweep failed");
                }
            }
        })
    }
}

/// A long-poll waiter's registration; unregisters on drop.
pub(crate) struct WaitGuard {
    state: AppState,
    id: String,
    rx: Option<watch::Receiver<()>>,
}

impl WaitGuard {
    /// Resolves on the next wake-up of this review.
    pub(crate) async fn changed(&mut self) {
        match self.rx.as_mut() {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    // Cannot happen while we hold a receiver (the sender stays
                    // in the map); never spin if it somehow does.
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending::<()>().await,
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
