//! countersign's Envoy filter: a thin proxy-wasm adapter.
//!
//! It only reads what Envoy offers (headers, body, properties, callout
//! results, the clock), hands it to `countersign-core`, and applies the
//! verdict. All decisions live in the core crate.
//!
//! Holds are kept in per-VM (per-worker) thread-local maps rather than inside
//! the HTTP context, because retries after a failed long-poll are fired from
//! the root context's timer: a call dispatched there calls back into the root
//! context, which then finds the hold by its callout token.
//!
//! Calls that must land after their stream is gone (the response part of a
//! record, refusal records, cancellations) go to an outbox that the root
//! context sends and retries (`countersign_core::delivery`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use countersign_core::config::{Config, Endpoint, RecordMode};
use countersign_core::delivery::{admits, admits_routine, Delivery, DeliveryStep};
use countersign_core::hold::{
    cancel_callout, record_callout, response_record_callout, Callout, CalloutKind, CalloutResult,
    Hold, HoldStep, LocalReply, Release,
};
use countersign_core::identity::{forward_header_edits, identify};
use countersign_core::inspect::{screen_body, BodyVerdict, RequestInfo, Screening};
use countersign_core::mask::{mask_response_body, MaskAction, ResponseGuard, SseStreamMasker};
use countersign_core::record::{refusal_record, ResponseRecorder, MAX_RECORDED_RESPONSE};
use countersign_core::refusal::{Refusal, RefusalKind};
use countersign_core::request::{
    api_for_path, classify, path_only, HeadVerdict, RequestHead, INSPECTED_REQUEST_EDITS,
};
use countersign_core::response_head::{plan_response, ResponseHead, ResponsePlan, Withheld};
use countersign_core::wire::{ApiKind, HitCount};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{
    Action as WasmAction, BufferType, ContextType, LogLevel, MapType, MetricType,
};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { config: None }) });
}}

/// How often the root context looks for due retries and cancellations.
const TICK: Duration = Duration::from_millis(200);

/// A held request's state, shared between its HTTP context and the root.
struct HoldEntry {
    hold: Hold,
    config: Rc<Config>,
    /// Size of the buffered body, replaced whole by an edited body.
    body_len: usize,
    /// Set once the hold is over, either way.
    finished: bool,
    /// Set when the request was released to the model.
    released: Option<Release>,
    /// When it was released (for response timings).
    released_at_ms: u64,
}

type SharedHold = Rc<RefCell<HoldEntry>>;

thread_local! {
    /// Holds by HTTP context id.
    static HOLDS: RefCell<HashMap<u32, SharedHold>> = RefCell::new(HashMap::new());
    /// Outstanding callouts: token → (HTTP context id, which call).
    static CALLOUTS: RefCell<HashMap<u32, (u32, CalloutKind)>> = RefCell::new(HashMap::new());
    /// Retries due: (time in ms, HTTP context id).
    static RETRIES: RefCell<Vec<(u64, u32)>> = const { RefCell::new(Vec::new()) };
    /// Metric ids by name.
    static METRICS: RefCell<HashMap<String, u32>> = RefCell::new(HashMap::new());
    /// Calls the root context must send, due at a time (ms): see
    /// `countersign_core::delivery`.
    static OUTBOX: RefCell<Vec<(u64, Rc<Config>, Delivery)>> = const { RefCell::new(Vec::new()) };
    /// Deliveries sent and not yet answered, by callout token.
    static DELIVERIES: RefCell<HashMap<u32, (Rc<Config>, Delivery)>> = RefCell::new(HashMap::new());
    /// Deliveries queued or in flight, and the bytes of their bodies.
    static QUEUED: std::cell::Cell<(usize, usize)> = const { std::cell::Cell::new((0, 0)) };
}

/// Queues `call` for the root context to send (at its next tick) and to
/// retry until it lands; drops it (counted) when the queue is full. A
/// `routine` call (refusal record, cancellation) gets only half the queue.
fn deliver(config: &Rc<Config>, call: Callout, routine: bool) {
    let delivery = Delivery::new(call);
    let (n, bytes) = QUEUED.with(|q| q.get());
    let admitted = match routine {
        true => admits_routine(n, bytes, delivery.size()),
        false => admits(n, bytes, delivery.size()),
    };
    if !admitted {
        count("countersign_deliveries_dropped_total", 1);
        log::warn!("countersign: delivery queue full ({n} calls, {bytes} bytes); one dropped");
        return;
    }
    QUEUED.with(|q| q.set((n + 1, bytes.saturating_add(delivery.size()))));
    OUTBOX.with(|o| o.borrow_mut().push((0, config.clone(), delivery)));
}

