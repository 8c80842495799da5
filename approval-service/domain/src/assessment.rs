//! Assessments of a review: what each configured assessor said about the
//! prompt (labels and scores), the exact request and answer formats of the
//! services they speak to (parsed here, strictly: an answer that is not
//! the documented format is a failure, never "nothing found"), and the
//! automatic decision a rule's policy draws from them.
//!
//! No HTTP here: the top layer (`countersign_approval::assess`) sends the
//! requests built here and hands the answers' bytes back to the parsers.
//!
//! Fail closed: an assessor that failed, timed out or answered nonsense
//! rules every automatic approval out; the review waits for people and
//! says why.

use countersign_core::wire::{AutoDecision, Evidence, PromptMessage};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::{AssessorConfig, AssessorKind};

/// One label an assessor gave: a moderation category, a guard model's
/// category code, a Presidio entity type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Label {
    /// As the assessor names it (`violence`, `S1`, `EMAIL_ADDRESS`).
    pub name: String,
    /// Its score, 0..=1, when the assessor gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    /// The assessor itself flagged it.
    pub flagged: bool,
}

/// What one assessor said about one review.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assessment {
    /// The assessor's configured name.
    pub assessor: String,
    /// What it speaks.
    pub kind: AssessorKind,
    /// The assessor flagged the prompt as a whole.
    pub flagged: bool,
    /// Its labels, in the order it gave them.
    pub labels: Vec<Label>,
    /// Why it gave no usable answer (error, timeout, nonsense); then it has
    /// no labels and rules every automatic approval out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long it took, ms.
    pub took_ms: u64,
}

impl Assessment {
    /// A usable answer.
    pub fn answered(a: &AssessorConfig, flagged: bool, labels: Vec<Label>, took_ms: u64) -> Self {
        Assessment {
            assessor: a.name.clone(),
            kind: a.kind,
            flagged,
            labels,
            error: None,
            took_ms,
        }
    }

    /// No usable answer, and why.
    pub fn failed(a: &AssessorConfig, error: impl Into<String>, took_ms: u64) -> Self {
        Assessment {
            assessor: a.name.clone(),
            kind: a.kind,
            flagged: false,
            labels: Vec::new(),
            error: Some(error.into()),
            took_ms,
        }
    }
}

/// Everything the assessors said and what came of it, stored with the
/// review and copied into its record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssessmentReport {
    /// One per configured assessor, in configuration order.
    pub assessments: Vec<Assessment>,
    /// What the rule's policy made of them.
    pub outcome: AutoOutcome,
}

/// What a rule's automatic-decision policy made of the assessments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum AutoOutcome {
    /// Approve without a person.
    Approve {
        /// The decider as recorded (`assessor:<name>[+<name>...]`).
        decider: String,
        /// Why, as recorded with the decision.
        reason: String,
    },
    /// Reject without a person.
    Deny {
        /// The decider as recorded (`assessor:<name>`).
        decider: String,
        /// Why, as recorded with the decision.
        reason: String,
    },
    /// People decide; shown on the review.
    ForPeople {
        /// Why nothing was decided automatically.
        why: String,
    },
}

/// How the decider name of an automatic decision begins.
pub const DECIDER_PREFIX: &str = "assessor:";

/// The decider name of an automatic decision by `assessors`.
pub fn decider_name(assessors: &[&str]) -> String {
    format!("{DECIDER_PREFIX}{}", assessors.join("+"))
}

