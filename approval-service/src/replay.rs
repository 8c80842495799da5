//! `replay`: a draft plugin configuration tried on past traffic. Each
//! session record's request goes through the filter's own decision
//! ([`countersign_core::inspect::decide_request`]: the head checks,
//! endpoint and shape, content policy, rule choice, masking), and the report
//! says what would change: counts by outcome, and the requests whose outcome
//! flips, by rule, caller and model.
//!
//! What a record cannot give is said, never guessed: a record keeps the
//! body as forwarded (masked, or edited by a reviewer), so masking rules
//! re-fire only on values not already masked; for a reviewed request the
//! body the reviewers were shown (the caller's, masked) is replayed; a
//! request refused before its body was recorded is skipped with the
//! reason, and so is one without a caller where the draft identifies
//! callers (keys are not recorded, so identity is the recorded caller).
//!
//! Read-only: the database is opened read-only and only read with SELECT.
//! Exit codes: 0 the report was printed, 2 usage error, an invalid draft or
//! a database that cannot be read.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::ArgMatches;
use countersign_approval::records::{self, RecordQuery};
use countersign_core::config::Config as PluginConfig;
use countersign_core::identity::Caller;
use countersign_core::inspect::{
    decide_request, Decision, Outcome, RequestInfo, TOKEN_RULE_PREFIX,
};
use countersign_core::request::RequestHead;
use countersign_core::wire::NewRecord;
use serde::Serialize;
use serde_json::Value;

use crate::check_config::plugin::unknown_env_value;
use crate::records_cli::Source;

/// Options of `replay`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    source: Source,
    /// The draft plugin configuration (the filter's JSON) to try.
    #[arg(long = "plugin-config", value_name = "FILE.json")]
    plugin_config: PathBuf,
    /// Only records of the last DURATION: a number with `d`, `h`, `m` or
    /// `s` (e.g. 7d, 12h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    since: Option<Duration>,
    /// Only this caller's records.
    #[arg(long, value_name = "NAME")]
    caller: Option<String>,
    /// Print the report as JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// `7d`, `12h`, `30m`, `45s`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("`{text}` is not a duration such as 7d, 12h, 30m or 45s");
    let split = text.len().checked_sub(1).ok_or_else(bad)?;
    let (number, unit) = text.split_at_checked(split).ok_or_else(bad)?;
    let n: u64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "d" => n.checked_mul(86_400),
        "h" => n.checked_mul(3_600),
        "m" => n.checked_mul(60),
        "s" => Some(n),
        _ => None,
    };
    seconds.map(Duration::from_secs).ok_or_else(bad)
}

/// An outcome and the rule (or detector) behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Judged {
    /// `allow`, `review`, `deny`, `block` or `refuse`.
    pub outcome: &'static str,
    /// The rule, content rule or detector that decided, when one did.
    pub rule: Option<String>,
}

/// A request whose outcome would change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flip {
    /// Position in the record log.
    pub seq: i64,
    /// The record.
    pub record_id: String,
    /// Envoy's `x-request-id`.
    pub request_id: String,
    /// When the request arrived (Unix ms).
    pub received_at_ms: u64,
    /// The recorded caller.
    pub caller: Option<String>,
    /// The model (as the draft's decision read it, else as recorded).
    pub model: Option<String>,
    /// The request path.
    pub path: String,
    /// What happened.
    pub from: Judged,
    /// What the draft would do.
    pub to: Judged,
    /// The draft's refusal message, for refusals (never prompt text).
    pub message: Option<String>,
}

/// A record that could not be replayed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// Position in the record log.
    pub seq: i64,
    /// The record.
    pub record_id: String,
    /// Why it was not replayed.
    pub reason: String,
}

/// Flips sharing a change and a key (a rule, caller or model).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlipGroup {
    /// The outcome before.
    pub from: &'static str,
    /// The outcome under the draft.
    pub to: &'static str,
    /// The rule (the draft's), caller or model; `-` when none.
    pub key: String,
    /// How many requests.
    pub count: u64,
}

