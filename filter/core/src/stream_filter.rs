//! One HTTP stream through the filter: the request head (identity,
//! classification, header edits), the body (size limit, screening, the
//! verdict), trailers, the answer's head and body (outcome headers, the
//! response plan, the guard, the capture for the record) and the end of the
//! stream (the response part of the record, cancelling an open review).
//!
//! Everything it needs from Envoy goes through [`Host`]; holds and the
//! outbox are the VM's, in [`Worker`].

use std::rc::Rc;

use crate::answer_review::{error_release, plan_answer_review, plan_response_review};
use crate::config::{Config, Endpoint, RecordMode};
use crate::extract::gemini_model;
use crate::framing::Framing;
use crate::hold::{record_callout, response_record_callout, Hold, HoldStep};
use crate::host::{note_outcome, Action, Headers, Host, Level};
use crate::identity::{forward_header_edits, identify};
use crate::inspect::{
    choose, empty_body, screen_chosen, BodyVerdict, Parsed, RequestInfo, RuleChoice, Screening,
};
use crate::mask::{MaskAction, ResponseGuard};
use crate::record::{refusal_record, ResponseRecorder, MAX_RECORDED_RESPONSE};
use crate::refusal::{Refusal, RefusalKind};
use crate::request::{
    api_for_path, classify, path_only, sniffed_refusal, HeadVerdict, RequestHead,
    INSPECTED_REQUEST_EDITS,
};
use crate::response_filter::{ResponseCapture, ResponseFilter};
use crate::response_head::{
    forged_outcome_headers, plan_response, ResponseHead, ResponsePlan, Withheld,
};
use crate::shape::{may_be_json, sniff_prompt};
use crate::tool_stream::{End, HeldAnswer, ToolStream};
use crate::trace_context::TraceContext;
use crate::wire::{ApiKind, HitCount};
use crate::worker::{send_refusal, Worker};

/// Headers that ask for another method than the request line's; an
/// inference request carrying one is refused.
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Whether a `prefer` header asks for an asynchronous answer
/// (`respond-async`, RFC 7240) among its comma-separated preferences.
pub fn prefers_async(prefer: Option<&str>) -> bool {
    prefer.is_some_and(|p| {
        p.split(',')
            .any(|v| v.trim().eq_ignore_ascii_case("respond-async"))
    })
}

/// Where Envoy keeps the name of the route a request took: `xds.route_name`
/// in the Envoy this gateway runs on (1.40 has no top-level `route_name`
/// property: reading it gave nothing, so `rules[].route` never matched and
/// reviews and records carried no route), `route_name` in older ones.
pub const ROUTE_NAME_PROPERTIES: [&[&str]; 2] = [&["xds", "route_name"], &["route_name"]];

/// The request's route name, from the first of [`ROUTE_NAME_PROPERTIES`]
/// Envoy answers; `None` for none or an empty name.
fn route_name(host: &dyn Host) -> Option<String> {
    ROUTE_NAME_PROPERTIES
        .iter()
        .find_map(|path| host.property(path))
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|s| !s.is_empty())
}

/// One HTTP stream's state.
pub struct StreamFilter {
    id: u32,
    worker: Worker,
    config: Option<Rc<Config>>,
    /// Set when the request is an inference request being inspected.
    endpoint: Option<Endpoint>,
    info: RequestInfo,
    /// Set once the request is held (its state is in the worker).
    held: bool,
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
    /// The answer's body is being buffered in Envoy (plain answers under a
    /// guard, withheld answers): trailers can still change it.
    response_buffered: bool,
    /// A `review` response rule is in scope of a plain answer: its head
    /// waits with its body, which is held for a reviewer when it calls a
    /// tool the rule names ([`crate::answer_review`]).
    reviews_answer: bool,
    /// A plain answer the guard reads whole: its head waits with its body
    /// (`hold_answer_heads`), so an answer the guard replaces by an error
    /// gets the error's status and headers. The body is buffered whole
    /// anyway, so the caller waits no longer for its first byte.
    head_held: bool,
    /// With `reviews_answer`: what the answer's guard found in it (for
    /// `review` rules on detectors).
    answer_hits: Vec<HitCount>,
    /// A `review` response rule is in scope of a streamed answer: it goes
    /// out until its first tool-call event, the rest is held
    /// ([`crate::tool_stream`]).
    tool_stream: Option<ToolStream>,
    /// The rest of a streamed answer waits for a reviewer.
    stream_held: bool,
    /// The guard stopped reading this stream (counted once).
    unscanned: bool,
    /// A request to a path that is not an inference endpoint, whose body is
    /// being looked at: a prompt there is refused (see `shape::sniff_prompt`).
    sniffing: bool,
    /// Whether `info` holds the request's Envoy properties yet.
    properties_read: bool,
}

impl StreamFilter {
    /// The stream of HTTP context `id`; `config` is `None` when the plugin
    /// configuration was invalid (every request is then refused).
    pub fn new(id: u32, config: Option<Rc<Config>>, worker: Worker) -> StreamFilter {
        StreamFilter {
            id,
            worker,
            config,
            endpoint: None,
            info: RequestInfo::default(),
            held: false,
            outcome: None,
            refused: false,
            response: None,
            screening: None,
            guard: None,
            record_guard: None,
            withheld: None,
            response_buffered: false,
            reviews_answer: false,
            head_held: false,
            answer_hits: Vec::new(),
            tool_stream: None,
            stream_held: false,
            unscanned: false,
            sniffing: false,
            properties_read: false,
        }
    }

    fn refuse(&mut self, host: &mut dyn Host, refusal: &Refusal) -> Action {
        self.refused = true;
        note_outcome(host, refusal.kind.outcome());
        // Every inference request leaves a record, refused ones included
        // (best effort: the refusal does not wait for it), and so does a
        // prompt sent to a path that is not an inference endpoint.
        let api = self.endpoint.as_ref().map(|e| e.api);
        if let Some(config) = self.config.clone() {
            if config.records != RecordMode::Off && (api.is_some() || self.sniffing) {
                self.read_properties(host);
                let record = refusal_record(&self.info, api, refusal);
                self.worker.deliver(
                    host,
                    &config,
                    record_callout(&config, self.info.trace.as_ref(), &record),
                    true,
                );
            }
        }
        send_refusal(host, refusal);
        Action::Pause
    }

    /// The request's info for a hold that waits for a reviewer: with the
    /// worker whose watch its review goes to ([`crate::watch`]), named only
    /// when something is held (the allow path asks nothing of the worker).
    fn held_info(&mut self, host: &mut dyn Host) -> RequestInfo {
        self.info.watcher = Some(self.worker.watcher(host));
        self.info.clone()
    }

    /// Reads the request's Envoy properties (route name, downstream
    /// address) into its info, once. Only requests that are matched by
    /// route, recorded, reviewed or audited need them: an `allow` without a
    /// record makes no property read.
    fn read_properties(&mut self, host: &mut dyn Host) {
        if self.properties_read {
            return;
        }
        self.properties_read = true;
        let utf8 = |b: Vec<u8>| String::from_utf8(b).ok();
        self.info.route = route_name(host);
        self.info.source_address = host.property(&["source", "address"]).and_then(utf8);
    }

    fn start_hold(
        &mut self,
        host: &mut dyn Host,
        config: &Rc<Config>,
        (hold, step): (Hold, HoldStep),
        body_len: usize,
        waits_for_review: Option<String>,
    ) -> Action {
        self.held = true;
        self.worker.start_hold(
            host,
            self.id,
            config,
            (hold, step),
            body_len,
            waits_for_review,
        );
        Action::Pause
    }

    /// Who would wait for a reviewer (`""`: no caller), or the refusal when
    /// `hold_limits` are reached.
    fn review_slot(&self, config: &Config, api: ApiKind) -> Result<String, Refusal> {
        let caller = self.info.caller.as_ref().map_or("", |c| c.name.as_str());
        let (mine, all) = self.worker.waiting_for_review(caller);
        let limits = config.hold_limits;
        let who = if all >= limits.total as usize {
            "in this gateway worker"
        } else if mine >= limits.per_caller as usize {
            "for this caller"
        } else {
            return Ok(caller.to_string());
        };
        let mut refusal = Refusal::new(
            RefusalKind::TooManyHolds,
            Some(api),
            format!("too many requests are already waiting for review {who}; try again later"),
        );
        refusal.retry_after_s = Some(limits.retry_after_s);
        Err(refusal)
    }

    /// A held answer's `plan` with who waits for its reviewer, or the
    /// refusal (logged) when `hold_limits` are reached: the answer does not
    /// leave, the caller gets the API's error (a stream: its error event).
    fn answer_slot<P>(
        &self,
        host: &mut dyn Host,
        config: &Config,
        api: ApiKind,
        plan: Option<P>,
    ) -> Result<Option<(P, String)>, Refusal> {
        let Some(plan) = plan else {
            return Ok(None);
        };
        match self.review_slot(config, api) {
            Ok(waiter) => Ok(Some((plan, waiter))),
            Err(refusal) => {
                let msg = format!(
                    "countersign: {} answer refused: {}",
                    self.info.request_id, refusal.message
                );
                host.log(Level::Warn, &msg);
                Err(refusal)
            }
        }
    }

    /// The request head.
    pub fn on_request_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Action {
        let Some(config) = self.config.clone() else {
            return self.refuse(
                host,
                &Refusal::new(
                    RefusalKind::Misconfigured,
                    None,
                    "the countersign filter has no valid configuration; see the Envoy log",
                ),
            );
        };
        // One read of the whole map, not one host call per header.
        let headers = host.request_headers();
        let method = headers.value(":method").unwrap_or_default();
        let path = headers.value(":path").unwrap_or_default();
        let mut caller = None;
        if let Some(source) = &config.identity {
            let header = |name: &str| headers.value(name);
            let property = |path: &[String]| {
                let path: Vec<&str> = path.iter().map(String::as_str).collect();
                host.property(&path).and_then(|b| String::from_utf8(b).ok())
            };
            let repeated = |name: &str| headers.values(name).nth(1).is_some();
            match identify(source, &header, &repeated, &property) {
                Ok(c) => caller = Some(c),
                Err(e) => {
                    let api = api_for_path(&config, &path);
                    let refusal = Refusal::new(RefusalKind::Unauthenticated, api, e.0);
                    return self.refuse(host, &refusal);
                }
            }
        }
        let approval_token = config
            .approval_tokens
            .as_ref()
            .and_then(|t| headers.value(&t.header));
        // A server decodes every `content-encoding` header, in order.
        let content_encoding = headers.contains("content-encoding").then(|| {
            headers
                .values("content-encoding")
                .collect::<Vec<_>>()
                .join(", ")
        });
        let head = RequestHead {
            method: &method,
            path: &path,
            content_type: headers.get("content-type"),
            content_type_repeated: headers.values("content-type").nth(1).is_some(),
            content_encoding: content_encoding.as_deref(),
            content_length: headers.get("content-length"),
            upgrade: headers.get("upgrade"),
            method_override: METHOD_OVERRIDE_HEADERS.iter().find_map(|h| headers.get(h)),
        };
        let verdict = classify(&config, &head);
        self.info = RequestInfo {
            request_id: headers.value("x-request-id").unwrap_or_default(),
            method: method.clone(),
            path: path_only(&path).to_string(),
            authority: headers.value(":authority").unwrap_or_default(),
            // Read when the request needs them (`read_properties`).
            route: None,
            caller,
            approval_token,
            prefer_async: prefers_async(headers.get("prefer")),
            source_address: None,
            received_at_ms: host.now_ms(),
            model: None,
            stream: false,
            hits: Vec::new(),
            nonce: host.nonce(),
            trace: TraceContext::from_headers(&headers),
            audit_due: false,
            watcher: None,
        };
        match verdict {
            HeadVerdict::Refuse(r) => {
                self.endpoint = api_for_path(&config, &path)
                    .and_then(|api| config.endpoints.iter().find(|e| e.api == api).cloned());
                return self.refuse(host, &r);
            }
            HeadVerdict::Status(review_id) => {
                self.read_properties(host);
                let started = Hold::status(&config, self.info.clone(), &review_id);
                return self.start_hold(host, &config, started, 0, None);
            }
            HeadVerdict::Pass | HeadVerdict::PassUnlisted | HeadVerdict::Inspect(_) => {}
        }
        // The caller's key and token never reach the model; the model's
        // credential is set here, the only place it exists, and only where
        // policy looked (not on a path passing by `other_requests: pass`).
        let tokens_header = config.approval_tokens.as_ref().map(|t| t.header.as_str());
        let edits = forward_header_edits(
            config.identity.as_ref(),
            tokens_header,
            config.upstream_credential.as_ref(),
            !matches!(verdict, HeadVerdict::PassUnlisted),
        );
        // Removing a header that is not there would be a host call for
        // nothing.
        for name in edits.remove.iter().filter(|n| headers.contains(n)) {
            host.set_request_header(name, None);
        }
        if let Some((name, value)) = &edits.set {
            host.set_request_header(name, Some(value));
        }
        // A body on a path that is not an inference endpoint is looked at:
        // a prompt there would reach the model unreviewed.
        self.sniffing =
            matches!(verdict, HeadVerdict::Pass | HeadVerdict::PassUnlisted) && !end_of_stream;
        if let HeadVerdict::Inspect(endpoint) = verdict {
            if end_of_stream {
                return self.refuse(host, &empty_body(endpoint.api));
            }
            for name in INSPECTED_REQUEST_EDITS.remove {
                if headers.contains(name) {
                    host.set_request_header(name, None);
                }
            }
            for (name, value) in INSPECTED_REQUEST_EDITS.set {
                if !headers.is_only(name, value) {
                    host.set_request_header(name, Some(value));
                }
            }
            self.endpoint = Some(endpoint);
        }
        Action::Continue
    }