/// The text the assessors read: the prompt as the reviewer sees it (masked
/// values stay placeholders), one message per paragraph with its role.
pub fn prompt_text(prompt: &[PromptMessage]) -> String {
    prompt
        .iter()
        .map(|m| format!("{}: {}", m.role, m.text))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// The JSON body sent to assessor `a` about `text`.
pub fn request_body(a: &AssessorConfig, text: &str) -> Value {
    match a.kind {
        // https://platform.openai.com/docs/api-reference/moderations/create
        AssessorKind::Moderation => match &a.model {
            Some(model) => json!({ "model": model, "input": text }),
            None => json!({ "input": text }),
        },
        // A guard model classifies the conversation it is given; its chat
        // template turns it into the classification prompt.
        AssessorKind::GuardModel => json!({
            "model": a.model,
            "messages": [{ "role": "user", "content": text }],
            "temperature": 0,
            "max_tokens": 32,
            "stream": false,
        }),
        // Presidio analyzer: POST /analyze {"text", "language"}.
        AssessorKind::Presidio => json!({ "text": text, "language": a.language }),
    }
}

/// Parses assessor `kind`'s answer body into (flagged, labels), or says
/// why it is not the documented format. The message never quotes the
/// answer (a model may echo the prompt).
pub fn parse_answer(kind: AssessorKind, body: &[u8]) -> Result<(bool, Vec<Label>), String> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| format!("the answer is not JSON ({})", e.classify_name()))?;
    match kind {
        AssessorKind::Moderation => parse_moderation(&value),
        AssessorKind::GuardModel => parse_guard(&value),
        AssessorKind::Presidio => parse_presidio(&value),
    }
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "read error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "wrong types",
            serde_json::error::Category::Eof => "cut short",
        }
    }
}

fn score_of(v: &Value, what: &str) -> Result<f64, String> {
    match v.as_f64() {
        Some(s) if s.is_finite() && (0.0..=1.0).contains(&s) => Ok(s),
        _ => Err(format!("{what} is not a score from 0 to 1")),
    }
}

/// OpenAI's moderation answer: `{"results": [{"flagged", "categories",
/// "category_scores"}]}`, one result per input; a category flagged in any
/// result is flagged, and its score is the highest.
fn parse_moderation(v: &Value) -> Result<(bool, Vec<Label>), String> {
    let results = v
        .get("results")
        .and_then(Value::as_array)
        .filter(|r| !r.is_empty())
        .ok_or("the answer has no `results` list")?;
    let mut flagged = false;
    let mut labels: Vec<Label> = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let at = format!("results[{i}]");
        flagged |= r
            .get("flagged")
            .and_then(Value::as_bool)
            .ok_or(format!("{at}.flagged is not a boolean"))?;
        let categories = r
            .get("categories")
            .and_then(Value::as_object)
            .ok_or(format!("{at}.categories is not an object"))?;
        let scores = r
            .get("category_scores")
            .and_then(Value::as_object)
            .ok_or(format!("{at}.category_scores is not an object"))?;
        for (name, on) in categories {
            // OpenAI answers `null` for categories a model does not judge.
            let on = match on {
                Value::Bool(b) => *b,
                Value::Null => false,
                _ => return Err(format!("{at}.categories.{name} is not a boolean")),
            };
            flagged |= on;
            merge(&mut labels, name, None, on);
        }
        for (name, s) in scores {
            let s = score_of(s, &format!("{at}.category_scores.{name}"))?;
            merge(&mut labels, name, Some(s), false);
        }
    }
    Ok((flagged, labels))
}

fn merge(labels: &mut Vec<Label>, name: &str, score: Option<f64>, flagged: bool) {
    match labels.iter_mut().find(|l| l.name == name) {
        Some(l) => {
            l.flagged |= flagged;
            l.score = match (l.score, score) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
        }
        None => labels.push(Label {
            name: name.to_string(),
            score,
            flagged,
        }),
    }
}

