//! WAL checkpoints on a thread of their own, off the writers' path.
//!
//! In WAL mode a commit appends the pages it changed to the `-wal` file; a
//! checkpoint copies them back into the database file and flushes it, so
//! the WAL can start over. By default SQLite checkpoints inside the commit
//! that takes the WAL past 1,000 pages: that writer, which is the one
//! writer of a group commit ([`super::group_commit`]), copies and flushes
//! megabytes before it may answer its group, and every change queued behind
//! it waits as well. Profiled under the record path's load, those
//! checkpoints were a tenth of the service's CPU, all of it on the writer.
//!
//! Here the service's writing connections only tell a [`Checkpointer`]
//! when the WAL has grown past [`WAKE_AT_PAGES`]; its thread checkpoints on
//! a connection of its own (`PASSIVE`: it copies what no reader still
//! needs, never waits for the writers, and writers go on meanwhile).
//! Durability is the same: a commit is durable once its WAL frames are
//! flushed (`synchronous`), whoever copies them back later.
//!
//! Should the thread fall behind, die, or never get to run, a commit that
//! finds the WAL past [`BACKSTOP_PAGES`] checkpoints itself, as SQLite
//! would by default, so the WAL cannot grow without bound.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// WAL pages after which a commit wakes the checkpointer: SQLite's own
/// default for `wal_autocheckpoint`, so the WAL keeps its usual size.
pub const WAKE_AT_PAGES: u32 = 1_000;

/// WAL pages after which a commit checkpoints itself (the checkpointer is
/// far behind or gone): about 62 MiB of 4 KiB pages.
pub const BACKSTOP_PAGES: u32 = 16 * WAKE_AT_PAGES;

/// How long the checkpointer's connection waits for SQLite's locks (the
/// checkpointer lock another connection may hold briefly).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The checkpointing thread of one SQLite file. Stops (and is joined) when
/// dropped.
pub struct Checkpointer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What the writers' hooks and the thread share.
struct Shared {
    wake: Mutex<Wake>,
    woken: Condvar,
    /// Checkpoints the thread ran.
    by_thread: AtomicU64,
    /// Checkpoints commits ran themselves (past the backstop).
    by_commits: AtomicU64,
    wake_at_pages: u32,
    backstop_pages: u32,
}

#[derive(Default)]
struct Wake {
    due: bool,
    stop: bool,
}

