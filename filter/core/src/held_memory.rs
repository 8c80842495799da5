//! What a held request keeps in the VM (issue #17, held capacity).
//!
//! A wasm VM's memory never shrinks, and every request a worker holds keeps
//! its state there until a reviewer decides, so the bytes one held request
//! keeps, times the requests held at once, is what the VMs grow by (the
//! held-capacity benchmark reads it as `countersign_vm_memory_bytes`). These
//! tests hold requests through [`StreamFilter`] and [`Worker`] with the demo
//! configuration and count the bytes still allocated once each waits for
//! its reviewer, so a change that keeps more per hold fails here.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::rc::Rc;

use crate::config::Config;
use crate::hold::CalloutResult;
use crate::stream_filter::StreamFilter;
use crate::testing::MockHost;
use crate::worker::Worker;

/// Counts the bytes allocated and not yet freed, per thread, so one test's
/// count is its own: natively each test has a thread, and under wasm32 they
/// run one after another on the one thread (a test reads differences).
struct CountingAllocator;

thread_local! {
    static LIVE_BYTES: Cell<isize> = const { Cell::new(0) };
}

fn add_live(delta: isize) {
    // `try_with`: a thread being torn down frees after its locals are gone.
    let _ = LIVE_BYTES.try_with(|live| live.set(live.get() + delta));
}

fn live_bytes() -> isize {
    LIVE_BYTES.with(Cell::get)
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counter is a plain thread-local cell that never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add_live(layout.size() as isize);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        add_live(-(layout.size() as isize));
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        add_live(new_size as isize - layout.size() as isize);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The demo configuration, as shipped: models other than `demo-allow*` and
/// `forbidden-*` are held for review.
const DEMO: &str = include_str!("../../../envoy/filter-config.json");

/// A chat request of about 2 KB (the benchmark's size) for a held model.
fn held_request() -> Vec<u8> {
    let turn = "Our checkout service returns intermittent 502 errors since yesterday's deploy; \
                which runbook section covers the upstream connection pool, and what should we check first? ";
    let body = serde_json::json!({
        "model": "demo-echo-held",
        "messages": [
            {"role": "system", "content": "You are a careful assistant for the platform team."},
            {"role": "user", "content": turn.repeat(10)},
        ],
    });
    serde_json::to_vec(&body).unwrap()
}

/// The most a request waiting for its reviewer may keep allocated, with a
/// 2 KB body (64-bit; wasm32's pointers are half as wide): its stream
/// filter, its hold, and the body it will forward and record.
const HELD_BUDGET_BYTES: isize = 8 * 1024;

#[test]
fn a_request_waiting_for_its_reviewer_keeps_little_in_the_vm() {
    const HELD: u32 = 50;
    let config = Rc::new(Config::from_json(DEMO.as_bytes()).unwrap());
    let body = held_request();
    assert!((1800..2400).contains(&body.len()), "{}", body.len());
    let worker = Worker::new();
    let mut host = MockHost::new(&worker);
    host.request("POST", "/v1/chat/completions", &body);
    let mut streams = Vec::new();
    let before = live_bytes();

    for i in 0..HELD {
        let mut stream = StreamFilter::new(100 + i, Some(config.clone()), worker.clone());
        stream.on_request_headers(&mut host, false);
        stream.on_request_body(&mut host, body.len(), true);
        streams.push(stream);
    }
    // Every hold created its review; the service answers each: pending.
    let creates: Vec<u32> = host.dispatched.drain(..).map(|(token, _)| token).collect();
    assert_eq!(creates.len(), HELD as usize);
    for (n, token) in creates.into_iter().enumerate() {
        host.answer = Some(CalloutResult {
            status: Some(201),
            body: format!(r#"{{"id":"rev_{n}","status":"pending","expires_at_ms":0}}"#)
                .into_bytes(),
        });
        host.effective = None;
        worker.on_callout_response(&mut host, token, 64);
    }
    assert_eq!(worker.held(), HELD as usize);
    // What the mock kept of the calls (the creations, answered) is
    // Envoy's, not the VM's.
    host.dispatched.clear();
    host.dispatched.shrink_to_fit();
    host.take_calls();
    let per_hold = (live_bytes() - before) / HELD as isize;

    assert!(
        per_hold <= HELD_BUDGET_BYTES,
        "a held request keeps {per_hold} bytes in the VM, the budget is {HELD_BUDGET_BYTES}"
    );
    drop(streams);
}