    /// A body chunk of a request to a path that is not an inference
    /// endpoint: a body that cannot be JSON passes at once; a JSON body is
    /// read whole (up to `max_body_bytes`) and refused if it is a prompt.
    fn sniff_body(&mut self, host: &mut dyn Host, body_size: usize, end_of_stream: bool) -> Action {
        let Some(config) = self.config.clone() else {
            return Action::Continue;
        };
        // The first bytes tell whether it can be JSON at all.
        match may_be_json(&host.request_body(body_size.min(64))) {
            Some(false) => {
                self.sniffing = false;
                return Action::Continue;
            }
            None if !end_of_stream => return Action::Pause,
            _ => {}
        }
        let path = self.info.path.clone();
        if body_size > config.max_body_bytes {
            let refusal = Refusal::new(
                RefusalKind::TooLarge,
                None,
                format!(
                    "`{path}` is not an inference endpoint, and its JSON body is larger than {} bytes, too large to check for a prompt",
                    config.max_body_bytes
                ),
            );
            return self.refuse(host, &refusal);
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let Some(refusal) = sniffed_refusal(&path, &sniff_prompt(&host.request_body(body_size)))
        else {
            self.sniffing = false;
            return Action::Continue;
        };
        let action = self.refuse(host, &refusal);
        self.sniffing = false;
        action
    }

    /// Forwards an allowed request (once its record is durable, when
    /// records are required).
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        host: &mut dyn Host,
        config: &Rc<Config>,
        api: ApiKind,
        rule: RuleChoice,
        facts: Parsed,
        body: &[u8],
        masked: Option<Vec<u8>>,
        now: u64,
    ) -> Action {
        // The model and stream flag stay known for a review of the answer.
        facts.fill(&mut self.info);
        let info = self.info.clone();
        let (hold, step) = Hold::forward(config, api, info, &rule, body, masked.as_deref(), now);
        if let HoldStep::Release(release) = step {
            // Records off: nothing to wait for.
            if let Some(b) = &release.edited_body {
                // The masked body could not replace the caller's:
                // nothing unmasked goes to the model.
                if host.set_request_body(body.len(), b).is_err() {
                    let refusal = Refusal::new(
                        RefusalKind::ApprovalUnavailable,
                        Some(api),
                        "could not apply the masked body",
                    );
                    return self.refuse(host, &refusal);
                }
            }
            self.outcome = Some("allowed");
            note_outcome(host, "allowed");
            return Action::Continue;
        }
        self.start_hold(host, config, (hold, step), body.len(), None)
    }

