//! `POST /v1/watch`: one long poll per filter worker for all its held
//! requests (the contract: `countersign_core::wire::WatchRequest`). The
//! worker's mailbox on this replica ([`crate::watchers`]) collects its
//! reviews' changes; a watch answers with those that left `pending` and
//! with the reviews it asked to `check`, or waits for the next change.
//! While the worker watches, its holds count as alive (the `watchers`
//! table, [`crate::store::Store::watcher_seen`]).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use axum::extract::State;
use axum::Json;
use countersign_core::hold::valid_review_id;
use countersign_core::wire::{valid_watcher_id, ReviewState, WatchAnswer, WatchRequest};

use super::auth::FilterAuth;
use super::error::ApiError;
use super::extract::JsonBody;
use super::spans;
use crate::state::AppState;
use crate::watchers::Taken;

/// Most ids one watch may `check` (a worker lists every review it holds
/// after a new epoch, this many at a time).
pub const MAX_CHECK_IDS: usize = countersign_core::wire::MAX_WATCH_CHECK;

/// `POST /v1/watch`.
pub async fn watch(
    State(state): State<AppState>,
    _auth: FilterAuth,
    JsonBody(req): JsonBody<WatchRequest>,
) -> Result<Json<WatchAnswer>, ApiError> {
    let WatchRequest {
        watcher,
        epoch: known_epoch,
        after,
        check,
        timeout_ms,
    } = req;
    if !valid_watcher_id(&watcher) {
        return Err(ApiError::BadRequest(
            "watcher: must be 32 lowercase hexadecimal characters".into(),
        ));
    }
    if check.len() > MAX_CHECK_IDS {
        return Err(ApiError::BadRequest(format!(
            "check: at most {MAX_CHECK_IDS} review ids per watch"
        )));
    }
    if check.iter().any(|id| !valid_review_id(id)) {
        return Err(ApiError::BadRequest(
            "check: a review id is not one (letters, digits, `_` and `-`, at most 128)".into(),
        ));
    }
    spans::note("countersign.watcher", watcher.clone());
    let budget_ms = timeout_ms.min(state.config().max_long_poll_ms);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(budget_ms);
    // Marks the watcher alive and subscribes to its mailbox before any
    // read, so no change slips in between.
    let (mut guard, epoch) = Watch::begin(&state, watcher, budget_ms).await?;
    let mut answer = WatchAnswer {
        epoch,
        next: after,
        states: Vec::new(),
        unknown: Vec::new(),
    };
    // The epoch this watch's entries belong to: the filter's, or, for its
    // first watch, the mailbox's as it was now.
    let expected = known_epoch.unwrap_or_else(|| answer.epoch.clone());
    if !check.is_empty() {
        state.remember_watched(&check, &guard.watcher);
        checked(&state, check, &mut answer).await?;
    }
    let mut shutdown = state.shutdown_receiver();
    let mut after = after;
    loop {
        match state.watch_take(&guard.watcher, &expected, after) {
            Taken::NewEpoch { epoch, last_seq } => {
                // Entries may have been lost: the filter checks everything
                // next, after every entry there is.
                answer.epoch = epoch;
                answer.next = last_seq;
                return Ok(guard.answered(answer));
            }
            Taken::Entries(entries) => {
                if let Some((last, _, _)) = entries.last() {
                    answer.next = *last;
                }
                taken(&state, entries, &mut answer.states).await?;
            }
        }
        if !answer.states.is_empty() || !answer.unknown.is_empty() {
            return Ok(guard.answered(answer));
        }
        // What was taken is known pending: not read again.
        after = answer.next;
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() || *shutdown.borrow() {
            return Ok(guard.answered(answer));
        }
        tokio::select! {
            _ = guard.woken.changed() => {}
            () = tokio::time::sleep(remaining) => {}
            _ = shutdown.wait_for(|down| *down) => {}
        }
    }
}

