//! The body decision: parse the request, pick the policy rule, and say
//! forward, hold for review, or refuse.

use crate::config::{Action, Config, Endpoint};
use crate::extract::{parse_request, ParsedRequest};
use crate::refusal::{Refusal, RefusalKind};
use crate::wire::{ApiKind, CreateReview};

/// Request facts known from the head and Envoy's properties.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// `x-request-id`.
    pub request_id: String,
    /// `:method`.
    pub method: String,
    /// `:path` without query.
    pub path: String,
    /// `:authority`.
    pub authority: String,
    /// Envoy route name, if any.
    pub route: Option<String>,
}

/// The rule that applies to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleChoice {
    /// Rule name (`default` when none matched).
    pub name: String,
    /// What to do.
    pub action: Action,
    /// Forward unreviewed when the approval service is down.
    pub fail_open: bool,
    /// Hold timeout for this request.
    pub hold_timeout_ms: u64,
}

/// Everything needed to start a hold.
#[derive(Debug, Clone, PartialEq)]
pub struct HoldPlan {
    /// The review to create.
    pub review: CreateReview,
    /// The rule that asked for review.
    pub rule: RuleChoice,
}

/// What to do with a fully received body.
#[derive(Debug, Clone, PartialEq)]
pub enum BodyVerdict {
    /// Forward as is.
    Forward(RuleChoice),
    /// Hold for a human decision.
    Hold(Box<HoldPlan>),
    /// Refuse.
    Refuse(Refusal),
}

/// Picks the first rule matching route, path and model.
pub fn choose_rule(config: &Config, route: Option<&str>, path: &str, model: &str) -> RuleChoice {
    for rule in &config.rules {
        let route_ok = match (&rule.route, route) {
            (None, _) => true,
            (Some(g), Some(r)) => g.matches(r),
            (Some(_), None) => false,
        };
        let path_ok = rule.path.as_ref().is_none_or(|g| g.matches(path));
        let model_ok = rule.model.as_ref().is_none_or(|g| g.matches(model));
        if route_ok && path_ok && model_ok {
            return RuleChoice {
                name: rule.name.clone(),
                action: rule.action,
                fail_open: rule.fail_open,
                hold_timeout_ms: rule.hold_timeout_ms.unwrap_or(config.hold_timeout_ms),
            };
        }
    }
    RuleChoice { name: "default".into(), action: config.default_action, fail_open: false, hold_timeout_ms: config.hold_timeout_ms }
}

/// Decides on a complete request body.
pub fn inspect_body(config: &Config, endpoint: &Endpoint, info: &RequestInfo, body: &[u8]) -> BodyVerdict {
    let api = endpoint.api;
    if body.len() > config.max_body_bytes {
        return BodyVerdict::Refuse(Refusal::too_large(Some(api), config.max_body_bytes));
    }
    let parsed = match parse_request(api, body) {
        Ok(p) => p,
        Err(e) => return BodyVerdict::Refuse(Refusal::new(RefusalKind::BadRequest, Some(api), e)),
    };
    // parse_request accepted it, so it is valid UTF-8 JSON.
    let Ok(text) = std::str::from_utf8(body) else {
        return BodyVerdict::Refuse(Refusal::new(RefusalKind::BadRequest, Some(api), "request body is not UTF-8"));
    };
    let rule = choose_rule(config, info.route.as_deref(), &info.path, &parsed.model);
    match rule.action {
        Action::Allow => BodyVerdict::Forward(rule),
        Action::Deny => BodyVerdict::Refuse(denied(api, &rule.name, &parsed.model)),
        Action::Review => BodyVerdict::Hold(Box::new(HoldPlan { review: review_for(api, info, &parsed, text, &rule), rule })),
    }
}

fn denied(api: ApiKind, rule: &str, model: &str) -> Refusal {
    Refusal::new(RefusalKind::PolicyDenied, Some(api), format!("denied by policy rule `{rule}` (model `{model}`)"))
}