    /// A request body chunk; the body is judged whole, at its end.
    pub fn on_request_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        if self.refused || self.held {
            return Action::Pause;
        }
        if self.sniffing {
            return self.sniff_body(host, body_size, end_of_stream);
        }
        let (Some(config), Some(endpoint)) = (self.config.clone(), self.endpoint.clone()) else {
            return Action::Continue;
        };
        if body_size > config.max_body_bytes {
            let refusal = Refusal::too_large(Some(endpoint.api), config.max_body_bytes);
            return self.refuse(host, &refusal);
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = host.request_body(body_size);
        let now = host.now_ms();
        if config.matches_routes() {
            self.read_properties(host);
        }
        let (verdict, screening) = match choose(&config, &endpoint, &self.info, &body) {
            Ok(chosen) => {
                if chosen.may_describe_request(&self.info) {
                    self.read_properties(host);
                }
                screen_chosen(&config, &endpoint, &self.info, &body, chosen, now)
            }
            Err(r) => (BodyVerdict::Refuse(r), Screening::default()),
        };
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
            host.count("countersign_masked_values_total", i64::from(masked_values));
        }
        let masked = screening.masked_body.clone();
        self.screening = Some(screening);
        let id = self.info.request_id.clone();
        match verdict {
            BodyVerdict::ForwardAudited(rule, facts, audit) => {
                let queued = crate::hold::audit_call(&config, self.info.trace.as_ref(), &audit)
                    .is_some_and(|call| self.worker.deliver(host, &config, call, false));
                match queued {
                    true => {
                        host.count("countersign_spot_checks_total", 1);
                        // The record says an audit is due, so one that the
                        // outbox gives up on is missing where it shows.
                        self.info.audit_due = true;
                    }
                    // Fail closed: a spot check that cannot be queued (not
                    // encodable, or the outbox full) does not let the
                    // request through unseen.
                    false => {
                        let refusal = Refusal::new(
                            RefusalKind::ApprovalUnavailable,
                            Some(endpoint.api),
                            "could not queue the audit of this request",
                        );
                        return self.refuse(host, &refusal);
                    }
                }
                self.forward(host, &config, endpoint.api, rule, facts, &body, masked, now)
            }
            BodyVerdict::Forward(rule, facts) => {
                self.forward(host, &config, endpoint.api, rule, facts, &body, masked, now)
            }
            BodyVerdict::Refuse(r) => {
                let msg = format!("countersign: {id} refused: {}", r.kind.code());
                host.log(Level::Info, &msg);
                self.refuse(host, &r)
            }
            BodyVerdict::Hold(plan) => {
                let waiter = match self.review_slot(&config, endpoint.api) {
                    Ok(w) => w,
                    Err(r) => {
                        host.log(
                            Level::Warn,
                            &format!("countersign: {id} refused: {}", r.message),
                        );
                        return self.refuse(host, &r);
                    }
                };
                self.info.model = Some(plan.review.model.clone());
                let (hold, step) = Hold::start(&config, &plan, self.held_info(host), now);
                let hold = hold.with_masked_body(masked.as_deref());
                let msg = format!(
                    "countersign: {id} held for review (rule `{}`)",
                    plan.rule.name
                );
                host.log(Level::Info, &msg);
                self.start_hold(host, &config, (hold, step), body.len(), Some(waiter))
            }
            BodyVerdict::Consume(claims, facts) => {
                let api = endpoint.api;
                // The model and stream flag stay known for the record.
                facts.fill(&mut self.info);
                let info = self.info.clone();
                let masked = masked.as_deref();
                let (hold, step) = Hold::consume(&config, api, info, &claims, &body, masked, now);
                let msg = format!(
                    "countersign: {id} presents the approval token of review {}",
                    claims.rid
                );
                host.log(Level::Info, &msg);
                self.start_hold(host, &config, (hold, step), body.len(), None)
            }
        }
    }

    /// Request trailers. HTTP/2 trailers end a request without a body
    /// callback that says end of stream: without this, the buffered body
    /// would continue uninspected. Inference APIs do not use trailers, so
    /// they are refused there.
    pub fn on_request_trailers(&mut self, host: &mut dyn Host) -> Action {
        if self.refused || self.held {
            return Action::Pause;
        }
        match &self.endpoint {
            Some(endpoint) => {
                let refusal = Refusal::new(
                    RefusalKind::BadRequest,
                    Some(endpoint.api),
                    "request trailers are not accepted on inference endpoints",
                );
                self.refuse(host, &refusal)
            }
            // Trailers would end a JSON body before it was looked at.
            None if self.sniffing => {
                let refusal = Refusal::new(
                    RefusalKind::BadRequest,
                    None,
                    "request trailers are not accepted on a JSON body that may be a prompt",
                );
                self.refuse(host, &refusal)
            }
            None => Action::Continue,
        }
    }

    /// The answer's head: outcome headers, the response plan, and the
    /// capture for the record when the request was recorded.
    /// `end_of_stream`: the answer has no body, so nothing would let a
    /// held head go; it is never held.
    pub fn on_response_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Action {
        let mut record_id = None;
        let mut forwarded_at_ms = None;
        // The outcome headers this callback sets; whether the head is the
        // upstream's (a forwarded request's), not a reply of the filter's
        // own (a refusal, a 202), which carries the filter's headers.
        let mut set: Vec<&str> = Vec::new();
        let from_upstream;
        if self.held {
            let released = self.worker.released(self.id);
            from_upstream = released.is_some();
            if let Some((release, at)) = released {
                host.set_response_header("x-countersign-outcome", Some(release.decision));
                set.push("x-countersign-outcome");
                if let Some(id) = &release.review_id {
                    host.set_response_header("x-countersign-review-id", Some(id));
                    set.push("x-countersign-review-id");
                }
                record_id = release.record_id;
                forwarded_at_ms = Some(at);
            }
        } else {
            from_upstream = !self.refused;
            if let Some(outcome) = self.outcome {
                host.set_response_header("x-countersign-outcome", Some(outcome));
                set.push("x-countersign-outcome");
            }
        }
        // The answer's head is read, whole and once: for what reads the
        // answer, and for the outcome headers only the filter may set.
        let guard = self.response_guard();
        let reads = guard.is_some() || record_id.is_some() || self.has_answer_review_rules();
        let head = (reads || from_upstream).then(|| host.response_headers());
        if let (Some(head), true) = (&head, from_upstream) {
            for name in forged_outcome_headers(head, &set) {
                host.set_response_header(name, None);
            }
        }
        let head = head.filter(|_| reads);
        let framing = match &head {
            Some(head) => self.plan_answer(host, head, guard),
            None => None,
        };
        if let Some(record_id) = record_id {
            let now = host.now_ms();
            // A record id is only set on a release, which sets the time.
            let forwarded_at_ms = forwarded_at_ms.unwrap_or(now);
            self.response = Some(ResponseCapture {
                record_id,
                recorder: ResponseRecorder::new(
                    self.endpoint.as_ref().map(|e| e.api),
                    framing,
                    MAX_RECORDED_RESPONSE,
                ),
                // A withheld answer's status is the one that replaced it.
                status: match &self.withheld {
                    Some(withheld) => withheld.status,
                    None => head
                        .as_ref()
                        .and_then(|h| h.get(":status"))
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0),
                },
                forwarded_at_ms,
                ttfb_ms: Some(now.saturating_sub(forwarded_at_ms)),
                complete: false,
                blocked_by: self.withheld.as_ref().map(|w| w.blocked_by.to_string()),
                hits: Vec::new(),
                unscanned: false,
            });
        }
        if (self.reviews_answer || self.head_held) && !end_of_stream {
            // The head waits for the body's verdict: a rejection or a
            // block may make the answer an error, with another status.
            return Action::Pause;
        }
        Action::Continue
    }

    /// Whether `review` response rules apply to this forwarded request.
    fn has_answer_review_rules(&self) -> bool {
        !self.refused
            && self
                .screening
                .as_ref()
                .is_some_and(|s| !s.review_rules.is_empty())
    }

    /// Whether a `review` response rule is in scope of this answer: a
    /// successful answer to a forwarded request.
    fn answer_reviewable(&self, head: &Headers) -> bool {
        let success = head
            .get(":status")
            .and_then(|s| s.parse::<u16>().ok())
            .is_some_and(|s| (200..300).contains(&s));
        success && self.has_answer_review_rules()
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

    /// Whether the answer is one JSON array sent element by element: a
    /// successful answer to Gemini's `streamGenerateContent` (with
    /// `alt=sse` it is an event stream instead, told by its content type).
    fn array_stream(&self, head: &Headers) -> bool {
        let success = head
            .get(":status")
            .and_then(|s| s.parse::<u16>().ok())
            .is_some_and(|s| (200..300).contains(&s));
        success
            && self
                .endpoint
                .as_ref()
                .is_some_and(|e| e.api == ApiKind::GeminiGenerateContent)
            && gemini_model(&self.info.path).is_some_and(|(_, streamed)| streamed)
    }

    /// Decides from the head of an answer that is read (guarded,
    /// recorded) how it is read, and sets that up; an answer that cannot be
    /// read is withheld (see [`crate::response_head`]). Returns how a read
    /// stream is framed (`None` for a plain body, or an answer not read as
    /// sent).
    fn plan_answer(
        &mut self,
        host: &mut dyn Host,
        headers: &Headers,
        guard: Option<ResponseGuard>,
    ) -> Option<Framing> {
        let api = self.endpoint.as_ref().map(|e| e.api)?;
        let reviewable = self.answer_reviewable(headers);
        let head = ResponseHead::of(headers, self.array_stream(headers));
        match plan_response(api, &head, true) {
            ResponsePlan::Pass => None,
            ResponsePlan::Read { framing } => {
                if let Some(guard) = guard {
                    // The body will change length.
                    host.set_response_header("content-length", None);
                    // A plain body is judged whole: its head can wait with
                    // it at no cost, and then carry an error's status.
                    self.head_held = framing.is_none()
                        && self.config.as_ref().is_some_and(|c| c.hold_answer_heads);
                    self.record_guard = self
                        .screening
                        .as_ref()
                        .and_then(|s| s.record_guard())
                        .map(|g| ResponseFilter::new(g, api, framing));
                    self.guard = Some(ResponseFilter::new(guard, api, framing));
                }
                if reviewable && framing.is_none() {
                    host.set_response_header("content-length", None);
                    self.reviews_answer = true;
                }
                if let (true, Some(framing)) = (reviewable, framing) {
                    self.hold_tool_stream(host, api, framing);
                }
                framing
            }
            ResponsePlan::Withhold(withheld) => {
                host.count("countersign_responses_blocked_total", 1);
                let msg = format!(
                    "countersign: {} answer withheld: {} (content-encoding {:?}, content-type {:?})",
                    self.info.request_id,
                    withheld.blocked_by,
                    head.content_encodings.join(", "),
                    headers.values("content-type").collect::<Vec<_>>().join(", ")
                );
                host.log(Level::Warn, &msg);
                host.set_response_header(":status", Some(&withheld.status.to_string()));
                for name in &withheld.remove {
                    host.set_response_header(name, None);
                }
                for (name, value) in &withheld.set {
                    host.set_response_header(name, Some(value));
                }
                self.withheld = Some(withheld);
                None
            }
        }
    }

    /// An answer body chunk.
    pub fn on_response_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        let buffers = self.reviews_answer
            || self.withheld.is_some()
            || self.guard.as_ref().is_some_and(ResponseFilter::buffers);
        if buffers && !end_of_stream {
            // A plain body is judged whole, and nothing of an unreadable
            // answer leaves (its replacement goes out at the end): buffer.
            // Envoy then keeps the body for the end, or for the trailers.
            if self.withheld.is_some() {
                host.set_response_body(body_size, &[]);
            }
            self.response_buffered = true;
            return Action::Pause;
        }
        if self.withheld.is_none()
            && self.guard.is_none()
            && self.response.is_none()
            && !self.reviews_answer
            && self.tool_stream.is_none()
        {
            return Action::Continue;
        }
        let chunk = host.response_body(body_size);
        if self.reviews_answer {
            return self.review_answer(host, body_size, chunk);
        }
        if self.tool_stream.is_some() {
            return self.tool_stream_chunk(host, body_size, chunk, end_of_stream);
        }
        if let Some(out) = self.answer_chunk(host, chunk, end_of_stream) {
            host.set_response_body(body_size, &out);
        }
        Action::Continue
    }

    /// Response trailers end the answer without an end-of-stream body
    /// callback (HTTP/2, or HTTP/1.1 chunked with trailers): what the guard
    /// buffered would otherwise go out with them unread. A buffered body is
    /// judged here as at its end. A streamed answer went out chunk by chunk
    /// and Envoy keeps no body to add to: text the stream masker still held
    /// back cannot be sent before the trailers, and is dropped (never sent
    /// unmasked), with a warning and a metric.
    pub fn on_response_trailers(&mut self, host: &mut dyn Host) -> Action {
        if self.tool_stream.is_some() {
            self.tool_stream_trailers(host);
            return Action::Continue;
        }
        if self.withheld.is_none() && self.guard.is_none() && self.response.is_none() {
            return Action::Continue;
        }
        if self.response_buffered {
            let buffered = host.response_body(usize::MAX).len();
            return self.on_response_body(host, buffered, true);
        }
        let unsent = self
            .answer_chunk(host, Vec::new(), true)
            .map_or(0, |tail| tail.len());
        if unsent > 0 {
            host.count("countersign_response_tails_dropped_total", 1);
            let msg = format!(
                "countersign: a streamed answer ended with trailers while {unsent} bytes were held back for masking; they were not sent"
            );
            host.log(Level::Warn, &msg);
        }
        Action::Continue
    }

    /// Runs the guard and the recorder over an answer chunk; the bytes to
    /// send instead of it, when the guard (or a withheld answer) changes it.
    fn answer_chunk(&mut self, host: &mut dyn Host, chunk: Vec<u8>, end: bool) -> Option<Vec<u8>> {
        if let Some(withheld) = &self.withheld {
            let out = if end {
                withheld.body.clone()
            } else {
                Vec::new()
            };
            if let Some(capture) = &mut self.response {
                capture.recorder.feed(&out);
                capture.complete |= end;
            }
            return Some(out);
        }
        let (out, recorded) = self.guard_chunk(host, &chunk, end);
        self.capture_chunk(out.as_deref().unwrap_or(&chunk), recorded.as_deref(), end);
        out
    }

    /// Runs the guard over an answer chunk and notes its report: the bytes
    /// to send instead of the chunk (when the guard changes it), and the
    /// bytes to record when they differ from those.
    fn guard_chunk(
        &mut self,
        host: &mut dyn Host,
        chunk: &[u8],
        end: bool,
    ) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let (out, report) = match &mut self.guard {
            Some(filter) => {
                let (out, report) = filter.apply(chunk, end);
                (Some(out), Some(report))
            }
            None => (None, None),
        };
        // With restore on, the caller gets original values back, but the
        // record must keep them masked: a second, restore-free pass.
        let recorded = self
            .record_guard
            .as_mut()
            .map(|filter| filter.apply(chunk, end).0);
        if let (Some(report), true) = (&report, self.reviews_answer) {
            self.answer_hits.clone_from(&report.hits);
        }
        // A plain answer replaced by an error whose head is still held
        // gets the error's status and headers (its `content-length` went
        // when the guard was set up).
        let replaced = report.as_ref().and_then(|r| r.status);
        if let (Some(status), true) = (replaced, self.head_held || self.reviews_answer) {
            host.set_response_header(":status", Some(&status.to_string()));
            host.set_response_header("content-type", Some("application/json"));
            if let Some(capture) = &mut self.response {
                capture.status = status;
            }
        }
        // Where the guard only monitors and stopped reading a stream it
        // could not follow, the rest passes unread: counted and logged
        // once, and the record says so, so no one takes the hits counted
        // before for the whole answer's.
        if report.as_ref().is_some_and(|r| r.unscanned) && !self.unscanned {
            self.unscanned = true;
            host.count("countersign_responses_unscanned_total", 1);
            let msg = format!(
                "countersign: {} a streamed answer's channels could not be followed; where the guard only monitors, the rest passed unread and its hits were not counted",
                self.info.request_id
            );
            host.log(Level::Warn, &msg);
        }
        if let (Some(report), Some(capture)) = (report, &mut self.response) {
            if report.blocked_by.is_some() && capture.blocked_by.is_none() {
                host.count("countersign_responses_blocked_total", 1);
            }
            capture.blocked_by = report.blocked_by;
            capture.hits = report.hits;
            capture.unscanned = report.unscanned;
        }
        (out, recorded)
    }

    /// Feeds what was sent (or `recorded`, where it differs) to the record.
    fn capture_chunk(&mut self, sent: &[u8], recorded: Option<&[u8]>, end: bool) {
        if let Some(capture) = &mut self.response {
            capture.recorder.feed(recorded.unwrap_or(sent));
            capture.complete |= end;
        }
    }

    /// A plain answer under a `review` rule, complete: guarded as any, then
    /// held for a reviewer when the rule asks for it (the head and body
    /// wait in Envoy; the worker lets them go, see
    /// [`Worker::answered`]), else let go at once.
    fn review_answer(&mut self, host: &mut dyn Host, body_size: usize, chunk: Vec<u8>) -> Action {
        let (out, recorded) = self.guard_chunk(host, &chunk, true);
        let blocked = self
            .response
            .as_ref()
            .is_some_and(|c| c.blocked_by.is_some());
        let sent = out.as_deref().unwrap_or(&chunk);
        let (Some(config), Some(api), Some(screening)) = (
            self.config.clone(),
            self.endpoint.as_ref().map(|e| e.api),
            self.screening.as_ref(),
        ) else {
            return Action::Continue;
        };
        let recorded_bytes = recorded.as_deref().unwrap_or(sent);
        let plan = match blocked {
            // Already an error: nothing of the answer is left to review.
            true => Ok(None),
            false => plan_answer_review(
                &config,
                api,
                &self.info,
                &screening.review_rules,
                &screening.review_prompt,
                sent,
                recorded_bytes,
            )
            .map(|plan| plan.map(|plan| (plan, None))),
        };
        // No tool call to review: a rule on the answer's text may hold it.
        let plan = match plan {
            Ok(None) if !blocked => plan_response_review(
                &config,
                api,
                &self.info,
                screening,
                &chunk,
                sent,
                recorded_bytes,
                &self.answer_hits,
            )
            .map(|plan| plan.map(|(plan, edit)| (plan, Some(edit)))),
            other => other,
        };
        // A held answer waits for a reviewer like a held prompt: within
        // `hold_limits`, or an error instead of the answer.
        let plan = plan.and_then(|plan| self.answer_slot(host, &config, api, plan));
        match plan {
            Ok(Some(((plan, edit), waiter))) => {
                let info = self.held_info(host);
                let (hold, step) = Hold::answer(&config, plan, info, host.now_ms());
                let hold = match edit {
                    Some(edit) => hold.with_response_edit(edit),
                    None => hold,
                };
                self.held = true;
                self.worker.start_hold(
                    host,
                    self.id,
                    &config,
                    (hold, step),
                    body_size,
                    Some(waiter),
                );
                Action::Pause
            }
            Ok(None) => {
                let sent = sent.to_vec();
                self.capture_chunk(&sent, recorded.as_deref(), true);
                host.set_response_body(body_size, &sent);
                Action::Continue
            }
            Err(refusal) => {
                let release = error_release(String::new(), refusal.kind.outcome(), &refusal);
                host.set_response_header(":status", Some(&refusal.status().to_string()));
                for (name, value) in &release.headers {
                    host.set_response_header(name, Some(value));
                }
                self.capture_chunk(&release.body, None, true);
                if let Some(capture) = &mut self.response {
                    capture.blocked_by = Some(refusal.kind.code().to_string());
                }
                host.set_response_body(body_size, &release.body);
                Action::Continue
            }
        }
    }

    /// A streamed answer under a `review` rule with `streams: hold`: its
    /// events go out until the first tool-call event, the rest is held
    /// ([`crate::tool_stream`]).
    fn hold_tool_stream(&mut self, host: &mut dyn Host, api: ApiKind, framing: Framing) {
        let Some(screening) = &self.screening else {
            return;
        };
        let limit = screening.review_rules.max_held_bytes();
        // The held part may change length.
        host.set_response_header("content-length", None);
        let apart = self.record_guard.is_some();
        self.tool_stream = Some(ToolStream::new(api, framing, limit, apart));
    }

    /// Whether the stream masker ended the answer with an error event.
    fn stream_blocked(&self) -> bool {
        matches!(&self.guard, Some(ResponseFilter::Stream(m)) if m.blocked().is_some())
    }

    /// A chunk of a streamed answer under `streams: hold`: guarded, then
    /// sent up to the first tool-call event; at the end, what was held is
    /// let go at once (no rule names its calls), or waits for a reviewer
    /// with the last chunk (the worker lets it go, [`Worker::answered`]).
    fn tool_stream_chunk(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        chunk: Vec<u8>,
        end: bool,
    ) -> Action {
        let (out, recorded) = self.guard_chunk(host, &chunk, end);
        let sent = out.unwrap_or(chunk);
        if !end {
            let Some(stream) = &mut self.tool_stream else {
                return Action::Continue;
            };
            let now = stream.push(&sent, recorded.as_deref());
            self.capture_chunk(&now.send, Some(&now.record), false);
            host.set_response_body(body_size, &now.send);
            return Action::Continue;
        }
        let Some(stream) = self.tool_stream.take() else {
            return Action::Continue;
        };
        let (record, held) = match stream.finish(&sent, recorded.as_deref()) {
            End::Done(out) => {
                self.capture_chunk(&out.send, Some(&out.record), true);
                host.set_response_body(body_size, &out.send);
                return Action::Continue;
            }
            End::Held(record, held) => (record, held),
        };
        let mut held = held;
        let (Some(config), Some(screening), Some(api)) = (
            self.config.clone(),
            self.screening.as_ref(),
            self.endpoint.as_ref().map(|e| e.api),
        ) else {
            return Action::Continue;
        };
        let plan = match self.stream_blocked() {
            // Already an error: nothing of the tool calls is left to review.
            true => Ok(None),
            false => held.plan(
                &config,
                &self.info,
                &screening.review_rules,
                &screening.review_prompt,
            ),
        };
        let plan = plan.and_then(|plan| self.answer_slot(host, &config, api, plan));
        let release = match plan {
            Ok(Some(((review, on_reject), waiter))) => {
                self.capture_chunk(&[], Some(&record), false);
                let answer = (HeldAnswer::Stream(held), on_reject);
                let info = self.held_info(host);
                let hold = Hold::held_answer(&config, &review, answer, info, host.now_ms());
                self.held = true;
                self.stream_held = true;
                self.worker
                    .start_hold(host, self.id, &config, hold, body_size, Some(waiter));
                return Action::Pause;
            }
            Ok(None) if self.stream_blocked() => held.only_last(),
            Ok(None) => held.as_is(),
            Err(refusal) => {
                let release = held.error(String::new(), refusal.kind.outcome(), &refusal);
                if let Some(capture) = &mut self.response {
                    capture.blocked_by = Some(refusal.kind.code().to_string());
                }
                crate::tool_stream::Out {
                    send: release.body,
                    record: release.recorded,
                }
            }
        };
        let mut recorded = record;
        recorded.extend(release.record);
        self.capture_chunk(&release.send, Some(&recorded), true);
        host.set_response_body(body_size, &release.send);
        Action::Continue
    }

    /// Trailers end a stream under `streams: hold`: Envoy keeps no body to
    /// add to, so what is held (and what the masker held back) cannot be
    /// sent before them; it is dropped, never sent unreviewed.
    fn tool_stream_trailers(&mut self, host: &mut dyn Host) {
        let (out, recorded) = self.guard_chunk(host, &[], true);
        let Some(stream) = self.tool_stream.take() else {
            return;
        };
        let (unsent, record) = match stream.finish(&out.unwrap_or_default(), recorded.as_deref()) {
            End::Done(out) => (out.send.len(), out.record),
            End::Held(record, held) => (held.as_is().send.len(), record),
        };
        self.capture_chunk(&[], Some(&record), true);
        if unsent > 0 {
            host.count("countersign_response_tails_dropped_total", 1);
            let msg = format!(
                "countersign: a streamed answer ended with trailers while {unsent} bytes were held back for review; they were not sent"
            );
            host.log(Level::Warn, &msg);
        }
    }

    /// The access-log phase: the response part of the record goes to the
    /// outbox (the stream may be gone before it lands).
    pub fn on_log(&mut self, host: &mut dyn Host) {
        let (Some(mut capture), Some(config)) = (self.response.take(), self.config.clone()) else {
            return;
        };
        let answered = match self.reviews_answer || self.stream_held {
            true => self.worker.answered(self.id),
            false => None,
        };
        if let Some(answered) = &answered {
            capture.recorder.feed(&answered.recorded);
            capture.complete = true;
        }
        let total = host.now_ms().saturating_sub(capture.forwarded_at_ms);
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
        response.unscanned = capture.unscanned;
        if let Some(answered) = answered {
            response.answer_review_id = Some(answered.review_id);
            response.answer_decision = Some(answered.decision.to_string());
        }
        match response_record_callout(
            &config,
            self.info.trace.as_ref(),
            &capture.record_id,
            &response,
        ) {
            Some(call) => {
                self.worker.deliver(host, &config, call, false);
            }
            None => {
                let msg = format!(
                    "countersign: not a record id, response not recorded: {:?}",
                    capture.record_id
                );
                host.log(Level::Warn, &msg);
            }
        }
    }

    /// The stream's context is gone: its hold ends, and an open review is
    /// cancelled.
    pub fn on_drop(&mut self, host: &mut dyn Host) {
        self.worker.end_stream(host, self.id);
    }

    /// A callout answer that came back to this stream's context.
    pub fn on_callout_response(&mut self, host: &mut dyn Host, token: u32, body_size: usize) {
        self.worker.on_callout_response(host, token, body_size);
    }
}

