//! The worker's watch: one long poll to the approval service,
//! `POST /v1/watch` ([`WatchRequest`]), for every request of the worker that
//! waits for a reviewer, instead of one long poll per held request.
//!
//! Each held request costs Envoy a stream to the approval service for as
//! long as it waits when it polls on its own, and the service a task; and
//! 1,024 of them reach Envoy's default circuit breaker of the approval
//! cluster. A worker's reviews carry its watcher id
//! ([`crate::wire::CreateReview::watcher`]), so the service wakes the
//! worker's one watch when any of them is decided, and its answer carries
//! every decision since the last (many, after a bulk approval).
//!
//! Nothing is missed ([`WatchRequest`] has the protocol): the filter
//! acknowledges what it took in (`after`), so a lost answer is sent again;
//! each review is read from the database once, in the first watch sent
//! after the worker began waiting for it (`check`), which covers a
//! decision taken before the service knew whom to tell; and after an answer
//! in a new epoch (the service restarted, or another replica answered)
//! every review waited for is read again.
//!
//! Pure: the worker ([`crate::worker`]) sends the requests this makes and
//! feeds it their answers and the clock.

use std::collections::HashMap;
use std::rc::Rc;

use crate::hold::{retry_delay, valid_review_id, CalloutResult, Watched};
use crate::wire::{ReviewStatus, WatchAnswer, WatchRequest, MAX_WATCH_CHECK};

/// One worker's watch.
#[derive(Debug, Default)]
pub struct Watch {
    /// The watcher id, made once ([`Watch::watcher_id`]).
    id: Option<Rc<str>>,
    /// Reviews waited for: review id → (HTTP context id, its deadline).
    waiting: HashMap<String, (u32, u64)>,
    /// Reviews to read from the database with the next watch.
    check: Vec<String>,
    /// Reviews whose hold ended undecided (the caller went away), for the
    /// next watch to tell ([`WatchRequest::gone`]).
    gone: Vec<String>,
    /// The watch in flight: its callout token (`None` between building a
    /// request and its dispatch), the reviews it checks and those it tells
    /// are gone.
    in_flight: Option<(Option<u32>, Vec<String>, Vec<String>)>,
    /// The epoch and `next` of the last answer taken in.
    epoch: Option<String>,
    after: u64,
    /// Failed watches in a row, and when the next may be sent.
    failures: u32,
    retry_at: u64,
}

/// What an answer to the watch gave.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Answered {
    /// Holds to feed ([`crate::hold::Hold::on_watched`]), by HTTP context id.
    pub holds: Vec<(u32, Watched)>,
    /// Why the watch failed, when it did (it is sent again after a backoff;
    /// each hold still ends at its deadline).
    pub failed: Option<String>,
}

impl Watch {
    /// This worker's watcher id, once made.
    pub fn watcher_id(&self) -> Option<Rc<str>> {
        self.id.clone()
    }

    /// Makes this worker's watcher id, 32 lowercase hexadecimal characters,
    /// from two random numbers (the host's), unless it has one.
    pub fn make_watcher_id(&mut self, a: u64, b: u64) -> Rc<str> {
        self.id
            .get_or_insert_with(|| format!("{a:016x}{b:016x}").into())
            .clone()
    }

    /// Starts waiting for `review_id` on behalf of HTTP context `ctx` until
    /// `deadline_ms`. Whether a watch should be sent (none is in flight).
    pub fn join(&mut self, review_id: String, ctx: u32, deadline_ms: u64) -> bool {
        if self
            .waiting
            .insert(review_id.clone(), (ctx, deadline_ms))
            .is_none()
        {
            self.check.push(review_id);
        }
        self.in_flight.is_none()
    }

    /// `ctx`'s hold no longer waits for `review_id` (it ended); `gone`:
    /// undecided (the caller went away), which the next watch tells.
    /// Whether a watch should be sent for that (none is in flight).
    pub fn leave(&mut self, review_id: &str, ctx: u32, gone: bool) -> bool {
        if self.waiting.get(review_id).is_none_or(|(c, _)| *c != ctx) {
            return false;
        }
        self.waiting.remove(review_id);
        if gone && self.gone.len() < MAX_WATCH_CHECK {
            self.gone.push(review_id.to_string());
            return self.in_flight.is_none();
        }
        false
    }

    /// Reviews waited for.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The callout token of the watch in flight.
    pub fn in_flight(&self) -> Option<u32> {
        self.in_flight.as_ref().and_then(|(token, _, _)| *token)
    }

    /// Whether `token` is the watch in flight.
    pub fn is_in_flight(&self, token: u32) -> bool {
        matches!(self.in_flight, Some((Some(t), _, _)) if t == token)
    }

