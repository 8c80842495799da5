//! One VM's (one Envoy worker's) shared state: the holds by HTTP context
//! id, the outstanding callouts by token, the retries due, and the outbox of
//! calls that must land after their stream is gone ([`crate::delivery`]).
//!
//! It is shared between the root context and the HTTP contexts of one VM
//! (a [`Worker`] is a cheap handle to it): the worker's watch
//! ([`crate::watch`]) and the retries of failed calls are dispatched from
//! the root context's timer, so their answers come back to the root
//! context, which finds the hold by the callout token (or, for the watch,
//! by the review ids in its answer); context ids are unique within a VM
//! only, and every VM has its own worker.
//!
//! No borrow of the state is held across a host call: a local reply or a
//! resume can make Envoy call back into this VM synchronously (see
//! [`crate::host`]). Every borrow below lives in a scope without host calls.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use crate::answer_review::AnswerRelease;
use crate::config::Config;
use crate::delivery::{admits, admits_routine, Delivery, DeliveryStep};
use crate::hold::{
    cancel_callout, record_batch_callout, response_batch_callout, watch_callout, Callout,
    CalloutKind, CalloutResult, Hold, HoldStep, Release,
};
use crate::host::{note_outcome, Host, Level};
use crate::refusal::{Refusal, RefusalKind};
use crate::vm_memory::VmShare;
use crate::watch::Watch;
use crate::wire::{RecordBatchResults, RecordCreated};

/// The root context's timer period (ms) when no record batch is open.
pub const TICK_MS: u64 = 200;

/// A record batch is sent at once when it holds this many records...
pub const MAX_BATCH_RECORDS: usize = 64;
/// ...or this many bytes of records.
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// A held request's state.
struct HoldEntry {
    hold: Hold,
    config: Rc<Config>,
    /// Size of the buffered body, replaced whole by an edited body.
    body_len: usize,
    /// Set once the hold is over, either way.
    finished: bool,
    /// Set when the request was released to the model, with the time.
    released: Option<(Release, u64)>,
    /// Whose request or answer waits for a reviewer (`None`: not waiting
    /// for one, such as a record written before forwarding), for
    /// `hold_limits`.
    waits_for_review: Option<String>,
    /// Set when a held answer was let go, with what the caller got.
    answered: Option<AnswerRelease>,
}

#[derive(Default)]
struct State {
    /// Holds by HTTP context id.
    holds: HashMap<u32, HoldEntry>,
    /// Outstanding hold callouts: token → (HTTP context id, which call).
    callouts: HashMap<u32, (u32, CalloutKind)>,
    /// Retries due: (time in ms, HTTP context id).
    retries: Vec<(u64, u32)>,
    /// Deliveries to send, due at a time (ms).
    outbox: Vec<(u64, Rc<Config>, Delivery)>,
    /// Deliveries sent and not yet answered, by callout token.
    deliveries: HashMap<u32, (Rc<Config>, Delivery)>,
    /// Deliveries queued or in flight, and the bytes of their bodies.
    queued: (usize, usize),
    /// Records to write before forwarding that wait for the open batch to
    /// be sent: (HTTP context id, the record's body), and their bytes.
    batch: Vec<(u32, Callout)>,
    batch_bytes: usize,
    /// The configuration of the open batch's first record (the call's).
    batch_config: Option<Rc<Config>>,
    /// The timer's period while it runs faster than [`TICK_MS`] for the
    /// open batch (`None`: at [`TICK_MS`]).
    fast_tick: Option<u64>,
    /// Batches sent and not yet answered: token → their holds, in order.
    batches: HashMap<u32, Vec<u32>>,
    /// Record calls sent from the batch and not yet answered, and whether
    /// the root context sent them (its answer comes back to the root
    /// context, which may then send the next batch itself). While one is in
    /// flight, new records wait in the open batch.
    record_calls: HashMap<u32, bool>,
    /// Response parts sent together and not yet answered: token → their
    /// deliveries, in order.
    response_batches: HashMap<u32, Vec<(Rc<Config>, Delivery)>>,
    /// The VM's share of the memory gauge while this root context takes
    /// part (`None`: it counts no memory, or has left).
    memory: Option<VmShare>,
    /// The one long poll for every hold waiting for a reviewer
    /// ([`crate::watch`]), and the configuration its calls use (the last
    /// hold's to join: one root context has one configuration).
    watch: Watch,
    watch_config: Option<Rc<Config>>,
}

/// A handle to one VM's shared state.
#[derive(Clone, Default)]
pub struct Worker(Rc<RefCell<State>>);

impl Worker {
    /// An empty worker that counts no VM memory (the adapter's root
    /// contexts use [`Worker::in_vm`]).
    pub fn new() -> Worker {
        Worker::default()
    }

    /// An empty worker for a root context of the VM whose memory gauge
    /// share is `vm` ([`crate::vm_memory`]).
    pub fn in_vm(vm: &VmShare) -> Worker {
        Worker(Rc::new(RefCell::new(State {
            memory: Some(vm.join()),
            ..State::default()
        })))
    }