/// Reads the reviews of `check` (expiring overdue ones): final ones go to
/// the answer's states, missing ones to its `unknown`; both are forgotten
/// here (no change of theirs is to come).
async fn checked(
    state: &AppState,
    check: Vec<String>,
    answer: &mut WatchAnswer,
) -> Result<(), ApiError> {
    let now = crate::now_ms();
    let (check, found) = state
        .db(move |s| {
            let found = s.states_expiring(&check, now)?;
            Ok((check, found))
        })
        .await?;
    let mut seen: HashSet<&str> = HashSet::with_capacity(found.len());
    let mut expired = Vec::new();
    for (review, expired_now) in &found {
        seen.insert(review.id.as_str());
        if *expired_now {
            expired.push(review.id.clone());
        }
    }
    for id in &check {
        if !seen.contains(id.as_str()) {
            state.forget_watched(id);
            answer.unknown.push(id.clone());
        }
    }
    drop(seen);
    for (review, _) in found {
        if review.status.is_final() {
            // Forgotten first: the expiry's announcement below then puts
            // no second entry for it in this mailbox.
            state.forget_watched(&review.id);
            answer.states.push(review);
        }
    }
    for id in &expired {
        state.announce_expiry(id);
    }
    Ok(())
}

/// The final states of `entries`: those a wake carried, and those read
/// (in one query) for the others; reviews still pending are left out.
async fn taken(
    state: &AppState,
    entries: Vec<(u64, String, crate::state::Wake)>,
    states: &mut Vec<ReviewState>,
) -> Result<(), ApiError> {
    let to_read: Vec<String> = entries
        .iter()
        .filter(|(_, _, wake)| wake.is_none())
        .map(|(_, id, _)| id.clone())
        .collect();
    // Read once, looked up by id (a bulk approval through another
    // replica leaves thousands of entries without a state).
    let mut read: HashMap<String, ReviewState> = HashMap::new();
    if !to_read.is_empty() {
        let now = crate::now_ms();
        let found = state.db(move |s| s.states_expiring(&to_read, now)).await?;
        for (review, expired_now) in found {
            if review.status.is_final() {
                // Forgotten first, as in `checked`.
                state.forget_watched(&review.id);
                if expired_now {
                    state.announce_expiry(&review.id);
                }
                read.insert(review.id.clone(), review);
            }
        }
    }
    for (_, id, wake) in entries {
        match wake {
            Some(decided) => states.push((*decided).clone()),
            None => states.extend(read.get(&id).cloned()),
        }
    }
    Ok(())
}

/// One watch in progress: marks its watcher alive until its end plus
/// `hold_grace_ms` when it begins, and, when cut off unanswered (dropped:
/// the filter's connection closed, Envoy may be gone), for the grace from
/// then, like one hold's long poll does.
struct Watch {
    state: AppState,
    watcher: String,
    woken: tokio::sync::watch::Receiver<()>,
    answered: bool,
}

impl Watch {
    async fn begin(
        state: &AppState,
        watcher: String,
        budget_ms: u64,
    ) -> Result<(Watch, String), ApiError> {
        let alive_until_ms = crate::now_ms()
            .saturating_add(budget_ms)
            .saturating_add(state.config().hold_grace_ms);
        let begun = state.watch_begin(&watcher, alive_until_ms);
        let mut guard = Watch {
            state: state.clone(),
            watcher,
            woken: begun.woken,
            answered: false,
        };
        guard.woken.borrow_and_update();
        if let Some(until) = begun.store_alive_until_ms {
            let id = guard.watcher.clone();
            if let Err(e) = state.db(move |s| s.watcher_seen(&id, until)).await {
                // Not stored: the next watch writes it (and nothing here
                // lowers the time either).
                state.watch_write_failed(&guard.watcher);
                guard.answered = true;
                return Err(e.into());
            }
        }
        Ok((guard, begun.epoch))
    }

    fn answered(&mut self, answer: WatchAnswer) -> Json<WatchAnswer> {
        self.answered = true;
        spans::note(
            "countersign.watch.states",
            i64::try_from(answer.states.len()).unwrap_or(i64::MAX),
        );
        Json(answer)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let now = crate::now_ms();
        let until = now.saturating_add(self.state.config().hold_grace_ms);
        let Some((stored, until)) = self.state.watch_end(&self.watcher, self.answered, until)
        else {
            return;
        };
        let (state, watcher) = (self.state.clone(), self.watcher.clone());
        // Drop cannot wait: the write runs on its own (a handler is always
        // dropped inside the runtime).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let ended = state
                    .db(move |s| s.watcher_cut_off(&watcher, stored, until))
                    .await;
                if let Err(e) = ended {
                    tracing::warn!(error = %e, "could not record the end of a watch");
                }
            });
        }
    }
}