/// What replaying a set of records found.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Records read.
    pub records: u64,
    /// Records replayed.
    pub replayed: u64,
    /// Replayed records by the outcome they had.
    pub before: BTreeMap<&'static str, u64>,
    /// Replayed records by the outcome the draft gives them.
    pub after: BTreeMap<&'static str, u64>,
    /// Requests whose outcome changes, oldest first.
    pub flips: Vec<Flip>,
    /// Flips by the draft's rule.
    pub flips_by_rule: Vec<FlipGroup>,
    /// Flips by caller.
    pub flips_by_caller: Vec<FlipGroup>,
    /// Flips by model.
    pub flips_by_model: Vec<FlipGroup>,
    /// Records not replayed, with the reason.
    pub skipped: Vec<Skipped>,
}

/// One record: replayed (what it had, what the draft gives) or skipped.
enum Replay {
    Done {
        from: Judged,
        to: Decision,
        record: Box<NewRecord>,
    },
    Skip(String),
}

/// The outcome a record had: a request with a review was reviewed (its
/// decision says how that ended), one allowed by a rule was allowed.
fn recorded_outcome(rec: &NewRecord, reviewed: bool) -> Option<Outcome> {
    let by_token = rec
        .rule
        .as_deref()
        .is_some_and(|r| r.starts_with(TOKEN_RULE_PREFIX));
    match rec.decision.as_str() {
        _ if reviewed || by_token || rec.review_id.is_some() => Some(Outcome::Review),
        "allowed" => Some(Outcome::Allow),
        // A token spends an approval; fail_open forwarded what a rule
        // wanted reviewed.
        "token" | "fail_open" | "approved" | "edited" => Some(Outcome::Review),
        _ => None,
    }
}

/// Replays one merged record (as [`records::query_records`] gives it).
fn replay_record(config: &PluginConfig, entry: &Value) -> Replay {
    let Some(request) = entry.get("request") else {
        return Replay::Skip("not a request record".into());
    };
    let rec: NewRecord = match serde_json::from_value(request.clone()) {
        Ok(r) => r,
        Err(e) => return Replay::Skip(format!("the request part cannot be read: {e}")),
    };
    let review = entry.get("review").filter(|r| !r.is_null());
    // The body the caller sent, as far as the record has it: the one the
    // reviewers were shown when a reviewer edited it (or the request was
    // refused after its review), else the forwarded one.
    let shown = review
        .and_then(|r| r.get("original_body"))
        .and_then(Value::as_str);
    let Some(body) = shown.or(rec.body.as_deref()) else {
        return Replay::Skip(format!(
            "refused ({}) before its body was recorded",
            rec.decision
        ));
    };
    let Some(from) = recorded_outcome(&rec, review.is_some()) else {
        return Replay::Skip(format!(
            "decision `{}` does not say which outcome the policy gave",
            rec.decision
        ));
    };
    let caller =
        match (&config.identity, &rec.caller) {
            (None, _) => None,
            (Some(_), Some(name)) => Some(Caller {
                name: name.clone(),
                groups: rec.caller_groups.clone(),
            }),
            (Some(_), None) => return Replay::Skip(
                "the draft identifies callers and the record has no caller (keys are not recorded)"
                    .into(),
            ),
        };
    let info = RequestInfo {
        request_id: rec.request_id.clone(),
        method: rec.method.clone(),
        path: rec.path.clone(),
        route: rec.route.clone(),
        caller,
        source_address: rec.source_address.clone(),
        received_at_ms: rec.received_at_ms,
        ..RequestInfo::default()
    };
    // Headers that are not recorded had the values the filter accepts: the
    // body was read, so the head passed.
    let head = RequestHead {
        method: &rec.method,
        path: &rec.path,
        content_type: Some("application/json"),
        ..RequestHead::default()
    };
    let to = decide_request(config, &head, &info, body.as_bytes(), rec.received_at_ms);
    Replay::Done {
        from: Judged {
            outcome: from.as_str(),
            rule: rec.rule.clone(),
        },
        to,
        record: Box::new(rec),
    }
}

