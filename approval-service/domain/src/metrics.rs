//! The service's Prometheus metrics: one [`Metrics`] per process (held by
//! `AppState`), and [`Metrics::render`], the text a scrape of `/metrics`
//! answers with.
//!
//! Two sources, one text:
//! - what this replica observes as it happens (time to decision, HTTP
//!   handling, record appends, assessor calls, evidence hits): instruments
//!   in a registry, counted since the process started;
//! - what the database holds (reviews by status, the queue, its oldest
//!   entry) and the record store's own counters: read at each scrape
//!   ([`ReviewLoad`]) and written into a registry of that scrape.
//!
//! Names follow Prometheus' conventions (base units in the name,
//! `_seconds` histograms, `_total` counters); `promtool check metrics`
//! reads a real scrape in the tests.

use std::sync::atomic::{AtomicU64, Ordering};

use countersign_core::wire::HitCount;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::records::RecordCounters;
use crate::store::{ReviewLoad, ReviewSummary};

/// Seconds from a review's creation to its decision: from an automatic
/// decision in milliseconds to a person's after hours.
const DECISION_BUCKETS: [f64; 18] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    3600.0, 14400.0, 86400.0,
];

/// Seconds spent on one call: the filter's callouts, record appends,
/// assessor calls (long polls wait up to a minute).
const CALL_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Review statuses always reported by `countersign_reviews_decided_total`.
const FINAL_STATUSES: [&str; 5] = ["approved", "rejected", "expired", "cancelled", "abandoned"];

/// Review kinds and modes always reported by the queue gauges.
const KINDS: [&str; 3] = ["prompt", "tool_call", "response"];
const MODES: [&str; 3] = ["hold", "async", "audit"];

/// Who made a decision, as the `decider` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decider {
    /// A reviewer (API, UI, Slack).
    Human,
    /// The assessors, under the rule's automatic-decision policy.
    Assessor,
    /// A standing approval.
    Standing,
    /// Nobody: the hold timed out.
    Expiry,
    /// The caller went away.
    Caller,
}

impl Decider {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Decider::Human => "human",
            Decider::Assessor => "assessor",
            Decider::Standing => "standing",
            Decider::Expiry => "expiry",
            Decider::Caller => "caller",
        }
    }

    /// Whether no person took the decision: assessors or a standing
    /// approval did.
    pub fn is_automatic(self) -> bool {
        matches!(self, Decider::Assessor | Decider::Standing)
    }

    /// Who decided `review` (which has left `pending`); `None` while it is
    /// still pending.
    pub fn of(review: &ReviewSummary) -> Option<Decider> {
        Decider::from_parts(review.status, review.automatic, review.reviewer.as_deref())
    }

    /// Who decided a review of `status`, decided automatically by
    /// assessors or not, with `reviewer` as its decider.
    pub fn from_parts(
        status: countersign_core::wire::ReviewStatus,
        automatic: bool,
        reviewer: Option<&str>,
    ) -> Option<Decider> {
        use countersign_core::wire::ReviewStatus as S;
        match status {
            S::Pending => None,
            S::Expired => Some(Decider::Expiry),
            // Abandoned: the held request was gone (its gateway stopped
            // waiting), which ended it as much as a caller going away.
            S::Cancelled | S::Abandoned => Some(Decider::Caller),
            S::Approved | S::Rejected if automatic => Some(Decider::Assessor),
            S::Approved | S::Rejected => match reviewer {
                Some(name) if name.starts_with(crate::standing::DECIDER_PREFIX) => {
                    Some(Decider::Standing)
                }
                _ => Some(Decider::Human),
            },
        }
    }
}