#[cfg(test)]
mod answer_reading_tests;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::testing::MockHost;

    const CHAT: &str = "/v1/chat/completions";
    const BODY: &[u8] = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    const MASKING: &str = r#""masking":{"profiles":{"default":{"detectors":{"email":"redact"}}}}"#;
    const PENDING: &str = r#"{"id":"rev_1","status":"pending","expires_at_ms":0}"#;
    const ID: u32 = 7;

    /// A stream under `config`, whose records (unless it says otherwise)
    /// are sent at once, each alone: batching is the worker's (its tests).
    fn setup(config: &str) -> (Worker, MockHost, StreamFilter) {
        let mut json: serde_json::Value = serde_json::from_str(config).unwrap();
        if json.get("record_batch_ms").is_none() {
            json["record_batch_ms"] = serde_json::json!(0);
        }
        let config = Rc::new(Config::from_json(json.to_string().as_bytes()).unwrap());
        let worker = Worker::new();
        let host = MockHost::new(&worker);
        let stream = StreamFilter::new(ID, Some(config), worker.clone());
        (worker, host, stream)
    }

    /// The request head of `body` to `path`, then the whole body.
    fn send(host: &mut MockHost, stream: &mut StreamFilter, path: &str, body: &[u8]) -> Action {
        host.request("POST", path, body);
        assert_eq!(stream.on_request_headers(host, false), Action::Continue);
        stream.on_request_body(host, body.len(), true)
    }

    /// The approval service answers the last call.
    fn answer(host: &mut MockHost, worker: &Worker, status: u16, body: &str) {
        crate::testing::answer_last_call(host, worker, status, body);
    }

    /// The worker's watch learns that the review was decided: `state`.
    fn decided(host: &mut MockHost, worker: &Worker, state: &str) {
        crate::testing::answer_watch(host, worker, &[state]);
    }

    fn approved(extra: &str) -> String {
        format!(
            r#"{{"id":"rev_1","status":"approved","expires_at_ms":0,"reviewer":"alice"{extra}}}"#
        )
    }

    /// The answer's head arrives: held (a plain answer the guard reads
    /// whole) or let go.
    fn respond(host: &mut MockHost, stream: &mut StreamFilter, content_type: &str) -> Action {
        host.response_headers = [(":status", "200"), ("content-type", content_type)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        host.response_headers
            .insert("content-length".into(), "10".into());
        stream.on_response_headers(host, false)
    }

    fn chunk(host: &mut MockHost, stream: &mut StreamFilter, data: &[u8], eos: bool) -> Action {
        host.response_chunk = data.to_vec();
        stream.on_response_body(host, data.len(), eos)
    }

    #[test]
    fn a_body_over_the_limit_is_refused_and_recorded() {
        let (worker, mut host, mut stream) = setup(r#"{"max_body_bytes":20}"#);
        host.request("POST", CHAT, BODY);
        assert_eq!(
            stream.on_request_headers(&mut host, false),
            Action::Continue
        );
        // The body is buffered while it fits.
        assert_eq!(stream.on_request_body(&mut host, 10, false), Action::Pause);
        assert!(host.replies.is_empty());
        assert_eq!(stream.on_request_body(&mut host, 21, false), Action::Pause);
        let reply = &host.replies[0];
        assert_eq!(reply.status, 413);
        assert_eq!(reply.json()["error"]["code"], "request_too_large");
        assert_eq!(host.metric("countersign_requests_invalid_total"), 1);
        assert_eq!(host.outcome().as_deref(), Some("invalid"));
        // The refusal record waits in the outbox; nothing else happens.
        assert_eq!(worker.queued().0, 1);
        assert!(host.dispatched.is_empty());
        assert_eq!(stream.on_request_body(&mut host, 40, true), Action::Pause);
        assert_eq!(host.replies.len(), 1);
        assert_eq!(host.violations.get(), 0);
    }

    /// A configuration whose one rule allows everything, with a spot check.
    fn spot_checked(share: f64, mode: &str) -> String {
        format!(
            r#"{{"records":"off","rules":[{{"name":"open","action":"allow","spot_check":{{"share":{share},"mode":"{mode}"}}}}]}}"#
        )
    }

    /// A nonce whose draw is `draw` (to 32 bits).
    fn nonce_drawing(draw: f64) -> u64 {
        let high = (draw * 4_294_967_296.0) as u64;
        (high << 32) | 0x1234
    }

    #[test]
    fn spot_check_draws_come_from_the_nonce() {
        assert_eq!(crate::inspect::spot_check_draw(0), 0.0);
        assert_eq!(crate::inspect::spot_check_draw(nonce_drawing(0.5)), 0.5);
        assert!(crate::inspect::spot_check_draw(u64::MAX) < 1.0);
    }

    #[test]
    fn an_audit_spot_check_forwards_at_once_and_queues_an_audit_review() {
        let (worker, mut host, mut stream) = setup(&spot_checked(0.25, "audit"));
        host.nonce = Some(nonce_drawing(0.2));
        assert_eq!(send(&mut host, &mut stream, CHAT, BODY), Action::Continue);
        assert_eq!(host.outcome().as_deref(), Some("allowed"));
        assert!(host.replies.is_empty());
        // The review goes out through the outbox, not on the caller's path.
        assert!(host.dispatched.is_empty());
        assert_eq!(worker.queued().0, 1);
        worker.on_tick(&mut host);
        let (_, call) = host.dispatched.last().unwrap();
        assert_eq!(host.last_path(), "/v1/reviews");
        let review: serde_json::Value =
            serde_json::from_slice(call.body.as_deref().unwrap()).unwrap();
        assert_eq!(review["mode"], "audit");
        // A review of the request (kind `prompt`, the default, not sent).
        assert_eq!(review.get("kind"), None);
        assert_eq!(review["rule"], "open");
        assert_eq!(review["spot_check"]["mode"], "audit");
        assert_eq!(review["spot_check"]["share"], 0.25);
        assert_eq!(review["spot_check"]["nonce"], nonce_drawing(0.2));
        assert_eq!(
            review["spot_check"]["draw"],
            crate::inspect::spot_check_draw(nonce_drawing(0.2))
        );
        assert_eq!(host.metric("countersign_spot_checks_total"), 1);
    }

    /// The record of a request a spot check forwarded says an audit of it
    /// is due, so an audit the outbox never files is missing where the
    /// record shows; records of requests not drawn say nothing.
    #[test]
    fn an_audited_requests_record_says_an_audit_is_due() {
        let cfg =
            spot_checked(0.25, "audit").replace(r#""records":"off""#, r#""records":"required""#);
        for (draw, due) in [(0.2, true), (0.75, false)] {
            let (worker, mut host, mut stream) = setup(&cfg);
            host.nonce = Some(nonce_drawing(draw));
            assert_eq!(send(&mut host, &mut stream, CHAT, BODY), Action::Pause);
            assert_eq!(host.last_path(), "/v1/records");
            let (_, call) = host.dispatched.last().unwrap();
            let record: serde_json::Value =
                serde_json::from_slice(call.body.as_deref().unwrap()).unwrap();
            assert_eq!(record["decision"], "allowed");
            match due {
                true => assert_eq!(record["audit_due"], true),
                false => assert_eq!(record.get("audit_due"), None),
            }
            answer(&mut host, &worker, 201, r#"{"record_id":"rec_1"}"#);
            assert_eq!(host.resumed.len(), 1, "{draw}");
        }
    }

    /// An audit that cannot be queued (the outbox is full) refuses the
    /// request: forwarded, nobody would ever review it.
    #[test]
    fn a_spot_check_whose_audit_cannot_be_queued_is_refused() {
        let (worker, mut host, mut stream) = setup(&spot_checked(0.25, "audit"));
        let c = Rc::new(Config::from_json(b"{}").unwrap());
        let filler = crate::hold::Callout {
            kind: crate::hold::CalloutKind::Record,
            headers: vec![(":path".into(), "/v1/records/rec_1/response".into())],
            body: Some(Vec::new()),
            timeout_ms: 1_000,
        };
        for _ in 0..crate::delivery::MAX_QUEUED {
            assert!(worker.deliver(&mut host, &c, filler.clone(), false));
        }
        host.nonce = Some(nonce_drawing(0.2));
        assert_eq!(send(&mut host, &mut stream, CHAT, BODY), Action::Pause);
        assert_eq!(host.outcome().as_deref(), Some("unavailable"));
        assert_eq!(host.replies.len(), 1);
        assert_eq!(host.replies[0].status, 503);
        assert_eq!(host.metric("countersign_spot_checks_total"), 0);
    }

    #[test]
    fn a_hold_spot_check_holds_the_request_like_a_review() {
        let (worker, mut host, mut stream) = setup(&spot_checked(0.25, "hold"));
        host.nonce = Some(nonce_drawing(0.1));
        assert_eq!(send(&mut host, &mut stream, CHAT, BODY), Action::Pause);
        assert_eq!(host.last_path(), "/v1/reviews");
        let (_, call) = host.dispatched.last().unwrap();
        let review: serde_json::Value =
            serde_json::from_slice(call.body.as_deref().unwrap()).unwrap();
        assert_eq!(review["rule"], "open (spot check)");
        assert_eq!(
            review.get("kind"),
            None,
            "a held review is an ordinary review"
        );
        assert_eq!(review["spot_check"]["mode"], "hold");
        answer(&mut host, &worker, 201, PENDING);
        assert!(host.resumed.is_empty());
    }

    #[test]
    fn requests_outside_the_share_are_only_forwarded() {
        for mode in ["audit", "hold"] {
            let (worker, mut host, mut stream) = setup(&spot_checked(0.25, mode));
            host.nonce = Some(nonce_drawing(0.75));
            assert_eq!(send(&mut host, &mut stream, CHAT, BODY), Action::Continue);
            assert!(host.dispatched.is_empty(), "{mode}");
            assert_eq!(worker.queued().0, 0, "{mode}");
            assert_eq!(host.metric("countersign_spot_checks_total"), 0);
        }
    }

    #[test]
    fn without_a_random_nonce_every_request_is_spot_checked() {
        let (worker, mut host, mut stream) = setup(&spot_checked(0.01, "audit"));
        host.nonce = Some(0);
        assert_eq!(send(&mut host, &mut stream, CHAT, BODY), Action::Continue);
        assert_eq!(worker.queued().0, 1);
    }

    #[test]
    fn an_empty_body_is_refused() {
        let (worker, mut host, mut stream) = setup(r#"{"records":"off"}"#);
        host.request("POST", CHAT, b"");
        assert_eq!(stream.on_request_headers(&mut host, true), Action::Pause);
        assert_eq!(host.replies[0].status, 400);
        assert!(host.replies[0].json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("empty"));
        assert_eq!(worker.queued().0, 0);
    }

    #[test]
    fn trailers_are_refused_on_inference_endpoints_only() {
        let (_worker, mut host, mut stream) = setup(r#"{"records":"off"}"#);
        host.request("POST", CHAT, BODY);
        stream.on_request_headers(&mut host, false);
        assert_eq!(stream.on_request_body(&mut host, 5, false), Action::Pause);
        assert_eq!(stream.on_request_trailers(&mut host), Action::Pause);
        assert_eq!(host.replies[0].status, 400);
        assert!(host.replies[0].json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("trailers"));

        let (_worker, mut host, mut stream) = setup(r#"{"records":"off","other_requests":"pass"}"#);
        host.request("GET", "/healthz", b"");
        assert_eq!(
            stream.on_request_headers(&mut host, false),
            Action::Continue
        );
        assert_eq!(stream.on_request_body(&mut host, 3, true), Action::Continue);
        assert_eq!(stream.on_request_trailers(&mut host), Action::Continue);
        assert!(host.replies.is_empty());
    }

    #[test]
    fn prompts_on_paths_that_are_not_endpoints_are_refused() {
        let config = r#"{"records":"off","other_requests":"pass"}"#;
        // Ollama's native chat path and an OpenAI path under a prefix:
        // prompts.
        for (path, body) in [
            (
                "/ollama/api/chat",
                &br#"{"model":"llama3","messages":[{"role":"user","content":"hi"}]}"#[..],
            ),
            (
                "/proxy/v1/chat/completions",
                br#"{"model":"m","messages":[]}"#,
            ),
            (
                "/ollama/api/generate",
                br#"  {"model":"llama3","Prompt":"hi"}"#,
            ),
        ] {
            let (_worker, mut host, mut stream) = setup(config);
            host.request("POST", path, body);
            assert_eq!(
                stream.on_request_headers(&mut host, false),
                Action::Continue
            );
            // Undecided while only the first bytes are in.
            assert_eq!(stream.on_request_body(&mut host, 1, false), Action::Pause);
            assert_eq!(
                stream.on_request_body(&mut host, body.len(), true),
                Action::Pause
            );
            let reply = &host.replies[0];
            assert_eq!(reply.status, 403, "{path}");
            let message = reply.json()["error"]["message"]
                .as_str()
                .unwrap()
                .to_string();
            assert!(
                message.contains(path) && message.contains("prompt"),
                "{message}"
            );
        }
        // Other bodies pass: JSON without a prompt, and anything not JSON
        // (at its first byte, without buffering the rest).
        let (_worker, mut host, mut stream) = setup(config);
        host.request("POST", "/api/pull", br#"{"model":"llama3"}"#);
        stream.on_request_headers(&mut host, false);
        assert_eq!(
            stream.on_request_body(&mut host, 18, true),
            Action::Continue
        );
        let (_worker, mut host, mut stream) = setup(config);
        host.request("POST", "/upload", b"--boundary\r\n...");
        stream.on_request_headers(&mut host, false);
        assert_eq!(
            stream.on_request_body(&mut host, 4, false),
            Action::Continue
        );
        assert!(host.replies.is_empty());
        // JSON a lenient backend reads but a strict parser does not: refused.
        let (_worker, mut host, mut stream) = setup(config);
        host.request("POST", "/api/chat", br#"{"messages":NaN}"#);
        stream.on_request_headers(&mut host, false);
        assert_eq!(stream.on_request_body(&mut host, 16, true), Action::Pause);
        assert_eq!(host.replies[0].status, 400);
        // Too large to look at: refused, not passed.
        let (_worker, mut host, mut stream) =
            setup(r#"{"records":"off","other_requests":"pass","max_body_bytes":1024}"#);
        let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(2000));
        host.request("POST", "/api/chat", big.as_bytes());
        stream.on_request_headers(&mut host, false);
        assert_eq!(
            stream.on_request_body(&mut host, big.len(), false),
            Action::Pause
        );
        assert_eq!(host.replies[0].status, 413);
    }

    #[test]
    fn head_edits_prefer_and_method_override() {
        assert!(prefers_async(Some("return=minimal, Respond-Async")));
        assert!(!prefers_async(Some("respond-asynchronously")));
        assert!(!prefers_async(None));

        let (_worker, mut host, mut stream) = setup(r#"{"records":"off"}"#);
        host.request("POST", CHAT, BODY);
        host.request_headers
            .insert("content-length".into(), BODY.len().to_string());
        host.request_headers
            .insert("accept-encoding".into(), "gzip".into());
        assert_eq!(
            stream.on_request_headers(&mut host, false),
            Action::Continue
        );
        // The body may be replaced, and the answer must be readable.
        assert!(!host.request_headers.contains_key("content-length"));
        assert_eq!(host.request_headers["accept-encoding"], "identity");

        for header in METHOD_OVERRIDE_HEADERS {
            let (_worker, mut host, mut stream) = setup(r#"{"records":"off"}"#);
            host.request("POST", CHAT, BODY);
            host.request_headers.insert(header.into(), "GET".into());
            assert_eq!(stream.on_request_headers(&mut host, false), Action::Pause);
            assert!(host.replies[0].status >= 400, "{header}");
        }
    }

    /// The trace headers a call carries.
    fn trace_of(call: &crate::hold::Callout) -> Vec<(String, String)> {
        call.headers
            .iter()
            .filter(|(k, _)| k == "traceparent" || k == "tracestate")
            .cloned()
            .collect()
    }

    #[test]
    fn every_call_for_a_request_carries_the_callers_trace_context() {
        const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (worker, mut host, mut stream) = setup(r#"{"default_action":"review"}"#);
        host.request("POST", CHAT, BODY);
        host.request_headers
            .insert("traceparent".into(), PARENT.into());
        host.request_headers
            .insert("tracestate".into(), "congo=t61rcWkgMzE".into());
        assert_eq!(
            stream.on_request_headers(&mut host, false),
            Action::Continue
        );
        // The model gets the caller's headers as they came.
        assert_eq!(host.request_headers["traceparent"], PARENT);
        stream.on_request_body(&mut host, BODY.len(), true);
        answer(&mut host, &worker, 201, PENDING);
        decided(&mut host, &worker, &approved(""));
        answer(&mut host, &worker, 201, r#"{"record_id":"rec_1"}"#);
        assert_eq!(host.resumed, [Some(ID)]);
        respond(&mut host, &mut stream, "application/json");
        chunk(&mut host, &mut stream, br#"{"choices":[]}"#, true);
        stream.on_log(&mut host);
        stream.on_drop(&mut host);
        worker.on_tick(&mut host);
        assert_eq!(
            host.paths(),
            [
                "/v1/reviews",
                "/v1/watch",
                "/v1/records",
                "/v1/records/rec_1/response"
            ]
        );
        let expected = vec![
            ("traceparent".to_string(), PARENT.to_string()),
            ("tracestate".to_string(), "congo=t61rcWkgMzE".to_string()),
        ];
        for (_, call) in &host.dispatched {
            // The worker's watch serves every held request: it carries none.
            let watch = crate::testing::path_of(call) == "/v1/watch";
            assert_eq!(
                trace_of(call),
                if watch { vec![] } else { expected.clone() },
                "{}",
                crate::testing::path_of(call)
            );
        }

        // A malformed traceparent is no parent: the calls carry none.
        let (worker, mut host, mut stream) = setup(r#"{"default_action":"review"}"#);
        host.request("POST", CHAT, BODY);
        host.request_headers
            .insert("traceparent".into(), "00-zz-00f067aa0ba902b7-01".into());
        stream.on_request_headers(&mut host, false);
        stream.on_request_body(&mut host, BODY.len(), true);
        answer(&mut host, &worker, 201, PENDING);
        stream.on_drop(&mut host);
        worker.on_tick(&mut host);
        // The caller left before the timer sent a watch: the watch only
        // tells that the review is gone (the cancel call may be lost).
        assert_eq!(
            host.paths(),
            ["/v1/reviews", "/v1/watch", "/v1/reviews/rev_1/cancel"]
        );
        let watch: serde_json::Value =
            serde_json::from_slice(host.dispatched[1].1.body.as_deref().unwrap()).unwrap();
        assert_eq!(watch["gone"], serde_json::json!(["rev_1"]));
        assert_eq!(watch["timeout_ms"], 0);
        for (_, call) in &host.dispatched {
            assert!(
                trace_of(call).is_empty(),
                "{}",
                crate::testing::path_of(call)
            );
        }
    }

    /// An upstream's `x-countersign-*` outcome headers (a backend claiming
    /// an answer review that never happened, or an outcome on a request
    /// that passed untouched) never reach the caller; the filter's own do.
    #[test]
    fn outcome_headers_come_only_from_the_filter() {
        let forged = [
            (":status", "200"),
            ("content-type", "application/json"),
            ("x-countersign-outcome", "approved"),
            ("x-countersign-review-id", "rev_forged"),
            ("x-countersign-answer-outcome", "approved"),
            ("x-countersign-answer-review-id", "rev_forged"),
        ];
        let upstream = |host: &mut MockHost| {
            host.response_headers = forged
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        };
        // Allowed: the filter's outcome, nothing else.
        let (_worker, mut host, mut stream) =
            setup(r#"{"default_action":"allow","records":"off"}"#);
        assert_eq!(send(&mut host, &mut stream, CHAT, BODY), Action::Continue);
        upstream(&mut host);
        assert_eq!(
            stream.on_response_headers(&mut host, false),
            Action::Continue
        );
        let outcome: Vec<_> = host
            .response_headers
            .iter()
            .filter(|(k, _)| k.starts_with("x-countersign-"))
            .collect();
        assert_eq!(
            outcome,
            [(&"x-countersign-outcome".to_string(), &"allowed".to_string())]
        );
        // A listed path passing untouched: none at all.
        let (_worker, mut host, mut stream) = setup(r#"{"records":"off"}"#);
        host.request("GET", "/v1/models", b"");
        assert_eq!(stream.on_request_headers(&mut host, true), Action::Continue);
        upstream(&mut host);
        stream.on_response_headers(&mut host, false);
        assert!(
            !host
                .response_headers
                .keys()
                .any(|k| k.starts_with("x-countersign-")),
            "{:?}",
            host.response_headers
        );
        // A refusal's own reply keeps the filter's headers.
        let (_worker, mut host, mut stream) = setup(r#"{"default_action":"deny"}"#);
        send(&mut host, &mut stream, CHAT, BODY);
        let reply = host.replies[0].clone();
        host.response_headers = reply
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        stream.on_response_headers(&mut host, false);
        assert_eq!(host.response_headers["x-countersign-outcome"], "denied");
    }

    #[test]
    fn an_allowed_request_waits_for_its_record_then_continues() {
        let (worker, mut host, mut stream) = setup(r#"{"default_action":"allow"}"#);
        assert_eq!(send(&mut host, &mut stream, CHAT, BODY), Action::Pause);
        assert_eq!(host.paths(), ["/v1/records"]);
        assert!(host.resumed.is_empty());
        assert_eq!(host.metric("countersign_held"), 1);
        answer(&mut host, &worker, 201, r#"{"record_id":"rec_1"}"#);
        assert_eq!(host.resumed, [Some(ID)]);
        assert_eq!(host.outcome().as_deref(), Some("allowed"));
        assert_eq!(host.metric("countersign_requests_allowed_total"), 1);
        assert_eq!(worker.outstanding_callouts(), 0);

        // The answer is recorded as it passes, unchanged.
        respond(&mut host, &mut stream, "application/json");
        assert_eq!(host.response_headers["x-countersign-outcome"], "allowed");
        assert_eq!(host.response_headers["content-length"], "10");
        let answer_body = br#"{"choices":[]}"#;
        assert_eq!(
            chunk(&mut host, &mut stream, answer_body, true),
            Action::Continue
        );
        assert_eq!(host.response_chunk, answer_body);
        stream.on_log(&mut host);
        stream.on_drop(&mut host);
        assert_eq!(host.metric("countersign_held"), 0);
        // The root context's timer sends the response part of the record.
        worker.on_tick(&mut host);
        assert_eq!(host.last_path(), "/v1/records/rec_1/response");
        let (_, call) = host.dispatched.last().unwrap();
        let part: serde_json::Value = serde_json::from_slice(call.body.as_ref().unwrap()).unwrap();
        assert_eq!(part["completion"], "complete");
        answer(&mut host, &worker, 201, "{}");
        assert_eq!(worker.queued(), (0, 0));
        assert_eq!(host.violations.get(), 0);
    }

    #[test]
    fn an_unguarded_stream_is_recorded_event_by_event() {
        let (worker, mut host, mut stream) = setup(r#"{"default_action":"allow"}"#);
        let body = br#"{"model":"llama3","messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(
            send(&mut host, &mut stream, "/api/chat", body),
            Action::Pause
        );
        answer(&mut host, &worker, 201, r#"{"record_id":"rec_1"}"#);
        respond(&mut host, &mut stream, "application/x-ndjson");
        let lines = concat!(
            "{\"message\":{\"role\":\"assistant\",\"content\":\"Hel\"},\"done\":false}\n",
            "{\"message\":{\"role\":\"assistant\",\"content\":\"lo\"},\"done\":true,\"eval_count\":2}\n"
        )
        .as_bytes();
        for (piece, eos) in [(&lines[..30], false), (&lines[30..], true)] {
            assert_eq!(chunk(&mut host, &mut stream, piece, eos), Action::Continue);
            // Nothing guards the answer: it passes as it came.
            assert_eq!(host.response_chunk, piece);
        }
        stream.on_log(&mut host);
        worker.on_tick(&mut host);
        assert_eq!(host.last_path(), "/v1/records/rec_1/response");
        let (_, call) = host.dispatched.last().unwrap();
        let part: serde_json::Value = serde_json::from_slice(call.body.as_ref().unwrap()).unwrap();
        assert_eq!(part["body"], "Hello");
        assert_eq!(part["usage"]["eval_count"], 2);
    }

    #[test]
    fn an_allowed_request_without_records_continues_at_once() {
        let (worker, mut host, mut stream) = setup(r#"{"default_action":"allow","records":"off"}"#);
        assert_eq!(send(&mut host, &mut stream, CHAT, BODY), Action::Continue);
        assert!(host.dispatched.is_empty());
        assert_eq!(worker.held(), 0);
        respond(&mut host, &mut stream, "application/json");
        assert_eq!(host.response_headers["x-countersign-outcome"], "allowed");
    }

    #[test]
    fn a_held_request_is_released_masked_after_approval() {
        let (worker, mut host, mut stream) = setup(&format!("{{{MASKING}}}"));
        let body =
            br#"{"model":"m","messages":[{"role":"user","content":"mail bob@example.com"}]}"#;
        assert_eq!(send(&mut host, &mut stream, CHAT, body), Action::Pause);
        assert_eq!(host.metric("countersign_masked_values_total"), 1);
        assert_eq!(host.paths(), ["/v1/reviews"]);
        // The reviewer sees the masked body only.
        let (_, create) = &host.dispatched[0];
        let create = String::from_utf8(create.body.clone().unwrap()).unwrap();
        assert!(!create.contains("bob@example.com"), "{create}");
        answer(&mut host, &worker, 201, PENDING);
        // Released from the root context, whose timer sends the watch.
        worker.on_tick(&mut host);
        assert_eq!(host.last_path(), "/v1/watch");
        // A watch that times out with nothing decided is sent again.
        decided(&mut host, &worker, PENDING);
        assert_eq!(host.paths(), ["/v1/reviews", "/v1/watch", "/v1/watch"]);
        decided(&mut host, &worker, &approved(""));
        assert_eq!(host.last_path(), "/v1/records");
        assert!(host.resumed.is_empty());
        answer(&mut host, &worker, 201, r#"{"record_id":"rec_2"}"#);
        // Resumed from the root context, on the stream's own context.
        assert_eq!(host.resumed, [Some(ID)]);
        let forwarded = String::from_utf8(host.request_body.clone()).unwrap();
        assert!(!forwarded.contains("bob@example.com"), "{forwarded}");
        assert!(forwarded.contains("[EMAIL"), "{forwarded}");
        assert_eq!(host.metric("countersign_requests_approved_total"), 1);
        // Body and trailer callbacks after the hold change nothing.
        assert_eq!(stream.on_request_body(&mut host, 3, true), Action::Pause);
        assert_eq!(stream.on_request_trailers(&mut host), Action::Pause);

        respond(&mut host, &mut stream, "application/json");
        assert_eq!(host.response_headers["x-countersign-outcome"], "approved");
        assert_eq!(host.response_headers["x-countersign-review-id"], "rev_1");
        // The answer is rewritten: its length changes.
        assert!(!host.response_headers.contains_key("content-length"));
        stream.on_drop(&mut host);
        // Nothing to cancel: the review was decided.
        assert_eq!(worker.queued().0, 0);
        assert!(host.replies.is_empty());
        assert_eq!(host.violations.get(), 0);
    }

    #[test]
    fn a_failed_body_write_refuses_instead_of_forwarding_unmasked() {
        let (worker, mut host, mut stream) = setup(&format!("{{{MASKING},\"records\":\"off\"}}"));
        let body =
            br#"{"model":"m","messages":[{"role":"user","content":"mail bob@example.com"}]}"#;
        send(&mut host, &mut stream, CHAT, body);
        answer(&mut host, &worker, 201, PENDING);
        host.body_write_fails = true;
        decided(&mut host, &worker, &approved(""));
        assert!(host.resumed.is_empty());
        assert_eq!(host.replies[0].status, 503);
        assert_eq!(host.replies[0].context, Some(ID));
    }

    /// The record written before the release said `approved`; the body
    /// could not be written, so nothing was forwarded: the refusal's record,
    /// keyed to that record, goes out to say so (it used to go nowhere, and
    /// the chain kept an approved request with no outcome).
    #[test]
    fn a_failed_body_write_after_the_record_records_the_refusal() {
        let (worker, mut host, mut stream) = setup(&format!("{{{MASKING}}}"));
        let body =
            br#"{"model":"m","messages":[{"role":"user","content":"mail bob@example.com"}]}"#;
        send(&mut host, &mut stream, CHAT, body);
        answer(&mut host, &worker, 201, PENDING);
        decided(&mut host, &worker, &approved(""));
        assert_eq!(host.last_path(), "/v1/records");
        host.body_write_fails = true;
        answer(&mut host, &worker, 201, r#"{"record_id":"rec_2"}"#);
        assert!(host.resumed.is_empty());
        assert_eq!(host.replies[0].status, 503);
        assert_eq!(worker.queued().0, 1);
        worker.on_tick(&mut host);
        let (_, call) = host.dispatched.last().unwrap();
        let record: serde_json::Value =
            serde_json::from_slice(call.body.as_ref().unwrap()).unwrap();
        assert!(
            record["idempotency_key"]
                .as_str()
                .unwrap()
                .ends_with(":refusal"),
            "{record}"
        );
        assert_eq!(record["refusal"]["status"], 503, "{record}");
        assert_eq!(record["review_id"], "rev_1", "{record}");
    }

    #[test]
    fn an_allowed_request_whose_masked_body_cannot_be_written_is_refused() {
        let (_worker, mut host, mut stream) = setup(&format!(
            "{{{MASKING},\"default_action\":\"allow\",\"records\":\"off\"}}"
        ));
        host.body_write_fails = true;
        let body =
            br#"{"model":"m","messages":[{"role":"user","content":"mail bob@example.com"}]}"#;
        assert_eq!(send(&mut host, &mut stream, CHAT, body), Action::Pause);
        assert_eq!(host.replies[0].status, 503);
        assert_eq!(host.outcome().as_deref(), Some("unavailable"));
    }

    #[test]
    fn a_rejection_is_answered_in_the_callers_api_format() {
        let (worker, mut host, mut stream) = setup("{}");
        let body =
            br#"{"model":"claude","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;
        send(&mut host, &mut stream, "/v1/messages", body);
        answer(&mut host, &worker, 201, PENDING);
        let rejected = r#"{"id":"rev_1","status":"rejected","expires_at_ms":0,"reviewer":"alice"}"#;
        decided(&mut host, &worker, rejected);
        let reply = &host.replies[0];
        assert_eq!(reply.context, Some(ID));
        assert_eq!(reply.status, 403);
        let v = reply.json();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "permission_error");
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(reply.header("x-countersign-outcome"), Some("rejected"));
        assert_eq!(reply.header("x-countersign-review-id"), Some("rev_1"));
        assert_eq!(host.outcome().as_deref(), Some("rejected"));
        assert_eq!(host.metric("countersign_requests_rejected_total"), 1);
        // The refusal is recorded too: queued in the outbox, sent on the
        // root context's next tick and retried, not waited for.
        assert_eq!(worker.queued().0, 1);
        worker.on_tick(&mut host);
        assert_eq!(host.last_path(), "/v1/records");
        assert!(host.resumed.is_empty());
        assert_eq!(host.violations.get(), 0);
    }

    #[test]
    fn a_compressed_answer_is_withheld_with_502() {
        let (worker, mut host, mut stream) = setup(r#"{"default_action":"allow"}"#);
        send(&mut host, &mut stream, CHAT, BODY);
        answer(&mut host, &worker, 201, r#"{"record_id":"rec_3"}"#);
        host.response_headers = [
            (":status", "200"),
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
            ("content-length", "99"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        stream.on_response_headers(&mut host, false);
        assert_eq!(host.response_headers[":status"], "502");
        assert!(!host.response_headers.contains_key("content-encoding"));
        assert!(!host.response_headers.contains_key("content-length"));
        assert_eq!(host.metric("countersign_responses_blocked_total"), 1);
        // Nothing of it leaves; the replacement goes out at the end (or
        // before trailers: Envoy keeps the emptied body buffered for them).
        assert_eq!(
            chunk(&mut host, &mut stream, b"\x1f\x8b\x08gz", false),
            Action::Pause
        );
        assert!(host.response_chunk.is_empty());
        chunk(&mut host, &mut stream, b"more", true);
        let v: serde_json::Value = serde_json::from_slice(&host.response_chunk).unwrap();
        assert_eq!(v["error"]["code"], "response_uninspectable");
        stream.on_log(&mut host);
        worker.on_tick(&mut host);
        let (_, call) = host.dispatched.last().unwrap();
        let part: serde_json::Value = serde_json::from_slice(call.body.as_ref().unwrap()).unwrap();
        assert_eq!(part["blocked_by"], "encoded_response");
        assert_eq!(part["status"], 502);
    }

    /// A spoken answer would say what masking removes from its transcript:
    /// the request is refused, naming the field, and nothing goes on.
    #[test]
    fn a_request_for_audio_output_is_refused_where_the_answer_is_masked() {
        let (_worker, mut host, mut stream) = setup(&format!(
            "{{{MASKING},\"default_action\":\"allow\",\"records\":\"off\"}}"
        ));
        let body = br#"{"model":"gpt-4o-audio-preview","modalities":["text","audio"],"audio":{"voice":"alloy","format":"wav"},"messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(send(&mut host, &mut stream, CHAT, body), Action::Pause);
        let reply = &host.replies[0];
        assert_eq!(reply.status, 400);
        assert!(
            reply.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("`modalities`"),
            "{:?}",
            reply.json()
        );
        assert!(host.resumed.is_empty());
    }

    /// A stored answer fetched back by id is refused under `pass`: no guard
    /// would read it.
    #[test]
    fn a_stored_answer_fetched_by_id_is_refused() {
        let cfg = format!(
            "{{{MASKING},\"default_action\":\"allow\",\"records\":\"off\",\"other_requests\":\"pass\"}}"
        );
        for path in [
            "/v1/responses/resp_123",
            "/v1/responses/resp_123/input_items",
            "/v1/chat/completions/chatcmpl-1",
            "/v1/chat/completions/chatcmpl-1/messages",
        ] {
            let (_worker, mut host, mut stream) = setup(&cfg);
            host.request("GET", path, b"");
            host.request_headers.remove("content-type");
            assert_eq!(
                stream.on_request_headers(&mut host, true),
                Action::Pause,
                "{path}"
            );
            let reply = &host.replies[0];
            assert_eq!(reply.status, 403, "{path}");
            assert_eq!(reply.json()["error"]["code"], "indirect_prompt_endpoint");
        }
    }

    /// Every `content-encoding` header is read, the request's and the
    /// answer's, not only the first; an answer with two `content-type`s is
    /// withheld, a request with two refused.
    #[test]
    fn repeated_encoding_and_type_headers_are_all_read() {
        let cfg = format!("{{{MASKING},\"default_action\":\"allow\",\"records\":\"off\"}}");
        for (name, second) in [
            ("content-encoding", "gzip"),
            ("content-type", "application/json"),
        ] {
            let (_worker, mut host, mut stream) = setup(&cfg);
            assert_eq!(send(&mut host, &mut stream, CHAT, BODY), Action::Continue);
            host.response_headers = [
                (":status", "200"),
                ("content-type", "text/event-stream"),
                ("content-encoding", "identity"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            host.repeated_response_headers = vec![(name.to_string(), second.to_string())];
            stream.on_response_headers(&mut host, false);
            assert_eq!(host.response_headers[":status"], "502", "{name}");
            // No value of either is left but the one set.
            assert!(host.repeated_response_headers.is_empty(), "{name}");
            assert_eq!(host.response_headers["content-type"], "application/json");
            assert!(!host.response_headers.contains_key("content-encoding"));
            let body = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"carol@example.com\"}}]}\n\n";
            assert_eq!(chunk(&mut host, &mut stream, body, false), Action::Pause);
            chunk(&mut host, &mut stream, b"", true);
            let v: serde_json::Value = serde_json::from_slice(&host.response_chunk).unwrap();
            assert_eq!(v["error"]["code"], "response_uninspectable", "{name}");
        }
        for (name, second) in [("content-encoding", "gzip"), ("content-type", "text/plain")] {
            let (_worker, mut host, mut stream) = setup(&cfg);
            host.request("POST", CHAT, BODY);
            host.request_headers
                .insert("content-encoding".into(), "identity".into());
            host.repeated_request_headers = vec![(name.to_string(), second.to_string())];
            assert_eq!(stream.on_request_headers(&mut host, false), Action::Pause);
            assert_eq!(host.replies[0].status, 415, "{name}");
        }
    }

    #[test]
    fn a_streamed_answer_is_masked_event_by_event() {
        let (_worker, mut host, mut stream) = setup(&format!(
            "{{{MASKING},\"default_action\":\"allow\",\"records\":\"off\"}}"
        ));
        assert_eq!(send(&mut host, &mut stream, CHAT, BODY), Action::Continue);
        respond(&mut host, &mut stream, "text/event-stream");
        assert!(!host.response_headers.contains_key("content-length"));
        let event = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"write to carol@example.com now\"}}]}\n\n";
        let mut out = Vec::new();
        assert_eq!(
            chunk(&mut host, &mut stream, event, false),
            Action::Continue
        );
        out.extend(host.response_chunk.clone());
        chunk(&mut host, &mut stream, b"data: [DONE]\n\n", true);
        out.extend(host.response_chunk.clone());
        let out = String::from_utf8(out).unwrap();
        assert!(!out.contains("carol@example.com"), "{out}");
        assert!(out.contains("[DONE]"), "{out}");
    }

    #[test]
    fn a_plain_guarded_answer_is_buffered_then_masked_whole() {
        let (_worker, mut host, mut stream) = setup(&format!(
            "{{{MASKING},\"default_action\":\"allow\",\"records\":\"off\"}}"
        ));
        send(&mut host, &mut stream, CHAT, BODY);
        respond(&mut host, &mut stream, "application/json");
        let body = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"dave@example.com"}}]}"#;
        assert_eq!(
            chunk(&mut host, &mut stream, &body[..10], false),
            Action::Pause
        );
        assert_eq!(chunk(&mut host, &mut stream, body, true), Action::Continue);
        let out = String::from_utf8(host.response_chunk.clone()).unwrap();
        assert!(!out.contains("dave@example.com"), "{out}");
    }

    /// A configuration that masks e-mail addresses and blocks answers
    /// saying "launch codes" (`extra`: more top-level fields).
    fn guarded(extra: &str) -> String {
        format!(
            r#"{{{MASKING},"default_action":"allow","records":"off",{extra}"content_policy":{{"response_rules":[{{"name":"no-codes","phrases":["launch codes"]}}]}}}}"#
        )
    }

    const BLOCKED_ANSWER: &[u8] = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"the launch codes are 1234"}}]}"#;

    /// Before: the head of a plain answer went out before its body was
    /// judged, so a blocked answer kept the model's 200 under the error.
    #[test]
    fn a_blocked_plain_answer_gets_the_errors_status_and_headers() {
        let (_worker, mut host, mut stream) = setup(&guarded(""));
        send(&mut host, &mut stream, CHAT, BODY);
        // The head waits with the body, which is buffered anyway.
        assert_eq!(respond(&mut host, &mut stream, "text/plain"), Action::Pause);
        assert!(!host.response_headers.contains_key("content-length"));
        assert_eq!(
            chunk(&mut host, &mut stream, &BLOCKED_ANSWER[..10], false),
            Action::Pause
        );
        assert_eq!(
            chunk(&mut host, &mut stream, BLOCKED_ANSWER, true),
            Action::Continue
        );
        assert_eq!(host.response_headers[":status"], "403");
        assert_eq!(host.response_headers["content-type"], "application/json");
        assert!(!host.response_headers.contains_key("content-length"));
        let error: serde_json::Value = serde_json::from_slice(&host.response_chunk).unwrap();
        assert_eq!(error["error"]["code"], "response_blocked", "{error}");
        assert!(!String::from_utf8_lossy(&host.response_chunk).contains("1234"));

        // A plain answer that cannot be read: 502, as withheld answers get.
        let (_worker, mut host, mut stream) = setup(&guarded(""));
        send(&mut host, &mut stream, CHAT, BODY);
        assert_eq!(
            respond(&mut host, &mut stream, "application/json"),
            Action::Pause
        );
        chunk(&mut host, &mut stream, br#"{"a":1,"a":2}"#, true);
        assert_eq!(host.response_headers[":status"], "502");
        let error: serde_json::Value = serde_json::from_slice(&host.response_chunk).unwrap();
        assert_eq!(error["error"]["code"], "response_uninspectable", "{error}");

        // A masked answer keeps the model's status.
        let (_worker, mut host, mut stream) = setup(&guarded(""));
        send(&mut host, &mut stream, CHAT, BODY);
        assert_eq!(
            respond(&mut host, &mut stream, "application/json"),
            Action::Pause
        );
        let body = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"dave@example.com"}}]}"#;
        chunk(&mut host, &mut stream, body, true);
        assert_eq!(host.response_headers[":status"], "200");
        assert!(!String::from_utf8_lossy(&host.response_chunk).contains("dave@"));
    }

    #[test]
    fn the_head_is_held_only_where_a_plain_answer_is_judged_whole() {
        // A stream goes out event by event, its head at once.
        let (_worker, mut host, mut stream) = setup(&guarded(""));
        send(&mut host, &mut stream, CHAT, BODY);
        assert_eq!(
            respond(&mut host, &mut stream, "text/event-stream"),
            Action::Continue
        );
        // Nothing guards the answer (it is only recorded, or not read):
        // the `allow` path pays nothing.
        for config in [
            r#"{"default_action":"allow"}"#,
            r#"{"default_action":"allow","records":"off"}"#,
        ] {
            let (worker, mut host, mut stream) = setup(config);
            send(&mut host, &mut stream, CHAT, BODY);
            if !host.dispatched.is_empty() {
                answer(&mut host, &worker, 200, r#"{"id":"rec_1"}"#);
            }
            assert_eq!(
                respond(&mut host, &mut stream, "application/json"),
                Action::Continue,
                "{config}"
            );
        }
        // An answer without a body: nothing would let its head go.
        let (_worker, mut host, mut stream) = setup(&guarded(""));
        send(&mut host, &mut stream, CHAT, BODY);
        host.response_headers = [(":status", "200"), ("content-type", "application/json")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            stream.on_response_headers(&mut host, true),
            Action::Continue
        );
        // Where the host cannot hold a head while the body reaches the
        // filter (`hold_answer_heads: false`), the head goes at once and a
        // blocked answer keeps the model's status (its body is the error).
        let (_worker, mut host, mut stream) = setup(&guarded(r#""hold_answer_heads":false,"#));
        send(&mut host, &mut stream, CHAT, BODY);
        assert_eq!(
            respond(&mut host, &mut stream, "application/json"),
            Action::Continue
        );
        chunk(&mut host, &mut stream, BLOCKED_ANSWER, true);
        assert_eq!(host.response_headers[":status"], "200");
        assert!(String::from_utf8_lossy(&host.response_chunk).contains("response_blocked"));
    }

    #[test]
    fn a_plain_answer_ended_by_trailers_is_masked_before_them() {
        let (_worker, mut host, mut stream) = setup(&format!(
            "{{{MASKING},\"default_action\":\"allow\",\"records\":\"off\"}}"
        ));
        send(&mut host, &mut stream, CHAT, BODY);
        respond(&mut host, &mut stream, "application/json");
        let body = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"dave@example.com"}}]}"#;
        // The last data frame does not end the stream: trailers do.
        assert_eq!(chunk(&mut host, &mut stream, body, false), Action::Pause);
        host.response_chunk = body.to_vec();
        assert_eq!(stream.on_response_trailers(&mut host), Action::Continue);
        let out = String::from_utf8(host.response_chunk.clone()).unwrap();
        assert!(!out.contains("dave@example.com"), "{out}");
        assert!(out.contains("choices"), "{out}");
    }

    #[test]
    fn trailers_on_an_answer_nothing_reads_change_nothing() {
        let (_worker, mut host, mut stream) =
            setup(r#"{"default_action":"allow","records":"off"}"#);
        send(&mut host, &mut stream, CHAT, BODY);
        respond(&mut host, &mut stream, "application/json");
        host.response_chunk = b"{}".to_vec();
        assert_eq!(stream.on_response_trailers(&mut host), Action::Continue);
        assert_eq!(host.response_chunk, b"{}");
    }

    #[test]
    fn holds_for_review_are_limited_per_caller_and_in_all() {
        let config = Rc::new(
            Config::from_json(
                br#"{"records":"off","hold_limits":{"per_caller":1,"total":2,"retry_after_s":7},
                "identity":{"source":"metadata","metadata_path":["metadata","authn","sub"]}}"#,
            )
            .unwrap(),
        );
        let worker = Worker::new();
        let mut host = MockHost::new(&worker);
        let path = ["metadata", "authn", "sub"].map(String::from).to_vec();
        let hold = |ctx: u32, caller: &str, host: &mut MockHost| {
            host.properties
                .insert(path.clone(), caller.as_bytes().to_vec());
            let mut stream = StreamFilter::new(ctx, Some(config.clone()), worker.clone());
            host.replies.clear();
            let action = send(host, &mut stream, CHAT, BODY);
            (action, stream)
        };
        let (first, _a) = hold(1, "ann", &mut host);
        assert_eq!(first, Action::Pause);
        assert!(host.replies.is_empty(), "held, not refused");
        // A second request of the same caller: 429 with retry-after.
        let (_, _b) = hold(2, "ann", &mut host);
        let reply = &host.replies[0];
        assert_eq!(reply.status, 429);
        assert!(reply
            .headers
            .contains(&("retry-after".to_string(), "7".to_string())));
        let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(v["error"]["code"], "too_many_held_requests");
        assert_eq!(host.outcome().as_deref(), Some("throttled"));
        // Another caller still gets a slot; then the total is reached.
        let (_, _c) = hold(3, "bob", &mut host);
        assert!(host.replies.is_empty());
        let (_, _d) = hold(4, "cy", &mut host);
        assert_eq!(host.replies[0].status, 429);
        assert_eq!(worker.waiting_for_review("ann"), (1, 2));
        // A hold that ends frees its slot.
        drop(_a);
        worker.end_stream(&mut host, 1);
        let (_, _e) = hold(5, "ann", &mut host);
        assert!(host.replies.is_empty(), "{:?}", host.replies);
    }

    #[test]
    fn the_caller_going_away_cancels_the_review() {
        let (worker, mut host, mut stream) = setup(r#"{"records":"off"}"#);
        send(&mut host, &mut stream, CHAT, BODY);
        answer(&mut host, &worker, 201, PENDING);
        assert_eq!(worker.held(), 1);
        stream.on_drop(&mut host);
        assert_eq!(worker.held(), 0);
        assert_eq!(host.metric("countersign_held"), 0);
        // The answer to the wait in flight finds no hold and is dropped.
        answer(&mut host, &worker, 200, &approved(""));
        assert!(host.resumed.is_empty());
        worker.on_tick(&mut host);
        assert_eq!(host.last_path(), "/v1/reviews/rev_1/cancel");
        assert_eq!(host.violations.get(), 0);
    }

    #[test]
    fn an_async_caller_gets_202_once_the_review_exists() {
        let config = r#"{"records":"off","rules":[{"action":"review","async":true}],
            "identity":{"source":"metadata","metadata_path":["metadata","authn","sub"]},
            "approval_tokens":{"keys":[{"id":"k1","secret":"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="}]}}"#;
        let (_worker, mut host, mut stream) = setup(config);
        // No identity: 401, in the API's format.
        host.request("POST", CHAT, BODY);
        assert_eq!(stream.on_request_headers(&mut host, false), Action::Pause);
        assert_eq!(host.replies[0].status, 401);
        assert_eq!(host.outcome().as_deref(), Some("unauthenticated"));

        let (worker, mut host, mut stream) = setup(config);
        let path = ["metadata", "authn", "sub"].map(String::from).to_vec();
        host.properties.insert(path, b"ci-bot".to_vec());
        send(&mut host, &mut stream, CHAT, BODY);
        let (_, create) = &host.dispatched[0];
        let create: serde_json::Value =
            serde_json::from_slice(create.body.as_ref().unwrap()).unwrap();
        assert_eq!(create["caller"], "ci-bot", "{create}");
        answer(&mut host, &worker, 201, PENDING);
        assert_eq!(host.replies[0].status, 202);
        assert_eq!(host.outcome().as_deref(), Some("pending"));
        assert_eq!(host.metric("countersign_requests_pending_total"), 1);
        // The caller polls later: nothing to cancel.
        stream.on_drop(&mut host);
        assert_eq!(worker.queued().0, 0);
    }

    /// An asynchronous request answered 202 may never be forwarded
    /// (rejected, expired, its token never spent), but it was made: its
    /// record (decision `pending`, its review, the body the review holds)
    /// goes through the outbox. It used to leave no record at all.
    #[test]
    fn an_async_request_answered_202_leaves_a_record() {
        let config = r#"{"rules":[{"name":"batch","action":"review","async":true}],
            "identity":{"source":"metadata","metadata_path":["metadata","authn","sub"]},
            "approval_tokens":{"keys":[{"id":"k1","secret":"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="}]}}"#;
        let (worker, mut host, mut stream) = setup(config);
        let path = ["metadata", "authn", "sub"].map(String::from).to_vec();
        host.properties.insert(path, b"ci-bot".to_vec());
        send(&mut host, &mut stream, CHAT, BODY);
        answer(&mut host, &worker, 201, PENDING);
        assert_eq!(host.replies[0].status, 202);
        assert_eq!(worker.queued().0, 1);
        worker.on_tick(&mut host);
        assert_eq!(host.last_path(), "/v1/records");
        let (_, call) = host.dispatched.last().unwrap();
        let record: serde_json::Value =
            serde_json::from_slice(call.body.as_ref().unwrap()).unwrap();
        assert_eq!(
            (
                &record["decision"],
                &record["review_id"],
                &record["caller"],
                &record["rule"]
            ),
            (
                &serde_json::json!("pending"),
                &serde_json::json!("rev_1"),
                &serde_json::json!("ci-bot"),
                &serde_json::json!("batch")
            ),
            "{record}"
        );
        assert_eq!(record["body"].as_str().unwrap().as_bytes(), BODY);
        assert!(record["idempotency_key"]
            .as_str()
            .unwrap()
            .ends_with(":accepted"));
    }

    #[test]
    fn a_stream_without_configuration_is_refused() {
        let worker = Worker::new();
        let mut host = MockHost::new(&worker);
        let mut stream = StreamFilter::new(ID, None, worker);
        host.request("POST", CHAT, BODY);
        assert_eq!(stream.on_request_headers(&mut host, false), Action::Pause);
        assert_eq!(host.replies[0].status, 500);
        assert_eq!(host.metric("countersign_requests_misconfigured_total"), 1);
    }

    /// Envoy's properties of a request on route `route` from 10.0.0.7,
    /// where Envoy 1.40 keeps them (measured: `xds.route_name`; there is
    /// no top-level `route_name`).
    fn with_properties(host: &mut MockHost, route: &str) {
        host.properties.insert(
            vec!["xds".into(), "route_name".into()],
            route.as_bytes().to_vec(),
        );
        host.properties.insert(
            vec!["source".into(), "address".into()],
            b"10.0.0.7:5555".to_vec(),
        );
    }

    fn properties_read(host: &MockHost) -> usize {
        host.take_calls()
            .iter()
            .filter(|c| **c == "property")
            .count()
    }

    #[test]
    fn properties_are_read_once_and_only_where_the_request_needs_them() {
        // Allowed without a record: nothing carries them.
        let (_worker, mut host, mut stream) =
            setup(r#"{"default_action":"allow","records":"off"}"#);
        with_properties(&mut host, "model");
        assert_eq!(send(&mut host, &mut stream, CHAT, BODY), Action::Continue);
        assert_eq!(properties_read(&host), 0);

        // The record carries them.
        let (_worker, mut host, mut stream) = setup(r#"{"default_action":"allow"}"#);
        with_properties(&mut host, "model");
        assert_eq!(send(&mut host, &mut stream, CHAT, BODY), Action::Pause);
        assert_eq!(properties_read(&host), 2);
        let (_, call) = &host.dispatched[0];
        let record: serde_json::Value =
            serde_json::from_slice(call.body.as_ref().unwrap()).unwrap();
        assert_eq!(record["route"], "model", "{record}");
        assert_eq!(record["source_address"], "10.0.0.7:5555", "{record}");

        // So does a review, and a refusal's record.
        let (_worker, mut host, mut stream) = setup(r#"{"records":"off"}"#);
        with_properties(&mut host, "model");
        assert_eq!(send(&mut host, &mut stream, CHAT, BODY), Action::Pause);
        let (_, call) = &host.dispatched[0];
        let review: serde_json::Value =
            serde_json::from_slice(call.body.as_ref().unwrap()).unwrap();
        assert_eq!(review["route"], "model", "{review}");
        let (worker, mut host, mut stream) = setup(r#"{"max_body_bytes":20}"#);
        with_properties(&mut host, "model");
        host.request("POST", CHAT, BODY);
        stream.on_request_headers(&mut host, false);
        assert_eq!(stream.on_request_body(&mut host, 21, false), Action::Pause);
        assert_eq!(properties_read(&host), 2);
        worker.on_tick(&mut host);
        let (_, call) = host.dispatched.last().unwrap();
        let record: serde_json::Value =
            serde_json::from_slice(call.body.as_ref().unwrap()).unwrap();
        assert_eq!(record["source_address"], "10.0.0.7:5555", "{record}");
    }

    #[test]
    fn rules_scoped_by_route_read_the_route_before_choosing() {
        let config = r#"{"records":"off","rules":[{"name":"internal","route":"internal-*","action":"allow"}]}"#;
        for (route, verdict) in [
            ("internal-chat", Action::Continue),
            ("public", Action::Pause),
        ] {
            let (_worker, mut host, mut stream) = setup(config);
            with_properties(&mut host, route);
            assert_eq!(send(&mut host, &mut stream, CHAT, BODY), verdict, "{route}");
            // Read once, also where the review then carries them.
            assert_eq!(properties_read(&host), 2, "{route}");
        }
        // A content rule scoped by route, the same.
        let config = r#"{"records":"off","default_action":"allow","content_policy":{"request_rules":[{"name":"no-hi","routes":["public"],"phrases":["hi"]}]}}"#;
        for (route, status) in [("public", Some(403)), ("internal", None)] {
            let (_worker, mut host, mut stream) = setup(config);
            with_properties(&mut host, route);
            send(&mut host, &mut stream, CHAT, BODY);
            assert_eq!(host.replies.first().map(|r| r.status), status, "{route}");
        }
    }

    /// Envoy 1.40 names the route at `xds.route_name` only: a rule scoped
    /// by route (here a `deny` for production) must match there, and an
    /// older Envoy's top-level `route_name` is still read.
    #[test]
    fn the_route_is_read_where_envoy_keeps_it() {
        let config = r#"{"records":"off","default_action":"allow","rules":[{"name":"no-prod","route":"prod-*","action":"deny"}]}"#;
        for path in ROUTE_NAME_PROPERTIES {
            let (_worker, mut host, mut stream) = setup(config);
            let path: Vec<String> = path.iter().map(|p| p.to_string()).collect();
            host.properties.insert(path.clone(), b"prod-model".to_vec());
            send(&mut host, &mut stream, CHAT, BODY);
            assert_eq!(
                host.replies.first().map(|r| r.status),
                Some(403),
                "{path:?}"
            );
        }
        // No route: the rule does not match.
        let (_worker, mut host, mut stream) = setup(config);
        assert_eq!(send(&mut host, &mut stream, CHAT, BODY), Action::Continue);
    }

    #[test]
    fn header_edits_that_change_nothing_are_not_made() {
        let (_worker, mut host, mut stream) =
            setup(r#"{"default_action":"allow","records":"off"}"#);
        host.request("POST", CHAT, BODY);
        host.request_headers
            .insert("accept-encoding".into(), "identity".into());
        assert_eq!(
            stream.on_request_headers(&mut host, false),
            Action::Continue
        );
        // No `content-length` to remove, `accept-encoding` already right.
        let calls = host.take_calls();
        assert!(!calls.contains(&"set_request_header"), "{calls:?}");
        assert_eq!(host.request_headers["accept-encoding"], "identity");

        host.request_headers
            .insert("accept-encoding".into(), "gzip".into());
        host.request_headers
            .insert("content-length".into(), "55".into());
        let (_worker, _, mut stream) = setup(r#"{"default_action":"allow","records":"off"}"#);
        assert_eq!(
            stream.on_request_headers(&mut host, false),
            Action::Continue
        );
        assert_eq!(host.request_headers["accept-encoding"], "identity");
        assert!(!host.request_headers.contains_key("content-length"));
    }
}