impl Report {
    /// Adds one merged record.
    fn add(&mut self, config: &PluginConfig, entry: &Value) {
        self.records += 1;
        let seq = entry.get("seq").and_then(Value::as_i64).unwrap_or(0);
        let record_id = entry
            .get("record_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let (from, to, rec) = match replay_record(config, entry) {
            Replay::Skip(reason) => {
                self.skipped.push(Skipped {
                    seq,
                    record_id,
                    reason,
                });
                return;
            }
            Replay::Done { from, to, record } => (from, to, record),
        };
        self.replayed += 1;
        *self.before.entry(from.outcome).or_default() += 1;
        *self.after.entry(to.outcome.as_str()).or_default() += 1;
        if from.outcome == to.outcome.as_str() {
            return;
        }
        self.flips.push(Flip {
            seq,
            record_id,
            request_id: rec.request_id,
            received_at_ms: rec.received_at_ms,
            caller: rec.caller,
            model: rec.model,
            path: rec.path,
            from,
            to: Judged {
                outcome: to.outcome.as_str(),
                rule: to.rule,
            },
            message: to.refusal.map(|r| r.message),
        });
    }

    /// Groups the flips by rule, caller and model.
    fn group(&mut self) {
        let by = |key: &dyn Fn(&Flip) -> Option<String>| {
            let mut counts: BTreeMap<(&'static str, &'static str, String), u64> = BTreeMap::new();
            for f in &self.flips {
                let k = key(f).unwrap_or_else(|| "-".into());
                *counts.entry((f.from.outcome, f.to.outcome, k)).or_default() += 1;
            }
            counts
                .into_iter()
                .map(|((from, to, key), count)| FlipGroup {
                    from,
                    to,
                    key,
                    count,
                })
                .collect::<Vec<_>>()
        };
        self.flips_by_rule = by(&|f| f.to.rule.clone().or_else(|| f.from.rule.clone()));
        self.flips_by_caller = by(&|f| f.caller.clone());
        self.flips_by_model = by(&|f| f.model.clone());
    }