/// The instruments of this process.
pub struct Metrics {
    registry: Registry,
    decision_seconds: HistogramVec,
    decisions: IntCounterVec,
    http_seconds: HistogramVec,
    record_append_seconds: HistogramVec,
    assessor_seconds: HistogramVec,
    masking_hits: IntCounterVec,
    monitor_hits: IntCounterVec,
    /// Decisions this process could not observe (the event feed fell
    /// behind, or the review could not be read).
    missed_decisions: AtomicU64,
    /// People's names may be label values: the metrics are not served to
    /// anyone on the service's address.
    name_reviewers: bool,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
    labels: &[&str],
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Metrics {
    /// The instruments, registered once. `name_reviewers`: label
    /// decisions with the person's name (only where the metrics are not
    /// public; otherwise a person's decisions are labelled `human`). Fails
    /// only on an invalid name or a name registered twice (a bug, caught by
    /// every test).
    pub fn new(name_reviewers: bool) -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let r = &registry;
        Ok(Metrics {
            decision_seconds: histogram(
                r,
                "countersign_review_decision_seconds",
                "Time from a review's creation to its decision, by who decided (human, assessor, standing, expiry, caller), outcome and rule; decisions this replica made.",
                &DECISION_BUCKETS,
                &["decider", "outcome", "rule"],
            )?,
            decisions: counter(
                r,
                "countersign_review_decisions_total",
                "Decisions this replica made, by who decided, outcome and reviewer (a person's name where the metrics are not public, else human; assessor:NAME; empty for standing approvals, expiry and cancellation).",
                &["decider", "outcome", "reviewer"],
            )?,
            http_seconds: histogram(
                r,
                "countersign_http_request_duration_seconds",
                "Time to answer an HTTP request, by route (the path pattern), method and status code.",
                &CALL_BUCKETS,
                &["route", "method", "code"],
            )?,
            record_append_seconds: histogram(
                r,
                "countersign_record_append_duration_seconds",
                "Time to append a session record entry (until it is durable), by kind (request, response) and result (ok, error).",
                &CALL_BUCKETS,
                &["kind", "result"],
            )?,
            assessor_seconds: histogram(
                r,
                "countersign_assessor_request_duration_seconds",
                "Time an assessor took to answer, by assessor and result (ok, error: failed, timed out or answered nonsense).",
                &CALL_BUCKETS,
                &["assessor", "result"],
            )?,
            masking_hits: counter(
                r,
                "countersign_masking_hits_total",
                "Values the filter's masking detectors found in prompts held for review, by detector and action.",
                &["detector", "action"],
            )?,
            monitor_hits: counter(
                r,
                "countersign_policy_monitor_hits_total",
                "Content-policy monitor rule hits in prompts held for review, by rule.",
                &["rule"],
            )?,
            missed_decisions: AtomicU64::new(0),
            name_reviewers,
            registry,
        })
    }

    /// Counts a review that left `pending`: its time to decision, who
    /// decided, the outcome.
    pub fn observe_decision(&self, review: &ReviewSummary) {
        let Some(decider) = Decider::of(review) else {
            return;
        };
        let decided_at = review.decided_at_ms.unwrap_or(review.created_at_ms);
        let seconds = decided_at.saturating_sub(review.created_at_ms) as f64 / 1000.0;
        let outcome = review.status.as_str();
        let rule = review.rule.as_deref().unwrap_or("");
        self.decision_seconds
            .with_label_values(&[decider.as_str(), outcome, rule])
            .observe(seconds);
        let reviewer = match decider {
            Decider::Human if !self.name_reviewers => "human",
            Decider::Human | Decider::Assessor => review.reviewer.as_deref().unwrap_or(""),
            Decider::Standing | Decider::Expiry | Decider::Caller => "",
        };
        self.decisions
            .with_label_values(&[decider.as_str(), outcome, reviewer])
            .inc();
    }