/// A guard model's chat completion: `choices[0].message.content` is `safe`,
/// or `unsafe` and on the next line the violated category codes separated
/// by commas (`S1,S10`), as Llama Guard answers.
fn parse_guard(v: &Value) -> Result<(bool, Vec<Label>), String> {
    let content = v
        .get("choices")
        .and_then(|c| c.get(0))
        .and_then(|c| c.get("message"))
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .ok_or("the answer has no `choices[0].message.content` text")?;
    let mut lines = content.trim().lines().map(str::trim);
    let verdict = lines.next().unwrap_or("");
    let rest: Vec<&str> = lines.filter(|l| !l.is_empty()).collect();
    match (verdict, rest.as_slice()) {
        ("safe", []) => Ok((false, Vec::new())),
        ("unsafe", []) => Ok((true, Vec::new())),
        ("unsafe", [codes]) => {
            let mut labels = Vec::new();
            for code in codes.split(',').map(str::trim) {
                let valid = code
                    .strip_prefix('S')
                    .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
                if !valid {
                    return Err("the guard model named a category that is not a code like S1".into());
                }
                merge(&mut labels, code, None, true);
            }
            Ok((true, labels))
        }
        _ => Err(format!(
            "the guard model answered neither `safe` nor `unsafe` with category codes ({} characters)",
            content.chars().count()
        )),
    }
}

/// Presidio's analyzer answer: a list of `{"entity_type", "start", "end",
/// "score"}`; one label per entity type with its highest score. Presidio
/// flags nothing itself: rules read the scores.
fn parse_presidio(v: &Value) -> Result<(bool, Vec<Label>), String> {
    let found = v.as_array().ok_or("the answer is not a list of entities")?;
    let mut labels: Vec<Label> = Vec::new();
    for (i, e) in found.iter().enumerate() {
        let entity = e
            .get("entity_type")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or(format!("[{i}].entity_type is not a name"))?;
        let start = e.get("start").and_then(Value::as_u64);
        let end = e.get("end").and_then(Value::as_u64);
        if !matches!((start, end), (Some(s), Some(t)) if s <= t) {
            return Err(format!("[{i}] has no valid `start` and `end`"));
        }
        let score = score_of(
            e.get("score").unwrap_or(&Value::Null),
            &format!("[{i}].score"),
        )?;
        merge(&mut labels, entity, Some(score), false);
    }
    Ok((false, labels))
}

