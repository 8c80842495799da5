//! Calls nobody waits for but that must land: the response part of a
//! session record, the record of a refused request, the cancellation of a
//! review whose caller went away, the `audit` review of a request a spot
//! check forwarded (the only review creation sent this way).
//!
//! The stream that wanted them may be gone before the answer comes back
//! (Envoy drops a stream's context after its access log), so the adapter
//! sends them from the root context, which lives as long as the VM, and
//! asks a [`Delivery`] what an answer means. A call that got no answer or a
//! 5xx is tried again with backoff ([`DELIVERY_ATTEMPTS`] in all, about a
//! minute and a half): with several approval service replicas, a replica
//! that died mid-call is replaced by another on the next attempt, and a
//! single replica restarted (a crash, a rolling update, a database that
//! blinked) still gets every record part. Giving up sooner would leave a
//! request record that claims a forward for a request that was refused. Every such call is safe to
//! repeat: record writes carry an idempotency key or are refused with 409
//! once written, and cancelling a review twice changes nothing.

use crate::hold::{transient, Callout, CalloutKind, CalloutResult};

/// Attempts at one delivery before it is given up (and logged): with the
/// backoff below, the last one is about 92 s after the first.
pub const DELIVERY_ATTEMPTS: u32 = 10;

/// Delay before the second attempt; doubles for each later one, up to
/// [`DELIVERY_RETRY_MAX_MS`].
pub const DELIVERY_RETRY_MS: u64 = 250;

/// Longest delay between two attempts.
pub const DELIVERY_RETRY_MAX_MS: u64 = 30_000;

/// Most deliveries queued or in flight in one VM (one Envoy worker). While
/// the approval service is unreachable they pile up for the whole retry
/// span; beyond this, new ones are dropped (and counted), so an outage
/// plus a flood of refusals cannot exhaust Envoy's memory.
pub const MAX_QUEUED: usize = 10_000;

/// Most bytes of call bodies queued or in flight in one VM.
pub const MAX_QUEUED_BYTES: usize = 64 << 20;

/// Whether a delivery of `body_len` bytes may join `queued` others holding
/// `queued_bytes`.
pub fn admits(queued: usize, queued_bytes: usize, body_len: usize) -> bool {
    queued < MAX_QUEUED && queued_bytes.saturating_add(body_len) <= MAX_QUEUED_BYTES
}

/// [`admits`] for the calls that only complete an audit trail already
/// started (refusal records, cancellations): they may fill half the queue,
/// so a flood of cheap refusals during an outage cannot crowd out the
/// response parts of forwarded requests.
pub fn admits_routine(queued: usize, queued_bytes: usize, body_len: usize) -> bool {
    queued < MAX_QUEUED / 2 && queued_bytes.saturating_add(body_len) <= MAX_QUEUED_BYTES / 2
}

/// One call on its way, with the attempts made so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The call, sent the same way on every attempt.
    pub call: Callout,
    attempts: u32,
}

/// What the adapter does after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryStep {
    /// It landed (or had already landed).
    Done,
    /// Send it again at this time (ms since the epoch).
    RetryAt(u64),
    /// Stop trying; the reason is for the log.
    GiveUp(String),
}

impl Delivery {
    /// A delivery of `call`, not yet attempted.
    pub fn new(call: Callout) -> Delivery {
        Delivery { call, attempts: 0 }
    }

    /// Size of the call's body, for [`admits`].
    pub fn size(&self) -> usize {
        self.call.body.as_ref().map_or(0, Vec::len)
    }

    /// Attempts made so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Notes that an attempt is being sent.
    pub fn sending(&mut self) {
        self.attempts = self.attempts.saturating_add(1);
    }