impl Shared {
    fn wake(&self) -> std::sync::MutexGuard<'_, Wake> {
        self.wake.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Checkpointer {
    /// Starts the checkpointer of the SQLite file at `path`, flushing with
    /// `synchronous` (the writers' setting).
    pub fn start(path: &Path, synchronous: &str) -> std::io::Result<Checkpointer> {
        Checkpointer::start_with(path, synchronous, WAKE_AT_PAGES, BACKSTOP_PAGES)
    }

    fn start_with(
        path: &Path,
        synchronous: &str,
        wake_at_pages: u32,
        backstop_pages: u32,
    ) -> std::io::Result<Checkpointer> {
        let shared = Arc::new(Shared {
            wake: Mutex::new(Wake::default()),
            woken: Condvar::new(),
            by_thread: AtomicU64::new(0),
            by_commits: AtomicU64::new(0),
            wake_at_pages,
            backstop_pages,
        });
        let conn = open(path, synchronous).map_err(std::io::Error::other)?;
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("wal-checkpoint".into())
            .spawn(move || run(&conn, &thread_shared))?;
        Ok(Checkpointer {
            shared,
            thread: Some(thread),
        })
    }

    /// Makes `conn` (a connection to the same file) leave its checkpoints
    /// to this checkpointer; replaces its automatic checkpoints.
    pub(crate) fn take_over(&self, conn: &mut rusqlite::Connection) -> rusqlite::Result<()> {
        let shared = Arc::clone(&self.shared);
        conn.wal_hook(Some(move |wal: &mut rusqlite::hooks::Wal, pages: i32| {
            let pages = u32::try_from(pages).unwrap_or(0);
            if pages >= shared.backstop_pages {
                // The commit has happened; an error returned from here would
                // make its statement report a failure all the same. A
                // checkpoint that cannot run now runs at the next commit.
                if wal.checkpoint().is_ok() {
                    shared.by_commits.fetch_add(1, Ordering::Relaxed);
                }
            } else if pages >= shared.wake_at_pages {
                shared.wake().due = true;
                shared.woken.notify_one();
            }
            Ok(())
        }))
    }

    /// Checkpoints the thread ran, and those commits ran themselves.
    #[cfg(test)]
    fn checkpoints(&self) -> (u64, u64) {
        (
            self.shared.by_thread.load(Ordering::Relaxed),
            self.shared.by_commits.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.shared.wake().stop = true;
        self.shared.woken.notify_one();
        if let Some(thread) = self.thread.take() {
            drop(thread.join());
        }
    }
}

fn open(path: &Path, synchronous: &str) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", synchronous)?;
    // This connection only checkpoints.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    Ok(conn)
}

/// The thread: checkpoints each time a commit says the WAL is due, until
/// stopped.
fn run(conn: &rusqlite::Connection, shared: &Shared) {
    loop {
        {
            let mut wake = shared.wake();
            while !wake.due && !wake.stop {
                wake = shared
                    .woken
                    .wait(wake)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if wake.stop {
                return;
            }
            wake.due = false;
        }
        // PASSIVE: copies the frames no reader still needs and returns;
        // commits after it make the WAL due again.
        let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            row.get::<_, i64>(0)
        });
        match done {
            Ok(_) => {
                shared.by_thread.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed; the next one retries"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::path::PathBuf;
    use std::time::Instant;

    /// A database file in a temporary directory, removed with it.
    struct ScratchFile {
        _dir: tempfile::TempDir,
        path: PathBuf,
    }

    impl ScratchFile {
        fn new() -> ScratchFile {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("db.sqlite");
            ScratchFile { _dir: dir, path }
        }

        fn wal_bytes(&self) -> u64 {
            let wal = format!("{}-wal", self.path.display());
            std::fs::metadata(wal).map_or(0, |m| m.len())
        }
    }

    fn writer(file: &ScratchFile) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(&file.path).unwrap();
        let _mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .unwrap();
        conn.execute_batch("CREATE TABLE IF NOT EXISTS t (b BLOB NOT NULL)")
            .unwrap();
        conn
    }

    /// One commit of about `pages` new pages.
    fn commit_pages(conn: &rusqlite::Connection, pages: usize) {
        conn.execute(
            "INSERT INTO t (b) VALUES (zeroblob(?1))",
            [i64::try_from(pages * 4096).unwrap()],
        )
        .unwrap();
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn commits_past_the_mark_wake_the_thread_which_checkpoints() {
        let file = ScratchFile::new();
        let mut conn = writer(&file);
        let checkpointer = Checkpointer::start_with(&file.path, "FULL", 8, 1_000).unwrap();
        checkpointer.take_over(&mut conn).unwrap();
        // Below the mark: nobody checkpoints.
        commit_pages(&conn, 2);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(checkpointer.checkpoints(), (0, 0));
        // Past it, each commit wakes the thread, which checkpoints; the
        // commit does not. Each checkpoint copies the whole WAL back, so
        // the next commit starts the WAL over and it never grows past a
        // commit or two.
        for round in 1..=50 {
            commit_pages(&conn, 10);
            wait_for("the thread's checkpoint", || {
                checkpointer.checkpoints().0 >= round
            });
        }
        assert_eq!(checkpointer.checkpoints().1, 0);
        assert!(
            file.wal_bytes() < 40 * 4200,
            "the WAL grew to {} bytes",
            file.wal_bytes()
        );
        // What was committed is there.
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 51);
    }

    #[test]
    fn without_a_running_thread_commits_past_the_backstop_checkpoint_themselves() {
        let file = ScratchFile::new();
        let mut conn = writer(&file);
        let checkpointer = Checkpointer::start_with(&file.path, "FULL", 8, 40).unwrap();
        // Stop the thread: the hook stays, as if the thread had died.
        checkpointer.shared.wake().stop = true;
        checkpointer.shared.woken.notify_one();
        wait_for("the thread to stop", || {
            checkpointer
                .thread
                .as_ref()
                .is_some_and(JoinHandle::is_finished)
        });
        checkpointer.take_over(&mut conn).unwrap();
        for _ in 0..100 {
            commit_pages(&conn, 10);
        }
        let (by_thread, by_commits) = checkpointer.checkpoints();
        assert_eq!(by_thread, 0);
        assert!(by_commits >= 1, "no commit checkpointed");
        // 1,000 pages committed; the WAL stayed near the backstop.
        assert!(
            file.wal_bytes() < 80 * 4200,
            "the WAL grew to {} bytes",
            file.wal_bytes()
        );
    }

    #[test]
    fn dropping_the_checkpointer_stops_its_thread() {
        let file = ScratchFile::new();
        drop(writer(&file));
        let checkpointer = Checkpointer::start(&file.path, "FULL").unwrap();
        // The drop joins the thread; a thread that does not stop hangs it.
        let (dropped, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(checkpointer);
            dropped.send(()).unwrap();
        });
        done.recv_timeout(Duration::from_secs(10))
            .expect("the checkpointer's thread did not stop");
    }
}