/// What `policy` decides from `assessments` and the filter's `evidence`.
///
/// - Deny first: a label named in `auto_deny` that its assessor flagged,
///   or that scores at least `min_score`, rejects (a failed assessor does
///   not stop another's deny: rejecting is safe).
/// - Approve only when assessors are configured and every one answered,
///   none flagged anything, no label scores `max_score` or more, none of
///   `unless_hits` fired, and one approval is all the review needs (an
///   assessor is never counted as a person in a quorum).
/// - Otherwise people decide, and the outcome says why.
pub fn decide(
    policy: Option<&AutoDecision>,
    evidence: &Evidence,
    assessments: &[Assessment],
    required_approvals: u32,
) -> AutoOutcome {
    let people = |why: String| AutoOutcome::ForPeople { why };
    let Some(policy) = policy else {
        return people("the rule leaves every decision to people".into());
    };
    if let Some(deny) = &policy.deny {
        for a in assessments.iter().filter(|a| a.error.is_none()) {
            let hit = a.labels.iter().find(|l| {
                deny.labels.contains(&l.name)
                    && (l.flagged || l.score.is_some_and(|s| s >= deny.min_score))
            });
            if let Some(label) = hit {
                let score = label
                    .score
                    .map(|s| format!(" (score {s:.2})"))
                    .unwrap_or_default();
                return AutoOutcome::Deny {
                    decider: decider_name(&[&a.assessor]),
                    reason: format!(
                        "automatic rejection: {} named `{}`{score}",
                        a.assessor, label.name
                    ),
                };
            }
        }
    }
    let Some(approve) = &policy.approve else {
        return people("the rule approves nothing automatically".into());
    };
    if assessments.is_empty() {
        return people(
            "no assessor is configured for this rule, so nothing is approved automatically".into(),
        );
    }
    if let Some(a) = assessments.iter().find(|a| a.error.is_some()) {
        return people(format!(
            "assessor {} failed ({}): a person decides",
            a.assessor,
            a.error.as_deref().unwrap_or("")
        ));
    }
    if let Some(a) = assessments.iter().find(|a| a.flagged) {
        return people(format!("assessor {} flagged the prompt", a.assessor));
    }
    for a in assessments {
        if let Some(l) = a.labels.iter().find(|l| l.flagged) {
            return people(format!("assessor {} flagged `{}`", a.assessor, l.name));
        }
        if let Some((l, s)) = a
            .labels
            .iter()
            .find_map(|l| l.score.filter(|s| *s >= approve.max_score).map(|s| (l, s)))
        {
            return people(format!(
                "assessor {} scored `{}` {s:.2}, at or above {:.2}",
                a.assessor, l.name, approve.max_score
            ));
        }
    }
    if let Some(h) = evidence
        .hits
        .iter()
        .find(|h| h.count > 0 && approve.unless_hits.contains(&h.name))
    {
        return people(format!(
            "`{}` fired on the request ({} {})",
            h.name, h.action, h.count
        ));
    }
    if required_approvals > 1 {
        return people("the rule asks for several people's approvals".into());
    }
    if evidence.attachments {
        // The assessors read the prompt's text, where an image, audio or
        // file is a marker of its type and size: they found nothing in
        // what they never saw.
        return people(
            "the request carries attachments (images, audio, files) the assessors do not read"
                .into(),
        );
    }
    let names: Vec<&str> = assessments.iter().map(|a| a.assessor.as_str()).collect();
    AutoOutcome::Approve {
        decider: decider_name(&names),
        reason: format!(
            "automatic approval: {} found nothing at or above {:.2}",
            names.join(", "),
            approve.max_score
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use countersign_core::wire::{AutoApprove, AutoDeny, HitCount};
    use std::time::Duration;

    fn assessor(kind: AssessorKind) -> AssessorConfig {
        AssessorConfig {
            name: kind.as_str().into(),
            kind,
            url: "http://127.0.0.1:1/x".into(),
            timeout: Duration::from_secs(1),
            model: Some("m".into()),
            language: "en".into(),
            api_key: None,
            max_prompt_chars: 8_000,
        }
    }

    #[test]
    fn moderation_answers_are_read_as_openai_documents_them() {
        let body = br#"{"id":"modr-1","model":"omni-moderation-latest","results":[{"flagged":true,
            "categories":{"violence":true,"harassment":false,"illicit":null},
            "category_scores":{"violence":0.91,"harassment":0.02,"illicit":0.001},
            "category_applied_input_types":{"violence":["text"]}}]}"#;
        let (flagged, labels) = parse_answer(AssessorKind::Moderation, body).unwrap();
        assert!(flagged);
        let violence = labels.iter().find(|l| l.name == "violence").unwrap();
        assert_eq!((violence.flagged, violence.score), (true, Some(0.91)));
        let harassment = labels.iter().find(|l| l.name == "harassment").unwrap();
        assert_eq!((harassment.flagged, harassment.score), (false, Some(0.02)));
        let (flagged, _) = parse_answer(
            AssessorKind::Moderation,
            br#"{"results":[{"flagged":false,"categories":{"violence":false},"category_scores":{"violence":0.1}}]}"#,
        )
        .unwrap();
        assert!(!flagged);
        for nonsense in [
            &br#"{"results":[]}"#[..],
            br#"{"error":{"message":"overloaded"}}"#,
            br#"{"results":[{"flagged":"no","categories":{},"category_scores":{}}]}"#,
            br#"{"results":[{"flagged":false,"categories":{},"category_scores":{"violence":7}}]}"#,
            br#"{"results":[{"flagged":false,"categories":{"violence":"yes"},"category_scores":{}}]}"#,
            b"<html>502</html>",
        ] {
            assert!(parse_answer(AssessorKind::Moderation, nonsense).is_err());
        }
    }

    fn chat(content: &str) -> Vec<u8> {
        serde_json::to_vec(
            &json!({"id":"c","object":"chat.completion","choices":[{"index":0,
            "message":{"role":"assistant","content":content},"finish_reason":"stop"}]}),
        )
        .unwrap()
    }

    #[test]
    fn guard_model_answers_are_safe_or_unsafe_with_codes() {
        assert_eq!(
            parse_answer(AssessorKind::GuardModel, &chat("safe")).unwrap(),
            (false, vec![])
        );
        assert_eq!(
            parse_answer(AssessorKind::GuardModel, &chat("\n\nsafe\n")).unwrap(),
            (false, vec![])
        );
        let (flagged, labels) =
            parse_answer(AssessorKind::GuardModel, &chat("unsafe\nS1,S10")).unwrap();
        assert!(flagged);
        let names: Vec<_> = labels
            .iter()
            .map(|l| (l.name.as_str(), l.flagged, l.score))
            .collect();
        assert_eq!(names, [("S1", true, None), ("S10", true, None)]);
        assert!(
            parse_answer(AssessorKind::GuardModel, &chat("unsafe"))
                .unwrap()
                .0
        );
        for nonsense in [
            "Sure! Here is",
            "safe\nS1",
            "unsafe\nviolence",
            "unsafe\nS1\nS2",
            "",
            "SAFE",
        ] {
            assert!(
                parse_answer(AssessorKind::GuardModel, &chat(nonsense)).is_err(),
                "{nonsense:?}"
            );
        }
        assert!(parse_answer(AssessorKind::GuardModel, br#"{"choices":[]}"#).is_err());
    }

    #[test]
    fn presidio_answers_are_entities_with_scores() {
        let body = br#"[{"entity_type":"EMAIL_ADDRESS","start":5,"end":20,"score":1.0,"analysis_explanation":null,"recognition_metadata":{}},
                        {"entity_type":"PHONE_NUMBER","start":30,"end":42,"score":0.4},
                        {"entity_type":"PHONE_NUMBER","start":50,"end":62,"score":0.75}]"#;
        let (flagged, labels) = parse_answer(AssessorKind::Presidio, body).unwrap();
        assert!(!flagged);
        let got: Vec<_> = labels.iter().map(|l| (l.name.as_str(), l.score)).collect();
        assert_eq!(
            got,
            [("EMAIL_ADDRESS", Some(1.0)), ("PHONE_NUMBER", Some(0.75))]
        );
        assert_eq!(
            parse_answer(AssessorKind::Presidio, b"[]").unwrap(),
            (false, vec![])
        );
        for nonsense in [
            &br#"{"error":"No text provided"}"#[..],
            br#"[{"entity_type":"X","start":5,"end":2,"score":0.5}]"#,
            br#"[{"entity_type":"X","start":1,"end":2,"score":2}]"#,
            br#"[{"start":1,"end":2,"score":0.5}]"#,
        ] {
            assert!(parse_answer(AssessorKind::Presidio, nonsense).is_err());
        }
    }

    #[test]
    fn requests_follow_each_api() {
        let m = request_body(&assessor(AssessorKind::Moderation), "hi");
        assert_eq!(m, json!({"model":"m","input":"hi"}));
        let g = request_body(&assessor(AssessorKind::GuardModel), "hi");
        assert_eq!(g["messages"], json!([{"role":"user","content":"hi"}]));
        let p = request_body(&assessor(AssessorKind::Presidio), "hi");
        assert_eq!(p, json!({"text":"hi","language":"en"}));
    }

    fn answered(kind: AssessorKind, labels: Vec<Label>) -> Assessment {
        let flagged = labels.iter().any(|l| l.flagged);
        Assessment::answered(&assessor(kind), flagged, labels, 1)
    }

    fn label(name: &str, score: Option<f64>, flagged: bool) -> Label {
        Label {
            name: name.into(),
            score,
            flagged,
        }
    }

    fn policy() -> AutoDecision {
        AutoDecision {
            approve: Some(AutoApprove {
                max_score: 0.5,
                unless_hits: vec!["email".into()],
            }),
            deny: Some(AutoDeny {
                labels: vec!["S1".into(), "CREDIT_CARD".into()],
                min_score: 0.8,
            }),
        }
    }

    #[test]
    fn approval_needs_every_assessor_to_answer_and_find_nothing() {
        let clean = vec![
            answered(
                AssessorKind::Moderation,
                vec![label("violence", Some(0.1), false)],
            ),
            answered(AssessorKind::GuardModel, vec![]),
        ];
        let none = Evidence::default();
        let p = policy();
        assert!(matches!(
            decide(Some(&p), &none, &clean, 1),
            AutoOutcome::Approve { ref decider, .. } if decider == "assessor:moderation+guard_model"
        ));
        // Fail closed on each way out.
        let people = |o: AutoOutcome| matches!(o, AutoOutcome::ForPeople { .. });
        assert!(people(decide(None, &none, &clean, 1)));
        assert!(people(decide(Some(&p), &none, &[], 1)));
        assert!(people(decide(Some(&p), &none, &clean, 2)));
        let mut failed = clean.clone();
        failed[1] = Assessment::failed(&assessor(AssessorKind::GuardModel), "timed out", 2000);
        assert!(people(decide(Some(&p), &none, &failed, 1)));
        let high = vec![answered(
            AssessorKind::Moderation,
            vec![label("violence", Some(0.5), false)],
        )];
        assert!(people(decide(Some(&p), &none, &high, 1)));
        let mut flagged = clean.clone();
        flagged[0].flagged = true;
        assert!(people(decide(Some(&p), &none, &flagged, 1)));
        let masked = Evidence {
            hits: vec![HitCount {
                name: "email".into(),
                action: "redact".into(),
                count: 2,
            }],
            ..Evidence::default()
        };
        assert!(people(decide(Some(&p), &masked, &clean, 1)));
        let other_hit = Evidence {
            hits: vec![HitCount {
                name: "phone".into(),
                action: "redact".into(),
                count: 1,
            }],
            ..Evidence::default()
        };
        assert!(!people(decide(Some(&p), &other_hit, &clean, 1)));
        // Attachments: the assessors read only their markers.
        let image = Evidence {
            attachments: true,
            ..Evidence::default()
        };
        assert!(people(decide(Some(&p), &image, &clean, 1)));
    }

    #[test]
    fn denial_on_a_named_label_flagged_or_scored_high_enough() {
        let p = policy();
        let none = Evidence::default();
        let guard = vec![answered(
            AssessorKind::GuardModel,
            vec![label("S1", None, true)],
        )];
        assert!(matches!(
            decide(Some(&p), &none, &guard, 2),
            AutoOutcome::Deny { ref decider, .. } if decider == "assessor:guard_model"
        ));
        let low = vec![answered(
            AssessorKind::Presidio,
            vec![label("CREDIT_CARD", Some(0.6), false)],
        )];
        assert!(matches!(
            decide(Some(&p), &none, &low, 1),
            AutoOutcome::ForPeople { .. }
        ));
        let high = vec![answered(
            AssessorKind::Presidio,
            vec![label("CREDIT_CARD", Some(0.85), false)],
        )];
        assert!(matches!(
            decide(Some(&p), &none, &high, 1),
            AutoOutcome::Deny { .. }
        ));
        // Another label flagged: not denied, and not approved either.
        let s2 = vec![answered(
            AssessorKind::GuardModel,
            vec![label("S2", None, true)],
        )];
        assert!(matches!(
            decide(Some(&p), &none, &s2, 1),
            AutoOutcome::ForPeople { .. }
        ));
    }
}
