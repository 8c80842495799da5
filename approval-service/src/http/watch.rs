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
use countersign_core::wire::{
    valid_watcher_id, ReviewState, WatchAnswer, WatchRequest, MAX_WATCH_CHECK,
};

use super::auth::FilterAuth;
use super::error::ApiError;
use super::extract::JsonBody;
use super::spans;
use crate::state::AppState;
use crate::watchers::Taken;

/// The most bytes of review states (edited bodies, mostly) one answer
/// carries from the mailbox; the rest stays for the next watch, which the
/// filter sends at once (it reads each answer whole into its VM).
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// `POST /v1/watch`.
pub async fn watch(
    State(state): State<AppState>,
    _auth: FilterAuth,
    JsonBody(req): JsonBody<WatchRequest>,
) -> Result<Json<WatchAnswer>, ApiError> {
    if !valid_watcher_id(&req.watcher) {
        return Err(ApiError::BadRequest(
            "watcher: must be 32 lowercase hexadecimal characters".into(),
        ));
    }
    for (field, ids) in [("check", &req.check), ("gone", &req.gone)] {
        if ids.len() > MAX_WATCH_CHECK {
            return Err(ApiError::BadRequest(format!(
                "{field}: at most {MAX_WATCH_CHECK} review ids per watch"
            )));
        }
        if ids.iter().any(|id| !valid_review_id(id)) {
            return Err(ApiError::BadRequest(format!(
                "{field}: a review id is not one (letters, digits, `_` and `-`, at most 128)"
            )));
        }
    }
    spans::note("countersign.watcher", req.watcher.clone());
    let budget_ms = req.timeout_ms.min(state.config().max_long_poll_ms);
    // Marks the watcher alive and subscribes to its mailbox before any
    // read, so no change slips in between.
    let (mut guard, begun) = Watch::begin(&state, req.watcher.clone(), budget_ms).await?;
    let served = serve(&state, &mut guard, req, begun, budget_ms).await;
    if served.is_err() {
        // The service failed, not the filter, which is there and comes
        // back: not a watch cut off (its holds stay alive).
        guard.answered = true;
    }
    served.map(|answer| guard.answered(answer))
}

/// A watch after it began: the reviews its worker let go are cancelled,
/// the listed ones read, then the mailbox's entries taken or waited for.
async fn serve(
    state: &AppState,
    guard: &mut Watch,
    req: WatchRequest,
    (epoch, last_seq): (String, u64),
    budget_ms: u64,
) -> Result<WatchAnswer, ApiError> {
    let WatchRequest {
        epoch: known_epoch,
        after,
        check,
        gone,
        ..
    } = req;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(budget_ms);
    // The callers of these holds went away: the same end as their
    // cancellation (`/v1/reviews/{id}/cancel`, which may have been lost),
    // so that no approval is answered 200 for a hold that is gone while
    // the worker's other holds keep it watching.
    for id in gone {
        let _ = super::reviews::finish_review(
            state.clone(),
            id,
            countersign_core::wire::ReviewStatus::Cancelled,
            crate::store::CANCELLED_REASON,
        )
        .await;
    }
    let mut answer = WatchAnswer {
        epoch,
        next: after,
        states: Vec::new(),
        unknown: Vec::new(),
    };
    // The epoch this watch's entries belong to: the filter's, or, for a
    // watch that names none, the mailbox's as it was now. A watch naming
    // none lists every review its worker waits for in `check`, read below:
    // the entries up to now are covered by that read, and are not sent
    // again (watches alternating between replicas would otherwise each get
    // the other replica's whole backlog back, at once, forever).
    let mut after = after;
    let named = known_epoch.is_some();
    let expected = match known_epoch {
        Some(epoch) => epoch,
        None => {
            after = last_seq;
            answer.next = last_seq;
            answer.epoch.clone()
        }
    };
    if !check.is_empty() {
        state.remember_watched(&check, &guard.watcher);
        checked(state, check, &mut answer).await?;
    }
    let mut shutdown = state.shutdown_receiver();
    loop {
        match state.watch_take(&guard.watcher, &expected, after) {
            Taken::NewEpoch { epoch, last_seq } => {
                // Entries may have been lost: the filter checks everything
                // next. A watch that named no epoch would take the new one
                // as its own and check nothing: it gets back the one that
                // vanished, which its next watch names, and is told then.
                answer.epoch = if named { epoch } else { expected };
                answer.next = last_seq;
                return Ok(answer);
            }
            Taken::Entries(entries) => {
                let last = entries.last().map(|(seq, _, _)| *seq);
                let cut = taken(state, entries, &mut answer.states).await?;
                answer.next = cut.or(last).unwrap_or(answer.next);
            }
        }
        if !answer.states.is_empty() || !answer.unknown.is_empty() {
            return Ok(answer);
        }
        // What was taken is known pending: not read again.
        after = answer.next;
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() || *shutdown.borrow() {
            return Ok(answer);
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
/// (in one query) for the others; reviews still pending are left out. Past
/// [`MAX_ANSWER_BYTES`] of states the rest is left for the next watch: the
/// `seq` of the last entry taken then (`None`: all were).
async fn taken(
    state: &AppState,
    entries: Vec<(u64, String, crate::state::Wake)>,
    states: &mut Vec<ReviewState>,
) -> Result<Option<u64>, ApiError> {
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
    let mut bytes = 0usize;
    for (seq, id, wake) in entries {
        let review = match wake {
            Some(decided) => Some((*decided).clone()),
            None => read.get(&id).cloned(),
        };
        let Some(review) = review else { continue };
        let size = 256
            + review.edited_body.as_ref().map_or(0, String::len)
            + review.reason.as_ref().map_or(0, String::len);
        if !states.is_empty() && bytes.saturating_add(size) > MAX_ANSWER_BYTES {
            return Ok(Some(seq - 1));
        }
        bytes = bytes.saturating_add(size);
        states.push(review);
    }
    Ok(None)
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
    ) -> Result<(Watch, (String, u64)), ApiError> {
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
        Ok((guard, (begun.epoch, begun.last_seq)))
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