    /// What the answer to the last attempt means. `result.status` is `None`
    /// when no answer came (timeout, reset, or the call could not be sent).
    pub fn on_result(&self, result: &CalloutResult, now_ms: u64) -> DeliveryStep {
        match result.status {
            Some(s) if (200..300).contains(&s) => return DeliveryStep::Done,
            // The response part of a record exists already: an earlier
            // attempt landed and only its answer was lost.
            Some(409) if self.call.kind == CalloutKind::Record => return DeliveryStep::Done,
            _ => {}
        }
        let why = match result.status {
            Some(s) => format!("status {s}"),
            None => "no answer".to_string(),
        };
        if !transient(result) {
            return DeliveryStep::GiveUp(why);
        }
        if self.attempts >= DELIVERY_ATTEMPTS {
            return DeliveryStep::GiveUp(format!("{why} after {} attempts", self.attempts));
        }
        let delay = (DELIVERY_RETRY_MS << self.attempts.saturating_sub(1).min(16))
            .min(DELIVERY_RETRY_MAX_MS);
        DeliveryStep::RetryAt(now_ms.saturating_add(delay))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn call(kind: CalloutKind) -> Callout {
        Callout {
            kind,
            headers: vec![(":path".into(), "/v1/records/rec_1/response".into())],
            body: Some(b"{}".to_vec()),
            timeout_ms: 5_000,
        }
    }

    fn answer(status: Option<u16>) -> CalloutResult {
        CalloutResult {
            status,
            body: Vec::new(),
        }
    }

    #[test]
    fn transient_failures_are_retried_with_backoff_then_given_up() {
        let mut d = Delivery::new(call(CalloutKind::Record));
        let mut now = 1_000;
        let mut delays = Vec::new();
        loop {
            d.sending();
            match d.on_result(&answer(None), now) {
                DeliveryStep::RetryAt(at) => {
                    delays.push(at - now);
                    now = at;
                }
                DeliveryStep::GiveUp(why) => {
                    assert!(why.contains("no answer after 10 attempts"), "{why}");
                    break;
                }
                DeliveryStep::Done => panic!(),
            }
        }
        assert_eq!(
            delays,
            vec![250, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000]
        );
        assert_eq!(d.attempts(), DELIVERY_ATTEMPTS);
        // A 5xx (Envoy finding no healthy replica, a replica's database
        // blinking) is retried like no answer.
        let mut d = Delivery::new(call(CalloutKind::Record));
        d.sending();
        assert!(matches!(
            d.on_result(&answer(Some(503)), 0),
            DeliveryStep::RetryAt(250)
        ));
    }

    #[test]
    fn the_queue_is_bounded_by_count_and_bytes() {
        assert!(admits(0, 0, 1 << 20));
        assert!(!admits(MAX_QUEUED, 0, 0));
        assert!(!admits(1, MAX_QUEUED_BYTES - 10, 11));
        assert!(admits(1, MAX_QUEUED_BYTES - 10, 10));
        // Routine calls leave the other half to response parts.
        assert!(admits_routine(MAX_QUEUED / 2 - 1, 0, 0));
        assert!(!admits_routine(MAX_QUEUED / 2, 0, 0));
        assert!(!admits_routine(0, MAX_QUEUED_BYTES / 2, 1));
        assert!(admits(MAX_QUEUED / 2, 0, 0));
    }

    #[test]
    fn success_and_final_answers() {
        let mut d = Delivery::new(call(CalloutKind::Record));
        d.sending();
        assert_eq!(d.on_result(&answer(Some(201)), 0), DeliveryStep::Done);
        // Already written by an attempt whose answer was lost.
        assert_eq!(d.on_result(&answer(Some(409)), 0), DeliveryStep::Done);
        // A 4xx will not change by trying again.
        assert!(matches!(
            d.on_result(&answer(Some(404)), 0),
            DeliveryStep::GiveUp(_)
        ));
        let mut cancel = Delivery::new(call(CalloutKind::Expire));
        cancel.sending();
        assert!(matches!(
            cancel.on_result(&answer(Some(409)), 0),
            DeliveryStep::GiveUp(_)
        ));
    }
}