    /// The next watch to send, when one is due: something is waited for,
    /// none is in flight, and no backoff runs. Its `check` is taken in
    /// flight; [`Watch::sent`] or [`Watch::on_answer`] with a failure
    /// follows.
    pub fn request(&mut self, now_ms: u64, timeout_ms: u64) -> Option<WatchRequest> {
        let idle = self.waiting.is_empty() && self.gone.is_empty();
        if self.in_flight.is_some() || idle || now_ms < self.retry_at {
            return None;
        }
        let watcher = self.id.as_deref()?.to_string();
        // Reviews that ended since they joined need no reading.
        let waiting = &self.waiting;
        self.check.retain(|id| waiting.contains_key(id));
        // At most what the service takes at once; the rest goes with the
        // next watch, which this one then does not keep waiting.
        let rest = self.check.split_off(self.check.len().min(MAX_WATCH_CHECK));
        let check = std::mem::replace(&mut self.check, rest);
        let gone = std::mem::take(&mut self.gone);
        // Nothing to wait for, or more to check: answered at once.
        let timeout_ms = match self.check.is_empty() && !self.waiting.is_empty() {
            true => timeout_ms,
            false => 0,
        };
        self.in_flight = Some((None, check.clone(), gone.clone()));
        Some(WatchRequest {
            watcher,
            epoch: self.epoch.clone(),
            after: self.after,
            check,
            gone,
            timeout_ms,
        })
    }

    /// The watch [`Watch::request`] made was dispatched as `token`.
    pub fn sent(&mut self, token: u32) {
        if let Some((t, _, _)) = &mut self.in_flight {
            *t = Some(token);
        }
    }

    /// The answer to the watch in flight (or its failure to be sent).
    pub fn on_answer(&mut self, result: &CalloutResult, now_ms: u64) -> Answered {
        let Some((_, checked, gone)) = self.in_flight.take() else {
            return Answered::default();
        };
        let answer = match read_answer(result) {
            Ok(answer) => answer,
            Err(why) => {
                // What it checked is checked again with the next, and what
                // it told told again.
                self.check.extend(checked);
                self.gone.extend(gone);
                self.retry_at = now_ms.saturating_add(retry_delay(self.failures));
                self.failures = self.failures.saturating_add(1);
                return Answered {
                    holds: Vec::new(),
                    failed: Some(why),
                };
            }
        };
        self.failures = 0;
        self.retry_at = 0;
        if self.epoch.is_some() && self.epoch.as_deref() != Some(answer.epoch.as_str()) {
            // States may have been lost (the service restarted, another
            // replica answered): the next watch reads every review waited
            // for, under no epoch, so that it may wait wherever it lands;
            // naming this epoch, it would be answered at once again by a
            // replica with another (watches alternating between replicas).
            self.check = self.waiting.keys().cloned().collect();
            self.epoch = None;
            self.after = 0;
        } else {
            self.epoch = Some(answer.epoch);
            self.after = answer.next;
        }
        let mut holds = Vec::new();
        for state in answer.states {
            if state.status == ReviewStatus::Pending {
                continue;
            }
            if let Some((ctx, _)) = self.waiting.remove(&state.id) {
                holds.push((ctx, Watched::State(state)));
            }
        }
        for id in answer.unknown {
            if let Some((ctx, _)) = self.waiting.remove(&id) {
                holds.push((ctx, Watched::Unknown));
            }
        }
        Answered {
            holds,
            failed: None,
        }
    }

    /// The holds whose deadline has come, no longer waited for here (the
    /// worker has each expire its review).
    pub fn overdue(&mut self, now_ms: u64) -> Vec<u32> {
        let mut due = Vec::new();
        self.waiting.retain(|_, (ctx, deadline)| {
            let over = *deadline <= now_ms;
            if over {
                due.push(*ctx);
            }
            !over
        });
        due
    }
}