fn review_for(api: ApiKind, info: &RequestInfo, parsed: &ParsedRequest, body: &str, rule: &RuleChoice) -> CreateReview {
    CreateReview {
        request_id: info.request_id.clone(),
        api,
        method: info.method.clone(),
        path: info.path.clone(),
        authority: info.authority.clone(),
        route: info.route.clone(),
        caller: None,
        model: parsed.model.clone(),
        stream: parsed.stream,
        rule: Some(rule.name.clone()),
        prompt: parsed.prompt.clone(),
        body: body.to_string(),
        hold_timeout_ms: rule.hold_timeout_ms,
    }
}

/// Checks a reviewer's edited body before it replaces the original: it must
/// parse as the same API, and policy deny rules still apply to it.
pub fn check_edited_body(config: &Config, api: ApiKind, info: &RequestInfo, body: &[u8]) -> Result<(), Refusal> {
    let parsed = parse_request(api, body).map_err(|e| {
        Refusal::new(RefusalKind::ApprovalUnavailable, Some(api), format!("the reviewer's edited request is invalid: {e}"))
    })?;
    let rule = choose_rule(config, info.route.as_deref(), &info.path, &parsed.model);
    if rule.action == Action::Deny {
        return Err(denied(api, &rule.name, &parsed.model));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::config::default_endpoints;

    fn info(path: &str, route: Option<&str>) -> RequestInfo {
        RequestInfo { path: path.into(), method: "POST".into(), route: route.map(str::to_string), ..Default::default() }
    }

    const CHAT: &[u8] = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

    #[test]
    fn rules_pick_action_by_model_and_route() {
        let c = Config::from_json(
            br#"{"rules":[
                {"name":"bench","route":"bench*","action":"allow"},
                {"name":"no-o1","model":"o1*","action":"deny"},
                {"name":"fast","model":"gpt-4o","action":"review","hold_timeout_ms":2000,"fail_open":true}
            ],"default_action":"deny"}"#,
        )
        .unwrap();
        let ep = &default_endpoints()[0];
        match inspect_body(&c, ep, &info("/v1/chat/completions", Some("bench-route")), CHAT) {
            BodyVerdict::Forward(r) => assert_eq!(r.name, "bench"),
            other => panic!("{other:?}"),
        }
        match inspect_body(&c, ep, &info("/v1/chat/completions", None), CHAT) {
            BodyVerdict::Hold(plan) => {
                assert_eq!(plan.rule.hold_timeout_ms, 2000);
                assert!(plan.rule.fail_open);
                assert_eq!(plan.review.prompt[0].text, "hi");
                assert_eq!(plan.review.body.as_bytes(), CHAT);
            }
            other => panic!("{other:?}"),
        }
        let o1 = br#"{"model":"o1-mini","messages":[{"role":"user","content":"hi"}]}"#;
        match inspect_body(&c, ep, &info("/v1/chat/completions", None), o1) {
            BodyVerdict::Refuse(r) => {
                assert_eq!(r.status(), 403);
                assert!(r.message.contains("no-o1"));
            }
            other => panic!("{other:?}"),
        }
        let other = br#"{"model":"llama","messages":[{"role":"user","content":"hi"}]}"#;
        assert!(matches!(inspect_body(&c, ep, &info("/v1/chat/completions", None), other), BodyVerdict::Refuse(_)));
    }

    #[test]
    fn bad_bodies_are_refused_with_400() {
        let c = Config::from_json(b"").unwrap();
        let ep = &default_endpoints()[0];
        for body in [&b"{"[..], b"{}", br#"{"model":"m","model":"n","messages":[{"role":"user","content":"x"}]}"#] {
            match inspect_body(&c, ep, &info("/v1/chat/completions", None), body) {
                BodyVerdict::Refuse(r) => assert_eq!(r.status(), 400),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn edited_body_is_checked() {
        let c = Config::from_json(br#"{"rules":[{"model":"bad","action":"deny"}]}"#).unwrap();
        let i = info("/v1/chat/completions", None);
        assert!(check_edited_body(&c, ApiKind::OpenaiChat, &i, CHAT).is_ok());
        assert!(check_edited_body(&c, ApiKind::OpenaiChat, &i, b"{}").is_err());
        let bad = br#"{"model":"bad","messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(check_edited_body(&c, ApiKind::OpenaiChat, &i, bad).unwrap_err().status(), 403);
    }
}
