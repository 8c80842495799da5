//! A mock [`Host`] for unit tests: it serves headers, bodies, properties and
//! callout answers set by the test, and records what the filter did
//! (headers set, bodies written, replies, resumes, dispatched calls,
//! metrics, logs). It also checks the re-entrancy rule: no host call is made
//! while the watched worker's state is borrowed, and counts every host call
//! by name (the host-call budget, `host_budget.rs`).

#![allow(clippy::unwrap_used, clippy::panic)]

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};

use crate::hold::{Callout, CalloutResult};
use crate::host::{Headers, Host, Level};
use crate::worker::Worker;

/// A local reply the filter sent.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The stream it went to (`None`: the stream whose callback ran).
    pub context: Option<u32>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
pub struct MockHost {
    pub request_headers: BTreeMap<String, String>,
    pub request_body: Vec<u8>,
    pub response_headers: BTreeMap<String, String>,
    /// Headers that come again after those of `request_headers` /
    /// `response_headers` (a name repeated: a second `content-encoding`),
    /// read with them; setting or removing a name drops its repeats.
    pub repeated_request_headers: Vec<(String, String)>,
    pub repeated_response_headers: Vec<(String, String)>,
    /// The current response chunk (replaced by `set_response_body`).
    pub response_chunk: Vec<u8>,
    pub properties: HashMap<Vec<String>, Vec<u8>>,
    /// Filter-state properties set, with the stream they were set on.
    pub state: Vec<(Option<u32>, String, Vec<u8>)>,
    pub now: u64,
    next_token: u32,
    /// Calls dispatched, with their tokens.
    pub dispatched: Vec<(u32, Callout)>,
    /// Makes every dispatch fail.
    pub dispatch_fails: bool,
    /// Makes writing the request body fail.
    pub body_write_fails: bool,
    /// The answer served by `callout_result`.
    pub answer: Option<CalloutResult>,
    /// The stream chosen with `set_effective_context`.
    pub effective: Option<u32>,
    pub replies: Vec<Reply>,
    /// Streams resumed.
    pub resumed: Vec<Option<u32>>,
    /// Streams whose answer was resumed.
    pub resumed_responses: Vec<Option<u32>>,
    pub metrics: HashMap<String, i64>,
    pub logs: Vec<(Level, String)>,
    /// The worker whose state must not be borrowed during host calls.
    pub watch: Option<Worker>,
    /// Host calls made while the watched state was borrowed.
    pub violations: Cell<u32>,
    /// The timer periods set, in order.
    pub tick_periods: Vec<u64>,
    /// Every host call made, by name, in order (see [`MockHost::take_calls`]).
    calls: RefCell<Vec<&'static str>>,
    /// What `nonce` answers (`0xabc` by default).
    pub nonce: Option<u64>,
    /// What `memory_bytes` answers (0 by default).
    pub vm_memory: u64,
}

impl MockHost {
    pub fn new(watch: &Worker) -> MockHost {
        MockHost {
            now: 1_000_000,
            watch: Some(watch.clone()),
            next_token: 100,
            ..MockHost::default()
        }
    }

    /// Every host call goes through here: it is counted, and must not be
    /// made while the watched worker's state is borrowed.
    fn check(&self, call: &'static str) {
        self.calls.borrow_mut().push(call);
        if self.watch.as_ref().is_some_and(Worker::is_borrowed) {
            self.violations.set(self.violations.get() + 1);
        }
    }