    /// Runs `f` on the state. Callers never make host calls inside `f`.
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.0.borrow_mut())
    }

    /// Whether the state is free to borrow (for tests of re-entrancy).
    pub fn is_borrowed(&self) -> bool {
        self.0.try_borrow_mut().is_err()
    }

    /// This root context is done (its plugin removed or replaced, or the VM
    /// shut down): it leaves the VM's memory share ([`VmShare::leave`]).
    pub fn on_done(&self, host: &mut dyn Host) {
        if let Some(share) = self.with(|s| s.memory.take()) {
            share.leave(host);
        }
    }

    /// Requests held in this VM.
    pub fn held(&self) -> usize {
        self.with(|s| s.holds.len())
    }

    /// Requests (and answers) of `caller` (`""`: no caller) and of everyone
    /// that wait for a reviewer in this worker. A hold that is over (its
    /// request released, its answer let go or refused) waits no more.
    pub fn waiting_for_review(&self, caller: &str) -> (usize, usize) {
        self.with(|s| {
            let waiting = s
                .holds
                .values()
                .filter(|e| !e.finished)
                .filter_map(|e| e.waits_for_review.as_deref());
            waiting.fold((0, 0), |(mine, all), c| {
                (mine + usize::from(c == caller), all + 1)
            })
        })
    }

    /// This worker's watcher id ([`crate::watch`]), for the reviews its
    /// holds create; made from two of the host's random numbers on first
    /// use.
    pub fn watcher(&self, host: &mut dyn Host) -> Rc<str> {
        if let Some(id) = self.with(|s| s.watch.watcher_id()) {
            return id;
        }
        let (a, b) = (host.nonce(), host.nonce());
        self.with(|s| s.watch.make_watcher_id(a, b))
    }

    /// The callout token of the watch in flight, if any.
    pub fn watch_in_flight(&self) -> Option<u32> {
        self.with(|s| s.watch.in_flight())
    }

    /// Reviews this worker's watch waits for.
    pub fn watched(&self) -> usize {
        self.with(|s| s.watch.waiting())
    }

    /// Hold callouts waiting for an answer.
    pub fn outstanding_callouts(&self) -> usize {
        self.with(|s| s.callouts.len())
    }

    /// Deliveries queued or in flight, and the bytes of their bodies.
    pub fn queued(&self) -> (usize, usize) {
        self.with(|s| s.queued)
    }

    /// Records waiting in the open batch for the tick that sends it.
    pub fn batched(&self) -> usize {
        self.with(|s| s.batch.len())
    }

    /// Queues `call` for the root context to send (at its next tick) and to
    /// retry until it lands; drops it (counted) when the queue is full. A
    /// `routine` call (refusal record, cancellation) gets only half the queue.
    /// Whether it was queued.
    pub fn deliver(
        &self,
        host: &mut dyn Host,
        config: &Rc<Config>,
        call: Callout,
        routine: bool,
    ) -> bool {
        let delivery = Delivery::new(call);
        let size = delivery.size();
        let refused = self.with(|s| {
            let (n, bytes) = s.queued;
            let admitted = match routine {
                true => admits_routine(n, bytes, size),
                false => admits(n, bytes, size),
            };
            if !admitted {
                return Some((n, bytes));
            }
            s.queued = (n + 1, bytes.saturating_add(size));
            s.outbox.push((0, config.clone(), delivery));
            None
        });
        let Some((n, bytes)) = refused else {
            return true;
        };
        host.count("countersign_deliveries_dropped_total", 1);
        host.log(
            Level::Warn,
            &format!("countersign: delivery queue full ({n} calls, {bytes} bytes); one dropped"),
        );
        false
    }

    /// The root context's timer: fires the retries due, then sends the due
    /// deliveries (their answers come back to the root context, whatever
    /// became of the stream).
    pub fn on_tick(&self, host: &mut dyn Host) {
        // The VM's memory, on the timer: nothing on a request's path.
        if let Some(share) = self.with(|s| s.memory.clone()) {
            share.count_growth(host);
        }
        self.send_batch(host, true);
        let slow_down = self.with(|s| {
            let idle = s.fast_tick.is_some() && s.batch.is_empty();
            if idle {
                s.fast_tick = None;
            }
            idle
        });
        if slow_down {
            host.set_tick_period(TICK_MS);
        }
        let now = host.now_ms();
        let due: Vec<u32> = self.with(|s| {
            let (due, later): (Vec<_>, Vec<_>) =
                s.retries.drain(..).partition(|(at, _)| *at <= now);
            s.retries = later;
            due.into_iter().map(|(_, id)| id).collect()
        });
        // Holds whose time is up leave the watch and expire their review.
        let overdue = self.with(|s| s.watch.overdue(now));
        for ctx in due.into_iter().chain(overdue) {
            let step = self.with(|s| {
                let e = s.holds.get_mut(&ctx)?;
                let config = e.config.clone();
                Some(e.hold.on_retry(&config, now))
            });
            if let Some(step) = step {
                self.perform(host, ctx, step);
            }
        }
        self.send_watch(host, now);
        self.send_deliveries(host, now);
    }

    /// Sends the watch when one is due ([`Watch::request`]); only from the
    /// root context (the timer, or the previous watch's answer).
    fn send_watch(&self, host: &mut dyn Host, now: u64) {
        let Some((config, request)) = self.with(|s| {
            let config = s.watch_config.clone()?;
            let request = s.watch.request(now, config.long_poll_ms)?;
            Some((config, request))
        }) else {
            return;
        };
        let call = watch_callout(&config, &request);
        match host.dispatch(&config.approval_cluster, &call) {
            Ok(token) => self.with(|s| s.watch.sent(token)),
            Err(why) => {
                let failed = CalloutResult {
                    status: None,
                    body: why.into_bytes(),
                };
                self.after_watch(host, &failed, now);
            }
        }
    }

    /// Feeds the holds what the watch's answer says of their reviews, and
    /// sends the next watch at once when it may.
    fn after_watch(&self, host: &mut dyn Host, result: &CalloutResult, now: u64) {
        let answered = self.with(|s| s.watch.on_answer(result, now));
        if let Some(why) = &answered.failed {
            host.count("countersign_watch_failures_total", 1);
            host.log(
                Level::Warn,
                &format!(
                    "countersign: watching the held requests' reviews failed ({why}); trying again"
                ),
            );
        }
        for (ctx, watched) in answered.holds {
            let step = self.with(|s| {
                let e = s.holds.get_mut(&ctx)?;
                let config = e.config.clone();
                Some(e.hold.on_watched(&config, watched, now))
            });
            if let Some(step) = step {
                self.perform(host, ctx, step);
            }
        }
        if answered.failed.is_none() {
            self.send_watch(host, now);
        }
    }

    fn send_deliveries(&self, host: &mut dyn Host, now: u64) {
        let due: Vec<(Rc<Config>, Delivery)> = self.with(|s| {
            let (due, later): (Vec<_>, Vec<_>) =
                s.outbox.drain(..).partition(|(at, _, _)| *at <= now);
            s.outbox = later;
            due.into_iter().map(|(_, c, d)| (c, d)).collect()
        });
        let (parts, single) = response_batches(due);
        for batch in parts {
            self.send_response_batch(host, batch, now);
        }
        for (config, mut delivery) in single {
            delivery.sending();
            match host.dispatch(&config.approval_cluster, &delivery.call) {
                Ok(token) => self.with(|s| {
                    s.deliveries.insert(token, (config, delivery));
                }),
                Err(e) => {
                    let failed = CalloutResult {
                        status: None,
                        body: e.into_bytes(),
                    };
                    let step = delivery.on_result(&failed, now);
                    self.after_delivery(host, config, delivery, step);
                }
            }
        }
    }

    /// Sends response parts (at least two, of one configuration) in one
    /// `POST /v1/records/responses`.
    fn send_response_batch(
        &self,
        host: &mut dyn Host,
        batch: Vec<(Rc<Config>, Delivery)>,
        now: u64,
    ) {
        let Some(config) = batch.first().map(|(c, _)| c.clone()) else {
            return;
        };
        let mut batch = batch;
        let parts: Vec<(&str, &[u8])> = batch
            .iter()
            .filter_map(|(_, d)| Some((response_part_of(&d.call)?, d.call.body.as_deref()?)))
            .collect();
        let call = response_batch_callout(&config, &parts);
        for (_, d) in &mut batch {
            d.sending();
        }
        match host.dispatch(&config.approval_cluster, &call) {
            Ok(token) => self.with(|s| {
                s.response_batches.insert(token, batch);
            }),
            Err(e) => {
                let failed = CalloutResult {
                    status: None,
                    body: e.into_bytes(),
                };
                self.after_response_batch(host, batch, &failed, now);
            }
        }
    }

    /// Each response part of a batch gets its own result, as if its own
    /// call had been answered so (see [`per_record_results`]).
    fn after_response_batch(
        &self,
        host: &mut dyn Host,
        batch: Vec<(Rc<Config>, Delivery)>,
        result: &CalloutResult,
        now: u64,
    ) {
        let results = per_record_results(result, batch.len());
        for ((config, delivery), result) in batch.into_iter().zip(results) {
            let step = delivery.on_result(&result, now);
            self.after_delivery(host, config, delivery, step);
        }
    }

    fn after_delivery(
        &self,
        host: &mut dyn Host,
        config: Rc<Config>,
        delivery: Delivery,
        step: DeliveryStep,
    ) {
        match step {
            DeliveryStep::Done => self.delivered(&delivery),
            DeliveryStep::RetryAt(at) => {
                host.count("countersign_delivery_retries_total", 1);
                self.with(|s| s.outbox.push((at, config, delivery)));
            }
            DeliveryStep::GiveUp(why) => {
                self.delivered(&delivery);
                host.count("countersign_deliveries_failed_total", 1);
                let path = delivery
                    .call
                    .headers
                    .iter()
                    .find(|(k, _)| k == ":path")
                    .map_or("", |(_, v)| v.as_str());
                host.log(
                    Level::Warn,
                    &format!("countersign: gave up on POST {path} to the approval service: {why}"),
                );
                // The only review creation the outbox carries is a spot
                // check's audit, whose request went to the model already:
                // nobody will ever review it. Its record says an audit was
                // due (`audit_due`); this is the operator's side of it.
                if delivery.call.kind == CalloutKind::Create {
                    host.count("countersign_spot_checks_lost_total", 1);
                    let request = audited_request(&delivery.call);
                    host.log(
                        Level::Warn,
                        &format!(
                            "countersign: the audit of forwarded request {request} was never filed ({why}); its record says an audit was due"
                        ),
                    );
                }
            }
        }
    }

    /// A delivery left the queue for good (landed or given up).
    fn delivered(&self, delivery: &Delivery) {
        self.with(|s| {
            let (n, bytes) = s.queued;
            s.queued = (n.saturating_sub(1), bytes.saturating_sub(delivery.size()));
        });
    }

    /// Routes a callout answer to the delivery or the hold that made the
    /// call, whichever context it was dispatched from. The answer to the
    /// last record call in flight sends the records that waited for it.
    pub fn on_callout_response(&self, host: &mut dyn Host, token: u32, body_size: usize) {
        let record_call = self.with(|s| s.record_calls.remove(&token));
        self.route_callout_response(host, token, body_size);
        let Some(in_root) = record_call else { return };
        if self.with(|s| !s.record_calls.is_empty() || s.batch.is_empty()) {
            return;
        }
        if in_root {
            self.send_batch(host, true);
        } else {
            // Answered in a request's context: a call made from there is
            // cancelled, unanswered, when that request ends, so other
            // requests' records go from the root context, at its next tick.
            self.tick_within(host, 1);
        }
    }

    fn route_callout_response(&self, host: &mut dyn Host, token: u32, body_size: usize) {
        if self.with(|s| s.watch.is_in_flight(token)) {
            let result = host.callout_result(body_size);
            let now = host.now_ms();
            return self.after_watch(host, &result, now);
        }
        if let Some((config, delivery)) = self.with(|s| s.deliveries.remove(&token)) {
            let step = delivery.on_result(&host.callout_result(body_size), host.now_ms());
            self.after_delivery(host, config, delivery, step);
            return;
        }
        if let Some(batch) = self.with(|s| s.response_batches.remove(&token)) {
            let result = host.callout_result(body_size);
            let now = host.now_ms();
            return self.after_response_batch(host, batch, &result, now);
        }
        if let Some(ctxs) = self.with(|s| s.batches.remove(&token)) {
            let result = host.callout_result(body_size);
            return self.after_batch(host, ctxs, &result);
        }
        let Some((ctx, kind)) = self.with(|s| s.callouts.remove(&token)) else {
            return;
        };
        if !self.with(|s| s.holds.contains_key(&ctx)) {
            return;
        }
        let result = host.callout_result(body_size);
        let now = host.now_ms();
        let step = self.with(|s| {
            let e = s.holds.get_mut(&ctx)?;
            let config = e.config.clone();
            Some(e.hold.on_response(&config, kind, &result, now))
        });
        if let Some(step) = step {
            self.perform(host, ctx, step);
        }
    }

    /// Starts holding the request of HTTP context `ctx` (its body of
    /// `body_len` bytes is buffered) and carries out the hold's first step.
    pub fn start_hold(
        &self,
        host: &mut dyn Host,
        ctx: u32,
        config: &Rc<Config>,
        (hold, step): (Hold, HoldStep),
        body_len: usize,
        waits_for_review: Option<String>,
    ) {
        let entry = HoldEntry {
            hold,
            config: config.clone(),
            body_len,
            finished: false,
            released: None,
            waits_for_review,
            answered: None,
        };
        // An answer held after its request was: the request's entry is done.
        let replaced = self.with(|s| s.holds.insert(ctx, entry)).is_some();
        if !replaced {
            host.count("countersign_held", 1);
        }
        self.perform(host, ctx, step);
    }

    /// What the caller of `ctx` got instead of a held answer, once decided.
    pub fn answered(&self, ctx: u32) -> Option<AnswerRelease> {
        self.with(|s| s.holds.get(&ctx).and_then(|e| e.answered.clone()))
    }

    /// The release of `ctx`'s request, and when it happened, once released.
    pub fn released(&self, ctx: u32) -> Option<(Release, u64)> {
        self.with(|s| s.holds.get(&ctx).and_then(|e| e.released.clone()))
    }

    /// HTTP context `ctx` is gone. If its review was still open, the caller
    /// went away mid-review: the service is told, so reviewers do not decide
    /// on a request nobody waits for.
    pub fn end_stream(&self, host: &mut dyn Host, ctx: u32) {
        self.forget_calls_of(host, ctx);
        let Some((entry, tell)) = self.with(|s| {
            let entry = s.holds.remove(&ctx)?;
            let tell = entry
                .hold
                .review_id()
                .is_some_and(|review| s.watch.leave(review, ctx, !entry.finished));
            Some((entry, tell))
        }) else {
            return;
        };
        if tell {
            // From the root context (this one is ending).
            self.tick_within(host, 1);
        }
        host.count("countersign_held", -1);
        if entry.finished {
            return;
        }
        if let Some(call) = entry
            .hold
            .cancellable_review()
            .and_then(|id| cancel_callout(&entry.config, entry.hold.trace(), id))
        {
            self.deliver(host, &entry.config, call, true);
        }
    }

    /// `ctx` is gone: the calls it made from its own context are cancelled
    /// with it, unanswered, and an answer to any other call of its has no
    /// hold to go to. Its entries go, and the records waiting for its own
    /// record call (its caller went away) wait for it no more.
    fn forget_calls_of(&self, host: &mut dyn Host, ctx: u32) {
        let waiting = self.with(|s| {
            let State {
                callouts,
                record_calls,
                ..
            } = s;
            let before = record_calls.len();
            record_calls.retain(|token, in_root| {
                *in_root || callouts.get(token).is_none_or(|(c, _)| *c != ctx)
            });
            callouts.retain(|_, (c, _)| *c != ctx);
            record_calls.len() < before && record_calls.is_empty() && !s.batch.is_empty()
        });
        if waiting {
            self.tick_within(host, 1);
        }
    }

    /// Marks `ctx`'s hold finished and reads what the host calls after it
    /// need; the borrow ends on return, before any of those calls.
    fn finish<T>(&self, ctx: u32, read: impl FnOnce(&mut HoldEntry) -> T) -> Option<T> {
        self.with(|s| {
            let e = s.holds.get_mut(&ctx)?;
            e.finished = true;
            Some(read(e))
        })
    }

    /// Carries out one step of `ctx`'s hold.
    fn perform(&self, host: &mut dyn Host, ctx: u32, step: HoldStep) {
        let Some(config) = self.with(|s| s.holds.get(&ctx).map(|e| e.config.clone())) else {
            return;
        };
        let mut step = step;
        // A failed dispatch is fed back as "no response"; the hold machine
        // always ends such a chain in a retry or a refusal.
        for _ in 0..4 {
            match step {
                HoldStep::Call(call)
                    if call.kind == CalloutKind::Record && config.record_batch_ms > 0 =>
                {
                    return self.join_batch(host, ctx, &config, call);
                }
                HoldStep::Call(call) => match host.dispatch(&config.approval_cluster, &call) {
                    Ok(token) => {
                        self.with(|s| s.callouts.insert(token, (ctx, call.kind)));
                        return;
                    }
                    Err(why) => {
                        host.log(
                            Level::Warn,
                            &format!("countersign: call to the approval service failed: {why}"),
                        );
                        let no_answer = CalloutResult {
                            status: None,
                            body: Vec::new(),
                        };
                        let now = host.now_ms();
                        let next = self.with(|s| {
                            let e = s.holds.get_mut(&ctx)?;
                            Some(e.hold.on_response(&config, call.kind, &no_answer, now))
                        });
                        let Some(next) = next else { return };
                        step = next;
                    }
                },
                HoldStep::Watch {
                    review_id,
                    deadline_ms,
                } => {
                    let send = self.with(|s| {
                        s.watch_config = Some(config.clone());
                        s.watch.join(review_id, ctx, deadline_ms)
                    });
                    if send {
                        // From the root context, whose calls outlive any
                        // one request.
                        self.tick_within(host, 1);
                    }
                    return;
                }
                HoldStep::RetryAt(at) => {
                    self.with(|s| s.retries.push((at, ctx)));
                    return;
                }
                HoldStep::Release(release) => return self.release(host, ctx, release),
                HoldStep::Answer(release) => return self.release_answer(host, ctx, release),
                HoldStep::Respond(reply) => {
                    let accepted = reply.status == 202;
                    let record = self
                        .finish(ctx, |e| {
                            accepted.then(|| e.hold.accepted_record_call(&config))
                        })
                        .flatten()
                        .flatten();
                    if let Some(call) = record {
                        // Through the outbox, retried like a refusal's: the
                        // caller's answer does not wait for it. Not routine:
                        // it is the request's only record until its token is
                        // spent, so it must not be crowded out.
                        self.deliver(host, &config, call, false);
                    }
                    if host.set_effective_context(ctx).is_ok() {
                        if reply.status == 202 {
                            note_outcome(host, "pending");
                        }
                        let headers: Vec<(&str, &str)> = reply
                            .headers
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_str()))
                            .collect();
                        host.send_reply(reply.status, &headers, &reply.body);
                    }
                    return;
                }
                HoldStep::Refuse(refusal) => {
                    let record = self.finish(ctx, |e| {
                        let call = e.hold.refusal_record_call(&config, &refusal)?;
                        Some((call, e.hold.record_written()))
                    });
                    if let Some((call, completes_record)) = record.flatten() {
                        // Through the outbox, retried like any delivery: the
                        // refusal often comes from the approval service
                        // being down, so one attempt now would be lost, and
                        // where the pre-forward record was written before
                        // its answer was lost, or written before a token's
                        // spend was refused, this is what tells that
                        // record the request was never forwarded. Not
                        // routine then: it must not be crowded out.
                        let routine =
                            refusal.kind != RefusalKind::RecordUnavailable && !completes_record;
                        self.deliver(host, &config, call, routine);
                    }
                    if host.set_effective_context(ctx).is_ok() {
                        if refusal.kind != RefusalKind::NotFound {
                            note_outcome(host, refusal.kind.outcome());
                        }
                        host.log(
                            Level::Info,
                            &format!(
                                "countersign: review {} ended: {}",
                                refusal.review_id.as_deref().unwrap_or("-"),
                                refusal.kind.code()
                            ),
                        );
                        send_refusal(host, &refusal);
                    }
                    return;
                }
            }
        }
    }

    /// Adds `ctx`'s record (the body of `call`, a `POST /v1/records`) to the
    /// open batch. A record goes at once, alone, when no record call is in
    /// flight and no batch is open, so a lone request waits for nothing (and
    /// so does one of [`MAX_BATCH_BYTES`] or more).
    /// Otherwise it waits in the batch for the call in flight: under load
    /// the records that arrive during one commit travel together in the
    /// next. The root context sends the batch, when that call is answered
    /// or at the latest `record_batch_ms` after it opened; a full batch, at
    /// its next tick (a call made from a request's context would be
    /// cancelled with that request, and with it every other record in it).
    fn join_batch(&self, host: &mut dyn Host, ctx: u32, config: &Rc<Config>, call: Callout) {
        let Some(len) = call.body.as_ref().map(Vec::len) else {
            // Not encoded (never expected): this record alone fails.
            let no_answer = CalloutResult {
                status: None,
                body: Vec::new(),
            };
            return self.after_batch(host, vec![ctx], &no_answer);
        };
        // A record of a batch's size on its own goes alone too: joined to
        // others it could take the call past the service's body limit, and
        // fail them all with it.
        let alone = len >= MAX_BATCH_BYTES
            || self.with(|s| s.record_calls.is_empty() && s.batch.is_empty());
        if alone {
            // Its own record, from its own context: it waits for the answer.
            return self.send_records(host, config, vec![(ctx, call)], false);
        }
        let wait_ms = self.with(|s| {
            s.batch_bytes = s.batch_bytes.saturating_add(len);
            s.batch.push((ctx, call));
            s.batch_config.get_or_insert_with(|| config.clone());
            let full = s.batch.len() >= MAX_BATCH_RECORDS || s.batch_bytes >= MAX_BATCH_BYTES;
            match full || s.record_calls.is_empty() {
                true => 1,
                false => config.record_batch_ms,
            }
        });
        self.tick_within(host, wait_ms);
    }

    /// Makes the root context's timer fire within `ms` (it keeps a shorter
    /// period it already runs at).
    fn tick_within(&self, host: &mut dyn Host, ms: u64) {
        let arm = self.with(|s| {
            let arm = s.fast_tick.is_none_or(|period| ms < period);
            if arm {
                s.fast_tick = Some(ms);
            }
            arm
        });
        if arm {
            // Stop, then start at the new period: it counts from now.
            host.set_tick_period(0);
            host.set_tick_period(ms);
        }
    }

    /// Sends the open batch, if any, in one call; `in_root`: from the root
    /// context.
    fn send_batch(&self, host: &mut dyn Host, in_root: bool) {
        let Some((config, batch)) = self.with(|s| {
            let config = s.batch_config.take()?;
            s.batch_bytes = 0;
            Some((config, std::mem::take(&mut s.batch)))
        }) else {
            return;
        };
        self.send_records(host, &config, batch, in_root);
    }

    /// Sends `batch` in one call (a batch of one as its own record call).
    fn send_records(
        &self,
        host: &mut dyn Host,
        config: &Rc<Config>,
        batch: Vec<(u32, Callout)>,
        in_root: bool,
    ) {
        let ctxs: Vec<u32> = batch.iter().map(|(ctx, _)| *ctx).collect();
        let joined;
        let call = match batch.as_slice() {
            // A batch of one goes as its own `POST /v1/records`, which
            // carries the request's trace context (a batch's call cannot:
            // its records are of different requests), answered as if the
            // window were 0.
            [(_, call)] => call,
            _ => {
                let bodies: Vec<&[u8]> = batch
                    .iter()
                    .map(|(_, call)| call.body.as_deref().unwrap_or_default())
                    .collect();
                joined = record_batch_callout(config, &bodies);
                &joined
            }
        };
        match host.dispatch(&config.approval_cluster, call) {
            Ok(token) => self.with(|s| {
                if let [ctx] = ctxs[..] {
                    s.callouts.insert(token, (ctx, CalloutKind::Record));
                } else {
                    s.batches.insert(token, ctxs);
                }
                s.record_calls.insert(token, in_root);
            }),
            Err(why) => {
                host.log(
                    Level::Warn,
                    &format!("countersign: call to the approval service failed: {why}"),
                );
                let no_answer = CalloutResult {
                    status: None,
                    body: Vec::new(),
                };
                self.after_batch(host, ctxs, &no_answer);
            }
        }
    }

    /// Feeds each hold of a batch its record's result, as if its own
    /// `POST /v1/records` had been answered so: an answer that does not
    /// hold one result per record fails every record the way the call
    /// failed (no answer, or its status).
    fn after_batch(&self, host: &mut dyn Host, ctxs: Vec<u32>, result: &CalloutResult) {
        let results = per_record_results(result, ctxs.len());
        let now = host.now_ms();
        for (ctx, result) in ctxs.into_iter().zip(results) {
            let step = self.with(|s| {
                let e = s.holds.get_mut(&ctx)?;
                let config = e.config.clone();
                Some(
                    e.hold
                        .on_response(&config, CalloutKind::Record, &result, now),
                )
            });
            if let Some(step) = step {
                self.perform(host, ctx, step);
            }
        }
    }

    /// Lets a held request go to the model, with the masked or edited body.
    fn release(&self, host: &mut dyn Host, ctx: u32, release: Release) {
        let Some(body_len) = self.finish(ctx, |e| e.body_len) else {
            return;
        };
        if host.set_effective_context(ctx).is_err() {
            return;
        }
        if let Some(body) = &release.edited_body {
            if host.set_request_body(body_len, body).is_err() {
                let r = Refusal::new(
                    RefusalKind::ApprovalUnavailable,
                    None,
                    "could not apply the reviewer's edit",
                );
                // The request's record is written (it said `approved`):
                // the refusal, keyed to it, becomes its outcome, as for any
                // refusal after the record, and must not be crowded out.
                let record = self.with(|s| {
                    let e = s.holds.get(&ctx)?;
                    Some((e.config.clone(), e.hold.refusal_record_call(&e.config, &r)?))
                });
                if let Some((config, call)) = record {
                    self.deliver(host, &config, call, false);
                }
                send_refusal(host, &r);
                return;
            }
        }
        // A release after a review is worth a line; a request an `allow`
        // rule forwarded once its record was written is not (the access
        // log has its decision), and a log line per request is a host call
        // and a write.
        if let Some(review_id) = &release.review_id {
            host.log(
                Level::Info,
                &format!(
                    "countersign: {} {} (review {review_id}, reviewer {})",
                    release.decision,
                    if release.edited_body.is_some() {
                        "with a replaced body"
                    } else {
                        "as sent"
                    },
                    release.reviewer.as_deref().unwrap_or("-"),
                ),
            );
        }
        note_outcome(host, release.decision);
        let now = host.now_ms();
        self.with(|s| {
            if let Some(e) = s.holds.get_mut(&ctx) {
                e.released = Some((release, now));
            }
        });
        host.resume_request();
    }
}

