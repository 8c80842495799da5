//! What the filter needs from Envoy, as a trait: the adapter implements it
//! with proxy-wasm host calls, the tests with a mock that records what was
//! done. [`crate::stream_filter::StreamFilter`] (one HTTP stream) and
//! [`crate::worker::Worker`] (one VM's holds and outbox) only talk to Envoy
//! through it, so every decision they make is tested without Envoy.
//!
//! Calls that act on "the current stream" (headers, bodies, replies, resume,
//! the decision property) act on the stream whose callback is running, or,
//! from the root context, on the stream last chosen with
//! [`Host::set_effective_context`] — as in proxy-wasm.
//!
//! Host calls are the filter's main cost on the `allow` path (each is a
//! crossing out of the VM, and one that returns data also allocates in the
//! VM and copies), so a stream reads each header map whole, once, and only
//! the properties it needs; `host_budget.rs` counts them per callback.
//!
//! Re-entrancy: a local reply or a resume may make Envoy call back into the
//! same VM before the call returns. The worker's state is a `RefCell`, and
//! no borrow of it is held across any host call (`worker.rs` keeps every
//! borrow in a short scope that makes no host call; the mock host checks it
//! on every call).

use crate::hold::{Callout, CalloutResult};

/// What Envoy does with the stream after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Let the headers or body continue down the filter chain.
    Continue,
    /// Stop here (buffering, held, or answered locally).
    Pause,
}

/// Log levels the filter uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Decisions worth a line.
    Info,
    /// Something went wrong and was handled.
    Warn,
    /// The filter cannot work as configured.
    Error,
}

/// A header map read whole in one host call: names in lower case (as
/// Envoy keeps them), in Envoy's order, a name repeated if it came more
/// than once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// The map of these (name, value) pairs.
    pub fn new(pairs: Vec<(String, String)>) -> Headers {
        Headers(pairs)
    }

    /// The value of `name` (any case) as Envoy's one-header read gives it:
    /// the first of its values.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name` (any case), in order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// [`Headers::get`], owned.
    pub fn value(&self, name: &str) -> Option<String> {
        self.get(name).map(str::to_string)
    }

    /// Whether `name` (any case) is present.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Whether `name` (any case) comes exactly once, with `value`: setting
    /// it to `value` would change nothing.
    pub fn is_only(&self, name: &str, value: &str) -> bool {
        let mut values = self.0.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name));
        values.next().is_some_and(|(_, v)| v == value) && values.next().is_none()
    }
}

/// The host (Envoy) as the filter sees it. Each method is one host call,
/// except [`Host::callout_result`] (two: status and body), and
/// [`Host::nonce`] and [`Host::memory_bytes`] (none: the VM's own).
pub trait Host {
    /// The request headers of the current stream, whole.
    fn request_headers(&self) -> Headers;
    /// Sets (`Some`) or removes (`None`) a request header.
    fn set_request_header(&mut self, name: &str, value: Option<&str>);
    /// The first `size` bytes of the buffered request body.
    fn request_body(&self, size: usize) -> Vec<u8>;
    /// Replaces the first `replaced` bytes of the request body with `body`.
    fn set_request_body(&mut self, replaced: usize, body: &[u8]) -> Result<(), String>;
    /// The response headers of the current stream, whole.
    fn response_headers(&self) -> Headers;
    /// Sets (`Some`) or removes (`None`) a response header.
    fn set_response_header(&mut self, name: &str, value: Option<&str>);
    /// The first `size` bytes of the current response chunk.
    fn response_body(&self, size: usize) -> Vec<u8>;
    /// Replaces the first `replaced` bytes of the response chunk with `body`.
    fn set_response_body(&mut self, replaced: usize, body: &[u8]);
    /// A property (`["source", "address"]`, `["route_name"]`, identity paths).
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Sets a filter-state property of the current stream.
    fn set_property(&mut self, name: &str, value: &[u8]);
    /// Milliseconds since the epoch.
    fn now_ms(&self) -> u64;
    /// The size of the VM's linear memory in bytes. A wasm memory grows and
    /// is never given back, so this is the most the VM ever needed at once.
    fn memory_bytes(&self) -> u64;
    /// A random number (never 0).
    fn nonce(&mut self) -> u64;
    /// Sends `call` to `cluster`; the answer comes back with the returned
    /// token to the context that dispatched it.
    fn dispatch(&mut self, cluster: &str, call: &Callout) -> Result<u32, String>;
    /// The answer to a call, read while its callback runs.
    fn callout_result(&self, body_size: usize) -> CalloutResult;
    /// Makes `context_id` the current stream (from the root context).
    fn set_effective_context(&mut self, context_id: u32) -> Result<(), String>;
    /// Answers the current stream locally. May re-enter the VM.
    fn send_reply(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]);
    /// Lets the current stream's paused request continue. May re-enter the VM.
    fn resume_request(&mut self);
    /// Lets the current stream's paused answer (headers and buffered body)
    /// continue to the caller. May re-enter the VM.
    fn resume_response(&mut self);
    /// Adds `delta` to a counter (`*_total`) or gauge.
    fn count(&mut self, name: &str, delta: i64);
    /// Writes a log line (never prompt text or tokens).
    fn log(&mut self, level: Level, message: &str);
    /// Sets the period of the root context's timer ([`crate::worker`]'s
    /// tick); 0 stops it. A new period starts counting now.
    fn set_tick_period(&mut self, ms: u64);
}

/// Outcome of a request on the current stream: a metric and a filter-state
/// value that access logs can print
/// (`%FILTER_STATE(wasm.countersign_decision:PLAIN)%`).
pub fn note_outcome(host: &mut dyn Host, outcome: &str) {
    host.count(&format!("countersign_requests_{outcome}_total"), 1);
    host.set_property("countersign_decision", outcome.as_bytes());
}

#[cfg(test)]
mod tests {
    use crate::testing::headers;

    #[test]
    fn a_header_reads_as_envoys_one_header_read_does() {
        let h = headers(&[
            (":path", "/v1/chat/completions"),
            ("x-api-key", "first"),
            ("x-api-key", "second"),
        ]);
        // The first value, whatever case the name is asked in.
        assert_eq!(h.get("X-API-Key"), Some("first"));
        assert_eq!(h.value(":path").as_deref(), Some("/v1/chat/completions"));
        assert_eq!(h.get("authorization"), None);
        assert!(h.contains("X-Api-Key"));
        assert!(!h.contains("prefer"));
    }

    #[test]
    fn a_header_is_only_a_value_when_it_comes_once_with_it() {
        let once = headers(&[("accept-encoding", "identity")]);
        assert!(once.is_only("Accept-Encoding", "identity"));
        assert!(!once.is_only("accept-encoding", "gzip"));
        let twice = headers(&[("accept-encoding", "identity"), ("accept-encoding", "gzip")]);
        assert!(!twice.is_only("accept-encoding", "identity"));
        assert!(!headers(&[]).is_only("accept-encoding", "identity"));
    }
}
