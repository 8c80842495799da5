//! What the service keeps allocated for each long poll while it waits
//! (issue #17, held capacity): every held request keeps one
//! `GET /v1/reviews/{id}/wait` open for as long as it is held, thousands at
//! once, so the bytes one waiting poll keeps, times the requests held, is
//! what the service's memory grows by. A test binary of its own: its
//! allocator counts every allocation of the process, which the other tests
//! running beside it would disturb.
//!
//! In-process through the router (as the filter's calls arrive from the
//! HTTP server): what the router, its layers and the handler keep per poll.
//! The HTTP/2 stream and the task hyper runs it in come on top (about 1.5
//! KiB in a heap profile of the release build under Envoy's polls).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

#[allow(dead_code)]
#[path = "service/common.rs"]
mod common;

/// Counts the bytes allocated and not yet freed, by every thread.
struct CountingAllocator;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

fn live_bytes() -> isize {
    LIVE_BYTES.load(Ordering::SeqCst)
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counter is an atomic that never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The most one waiting long poll may keep allocated, with the task that
/// awaits it and the in-process request that carries it. Measured in a
/// test (debug) build: 3.4 KiB (the handler's future, its wake-up channel,
/// the route, the test's task); 9.8 KiB when every request went through
/// four `axum::middleware::from_fn` layers, each a future allocated per
/// request for as long as it lasts (see `http::every_request`).
const POLL_BUDGET_BYTES: isize = 4 * 1024;

/// One test: the allocator counts the whole process, so the two
/// measurements must not run beside each other.
#[test]
fn held_requests_keep_little_allocated() {
    a_waiting_long_poll_keeps_little_allocated();
    a_held_request_watched_with_the_others_keeps_less_than_a_long_poll();
}

fn a_waiting_long_poll_keeps_little_allocated() {
    const POLLS: usize = 200;
    // Few blocking threads, so that the threads the polls' database calls
    // start (each allocates as it starts) are not counted as the polls'.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let f = common::fixture("held.db", |db| {
            common::config_toml(db, "", &[("alice", common::ALICE, "")])
        });
        let mut ids = Vec::new();
        for n in 0..POLLS {
            let fields = json!({"request_id": format!("req-{n}")});
            ids.push(common::create_review(&f.app, &[], common::review_request(fields)).await);
        }
        // Once through every path a poll takes, so nothing allocated once
        // for the process is counted.
        let (status, v) = common::wait(&f.app, &ids[0], Some(1)).await;
        assert_eq!(v["status"], "pending", "{status} {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;

        let before = live_bytes();
        let polls: Vec<_> = ids
            .iter()
            .map(|id| common::spawn_wait(&f.app, id, 60_000))
            .collect();
        // Every poll has subscribed to its review, and has read it (its
        // first read comes right after it subscribed): each then waits.
        let deadline = Instant::now() + Duration::from_secs(30);
        while f.state.waiting_reviews() < POLLS {
            assert!(Instant::now() < deadline, "the polls did not all wait");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let per_poll = (live_bytes() - before) / POLLS as isize;

        assert!(
            polls.iter().all(|p| !p.is_finished()),
            "a poll ended early"
        );
        for poll in &polls {
            poll.abort();
        }
        assert!(
            per_poll <= POLL_BUDGET_BYTES,
            "a waiting long poll keeps {per_poll} bytes allocated, the budget is {POLL_BUDGET_BYTES}"
        );
    });
}

/// The most a held request may keep allocated while its filter worker
/// watches it with its other held requests in one `POST /v1/watch` (what
/// replaces a long poll per held request): its entry in the map of watched
/// reviews, and its share of the one waiting watch. Measured in a test
/// (debug) build: about 120 bytes.
const WATCHED_BUDGET_BYTES: isize = 256;

fn a_held_request_watched_with_the_others_keeps_less_than_a_long_poll() {
    const HELD: usize = 200;
    const WATCHER: &str = "0123456789abcdef0123456789abcdef";
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let f = common::fixture("watched.db", |db| {
            common::config_toml(db, "", &[("alice", common::ALICE, "")])
        });
        // Created without a watcher, so that the watch's `check` below is
        // what puts each in the map (as after a new epoch).
        let mut ids = Vec::new();
        for n in 0..HELD {
            let fields = json!({"request_id": format!("req-{n}")});
            ids.push(common::create_review(&f.app, &[], common::review_request(fields)).await);
        }
        // Once through every path a watch takes (its mailbox is made).
        let body = json!({"watcher": WATCHER, "check": [ids[0]], "timeout_ms": 1});
        let (status, v) = common::call(&f.app, "POST", "/v1/watch", &[], Some(body)).await;
        assert_eq!(status, axum::http::StatusCode::OK, "{v}");
        let epoch = v["epoch"].clone();
        tokio::time::sleep(Duration::from_millis(100)).await;

        let before = live_bytes();
        let body = json!({"watcher": WATCHER, "epoch": epoch, "check": ids, "timeout_ms": 60_000});
        let app = f.app.clone();
        let watch = tokio::spawn(async move {
            common::call(&app, "POST", "/v1/watch", &[], Some(body)).await
        });
        // Time to read every review and begin waiting.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let per_held = (live_bytes() - before) / HELD as isize;
        assert!(!watch.is_finished(), "the watch ended early");
        watch.abort();
        assert!(
            per_held <= WATCHED_BUDGET_BYTES,
            "a watched held request keeps {per_held} bytes allocated, the budget is {WATCHED_BUDGET_BYTES}"
        );
    });
}