impl Worker {
    /// Lets a held answer go on to the caller as the decision made it: the
    /// buffered body (of the entry's `body_len`) replaced, the status and
    /// headers set where it became an error.
    fn release_answer(&self, host: &mut dyn Host, ctx: u32, release: AnswerRelease) {
        let Some((body_len, streamed)) = self.finish(ctx, |e| {
            e.answered = Some(release.clone());
            (e.body_len, e.hold.holds_stream())
        }) else {
            return;
        };
        if host.set_effective_context(ctx).is_err() {
            return;
        }
        // A held stream's head went out before its first tool call: the
        // decision is in its events (and the record), not in headers.
        if !streamed {
            if let Some(status) = release.status {
                host.set_response_header(":status", Some(&status.to_string()));
            }
            for (name, value) in &release.headers {
                host.set_response_header(name, Some(value));
            }
            host.set_response_header("x-countersign-answer-outcome", Some(release.decision));
            if !release.review_id.is_empty() {
                host.set_response_header(
                    "x-countersign-answer-review-id",
                    Some(&release.review_id),
                );
            }
        }
        host.set_response_body(body_len, &release.body);
        host.count(
            &format!("countersign_answers_{}_total", release.decision),
            1,
        );
        host.log(
            Level::Info,
            &format!(
                "countersign: answer review {} ended: {}",
                release.review_id, release.decision
            ),
        );
        host.resume_response();
    }
}