/// A delivery left the queue for good (landed or given up).
fn delivered(delivery: &Delivery) {
    QUEUED.with(|q| {
        let (n, bytes) = q.get();
        q.set((n.saturating_sub(1), bytes.saturating_sub(delivery.size())));
    });
}

/// Sends every due delivery; called from the root context's timer, so the
/// answers come back to the root context, whatever became of the stream.
fn send_deliveries(now: u64) {
    let due: Vec<(Rc<Config>, Delivery)> = OUTBOX.with(|o| {
        let mut o = o.borrow_mut();
        let (due, later): (Vec<_>, Vec<_>) = o.drain(..).partition(|(at, _, _)| *at <= now);
        *o = later;
        due.into_iter().map(|(_, c, d)| (c, d)).collect()
    });
    for (config, mut delivery) in due {
        delivery.sending();
        match dispatch(&config, &delivery.call) {
            Ok(token) => DELIVERIES.with(|d| {
                d.borrow_mut().insert(token, (config, delivery));
            }),
            Err(e) => {
                let failed = CalloutResult {
                    status: None,
                    body: e.into_bytes(),
                };
                let step = delivery.on_result(&failed, now);
                after_delivery(config, delivery, step);
            }
        }
    }
}

fn after_delivery(config: Rc<Config>, delivery: Delivery, step: DeliveryStep) {
    match step {
        DeliveryStep::Done => delivered(&delivery),
        DeliveryStep::RetryAt(at) => {
            count("countersign_delivery_retries_total", 1);
            OUTBOX.with(|o| o.borrow_mut().push((at, config, delivery)));
        }
        DeliveryStep::GiveUp(why) => {
            delivered(&delivery);
            count("countersign_deliveries_failed_total", 1);
            let path = delivery
                .call
                .headers
                .iter()
                .find(|(k, _)| k == ":path")
                .map_or("", |(_, v)| v.as_str());
            log::warn!("countersign: gave up on POST {path} to the approval service: {why}");
        }
    }
}

/// Envoy stats (`/stats`, `/stats/prometheus` as `envoy_wasmcustom_...`).
/// Every worker VM defines the same names, so Envoy sums them.
fn count(name: &str, delta: i64) {
    let id = METRICS.with(|m| {
        let mut m = m.borrow_mut();
        if let Some(id) = m.get(name) {
            return Some(*id);
        }
        let kind = if name.ends_with("_total") {
            MetricType::Counter
        } else {
            MetricType::Gauge
        };
        let id = hostcalls::define_metric(kind, name).ok()?;
        m.insert(name.to_string(), id);
        Some(id)
    });
    if let Some(id) = id {
        let _ = hostcalls::increment_metric(id, delta);
    }
}

/// Outcome of a request: a metric and a filter-state value that access logs
/// can print (`%FILTER_STATE(wasm.countersign_decision:PLAIN)%`).
fn note_outcome(outcome: &str) {
    count(&format!("countersign_requests_{outcome}_total"), 1);
    let _ = hostcalls::set_property(vec!["countersign_decision"], Some(outcome.as_bytes()));
}

/// A random number per request. `RandomState` is seeded from the host's
/// randomness (WASI `random_get`), so no extra crate is needed.
fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    h.finish().max(1)
}

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

