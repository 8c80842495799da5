//! Group commit: changes that arrive while one is being written wait in a
//! queue, and one writer at a time writes everything queued in one
//! transaction, then the next group, until the queue is empty.
//!
//! A commit that must reach the disk (`synchronous = FULL` on SQLite, the
//! WAL flush on PostgreSQL) costs a flush whatever it carries, and changes
//! that take turns at one connection each pay it, with a thread hand-off
//! per turn. Here one flush carries the group, and each change's caller is
//! woken once, with its own answer, after the group committed.
//!
//! The queue knows nothing of what a change is: the record log queues
//! appends to its chain ([`crate::records`]), the review store its
//! decisions and holds' liveness ([`crate::store`]). Each says how to write
//! a group and how to answer a change that no writer will write.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Where the answer to a queued change goes: a thread blocked on it, or a
/// task awaiting it.
pub(crate) enum Reply<T> {
    /// A blocking thread waits in `recv`.
    Blocking(std::sync::mpsc::Sender<T>),
    /// A task awaits the receiver.
    Async(tokio::sync::oneshot::Sender<T>),
}

impl<T> Reply<T> {
    /// Answers the change. A receiver that went away (a dropped request)
    /// needs no answer; its change was written all the same.
    pub(crate) fn send(self, answer: T) {
        match self {
            Reply::Blocking(tx) => drop(tx.send(answer)),
            Reply::Async(tx) => drop(tx.send(answer)),
        }
    }
}

/// A change waiting in a [`GroupQueue`].
pub(crate) trait Queued: Send + 'static {
    /// Answers the change with an error: its writer ended without writing
    /// it (it panicked, or the runtime shut down before it ran).
    fn abandon(self);
}

/// The changes waiting for the next group commit, and whether a writer is
/// at work on them (it drains the queue until it finds it empty).
pub(crate) struct GroupQueue<Q> {
    state: Mutex<Waiting<Q>>,
    /// Most changes one transaction carries.
    max: usize,
}

struct Waiting<Q> {
    changes: Vec<Q>,
    writing: bool,
}

impl<Q: Queued> GroupQueue<Q> {
    /// An empty queue whose groups carry at most `max` changes.
    pub(crate) fn new(max: usize) -> Arc<GroupQueue<Q>> {
        Arc::new(GroupQueue {
            state: Mutex::new(Waiting {
                changes: Vec::new(),
                writing: false,
            }),
            max: max.max(1),
        })
    }

    fn state(&self) -> MutexGuard<'_, Waiting<Q>> {
        // Pushes and drains cannot be interrupted halfway.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `changes` together; returns the writer to run when none is at
    /// work (the caller runs it, on a thread that may block), else `None`:
    /// the writer at work writes them.
    pub(crate) fn push(
        self: &Arc<Self>,
        changes: impl IntoIterator<Item = Q>,
    ) -> Option<Writer<Q>> {
        let mut state = self.state();
        state.changes.extend(changes);
        if state.writing || state.changes.is_empty() {
            return None;
        }
        state.writing = true;
        Some(Writer {
            queue: Arc::clone(self),
            finished: false,
        })
    }
}

/// The one writer of a [`GroupQueue`] while it exists. If it ends without
/// draining the queue (a panic, or it never ran), what is queued is
/// abandoned ([`Queued::abandon`]) rather than left waiting forever.
pub(crate) struct Writer<Q: Queued> {
    queue: Arc<GroupQueue<Q>>,
    finished: bool,
}

impl<Q: Queued> Writer<Q> {
    /// Writes what is queued with `write`, a group (in queue order) at a
    /// time, until the queue is empty. `write` answers every change of its
    /// group.
    pub(crate) fn run(mut self, mut write: impl FnMut(Vec<Q>)) {
        while let Some(group) = self.next_group() {
            write(group);
        }
    }

    /// Writes one group of what is queued with `write`; returns the writer
    /// when more was queued meanwhile (its caller hands it on: [`run`] it
    /// elsewhere, or drop it to abandon that), `None` when the queue is
    /// empty and no writer is at work any more. The first group holds the
    /// change whose push returned this writer: it found the queue empty.
    ///
    /// [`run`]: Writer::run
    pub(crate) fn write_one(mut self, write: impl FnOnce(Vec<Q>)) -> Option<Writer<Q>> {
        let group = self.next_group()?;
        write(group);
        // Pushes meanwhile only queued (a writer existed): this writer,
        // handed on, writes them.
        let ended = finish_if_empty(&mut self.queue.state(), &mut self.finished);
        (!ended).then_some(self)
    }

    /// The next group to write, in queue order; `None` (and this writer
    /// finished) when the queue is empty.
    fn next_group(&mut self) -> Option<Vec<Q>> {
        let mut state = self.queue.state();
        if finish_if_empty(&mut state, &mut self.finished) {
            return None;
        }
        let n = state.changes.len().min(self.queue.max);
        Some(state.changes.drain(..n).collect())
    }
}

/// Ends the writer's work when nothing is queued (under the queue's lock,
/// so a push either came before and is written, or after and gets a new
/// writer); whether it ended.
fn finish_if_empty<Q>(state: &mut Waiting<Q>, finished: &mut bool) -> bool {
    if state.changes.is_empty() {
        state.writing = false;
        *finished = true;
    }
    *finished
}