/// Each record's result in the answer to a batch of `n`, as the answer to
/// its own call would have been: an answer that does not hold one result
/// per record fails every record the way the call failed (no answer, or
/// its status; a 2xx not understood counts as no answer).
fn per_record_results(result: &CalloutResult, n: usize) -> Vec<CalloutResult> {
    let parsed = match result.status {
        Some(200..=299) => serde_json::from_slice::<RecordBatchResults>(&result.body)
            .ok()
            .filter(|r| r.results.len() == n),
        _ => None,
    };
    let Some(parsed) = parsed else {
        let failed = CalloutResult {
            status: result.status.filter(|s| !(200..=299).contains(s)),
            body: result.body.clone(),
        };
        return vec![failed; n];
    };
    parsed
        .results
        .into_iter()
        .map(|r| CalloutResult {
            status: Some(r.status),
            body: match r.record_id {
                Some(record_id) => {
                    serde_json::to_vec(&RecordCreated { record_id }).unwrap_or_default()
                }
                None => r.error.unwrap_or_default().into_bytes(),
            },
        })
        .collect()
}

/// The record id of a response part's call (`POST /v1/records/{id}/response`),
/// `None` for any other call.
fn response_part_of(call: &Callout) -> Option<&str> {
    if call.kind != CalloutKind::Record {
        return None;
    }
    let path = call.headers.iter().find(|(k, _)| k == ":path")?.1.as_str();
    path.strip_prefix("/v1/records/")?.strip_suffix("/response")
}

