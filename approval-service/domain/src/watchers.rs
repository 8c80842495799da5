//! The filter workers' mailboxes of this replica (`POST /v1/watch`): for
//! each watcher, the reviews of its that changed since its mailbox was
//! made, numbered, until its watches say they arrived; and, for the
//! reviews whose watcher is known here, which watcher that is, so a change
//! lands in the right mailbox. Memory only, per replica: what a restart or
//! another replica missed is made up by the filter checking every review
//! it waits for when told of a new epoch (see
//! `countersign_core::wire::WatchRequest`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::state::Wake;

/// One watcher's mailbox.
struct Mailbox {
    /// Random per mailbox and per [`Watchers::new_epochs`]: a watch that
    /// names another one may have missed entries.
    epoch: String,
    /// `(seq, review id, its final state when the waker had it)`, oldest
    /// first; entries up to a watch's `after` are dropped by it.
    entries: VecDeque<(u64, String, Wake)>,
    /// The last `seq` given (0: none yet); entries are numbered from 1.
    last_seq: u64,
    /// Wakes this watcher's waiting watches (one, normally).
    woken: watch::Sender<()>,
    /// When a watch last began or ended here.
    last_used: Instant,
    /// Watches of this watcher in progress here.
    watching: usize,
    /// The `alive_until_ms` this replica last stored for the watcher (0:
    /// none): a watch that would store about the same skips the write.
    alive_written_ms: u64,
}

/// Every mailbox of this replica, and which watcher each known pending
/// review has. One lock for both: a change looks up the one to find the
/// other, and watches are few (one per filter worker).
#[derive(Default)]
pub(crate) struct Watchers {
    mailboxes: HashMap<Arc<str>, Mailbox>,
    /// Review id → its watcher, for pending reviews created here or listed
    /// in a watch's `check`; removed once the review is seen final, and
    /// with its watcher's mailbox.
    reviews: HashMap<String, Arc<str>>,
}

/// A liveness write is skipped when the stored time is within this of the
/// one a watch would store (during a bulk approval watches come back every
/// few milliseconds), and within half the grace: the stored time then still
/// lies past the watch's end by half the grace, for the filter to come back.
const ALIVE_WRITE_SLACK_MS: u64 = 1_000;

/// What a watch found when it began.
pub struct Begun {
    /// The mailbox's epoch.
    pub epoch: String,
    /// The last `seq` the mailbox gave.
    pub last_seq: u64,
    /// Resolves when the mailbox is woken (subscribed before any read).
    pub woken: watch::Receiver<()>,
    /// The watcher's `alive_until_ms` to store, unless about that is
    /// stored already.
    pub store_alive_until_ms: Option<u64>,
}

/// What a watch takes from its mailbox.
pub enum Taken {
    /// The mailbox's epoch is not the one the watch knows: entries may
    /// have been lost; `last_seq` is the mailbox's position.
    NewEpoch {
        /// The mailbox's epoch.
        epoch: String,
        /// The last `seq` it gave.
        last_seq: u64,
    },
    /// The entries after the watch's `after` (oldest first).
    Entries(Vec<(u64, String, Wake)>),
}