impl<Q: Queued> Drop for Writer<Q> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let abandoned = {
            let mut state = self.queue.state();
            state.writing = false;
            std::mem::take(&mut state.changes)
        };
        for change in abandoned {
            change.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::sync::mpsc;

    struct Change {
        n: u32,
        reply: Reply<Result<u32, &'static str>>,
    }

    impl Queued for Change {
        fn abandon(self) {
            self.reply.send(Err("abandoned"));
        }
    }

    /// Where a change's answer arrives.
    type Answer = mpsc::Receiver<Result<u32, &'static str>>;

    fn change(n: u32) -> (Change, Answer) {
        let (tx, rx) = mpsc::channel();
        (
            Change {
                n,
                reply: Reply::Blocking(tx),
            },
            rx,
        )
    }

    /// Changes `ns`, and the receivers of their answers.
    fn changes(ns: std::ops::RangeInclusive<u32>) -> (Vec<Change>, Vec<Answer>) {
        ns.map(change).unzip()
    }

    #[test]
    fn one_writer_drains_what_queues_meanwhile_in_groups() {
        let queue = GroupQueue::new(2);
        let (first, first_answer) = change(1);
        let writer = queue.push([first]).expect("the first push gets the writer");
        // While a writer exists, later pushes only queue.
        let (later, answers) = changes(2..=4);
        assert!(queue.push(later).is_none());
        let mut groups = Vec::new();
        writer.run(|group| {
            groups.push(group.iter().map(|c| c.n).collect::<Vec<_>>());
            for c in group {
                c.reply.send(Ok(c.n * 10));
            }
        });
        assert_eq!(groups, vec![vec![1, 2], vec![3, 4]]);
        assert_eq!(first_answer.recv().unwrap(), Ok(10));
        let got: Vec<_> = answers.iter().map(|rx| rx.recv().unwrap()).collect();
        assert_eq!(got, vec![Ok(20), Ok(30), Ok(40)]);
        // The writer finished: the next push gets a new one.
        let (next, _rx) = change(5);
        assert!(queue.push([next]).is_some());
    }

    #[test]
    fn a_writer_that_never_runs_abandons_the_queue() {
        let queue = GroupQueue::new(8);
        let (a, a_answer) = change(1);
        let writer = queue.push([a]).unwrap();
        let (b, b_answer) = change(2);
        assert!(queue.push([b]).is_none());
        drop(writer);
        assert_eq!(a_answer.recv().unwrap(), Err("abandoned"));
        assert_eq!(b_answer.recv().unwrap(), Err("abandoned"));
        // Nothing is left writing: a new push starts a writer again.
        let (c, _rx) = change(3);
        assert!(queue.push([c]).is_some());
    }

    #[test]
    fn a_writer_that_panics_abandons_what_is_still_queued() {
        let queue = GroupQueue::new(1);
        let (a, _a_answer) = change(1);
        let writer = queue.push([a]).unwrap();
        let (b, b_answer) = change(2);
        assert!(queue.push([b]).is_none());
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            writer.run(|_group| panic!("a write failed badly"));
        }));
        assert!(ran.is_err());
        assert_eq!(b_answer.recv().unwrap(), Err("abandoned"));
    }

    fn answer_all(group: Vec<Change>) {
        for c in group {
            c.reply.send(Ok(c.n));
        }
    }

    #[test]
    fn write_one_writes_the_first_group_and_hands_on_the_rest() {
        let queue = GroupQueue::new(2);
        let (first, first_answer) = change(1);
        let writer = queue.push([first]).unwrap();
        let (later, answers) = changes(2..=3);
        assert!(queue.push(later).is_none());
        // The first group (the pusher's change first) is written; change 3
        // waits for the writer handed on.
        let mut written = Vec::new();
        let writer = writer
            .write_one(|group| {
                written.extend(group.iter().map(|c| c.n));
                answer_all(group);
            })
            .expect("more is queued: the writer is handed on");
        assert_eq!(written, vec![1, 2]);
        assert_eq!(first_answer.recv().unwrap(), Ok(1));
        assert_eq!(answers[0].recv().unwrap(), Ok(2));
        assert!(
            answers[1].try_recv().is_err(),
            "change 3 is not written yet"
        );
        // While it exists, pushes only queue.
        let (fourth, fourth_answer) = change(4);
        assert!(queue.push([fourth]).is_none());
        writer.run(answer_all);
        assert_eq!(answers[1].recv().unwrap(), Ok(3));
        assert_eq!(fourth_answer.recv().unwrap(), Ok(4));
        // The queue is empty and its writer finished: the next push gets one.
        let (fifth, _rx) = change(5);
        assert!(queue.push([fifth]).is_some());
    }

    #[test]
    fn write_one_finishes_the_writer_when_nothing_else_queued() {
        let queue = GroupQueue::new(8);
        let (only, only_answer) = change(1);
        let writer = queue.push([only]).unwrap();
        assert!(writer.write_one(answer_all).is_none());
        assert_eq!(only_answer.recv().unwrap(), Ok(1));
        let (next, _rx) = change(2);
        assert!(
            queue.push([next]).is_some(),
            "no writer is at work any more"
        );
    }

    #[test]
    fn a_writer_handed_on_and_dropped_abandons_what_queued() {
        let queue = GroupQueue::new(1);
        let (a, a_answer) = change(1);
        let writer = queue.push([a]).unwrap();
        let (b, b_answer) = change(2);
        assert!(queue.push([b]).is_none());
        let rest = writer.write_one(answer_all).expect("b is queued");
        assert_eq!(a_answer.recv().unwrap(), Ok(1));
        // No thread could take it on.
        drop(rest);
        assert_eq!(b_answer.recv().unwrap(), Err("abandoned"));
    }
}