    /// Counts decisions that could not be observed.
    pub fn missed_decisions(&self, n: u64) {
        self.missed_decisions.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts the evidence hits of a review just created.
    pub fn observe_hits(&self, hits: &[HitCount]) {
        for hit in hits {
            let n = u64::from(hit.count);
            match hit.action.as_str() {
                "monitor" => self.monitor_hits.with_label_values(&[&hit.name]).inc_by(n),
                action => self
                    .masking_hits
                    .with_label_values(&[&hit.name, action])
                    .inc_by(n),
            }
        }
    }

    /// Times one HTTP request.
    pub fn observe_http(&self, route: &str, method: &str, code: u16, seconds: f64) {
        self.http_seconds
            .with_label_values(&[route, method, &code.to_string()])
            .observe(seconds);
    }

    /// Times one record append.
    pub fn observe_record_append(&self, kind: &str, ok: bool, seconds: f64) {
        let result = if ok { "ok" } else { "error" };
        self.record_append_seconds
            .with_label_values(&[kind, result])
            .observe(seconds);
    }

    /// Times one assessor call.
    pub fn observe_assessor(&self, assessor: &str, ok: bool, seconds: f64) {
        let result = if ok { "ok" } else { "error" };
        self.assessor_seconds
            .with_label_values(&[assessor, result])
            .observe(seconds);
    }

    /// The scrape: this process's instruments, the database's `load` (read
    /// at `now_ms`), the record store's counters and the long polls
    /// waiting, in Prometheus' text format (0.0.4).
    pub fn render(
        &self,
        load: &ReviewLoad,
        now_ms: u64,
        records: &RecordCounters,
        long_polls_waiting: usize,
    ) -> prometheus::Result<String> {
        let scrape = Registry::new();
        register_load(&scrape, load, now_ms)?;
        register_records(&scrape, records)?;
        let waiting = IntGauge::new(
            "countersign_long_polls_waiting",
            "Reviews with at least one filter long poll waiting on them.",
        )?;
        waiting.set(i64::try_from(long_polls_waiting).unwrap_or(i64::MAX));
        scrape.register(Box::new(waiting))?;
        let missed = prometheus::IntCounter::new(
            "countersign_review_decisions_unobserved_total",
            "Decisions this replica made that its decision metrics missed (the event feed fell behind, or the review could not be read).",
        )?;
        missed.inc_by(self.missed_decisions.load(Ordering::Relaxed));
        scrape.register(Box::new(missed))?;
        let mut families = self.registry.gather();
        families.extend(scrape.gather());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// The database's view: reviews created and decided (all replicas), the
/// queue by kind and mode, its oldest entry's age.
fn register_load(r: &Registry, load: &ReviewLoad, now_ms: u64) -> prometheus::Result<()> {
    let created = prometheus::IntCounter::new(
        "countersign_reviews_created_total",
        "Reviews created (counted from the database).",
    )?;
    let decided = IntCounterVec::new(
        Opts::new(
            "countersign_reviews_decided_total",
            "Reviews that left pending, by final status (counted from the database).",
        ),
        &["status"],
    )?;
    let pending = IntGaugeVec::new(
        Opts::new(
            "countersign_reviews_pending",
            "Reviews waiting for a decision, by kind (what is reviewed: prompt, tool_call, response) and mode (hold: the caller waits; async: it retries with a token; audit: a spot check forwarded already).",
        ),
        &["kind", "mode"],
    )?;
    let oldest = prometheus::GaugeVec::new(
        Opts::new(
            "countersign_oldest_pending_review_age_seconds",
            "Age of the oldest review waiting for a decision, by kind and mode; 0 when none waits.",
        ),
        &["kind", "mode"],
    )?;
    for status in FINAL_STATUSES {
        decided.with_label_values(&[status]).inc_by(0);
    }
    for kind in KINDS {
        for mode in MODES {
            oldest.with_label_values(&[kind, mode]).set(0.0);
            pending.with_label_values(&[kind, mode]).set(0);
        }
    }
    for g in &load.groups {
        created.inc_by(g.count);
        if g.status != "pending" {
            decided.with_label_values(&[&g.status]).inc_by(g.count);
            continue;
        }
        let mode = match (g.mode.as_str(), g.async_review) {
            ("audit", _) => "audit",
            (_, true) => "async",
            _ => "hold",
        };
        pending
            .with_label_values(&[&g.kind, mode])
            .add(i64::try_from(g.count).unwrap_or(i64::MAX));
        let age = now_ms.saturating_sub(g.oldest_created_at_ms) as f64 / 1000.0;
        let gauge = oldest.with_label_values(&[&g.kind, mode]);
        if age > gauge.get() {
            gauge.set(age);
        }
    }
    r.register(Box::new(created))?;
    r.register(Box::new(decided))?;
    r.register(Box::new(pending))?;
    r.register(Box::new(oldest))?;
    register_follow_ups(r, load)
}

/// Flagged audits by rule (counted from the database): ever, and open.
fn register_follow_ups(r: &Registry, load: &ReviewLoad) -> prometheus::Result<()> {
    let flagged = IntCounterVec::new(
        Opts::new(
            "countersign_audits_flagged_total",
            "Spot-check audits a reviewer flagged (rejected), marking their caller and rule for follow-up, by rule (counted from the database).",
        ),
        &["rule"],
    )?;
    let open = IntGaugeVec::new(
        Opts::new(
            "countersign_follow_ups_open",
            "Flagged audits not resolved yet, by rule.",
        ),
        &["rule"],
    )?;
    for f in &load.follow_ups {
        flagged.with_label_values(&[&f.rule]).inc_by(f.total);
        open.with_label_values(&[&f.rule])
            .set(i64::try_from(f.open).unwrap_or(i64::MAX));
    }
    // Reported before the first flag too, so alerts and dashboards find them.
    if load.follow_ups.is_empty() {
        flagged.with_label_values(&[""]).inc_by(0);
        open.with_label_values(&[""]).set(0);
    }
    r.register(Box::new(flagged))?;
    r.register(Box::new(open))?;
    Ok(())
}

/// The record store's counters (this process).
fn register_records(r: &Registry, c: &RecordCounters) -> prometheus::Result<()> {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let written = IntCounterVec::new(
        Opts::new(
            "countersign_records_written_total",
            "Session record entries written by this process, by kind.",
        ),
        &["kind"],
    )?;
    written
        .with_label_values(&["request"])
        .inc_by(load(&c.requests));
    written
        .with_label_values(&["response"])
        .inc_by(load(&c.responses));
    written
        .with_label_values(&["retention"])
        .inc_by(load(&c.retentions));
    r.register(Box::new(written))?;
    let single = |name: &str, help: &str, value: u64| -> prometheus::Result<()> {
        let c = prometheus::IntCounter::new(name, help)?;
        c.inc_by(value);
        r.register(Box::new(c))
    };
    single(
        "countersign_record_write_failures_total",
        "Session record writes the database refused (the filter refuses those requests).",
        load(&c.write_failures),
    )?;
    single(
        "countersign_records_deleted_total",
        "Session record entries deleted by retention in this process.",
        load(&c.retention_deleted),
    )
}