    /// The host calls made since the last time this was asked, by name.
    pub fn take_calls(&self) -> Vec<&'static str> {
        std::mem::take(&mut self.calls.borrow_mut())
    }

    pub fn request(&mut self, method: &str, path: &str, body: &[u8]) {
        self.request_headers = [
            (":method", method),
            (":path", path),
            (":authority", "gw"),
            ("content-type", "application/json"),
            ("x-request-id", "req-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        self.request_body = body.to_vec();
    }

    pub fn metric(&self, name: &str) -> i64 {
        self.metrics.get(name).copied().unwrap_or(0)
    }

    /// The `:path` of the last call dispatched.
    pub fn last_path(&self) -> String {
        let (_, call) = self.dispatched.last().unwrap();
        path_of(call)
    }

    pub fn last_token(&self) -> u32 {
        self.dispatched.last().unwrap().0
    }

    pub fn paths(&self) -> Vec<String> {
        self.dispatched.iter().map(|(_, c)| path_of(c)).collect()
    }

    pub fn outcome(&self) -> Option<String> {
        self.state
            .iter()
            .rev()
            .find(|(_, k, _)| k == "countersign_decision")
            .map(|(_, _, v)| String::from_utf8(v.clone()).unwrap())
    }
}

fn pairs(map: &BTreeMap<String, String>) -> Vec<(String, String)> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The approval service answers the last call dispatched, as it reaches
/// the worker (from the root context).
pub fn answer_last_call(host: &mut MockHost, worker: &Worker, status: u16, body: &str) {
    host.answer = Some(CalloutResult {
        status: Some(status),
        body: body.as_bytes().to_vec(),
    });
    host.effective = None;
    let token = host.last_token();
    worker.on_callout_response(host, token, body.len());
}

/// The approval service answers the worker's watch (sent first, by the
/// timer, when none is in flight) with `states`, review states as JSON
/// that left `pending` since its last answer.
pub fn answer_watch(host: &mut MockHost, worker: &Worker, states: &[&str]) {
    if worker.watch_in_flight().is_none() {
        worker.on_tick(host);
    }
    let token = worker.watch_in_flight().unwrap();
    let (_, call) = host.dispatched.iter().find(|(t, _)| *t == token).unwrap();
    assert_eq!(path_of(call), "/v1/watch");
    let body = format!(
        r#"{{"epoch":"e1","next":{},"states":[{}]}}"#,
        host.dispatched.len(),
        states.join(",")
    );
    host.answer = Some(CalloutResult {
        status: Some(200),
        body: body.clone().into_bytes(),
    });
    host.effective = None;
    worker.on_callout_response(host, token, body.len());
}

/// Stream `id` under `config` (JSON), with `request` to `path` allowed and
/// forwarded once its record is written (`rec_1`): ready for the answer.
pub fn forwarded(
    config: &str,
    id: u32,
    path: &str,
    request: &[u8],
) -> (Worker, MockHost, crate::stream_filter::StreamFilter) {
    let config = std::rc::Rc::new(crate::config::Config::from_json(config.as_bytes()).unwrap());
    let worker = Worker::new();
    let mut host = MockHost::new(&worker);
    let stream = forwarded_on(&mut host, &worker, &config, id, (path, request));
    (worker, host, stream)
}

/// A request of HTTP context `id` to `path`, forwarded once its record was
/// written, on an existing worker (several streams of one worker).
pub fn forwarded_on(
    host: &mut MockHost,
    worker: &Worker,
    config: &std::rc::Rc<crate::config::Config>,
    id: u32,
    (path, request): (&str, &[u8]),
) -> crate::stream_filter::StreamFilter {
    use crate::host::Action;
    let mut stream =
        crate::stream_filter::StreamFilter::new(id, Some(config.clone()), worker.clone());
    host.resumed.clear();
    host.request("POST", path, request);
    assert_eq!(stream.on_request_headers(host, false), Action::Continue);
    assert_eq!(
        stream.on_request_body(host, request.len(), true),
        Action::Pause,
        "{:?}",
        host.replies
    );
    answer_record(host, worker, "rec_1");
    assert_eq!(host.resumed, [Some(id)]);
    stream
}

/// The approval service writes the record that waits to be sent (alone,
/// sent by the tick, when `record_batch_ms` is above 0; a batch of one is
/// its own `POST /v1/records`) as `record_id`.
pub fn answer_record(host: &mut MockHost, worker: &Worker, record_id: &str) {
    if worker.batched() > 0 {
        worker.on_tick(host);
    }
    assert_eq!(host.last_path(), "/v1/records");
    let body = format!(r#"{{"record_id":"{record_id}"}}"#);
    answer_last_call(host, worker, 201, &body);
}

/// Loads a configuration whose only response rule is `rule` (JSON), with
/// `extra` top-level fields (`""`, or `"masking":{...},`); the field and
/// message of its error.
pub fn load_response_rule(extra: &str, rule: &str) -> Result<(), (String, String)> {
    crate::config::Config::from_json(
        format!(r#"{{{extra}"content_policy":{{"response_rules":[{rule}]}}}}"#).as_bytes(),
    )
    .map(|_| ())
    .map_err(|e| (e.field, e.message))
}

/// A review's state as the service answers it (reviewer `alice`), with
/// `extra` JSON fields.
pub fn review_state(status: &str, extra: &str) -> String {
    format!(r#"{{"id":"rev_a","status":"{status}","expires_at_ms":0,"reviewer":"alice"{extra}}}"#)
}

/// The response part of the record (of `rec_1`) once `stream` ended.
pub fn response_record(
    host: &mut MockHost,
    worker: &Worker,
    stream: &mut crate::stream_filter::StreamFilter,
) -> serde_json::Value {
    stream.on_log(host);
    stream.on_drop(host);
    worker.on_tick(host);
    assert_eq!(host.last_path(), "/v1/records/rec_1/response");
    let (_, call) = host.dispatched.last().unwrap();
    serde_json::from_slice(call.body.as_ref().unwrap()).unwrap()
}

pub fn path_of(call: &Callout) -> String {
    call.headers
        .iter()
        .find(|(k, _)| k == ":path")
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

impl Host for MockHost {
    fn request_headers(&self) -> Headers {
        self.check("request_headers");
        let mut all = pairs(&self.request_headers);
        all.extend(self.repeated_request_headers.iter().cloned());
        Headers::new(all)
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) {
        self.check("set_request_header");
        self.repeated_request_headers.retain(|(k, _)| k != name);
        match value {
            Some(v) => self.request_headers.insert(name.into(), v.into()),
            None => self.request_headers.remove(name),
        };
    }

    fn request_body(&self, size: usize) -> Vec<u8> {
        self.check("request_body");
        self.request_body[..size.min(self.request_body.len())].to_vec()
    }

    fn set_request_body(&mut self, replaced: usize, body: &[u8]) -> Result<(), String> {
        self.check("set_request_body");
        if self.body_write_fails {
            return Err("BadArgument".into());
        }
        let replaced = replaced.min(self.request_body.len());
        self.request_body.splice(..replaced, body.iter().copied());
        Ok(())
    }

    fn response_headers(&self) -> Headers {
        self.check("response_headers");
        let mut all = pairs(&self.response_headers);
        all.extend(self.repeated_response_headers.iter().cloned());
        Headers::new(all)
    }

    fn set_response_header(&mut self, name: &str, value: Option<&str>) {
        self.check("set_response_header");
        self.repeated_response_headers.retain(|(k, _)| k != name);
        match value {
            Some(v) => self.response_headers.insert(name.into(), v.into()),
            None => self.response_headers.remove(name),
        };
    }

    fn response_body(&self, size: usize) -> Vec<u8> {
        self.check("response_body");
        self.response_chunk[..size.min(self.response_chunk.len())].to_vec()
    }

    fn set_response_body(&mut self, replaced: usize, body: &[u8]) {
        self.check("set_response_body");
        let replaced = replaced.min(self.response_chunk.len());
        self.response_chunk.splice(..replaced, body.iter().copied());
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.check("property");
        let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
        self.properties.get(&path).cloned()
    }

    fn set_property(&mut self, name: &str, value: &[u8]) {
        self.check("set_property");
        self.state
            .push((self.effective, name.into(), value.to_vec()));
    }

    fn now_ms(&self) -> u64 {
        self.check("now_ms");
        self.now
    }

    /// Not counted: the VM answers it, not Envoy.
    fn memory_bytes(&self) -> u64 {
        self.vm_memory
    }

    fn nonce(&mut self) -> u64 {
        self.check("nonce");
        self.nonce.unwrap_or(0xabc)
    }

    fn dispatch(&mut self, cluster: &str, call: &Callout) -> Result<u32, String> {
        self.check("dispatch");
        assert_eq!(cluster, "countersign_approval");
        if self.dispatch_fails {
            return Err("BadArgument".into());
        }
        self.next_token += 1;
        self.dispatched.push((self.next_token, call.clone()));
        Ok(self.next_token)
    }

    fn callout_result(&self, _body_size: usize) -> CalloutResult {
        self.check("callout_result");
        self.answer.clone().unwrap()
    }

    fn set_tick_period(&mut self, ms: u64) {
        self.check("set_tick_period");
        self.tick_periods.push(ms);
    }

    fn set_effective_context(&mut self, context_id: u32) -> Result<(), String> {
        self.check("set_effective_context");
        self.effective = Some(context_id);
        Ok(())
    }

    fn send_reply(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        self.check("send_reply");
        self.replies.push(Reply {
            context: self.effective,
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.to_vec(),
        });
    }

    fn resume_request(&mut self) {
        self.check("resume_request");
        self.resumed.push(self.effective);
    }

    fn resume_response(&mut self) {
        self.check("resume_response");
        self.resumed_responses.push(self.effective);
    }

    fn count(&mut self, name: &str, delta: i64) {
        self.check("count");
        *self.metrics.entry(name.to_string()).or_default() += delta;
    }

    fn log(&mut self, level: Level, message: &str) {
        self.check("log");
        self.logs.push((level, message.to_string()));
    }
}

/// A header map of these pairs.
pub fn headers(pairs: &[(&str, &str)]) -> Headers {
    Headers::new(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}