    /// The report as tables.
    fn table(&self) -> String {
        let mut out = format!(
            "replayed {} of {} record(s); {} skipped; {} would change outcome\n\n",
            self.replayed,
            self.records,
            self.skipped.len(),
            self.flips.len()
        );
        out.push_str(&format!(
            "{:<8} {:>8} {:>8}\n",
            "outcome", "before", "after"
        ));
        for o in Outcome::ALL {
            let n = |m: &BTreeMap<&str, u64>| m.get(o.as_str()).copied().unwrap_or(0);
            out.push_str(&format!(
                "{:<8} {:>8} {:>8}\n",
                o.as_str(),
                n(&self.before),
                n(&self.after)
            ));
        }
        for (title, groups) in [
            ("rule", &self.flips_by_rule),
            ("caller", &self.flips_by_caller),
            ("model", &self.flips_by_model),
        ] {
            if groups.is_empty() {
                continue;
            }
            out.push_str(&format!("\nflips by {title}:\n"));
            for g in groups {
                let change = format!("{} -> {}", g.from, g.to);
                out.push_str(&format!("  {change:<18} {:<32} {:>6}\n", g.key, g.count));
            }
        }
        if !self.flips.is_empty() {
            out.push_str("\nrequests that would flip:\n");
            let judged = |j: &Judged| match &j.rule {
                Some(r) => format!("{} ({r})", j.outcome),
                None => j.outcome.to_string(),
            };
            for f in &self.flips {
                out.push_str(&format!(
                    "  seq {:<6} {:<24} caller {:<16} model {:<20} {} -> {}\n",
                    f.seq,
                    f.request_id,
                    f.caller.as_deref().unwrap_or("-"),
                    f.model.as_deref().unwrap_or("-"),
                    judged(&f.from),
                    judged(&f.to)
                ));
            }
        }
        if !self.skipped.is_empty() {
            let mut reasons: BTreeMap<&str, u64> = BTreeMap::new();
            for s in &self.skipped {
                *reasons.entry(s.reason.as_str()).or_default() += 1;
            }
            out.push_str("\nskipped:\n");
            for (reason, count) in reasons {
                out.push_str(&format!("  {count:>6}  {reason}\n"));
            }
        }
        out
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("countersign-approval: {msg}");
    ExitCode::from(2)
}

/// Reads the draft with the filter's own parser; `*_env` values come from
/// the process environment, or stand-ins (secrets decide nothing here).
fn load_draft(path: &std::path::Path) -> Result<PluginConfig, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    PluginConfig::from_json_with_env(&bytes, &|name| Some(unknown_env_value(name)))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// `replay`.
pub fn run(args: &Args, matches: Option<&ArgMatches>) -> ExitCode {
    let config = match load_draft(&args.plugin_config) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let mut conn = match args.source.open(matches) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let since_ms = args.since.map(|d| {
        let window = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        countersign_approval::now_ms().saturating_sub(window)
    });
    let query = RecordQuery {
        caller: args.caller.clone(),
        since_ms,
        ..RecordQuery::default()
    };
    let mut report = Report::default();
    let read = records::for_each_record(&mut conn, &query, |entry| {
        report.add(&config, &entry);
        Ok::<(), countersign_approval::db::DbError>(())
    });
    if let Err(e) = read {
        return fail(&format!("cannot read records: {e}"));
    }
    report.group();
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => return fail(&format!("cannot write the report: {e}")),
        }
    } else {
        print!("{}", report.table());
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3_600)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1_800)));
        assert_eq!(parse_duration("45s"), Ok(Duration::from_secs(45)));
        for bad in ["", "d", "7", "7w", "-1d", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    fn entry(request: Value, review: Value) -> Value {
        json!({"seq": 1, "record_id": "rec_1", "request": request, "review": review})
    }

    fn request(decision: &str, caller: Option<&str>, body: Option<&str>) -> Value {
        json!({
            "request_id": "r1", "received_at_ms": 1, "caller": caller,
            "method": "POST", "path": "/v1/chat/completions", "api": "openai_chat",
            "model": "m", "decision": decision, "rule": "old", "body": body,
        })
    }

    const HI: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    const EDITED: &str = r#"{"model":"m","messages":[{"role":"user","content":"bye"}]}"#;

    fn outcome(config: &str, e: &Value) -> Result<(&'static str, Option<String>), String> {
        let config = PluginConfig::from_json(config.as_bytes()).unwrap();
        match replay_record(&config, e) {
            Replay::Done { from, to, .. } => {
                assert!(from.outcome == "allow" || from.outcome == "review");
                Ok((to.outcome.as_str(), to.rule))
            }
            Replay::Skip(reason) => Err(reason),
        }
    }

    #[test]
    fn a_reviewed_request_replays_the_body_the_reviewers_were_shown() {
        let deny_hi = r#"{"content_policy":{"request_rules":[{"name":"no-hi","phrases":["hi"]}]}}"#;
        // Edited to "bye": the caller sent "hi", which is what is replayed.
        let e = entry(
            request("edited", None, Some(EDITED)),
            json!({"id": "rev_1", "status": "approved", "original_body": HI}),
        );
        assert_eq!(outcome(deny_hi, &e), Ok(("deny", Some("no-hi".into()))));
        // Rejected: no forwarded body, the review's is replayed.
        let e = entry(
            request("rejected", None, None),
            json!({"id": "rev_1", "status": "rejected", "original_body": HI}),
        );
        assert_eq!(outcome(deny_hi, &e), Ok(("deny", Some("no-hi".into()))));
        let e = entry(request("allowed", None, Some(EDITED)), Value::Null);
        assert_eq!(outcome(deny_hi, &e), Ok(("review", Some("default".into()))));
    }

    #[test]
    fn a_request_forwarded_with_an_approval_token_had_been_reviewed() {
        let mut rec: NewRecord =
            serde_json::from_value(request("allowed", None, Some(HI))).unwrap();
        assert_eq!(recorded_outcome(&rec, false), Some(Outcome::Allow));
        rec.rule = Some(format!("{TOKEN_RULE_PREFIX}rev_1"));
        assert_eq!(recorded_outcome(&rec, false), Some(Outcome::Review));
        rec.decision = "token".into();
        rec.rule = Some("approval_token".into());
        assert_eq!(recorded_outcome(&rec, false), Some(Outcome::Review));
    }

    #[test]
    fn what_a_record_cannot_tell_is_skipped_with_the_reason() {
        let e = entry(request("denied", None, None), Value::Null);
        let reason = outcome("{}", &e).unwrap_err();
        assert!(reason.contains("before its body was recorded"), "{reason}");
        let identified = format!(
            r#"{{"identity":{{"source":"api_key","api_keys":[{{"sha256":"{}","caller":"ci"}}]}}}}"#,
            "0".repeat(64)
        );
        let e = entry(request("allowed", None, Some(HI)), Value::Null);
        let reason = outcome(&identified, &e).unwrap_err();
        assert!(reason.contains("no caller"), "{reason}");
        // With a recorded caller, rules on callers apply.
        let by_caller = format!(
            r#"{{"identity":{{"source":"api_key","api_keys":[{{"sha256":"{}","caller":"ci"}}]}},"rules":[{{"name":"ci","caller":"ci","action":"allow"}}]}}"#,
            "0".repeat(64)
        );
        let e = entry(request("approved", Some("ci"), Some(HI)), Value::Null);
        assert_eq!(outcome(&by_caller, &e), Ok(("allow", Some("ci".into()))));
    }

    #[test]
    fn the_report_counts_outcomes_and_groups_flips() {
        let config = PluginConfig::from_json(
            br#"{"rules":[{"name":"big","model":"big","action":"deny"},{"name":"rest","action":"allow"}]}"#,
        )
        .unwrap();
        let mut report = Report::default();
        let big = r#"{"model":"big","messages":[{"role":"user","content":"hi"}]}"#;
        let mut rec = request("allowed", Some("a"), Some(HI));
        report.add(&config, &entry(rec.clone(), Value::Null));
        rec["body"] = json!(big);
        rec["model"] = json!("big");
        report.add(&config, &entry(rec.clone(), Value::Null));
        rec["decision"] = json!("approved");
        report.add(&config, &entry(rec, Value::Null));
        report.add(&config, &entry(request("denied", None, None), Value::Null));
        report.group();
        assert_eq!((report.records, report.replayed), (4, 3));
        assert_eq!(report.before.get("allow"), Some(&2));
        assert_eq!(report.before.get("review"), Some(&1));
        assert_eq!(report.after.get("allow"), Some(&1));
        assert_eq!(report.after.get("deny"), Some(&2));
        assert_eq!(report.flips.len(), 2);
        assert_eq!(
            report.flips_by_rule,
            vec![
                FlipGroup {
                    from: "allow",
                    to: "deny",
                    key: "big".into(),
                    count: 1
                },
                FlipGroup {
                    from: "review",
                    to: "deny",
                    key: "big".into(),
                    count: 1
                },
            ]
        );
        assert_eq!(report.skipped.len(), 1);
        let table = report.table();
        assert!(table.contains("replayed 3 of 4"), "{table}");
        assert!(table.contains("allow -> deny"), "{table}");
    }
}