/// A watch's answer: 200 with a [`WatchAnswer`] whose ids are well formed;
/// anything else is a failure, named.
fn read_answer(result: &CalloutResult) -> Result<WatchAnswer, String> {
    match result.status {
        Some(200) => {}
        Some(status) => return Err(format!("status {status}")),
        None => return Err("no response".into()),
    }
    let answer: WatchAnswer =
        serde_json::from_slice(&result.body).map_err(|_| "unreadable answer".to_string())?;
    let ids_ok = answer.states.iter().all(|s| valid_review_id(&s.id))
        && answer.unknown.iter().all(|id| valid_review_id(id));
    if !ids_ok || answer.epoch.is_empty() {
        return Err("malformed answer".into());
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::hold::RETRY_MIN_MS;
    use crate::wire::ReviewState;

    fn answer(
        epoch: &str,
        next: u64,
        decided: &[(&str, ReviewStatus)],
        unknown: &[&str],
    ) -> CalloutResult {
        let states: Vec<ReviewState> = decided
            .iter()
            .map(|(id, status)| ReviewState {
                id: id.to_string(),
                status: *status,
                expires_at_ms: 0,
                reviewer: Some("ana".into()),
                reason: None,
                edited_body: None,
            })
            .collect();
        let body = WatchAnswer {
            epoch: epoch.into(),
            next,
            states,
            unknown: unknown.iter().map(|s| s.to_string()).collect(),
        };
        CalloutResult {
            status: Some(200),
            body: serde_json::to_vec(&body).unwrap(),
        }
    }

    fn watch() -> Watch {
        let mut w = Watch::default();
        w.make_watcher_id(1, 2);
        w
    }

    #[test]
    fn the_watcher_id_is_made_once() {
        let mut w = Watch::default();
        assert_eq!(w.watcher_id(), None);
        // No watch without an id to name.
        w.join("rev_a".into(), 1, 100);
        assert!(w.request(0, 1000).is_none());
        let id = w.make_watcher_id(0xab, u64::MAX);
        assert_eq!(&*id, "00000000000000abffffffffffffffff");
        assert!(crate::wire::valid_watcher_id(&id));
        assert_eq!(w.make_watcher_id(1, 2), id);
        assert_eq!(w.watcher_id(), Some(id));
    }

    #[test]
    fn one_watch_at_a_time_checks_each_review_once() {
        let mut w = watch();
        assert!(w.join("rev_a".into(), 1, 10_000));
        let first = w.request(0, 25_000).unwrap();
        assert_eq!(
            (first.epoch, first.after, first.check),
            (None, 0, vec!["rev_a".to_string()])
        );
        w.sent(7);
        // A review joining while a watch is in flight waits for its answer.
        assert!(!w.join("rev_b".into(), 2, 10_000));
        assert!(w.request(0, 25_000).is_none());
        assert!(w.is_in_flight(7) && !w.is_in_flight(8));
        let got = w.on_answer(&answer("e1", 3, &[], &[]), 10);
        assert_eq!(got, Answered::default());
        let second = w.request(10, 25_000).unwrap();
        assert_eq!(second.epoch.as_deref(), Some("e1"));
        assert_eq!(second.after, 3);
        assert_eq!(second.check, vec!["rev_b".to_string()]);
        w.sent(8);
        let got = w.on_answer(&answer("e1", 3, &[], &[]), 20);
        assert!(got.holds.is_empty());
        // Nothing new to check: the next watch only waits.
        assert!(w.request(20, 25_000).unwrap().check.is_empty());
    }

    #[test]
    fn decided_and_unknown_reviews_go_to_their_holds_once() {
        let mut w = watch();
        w.join("rev_a".into(), 1, 10_000);
        w.join("rev_b".into(), 2, 10_000);
        w.join("rev_c".into(), 3, 10_000);
        w.request(0, 1000).unwrap();
        w.sent(1);
        let got = w.on_answer(
            &answer(
                "e1",
                5,
                &[
                    ("rev_a", ReviewStatus::Approved),
                    ("rev_a", ReviewStatus::Approved),
                    ("rev_b", ReviewStatus::Pending),
                    ("rev_zz", ReviewStatus::Rejected),
                ],
                &["rev_c"],
            ),
            5,
        );
        let ctxs: Vec<(u32, bool)> = got
            .holds
            .iter()
            .map(|(ctx, w)| (*ctx, matches!(w, Watched::State(_))))
            .collect();
        // rev_a once (the repeat is ignored), rev_b still pending, rev_zz
        // not waited for here, rev_c unknown.
        assert_eq!(ctxs, vec![(1, true), (3, false)]);
        assert_eq!(w.waiting(), 1);
    }

    #[test]
    fn a_failed_watch_backs_off_and_checks_its_reviews_again() {
        let mut w = watch();
        w.join("rev_a".into(), 1, 60_000);
        w.request(0, 1000).unwrap();
        w.sent(1);
        let down = CalloutResult {
            status: Some(503),
            body: Vec::new(),
        };
        assert_eq!(
            w.on_answer(&down, 100).failed.as_deref(),
            Some("status 503")
        );
        assert!(w.request(100, 1000).is_none());
        let again = w.request(100 + RETRY_MIN_MS, 1000).unwrap();
        assert_eq!(again.check, vec!["rev_a".to_string()]);
        // Unreadable answers and malformed ids are failures too.
        for body in [
            &b"nope"[..],
            br#"{"epoch":"e","next":1,"states":[],"unknown":["../x"]}"#,
        ] {
            w.sent(2);
            let bad = CalloutResult {
                status: Some(200),
                body: body.to_vec(),
            };
            assert!(w.on_answer(&bad, 1000).failed.is_some());
            w.request(100_000, 1000).unwrap();
        }
    }

    #[test]
    fn a_new_epoch_reads_every_review_again() {
        let mut w = watch();
        w.join("rev_a".into(), 1, 60_000);
        w.join("rev_b".into(), 2, 60_000);
        w.request(0, 1000).unwrap();
        w.sent(1);
        w.on_answer(&answer("e1", 4, &[], &[]), 1);
        assert!(w.request(1, 1000).unwrap().check.is_empty());
        w.sent(2);
        // The service restarted (or another replica answered): its mailbox
        // is new, and it carries what it read.
        let got = w.on_answer(
            &answer("e2", 7, &[("rev_b", ReviewStatus::Approved)], &[]),
            2,
        );
        assert_eq!(got.holds.len(), 1);
        let next = w.request(2, 1000).unwrap();
        assert_eq!((next.epoch, next.after), (None, 0));
        assert_eq!(next.check, vec!["rev_a".to_string()]);
        w.sent(3);
        // That watch's epoch is taken as it is.
        w.on_answer(&answer("e3", 9, &[], &[]), 3);
        let next = w.request(3, 1000).unwrap();
        assert_eq!((next.epoch.as_deref(), next.after), (Some("e3"), 9));
        assert!(next.check.is_empty());
    }

    #[test]
    fn reviews_whose_callers_went_away_are_told_once_even_with_nothing_left_to_wait_for() {
        let mut w = watch();
        w.join("rev_a".into(), 1, 60_000);
        w.join("rev_b".into(), 2, 60_000);
        w.request(0, 1000).unwrap();
        w.sent(1);
        // The caller of rev_a leaves while the watch waits.
        assert!(!w.leave("rev_a", 1, true));
        w.on_answer(&answer("e1", 1, &[], &[]), 1);
        let next = w.request(1, 1000).unwrap();
        assert_eq!(next.gone, vec!["rev_a".to_string()]);
        assert_eq!(next.timeout_ms, 1000);
        // Lost: told again.
        w.sent(2);
        let down = CalloutResult {
            status: None,
            body: Vec::new(),
        };
        w.on_answer(&down, 2);
        let again = w.request(10_000, 1000).unwrap();
        assert_eq!(again.gone, vec!["rev_a".to_string()]);
        w.sent(3);
        w.on_answer(&answer("e1", 1, &[], &[]), 10_001);
        // The last hold's caller leaves: a watch tells it without waiting.
        assert!(w.leave("rev_b", 2, true));
        let last = w.request(10_001, 1000).unwrap();
        assert_eq!((last.gone, last.timeout_ms), (vec!["rev_b".to_string()], 0));
        w.sent(4);
        w.on_answer(&answer("e1", 1, &[], &[]), 10_002);
        assert!(w.request(10_002, 1000).is_none());
    }

    #[test]
    fn more_reviews_than_one_watch_may_check_go_over_several_at_once() {
        let mut w = watch();
        for n in 0..MAX_WATCH_CHECK + 5 {
            w.join(format!("rev_{n}"), 1, 60_000);
        }
        let first = w.request(0, 25_000).unwrap();
        assert_eq!(first.check.len(), MAX_WATCH_CHECK);
        // The rest waits: this watch must not.
        assert_eq!(first.timeout_ms, 0);
        w.sent(1);
        w.on_answer(&answer("e1", 0, &[], &[]), 1);
        let second = w.request(1, 25_000).unwrap();
        assert_eq!(second.check.len(), 5);
        assert_eq!(second.timeout_ms, 25_000);
        let mut all = first.check;
        all.extend(second.check);
        all.sort();
        all.dedup();
        assert_eq!(all.len(), MAX_WATCH_CHECK + 5);
    }

    #[test]
    fn overdue_holds_leave_the_watch_and_ended_ones_are_not_checked() {
        let mut w = watch();
        w.join("rev_a".into(), 1, 100);
        w.join("rev_b".into(), 2, 500);
        w.join("rev_c".into(), 3, 500);
        // Another context's end does not remove a review it does not wait for.
        assert!(!w.leave("rev_c", 9, true));
        w.leave("rev_b", 2, false);
        assert_eq!(w.overdue(99), Vec::<u32>::new());
        assert_eq!(w.overdue(100), vec![1]);
        assert_eq!(
            w.request(100, 1000).unwrap().check,
            vec!["rev_c".to_string()]
        );
        w.sent(1);
        w.on_answer(&answer("e", 1, &[], &[]), 200);
        w.leave("rev_c", 3, false);
        // Nothing waited for: no watch.
        assert!(w.request(200, 1000).is_none());
    }
}