struct Root {
    config: Option<Rc<Config>>,
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        on_callout_response(token, body_size);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        match Config::from_json(&raw) {
            Ok(config) => {
                self.config = Some(Rc::new(config));
                if hostcalls::set_tick_period(TICK).is_err() {
                    log::error!("countersign: cannot set the retry timer");
                    return false;
                }
                true
            }
            Err(e) => {
                // Returning false makes Envoy refuse the plugin, and a stream
                // without configuration is refused as well: fail closed.
                self.config = None;
                log::error!("countersign: invalid plugin configuration: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let now = now_ms();
        let due: Vec<u32> = RETRIES.with(|r| {
            let mut r = r.borrow_mut();
            let (due, later): (Vec<_>, Vec<_>) = r.drain(..).partition(|(at, _)| *at <= now);
            *r = later;
            due.into_iter().map(|(_, id)| id).collect()
        });
        for ctx_id in due {
            if let Some(entry) = HOLDS.with(|h| h.borrow().get(&ctx_id).cloned()) {
                let step = {
                    let mut e = entry.borrow_mut();
                    let config = e.config.clone();
                    e.hold.on_retry(&config, now)
                };
                perform(ctx_id, &entry, step);
            }
        }
        send_deliveries(now);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            id: context_id,
            config: self.config.clone(),
            endpoint: None,
            info: RequestInfo::default(),
            hold: None,
            outcome: None,
            refused: false,
            response: None,
            screening: None,
            guard: None,
            record_guard: None,
            withheld: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One HTTP stream.
struct Stream {
    id: u32,
    config: Option<Rc<Config>>,
    /// Set when the request is an inference request being inspected.
    endpoint: Option<Endpoint>,
    info: RequestInfo,
    hold: Option<SharedHold>,
    /// `x-countersign-outcome` for the response, once decided.
    outcome: Option<&'static str>,
    refused: bool,
    /// The response part of the record, while the response flows.
    response: Option<ResponseCapture>,
    /// What masking and policy did to the request (for the response).
    screening: Option<Screening>,
    /// Masking / restore / response rules on the response, when active.
    guard: Option<ResponseFilter>,
    /// The same without restore, for the record (only when restoring).
    record_guard: Option<ResponseFilter>,
    /// Set when the answer cannot be read and is replaced whole.
    withheld: Option<Withheld>,
}

/// What guarding a response found, for the record.
struct GuardReport {
    blocked_by: Option<String>,
    hits: Vec<HitCount>,
}

impl ResponseFilter {
    fn new(guard: ResponseGuard, api: ApiKind, sse: bool) -> ResponseFilter {
        if sse {
            ResponseFilter::Sse(Box::new(SseStreamMasker::new(api, guard)))
        } else {
            ResponseFilter::Plain(guard, api)
        }
    }

    /// Rewrites one chunk (a plain body: the whole body, at its end).
    fn apply(&mut self, chunk: &[u8], end_of_stream: bool) -> (Vec<u8>, GuardReport) {
        let (out, blocked_by, mut hits, monitored) = match self {
            ResponseFilter::Sse(masker) => {
                let mut out = masker.push(chunk);
                if end_of_stream {
                    out.extend(masker.finish());
                }
                let r = masker.report();
                (
                    out,
                    r.blocked.map(|b| b.name().to_string()),
                    hits_of(&r.hits),
                    r.monitored_rules,
                )
            }
            ResponseFilter::Plain(guard, api) => match mask_response_body(guard, *api, chunk) {
                Ok(m) => match &m.blocked {
                    Some(b) => (
                        b.error_body(*api),
                        Some(b.name().to_string()),
                        hits_of(&m.hits),
                        m.monitored_rules,
                    ),
                    None => (
                        m.body.clone().unwrap_or_else(|| chunk.to_vec()),
                        None,
                        hits_of(&m.hits),
                        m.monitored_rules,
                    ),
                },
                // Unreadable: nothing unchecked leaves (fail closed).
                Err(_) => (
                    unreadable_response(*api),
                    Some("unreadable_response".to_string()),
                    Vec::new(),
                    Vec::new(),
                ),
            },
        };
        hits.extend(monitored.into_iter().map(|name| HitCount {
            name,
            action: "monitor".into(),
            count: 1,
        }));
        (out, GuardReport { blocked_by, hits })
    }
}

/// How a response is guarded.
enum ResponseFilter {
    /// Server-sent events, rewritten event by event with a hold-back window.
    Sse(Box<SseStreamMasker>),
    /// A plain body, buffered whole and rewritten once.
    Plain(ResponseGuard, ApiKind),
}

/// What the filter notes about a response for its record.
struct ResponseCapture {
    record_id: String,
    recorder: ResponseRecorder,
    status: u16,
    forwarded_at_ms: u64,
    ttfb_ms: Option<u64>,
    complete: bool,
    blocked_by: Option<String>,
    hits: Vec<HitCount>,
}

impl Stream {
    fn refuse(&mut self, refusal: &Refusal) -> WasmAction {
        self.refused = true;
        note_outcome(refusal.kind.outcome());
        // Every inference request leaves a record, refused ones included
        // (best effort: the refusal does not wait for it).
        if let (Some(config), Some(endpoint)) = (&self.config, &self.endpoint) {
            if config.records != RecordMode::Off {
                let record = refusal_record(&self.info, Some(endpoint.api), refusal);
                deliver(config, record_callout(config, &record), true);
            }
        }
        send_refusal(refusal);
        WasmAction::Pause
    }

    fn header(&self, name: &str) -> Option<String> {
        self.get_http_request_header(name)
    }

    /// The guard for the answer (masking, restore, response rules) when the
    /// request was forwarded and any of them applies.
    fn response_guard(&self) -> Option<ResponseGuard> {
        let screening = self.screening.as_ref()?;
        if self.refused || self.endpoint.is_none() {
            return None;
        }
        let guard = screening.response_guard();
        guard.is_active().then_some(guard)
    }

    /// Decides from the answer's head whether it is read (guarded,
    /// recorded) and sets that up; an answer that cannot be read is
    /// withheld (see `countersign_core::response_head`).
    fn plan_answer(&mut self, recorded: bool) {
        let Some(api) = self.endpoint.as_ref().map(|e| e.api) else {
            return;
        };
        let guard = self.response_guard();
        let content_type = self.get_http_response_header("content-type");
        let content_encoding = self.get_http_response_header("content-encoding");
        let head = ResponseHead {
            content_type: content_type.as_deref(),
            content_encoding: content_encoding.as_deref(),
        };
        match plan_response(api, &head, guard.is_some() || recorded) {
            ResponsePlan::Pass => {}
            ResponsePlan::Read { sse } => {
                let Some(guard) = guard else { return };
                // The body will change length.
                self.set_http_response_header("content-length", None);
                self.record_guard = self
                    .screening
                    .as_ref()
                    .and_then(|s| s.record_guard())
                    .map(|g| ResponseFilter::new(g, api, sse));
                self.guard = Some(ResponseFilter::new(guard, api, sse));
            }
            ResponsePlan::Withhold(withheld) => {
                count("countersign_responses_blocked_total", 1);
                log::warn!(
                    "countersign: {} answer withheld: {} (content-encoding {:?})",
                    self.info.request_id,
                    withheld.blocked_by,
                    content_encoding.as_deref().unwrap_or("")
                );
                self.set_http_response_header(":status", Some(&withheld.status.to_string()));
                for name in &withheld.remove {
                    self.set_http_response_header(name, None);
                }
                for (name, value) in &withheld.set {
                    self.set_http_response_header(name, Some(value));
                }
                self.withheld = Some(withheld);
            }
        }
    }

    fn start_hold(&mut self, config: &Rc<Config>, hold: Hold, step: HoldStep, body_len: usize) {
        let entry = Rc::new(RefCell::new(HoldEntry {
            hold,
            config: config.clone(),
            body_len,
            finished: false,
            released: None,
            released_at_ms: 0,
        }));
        HOLDS.with(|h| h.borrow_mut().insert(self.id, entry.clone()));
        self.hold = Some(entry.clone());
        count("countersign_held", 1);
        perform(self.id, &entry, step);
    }
}

impl Context for Stream {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        on_callout_response(token, body_size);
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> WasmAction {
        let Some(config) = self.config.clone() else {
            return self.refuse(&Refusal::new(
                RefusalKind::Misconfigured,
                None,
                "the countersign filter has no valid configuration; see the Envoy log",
            ));
        };
        let method = self.header(":method").unwrap_or_default();
        let path = self.header(":path").unwrap_or_default();
        let mut caller = None;
        if let Some(source) = &config.identity {
            let header = |name: &str| self.get_http_request_header(name);
            let property = |path: &[String]| {
                self.get_property(path.iter().map(String::as_str).collect())
                    .and_then(|b| String::from_utf8(b).ok())
            };
            match identify(source, &header, &property) {
                Ok(c) => caller = Some(c),
                Err(e) => {
                    let api = api_for_path(&config, &path);
                    return self.refuse(&Refusal::new(RefusalKind::Unauthenticated, api, e.0));
                }
            }
        }
        let approval_token = config
            .approval_tokens
            .as_ref()
            .and_then(|t| self.header(&t.header));
        let prefer_async = self.header("prefer").is_some_and(|p| {
            p.split(',')
                .any(|v| v.trim().eq_ignore_ascii_case("respond-async"))
        });
        let content_type = self.header("content-type");
        let content_encoding = self.header("content-encoding");
        let content_length = self.header("content-length");
        let upgrade = self.header("upgrade");
        let method_override = [
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
        ]
        .iter()
        .find_map(|h| self.header(h));
        let head = RequestHead {
            method: &method,
            path: &path,
            content_type: content_type.as_deref(),
            content_encoding: content_encoding.as_deref(),
            content_length: content_length.as_deref(),
            upgrade: upgrade.as_deref(),
            method_override: method_override.as_deref(),
        };
        let verdict = classify(&config, &head);
        self.info = RequestInfo {
            request_id: self.header("x-request-id").unwrap_or_default(),
            method: method.clone(),
            path: path_only(&path).to_string(),
            authority: self.header(":authority").unwrap_or_default(),
            route: self
                .get_property(vec!["route_name"])
                .and_then(|b| String::from_utf8(b).ok())
                .filter(|s| !s.is_empty()),
            caller,
            approval_token,
            prefer_async,
            source_address: self
                .get_property(vec!["source", "address"])
                .and_then(|b| String::from_utf8(b).ok()),
            received_at_ms: now_ms(),
            model: None,
            stream: false,
            hits: Vec::new(),
            nonce: nonce(),
        };
        match verdict {
            HeadVerdict::Refuse(r) => {
                self.endpoint = api_for_path(&config, &path)
                    .and_then(|api| config.endpoints.iter().find(|e| e.api == api).cloned());
                return self.refuse(&r);
            }
            HeadVerdict::Status(review_id) => {
                let (hold, step) = Hold::status(&config, self.info.clone(), &review_id);
                self.start_hold(&config, hold, step, 0);
                return WasmAction::Pause;
            }
            HeadVerdict::Pass | HeadVerdict::Inspect(_) => {}
        }
        // The caller's key and token never reach the model; the model's
        // credential is set here, the only place it exists.
        let tokens_header = config.approval_tokens.as_ref().map(|t| t.header.as_str());
        let edits = forward_header_edits(
            config.identity.as_ref(),
            tokens_header,
            config.upstream_credential.as_ref(),
        );
        for name in &edits.remove {
            self.set_http_request_header(name, None);
        }
        if let Some((name, value)) = &edits.set {
            self.set_http_request_header(name, Some(value));
        }
        match verdict {
            HeadVerdict::Inspect(endpoint) => {
                if end_of_stream {
                    return self.refuse(&Refusal::new(
                        RefusalKind::BadRequest,
                        Some(endpoint.api),
                        "request body is empty",
                    ));
                }
                for name in INSPECTED_REQUEST_EDITS.remove {
                    self.set_http_request_header(name, None);
                }
                for (name, value) in INSPECTED_REQUEST_EDITS.set {
                    self.set_http_request_header(name, Some(value));
                }
                self.endpoint = Some(endpoint);
                WasmAction::Continue
            }
            _ => WasmAction::Continue,
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> WasmAction {
        if self.refused || self.hold.is_some() {
            return WasmAction::Pause;
        }
        let (Some(config), Some(endpoint)) = (self.config.clone(), self.endpoint.clone()) else {
            return WasmAction::Continue;
        };
        if body_size > config.max_body_bytes {
            return self.refuse(&Refusal::too_large(
                Some(endpoint.api),
                config.max_body_bytes,
            ));
        }
        if !end_of_stream {
            return WasmAction::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        let (verdict, screening) = screen_body(&config, &endpoint, &self.info, &body, now_ms());
        self.info.hits = screening.hits.clone();
        let masked_values: u32 = screening
            .hits
            .iter()
            .filter(|h| {
                h.action == MaskAction::Redact.as_str()
                    || h.action == MaskAction::Pseudonymize.as_str()
            })
            .map(|h| h.count)
            .sum();
        if masked_values > 0 {
            count("countersign_masked_values_total", i64::from(masked_values));
        }
        let masked = screening.masked_body.clone();
        self.screening = Some(screening);
        match verdict {
            BodyVerdict::Forward(rule, facts) => {
                let info = facts.into_info(&self.info);
                let (hold, step) = Hold::forward(
                    &config,
                    endpoint.api,
                    info,
                    &rule,
                    &body,
                    masked.as_deref(),
                    now_ms(),
                );
                if let HoldStep::Release(release) = step {
                    // Records off: nothing to wait for.
                    if let Some(b) = &release.edited_body {
                        self.set_http_request_body(0, body.len(), b);
                    }
                    self.outcome = Some("allowed");
                    note_outcome("allowed");
                    return WasmAction::Continue;
                }
                self.start_hold(&config, hold, step, body.len());
                WasmAction::Pause
            }
            BodyVerdict::Refuse(r) => {
                log::info!(
                    "countersign: {} refused: {}",
                    self.info.request_id,
                    r.kind.code()
                );
                self.refuse(&r)
            }
            BodyVerdict::Hold(plan) => {
                let (hold, step) = Hold::start(&config, &plan, self.info.clone(), now_ms());
                let hold = hold.with_masked_body(masked.as_deref());
                log::info!(
                    "countersign: {} held for review (rule `{}`)",
                    self.info.request_id,
                    plan.rule.name
                );
                self.start_hold(&config, hold, step, body.len());
                WasmAction::Pause
            }
            BodyVerdict::Consume(claims, facts) => {
                let (hold, step) = Hold::consume(
                    &config,
                    endpoint.api,
                    self.info.clone(),
                    &claims,
                    facts,
                    &body,
                    now_ms(),
                );
                let hold = hold.with_masked_body(masked.as_deref());
                log::info!(
                    "countersign: {} presents the approval token of review {}",
                    self.info.request_id,
                    claims.rid
                );
                self.start_hold(&config, hold, step, body.len());
                WasmAction::Pause
            }
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> WasmAction {
        // HTTP/2 trailers end a request without a body callback that says
        // end of stream: without this, the buffered body would continue
        // uninspected. Inference APIs do not use trailers, so refuse.
        if self.refused || self.hold.is_some() {
            return WasmAction::Pause;
        }
        match &self.endpoint {
            Some(endpoint) => {
                let api = endpoint.api;
                self.refuse(&Refusal::new(
                    RefusalKind::BadRequest,
                    Some(api),
                    "request trailers are not accepted on inference endpoints",
                ))
            }
            None => WasmAction::Continue,
        }
    }

    fn on_http_response_headers(
        &mut self,
        _num_headers: usize,
        _end_of_stream: bool,
    ) -> WasmAction {
        let mut record_id = None;
        if let Some(entry) = &self.hold {
            let e = entry.borrow();
            if let Some(release) = &e.released {
                self.set_http_response_header("x-countersign-outcome", Some(release.decision));
                if let Some(id) = &release.review_id {
                    self.set_http_response_header("x-countersign-review-id", Some(id));
                }
                record_id = release.record_id.clone();
            }
        } else if let Some(outcome) = self.outcome {
            self.set_http_response_header("x-countersign-outcome", Some(outcome));
        }
        self.plan_answer(record_id.is_some());
        if let Some(record_id) = record_id {
            let now = now_ms();
            let forwarded_at_ms = self
                .hold
                .as_ref()
                .map(|e| e.borrow().released_at_ms)
                .unwrap_or(now);
            let content_type = self.get_http_response_header("content-type");
            self.response = Some(ResponseCapture {
                record_id,
                recorder: ResponseRecorder::new(
                    self.endpoint.as_ref().map(|e| e.api),
                    content_type.as_deref(),
                    MAX_RECORDED_RESPONSE,
                ),
                status: self
                    .get_http_response_header(":status")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
                forwarded_at_ms,
                ttfb_ms: Some(now.saturating_sub(forwarded_at_ms)),
                complete: false,
                blocked_by: self.withheld.as_ref().map(|w| w.blocked_by.to_string()),
                hits: Vec::new(),
            });
        }
        WasmAction::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> WasmAction {
        if let Some(withheld) = &self.withheld {
            // Nothing of an unreadable answer leaves; its replacement goes
            // out at the end.
            let out = if end_of_stream {
                withheld.body.clone()
            } else {
                Vec::new()
            };
            self.set_http_response_body(0, body_size, &out);
            if let Some(capture) = &mut self.response {
                capture.recorder.feed(&out);
                capture.complete |= end_of_stream;
            }
            return WasmAction::Continue;
        }
        if matches!(self.guard, Some(ResponseFilter::Plain(..))) && !end_of_stream {
            // A plain body is judged whole: buffer until the end.
            return WasmAction::Pause;
        }
        if self.guard.is_none() && self.response.is_none() {
            return WasmAction::Continue;
        }
        let chunk = self
            .get_http_response_body(0, body_size)
            .unwrap_or_default();
        let (out, report) = match &mut self.guard {
            Some(filter) => {
                let (out, report) = filter.apply(&chunk, end_of_stream);
                (Some(out), Some(report))
            }
            None => (None, None),
        };
        // With restore on, the caller gets original values back, but the
        // record must keep them masked: a second, restore-free pass.
        let recorded = self
            .record_guard
            .as_mut()
            .map(|filter| filter.apply(&chunk, end_of_stream).0);
        if let (Some(report), Some(capture)) = (report, &mut self.response) {
            if report.blocked_by.is_some() && capture.blocked_by.is_none() {
                count("countersign_responses_blocked_total", 1);
            }
            capture.blocked_by = report.blocked_by;
            capture.hits = report.hits;
        }
        let sent = match out {
            Some(out) => {
                self.set_http_response_body(0, body_size, &out);
                out
            }
            None => chunk,
        };
        if let Some(capture) = &mut self.response {
            capture.recorder.feed(recorded.as_deref().unwrap_or(&sent));
            capture.complete |= end_of_stream;
        }
        WasmAction::Continue
    }

    fn on_log(&mut self) {
        let (Some(capture), Some(config)) = (self.response.take(), self.config.clone()) else {
            return;
        };
        let total = now_ms().saturating_sub(capture.forwarded_at_ms);
        let completion = if capture.complete {
            "complete"
        } else {
            "reset"
        };
        let mut response =
            capture
                .recorder
                .finish(capture.status, capture.ttfb_ms, Some(total), completion);
        response.blocked_by = capture.blocked_by;
        response.hits = capture.hits;
        match response_record_callout(&config, &capture.record_id, &response) {
            Some(call) => deliver(&config, call, false),
            None => log::warn!(
                "countersign: not a record id, response not recorded: {:?}",
                capture.record_id
            ),
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if HOLDS.with(|h| h.borrow_mut().remove(&self.id)).is_some() {
            count("countersign_held", -1);
        }
        if let Some(entry) = &self.hold {
            let e = entry.borrow();
            if !e.finished {
                // The caller went away mid-review: tell the service so
                // reviewers do not decide on a request nobody waits for.
                if let Some(call) = e
                    .hold
                    .cancellable_review()
                    .and_then(|id| cancel_callout(&e.config, id))
                {
                    deliver(&e.config, call, true);
                }
            }
        }
    }
}

/// Routes a callout answer to the hold that made the call, whichever
/// context it was dispatched from.
fn callout_result(body_size: usize) -> CalloutResult {
    let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|s| s.parse::<u16>().ok());
    let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
        .ok()
        .flatten()
        .unwrap_or_default();
    CalloutResult { status, body }
}

fn on_callout_response(token: u32, body_size: usize) {
    if let Some((config, delivery)) = DELIVERIES.with(|d| d.borrow_mut().remove(&token)) {
        let step = delivery.on_result(&callout_result(body_size), now_ms());
        after_delivery(config, delivery, step);
        return;
    }
    let Some((ctx_id, kind)) = CALLOUTS.with(|c| c.borrow_mut().remove(&token)) else {
        return;
    };
    let Some(entry) = HOLDS.with(|h| h.borrow().get(&ctx_id).cloned()) else {
        return;
    };
    let result = callout_result(body_size);
    let step = {
        let mut e = entry.borrow_mut();
        let config = e.config.clone();
        e.hold.on_response(&config, kind, &result, now_ms())
    };
    perform(ctx_id, &entry, step);
}

/// Marks a hold finished and reads what the host calls after it need; the
/// borrow ends on return, before any of those calls.
fn finish<T>(entry: &SharedHold, read: impl FnOnce(&mut HoldEntry) -> T) -> T {
    let mut e = entry.borrow_mut();
    e.finished = true;
    read(&mut e)
}

/// Carries out one step of a hold.
fn perform(ctx_id: u32, entry: &SharedHold, step: HoldStep) {
    let mut step = step;
    // A failed dispatch is fed back as "no response"; the hold machine
    // always ends such a chain in a retry or a refusal.
    for _ in 0..4 {
        match step {
            HoldStep::Call(call) => {
                let config = entry.borrow().config.clone();
                match dispatch(&config, &call) {
                    Ok(token) => {
                        CALLOUTS.with(|c| c.borrow_mut().insert(token, (ctx_id, call.kind)));
                        return;
                    }
                    Err(why) => {
                        log::warn!("countersign: call to the approval service failed: {why}");
                        let no_answer = CalloutResult {
                            status: None,
                            body: Vec::new(),
                        };
                        step = entry.borrow_mut().hold.on_response(
                            &config,
                            call.kind,
                            &no_answer,
                            now_ms(),
                        );
                    }
                }
            }
            HoldStep::RetryAt(at) => {
                RETRIES.with(|r| r.borrow_mut().push((at, ctx_id)));
                return;
            }
            HoldStep::Release(release) => {
                // No RefCell borrow may be held across host calls: Envoy can
                // call back into this VM synchronously (local replies, resets).
                let body_len = finish(entry, |e| e.body_len);
                if hostcalls::set_effective_context(ctx_id).is_err() {
                    return;
                }
                if let Some(body) = &release.edited_body {
                    if hostcalls::set_buffer(BufferType::HttpRequestBody, 0, body_len, body)
                        .is_err()
                    {
                        let r = Refusal::new(
                            RefusalKind::ApprovalUnavailable,
                            None,
                            "could not apply the reviewer's edit",
                        );
                        send_refusal(&r);
                        return;
                    }
                }
                log::info!(
                    "countersign: {} {} (review {}, reviewer {})",
                    release.decision,
                    if release.edited_body.is_some() {
                        "with a replaced body"
                    } else {
                        "as sent"
                    },
                    release.review_id.as_deref().unwrap_or("-"),
                    release.reviewer.as_deref().unwrap_or("-"),
                );
                note_outcome(release.decision);
                {
                    let mut e = entry.borrow_mut();
                    e.released = Some(release);
                    e.released_at_ms = now_ms();
                }
                let _ = hostcalls::resume_http_request();
                return;
            }
            HoldStep::Respond(reply) => {
                finish(entry, |_| ());
                if hostcalls::set_effective_context(ctx_id).is_ok() {
                    if reply.status == 202 {
                        note_outcome("pending");
                    }
                    send_reply(&reply);
                }
                return;
            }
            HoldStep::Refuse(refusal) => {
                let record = finish(entry, |e| {
                    e.hold
                        .refusal_record(&refusal)
                        .map(|r| (e.config.clone(), r))
                });
                if let Some((config, record)) = record {
                    let _ = dispatch(&config, &record_callout(&config, &record));
                }
                if hostcalls::set_effective_context(ctx_id).is_ok() {
                    if refusal.kind != RefusalKind::NotFound {
                        note_outcome(refusal.kind.outcome());
                    }
                    log::info!(
                        "countersign: review {} ended: {}",
                        refusal.review_id.as_deref().unwrap_or("-"),
                        refusal.kind.code()
                    );
                    send_refusal(&refusal);
                }
                return;
            }
        }
    }
}

fn dispatch(config: &Config, call: &Callout) -> Result<u32, String> {
    let headers: Vec<(&str, &str)> = call
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    hostcalls::dispatch_http_call(
        &config.approval_cluster,
        headers,
        call.body.as_deref(),
        vec![],
        Duration::from_millis(call.timeout_ms),
    )
    .map_err(|s| format!("{s:?}"))
}

fn hits_of(hits: &[countersign_core::mask::Hit]) -> Vec<HitCount> {
    hits.iter()
        .map(|h| HitCount {
            name: h.detector.clone(),
            action: h.action.as_str().to_string(),
            count: u32::try_from(h.count).unwrap_or(u32::MAX),
        })
        .collect()
}

/// Replacement for a response that could not be inspected.
fn unreadable_response(api: ApiKind) -> Vec<u8> {
    Refusal::new(
        RefusalKind::ResponseUninspectable,
        Some(api),
        "the model's response could not be inspected, so it was withheld",
    )
    .body()
}

fn send_reply(reply: &LocalReply) {
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let _ = hostcalls::send_http_response(u32::from(reply.status), headers, Some(&reply.body));
}

fn send_refusal(refusal: &Refusal) {
    let headers = refusal.headers();
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let _ =
        hostcalls::send_http_response(u32::from(refusal.status()), headers, Some(&refusal.body()));
}