/// Deliveries with their configuration.
type Due = Vec<(Rc<Config>, Delivery)>;

/// Splits due deliveries into batches of response parts (two or more of
/// one configuration with `record_batch_ms` above 0, up to
/// [`MAX_BATCH_RECORDS`] and [`MAX_BATCH_BYTES`] each) and the calls sent
/// on their own.
fn response_batches(due: Due) -> (Vec<Due>, Due) {
    let mut batches: Vec<Due> = Vec::new();
    let mut single = Vec::new();
    let mut bytes = 0;
    for (config, delivery) in due {
        let batchable = config.record_batch_ms > 0
            && delivery.call.body.is_some()
            && response_part_of(&delivery.call).is_some();
        if !batchable {
            single.push((config, delivery));
            continue;
        }
        let joins = batches.last().is_some_and(|b| {
            b.len() < MAX_BATCH_RECORDS
                && bytes + delivery.size() <= MAX_BATCH_BYTES
                && b.first().is_some_and(|(c, _)| Rc::ptr_eq(c, &config))
        });
        if !joins {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += delivery.size();
        if let Some(b) = batches.last_mut() {
            b.push((config, delivery));
        }
    }
    // A batch of one goes on its own, as before.
    let (batches, ones): (Vec<Due>, Vec<Due>) = batches.into_iter().partition(|b| b.len() > 1);
    single.extend(ones.into_iter().flatten());
    (batches, single)
}

/// The request id of an audit's review creation (its body, a
/// [`crate::wire::CreateReview`]), for the log; `?` when unreadable.
fn audited_request(call: &Callout) -> String {
    #[derive(serde::Deserialize)]
    struct Audited {
        request_id: String,
    }
    call.body
        .as_deref()
        .and_then(|b| serde_json::from_slice::<Audited>(b).ok())
        .map_or_else(|| "?".to_string(), |a| a.request_id)
}

/// Answers the current stream with `refusal`, in its API's format.
pub fn send_refusal(host: &mut dyn Host, refusal: &Refusal) {
    let headers = refusal.headers();
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    host.send_reply(refusal.status(), &headers, &refusal.body());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::delivery::{MAX_QUEUED, MAX_QUEUED_BYTES};
    use crate::host::Action;
    use crate::stream_filter::StreamFilter;
    use crate::testing::MockHost;

    const CHAT: &str = "/v1/chat/completions";
    const BODY: &[u8] = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    const PENDING: &str = r#"{"id":"rev_1","status":"pending","expires_at_ms":0}"#;

    fn config(json: &str) -> Rc<Config> {
        Rc::new(Config::from_json(json.as_bytes()).unwrap())
    }

    fn call(path: &str, body_len: usize) -> Callout {
        Callout {
            kind: CalloutKind::Record,
            headers: vec![(":path".into(), path.into())],
            body: Some(vec![b'x'; body_len]),
            timeout_ms: 1_000,
        }
    }

    fn answer(host: &mut MockHost, worker: &Worker, token: u32, status: Option<u16>, body: &str) {
        host.answer = Some(CalloutResult {
            status,
            body: body.as_bytes().to_vec(),
        });
        host.effective = None;
        worker.on_callout_response(host, token, body.len());
    }

    #[test]
    fn the_outbox_admits_within_bounds_and_keeps_half_for_responses() {
        let c = config("{}");
        let worker = Worker::new();
        let mut host = MockHost::new(&worker);
        for _ in 0..MAX_QUEUED / 2 {
            worker.deliver(&mut host, &c, call("/v1/records", 1), true);
        }
        assert_eq!(worker.queued(), (MAX_QUEUED / 2, MAX_QUEUED / 2));
        // Routine calls (refusal records, cancellations) are full...
        worker.deliver(&mut host, &c, call("/v1/records", 1), true);
        assert_eq!(host.metric("countersign_deliveries_dropped_total"), 1);
        assert!(host
            .logs
            .iter()
            .any(|(l, m)| *l == Level::Warn && m.contains("queue full")));
        // ...response parts still get in, up to the byte bound.
        worker.deliver(&mut host, &c, call("/v1/records/rec_1/response", 1), false);
        assert_eq!(worker.queued().0, MAX_QUEUED / 2 + 1);
        worker.deliver(
            &mut host,
            &c,
            call("/v1/records/rec_1/response", MAX_QUEUED_BYTES),
            false,
        );
        assert_eq!(host.metric("countersign_deliveries_dropped_total"), 2);
        assert_eq!(host.violations.get(), 0);
    }

    #[test]
    fn deliveries_are_retried_with_backoff_then_given_up() {
        let c = config("{}");
        let worker = Worker::new();
        let mut host = MockHost::new(&worker);
        worker.deliver(&mut host, &c, call("/v1/records/rec_1/response", 10), false);
        assert!(host.dispatched.is_empty());
        let start = host.now;
        let mut sent_at = Vec::new();
        for step in 0..500 {
            host.now = start + step * 250;
            let before = host.dispatched.len();
            worker.on_tick(&mut host);
            if host.dispatched.len() > before {
                sent_at.push(host.now - start);
                let token = host.last_token();
                answer(&mut host, &worker, token, Some(503), "");
            }
        }
        // Sent at once, then after 250 ms, doubling up to 30 s, ten times
        // in all; then given up.
        assert_eq!(
            sent_at,
            [0, 250, 750, 1_750, 3_750, 7_750, 15_750, 31_750, 61_750, 91_750]
        );
        assert_eq!(host.metric("countersign_delivery_retries_total"), 9);
        assert_eq!(host.metric("countersign_deliveries_failed_total"), 1);
        assert_eq!(worker.queued(), (0, 0));
        assert!(host
            .logs
            .iter()
            .any(|(_, m)| m.contains("gave up on POST /v1/records/rec_1/response")));
    }

    /// An audit's review creation the outbox gives up on (a 4xx at once,
    /// or after its attempts) is counted apart and logged with its request:
    /// that request went to the model and nobody will review it.
    #[test]
    fn a_lost_audit_is_counted_and_names_its_request() {
        let c = config("{}");
        for status in [Some(400), Some(503)] {
            let worker = Worker::new();
            let mut host = MockHost::new(&worker);
            let audit = Callout {
                kind: CalloutKind::Create,
                headers: vec![(":path".into(), "/v1/reviews".into())],
                body: Some(br#"{"request_id":"req-audited","mode":"audit"}"#.to_vec()),
                timeout_ms: 1_000,
            };
            assert!(worker.deliver(&mut host, &c, audit, false));
            for step in 0..500 {
                host.now += 250;
                let before = host.dispatched.len();
                worker.on_tick(&mut host);
                if host.dispatched.len() > before {
                    let token = host.last_token();
                    answer(&mut host, &worker, token, status, "");
                }
                if worker.queued().0 == 0 {
                    assert!(status == Some(503) || step == 0, "{status:?}");
                    break;
                }
            }
            assert_eq!(worker.queued(), (0, 0));
            assert_eq!(host.metric("countersign_deliveries_failed_total"), 1);
            assert_eq!(host.metric("countersign_spot_checks_lost_total"), 1);
            assert!(host.logs.iter().any(|(l, m)| *l == Level::Warn
                && m.contains("audit of forwarded request req-audited was never filed")));
        }
        // Other deliveries given up are not lost audits.
        let worker = Worker::new();
        let mut host = MockHost::new(&worker);
        worker.deliver(&mut host, &c, call("/v1/records/rec_1/response", 1), false);
        worker.on_tick(&mut host);
        let token = host.last_token();
        answer(&mut host, &worker, token, Some(400), "");
        assert_eq!(host.metric("countersign_deliveries_failed_total"), 1);
        assert_eq!(host.metric("countersign_spot_checks_lost_total"), 0);
    }

    #[test]
    fn a_delivery_that_cannot_be_sent_counts_as_no_answer() {
        let c = config("{}");
        let worker = Worker::new();
        let mut host = MockHost::new(&worker);
        worker.deliver(&mut host, &c, call("/v1/reviews/rev_1/cancel", 0), true);
        host.dispatch_fails = true;
        worker.on_tick(&mut host);
        assert_eq!(host.metric("countersign_delivery_retries_total"), 1);
        host.dispatch_fails = false;
        host.now += 250;
        worker.on_tick(&mut host);
        let token = host.last_token();
        answer(&mut host, &worker, token, Some(200), "");
        assert_eq!(worker.queued(), (0, 0));
        assert_eq!(host.metric("countersign_deliveries_failed_total"), 0);
    }

    fn held_stream(worker: &Worker, host: &mut MockHost, c: &Rc<Config>, id: u32) -> StreamFilter {
        let mut s = StreamFilter::new(id, Some(c.clone()), worker.clone());
        host.request("POST", CHAT, BODY);
        host.effective = None;
        assert_eq!(s.on_request_headers(host, false), Action::Continue);
        assert_eq!(s.on_request_body(host, BODY.len(), true), Action::Pause);
        s
    }

    #[test]
    fn a_stream_that_goes_away_leaves_no_call_behind() {
        let c = config(r#"{"records":"off"}"#);
        let worker = Worker::new();
        let mut host = MockHost::new(&worker);
        let mut a = held_stream(&worker, &mut host, &c, 7);
        let _b = held_stream(&worker, &mut host, &c, 8);
        assert_eq!(worker.outstanding_callouts(), 2);
        // A's caller goes away while its review is being created: Envoy
        // cancels the call A made, and no answer will ever come for it.
        a.on_drop(&mut host);
        assert_eq!(worker.outstanding_callouts(), 1);
        assert_eq!(worker.held(), 1);
    }

    fn created(id: &str) -> String {
        format!(r#"{{"id":"{id}","status":"pending","expires_at_ms":0}}"#)
    }

    /// The body of the call dispatched as `token`.
    fn body_of(host: &MockHost, token: u32) -> serde_json::Value {
        let (_, call) = host.dispatched.iter().find(|(t, _)| *t == token).unwrap();
        serde_json::from_slice(call.body.as_deref().unwrap()).unwrap()
    }

    #[test]
    fn one_watch_serves_every_hold_and_each_decision_goes_to_its_hold() {
        let c = config(r#"{"records":"off"}"#);
        let worker = Worker::new();
        let mut host = MockHost::new(&worker);
        let _a = held_stream(&worker, &mut host, &c, 7);
        let create_a = host.last_token();
        let _b = held_stream(&worker, &mut host, &c, 8);
        let create_b = host.last_token();
        assert_eq!(worker.held(), 2);
        assert_eq!(worker.outstanding_callouts(), 2);
        // Both reviews name this worker's watcher.
        let watcher = body_of(&host, create_a)["watcher"].clone();
        assert_eq!(body_of(&host, create_b)["watcher"], watcher);
        assert!(crate::wire::valid_watcher_id(watcher.as_str().unwrap()));
        // An unknown token changes nothing.
        answer(&mut host, &worker, 9_999, Some(200), PENDING);
        assert_eq!(worker.outstanding_callouts(), 2);
        // B's review is created: the root context's timer sends the watch.
        answer(&mut host, &worker, create_b, Some(201), &created("rev_b"));
        assert_eq!(host.tick_periods.last(), Some(&1));
        worker.on_tick(&mut host);
        let watch = worker.watch_in_flight().unwrap();
        assert_eq!(
            body_of(&host, watch),
            serde_json::json!({"watcher": watcher, "after": 0, "check": ["rev_b"], "timeout_ms": 25000})
        );
        // A's review is created while the watch waits: no second watch.
        answer(&mut host, &worker, create_a, Some(201), &created("rev_a"));
        worker.on_tick(&mut host);
        assert_eq!(worker.watch_in_flight(), Some(watch));
        assert_eq!(worker.watched(), 2);
        // B is approved: its stream goes on, and the next watch checks A.
        let approved = r#"{"id":"rev_b","status":"approved","expires_at_ms":0}"#;
        let body = format!(r#"{{"epoch":"e1","next":1,"states":[{approved}]}}"#);
        answer(&mut host, &worker, watch, Some(200), &body);
        assert_eq!(host.resumed, [Some(8)]);
        let next = worker.watch_in_flight().unwrap();
        assert_ne!(next, watch);
        assert_eq!(
            body_of(&host, next),
            serde_json::json!({"watcher": watcher, "epoch": "e1", "after": 1, "check": ["rev_a"], "timeout_ms": 25000})
        );
        let rejected = r#"{"id":"rev_a","status":"rejected","expires_at_ms":0}"#;
        let body = format!(r#"{{"epoch":"e1","next":2,"states":[{rejected}]}}"#);
        answer(&mut host, &worker, next, Some(200), &body);
        assert_eq!(host.resumed, [Some(8)]);
        assert_eq!(host.replies.len(), 1);
        assert_eq!(host.replies[0].context, Some(7));
        assert_eq!(host.replies[0].status, 403);
        // Nothing is waited for any more: no watch.
        assert_eq!(worker.watch_in_flight(), None);
        let watches = host.paths().iter().filter(|p| *p == "/v1/watch").count();
        assert_eq!(watches, 2);
        assert_eq!(host.violations.get(), 0);
    }

    #[test]
    fn a_failed_watch_is_retried_from_the_root_timer() {
        let c = config(r#"{"records":"off"}"#);
        let worker = Worker::new();
        let mut host = MockHost::new(&worker);
        let _s = held_stream(&worker, &mut host, &c, 7);
        let token = host.last_token();
        answer(&mut host, &worker, token, Some(201), &created("rev_1"));
        worker.on_tick(&mut host);
        let token = worker.watch_in_flight().unwrap();
        // The service is restarting: no answer to the watch.
        answer(&mut host, &worker, token, None, "");
        assert_eq!(host.metric("countersign_watch_failures_total"), 1);
        let polls = host.dispatched.len();
        worker.on_tick(&mut host);
        assert_eq!(host.dispatched.len(), polls, "not due yet");
        host.now += 2_000;
        worker.on_tick(&mut host);
        assert_eq!(host.dispatched.len(), polls + 1);
        assert_eq!(host.last_path(), "/v1/watch");
        // The review is read again: the lost answer may have carried it.
        assert_eq!(
            body_of(&host, host.last_token())["check"],
            serde_json::json!(["rev_1"])
        );
        // The retry's answer comes back to the root context, which resumes
        // the stream through its context id.
        let token = host.last_token();
        let body = r#"{"epoch":"e2","next":1,"states":[{"id":"rev_1","status":"approved","expires_at_ms":0}]}"#;
        answer(&mut host, &worker, token, Some(200), body);
        assert_eq!(host.resumed, [Some(7)]);
        assert_eq!(host.violations.get(), 0);
    }

    #[test]
    fn a_hold_whose_time_is_up_leaves_the_watch_and_expires_its_review() {
        let c = config(r#"{"records":"off","hold_timeout_ms":5000}"#);
        let worker = Worker::new();
        let mut host = MockHost::new(&worker);
        let _s = held_stream(&worker, &mut host, &c, 7);
        let token = host.last_token();
        answer(&mut host, &worker, token, Some(201), &created("rev_1"));
        worker.on_tick(&mut host);
        assert_eq!(worker.watched(), 1);
        host.now += 5_000;
        worker.on_tick(&mut host);
        assert_eq!(worker.watched(), 0);
        assert_eq!(host.last_path(), "/v1/reviews/rev_1/expire");
        let expired = r#"{"id":"rev_1","status":"expired","expires_at_ms":0}"#;
        let token = host.last_token();
        answer(&mut host, &worker, token, Some(200), expired);
        assert_eq!(host.replies[0].status, 504);
        assert_eq!(host.violations.get(), 0);
    }

    #[test]
    fn a_dispatch_that_fails_at_once_is_retried_then_refused() {
        let c = config(r#"{"records":"off"}"#);
        let worker = Worker::new();
        let mut host = MockHost::new(&worker);
        host.dispatch_fails = true;
        let _s = held_stream(&worker, &mut host, &c, 7);
        // Review creation is retried a bounded number of times, then the
        // request is refused (fail closed).
        for _ in 0..10 {
            host.now += 5_000;
            worker.on_tick(&mut host);
        }
        assert_eq!(host.replies.len(), 1);
        assert_eq!(host.replies[0].status, 503);
        assert_eq!(host.replies[0].context, Some(7));
        assert_eq!(host.metric("countersign_requests_unavailable_total"), 1);
    }

    #[test]
    fn a_refused_holds_record_survives_an_approval_service_outage() {
        let c = config(r#"{"records":"required"}"#);
        let worker = Worker::new();
        let mut host = MockHost::new(&worker);
        let _s = held_stream(&worker, &mut host, &c, 7);
        // The service is down: creation is retried, then the request refused.
        for _ in 0..10 {
            let token = host.last_token();
            answer(&mut host, &worker, token, None, "");
            host.now += 5_000;
            worker.on_tick(&mut host);
            if !host.replies.is_empty() {
                break;
            }
        }
        assert_eq!(host.replies.len(), 1);
        assert_eq!(host.replies[0].status, 503);
        // Its record went out from the outbox in the same tick...
        assert_eq!(worker.queued().0, 1);
        assert_eq!(host.last_path(), "/v1/records");
        let mut attempts = 1;
        let token = host.last_token();
        answer(&mut host, &worker, token, None, "");
        // ...and, the service still down, is sent again until it is back.
        for _ in 0..20 {
            host.now += 1_000;
            let before = host.dispatched.len();
            worker.on_tick(&mut host);
            if host.dispatched.len() > before {
                attempts += 1;
                assert_eq!(host.last_path(), "/v1/records");
                let token = host.last_token();
                let status = if attempts < 3 { None } else { Some(201) };
                answer(&mut host, &worker, token, status, "{}");
            }
        }
        assert_eq!(attempts, 3);
        assert_eq!(worker.queued(), (0, 0));
        assert_eq!(host.metric("countersign_deliveries_failed_total"), 0);
        assert_eq!(host.violations.get(), 0);
    }

    /// Two allowed requests (contexts 7 and 8) whose records wait in the
    /// open batch of a worker with a 1 ms window, behind the record of
    /// context 6, whose call is in flight (and stays unanswered).
    fn two_in_a_batch(extra: &str) -> (Worker, MockHost, Vec<StreamFilter>) {
        let c = config(&format!(r#"{{"default_action":"allow"{extra}}}"#));
        let worker = Worker::new();
        let mut host = MockHost::new(&worker);
        // Each request gets its own idempotency key (from its nonce).
        host.nonce = Some(3);
        let first = held_stream(&worker, &mut host, &c, 6);
        // Nothing in flight: the first record goes at once, alone.
        assert_eq!(host.paths(), ["/v1/records"]);
        assert!(host.tick_periods.is_empty());
        host.nonce = Some(1);
        let a = held_stream(&worker, &mut host, &c, 7);
        host.nonce = Some(2);
        let streams = vec![first, a, held_stream(&worker, &mut host, &c, 8)];
        // The others wait for it; the timer runs at the window.
        assert_eq!(host.paths(), ["/v1/records"]);
        assert_eq!(worker.batched(), 2);
        let window = c.record_batch_ms;
        assert_eq!(host.tick_periods, [0, window]);
        (worker, host, streams)
    }

    fn batch_body(host: &MockHost) -> serde_json::Value {
        let (_, call) = host.dispatched.last().unwrap();
        serde_json::from_slice(call.body.as_deref().unwrap()).unwrap()
    }

    #[test]
    fn records_of_two_streams_travel_in_one_call() {
        let (worker, mut host, _streams) = two_in_a_batch("");
        worker.on_tick(&mut host);
        assert_eq!(host.paths(), ["/v1/records", "/v1/records/batch"]);
        let body = batch_body(&host);
        let records = body["records"].as_array().unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0]["decision"], "allowed");
        assert_ne!(records[0]["idempotency_key"], records[1]["idempotency_key"]);
        // Nobody is forwarded before the batch is durable.
        assert!(host.resumed.is_empty());
        let token = host.last_token();
        let results = r#"{"results":[{"status":201,"record_id":"rec_7"},{"status":201,"record_id":"rec_8"}]}"#;
        answer(&mut host, &worker, token, Some(200), results);
        assert_eq!(host.resumed, [Some(7), Some(8)]);
        assert_eq!(
            worker.released(7).unwrap().0.record_id.as_deref(),
            Some("rec_7")
        );
        assert_eq!(
            worker.released(8).unwrap().0.record_id.as_deref(),
            Some("rec_8")
        );
        // The next tick finds no batch open: the timer slows down again.
        worker.on_tick(&mut host);
        assert_eq!(host.tick_periods, [0, 1, TICK_MS]);
        assert_eq!(host.violations.get(), 0);
    }

    #[test]
    fn a_failed_batch_refuses_each_request_as_a_failed_record_does() {
        let (worker, mut host, _streams) = two_in_a_batch("");
        // The service is down: each record is tried again (in one batch
        // again), then each request is refused, never forwarded.
        for _ in 0..10 {
            let before = host.dispatched.len();
            worker.on_tick(&mut host);
            if host.dispatched.len() > before {
                let token = host.last_token();
                answer(&mut host, &worker, token, Some(503), "{}");
            }
            host.now += 5_000;
        }
        assert!(host.resumed.is_empty());
        assert_eq!(host.replies.len(), 2);
        for (reply, ctx) in host.replies.iter().zip([7, 8]) {
            assert_eq!(reply.context, Some(ctx));
            assert_eq!(reply.status, 503);
            assert!(
                String::from_utf8_lossy(&reply.body).contains("audit record could not be written")
            );
        }
        let batches = host
            .paths()
            .iter()
            .filter(|p| *p == "/v1/records/batch")
            .count();
        assert!(batches > 1, "{:?}", host.paths());
        assert_eq!(host.violations.get(), 0);
    }

    #[test]
    fn an_answer_without_a_result_per_record_fails_the_batch() {
        let (worker, mut host, _streams) = two_in_a_batch(r#","records":"best_effort""#);
        for _ in 0..10 {
            worker.on_tick(&mut host);
            let token = host.last_token();
            answer(
                &mut host,
                &worker,
                token,
                Some(200),
                r#"{"results":[{"status":201,"record_id":"rec_7"}]}"#,
            );
            host.now += 5_000;
        }
        // best_effort: forwarded without a record once the tries are over.
        assert_eq!(host.resumed, [Some(7), Some(8)]);
        assert_eq!(worker.released(7).unwrap().0.record_id, None);
    }

    #[test]
    fn each_record_of_a_batch_gets_its_own_result() {
        let (worker, mut host, _streams) = two_in_a_batch("");
        worker.on_tick(&mut host);
        let first = batch_body(&host);
        let token = host.last_token();
        // 7 is written; 8's write failed on its own and is tried again, with
        // the same idempotency key (a retry returns the record written).
        let results =
            r#"{"results":[{"status":201,"record_id":"rec_7"},{"status":503,"error":"x"}]}"#;
        answer(&mut host, &worker, token, Some(200), results);
        assert_eq!(host.resumed, [Some(7)]);
        host.now += 5_000;
        worker.on_tick(&mut host);
        worker.on_tick(&mut host);
        // Alone now: its own `POST /v1/records`, the same record.
        assert_eq!(host.last_path(), "/v1/records");
        assert_eq!(batch_body(&host), first["records"][1]);
        let token = host.last_token();
        answer(
            &mut host,
            &worker,
            token,
            Some(201),
            r#"{"record_id":"rec_8"}"#,
        );
        assert_eq!(host.resumed, [Some(7), Some(8)]);
        assert_eq!(
            worker.released(8).unwrap().0.record_id.as_deref(),
            Some("rec_8")
        );
    }

    #[test]
    fn a_window_of_zero_sends_each_record_at_once() {
        let c = config(r#"{"default_action":"allow","record_batch_ms":0}"#);
        let worker = Worker::new();
        let mut host = MockHost::new(&worker);
        let _s = held_stream(&worker, &mut host, &c, 7);
        assert_eq!(host.paths(), ["/v1/records"]);
        assert!(host.tick_periods.is_empty());
    }

    #[test]
    fn a_full_batch_goes_at_the_next_tick() {
        let c = config(r#"{"default_action":"allow","record_batch_ms":50}"#);
        let worker = Worker::new();
        let mut host = MockHost::new(&worker);
        // The first goes alone; the next MAX_BATCH_RECORDS wait behind it
        // until the batch is full, which the root context sends within 1 ms
        // rather than the window.
        let ids: Vec<u32> = (1..=u32::try_from(MAX_BATCH_RECORDS + 1).unwrap()).collect();
        let _s: Vec<StreamFilter> = ids
            .iter()
            .map(|id| held_stream(&worker, &mut host, &c, *id))
            .collect();
        assert_eq!(host.paths(), ["/v1/records"]);
        assert_eq!(worker.batched(), MAX_BATCH_RECORDS);
        assert_eq!(host.tick_periods, [0, 50, 0, 1]);
        worker.on_tick(&mut host);
        assert_eq!(host.paths(), ["/v1/records", "/v1/records/batch"]);
        assert_eq!(
            batch_body(&host)["records"].as_array().unwrap().len(),
            MAX_BATCH_RECORDS
        );
    }

    #[test]
    fn a_record_of_a_batch_size_goes_alone_at_once() {
        let (worker, mut host, _streams) = two_in_a_batch("");
        let c = config(r#"{"default_action":"allow"}"#);
        let text = "x".repeat(MAX_BATCH_BYTES);
        let big = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{text}"}}]}}"#);
        let mut s = StreamFilter::new(9, Some(c), worker.clone());
        host.request("POST", CHAT, big.as_bytes());
        host.effective = None;
        assert_eq!(s.on_request_headers(&mut host, false), Action::Continue);
        assert_eq!(s.on_request_body(&mut host, big.len(), true), Action::Pause);
        // Not in the open batch, where it could take the call past the
        // service's body limit: its own call, now.
        assert_eq!(worker.batched(), 2);
        assert_eq!(host.paths(), ["/v1/records", "/v1/records"]);
        assert!(host.dispatched[1].1.body.as_ref().unwrap().len() > MAX_BATCH_BYTES);
    }

    #[test]
    fn records_that_waited_for_a_call_go_when_it_is_answered() {
        let (worker, mut host, _streams) = two_in_a_batch(r#","record_batch_ms":50"#);
        let token = host.dispatched[0].0;
        answer(
            &mut host,
            &worker,
            token,
            Some(201),
            r#"{"record_id":"rec_6"}"#,
        );
        assert_eq!(host.resumed, [Some(6)]);
        // 6's call was made from 6's context, where its answer came back:
        // the records that waited go from the root context, within 1 ms
        // instead of the 50 ms window.
        assert_eq!(worker.batched(), 2);
        assert_eq!(host.tick_periods, [0, 50, 0, 1]);
        worker.on_tick(&mut host);
        assert_eq!(host.paths(), ["/v1/records", "/v1/records/batch"]);
        assert_eq!(batch_body(&host)["records"].as_array().unwrap().len(), 2);
        // While that batch is in flight, a new record waits again...
        let c = config(r#"{"default_action":"allow","record_batch_ms":50}"#);
        let _late = held_stream(&worker, &mut host, &c, 9);
        assert_eq!(host.paths().len(), 2);
        assert_eq!(worker.batched(), 1);
        // ...and goes (alone: its own call) as soon as the batch, sent from
        // the root context, is answered there.
        let token = host.last_token();
        let results = r#"{"results":[{"status":201,"record_id":"rec_7"},{"status":201,"record_id":"rec_8"}]}"#;
        answer(&mut host, &worker, token, Some(200), results);
        assert_eq!(host.resumed, [Some(6), Some(7), Some(8)]);
        assert_eq!(host.last_path(), "/v1/records");
        assert_eq!(worker.batched(), 0);
        assert_eq!(host.violations.get(), 0);
    }

    #[test]
    fn records_do_not_wait_for_the_call_of_a_request_that_went_away() {
        let (worker, mut host, mut streams) = two_in_a_batch(r#","record_batch_ms":50"#);
        // 6's caller goes away: Envoy cancels the call 6 made from its own
        // context, and no answer will come. The others go at the next tick.
        streams[0].on_drop(&mut host);
        assert_eq!(host.tick_periods, [0, 50, 0, 1]);
        worker.on_tick(&mut host);
        assert_eq!(host.paths(), ["/v1/records", "/v1/records/batch"]);
        // And nothing waits for that call any more: the next lone record,
        // once the batch is answered, goes at once.
        let token = host.last_token();
        let results = r#"{"results":[{"status":201,"record_id":"rec_7"},{"status":201,"record_id":"rec_8"}]}"#;
        answer(&mut host, &worker, token, Some(200), results);
        assert_eq!(host.resumed, [Some(7), Some(8)]);
        let c = config(r#"{"default_action":"allow","record_batch_ms":50}"#);
        let _next = held_stream(&worker, &mut host, &c, 9);
        assert_eq!(host.paths().len(), 3);
        assert_eq!(host.last_path(), "/v1/records");
    }

    /// The model answers `s` (an empty JSON body) and the stream ends.
    fn answered(host: &mut MockHost, s: &mut StreamFilter) {
        host.response_headers = [(":status", "200"), ("content-type", "application/json")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        host.effective = None;
        s.on_response_headers(host, false);
        host.response_chunk = b"{}".to_vec();
        s.on_response_body(host, 2, true);
        s.on_log(host);
        s.on_drop(host);
    }

    /// Two forwarded streams (7 and 8) answered, and the tick that sends
    /// their response parts.
    fn two_response_parts_sent() -> (Worker, MockHost) {
        let c = config(r#"{"default_action":"allow"}"#);
        let worker = Worker::new();
        let mut host = MockHost::new(&worker);
        let body = (CHAT, BODY);
        let mut a = crate::testing::forwarded_on(&mut host, &worker, &c, 7, body);
        let mut b = crate::testing::forwarded_on(&mut host, &worker, &c, 8, body);
        for s in [&mut a, &mut b] {
            answered(&mut host, s);
        }
        worker.on_tick(&mut host);
        (worker, host)
    }

    #[test]
    fn response_parts_due_together_travel_in_one_call() {
        let (worker, mut host) = two_response_parts_sent();
        assert_eq!(host.last_path(), "/v1/records/responses");
        let sent = batch_body(&host);
        let parts = sent["responses"].as_array().unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0]["record_id"], "rec_1");
        assert!(parts[0]["response"]["completion"].is_string(), "{sent}");
        assert_eq!(worker.queued().0, 2);
        // The first landed; the second was already written (409, done);
        let token = host.last_token();
        let results =
            r#"{"results":[{"status":201,"record_id":"rec_9"},{"status":409,"error":"x"}]}"#;
        answer(&mut host, &worker, token, Some(200), results);
        assert_eq!(worker.queued(), (0, 0));
        assert_eq!(host.metric("countersign_delivery_retries_total"), 0);
        assert_eq!(host.violations.get(), 0);
    }

    #[test]
    fn a_response_part_whose_batch_failed_is_retried() {
        let (worker, mut host) = two_response_parts_sent();
        let token = host.last_token();
        // One failed on its own: only it is sent again, alone.
        let results =
            r#"{"results":[{"status":201,"record_id":"rec_9"},{"status":503,"error":"x"}]}"#;
        answer(&mut host, &worker, token, Some(200), results);
        assert_eq!(worker.queued().0, 1);
        host.now += 250;
        worker.on_tick(&mut host);
        assert_eq!(host.last_path(), "/v1/records/rec_1/response");
        let token = host.last_token();
        answer(&mut host, &worker, token, None, "");
        assert_eq!(worker.queued().0, 1);
        host.now += 500;
        worker.on_tick(&mut host);
        let token = host.last_token();
        answer(&mut host, &worker, token, Some(201), "{}");
        assert_eq!(worker.queued(), (0, 0));
        assert_eq!(host.metric("countersign_delivery_retries_total"), 2);
    }

    #[test]
    fn the_mock_host_sees_a_borrow_held_across_a_host_call() {
        let worker = Worker::new();
        let mut host = MockHost::new(&worker);
        worker.with(|_| host.count("x", 1));
        assert_eq!(host.violations.get(), 1);
    }
}