/// A random epoch: 32 hexadecimal characters.
fn new_epoch() -> String {
    let mut bytes = [0u8; 16];
    // Should the system refuse randomness, the time still differs from
    // every earlier epoch of this watcher.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = nanos.to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Watchers {
    /// Remembers that review `id` is watched by `watcher`.
    /// Only while the watcher has a mailbox here: one made later starts
    /// with a new epoch, and its first watch lists every review again.
    pub(crate) fn remember(&mut self, id: &str, watcher: &str) {
        // One shared copy of the watcher id per mailbox, not one per review.
        if let Some((key, _)) = self.mailboxes.get_key_value(watcher) {
            let shared = Arc::clone(key);
            self.reviews.insert(id.to_string(), shared);
        }
    }

    /// The watcher of review `id`, when known here.
    #[cfg(test)]
    pub(crate) fn watcher_of(&self, id: &str) -> Option<Arc<str>> {
        self.reviews.get(id).cloned()
    }

    /// Forgets review `id` (it is final, or unknown).
    pub(crate) fn forget(&mut self, id: &str) {
        self.reviews.remove(id);
    }

    /// Puts a change of review `id` in its watcher's mailbox, if its
    /// watcher is known and has one here, and wakes its watches.
    pub(crate) fn push(&mut self, id: &str, wake: Wake) {
        let Some(watcher) = self.reviews.get(id) else {
            return;
        };
        let Some(mailbox) = self.mailboxes.get_mut(watcher) else {
            return;
        };
        mailbox.last_seq += 1;
        mailbox
            .entries
            .push_back((mailbox.last_seq, id.to_string(), wake));
        mailbox.woken.send_replace(());
    }

    /// Every mailbox starts a new epoch (changes may have been lost): its
    /// entries go, and its watches answer with the new epoch.
    pub(crate) fn new_epochs(&mut self) {
        // Each watcher lists every review it waits for again, which is
        // remembered anew (a final change missed now would leave one here).
        self.reviews.clear();
        for mailbox in self.mailboxes.values_mut() {
            mailbox.epoch = new_epoch();
            mailbox.entries.clear();
            mailbox.woken.send_replace(());
        }
    }

    /// A watch of `watcher` begins: its mailbox (made when missing),
    /// subscribed to; and whether its liveness is to be stored, as
    /// `alive_until_ms` (its end plus `grace_ms`).
    /// On several replicas (`shared`) the liveness is written by every
    /// watch: another replica may have lowered it (a watch of this worker
    /// cut off there), which this one's memory cannot know.
    pub(crate) fn begin(
        &mut self,
        watcher: &str,
        alive_until_ms: u64,
        grace_ms: u64,
        shared: bool,
    ) -> Begun {
        let slack = ALIVE_WRITE_SLACK_MS.min(grace_ms / 2);
        let mailbox = match self.mailboxes.get_mut(watcher) {
            Some(mailbox) => mailbox,
            None => self
                .mailboxes
                .entry(Arc::from(watcher))
                .or_insert_with(|| Mailbox {
                    epoch: new_epoch(),
                    entries: VecDeque::new(),
                    last_seq: 0,
                    woken: watch::Sender::new(()),
                    last_used: Instant::now(),
                    watching: 0,
                    alive_written_ms: 0,
                }),
        };
        mailbox.watching += 1;
        mailbox.last_used = Instant::now();
        let store = shared || mailbox.alive_written_ms.saturating_add(slack) < alive_until_ms;
        if store {
            mailbox.alive_written_ms = alive_until_ms;
        }
        Begun {
            epoch: mailbox.epoch.clone(),
            last_seq: mailbox.last_seq,
            woken: mailbox.woken.subscribe(),
            store_alive_until_ms: store.then_some(alive_until_ms),
        }
    }

    /// The entries of `watcher`'s mailbox after `after`, dropping those up
    /// to it, when its epoch is `epoch`.
    pub(crate) fn take(&mut self, watcher: &str, epoch: &str, after: u64) -> Taken {
        let Some(mailbox) = self.mailboxes.get_mut(watcher) else {
            // Dropped while idle cannot happen while a watch is in
            // progress; answer as a lost mailbox all the same.
            return Taken::NewEpoch {
                epoch: new_epoch(),
                last_seq: 0,
            };
        };
        if mailbox.epoch != epoch {
            return Taken::NewEpoch {
                epoch: mailbox.epoch.clone(),
                last_seq: mailbox.last_seq,
            };
        }
        while mailbox
            .entries
            .front()
            .is_some_and(|(seq, _, _)| *seq <= after)
        {
            mailbox.entries.pop_front();
        }
        Taken::Entries(mailbox.entries.iter().cloned().collect())
    }

    /// Storing the liveness `begin` asked for failed: the next watch
    /// stores it again.
    pub(crate) fn write_failed(&mut self, watcher: &str) {
        if let Some(mailbox) = self.mailboxes.get_mut(watcher) {
            mailbox.alive_written_ms = 0;
        }
    }

    /// A watch of `watcher` ended, `answered` or not (cut off): for one cut
    /// off while no other watch of it is in progress here, the liveness to
    /// store instead of what this replica stored (`(stored, now alive
    /// until)`), as `alive_until_ms`.
    pub(crate) fn end(
        &mut self,
        watcher: &str,
        answered: bool,
        alive_until_ms: u64,
    ) -> Option<(u64, u64)> {
        let mailbox = self.mailboxes.get_mut(watcher)?;
        mailbox.watching = mailbox.watching.saturating_sub(1);
        mailbox.last_used = Instant::now();
        if answered || mailbox.watching > 0 || mailbox.alive_written_ms == 0 {
            return None;
        }
        let stored = mailbox.alive_written_ms;
        mailbox.alive_written_ms = alive_until_ms;
        Some((stored, alive_until_ms))
    }

    /// Drops the mailboxes without a watch for longer than `idle`, and the
    /// reviews of watchers without a mailbox (a new mailbox starts with a
    /// new epoch: its filter lists every review again); how many
    /// mailboxes went.
    pub(crate) fn drop_idle(&mut self, idle: Duration) -> usize {
        let before = self.mailboxes.len();
        self.mailboxes
            .retain(|_, m| m.watching > 0 || m.last_used.elapsed() <= idle);
        let dropped = before - self.mailboxes.len();
        let mailboxes = &self.mailboxes;
        self.reviews.retain(|_, w| mailboxes.contains_key(w));
        dropped
    }

    /// How many mailboxes there are (for tests and diagnostics).
    pub(crate) fn mailboxes(&self) -> usize {
        self.mailboxes.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const W: &str = "0123456789abcdef0123456789abcdef";

    fn entries(taken: Taken) -> Vec<(u64, String)> {
        match taken {
            Taken::Entries(e) => e.into_iter().map(|(s, id, _)| (s, id)).collect(),
            Taken::NewEpoch { .. } => panic!("a new epoch"),
        }
    }

    #[test]
    fn changes_of_known_reviews_land_in_their_watchers_mailbox_in_order() {
        let mut w = Watchers::default();
        // No mailbox yet: nothing is kept, not even whose review it is (a
        // mailbox made later starts a new epoch: its watcher lists every
        // review again).
        w.remember("rev_a", W);
        assert!(w.watcher_of("rev_a").is_none());
        w.push("rev_a", None);
        let begun = w.begin(W, 10_000, 10_000, false);
        assert_eq!(begun.store_alive_until_ms, Some(10_000));
        w.remember("rev_a", W);
        w.remember("rev_b", W);
        w.push("rev_b", None);
        w.push("rev_a", None);
        w.push("rev_unknown", None);
        assert!(begun.woken.has_changed().unwrap());
        let e = entries(w.take(W, &begun.epoch, 0));
        assert_eq!(e, [(1, "rev_b".to_string()), (2, "rev_a".to_string())]);
        // Taken in: dropped; the same `after` again gets the rest again.
        assert_eq!(entries(w.take(W, &begun.epoch, 1)).len(), 1);
        assert_eq!(entries(w.take(W, &begun.epoch, 1)).len(), 1);
        assert!(entries(w.take(W, &begun.epoch, 2)).is_empty());
        // Another epoch is told the mailbox's, and its position.
        match w.take(W, "other", 0) {
            Taken::NewEpoch { epoch, last_seq } => {
                assert_eq!(epoch, begun.epoch);
                assert_eq!(last_seq, 2);
            }
            Taken::Entries(_) => panic!("entries for a stale epoch"),
        }
        w.new_epochs();
        assert!(matches!(
            w.take(W, &begun.epoch, 2),
            Taken::NewEpoch { last_seq: 2, .. }
        ));
    }

    #[test]
    fn liveness_is_written_when_it_moves_and_when_the_last_watch_is_cut_off() {
        let mut w = Watchers::default();
        assert_eq!(
            w.begin(W, 10_000, 10_000, false).store_alive_until_ms,
            Some(10_000)
        );
        // Back within the slack: no write.
        assert_eq!(w.begin(W, 10_500, 10_000, false).store_alive_until_ms, None);
        // Two in progress: the first cut off leaves the other's time.
        assert_eq!(w.end(W, false, 3_000), None);
        assert_eq!(w.end(W, false, 3_000), Some((10_000, 3_000)));
        assert_eq!(
            w.begin(W, 10_600, 10_000, false).store_alive_until_ms,
            Some(10_600)
        );
        // A short grace makes the slack short too.
        assert_eq!(
            w.begin(W, 10_700, 100, false).store_alive_until_ms,
            Some(10_700)
        );
        // Answered: nothing written at its end.
        assert_eq!(w.end(W, true, 4_000), None);
        // On several replicas every watch writes: another replica may have
        // lowered the stored time (a watch of this worker cut off there).
        assert_eq!(
            w.begin(W, 10_700, 10_000, true).store_alive_until_ms,
            Some(10_700)
        );
    }

    #[test]
    fn idle_mailboxes_and_their_reviews_go() {
        let mut w = Watchers::default();
        let _ = w.begin(W, 1, 1_000, false);
        w.remember("rev_a", W);
        assert_eq!(w.drop_idle(Duration::ZERO), 0, "a watch is in progress");
        w.end(W, true, 1);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(w.drop_idle(Duration::ZERO), 1);
        assert_eq!(w.mailboxes(), 0);
        assert!(w.reviews.is_empty());
    }
}
